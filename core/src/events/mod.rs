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

pub use dispatcher::{DispatchError, EventDispatcher};

use futures_util::future::BoxFuture;

/// An event handled asynchronously (named in the past tense: `UserRegistered`).
pub trait Event: Send + Sync + 'static {
    /// A stable name, used in logs and metrics labels.
    const NAME: &'static str;

    /// The event's own id, when it has one; logged with a failure.
    fn id(&self) -> Option<&str> {
        None
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
}

impl<E> Clone for EventHandlerEntry<E> {
    fn clone(&self) -> Self {
        Self {
            module: self.module,
            handler: self.handler.clone(),
        }
    }
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
        self.handlers
            .entry(TypeId::of::<E>())
            .or_insert_with(|| Box::new(Vec::<EventHandlerEntry<E>>::new()))
            .downcast_mut::<Vec<EventHandlerEntry<E>>>()
            .expect("handler lists are keyed by their event type")
            .push(EventHandlerEntry { module, handler });
    }

    /// The handlers for `E`, in module order.
    pub fn get<E: Event>(&self) -> &[EventHandlerEntry<E>] {
        self.handlers
            .get(&TypeId::of::<E>())
            .and_then(|h| h.downcast_ref::<Vec<EventHandlerEntry<E>>>())
            .map(Vec::as_slice)
            .unwrap_or_default()
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
