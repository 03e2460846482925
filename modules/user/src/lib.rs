//! The `user` module: accounts (register, read, update, soft delete), UTM attribution
//! details, and the listing administrators use.
//!
//! - `api`: poem-openapi types; parses input into `domain` types and maps `error`s.
//! - `app`: the rules (who may see whom, hashing off the async runtime, events).
//! - `repo`: SQL and nothing else.
//!
//! It answers the identity requests of `trellis_core::contracts` on the bus, so `auth`
//! can check credentials without depending on this crate. It emits `UserRegistered`,
//! `UserUpdated`, `UserDeleted` and `PasswordChanged` in the transaction of each change,
//! and publishes `UserDeleted` on the bus once the deletion committed.

mod api;
mod app;
mod domain;
mod error;
mod password;
mod repo;

use serde::Deserialize;
use trellis_core::{
    Module, ModuleBuilder, ModuleRegistration,
    contracts::{BootstrapAccount, FindUser, VerifyCredentials},
};

use crate::app::Users;

/// `[modules.user]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UserConfig {
    /// Page size of `GET /api/v1/users` when the client gives none.
    pub default_page_size: u32,
    /// Largest page size a client may ask for.
    pub max_page_size: u32,
    /// How long an account is cached in front of the database (seconds).
    pub cache_ms: u64,
    /// Password hashes computed at once (0: one per CPU); each takes 19 MiB.
    pub hash_concurrency: usize,
    /// Password hashes waiting for their turn; past that, 503 with `Retry-After`.
    pub hash_queue: usize,
    /// Registrations per client address per throttle window.
    pub registrations_per_address: i64,
    /// Current-password checks (password and e-mail changes) per client address per
    /// throttle window.
    pub password_checks_per_address: i64,
    /// The throttle window (seconds).
    pub throttle_window_ms: u64,
}

impl Default for UserConfig {
    fn default() -> Self {
        Self {
            default_page_size: 20,
            max_page_size: 100,
            cache_ms: 30_000,
            hash_concurrency: 0,
            hash_queue: 64,
            registrations_per_address: 20,
            password_checks_per_address: 10,
            throttle_window_ms: 15 * 60 * 1000,
        }
    }
}

/// The module.
pub struct UserModule;

impl Module for UserModule {
    fn name(&self) -> &'static str {
        "user"
    }

    fn version(&self) -> &'static str {
        env!("CARGO_PKG_VERSION")
    }

    fn description(&self) -> &'static str {
        "User accounts, profiles and UTM attribution details."
    }

    fn build(&self, module: &mut ModuleBuilder) {
        module
            .config::<UserConfig>()
            .migrations(repo::MIGRATIONS)
            // One service for the API and every handler: one hashing capacity, one cache.
            .service(Users::from_context)
            .api(|users| Ok(api::UserApi::new(users)))
            .handle(|users, request: VerifyCredentials| async move {
                users
                    .verify_credentials(&request.email, request.password)
                    .await
            })
            .handle(
                |users, request: FindUser| async move { users.find_identity(&request.id).await },
            )
            .handle(
                |users, request: BootstrapAccount| async move { users.bootstrap(request).await },
            );
    }
}

trellis_core::inventory::submit! { ModuleRegistration::of(&UserModule) }
