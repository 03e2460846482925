//! Assembly: the server's "modules" step. Builds every module, checks and wires what they
//! declared, and hands back what the server mounts and runs.

use std::time::Duration;

use anyhow::Context as _;

use crate::{
    AppContext, ModuleContext,
    builder::{ApiMeta, Hook, ModuleBuilder, RouteAdder},
    bus::BusBuilder,
    events::EventHandlerTable,
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
    /// Migrations by module, in module order.
    pub migrations: Vec<(&'static str, &'static [Migration])>,
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
        migrations: Vec::new(),
        init: Vec::new(),
        shutdown: Vec::new(),
    };

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
    ctx.event_handlers().start(events);
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

    /// Runs the shutdown hooks in reverse module order, each within `timeout`. Failures
    /// are logged; every hook gets its turn.
    pub async fn shutdown(mut self, ctx: &AppContext, timeout: Duration) {
        while let Some((module, hook)) = self.shutdown.pop() {
            match tokio::time::timeout(timeout, hook(ctx.clone())).await {
                Ok(Ok(())) => tracing::info!(module, "module shut down"),
                Ok(Err(error)) => {
                    tracing::error!(module, error = %format!("{error:#}"), "module shutdown failed")
                }
                Err(_) => tracing::error!(
                    module,
                    timeout_ms = timeout.as_millis() as u64,
                    "module shutdown timed out"
                ),
            }
        }
    }
}
