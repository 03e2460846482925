//! Traces: OpenTelemetry spans made from `tracing` spans (`tracing-opentelemetry`),
//! batched and exported over OTLP/HTTP (protobuf) when `tracing.enabled`.
//!
//! - **Off** (the default): no layer, no exporter thread; [`continue_trace`], [`ids`]
//!   and [`rename`] return at once.
//! - **Sampling.** `always` and `ratio` follow a caller's `traceparent` (a sampled parent
//!   is recorded, an unsampled one is not) and decide for new traces; `never` records
//!   nothing. An unsampled request still gets a trace id (logs, responses, problems).
//! - **Export.** A batch processor on its own thread exports every
//!   `tracing.scheduled_delay_ms` or `tracing.max_export_batch_size` spans, each export
//!   within `tracing.export_timeout_ms`; at most `tracing.max_queue_size` spans wait, the
//!   others are dropped and counted ([`Bounded`], [`Counted`]). Requests only hand
//!   finished spans to its queue.
//! - **Across asynchronous hops** (a stored event, a queue message) the trace travels as
//!   a W3C `traceparent` string: [`traceparent`] writes the current span's, [`follow`]
//!   makes a span its child, [`link`] links a span to it.

use std::{
    collections::HashMap,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use anyhow::Context as _;
use opentelemetry::{
    Context,
    propagation::{Extractor, TextMapPropagator as _},
    trace::{TraceContextExt as _, TracerProvider as _},
};
use opentelemetry_otlp::{WithExportConfig as _, WithHttpConfig as _};
use opentelemetry_sdk::{
    Resource,
    error::OTelSdkResult,
    propagation::TraceContextPropagator,
    trace::{
        BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracerProvider, SpanData, SpanExporter,
        SpanProcessor,
    },
};
use poem::http::HeaderMap;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::{Layer, registry::LookupSpan};

use crate::{
    config::{TraceSampler, TracingConfig},
    metrics::{TRACE_SPANS_DROPPED_TOTAL, TRACE_SPANS_EXPORTED_TOTAL},
};

/// Set once tracing is on.
static ENABLED: OnceLock<()> = OnceLock::new();

/// The tracer provider: flushed and stopped by [`Tracing::shutdown`].
pub(crate) struct Tracing {
    provider: SdkTracerProvider,
}

impl Tracing {
    /// Exports what is waiting and stops the export thread, within `budget`.
    pub(crate) fn shutdown(&self, budget: Duration) {
        if let Err(error) = self.provider.shutdown_with_timeout(budget) {
            tracing::warn!(%error, "traces: the last export did not finish");
        }
    }
}

/// The exporter and the layer that turns `tracing` spans into OpenTelemetry spans.
pub(crate) fn layer<S>(config: &TracingConfig) -> anyhow::Result<(Tracing, impl Layer<S>)>
where
    S: tracing::Subscriber + for<'span> LookupSpan<'span>,
{
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
        .with_endpoint(&config.endpoint)
        .with_timeout(Duration::from_millis(config.export_timeout_ms))
        .with_headers(config.headers.clone().into_iter().collect())
        .build()
        .context("`tracing`: cannot build the OTLP exporter")?;
    let waiting = Arc::new(AtomicUsize::new(0));
    let exporter = Counted {
        inner: exporter,
        waiting: waiting.clone(),
    };
    let batches = BatchSpanProcessor::builder(exporter)
        .with_batch_config(
            BatchConfigBuilder::default()
                .with_max_queue_size(config.max_queue_size)
                .with_max_export_batch_size(config.max_export_batch_size)
                .with_scheduled_delay(Duration::from_millis(config.scheduled_delay_ms))
                .build(),
        )
        .build();
    let batches = Bounded {
        inner: batches,
        waiting,
        limit: config.max_queue_size,
    };
    let sampler = match config.sampler {
        TraceSampler::Always => Sampler::ParentBased(Box::new(Sampler::AlwaysOn)),
        TraceSampler::Never => Sampler::AlwaysOff,
        TraceSampler::Ratio => {
            Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(config.ratio)))
        }
    };
    let provider = SdkTracerProvider::builder()
        .with_span_processor(batches)
        .with_sampler(sampler)
        .with_resource(
            Resource::builder()
                .with_service_name(config.service_name.clone())
                .build(),
        )
        .build();
    let tracer = provider.tracer("trellis");
    let _ = ENABLED.set(());
    // Spans from `info` up (let through whatever `telemetry.level` says), and the log
    // lines the level lets through, as events of their span.
    let layer = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_location(false)
        .with_threads(false)
        .with_tracked_inactivity(false);
    Ok((Tracing { provider }, layer))
}

/// Whether tracing is on.
pub fn enabled() -> bool {
    ENABLED.get().is_some()
}

/// The batch processor, with a bound it counts: at most `limit` sampled spans wait or are
/// being exported; the others are dropped and counted in `trace_spans_dropped_total`
/// (`reason="queue_full"`). The SDK's own queue has the same size and so never drops (it
/// only logs its first drop, and counts none where a metric can read it).
#[derive(Debug)]
struct Bounded {
    inner: BatchSpanProcessor,
    waiting: Arc<AtomicUsize>,
    limit: usize,
}

impl SpanProcessor for Bounded {
    fn on_start(&self, span: &mut opentelemetry_sdk::trace::Span, cx: &Context) {
        self.inner.on_start(span, cx);
    }

    fn on_end(&self, span: SpanData) {
        if !span.span_context.is_sampled() {
            return;
        }
        if self.waiting.fetch_add(1, Ordering::AcqRel) >= self.limit {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            metrics::counter!(TRACE_SPANS_DROPPED_TOTAL, "reason" => "queue_full").increment(1);
            return;
        }
        self.inner.on_end(span);
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// The exporter, counting what it exported and what it could not
/// (`reason="export_failed"`: the endpoint is down or refused the batch), and releasing
/// the exported spans' places in [`Bounded`]'s count.
#[derive(Debug)]
struct Counted<E> {
    inner: E,
    waiting: Arc<AtomicUsize>,
}

impl<E: SpanExporter> SpanExporter for Counted<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let spans = batch.len();
        let result = self.inner.export(batch).await;
        self.waiting.fetch_sub(spans, Ordering::AcqRel);
        match &result {
            Ok(()) => metrics::counter!(TRACE_SPANS_EXPORTED_TOTAL).increment(spans as u64),
            Err(_) => metrics::counter!(TRACE_SPANS_DROPPED_TOTAL, "reason" => "export_failed")
                .increment(spans as u64),
        }
        result
    }

    fn shutdown_with_timeout(&mut self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&mut self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// Request headers as the propagator reads them.
struct Headers<'a>(&'a HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// Makes `span` continue the caller's trace when `headers` carry a valid W3C
/// `traceparent` (and `tracestate`); garbage is ignored and a new trace starts.
pub fn continue_trace(span: &tracing::Span, headers: &HeaderMap) {
    if !enabled() {
        return;
    }
    let parent = TraceContextPropagator::new().extract(&Headers(headers));
    if parent.span().span_context().is_valid() {
        let _ = span.set_parent(parent);
    }
}

/// Names `span`'s OpenTelemetry span (once it has started: its ids were asked for, so
/// `otel.name` recorded on it no longer would).
pub fn rename(span: &tracing::Span, name: String) {
    if enabled() {
        span.context().span().update_name(name);
    }
}

/// The trace id and span id of `span` (32 and 16 lowercase hex digits), when tracing
/// is on.
pub fn ids(span: &tracing::Span) -> Option<(String, String)> {
    if !enabled() {
        return None;
    }
    let context = span.context();
    let span_context = context.span().span_context().clone();
    span_context.is_valid().then(|| {
        (
            span_context.trace_id().to_string(),
            span_context.span_id().to_string(),
        )
    })
}

/// A stored `traceparent` as the propagator reads it.
struct Traceparent<'a>(&'a str);

impl Extractor for Traceparent<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        (key == "traceparent").then_some(self.0)
    }

    fn keys(&self) -> Vec<&str> {
        vec!["traceparent"]
    }
}

fn parse(traceparent: &str) -> Option<Context> {
    let context = TraceContextPropagator::new().extract(&Traceparent(traceparent));
    context.span().span_context().is_valid().then_some(context)
}

/// The W3C `traceparent` of the current span, for what carries a trace across an
/// asynchronous hop (a stored event, a queue message); `None` when tracing is off.
pub fn traceparent() -> Option<String> {
    if !enabled() {
        return None;
    }
    let context = tracing::Span::current().context();
    if !context.span().span_context().is_valid() {
        return None;
    }
    let mut carrier = HashMap::with_capacity(1);
    TraceContextPropagator::new().inject_context(&context, &mut carrier);
    carrier.remove("traceparent")
}

/// Makes `span` a child of the span `traceparent` names (see [`traceparent`]); nothing
/// when it is missing or malformed.
pub fn follow(span: &tracing::Span, traceparent: Option<&str>) {
    if let Some(parent) = traceparent.filter(|_| enabled()).and_then(parse) {
        let _ = span.set_parent(parent);
    }
}

/// Links `span` to the span `traceparent` names (for work done for several traces at
/// once, such as a batch of messages).
pub fn link(span: &tracing::Span, traceparent: &str) {
    if let Some(other) = Some(traceparent).filter(|_| enabled()).and_then(parse) {
        span.add_link(other.span().span_context().clone());
    }
}
