//! Events: handled asynchronously, after the request that raised them was answered.
//!
//! Modules declare handlers with [`ModuleBuilder::on_event`](crate::ModuleBuilder::on_event);
//! several handlers per event type are allowed. The [`EventDispatcher`] queues what modules
//! emit and calls the handlers from a pool of workers.

mod dispatcher;

use std::{
    any::{Any, TypeId},
    collections::HashMap,
    sync::Arc,
};

pub use dispatcher::{DispatchError, EventDispatcher, QUEUE_UNAVAILABLE};

use futures_util::future::BoxFuture;

use crate::metrics::{EVENT_HANDLER_DURATION_SECONDS, EVENTS_ACCEPTED_TOTAL, EVENTS_HANDLED_TOTAL};

/// An event handled asynchronously (named in the past tense: `UserRegistered`).
pub trait Event: Send + Sync + 'static {
    /// A stable name, used in logs and metrics labels.
    const NAME: &'static str;

    /// The event's own id, when it has one; logged with a failure.
    fn id(&self) -> Option<&str> {
        None
    }

    /// The memory the event holds while queued, estimated cheaply (no serialisation):
    /// counted against `events.queue_max_bytes`. By default its inline size; an event
    /// owning strings or maps adds their lengths.
    fn size_bytes(&self) -> usize
    where
        Self: Sized,
    {
        size_of::<Self>()
    }
}

/// A handler, erased to its event type.
pub type ErasedEventHandler<E> =
    Arc<dyn Fn(Arc<E>) -> BoxFuture<'static, anyhow::Result<()>> + Send + Sync>;

/// One module's handler for `E`.
pub struct EventHandlerEntry<E> {
    /// The module that registered it.
    pub module: &'static str,
    /// The handler.
    pub handler: ErasedEventHandler<E>,
    /// Its `event_handler_duration_seconds` series.
    pub(crate) duration: metrics::Histogram,
}

impl<E> Clone for EventHandlerEntry<E> {
    fn clone(&self) -> Self {
        Self {
            module: self.module,
            handler: self.handler.clone(),
            duration: self.duration.clone(),
        }
    }
}

/// The handlers of one event type, with the type's counters: looked up in the recorder
/// once, not per event.
pub(crate) struct EventHandlers<E> {
    pub(crate) entries: Vec<EventHandlerEntry<E>>,
    pub(crate) accepted: metrics::Counter,
    pub(crate) handled: metrics::Counter,
}

/// Handlers by event type.
#[derive(Default)]
pub struct EventHandlerTable {
    handlers: HashMap<TypeId, Box<dyn Any + Send + Sync>>,
}

impl EventHandlerTable {
    /// Adds `module`'s handler for `E`.
    pub fn add<E, H, Fut>(&mut self, module: &'static str, handler: H)
    where
        E: Event,
        H: Fn(Arc<E>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let handler: ErasedEventHandler<E> = Arc::new(move |event| Box::pin(handler(event)));
        let duration = metrics::histogram!(
            EVENT_HANDLER_DURATION_SECONDS,
            "event" => E::NAME,
            "module" => module
        );
        self.handlers
            .entry(TypeId::of::<E>())
            .or_insert_with(|| {
                Box::new(EventHandlers::<E> {
                    entries: Vec::new(),
                    accepted: metrics::counter!(EVENTS_ACCEPTED_TOTAL, "event" => E::NAME),
                    handled: metrics::counter!(EVENTS_HANDLED_TOTAL, "event" => E::NAME),
                })
            })
            .downcast_mut::<EventHandlers<E>>()
            .expect("handler lists are keyed by their event type")
            .entries
            .push(EventHandlerEntry {
                module,
                handler,
                duration,
            });
    }

    /// The handlers for `E`, in module order.
    pub fn get<E: Event>(&self) -> &[EventHandlerEntry<E>] {
        self.handlers_of::<E>()
            .map(|h| h.entries.as_slice())
            .unwrap_or_default()
    }

    pub(crate) fn handlers_of<E: Event>(&self) -> Option<&EventHandlers<E>> {
        self.handlers
            .get(&TypeId::of::<E>())
            .and_then(|h| h.downcast_ref::<EventHandlers<E>>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Pinged;
    impl Event for Pinged {
        const NAME: &'static str = "pinged";
    }

    #[tokio::test]
    async fn several_handlers_per_event_type_in_order() {
        let mut table = EventHandlerTable::default();
        table.add("a", |_: Arc<Pinged>| async { Ok(()) });
        table.add("b", |_: Arc<Pinged>| async { anyhow::bail!("b fails") });
        let entries = table.get::<Pinged>();
        assert_eq!(
            entries.iter().map(|e| e.module).collect::<Vec<_>>(),
            ["a", "b"]
        );
        assert!((entries[0].handler)(Arc::new(Pinged)).await.is_ok());
        assert!((entries[1].handler)(Arc::new(Pinged)).await.is_err());
    }
}
