//! HTTP surface of the common module.

use poem::{Request, http::StatusCode};
use poem_openapi::{ApiResponse, Object, OpenApi, payload::Json};
use time::format_description::well_known::Rfc3339;
use trellis_core::{
    clock::Timestamp,
    problem::Problem,
    readiness::{AdminRequest, CheckReport, CheckStatus},
};

use crate::app::{Caller, Common};

/// Liveness answer.
#[derive(Debug, Object)]
pub struct Health {
    /// Always `ok`: the process is serving.
    pub status: String,
}

/// One readiness check's result.
#[derive(Debug, Object)]
pub struct Check {
    /// `<owner>.<check>`, e.g. `core.database`.
    pub name: String,
    /// `up`, `degraded` or `down`.
    pub status: String,
    /// How long the probe took, in milliseconds.
    pub latency_ms: f64,
    /// Why, when not up.
    #[oai(skip_serializing_if_is_none)]
    pub detail: Option<String>,
}

impl From<CheckReport> for Check {
    fn from(report: CheckReport) -> Self {
        Self {
            name: report.name,
            status: report.status.as_str().into(),
            latency_ms: report.latency.as_secs_f64() * 1_000.0,
            detail: report.detail,
        }
    }
}

/// Readiness: the overall status and every check.
#[derive(Debug, Object)]
pub struct Readiness {
    /// `up` or `degraded` (a 200 is never `down`).
    pub status: String,
    /// Each check; left out on the public port while the admin listener
    /// (`server.admin`) is on.
    #[oai(skip_serializing_if_is_none)]
    pub checks: Option<Vec<Check>>,
}

/// A failed readiness answer: a problem that also lists every check.
#[derive(Debug, Object)]
pub struct ReadinessProblem {
    /// The problem.
    #[oai(flatten)]
    pub problem: Problem,
    /// Each check; left out on the public port while the admin listener
    /// (`server.admin`) is on.
    #[oai(skip_serializing_if_is_none)]
    pub checks: Option<Vec<Check>>,
}

/// Build and process facts.
#[derive(Debug, Object)]
pub struct Info {
    /// Product name.
    pub name: String,
    /// Server version.
    pub version: String,
    /// Git commit the binary was built from.
    pub git_commit: String,
    /// Git branch the binary was built from.
    pub git_branch: String,
    /// CI build number, or `local`.
    pub build_number: String,
    /// When the binary was built (absent when the build did not record it).
    pub build_time: Option<Timestamp>,
    /// When this process started.
    pub start_time: Timestamp,
    /// Seconds since this process started.
    pub uptime_seconds: u64,
}

/// A compiled-in module.
#[derive(Debug, Object)]
pub struct ModuleSummary {
    /// Name (also its config section and OpenAPI tag).
    pub name: String,
    /// Version.
    pub version: String,
    /// What it does.
    pub description: String,
    /// Modules it requires.
    pub requires: Vec<String>,
}

/// The compiled-in modules, in start-up order.
#[derive(Debug, Object)]
pub struct ModuleList {
    /// The modules.
    pub modules: Vec<ModuleSummary>,
}

#[derive(ApiResponse)]
enum HealthResponse {
    /// The process is alive.
    #[oai(status = 200)]
    Ok(Json<Health>),
}

#[derive(ApiResponse)]
enum ReadyResponse {
    /// Every dependency is up (or degraded but serving).
    #[oai(status = 200)]
    Ready(Json<Readiness>),
    /// A dependency is down, or the instance is draining (`draining`); the problem says
    /// which, and lists every check.
    #[oai(status = 503, content_type = "application/problem+json")]
    NotReady(Json<ReadinessProblem>),
}

#[derive(ApiResponse)]
enum InfoResponse {
    /// Build and process facts.
    #[oai(status = 200)]
    Ok(Json<Info>),
}

#[derive(ApiResponse)]
enum ModulesResponse {
    /// The compiled-in modules.
    #[oai(status = 200)]
    Ok(Json<ModuleList>),
}

/// The common module's API.
pub struct CommonApi {
    common: Common,
}

impl CommonApi {
    /// The API over the service.
    pub fn new(common: Common) -> Self {
        Self { common }
    }
}

#[OpenApi]
impl CommonApi {
    /// Liveness
    ///
    /// Answers as long as the process serves requests; calls no dependency.
    #[oai(path = "/healthz", method = "get", operation_id = "healthz")]
    async fn healthz(&self) -> HealthResponse {
        HealthResponse::Ok(Json(Health {
            status: String::from("ok"),
        }))
    }

    /// Readiness
    ///
    /// Runs every readiness check (database, cache, queue, modules' own) concurrently.
    /// From the moment the server is asked to stop, answers 503 `draining` at once,
    /// while it still serves for `server.shutdown_delay_ms`. While the admin listener (`server.admin`) is on, this port answers the status
    /// only, and the admin listener's `/readyz` names the checks and why they fail.
    #[oai(path = "/readyz", method = "get", operation_id = "readyz")]
    async fn readyz(&self, req: &Request) -> ReadyResponse {
        let caller = match req.data::<AdminRequest>() {
            Some(_) => Caller::Operator,
            None => Caller::Public,
        };
        let details = self.common.readiness_details_for(caller);
        let report = self.common.readiness().await;
        if report.draining {
            return ReadyResponse::NotReady(Json(ReadinessProblem {
                problem: Problem::new(StatusCode::SERVICE_UNAVAILABLE, "draining", "Draining")
                    .with_detail("the instance is shutting down; send requests to another one"),
                checks: details.then(Vec::new),
            }));
        }
        let failing: Vec<&str> = report
            .checks
            .iter()
            .filter(|c| c.status == CheckStatus::Down)
            .map(|c| c.name.as_str())
            .collect();
        let detail = match (failing.is_empty(), details) {
            (true, _) => None,
            (false, true) => Some(format!("readiness check failed: {}", failing.join(", "))),
            (false, false) => Some(String::from("a dependency is not ready")),
        };
        let checks = details.then(|| report.checks.into_iter().map(Check::from).collect());
        match detail {
            None => ReadyResponse::Ready(Json(Readiness {
                status: report.status.as_str().into(),
                checks,
            })),
            Some(detail) => ReadyResponse::NotReady(Json(ReadinessProblem {
                problem: Problem::new(StatusCode::SERVICE_UNAVAILABLE, "not-ready", "Not ready")
                    .with_detail(detail),
                checks,
            })),
        }
    }

    /// Build information
    ///
    /// Version, git commit and branch, build number and time, start time and uptime.
    #[oai(path = "/api/v1/info", method = "get", operation_id = "getInfo")]
    async fn info(&self) -> InfoResponse {
        let info = self.common.info();
        let build = info.build;
        InfoResponse::Ok(Json(Info {
            name: build.name.into(),
            version: build.version.into(),
            git_commit: build.git_commit.into(),
            git_branch: build.git_branch.into(),
            build_number: build.build_number.into(),
            build_time: Timestamp::parse(build.build_time, &Rfc3339).ok(),
            start_time: info.started_at,
            uptime_seconds: info.uptime_seconds,
        }))
    }

    /// Compiled-in modules
    ///
    /// The modules this binary was built with, in start-up order.
    #[oai(path = "/api/v1/modules", method = "get", operation_id = "listModules")]
    async fn modules(&self) -> ModulesResponse {
        let modules = self
            .common
            .modules()
            .iter()
            .map(|m| ModuleSummary {
                name: m.name.into(),
                version: m.version.into(),
                description: m.description.into(),
                requires: m.requires.iter().map(|r| String::from(*r)).collect(),
            })
            .collect();
        ModulesResponse::Ok(Json(ModuleList { modules }))
    }
}
