//! [`TestStorage`]: a database, a cache prefix and message-queue folders of one test's own.

use std::path::PathBuf;

use serde_json::Value;

/// Isolated storage for one test: a SQLite file and the message queue's spool and files
/// in a folder of its own, and the in-process cache. When `TEST_POSTGRES_URL` or
/// `TEST_REDIS_URL` name servers (scripts/test.sh starts them) and the kit is built with
/// `postgres` or `redis`, a fresh PostgreSQL database and a Redis key prefix of its own.
pub struct TestStorage {
    dir: tempfile::TempDir,
    /// The PostgreSQL database this storage created (admin URL, name), dropped with it.
    database: Option<(String, String)>,
    /// Configuration keys and values selecting this storage.
    pub settings: Vec<(&'static str, String)>,
}

impl Drop for TestStorage {
    /// Drops the PostgreSQL database it created, ending the connections still open to it:
    /// a server a test did not stop leaves its pool behind (the runtime that would have
    /// closed it is gone), and a suite of such servers would use up the server's
    /// connections.
    fn drop(&mut self) {
        if let Some((admin, name)) = self.database.take() {
            let dropped = std::thread::spawn(move || {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a runtime")
                    .block_on(drop_postgres_database(&admin, &name));
            })
            .join();
            if dropped.is_err() {
                eprintln!("the test database could not be dropped");
            }
        }
    }
}

impl TestStorage {
    /// New storage, shared with nothing.
    pub async fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let id = uuid::Uuid::new_v4().simple().to_string();
        let mut owned = None;
        let database = match postgres_admin_url() {
            Some(admin) => {
                let name = format!("t_{id}");
                let url = create_postgres_database(&admin, &name).await;
                owned = Some((admin, name));
                url
            }
            None => format!("sqlite://{}/trellis.db", dir.path().display()),
        };
        let folder = |name: &str| dir.path().join(name).display().to_string();
        let mut settings = vec![
            ("database.url", database),
            ("mq.file.directory", folder("events")),
            ("mq.spool.directory", folder("spool")),
        ];
        if let Some(redis) = std::env::var("TEST_REDIS_URL")
            .ok()
            .filter(|_| cfg!(feature = "redis"))
        {
            settings.push(("cache.url", redis));
            settings.push(("cache.prefix", format!("t-{id}")));
        }
        Self {
            dir,
            database: owned,
            settings,
        }
    }

    /// Storage that outlives nothing: for a server whose storage was handed on.
    pub(crate) fn empty() -> Self {
        Self {
            dir: tempfile::tempdir().expect("tempdir"),
            database: None,
            settings: Vec::new(),
        }
    }

    /// The same database and cache for a second server (an instance beside the first);
    /// the message queue's spool and files go to folders of its own. The database stays
    /// this storage's: it is dropped with this one.
    pub async fn sharing(&self) -> Self {
        let mut other = Self::new().await;
        for (key, value) in &mut other.settings {
            if !key.starts_with("mq.")
                && let Some((_, shared)) = self.settings.iter().find(|(k, _)| k == key)
            {
                value.clone_from(shared);
            }
        }
        other
    }

    /// Where the message queue's file backend writes.
    pub fn events_dir(&self) -> PathBuf {
        self.dir.path().join("events")
    }

    /// Every message the file backend wrote, from all its files, in file order.
    pub fn written_events(&self) -> Vec<Value> {
        let Ok(files) = std::fs::read_dir(self.events_dir()) else {
            return Vec::new();
        };
        let mut paths: Vec<PathBuf> = files.map(|f| f.expect("entry").path()).collect();
        paths.sort();
        let mut events = Vec::new();
        for path in paths {
            let text = std::fs::read_to_string(&path).expect("readable");
            events.extend(
                text.lines()
                    .map(|line| serde_json::from_str::<Value>(line).expect("one JSON per line")),
            );
        }
        events
    }

    /// The settings as `TRELLIS_*` environment variables, for a server process.
    pub fn env(&self) -> Vec<(String, String)> {
        self.settings
            .iter()
            .map(|(key, value)| (env_name(key), value.clone()))
            .collect()
    }
}

#[cfg(feature = "storage")]
impl TestStorage {
    /// A connection of the test's own to its database.
    pub async fn connection(&self) -> sqlx::AnyConnection {
        use sqlx::Connection as _;
        sqlx::any::install_default_drivers();
        let url = self
            .settings
            .iter()
            .find(|(key, _)| *key == "database.url")
            .map(|(_, url)| url.clone())
            .expect("a database URL");
        sqlx::AnyConnection::connect(&url)
            .await
            .expect("a connection to the test database")
    }

    /// Runs one SQL statement on the test's database, behind the server's back (to stage
    /// states the API cannot reach, such as a revocation that was missed).
    pub async fn execute_sql(&self, statement: &str) -> u64 {
        use sqlx::Executor as _;
        self.connection()
            .await
            .execute(sqlx::raw_sql(sqlx::AssertSqlSafe(statement.to_owned())))
            .await
            .unwrap_or_else(|e| panic!("{statement}: {e}"))
            .rows_affected()
    }

    /// The first column of every row `query` returns, as integers (counts, times).
    pub async fn fetch_i64s(&self, query: &str) -> Vec<i64> {
        use sqlx::Row as _;
        sqlx::query(sqlx::AssertSqlSafe(query.to_owned()))
            .fetch_all(&mut self.connection().await)
            .await
            .unwrap_or_else(|e| panic!("{query}: {e}"))
            .iter()
            .map(|row| row.get::<i64, _>(0))
            .collect()
    }
}

/// The environment variable that sets the dotted configuration `key`.
pub fn env_name(key: &str) -> String {
    format!("TRELLIS_{}", key.replace('.', "__").to_uppercase())
}

/// `TEST_POSTGRES_URL`, when this kit can reach PostgreSQL.
fn postgres_admin_url() -> Option<String> {
    std::env::var("TEST_POSTGRES_URL")
        .ok()
        .filter(|_| cfg!(feature = "postgres"))
}

#[cfg(feature = "postgres")]
async fn create_postgres_database(admin: &str, name: &str) -> String {
    use sqlx::{Connection as _, Executor as _};
    sqlx::any::install_default_drivers();
    let mut conn = sqlx::AnyConnection::connect(admin)
        .await
        .expect("PostgreSQL admin connection");
    conn.execute(sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE DATABASE {name}"
    ))))
    .await
    .expect("CREATE DATABASE");
    let base = admin.rsplit_once('/').map_or(admin, |(base, _)| base);
    format!("{base}/{name}")
}

#[cfg(not(feature = "postgres"))]
async fn create_postgres_database(_admin: &str, _name: &str) -> String {
    unreachable!("`postgres_admin_url` answers None without the `postgres` feature")
}

#[cfg(feature = "postgres")]
async fn drop_postgres_database(admin: &str, name: &str) {
    use sqlx::{Connection as _, Executor as _};
    let Ok(mut conn) = sqlx::AnyConnection::connect(admin).await else {
        return;
    };
    let _ = conn
        .execute(sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
        ))))
        .await;
}

#[cfg(not(feature = "postgres"))]
async fn drop_postgres_database(_admin: &str, _name: &str) {}
