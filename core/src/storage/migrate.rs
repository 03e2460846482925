//! Module migrations: applied at start-up in module order, each in its own transaction,
//! recorded per module in `trellis_migrations` (so two modules' version numbers never
//! collide), and skipped once applied. An applied migration whose SQL changed, or a failing
//! one, stops start-up naming the module and the migration. Tables of a module that is not
//! compiled in are left alone: only the compiled-in modules' migrations are looked at.
//!
//! Instances starting together on one database apply each migration once. On PostgreSQL
//! they queue on an advisory lock, taken by polling (`pg_try_advisory_lock`), so that the
//! wait is logged and no `statement_timeout` cuts it short; a migration's own statements
//! run without that timeout. On SQLite each migration's transaction takes the write lock
//! first (`BEGIN IMMEDIATE`). Either way the record is read again inside the transaction,
//! and a migration another instance applied meanwhile is skipped.

use anyhow::{Context as _, bail};
use sqlx::{Connection as _, Row as _};

use super::{Backend, Database, Migration};

/// The bookkeeping table.
pub const MIGRATIONS_TABLE: &str = "trellis_migrations";

const CREATE_TABLE: &str = "CREATE TABLE IF NOT EXISTS trellis_migrations (
    module TEXT NOT NULL,
    version BIGINT NOT NULL,
    name TEXT NOT NULL,
    checksum TEXT NOT NULL,
    applied_at TEXT NOT NULL,
    PRIMARY KEY (module, version)
)";

/// Serialises concurrent starts on PostgreSQL (any constant shared by all instances).
const PG_LOCK_KEY: i64 = 0x0074_7265_6c6c_6973;

/// How often a waiting instance asks for the PostgreSQL lock again.
const LOCK_POLL: std::time::Duration = std::time::Duration::from_millis(250);

/// Applies the pending migrations of `modules` (in the given order); returns how many ran.
pub async fn migrate(
    db: &Database,
    modules: &[(&'static str, &'static [Migration])],
) -> anyhow::Result<usize> {
    for (module, migrations) in modules {
        if let Some(pair) = migrations.windows(2).find(|w| w[0].version >= w[1].version) {
            bail!(
                "module `{module}`: migration versions must ascend ({} is followed by {})",
                pair[0].version,
                pair[1].version
            );
        }
    }
    let mut conn = db
        .pool()
        .acquire()
        .await
        .context("migrations: cannot reach the database")?;
    if db.backend() == Backend::Postgres {
        let mut waiting_since = None;
        loop {
            let locked: bool = sqlx::query("SELECT pg_try_advisory_lock($1)")
                .bind(PG_LOCK_KEY)
                .fetch_one(&mut *conn)
                .await
                .and_then(|row| row.try_get(0))
                .context("migrations: cannot take the migration lock")?;
            if locked {
                break;
            }
            let since = waiting_since.get_or_insert_with(std::time::Instant::now);
            if since.elapsed().as_millis() % 10_000 < LOCK_POLL.as_millis() {
                tracing::info!(
                    waited_ms = u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX),
                    "waiting for another instance's migrations (PostgreSQL advisory lock)"
                );
            }
            tokio::time::sleep(LOCK_POLL).await;
        }
    }
    let result = async {
        sqlx::query(CREATE_TABLE)
            .execute(&mut *conn)
            .await
            .context("migrations: cannot create the trellis_migrations table")?;
        let mut applied_count = 0;
        for (module, migrations) in modules {
            let applied: Vec<(i64, String)> =
                sqlx::query("SELECT version, checksum FROM trellis_migrations WHERE module = $1")
                    .bind(*module)
                    .fetch_all(&mut *conn)
                    .await
                    .with_context(|| format!("module `{module}`: cannot read applied migrations"))?
                    .iter()
                    .map(|row| Ok((row.try_get(0)?, row.try_get(1)?)))
                    .collect::<Result<_, sqlx::Error>>()?;
            for migration in *migrations {
                let sql = match db.backend() {
                    Backend::Sqlite => migration.sqlite,
                    Backend::Postgres => migration.postgres,
                };
                let checksum = checksum(sql);
                let label = format!(
                    "module `{module}`: migration {} `{}`",
                    migration.version, migration.name
                );
                if let Some((_, recorded)) =
                    applied.iter().find(|(v, _)| *v == i64::from(migration.version))
                {
                    if *recorded != checksum {
                        bail!("{label} was changed after it was applied (checksum {recorded} -> {checksum}); add a new migration instead");
                    }
                    continue;
                }
                let begin = match db.backend() {
                    Backend::Sqlite => "BEGIN IMMEDIATE",
                    Backend::Postgres => "BEGIN",
                };
                let mut tx = (*conn)
                    .begin_with(sqlx::AssertSqlSafe(begin))
                    .await
                    .with_context(|| format!("{label}: cannot begin"))?;
                if db.backend() == Backend::Postgres {
                    sqlx::raw_sql("SET LOCAL statement_timeout = 0")
                        .execute(&mut *tx)
                        .await
                        .with_context(|| format!("{label}: cannot lift the statement timeout"))?;
                }
                let meanwhile: Option<String> = sqlx::query(
                    "SELECT checksum FROM trellis_migrations WHERE module = $1 AND version = $2",
                )
                .bind(*module)
                .bind(i64::from(migration.version))
                .fetch_optional(&mut *tx)
                .await
                .with_context(|| format!("{label}: cannot read its record"))?
                .map(|row| row.try_get(0))
                .transpose()?;
                if let Some(recorded) = meanwhile {
                    if recorded != checksum {
                        bail!("{label} was applied meanwhile by another instance with other SQL (checksum {recorded}, here {checksum})");
                    }
                    // Ends the transaction (and SQLite's write lock) before the next one.
                    tx.rollback()
                        .await
                        .with_context(|| format!("{label}: cannot end its transaction"))?;
                    continue;
                }
                sqlx::raw_sql(sql)
                    .execute(&mut *tx)
                    .await
                    .with_context(|| format!("{label} failed"))?;
                sqlx::query(
                    "INSERT INTO trellis_migrations (module, version, name, checksum, applied_at) \
                     VALUES ($1, $2, $3, $4, $5)",
                )
                .bind(*module)
                .bind(i64::from(migration.version))
                .bind(migration.name)
                .bind(&checksum)
                .bind(humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string())
                .execute(&mut *tx)
                .await
                .with_context(|| format!("{label}: cannot record it"))?;
                tx.commit().await.with_context(|| format!("{label}: cannot commit"))?;
                tracing::info!(module, version = migration.version, name = migration.name, "migration applied");
                applied_count += 1;
            }
        }
        anyhow::Ok(applied_count)
    }
    .await;
    if db.backend() == Backend::Postgres {
        let _ = sqlx::query("SELECT pg_advisory_unlock($1)")
            .bind(PG_LOCK_KEY)
            .execute(&mut *conn)
            .await;
    }
    result
}

/// FNV-1a 64 of the SQL text: stable across builds and Rust versions.
fn checksum(sql: &str) -> String {
    let hash = sql.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("{hash:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DatabaseConfig;

    const V1: Migration = Migration {
        version: 1,
        name: "create widgets",
        sqlite: "CREATE TABLE widgets (id INTEGER PRIMARY KEY, name TEXT NOT NULL)",
        postgres: "CREATE TABLE widgets (id BIGSERIAL PRIMARY KEY, name TEXT NOT NULL)",
    };
    const V2: Migration = Migration {
        version: 2,
        name: "index widgets",
        sqlite: "CREATE INDEX widgets_name ON widgets (name); CREATE TABLE gadgets (id INTEGER PRIMARY KEY)",
        postgres: "CREATE INDEX widgets_name ON widgets (name); CREATE TABLE gadgets (id BIGSERIAL PRIMARY KEY)",
    };
    const OTHER_V1: Migration = Migration {
        version: 1,
        name: "create sprockets",
        sqlite: "CREATE TABLE sprockets (id INTEGER PRIMARY KEY)",
        postgres: "CREATE TABLE sprockets (id BIGSERIAL PRIMARY KEY)",
    };

    async fn db(dir: &tempfile::TempDir) -> Database {
        Database::connect(&DatabaseConfig {
            url: format!("sqlite://{}/m.db", dir.path().display()).into(),
            ..DatabaseConfig::default()
        })
        .await
        .expect("connects")
    }

    #[tokio::test]
    async fn migrations_apply_once_per_module_and_same_versions_do_not_collide() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = db(&dir).await;
        static WIDGETS: [Migration; 2] = [V1, V2];
        static OTHERS: [Migration; 1] = [OTHER_V1];
        let modules = [("widget", &WIDGETS[..]), ("sprocket", &OTHERS[..])];
        assert_eq!(migrate(&db, &modules).await.expect("first start"), 3);
        assert_eq!(migrate(&db, &modules).await.expect("restart"), 0);
        let db = self::db(&dir).await;
        assert_eq!(migrate(&db, &modules).await.expect("new pool"), 0);
    }

    #[tokio::test]
    async fn a_failing_migration_names_module_and_migration_and_rolls_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = db(&dir).await;
        static BROKEN: [Migration; 2] = [
            V1,
            Migration {
                version: 2,
                name: "broken",
                sqlite: "CREATE TABLE ok_part (id INTEGER); CREATE TABLE widgets (id INTEGER)",
                postgres: "",
            },
        ];
        let err = migrate(&db, &[("widget", &BROKEN[..])])
            .await
            .expect_err("fails");
        let text = format!("{err:#}");
        assert!(
            text.contains("module `widget`: migration 2 `broken` failed"),
            "{text}"
        );
        let partial = sqlx::query("SELECT 1 FROM ok_part")
            .execute(db.pool())
            .await;
        assert!(
            partial.is_err(),
            "the failed migration's first statement was rolled back"
        );
    }

    #[tokio::test]
    async fn an_edited_applied_migration_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = db(&dir).await;
        static ORIGINAL: [Migration; 1] = [V1];
        migrate(&db, &[("widget", &ORIGINAL[..])])
            .await
            .expect("applies");
        static EDITED: [Migration; 1] = [Migration {
            sqlite: "CREATE TABLE widgets (id INTEGER PRIMARY KEY)",
            ..V1
        }];
        let err = migrate(&db, &[("widget", &EDITED[..])])
            .await
            .expect_err("edited");
        assert!(format!("{err:#}").contains("was changed after it was applied"));
    }

    #[test]
    fn checksum_is_stable() {
        assert_eq!(checksum(""), "cbf29ce484222325");
        assert_eq!(checksum("a"), "af63dc4c8601ec8c");
    }
}
