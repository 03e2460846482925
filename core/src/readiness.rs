//! Readiness checks: what `/readyz` runs.
//!
//! Modules (and core's own storage and queue) declare checks; the registry runs them all
//! concurrently, each under a deadline, and reports status and latency per check.

use std::{
    sync::{
        Arc, OnceLock,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use futures_util::future::{BoxFuture, join_all};

use crate::metrics::DEPENDENCY_UP;

/// Marks a request that arrived on the admin listener (`[server.admin]`). While that
/// listener is on, `/readyz` describes the checks only to such requests: check names and
/// failure texts (addresses, error messages) are for operators, not for the public port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdminRequest;

/// The state of one dependency.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum CheckStatus {
    /// Working.
    Up,
    /// Working with reduced capability (e.g. cache down, database answering).
    Degraded,
    /// Not working: the server is not ready.
    Down,
}

impl CheckStatus {
    /// `up`, `degraded` or `down`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Up => "up",
            Self::Degraded => "degraded",
            Self::Down => "down",
        }
    }
}

/// What a check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckOutcome {
    /// Status.
    pub status: CheckStatus,
    /// Why, when not up.
    pub detail: Option<String>,
}

impl CheckOutcome {
    /// Up.
    pub fn up() -> Self {
        Self {
            status: CheckStatus::Up,
            detail: None,
        }
    }

    /// Degraded, with a reason.
    pub fn degraded(detail: impl Into<String>) -> Self {
        Self {
            status: CheckStatus::Degraded,
            detail: Some(detail.into()),
        }
    }

    /// Down, with a reason.
    pub fn down(detail: impl Into<String>) -> Self {
        Self {
            status: CheckStatus::Down,
            detail: Some(detail.into()),
        }
    }
}

/// A readiness check.
pub trait ReadinessCheck: Send + Sync + 'static {
    /// Probes the dependency.
    fn check(&self) -> BoxFuture<'static, CheckOutcome>;
}

impl<F, Fut> ReadinessCheck for F
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = CheckOutcome> + Send + 'static,
{
    fn check(&self) -> BoxFuture<'static, CheckOutcome> {
        Box::pin(self())
    }
}

/// A check with its owner and name.
#[derive(Clone)]
pub struct NamedCheck {
    /// `core` or the module's name.
    pub owner: &'static str,
    /// The check's name within its owner.
    pub name: &'static str,
    /// The probe.
    pub check: Arc<dyn ReadinessCheck>,
}

impl NamedCheck {
    /// `<owner>.<name>`, probed by `check`.
    pub fn new(owner: &'static str, name: &'static str, check: impl ReadinessCheck) -> Self {
        Self {
            owner,
            name,
            check: Arc::new(check),
        }
    }
}

/// One check's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckReport {
    /// `<owner>.<name>`.
    pub name: String,
    /// Status.
    pub status: CheckStatus,
    /// How long the probe took.
    pub latency: Duration,
    /// Why, when not up.
    pub detail: Option<String>,
}

/// All checks' results; `status` is the worst of them (up when there are none), or down
/// while the server drains.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadinessReport {
    /// Overall status.
    pub status: CheckStatus,
    /// Per check, in registration order (none while draining).
    pub checks: Vec<CheckReport>,
    /// The server is shutting down: proxies should stop routing here.
    pub draining: bool,
}

/// The registered checks, frozen once the modules are wired, and whether the server
/// drains.
#[derive(Clone, Default)]
pub struct Readiness {
    checks: Arc<OnceLock<Vec<NamedCheck>>>,
    draining: Arc<AtomicBool>,
}

impl std::fmt::Debug for Readiness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let count = self.checks.get().map_or(0, Vec::len);
        f.debug_struct("Readiness").field("checks", &count).finish()
    }
}

impl Readiness {
    /// Freezes the checks (later calls are ignored; returns false).
    pub fn start(&self, checks: Vec<NamedCheck>) -> bool {
        self.checks.set(checks).is_ok()
    }

    /// From now on the server is not ready: it is shutting down.
    pub fn begin_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    /// Whether the server is shutting down.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Runs every check concurrently; a check slower than `timeout` is down. While
    /// draining, runs none and reports down.
    pub async fn run(&self, timeout: Duration) -> ReadinessReport {
        if self.is_draining() {
            return ReadinessReport {
                status: CheckStatus::Down,
                checks: Vec::new(),
                draining: true,
            };
        }
        let checks = self.checks.get().map(Vec::as_slice).unwrap_or_default();
        let checks = join_all(checks.iter().map(|named| async move {
            let started = Instant::now();
            let outcome = tokio::time::timeout(timeout, named.check.check())
                .await
                .unwrap_or_else(|_| {
                    CheckOutcome::down(format!("no answer within {} ms", timeout.as_millis()))
                });
            let name = format!("{}.{}", named.owner, named.name);
            let up = outcome.status == CheckStatus::Up;
            metrics::gauge!(DEPENDENCY_UP, "dependency" => name.clone())
                .set(f64::from(u8::from(up)));
            CheckReport {
                name,
                status: outcome.status,
                latency: started.elapsed(),
                detail: outcome.detail,
            }
        }))
        .await;
        let status = checks
            .iter()
            .map(|c| c.status)
            .max()
            .unwrap_or(CheckStatus::Up);
        ReadinessReport {
            status,
            checks,
            draining: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn named(name: &'static str, check: impl ReadinessCheck) -> NamedCheck {
        NamedCheck {
            owner: "test",
            name,
            check: Arc::new(check),
        }
    }

    #[tokio::test]
    async fn worst_check_decides_and_slow_checks_are_down() {
        let readiness = Readiness::default();
        readiness.start(vec![
            named("fast", || async { CheckOutcome::up() }),
            named("cache", || async {
                CheckOutcome::degraded("redis unreachable")
            }),
            named("slow", || async {
                tokio::time::sleep(Duration::from_secs(5)).await;
                CheckOutcome::up()
            }),
        ]);
        let report = readiness.run(Duration::from_millis(50)).await;
        assert_eq!(report.status, CheckStatus::Down);
        let statuses: Vec<_> = report
            .checks
            .iter()
            .map(|c| (c.name.as_str(), c.status))
            .collect();
        assert_eq!(
            statuses,
            [
                ("test.fast", CheckStatus::Up),
                ("test.cache", CheckStatus::Degraded),
                ("test.slow", CheckStatus::Down)
            ]
        );
    }

    #[tokio::test]
    async fn a_draining_server_is_not_ready_whatever_its_checks() {
        let readiness = Readiness::default();
        readiness.start(vec![named("fast", || async { CheckOutcome::up() })]);
        assert_eq!(
            readiness.run(Duration::from_millis(50)).await.status,
            CheckStatus::Up
        );
        readiness.begin_draining();
        let report = readiness.run(Duration::from_millis(50)).await;
        assert_eq!(report.status, CheckStatus::Down);
        assert!(report.draining);
    }

    #[tokio::test]
    async fn no_checks_is_ready() {
        let report = Readiness::default().run(Duration::from_millis(10)).await;
        assert_eq!(report.status, CheckStatus::Up);
        assert!(report.checks.is_empty());
    }
}
