//! The auth module's SQL and cache: sessions, refresh tokens, roles.

use std::{collections::BTreeSet, time::Duration};

use serde::{Deserialize, Serialize};
use trellis_core::storage::{DbError, Migration, ModuleCache, ModuleDb};

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

/// Sessions, refresh tokens, roles (ADMIN, SUPER_ADMIN with `sudo`) and grants.
pub static MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    name: "create sessions, refresh tokens and roles",
    sqlite: SCHEMA,
    postgres: SCHEMA,
}];

/// A session as listed to its owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRow {
    pub id: String,
    pub created_at: i64,
    pub last_used_at: i64,
    pub expires_at: i64,
    pub user_agent: Option<String>,
}

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

    pub async fn insert_session(&self, s: SessionForCreate<'_>) -> Result<(), DbError> {
        self.db
            .run(
                "insert_session",
                sqlx::query(
                    "INSERT INTO auth_sessions (id, user_id, created_at, last_used_at, expires_at, user_agent, address) \
                     VALUES ($1, $2, $3, $3, $4, $5, $6)",
                )
                .bind(s.id)
                .bind(s.user_id)
                .bind(s.now)
                .bind(s.expires_at)
                .bind(s.user_agent)
                .bind(s.address)
                .execute(self.db.pool()),
            )
            .await
            .map(|_| ())
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
                    "SELECT r.session_id, r.used_at, s.user_id, s.revoked_at, s.expires_at \
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
                        sqlx::query_as(
                            "SELECT user_id FROM auth_sessions WHERE id = $1 AND revoked_at IS NULL AND expires_at > $2",
                        )
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

    /// Revokes one session of `user_id`; false when it was not live.
    pub async fn revoke_session(&self, user_id: &str, id: &str, now: i64) -> Result<bool, DbError> {
        let done = self
            .db
            .run(
                "revoke_session",
                sqlx::query(
                    "UPDATE auth_sessions SET revoked_at = $3 WHERE id = $1 AND user_id = $2 AND revoked_at IS NULL",
                )
                .bind(id)
                .bind(user_id)
                .bind(now)
                .execute(self.db.pool()),
            )
            .await?;
        self.forget_sessions(&[id.to_owned()]).await;
        Ok(done.rows_affected() > 0)
    }

    /// Revokes every live session of `user_id`; their ids.
    pub async fn revoke_all(&self, user_id: &str, now: i64) -> Result<Vec<String>, DbError> {
        let ids: Vec<(String,)> = self
            .db
            .run(
                "revoke_all_sessions",
                sqlx::query_as(
                    "UPDATE auth_sessions SET revoked_at = $2 WHERE user_id = $1 AND revoked_at IS NULL RETURNING id",
                )
                .bind(user_id)
                .bind(now)
                .fetch_all(self.db.pool()),
            )
            .await?;
        let ids: Vec<String> = ids.into_iter().map(|(id,)| id).collect();
        self.forget_sessions(&ids).await;
        Ok(ids)
    }

    pub async fn live_sessions(&self, user_id: &str, now: i64) -> Result<Vec<SessionRow>, DbError> {
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
                |(id, created_at, last_used_at, expires_at, user_agent)| SessionRow {
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

    pub async fn revoke_role(&self, user_id: &str, role: &str) -> Result<bool, DbError> {
        let done = self
            .db
            .run(
                "revoke_role",
                sqlx::query("DELETE FROM auth_user_roles WHERE user_id = $1 AND role = $2")
                    .bind(user_id)
                    .bind(role)
                    .execute(self.db.pool()),
            )
            .await?;
        Ok(done.rows_affected() > 0)
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
