//! The database: one sqlx `Any` pool whose backend the URL chooses, so the same binary and
//! the same repository code run on SQLite or PostgreSQL. Queries use `$1`-style
//! placeholders, which both backends accept.

use std::{
    sync::{
        Arc, Once,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use poem::http::{HeaderValue, StatusCode, header};
use sqlx::{
    AnyPool, Executor as _,
    any::{AnyConnectOptions, AnyPoolOptions},
};
use tracing::Span;

use crate::{
    config::DatabaseConfig,
    events::{Event, Publications},
    metrics::{
        DB_POOL_CONNECTIONS, DB_POOL_MAX_CONNECTIONS, DB_QUERY_DURATION_SECONDS,
        DB_QUERY_ERRORS_TOTAL,
    },
    problem::ProblemError,
    readiness::CheckOutcome,
    telemetry::InTrace as _,
};

/// Which database the URL chose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// SQLite (the embedded default).
    Sqlite,
    /// PostgreSQL.
    Postgres,
}

impl Backend {
    /// `sqlite` or `postgres`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sqlite => "sqlite",
            Self::Postgres => "postgres",
        }
    }
}

/// The pool, and the event publications kept in it. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Database {
    pool: AnyPool,
    backend: Backend,
    events: Publications,
}

static DRIVERS: Once = Once::new();

/// The span a statement runs in, with traces on: named by its module and operation,
/// never by its text or values.
fn statement_span(backend: Backend, module: &'static str, operation: &'static str) -> Span {
    crate::trace_span!(
        "db",
        otel.name = format!("db {module}.{operation}"),
        otel.kind = "client",
        db.system.name = match backend {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgresql",
        },
        db.operation.name = operation,
        module,
        otel.status_code = tracing::field::Empty,
    )
}

impl Database {
    /// Connects (creating the SQLite file and its folder when needed) and checks that the
    /// database answers.
    pub async fn connect(config: &DatabaseConfig) -> anyhow::Result<Self> {
        DRIVERS.call_once(sqlx::any::install_default_drivers);
        let (backend, url) = prepare_url(config.url.expose())?;
        let options: AnyConnectOptions = url
            .parse()
            .with_context(|| "`database.url`: cannot be parsed as a database URL")?;
        let statement_timeout = config.statement_timeout_ms;
        let pool = AnyPoolOptions::new()
            .max_connections(config.max_connections)
            .min_connections(config.min_connections)
            .acquire_timeout(Duration::from_millis(config.acquire_timeout_ms))
            // A local SQLite file cannot drop a connection; a network database can, so its
            // connections are checked before use (a broken one is replaced, not handed out).
            .test_before_acquire(backend == Backend::Postgres)
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    let setup = match backend {
                        Backend::Sqlite => format!(
                            "PRAGMA journal_mode = WAL; PRAGMA foreign_keys = ON; \
                             PRAGMA synchronous = NORMAL; PRAGMA busy_timeout = {statement_timeout};"
                        ),
                        Backend::Postgres => format!("SET statement_timeout = {statement_timeout};"),
                    };
                    conn.execute(sqlx::raw_sql(sqlx::AssertSqlSafe(setup))).await?;
                    Ok(())
                })
            })
            .connect_with(options)
            .await
            .with_context(|| {
                format!("cannot connect to the database at `{}` (`database.url`)", config.url.redacted())
            })?;
        Ok(Self {
            pool,
            backend,
            events: Publications::default(),
        })
    }

    /// The backend.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The event publications: what transactions emit, and the relay delivering them.
    pub fn events(&self) -> &Publications {
        &self.events
    }

    /// The pool, for core's own use (migrations, checks).
    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// `module`'s handle.
    pub fn for_module(&self, module: &'static str) -> ModuleDb {
        ModuleDb {
            db: self.clone(),
            module,
        }
    }

    /// The readiness probe: a trivial query.
    pub async fn ping(&self) -> CheckOutcome {
        match sqlx::query("SELECT 1").execute(&self.pool).await {
            Ok(_) => CheckOutcome::up(),
            Err(error) => {
                CheckOutcome::down(format!("{} unreachable: {error}", self.backend.as_str()))
            }
        }
    }

    /// Publishes the pool's connections in use and idle.
    pub fn record_pool_metrics(&self) {
        let idle = self.pool.num_idle() as f64;
        let size = f64::from(self.pool.size());
        metrics::gauge!(DB_POOL_CONNECTIONS, "state" => "idle").set(idle);
        metrics::gauge!(DB_POOL_CONNECTIONS, "state" => "in_use").set((size - idle).max(0.0));
        metrics::gauge!(DB_POOL_MAX_CONNECTIONS)
            .set(f64::from(self.pool.options().get_max_connections()));
    }

    /// Closes every connection.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// Checks the URL, creates the SQLite folder, and asks SQLite to create the file.
fn prepare_url(url: &str) -> anyhow::Result<(Backend, String)> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        anyhow::ensure!(
            cfg!(feature = "postgres"),
            "`database.url` names PostgreSQL: this build has no PostgreSQL driver (cargo \
             feature `postgres` of trellis-server)"
        );
        return Ok((Backend::Postgres, url.to_owned()));
    }
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
        .context("`database.url`: must start with `sqlite:` or `postgres://`")?;
    anyhow::ensure!(
        cfg!(feature = "sqlite"),
        "`database.url` names SQLite: this build has no SQLite driver (cargo feature \
         `sqlite` of trellis-server)"
    );
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    if path == ":memory:" {
        return Ok((Backend::Sqlite, String::from("sqlite::memory:")));
    }
    if !path.is_empty()
        && let Some(parent) = std::path::Path::new(path).parent()
        && !parent.as_os_str().is_empty()
    {
        std::fs::create_dir_all(parent).with_context(|| {
            format!(
                "`database.url`: cannot create the folder {}",
                parent.display()
            )
        })?;
    }
    let url = if query.split('&').any(|p| p.starts_with("mode=")) {
        url.to_owned()
    } else if query.is_empty() {
        format!("sqlite://{path}?mode=rwc")
    } else {
        format!("sqlite://{path}?{query}&mode=rwc")
    };
    Ok((Backend::Sqlite, url))
}

/// A module's database handle: the pool plus the module's name for metrics.
#[derive(Debug, Clone)]
pub struct ModuleDb {
    db: Database,
    module: &'static str,
}

impl ModuleDb {
    /// The pool, to run queries on inside [`ModuleDb::run`].
    pub fn pool(&self) -> &AnyPool {
        &self.db.pool
    }

    /// The backend, for the rare query that differs.
    pub fn backend(&self) -> Backend {
        self.db.backend
    }

    /// Runs one query, timing it as `operation` and classifying its error. With traces
    /// on, it runs in a span `db <module>.<operation>` (the operation's name, never the
    /// statement or its values).
    pub async fn run<T, F>(&self, operation: &'static str, query: F) -> Result<T, DbError>
    where
        F: Future<Output = Result<T, sqlx::Error>>,
    {
        let span = statement_span(self.db.backend, self.module, operation);
        let started = Instant::now();
        let result = query.in_trace(span.clone()).await.map_err(DbError::from);
        metrics::histogram!(DB_QUERY_DURATION_SECONDS, "module" => self.module, "operation" => operation)
            .record(started.elapsed().as_secs_f64());
        if let Err(error) = &result {
            span.record("otel.status_code", "ERROR");
            metrics::counter!(
                DB_QUERY_ERRORS_TOTAL,
                "module" => self.module,
                "operation" => operation,
                "kind" => error.kind()
            )
            .increment(1);
        }
        result
    }
}

impl ModuleDb {
    /// Begins a transaction that other modules can join: the handle is cheap to clone and
    /// can travel in a bus request, so a change and its consequences in another module's
    /// tables (a deleted account's sessions, say) commit or roll back together.
    pub async fn begin(&self) -> Result<Tx, DbError> {
        let tx = self.run("begin", self.db.pool.begin()).await?;
        Ok(Tx {
            inner: Arc::new(tokio::sync::Mutex::new(Some(tx))),
            backend: self.db.backend,
            module: self.module,
            events: self.db.events.clone(),
            emitted: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Emits `event` on its own, for an event that comes with no other change (a failed
    /// login): one statement writing a publication per handler.
    pub async fn emit<E: Event>(&self, event: &E) -> Result<(), DbError> {
        if !self.db.events.handles::<E>() {
            return Ok(());
        }
        let mut conn = self.run("acquire", self.db.pool.acquire()).await?;
        self.db.events.record(&mut conn, event).await?;
        self.db.events.wake();
        Ok(())
    }
}

/// A transaction shared by the modules taking part in one change. Statements run on it
/// one at a time ([`Tx::conn`]); the module that began it commits it. Dropped without a
/// commit, it rolls back, and so do the events emitted in it ([`Tx::emit`]).
#[derive(Clone)]
pub struct Tx {
    inner: Arc<tokio::sync::Mutex<Option<sqlx::Transaction<'static, sqlx::Any>>>>,
    backend: Backend,
    /// The module that began it.
    module: &'static str,
    events: Publications,
    emitted: Arc<AtomicBool>,
}

impl std::fmt::Debug for Tx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tx")
            .field("backend", &self.backend)
            .finish_non_exhaustive()
    }
}

/// The transaction's connection, held while one statement runs.
pub struct TxConn<'a>(tokio::sync::MutexGuard<'a, Option<sqlx::Transaction<'static, sqlx::Any>>>);

impl TxConn<'_> {
    /// The connection to run a statement on; an error once the transaction has ended.
    pub fn get(&mut self) -> Result<&mut sqlx::AnyConnection, sqlx::Error> {
        self.0.as_deref_mut().ok_or(sqlx::Error::PoolClosed)
    }
}

impl Tx {
    /// The backend, for the rare statement that differs.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The connection, for one statement (inside [`ModuleDb::run`]).
    pub async fn conn(&self) -> TxConn<'_> {
        TxConn(self.inner.lock().await)
    }

    /// Records `event` with the change: its handlers run once the transaction has
    /// committed (at least once each; see [`events`](crate::events)), and never if it
    /// rolls back.
    pub async fn emit<E: Event>(&self, event: &E) -> Result<(), DbError> {
        let mut conn = self.conn().await;
        if self.events.record(conn.get()?, event).await? {
            self.emitted.store(true, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Commits (and wakes the relay when events were emitted); an error if it was
    /// committed already or the database refused.
    pub async fn commit(&self) -> Result<(), DbError> {
        let tx = self.inner.lock().await.take().ok_or(DbError::NotFound)?;
        tx.commit()
            .in_trace(statement_span(self.backend, self.module, "commit"))
            .await
            .map_err(DbError::from)?;
        if self.emitted.load(Ordering::Relaxed) {
            self.events.wake();
        }
        Ok(())
    }
}

/// A database failure, classified by what the client can do about it.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// The database cannot be reached, or did not answer in time: try again later.
    #[error("the database is unavailable: {0}")]
    Unavailable(String),
    /// A uniqueness constraint refused the write.
    #[error("a record with the same unique value already exists")]
    UniqueViolation {
        /// The constraint, when the database names it.
        constraint: Option<String>,
    },
    /// A foreign key refused the write.
    #[error("the record refers to something that does not exist")]
    ForeignKeyViolation,
    /// A query expected a row and found none.
    #[error("not found")]
    NotFound,
    /// Anything else: a bug or a broken schema.
    #[error("database query failed: {0}")]
    Query(#[source] sqlx::Error),
}

impl DbError {
    /// A short label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Unavailable(_) => "unavailable",
            Self::UniqueViolation { .. } => "unique_violation",
            Self::ForeignKeyViolation => "foreign_key_violation",
            Self::NotFound => "not_found",
            Self::Query(_) => "query",
        }
    }
}

impl From<sqlx::Error> for DbError {
    fn from(error: sqlx::Error) -> Self {
        match &error {
            sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed
            | sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::Protocol(_) => Self::Unavailable(error.to_string()),
            sqlx::Error::RowNotFound => Self::NotFound,
            sqlx::Error::Database(db) => {
                let code = db.code().unwrap_or_default();
                if db.is_unique_violation() {
                    Self::UniqueViolation {
                        constraint: db.constraint().map(str::to_owned),
                    }
                } else if db.is_foreign_key_violation() {
                    Self::ForeignKeyViolation
                } else if code.starts_with("08")
                    || ["57P01", "57P02", "57P03", "57014", "53300"].contains(&code.as_ref())
                    || ["5", "6", "517", "261"].contains(&code.as_ref())
                {
                    // PostgreSQL: connection exceptions, shutdown, cannot connect now,
                    // statement timeout, too many connections. SQLite: busy, locked.
                    Self::Unavailable(error.to_string())
                } else {
                    Self::Query(error)
                }
            }
            _ => Self::Query(error),
        }
    }
}

impl ProblemError for DbError {
    fn status(&self) -> StatusCode {
        match self {
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::UniqueViolation { .. } | Self::ForeignKeyViolation => StatusCode::CONFLICT,
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::Query(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn slug(&self) -> &'static str {
        match self {
            Self::Unavailable(_) => "database-unavailable",
            Self::UniqueViolation { .. } | Self::ForeignKeyViolation => "conflict",
            Self::NotFound => "not-found",
            Self::Query(_) => "internal",
        }
    }

    fn title(&self) -> &'static str {
        match self {
            Self::Unavailable(_) => "Database unavailable",
            Self::UniqueViolation { .. } | Self::ForeignKeyViolation => "Conflict",
            Self::NotFound => "Not found",
            Self::Query(_) => "Internal server error",
        }
    }

    fn detail(&self) -> String {
        match self {
            // The driver's text may name hosts; say only what the client can act on.
            Self::Unavailable(_) => String::from("the database is unavailable; try again shortly"),
            other => other.to_string(),
        }
    }

    fn headers(&self) -> Vec<(header::HeaderName, HeaderValue)> {
        match self {
            Self::Unavailable(_) => vec![(header::RETRY_AFTER, HeaderValue::from_static("1"))],
            _ => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::redact_url;

    #[test]
    fn sqlite_urls_get_create_mode_and_a_folder() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("nested/db.sqlite");
        let (backend, url) = prepare_url(&format!("sqlite://{}", path.display())).expect("ok");
        assert_eq!(backend, Backend::Sqlite);
        assert!(url.ends_with("?mode=rwc"), "{url}");
        assert!(path.parent().is_some_and(std::path::Path::is_dir));
        let (_, url) = prepare_url("sqlite::memory:").expect("memory");
        assert_eq!(url, "sqlite::memory:");
        let (backend, _) = prepare_url("postgres://u:p@h/db").expect("pg");
        assert_eq!(backend, Backend::Postgres);
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact_url("postgres://app:s3cret@db:5432/x"),
            "postgres://app:***@db:5432/x"
        );
        assert_eq!(redact_url("sqlite://data/x.db"), "sqlite://data/x.db");
    }

    #[tokio::test]
    async fn sqlite_database_is_created_in_wal_mode_with_foreign_keys() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = DatabaseConfig {
            url: format!("sqlite://{}/data/t.db", dir.path().display()).into(),
            ..DatabaseConfig::default()
        };
        let db = Database::connect(&config).await.expect("connects");
        assert!(dir.path().join("data/t.db").is_file());
        let (mode,): (String,) = sqlx::query_as("PRAGMA journal_mode")
            .fetch_one(db.pool())
            .await
            .expect("pragma");
        assert_eq!(mode.to_lowercase(), "wal");
        let (fk,): (i64,) = sqlx::query_as("PRAGMA foreign_keys")
            .fetch_one(db.pool())
            .await
            .expect("pragma");
        assert_eq!(fk, 1);
        assert_eq!(db.ping().await, CheckOutcome::up());
    }

    #[tokio::test]
    async fn unique_violations_are_classified() {
        let db = Database::connect(&DatabaseConfig {
            url: "sqlite::memory:".into(),
            max_connections: 1,
            ..DatabaseConfig::default()
        })
        .await
        .expect("connects");
        let m = db.for_module("test");
        m.run(
            "create",
            sqlx::query("CREATE TABLE t (v TEXT UNIQUE)").execute(m.pool()),
        )
        .await
        .expect("create");
        m.run(
            "insert",
            sqlx::query("INSERT INTO t (v) VALUES ($1)")
                .bind("a")
                .execute(m.pool()),
        )
        .await
        .expect("first insert");
        let err = m
            .run(
                "insert",
                sqlx::query("INSERT INTO t (v) VALUES ($1)")
                    .bind("a")
                    .execute(m.pool()),
            )
            .await
            .expect_err("duplicate");
        assert!(matches!(err, DbError::UniqueViolation { .. }), "{err:?}");
        assert_eq!(err.status(), StatusCode::CONFLICT);
    }
}
