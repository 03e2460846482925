//! Traces: OpenTelemetry spans made from `tracing` spans (`tracing-opentelemetry`),
//! batched and exported over OTLP/HTTP (protobuf) when `tracing.enabled`.
//!
//! - **Off** (the default): no layer, no exporter thread; [`decide`] answers `Off`.
//! - **Sampling** is decided per request, before its span exists ([`decide`]): `always`
//!   and `ratio` follow a caller's `traceparent` (a sampled parent is recorded, an
//!   unsampled one is not) and decide for new traces; `never` records nothing. An
//!   unsampled request still gets a trace id (logs, responses, problems), but the trace
//!   layer never sees its span or anything inside it ([`TracedOnly`]), so it costs about
//!   what it costs with tracing off. Work done later for a request (an event's handler,
//!   a queue send) is traced when the request was ([`follows`]); spans inside traced work
//!   are made only there ([`traced_here`]).
//! - **Export.** A batch processor on its own thread exports every
//!   `tracing.scheduled_delay_ms` or `tracing.max_export_batch_size` spans, each export
//!   within `tracing.export_timeout_ms`; at most `tracing.max_queue_size` spans wait, the
//!   others are dropped and counted ([`Bounded`], [`Counted`]). Requests only hand
//!   finished spans to its queue.
//! - **Across asynchronous hops** (a stored event, a queue message) the trace travels as
//!   a W3C `traceparent` string: [`traceparent`] writes the current span's, [`follow`]
//!   makes a span its child, [`link`] links a span to it.

use std::{
    any::TypeId,
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
use poem::http::{HeaderMap, HeaderName};
use rand::Rng as _;
use tracing::span;
use tracing_opentelemetry::{OpenTelemetrySpanExt as _, OtelData};
use tracing_subscriber::{Layer, Registry, layer, registry::LookupSpan};

use super::{RequestTrace, TraceIds};
use crate::{
    config::{TraceSampler, TracingConfig},
    metrics::{TRACE_SPANS_DROPPED_TOTAL, TRACE_SPANS_EXPORTED_TOTAL},
};

/// How requests are sampled: set once tracing is on.
static SAMPLING: OnceLock<(TraceSampler, f64)> = OnceLock::new();

/// Spans the trace layer sees that are open now: while there is none, no code runs in
/// traced work, and [`traced_here`] answers without looking the current span up.
static OPEN: AtomicUsize = AtomicUsize::new(0);

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
    // Requests are sampled by [`decide`] before their span exists, and everything else
    // follows them: the SDK records what reaches it.
    let sampler = match config.sampler {
        TraceSampler::Never => Sampler::AlwaysOff,
        TraceSampler::Always | TraceSampler::Ratio => {
            Sampler::ParentBased(Box::new(Sampler::AlwaysOn))
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
    let _ = SAMPLING.set((config.sampler, config.ratio));
    // Spans from `info` up (let through whatever `telemetry.level` says), and the log
    // lines the level lets through, as events of their span.
    let layer = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_location(false)
        .with_threads(false)
        .with_tracked_inactivity(false);
    Ok((Tracing { provider }, TracedOnly(layer)))
}

/// Whether tracing is on.
pub fn enabled() -> bool {
    SAMPLING.get().is_some()
}

/// The trace layer, shown only the spans of sampled work: a span inside a span it saw,
/// or a root span that says what kind it is (`otel.kind`: a request's, a handler's, a
/// send's), and the log lines inside them. An unsampled request's span, and everything
/// inside it, never reaches it, so it costs about what it costs with tracing off.
///
/// A wrapper rather than a per-layer filter: a filter decides on a span before it exists,
/// from the current span alone, and a filter's decision for a check that is not followed
/// by its span or line (a `log` record below the level) is left behind for the next one.
struct TracedOnly<L>(L);

/// Whether the trace layer saw the span `id`. While it has no span open, none: the
/// spans of unsampled requests are not even looked up.
#[inline]
fn seen<S>(ctx: &layer::Context<'_, S>, id: &span::Id) -> bool
where
    S: tracing::Subscriber + for<'span> LookupSpan<'span>,
{
    OPEN.load(Ordering::Relaxed) > 0
        && ctx
            .span(id)
            .is_some_and(|span| span.extensions().get::<OtelData>().is_some())
}

impl<S, L> Layer<S> for TracedOnly<L>
where
    S: tracing::Subscriber + for<'span> LookupSpan<'span>,
    L: Layer<S>,
{
    fn on_register_dispatch(&self, subscriber: &tracing::Dispatch) {
        self.0.on_register_dispatch(subscriber);
    }

    fn on_layer(&mut self, subscriber: &mut S) {
        self.0.on_layer(subscriber);
    }

    fn on_new_span(&self, attrs: &span::Attributes<'_>, id: &span::Id, ctx: layer::Context<'_, S>) {
        // A span is traced inside a traced span, or on its own when it says what kind
        // of work it is; while no span is traced, only the latter need their parent.
        let kind = || attrs.metadata().fields().field("otel.kind").is_some();
        if OPEN.load(Ordering::Relaxed) == 0 && !kind() {
            return;
        }
        let parent = match attrs.parent() {
            Some(parent) => Some(parent.clone()),
            None if attrs.is_contextual() => ctx.current_span().id().cloned(),
            None => None,
        };
        let traced = match parent {
            Some(parent) => seen(&ctx, &parent),
            None => kind(),
        };
        if traced {
            OPEN.fetch_add(1, Ordering::Relaxed);
            self.0.on_new_span(attrs, id, ctx);
        }
    }

    fn on_record(&self, id: &span::Id, values: &span::Record<'_>, ctx: layer::Context<'_, S>) {
        if seen(&ctx, id) {
            self.0.on_record(id, values, ctx);
        }
    }

    fn on_follows_from(&self, id: &span::Id, follows: &span::Id, ctx: layer::Context<'_, S>) {
        if seen(&ctx, id) {
            self.0.on_follows_from(id, follows, ctx);
        }
    }

    fn on_event(&self, event: &tracing::Event<'_>, ctx: layer::Context<'_, S>) {
        let in_traced_span = OPEN.load(Ordering::Relaxed) > 0
            && ctx
                .event_span(event)
                .is_some_and(|span| span.extensions().get::<OtelData>().is_some());
        if in_traced_span {
            self.0.on_event(event, ctx);
        }
    }

    fn on_enter(&self, id: &span::Id, ctx: layer::Context<'_, S>) {
        if seen(&ctx, id) {
            self.0.on_enter(id, ctx);
        }
    }

    fn on_exit(&self, id: &span::Id, ctx: layer::Context<'_, S>) {
        if seen(&ctx, id) {
            self.0.on_exit(id, ctx);
        }
    }

    fn on_close(&self, id: span::Id, ctx: layer::Context<'_, S>) {
        if seen(&ctx, &id) {
            OPEN.fetch_sub(1, Ordering::Relaxed);
            self.0.on_close(id, ctx);
        }
    }

    fn on_id_change(&self, old: &span::Id, new: &span::Id, ctx: layer::Context<'_, S>) {
        self.0.on_id_change(old, new, ctx);
    }

    #[expect(
        unsafe_code,
        reason = "a wrapping layer must forward `downcast_raw`, through which the trace \
                  layer's context is reached (`OpenTelemetrySpanExt`); tracing-subscriber \
                  offers no safe way to do so"
    )]
    unsafe fn downcast_raw(&self, id: TypeId) -> Option<*const ()> {
        if id == TypeId::of::<Self>() {
            Some(std::ptr::from_ref(self).cast())
        } else {
            // SAFETY: the inner layer answers for its own types, as `downcast_raw`'s
            // contract requires of it; the pointer it returns is to a part of `self.0`,
            // which lives as long as `self`.
            unsafe { self.0.downcast_raw(id) }
        }
    }
}

/// The caller's span, if a valid `traceparent` named one.
pub struct Parent(Option<Context>);

impl Parent {
    /// Makes `span` continue the caller's trace.
    pub fn adopt(self, span: &tracing::Span) {
        if let Some(parent) = self.0 {
            let _ = span.set_parent(parent);
        }
    }
}

/// The W3C header, named once rather than parsed on every request.
static TRACEPARENT_HEADER: HeaderName = HeaderName::from_static("traceparent");

/// Decides whether a request with these headers is sampled: as its caller's W3C
/// `traceparent` says when it carries a valid one (malformed ones are ignored), else
/// by `tracing.sampler` (`ratio`: that share of requests, at random).
pub fn decide(headers: &HeaderMap) -> RequestTrace {
    let Some(&(sampler, ratio)) = SAMPLING.get() else {
        return RequestTrace::Off;
    };
    let parent = headers
        .contains_key(&TRACEPARENT_HEADER)
        .then(|| TraceContextPropagator::new().extract(&Headers(headers)))
        .filter(|parent| parent.span().span_context().is_valid());
    let sampled = match (sampler, &parent) {
        (TraceSampler::Never, _) => false,
        (_, Some(parent)) => parent.span().span_context().is_sampled(),
        (TraceSampler::Always, None) => true,
        (TraceSampler::Ratio, None) => rand::random::<f64>() < ratio,
    };
    if sampled {
        return RequestTrace::Sampled(Parent(parent));
    }
    // All-zero ids are invalid.
    let mut random = rand::rng();
    let trace_id = match &parent {
        Some(parent) => parent.span().span_context().trace_id().to_bytes(),
        None => random.random::<u128>().max(1).to_be_bytes(),
    };
    let span_id = random.random::<u64>().max(1).to_be_bytes();
    RequestTrace::Unsampled(TraceIds::new(trace_id, span_id))
}

/// Whether the current span is traced (tracing is on and it belongs to sampled work):
/// where spans made with [`trace_span!`](crate::trace_span) are worth making.
pub fn traced_here() -> bool {
    enabled()
        && OPEN.load(Ordering::Relaxed) > 0
        && tracing::dispatcher::get_default(|dispatch| {
            let current = dispatch.current_span();
            let Some(id) = current.id() else {
                return false;
            };
            dispatch
                .downcast_ref::<Registry>()
                .and_then(|registry| registry.span(id))
                .is_some_and(|span| span.extensions().get::<OtelData>().is_some())
        })
}

/// Whether work carrying `traceparent` (a stored event, a queue message) is traced: it
/// is when the span that started it was.
pub fn follows(traceparent: Option<&str>) -> bool {
    enabled() && traceparent.and_then(parse).is_some()
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

/// Names `span`'s OpenTelemetry span (once it has started: its ids were asked for, so
/// `otel.name` recorded on it no longer would).
pub fn rename(span: &tracing::Span, name: String) {
    if enabled() {
        span.context().span().update_name(name);
    }
}

/// The trace id and span id of `span` (32 and 16 lowercase hex digits), when tracing
/// is on.
pub fn ids(span: &tracing::Span) -> Option<TraceIds> {
    if !enabled() {
        return None;
    }
    let context = span.context();
    let span_context = context.span().span_context().clone();
    span_context.is_valid().then(|| {
        TraceIds::new(
            span_context.trace_id().to_bytes(),
            span_context.span_id().to_bytes(),
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

/// The sampled span `traceparent` names.
fn parse(traceparent: &str) -> Option<Context> {
    let context = TraceContextPropagator::new().extract(&Traceparent(traceparent));
    let span_context = context.span().span_context().clone();
    (span_context.is_valid() && span_context.is_sampled()).then_some(context)
}

/// The W3C `traceparent` of the current span, for what carries a trace across an
/// asynchronous hop (a stored event, a queue message); `None` when tracing is off.
pub fn traceparent() -> Option<String> {
    if !traced_here() {
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
