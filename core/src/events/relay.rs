//! The relay: claims due publications, runs their handlers, records the outcome.

use std::{
    panic::AssertUnwindSafe,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use crate::telemetry::InTrace as _;
use futures_util::{FutureExt as _, StreamExt as _, stream};
use metrics::{counter, gauge};
use tokio::{task::JoinHandle, time::Instant};
use tokio_util::sync::CancellationToken;

use super::{
    EventHandlerTable, Stored,
    publications::{self, Publications},
};
use crate::{
    clock::now_millis,
    config::EventsConfig,
    metrics::{
        EVENT_PUBLICATIONS, EVENT_PUBLICATIONS_COMPLETED_TOTAL, EVENT_PUBLICATIONS_FAILED_TOTAL,
        EVENT_PUBLICATIONS_OLDEST_PENDING_AGE_SECONDS, EVENT_PUBLICATIONS_RETRIED_TOTAL,
    },
    storage::Database,
};

/// How often the backlog gauges are read from the table.
const BACKLOG_EVERY: Duration = Duration::from_secs(1);

/// A running relay.
pub(crate) struct Running {
    stop: CancellationToken,
    task: JoinHandle<()>,
    /// Publications claimed and not yet recorded.
    in_hand: Arc<AtomicUsize>,
}

impl Running {
    pub(crate) fn spawn(
        publications: Publications,
        table: EventHandlerTable,
        db: Database,
        config: EventsConfig,
    ) -> Self {
        let stop = CancellationToken::new();
        let in_hand = Arc::new(AtomicUsize::new(0));
        let relay = Relay {
            instance: uuid::Uuid::new_v4().to_string(),
            table,
            publications,
            db,
            config,
            in_hand: in_hand.clone(),
        };
        let task = tokio::spawn(relay.run(stop.clone()));
        Self {
            stop,
            task,
            in_hand,
        }
    }

    pub(crate) async fn stop(mut self, budget: Duration) -> usize {
        self.stop.cancel();
        match tokio::time::timeout(budget, &mut self.task).await {
            Ok(_) => 0,
            Err(_) => {
                self.task.abort();
                let left = self.in_hand.load(Ordering::Relaxed);
                tracing::warn!(
                    left,
                    "event handlers still running at the end of the shutdown budget; their publications are delivered again later"
                );
                left
            }
        }
    }
}

/// How one handler run ended.
enum Outcome {
    Completed,
    Failed(String),
    /// This build has no handler for the publication: left to an instance that has one.
    NotHere,
}

struct Relay {
    instance: String,
    table: EventHandlerTable,
    publications: Publications,
    db: Database,
    config: EventsConfig,
    in_hand: Arc<AtomicUsize>,
}

impl Relay {
    async fn run(self, stop: CancellationToken) {
        let claim = (!self.table.routes().is_empty())
            .then(|| publications::claim_sql(self.db.backend(), &self.table));
        let poll = Duration::from_millis(self.config.poll_ms.max(1));
        let mut next_backlog = Instant::now();
        let mut last_warning: Option<Instant> = None;
        while !stop.is_cancelled() {
            let mut claimed = 0;
            if let Some(sql) = &claim {
                match self.claim(sql).await {
                    Ok(batch) => {
                        claimed = batch.len();
                        self.deliver(batch).await;
                    }
                    Err(error) => {
                        if last_warning.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                            tracing::warn!(%error, "event publications cannot be claimed; retrying");
                            last_warning = Some(Instant::now());
                        }
                    }
                }
            }
            if Instant::now() >= next_backlog {
                self.record_backlog().await;
                next_backlog = Instant::now() + BACKLOG_EVERY;
            }
            if claimed > 0 && claimed >= self.config.batch {
                continue;
            }
            tokio::select! {
                () = self.publications.woken() => {}
                () = tokio::time::sleep(poll) => {}
                () = stop.cancelled() => {}
            }
        }
    }

    async fn claim(&self, sql: &str) -> Result<Vec<Stored>, sqlx::Error> {
        let now = now_millis();
        let lease = i64::try_from(self.config.lease_ms).unwrap_or(i64::MAX);
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql.to_owned()))
            .bind(now.saturating_add(lease))
            .bind(self.instance.as_str())
            .bind(now)
            .bind(i64::try_from(self.config.batch.max(1)).unwrap_or(i64::MAX))
            .fetch_all(self.db.pool())
            .await?;
        let batch = rows
            .iter()
            .map(publications::stored)
            .collect::<Result<Vec<_>, _>>()?;
        self.in_hand.store(batch.len(), Ordering::Relaxed);
        Ok(batch)
    }

    /// Runs the batch's handlers, `events.workers` at a time, then records the outcomes.
    /// A record that cannot be written leaves the claim to run out: the publication is
    /// delivered again.
    async fn deliver(&self, batch: Vec<Stored>) {
        if batch.is_empty() {
            return;
        }
        let timeout = Duration::from_millis(self.config.handler_timeout_ms);
        let outcomes: Vec<(Stored, Outcome)> = stream::iter(batch)
            .map(|stored| async move {
                let outcome = run_one(&self.table, &stored, timeout).await;
                (stored, outcome)
            })
            .buffer_unordered(self.config.workers.max(1))
            .collect()
            .await;
        let completed: Vec<&str> = outcomes
            .iter()
            .filter(|(_, o)| matches!(o, Outcome::Completed))
            .map(|(s, _)| s.id.as_str())
            .collect();
        if let Err(error) = publications::complete(&self.db, &completed, now_millis()).await {
            tracing::warn!(%error, publications = completed.len(), "completed publications not recorded; they are delivered again");
        }
        for (stored, outcome) in &outcomes {
            match outcome {
                Outcome::Completed => {
                    counter!(EVENT_PUBLICATIONS_COMPLETED_TOTAL, "event" => stored.event.clone(), "module" => stored.listener.clone())
                        .increment(1);
                }
                Outcome::Failed(error) => self.record_failure(stored, error).await,
                Outcome::NotHere => {
                    tracing::warn!(
                        event = stored.event,
                        module = stored.listener,
                        "no handler for this publication in this build; left for another instance"
                    );
                }
            }
        }
        self.in_hand.store(0, Ordering::Relaxed);
    }

    async fn record_failure(&self, stored: &Stored, error: &str) {
        let attempts = stored.attempts + 1;
        let max = i64::from(self.config.max_attempts.max(1));
        let failed = attempts >= max;
        let backoff = crate::backoff::exponential_ms(
            self.config.retry_backoff_ms,
            self.config.retry_backoff_max_ms,
            u32::try_from(attempts).unwrap_or(u32::MAX),
        );
        let due_at = now_millis().saturating_add(i64::try_from(backoff).unwrap_or(i64::MAX));
        let labels = [
            ("event", stored.event.clone()),
            ("module", stored.listener.clone()),
        ];
        if failed {
            counter!(EVENT_PUBLICATIONS_FAILED_TOTAL, &labels).increment(1);
            tracing::error!(
                event = stored.event,
                event_id = stored.event_id,
                publication = stored.id,
                module = stored.listener,
                attempts,
                error,
                "event handler failed every attempt; the publication is kept as failed until resubmitted"
            );
        } else {
            counter!(EVENT_PUBLICATIONS_RETRIED_TOTAL, &labels).increment(1);
            tracing::warn!(
                event = stored.event,
                event_id = stored.event_id,
                module = stored.listener,
                attempt = attempts,
                retry_in_ms = backoff,
                error,
                "event handler failed; retrying"
            );
        }
        if let Err(db_error) =
            publications::record_failure(&self.db, &stored.id, attempts, failed, due_at, error)
                .await
        {
            tracing::warn!(error = %db_error, publication = stored.id, "failed attempt not recorded; the publication is delivered again");
        }
    }

    async fn record_backlog(&self) {
        match publications::backlog(&self.db).await {
            Ok(backlog) => {
                gauge!(EVENT_PUBLICATIONS, "status" => "pending").set(backlog.pending as f64);
                gauge!(EVENT_PUBLICATIONS, "status" => "failed").set(backlog.failed as f64);
                let age = backlog
                    .oldest_pending_ms
                    .map_or(0.0, |t| (now_millis() - t).max(0) as f64 / 1000.0);
                gauge!(EVENT_PUBLICATIONS_OLDEST_PENDING_AGE_SECONDS).set(age);
            }
            Err(error) => tracing::debug!(%error, "publication backlog not read"),
        }
    }
}

/// Runs one publication's handler, with a deadline and panic isolation.
async fn run_one(table: &EventHandlerTable, stored: &Stored, timeout: Duration) -> Outcome {
    let Some(route) = table.route(&stored.event, &stored.listener) else {
        return Outcome::NotHere;
    };
    // Traced when the request that emitted the event was, as a child of its span.
    let traceparent = stored.traceparent.as_deref();
    let span = match crate::telemetry::trace_follows(traceparent) {
        true => tracing::info_span!(
            "event.handle",
            otel.name = format!("event {} {}", stored.event, stored.listener),
            otel.kind = "consumer",
            event = stored.event,
            event_id = stored.event_id,
            module = stored.listener,
            attempt = stored.attempts + 1,
            otel.status_code = tracing::field::Empty,
        ),
        false => tracing::Span::none(),
    };
    crate::telemetry::follow_trace(&span, traceparent);
    let started = std::time::Instant::now();
    let run = AssertUnwindSafe((route.run)(stored))
        .catch_unwind()
        .in_trace(span.clone());
    let outcome = match tokio::time::timeout(timeout, run).await {
        Ok(Ok(Ok(()))) => Outcome::Completed,
        Ok(Ok(Err(error))) => Outcome::Failed(format!("{error:#}")),
        Ok(Err(_)) => Outcome::Failed("the handler panicked".to_owned()),
        Err(_) => Outcome::Failed(format!(
            "the handler did not finish within {} ms (`events.handler_timeout_ms`)",
            timeout.as_millis()
        )),
    };
    route.duration.record(started.elapsed());
    if matches!(outcome, Outcome::Failed(_)) {
        span.record("otel.status_code", "ERROR");
    }
    outcome
}
