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
struct Received(Arc<Mutex<Vec<(String, Span)>>>);

impl Received {
    fn spans(&self) -> Vec<(String, Span)> {
        self.0.lock().expect("spans").clone()
    }

    /// Waits until a span of `trace_id` (hex) arrives; all of that trace's spans.
    async fn trace(&self, trace_id: &str) -> Vec<Span> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let found: Vec<Span> = self
                .spans()
                .into_iter()
                .map(|(_, span)| span)
                .filter(|span| hex(&span.trace_id) == trace_id)
                .collect();
            if !found.is_empty() || Instant::now() > deadline {
                return found;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
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
async fn receiver() -> (String, Received) {
    let port = free_port();
    let received = Received::default();
    let app = Route::new()
        .at("/v1/traces", post(export))
        .data(received.clone());
    tokio::spawn(poem::Server::new(TcpListener::bind(format!("127.0.0.1:{port}"))).run(app));
    (format!("http://127.0.0.1:{port}/v1/traces"), received)
}

fn hex(bytes: &[u8]) -> String {
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
    command
        .env("TRELLIS_TRACING__ENABLED", "true")
        .env("TRELLIS_TRACING__ENDPOINT", endpoint)
        .env("TRELLIS_TRACING__SCHEDULED_DELAY_MS", "50");
    command
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
