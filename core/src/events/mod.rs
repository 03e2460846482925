//! Events: a module's domain events, recorded with the change that raised them and handled
//! after it committed, at least once.
//!
//! - **Emit.** A module emits an event inside the transaction of its change
//!   ([`Tx::emit`](crate::storage::Tx::emit), or [`ModuleDb::emit`](crate::storage::ModuleDb::emit)
//!   for an event that changes nothing else). That writes one *publication* per handler of
//!   the event into the table `trellis_event_publications`, so the change and its events
//!   commit or roll back together, and a crash after the commit loses no event.
//! - **Handle.** Modules declare handlers with
//!   [`ModuleBuilder::on_event`](crate::ModuleBuilder::on_event). Each instance's relay
//!   ([`Publications`]) claims due publications (`FOR UPDATE SKIP LOCKED` on PostgreSQL,
//!   so several instances share the work), runs their handlers and marks them completed. A
//!   commit that emitted wakes the relay at once; it also looks every `events.poll_ms`.
//! - **Retry.** A failing, panicking or timed-out handler is tried again after an
//!   exponential backoff, up to `events.max_attempts`; then its publication is recorded as
//!   failed, with the last error, until it is resubmitted. A claim is a lease of
//!   `events.lease_ms`: if the instance dies, another one (or the next start) takes the
//!   publication over when the lease runs out.
//! - **At least once.** A handler may see a publication again (a crash between its run and
//!   the record of its completion): [`Published::id`] is the same each time.
//! - Completed publications are removed after `events.retention_ms` by the job
//!   `core.purge_publications`.
//!
//! Handlers can be declared in any build; publications need the database (the feature
//! `storage`): a build without one has no module that emits.

#[cfg(feature = "storage")]
mod publications;
#[cfg(feature = "storage")]
mod relay;

use std::{ops::Deref, sync::Arc};

use futures_util::future::BoxFuture;
use serde::{Serialize, de::DeserializeOwned};

#[cfg(feature = "storage")]
pub(crate) use publications::purge;
#[cfg(feature = "storage")]
pub use publications::{
    MIGRATIONS, PUBLICATIONS_TABLE, Publication, PublicationStatus, Publications, Registry,
    Resubmitted,
};

use crate::metrics::{
    EVENT_HANDLER_DURATION_SECONDS, EVENT_PUBLICATIONS_COMPLETED_TOTAL,
    EVENT_PUBLICATIONS_FAILED_TOTAL, EVENT_PUBLICATIONS_RETRIED_TOTAL,
};

/// A domain event (named in the past tense: `UserRegistered`). It is stored as JSON until
/// its handlers have run, so its serialised form is a contract between versions: add
/// fields with defaults, never rename one.
pub trait Event: Serialize + DeserializeOwned + Send + Sync + 'static {
    /// A stable name (`user.registered`), stored with each publication and used in logs
    /// and metrics labels.
    const NAME: &'static str;
}

/// An event as its handler receives it: the event, and facts about its publication.
#[derive(Debug, Clone)]
pub struct Published<E> {
    id: Arc<str>,
    request_id: Option<Arc<str>>,
    emitted_at_ms: i64,
    attempt: u32,
    event: E,
}

impl<E> Published<E> {
    /// The event's id: the same for each of its handlers and each delivery (a handler that
    /// forwards the event can use it to let consumers drop a duplicate).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The id of the request that emitted it, if a request did.
    pub fn request_id(&self) -> Option<&str> {
        self.request_id.as_deref()
    }

    /// When it was emitted, in milliseconds since the Unix epoch (the system clock).
    pub fn emitted_at_ms(&self) -> i64 {
        self.emitted_at_ms
    }

    /// Which attempt this is (1 for the first).
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The event.
    pub fn event(&self) -> &E {
        &self.event
    }
}

impl<E> Deref for Published<E> {
    type Target = E;
    fn deref(&self) -> &E {
        &self.event
    }
}

/// A stored publication, as the relay hands it to a handler.
#[derive(Debug, Clone)]
#[cfg_attr(not(feature = "storage"), expect(dead_code))]
pub(crate) struct Stored {
    pub(crate) id: String,
    pub(crate) event_id: String,
    pub(crate) event: String,
    pub(crate) listener: String,
    pub(crate) payload: String,
    pub(crate) request_id: Option<String>,
    /// The emitting span's W3C `traceparent` (with traces on).
    pub(crate) traceparent: Option<String>,
    pub(crate) emitted_at_ms: i64,
    /// Attempts made before this one.
    pub(crate) attempts: i64,
}

type Run = Arc<dyn Fn(&Stored) -> BoxFuture<'static, anyhow::Result<()>> + Send + Sync>;

/// One module's handler for one event type, erased to the stored JSON.
#[cfg_attr(not(feature = "storage"), expect(dead_code))]
pub(crate) struct Route {
    pub(crate) event: &'static str,
    pub(crate) module: &'static str,
    pub(crate) run: Run,
    pub(crate) duration: metrics::Histogram,
}

/// The handlers of every event type, in module order.
#[derive(Default)]
pub struct EventHandlerTable {
    routes: Vec<Route>,
}

impl EventHandlerTable {
    /// Adds `module`'s handler for `E`.
    pub fn add<E, H, Fut>(&mut self, module: &'static str, handler: H)
    where
        E: Event,
        H: Fn(Published<E>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let run: Run = Arc::new(move |stored: &Stored| {
            let event = match serde_json::from_str::<E>(&stored.payload) {
                Ok(event) => event,
                Err(error) => {
                    let error = anyhow::anyhow!("the stored `{}` cannot be read: {error}", E::NAME);
                    return Box::pin(std::future::ready(Err(error)));
                }
            };
            Box::pin(handler(Published {
                id: stored.event_id.as_str().into(),
                request_id: stored.request_id.as_deref().map(Into::into),
                emitted_at_ms: stored.emitted_at_ms,
                attempt: u32::try_from(stored.attempts + 1).unwrap_or(u32::MAX),
                event,
            }))
        });
        // Each outcome's counter exists from the start at 0, so that an alert on its
        // increase sees the first failure.
        for outcome in [
            EVENT_PUBLICATIONS_COMPLETED_TOTAL,
            EVENT_PUBLICATIONS_RETRIED_TOTAL,
            EVENT_PUBLICATIONS_FAILED_TOTAL,
        ] {
            metrics::counter!(outcome, "event" => E::NAME, "module" => module).increment(0);
        }
        self.routes.push(Route {
            event: E::NAME,
            module,
            run,
            duration: metrics::histogram!(
                EVENT_HANDLER_DURATION_SECONDS,
                "event" => E::NAME,
                "module" => module
            ),
        });
    }

    #[cfg_attr(not(feature = "storage"), expect(dead_code))]
    pub(crate) fn route(&self, event: &str, module: &str) -> Option<&Route> {
        self.routes
            .iter()
            .find(|r| r.event == event && r.module == module)
    }

    #[cfg_attr(not(feature = "storage"), expect(dead_code))]
    pub(crate) fn routes(&self) -> &[Route] {
        &self.routes
    }
}

#[cfg(test)]
mod tests;
