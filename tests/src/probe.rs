//! The `probe` module: test fixtures behind the real contract.

use std::time::Duration;

use poem::http::StatusCode;
use poem_openapi::{
    ApiResponse, Object, OpenApi,
    param::{Path, Query},
    payload::Json,
};
use serde::Deserialize;
use trellis_core::{
    Module, ModuleBuilder, ModuleRegistration,
    bus::{Bus, Message, Request},
    contracts::UserRegistered,
    events::Published,
    jobs::Job,
    payload::JsonBody,
    problem::{ProblemError, ProblemJson},
    readiness::CheckOutcome,
    storage::{DbError, Migration, ModuleCache, ModuleDb},
};

/// `[modules.probe]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProbeConfig {
    /// What the `probe.flag` readiness check reports.
    pub ready: bool,
    /// The period of the `probe.tick` job, which records each run in `probe_job_runs`.
    pub job_every_ms: u64,
}

impl Default for ProbeConfig {
    fn default() -> Self {
        Self {
            ready: true,
            job_every_ms: 3_600_000,
        }
    }
}

/// Asks the probe module to double a number (a bus request).
#[derive(Debug)]
pub struct Double(pub u32);

impl Request for Double {
    type Response = u64;
}

/// Published when an item is looked up.
#[derive(Debug, Clone)]
pub struct ItemViewed(pub u32);

impl Message for ItemViewed {}

/// A request type no module handles.
#[derive(Debug)]
pub struct Unhandled;

impl Request for Unhandled {
    type Response = ();
}

/// The fixture module.
pub struct ProbeModule;

impl Module for ProbeModule {
    fn name(&self) -> &'static str {
        "probe"
    }

    fn version(&self) -> &'static str {
        env!("CARGO_PKG_VERSION")
    }

    fn description(&self) -> &'static str {
        "Test fixtures: slow, panicking and validating endpoints, and a table of notes."
    }

    fn requires(&self) -> &'static [&'static str] {
        &["common"]
    }

    fn build(&self, module: &mut ModuleBuilder) {
        module
            .config::<ProbeConfig>()
            .migrations(MIGRATIONS)
            .api(|ctx| {
                Ok(ProbeApi {
                    bus: ctx.bus().clone(),
                    notes: NoteRepo {
                        db: ctx.database(),
                        cache: ctx.cache(),
                    },
                })
            })
            .handle(|_| Ok(|Double(n): Double| async move { u64::from(n) * 2 }))
            .job("tick", |ctx| {
                let config: ProbeConfig = ctx.config()?;
                let db = ctx.database();
                // Which server ran it: one id per assembled server.
                let instance = uuid::Uuid::new_v4().simple().to_string();
                Ok(Job::every(
                    Duration::from_millis(config.job_every_ms),
                    move || {
                        let (db, instance) = (db.clone(), instance.clone());
                        async move {
                            db.run(
                                "record_job_run",
                                sqlx::query(
                                    "INSERT INTO probe_job_runs (instance, ran_at) VALUES ($1, $2)",
                                )
                                .bind(instance)
                                .bind(trellis_core::clock::now_millis())
                                .execute(db.pool()),
                            )
                            .await?;
                            Ok(1)
                        }
                    },
                ))
            })
            .on_event(|ctx| {
                let db = ctx.database();
                Ok(move |_: Published<UserRegistered>| handle_registration(db.clone()))
            })
            .subscribe(|_| {
                Ok(|ItemViewed(id): ItemViewed| async move {
                    tracing::debug!(id, "item viewed");
                })
            })
            .readiness("flag", |ctx| {
                let config: ProbeConfig = ctx.config()?;
                Ok(move || {
                    let ready = config.ready;
                    async move {
                        if ready {
                            CheckOutcome::up()
                        } else {
                            CheckOutcome::down("modules.probe.ready is false")
                        }
                    }
                })
            });
    }
}

inventory::submit! { ModuleRegistration::of(&ProbeModule) }

use trellis_core::inventory;

/// The probe's errors.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// No such item.
    #[error("item {0} does not exist")]
    NotFound(u32),
    /// The bus could not deliver.
    #[error(transparent)]
    Bus(#[from] trellis_core::bus::BusError),
}

impl ProblemError for ProbeError {
    fn status(&self) -> StatusCode {
        match self {
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::Bus(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
    fn slug(&self) -> &'static str {
        match self {
            Self::NotFound(_) => "not-found",
            Self::Bus(_) => "internal",
        }
    }
    fn title(&self) -> &'static str {
        match self {
            Self::NotFound(_) => "Item not found",
            Self::Bus(_) => "Internal server error",
        }
    }
}

/// An echo request with constraints worth testing.
#[derive(Debug, Object)]
pub struct EchoRequest {
    /// 1 to 20 characters.
    #[oai(validator(min_length = 1, max_length = 20))]
    pub name: String,
    /// At most 100.
    #[oai(validator(maximum(value = "100")))]
    pub count: u32,
    /// Optional labels.
    pub tags: Option<Vec<String>>,
}

/// The echo.
#[derive(Debug, Object)]
pub struct EchoResponse {
    /// The name.
    pub name: String,
    /// The count.
    pub count: u32,
}

/// How long the slow endpoint slept.
#[derive(Debug, Object)]
pub struct Slept {
    /// Milliseconds.
    pub slept_ms: u64,
}

/// An item.
#[derive(Debug, Object)]
pub struct Item {
    /// Its id.
    pub id: u32,
    /// Its id doubled, by the bus.
    pub doubled: u64,
}

#[derive(ApiResponse)]
enum SlowResponse {
    /// Slept.
    #[oai(status = 200)]
    Ok(Json<Slept>),
}

#[derive(ApiResponse)]
enum EchoResult {
    /// The echo.
    #[oai(status = 200)]
    Ok(Json<EchoResponse>),
}

#[derive(ApiResponse)]
enum ItemResponse {
    /// The item.
    #[oai(status = 200)]
    Ok(Json<Item>),
    /// No such item.
    #[oai(status = 404)]
    NotFound(ProblemJson),
}

/// The probe's tables: notes, then a tag column, then the job's runs (three versions on
/// both backends).
pub static MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "create probe_notes",
        sqlite: "CREATE TABLE probe_notes (id INTEGER PRIMARY KEY AUTOINCREMENT, text TEXT NOT NULL UNIQUE)",
        postgres: "CREATE TABLE probe_notes (id BIGSERIAL PRIMARY KEY, text TEXT NOT NULL UNIQUE)",
    },
    Migration {
        version: 2,
        name: "add probe_notes.tag",
        sqlite: "ALTER TABLE probe_notes ADD COLUMN tag TEXT NOT NULL DEFAULT 'none'",
        postgres: "ALTER TABLE probe_notes ADD COLUMN tag TEXT NOT NULL DEFAULT 'none'",
    },
    Migration {
        version: 3,
        name: "create probe_job_runs",
        sqlite: "CREATE TABLE probe_job_runs (instance TEXT NOT NULL, ran_at BIGINT NOT NULL)",
        postgres: "CREATE TABLE probe_job_runs (instance TEXT NOT NULL, ran_at BIGINT NOT NULL)",
    },
    Migration {
        version: 4,
        name: "create probe_event_faults",
        sqlite: "CREATE TABLE probe_event_faults (reason TEXT NOT NULL)",
        postgres: "CREATE TABLE probe_event_faults (reason TEXT NOT NULL)",
    },
];

/// The `UserRegistered` handler: fails while `probe_event_faults` has a row (its reason
/// is the error), as a handler whose dependency is down would; while the reason is
/// `hang`, it waits, holding its claim.
async fn handle_registration(db: ModuleDb) -> anyhow::Result<()> {
    loop {
        let fault: Option<(String,)> = db
            .run(
                "read_event_fault",
                sqlx::query_as("SELECT reason FROM probe_event_faults LIMIT 1")
                    .fetch_optional(db.pool()),
            )
            .await?;
        match fault {
            Some((reason,)) if reason == "hang" => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Some((reason,)) => anyhow::bail!("{reason}"),
            None => return Ok(()),
        }
    }
}

/// A stored note.
#[derive(Debug, Clone, Object, serde::Serialize, serde::Deserialize)]
pub struct Note {
    /// Its id.
    pub id: i64,
    /// Its text.
    pub text: String,
    /// Its tag.
    pub tag: String,
    /// Whether this answer came from the cache.
    #[serde(skip)]
    pub cached: bool,
}

/// A new note.
#[derive(Debug, Object)]
pub struct NewNote {
    /// 1 to 200 characters, unique.
    #[oai(validator(min_length = 1, max_length = 200))]
    pub text: String,
}

/// The notes repository: SQL and cache, nothing else.
struct NoteRepo {
    db: ModuleDb,
    cache: ModuleCache,
}

const NOTE_TTL: Duration = Duration::from_secs(60);

impl NoteRepo {
    async fn insert(&self, text: &str) -> Result<Note, DbError> {
        let (id, text, tag): (i64, String, String) = self
            .db
            .run(
                "insert_note",
                sqlx::query_as(
                    "INSERT INTO probe_notes (text) VALUES ($1) RETURNING id, text, tag",
                )
                .bind(text)
                .fetch_one(self.db.pool()),
            )
            .await?;
        Ok(Note {
            id,
            text,
            tag,
            cached: false,
        })
    }

    async fn find(&self, id: i64) -> Result<Option<Note>, DbError> {
        let key = format!("note:{id}");
        if let Some(mut note) = self.cache.get_json::<Note>(&key).await {
            note.cached = true;
            return Ok(Some(note));
        }
        let row: Option<(i64, String, String)> = self
            .db
            .run(
                "find_note",
                sqlx::query_as("SELECT id, text, tag FROM probe_notes WHERE id = $1")
                    .bind(id)
                    .fetch_optional(self.db.pool()),
            )
            .await?;
        let note = row.map(|(id, text, tag)| Note {
            id,
            text,
            tag,
            cached: false,
        });
        if let Some(note) = &note {
            self.cache.set_json(&key, note, NOTE_TTL).await;
        }
        Ok(note)
    }
}

#[derive(ApiResponse)]
enum CreateNoteResponse {
    /// Stored.
    #[oai(status = 201)]
    Created(Json<Note>),
    /// The same text is already stored.
    #[oai(status = 409)]
    Conflict(ProblemJson),
    /// The database is unavailable.
    #[oai(status = 503)]
    Unavailable(ProblemJson),
}

#[derive(ApiResponse)]
enum GetNoteResponse {
    /// The note.
    #[oai(status = 200)]
    Ok(Json<Note>),
    /// No such note.
    #[oai(status = 404)]
    NotFound(ProblemJson),
    /// The database is unavailable.
    #[oai(status = 503)]
    Unavailable(ProblemJson),
}

/// The probe's API.
pub struct ProbeApi {
    bus: Bus,
    notes: NoteRepo,
}

#[OpenApi(prefix_path = "/api/v1/probe")]
impl ProbeApi {
    /// Sleep
    ///
    /// Sleeps `ms` milliseconds (at most 10 000), then answers.
    #[oai(path = "/slow", method = "get", operation_id = "probeSlow")]
    async fn slow(
        &self,
        /// Milliseconds to sleep.
        #[oai(validator(maximum(value = "10000")))]
        ms: Query<u64>,
    ) -> SlowResponse {
        tokio::time::sleep(Duration::from_millis(ms.0)).await;
        SlowResponse::Ok(Json(Slept { slept_ms: ms.0 }))
    }

    /// Panic
    ///
    /// Panics, to show that the server answers 500 and keeps serving.
    #[oai(path = "/panic", method = "get", operation_id = "probePanic")]
    async fn panic(&self) -> SlowResponse {
        panic!("the probe panicked on purpose");
    }

    /// Echo
    ///
    /// Echoes a validated body.
    #[oai(path = "/echo", method = "post", operation_id = "probeEcho")]
    async fn echo(&self, body: JsonBody<EchoRequest>) -> EchoResult {
        EchoResult::Ok(Json(EchoResponse {
            name: body.0.name,
            count: body.0.count,
        }))
    }

    /// Item
    ///
    /// Items 1 to 1000 exist; the bus doubles the id.
    #[oai(path = "/items/:id", method = "get", operation_id = "probeItem")]
    async fn item(
        &self,
        /// The item id.
        id: Path<u32>,
    ) -> ItemResponse {
        match self.lookup(id.0).await {
            Ok(item) => ItemResponse::Ok(Json(item)),
            Err(error) => ItemResponse::NotFound(ProblemJson::from_error(&error)),
        }
    }

    /// Create a note
    ///
    /// Stores a note in the probe's own table.
    #[oai(path = "/notes", method = "post", operation_id = "probeCreateNote")]
    async fn create_note(&self, body: JsonBody<NewNote>) -> CreateNoteResponse {
        match self.notes.insert(&body.0.text).await {
            Ok(note) => CreateNoteResponse::Created(Json(note)),
            Err(error @ DbError::Unavailable(_)) => {
                CreateNoteResponse::Unavailable(ProblemJson::from_error(&error))
            }
            Err(error @ DbError::UniqueViolation { .. }) => {
                CreateNoteResponse::Conflict(ProblemJson::from_error(&error))
            }
            Err(error) => CreateNoteResponse::Unavailable(ProblemJson::internal(&error)),
        }
    }

    /// Read a note
    ///
    /// From the cache when it has it, else from the database (then cached).
    #[oai(path = "/notes/:id", method = "get", operation_id = "probeGetNote")]
    async fn get_note(
        &self,
        /// The note id (ids stay within JavaScript's safe integers).
        #[oai(validator(minimum(value = "1"), maximum(value = "9007199254740991")))]
        id: Path<i64>,
    ) -> GetNoteResponse {
        match self.notes.find(id.0).await {
            Ok(Some(note)) => GetNoteResponse::Ok(Json(note)),
            Ok(None) => GetNoteResponse::NotFound(ProblemJson::from_error(&DbError::NotFound)),
            Err(error @ DbError::Unavailable(_)) => {
                GetNoteResponse::Unavailable(ProblemJson::from_error(&error))
            }
            Err(error) => GetNoteResponse::Unavailable(ProblemJson::internal(&error)),
        }
    }

    /// Unhandled bus request
    ///
    /// Asks the bus something no module answers: a 500 whose cause is logged.
    #[oai(path = "/unhandled", method = "get", operation_id = "probeUnhandled")]
    async fn unhandled(&self) -> poem::Result<SlowResponse> {
        self.bus
            .request(Unhandled)
            .await
            .map_err(|e| poem::Error::from(ProbeError::from(e)))?;
        Ok(SlowResponse::Ok(Json(Slept { slept_ms: 0 })))
    }
}

impl ProbeApi {
    async fn lookup(&self, id: u32) -> Result<Item, ProbeError> {
        if !(1..=1000).contains(&id) {
            return Err(ProbeError::NotFound(id));
        }
        let doubled = self.bus.request(Double(id)).await?;
        self.bus.publish(ItemViewed(id)).await;
        Ok(Item { id, doubled })
    }
}

impl poem::error::ResponseError for ProbeError {
    fn status(&self) -> StatusCode {
        ProblemError::status(self)
    }

    fn as_response(&self) -> poem::Response {
        use poem::IntoResponse as _;
        ProblemJson::from_error(self).into_response()
    }
}
