//! The auth module's rules. No HTTP types here.

use std::time::Duration;

use anyhow::Context as _;
use base64::{Engine as _, engine::general_purpose::STANDARD};
use secrecy::{ExposeSecret as _, SecretString};
use trellis_core::{
    ModuleContext,
    auth::{AuthError, Principal, SUDO},
    bus::Bus,
    client::address_key,
    clock::Clock,
    contracts::{
        AccountError, BootstrapAccount, Bootstrapped, CloseAccount, FindUser, LoginFailed,
        SessionRevoked, UserLoggedIn, VerifyCredentials,
    },
    storage::DbError,
};

use crate::{
    AuthConfig,
    domain::ListedSession,
    error::AuthModuleError,
    repo::{AuthRepo, SUPER_ADMIN, SessionForCreate},
    secrets,
    tokens::{Claims, Key, KeyRing, Signer, digest, new_refresh_token},
};

/// The permission to list roles.
pub const READ_ROLES: &str = "roles:read";

/// Failed logins, by reason (`invalid_credentials`, `rate_limited`).
pub const LOGIN_FAILURES_TOTAL: &str = "auth_login_failures_total";
/// A login failed: unknown e-mail address or wrong password.
const INVALID_CREDENTIALS: &str = "invalid_credentials";
/// A login refused by the throttles before its password was checked.
const RATE_LIMITED: &str = "rate_limited";

/// Tokens handed out by login and refresh.
#[derive(Debug, Clone)]
pub struct TokenPair {
    pub access_token: String,
    pub expires_in: u64,
    pub refresh_token: String,
    pub session_id: String,
}

/// Where a login comes from.
#[derive(Debug, Clone, Default)]
pub struct Client {
    pub address: Option<std::net::IpAddr>,
    pub user_agent: Option<String>,
}

/// The auth service.
#[derive(Clone)]
pub struct Auth {
    repo: AuthRepo,
    bus: Bus,
    signer: Signer,
    clock: Clock,
    config: AuthConfig,
}

impl Auth {
    /// The service over the module's context. Its signing keys are installed by
    /// [`Auth::load_keys`] once the database is migrated.
    pub fn from_context(ctx: &ModuleContext) -> anyhow::Result<Self> {
        let config: AuthConfig = ctx.config()?;
        metrics::describe_counter!(
            LOGIN_FAILURES_TOTAL,
            "Failed logins, by reason (invalid_credentials, rate_limited)."
        );
        // At zero from the start, so a rate over them exists before the first failure.
        for reason in [INVALID_CREDENTIALS, RATE_LIMITED] {
            metrics::counter!(LOGIN_FAILURES_TOTAL, "reason" => reason).increment(0);
        }
        anyhow::ensure!(
            config.access_ttl_ms >= 1000,
            "`modules.auth.access_ttl_ms`: must be at least 1000 (tokens count whole seconds)"
        );
        Ok(Self {
            repo: AuthRepo::new(
                ctx.database(),
                ctx.cache(),
                Duration::from_millis(config.session_cache_ms),
            ),
            bus: ctx.bus().clone(),
            signer: Signer::new(&config.issuer, ctx.clock().clone()),
            clock: ctx.clock().clone(),
            config,
        })
    }

    /// Installs the signing keys: the configured secret, or the one generated on first
    /// start and kept in the database (every instance on the database reads the same),
    /// plus the previous secrets still accepted. Refuses published and weak secrets.
    pub async fn load_keys(&self, profile: &str) -> anyhow::Result<()> {
        let check = |key: &str, secret: &SecretString| match secrets::refusal(
            key,
            secret.expose_secret(),
            profile,
        ) {
            Some(refusal) => Err(anyhow::anyhow!(refusal)),
            None => Ok(Key::new(secret.expose_secret().as_bytes())),
        };
        let current = if self.config.jwt_secret.expose_secret().is_empty() {
            let candidate = STANDARD.encode(rand::random::<[u8; 32]>());
            let (secret, generated) = self
                .repo
                .generated_secret(&candidate, self.clock.now_millis())
                .await
                .context("cannot store or read the generated signing key")?;
            if generated {
                tracing::warn!(
                    "generated a random token signing key and stored it in the database \
                     (table auth_signing_keys); every instance on this database uses it. \
                     Set `modules.auth.jwt_secret` to manage keys yourself"
                );
            } else {
                tracing::info!("using the token signing key generated on first start");
            }
            Key::new(secret.as_bytes())
        } else {
            check("modules.auth.jwt_secret", &self.config.jwt_secret)?
        };
        let previous = self
            .config
            .jwt_previous_secrets
            .iter()
            .enumerate()
            .map(|(i, secret)| check(&format!("modules.auth.jwt_previous_secrets[{i}]"), secret))
            .collect::<anyhow::Result<Vec<_>>>()?;
        tracing::info!(
            key_id = current.id(),
            previous = previous.len(),
            "token signing keys loaded"
        );
        self.signer.install(KeyRing::new(current, previous));
        Ok(())
    }

    /// Init hook: the configured super-administrator. Created with the configured
    /// password when the e-mail is free; when an account holds the e-mail, the role is
    /// granted only if its password is the configured one, since whoever registered the
    /// address first must not become super-administrator at the next restart.
    pub async fn bootstrap_admin(&self, bus: &Bus) -> anyhow::Result<()> {
        let email = &self.config.bootstrap_admin_email;
        if email.is_empty() {
            return Ok(());
        }
        let password = self.config.bootstrap_admin_password.expose_secret();
        if password.is_empty() {
            tracing::error!(
                "`modules.auth.bootstrap_admin_email` is set but `modules.auth.bootstrap_admin_password` \
                 is empty: no super-administrator granted"
            );
            return Ok(());
        }
        let outcome = bus
            .request(BootstrapAccount {
                email: email.clone(),
                password: password.to_owned(),
                first_name: "Super".into(),
                last_name: "Admin".into(),
            })
            .await?
            .map_err(|e| anyhow::anyhow!("`modules.auth.bootstrap_admin_*`: {e}"))?;
        let user = match outcome {
            Bootstrapped::Created(user) => user,
            Bootstrapped::Verified(user) => user,
            Bootstrapped::PasswordMismatch => {
                tracing::error!(
                    "`modules.auth.bootstrap_admin_email` belongs to an account whose password is not \
                     `modules.auth.bootstrap_admin_password`: SUPER_ADMIN not granted"
                );
                return Ok(());
            }
        };
        self.repo
            .grant(&user.id, SUPER_ADMIN, self.clock.now_millis())
            .await
            .context("cannot grant SUPER_ADMIN to the bootstrap administrator")?;
        tracing::info!(user_id = %user.id, "super-administrator ensured");
        Ok(())
    }

    fn window(&self) -> Duration {
        Duration::from_millis(self.config.login_window_ms)
    }

    /// Counts this attempt against the client's own budgets before the password is
    /// checked; a successful login takes it back ([`Auth::refund`]), so only failures
    /// count (OWASP Authentication Cheat Sheet: throttle failed attempts, never let
    /// strangers lock an owner out). Per (account, address) the budget is tight; per
    /// address over all accounts it stops password spraying.
    async fn spend(&self, keys: &LoginKeys) -> Result<(), AuthModuleError> {
        let Some((pair, address)) = &keys.client else {
            return Ok(());
        };
        let cache = self.repo.cache();
        let mut spent = Vec::with_capacity(2);
        for (key, limit) in [
            (pair, self.config.login_failures_per_pair),
            (address, self.config.login_failures_per_address),
        ] {
            spent.push(key);
            if let Err(retry_after) = cache.throttle(key, limit, self.window()).await {
                // A refused attempt checks no password, so it costs nothing.
                for key in spent {
                    let _ = cache.incr(key, -1, self.window()).await;
                }
                return Err(AuthModuleError::RateLimited { retry_after });
            }
        }
        Ok(())
    }

    async fn refund(&self, keys: &LoginKeys) {
        if let Some((pair, address)) = &keys.client {
            for key in [pair, address] {
                let _ = self.repo.cache().incr(key, -1, self.window()).await;
            }
        }
    }

    /// Past `login_failures_per_account` failures, an account is slowed for addresses
    /// that never logged into it: each failure makes the next attempt wait twice as long
    /// (up to `login_delay_max_ms`). A distributed guesser gets a few tries a minute;
    /// the owner, from an address they logged in from before, is not held up at all.
    async fn account_wait(&self, keys: &LoginKeys) -> Result<(), AuthModuleError> {
        if keys.known_address(self).await {
            return Ok(());
        }
        match self.repo.cache().get(&keys.wait).await {
            Some(until) => {
                let until = std::str::from_utf8(&until)
                    .ok()
                    .and_then(|s| s.parse::<i64>().ok())
                    .unwrap_or_default();
                let retry_after = u64::try_from((until - self.clock.now_millis() + 999) / 1000)
                    .unwrap_or(1)
                    .max(1);
                Err(AuthModuleError::RateLimited { retry_after })
            }
            None => Ok(()),
        }
    }

    async fn record_failure(&self, keys: &LoginKeys) {
        let cache = self.repo.cache();
        let failures = cache
            .incr(&keys.account, 1, self.window())
            .await
            .unwrap_or_default();
        let over = failures - self.config.login_failures_per_account;
        if over > 0 {
            // 1 s, 2 s, 4 s, ... up to the maximum.
            let doubling = 1u64
                .checked_shl(u32::try_from(over - 1).unwrap_or(u32::MAX))
                .unwrap_or(u64::MAX);
            let delay_ms = doubling
                .saturating_mul(1000)
                .min(self.config.login_delay_max_ms);
            let until = self.clock.now_millis() + i64::try_from(delay_ms).unwrap_or(i64::MAX);
            cache
                .set(
                    &keys.wait,
                    until.to_string().into_bytes(),
                    Duration::from_millis(delay_ms),
                )
                .await;
        }
    }

    /// Logs in: throttled per (account, address), per address and per account (see
    /// [`Auth::spend`] and [`Auth::account_wait`]), then the same answer for an unknown
    /// e-mail and a wrong password (the user module spends the same hashing time).
    pub async fn login(
        &self,
        email: &str,
        password: String,
        client: Client,
    ) -> Result<TokenPair, AuthModuleError> {
        let account = email.trim().to_lowercase();
        let keys = LoginKeys::new(
            &account,
            client.address.map(|ip| address_key(ip).to_string()),
        );
        let allowed = async {
            self.spend(&keys).await?;
            let waited = self.account_wait(&keys).await;
            if waited.is_err() {
                self.refund(&keys).await;
            }
            waited
        }
        .await;
        if let Err(error) = allowed {
            self.login_failed(account, RATE_LIMITED).await;
            return Err(error);
        }
        let verified = self
            .bus
            .request(VerifyCredentials {
                email: email.to_owned(),
                password,
            })
            .await
            .map_err(anyhow::Error::from)?;
        let user = match verified {
            Ok(Some(user)) => user,
            Ok(None) => {
                self.record_failure(&keys).await;
                self.login_failed(account, INVALID_CREDENTIALS).await;
                return Err(AuthModuleError::InvalidCredentials);
            }
            Err(error) => {
                self.refund(&keys).await;
                return Err(AuthModuleError::from_account_error(error));
            }
        };
        self.refund(&keys).await;
        keys.remember_address(self).await;
        let session_id = uuid::Uuid::new_v4().to_string();
        let now_ms = self.clock.now_millis();
        let expires_at = now_ms + i64::try_from(self.config.session_ttl_ms).unwrap_or(i64::MAX);
        let address = client.address.map(|a| a.to_string());
        let tx = self.repo.begin().await?;
        let inserted = self
            .repo
            .insert_session(
                &tx,
                SessionForCreate {
                    id: &session_id,
                    user_id: &user.id,
                    now: now_ms,
                    expires_at,
                    user_agent: client.user_agent.as_deref(),
                    address: address.as_deref(),
                },
            )
            .await?;
        if !inserted {
            // The account was deleted while its password was being checked.
            return Err(AuthModuleError::InvalidCredentials);
        }
        tx.emit(&UserLoggedIn {
            user_id: user.id.clone(),
            session_id: session_id.clone(),
        })
        .await?;
        tx.commit().await?;
        let pair = self.issue(&user.id, &session_id, now_ms).await?;
        tracing::info!(user_id = %user.id, "logged in");
        Ok(pair)
    }

    /// Records a failed login as an event. It changes nothing else, and a database that
    /// cannot store it does not change the answer.
    async fn login_failed(&self, email: String, reason: &'static str) {
        metrics::counter!(LOGIN_FAILURES_TOTAL, "reason" => reason).increment(1);
        let event = LoginFailed {
            email,
            reason: reason.to_owned(),
        };
        if let Err(error) = self.repo.emit(&event).await {
            tracing::warn!(%error, reason, "failed login not recorded as an event");
        }
    }

    async fn issue(
        &self,
        user_id: &str,
        session_id: &str,
        now_ms: i64,
    ) -> Result<TokenPair, AuthModuleError> {
        let refresh_token = new_refresh_token();
        self.repo
            .insert_refresh(&digest(&refresh_token), session_id, now_ms)
            .await?;
        let iat = self.clock.now_secs();
        let access_token = self.signer.sign(&Claims {
            sub: user_id.to_owned(),
            sid: session_id.to_owned(),
            iat,
            exp: iat + self.config.access_ttl_ms / 1000,
            iss: self.config.issuer.clone(),
        })?;
        Ok(TokenPair {
            access_token,
            expires_in: self.config.access_ttl_ms / 1000,
            refresh_token,
            session_id: session_id.to_owned(),
        })
    }

    /// Exchanges a refresh token for new tokens. Each refresh token works once; presenting
    /// a used one again means it leaked, and the session is revoked.
    pub async fn refresh(&self, token: &str) -> Result<TokenPair, AuthModuleError> {
        let hash = digest(token);
        let now_ms = self.clock.now_millis();
        let row = self
            .repo
            .find_refresh(&hash, now_ms)
            .await?
            .ok_or(AuthModuleError::InvalidRefreshToken)?;
        if !row.live {
            return Err(AuthModuleError::InvalidRefreshToken);
        }
        if row.used || !self.repo.use_refresh(&hash, now_ms).await? {
            tracing::warn!(session_id = %row.session_id, "refresh token reused; revoking the session");
            self.revoke(&row.user_id, &row.session_id, "refresh_reuse")
                .await?;
            return Err(AuthModuleError::InvalidRefreshToken);
        }
        self.repo.touch_session(&row.session_id, now_ms).await?;
        self.issue(&row.user_id, &row.session_id, now_ms).await
    }

    /// Revokes one of the principal's sessions.
    pub async fn revoke(
        &self,
        user_id: &str,
        session_id: &str,
        reason: &'static str,
    ) -> Result<(), AuthModuleError> {
        let tx = self.repo.begin().await?;
        if self
            .repo
            .revoke_session(&tx, user_id, session_id, self.clock.now_millis())
            .await?
        {
            tx.emit(&SessionRevoked {
                user_id: user_id.to_owned(),
                session_id: session_id.to_owned(),
                reason: reason.to_owned(),
            })
            .await?;
            tx.commit().await?;
            self.repo.forget_sessions(&[session_id.to_owned()]).await;
        }
        Ok(())
    }

    /// Revokes every session of a user but `except`; how many.
    pub async fn revoke_all(
        &self,
        user_id: &str,
        except: Option<&str>,
        reason: &'static str,
    ) -> Result<u64, AuthModuleError> {
        let tx = self.repo.begin().await?;
        let ids = self
            .repo
            .revoke_all(&tx, user_id, except, self.clock.now_millis())
            .await?;
        for session_id in &ids {
            tx.emit(&SessionRevoked {
                user_id: user_id.to_owned(),
                session_id: session_id.clone(),
                reason: reason.to_owned(),
            })
            .await?;
        }
        tx.commit().await?;
        self.repo.forget_sessions(&ids).await;
        Ok(ids.len() as u64)
    }

    /// The principal's live sessions.
    pub async fn sessions(
        &self,
        principal: &Principal,
    ) -> Result<Vec<ListedSession>, AuthModuleError> {
        Ok(self
            .repo
            .live_sessions(&principal.user_id, self.clock.now_millis())
            .await?)
    }

    /// Bus: a bearer token's principal, if the token is valid and its session live.
    pub async fn authenticate(&self, token: &str) -> Result<Principal, AuthError> {
        let claims = self.signer.verify(token).ok_or(AuthError::InvalidToken)?;
        let live = self
            .repo
            .live_session(&claims.sid, self.clock.now_millis())
            .await
            .map_err(|_| AuthError::Temporarily)?
            .filter(|live| live.user_id == claims.sub)
            .ok_or(AuthError::SessionEnded)?;
        Ok(Principal {
            user_id: claims.sub,
            session_id: claims.sid,
            roles: live.roles,
            permissions: live.permissions,
        })
    }

    /// Roles and their permissions.
    pub async fn roles(
        &self,
        principal: &Principal,
    ) -> Result<Vec<(String, String, Vec<String>)>, AuthModuleError> {
        if !principal.can(READ_ROLES) {
            return Err(AuthModuleError::Forbidden(READ_ROLES));
        }
        Ok(self.repo.roles().await?)
    }

    /// A user's roles.
    pub async fn user_roles(
        &self,
        principal: &Principal,
        user_id: &str,
    ) -> Result<Vec<String>, AuthModuleError> {
        if !principal.is(user_id) && !principal.can(READ_ROLES) {
            return Err(AuthModuleError::NotFound("no such user"));
        }
        Ok(self.repo.user_roles(user_id).await?)
    }

    /// Grants or revokes a role (super-administrators only); takes effect on the user's
    /// next request. The last super-administrator cannot give the role up.
    pub async fn set_role(
        &self,
        principal: &Principal,
        user_id: &str,
        role: &str,
        granted: bool,
    ) -> Result<(), AuthModuleError> {
        if !principal.can(SUDO) {
            return Err(AuthModuleError::Forbidden(SUDO));
        }
        if !self.repo.role_exists(role).await? {
            return Err(AuthModuleError::NotFound("no such role"));
        }
        let user = self
            .bus
            .request(FindUser {
                id: user_id.to_owned(),
            })
            .await
            .map_err(anyhow::Error::from)?
            .map_err(AuthModuleError::from_account_error)?;
        if user.is_none() {
            return Err(AuthModuleError::NotFound("no such user"));
        }
        if granted {
            self.repo
                .grant(user_id, role, self.clock.now_millis())
                .await?;
        } else if role == SUPER_ADMIN {
            let tx = self.repo.begin().await?;
            self.repo.lock_super_admins(&tx).await?;
            if self.repo.revoke_role_in(&tx, user_id, role).await?
                && self.repo.other_super_admins(&tx, user_id).await? == 0
            {
                return Err(AuthModuleError::LastSuperAdmin);
            }
            tx.commit().await?;
        } else {
            let tx = self.repo.begin().await?;
            self.repo.revoke_role_in(&tx, user_id, role).await?;
            tx.commit().await?;
        }
        let sessions = self
            .repo
            .live_session_ids(user_id, self.clock.now_millis())
            .await?;
        self.repo.forget_sessions(&sessions).await;
        tracing::info!(user_id, role, granted, by = %principal.user_id, "role changed");
        Ok(())
    }

    /// Bus: may `actor` change `user_id`'s account? Only a super-administrator may touch a
    /// super-administrator's (least privilege: `users:manage` must not reach the accounts
    /// that hold every permission).
    pub async fn guard(&self, actor: &Principal, user_id: &str) -> Result<(), AccountError> {
        if actor.is(user_id) || actor.can(SUDO) {
            return Ok(());
        }
        let roles = self.repo.user_roles(user_id).await?;
        if roles.iter().any(|role| role == SUPER_ADMIN) {
            return Err(AccountError::Forbidden(
                "a super-administrator's account can be changed only by a super-administrator"
                    .into(),
            ));
        }
        Ok(())
    }

    /// Bus: the account is being deleted in `request.tx`; ends its sessions, refresh
    /// tokens and grants in that transaction, or refuses (which rolls the deletion back).
    pub async fn close_account(&self, request: CloseAccount) -> Result<(), AccountError> {
        let CloseAccount { actor, user_id, tx } = request;
        self.guard(&actor, &user_id).await?;
        let closed = async {
            self.repo.lock_super_admins(&tx).await?;
            if self.repo.holds_in(&tx, &user_id, SUPER_ADMIN).await?
                && self.repo.other_super_admins(&tx, &user_id).await? == 0
            {
                return Ok(false);
            }
            self.repo
                .close_account(&tx, &user_id, self.clock.now_millis())
                .await?;
            Ok::<_, DbError>(true)
        }
        .await?;
        if closed {
            Ok(())
        } else {
            Err(AccountError::Conflict(
                AuthModuleError::LastSuperAdmin.to_string(),
            ))
        }
    }

    /// The `purge` job's period.
    pub fn purge_every(&self) -> Duration {
        Duration::from_millis(self.config.purge_every_ms)
    }

    /// The `purge` job: sessions that ended (expired or revoked) more than
    /// `purge_after_ms` ago, their refresh tokens, and the marks of accounts closed that
    /// long ago with no session left. Returns the rows removed.
    pub async fn purge(&self) -> anyhow::Result<u64> {
        let ms = i64::try_from(self.config.purge_after_ms).unwrap_or(i64::MAX);
        let before = self.clock.now_millis().saturating_sub(ms);
        Ok(self.repo.purge(before).await?)
    }

    /// Bus subscriber: after a deletion committed, no cached session of the account may
    /// still pass as live.
    pub async fn forget_user_sessions(&self, user_id: &str) {
        if let Err(error) = self.repo.forget_user_sessions(user_id).await {
            tracing::error!(user_id, %error, "cached sessions of a deleted account not forgotten; they expire with their TTL");
        }
    }
}

/// The cache keys one login attempt is counted under. The account is keyed by a digest
/// of its e-mail, so no address sits in the cache in clear.
struct LoginKeys {
    /// (account and address, address), when the client's address is known.
    client: Option<(String, String)>,
    /// Failures of the account from every address.
    account: String,
    /// When the account may next be tried from an unknown address.
    wait: String,
    /// The account was logged into from this address before.
    known: Option<String>,
}

impl LoginKeys {
    fn new(account: &str, address: Option<String>) -> Self {
        let account = digest(account);
        Self {
            client: address.as_ref().map(|address| {
                (
                    format!("login:pair:{account}:{address}"),
                    format!("login:address:{address}"),
                )
            }),
            known: address.map(|address| format!("login:known:{account}:{address}")),
            wait: format!("login:wait:{account}"),
            account: format!("login:account:{account}"),
        }
    }

    async fn known_address(&self, auth: &Auth) -> bool {
        match &self.known {
            Some(key) => auth.repo.cache().get(key).await.is_some(),
            None => false,
        }
    }

    async fn remember_address(&self, auth: &Auth) {
        if let Some(key) = &self.known {
            let ttl = Duration::from_millis(auth.config.session_ttl_ms);
            auth.repo.cache().set(key, b"1".to_vec(), ttl).await;
        }
    }
}
