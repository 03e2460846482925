//! Assembly: the server's "modules" step. Builds every module, checks and wires what they
//! declared, and hands back what the server mounts and runs.

use anyhow::Context as _;

use crate::{
    AppContext, ModuleContext,
    builder::{ApiMeta, Hook, ModuleBuilder, RouteAdder},
    bus::BusBuilder,
    events::EventHandlerTable,
    module::Module,
    readiness::NamedCheck,
};
#[cfg(feature = "storage")]
use crate::{
    events,
    jobs::{self, NamedJob, Scheduler},
    storage::Migration,
};

/// One module's API, built and ready to add its routes.
pub struct MountedApi {
    /// The OpenAPI metadata.
    pub meta: ApiMeta,
    /// Adds the routes.
    pub routes: RouteAdder,
}

/// Everything the modules declared, wired to the context.
pub struct Assembly {
    /// APIs in module order.
    pub apis: Vec<MountedApi>,
    /// Migrations by module, core's own first, then in module order.
    #[cfg(feature = "storage")]
    pub migrations: Vec<(&'static str, &'static [Migration])>,
    /// Periodic jobs, in module order.
    #[cfg(feature = "storage")]
    pub jobs: Vec<NamedJob>,
    /// The jobs' scheduler, once started.
    #[cfg(feature = "storage")]
    scheduler: Option<Scheduler>,
    /// The event handlers, until the relay takes them.
    #[cfg(feature = "storage")]
    events: EventHandlerTable,
    init: Vec<(&'static str, Hook)>,
    shutdown: Vec<(&'static str, Hook)>,
}

/// Declarations only: builds each module without a context. What the OpenAPI document is
/// made from.
pub fn declarations(modules: &[&'static dyn Module]) -> Vec<ModuleBuilder> {
    modules
        .iter()
        .map(|module| {
            let mut builder = ModuleBuilder::new(module.name(), module.description());
            module.build(&mut builder);
            builder
        })
        .collect()
}

/// Builds and wires `modules` (already resolved, in order) against `ctx`: checks each
/// module's config section, runs its factories, and starts the bus, the readiness checks
/// (core's own for the backends, then the modules') and the event handler table.
pub fn assemble(modules: &[&'static dyn Module], ctx: &AppContext) -> anyhow::Result<Assembly> {
    let mut bus = BusBuilder::default();
    let mut events = EventHandlerTable::default();
    let mut checks = ctx.core_checks();
    let mut assembly = Assembly {
        apis: Vec::new(),
        #[cfg(feature = "storage")]
        migrations: vec![
            ("core", jobs::MIGRATIONS),
            ("core.events", events::MIGRATIONS),
        ],
        #[cfg(feature = "storage")]
        jobs: Vec::new(),
        #[cfg(feature = "storage")]
        scheduler: None,
        #[cfg(feature = "storage")]
        events: EventHandlerTable::default(),
        init: Vec::new(),
        shutdown: Vec::new(),
    };

    for section in ctx.config().modules.keys() {
        if !modules.iter().any(|m| m.name() == section) {
            tracing::warn!(
                section = %format!("modules.{section}"),
                "configuration for a module that is not compiled in; ignored"
            );
        }
    }

    for builder in declarations(modules) {
        let name = builder.module;
        let mctx = ModuleContext::new(ctx, name);
        if let Some(check) = builder.config_check {
            check(ctx.loaded_config(), name).with_context(|| format!("module `{name}`"))?;
        }
        for wire in builder.wiring {
            wire(&mctx, &mut bus, &mut events).with_context(|| format!("module `{name}`"))?;
        }
        for check in builder.checks {
            let probe = (check.factory)(&mctx)
                .with_context(|| format!("module `{name}`: readiness check `{}`", check.name))?;
            checks.push(NamedCheck {
                owner: name,
                name: check.name,
                check: probe,
            });
        }
        #[cfg(feature = "storage")]
        for (job_name, factory) in builder.jobs {
            let job =
                factory(&mctx).with_context(|| format!("module `{name}`: job `{job_name}`"))?;
            assembly.jobs.push(NamedJob {
                name: format!("{name}.{job_name}"),
                job,
            });
        }
        for api in builder.apis {
            let routes = (api.mount)(&mctx).with_context(|| format!("module `{name}`: api"))?;
            assembly.apis.push(MountedApi {
                meta: api.meta,
                routes,
            });
        }
        #[cfg(feature = "storage")]
        assembly
            .migrations
            .extend(builder.migrations.into_iter().map(|m| (name, m)));
        assembly
            .init
            .extend(builder.init.into_iter().map(|h| (name, h)));
        assembly
            .shutdown
            .extend(builder.shutdown.into_iter().map(|h| (name, h)));
    }

    for observer in ctx.take_observers() {
        observer(&mut bus, &mut events);
    }
    ctx.bus().start(bus);
    #[cfg(feature = "storage")]
    {
        assembly.jobs.push(purge_job(ctx));
        ctx.database().events().wire(&events);
        assembly.events = events;
    }
    // Without a database no module emits: handlers declared have nothing to handle.
    #[cfg(not(feature = "storage"))]
    drop(events);
    ctx.readiness().start(checks);
    Ok(assembly)
}

/// `core.purge_publications`: removes the publications completed more than `events.retention_ms`
/// ago.
#[cfg(feature = "storage")]
fn purge_job(ctx: &AppContext) -> NamedJob {
    let config = ctx.config().events.clone();
    let db = ctx.database().clone();
    NamedJob {
        name: "core.purge_publications".to_owned(),
        job: jobs::Job::every(
            std::time::Duration::from_millis(config.purge_every_ms),
            move || {
                let db = db.clone();
                let retention = i64::try_from(config.retention_ms).unwrap_or(i64::MAX);
                async move {
                    let before = crate::clock::now_millis().saturating_sub(retention);
                    Ok(events::purge(&db, before).await?)
                }
            },
        ),
    }
}

impl Assembly {
    /// Applies the migrations (core's, then the modules' in order), then runs the init
    /// hooks in module order; the first failure stops start-up.
    pub async fn init(&mut self, ctx: &AppContext) -> anyhow::Result<()> {
        #[cfg(feature = "storage")]
        crate::storage::migrate(ctx.database(), &self.migrations).await?;
        for (module, hook) in self.init.drain(..) {
            hook(ModuleContext::new(ctx, module))
                .await
                .with_context(|| format!("module `{module}`: init failed"))?;
            tracing::debug!(module, "module initialised");
        }
        Ok(())
    }

    /// Starts the periodic jobs (see the `jobs` module) and the relay delivering the
    /// modules' events; a build without storage has neither.
    pub fn start_jobs(&mut self, ctx: &AppContext) {
        #[cfg(feature = "storage")]
        {
            let jobs = std::mem::take(&mut self.jobs);
            self.scheduler = Some(Scheduler::start(ctx.database(), &ctx.config().jobs, jobs));
            ctx.database().events().start_relay(
                ctx.database(),
                &ctx.config().events,
                std::mem::take(&mut self.events),
            );
        }
        #[cfg(not(feature = "storage"))]
        let _ = ctx;
    }

    /// Stops the periodic jobs: none starts again, and a run under way may finish by
    /// `deadline`.
    pub async fn stop_jobs(&mut self, deadline: tokio::time::Instant) {
        #[cfg(feature = "storage")]
        if let Some(scheduler) = self.scheduler.take() {
            scheduler.stop(deadline).await;
        }
        #[cfg(not(feature = "storage"))]
        let _ = deadline;
    }

    /// Runs the shutdown hooks in reverse module order, all of them by `deadline`.
    /// Failures are logged; every hook gets its turn (one past the deadline gets none
    /// and is logged as timed out).
    pub async fn shutdown(mut self, ctx: &AppContext, deadline: tokio::time::Instant) {
        while let Some((module, hook)) = self.shutdown.pop() {
            match tokio::time::timeout_at(deadline, hook(ModuleContext::new(ctx, module))).await {
                Ok(Ok(())) => tracing::info!(module, "module shut down"),
                Ok(Err(error)) => {
                    tracing::error!(module, error = %format!("{error:#}"), "module shutdown failed")
                }
                Err(_) => tracing::error!(module, "module shutdown timed out"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use serde::Deserialize;

    use std::time::Duration;

    use super::*;
    use crate::{
        BuildInfo, Extras, ModuleInfo,
        config::LoadedConfig,
        events::{Event, Published},
        readiness::CheckOutcome,
    };

    type Log = Arc<Mutex<Vec<String>>>;

    struct Recorder {
        name: &'static str,
        log: Log,
        fail_factory: bool,
    }

    #[derive(Debug, Default, Deserialize)]
    #[serde(default, deny_unknown_fields)]
    struct RecorderConfig {
        size: u32,
    }

    impl Module for Recorder {
        fn name(&self) -> &'static str {
            self.name
        }
        fn version(&self) -> &'static str {
            "1.0.0"
        }
        fn build(&self, m: &mut ModuleBuilder) {
            let (init_log, stop_log) = (self.log.clone(), self.log.clone());
            let name = self.name;
            let fail = self.fail_factory;
            m.config::<RecorderConfig>()
                .readiness("self", move |_| {
                    if fail {
                        anyhow::bail!("cannot open the widget store");
                    }
                    Ok(|| async { CheckOutcome::up() })
                })
                .on_init(move |_| async move {
                    init_log.lock().expect("log").push(format!("init {name}"));
                    Ok(())
                })
                .on_shutdown(move |_| async move {
                    stop_log.lock().expect("log").push(format!("stop {name}"));
                    Ok(())
                });
        }
    }

    fn modules(log: &Log, fail: Option<&str>) -> Vec<&'static dyn Module> {
        ["alpha", "beta", "gamma"]
            .into_iter()
            .map(|name| {
                let module: &'static dyn Module = Box::leak(Box::new(Recorder {
                    name,
                    log: log.clone(),
                    fail_factory: fail == Some(name),
                }));
                module
            })
            .collect()
    }

    /// A context on an in-memory database, and the event folder it holds (one each: the
    /// backend locks it).
    async fn context(
        modules: &[&'static dyn Module],
        config: LoadedConfig,
    ) -> (AppContext, tempfile::TempDir) {
        context_with(modules, config, Extras::default()).await
    }

    async fn context_with(
        modules: &[&'static dyn Module],
        config: LoadedConfig,
        extras: Extras,
    ) -> (AppContext, tempfile::TempDir) {
        let infos = modules.iter().map(|m| ModuleInfo::of(*m)).collect();
        let events = tempfile::tempdir().expect("tempdir");
        let spool = events.path().join("spool");
        let config = config
            .set("database.url", "sqlite::memory:")
            .and_then(|c| c.set("database.max_connections", 1))
            .and_then(|c| c.set("mq.file.directory", events.path().display().to_string()))
            .and_then(|c| c.set("mq.spool.directory", spool.display().to_string()))
            .expect("settings");
        let ctx = AppContext::connect(config, infos, BuildInfo::unknown(), extras)
            .await
            .expect("connects");
        (ctx, events)
    }

    #[tokio::test]
    async fn init_runs_in_module_order_and_shutdown_in_reverse() {
        let log = Log::default();
        let modules = modules(&log, None);
        let (ctx, _events) = context(&modules, LoadedConfig::defaults()).await;
        let mut assembly = assemble(&modules, &ctx).expect("assembles");
        assembly.init(&ctx).await.expect("init");
        assembly
            .shutdown(&ctx, tokio::time::Instant::now() + Duration::from_secs(1))
            .await;
        let log = log.lock().expect("log").clone();
        assert_eq!(
            log,
            [
                "init alpha",
                "init beta",
                "init gamma",
                "stop gamma",
                "stop beta",
                "stop alpha"
            ]
        );
        let report = ctx.readiness().run(Duration::from_secs(1)).await;
        let names: Vec<&str> = report.checks.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "core.database",
                "core.cache",
                "core.queue",
                "alpha.self",
                "beta.self",
                "gamma.self"
            ]
        );
    }

    #[tokio::test]
    async fn a_bad_module_section_stops_start_up_naming_module_and_key() {
        let log = Log::default();
        let modules = modules(&log, None);
        let config = LoadedConfig::defaults()
            .set("modules.beta.size", "huge")
            .expect("raw sections are checked by their module");
        let (ctx, _events) = context(&modules, config).await;
        let err = assemble(&modules, &ctx).err().expect("bad config");
        let text = format!("{err:#}");
        assert!(text.contains("module `beta`"), "{text}");
        assert!(text.contains("`modules.beta.size`"), "{text}");
    }

    #[tokio::test]
    async fn a_failing_factory_stops_start_up_naming_the_module() {
        let log = Log::default();
        let modules = modules(&log, Some("gamma"));
        let (ctx, _events) = context(&modules, LoadedConfig::defaults()).await;
        let err = assemble(&modules, &ctx).err().expect("factory fails");
        let text = format!("{err:#}");
        assert!(text.contains("module `gamma`"), "{text}");
        assert!(text.contains("cannot open the widget store"), "{text}");
    }

    /// Counts how often its service is built; its handler answers with the service's id.
    struct Counted(Arc<std::sync::atomic::AtomicUsize>);

    #[derive(Debug)]
    struct WhoServes;
    impl crate::bus::Request for WhoServes {
        type Response = usize;
    }

    impl Module for Counted {
        fn name(&self) -> &'static str {
            "counted"
        }
        fn version(&self) -> &'static str {
            "1.0.0"
        }
        fn build(&self, m: &mut ModuleBuilder) {
            let builds = self.0.clone();
            m.service(move |_| {
                Ok(Arc::new(
                    builds.fetch_add(1, std::sync::atomic::Ordering::SeqCst),
                ))
            })
            .handle(|service: Arc<usize>, _: WhoServes| async move { *service })
            .readiness("self", |_| Ok(|| async { CheckOutcome::up() }))
            .on_init(|service, ctx| async move {
                anyhow::ensure!(ctx.module() == "counted" && *service == 0);
                Ok(())
            });
        }
    }

    #[tokio::test]
    async fn a_module_service_is_built_once_and_shared_by_its_declarations() {
        let builds = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let module: &'static dyn Module = Box::leak(Box::new(Counted(builds.clone())));
        let (ctx, _events) = context(&[module], LoadedConfig::defaults()).await;
        let mut assembly = assemble(&[module], &ctx).expect("assembles");
        assembly
            .init(&ctx)
            .await
            .expect("the hook sees the service");
        assert_eq!(ctx.bus().request(WhoServes).await, Ok(0));
        assert_eq!(builds.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[derive(Debug, Clone, PartialEq)]
    struct Pinged(u32);
    impl crate::bus::Message for Pinged {}

    #[tokio::test]
    async fn extras_hand_the_modules_their_clock_and_the_caller_what_was_published() {
        let manual = crate::clock::ManualClock::at(5_000);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let extras = Extras::default()
            .clock(manual.clock())
            .observe_bus(move |message: Pinged| log.lock().expect("log").push(message));
        let module: &'static dyn Module = Box::leak(Box::new(Counted(Arc::new(
            std::sync::atomic::AtomicUsize::new(0),
        ))));
        let (ctx, _events) = context_with(&[module], LoadedConfig::defaults(), extras).await;
        assemble(&[module], &ctx).expect("assembles");

        assert_eq!(
            ctx.bus().publish(Pinged(7)).await,
            1,
            "the observer subscribes"
        );
        assert_eq!(*seen.lock().expect("log"), [Pinged(7)]);
        let mctx = ModuleContext::new(&ctx, "counted");
        manual.advance(Duration::from_secs(3));
        assert_eq!(mctx.clock().now_millis(), 8_000);
    }

    #[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
    struct Noted(u32);
    impl Event for Noted {
        const NAME: &'static str = "noted";
    }

    #[cfg(feature = "sqlite")]
    #[tokio::test]
    async fn an_events_observer_is_handed_every_event_once_its_transaction_committed() {
        let (sender, mut received) = tokio::sync::mpsc::unbounded_channel();
        let extras = Extras::default().observe_events(move |event: Published<Noted>| {
            let _ = sender.send(event.0);
        });
        let (ctx, _events) = context_with(&[], LoadedConfig::defaults(), extras).await;
        let mut assembly = assemble(&[], &ctx).expect("assembles");
        assembly.init(&ctx).await.expect("migrates");
        assembly.start_jobs(&ctx);

        let db = ctx.database().for_module("test");
        let tx = db.begin().await.expect("begins");
        tx.emit(&Noted(3)).await.expect("emits");
        tx.commit().await.expect("commits");
        let seen = tokio::time::timeout(Duration::from_secs(5), received.recv()).await;
        assert_eq!(seen, Ok(Some(3)));
        assembly
            .stop_jobs(tokio::time::Instant::now() + Duration::from_secs(1))
            .await;
        assert_eq!(ctx.stop_events(Duration::from_secs(1)).await, 0);
    }
}
