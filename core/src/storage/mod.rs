//! Storage every module uses: the database (sqlx; SQLite by default, PostgreSQL by URL),
//! module migrations, and the cache (in-process by default, Redis by URL).
//!
//! Modules never hold a pool: their repository gets a [`ModuleDb`] and a [`ModuleCache`]
//! from the [`ModuleContext`](crate::ModuleContext), labelled and namespaced with the
//! module's name. The database is the source of truth; the cache only ever saves work.

mod cache;
mod database;
mod migrate;
#[cfg(feature = "redis")]
mod redis;

pub use cache::{Cache, CacheError, CacheStore, MemoryStore, ModuleCache};
pub use database::{Backend, Database, DbError, ModuleDb, Tx, TxConn, redact_url};
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
    pub database: Database,
    /// The cache.
    pub cache: Cache,
}

impl Storage {
    /// Connects the database and builds the cache that `config` describes. The
    /// in-process cache on PostgreSQL announces its removals to the other instances
    /// ([`Cache::announce_removals`]); on SQLite it is one instance's own.
    pub async fn connect(config: &crate::config::Config) -> anyhow::Result<Self> {
        let database = Database::connect(&config.database).await?;
        let mut cache = Cache::from_config(&config.cache)?;
        if cache.kind() == "memory" && database.backend() == Backend::Postgres {
            cache.announce_removals(database.pool().clone(), config.database.url.expose());
        }
        Ok(Self { database, cache })
    }

    /// A private in-memory SQLite database (one connection) and an in-process cache: for
    /// tests and tools.
    pub async fn ephemeral() -> anyhow::Result<Self> {
        let database = Database::connect(&crate::config::DatabaseConfig {
            url: "sqlite::memory:".into(),
            max_connections: 1,
            ..Default::default()
        })
        .await?;
        let cache = Cache::from_config(&crate::config::CacheConfig::default())?;
        Ok(Self { database, cache })
    }
}
