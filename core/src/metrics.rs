//! Prometheus metrics: the `metrics` facade with the Prometheus exporter as recorder, no
//! listener of its own (the server renders it at `GET /metrics`). Every metric is
//! described here, so `promtool check metrics` finds HELP and TYPE for each.

use std::{sync::OnceLock, time::Duration};

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::config::MetricsConfig;

/// Requests served, by method, route template and status.
pub const HTTP_REQUESTS_TOTAL: &str = "http_requests_total";
/// Request duration histogram, by method, route template and status.
pub const HTTP_REQUEST_DURATION_SECONDS: &str = "http_request_duration_seconds";
/// Requests being served right now.
pub const HTTP_REQUESTS_IN_FLIGHT: &str = "http_requests_in_flight";
/// Open client connections, over every listener.
pub const HTTP_CONNECTIONS_OPEN: &str = "http_connections_open";
/// Connections and requests answered 503 because a cap was reached, by `limit`
/// (`connections`: `server.max_connections`, `in_flight`: `server.max_in_flight`).
pub const HTTP_OVERLOAD_REJECTIONS_TOTAL: &str = "http_overload_rejections_total";
/// Connections closed because a request's header did not arrive within
/// `server.header_read_timeout_ms`.
pub const HTTP_HEADER_TIMEOUTS_TOTAL: &str = "http_header_timeouts_total";
/// Trace spans exported to `tracing.endpoint`.
pub const TRACE_SPANS_EXPORTED_TOTAL: &str = "trace_spans_exported_total";
/// Trace spans dropped, by reason (`queue_full`: `tracing.max_queue_size` were waiting;
/// `export_failed`: the endpoint was down or refused them).
pub const TRACE_SPANS_DROPPED_TOTAL: &str = "trace_spans_dropped_total";
/// Periodic job runs on this instance, by job and outcome (`ok`, `failed`, `timed_out`).
pub const JOBS_RUNS_TOTAL: &str = "jobs_runs_total";
/// Items a job's runs removed or processed, by job.
pub const JOBS_ITEMS_TOTAL: &str = "jobs_items_total";
/// Job run duration histogram, by job.
pub const JOBS_RUN_DURATION_SECONDS: &str = "jobs_run_duration_seconds";
/// When a job last succeeded on this instance (Unix seconds), by job.
pub const JOBS_LAST_SUCCESS_TIMESTAMP_SECONDS: &str = "jobs_last_success_timestamp_seconds";
/// Query duration histogram, by module and operation.
pub const DB_QUERY_DURATION_SECONDS: &str = "db_query_duration_seconds";
/// Failed queries, by module, operation and kind.
pub const DB_QUERY_ERRORS_TOTAL: &str = "db_query_errors_total";
/// Pooled database connections, by state (`in_use`, `idle`).
pub const DB_POOL_CONNECTIONS: &str = "db_pool_connections";
/// Cache hits, by module.
pub const CACHE_HITS_TOTAL: &str = "cache_hits_total";
/// Cache misses (failures included), by module.
pub const CACHE_MISSES_TOTAL: &str = "cache_misses_total";
/// Failed cache operations, by operation.
pub const CACHE_ERRORS_TOTAL: &str = "cache_errors_total";
/// 1 while the cache answers, 0 during an outage.
pub const CACHE_UP: &str = "cache_up";
/// Publications by status (`pending`, `failed`), over the whole database.
pub const EVENT_PUBLICATIONS: &str = "event_publications";
/// Age of the oldest pending publication.
pub const EVENT_PUBLICATIONS_OLDEST_PENDING_AGE_SECONDS: &str =
    "event_publications_oldest_pending_age_seconds";
/// Publications whose handler ran, by event and module.
pub const EVENT_PUBLICATIONS_COMPLETED_TOTAL: &str = "event_publications_completed_total";
/// Handler attempts that failed and will be retried, by event and module.
pub const EVENT_PUBLICATIONS_RETRIED_TOTAL: &str = "event_publications_retried_total";
/// Publications whose handler failed every attempt, by event and module.
pub const EVENT_PUBLICATIONS_FAILED_TOTAL: &str = "event_publications_failed_total";
/// Failed publications resubmitted.
pub const EVENT_PUBLICATIONS_RESUBMITTED_TOTAL: &str = "event_publications_resubmitted_total";
/// Handler duration histogram, by event and module.
pub const EVENT_HANDLER_DURATION_SECONDS: &str = "event_handler_duration_seconds";
/// Messages buffered in front of the queue backend (waiting or being sent).
pub const MQ_BUFFERED: &str = "mq_buffered_messages";
/// Messages the backend accepted.
pub const MQ_SENT_TOTAL: &str = "mq_messages_sent_total";
/// Messages sent again after a failed attempt.
pub const MQ_RETRIED_TOTAL: &str = "mq_messages_retried_total";
/// Messages the backend refused for good (logged with their body).
pub const MQ_FAILED_TOTAL: &str = "mq_messages_failed_total";
/// Failed send attempts (whole batches), by kind.
pub const MQ_SEND_ERRORS_TOTAL: &str = "mq_send_errors_total";
/// Send duration histogram (one batch).
pub const MQ_SEND_DURATION_SECONDS: &str = "mq_send_duration_seconds";
/// 1 while the last send succeeded, 0 while the backend fails.
pub const MQ_UP: &str = "mq_up";
/// Rotated event files the file backend removed at its limits.
pub const MQ_FILES_REMOVED_TOTAL: &str = "mq_files_removed_total";
/// Bytes in the spool not yet delivered.
pub const MQ_SPOOL_BYTES: &str = "mq_spool_bytes";
/// Syncs of the spool (one per group commit).
pub const MQ_SPOOL_SYNCS_TOTAL: &str = "mq_spool_syncs_total";
/// Bytes written to the spool.
pub const MQ_SPOOL_WRITTEN_BYTES_TOTAL: &str = "mq_spool_written_bytes_total";
/// Spool writes that failed (a full disk, an I/O error).
pub const MQ_SPOOL_WRITE_ERRORS_TOTAL: &str = "mq_spool_write_errors_total";
/// Damaged spool bytes skipped when reading.
pub const MQ_SPOOL_CORRUPT_BYTES_TOTAL: &str = "mq_spool_damaged_bytes_total";
/// Bus subscriber duration histogram, by message, module and outcome (`ok`, `panicked`).
pub const BUS_SUBSCRIBER_DURATION_SECONDS: &str = "bus_subscriber_duration_seconds";
/// Publishers that stopped waiting for a subscriber (`bus.subscriber_timeout_ms`), by
/// message and module.
pub const BUS_SUBSCRIBER_TIMEOUTS_TOTAL: &str = "bus_subscriber_timeouts_total";
/// Bus requests, by message and outcome (`ok`, `no_handler`, `not_started`).
pub const BUS_REQUESTS_TOTAL: &str = "bus_requests_total";
/// Bus request duration histogram (the answering handler's run), by message and module.
pub const BUS_REQUEST_DURATION_SECONDS: &str = "bus_request_duration_seconds";
/// Bus publications, by message and outcome (`delivered`, `no_subscribers`).
pub const BUS_PUBLISHES_TOTAL: &str = "bus_publishes_total";
/// The database pool's largest size (`database.max_connections`).
pub const DB_POOL_MAX_CONNECTIONS: &str = "db_pool_max_connections";
/// 1 while a readiness check is up, 0 while it is degraded or down, by dependency (the
/// check's name: `core.database`, `core.cache`, `core.queue`, …).
pub const DEPENDENCY_UP: &str = "dependency_up";
/// The spool's bound (`mq.spool.max_bytes`), with `mq.durability = "disk"`.
pub const MQ_SPOOL_MAX_BYTES: &str = "mq_spool_max_bytes";
/// The memory buffer's bound in messages (`mq.buffer`), with `mq.durability = "memory"`.
pub const MQ_BUFFER_CAPACITY: &str = "mq_buffer_capacity";
/// The async runtime's worker threads.
pub const TOKIO_WORKERS: &str = "tokio_workers";
/// Tasks alive in the async runtime.
pub const TOKIO_ALIVE_TASKS: &str = "tokio_alive_tasks";
/// Tasks waiting in the async runtime's global queue.
pub const TOKIO_GLOBAL_QUEUE_DEPTH: &str = "tokio_global_queue_depth";
/// Always 1; labels carry the build facts.
pub const BUILD_INFO: &str = "trellis_build_info";

/// The process metrics (`process_*`: CPU seconds, resident and virtual memory, open and
/// maximum file descriptors, threads, start time), read from `/proc` at each scrape.
static PROCESS: OnceLock<metrics_process::Collector> = OnceLock::new();

static HANDLE: OnceLock<Result<PrometheusHandle, String>> = OnceLock::new();

/// Installs the process-wide recorder once and returns its handle. Later calls (several
/// servers in one test process) wait for the first and share its handle; their bucket
/// settings are ignored.
pub fn install(config: &MetricsConfig) -> anyhow::Result<PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let recorder = [
                HTTP_REQUEST_DURATION_SECONDS,
                DB_QUERY_DURATION_SECONDS,
                EVENT_HANDLER_DURATION_SECONDS,
                MQ_SEND_DURATION_SECONDS,
                BUS_SUBSCRIBER_DURATION_SECONDS,
                BUS_REQUEST_DURATION_SECONDS,
            ]
            .into_iter()
            .try_fold(PrometheusBuilder::new(), |builder, name| {
                builder.set_buckets_for_metric(Matcher::Full(name.into()), &config.latency_buckets)
            })
            .map_err(|e| format!("`metrics.latency_buckets`: {e}"))?
            .build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder)
                .map_err(|_| String::from("another metrics recorder is already installed"))?;
            describe();
            Ok(handle)
        })
        .clone()
        .map_err(|e| anyhow::anyhow!(e))
}

fn describe() {
    PROCESS
        .get_or_init(metrics_process::Collector::default)
        .describe();
    describe_counter!(
        BUS_REQUESTS_TOTAL,
        "Bus requests, by message and outcome (ok, no_handler, not_started)."
    );
    describe_histogram!(
        BUS_REQUEST_DURATION_SECONDS,
        Unit::Seconds,
        "Bus request duration (the answering handler's run), by message and module."
    );
    describe_counter!(
        BUS_PUBLISHES_TOTAL,
        "Bus publications, by message and outcome (delivered, no_subscribers)."
    );
    describe_gauge!(
        DB_POOL_MAX_CONNECTIONS,
        "The database pool's largest size (database.max_connections)."
    );
    describe_gauge!(
        DEPENDENCY_UP,
        "1 while a readiness check is up, 0 while it is degraded or down, by dependency \
         (the check's name); refreshed by /readyz and by every scrape of /metrics."
    );
    describe_gauge!(
        MQ_SPOOL_MAX_BYTES,
        Unit::Bytes,
        "The spool's bound, mq.spool.max_bytes (with mq.durability = disk)."
    );
    describe_gauge!(
        MQ_BUFFER_CAPACITY,
        "The memory buffer's bound in messages, mq.buffer (with mq.durability = memory), by backend."
    );
    describe_gauge!(TOKIO_WORKERS, "The async runtime's worker threads.");
    describe_gauge!(TOKIO_ALIVE_TASKS, "Tasks alive in the async runtime.");
    describe_gauge!(
        TOKIO_GLOBAL_QUEUE_DEPTH,
        "Tasks waiting in the async runtime's global queue (not yet taken by a worker)."
    );
    describe_histogram!(
        BUS_SUBSCRIBER_DURATION_SECONDS,
        Unit::Seconds,
        "Bus subscriber run time, by message, module and outcome (ok, panicked)."
    );
    describe_counter!(
        BUS_SUBSCRIBER_TIMEOUTS_TOTAL,
        "Publishers that stopped waiting for a subscriber after bus.subscriber_timeout_ms, by message and module."
    );
    describe_counter!(
        HTTP_REQUESTS_TOTAL,
        "HTTP requests served, by method, route template and status."
    );
    describe_histogram!(
        HTTP_REQUEST_DURATION_SECONDS,
        Unit::Seconds,
        "HTTP request duration from the first middleware to the response, by method, route template and status."
    );
    describe_gauge!(
        HTTP_REQUESTS_IN_FLIGHT,
        "HTTP requests being served right now."
    );
    describe_gauge!(
        HTTP_CONNECTIONS_OPEN,
        "Open client connections, over every listener."
    );
    describe_counter!(
        HTTP_OVERLOAD_REJECTIONS_TOTAL,
        "Connections and requests answered 503 because a cap was reached, by limit \
         (connections: server.max_connections, in_flight: server.max_in_flight)."
    );
    describe_counter!(
        TRACE_SPANS_EXPORTED_TOTAL,
        "Trace spans exported to tracing.endpoint."
    );
    describe_counter!(
        TRACE_SPANS_DROPPED_TOTAL,
        "Trace spans dropped, by reason: queue_full (tracing.max_queue_size spans were \
         waiting) or export_failed (the endpoint was down or refused them)."
    );
    describe_counter!(
        HTTP_HEADER_TIMEOUTS_TOTAL,
        "Connections closed because a request header did not arrive within \
         server.header_read_timeout_ms."
    );
    describe_counter!(
        JOBS_RUNS_TOTAL,
        "Periodic job runs on this instance, by job and outcome (ok, failed, timed_out)."
    );
    describe_counter!(
        JOBS_ITEMS_TOTAL,
        "Items the runs of a periodic job removed or processed, by job."
    );
    describe_histogram!(
        JOBS_RUN_DURATION_SECONDS,
        Unit::Seconds,
        "Periodic job run duration, by job."
    );
    describe_gauge!(
        JOBS_LAST_SUCCESS_TIMESTAMP_SECONDS,
        "When a periodic job last succeeded on this instance (Unix seconds), by job."
    );
    describe_histogram!(
        DB_QUERY_DURATION_SECONDS,
        Unit::Seconds,
        "Database query duration, by module and operation."
    );
    describe_counter!(
        DB_QUERY_ERRORS_TOTAL,
        "Failed database queries, by module, operation and kind."
    );
    describe_gauge!(
        DB_POOL_CONNECTIONS,
        "Pooled database connections, by state (in_use, idle)."
    );
    describe_counter!(
        CACHE_HITS_TOTAL,
        "Cache reads that found a value, by module."
    );
    describe_counter!(
        CACHE_MISSES_TOTAL,
        "Cache reads that found nothing or failed, by module."
    );
    describe_counter!(
        CACHE_ERRORS_TOTAL,
        "Cache operations that failed, by operation."
    );
    describe_gauge!(CACHE_UP, "1 while the cache answers, 0 during an outage.");
    describe_gauge!(
        EVENT_PUBLICATIONS,
        "Event publications by status (pending, failed), over the whole database."
    );
    describe_gauge!(
        EVENT_PUBLICATIONS_OLDEST_PENDING_AGE_SECONDS,
        Unit::Seconds,
        "Age of the oldest pending event publication (0 when none is pending)."
    );
    describe_counter!(
        EVENT_PUBLICATIONS_COMPLETED_TOTAL,
        "Event publications whose handler ran, by event and module."
    );
    describe_counter!(
        EVENT_PUBLICATIONS_RETRIED_TOTAL,
        "Event handler attempts that failed and will be retried, by event and module."
    );
    describe_counter!(
        EVENT_PUBLICATIONS_FAILED_TOTAL,
        "Event publications whose handler failed every attempt (kept as failed), by event and module."
    );
    describe_counter!(
        EVENT_PUBLICATIONS_RESUBMITTED_TOTAL,
        "Failed event publications resubmitted."
    );
    describe_histogram!(
        EVENT_HANDLER_DURATION_SECONDS,
        Unit::Seconds,
        "Event handler duration, by event and module."
    );
    describe_gauge!(
        MQ_BUFFERED,
        "Messages buffered in front of the queue backend, waiting or being sent, by backend."
    );
    describe_counter!(
        MQ_SENT_TOTAL,
        "Messages the queue backend accepted, by backend."
    );
    describe_counter!(
        MQ_RETRIED_TOTAL,
        "Messages sent again after a failed attempt, by backend."
    );
    describe_counter!(
        MQ_FAILED_TOTAL,
        "Messages the queue backend refused for good (logged with their body), by backend."
    );
    describe_counter!(
        MQ_SEND_ERRORS_TOTAL,
        "Failed send attempts of whole batches, by backend."
    );
    describe_histogram!(
        MQ_SEND_DURATION_SECONDS,
        Unit::Seconds,
        "Duration of one batch send, by backend."
    );
    describe_gauge!(
        MQ_UP,
        "1 while the queue backend accepts messages, 0 while sends fail, by backend."
    );
    describe_gauge!(
        MQ_SPOOL_BYTES,
        Unit::Bytes,
        "Bytes in the message queue's spool not yet delivered (mq.spool.max_bytes bounds it)."
    );
    describe_counter!(
        MQ_SPOOL_SYNCS_TOTAL,
        "Syncs of the spool to disk; concurrent publishers share one (group commit)."
    );
    describe_counter!(
        MQ_SPOOL_WRITTEN_BYTES_TOTAL,
        Unit::Bytes,
        "Bytes written to the spool (frames: 12 bytes plus the id and the body per message)."
    );
    describe_counter!(
        MQ_SPOOL_WRITE_ERRORS_TOTAL,
        "Spool writes that failed (full disk, I/O error); their publishers were refused."
    );
    describe_counter!(
        MQ_SPOOL_CORRUPT_BYTES_TOTAL,
        Unit::Bytes,
        "Damaged spool bytes skipped while reading (logged with their place)."
    );
    describe_counter!(
        MQ_FILES_REMOVED_TOTAL,
        "Rotated event files the file backend removed at mq.file.max_total_bytes or max_files."
    );
    describe_gauge!(
        BUILD_INFO,
        "Always 1; the labels carry the version, commit and build number."
    );
}

/// Reads what is measured at each scrape rather than as it happens: the process's
/// figures and the async runtime's.
pub fn collect() {
    if let Some(process) = PROCESS.get() {
        process.collect();
    }
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        let runtime = runtime.metrics();
        metrics::gauge!(TOKIO_WORKERS).set(runtime.num_workers() as f64);
        metrics::gauge!(TOKIO_ALIVE_TASKS).set(runtime.num_alive_tasks() as f64);
        metrics::gauge!(TOKIO_GLOBAL_QUEUE_DEPTH).set(runtime.global_queue_depth() as f64);
    }
}

/// Keeps the exporter's histogram storage bounded; run it in the background.
pub async fn upkeep(handle: PrometheusHandle, every: Duration) {
    let mut ticker = tokio::time::interval(every);
    loop {
        ticker.tick().await;
        handle.run_upkeep();
    }
}
