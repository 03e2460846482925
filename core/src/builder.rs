//! [`ModuleBuilder`]: what a module declares in [`Module::build`](crate::Module::build).
//!
//! Every declaration that needs the running server is a factory taking the module's
//! [`ModuleContext`]; the factories run once, at start-up, in module order.

use std::{
    collections::HashMap,
    sync::{Arc, OnceLock},
};

use futures_util::future::BoxFuture;
use poem::{endpoint::BoxEndpoint, http::Method};
use poem_openapi::{
    OpenApi,
    registry::{MetaApi, Registry},
};
use serde::de::DeserializeOwned;

use crate::{
    AppContext, ModuleContext,
    bus::{BusBuilder, Message, Request},
    config::{ConfigError, LoadedConfig},
    events::{Event, EventHandlerTable},
    jobs::Job,
    readiness::{CheckOutcome, ReadinessCheck},
    storage::Migration,
};

/// The route table poem-openapi's `OpenApi::add_routes` fills.
pub type RouteTable = HashMap<String, HashMap<Method, BoxEndpoint<'static>>>;
/// Adds one API's routes to the table.
pub type RouteAdder = Box<dyn FnOnce(&mut RouteTable) + Send>;
/// The result of a factory.
pub type FactoryResult<T> = anyhow::Result<T>;

type ApiFactory = Box<dyn FnOnce(&ModuleContext<'_>) -> FactoryResult<RouteAdder> + Send>;
type Wiring = Box<
    dyn FnOnce(&ModuleContext<'_>, &mut BusBuilder, &mut EventHandlerTable) -> FactoryResult<()>
        + Send,
>;
type JobFactory = Box<dyn FnOnce(&ModuleContext<'_>) -> FactoryResult<Job> + Send>;
type CheckFactory =
    Box<dyn FnOnce(&ModuleContext<'_>) -> FactoryResult<Arc<dyn ReadinessCheck>> + Send>;
/// Checks a module's configuration section.
pub(crate) type ConfigCheck = fn(&LoadedConfig, &str) -> Result<(), ConfigError>;
/// A hook run at init or shutdown with the application context.
pub type Hook = Box<dyn FnOnce(AppContext) -> BoxFuture<'static, anyhow::Result<()>> + Send>;

/// The OpenAPI side of one poem-openapi API type declared by a module: the type's
/// associated functions, so the document can be produced without building anything.
#[derive(Debug, Clone, Copy)]
pub struct ApiMeta {
    /// The declaring module.
    pub module: &'static str,
    /// The module's description (the OpenAPI tag's description).
    pub module_description: &'static str,
    /// `<T as OpenApi>::meta`.
    pub meta: fn() -> Vec<MetaApi>,
    /// `<T as OpenApi>::register`.
    pub register: fn(&mut Registry),
}

/// A declared API: its metadata, and the factory that builds it from the context.
pub(crate) struct ApiRegistration {
    pub(crate) meta: ApiMeta,
    pub(crate) mount: ApiFactory,
}

/// A readiness check declared by a module.
pub(crate) struct CheckRegistration {
    pub(crate) name: &'static str,
    pub(crate) factory: CheckFactory,
}

/// A module's service, built once by whichever of the module's factories runs first and
/// shared by the others (its API, bus handlers and hooks), so that they share its state:
/// caches, hashing capacity, signing keys. Create one in [`Module::build`](crate::Module::build)
/// and clone it into each factory.
pub struct Shared<T>(Arc<OnceLock<T>>);

impl<T> Clone for Shared<T> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<T> Default for Shared<T> {
    fn default() -> Self {
        Self(Arc::new(OnceLock::new()))
    }
}

impl<T: Clone> Shared<T> {
    /// The service, built with `build` on first use.
    pub fn get_or_build(
        &self,
        ctx: &ModuleContext<'_>,
        build: impl FnOnce(&ModuleContext<'_>) -> FactoryResult<T>,
    ) -> FactoryResult<T> {
        if let Some(service) = self.0.get() {
            return Ok(service.clone());
        }
        let built = build(ctx)?;
        Ok(self.0.get_or_init(|| built).clone())
    }

    /// The service, once a factory has built it.
    pub fn get(&self) -> Option<T> {
        self.0.get().cloned()
    }
}

/// Collects one module's declarations.
pub struct ModuleBuilder {
    pub(crate) module: &'static str,
    pub(crate) description: &'static str,
    pub(crate) config_check: Option<ConfigCheck>,
    pub(crate) apis: Vec<ApiRegistration>,
    pub(crate) wiring: Vec<Wiring>,
    pub(crate) checks: Vec<CheckRegistration>,
    pub(crate) jobs: Vec<(&'static str, JobFactory)>,
    pub(crate) migrations: Vec<&'static [Migration]>,
    pub(crate) init: Vec<Hook>,
    pub(crate) shutdown: Vec<Hook>,
}

impl ModuleBuilder {
    /// An empty builder for `module`.
    pub fn new(module: &'static str, description: &'static str) -> Self {
        Self {
            module,
            description,
            config_check: None,
            apis: Vec::new(),
            wiring: Vec::new(),
            checks: Vec::new(),
            jobs: Vec::new(),
            migrations: Vec::new(),
            init: Vec::new(),
            shutdown: Vec::new(),
        }
    }

    /// The name of the module being built.
    pub fn module_name(&self) -> &'static str {
        self.module
    }

    /// The APIs declared so far.
    pub fn api_metas(&self) -> impl Iterator<Item = ApiMeta> + '_ {
        self.apis.iter().map(|api| api.meta)
    }

    /// Declares the type of `[modules.<name>]`, so a bad section stops start-up before
    /// anything runs. Read it with [`ModuleContext::config`].
    pub fn config<C: DeserializeOwned>(&mut self) -> &mut Self {
        self.config_check = Some(|config, module| config.module_section::<C>(module).map(|_| ()));
        self
    }

    /// Declares a poem-openapi API, built from the context at start-up.
    pub fn api<T, F>(&mut self, factory: F) -> &mut Self
    where
        T: OpenApi + Send + 'static,
        F: FnOnce(&ModuleContext<'_>) -> FactoryResult<T> + Send + 'static,
    {
        self.apis.push(ApiRegistration {
            meta: ApiMeta {
                module: self.module,
                module_description: self.description,
                meta: T::meta,
                register: T::register,
            },
            mount: Box::new(move |ctx| {
                let api = factory(ctx)?;
                Ok(Box::new(move |table: &mut RouteTable| api.add_routes(table)) as RouteAdder)
            }),
        });
        self
    }

    /// Answers the bus request `R`. Exactly one module may handle each request type.
    pub fn handle<R, F, H, Fut>(&mut self, factory: F) -> &mut Self
    where
        R: Request,
        F: FnOnce(&ModuleContext<'_>) -> FactoryResult<H> + Send + 'static,
        H: Fn(R) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = R::Response> + Send + 'static,
    {
        let module = self.module;
        self.wiring.push(Box::new(move |ctx, bus, _| {
            let handler = factory(ctx)?;
            bus.handle(module, handler)?;
            Ok(())
        }));
        self
    }

    /// Subscribes to the published message `M`.
    pub fn subscribe<M, F, H, Fut>(&mut self, factory: F) -> &mut Self
    where
        M: Message,
        F: FnOnce(&ModuleContext<'_>) -> FactoryResult<H> + Send + 'static,
        H: Fn(M) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.wiring.push(Box::new(move |ctx, bus, _| {
            bus.subscribe(factory(ctx)?);
            Ok(())
        }));
        self
    }

    /// Handles the event `E` asynchronously, from the event dispatcher's workers.
    pub fn on_event<E, F, H, Fut>(&mut self, factory: F) -> &mut Self
    where
        E: Event,
        F: FnOnce(&ModuleContext<'_>) -> FactoryResult<H> + Send + 'static,
        H: Fn(Arc<E>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let module = self.module;
        self.wiring.push(Box::new(move |ctx, _, events| {
            events.add(module, factory(ctx)?);
            Ok(())
        }));
        self
    }

    /// Declares the module's migrations (applied at start-up, in module order).
    pub fn migrations(&mut self, migrations: &'static [Migration]) -> &mut Self {
        self.migrations.push(migrations);
        self
    }

    /// Declares a readiness check, reported by `/readyz` as `<module>.<name>`.
    pub fn readiness<F, C, Fut>(&mut self, name: &'static str, factory: F) -> &mut Self
    where
        F: FnOnce(&ModuleContext<'_>) -> FactoryResult<C> + Send + 'static,
        C: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = CheckOutcome> + Send + 'static,
    {
        self.checks.push(CheckRegistration {
            name,
            factory: Box::new(move |ctx| {
                let check = factory(ctx)?;
                Ok(Arc::new(check) as Arc<dyn ReadinessCheck>)
            }),
        });
        self
    }

    /// Declares a periodic job, `<module>.<name>`, built from the context at start-up and
    /// run once per its period over all instances (see [`crate::jobs`]).
    pub fn job<F>(&mut self, name: &'static str, factory: F) -> &mut Self
    where
        F: FnOnce(&ModuleContext<'_>) -> FactoryResult<Job> + Send + 'static,
    {
        self.jobs.push((name, Box::new(factory)));
        self
    }

    /// Runs once after migrations, before the server accepts requests.
    pub fn on_init<F, Fut>(&mut self, hook: F) -> &mut Self
    where
        F: FnOnce(AppContext) -> Fut + Send + 'static,
        Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        self.init.push(Box::new(move |ctx| Box::pin(hook(ctx))));
        self
    }

    /// Runs once at shutdown, after in-flight requests finished (reverse module order).
    pub fn on_shutdown<F, Fut>(&mut self, hook: F) -> &mut Self
    where
        F: FnOnce(AppContext) -> Fut + Send + 'static,
        Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        self.shutdown.push(Box::new(move |ctx| Box::pin(hook(ctx))));
        self
    }
}
