//! The `bi` module: business-intelligence events.
//!
//! - `POST /api/v1/bi/events` takes one event or a batch from clients, checks every event
//!   (a batch is accepted whole or not at all), takes one token per event from the
//!   sender's bucket (`limit`: per address, or per user when authenticated; 429 when
//!   empty), enriches it (id, received-at, request id, the caller when authenticated) and
//!   stores it in the message queue (on disk, unless `mq.durability` is `memory`): 202
//!   with the ids.
//! - Domain events (`UserRegistered`, `UserLoggedIn`, …) become BI events too, at least
//!   once each, with the domain event's id.
//! - One JSON message per event.
//!
//! Layers: `api` (HTTP types) -> `app` (rules, enrichment) -> `repo` (the message queue).

mod api;
mod app;
mod domain;
mod error;
mod limit;
mod repo;

use serde::Deserialize;
use trellis_core::{
    Module, ModuleBuilder, ModuleRegistration, ServiceBuilder,
    contracts::{
        LoginFailed, PasswordChanged, SessionRevoked, UserDeleted, UserLoggedIn, UserRegistered,
        UserUpdated,
    },
    events::Published,
};

use crate::app::Ingest;

/// `[modules.bi]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BiConfig {
    /// Most events in one request (the document's bound is 500).
    pub max_batch: usize,
    /// Largest `properties` object of one event, in bytes of compact JSON.
    pub max_properties_bytes: usize,
    /// Whether domain events (registrations, logins, …) become BI events.
    pub internal_events: bool,
    // Counted in events, not requests: a batch of 500 takes 500 tokens.
    /// Events per second an anonymous client address may send, on average.
    pub rate_per_address: u32,
    /// Events an anonymous client address may send at once (at least `max_batch`).
    pub burst_per_address: u32,
    /// Events per second an authenticated user may send, on average.
    pub rate_per_user: u32,
    /// Events an authenticated user may send at once (at least `max_batch`).
    pub burst_per_user: u32,
}

impl Default for BiConfig {
    fn default() -> Self {
        Self {
            max_batch: api::MAX_BATCH,
            max_properties_bytes: 16 * 1024,
            internal_events: true,
            rate_per_address: 20,
            burst_per_address: 1_000,
            rate_per_user: 50,
            burst_per_user: 1_000,
        }
    }
}

/// The module.
pub struct BiModule;

impl Module for BiModule {
    fn name(&self) -> &'static str {
        "bi"
    }

    fn version(&self) -> &'static str {
        env!("CARGO_PKG_VERSION")
    }

    fn description(&self) -> &'static str {
        "Business-intelligence events: ingestion, enrichment, forwarding to the message queue."
    }

    fn build(&self, module: &mut ModuleBuilder) {
        module.config::<BiConfig>();
        let mut ingest = module.service(Ingest::from_context);
        ingest.api(|ingest| Ok(api::BiApi::new(ingest)));
        subscribe::<UserRegistered>(&mut ingest);
        subscribe::<UserUpdated>(&mut ingest);
        subscribe::<UserDeleted>(&mut ingest);
        subscribe::<PasswordChanged>(&mut ingest);
        subscribe::<UserLoggedIn>(&mut ingest);
        subscribe::<LoginFailed>(&mut ingest);
        subscribe::<SessionRevoked>(&mut ingest);
    }
}

/// Turns the domain event `M` into a BI event (unless `internal_events` is off), after
/// the change that emitted it committed, at least once.
fn subscribe<M: domain::Internal>(ingest: &mut ServiceBuilder<'_, Ingest>) {
    ingest.on_event(
        |ingest, event: Published<M>| async move { ingest.record_internal(&event).await },
    );
}

trellis_core::inventory::submit! { ModuleRegistration::of(&BiModule) }
