//! OpenTelemetry traces, read back by an OTLP/HTTP receiver running in the test.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use opentelemetry_proto::tonic::{
    collector::trace::v1::ExportTraceServiceRequest,
    common::v1::any_value::Value as AnyValue,
    trace::v1::{Span, span::SpanKind},
};
use poem::{EndpointExt as _, Route, handler, listener::TcpListener, post, web::Data};
use prost::Message as _;

use crate::{
    helpers::TestStorage,
    process::{free_port, lines, server, terminate, wait_exit, wait_healthy},
};

/// Spans the receiver was sent, with the `service.name` of each export.
#[derive(Clone, Default)]
pub(crate) struct Received(Arc<Mutex<Vec<(String, Span)>>>);

impl Received {
    fn spans(&self) -> Vec<(String, Span)> {
        self.0.lock().expect("spans").clone()
    }

    /// Waits until a span of `trace_id` (hex) arrives; all of that trace's spans.
    async fn trace(&self, trace_id: &str) -> Vec<Span> {
        self.trace_with(trace_id, &[]).await
    }

    /// Waits (10 s at most) until spans of `trace_id` named by each of `names` have
    /// arrived (or any span, for no names); all of that trace's spans.
    pub(crate) async fn trace_with(&self, trace_id: &str, names: &[&str]) -> Vec<Span> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let found: Vec<Span> = self
                .spans()
                .into_iter()
                .map(|(_, span)| span)
                .filter(|span| hex(&span.trace_id) == trace_id)
                .collect();
            let complete = match names {
                [] => !found.is_empty(),
                _ => names
                    .iter()
                    .all(|name| found.iter().any(|s| s.name == *name)),
            };
            if complete || Instant::now() > deadline {
                return found;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The span of `spans` named `name`.
pub(crate) fn named<'a>(spans: &'a [Span], name: &str) -> &'a Span {
    spans.iter().find(|s| s.name == name).unwrap_or_else(|| {
        let names: Vec<&str> = spans.iter().map(|s| s.name.as_str()).collect();
        panic!("no span `{name}` among {names:?}")
    })
}

/// Whether `span` runs inside `ancestor` (its child, or a child's child…) in `spans`.
pub(crate) fn inside(span: &Span, ancestor: &Span, spans: &[Span]) -> bool {
    let mut at = span;
    while let Some(parent) = spans
        .iter()
        .find(|s| s.span_id == at.parent_span_id && s.trace_id == at.trace_id)
    {
        if parent.span_id == ancestor.span_id {
            return true;
        }
        at = parent;
    }
    false
}

/// The trace as an indented list of names, for failure messages.
pub(crate) fn tree(spans: &[Span]) -> String {
    fn walk(spans: &[Span], parent: &[u8], depth: usize, out: &mut String) {
        for span in spans.iter().filter(|s| s.parent_span_id == parent) {
            out.push_str(&format!("\n{}{}", "  ".repeat(depth), span.name));
            walk(spans, &span.span_id, depth + 1, out);
        }
    }
    let mut out = String::new();
    let roots = spans
        .iter()
        .filter(|s| !spans.iter().any(|p| p.span_id == s.parent_span_id));
    for root in roots {
        out.push_str(&format!("\n{}", root.name));
        walk(spans, &root.span_id, 1, &mut out);
    }
    out
}

#[handler]
async fn export(body: Vec<u8>, Data(received): Data<&Received>) -> Vec<u8> {
    let request = ExportTraceServiceRequest::decode(body.as_slice()).expect("an OTLP request");
    let mut spans = received.0.lock().expect("spans");
    for resource in request.resource_spans {
        let service = resource
            .resource
            .iter()
            .flat_map(|r| &r.attributes)
            .find(|a| a.key == "service.name")
            .and_then(|a| match a.value.as_ref()?.value.as_ref()? {
                AnyValue::StringValue(name) => Some(name.clone()),
                _ => None,
            })
            .unwrap_or_default();
        for scope in resource.scope_spans {
            spans.extend(scope.spans.into_iter().map(|s| (service.clone(), s)));
        }
    }
    // An empty ExportTraceServiceResponse.
    Vec::new()
}

/// A receiver on a free port: its traces endpoint and what it received.
pub(crate) async fn receiver() -> (String, Received) {
    let port = free_port();
    let received = Received::default();
    let app = Route::new()
        .at("/v1/traces", post(export))
        .data(received.clone());
    tokio::spawn(poem::Server::new(TcpListener::bind(format!("127.0.0.1:{port}"))).run(app));
    (format!("http://127.0.0.1:{port}/v1/traces"), received)
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn attribute(span: &Span, key: &str) -> Option<String> {
    let value = span
        .attributes
        .iter()
        .find(|a| a.key == key)?
        .value
        .as_ref()?;
    match value.value.as_ref()? {
        AnyValue::StringValue(text) => Some(text.clone()),
        AnyValue::IntValue(number) => Some(number.to_string()),
        other => Some(format!("{other:?}")),
    }
}

/// A server on `port` exporting its spans to `endpoint` every 50 ms.
fn traced_server(port: u16, storage: &TestStorage, endpoint: &str) -> std::process::Command {
    let mut command = server(port, storage);
    export_to(&mut command, endpoint);
    command
}

/// Makes the server `command` starts export its spans to `endpoint` every 50 ms.
pub(crate) fn export_to(command: &mut std::process::Command, endpoint: &str) {
    command
        .env("TRELLIS_TRACING__ENABLED", "true")
        .env("TRELLIS_TRACING__ENDPOINT", endpoint)
        .env("TRELLIS_TRACING__SCHEDULED_DELAY_MS", "50");
}

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT: &str = "00f067aa0ba902b7";

#[tokio::test]
async fn a_callers_traceparent_is_continued_by_a_server_span_named_by_its_route() {
    let (endpoint, received) = receiver().await;
    let port = free_port();
    let storage = TestStorage::new().await;
    let mut child = traced_server(port, &storage, &endpoint)
        .env("TRELLIS_TRACING__SERVICE_NAME", "trellis-under-test")
        .env("TRELLIS_TELEMETRY__LEVEL", "info")
        .spawn()
        .expect("server starts");
    let logs = lines(&mut child);
    wait_healthy(port).await;
    let client = reqwest::Client::new();
    let url = format!(
        "http://127.0.0.1:{port}/api/v1/users/0192f1a0-0000-7000-8000-000000000001?secret=x"
    );

    let response = client
        .get(&url)
        .header("traceparent", format!("00-{TRACE}-{PARENT}-01"))
        .header("x-request-id", "traced-request")
        .send()
        .await
        .expect("answers");
    assert_eq!(response.status(), 401);
    assert_eq!(
        response.headers()["x-trace-id"].to_str().expect("text"),
        TRACE
    );
    let problem: serde_json::Value = response.json().await.expect("problem+json");
    assert_eq!(problem["trace_id"], TRACE, "{problem}");

    let spans = received.trace(TRACE).await;
    let server_span = spans
        .iter()
        .find(|s| s.kind == SpanKind::Server as i32)
        .unwrap_or_else(|| panic!("a server span in {spans:?}"));
    assert_eq!(server_span.name, "GET /api/v1/users/{id}");
    assert_eq!(hex(&server_span.parent_span_id), PARENT);
    assert_eq!(
        attribute(server_span, "http.route").as_deref(),
        Some("/api/v1/users/{id}")
    );
    assert_eq!(
        attribute(server_span, "http.response.status_code").as_deref(),
        Some("401")
    );
    assert!(
        server_span
            .attributes
            .iter()
            .all(|a| !format!("{:?}", a.value).contains("secret=x")),
        "no query string in any attribute: {server_span:?}"
    );
    assert!(
        received
            .spans()
            .iter()
            .all(|(service, _)| service == "trellis-under-test")
    );

    // The access line inside the request carries the ids.
    let span_id = hex(&server_span.span_id);
    let deadline = Instant::now() + Duration::from_secs(5);
    let access = loop {
        let line = logs
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("the access line");
        if line.contains("trellis::access") && line.contains("request_id=traced-request") {
            break line;
        }
    };
    assert!(access.contains(&format!("trace_id={TRACE}")), "{access}");
    assert!(access.contains(&format!("span_id={span_id}")), "{access}");

    // Garbage starts a new trace instead of failing the request.
    let response = client
        .get(format!("http://127.0.0.1:{port}/healthz"))
        .header("traceparent", "00-not-a-trace-at-all-01")
        .send()
        .await
        .expect("answers");
    assert_eq!(response.status(), 200);
    let new_trace = response.headers()["x-trace-id"]
        .to_str()
        .expect("text")
        .to_owned();
    assert_eq!(new_trace.len(), 32);
    assert_ne!(new_trace, TRACE);
    assert!(!received.trace(&new_trace).await.is_empty());

    terminate(&child);
    assert_eq!(
        wait_exit(&mut child, Duration::from_secs(10)).code(),
        Some(0)
    );
}

#[tokio::test]
async fn sampler_never_and_ratio_zero_export_no_span() {
    for (sampler, ratio) in [("never", "1.0"), ("ratio", "0.0")] {
        let (endpoint, received) = receiver().await;
        let port = free_port();
        let storage = TestStorage::new().await;
        let mut child = traced_server(port, &storage, &endpoint)
            .env("TRELLIS_TRACING__SAMPLER", sampler)
            .env("TRELLIS_TRACING__RATIO", ratio)
            .spawn()
            .expect("server starts");
        wait_healthy(port).await;
        let response = reqwest::get(format!("http://127.0.0.1:{port}/api/v1/modules"))
            .await
            .expect("answers");
        assert_eq!(response.status(), 200);
        assert!(response.headers().contains_key("x-trace-id"));
        // Shutdown flushes whatever waits for export.
        terminate(&child);
        assert_eq!(
            wait_exit(&mut child, Duration::from_secs(10)).code(),
            Some(0)
        );
        assert!(
            received.spans().is_empty(),
            "{sampler} {ratio}: {:?}",
            received.spans()
        );
    }
}

/// A W3C `traceparent` continuing `trace` from the caller's span [`PARENT`].
fn traceparent(trace: &str) -> String {
    format!("00-{trace}-{PARENT}-01")
}

/// POSTs `body` to `url` as part of the caller's span [`PARENT`] in `trace`, sampled.
async fn post_traced(url: &str, trace: &str, body: serde_json::Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(url)
        .header("traceparent", traceparent(trace))
        .json(&body)
        .send()
        .await
        .expect("answers")
}

/// A traced server, healthy, whose file backend writes to a folder of its own.
struct Recording {
    port: u16,
    child: std::process::Child,
    /// The file backend's folder.
    events: tempfile::TempDir,
    _storage: TestStorage,
}

async fn recording(endpoint: &str) -> Recording {
    let port = free_port();
    let storage = TestStorage::new().await;
    let events = tempfile::tempdir().expect("tempdir");
    let child = traced_server(port, &storage, endpoint)
        .env("TRELLIS_MQ__FILE__DIRECTORY", events.path())
        .spawn()
        .expect("server starts");
    wait_healthy(port).await;
    Recording {
        port,
        child,
        events,
        _storage: storage,
    }
}

/// The records of the file backend in `folder` whose `name` is `name`.
fn records(folder: &std::path::Path, name: &str) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(folder.join("events.ndjson")).unwrap_or_default();
    text.lines()
        .map(|line| serde_json::from_str::<serde_json::Value>(line).expect("one JSON record"))
        .filter(|record| record["name"] == name)
        .collect()
}

#[tokio::test]
async fn a_request_its_bus_request_event_handler_and_queue_send_are_one_trace() {
    const REGISTER: &str = "5a000000000000000000000000000001";
    const LOGIN: &str = "5a000000000000000000000000000002";
    const INGEST: &str = "5a000000000000000000000000000003";
    let (endpoint, received) = receiver().await;
    let Recording {
        port,
        mut child,
        events,
        _storage,
    } = recording(&endpoint).await;
    let url = |path: &str| format!("http://127.0.0.1:{port}{path}");

    // A registration: the request hashes the password and writes the account; the
    // domain event it emits is handled after the commit by the bi module, which hands a
    // BI event to the message queue, which sends it to the file backend.
    let body = serde_json::json!({
        "email": "traced@example.com", "password": "a long enough password",
        "first_name": "Traced", "last_name": "User"
    });
    let response = post_traced(&url("/api/v1/users"), REGISTER, body).await;
    assert_eq!(response.status(), 201);
    let spans = received
        .trace_with(
            REGISTER,
            &[
                "POST /api/v1/users",
                "password hash",
                "db user.insert_user",
                "event user.registered bi",
                "send file",
            ],
        )
        .await;
    let server = named(&spans, "POST /api/v1/users");
    assert_eq!(hex(&server.parent_span_id), PARENT);
    let hash = named(&spans, "password hash");
    assert!(inside(hash, server, &spans), "{}", tree(&spans));
    assert_eq!(
        attribute(hash, "password.algorithm").as_deref(),
        Some("argon2id")
    );
    let insert = named(&spans, "db user.insert_user");
    assert!(inside(insert, server, &spans), "{}", tree(&spans));
    assert_eq!(insert.kind, SpanKind::Client as i32);
    assert_eq!(
        attribute(insert, "db.operation.name").as_deref(),
        Some("insert_user")
    );
    assert!(attribute(insert, "db.system.name").is_some(), "{insert:?}");
    assert!(
        insert
            .attributes
            .iter()
            .all(|a| !format!("{:?}", a.value).contains("traced@example.com")),
        "no statement values in a database span: {insert:?}"
    );
    // Across the asynchronous hop: the handler's span is a child of the request's, the
    // send's a child of the handler's.
    let handler = named(&spans, "event user.registered bi");
    assert!(inside(handler, server, &spans), "{}", tree(&spans));
    assert_eq!(handler.kind, SpanKind::Consumer as i32);
    assert_eq!(attribute(handler, "attempt").as_deref(), Some("1"));
    let send = named(&spans, "send file");
    assert!(inside(send, handler, &spans), "{}", tree(&spans));
    assert_eq!(send.kind, SpanKind::Producer as i32);
    assert_eq!(
        attribute(send, "messaging.batch.message_count").as_deref(),
        Some("1")
    );
    // The record carries the handler span's context.
    let registered = records(events.path(), "user.registered");
    assert_eq!(registered.len(), 1, "{registered:?}");
    assert_eq!(
        registered[0]["traceparent"],
        format!("00-{REGISTER}-{}-01", hex(&handler.span_id))
    );

    // A login asks the user module over the bus to check the password.
    let body = serde_json::json!({
        "email": "traced@example.com", "password": "a long enough password"
    });
    let response = post_traced(&url("/api/v1/auth/login"), LOGIN, body).await;
    assert_eq!(response.status(), 200);
    let spans = received
        .trace_with(
            LOGIN,
            &[
                "POST /api/v1/auth/login",
                "bus request VerifyCredentials",
                "password verify",
            ],
        )
        .await;
    let server = named(&spans, "POST /api/v1/auth/login");
    let bus = named(&spans, "bus request VerifyCredentials");
    assert!(inside(bus, server, &spans), "{}", tree(&spans));
    assert_eq!(attribute(bus, "bus.module").as_deref(), Some("user"));
    let verify = named(&spans, "password verify");
    assert!(inside(verify, bus, &spans), "{}", tree(&spans));

    // A client's BI event: sent in the trace of the request that accepted it, and its
    // record carries that request's context.
    let body = serde_json::json!({"name": "traced.event"});
    let response = post_traced(&url("/api/v1/bi/events"), INGEST, body).await;
    assert_eq!(response.status(), 202);
    let spans = received
        .trace_with(INGEST, &["POST /api/v1/bi/events", "send file"])
        .await;
    let server = named(&spans, "POST /api/v1/bi/events");
    let send = named(&spans, "send file");
    assert!(inside(send, server, &spans), "{}", tree(&spans));
    let ingested = records(events.path(), "traced.event");
    assert_eq!(
        ingested[0]["traceparent"],
        format!("00-{INGEST}-{}-01", hex(&server.span_id))
    );

    terminate(&child);
    assert_eq!(
        wait_exit(&mut child, Duration::from_secs(10)).code(),
        Some(0)
    );
}

/// The sum of the series of `/metrics` on `port` whose name and labels start with
/// `prefix` (0 when there is none).
async fn metric_sum(port: u16, prefix: &str) -> f64 {
    let text = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    text.lines()
        .filter(|line| line.starts_with(prefix))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn an_endpoint_that_never_answers_costs_requests_nothing_and_drops_are_counted() {
    // Connections are accepted by the kernel and never answered.
    let black_hole = std::net::TcpListener::bind("127.0.0.1:0").expect("a port");
    let endpoint = format!(
        "http://{}/v1/traces",
        black_hole.local_addr().expect("address")
    );
    let port = free_port();
    let storage = TestStorage::new().await;
    let mut child = traced_server(port, &storage, &endpoint)
        .env("TRELLIS_TRACING__MAX_QUEUE_SIZE", "32")
        .env("TRELLIS_TRACING__MAX_EXPORT_BATCH_SIZE", "8")
        .env("TRELLIS_TRACING__EXPORT_TIMEOUT_MS", "1000")
        .spawn()
        .expect("server starts");
    wait_healthy(port).await;
    let client = reqwest::Client::new();
    let requests = 600;
    for _ in 0..requests {
        let response = client
            .get(format!("http://127.0.0.1:{port}/api/v1/modules"))
            .send()
            .await
            .expect("answers");
        assert_eq!(response.status(), 200);
    }
    // One server span per request (and the health checks'): every one of them was
    // exported, dropped and counted, or is among the 32 that may wait.
    let dropped = metric_sum(port, "trace_spans_dropped_total{reason=\"queue_full\"}").await;
    let failed = metric_sum(port, "trace_spans_dropped_total{reason=\"export_failed\"}").await;
    let exported = metric_sum(port, "trace_spans_exported_total").await;
    assert_eq!(exported, 0.0);
    assert!(dropped > 0.0, "the queue filled and dropped");
    assert!(
        dropped + failed + 32.0 >= f64::from(requests),
        "{dropped} dropped and {failed} failed of {requests}: more waited than the queue holds"
    );

    // Stopping does not wait on the endpoint beyond the export timeout.
    let stopping = Instant::now();
    terminate(&child);
    assert_eq!(
        wait_exit(&mut child, Duration::from_secs(20)).code(),
        Some(0)
    );
    assert!(stopping.elapsed() < Duration::from_secs(15));
    drop(black_hole);
}

#[tokio::test]
async fn an_unsampled_callers_trace_id_is_answered_and_nothing_of_its_work_is_exported() {
    const UNSAMPLED: &str = "5a000000000000000000000000000004";
    let (endpoint, received) = receiver().await;
    let Recording {
        port,
        mut child,
        events,
        _storage,
    } = recording(&endpoint).await;

    // The caller did not sample its trace: the registration, its event's handler and the
    // send that follows are not recorded, but the answer names the caller's trace.
    let response = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{port}/api/v1/users"))
        .header("traceparent", format!("00-{UNSAMPLED}-{PARENT}-00"))
        .json(&serde_json::json!({
            "email": "unsampled@example.com", "password": "a long enough password",
            "first_name": "Not", "last_name": "Sampled"
        }))
        .send()
        .await
        .expect("answers");
    assert_eq!(response.status(), 201);
    assert_eq!(
        response.headers()["x-trace-id"].to_str().expect("text"),
        UNSAMPLED
    );
    // The event went through (handled, sent, recorded) before the server stops.
    let deadline = Instant::now() + Duration::from_secs(10);
    while records(events.path(), "user.registered").is_empty() {
        assert!(Instant::now() < deadline, "the event is forwarded");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(records(events.path(), "user.registered")[0]["traceparent"].is_null());
    terminate(&child);
    assert_eq!(
        wait_exit(&mut child, Duration::from_secs(10)).code(),
        Some(0)
    );
    let names: Vec<String> = received.spans().into_iter().map(|(_, s)| s.name).collect();
    assert!(
        names.iter().all(|name| name == "GET /healthz"),
        "only the health checks' own traces: {names:?}"
    );
}
