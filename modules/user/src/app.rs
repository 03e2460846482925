//! The user module's rules. No HTTP types here.
//!
//! Access: a user reads and changes only themself unless they hold `users:manage`; any
//! other id answers "not found", so ids cannot be probed for existence.

use std::time::Duration;

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use trellis_core::{
    ModuleContext,
    auth::Principal,
    bus::Bus,
    clock::now_millis,
    contracts::{
        EnsureUser, RevokeUserSessions, UserDeleted, UserIdentity, UserRegistered, UserUpdated,
    },
};

use crate::{
    UserConfig,
    domain::{Details, Email, NewUser, Password, PersonName, UserChanges},
    error::UserError,
    password,
    repo::{UserForCreate, UserRepo, UserRow},
};

/// The permission to read, change and list other users.
pub const MANAGE_USERS: &str = "users:manage";

/// One page of users.
#[derive(Debug, Clone)]
pub struct Page {
    /// The users.
    pub users: Vec<UserRow>,
    /// Pass back to get the next page; absent on the last one.
    pub next_cursor: Option<String>,
}

/// The user service.
#[derive(Clone)]
pub struct Users {
    repo: UserRepo,
    bus: Bus,
    config: UserConfig,
}

impl Users {
    /// The service over the module's context.
    pub fn from_context(ctx: &ModuleContext<'_>) -> anyhow::Result<Self> {
        let config: UserConfig = ctx.config()?;
        Ok(Self {
            repo: UserRepo::new(
                ctx.database(),
                ctx.cache(),
                Duration::from_secs(config.cache_secs),
            ),
            bus: ctx.bus().clone(),
            config,
        })
    }

    /// Registers an account.
    pub async fn register(&self, user: NewUser) -> Result<UserRow, UserError> {
        let id = uuid::Uuid::new_v4().to_string();
        let hash = password::hash(user.password).await?;
        let now = now_millis();
        self.repo
            .insert_user(UserForCreate {
                id: &id,
                email: user.email.as_str(),
                password_hash: &hash,
                first_name: user.first_name.as_str(),
                last_name: user.last_name.as_str(),
                now,
            })
            .await?;
        tracing::info!(user_id = %id, "user registered");
        self.bus
            .publish(UserRegistered {
                user_id: id.clone(),
                email: user.email.as_str().to_owned(),
            })
            .await;
        Ok(UserRow {
            id,
            email: user.email.as_str().to_owned(),
            first_name: user.first_name.as_str().to_owned(),
            last_name: user.last_name.as_str().to_owned(),
            created_at: now,
            updated_at: now,
        })
    }

    fn may_access(principal: &Principal, id: &str) -> bool {
        principal.is(id) || principal.can(MANAGE_USERS)
    }

    /// A user the principal may see.
    pub async fn get(&self, principal: &Principal, id: &str) -> Result<UserRow, UserError> {
        if !Self::may_access(principal, id) {
            return Err(UserError::NotFound);
        }
        self.repo.find_active(id).await?.ok_or(UserError::NotFound)
    }

    /// Changes a profile; a new e-mail must be free.
    pub async fn update(
        &self,
        principal: &Principal,
        id: &str,
        changes: UserChanges,
    ) -> Result<UserRow, UserError> {
        if !Self::may_access(principal, id) {
            return Err(UserError::NotFound);
        }
        let fields = changes.fields();
        let row = self
            .repo
            .update_user(id, &changes, now_millis())
            .await?
            .ok_or(UserError::NotFound)?;
        if !fields.is_empty() {
            self.bus
                .publish(UserUpdated {
                    user_id: id.to_owned(),
                    fields,
                })
                .await;
        }
        Ok(row)
    }

    /// Soft-deletes an account: it stops authenticating and its sessions are revoked.
    pub async fn delete(&self, principal: &Principal, id: &str) -> Result<(), UserError> {
        if !Self::may_access(principal, id) {
            return Err(UserError::NotFound);
        }
        if !self.repo.soft_delete(id, now_millis()).await? {
            return Err(UserError::NotFound);
        }
        if self.bus.handles::<RevokeUserSessions>() {
            let revoked = self
                .bus
                .request(RevokeUserSessions {
                    user_id: id.to_owned(),
                })
                .await;
            match revoked {
                Ok(Ok(count)) => {
                    tracing::info!(user_id = %id, sessions = count, "sessions revoked")
                }
                Ok(Err(error)) => tracing::error!(user_id = %id, %error, "sessions not revoked"),
                Err(error) => tracing::error!(user_id = %id, %error, "sessions not revoked"),
            }
        }
        self.bus
            .publish(UserDeleted {
                user_id: id.to_owned(),
            })
            .await;
        Ok(())
    }

    /// Replaces the UTM details.
    pub async fn put_details(
        &self,
        principal: &Principal,
        id: &str,
        details: Details,
    ) -> Result<(Details, i64), UserError> {
        self.get(principal, id).await?;
        let now = now_millis();
        self.repo.upsert_details(id, &details, now).await?;
        Ok((details, now))
    }

    /// The UTM details (empty when never set).
    pub async fn details(
        &self,
        principal: &Principal,
        id: &str,
    ) -> Result<(Details, i64), UserError> {
        let user = self.get(principal, id).await?;
        Ok(self
            .repo
            .find_details(id)
            .await?
            .unwrap_or((Details::default(), user.created_at)))
    }

    /// A page of users, for those who may manage them.
    pub async fn list(
        &self,
        principal: &Principal,
        email_prefix: Option<&str>,
        cursor: Option<&str>,
        limit: Option<u32>,
    ) -> Result<Page, UserError> {
        if !principal.can(MANAGE_USERS) {
            return Err(UserError::Forbidden(MANAGE_USERS));
        }
        let limit = limit
            .unwrap_or(self.config.default_page_size)
            .clamp(1, self.config.max_page_size);
        // A cursor is an opaque position in e-mail order; one this server did not issue is
        // still a position (it pages from there), never an error.
        let after = cursor.map(decode_cursor).unwrap_or_default();
        let prefix = email_prefix.unwrap_or_default().trim().to_lowercase();
        let mut users = self.repo.list_active(&prefix, &after, limit + 1).await?;
        let next_cursor = if users.len() > limit as usize {
            users.truncate(limit as usize);
            users.last().map(|u| URL_SAFE_NO_PAD.encode(&u.email))
        } else {
            None
        };
        Ok(Page { users, next_cursor })
    }

    /// Bus: checks credentials with the same cost whether or not the account exists.
    pub async fn verify_credentials(
        &self,
        email: &str,
        password: String,
    ) -> Result<Option<UserIdentity>, String> {
        let found = match Email::parse(email) {
            Ok(email) => self
                .repo
                .find_credentials(email.as_str())
                .await
                .map_err(|e| e.to_string())?,
            Err(_) => None,
        };
        let (user, hash) = match found {
            Some((user, hash)) => (Some(user), Some(hash)),
            None => (None, None),
        };
        let matches = password::verify(password, hash).await;
        Ok(user.filter(|_| matches).map(|u| UserIdentity {
            id: u.id,
            email: u.email,
        }))
    }

    /// Bus: an active user by id.
    pub async fn find_identity(&self, id: &str) -> Result<Option<UserIdentity>, String> {
        let row = self.repo.find_active(id).await.map_err(|e| e.to_string())?;
        Ok(row.map(|u| UserIdentity {
            id: u.id,
            email: u.email,
        }))
    }

    /// Bus: the account with the e-mail, created if missing.
    pub async fn ensure(&self, request: EnsureUser) -> Result<UserIdentity, String> {
        let email = Email::parse(&request.email).map_err(|e| format!("email {e}"))?;
        if let Some((user, _)) = self
            .repo
            .find_credentials(email.as_str())
            .await
            .map_err(|e| e.to_string())?
        {
            return Ok(UserIdentity {
                id: user.id,
                email: user.email,
            });
        }
        let user = NewUser {
            email,
            password: Password::parse(request.password).map_err(|e| format!("password {e}"))?,
            first_name: PersonName::parse(&request.first_name)
                .map_err(|e| format!("first name {e}"))?,
            last_name: PersonName::parse(&request.last_name)
                .map_err(|e| format!("last name {e}"))?,
        };
        let row = self.register(user).await.map_err(|e| e.to_string())?;
        Ok(UserIdentity {
            id: row.id,
            email: row.email,
        })
    }
}

fn decode_cursor(cursor: &str) -> String {
    match URL_SAFE_NO_PAD.decode(cursor) {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(_) => cursor.to_owned(),
    }
}
