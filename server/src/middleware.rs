//! The middleware every request passes, in this order:
//!
//! 0. the bus rides along with each request, so that the bearer-token checker in core
//!    can ask the module that authenticates; behind `server.trusted_proxies`, the client's
//!    address is read from their header ([`trellis_core::client`]) for every limit, the
//!    access line (`client=`) and the modules;
//! 1. request id: reuse a sane incoming `X-Request-Id` or generate one, open the
//!    [`RequestScope`], echo the id;
//! 2. access log: one span and one access-log line per request; server-side failure causes
//!    carried by problem responses are logged inside the span. With `tracing.enabled` the
//!    span is the request's OpenTelemetry server span: it continues a caller's
//!    `traceparent`, is named `<method> <route template>`, carries `trace_id` and
//!    `span_id` into every log line inside it, and the response carries `X-Trace-Id`;
//! 3. metrics: in-flight gauge, request counter and duration histogram by method, route
//!    template and status;
//! 4. admission: 503 over-capacity for a connection beyond `server.max_connections`
//!    ([`ConnectionOverCapacity`]) and for a request beyond `server.max_in_flight`
//!    (the probes and `/metrics` are always admitted);
//! 5. panic -> 500 problem, the panic message logged;
//! 6. body limit: 413 beyond `server.body_limit_bytes`, announced or streamed; the rest of
//!    the body is read and dropped for `server.body_linger_ms` first, so that a client
//!    still sending gets the 413 rather than a reset connection;
//! 7. timeout: 503 beyond `server.request_timeout_ms`, reading a streamed body included;
//! 8. CORS (poem's `Cors`), when origins are configured;
//! 9. [`Problems`]: router errors (no route, wrong method with its `Allow` header,
//!    unparsable input) become problem+json;
//! 10. on the way out, [`harden`]: `X-Content-Type-Options: nosniff` on every response,
//!     `Cache-Control: no-store` on the API's, `Vary: Origin` while CORS is on; and while
//!     the server drains, `Connection: close`, so that a proxy opens its next connection to
//!     another instance instead of reusing one that is about to close.
//!
//! Steps 1 to 7 are one endpoint, [`Stack`], with a function per step. Each `async` layer
//! keeps its own copy of the request (472 bytes) and the whole future of the layers inside
//! it, and the server boxes the outermost future per request: as six nested endpoints the
//! stack was a 21 KiB future, copied on every request (10% of the CPU of a `/healthz` load,
//! tests/bench/RESULTS.md).

use std::{
    collections::HashMap,
    panic::AssertUnwindSafe,
    sync::{
        Arc, LazyLock, RwLock,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use futures_util::{FutureExt as _, StreamExt as _};
use metrics::{Counter, Gauge, Histogram, SharedString, counter, gauge, histogram};
use poem::{
    Body, Endpoint, IntoResponse, Request, Response,
    http::{
        HeaderMap, HeaderValue, Method, StatusCode,
        header::{self, HeaderName},
    },
};
use tracing::Instrument as _;
use trellis_core::{
    bus::Bus,
    client::{TrustedProxies, client_ip},
    metrics::{
        HTTP_OVERLOAD_REJECTIONS_TOTAL, HTTP_REQUEST_DURATION_SECONDS, HTTP_REQUESTS_IN_FLIGHT,
        HTTP_REQUESTS_TOTAL,
    },
    problem::{InternalError, Problem, ProblemJson, RequestScope},
    readiness::{AdminRequest, Readiness},
    telemetry::{RequestTrace, TraceIds},
};
use trellis_openapi::RouteIndex;

use crate::{
    errors::{BodyTooLarge, RequestTimedOut, Unmatched, problem_response},
    listener::ConnectionOverCapacity,
};

/// The request id header.
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// The response header naming the request's trace (with `tracing.enabled`).
pub static X_TRACE_ID: HeaderName = HeaderName::from_static("x-trace-id");

const UNMATCHED: &str = "unmatched";

/// Where the modules' operations live: answers under it carry tokens or personal data.
const API_PREFIX: &str = "/api/";

static NOSNIFF: HeaderValue = HeaderValue::from_static("nosniff");
static NO_STORE: HeaderValue = HeaderValue::from_static("no-store");
static ORIGIN: HeaderValue = HeaderValue::from_static("Origin");

/// Steps 1 to 7 around `inner`.
pub struct Stack<E> {
    pub(crate) inner: E,
    pub(crate) routes: Arc<RouteIndex>,
    pub(crate) bus: Bus,
    pub(crate) access_log: bool,
    pub(crate) body_limit: usize,
    /// `server.body_linger_ms`.
    pub(crate) linger: Duration,
    pub(crate) timeout: Duration,
    pub(crate) admission: Admission,
    pub(crate) metrics: RequestMetrics,
    /// CORS is on: every answer depends on the `Origin` header.
    pub(crate) vary_origin: bool,
    /// `server.trusted_proxies`, when there are any.
    pub(crate) proxies: Option<TrustedProxies>,
    /// Tells whether the server drains.
    pub(crate) readiness: Readiness,
}

/// The request's span, and its trace id when tracing is on. A sampled request's span is
/// the OpenTelemetry server span, with the HTTP semantic conventions' attributes (its
/// name and route are recorded once the router has matched), continuing the caller's
/// trace when `traceparent` says so; an unsampled one only carries its ids.
fn request_span(req: &Request, id: &str) -> RequestSpan {
    let method = req.method().as_str();
    let path = req.uri().path();
    let parent = match trellis_core::telemetry::decide_trace(req.headers()) {
        RequestTrace::Off => {
            let span = tracing::info_span!("request", request_id = id, method, path);
            return RequestSpan::untraced(span, None);
        }
        RequestTrace::Unsampled(ids) => {
            let (trace_id, span_id) = ids.as_strs();
            let span =
                tracing::info_span!("request", request_id = id, method, path, trace_id, span_id);
            return RequestSpan::untraced(span, Some(ids));
        }
        RequestTrace::Sampled(parent) => parent,
    };
    let span = tracing::info_span!(
        "request",
        request_id = id,
        method,
        path,
        trace_id = tracing::field::Empty,
        span_id = tracing::field::Empty,
        otel.name = method,
        otel.kind = "server",
        otel.status_code = tracing::field::Empty,
        http.request.method = method,
        http.route = tracing::field::Empty,
        http.response.status_code = tracing::field::Empty,
    );
    parent.adopt(&span);
    let ids = trellis_core::telemetry::trace_ids(&span);
    if let Some((trace_id, span_id)) = ids.as_ref().map(TraceIds::as_strs) {
        span.record("trace_id", trace_id);
        span.record("span_id", span_id);
    }
    RequestSpan {
        span,
        ids,
        traced: true,
    }
}

/// A request's span, as [`request_span`] made it.
struct RequestSpan {
    span: tracing::Span,
    ids: Option<TraceIds>,
    /// Whether the trace layer records it (a sampled request).
    traced: bool,
}

impl RequestSpan {
    fn untraced(span: tracing::Span, ids: Option<TraceIds>) -> Self {
        Self {
            span,
            ids,
            traced: false,
        }
    }
}

/// An incoming id is reused when it is 1 to 128 visible ASCII characters from a safe set,
/// so it can go into logs and headers unescaped.
fn sane_request_id(value: &HeaderValue) -> Option<&str> {
    let bytes = value.as_bytes();
    let ok = (1..=128).contains(&bytes.len())
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:/+=@".contains(b));
    if ok { value.to_str().ok() } else { None }
}

impl<E: Endpoint> Endpoint for Stack<E> {
    type Output = Response;

    /// Steps 0 and 1: the bus, the request id and the request scope.
    async fn call(&self, mut req: Request) -> poem::Result<Response> {
        req.set_data(self.bus.clone());
        if let Some(proxies) = &self.proxies
            && let Some(peer) = req.remote_addr().as_socket_addr()
            && let Some(client) = proxies.resolve(peer.ip(), req.headers())
        {
            req.extensions_mut().insert(client);
        }
        let id: Arc<str> = match req.headers().get(&X_REQUEST_ID).and_then(sane_request_id) {
            Some(id) => Arc::from(id),
            None => Arc::from(uuid::Uuid::new_v4().simple().to_string()),
        };
        let header = HeaderValue::from_str(&id).ok();
        let api = req.uri().path().starts_with(API_PREFIX);
        let mut request = request_span(&req, &id);
        let mut scope = RequestScope::new(id.clone(), req.uri().clone());
        let mut trace_header = None;
        if let Some(ids) = request.ids.take() {
            trace_header = HeaderValue::from_bytes(ids.trace_id_bytes()).ok();
            scope = scope.with_trace(ids);
        }
        let mut resp = scope.run(self.observe(req, request)).await;
        let headers = resp.headers_mut();
        if let Some(header) = header {
            headers.insert(X_REQUEST_ID.clone(), header);
        }
        if let Some(header) = trace_header {
            headers.insert(X_TRACE_ID.clone(), header);
        }
        harden(headers, api, self.vary_origin);
        if self.readiness.is_draining() {
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        Ok(resp)
    }
}

impl<E: Endpoint> Stack<E> {
    /// Steps 2 and 3: the access-log line in `span` and the request metrics.
    async fn observe(&self, req: Request, request: RequestSpan) -> Response {
        let span = request.span;
        let started = Instant::now();
        let method = req.method().clone();
        let client = client_ip(&req);
        let in_flight = self.metrics.in_flight();
        let resp = self.guard(req).instrument(span.clone()).await;
        drop(in_flight);
        let elapsed = started.elapsed();
        let status = resp.status();
        let route = RequestScope::current_route().filter(|_| resp.data::<Unmatched>().is_none());
        self.metrics.record(&method, route.clone(), status, elapsed);
        if request.traced {
            let template = route.as_deref().unwrap_or(UNMATCHED);
            trellis_core::telemetry::rename_span(&span, format!("{} {template}", method.as_str()));
            span.record("http.route", template);
            span.record("http.response.status_code", status.as_u16());
            if status.is_server_error() {
                span.record("otel.status_code", "ERROR");
            }
        }

        let _entered = span.enter();
        if let Some(InternalError(cause)) = resp.data::<InternalError>() {
            tracing::error!(status = status.as_u16(), cause = %cause, "request failed");
        }
        if self.access_log {
            tracing::info!(
                target: "trellis::access",
                route = route.as_deref().unwrap_or(UNMATCHED),
                status = status.as_u16(),
                latency_us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX),
                client = client.as_ref().map(IpText::new).as_ref().map(IpText::as_str),
                "request"
            );
        }
        resp
    }

    /// Steps 4 to 7 and the conversion of any error into problem+json.
    async fn guard(&self, mut req: Request) -> Response {
        let _admitted = match self.admission.admit(&req) {
            Ok(admitted) => admitted,
            Err(limit) => return over_capacity(&limit),
        };
        let deadline = tokio::time::Instant::now() + self.timeout;
        let call = async {
            match self.limit_body(&mut req, deadline).await? {
                Ok(()) => {}
                Err(Refused::TooLarge(rest)) => return Ok(Ok(self.refuse_body(rest).await)),
                Err(Refused::Unreadable(error)) => return Ok(Err(error)),
            }
            tokio::time::timeout_at(deadline, self.inner.call(req))
                .await
                .map(|called| called.map(IntoResponse::into_response))
        };
        match AssertUnwindSafe(call).catch_unwind().await {
            Ok(Ok(Ok(output))) => output,
            Ok(Ok(Err(error))) => problem_response(error, &self.routes),
            Ok(Err(_elapsed)) => {
                let timeout_ms = u64::try_from(self.timeout.as_millis()).unwrap_or(u64::MAX);
                ProblemJson::from_error(&RequestTimedOut { timeout_ms })
                    .with_header(header::RETRY_AFTER, HeaderValue::from_static("1"))
                    .into_response()
            }
            Err(panic) => panic_response(panic),
        }
    }

    /// Step 6: a `Content-Length` over the limit is refused before reading; a body without
    /// one (chunked) is read up to the limit, by `deadline`, and refused beyond it. A
    /// refused body is handed back with what is left of it to read, unless the client
    /// waits for `100 Continue` before sending it.
    async fn limit_body(
        &self,
        req: &mut Request,
        deadline: tokio::time::Instant,
    ) -> Result<Result<(), Refused>, tokio::time::error::Elapsed> {
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        match declared {
            Some(length) if length > self.body_limit as u64 => {
                let waits_to_send = req
                    .headers()
                    .get(header::EXPECT)
                    .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
                Ok(Err(Refused::TooLarge(
                    (!waits_to_send).then(|| req.take_body()),
                )))
            }
            Some(_) => Ok(Ok(())),
            None if req.method() == Method::GET || req.method() == Method::HEAD => Ok(Ok(())),
            None => tokio::time::timeout_at(deadline, self.buffer_body(req)).await,
        }
    }

    /// Reads a body of unknown length into memory, up to the limit.
    async fn buffer_body(&self, req: &mut Request) -> Result<(), Refused> {
        let mut stream = req.take_body().into_bytes_stream();
        let mut buffered = Vec::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| {
                Refused::Unreadable(poem::Error::from(poem::error::ReadBodyError::Io(e)))
            })?;
            if buffered.len() + chunk.len() > self.body_limit {
                return Err(Refused::TooLarge(Some(Body::from_bytes_stream(stream))));
            }
            buffered.extend_from_slice(&chunk);
        }
        req.set_body(Body::from_vec(buffered));
        Ok(())
    }

    /// The 413, after reading and dropping the `rest` of the body for at most
    /// `server.body_linger_ms`; a body not read to its end closes the connection.
    async fn refuse_body(&self, rest: Option<Body>) -> Response {
        let mut read_to_end = false;
        if let Some(rest) = rest {
            let mut stream = rest.into_bytes_stream();
            let drain = async { while let Some(Ok(_)) = stream.next().await {} };
            read_to_end = tokio::time::timeout(self.linger, drain).await.is_ok();
        }
        let mut resp = ProblemJson::from_error(&BodyTooLarge {
            limit: self.body_limit,
        })
        .into_response();
        if !read_to_end {
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        resp
    }
}

/// Why step 6 refused a body.
enum Refused {
    /// Over the limit; what is left of it to read, if the client is sending it.
    TooLarge(Option<Body>),
    /// The client broke off or broke the framing.
    Unreadable(poem::Error),
}

/// Step 4: the caps on connections and on requests in flight.
pub struct Admission {
    max_in_flight: usize,
    in_flight: AtomicUsize,
    refused: Counter,
}

impl Admission {
    /// `server.max_in_flight` requests at most.
    pub fn new(max_in_flight: usize) -> Self {
        Self {
            max_in_flight,
            in_flight: AtomicUsize::new(0),
            refused: counter!(HTTP_OVERLOAD_REJECTIONS_TOTAL, "limit" => "in_flight"),
        }
    }

    /// Admits `req`, or answers 503. Probes and scrapes are always admitted: an instance
    /// at its limit is busy, not dead, and its metrics are what tells so.
    /// The limit reached is named in the error.
    fn admit(&self, req: &Request) -> Result<Option<Admitted<'_>>, String> {
        if let Some(over) = req.extensions().get::<ConnectionOverCapacity>() {
            return Err(format!("{} open connections", over.limit));
        }
        if matches!(req.uri().path(), "/healthz" | "/readyz" | "/metrics") {
            return Ok(None);
        }
        if self.in_flight.fetch_add(1, Ordering::Relaxed) >= self.max_in_flight {
            self.in_flight.fetch_sub(1, Ordering::Relaxed);
            self.refused.increment(1);
            return Err(format!("{} requests in flight", self.max_in_flight));
        }
        Ok(Some(Admitted(&self.in_flight)))
    }
}

/// One admitted request, until dropped.
struct Admitted<'a>(&'a AtomicUsize);

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// 503 `over-capacity`, to be retried in a second.
fn over_capacity(limit: &str) -> Response {
    let problem = Problem::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "over-capacity",
        "Over capacity",
    )
    .with_detail(format!(
        "the server is at its limit of {limit}; retry in a moment"
    ));
    ProblemJson::new(problem)
        .with_header(header::RETRY_AFTER, HeaderValue::from_static("1"))
        .into_response()
}

/// An address as text for the access line, without the formatting machinery: IPv4 digit
/// by digit (one per request; `Display` through the log writer cost about 1,600
/// instructions a request under callgrind), IPv6 through `Display`.
struct IpText {
    buf: [u8; 45],
    len: usize,
}

impl IpText {
    fn new(ip: &std::net::IpAddr) -> Self {
        let mut text = Self {
            buf: [0; 45],
            len: 0,
        };
        match ip {
            std::net::IpAddr::V4(v4) => {
                for (i, octet) in v4.octets().into_iter().enumerate() {
                    if i > 0 {
                        text.push(b'.');
                    }
                    if octet >= 100 {
                        text.push(b'0' + octet / 100);
                    }
                    if octet >= 10 {
                        text.push(b'0' + octet / 10 % 10);
                    }
                    text.push(b'0' + octet % 10);
                }
            }
            std::net::IpAddr::V6(v6) => {
                use std::io::Write as _;
                let mut cursor = std::io::Cursor::new(&mut text.buf[..]);
                if write!(cursor, "{v6}").is_ok() {
                    text.len = usize::try_from(cursor.position()).unwrap_or_default();
                }
            }
        }
        text
    }

    fn push(&mut self, byte: u8) {
        self.buf[self.len] = byte;
        self.len += 1;
    }

    fn as_str(&self) -> &str {
        std::str::from_utf8(&self.buf[..self.len]).unwrap_or_default()
    }
}

/// Step 10: headers that keep browsers and caches from misusing an answer; static values,
/// so this costs a few map inserts per response.
///
/// - `nosniff` everywhere: no response (a problem, a metrics page, a JSON document) may be
///   sniffed into HTML or script.
/// - `no-store` on every answer under `/api/`, errors included: tokens (`/auth/*`) and
///   personal data (`/users*`) must not be kept by shared or browser caches (OWASP REST
///   Security cheat sheet). Listing which operations are safe to cache would have to be
///   kept right by every module as it grows, so the rule is the whole API; an operation
///   that is public and non-personal opts out by setting its own `Cache-Control`, which
///   is kept. None does today.
/// - `Vary: Origin` while CORS is on: the answer then depends on `Origin` (allowed or
///   refused, the origin echoed or not) for every request, with or without the header, so
///   a cache must not hand one origin's answer to another. poem's `Cors` adds it only for
///   some of them.
fn harden(headers: &mut HeaderMap, api: bool, vary_origin: bool) {
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, NOSNIFF.clone());
    if api && !headers.contains_key(header::CACHE_CONTROL) {
        headers.insert(header::CACHE_CONTROL, NO_STORE.clone());
    }
    if vary_origin && !varies_by_origin(headers) {
        headers.append(header::VARY, ORIGIN.clone());
    }
}

fn varies_by_origin(headers: &HeaderMap) -> bool {
    headers.get_all(header::VARY).iter().any(|value| {
        value.to_str().is_ok_and(|v| {
            v.split(',')
                .any(|name| name.trim().eq_ignore_ascii_case("origin") || name.trim() == "*")
        })
    })
}

static STATUS_LABELS: LazyLock<Vec<SharedString>> = LazyLock::new(|| {
    (0u16..1000)
        .map(|code| SharedString::from_owned(code.to_string()))
        .collect()
});

fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::TRACE => "TRACE",
        Method::CONNECT => "CONNECT",
        // Arbitrary methods would let clients create unbounded label values.
        _ => "OTHER",
    }
}

type MetricKey = (&'static str, Option<Arc<str>>, u16);

/// Step 3's metric handles. Looking a labelled metric up in the recorder allocates its
/// key and hashes every label; here each (method, route, status) is looked up there once,
/// and its handles are kept. Routes are templates and methods a fixed set, so the map
/// stays small.
pub struct RequestMetrics {
    in_flight: Gauge,
    handles: RwLock<HashMap<MetricKey, (Counter, Histogram), foldhash::fast::RandomState>>,
}

impl RequestMetrics {
    /// Handles from the installed recorder (no-ops when metrics are off).
    pub fn new() -> Self {
        Self {
            in_flight: gauge!(HTTP_REQUESTS_IN_FLIGHT),
            handles: RwLock::default(),
        }
    }

    fn in_flight(&self) -> InFlight<'_> {
        self.in_flight.increment(1.0);
        InFlight(&self.in_flight)
    }

    fn record(&self, method: &Method, route: Option<Arc<str>>, status: StatusCode, took: Duration) {
        let key = (method_label(method), route, status.as_u16());
        let cached = self
            .handles
            .read()
            .ok()
            .and_then(|handles| handles.get(&key).cloned());
        let (requests, duration) = match cached {
            Some(handles) => handles,
            None => {
                let handles = Self::register(&key);
                if let Ok(mut map) = self.handles.write() {
                    map.insert(key, handles.clone());
                }
                handles
            }
        };
        requests.increment(1);
        duration.record(took.as_secs_f64());
    }

    fn register((method, route, status): &MetricKey) -> (Counter, Histogram) {
        let route = match route {
            Some(template) => SharedString::from(template.clone()),
            None => SharedString::const_str(UNMATCHED),
        };
        let status = STATUS_LABELS
            .get(usize::from(*status))
            .cloned()
            .unwrap_or_else(|| SharedString::const_str("other"));
        let labels = [
            ("method", SharedString::const_str(method)),
            ("route", route),
            ("status", status),
        ]
        .map(|(k, v)| metrics::Label::new(k, v));
        (
            counter!(HTTP_REQUESTS_TOTAL, labels.iter()),
            histogram!(HTTP_REQUEST_DURATION_SECONDS, labels.iter()),
        )
    }
}

/// One request in flight, until dropped.
struct InFlight<'a>(&'a Gauge);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

/// Step 5's answer: a panic becomes an opaque 500 problem; the panic message is logged.
pub fn panic_response(panic: Box<dyn std::any::Any + Send + 'static>) -> Response {
    let message = panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| String::from("(non-string panic payload)"));
    ProblemJson::internal(&format!("handler panicked: {message}")).into_response()
}

/// The server's own paths (`/openapi.json`, `/openapi.yaml`, `/docs`, `/metrics`) beside
/// the modules' API, told apart by path before any router runs. A `Route` nesting the API
/// at `/` rewrote every request's URI and boxed its future once more.
pub struct Front {
    pub(crate) own: poem::endpoint::BoxEndpoint<'static, Response>,
    pub(crate) api: Arc<poem::endpoint::BoxEndpoint<'static, Response>>,
}

fn is_own_path(path: &str) -> bool {
    matches!(
        path,
        "/openapi.json" | "/openapi.yaml" | "/metrics" | "/docs"
    ) || path.starts_with("/docs/")
}

impl Endpoint for Front {
    type Output = Response;

    async fn call(&self, req: Request) -> poem::Result<Response> {
        if is_own_path(req.uri().path()) {
            self.own.call(req).await
        } else {
            self.api.call(req).await
        }
    }
}

/// The admin listener's endpoint (`[server.admin]`): `/metrics`, and the operators'
/// operations of the modules' API ([`ADMIN_API_PATHS`]) marked [`AdminRequest`], so that
/// they answer in full. Anything else is 404 there: the admin port serves no account,
/// token or document.
pub struct Admin {
    pub(crate) metrics: Option<poem::endpoint::BoxEndpoint<'static, Response>>,
    pub(crate) api: Arc<poem::endpoint::BoxEndpoint<'static, Response>>,
}

/// Detailed readiness and the build facts; a module compiled out leaves its path 404.
const ADMIN_API_PATHS: [&str; 2] = ["/readyz", "/api/v1/info"];

impl Endpoint for Admin {
    type Output = Response;

    async fn call(&self, mut req: Request) -> poem::Result<Response> {
        let path = req.uri().path();
        match &self.metrics {
            Some(metrics) if path == "/metrics" => return metrics.call(req).await,
            _ => {}
        }
        if ADMIN_API_PATHS.contains(&path) {
            req.set_data(AdminRequest);
            return self.api.call(req).await;
        }
        Err(poem::error::NotFoundError.into())
    }
}

/// Step 9: router errors as problem+json, with `Allow` on 405.
pub struct Problems<E> {
    pub(crate) inner: E,
    pub(crate) routes: Arc<RouteIndex>,
}

impl<E: Endpoint> Endpoint for Problems<E> {
    type Output = Response;

    async fn call(&self, req: Request) -> poem::Result<Response> {
        Ok(match self.inner.call(req).await {
            Ok(output) => output.into_response(),
            Err(error) => problem_response(error, &self.routes),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_reused_only_when_sane() {
        let ok = HeaderValue::from_static("abc-123_DEF.4:5");
        assert_eq!(sane_request_id(&ok), Some("abc-123_DEF.4:5"));
        for bad in ["", "has space", "semi;colon", "quote\"", &"x".repeat(129)] {
            let value = HeaderValue::from_str(bad).expect("header value");
            assert_eq!(sane_request_id(&value), None, "{bad:?} should be replaced");
        }
    }

    #[test]
    fn the_servers_own_paths_are_told_apart_from_the_api() {
        for own in [
            "/openapi.json",
            "/openapi.yaml",
            "/metrics",
            "/docs",
            "/docs/index.css",
        ] {
            assert!(is_own_path(own), "{own}");
        }
        for api in ["/healthz", "/docsx", "/metrics/x", "/api/v1/users/me", "/"] {
            assert!(!is_own_path(api), "{api}");
        }
    }

    #[test]
    fn origin_is_added_to_vary_once() {
        let mut headers = HeaderMap::new();
        headers.insert(header::VARY, HeaderValue::from_static("Accept-Encoding"));
        harden(&mut headers, false, true);
        harden(&mut headers, false, true);
        let vary: Vec<_> = headers.get_all(header::VARY).iter().collect();
        assert_eq!(vary, ["Accept-Encoding", "Origin"]);
        assert!(!headers.contains_key(header::CACHE_CONTROL));
    }

    #[test]
    fn an_operations_own_cache_control_is_kept() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CACHE_CONTROL,
            HeaderValue::from_static("max-age=60"),
        );
        harden(&mut headers, true, false);
        assert_eq!(headers[header::CACHE_CONTROL], "max-age=60");
        assert_eq!(headers[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
        assert!(!headers.contains_key(header::VARY));
    }

    #[test]
    fn addresses_are_written_as_display_writes_them() {
        for ip in [
            "0.0.0.0",
            "9.10.99.100",
            "255.255.255.255",
            "127.0.0.1",
            "2001:db8::7",
            "ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255",
            "::ffff:192.0.2.1",
        ] {
            let ip: std::net::IpAddr = ip.parse().expect("address");
            assert_eq!(IpText::new(&ip).as_str(), ip.to_string());
        }
    }

    #[test]
    fn unknown_methods_share_one_label() {
        let custom = Method::from_bytes(b"PURGE").expect("method");
        assert_eq!(method_label(&custom), "OTHER");
        assert_eq!(method_label(&Method::GET), "GET");
    }
}
