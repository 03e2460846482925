//! The publication table and the handle every transaction and the relay share.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, OnceLock},
    time::Duration,
};

use sqlx::{AnyConnection, Row as _, any::AnyRow};
use tokio::sync::Notify;

use super::{Event, EventHandlerTable, Stored, relay};
use crate::{
    clock::now_millis,
    config::EventsConfig,
    metrics::EVENT_PUBLICATIONS_RESUBMITTED_TOTAL,
    problem::RequestScope,
    storage::{Backend, Database, DbError, Migration},
};

/// The table publications are kept in.
pub const PUBLICATIONS_TABLE: &str = "trellis_event_publications";

/// The table. `due_at` is when a publication may next be claimed: at once for a new one,
/// after the backoff for one to retry, after the lease for one claimed (so a claim whose
/// instance died runs out by itself).
pub static MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "create trellis_event_publications",
        sqlite: "CREATE TABLE trellis_event_publications (
        id TEXT PRIMARY KEY,
        event_id TEXT NOT NULL,
        event TEXT NOT NULL,
        listener TEXT NOT NULL,
        payload TEXT NOT NULL,
        request_id TEXT,
        status TEXT NOT NULL DEFAULT 'pending',
        attempts INTEGER NOT NULL DEFAULT 0,
        created_at INTEGER NOT NULL,
        due_at INTEGER NOT NULL,
        claimed_by TEXT,
        completed_at INTEGER,
        last_error TEXT
    );
    CREATE INDEX trellis_event_publications_due ON trellis_event_publications (status, due_at);
    CREATE INDEX trellis_event_publications_completed
        ON trellis_event_publications (completed_at) WHERE status = 'completed';",
        postgres: "CREATE TABLE trellis_event_publications (
        id TEXT PRIMARY KEY,
        event_id TEXT NOT NULL,
        event TEXT NOT NULL,
        listener TEXT NOT NULL,
        payload TEXT NOT NULL,
        request_id TEXT,
        status TEXT NOT NULL DEFAULT 'pending',
        attempts BIGINT NOT NULL DEFAULT 0,
        created_at BIGINT NOT NULL,
        due_at BIGINT NOT NULL,
        claimed_by TEXT,
        completed_at BIGINT,
        last_error TEXT
    );
    CREATE INDEX trellis_event_publications_due ON trellis_event_publications (status, due_at);
    CREATE INDEX trellis_event_publications_completed
        ON trellis_event_publications (completed_at) WHERE status = 'completed';",
    },
    Migration {
        version: 2,
        name: "trellis_event_publications carry the emitting span's traceparent",
        sqlite: "ALTER TABLE trellis_event_publications ADD COLUMN traceparent TEXT;",
        postgres: "ALTER TABLE trellis_event_publications ADD COLUMN traceparent TEXT;",
    },
];

/// Columns per publication in the insert.
const INSERT_COLUMNS: usize = 8;

/// The publications of this instance's database: what [`Tx::emit`](crate::storage::Tx::emit)
/// writes to, and the relay that delivers them. Cheap to clone.
#[derive(Clone, Default)]
pub struct Publications {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    /// The modules handling each event, by event name: what an emit writes. (Names
    /// only: the handlers hold module services, which may hold this database, so only
    /// the relay's task holds them.)
    listeners: OnceLock<HashMap<&'static str, Vec<&'static str>>>,
    wake: Notify,
    relay: Mutex<Option<relay::Running>>,
}

impl std::fmt::Debug for Publications {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publications")
            .field("listeners", &self.inner.listeners.get())
            .finish_non_exhaustive()
    }
}

impl Publications {
    /// Records which modules handle which events (start-up, once the modules are wired;
    /// later calls are ignored): from then on an emit writes their publications.
    pub fn wire(&self, table: &EventHandlerTable) {
        let mut listeners: HashMap<&'static str, Vec<&'static str>> = HashMap::new();
        for route in table.routes() {
            listeners.entry(route.event).or_default().push(route.module);
        }
        let _ = self.inner.listeners.set(listeners);
    }

    /// Whether some module handles `E` (an event nobody handles is not stored).
    pub fn handles<E: Event>(&self) -> bool {
        self.listeners_of(E::NAME).is_some_and(|l| !l.is_empty())
    }

    fn listeners_of(&self, event: &str) -> Option<&[&'static str]> {
        self.inner
            .listeners
            .get()
            .and_then(|l| l.get(event))
            .map(Vec::as_slice)
    }

    /// Writes `event`'s publications (one per handler) on `conn`, inside the caller's
    /// transaction. Answers whether anything was written.
    pub(crate) async fn record<E: Event>(
        &self,
        conn: &mut AnyConnection,
        event: &E,
    ) -> Result<bool, DbError> {
        if self.inner.listeners.get().is_none() {
            return Err(DbError::Query(sqlx::Error::Configuration(
                format!("`{}` emitted before the event handlers were wired", E::NAME).into(),
            )));
        }
        let listeners = self.listeners_of(E::NAME).unwrap_or_default();
        if listeners.is_empty() {
            return Ok(false);
        }
        let payload = serde_json::to_string(event)
            .map_err(|e| DbError::Query(sqlx::Error::Encode(e.into())))?;
        let event_id = uuid::Uuid::now_v7().to_string();
        let request_id = RequestScope::current_id().map(|id| id.to_string());
        let traceparent = crate::telemetry::traceparent();
        let now = now_millis();
        let rows: Vec<String> = (0..listeners.len())
            .map(|row| {
                let first = row * INSERT_COLUMNS + 1;
                let params: Vec<String> = (first..first + INSERT_COLUMNS)
                    .map(|p| format!("${p}"))
                    .collect();
                format!("({}, ${})", params.join(", "), first + INSERT_COLUMNS - 1)
            })
            .collect();
        let sql = format!(
            "INSERT INTO {PUBLICATIONS_TABLE} \
             (id, event_id, event, listener, payload, request_id, traceparent, created_at, due_at) \
             VALUES {}",
            rows.join(", ")
        );
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
        for &listener in listeners {
            query = query
                .bind(uuid::Uuid::now_v7().to_string())
                .bind(event_id.clone())
                .bind(E::NAME)
                .bind(listener)
                .bind(payload.clone())
                .bind(request_id.clone())
                .bind(traceparent.clone())
                .bind(now);
        }
        query.execute(conn).await?;
        Ok(true)
    }

    /// Tells the relay that publications were committed.
    pub(crate) fn wake(&self) {
        self.inner.wake.notify_one();
    }

    pub(crate) async fn woken(&self) {
        self.inner.wake.notified().await;
    }

    /// Starts this instance's relay on `db`, running the handlers of `table` (once the
    /// migrations ran; a relay already running is kept).
    pub fn start_relay(&self, db: &Database, config: &EventsConfig, table: EventHandlerTable) {
        let mut relay = self.inner.relay.lock().unwrap_or_else(|e| e.into_inner());
        if relay.is_none() {
            *relay = Some(relay::Running::spawn(
                self.clone(),
                table,
                db.clone(),
                config.clone(),
            ));
        }
    }

    /// Stops the relay: it claims nothing more and finishes the publications under way
    /// within `budget`. Answers how many it had to abandon (their claims run out, and
    /// another instance, or the next start, delivers them).
    pub async fn stop_relay(&self, budget: Duration) -> usize {
        let running = self
            .inner
            .relay
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        match running {
            Some(running) => running.stop(budget).await,
            None => 0,
        }
    }
}

/// What a claim returns, in [`Stored`]'s order.
const STORED_COLUMNS: &str =
    "id, event_id, event, listener, payload, request_id, traceparent, created_at, attempts";

/// The claim for the routes of `table`: up to `$4` due publications, leased to `$2`
/// until `$1`. On PostgreSQL the rows are locked and others' locked rows skipped, so
/// two instances never claim the same one; SQLite has one writer at a time anyway.
pub(crate) fn claim_sql(backend: Backend, table: &EventHandlerTable) -> String {
    let mut events: Vec<&str> = table.routes().iter().map(|r| r.event).collect();
    let mut listeners: Vec<&str> = table.routes().iter().map(|r| r.module).collect();
    events.sort_unstable();
    events.dedup();
    listeners.sort_unstable();
    listeners.dedup();
    // Names are `'static` identifiers of this build (`user.registered`, `bi`), not input.
    let list = |names: &[&str]| {
        names
            .iter()
            .map(|n| format!("'{}'", n.replace('\'', "''")))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let lock = match backend {
        Backend::Postgres => " FOR UPDATE SKIP LOCKED",
        Backend::Sqlite => "",
    };
    format!(
        "UPDATE {PUBLICATIONS_TABLE} SET due_at = $1, claimed_by = $2 WHERE id IN (\
         SELECT id FROM {PUBLICATIONS_TABLE} WHERE status = 'pending' AND due_at <= $3 \
         AND event IN ({}) AND listener IN ({}) ORDER BY due_at LIMIT $4{lock}) \
         RETURNING {STORED_COLUMNS}",
        list(&events),
        list(&listeners)
    )
}

pub(crate) fn stored(row: &AnyRow) -> Result<Stored, sqlx::Error> {
    Ok(Stored {
        id: row.try_get("id")?,
        event_id: row.try_get("event_id")?,
        event: row.try_get("event")?,
        listener: row.try_get("listener")?,
        payload: row.try_get("payload")?,
        request_id: row.try_get("request_id")?,
        traceparent: row.try_get("traceparent")?,
        emitted_at_ms: row.try_get("created_at")?,
        attempts: row.try_get("attempts")?,
    })
}

/// Marks `ids` completed at `now`.
pub(crate) async fn complete(db: &Database, ids: &[&str], now: i64) -> Result<(), sqlx::Error> {
    if ids.is_empty() {
        return Ok(());
    }
    let params: Vec<String> = (2..ids.len() + 2).map(|p| format!("${p}")).collect();
    let sql = format!(
        "UPDATE {PUBLICATIONS_TABLE} SET status = 'completed', attempts = attempts + 1, \
         completed_at = $1, claimed_by = NULL, last_error = NULL WHERE id IN ({})",
        params.join(", ")
    );
    let mut query = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(now);
    for id in ids {
        query = query.bind(*id);
    }
    query.execute(db.pool()).await.map(|_| ())
}

/// Records a failed attempt: due again at `due_at`, or `failed` for good.
pub(crate) async fn record_failure(
    db: &Database,
    id: &str,
    attempts: i64,
    failed: bool,
    due_at: i64,
    error: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE trellis_event_publications SET status = $2, attempts = $3, due_at = $4, \
         last_error = $5, claimed_by = NULL WHERE id = $1",
    )
    .bind(id)
    .bind(if failed { "failed" } else { "pending" })
    .bind(attempts)
    .bind(due_at)
    .bind(error)
    .execute(db.pool())
    .await
    .map(|_| ())
}

/// Publications waiting (`pending`) and given up (`failed`), and when the oldest waiting
/// one was emitted.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Backlog {
    pub(crate) pending: i64,
    pub(crate) failed: i64,
    pub(crate) oldest_pending_ms: Option<i64>,
}

pub(crate) async fn backlog(db: &Database) -> Result<Backlog, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT status, COUNT(*) AS n, MIN(created_at) AS oldest FROM trellis_event_publications \
         WHERE status IN ('pending', 'failed') GROUP BY status",
    )
    .fetch_all(db.pool())
    .await?;
    let mut backlog = Backlog::default();
    for row in rows {
        let status: String = row.try_get("status")?;
        let n: i64 = row.try_get("n")?;
        if status == "failed" {
            backlog.failed = n;
        } else {
            backlog.pending = n;
            backlog.oldest_pending_ms = row.try_get("oldest")?;
        }
    }
    Ok(backlog)
}

/// Removes the publications completed before `before`; how many.
pub(crate) async fn purge(db: &Database, before: i64) -> Result<u64, sqlx::Error> {
    sqlx::query(
        "DELETE FROM trellis_event_publications WHERE status = 'completed' AND completed_at < $1",
    )
    .bind(before)
    .execute(db.pool())
    .await
    .map(|done| done.rows_affected())
}

/// Where a publication stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublicationStatus {
    /// Waiting for its handler (or for another attempt).
    Pending,
    /// Its handler ran.
    Completed,
    /// Its handler failed every attempt; kept until resubmitted.
    Failed,
}

impl PublicationStatus {
    /// `pending`, `completed` or `failed`, as stored.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Completed => "completed",
            Self::Failed => "failed",
        }
    }

    fn parse(stored: &str) -> Self {
        match stored {
            "completed" => Self::Completed,
            "failed" => Self::Failed,
            _ => Self::Pending,
        }
    }
}

/// A publication, as an operator sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publication {
    /// The publication's id.
    pub id: String,
    /// The event's id (shared by the event's publications).
    pub event_id: String,
    /// The event's name.
    pub event: String,
    /// The module whose handler it is for.
    pub module: String,
    /// Where it stands.
    pub status: PublicationStatus,
    /// Attempts made.
    pub attempts: i64,
    /// When the event was emitted, milliseconds since the Unix epoch.
    pub created_at_ms: i64,
    /// When its handler completed.
    pub completed_at_ms: Option<i64>,
    /// The last failed attempt's error.
    pub last_error: Option<String>,
    /// The event as stored (JSON).
    pub payload: String,
}

/// What a resubmission found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resubmitted {
    /// The failed publication is pending again.
    Yes,
    /// No publication has the id.
    NotFound,
    /// The publication is not failed (pending or completed).
    NotFailed(PublicationStatus),
}

/// The publications, for the operators' API: list them, resubmit failed ones.
#[derive(Debug, Clone)]
pub struct Registry {
    db: Database,
}

impl Registry {
    /// The registry of `db`.
    pub fn new(db: Database) -> Self {
        Self { db }
    }

    /// Up to `limit` publications after the id `after`, in id (emission) order, with
    /// `status` if given.
    pub async fn list(
        &self,
        status: Option<PublicationStatus>,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<Publication>, DbError> {
        let rows = sqlx::query(
            "SELECT id, event_id, event, listener, status, attempts, created_at, completed_at, \
             last_error, payload FROM trellis_event_publications \
             WHERE ($1 IS NULL OR status = $1) AND ($2 IS NULL OR id > $2) ORDER BY id LIMIT $3",
        )
        .bind(status.map(PublicationStatus::as_str))
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(self.db.pool())
        .await?;
        rows.iter()
            .map(|row| {
                Ok(Publication {
                    id: row.try_get("id")?,
                    event_id: row.try_get("event_id")?,
                    event: row.try_get("event")?,
                    module: row.try_get("listener")?,
                    status: PublicationStatus::parse(row.try_get("status")?),
                    attempts: row.try_get("attempts")?,
                    created_at_ms: row.try_get("created_at")?,
                    completed_at_ms: row.try_get("completed_at")?,
                    last_error: row.try_get("last_error")?,
                    payload: row.try_get("payload")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(DbError::from)
    }

    /// Makes the failed publication `id` pending again, with its attempts counted from 0.
    pub async fn resubmit(&self, id: &str) -> Result<Resubmitted, DbError> {
        let done = sqlx::query(
            "UPDATE trellis_event_publications SET status = 'pending', attempts = 0, due_at = $2, \
             claimed_by = NULL WHERE id = $1 AND status = 'failed'",
        )
        .bind(id)
        .bind(now_millis())
        .execute(self.db.pool())
        .await?;
        if done.rows_affected() > 0 {
            self.resubmitted(1);
            return Ok(Resubmitted::Yes);
        }
        let status: Option<String> =
            sqlx::query_scalar("SELECT status FROM trellis_event_publications WHERE id = $1")
                .bind(id)
                .fetch_optional(self.db.pool())
                .await?;
        Ok(status.map_or(Resubmitted::NotFound, |s| {
            Resubmitted::NotFailed(PublicationStatus::parse(&s))
        }))
    }

    /// Makes every failed publication pending again; how many.
    pub async fn resubmit_failed(&self) -> Result<u64, DbError> {
        let done = sqlx::query(
            "UPDATE trellis_event_publications SET status = 'pending', attempts = 0, due_at = $1, \
             claimed_by = NULL WHERE status = 'failed'",
        )
        .bind(now_millis())
        .execute(self.db.pool())
        .await?;
        self.resubmitted(done.rows_affected());
        Ok(done.rows_affected())
    }

    fn resubmitted(&self, count: u64) {
        if count > 0 {
            metrics::counter!(EVENT_PUBLICATIONS_RESUBMITTED_TOTAL).increment(count);
            self.db.events().wake();
        }
    }
}
