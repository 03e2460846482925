//! The user module's rules. No HTTP types here.
//!
//! Access: a user reads and changes only themself unless they hold `users:manage`; any
//! other id answers "not found", so ids cannot be probed for existence.

use std::time::Duration;

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use trellis_core::{
    ModuleContext,
    auth::Principal,
    bus::{Bus, Request},
    clock::Clock,
    contracts::{
        AccountError, BootstrapAccount, Bootstrapped, CloseAccount, GuardAccount, PasswordChanged,
        RevokeUserSessions, UserDeleted, UserIdentity, UserRegistered, UserUpdated,
    },
};

use crate::{
    UserConfig,
    domain::{Account, Details, Email, NewUser, Password, PersonName, UserChanges},
    error::UserError,
    password::Hasher,
    repo::{UserForCreate, UserRepo},
};

/// The permission to read, change and list other users.
pub const MANAGE_USERS: &str = "users:manage";

/// One page of users.
#[derive(Debug, Clone)]
pub struct Page {
    /// The users.
    pub users: Vec<Account>,
    /// Pass back to get the next page; absent on the last one.
    pub next_cursor: Option<String>,
}

/// A password typed to prove who one is, with the client's address that the checks are
/// throttled by.
pub struct CurrentPassword<'a> {
    /// The password as typed.
    pub password: String,
    /// The client's rate-limit key ([`trellis_core::client::client_address`]).
    pub client: Option<&'a str>,
}

/// The user service.
#[derive(Clone)]
pub struct Users {
    repo: UserRepo,
    bus: Bus,
    hasher: Hasher,
    clock: Clock,
    config: UserConfig,
}

impl Users {
    /// The service over the module's context.
    pub fn from_context(ctx: &ModuleContext) -> anyhow::Result<Self> {
        let config: UserConfig = ctx.config()?;
        crate::password::describe_metrics();
        Ok(Self {
            repo: UserRepo::new(
                ctx.database(),
                ctx.cache(),
                Duration::from_millis(config.cache_ms),
            ),
            bus: ctx.bus().clone(),
            hasher: Hasher::new(config.hash_concurrency, config.hash_queue),
            clock: ctx.clock().clone(),
            config,
        })
    }

    /// Counts an attempt that costs a password hash or reveals whether an e-mail is
    /// registered against the client's address (OWASP Authentication Cheat Sheet: throttle
    /// every path that checks a password or can enumerate accounts).
    async fn throttle(
        &self,
        action: &str,
        client: Option<&str>,
        limit: i64,
    ) -> Result<(), UserError> {
        let Some(client) = client else {
            return Ok(());
        };
        let window = Duration::from_millis(self.config.throttle_window_ms);
        self.repo
            .cache()
            .throttle(&format!("{action}:{client}"), limit, window)
            .await
            .map_err(|retry_after| UserError::Throttled { retry_after })
    }

    /// Asks the module keeping roles whether `principal` may act on somebody else's
    /// account; one's own account needs no asking. Without such a module there are no
    /// roles to outrank anyone.
    async fn guard(&self, principal: &Principal, id: &str) -> Result<(), UserError> {
        if principal.is(id) {
            return Ok(());
        }
        self.ask(GuardAccount {
            actor: principal.clone(),
            user_id: id.to_owned(),
        })
        .await
    }

    /// A request to another module whose answer decides the change; no answering module
    /// means nothing to check.
    async fn ask<R>(&self, request: R) -> Result<(), UserError>
    where
        R: Request<Response = Result<(), AccountError>>,
    {
        if !self.bus.handles::<R>() {
            return Ok(());
        }
        Ok(self
            .bus
            .request(request)
            .await
            .map_err(|e| UserError::Unavailable(e.to_string()))??)
    }

    /// Checks the account's current password, counted against the client's address.
    async fn check_password(
        &self,
        id: &str,
        current: CurrentPassword<'_>,
    ) -> Result<(), UserError> {
        self.throttle(
            "password_check",
            current.client,
            self.config.password_checks_per_address,
        )
        .await?;
        let stored = self
            .repo
            .find_password_hash(id)
            .await?
            .ok_or(UserError::NotFound)?;
        if self.hasher.verify(current.password, Some(stored)).await? {
            Ok(())
        } else {
            Err(UserError::Reauthenticate(
                "is not the account's current password",
            ))
        }
    }

    /// Registers an account; throttled per client address, since each costs a hash.
    pub async fn register(
        &self,
        user: NewUser,
        client: Option<&str>,
    ) -> Result<Account, UserError> {
        self.throttle("register", client, self.config.registrations_per_address)
            .await?;
        self.create(user).await
    }

    async fn create(&self, user: NewUser) -> Result<Account, UserError> {
        let id = uuid::Uuid::new_v4().to_string();
        let hash = self.hasher.hash(user.password).await??;
        let now = self.clock.now_millis();
        let tx = self.repo.begin().await?;
        self.repo
            .insert_user(
                &tx,
                UserForCreate {
                    id: &id,
                    email: user.email.as_str(),
                    password_hash: &hash,
                    first_name: user.first_name.as_str(),
                    last_name: user.last_name.as_str(),
                    now,
                },
            )
            .await?;
        tx.emit(&UserRegistered {
            user_id: id.clone(),
            email: user.email.as_str().to_owned(),
        })
        .await?;
        tx.commit().await?;
        tracing::info!(user_id = %id, "user registered");
        Ok(Account {
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
    pub async fn get(&self, principal: &Principal, id: &str) -> Result<Account, UserError> {
        if !Self::may_access(principal, id) {
            return Err(UserError::NotFound);
        }
        self.repo.find_active(id).await?.ok_or(UserError::NotFound)
    }

    /// Changes a profile; a new e-mail must be free. Changing one's own e-mail needs the
    /// current password (OWASP: re-authenticate before changing what recovers an
    /// account); an administrator changing another account needs to outrank its owner.
    pub async fn update(
        &self,
        principal: &Principal,
        id: &str,
        changes: UserChanges,
        current: Option<CurrentPassword<'_>>,
    ) -> Result<Account, UserError> {
        if !Self::may_access(principal, id) {
            return Err(UserError::NotFound);
        }
        self.guard(principal, id).await?;
        if changes.email.is_some() && principal.is(id) {
            let current = current.ok_or(UserError::Reauthenticate(
                "changing the e-mail needs the current password",
            ))?;
            self.check_password(id, current).await?;
        }
        let fields = changes.fields();
        let tx = self.repo.begin().await?;
        let row = self
            .repo
            .update_user(&tx, id, &changes, self.clock.now_millis())
            .await?
            .ok_or(UserError::NotFound)?;
        if !fields.is_empty() {
            tx.emit(&UserUpdated {
                user_id: id.to_owned(),
                fields: fields.iter().map(|f| (*f).to_owned()).collect(),
            })
            .await?;
        }
        tx.commit().await?;
        self.repo.forget(id).await;
        Ok(row)
    }

    /// Soft-deletes an account. Its sessions, refresh tokens and grants end in the same
    /// transaction (the module keeping them takes part through `CloseAccount`, and may
    /// refuse: the last super-administrator, or one the caller does not outrank), so a
    /// deleted account cannot authenticate once the answer is sent.
    pub async fn delete(&self, principal: &Principal, id: &str) -> Result<(), UserError> {
        if !Self::may_access(principal, id) {
            return Err(UserError::NotFound);
        }
        let tx = self.repo.begin().await?;
        if !self
            .repo
            .soft_delete(&tx, id, self.clock.now_millis())
            .await?
        {
            return Err(UserError::NotFound);
        }
        self.ask(CloseAccount {
            actor: principal.clone(),
            user_id: id.to_owned(),
            tx: tx.clone(),
        })
        .await?;
        let deleted = UserDeleted {
            user_id: id.to_owned(),
        };
        tx.emit(&deleted).await?;
        tx.commit().await?;
        self.repo.forget(id).await;
        tracing::info!(user_id = %id, "user deleted");
        // Before the answer: modules forget what they cached about the account.
        self.bus.publish(deleted).await;
        Ok(())
    }

    /// Changes one's own password: the current one must match, the new one follows the
    /// registration rules, and every other session of the account ends (OWASP Session
    /// Management: invalidate sessions after a password change).
    pub async fn change_password(
        &self,
        principal: &Principal,
        id: &str,
        current: CurrentPassword<'_>,
        new: Password,
    ) -> Result<(), UserError> {
        if !principal.is(id) {
            return Err(UserError::NotFound);
        }
        self.check_password(id, current).await?;
        let hash = self.hasher.hash(new).await??;
        let tx = self.repo.begin().await?;
        if !self
            .repo
            .set_password_hash(&tx, id, &hash, self.clock.now_millis())
            .await?
        {
            return Err(UserError::NotFound);
        }
        tx.emit(&PasswordChanged {
            user_id: id.to_owned(),
        })
        .await?;
        tx.commit().await?;
        self.repo.forget(id).await;
        if self.bus.handles::<RevokeUserSessions>() {
            let revoked = self
                .bus
                .request(RevokeUserSessions {
                    user_id: id.to_owned(),
                    except: Some(principal.session_id.clone()),
                    reason: "password_changed",
                })
                .await
                .map_err(|e| UserError::Unavailable(e.to_string()))??;
            tracing::info!(user_id = %id, sessions = revoked, "password changed; other sessions revoked");
        }
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
        self.guard(principal, id).await?;
        let now = self.clock.now_millis();
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
    ) -> Result<Option<UserIdentity>, AccountError> {
        let found = match Email::parse(email) {
            Ok(email) => self.repo.find_credentials(email.as_str()).await?,
            Err(_) => None,
        };
        let (user, hash) = match found {
            Some((user, hash)) => (Some(user), Some(hash)),
            None => (None, None),
        };
        let matches = self
            .hasher
            .verify(password, hash)
            .await
            .map_err(|_| AccountError::Busy)?;
        Ok(user.filter(|_| matches).map(|u| UserIdentity {
            id: u.id,
            email: u.email,
        }))
    }

    /// Bus: an active user by id.
    pub async fn find_identity(&self, id: &str) -> Result<Option<UserIdentity>, AccountError> {
        let row = self.repo.find_active(id).await?;
        Ok(row.map(|u| UserIdentity {
            id: u.id,
            email: u.email,
        }))
    }

    /// Bus: the bootstrap administrator's account, created with the configured password,
    /// or found and proven by it. When several instances start together, the one whose
    /// insert loses the race finds the winner's account and checks the password like any
    /// later start.
    pub async fn bootstrap(&self, request: BootstrapAccount) -> Result<Bootstrapped, AccountError> {
        let invalid = |field: &str, e: String| AccountError::Invalid(format!("{field} {e}"));
        let email = Email::parse(&request.email).map_err(|e| invalid("e-mail", e))?;
        let unavailable = |e: UserError| match e {
            UserError::Busy => AccountError::Busy,
            other => AccountError::Unavailable(other.to_string()),
        };
        for _ in 0..2 {
            if let Some((user, hash)) = self.repo.find_credentials(email.as_str()).await? {
                let matches = self
                    .hasher
                    .verify(request.password.clone(), Some(hash))
                    .await
                    .map_err(|_| AccountError::Busy)?;
                return Ok(if matches {
                    Bootstrapped::Verified(UserIdentity {
                        id: user.id,
                        email: user.email,
                    })
                } else {
                    Bootstrapped::PasswordMismatch
                });
            }
            let user = NewUser {
                email: email.clone(),
                password: Password::parse(request.password.clone())
                    .map_err(|e| invalid("password", e))?,
                first_name: PersonName::parse(&request.first_name)
                    .map_err(|e| invalid("first name", e))?,
                last_name: PersonName::parse(&request.last_name)
                    .map_err(|e| invalid("last name", e))?,
            };
            match self.create(user).await {
                Ok(row) => {
                    return Ok(Bootstrapped::Created(UserIdentity {
                        id: row.id,
                        email: row.email,
                    }));
                }
                // Another instance registered it first: check its account on the next turn.
                Err(UserError::Db(trellis_core::storage::DbError::UniqueViolation { .. })) => {}
                Err(other) => return Err(unavailable(other)),
            }
        }
        Err(AccountError::Unavailable(
            "the bootstrap account was created and deleted concurrently".into(),
        ))
    }
}

fn decode_cursor(cursor: &str) -> String {
    match URL_SAFE_NO_PAD.decode(cursor) {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(_) => cursor.to_owned(),
    }
}
