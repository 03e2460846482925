//! The `{{name}}` module: items, created, read and listed a page at a time.
//!
//! Layers: `api` (HTTP types, parsed into `domain` values) -> `app` (the rules) -> `repo`
//! (SQL and row types). `error` turns every failure into a problem.

mod api;
mod app;
mod domain;
mod error;
mod repo;

use serde::Deserialize;
use trellis_core::{Module, ModuleBuilder, ModuleRegistration};

/// `[modules.{{name}}]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct {{Name}}Config {
    /// The largest page `GET /api/v1/{{name}}/items` answers.
    pub page_max: u32,
}

impl Default for {{Name}}Config {
    fn default() -> Self {
        Self { page_max: 100 }
    }
}

/// The `{{name}}` module.
pub struct {{Name}}Module;

impl Module for {{Name}}Module {
    fn name(&self) -> &'static str {
        "{{name}}"
    }

    fn version(&self) -> &'static str {
        env!("CARGO_PKG_VERSION")
    }

    fn description(&self) -> &'static str {
        "Items: created, read and listed a page at a time."
    }

    fn build(&self, module: &mut ModuleBuilder) {
        module
            .config::<{{Name}}Config>()
            .migrations(repo::MIGRATIONS)
            // One service for the API and whatever else the module declares.
            .service(app::Items::from_context)
            .api(|items| Ok(api::ItemsApi::new(items)));
    }
}

trellis_core::inventory::submit! { ModuleRegistration::of(&{{Name}}Module) }
