//! Storage every module uses: the database (sqlx; SQLite by default, PostgreSQL by URL),
//! module migrations, and the cache (in-process by default, Redis by URL).
//!
//! The database is the cargo feature `storage` (with the drivers `sqlite` and `postgres`),
//! which modules with a repository turn on: a build without it opens no database and
//! creates no file. The cache is always there.
//!
//! Modules never hold a pool: their repository gets a [`ModuleDb`] and a [`ModuleCache`]
//! from the [`ModuleContext`](crate::ModuleContext), labelled and namespaced with the
//! module's name. The database is the source of truth; the cache only ever saves work.

mod cache;
#[cfg(feature = "storage")]
mod database;
#[cfg(feature = "storage")]
mod migrate;
#[cfg(feature = "redis")]
mod redis;

pub use cache::{Cache, CacheError, CacheStore, MemoryStore, ModuleCache};
#[cfg(feature = "storage")]
pub use database::{Backend, Database, DbError, ModuleDb, Tx, TxConn};
#[cfg(feature = "storage")]
pub use migrate::{MIGRATIONS_TABLE, migrate};
#[cfg(feature = "redis")]
pub use redis::RedisStore;

/// One schema migration of one module. Versions are per module and ascending; the applied
/// set is recorded per module, so two modules' numbers never collide.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Migration {
    /// Ascending version within the module.
    pub version: u32,
    /// A short description, e.g. `create users`.
    pub name: &'static str,
    /// The SQL for SQLite (several statements allowed).
    pub sqlite: &'static str,
    /// The SQL for PostgreSQL (several statements allowed).
    pub postgres: &'static str,
}

/// The storage handles, shared through the context.
#[derive(Debug, Clone)]
pub struct Storage {
    /// The database.
    #[cfg(feature = "storage")]
    pub database: Database,
    /// The cache.
    pub cache: Cache,
}

impl Storage {
    /// Connects the database (with the feature `storage`) and builds the cache that
    /// `config` describes. The in-process cache on PostgreSQL announces its removals to
    /// the other instances ([`Cache::announce_removals`]); on SQLite it is one instance's
    /// own.
    pub async fn connect(config: &crate::config::Config) -> anyhow::Result<Self> {
        #[cfg_attr(not(feature = "postgres"), expect(unused_mut))]
        let mut cache = Cache::from_config(&config.cache)?;
        #[cfg(feature = "storage")]
        let database = Database::connect(&config.database).await?;
        #[cfg(feature = "postgres")]
        if cache.kind() == "memory" && database.backend() == Backend::Postgres {
            cache.announce_removals(database.pool().clone(), config.database.url.expose());
        }
        Ok(Self {
            #[cfg(feature = "storage")]
            database,
            cache,
        })
    }

    /// What the database is (`sqlite`, `postgres`), or `none` in a build without one.
    pub fn database_kind(&self) -> &'static str {
        #[cfg(feature = "storage")]
        return self.database.backend().as_str();
        #[cfg(not(feature = "storage"))]
        "none"
    }

    /// Records the database pool's gauges (a no-op without a database).
    pub fn record_metrics(&self) {
        #[cfg(feature = "storage")]
        self.database.record_pool_metrics();
    }

    /// Closes the database's connections.
    pub async fn close(&self) {
        #[cfg(feature = "storage")]
        self.database.close().await;
    }
}

/// The URL without its password, for messages.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}
