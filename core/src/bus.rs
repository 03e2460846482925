//! The in-process bus: how modules talk without importing each other.
//!
//! - **Request/response** ([`Request`]): exactly one handler per message type, registered by
//!   one module; asking with no handler registered is [`BusError::NoHandler`], naming the type.
//! - **Publish/subscribe** ([`Message`]): any number of subscribers, each called in turn.
//!
//! Message types that several modules share live in [`crate::contracts`]. Handlers are
//! registered through [`crate::ModuleBuilder`]; the server freezes the tables before serving,
//! after which lookups take no lock.

use std::{
    any::{Any, TypeId, type_name},
    collections::HashMap,
    sync::{Arc, OnceLock},
};

use futures_util::future::BoxFuture;

/// A request/response message: exactly one module handles it.
pub trait Request: Send + 'static {
    /// What the handler answers.
    type Response: Send + 'static;
}

/// A published message (a domain event, in the past tense): any number of subscribers.
pub trait Message: Clone + Send + Sync + 'static {}

/// Why a bus call could not be delivered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BusError {
    /// No compiled-in module handles this request type.
    #[error("no module handles `{message}` (is the module that answers it compiled in?)")]
    NoHandler {
        /// The request's type name.
        message: &'static str,
    },
    /// The bus was used before the server finished assembling the modules.
    #[error("the bus is not started yet (called `{message}` during module build)")]
    NotStarted {
        /// The request's type name.
        message: &'static str,
    },
}

/// Why the bus tables could not be assembled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BusSetupError {
    /// Two modules both claim to answer one request type.
    #[error(
        "modules `{first}` and `{second}` both handle `{message}`: a request type has exactly one handler"
    )]
    DuplicateHandler {
        /// The request type.
        message: &'static str,
        /// The module that registered first.
        first: &'static str,
        /// The module that tried to register again.
        second: &'static str,
    },
}

type ErasedHandler<R> =
    Arc<dyn Fn(R) -> BoxFuture<'static, <R as Request>::Response> + Send + Sync>;
type ErasedSubscriber<M> = Arc<dyn Fn(M) -> BoxFuture<'static, ()> + Send + Sync>;

struct HandlerEntry {
    module: &'static str,
    handler: Box<dyn Any + Send + Sync>,
}

/// Collects handlers and subscribers while the modules are built.
#[derive(Default)]
pub struct BusBuilder {
    handlers: HashMap<TypeId, HandlerEntry>,
    subscribers: HashMap<TypeId, Box<dyn Any + Send + Sync>>,
}

impl BusBuilder {
    /// Registers `module`'s handler for `R`.
    pub fn handle<R, F, Fut>(
        &mut self,
        module: &'static str,
        handler: F,
    ) -> Result<(), BusSetupError>
    where
        R: Request,
        F: Fn(R) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = R::Response> + Send + 'static,
    {
        let key = TypeId::of::<R>();
        if let Some(existing) = self.handlers.get(&key) {
            return Err(BusSetupError::DuplicateHandler {
                message: type_name::<R>(),
                first: existing.module,
                second: module,
            });
        }
        let erased: ErasedHandler<R> = Arc::new(move |req| Box::pin(handler(req)));
        self.handlers.insert(
            key,
            HandlerEntry {
                module,
                handler: Box::new(erased),
            },
        );
        Ok(())
    }

    /// Adds a subscriber for `M`.
    pub fn subscribe<M, F, Fut>(&mut self, subscriber: F)
    where
        M: Message,
        F: Fn(M) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let erased: ErasedSubscriber<M> = Arc::new(move |msg| Box::pin(subscriber(msg)));
        self.subscribers
            .entry(TypeId::of::<M>())
            .or_insert_with(|| Box::new(Vec::<ErasedSubscriber<M>>::new()))
            .downcast_mut::<Vec<ErasedSubscriber<M>>>()
            .expect("subscriber lists are keyed by their message type")
            .push(erased);
    }
}

struct Tables {
    handlers: HashMap<TypeId, HandlerEntry>,
    subscribers: HashMap<TypeId, Box<dyn Any + Send + Sync>>,
}

/// The bus. Cheap to clone; shared through the context.
#[derive(Clone, Default)]
pub struct Bus {
    tables: Arc<OnceLock<Tables>>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let started = self.tables.get().is_some();
        f.debug_struct("Bus").field("started", &started).finish()
    }
}

impl Bus {
    /// An empty bus, to be started with [`Bus::start`] once the modules are built.
    pub fn new() -> Self {
        Self::default()
    }

    /// Freezes the collected handlers into this bus. Later calls are ignored (returns false).
    pub fn start(&self, builder: BusBuilder) -> bool {
        self.tables
            .set(Tables {
                handlers: builder.handlers,
                subscribers: builder.subscribers,
            })
            .is_ok()
    }

    /// Asks the one module that handles `R`.
    pub async fn request<R: Request>(&self, request: R) -> Result<R::Response, BusError> {
        let tables = self.tables.get().ok_or(BusError::NotStarted {
            message: type_name::<R>(),
        })?;
        let handler = tables
            .handlers
            .get(&TypeId::of::<R>())
            .and_then(|entry| entry.handler.downcast_ref::<ErasedHandler<R>>())
            .ok_or(BusError::NoHandler {
                message: type_name::<R>(),
            })?
            .clone();
        Ok(handler(request).await)
    }

    /// Whether some module handles `R` (for features that degrade without it).
    pub fn handles<R: Request>(&self) -> bool {
        self.tables
            .get()
            .is_some_and(|t| t.handlers.contains_key(&TypeId::of::<R>()))
    }

    /// Delivers `message` to every subscriber in registration order; returns how many.
    pub async fn publish<M: Message>(&self, message: M) -> usize {
        let Some(subscribers) = self
            .tables
            .get()
            .and_then(|t| t.subscribers.get(&TypeId::of::<M>()))
            .and_then(|s| s.downcast_ref::<Vec<ErasedSubscriber<M>>>())
        else {
            return 0;
        };
        for subscriber in subscribers {
            subscriber(message.clone()).await;
        }
        subscribers.len()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    struct Double(u32);
    impl Request for Double {
        type Response = u32;
    }

    #[derive(Clone)]
    struct Happened(usize);
    impl Message for Happened {}

    #[tokio::test]
    async fn request_reaches_its_single_handler() {
        let mut builder = BusBuilder::default();
        builder
            .handle("maths", |Double(n)| async move { n * 2 })
            .expect("first handler registers");
        let bus = Bus::new();
        assert!(bus.start(builder));
        assert_eq!(bus.request(Double(21)).await, Ok(42));
        assert!(bus.handles::<Double>());
    }

    #[tokio::test]
    async fn request_without_handler_names_the_type() {
        let bus = Bus::new();
        bus.start(BusBuilder::default());
        let err = bus.request(Double(1)).await.expect_err("nobody handles it");
        assert!(matches!(err, BusError::NoHandler { .. }));
        assert!(err.to_string().contains("Double"), "{err}");
    }

    #[tokio::test]
    async fn request_before_start_is_an_error() {
        let err = Bus::new()
            .request(Double(1))
            .await
            .expect_err("not started");
        assert!(matches!(err, BusError::NotStarted { .. }));
    }

    #[test]
    fn second_handler_for_a_type_names_both_modules() {
        let mut builder = BusBuilder::default();
        builder
            .handle("first", |Double(n)| async move { n })
            .expect("first registers");
        let err = builder
            .handle("second", |Double(n)| async move { n })
            .expect_err("duplicate");
        let text = err.to_string();
        assert!(text.contains("first") && text.contains("second"), "{text}");
    }

    #[tokio::test]
    async fn publish_reaches_every_subscriber() {
        let seen = Arc::new(AtomicUsize::new(0));
        let mut builder = BusBuilder::default();
        for _ in 0..3 {
            let seen = seen.clone();
            builder.subscribe(move |Happened(n): Happened| {
                let seen = seen.clone();
                async move {
                    seen.fetch_add(n, Ordering::SeqCst);
                }
            });
        }
        let bus = Bus::new();
        bus.start(builder);
        assert_eq!(bus.publish(Happened(2)).await, 3);
        assert_eq!(seen.load(Ordering::SeqCst), 6);
    }

    #[tokio::test]
    async fn publish_without_subscribers_is_fine() {
        let bus = Bus::new();
        bus.start(BusBuilder::default());
        assert_eq!(bus.publish(Happened(1)).await, 0);
    }
}
