//! The user module's SQL: the only code that touches its tables. One statement per
//! function; `$n` placeholders run on SQLite and PostgreSQL alike.

use std::time::Duration;

use trellis_core::storage::{DbError, Migration, ModuleCache, ModuleDb, Tx};

use crate::domain::{Account, Details, UserChanges};

const SCHEMA: &str = "
        CREATE TABLE users (
            id TEXT PRIMARY KEY,
            email TEXT NOT NULL,
            password_hash TEXT NOT NULL,
            first_name TEXT NOT NULL,
            last_name TEXT NOT NULL,
            created_at BIGINT NOT NULL,
            updated_at BIGINT NOT NULL,
            deleted_at BIGINT
        );
        CREATE UNIQUE INDEX users_email_active ON users (email) WHERE deleted_at IS NULL;
        CREATE TABLE user_details (
            user_id TEXT PRIMARY KEY REFERENCES users (id),
            utm_source TEXT,
            utm_campaign TEXT,
            utm_medium TEXT,
            utm_content TEXT,
            updated_at BIGINT NOT NULL
        );";

/// `users` and `user_details`. E-mails are unique among active accounts only, so an
/// address frees up when its account is deleted.
pub static MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    name: "create users and user_details",
    sqlite: SCHEMA,
    postgres: SCHEMA,
}];

type Row = (String, String, String, String, i64, i64);

impl From<Row> for Account {
    fn from((id, email, first_name, last_name, created_at, updated_at): Row) -> Self {
        Self {
            id,
            email,
            first_name,
            last_name,
            created_at,
            updated_at,
        }
    }
}

/// A new account, parsed and hashed.
pub struct UserForCreate<'a> {
    pub id: &'a str,
    pub email: &'a str,
    pub password_hash: &'a str,
    pub first_name: &'a str,
    pub last_name: &'a str,
    pub now: i64,
}

const COLUMNS: &str = "id, email, first_name, last_name, created_at, updated_at";

/// The repository. Active accounts are cached by id in front of the database for
/// `cache_ttl`; every statement that changes an account removes its entry.
#[derive(Debug, Clone)]
pub struct UserRepo {
    db: ModuleDb,
    cache: ModuleCache,
    cache_ttl: Duration,
}

fn user_key(id: &str) -> String {
    format!("user:{id}")
}

impl UserRepo {
    pub fn new(db: ModuleDb, cache: ModuleCache, cache_ttl: Duration) -> Self {
        Self {
            db,
            cache,
            cache_ttl,
        }
    }

    /// The module's cache (rate-limit counters live there too).
    pub fn cache(&self) -> &ModuleCache {
        &self.cache
    }

    /// Forgets the cached account, so a change is seen at once. When the cache cannot be
    /// reached the entry runs out with its TTL.
    pub async fn forget(&self, id: &str) {
        if let Err(error) = self.cache.delete(&user_key(id)).await {
            tracing::warn!(user_id = %id, %error, "cached account not removed; it expires with its TTL");
        }
    }

    #[tracing::instrument(skip_all)]
    pub async fn insert_user(&self, tx: &Tx, user: UserForCreate<'_>) -> Result<(), DbError> {
        self.db
            .run("insert_user", async {
                sqlx::query(
                    "INSERT INTO users (id, email, password_hash, first_name, last_name, created_at, updated_at) \
                     VALUES ($1, $2, $3, $4, $5, $6, $6)",
                )
                .bind(user.id)
                .bind(user.email)
                .bind(user.password_hash)
                .bind(user.first_name)
                .bind(user.last_name)
                .bind(user.now)
                .execute(tx.conn().await.get()?)
                .await
            })
            .await
            .map(|_| ())
    }

    /// The active account `id`: from the cache, else the database (then cached).
    pub async fn find_active(&self, id: &str) -> Result<Option<Account>, DbError> {
        self.cache
            .read_through(&user_key(id), self.cache_ttl, || async {
                let row: Option<Row> = self
                    .db
                    .run(
                        "find_user",
                        sqlx::query_as(sqlx::AssertSqlSafe(format!(
                            "SELECT {COLUMNS} FROM users WHERE id = $1 AND deleted_at IS NULL"
                        )))
                        .bind(id)
                        .fetch_optional(self.db.pool()),
                    )
                    .await?;
                Ok(row.map(Account::from))
            })
            .await
    }

    /// The active account with `email` and its password hash.
    pub async fn find_credentials(
        &self,
        email: &str,
    ) -> Result<Option<(Account, String)>, DbError> {
        let row: Option<(String, String, String, String, i64, i64, String)> = self
            .db
            .run(
                "find_credentials",
                sqlx::query_as(sqlx::AssertSqlSafe(format!(
                    "SELECT {COLUMNS}, password_hash FROM users WHERE email = $1 AND deleted_at IS NULL"
                )))
                .bind(email)
                .fetch_optional(self.db.pool()),
            )
            .await?;
        Ok(row.map(|(id, email, first, last, created, updated, hash)| {
            (
                Account::from((id, email, first, last, created, updated)),
                hash,
            )
        }))
    }

    /// Applies `changes` in `tx`; the caller forgets the cached account once `tx`
    /// commits.
    pub async fn update_user(
        &self,
        tx: &Tx,
        id: &str,
        changes: &UserChanges,
        now: i64,
    ) -> Result<Option<Account>, DbError> {
        let row: Option<Row> = self
            .db
            .run("update_user", async {
                sqlx::query_as(sqlx::AssertSqlSafe(format!(
                    "UPDATE users SET email = COALESCE($2, email), first_name = COALESCE($3, first_name), \
                     last_name = COALESCE($4, last_name), updated_at = $5 \
                     WHERE id = $1 AND deleted_at IS NULL RETURNING {COLUMNS}"
                )))
                .bind(id)
                .bind(changes.email.as_ref().map(|e| e.as_str().to_owned()))
                .bind(changes.first_name.as_ref().map(|n| n.as_str().to_owned()))
                .bind(changes.last_name.as_ref().map(|n| n.as_str().to_owned()))
                .bind(now)
                .fetch_optional(tx.conn().await.get()?)
                .await
            })
            .await?;
        Ok(row.map(Account::from))
    }

    /// Begins a transaction other modules can join.
    pub async fn begin(&self) -> Result<Tx, DbError> {
        self.db.begin().await
    }

    /// Marks the account deleted in `tx`; false when there was no active account. The
    /// caller forgets the cached account once `tx` commits.
    pub async fn soft_delete(&self, tx: &Tx, id: &str, now: i64) -> Result<bool, DbError> {
        let done = self
            .db
            .run("delete_user", async {
                sqlx::query(
                    "UPDATE users SET deleted_at = $2, updated_at = $2 WHERE id = $1 AND deleted_at IS NULL",
                )
                .bind(id)
                .bind(now)
                .execute(tx.conn().await.get()?)
                .await
            })
            .await?;
        Ok(done.rows_affected() > 0)
    }

    /// The active account's password hash.
    pub async fn find_password_hash(&self, id: &str) -> Result<Option<String>, DbError> {
        let row: Option<(String,)> = self
            .db
            .run(
                "find_password_hash",
                sqlx::query_as(
                    "SELECT password_hash FROM users WHERE id = $1 AND deleted_at IS NULL",
                )
                .bind(id)
                .fetch_optional(self.db.pool()),
            )
            .await?;
        Ok(row.map(|(hash,)| hash))
    }

    /// Replaces the active account's password hash in `tx`; false when there is no such
    /// account. The caller forgets the cached account once `tx` commits.
    pub async fn set_password_hash(
        &self,
        tx: &Tx,
        id: &str,
        hash: &str,
        now: i64,
    ) -> Result<bool, DbError> {
        let done = self
            .db
            .run("set_password_hash", async {
                sqlx::query(
                    "UPDATE users SET password_hash = $2, updated_at = $3 WHERE id = $1 AND deleted_at IS NULL",
                )
                .bind(id)
                .bind(hash)
                .bind(now)
                .execute(tx.conn().await.get()?)
                .await
            })
            .await?;
        Ok(done.rows_affected() > 0)
    }

    pub async fn upsert_details(
        &self,
        id: &str,
        details: &Details,
        now: i64,
    ) -> Result<(), DbError> {
        self.db
            .run(
                "upsert_details",
                sqlx::query(
                    "INSERT INTO user_details (user_id, utm_source, utm_campaign, utm_medium, utm_content, updated_at) \
                     VALUES ($1, $2, $3, $4, $5, $6) \
                     ON CONFLICT (user_id) DO UPDATE SET utm_source = excluded.utm_source, \
                     utm_campaign = excluded.utm_campaign, utm_medium = excluded.utm_medium, \
                     utm_content = excluded.utm_content, updated_at = excluded.updated_at",
                )
                .bind(id)
                .bind(details.source.clone())
                .bind(details.campaign.clone())
                .bind(details.medium.clone())
                .bind(details.content.clone())
                .bind(now)
                .execute(self.db.pool()),
            )
            .await
            .map(|_| ())
    }

    pub async fn find_details(&self, id: &str) -> Result<Option<(Details, i64)>, DbError> {
        type DetailsRow = (
            Option<String>,
            Option<String>,
            Option<String>,
            Option<String>,
            i64,
        );
        let row: Option<DetailsRow> = self
            .db
            .run(
                "find_details",
                sqlx::query_as(
                    "SELECT utm_source, utm_campaign, utm_medium, utm_content, updated_at \
                     FROM user_details WHERE user_id = $1",
                )
                .bind(id)
                .fetch_optional(self.db.pool()),
            )
            .await?;
        Ok(row.map(|(source, campaign, medium, content, updated)| {
            (
                Details {
                    source,
                    campaign,
                    medium,
                    content,
                },
                updated,
            )
        }))
    }

    /// Active accounts whose e-mail starts with `prefix`, after `after` in e-mail order.
    pub async fn list_active(
        &self,
        prefix: &str,
        after: &str,
        limit: u32,
    ) -> Result<Vec<Account>, DbError> {
        let pattern = format!("{}%", escape_like(prefix));
        let rows: Vec<Row> = self
            .db
            .run(
                "list_users",
                sqlx::query_as(sqlx::AssertSqlSafe(format!(
                    "SELECT {COLUMNS} FROM users WHERE deleted_at IS NULL \
                     AND email LIKE $1 ESCAPE '\\' AND email > $2 ORDER BY email LIMIT $3"
                )))
                .bind(pattern)
                .bind(after)
                .bind(i64::from(limit))
                .fetch_all(self.db.pool()),
            )
            .await?;
        Ok(rows.into_iter().map(Account::from).collect())
    }
}

/// Escapes LIKE's wildcards so a prefix matches literally.
fn escape_like(prefix: &str) -> String {
    let mut out = String::with_capacity(prefix.len());
    for c in prefix.chars() {
        if matches!(c, '%' | '_' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn like_wildcards_are_escaped() {
        assert_eq!(escape_like("a_b%c\\"), "a\\_b\\%c\\\\");
    }
}
