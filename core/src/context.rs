//! The context: everything a module may reach at run time, passed explicitly (no globals).

use std::{
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use serde::de::DeserializeOwned;

use crate::{
    bus::Bus,
    config::{Config, ConfigError, LoadedConfig},
    events::EventDispatcher,
    module::ModuleInfo,
    mq::MessageQueue,
    readiness::Readiness,
    storage::{Database, ModuleCache, ModuleDb, Storage},
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

struct Inner {
    config: LoadedConfig,
    bus: Bus,
    readiness: Readiness,
    events: EventDispatcher,
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
    /// A context for `modules`, whose bus, readiness checks and event dispatcher are
    /// started by [`assemble`](crate::assemble).
    pub fn new(
        config: LoadedConfig,
        modules: Vec<ModuleInfo>,
        build: BuildInfo,
        storage: Storage,
        queue: MessageQueue,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                events: EventDispatcher::new(&config.config.events),
                queue,
                config,
                bus: Bus::new(),
                readiness: Readiness::default(),
                modules,
                build,
                storage,
                started_at: SystemTime::now(),
                started: Instant::now(),
            }),
        }
    }

    /// The typed configuration.
    pub fn config(&self) -> &Config {
        &self.inner.config.config
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

    /// The event dispatcher.
    pub fn events(&self) -> &EventDispatcher {
        &self.inner.events
    }

    /// The message queue.
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
    pub fn database(&self) -> &Database {
        &self.inner.storage.database
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

/// One module's view of the context, handed to its factories.
#[derive(Debug, Clone, Copy)]
pub struct ModuleContext<'a> {
    app: &'a AppContext,
    module: &'static str,
}

impl<'a> ModuleContext<'a> {
    /// `module`'s view of `app`.
    pub fn new(app: &'a AppContext, module: &'static str) -> Self {
        Self { app, module }
    }

    /// The module's name.
    pub fn module(&self) -> &'static str {
        self.module
    }

    /// The module's own section, `[modules.<name>]`, as `C`.
    pub fn config<C: DeserializeOwned>(&self) -> Result<C, ConfigError> {
        self.app.loaded_config().module_section(self.module)
    }

    /// The whole application context.
    pub fn app(&self) -> &'a AppContext {
        self.app
    }

    /// The bus.
    pub fn bus(&self) -> &'a Bus {
        self.app.bus()
    }

    /// The module's database handle (queries timed and labelled with the module).
    pub fn database(&self) -> ModuleDb {
        self.app.inner.storage.database.for_module(self.module)
    }

    /// The event dispatcher (to emit events).
    pub fn events(&self) -> &'a EventDispatcher {
        self.app.events()
    }

    /// The message queue (to publish messages).
    pub fn queue(&self) -> &'a MessageQueue {
        self.app.queue()
    }

    /// The module's cache namespace.
    pub fn cache(&self) -> ModuleCache {
        self.app.inner.storage.cache.for_module(self.module)
    }
}
