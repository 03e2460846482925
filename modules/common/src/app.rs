//! The facts the common module reports, gathered from the context. No HTTP types here.

use std::time::Duration;

use trellis_core::{
    AppContext, BuildInfo, ModuleInfo, clock::Timestamp, readiness::ReadinessReport,
};

use crate::CommonConfig;

/// The common module's application service.
#[derive(Debug, Clone)]
pub struct Common {
    ctx: AppContext,
    readiness_timeout: Duration,
    details_public: bool,
}

/// Who is asking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caller {
    /// A request on the public port.
    Public,
    /// A request on the admin listener.
    Operator,
}

/// Build facts plus the running process's start time and uptime.
#[derive(Debug, Clone)]
pub struct Info {
    /// Build facts.
    pub build: BuildInfo,
    /// Start time.
    pub started_at: Timestamp,
    /// Whole seconds since start.
    pub uptime_seconds: u64,
}

impl Common {
    /// The service over `ctx`.
    pub fn new(ctx: AppContext, config: CommonConfig) -> Self {
        Self {
            readiness_timeout: Duration::from_millis(config.readiness_timeout_ms),
            details_public: !ctx.config().server.admin.enabled,
            ctx,
        }
    }

    /// Runs every readiness check.
    pub async fn readiness(&self) -> ReadinessReport {
        self.ctx.readiness().run(self.readiness_timeout).await
    }

    /// Whether readiness details (check names, failure texts) go to `caller`: to anyone
    /// while the admin listener is off, only to operators on it while it is on.
    pub fn readiness_details_for(&self, caller: Caller) -> bool {
        self.details_public || caller == Caller::Operator
    }

    /// Build and process facts.
    pub fn info(&self) -> Info {
        Info {
            build: self.ctx.build_info().clone(),
            started_at: Timestamp::from(self.ctx.started_at()),
            uptime_seconds: self.ctx.uptime().as_secs(),
        }
    }

    /// The compiled-in modules, in start-up order.
    pub fn modules(&self) -> &[ModuleInfo] {
        self.ctx.modules()
    }
}
