//! Layered, typed configuration (figment).
//!
//! Layers, later wins: built-in defaults <- `config/default.toml` <- `config/<profile>.toml`
//! (profile from `TRELLIS_PROFILE`, default `dev`) <- the file given with `--config` <-
//! environment variables `TRELLIS_*`, with `__` for nesting (`TRELLIS_SERVER__PORT=9000`).
//!
//! The built-in defaults equal `config/default.toml` (a test holds them together), so the
//! binary also starts where no config folder exists. Each module owns `[modules.<name>]`
//! and reads it into its own struct through [`ModuleContext::config`](crate::ModuleContext::config).
//! Every error names the offending key and where its value came from.

use std::{
    collections::BTreeMap,
    fmt,
    path::{Path, PathBuf},
};

use figment::{
    Figment,
    providers::{Env, Format, Serialized, Toml},
};
use serde::{Deserialize, Serialize, de::DeserializeOwned};

/// Environment variables that share the prefix but are not configuration keys.
const NON_CONFIG_ENV: &[&str] = &["PROFILE", "CONFIG", "CONFIG_DIR", "BUILD_NUMBER"];

/// The whole configuration, as typed structs. Module sections stay raw here and are
/// extracted by each module into its own type.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// HTTP server.
    pub server: ServerConfig,
    /// Logs.
    pub telemetry: TelemetryConfig,
    /// Traces (OpenTelemetry).
    pub tracing: TracingConfig,
    /// Prometheus metrics.
    pub metrics: MetricsConfig,
    /// The database.
    pub database: DatabaseConfig,
    /// The cache.
    pub cache: CacheConfig,
    /// The bus's subscribers.
    pub bus: BusConfig,
    /// The relay delivering the modules' domain events.
    pub events: EventsConfig,
    /// The message queue events are forwarded to.
    pub mq: MqConfig,
    /// Periodic jobs (housekeeping).
    pub jobs: JobsConfig,
    /// One section per module, `[modules.<name>]`.
    pub modules: BTreeMap<String, figment::value::Value>,
}

/// `[server]`: listener, limits, timeouts, CORS.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Address to bind.
    pub host: String,
    /// Port to bind; 0 picks a free one.
    pub port: u16,
    /// Largest accepted request body, in bytes; larger bodies get 413.
    pub body_limit_bytes: usize,
    /// A request that takes longer, reading its body included, is answered 503.
    pub request_timeout_ms: u64,
    /// A client must send a request's whole header within this time of its first byte,
    /// or the connection is closed (slow senders hold no connection for long).
    pub header_read_timeout_ms: u64,
    /// A keep-alive connection with no request for this long is closed. Keep it longer
    /// than a proxy's upstream keep-alive timeout (nginx: 60 s), so that the proxy, not
    /// Trellis, closes idle connections and never sends on one being closed.
    pub idle_timeout_ms: u64,
    /// Open connections at most; one more is answered 503 and closed.
    pub max_connections: usize,
    /// Requests being served at most; one more is answered 503 (`/healthz`, `/readyz`
    /// and `/metrics` are always served).
    pub max_in_flight: usize,
    /// After a 413, how long the rest of the body is read and thrown away, so that a
    /// client still sending receives the 413 instead of a reset connection.
    pub body_linger_ms: u64,
    /// On SIGTERM, how long the listener keeps serving while `/readyz` already answers
    /// 503 `draining`, so that proxies and orchestrators stop routing here first.
    pub shutdown_delay_ms: u64,
    /// On SIGTERM or SIGINT, the budget for the whole shutdown: the delay above, the
    /// in-flight requests, the accepted events, the modules and the message queue.
    pub shutdown_timeout_ms: u64,
    /// Cross-origin resource sharing.
    pub cors: CorsConfig,
    /// The operators' listener (`/metrics`, detailed `/readyz`, `/api/v1/info`).
    pub admin: AdminConfig,
    /// Peers whose forwarding headers are believed (CIDRs or addresses; empty: none, the
    /// TCP peer is the client). See [`crate::client`].
    pub trusted_proxies: Vec<String>,
    /// The header a trusted proxy names the client in.
    pub forwarded_header: ForwardedHeader,
}

/// Which header carries the chain of client addresses. Only one is read: a client can
/// send either, and a proxy appends to only one of them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ForwardedHeader {
    /// `X-Forwarded-For` (nginx's `$proxy_add_x_forwarded_for`, most load balancers), with
    /// `X-Forwarded-Proto` for the scheme.
    #[default]
    #[serde(rename = "x-forwarded-for")]
    XForwardedFor,
    /// RFC 7239 `Forwarded: for=…;proto=…`.
    #[serde(rename = "forwarded")]
    Forwarded,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 8080,
            body_limit_bytes: 1024 * 1024,
            request_timeout_ms: 30_000,
            header_read_timeout_ms: 10_000,
            idle_timeout_ms: 75_000,
            max_connections: 4096,
            max_in_flight: 1024,
            body_linger_ms: 2_000,
            shutdown_delay_ms: 0,
            shutdown_timeout_ms: 25_000,
            cors: CorsConfig::default(),
            admin: AdminConfig::default(),
            trusted_proxies: Vec::new(),
            forwarded_header: ForwardedHeader::default(),
        }
    }
}

/// `[server.admin]`: a second listener for operators, off by default. While it is on,
/// `/metrics` leaves the public port and the public `/readyz` answers only its status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// Serve the operators' endpoints on their own listener.
    pub enabled: bool,
    /// Address to bind; keep it private (loopback, or an internal network).
    pub host: String,
    /// Port to bind; 0 picks a free one.
    pub port: u16,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            host: "127.0.0.1".into(),
            port: 9090,
        }
    }
}

/// `[server.cors]`. Disabled while `allowed_origins` is empty.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CorsConfig {
    /// Origins allowed to call the API (`["*"]` for any); empty disables CORS.
    pub allowed_origins: Vec<String>,
    /// Methods allowed in cross-origin requests.
    pub allowed_methods: Vec<String>,
    /// Request headers allowed in cross-origin requests.
    pub allowed_headers: Vec<String>,
    /// Response headers the browser may read.
    pub exposed_headers: Vec<String>,
    /// Whether cookies and authorization may be sent.
    pub allow_credentials: bool,
    /// How long a preflight answer may be cached (sent in whole seconds).
    pub max_age_ms: u64,
}

impl Default for CorsConfig {
    fn default() -> Self {
        Self {
            allowed_origins: Vec::new(),
            allowed_methods: ["GET", "POST", "PUT", "PATCH", "DELETE"]
                .map(String::from)
                .to_vec(),
            allowed_headers: ["authorization", "content-type", "x-request-id"]
                .map(String::from)
                .to_vec(),
            exposed_headers: vec!["x-request-id".into(), "x-trace-id".into()],
            allow_credentials: false,
            max_age_ms: 600_000,
        }
    }
}

/// `[tracing]`: OpenTelemetry traces, exported over OTLP/HTTP (protobuf).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TracingConfig {
    /// Off: no exporter, no trace context kept, no cost per request.
    pub enabled: bool,
    /// The OTLP/HTTP traces endpoint (a collector, Jaeger, Tempo).
    pub endpoint: String,
    /// `service.name` of every span.
    pub service_name: String,
    /// Which new traces are recorded; a caller's sampled or unsampled `traceparent` is
    /// followed except with `never`.
    pub sampler: TraceSampler,
    /// With `sampler = "ratio"`: the share of new traces recorded, from 0 to 1.
    pub ratio: f64,
    /// Headers sent with each export (an API key).
    pub headers: BTreeMap<String, String>,
    /// One export's deadline.
    pub export_timeout_ms: u64,
    /// Spans waiting for export, at most; past it new ones are dropped.
    pub max_queue_size: usize,
    /// Spans per export, at most.
    pub max_export_batch_size: usize,
    /// How long finished spans wait before an export.
    pub scheduled_delay_ms: u64,
}

impl Default for TracingConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            endpoint: "http://127.0.0.1:4318/v1/traces".into(),
            service_name: "trellis".into(),
            sampler: TraceSampler::Ratio,
            ratio: 1.0,
            headers: BTreeMap::new(),
            export_timeout_ms: 10_000,
            max_queue_size: 2_048,
            max_export_batch_size: 512,
            scheduled_delay_ms: 5_000,
        }
    }
}

/// Which traces are recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TraceSampler {
    /// Every new trace; a caller's decision is followed.
    Always,
    /// None at all, whatever the caller decided.
    Never,
    /// `ratio` of the requests that start a trace, at random; a caller's decision is followed.
    Ratio,
}

/// `[telemetry]`: where logs go and how they look.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetryConfig {
    /// Filter directives (`info`, `warn,trellis=debug`); applied again, without a restart,
    /// when it changes in a config file.
    pub level: String,
    /// Line format.
    pub format: LogFormat,
    /// Destination.
    pub output: LogOutput,
    /// One access-log line per request.
    pub access_log: bool,
    /// Rolling file settings, used when `output = "file"`.
    pub file: LogFileConfig,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: LogFormat::Compact,
            output: LogOutput::Console,
            access_log: true,
            file: LogFileConfig::default(),
        }
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-friendly, multi-line.
    Pretty,
    /// One line per event, human-friendly.
    Compact,
    /// One JSON object per line.
    Json,
}

/// Log destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogOutput {
    /// Standard output.
    Console,
    /// A rolling file (non-blocking writer).
    File,
}

/// `[telemetry.file]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogFileConfig {
    /// Folder for the log files (created if missing).
    pub directory: PathBuf,
    /// File name prefix.
    pub prefix: String,
    /// When to start a new file.
    pub rotation: LogRotation,
    /// How many files to keep (0 keeps all).
    pub max_files: usize,
}

impl Default for LogFileConfig {
    fn default() -> Self {
        Self {
            directory: "logs".into(),
            prefix: "trellis.log".into(),
            rotation: LogRotation::Daily,
            max_files: 14,
        }
    }
}

/// Log file rotation period.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogRotation {
    /// Every minute.
    Minutely,
    /// Every hour.
    Hourly,
    /// Every day.
    Daily,
    /// One file, never rotated.
    Never,
}

/// `[metrics]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Serve `GET /metrics`.
    pub enabled: bool,
    /// Bucket bounds of `http_request_duration_seconds`, in seconds, ascending.
    pub latency_buckets: Vec<f64>,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            latency_buckets: vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0,
            ],
        }
    }
}

impl Config {
    /// The configuration as it may be shown: core's secrets print redacted by their
    /// types, and in the module sections every value whose key names a secret
    /// (`*secret*`, `*password*`, `*token*`, `*_key`, `*credentials*`) is replaced by `***`.
    pub fn redacted(&self) -> Self {
        let mut shown = self.clone();
        for section in shown.modules.values_mut() {
            redact_section(section);
        }
        // Export headers carry API keys.
        for value in shown.tracing.headers.values_mut() {
            *value = "***".into();
        }
        shown
    }
}

/// Whether a module setting's key names a secret.
fn names_secret(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    ["secret", "password", "token", "credentials"]
        .iter()
        .any(|word| key.contains(word))
        || key.ends_with("_key")
        || key == "key"
}

fn redact_section(value: &mut figment::value::Value) {
    use figment::value::Value;
    match value {
        Value::Dict(_, entries) => {
            for (key, entry) in entries.iter_mut() {
                if names_secret(key) {
                    *entry = Value::from("***");
                } else {
                    redact_section(entry);
                }
            }
        }
        Value::Array(_, items) => items.iter_mut().for_each(redact_section),
        _ => {}
    }
}

/// A connection URL that may carry a password. It prints (`Debug`, and so
/// `trellis check-config` and any log of a config struct) with the password replaced by
/// `***`; [`SecretUrl::expose`] is the only way to the full text.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SecretUrl(String);

impl SecretUrl {
    /// The URL with its password, for the client that connects.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URL without its password, for messages.
    pub fn redacted(&self) -> String {
        crate::storage::redact_url(&self.0)
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.redacted())
    }
}

impl From<&str> for SecretUrl {
    fn from(url: &str) -> Self {
        Self(url.to_owned())
    }
}

impl From<String> for SecretUrl {
    fn from(url: String) -> Self {
        Self(url)
    }
}

/// `[database]`: SQLite by default, PostgreSQL by URL.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseConfig {
    /// `sqlite://data/trellis.db` (file and folder created on first start) or
    /// `postgres://user:password@host:port/database`.
    pub url: SecretUrl,
    /// Largest number of pooled connections.
    pub max_connections: u32,
    /// Connections kept open when idle.
    pub min_connections: u32,
    /// How long a query may wait for a connection before it fails (503).
    pub acquire_timeout_ms: u64,
    /// PostgreSQL `statement_timeout`; SQLite waits this long on a locked database.
    pub statement_timeout_ms: u64,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            url: "sqlite://data/trellis.db".into(),
            max_connections: 10,
            min_connections: 0,
            acquire_timeout_ms: 3_000,
            statement_timeout_ms: 10_000,
        }
    }
}

/// `[cache]`: in-process by default, Redis by URL.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CacheConfig {
    /// Empty for the in-process cache, or `redis://host:port/db`.
    pub url: SecretUrl,
    /// Prefix of every key (`<prefix>:<module>:<key>`), so several deployments can share
    /// one Redis.
    pub prefix: String,
    /// Capacity of the in-process cache, in entries.
    pub max_entries: u64,
    /// How long a Redis operation may take before it counts as failed.
    pub timeout_ms: u64,
    /// With Redis: entries kept in each instance, invalidated by Redis the moment any
    /// instance changes them (server-assisted client-side caching); 0 turns it off.
    pub near_entries: usize,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            url: SecretUrl::default(),
            prefix: "trellis".into(),
            max_entries: 100_000,
            timeout_ms: 250,
            near_entries: 10_000,
        }
    }
}

/// `[jobs]`: the modules' periodic jobs (see [`crate::jobs`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JobsConfig {
    /// Schedule jobs on this instance. Off on every instance, nothing is purged.
    pub enabled: bool,
    /// A run taking longer is stopped; an instance that died during a run holds the job
    /// this long at most.
    pub timeout_ms: u64,
}

impl Default for JobsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            timeout_ms: 300_000,
        }
    }
}

/// `[bus]`: how the bus runs its subscribers (see [`crate::bus`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BusConfig {
    /// A publisher waits this long at most for each inline subscriber; the subscriber
    /// runs on.
    pub subscriber_timeout_ms: u64,
    /// Detached subscribers running at once, at most; a publisher waits for a slot.
    pub detached_max_in_flight: usize,
}

impl Default for BusConfig {
    fn default() -> Self {
        Self {
            subscriber_timeout_ms: 2000,
            detached_max_in_flight: 1024,
        }
    }
}

/// `[events]`: the relay that delivers the modules' domain events (see
/// [`events`](crate::events)).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EventsConfig {
    /// Handlers one instance runs at once.
    pub workers: usize,
    /// Publications claimed at once.
    pub batch: usize,
    /// How often the relay looks for due publications (retries, other instances' events,
    /// claims that ran out); a commit that emitted wakes it at once.
    pub poll_ms: u64,
    /// How long a claim lasts: after this, another instance (or the next start) takes a
    /// publication over from an instance that died delivering it.
    pub lease_ms: u64,
    /// How long one handler run may take before it counts as failed (less than
    /// `lease_ms`).
    pub handler_timeout_ms: u64,
    /// Attempts per handler and event (the first included); then the publication is kept
    /// as failed until resubmitted.
    pub max_attempts: u32,
    /// Backoff before the first retry; doubles with each attempt.
    pub retry_backoff_ms: u64,
    /// The longest backoff between two attempts.
    pub retry_backoff_max_ms: u64,
    /// At shutdown, how long the handlers under way may take to finish.
    pub drain_timeout_ms: u64,
    /// How long completed publications are kept before the job `core.purge_publications` removes
    /// them.
    pub retention_ms: u64,
    /// How often `core.purge_publications` runs.
    pub purge_every_ms: u64,
}

impl Default for EventsConfig {
    fn default() -> Self {
        Self {
            workers: 4,
            batch: 64,
            poll_ms: 1_000,
            lease_ms: 60_000,
            handler_timeout_ms: 30_000,
            max_attempts: 5,
            retry_backoff_ms: 100,
            retry_backoff_max_ms: 10_000,
            drain_timeout_ms: 30_000,
            retention_ms: 7 * 24 * 3_600_000,
            purge_every_ms: 3_600_000,
        }
    }
}

/// `[mq]`: where events are forwarded. The embedded `file` backend needs no service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MqConfig {
    /// `file` (newline-delimited JSON under `mq.file.directory`) or `sqs`.
    pub backend: MqBackend,
    /// `disk`: a message is in the spool (`mq.spool`, synced to disk) before publishing
    /// returns, and survives a crash. `memory`: it waits in a memory buffer of `buffer`
    /// messages, and a crash loses what the buffer held.
    pub durability: Durability,
    /// With `durability = "memory"`: messages buffered in front of the backend; when full,
    /// publishing is refused (503 to the client).
    pub buffer: usize,
    /// Batches being sent at once.
    pub concurrency: usize,
    /// Backoff before the first resend of a failed batch; doubles with each attempt,
    /// with jitter.
    pub retry_backoff_ms: u64,
    /// The longest backoff between two sends.
    pub retry_backoff_max_ms: u64,
    /// At shutdown, how long delivering the buffered messages may take.
    pub drain_timeout_ms: u64,
    /// The spool (with `durability = "disk"`).
    pub spool: SpoolConfig,
    /// The `file` backend.
    pub file: FileMqConfig,
    /// The `sqs` backend.
    pub sqs: SqsConfig,
}

impl Default for MqConfig {
    fn default() -> Self {
        Self {
            backend: MqBackend::File,
            durability: Durability::Disk,
            buffer: 10_000,
            concurrency: 4,
            retry_backoff_ms: 100,
            retry_backoff_max_ms: 5_000,
            drain_timeout_ms: 30_000,
            spool: SpoolConfig::default(),
            file: FileMqConfig::default(),
            sqs: SqsConfig::default(),
        }
    }
}

/// The message-queue backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MqBackend {
    /// Newline-delimited JSON appended to files (embedded; no service).
    File,
    /// Amazon SQS or a compatible server.
    Sqs,
}

/// Where published messages wait for the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Durability {
    /// In the spool, on disk, before publishing returns: a crash loses nothing published.
    Disk,
    /// In memory: a crash loses what was published and not yet delivered.
    Memory,
}

/// `[mq.spool]`: the message queue's log on disk (`durability = "disk"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SpoolConfig {
    /// The folder (one instance each): segment files and the delivery checkpoint.
    pub directory: PathBuf,
    /// Size from which the next write starts a new segment file; a segment is removed
    /// once everything in it was delivered.
    pub segment_bytes: u64,
    /// Bytes published and not yet delivered, at most; past it publishing is refused
    /// (503 with `Retry-After` to the client) until the backend catches up.
    pub max_bytes: u64,
    /// How long the writer waits, once an append arrives, for others to share its sync
    /// (fractions allowed; 0: it syncs at once). Each publish may wait this much longer.
    pub commit_delay_ms: f64,
}

impl Default for SpoolConfig {
    fn default() -> Self {
        Self {
            directory: PathBuf::from("data/spool"),
            segment_bytes: 64 * 1024 * 1024,
            max_bytes: 1024 * 1024 * 1024,
            commit_delay_ms: 0.5,
        }
    }
}

/// `[mq.file]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FileMqConfig {
    /// The folder; the live file is `events.ndjson`.
    pub directory: PathBuf,
    /// Size at which the live file is closed and renamed `events-<UTC time>.ndjson`
    /// (a batch is split between files at line ends, so only a single message larger
    /// than this passes it).
    pub max_file_bytes: u64,
    /// The folder's event files (live and rotated) together, at most: at each rotation
    /// the oldest rotated files are removed until a full live file fits beside the rest.
    /// Must be at least twice `max_file_bytes`.
    pub max_total_bytes: u64,
    /// Rotated files kept, at most; older ones are removed at rotation.
    pub max_files: usize,
}

impl Default for FileMqConfig {
    fn default() -> Self {
        Self {
            directory: PathBuf::from("data/events"),
            max_file_bytes: 64 * 1024 * 1024,
            max_total_bytes: 1024 * 1024 * 1024,
            max_files: 100,
        }
    }
}

/// `[mq.sqs]`. Credentials come from the usual AWS sources (environment, profile, role).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SqsConfig {
    /// The queue URL (required with `backend = "sqs"`).
    pub queue_url: String,
    /// The region; empty takes it from the environment (`AWS_REGION`).
    pub region: String,
    /// An endpoint override (an SQS-compatible server); empty for AWS.
    pub endpoint_url: String,
    /// How long one SQS call may take before it counts as failed.
    pub timeout_ms: u64,
}

impl Default for SqsConfig {
    fn default() -> Self {
        Self {
            queue_url: String::new(),
            region: String::new(),
            endpoint_url: String::new(),
            timeout_ms: 5_000,
        }
    }
}

/// Where configuration comes from. [`ConfigSources::from_env`] reads the usual places.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigSources {
    /// The folder holding `default.toml` and the profile files.
    pub dir: PathBuf,
    /// The profile (`dev`, `test`, `production`, ...).
    pub profile: String,
    /// An extra file given with `--config`, applied after the profile file.
    pub file: Option<PathBuf>,
    /// Whether `TRELLIS_*` environment variables apply.
    pub env: bool,
}

impl ConfigSources {
    /// `config/` (or `TRELLIS_CONFIG_DIR`), profile from `TRELLIS_PROFILE` (default `dev`),
    /// the environment on.
    pub fn from_env(file: Option<PathBuf>) -> Self {
        Self {
            dir: std::env::var_os("TRELLIS_CONFIG_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("config")),
            profile: std::env::var("TRELLIS_PROFILE").unwrap_or_else(|_| "dev".into()),
            file,
            env: true,
        }
    }

    /// The files that exist and are read, in order.
    pub fn files(&self) -> Vec<PathBuf> {
        let mut files = vec![
            self.dir.join("default.toml"),
            self.dir.join(format!("{}.toml", self.profile)),
        ];
        files.extend(self.file.clone());
        files.retain(|f| f.is_file());
        files
    }

    /// All layers merged, not yet checked.
    pub fn figment(&self) -> Result<Figment, ConfigError> {
        if let Some(file) = &self.file
            && !file.is_file()
        {
            return Err(ConfigError::single(format!(
                "configuration file `{}` does not exist",
                file.display()
            )));
        }
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        for file in self.files() {
            figment = figment.merge(Toml::file_exact(file));
        }
        if self.env {
            figment = figment.merge(
                Env::prefixed("TRELLIS_")
                    .split("__")
                    .ignore(NON_CONFIG_ENV)
                    .lowercase(true),
            );
        }
        Ok(figment)
    }

    /// Reads and checks the whole configuration.
    pub fn load(&self) -> Result<LoadedConfig, ConfigError> {
        let mut loaded = LoadedConfig::from_figment(self.figment()?)?;
        loaded.profile = self.profile.clone();
        Ok(loaded)
    }
}

/// The checked configuration plus the raw layers, from which modules read their sections.
#[derive(Debug, Clone)]
pub struct LoadedConfig {
    /// The typed configuration.
    pub config: Config,
    /// The profile the layers were read for (`dev`, `test`, `production`, ...).
    pub profile: String,
    figment: Figment,
}

impl LoadedConfig {
    /// Checks a merged figment.
    pub fn from_figment(figment: Figment) -> Result<Self, ConfigError> {
        let config: Config = figment.extract().map_err(ConfigError::from)?;
        validate(&config)?;
        Ok(Self {
            config,
            profile: String::from("dev"),
            figment,
        })
    }

    /// Built-in defaults only, profile `dev` (for tests and tools).
    pub fn defaults() -> Self {
        let figment = Figment::from(Serialized::defaults(Config::default()));
        Self {
            config: Config::default(),
            profile: String::from("dev"),
            figment,
        }
    }

    /// Sets `key` (dotted, e.g. `server.port`) to `value` on top of every layer.
    pub fn set(mut self, key: &str, value: impl Serialize) -> Result<Self, ConfigError> {
        self.figment = self.figment.merge(Serialized::default(key, value));
        let profile = self.profile;
        Ok(Self {
            profile,
            ..Self::from_figment(self.figment)?
        })
    }

    /// Extracts `[modules.<module>]` into `T`; a missing section yields `T`'s defaults.
    pub fn module_section<T: DeserializeOwned>(&self, module: &str) -> Result<T, ConfigError> {
        let key = format!("modules.{module}");
        let section = if self.figment.contains(&key) {
            self.figment.focus(&key)
        } else {
            Figment::new()
        };
        section
            .extract()
            .map_err(|e| ConfigError::from(e).prefixed(&key))
    }
}

fn validate(config: &Config) -> Result<(), ConfigError> {
    let mut problems = Vec::new();
    if let Err(bad) = crate::client::parse_networks(&config.server.trusted_proxies) {
        problems.push(format!(
            "`server.trusted_proxies`: `{bad}` is not an address or a CIDR block"
        ));
    }
    if let Err(e) = tracing_subscriber::EnvFilter::try_new(&config.telemetry.level) {
        problems.push(format!(
            "`telemetry.level`: `{}` is not a valid filter: {e}",
            config.telemetry.level
        ));
    }
    let tracing = &config.tracing;
    if !(0.0..=1.0).contains(&tracing.ratio) {
        problems.push("`tracing.ratio`: from 0 to 1".into());
    }
    if tracing.enabled
        && !tracing.endpoint.starts_with("http://")
        && !tracing.endpoint.starts_with("https://")
    {
        problems.push(format!(
            "`tracing.endpoint`: `{}` is not an http:// or https:// URL",
            tracing.endpoint
        ));
    }
    if tracing.max_queue_size == 0
        || tracing.max_export_batch_size == 0
        || tracing.max_export_batch_size > tracing.max_queue_size
    {
        problems.push(
            "`tracing.max_queue_size` and `tracing.max_export_batch_size`: both at least 1, \
             the batch at most the queue"
                .into(),
        );
    }
    if config.server.host.parse::<std::net::IpAddr>().is_err() {
        problems.push(format!(
            "`server.host`: `{}` is not an IP address",
            config.server.host
        ));
    }
    let admin = &config.server.admin;
    if admin.enabled && admin.host.parse::<std::net::IpAddr>().is_err() {
        problems.push(format!(
            "`server.admin.host`: `{}` is not an IP address",
            admin.host
        ));
    }
    if config.server.body_limit_bytes == 0 {
        problems.push("`server.body_limit_bytes`: must be greater than 0".into());
    }
    let server = &config.server;
    for (key, value) in [
        ("header_read_timeout_ms", server.header_read_timeout_ms),
        ("idle_timeout_ms", server.idle_timeout_ms),
        ("max_connections", server.max_connections as u64),
        ("max_in_flight", server.max_in_flight as u64),
        ("shutdown_timeout_ms", server.shutdown_timeout_ms),
    ] {
        if value == 0 {
            problems.push(format!("`server.{key}`: must be greater than 0"));
        }
    }
    if server.shutdown_delay_ms >= server.shutdown_timeout_ms {
        problems.push(
            "`server.shutdown_delay_ms`: must be shorter than `server.shutdown_timeout_ms`, \
             which bounds the whole shutdown"
                .into(),
        );
    }
    if config.server.request_timeout_ms == 0 {
        problems.push("`server.request_timeout_ms`: must be greater than 0".into());
    }
    let db = &config.database;
    let url = db.url.expose();
    if !(url.starts_with("sqlite:")
        || url.starts_with("postgres://")
        || url.starts_with("postgresql://"))
    {
        problems.push(
            "`database.url`: must start with `sqlite:`, `postgres://` or `postgresql://`".into(),
        );
    }
    if db.max_connections == 0 || db.min_connections > db.max_connections {
        problems.push("`database.max_connections`: must be at least 1 and at least `database.min_connections`".into());
    }
    if db.acquire_timeout_ms == 0 {
        problems.push("`database.acquire_timeout_ms`: must be greater than 0".into());
    }
    let cache = &config.cache;
    let url = cache.url.expose();
    if !(url.is_empty() || url.starts_with("redis://") || url.starts_with("rediss://")) {
        problems.push(
            "`cache.url`: must be empty (in-process) or start with `redis://` or `rediss://`"
                .into(),
        );
    }
    if cache.prefix.is_empty() || cache.prefix.contains(char::is_whitespace) {
        problems.push("`cache.prefix`: must be non-empty, without spaces".into());
    }
    if cache.timeout_ms == 0 {
        problems.push("`cache.timeout_ms`: must be greater than 0".into());
    }
    let bus = &config.bus;
    if bus.subscriber_timeout_ms == 0 {
        problems.push("`bus.subscriber_timeout_ms`: must be greater than 0".into());
    }
    if !(1..=1 << 20).contains(&bus.detached_max_in_flight) {
        problems.push("`bus.detached_max_in_flight`: must be between 1 and 1048576".into());
    }
    let events = &config.events;
    if !(1..=1024).contains(&events.workers) || !(1..=1000).contains(&events.batch) {
        problems.push(
            "`events.workers` and `events.batch`: must be between 1 and 1024 (workers) and 1 and 1000 (batch)"
                .into(),
        );
    }
    if events.poll_ms == 0 || events.purge_every_ms == 0 {
        problems
            .push("`events.poll_ms` and `events.purge_every_ms`: must be greater than 0".into());
    }
    if events.handler_timeout_ms == 0 || events.handler_timeout_ms >= events.lease_ms {
        problems.push(
            "`events.handler_timeout_ms`: must be greater than 0 and less than `events.lease_ms`, \
             or a handler still running loses its claim to another instance"
                .into(),
        );
    }
    if events.max_attempts == 0 {
        problems.push("`events.max_attempts`: must be at least 1".into());
    }
    let mq = &config.mq;
    if mq.buffer == 0 || mq.concurrency == 0 {
        problems.push("`mq.buffer` and `mq.concurrency`: must be greater than 0".into());
    }
    // Checked here, not when the queue opens: a build whose modules publish nothing opens
    // no queue, and should still not take a setting it cannot honour.
    if mq.backend == MqBackend::Sqs && !cfg!(feature = "sqs") {
        problems.push(
            "`mq.backend` = \"sqs\": this build has no SQS backend (cargo feature `sqs` of \
             trellis-server)"
                .into(),
        );
    }
    if mq.backend == MqBackend::Sqs && mq.sqs.queue_url.is_empty() {
        problems.push("`mq.sqs.queue_url`: required when `mq.backend` is `sqs`".into());
    }
    if mq.sqs.timeout_ms == 0 || mq.file.max_file_bytes == 0 {
        problems.push(
            "`mq.sqs.timeout_ms` and `mq.file.max_file_bytes`: must be greater than 0".into(),
        );
    }
    let file = &mq.file;
    if file.max_total_bytes < file.max_file_bytes.saturating_mul(2) {
        problems.push(format!(
            "`mq.file.max_total_bytes`: must be at least twice `mq.file.max_file_bytes` ({} bytes)",
            file.max_file_bytes.saturating_mul(2)
        ));
    }
    if file.max_files == 0 {
        problems.push("`mq.file.max_files`: must be at least 1".into());
    }
    if mq.spool.segment_bytes == 0 || mq.spool.max_bytes < mq.spool.segment_bytes {
        problems.push(
            "`mq.spool.segment_bytes` and `mq.spool.max_bytes`: the segment must be greater \
             than 0 and at most `max_bytes`"
                .into(),
        );
    }
    if !(0.0..=100.0).contains(&mq.spool.commit_delay_ms) {
        problems.push("`mq.spool.commit_delay_ms`: from 0 to 100".into());
    }
    let buckets = &config.metrics.latency_buckets;
    if buckets.is_empty() || buckets.windows(2).any(|w| w[0] >= w[1]) {
        problems.push("`metrics.latency_buckets`: must be non-empty and strictly ascending".into());
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(ConfigError { problems })
    }
}

/// A configuration that cannot be used; each entry names the key and the source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// One line per problem.
    pub problems: Vec<String>,
}

impl ConfigError {
    fn single(problem: String) -> Self {
        Self {
            problems: vec![problem],
        }
    }

    fn prefixed(mut self, key: &str) -> Self {
        for problem in &mut self.problems {
            if let Some(rest) = problem.strip_prefix('`') {
                *problem = format!("`{key}.{rest}");
            }
        }
        self
    }
}

impl From<figment::Error> for ConfigError {
    fn from(error: figment::Error) -> Self {
        let problems = error
            .into_iter()
            .map(|e| {
                let key = e.path.join(".");
                let origin = e.metadata.as_ref().map(|m| match &m.source {
                    Some(figment::Source::File(path)) => format!(" (in {})", display_path(path)),
                    _ if m.name.contains("environment") => format!(
                        " (from environment variable TRELLIS_{})",
                        e.path.join("__").to_uppercase()
                    ),
                    _ => format!(" (from {})", m.name),
                });
                let origin = origin.unwrap_or_default();
                if key.is_empty() {
                    format!("{}{origin}", e.kind)
                } else {
                    format!("`{key}`: {}{origin}", e.kind)
                }
            })
            .collect();
        Self { problems }
    }
}

fn display_path(path: &Path) -> String {
    path.display().to_string()
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("invalid configuration")?;
        for problem in &self.problems {
            write!(f, "\n  - {problem}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

#[cfg(test)]
mod tests {
    use super::*;

    fn sources(dir: &Path) -> ConfigSources {
        ConfigSources {
            dir: dir.to_path_buf(),
            profile: "test".into(),
            file: None,
            env: false,
        }
    }

    #[test]
    fn committed_default_toml_equals_the_built_in_defaults() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config");
        let text = std::fs::read_to_string(dir.join("default.toml")).expect("default.toml");
        let from_file: Config = Figment::from(Toml::string(&text))
            .extract()
            .expect("default.toml parses");
        assert_eq!(from_file, Config::default());
    }

    #[test]
    fn every_duration_setting_is_in_milliseconds() {
        fn keys(prefix: &str, table: &toml::Table, out: &mut Vec<String>) {
            for (key, value) in table {
                let path = format!("{prefix}{key}");
                match value {
                    toml::Value::Table(inner) => keys(&format!("{path}."), inner, out),
                    _ => out.push(path),
                }
            }
        }
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config");
        let text = std::fs::read_to_string(dir.join("default.toml")).expect("default.toml");
        let mut all = Vec::new();
        keys("", &text.parse().expect("default.toml parses"), &mut all);
        let duration_words = [
            "timeout", "ttl", "delay", "interval", "window", "age", "every",
        ];
        let wrong: Vec<&String> = all
            .iter()
            .filter(|key| {
                let name = key.rsplit('.').next().unwrap_or(key);
                let other_unit = ["_secs", "_seconds", "_s", "_minutes", "_mins", "_hours"]
                    .iter()
                    .any(|unit| name.ends_with(unit));
                let looks_like_duration = duration_words.iter().any(|w| name.contains(w));
                other_unit || (looks_like_duration && !name.ends_with("_ms"))
            })
            .collect();
        assert!(wrong.is_empty(), "durations not in `_ms`: {wrong:?}");
        assert!(all.iter().any(|key| key == "jobs.timeout_ms"), "{all:?}");
    }

    #[test]
    fn profile_file_overrides_default_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("default.toml"), "[server]\nport = 1\n").expect("write");
        std::fs::write(dir.path().join("test.toml"), "[server]\nport = 2\n").expect("write");
        let loaded = sources(dir.path()).load().expect("loads");
        assert_eq!(loaded.config.server.port, 2);
    }

    #[test]
    fn wrong_type_names_the_key_and_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("test.toml"), "[server]\nport = \"http\"\n").expect("write");
        let err = sources(dir.path()).load().expect_err("bad port");
        let text = err.to_string();
        assert!(text.contains("`server.port`"), "{text}");
        assert!(text.contains("test.toml"), "{text}");
    }

    #[test]
    fn unknown_key_is_rejected_by_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("test.toml"), "[server]\nprot = 1\n").expect("write");
        let text = sources(dir.path()).load().expect_err("typo").to_string();
        assert!(text.contains("prot"), "{text}");
    }

    #[test]
    fn unknown_enum_value_names_the_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            dir.path().join("test.toml"),
            "[telemetry]\nformat = \"xml\"\n",
        )
        .expect("write");
        let text = sources(dir.path())
            .load()
            .expect_err("bad enum")
            .to_string();
        assert!(text.contains("`telemetry.format`"), "{text}");
    }

    #[test]
    fn invalid_log_level_names_the_key() {
        let loaded = LoadedConfig::defaults().set("telemetry.level", "[[[");
        let text = loaded.expect_err("bad filter").to_string();
        assert!(text.contains("`telemetry.level`"), "{text}");
    }

    #[test]
    fn missing_extra_file_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = sources(dir.path());
        s.file = Some(dir.path().join("nope.toml"));
        assert!(
            s.load()
                .expect_err("missing")
                .to_string()
                .contains("nope.toml")
        );
    }

    #[derive(Debug, Default, Deserialize, PartialEq)]
    #[serde(default, deny_unknown_fields)]
    struct WidgetConfig {
        size: u32,
    }

    #[test]
    fn module_section_defaults_when_absent_and_names_bad_keys() {
        let loaded = LoadedConfig::defaults();
        let absent: WidgetConfig = loaded.module_section("widget").expect("defaults");
        assert_eq!(absent, WidgetConfig::default());

        let loaded = loaded.set("modules.widget.size", 7).expect("set");
        let present: WidgetConfig = loaded.module_section("widget").expect("reads");
        assert_eq!(present.size, 7);

        let bad = loaded
            .set("modules.widget.size", "big")
            .expect("module sections are checked by the module");
        let text = bad
            .module_section::<WidgetConfig>("widget")
            .expect_err("bad size")
            .to_string();
        assert!(text.contains("`modules.widget.size`"), "{text}");
    }
}
