//! The context: everything a module may reach at run time, passed explicitly (no globals).

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use serde::de::DeserializeOwned;

#[cfg(feature = "queue")]
use crate::mq::MessageQueue;
#[cfg(feature = "storage")]
use crate::storage::{Database, ModuleDb};
use crate::{
    bus::{Bus, BusBuilder, Delivery, Message},
    clock::Clock,
    config::{Config, ConfigError, LoadedConfig},
    events::{Event, EventHandlerTable, Published},
    module::ModuleInfo,
    readiness::{CheckOutcome, NamedCheck, Readiness},
    storage::{ModuleCache, Storage},
};

/// Facts about the build, embedded by the server's build script.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildInfo {
    /// The product name.
    pub name: &'static str,
    /// The server's version.
    pub version: &'static str,
    /// The git commit the binary was built from (`unknown` outside a checkout).
    pub git_commit: &'static str,
    /// The git branch.
    pub git_branch: &'static str,
    /// The CI build number (`TRELLIS_BUILD_NUMBER` at build time), or `local`.
    pub build_number: &'static str,
    /// When the binary was built, RFC 3339.
    pub build_time: &'static str,
}

impl BuildInfo {
    /// Placeholder facts, for tests and tools that run without the server's build script.
    pub const fn unknown() -> Self {
        Self {
            name: "trellis",
            version: "0.0.0",
            git_commit: "unknown",
            git_branch: "unknown",
            build_number: "local",
            build_time: "unknown",
        }
    }
}

/// What the program building a server adds besides its configuration: the clock the
/// modules read, and observers of what they publish on the bus and emit as events. A
/// production server takes the default; `trellis-testkit` uses it to hand a test a
/// manual clock and the messages a module sent.
#[derive(Default)]
pub struct Extras {
    clock: Clock,
    observers: Vec<Observer>,
}

/// Wires one observer into the bus or the event handler table.
pub(crate) type Observer = Box<dyn FnOnce(&mut BusBuilder, &mut EventHandlerTable) + Send>;

/// The module name observers are registered (and measured) under.
const OBSERVER: &str = "observer";

impl Extras {
    /// The modules read `clock` instead of the system's.
    pub fn clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// Calls `observer` with every `M` published on the bus, as an inline subscriber.
    pub fn observe_bus<M: Message>(mut self, observer: impl Fn(M) + Send + Sync + 'static) -> Self {
        self.observers.push(Box::new(move |bus, _| {
            bus.subscribe(OBSERVER, Delivery::Inline, move |message: M| {
                observer(message);
                std::future::ready(())
            });
        }));
        self
    }

    /// Calls `observer` with every `E` emitted, as one more handler of `E` (so each `E`
    /// emitted is also stored for it, and delivered after its commit).
    pub fn observe_events<E: Event>(
        mut self,
        observer: impl Fn(Published<E>) + Send + Sync + 'static,
    ) -> Self {
        self.observers.push(Box::new(move |_, events| {
            events.add(OBSERVER, move |event: Published<E>| {
                observer(event);
                std::future::ready(Ok(()))
            });
        }));
        self
    }
}

struct Inner {
    config: LoadedConfig,
    clock: Clock,
    observers: Mutex<Vec<Observer>>,
    bus: Bus,
    readiness: Readiness,
    #[cfg(feature = "queue")]
    queue: MessageQueue,
    modules: Vec<ModuleInfo>,
    build: BuildInfo,
    storage: Storage,
    started_at: SystemTime,
    started: Instant,
}

/// The application context. Cheap to clone.
#[derive(Clone)]
pub struct AppContext {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for AppContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppContext")
            .field("modules", &self.inner.modules)
            .finish_non_exhaustive()
    }
}

impl AppContext {
    /// Connects what `config` describes and this build has (the database, the cache, the
    /// message queue) and makes a context for `modules`, whose bus, readiness checks and
    /// event handlers are wired by [`assemble`](crate::assemble).
    pub async fn connect(
        config: LoadedConfig,
        modules: Vec<ModuleInfo>,
        build: BuildInfo,
        extras: Extras,
    ) -> anyhow::Result<Self> {
        let storage = Storage::connect(&config.config).await?;
        tracing::info!(
            database = storage.database_kind(),
            cache = storage.cache.kind(),
            "storage connected"
        );
        #[cfg(feature = "queue")]
        let queue = {
            let queue = MessageQueue::connect(&config.config.mq).await?;
            tracing::info!(backend = queue.backend(), "message queue connected");
            queue
        };
        Ok(Self {
            inner: Arc::new(Inner {
                bus: Bus::new(&config.config.bus),
                #[cfg(feature = "queue")]
                queue,
                config,
                clock: extras.clock,
                observers: Mutex::new(extras.observers),
                readiness: Readiness::default(),
                modules,
                build,
                storage,
                started_at: SystemTime::now(),
                started: Instant::now(),
            }),
        })
    }

    /// The typed configuration.
    pub fn config(&self) -> &Config {
        &self.inner.config.config
    }

    /// The clock the modules read.
    pub fn clock(&self) -> &Clock {
        &self.inner.clock
    }

    /// The observers from [`Extras`], once: [`assemble`](crate::assemble) wires them.
    pub(crate) fn take_observers(&self) -> Vec<Observer> {
        std::mem::take(
            &mut *self
                .inner
                .observers
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        )
    }

    /// The configuration with its layers (for module sections).
    pub fn loaded_config(&self) -> &LoadedConfig {
        &self.inner.config
    }

    /// The bus.
    pub fn bus(&self) -> &Bus {
        &self.inner.bus
    }

    /// The readiness checks.
    pub fn readiness(&self) -> &Readiness {
        &self.inner.readiness
    }

    /// Stops the relay delivering the modules' events: the handlers under way finish
    /// within `budget` (at most `events.drain_timeout_ms`). Answers how many were
    /// abandoned (they run again later).
    pub async fn stop_events(&self, budget: Duration) -> usize {
        #[cfg(feature = "storage")]
        return self
            .database()
            .events()
            .stop_relay(budget.min(Duration::from_millis(self.config().events.drain_timeout_ms)))
            .await;
        #[cfg(not(feature = "storage"))]
        {
            let _ = budget;
            0
        }
    }

    /// The message queue.
    #[cfg(feature = "queue")]
    pub fn queue(&self) -> &MessageQueue {
        &self.inner.queue
    }

    /// The compiled-in modules, in start-up order.
    pub fn modules(&self) -> &[ModuleInfo] {
        &self.inner.modules
    }

    /// Build facts.
    pub fn build_info(&self) -> &BuildInfo {
        &self.inner.build
    }

    /// The storage handles (core's own use: migrations, readiness, metrics).
    pub fn storage(&self) -> &Storage {
        &self.inner.storage
    }

    /// The database (core's own use; modules use [`ModuleContext::database`]).
    #[cfg(feature = "storage")]
    pub fn database(&self) -> &Database {
        &self.inner.storage.database
    }

    /// Core's readiness checks, for what this build has: the database (down when
    /// unreachable), the cache (degraded when unreachable: requests fall back to the
    /// database) and the message queue (degraded when unreachable: messages wait in its
    /// buffer).
    pub(crate) fn core_checks(&self) -> Vec<NamedCheck> {
        /// `core.<name>`: `probe` on a clone of `handle` each time.
        fn check<T, Fut>(
            name: &'static str,
            handle: T,
            probe: impl Fn(T) -> Fut + Send + Sync + 'static,
        ) -> NamedCheck
        where
            T: Clone + Send + Sync + 'static,
            Fut: Future<Output = CheckOutcome> + Send + 'static,
        {
            NamedCheck::new("core", name, move || probe(handle.clone()))
        }
        let mut checks = Vec::new();
        #[cfg(feature = "storage")]
        checks.push(check(
            "database",
            self.database().clone(),
            |db| async move { db.ping().await },
        ));
        checks.push(check(
            "cache",
            self.storage().cache.clone(),
            |cache| async move { cache.ping().await },
        ));
        #[cfg(feature = "queue")]
        checks.push(check("queue", self.queue().clone(), |queue| async move {
            queue.check().await
        }));
        checks
    }

    /// Closes the backends at the end of a shutdown: delivers what is left in the
    /// message queue's buffer within `budget` and closes the database. Answers how many
    /// messages were left undelivered.
    pub async fn close_backends(&self, budget: Duration) -> usize {
        #[cfg(feature = "queue")]
        let undelivered = self.queue().close(budget).await;
        #[cfg(not(feature = "queue"))]
        let undelivered = {
            let _ = budget;
            0
        };
        self.storage().close().await;
        undelivered
    }

    /// When the server started (wall clock).
    pub fn started_at(&self) -> SystemTime {
        self.inner.started_at
    }

    /// How long the server has been up.
    pub fn uptime(&self) -> Duration {
        self.inner.started.elapsed()
    }
}

/// One module's view of the context, handed to its factories and hooks: its own
/// configuration section, database and cache namespace, and the shared bus, events and
/// queue. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ModuleContext {
    app: AppContext,
    module: &'static str,
}

impl ModuleContext {
    /// `module`'s view of `app`.
    pub fn new(app: &AppContext, module: &'static str) -> Self {
        Self {
            app: app.clone(),
            module,
        }
    }

    /// The module's name.
    pub fn module(&self) -> &'static str {
        self.module
    }

    /// The module's own section, `[modules.<name>]`, as `C`.
    pub fn config<C: DeserializeOwned>(&self) -> Result<C, ConfigError> {
        self.app.loaded_config().module_section(self.module)
    }

    /// The clock to read the time from (a test may move it by hand).
    pub fn clock(&self) -> &Clock {
        self.app.clock()
    }

    /// The configuration profile the server runs with (`dev`, `test`, `production`, ...).
    pub fn profile(&self) -> &str {
        &self.app.loaded_config().profile
    }

    /// The whole application context, for a module that reports on the server itself
    /// (`common`: its modules, build, readiness, uptime).
    pub fn app(&self) -> &AppContext {
        &self.app
    }

    /// The bus.
    pub fn bus(&self) -> &Bus {
        self.app.bus()
    }

    /// The module's database handle (queries timed and labelled with the module).
    #[cfg(feature = "storage")]
    pub fn database(&self) -> ModuleDb {
        self.app.inner.storage.database.for_module(self.module)
    }

    /// The message queue (to publish messages).
    #[cfg(feature = "queue")]
    pub fn queue(&self) -> &MessageQueue {
        self.app.queue()
    }

    /// The registry of every module's event publications, for a module that lets
    /// operators list and resubmit them.
    #[cfg(feature = "storage")]
    pub fn event_registry(&self) -> crate::events::Registry {
        crate::events::Registry::new(self.app.database().clone())
    }

    /// The module's cache namespace.
    pub fn cache(&self) -> ModuleCache {
        self.app.inner.storage.cache.for_module(self.module)
    }
}
