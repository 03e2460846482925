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
    ModuleContext,
    bus::{BusBuilder, Delivery, Message, Request},
    config::{ConfigError, LoadedConfig},
    events::{Event, EventHandlerTable, Published},
    readiness::{CheckOutcome, ReadinessCheck},
};
#[cfg(feature = "storage")]
use crate::{jobs::Job, storage::Migration};

/// The route table poem-openapi's `OpenApi::add_routes` fills.
pub type RouteTable = HashMap<String, HashMap<Method, BoxEndpoint<'static>>>;
/// Adds one API's routes to the table.
pub type RouteAdder = Box<dyn FnOnce(&mut RouteTable) + Send>;
/// The result of a factory.
pub type FactoryResult<T> = anyhow::Result<T>;

type ApiFactory = Box<dyn FnOnce(&ModuleContext) -> FactoryResult<RouteAdder> + Send>;
type Wiring = Box<
    dyn FnOnce(&ModuleContext, &mut BusBuilder, &mut EventHandlerTable) -> FactoryResult<()> + Send,
>;
#[cfg(feature = "storage")]
type JobFactory = Box<dyn FnOnce(&ModuleContext) -> FactoryResult<Job> + Send>;
type CheckFactory =
    Box<dyn FnOnce(&ModuleContext) -> FactoryResult<Arc<dyn ReadinessCheck>> + Send>;
/// Checks a module's configuration section.
pub(crate) type ConfigCheck = fn(&LoadedConfig, &str) -> Result<(), ConfigError>;
/// A hook run at init or shutdown with the module's context.
pub type Hook = Box<dyn FnOnce(ModuleContext) -> BoxFuture<'static, anyhow::Result<()>> + Send>;

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

/// Collects one module's declarations.
pub struct ModuleBuilder {
    pub(crate) module: &'static str,
    pub(crate) description: &'static str,
    pub(crate) config_check: Option<ConfigCheck>,
    pub(crate) apis: Vec<ApiRegistration>,
    pub(crate) wiring: Vec<Wiring>,
    pub(crate) checks: Vec<CheckRegistration>,
    #[cfg(feature = "storage")]
    pub(crate) jobs: Vec<(&'static str, JobFactory)>,
    #[cfg(feature = "storage")]
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
            #[cfg(feature = "storage")]
            jobs: Vec::new(),
            #[cfg(feature = "storage")]
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

    /// Declares the module's one service value, built from the context once at start-up
    /// (before anything else the module declares), and returns the builder of what uses
    /// it. Declare the configuration and migrations first.
    pub fn service<S, F>(&mut self, build: F) -> ServiceBuilder<'_, S>
    where
        S: Clone + Send + Sync + 'static,
        F: FnOnce(&ModuleContext) -> FactoryResult<S> + Send + 'static,
    {
        let service = Arc::new(OnceLock::new());
        let slot = service.clone();
        self.wiring.push(Box::new(move |ctx, _, _| {
            let _ = slot.set(build(ctx)?);
            Ok(())
        }));
        ServiceBuilder {
            module: self,
            service,
        }
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
        F: FnOnce(&ModuleContext) -> FactoryResult<T> + Send + 'static,
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
        F: FnOnce(&ModuleContext) -> FactoryResult<H> + Send + 'static,
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

    /// Subscribes to the published message `M`, run before the publisher goes on (see
    /// [`Delivery::Inline`]): for what the publisher's answer depends on.
    pub fn subscribe<M, F, H, Fut>(&mut self, factory: F) -> &mut Self
    where
        M: Message,
        F: FnOnce(&ModuleContext) -> FactoryResult<H> + Send + 'static,
        H: Fn(M) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.subscribe_with(Delivery::Inline, factory)
    }

    /// Subscribes to the published message `M`, run off the publisher's path (see
    /// [`Delivery::Detached`]): for what the publisher need not wait for.
    pub fn subscribe_detached<M, F, H, Fut>(&mut self, factory: F) -> &mut Self
    where
        M: Message,
        F: FnOnce(&ModuleContext) -> FactoryResult<H> + Send + 'static,
        H: Fn(M) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.subscribe_with(Delivery::Detached, factory)
    }

    fn subscribe_with<M, F, H, Fut>(&mut self, delivery: Delivery, factory: F) -> &mut Self
    where
        M: Message,
        F: FnOnce(&ModuleContext) -> FactoryResult<H> + Send + 'static,
        H: Fn(M) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let module = self.module;
        self.wiring.push(Box::new(move |ctx, bus, _| {
            bus.subscribe(module, delivery, factory(ctx)?);
            Ok(())
        }));
        self
    }

    /// Handles the event `E` after the change that emitted it committed, at least once,
    /// retried when it fails (see [`events`](crate::events)). An `Err` (or a panic) is a
    /// failed attempt.
    pub fn on_event<E, F, H, Fut>(&mut self, factory: F) -> &mut Self
    where
        E: Event,
        F: FnOnce(&ModuleContext) -> FactoryResult<H> + Send + 'static,
        H: Fn(Published<E>) -> Fut + Send + Sync + 'static,
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
    #[cfg(feature = "storage")]
    pub fn migrations(&mut self, migrations: &'static [Migration]) -> &mut Self {
        self.migrations.push(migrations);
        self
    }

    /// Declares a readiness check, reported by `/readyz` as `<module>.<name>`.
    pub fn readiness<F, C, Fut>(&mut self, name: &'static str, factory: F) -> &mut Self
    where
        F: FnOnce(&ModuleContext) -> FactoryResult<C> + Send + 'static,
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
    #[cfg(feature = "storage")]
    pub fn job<F>(&mut self, name: &'static str, factory: F) -> &mut Self
    where
        F: FnOnce(&ModuleContext) -> FactoryResult<Job> + Send + 'static,
    {
        self.jobs.push((name, Box::new(factory)));
        self
    }

    /// Runs once after migrations, before the server accepts requests.
    pub fn on_init<F, Fut>(&mut self, hook: F) -> &mut Self
    where
        F: FnOnce(ModuleContext) -> Fut + Send + 'static,
        Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        self.init.push(Box::new(move |ctx| Box::pin(hook(ctx))));
        self
    }

    /// Runs once at shutdown, after in-flight requests finished (reverse module order).
    pub fn on_shutdown<F, Fut>(&mut self, hook: F) -> &mut Self
    where
        F: FnOnce(ModuleContext) -> Fut + Send + 'static,
        Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        self.shutdown.push(Box::new(move |ctx| Box::pin(hook(ctx))));
        self
    }
}

/// Declarations that share the module's one service value `S`, built once at start-up by
/// [`ModuleBuilder::service`] before any of them, and handed (cloned: keep `S` cheap to
/// clone, an `Arc` or a struct of them) to its API, bus handlers and subscribers, event
/// handlers, jobs, checks and hooks, so that they share its state: caches, hashing
/// capacity, signing keys.
pub struct ServiceBuilder<'b, S> {
    module: &'b mut ModuleBuilder,
    service: Arc<OnceLock<S>>,
}

impl<S: Clone + Send + Sync + 'static> ServiceBuilder<'_, S> {
    /// The service, for a factory (built by the module's first wiring step).
    fn getter(&self) -> impl Fn() -> FactoryResult<S> + Send + 'static {
        let service = self.service.clone();
        let module = self.module.module;
        move || {
            service.get().cloned().ok_or_else(|| {
                anyhow::anyhow!("the service of module `{module}` is used before it was built")
            })
        }
    }

    /// Declares a poem-openapi API made from the service.
    pub fn api<T, F>(&mut self, factory: F) -> &mut Self
    where
        T: OpenApi + Send + 'static,
        F: FnOnce(S) -> FactoryResult<T> + Send + 'static,
    {
        let service = self.getter();
        self.module.api(move |_| factory(service()?));
        self
    }

    /// Answers the bus request `R` with the service.
    pub fn handle<R, H, Fut>(&mut self, handler: H) -> &mut Self
    where
        R: Request,
        H: Fn(S, R) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = R::Response> + Send + 'static,
    {
        let service = self.getter();
        self.module.handle(move |_| {
            let service = service()?;
            Ok(move |request: R| handler(service.clone(), request))
        });
        self
    }

    /// Subscribes to `M` inline (see [`ModuleBuilder::subscribe`]).
    pub fn subscribe<M, H, Fut>(&mut self, subscriber: H) -> &mut Self
    where
        M: Message,
        H: Fn(S, M) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.subscribe_with(Delivery::Inline, subscriber)
    }

    /// Subscribes to `M` off the publisher's path (see [`ModuleBuilder::subscribe_detached`]).
    pub fn subscribe_detached<M, H, Fut>(&mut self, subscriber: H) -> &mut Self
    where
        M: Message,
        H: Fn(S, M) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.subscribe_with(Delivery::Detached, subscriber)
    }

    fn subscribe_with<M, H, Fut>(&mut self, delivery: Delivery, subscriber: H) -> &mut Self
    where
        M: Message,
        H: Fn(S, M) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let service = self.getter();
        self.module.subscribe_with(delivery, move |_| {
            let service = service()?;
            Ok(move |message: M| subscriber(service.clone(), message))
        });
        self
    }

    /// Handles the event `E` with the service (see [`ModuleBuilder::on_event`]).
    pub fn on_event<E, H, Fut>(&mut self, handler: H) -> &mut Self
    where
        E: Event,
        H: Fn(S, Published<E>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let service = self.getter();
        self.module.on_event(move |_| {
            let service = service()?;
            Ok(move |event: Published<E>| handler(service.clone(), event))
        });
        self
    }

    /// Declares a readiness check made from the service.
    pub fn readiness<F, C, Fut>(&mut self, name: &'static str, factory: F) -> &mut Self
    where
        F: FnOnce(S) -> FactoryResult<C> + Send + 'static,
        C: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = CheckOutcome> + Send + 'static,
    {
        let service = self.getter();
        self.module.readiness(name, move |_| factory(service()?));
        self
    }

    /// Declares a periodic job made from the service (see [`ModuleBuilder::job`]).
    #[cfg(feature = "storage")]
    pub fn job<F>(&mut self, name: &'static str, factory: F) -> &mut Self
    where
        F: FnOnce(S) -> FactoryResult<Job> + Send + 'static,
    {
        let service = self.getter();
        self.module.job(name, move |_| factory(service()?));
        self
    }

    /// Runs once after migrations, before the server accepts requests.
    pub fn on_init<F, Fut>(&mut self, hook: F) -> &mut Self
    where
        F: FnOnce(S, ModuleContext) -> Fut + Send + 'static,
        Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let service = self.getter();
        self.module
            .on_init(move |ctx| async move { hook(service()?, ctx).await });
        self
    }

    /// Runs once at shutdown, after in-flight requests finished (reverse module order).
    pub fn on_shutdown<F, Fut>(&mut self, hook: F) -> &mut Self
    where
        F: FnOnce(S, ModuleContext) -> Fut + Send + 'static,
        Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let service = self.getter();
        self.module
            .on_shutdown(move |ctx| async move { hook(service()?, ctx).await });
        self
    }
}
