//! The `auth` module: login and logout, short-lived JWT access tokens checked against a
//! live session, rotating refresh tokens with reuse detection, roles and permissions, and
//! login rate limits. Its `purge` job removes ended sessions after
//! `purge_after_ms`.
//!
//! It never imports `user`: credentials are checked with `VerifyCredentials` on the bus,
//! and it answers `Authenticate` (the bearer check every module's API uses) and
//! `RevokeUserSessions`.
//!
//! - `api`: poem-openapi types and mapping; `app`: the rules; `repo`: SQL and cache;
//!   `tokens`: JWT and refresh-token primitives.

mod api;
mod app;
mod domain;
mod error;
mod repo;
mod secrets;
mod tokens;

use std::sync::Arc;

use secrecy::SecretString;
use serde::Deserialize;
use trellis_core::{
    Module, ModuleBuilder, ModuleRegistration,
    contracts::{Authenticate, CloseAccount, GuardAccount, RevokeUserSessions, UserDeleted},
    jobs::Job,
};

use crate::{app::Auth, error::AuthModuleError};

/// `[modules.auth]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// HMAC secret that signs access tokens (HS256): at least 32 random bytes. Empty: a
    /// key is generated on first start and kept in the database for every instance.
    pub jwt_secret: SecretString,
    /// Earlier secrets, still accepted for tokens they signed (key rotation).
    pub jwt_previous_secrets: Vec<SecretString>,
    /// The `iss` claim written and required.
    pub issuer: String,
    /// Access token lifetime (tokens count whole seconds).
    pub access_ttl_ms: u64,
    /// Session (and refresh token) lifetime.
    pub session_ttl_ms: u64,
    /// How long a live session is remembered in the cache.
    pub session_cache_ms: u64,
    /// Failed logins allowed per (account, client address) per window.
    pub login_failures_per_pair: i64,
    /// Failed logins allowed per client address, over all accounts, per window.
    pub login_failures_per_address: i64,
    /// Failed logins per account, over all addresses, after which each further attempt
    /// from an address that never logged into the account waits a doubling delay.
    pub login_failures_per_account: i64,
    /// The longest such delay.
    pub login_delay_max_ms: u64,
    /// The window the failures are counted in.
    pub login_window_ms: u64,
    /// E-mail of the super-administrator created on first start (empty: none).
    pub bootstrap_admin_email: String,
    /// Its password (set it from the environment: `TRELLIS_MODULES__AUTH__BOOTSTRAP_ADMIN_PASSWORD`).
    pub bootstrap_admin_password: SecretString,
    /// How often the `auth.purge` job removes ended sessions (over all instances).
    pub purge_every_ms: u64,
    /// How long an ended (expired or revoked) session, with its refresh tokens, is kept
    /// before the purge removes it.
    pub purge_after_ms: u64,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            jwt_secret: SecretString::default(),
            jwt_previous_secrets: Vec::new(),
            issuer: "trellis".into(),
            access_ttl_ms: 15 * 60 * 1000,
            session_ttl_ms: 30 * 24 * 3600 * 1000,
            session_cache_ms: 30_000,
            login_failures_per_pair: 5,
            login_failures_per_address: 50,
            login_failures_per_account: 20,
            login_delay_max_ms: 60_000,
            login_window_ms: 15 * 60 * 1000,
            bootstrap_admin_email: String::new(),
            bootstrap_admin_password: SecretString::default(),
            purge_every_ms: 3600 * 1000,
            purge_after_ms: 24 * 3600 * 1000,
        }
    }
}

/// The module.
pub struct AuthModule;

impl Module for AuthModule {
    fn name(&self) -> &'static str {
        "auth"
    }

    fn version(&self) -> &'static str {
        env!("CARGO_PKG_VERSION")
    }

    fn description(&self) -> &'static str {
        "Login, token refresh, sessions, roles and permissions."
    }

    fn requires(&self) -> &'static [&'static str] {
        &["user"]
    }

    fn build(&self, module: &mut ModuleBuilder) {
        module
            .config::<AuthConfig>()
            .migrations(repo::MIGRATIONS)
            // One service for the API, the handlers, the job and the init hook: one signer
            // with one key ring and one cache of verified tokens. Shared by reference: the
            // bearer check runs on every authenticated request, so it clones a pointer.
            .service(|ctx| Auth::from_context(ctx).map(Arc::new))
            .api(|auth| Ok(api::AuthApi::new(auth)))
            .handle(|auth, request: Authenticate| async move {
                auth.authenticate(&request.token).await
            })
            .handle(|auth, request: RevokeUserSessions| async move {
                auth.revoke_all(&request.user_id, request.except.as_deref(), request.reason)
                    .await
                    .map_err(AuthModuleError::into_account_error)
            })
            .handle(|auth, request: GuardAccount| async move {
                auth.guard(&request.actor, &request.user_id).await
            })
            .handle(|auth, request: CloseAccount| async move { auth.close_account(request).await })
            // Before the deletion is answered: the account's cached sessions are gone.
            .subscribe(|auth, event: UserDeleted| async move {
                auth.forget_user_sessions(&event.user_id).await
            })
            .job("purge", |auth| {
                Ok(Job::every(auth.purge_every(), move || {
                    let auth = auth.clone();
                    async move { auth.purge().await }
                }))
            })
            .on_init(|auth, ctx| async move {
                auth.load_keys(ctx.profile()).await?;
                auth.bootstrap_admin(ctx.bus()).await
            });
    }
}

trellis_core::inventory::submit! { ModuleRegistration::of(&AuthModule) }
