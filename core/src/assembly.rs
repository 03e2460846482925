//! Assembly: the server's "modules" step. Builds every module, checks and wires what they
//! declared, and hands back what the server mounts and runs.

use anyhow::Context as _;

use crate::{
    AppContext, ModuleContext,
    builder::{ApiMeta, Hook, ModuleBuilder, RouteAdder},
    bus::BusBuilder,
    events::EventHandlerTable,
    jobs::{self, NamedJob},
    module::Module,
    readiness::NamedCheck,
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
    pub migrations: Vec<(&'static str, &'static [Migration])>,
    /// Periodic jobs, in module order.
    pub jobs: Vec<NamedJob>,
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
/// and the event handler table. `core_checks` are core's own readiness checks.
pub fn assemble(
    modules: &[&'static dyn Module],
    ctx: &AppContext,
    core_checks: Vec<NamedCheck>,
) -> anyhow::Result<Assembly> {
    let mut bus = BusBuilder::default();
    let mut events = EventHandlerTable::default();
    let mut checks = core_checks;
    let mut assembly = Assembly {
        apis: Vec::new(),
        migrations: vec![("core", jobs::MIGRATIONS)],
        jobs: Vec::new(),
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

    ctx.bus().start(bus);
    ctx.events().start(events);
    ctx.readiness().start(checks);
    Ok(assembly)
}

impl Assembly {
    /// Runs the init hooks in module order; the first failure stops start-up.
    pub async fn init(&mut self, ctx: &AppContext) -> anyhow::Result<()> {
        for (module, hook) in self.init.drain(..) {
            hook(ctx.clone())
                .await
                .with_context(|| format!("module `{module}`: init failed"))?;
            tracing::debug!(module, "module initialised");
        }
        Ok(())
    }

    /// Runs the shutdown hooks in reverse module order, all of them by `deadline`.
    /// Failures are logged; every hook gets its turn (one past the deadline gets none
    /// and is logged as timed out).
    pub async fn shutdown(mut self, ctx: &AppContext, deadline: tokio::time::Instant) {
        while let Some((module, hook)) = self.shutdown.pop() {
            match tokio::time::timeout_at(deadline, hook(ctx.clone())).await {
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
        BuildInfo, ModuleInfo, config::LoadedConfig, readiness::CheckOutcome, storage::Storage,
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

    /// A context, and the event folder it holds (one each: the backend locks it).
    async fn context(
        modules: &[&'static dyn Module],
        config: LoadedConfig,
    ) -> (AppContext, tempfile::TempDir) {
        let infos = modules.iter().map(|m| ModuleInfo::of(*m)).collect();
        let storage = Storage::ephemeral().await.expect("storage");
        let mut mq = crate::config::MqConfig::default();
        let events = tempfile::tempdir().expect("tempdir");
        mq.file.directory = events.path().to_path_buf();
        let queue = crate::mq::MessageQueue::connect(&mq).await.expect("queue");
        let ctx = AppContext::new(config, infos, BuildInfo::unknown(), storage, queue);
        (ctx, events)
    }

    #[tokio::test]
    async fn init_runs_in_module_order_and_shutdown_in_reverse() {
        let log = Log::default();
        let modules = modules(&log, None);
        let (ctx, _events) = context(&modules, LoadedConfig::defaults()).await;
        let mut assembly = assemble(&modules, &ctx, Vec::new()).expect("assembles");
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
        assert_eq!(report.checks.len(), 3);
    }

    #[tokio::test]
    async fn a_bad_module_section_stops_start_up_naming_module_and_key() {
        let log = Log::default();
        let modules = modules(&log, None);
        let config = LoadedConfig::defaults()
            .set("modules.beta.size", "huge")
            .expect("raw sections are checked by their module");
        let (ctx, _events) = context(&modules, config).await;
        let err = assemble(&modules, &ctx, Vec::new())
            .err()
            .expect("bad config");
        let text = format!("{err:#}");
        assert!(text.contains("module `beta`"), "{text}");
        assert!(text.contains("`modules.beta.size`"), "{text}");
    }

    #[tokio::test]
    async fn a_failing_factory_stops_start_up_naming_the_module() {
        let log = Log::default();
        let modules = modules(&log, Some("gamma"));
        let (ctx, _events) = context(&modules, LoadedConfig::defaults()).await;
        let err = assemble(&modules, &ctx, Vec::new())
            .err()
            .expect("factory fails");
        let text = format!("{err:#}");
        assert!(text.contains("module `gamma`"), "{text}");
        assert!(text.contains("cannot open the widget store"), "{text}");
    }
}
