//! The in-process bus: how modules talk without importing each other.
//!
//! - **Request/response** ([`Request`]): exactly one handler per message type, registered by
//!   one module; asking with no handler registered is [`BusError::NoHandler`], naming the type.
//! - **Publish/subscribe** ([`Message`]): any number of subscribers, each in its own task,
//!   so that one that panics harms no other and not the publisher. A subscriber says when
//!   it runs:
//!   - [`Delivery::Inline`]: before `publish` returns, for what the publisher's answer
//!     depends on (a deleted account's sessions are gone before the deletion is answered).
//!     Inline subscribers run concurrently; the publisher waits for each at most
//!     `bus.subscriber_timeout_ms` (the subscriber itself runs on).
//!   - [`Delivery::Detached`]: off the publisher's path, for what it need not wait for
//!     (recording a BI event). At most `bus.detached_max_in_flight` run at once: beyond
//!     that a publisher waits for a slot, so a slow subscriber slows publishers rather than
//!     piling up work without bound. [`Bus::drain`] waits for them at shutdown.
//!
//!   Each run is measured (`bus_subscriber_duration_seconds`, by message, module and
//!   outcome) and keeps the publisher's tracing span (its request id); with traces on,
//!   it runs in a span of its own (`bus deliver <message>`), as a request does
//!   (`bus request <message>`).
//!
//! Message types that several modules share live in [`crate::contracts`]. Handlers are
//! registered through [`crate::ModuleBuilder`]; the server freezes the tables before serving,
//! after which lookups take no lock.

use std::{
    any::{Any, TypeId, type_name},
    collections::HashMap,
    panic::AssertUnwindSafe,
    sync::{Arc, OnceLock},
    time::{Duration, Instant},
};

use futures_util::{FutureExt as _, future::BoxFuture};
use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;
use tracing::Instrument as _;

use crate::{
    config::BusConfig,
    metrics::{
        BUS_PUBLISHES_TOTAL, BUS_REQUEST_DURATION_SECONDS, BUS_REQUESTS_TOTAL,
        BUS_SUBSCRIBER_DURATION_SECONDS, BUS_SUBSCRIBER_TIMEOUTS_TOTAL,
    },
    telemetry::InTrace as _,
};

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

/// When a subscriber runs, relative to its publisher (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Before `publish` returns (waited for up to `bus.subscriber_timeout_ms`).
    Inline,
    /// Off the publisher's path.
    Detached,
}

impl Delivery {
    /// `inline` or `detached`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Inline => "inline",
            Self::Detached => "detached",
        }
    }
}

struct Subscriber<M> {
    module: &'static str,
    delivery: Delivery,
    run: ErasedSubscriber<M>,
}

struct HandlerEntry {
    module: &'static str,
    handler: Box<dyn Any + Send + Sync>,
    /// `bus_requests_total{outcome="ok"}` for the message, registered once.
    answered: metrics::Counter,
    /// `bus_request_duration_seconds` for the message and its module.
    duration: metrics::Histogram,
}

/// Collects handlers and subscribers while the modules are built.
#[derive(Default)]
pub struct BusBuilder {
    handlers: HashMap<TypeId, HandlerEntry>,
    subscribers: HashMap<TypeId, Box<dyn Any + Send + Sync>>,
}

impl BusBuilder {
    /// Registers `module`'s subscriber to `M`, run as `delivery` says.
    pub fn subscribe<M, F, Fut>(&mut self, module: &'static str, delivery: Delivery, subscriber: F)
    where
        M: Message,
        F: Fn(M) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let run: ErasedSubscriber<M> = Arc::new(move |msg| Box::pin(subscriber(msg)));
        // At 0 from the start, so that an alert on their increase sees the first one.
        let message = short_name::<M>();
        metrics::counter!(BUS_PUBLISHES_TOTAL, "message" => message, "outcome" => "delivered")
            .increment(0);
        if delivery == Delivery::Inline {
            metrics::counter!(BUS_SUBSCRIBER_TIMEOUTS_TOTAL, "message" => message, "module" => module)
                .increment(0);
        }
        self.subscribers
            .entry(TypeId::of::<M>())
            .or_insert_with(|| Box::new(Vec::<Subscriber<M>>::new()))
            .downcast_mut::<Vec<Subscriber<M>>>()
            .expect("subscriber lists are keyed by their message type")
            .push(Subscriber {
                module,
                delivery,
                run,
            });
    }

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
        let message = short_name::<R>();
        self.handlers.insert(
            key,
            HandlerEntry {
                module,
                handler: Box::new(erased),
                answered: metrics::counter!(BUS_REQUESTS_TOTAL, "message" => message, "outcome" => "ok"),
                duration: metrics::histogram!(
                    BUS_REQUEST_DURATION_SECONDS,
                    "message" => message,
                    "module" => module
                ),
            },
        );
        Ok(())
    }
}

struct Tables {
    handlers: HashMap<TypeId, HandlerEntry>,
    subscribers: HashMap<TypeId, Box<dyn Any + Send + Sync>>,
}

/// The bus. Cheap to clone; shared through the context.
#[derive(Clone)]
pub struct Bus {
    tables: Arc<OnceLock<Tables>>,
    subscribers: Arc<Subscribers>,
}

/// What runs the subscribers.
struct Subscribers {
    timeout: Duration,
    detached: Arc<Semaphore>,
    tracker: TaskTracker,
}

impl Default for Bus {
    fn default() -> Self {
        Self::new(&BusConfig::default())
    }
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let started = self.tables.get().is_some();
        f.debug_struct("Bus").field("started", &started).finish()
    }
}

impl Bus {
    /// An empty bus, to be started with [`Bus::start`] once the modules are built.
    pub fn new(config: &BusConfig) -> Self {
        Self {
            tables: Arc::default(),
            subscribers: Arc::new(Subscribers {
                timeout: Duration::from_millis(config.subscriber_timeout_ms),
                detached: Arc::new(Semaphore::new(config.detached_max_in_flight)),
                tracker: TaskTracker::new(),
            }),
        }
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
        let unanswered = |outcome: &'static str| {
            metrics::counter!(BUS_REQUESTS_TOTAL, "message" => short_name::<R>(), "outcome" => outcome)
                .increment(1);
        };
        let Some(tables) = self.tables.get() else {
            unanswered("not_started");
            return Err(BusError::NotStarted {
                message: type_name::<R>(),
            });
        };
        let Some((entry, handler)) = tables.handlers.get(&TypeId::of::<R>()).and_then(|entry| {
            let handler = entry.handler.downcast_ref::<ErasedHandler<R>>()?;
            Some((entry, handler))
        }) else {
            unanswered("no_handler");
            return Err(BusError::NoHandler {
                message: type_name::<R>(),
            });
        };
        // The name is looked up inside the macro: only traced work pays for it.
        let span = crate::trace_span!(
            "bus.request",
            otel.name = format!("bus request {}", short_name::<R>()),
            bus.message = short_name::<R>(),
            bus.module = entry.module,
        );
        let started = Instant::now();
        let response = handler(request).in_trace(span).await;
        entry.duration.record(started.elapsed());
        entry.answered.increment(1);
        Ok(response)
    }

    /// Whether some module handles `R` (for features that degrade without it).
    pub fn handles<R: Request>(&self) -> bool {
        self.tables
            .get()
            .is_some_and(|t| t.handlers.contains_key(&TypeId::of::<R>()))
    }

    /// Delivers `message` to every subscriber: starts the detached ones, and returns once
    /// every inline one has finished or timed out. Answers how many subscribers there are.
    pub async fn publish<M: Message>(&self, message: M) -> usize {
        let Some(subscribers) = self
            .tables
            .get()
            .and_then(|t| t.subscribers.get(&TypeId::of::<M>()))
            .and_then(|s| s.downcast_ref::<Vec<Subscriber<M>>>())
        else {
            metrics::counter!(BUS_PUBLISHES_TOTAL, "message" => short_name::<M>(), "outcome" => "no_subscribers")
                .increment(1);
            return 0;
        };
        let name = short_name::<M>();
        metrics::counter!(BUS_PUBLISHES_TOTAL, "message" => name, "outcome" => "delivered")
            .increment(1);
        let runtime = &self.subscribers;
        let mut inline = Vec::new();
        for subscriber in subscribers {
            let span = crate::trace_span!(
                "bus.deliver",
                otel.name = format!("bus deliver {name}"),
                bus.message = name,
                bus.module = subscriber.module,
                bus.delivery = subscriber.delivery.as_str(),
            );
            // Without traces, the publisher's span (its request id).
            let span = if span.is_none() {
                tracing::Span::current()
            } else {
                span
            };
            let run = measured(name, subscriber.module, (subscriber.run)(message.clone()))
                .instrument(span);
            match subscriber.delivery {
                // Tracked too: one the publisher stopped waiting for still finishes at
                // shutdown.
                Delivery::Inline => inline.push((subscriber.module, runtime.tracker.spawn(run))),
                Delivery::Detached => {
                    // Waits for a slot when `detached_max_in_flight` are running. The
                    // semaphore is never closed.
                    let Ok(slot) = runtime.detached.clone().acquire_owned().await else {
                        continue;
                    };
                    runtime.tracker.spawn(async move {
                        run.await;
                        drop(slot);
                    });
                }
            }
        }
        let deadline = tokio::time::Instant::now() + runtime.timeout;
        for (module, run) in inline {
            if tokio::time::timeout_at(deadline, run).await.is_err() {
                metrics::counter!(BUS_SUBSCRIBER_TIMEOUTS_TOTAL, "message" => name, "module" => module)
                    .increment(1);
                tracing::warn!(
                    message = name,
                    module,
                    timeout_ms = runtime.timeout.as_millis() as u64,
                    "a bus subscriber is still running; the publisher goes on without it"
                );
            }
        }
        subscribers.len()
    }

    /// Waits until the subscribers still running (detached ones, and inline ones whose
    /// publisher stopped waiting), and those they start, have finished, or until
    /// `deadline`. Answers how many were still running then.
    pub async fn drain(&self, deadline: tokio::time::Instant) -> usize {
        let tracker = &self.subscribers.tracker;
        tracker.close();
        if tokio::time::timeout_at(deadline, tracker.wait())
            .await
            .is_err()
        {
            tracing::error!(
                running = tracker.len(),
                "detached bus subscribers were still running at the end of the shutdown budget"
            );
        }
        tracker.len()
    }
}

/// The message type's own name (`UserRegistered`), for logs and metric labels.
fn short_name<M>() -> &'static str {
    let full = type_name::<M>();
    full.rsplit("::").next().unwrap_or(full)
}

/// Runs one subscriber, catching a panic, and records its duration and outcome.
async fn measured(message: &'static str, module: &'static str, run: BoxFuture<'static, ()>) {
    let started = Instant::now();
    let outcome = match AssertUnwindSafe(run).catch_unwind().await {
        Ok(()) => "ok",
        Err(_) => {
            tracing::error!(message, module, "a bus subscriber panicked");
            "panicked"
        }
    };
    metrics::histogram!(
        BUS_SUBSCRIBER_DURATION_SECONDS,
        "message" => message,
        "module" => module,
        "outcome" => outcome
    )
    .record(started.elapsed());
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
        let bus = Bus::default();
        assert!(bus.start(builder));
        assert_eq!(bus.request(Double(21)).await, Ok(42));
        assert!(bus.handles::<Double>());
    }

    #[tokio::test]
    async fn request_without_handler_names_the_type() {
        let bus = Bus::default();
        bus.start(BusBuilder::default());
        let err = bus.request(Double(1)).await.expect_err("nobody handles it");
        assert!(matches!(err, BusError::NoHandler { .. }));
        assert!(err.to_string().contains("Double"), "{err}");
    }

    #[tokio::test]
    async fn request_before_start_is_an_error() {
        let err = Bus::default()
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
            builder.subscribe("test", Delivery::Inline, move |Happened(n): Happened| {
                let seen = seen.clone();
                async move {
                    seen.fetch_add(n, Ordering::SeqCst);
                }
            });
        }
        let bus = Bus::default();
        bus.start(builder);
        assert_eq!(bus.publish(Happened(2)).await, 3);
        assert_eq!(seen.load(Ordering::SeqCst), 6);
    }

    /// A bus with `subscribers` (module, delivery, what it does) for `Happened`.
    fn bus_with(
        config: &BusConfig,
        subscribers: Vec<(&'static str, Delivery, BoxFuture<'static, ()>)>,
    ) -> Bus {
        let mut builder = BusBuilder::default();
        for (module, delivery, run) in subscribers {
            let run = futures_util::FutureExt::shared(run);
            builder.subscribe(module, delivery, move |_: Happened| run.clone());
        }
        let bus = Bus::new(config);
        bus.start(builder);
        bus
    }

    #[tokio::test]
    async fn a_panicking_subscriber_harms_neither_the_others_nor_the_publisher() {
        let seen = Arc::new(AtomicUsize::new(0));
        let after = seen.clone();
        let bus = bus_with(
            &BusConfig::default(),
            vec![
                (
                    "broken",
                    Delivery::Inline,
                    Box::pin(async { panic!("boom") }),
                ),
                (
                    "fine",
                    Delivery::Inline,
                    Box::pin(async move {
                        after.fetch_add(1, Ordering::SeqCst);
                    }),
                ),
            ],
        );
        assert_eq!(bus.publish(Happened(1)).await, 2);
        assert_eq!(seen.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn the_publisher_waits_for_an_inline_subscriber_at_most_the_timeout() {
        let config = BusConfig {
            subscriber_timeout_ms: 500,
            ..BusConfig::default()
        };
        let bus = bus_with(
            &config,
            vec![(
                "slow",
                Delivery::Inline,
                Box::pin(tokio::time::sleep(Duration::from_secs(60))),
            )],
        );
        let started = tokio::time::Instant::now();
        bus.publish(Happened(1)).await;
        assert_eq!(started.elapsed(), Duration::from_millis(500));
    }

    #[tokio::test(start_paused = true)]
    async fn an_inline_subscriber_left_behind_still_finishes_before_shutdown() {
        let done = Arc::new(AtomicUsize::new(0));
        let finished = done.clone();
        let config = BusConfig {
            subscriber_timeout_ms: 500,
            ..BusConfig::default()
        };
        let bus = bus_with(
            &config,
            vec![(
                "slow",
                Delivery::Inline,
                Box::pin(async move {
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    finished.fetch_add(1, Ordering::SeqCst);
                }),
            )],
        );
        let started = tokio::time::Instant::now();
        bus.publish(Happened(1)).await;
        assert_eq!(done.load(Ordering::SeqCst), 0);
        assert_eq!(bus.drain(started + Duration::from_secs(10)).await, 0);
        assert_eq!(done.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn detached_subscribers_run_off_the_publishers_path_and_drain_at_shutdown() {
        let done = Arc::new(AtomicUsize::new(0));
        let finished = done.clone();
        let bus = bus_with(
            &BusConfig::default(),
            vec![(
                "slow",
                Delivery::Detached,
                Box::pin(async move {
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    finished.fetch_add(1, Ordering::SeqCst);
                }),
            )],
        );
        let started = tokio::time::Instant::now();
        bus.publish(Happened(1)).await;
        assert_eq!(
            started.elapsed(),
            Duration::ZERO,
            "the publisher did not wait"
        );
        assert_eq!(done.load(Ordering::SeqCst), 0);
        let left = bus.drain(started + Duration::from_secs(10)).await;
        assert_eq!((left, done.load(Ordering::SeqCst)), (0, 1));
        assert_eq!(started.elapsed(), Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn drain_counts_the_subscribers_its_deadline_cut_short() {
        let bus = bus_with(
            &BusConfig::default(),
            vec![(
                "stuck",
                Delivery::Detached,
                Box::pin(tokio::time::sleep(Duration::from_secs(60))),
            )],
        );
        bus.publish(Happened(1)).await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
        assert_eq!(bus.drain(deadline).await, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_set_of_detached_subscribers_makes_publishers_wait_for_a_slot() {
        let config = BusConfig {
            detached_max_in_flight: 1,
            ..BusConfig::default()
        };
        let bus = bus_with(
            &config,
            vec![(
                "slow",
                Delivery::Detached,
                Box::pin(tokio::time::sleep(Duration::from_secs(1))),
            )],
        );
        let started = tokio::time::Instant::now();
        bus.publish(Happened(1)).await;
        assert_eq!(started.elapsed(), Duration::ZERO);
        bus.publish(Happened(2)).await;
        assert_eq!(
            started.elapsed(),
            Duration::from_secs(1),
            "waited for the slot"
        );
    }

    #[tokio::test]
    async fn publish_without_subscribers_is_fine() {
        let bus = Bus::default();
        bus.start(BusBuilder::default());
        assert_eq!(bus.publish(Happened(1)).await, 0);
    }
}
