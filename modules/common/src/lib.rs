//! The `common` module: what every deployment answers whatever else is compiled in.
//!
//! - `GET /healthz`: liveness; touches no dependency.
//! - `GET /readyz`: runs every registered readiness check; 503 problem naming the failing ones.
//!   While the admin listener (`server.admin`) is on, only its requests (marked
//!   [`AdminRequest`](trellis_core::readiness::AdminRequest)) get the names and texts.
//! - `GET /api/v1/info`: build facts (version, commit, branch, build number, build time),
//!   start time and uptime.
//! - `GET /api/v1/modules`: the compiled-in modules.
//!
//! `api` parses and maps to responses; `app` gathers the facts from the context.

mod api;
mod app;

use serde::Deserialize;
use trellis_core::{Module, ModuleBuilder, ModuleRegistration};

/// `[modules.common]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CommonConfig {
    /// How long one readiness check may take before it counts as down.
    pub readiness_timeout_ms: u64,
}

impl Default for CommonConfig {
    fn default() -> Self {
        Self {
            readiness_timeout_ms: 2_000,
        }
    }
}

/// The module.
pub struct CommonModule;

impl Module for CommonModule {
    fn name(&self) -> &'static str {
        "common"
    }

    fn version(&self) -> &'static str {
        env!("CARGO_PKG_VERSION")
    }

    fn description(&self) -> &'static str {
        "Liveness, readiness, build information and the list of compiled-in modules."
    }

    fn build(&self, module: &mut ModuleBuilder) {
        module
            .config::<CommonConfig>()
            .service(|ctx| Ok(app::Common::new(ctx.app().clone(), ctx.config()?)))
            .api(|common| Ok(api::CommonApi::new(common)));
    }
}

trellis_core::inventory::submit! { ModuleRegistration::of(&CommonModule) }
