//! The `events` module: the operators' view of the event publication registry.
//!
//! - `GET /api/v1/events/publications`: publications a page at a time, by status
//!   (`?status=failed` lists those whose handler gave up);
//! - `POST /api/v1/events/publications/{id}/resubmit`: a failed publication runs again;
//! - `POST /api/v1/events/publications/resubmit-failed`: every failed one does.
//!
//! Each needs the `events:manage` permission. The registry itself is core's
//! ([`trellis_core::events`]): every module's domain events are recorded there.
//!
//! Layers: `api` (HTTP types) -> `app` (the permission, paging) -> core's registry.

mod api;
mod app;
mod error;

use serde::Deserialize;
use trellis_core::{Module, ModuleBuilder, ModuleRegistration};

pub use app::MANAGE_EVENTS;

/// `[modules.events]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EventsModuleConfig {
    /// The largest page `GET /api/v1/events/publications` answers.
    pub page_max: u32,
}

impl Default for EventsModuleConfig {
    fn default() -> Self {
        Self { page_max: 100 }
    }
}

/// The `events` module.
pub struct EventsModule;

impl Module for EventsModule {
    fn name(&self) -> &'static str {
        "events"
    }

    fn version(&self) -> &'static str {
        env!("CARGO_PKG_VERSION")
    }

    fn description(&self) -> &'static str {
        "Event publications: list them, and resubmit those whose handler gave up."
    }

    fn build(&self, module: &mut ModuleBuilder) {
        module
            .config::<EventsModuleConfig>()
            .service(app::Publications::from_context)
            .api(|publications| Ok(api::EventsApi::new(publications)));
    }
}

trellis_core::inventory::submit! { ModuleRegistration::of(&EventsModule) }
