//! Periodic jobs: housekeeping such as purging expired rows. A module declares a job with
//! [`ModuleBuilder::job`](crate::ModuleBuilder::job); every instance runs a scheduler,
//! and each period's run is claimed in the database, so that with several instances on
//! one database a job runs on exactly one of them per period, and never twice at once.
//!
//! The claim is one conditional `UPDATE` of the job's row in `trellis_jobs` (the same
//! statement on SQLite and PostgreSQL): it moves the next due time one period ahead and
//! takes a lease, only if the job is due and not leased. An instance that dies during a
//! run leaves the lease to expire (`jobs.timeout_ms` past the start); the run of the
//! next period goes ahead elsewhere. A run longer than `jobs.timeout_ms` is stopped.
//!
//! Metrics: `jobs_runs_total{job, outcome}`, `jobs_items_total{job}` (what the runs
//! removed or processed), `jobs_run_duration_seconds{job}` and
//! `jobs_last_success_timestamp_seconds{job}`, which alerts can compare with the period.

use std::{sync::Arc, time::Duration};

use futures_util::future::BoxFuture;
use metrics::{counter, gauge, histogram};
use sqlx::Row as _;
use tokio::{task::JoinSet, time::Instant};
use tokio_util::sync::CancellationToken;

use crate::{
    clock::now_millis,
    config::JobsConfig,
    metrics::{
        JOBS_ITEMS_TOTAL, JOBS_LAST_SUCCESS_TIMESTAMP_SECONDS, JOBS_RUN_DURATION_SECONDS,
        JOBS_RUNS_TOTAL,
    },
    storage::{Database, Migration},
};

type RunFn = Arc<dyn Fn() -> BoxFuture<'static, anyhow::Result<u64>> + Send + Sync>;

/// A periodic job: what to run, and how often.
#[derive(Clone)]
pub struct Job {
    every: Duration,
    run: RunFn,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job").field("every", &self.every).finish()
    }
}

impl Job {
    /// Runs `run` once per `every` (over all instances). `run` returns how many items it
    /// removed or processed, for the metrics.
    pub fn every<F, Fut>(every: Duration, run: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = anyhow::Result<u64>> + Send + 'static,
    {
        Self {
            every: every.max(Duration::from_millis(1)),
            run: Arc::new(move || Box::pin(run())),
        }
    }
}

/// A job with its full name, `<module>.<name>`.
#[derive(Debug, Clone)]
pub struct NamedJob {
    /// `<module>.<name>`.
    pub name: String,
    /// The job.
    pub job: Job,
}

/// The table the claims are made in.
pub static MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    name: "create trellis_jobs",
    sqlite: TABLE,
    postgres: TABLE,
}];

const TABLE: &str = "CREATE TABLE trellis_jobs (
    name TEXT PRIMARY KEY,
    due_at BIGINT NOT NULL,
    leased_until BIGINT NOT NULL,
    owner TEXT,
    last_started_at BIGINT,
    last_finished_at BIGINT,
    last_outcome TEXT,
    last_items BIGINT
)";

/// The running scheduler; [`Scheduler::stop`] ends it.
pub struct Scheduler {
    tasks: JoinSet<()>,
    stop: CancellationToken,
}

impl Scheduler {
    /// Starts one task per job. Does nothing while `jobs.enabled` is off.
    pub fn start(db: &Database, config: &JobsConfig, jobs: Vec<NamedJob>) -> Self {
        let stop = CancellationToken::new();
        let mut tasks = JoinSet::new();
        if config.enabled {
            let owner: Arc<str> = Arc::from(uuid::Uuid::new_v4().simple().to_string());
            let timeout = Duration::from_millis(config.timeout_ms.max(1000));
            for job in jobs {
                let claims = Claims {
                    db: db.clone(),
                    owner: owner.clone(),
                    name: job.name.clone(),
                };
                tasks.spawn(schedule(claims, job.job, timeout, stop.clone()));
            }
        }
        Self { tasks, stop }
    }

    /// Stops scheduling; a run under way may finish until `deadline`, then is dropped
    /// (its lease expires by itself).
    pub async fn stop(mut self, deadline: Instant) {
        self.stop.cancel();
        if tokio::time::timeout_at(deadline, async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await
        .is_err()
        {
            tracing::warn!("a job was still running at the end of the shutdown budget");
            self.tasks.abort_all();
        }
    }
}

/// One job's row in `trellis_jobs`, as this instance sees it.
struct Claims {
    db: Database,
    owner: Arc<str>,
    name: String,
}

impl Claims {
    /// Makes sure the row exists (due at once when new).
    async fn register(&self) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO trellis_jobs (name, due_at, leased_until) VALUES ($1, $2, 0) \
             ON CONFLICT (name) DO NOTHING",
        )
        .bind(&self.name)
        .bind(now_millis())
        .execute(self.db.pool())
        .await
        .map(|_| ())
    }

    /// Claims this period's run: true when this instance is to run it now.
    async fn claim(&self, every: Duration, lease: Duration) -> Result<bool, sqlx::Error> {
        let now = now_millis();
        let done = sqlx::query(
            "UPDATE trellis_jobs SET due_at = $2, leased_until = $3, owner = $4, \
             last_started_at = $5 \
             WHERE name = $1 AND due_at <= $5 AND leased_until <= $5",
        )
        .bind(&self.name)
        .bind(now.saturating_add(millis(every)))
        .bind(now.saturating_add(millis(lease)))
        .bind(&*self.owner)
        .bind(now)
        .execute(self.db.pool())
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Records the outcome and gives the lease back.
    async fn finish(&self, outcome: &str, items: u64) -> Result<(), sqlx::Error> {
        sqlx::query(
            "UPDATE trellis_jobs SET leased_until = 0, last_finished_at = $3, \
             last_outcome = $4, last_items = $5 WHERE name = $1 AND owner = $2",
        )
        .bind(&self.name)
        .bind(&*self.owner)
        .bind(now_millis())
        .bind(outcome)
        .bind(i64::try_from(items).unwrap_or(i64::MAX))
        .execute(self.db.pool())
        .await
        .map(|_| ())
    }

    /// How long until the job may be due again, as the table says.
    async fn wait(&self) -> Result<Duration, sqlx::Error> {
        let row = sqlx::query("SELECT due_at, leased_until FROM trellis_jobs WHERE name = $1")
            .bind(&self.name)
            .fetch_one(self.db.pool())
            .await?;
        let due: i64 = row.try_get(0)?;
        let leased: i64 = row.try_get(1)?;
        let wait = due.max(leased).saturating_sub(now_millis());
        Ok(Duration::from_millis(u64::try_from(wait).unwrap_or(0)))
    }
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

/// One job's loop: claim when due, run, record; until stopped.
async fn schedule(claims: Claims, job: Job, timeout: Duration, stop: CancellationToken) {
    let name = claims.name.as_str();
    // A database that is down is retried at this pace, never faster than the period.
    let retry = job.every.min(Duration::from_secs(30));
    let mut registered = false;
    loop {
        let wait = async {
            if !registered {
                claims.register().await?;
                registered = true;
            }
            if claims.claim(job.every, timeout).await? {
                run(&claims, &job, timeout, name).await;
            }
            claims.wait().await
        };
        let wait = match wait.await {
            Ok(wait) => wait,
            Err(error) => {
                tracing::warn!(job = name, %error, "job scheduling failed; retrying");
                retry
            }
        };
        // A little spread, so that instances do not all ask at the same instant.
        let jitter =
            Duration::from_millis(rand::random_range(0..=job.every.as_millis().min(250)) as u64);
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(wait + jitter) => {},
        }
    }
}

/// Runs the claimed job within `timeout`, and records it.
async fn run(claims: &Claims, job: &Job, timeout: Duration, label: &str) {
    let started = Instant::now();
    let outcome = tokio::time::timeout(timeout, (job.run)()).await;
    let took = started.elapsed();
    let (outcome, items) = match outcome {
        Ok(Ok(items)) => {
            tracing::info!(
                job = label,
                items,
                took_ms = took.as_millis() as u64,
                "job ran"
            );
            gauge!(JOBS_LAST_SUCCESS_TIMESTAMP_SECONDS, "job" => label.to_owned())
                .set(now_millis() as f64 / 1000.0);
            counter!(JOBS_ITEMS_TOTAL, "job" => label.to_owned()).increment(items);
            ("ok", items)
        }
        Ok(Err(error)) => {
            tracing::error!(job = label, error = %format!("{error:#}"), "job failed");
            ("failed", 0)
        }
        Err(_) => {
            tracing::error!(
                job = label,
                timeout_ms = timeout.as_millis() as u64,
                "job timed out"
            );
            ("timed_out", 0)
        }
    };
    counter!(JOBS_RUNS_TOTAL, "job" => label.to_owned(), "outcome" => outcome).increment(1);
    histogram!(JOBS_RUN_DURATION_SECONDS, "job" => label.to_owned()).record(took.as_secs_f64());
    if let Err(error) = claims.finish(outcome, items).await {
        tracing::warn!(job = label, %error, "recording a job run failed; its lease will expire");
    }
}
