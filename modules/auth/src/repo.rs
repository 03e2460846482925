//! The auth module's SQL and cache: sessions, refresh tokens, roles.

use std::{collections::BTreeSet, time::Duration};

use serde::{Deserialize, Serialize};
use trellis_core::{
    events::Event,
    storage::{DbError, Migration, ModuleCache, ModuleDb, Tx},
};

use crate::domain::ListedSession;

const SCHEMA: &str = "
    CREATE TABLE auth_sessions (
        id TEXT PRIMARY KEY,
        user_id TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        last_used_at BIGINT NOT NULL,
        expires_at BIGINT NOT NULL,
        revoked_at BIGINT,
        user_agent TEXT,
        address TEXT
    );
    CREATE INDEX auth_sessions_user ON auth_sessions (user_id);
    CREATE TABLE auth_refresh_tokens (
        token_hash TEXT PRIMARY KEY,
        session_id TEXT NOT NULL REFERENCES auth_sessions (id),
        created_at BIGINT NOT NULL,
        used_at BIGINT
    );
    CREATE TABLE auth_roles (
        name TEXT PRIMARY KEY,
        description TEXT NOT NULL
    );
    CREATE TABLE auth_role_permissions (
        role TEXT NOT NULL REFERENCES auth_roles (name),
        permission TEXT NOT NULL,
        PRIMARY KEY (role, permission)
    );
    CREATE TABLE auth_user_roles (
        user_id TEXT NOT NULL,
        role TEXT NOT NULL REFERENCES auth_roles (name),
        granted_at BIGINT NOT NULL,
        PRIMARY KEY (user_id, role)
    );
    INSERT INTO auth_roles (name, description) VALUES
        ('ADMIN', 'Manages users'),
        ('SUPER_ADMIN', 'May do everything (sudo)');
    INSERT INTO auth_role_permissions (role, permission) VALUES
        ('ADMIN', 'users:manage'),
        ('ADMIN', 'roles:read'),
        ('SUPER_ADMIN', 'sudo');";

/// Signing keys generated on first start (shared by every instance on the database), and
/// the accounts closed by a deletion, which no session of theirs may outlive.
const KEYS_AND_CLOSED_ACCOUNTS: &str = "
    CREATE TABLE auth_signing_keys (
        id TEXT PRIMARY KEY,
        secret TEXT NOT NULL,
        created_at BIGINT NOT NULL
    );
    CREATE TABLE auth_closed_accounts (
        user_id TEXT PRIMARY KEY,
        closed_at BIGINT NOT NULL
    );";

/// Sessions, refresh tokens, roles (ADMIN, SUPER_ADMIN with `sudo`) and grants; then
/// generated signing keys and closed accounts.
pub static MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "create sessions, refresh tokens and roles",
        sqlite: SCHEMA,
        postgres: SCHEMA,
    },
    Migration {
        version: 2,
        name: "create signing keys and closed accounts",
        sqlite: KEYS_AND_CLOSED_ACCOUNTS,
        postgres: KEYS_AND_CLOSED_ACCOUNTS,
    },
    Migration {
        version: 3,
        name: "administrators manage event publications",
        sqlite: MANAGE_EVENTS,
        postgres: MANAGE_EVENTS,
    },
];

/// Administrators may list and resubmit event publications (the `events` module's
/// operations).
const MANAGE_EVENTS: &str = "INSERT INTO auth_role_permissions (role, permission) VALUES \
     ('ADMIN', 'events:manage')";

/// The role that holds `sudo`.
pub const SUPER_ADMIN: &str = "SUPER_ADMIN";

/// A live session's owner, unless the account was closed.
const LIVE: &str = "revoked_at IS NULL AND expires_at > $2 \
     AND NOT EXISTS (SELECT 1 FROM auth_closed_accounts c WHERE c.user_id = auth_sessions.user_id)";

/// What a refresh token leads to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefreshRow {
    pub session_id: String,
    pub used: bool,
    pub user_id: String,
    pub live: bool,
}

/// A live session's principal, as cached.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LiveSession {
    pub user_id: String,
    pub roles: BTreeSet<String>,
    pub permissions: BTreeSet<String>,
}

/// A new session.
pub struct SessionForCreate<'a> {
    pub id: &'a str,
    pub user_id: &'a str,
    pub now: i64,
    pub expires_at: i64,
    pub user_agent: Option<&'a str>,
    pub address: Option<&'a str>,
}

/// The repository.
#[derive(Debug, Clone)]
pub struct AuthRepo {
    db: ModuleDb,
    cache: ModuleCache,
    cache_ttl: Duration,
}

fn session_key(id: &str) -> String {
    format!("session:{id}")
}

impl AuthRepo {
    pub fn new(db: ModuleDb, cache: ModuleCache, cache_ttl: Duration) -> Self {
        Self {
            db,
            cache,
            cache_ttl,
        }
    }

    pub fn cache(&self) -> &ModuleCache {
        &self.cache
    }

    /// Inserts the session in `tx`; false when the account was closed meanwhile.
    pub async fn insert_session(&self, tx: &Tx, s: SessionForCreate<'_>) -> Result<bool, DbError> {
        self.db
            .run("insert_session", async {
                // Not for a closed account: a login whose password check raced the
                // deletion must not leave a session behind.
                sqlx::query(
                    "INSERT INTO auth_sessions (id, user_id, created_at, last_used_at, expires_at, user_agent, address) \
                     SELECT $1, $2, $3, $3, $4, $5, $6 \
                     WHERE NOT EXISTS (SELECT 1 FROM auth_closed_accounts WHERE user_id = $2)",
                )
                .bind(s.id)
                .bind(s.user_id)
                .bind(s.now)
                .bind(s.expires_at)
                .bind(s.user_agent)
                .bind(s.address)
                .execute(tx.conn().await.get()?)
                .await
            })
            .await
            .map(|done| done.rows_affected() == 1)
    }

    pub async fn insert_refresh(
        &self,
        hash: &str,
        session_id: &str,
        now: i64,
    ) -> Result<(), DbError> {
        self.db
            .run(
                "insert_refresh_token",
                sqlx::query(
                    "INSERT INTO auth_refresh_tokens (token_hash, session_id, created_at) VALUES ($1, $2, $3)",
                )
                .bind(hash)
                .bind(session_id)
                .bind(now)
                .execute(self.db.pool()),
            )
            .await
            .map(|_| ())
    }

    pub async fn find_refresh(&self, hash: &str, now: i64) -> Result<Option<RefreshRow>, DbError> {
        type Row = (String, Option<i64>, String, Option<i64>, i64);
        let row: Option<Row> = self
            .db
            .run(
                "find_refresh_token",
                sqlx::query_as(
                    "SELECT r.session_id, r.used_at, s.user_id, \
                     COALESCE(s.revoked_at, (SELECT c.closed_at FROM auth_closed_accounts c WHERE c.user_id = s.user_id)), \
                     s.expires_at \
                     FROM auth_refresh_tokens r JOIN auth_sessions s ON s.id = r.session_id \
                     WHERE r.token_hash = $1",
                )
                .bind(hash)
                .fetch_optional(self.db.pool()),
            )
            .await?;
        Ok(row.map(
            |(session_id, used_at, user_id, revoked_at, expires_at)| RefreshRow {
                session_id,
                used: used_at.is_some(),
                user_id,
                live: revoked_at.is_none() && expires_at > now,
            },
        ))
    }

    /// Marks the token used; false if it already was (a concurrent refresh won).
    pub async fn use_refresh(&self, hash: &str, now: i64) -> Result<bool, DbError> {
        let done = self
            .db
            .run(
                "use_refresh_token",
                sqlx::query("UPDATE auth_refresh_tokens SET used_at = $2 WHERE token_hash = $1 AND used_at IS NULL")
                    .bind(hash)
                    .bind(now)
                    .execute(self.db.pool()),
            )
            .await?;
        Ok(done.rows_affected() == 1)
    }

    pub async fn touch_session(&self, id: &str, now: i64) -> Result<(), DbError> {
        self.db
            .run(
                "touch_session",
                sqlx::query("UPDATE auth_sessions SET last_used_at = $2 WHERE id = $1")
                    .bind(id)
                    .bind(now)
                    .execute(self.db.pool()),
            )
            .await
            .map(|_| ())
    }

    /// The live session's principal: from the cache, else the database (then cached).
    pub async fn live_session(&self, id: &str, now: i64) -> Result<Option<LiveSession>, DbError> {
        self.cache
            .read_through(&session_key(id), self.cache_ttl, || async {
                let user: Option<(String,)> = self
                    .db
                    .run(
                        "find_live_session",
                        sqlx::query_as(sqlx::AssertSqlSafe(format!(
                            "SELECT user_id FROM auth_sessions WHERE id = $1 AND {LIVE}"
                        )))
                        .bind(id)
                        .bind(now)
                        .fetch_optional(self.db.pool()),
                    )
                    .await?;
                let Some((user_id,)) = user else {
                    return Ok(None);
                };
                let (roles, permissions) = self.grants(&user_id).await?;
                Ok(Some(LiveSession {
                    user_id,
                    roles,
                    permissions,
                }))
            })
            .await
    }

    async fn grants(&self, user_id: &str) -> Result<(BTreeSet<String>, BTreeSet<String>), DbError> {
        let rows: Vec<(String, Option<String>)> = self
            .db
            .run(
                "find_grants",
                sqlx::query_as(
                    "SELECT ur.role, rp.permission FROM auth_user_roles ur \
                     LEFT JOIN auth_role_permissions rp ON rp.role = ur.role WHERE ur.user_id = $1",
                )
                .bind(user_id)
                .fetch_all(self.db.pool()),
            )
            .await?;
        let roles = rows.iter().map(|(role, _)| role.clone()).collect();
        let permissions = rows.into_iter().filter_map(|(_, p)| p).collect();
        Ok((roles, permissions))
    }

    /// Forgets cached sessions so revocations and grant changes apply at once.
    pub async fn forget_sessions(&self, ids: &[String]) {
        for id in ids {
            if let Err(error) = self.cache.delete(&session_key(id)).await {
                tracing::warn!(session_id = %id, %error, "cached session not removed; it expires with its TTL");
            }
        }
    }

    /// Revokes one session of `user_id` in `tx`; false when it was not live. The caller
    /// forgets the cached session once `tx` commits ([`AuthRepo::forget_sessions`]).
    pub async fn revoke_session(
        &self,
        tx: &Tx,
        user_id: &str,
        id: &str,
        now: i64,
    ) -> Result<bool, DbError> {
        let done = self
            .db
            .run("revoke_session", async {
                sqlx::query(
                    "UPDATE auth_sessions SET revoked_at = $3 WHERE id = $1 AND user_id = $2 AND revoked_at IS NULL",
                )
                .bind(id)
                .bind(user_id)
                .bind(now)
                .execute(tx.conn().await.get()?)
                .await
            })
            .await?;
        Ok(done.rows_affected() > 0)
    }

    /// Revokes every live session of `user_id` but `except` in `tx`; their ids. The
    /// caller forgets the cached sessions once `tx` commits.
    pub async fn revoke_all(
        &self,
        tx: &Tx,
        user_id: &str,
        except: Option<&str>,
        now: i64,
    ) -> Result<Vec<String>, DbError> {
        let ids: Vec<(String,)> = self
            .db
            .run("revoke_all_sessions", async {
                sqlx::query_as(
                    "UPDATE auth_sessions SET revoked_at = $2 \
                     WHERE user_id = $1 AND revoked_at IS NULL AND id <> COALESCE($3, '') RETURNING id",
                )
                .bind(user_id)
                .bind(now)
                .bind(except)
                .fetch_all(tx.conn().await.get()?)
                .await
            })
            .await?;
        Ok(ids.into_iter().map(|(id,)| id).collect())
    }

    /// Closes the account in `tx`, as part of its deletion: its sessions and their
    /// refresh tokens end and its grants go. Nothing is forgotten from the cache here:
    /// the caller does that once `tx` has committed ([`AuthRepo::forget_user_sessions`]).
    pub async fn close_account(&self, tx: &Tx, user_id: &str, now: i64) -> Result<(), DbError> {
        // (operation, statement, whether it takes the time as $2)
        let statements: [(&'static str, &str, bool); 4] = [
            (
                "close_account",
                "INSERT INTO auth_closed_accounts (user_id, closed_at) VALUES ($1, $2) \
                 ON CONFLICT (user_id) DO UPDATE SET closed_at = excluded.closed_at",
                true,
            ),
            (
                "revoke_refresh_tokens",
                "UPDATE auth_refresh_tokens SET used_at = $2 WHERE used_at IS NULL \
                 AND session_id IN (SELECT id FROM auth_sessions WHERE user_id = $1)",
                true,
            ),
            (
                "revoke_all_sessions",
                "UPDATE auth_sessions SET revoked_at = $2 WHERE user_id = $1 AND revoked_at IS NULL",
                true,
            ),
            (
                "remove_grants",
                "DELETE FROM auth_user_roles WHERE user_id = $1",
                false,
            ),
        ];
        for (operation, sql, timed) in statements {
            self.db
                .run(operation, async {
                    let query = sqlx::query(sql).bind(user_id);
                    let query = if timed { query.bind(now) } else { query };
                    query.execute(tx.conn().await.get()?).await
                })
                .await?;
        }
        Ok(())
    }

    /// Removes sessions that ended before `before` with their refresh tokens, a batch per
    /// transaction (so that no statement holds locks on a large table for long), then the
    /// marks of accounts closed before it that have no session left. Returns the rows
    /// removed.
    pub async fn purge(&self, before: i64) -> Result<u64, DbError> {
        const ENDED: &str = "SELECT id FROM auth_sessions \
             WHERE expires_at < $1 OR revoked_at < $1 ORDER BY id LIMIT 500";
        let mut removed = 0;
        loop {
            let tx = self.db.begin().await?;
            let mut batch = 0;
            for (operation, sql) in [
                (
                    "purge_refresh_tokens",
                    format!("DELETE FROM auth_refresh_tokens WHERE session_id IN ({ENDED})"),
                ),
                (
                    "purge_sessions",
                    format!("DELETE FROM auth_sessions WHERE id IN ({ENDED})"),
                ),
            ] {
                let done = self
                    .db
                    .run(operation, async {
                        sqlx::query(sqlx::AssertSqlSafe(sql))
                            .bind(before)
                            .execute(tx.conn().await.get()?)
                            .await
                    })
                    .await?;
                removed += done.rows_affected();
                batch = done.rows_affected();
            }
            tx.commit().await?;
            if batch < 500 {
                break;
            }
        }
        let marks = self
            .db
            .run(
                "purge_closed_accounts",
                sqlx::query(
                    "DELETE FROM auth_closed_accounts WHERE closed_at < $1 AND NOT EXISTS \
                     (SELECT 1 FROM auth_sessions s WHERE s.user_id = auth_closed_accounts.user_id)",
                )
                .bind(before)
                .execute(self.db.pool()),
            )
            .await?;
        Ok(removed + marks.rows_affected())
    }

    /// Forgets every cached session of the user, live or not: after a deletion has
    /// committed, a session cached as live a moment before must not outlive it.
    pub async fn forget_user_sessions(&self, user_id: &str) -> Result<(), DbError> {
        let ids: Vec<(String,)> = self
            .db
            .run(
                "find_user_sessions",
                sqlx::query_as("SELECT id FROM auth_sessions WHERE user_id = $1")
                    .bind(user_id)
                    .fetch_all(self.db.pool()),
            )
            .await?;
        let ids: Vec<String> = ids.into_iter().map(|(id,)| id).collect();
        self.forget_sessions(&ids).await;
        Ok(())
    }

    /// Takes the lock that serialises changes to who holds `SUPER_ADMIN` (a write to its
    /// role row), so that two concurrent revocations or deletions cannot each leave the
    /// other as the last super-administrator and then both go through.
    pub async fn lock_super_admins(&self, tx: &Tx) -> Result<(), DbError> {
        self.db
            .run("lock_super_admins", async {
                sqlx::query("UPDATE auth_roles SET description = description WHERE name = $1")
                    .bind(SUPER_ADMIN)
                    .execute(tx.conn().await.get()?)
                    .await
            })
            .await
            .map(|_| ())
    }

    /// Who else holds `SUPER_ADMIN` (an account not closed), as seen in `tx`.
    pub async fn other_super_admins(&self, tx: &Tx, user_id: &str) -> Result<i64, DbError> {
        let (count,): (i64,) = self
            .db
            .run("count_super_admins", async {
                sqlx::query_as(
                    "SELECT COUNT(*) FROM auth_user_roles ur WHERE ur.role = $1 AND ur.user_id <> $2 \
                     AND NOT EXISTS (SELECT 1 FROM auth_closed_accounts c WHERE c.user_id = ur.user_id)",
                )
                .bind(SUPER_ADMIN)
                .bind(user_id)
                .fetch_one(tx.conn().await.get()?)
                .await
            })
            .await?;
        Ok(count)
    }

    /// Whether the user holds `role`, as seen in `tx`.
    pub async fn holds_in(&self, tx: &Tx, user_id: &str, role: &str) -> Result<bool, DbError> {
        let row: Option<(String,)> = self
            .db
            .run("find_user_role", async {
                sqlx::query_as("SELECT role FROM auth_user_roles WHERE user_id = $1 AND role = $2")
                    .bind(user_id)
                    .bind(role)
                    .fetch_optional(tx.conn().await.get()?)
                    .await
            })
            .await?;
        Ok(row.is_some())
    }

    /// Revokes `role` in `tx`; false when the user did not hold it.
    pub async fn revoke_role_in(
        &self,
        tx: &Tx,
        user_id: &str,
        role: &str,
    ) -> Result<bool, DbError> {
        let done = self
            .db
            .run("revoke_role", async {
                sqlx::query("DELETE FROM auth_user_roles WHERE user_id = $1 AND role = $2")
                    .bind(user_id)
                    .bind(role)
                    .execute(tx.conn().await.get()?)
                    .await
            })
            .await?;
        Ok(done.rows_affected() > 0)
    }

    /// Begins a transaction.
    pub async fn begin(&self) -> Result<Tx, DbError> {
        self.db.begin().await
    }

    /// Emits an event that comes with no other change.
    pub async fn emit<E: Event>(&self, event: &E) -> Result<(), DbError> {
        self.db.emit(event).await
    }

    /// The signing secret generated on first start: stored by whichever instance comes
    /// first, read by all. Whether this call generated it.
    pub async fn generated_secret(
        &self,
        candidate: &str,
        now: i64,
    ) -> Result<(String, bool), DbError> {
        let done = self
            .db
            .run(
                "insert_signing_key",
                sqlx::query(
                    "INSERT INTO auth_signing_keys (id, secret, created_at) VALUES ('generated', $1, $2) \
                     ON CONFLICT (id) DO NOTHING",
                )
                .bind(candidate)
                .bind(now)
                .execute(self.db.pool()),
            )
            .await?;
        let (secret,): (String,) = self
            .db
            .run(
                "find_signing_key",
                sqlx::query_as("SELECT secret FROM auth_signing_keys WHERE id = 'generated'")
                    .fetch_one(self.db.pool()),
            )
            .await?;
        Ok((secret, done.rows_affected() == 1))
    }

    pub async fn live_sessions(
        &self,
        user_id: &str,
        now: i64,
    ) -> Result<Vec<ListedSession>, DbError> {
        let rows: Vec<(String, i64, i64, i64, Option<String>)> = self
            .db
            .run(
                "list_sessions",
                sqlx::query_as(
                    "SELECT id, created_at, last_used_at, expires_at, user_agent FROM auth_sessions \
                     WHERE user_id = $1 AND revoked_at IS NULL AND expires_at > $2 ORDER BY created_at DESC",
                )
                .bind(user_id)
                .bind(now)
                .fetch_all(self.db.pool()),
            )
            .await?;
        Ok(rows
            .into_iter()
            .map(
                |(id, created_at, last_used_at, expires_at, user_agent)| ListedSession {
                    id,
                    created_at,
                    last_used_at,
                    expires_at,
                    user_agent,
                },
            )
            .collect())
    }

    pub async fn role_exists(&self, role: &str) -> Result<bool, DbError> {
        let row: Option<(String,)> = self
            .db
            .run(
                "find_role",
                sqlx::query_as("SELECT name FROM auth_roles WHERE name = $1")
                    .bind(role)
                    .fetch_optional(self.db.pool()),
            )
            .await?;
        Ok(row.is_some())
    }

    pub async fn roles(&self) -> Result<Vec<(String, String, Vec<String>)>, DbError> {
        let rows: Vec<(String, String, Option<String>)> = self
            .db
            .run(
                "list_roles",
                sqlx::query_as(
                    "SELECT r.name, r.description, rp.permission FROM auth_roles r \
                     LEFT JOIN auth_role_permissions rp ON rp.role = r.name ORDER BY r.name, rp.permission",
                )
                .fetch_all(self.db.pool()),
            )
            .await?;
        let mut roles: Vec<(String, String, Vec<String>)> = Vec::new();
        for (name, description, permission) in rows {
            match roles.last_mut() {
                Some(last) if last.0 == name => last.2.extend(permission),
                _ => roles.push((name, description, permission.into_iter().collect())),
            }
        }
        Ok(roles)
    }

    pub async fn grant(&self, user_id: &str, role: &str, now: i64) -> Result<(), DbError> {
        self.db
            .run(
                "grant_role",
                sqlx::query(
                    "INSERT INTO auth_user_roles (user_id, role, granted_at) VALUES ($1, $2, $3) \
                     ON CONFLICT (user_id, role) DO NOTHING",
                )
                .bind(user_id)
                .bind(role)
                .bind(now)
                .execute(self.db.pool()),
            )
            .await
            .map(|_| ())
    }

    pub async fn user_roles(&self, user_id: &str) -> Result<Vec<String>, DbError> {
        let rows: Vec<(String,)> = self
            .db
            .run(
                "find_user_roles",
                sqlx::query_as("SELECT role FROM auth_user_roles WHERE user_id = $1 ORDER BY role")
                    .bind(user_id)
                    .fetch_all(self.db.pool()),
            )
            .await?;
        Ok(rows.into_iter().map(|(r,)| r).collect())
    }

    /// Ids of the user's live sessions (to refresh their cached grants).
    pub async fn live_session_ids(&self, user_id: &str, now: i64) -> Result<Vec<String>, DbError> {
        Ok(self
            .live_sessions(user_id, now)
            .await?
            .into_iter()
            .map(|s| s.id)
            .collect())
    }
}
