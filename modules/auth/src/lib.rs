//! The `auth` module: login and logout, short-lived JWT access tokens checked against a
//! live session, rotating refresh tokens with reuse detection, roles and permissions, and
//! login rate limits.
//!
//! It never imports `user`: credentials are checked with `VerifyCredentials` on the bus,
//! and it answers `Authenticate` (the bearer check every module's API uses) and
//! `RevokeUserSessions`.
//!
//! - `api`: poem-openapi types and mapping; `app`: the rules; `repo`: SQL and cache;
//!   `tokens`: JWT and refresh-token primitives.

mod api;
mod app;
mod error;
mod repo;
mod tokens;

use std::sync::Arc;

use serde::Deserialize;
use trellis_core::{
    Module, ModuleBuilder, ModuleRegistration,
    contracts::{Authenticate, RevokeUserSessions},
};

use crate::app::Auth;

/// The signing secret shipped for development; the server refuses it in other profiles.
pub const DEV_SECRET: &str = "dev-only-secret-change-me-before-deploying-trellis";

/// `[modules.auth]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// HMAC secret for access tokens (HS256), at least 32 bytes.
    pub jwt_secret: String,
    /// The `iss` claim written and required.
    pub issuer: String,
    /// Access token lifetime.
    pub access_ttl_secs: u64,
    /// Session (and refresh token) lifetime.
    pub session_ttl_secs: u64,
    /// How long a live session is remembered in the cache.
    pub session_cache_secs: u64,
    /// Login attempts allowed per account per window.
    pub login_attempts_per_account: i64,
    /// Login attempts allowed per client address per window.
    pub login_attempts_per_address: i64,
    /// The rate-limit window.
    pub login_window_secs: u64,
    /// E-mail of the super-administrator created on first start (empty: none).
    pub bootstrap_admin_email: String,
    /// Its password (set it from the environment: `TRELLIS_MODULES__AUTH__BOOTSTRAP_ADMIN_PASSWORD`).
    pub bootstrap_admin_password: String,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            jwt_secret: DEV_SECRET.into(),
            issuer: "trellis".into(),
            access_ttl_secs: 900,
            session_ttl_secs: 30 * 24 * 3600,
            session_cache_secs: 30,
            login_attempts_per_account: 10,
            login_attempts_per_address: 100,
            login_window_secs: 300,
            bootstrap_admin_email: String::new(),
            bootstrap_admin_password: String::new(),
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
            .api(|ctx| Ok(api::AuthApi::new(Auth::from_context(ctx)?)))
            .handle(|ctx| {
                let auth = Arc::new(Auth::from_context(ctx)?);
                Ok(move |request: Authenticate| {
                    let auth = auth.clone();
                    async move { auth.authenticate(&request.token).await }
                })
            })
            .handle(|ctx| {
                let auth = Auth::from_context(ctx)?;
                Ok(move |request: RevokeUserSessions| {
                    let auth = auth.clone();
                    async move {
                        auth.revoke_all(&request.user_id, "user_deleted")
                            .await
                            .map_err(|e| e.to_string())
                    }
                })
            })
            .on_init(|ctx| async move { Auth::bootstrap_admin(&ctx).await });
    }
}

trellis_core::inventory::submit! { ModuleRegistration::of(&AuthModule) }
