//! Logs: tracing to the console (pretty, compact or JSON) or to a rolling file, through a
//! non-blocking writer, with a level that follows the config files at run time.
//!
//! The level is watched by polling the config files' modification stamps once per
//! interval rather than with inotify: polling also sees files replaced by rename or
//! through symlink swaps (editors, Kubernetes config maps), and costs one `stat` per file.

use std::{
    io::IsTerminal as _,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use anyhow::Context as _;
use futures_util::future::Either;
use tracing::{Instrument as _, instrument::Instrumented, span};
use tracing_appender::non_blocking::WorkerGuard;
use tracing_subscriber::{
    EnvFilter, Layer, Registry,
    filter::LevelFilter,
    layer::{Context, SubscriberExt as _},
    reload,
    util::SubscriberInitExt as _,
};

use crate::config::{
    ConfigSources, LogFormat, LogOutput, LogRotation, TelemetryConfig, TracingConfig,
};

mod line;
#[cfg(feature = "otel")]
mod trace;
pub use trace::{
    Parent as TraceParent, decide as decide_trace, enabled as tracing_enabled,
    follow as follow_trace, follows as trace_follows, ids as trace_ids, link as link_trace,
    rename as rename_span, traced_here, traceparent,
};

#[doc(hidden)]
pub use tracing as __tracing;

/// How a request is traced, decided before its span exists ([`decide_trace`]).
pub enum RequestTrace {
    /// Tracing is off.
    Off,
    /// Sampled: its span is exported, continuing the caller's trace if there is one.
    Sampled(TraceParent),
    /// Not sampled: nothing is recorded; these ids go to its logs and answers only (the
    /// caller's trace id, or a new one, and the request's own span id).
    Unsampled(TraceIds),
}

/// A request's trace id and span id, in lowercase hex (32 and 16 digits), written
/// without the formatting machinery or an allocation: every request has them while
/// tracing is on, sampled or not.
#[derive(Debug, Clone, Copy)]
pub struct TraceIds([u8; 48]);

/// Each byte's two lowercase hex digits.
static HEX_PAIRS: [[u8; 2]; 256] = {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut pairs = [[0_u8; 2]; 256];
    let mut byte = 0;
    while byte < 256 {
        pairs[byte] = [HEX[byte >> 4], HEX[byte & 0xf]];
        byte += 1;
    }
    pairs
};

impl TraceIds {
    const TRACE_DIGITS: usize = 32;

    /// The ids written in hex; the W3C ids are big-endian bytes.
    pub fn new(trace_id: [u8; 16], span_id: [u8; 8]) -> Self {
        let mut bytes = [0_u8; 24];
        bytes[..16].copy_from_slice(&trace_id);
        bytes[16..].copy_from_slice(&span_id);
        let mut text = [0_u8; 48];
        for (digits, byte) in text.chunks_exact_mut(2).zip(bytes) {
            digits.copy_from_slice(&HEX_PAIRS[usize::from(byte)]);
        }
        Self(text)
    }

    /// The trace id (32 lowercase hex digits) and the span id (16).
    pub fn as_strs(&self) -> (&str, &str) {
        std::str::from_utf8(&self.0)
            .unwrap_or_default()
            .split_at_checked(Self::TRACE_DIGITS)
            .unwrap_or_default()
    }

    /// The trace id: 32 lowercase hex digits.
    pub fn trace_id(&self) -> &str {
        self.as_strs().0
    }

    /// The trace id's digits, for a header.
    pub fn trace_id_bytes(&self) -> &[u8] {
        &self.0[..Self::TRACE_DIGITS]
    }
}

/// `.instrument(span)` for a span from [`trace_span!`]: a disabled span wraps nothing, so
/// work outside traces runs as it would without it.
pub trait InTrace: Future + Sized {
    /// The future inside `span`, or the future itself when `span` is disabled.
    fn in_trace(self, span: tracing::Span) -> Either<Instrumented<Self>, Self> {
        if span.is_none() {
            Either::Right(self)
        } else {
            Either::Left(self.instrument(span))
        }
    }
}

impl<F: Future> InTrace for F {}

/// A span made for traces only: `tracing::info_span!(…)` with the same arguments inside
/// traced work ([`traced_here`]), and a disabled span otherwise, so that with tracing off,
/// and in requests that are not sampled, neither the logs nor the cost of the code it
/// wraps change.
///
/// ```no_run
/// let span = trellis_core::trace_span!("db", otel.name = "db find_user", otel.kind = "client");
/// ```
#[macro_export]
macro_rules! trace_span {
    ($($arguments:tt)+) => {
        if $crate::telemetry::traced_here() {
            $crate::telemetry::__tracing::info_span!($($arguments)+)
        } else {
            $crate::telemetry::__tracing::Span::none()
        }
    };
}

/// Without the `otel` feature there are no traces, and `tracing.enabled` is refused.
#[cfg(not(feature = "otel"))]
mod trace {
    use std::time::Duration;

    use crate::config::TracingConfig;

    pub(crate) struct Tracing;

    impl Tracing {
        pub(crate) fn shutdown(&self, _: Duration) {}
    }

    pub(crate) fn layer(
        _: &TracingConfig,
    ) -> anyhow::Result<(Tracing, tracing_subscriber::layer::Identity)> {
        anyhow::bail!(
            "`tracing.enabled`: this build has no tracing (the `otel` feature of trellis-core)"
        )
    }

    /// Whether tracing is on: never, in this build.
    pub fn enabled() -> bool {
        false
    }
    use super::RequestTrace;

    /// No caller to continue.
    pub struct Parent;
    impl Parent {
        /// Nothing to adopt.
        pub fn adopt(self, _: &tracing::Span) {}
    }
    /// Off.
    pub fn decide(_: &poem::http::HeaderMap) -> RequestTrace {
        RequestTrace::Off
    }
    /// Nothing is traced.
    pub fn traced_here() -> bool {
        false
    }
    /// Nothing is traced.
    pub fn follows(_: Option<&str>) -> bool {
        false
    }
    /// No ids.
    pub fn ids(_: &tracing::Span) -> Option<super::TraceIds> {
        None
    }
    /// No span to name.
    pub fn rename(_: &tracing::Span, _: String) {}
    /// No trace to carry.
    pub fn traceparent() -> Option<String> {
        None
    }
    /// No trace to follow.
    pub fn follow(_: &tracing::Span, _: Option<&str>) {}
    /// No trace to link.
    pub fn link(_: &tracing::Span, _: &str) {}
}

type FilterHandle = reload::Handle<EnvFilter, Registry>;

/// The installed subscriber: keeps the writer alive and lets the level change.
pub struct Telemetry {
    filter: FilterHandle,
    level: Mutex<String>,
    tracing: Option<trace::Tracing>,
    _guard: WorkerGuard,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry")
            .field("level", &self.level)
            .finish()
    }
}

/// The log writer's thread takes every line waiting, then flushes: through a buffer
/// that is one `write` per batch rather than one per line.
fn batched<W: std::io::Write>(writer: W) -> std::io::BufWriter<W> {
    std::io::BufWriter::with_capacity(64 * 1024, writer)
}

/// Installs the global subscriber described by `config`, with traces as `tracing` says.
/// Call once, first thing in `main`.
pub fn init(config: &TelemetryConfig, tracing: &TracingConfig) -> anyhow::Result<Telemetry> {
    let filter = EnvFilter::try_new(&config.level)
        .with_context(|| format!("`telemetry.level`: invalid filter `{}`", config.level))?;
    let (filter_layer, filter_handle) = reload::Layer::new(filter);

    let (writer, guard) = match config.output {
        LogOutput::Console => tracing_appender::non_blocking(batched(std::io::stdout())),
        LogOutput::File => {
            let file = &config.file;
            std::fs::create_dir_all(&file.directory).with_context(|| {
                format!(
                    "`telemetry.file.directory`: cannot create {}",
                    file.directory.display()
                )
            })?;
            let mut builder = tracing_appender::rolling::RollingFileAppender::builder()
                .rotation(match file.rotation {
                    LogRotation::Minutely => tracing_appender::rolling::Rotation::MINUTELY,
                    LogRotation::Hourly => tracing_appender::rolling::Rotation::HOURLY,
                    LogRotation::Daily => tracing_appender::rolling::Rotation::DAILY,
                    LogRotation::Never => tracing_appender::rolling::Rotation::NEVER,
                })
                .filename_prefix(&file.prefix);
            if file.max_files > 0 {
                builder = builder.max_log_files(file.max_files);
            }
            let appender = builder
                .build(&file.directory)
                .context("`telemetry.file`: cannot open the log file")?;
            tracing_appender::non_blocking(batched(appender))
        }
    };
    // Colours (pretty format) only for a person at a terminal: escape codes are noise in a
    // pipe or a file, and writing them was 7% of the CPU of a `/healthz` load
    // (tests/bench/RESULTS.md). The compact format never colours.
    let ansi = config.output == LogOutput::Console && std::io::stdout().is_terminal();

    let fmt_layer = FmtLayer {
        format: config.format,
        writer,
        ansi,
    };

    let traced = tracing.enabled.then(|| trace::layer(tracing)).transpose()?;
    let registry = tracing_subscriber::registry();
    let installed = match traced {
        Some((tracing, spans)) => registry
            .with(SpansToo(filter_layer))
            .with(fmt_layer.boxed())
            .with(spans)
            .try_init()
            .map(|()| Some(tracing)),
        None => registry
            .with(filter_layer)
            .with(fmt_layer.boxed())
            .try_init()
            .map(|()| None),
    };
    let tracing = installed.context("a global tracing subscriber is already installed")?;

    Ok(Telemetry {
        filter: filter_handle,
        level: Mutex::new(config.level.clone()),
        tracing,
        _guard: guard,
    })
}

/// With tracing on: the level's filter (`telemetry.level`), which lets through as well
/// the spans traces are made of (`info` and up) whatever the level, so that traces do
/// not depend on it. One filter for every layer: with a filter per layer (the log
/// layer's level, the trace layer's own), a check that is not followed by its event (a
/// `log` record below the level, sqlx's notices) leaves the next span filtered out for
/// the trace layer.
struct SpansToo<L>(L);

fn traced(meta: &tracing::Metadata<'_>) -> bool {
    meta.is_span() && *meta.level() <= tracing::Level::INFO
}

impl<S: tracing::Subscriber, L: Layer<S>> Layer<S> for SpansToo<L> {
    fn on_register_dispatch(&self, subscriber: &tracing::Dispatch) {
        self.0.on_register_dispatch(subscriber);
    }

    fn register_callsite(
        &self,
        meta: &'static tracing::Metadata<'static>,
    ) -> tracing::subscriber::Interest {
        match traced(meta) {
            true => tracing::subscriber::Interest::always(),
            false => self.0.register_callsite(meta),
        }
    }

    fn enabled(&self, meta: &tracing::Metadata<'_>, cx: Context<'_, S>) -> bool {
        traced(meta) || self.0.enabled(meta, cx)
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        self.0
            .max_level_hint()
            .map(|level| level.max(LevelFilter::INFO))
    }

    fn on_new_span(&self, attrs: &span::Attributes<'_>, id: &span::Id, cx: Context<'_, S>) {
        self.0.on_new_span(attrs, id, cx);
    }

    fn on_record(&self, id: &span::Id, values: &span::Record<'_>, cx: Context<'_, S>) {
        self.0.on_record(id, values, cx);
    }

    fn on_enter(&self, id: &span::Id, cx: Context<'_, S>) {
        self.0.on_enter(id, cx);
    }

    fn on_exit(&self, id: &span::Id, cx: Context<'_, S>) {
        self.0.on_exit(id, cx);
    }

    fn on_close(&self, id: span::Id, cx: Context<'_, S>) {
        self.0.on_close(id, cx);
    }
}

/// The log lines' layer, as `telemetry.format` says.
struct FmtLayer {
    format: LogFormat,
    writer: tracing_appender::non_blocking::NonBlocking,
    ansi: bool,
}

impl FmtLayer {
    fn boxed<S>(self) -> Box<dyn Layer<S> + Send + Sync>
    where
        S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
    {
        let fmt = tracing_subscriber::fmt::layer()
            .with_writer(self.writer)
            .with_ansi(self.ansi);
        match self.format {
            LogFormat::Pretty => fmt.pretty().boxed(),
            LogFormat::Compact => fmt
                .event_format(line::LineFormat)
                .fmt_fields(line::LineFields)
                .boxed(),
            LogFormat::Json => fmt
                .json()
                .flatten_event(true)
                .with_current_span(true)
                .with_span_list(true)
                .boxed(),
        }
    }
}

impl Telemetry {
    /// Exports the spans still waiting, within `budget` (at shutdown).
    pub fn flush_traces(&self, budget: Duration) {
        if let Some(tracing) = &self.tracing {
            tracing.shutdown(budget);
        }
    }

    /// The level in force.
    pub fn level(&self) -> String {
        self.level.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// Applies `level` if it differs from the one in force; returns whether it changed.
    pub fn set_level(&self, level: &str) -> anyhow::Result<bool> {
        let mut current = self
            .level
            .lock()
            .map_err(|_| anyhow::anyhow!("log level lock poisoned"))?;
        if *current == level {
            return Ok(false);
        }
        let filter = EnvFilter::try_new(level)
            .with_context(|| format!("`telemetry.level`: invalid filter `{level}`"))?;
        self.filter
            .reload(filter)
            .context("cannot replace the log filter")?;
        let previous = std::mem::replace(&mut *current, level.to_owned());
        drop(current);
        tracing::info!(previous = %previous, level = %level, "log level changed from the configuration file");
        Ok(true)
    }

    /// Polls the config files every `interval` and applies a changed `telemetry.level`
    /// without a restart. Stops when the returned task is aborted.
    pub fn watch_level(
        self: Arc<Self>,
        sources: ConfigSources,
        interval: Duration,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut seen = stamps(&sources);
            let mut ticker = tokio::time::interval(interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticker.tick().await;
                let now = stamps(&sources);
                if now == seen {
                    continue;
                }
                seen = now;
                match sources.load() {
                    Ok(loaded) => {
                        if let Err(error) = self.set_level(&loaded.config.telemetry.level) {
                            tracing::warn!(error = %format!("{error:#}"), "log level not changed");
                        }
                    }
                    Err(error) => tracing::warn!(
                        %error,
                        "a configuration file changed but no longer loads; keeping the log level"
                    ),
                }
            }
        })
    }
}

type Stamp = (PathBuf, Option<(SystemTime, u64)>);

fn stamps(sources: &ConfigSources) -> Vec<Stamp> {
    let mut candidates = vec![
        sources.dir.join("default.toml"),
        sources.dir.join(format!("{}.toml", sources.profile)),
    ];
    candidates.extend(sources.file.clone());
    candidates
        .into_iter()
        .map(|path| {
            let stamp = std::fs::metadata(&path)
                .ok()
                .and_then(|m| Some((m.modified().ok()?, m.len())));
            (path, stamp)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::LogFileConfig;

    #[test]
    fn trace_ids_are_written_as_format_writes_them() {
        for value in [
            1_u128,
            0xabc,
            u128::from(u64::MAX),
            u128::MAX,
            0x0123_4567_89ab_cdef,
        ] {
            let span = value as u64;
            let ids = TraceIds::new(value.to_be_bytes(), span.to_be_bytes());
            let (trace_id, span_id) = ids.as_strs();
            assert_eq!(trace_id, format!("{value:032x}"));
            assert_eq!(span_id, format!("{span:016x}"));
            assert_eq!(ids.trace_id_bytes(), trace_id.as_bytes());
        }
    }

    // The only test in this crate that installs the global subscriber.
    #[test]
    fn file_output_writes_json_lines_and_the_level_can_change() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = TelemetryConfig {
            level: "warn".into(),
            format: LogFormat::Json,
            output: LogOutput::File,
            access_log: true,
            file: LogFileConfig {
                directory: dir.path().to_path_buf(),
                prefix: "test.log".into(),
                rotation: LogRotation::Never,
                max_files: 0,
            },
        };
        let telemetry = init(&config, &TracingConfig::default()).expect("installs");
        tracing::info!("hidden at warn");
        tracing::warn!(answer = 42, "kept at warn");
        assert!(telemetry.set_level("info").expect("valid level"));
        assert!(
            !telemetry.set_level("info").expect("same level"),
            "no change, no reload"
        );
        tracing::info!("shown at info");
        tracing::info_span!("request", request_id = "r1", trace_id = "t1").in_scope(|| {
            tracing::info_span!("db", module = "user").in_scope(|| {
                tracing::warn!("inside a span inside a request");
            });
        });
        assert!(telemetry.set_level("[[[").is_err());
        drop(telemetry);

        let text = std::fs::read_to_string(dir.path().join("test.log")).expect("log file");
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("each line is JSON"))
            .collect();
        let messages: Vec<&str> = lines.iter().filter_map(|l| l["message"].as_str()).collect();
        assert_eq!(
            messages,
            [
                "kept at warn",
                "log level changed from the configuration file",
                "shown at info",
                "inside a span inside a request"
            ]
        );
        assert_eq!(lines[0]["answer"], 42);
        // A line in a span inside the request span still carries the request's ids.
        let inside = &lines[3];
        assert_eq!(inside["span"]["module"], "user", "{inside}");
        assert_eq!(inside["spans"][0]["request_id"], "r1", "{inside}");
        assert_eq!(inside["spans"][0]["trace_id"], "t1", "{inside}");
    }
}
