//! The middleware stack: request ids, body limit, timeout, CORS, metrics.

use futures_util::stream;
use serde_json::json;

use crate::helpers::{assert_problem, spawn_app, spawn_app_with};

#[tokio::test]
async fn request_id_is_generated_reused_or_replaced() {
    let app = spawn_app().await;
    let generated = app.get("/healthz").await;
    let id = generated.headers()["x-request-id"]
        .to_str()
        .expect("ascii")
        .to_owned();
    assert!(id.len() >= 16, "generated id {id}");

    let reused = app
        .client
        .get(app.url("/healthz"))
        .header("x-request-id", "client-id-42")
        .send()
        .await
        .expect("request");
    assert_eq!(reused.headers()["x-request-id"], "client-id-42");

    let insane = app
        .client
        .get(app.url("/healthz"))
        .header("x-request-id", "a b;c")
        .send()
        .await
        .expect("request");
    assert_ne!(insane.headers()["x-request-id"], "a b;c");
}

#[tokio::test]
async fn problems_carry_the_reused_request_id() {
    let app = spawn_app().await;
    let response = app
        .client
        .get(app.url("/missing"))
        .header("x-request-id", "trace-me")
        .send()
        .await
        .expect("request");
    let body = assert_problem(response, 404).await;
    assert_eq!(body["request_id"], "trace-me");
}

#[tokio::test]
async fn bodies_over_the_limit_are_413_whether_announced_or_streamed() {
    let app = spawn_app_with(&[("server.body_limit_bytes", json!(1024))]).await;
    let big = vec![b'x'; 4096];

    let announced = app
        .post_raw("/api/v1/probe/echo", "application/json", big.clone())
        .await;
    assert_problem(announced, 413).await;

    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        big.chunks(512).map(|c| Ok(c.to_vec())).collect();
    let streamed = app
        .post_raw(
            "/api/v1/probe/echo",
            "application/json",
            reqwest::Body::wrap_stream(stream::iter(chunks)),
        )
        .await;
    assert_problem(streamed, 413).await;

    let small = app
        .post_json("/api/v1/probe/echo", &json!({"name": "ok", "count": 1}))
        .await;
    assert_eq!(small.status(), 200);
}

#[tokio::test]
async fn default_body_limit_is_one_mebibyte() {
    let app = spawn_app().await;
    let response = app
        .post_raw(
            "/api/v1/probe/echo",
            "application/json",
            vec![b' '; 1024 * 1024 + 1],
        )
        .await;
    assert_problem(response, 413).await;
}

#[tokio::test]
async fn slow_requests_time_out_with_a_503_problem() {
    let app = spawn_app_with(&[("server.request_timeout_ms", json!(100))]).await;
    let response = app.get("/api/v1/probe/slow?ms=2000").await;
    assert!(response.headers().contains_key("retry-after"));
    let body = assert_problem(response, 503).await;
    assert_eq!(body["type"], "urn:trellis:problem:timeout");
    assert_eq!(app.get("/api/v1/probe/slow?ms=1").await.status(), 200);
}

#[tokio::test]
async fn cors_is_off_by_default_and_answers_configured_origins() {
    let app = spawn_app().await;
    let plain = app
        .client
        .get(app.url("/healthz"))
        .header("origin", "https://app.example")
        .send()
        .await
        .expect("request");
    assert!(!plain.headers().contains_key("access-control-allow-origin"));

    let app = spawn_app_with(&[(
        "server.cors.allowed_origins",
        json!(["https://app.example"]),
    )])
    .await;
    let preflight = app
        .client
        .request(reqwest::Method::OPTIONS, app.url("/api/v1/probe/echo"))
        .header("origin", "https://app.example")
        .header("access-control-request-method", "POST")
        .send()
        .await
        .expect("request");
    assert!(preflight.status().is_success(), "{}", preflight.status());
    assert_eq!(
        preflight.headers()["access-control-allow-origin"],
        "https://app.example"
    );
    let response = app
        .client
        .get(app.url("/healthz"))
        .header("origin", "https://app.example")
        .send()
        .await
        .expect("request");
    assert_eq!(
        response.headers()["access-control-allow-origin"],
        "https://app.example"
    );
}

#[tokio::test]
async fn metrics_label_route_templates_not_raw_paths() {
    let app = spawn_app().await;
    for id in [3, 4, 5] {
        assert_eq!(
            app.get(&format!("/api/v1/probe/items/{id}")).await.status(),
            200
        );
    }
    app.get("/definitely/not/here").await;
    let response = app.get("/metrics").await;
    assert_eq!(response.status(), 200);
    let text = response.text().await.expect("text");
    assert!(
        text.contains(
            r#"http_requests_total{method="GET",route="/api/v1/probe/items/{id}",status="200"}"#
        ),
        "{text}"
    );
    assert!(
        !text.contains("/api/v1/probe/items/3"),
        "raw paths must not become labels"
    );
    assert!(
        !text.contains("/definitely/not/here"),
        "unknown paths must not become labels"
    );
    assert!(text.contains(r#"route="unmatched",status="404""#));
    for metric in [
        "# TYPE http_requests_total counter",
        "# TYPE http_request_duration_seconds histogram",
        "# TYPE http_requests_in_flight gauge",
    ] {
        assert!(text.contains(metric), "missing {metric}");
    }
}

/// The value of the first series on `text` whose line starts with `series` (its name and
/// labels).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
}

#[tokio::test]
async fn metrics_show_the_process_runtime_bus_dependencies_and_failed_logins() {
    let app = spawn_app().await;
    let login = json!({"email": "nobody@example.com", "password": "not the password"});
    assert_problem(app.post_json("/api/v1/auth/login", &login).await, 401).await;
    let text = app.get("/metrics").await.text().await.expect("metrics");
    let at_least = |series: &str, floor: f64| {
        let value = sample(&text, series).unwrap_or_else(|| panic!("no {series} in\n{text}"));
        assert!(
            value >= floor,
            "{series} = {value}, expected at least {floor}"
        );
    };
    at_least("process_resident_memory_bytes", 1e6);
    at_least("process_open_fds", 1.0);
    at_least("process_max_fds", 1.0);
    at_least("process_threads", 1.0);
    at_least("process_start_time_seconds", 1.7e9);
    at_least("tokio_workers", 1.0);
    at_least("tokio_alive_tasks", 1.0);
    // The login asked the user module to check the password over the bus.
    at_least(
        r#"bus_requests_total{message="VerifyCredentials",outcome="ok"}"#,
        1.0,
    );
    at_least(
        r#"bus_request_duration_seconds_count{message="VerifyCredentials",module="user"}"#,
        1.0,
    );
    at_least(
        r#"auth_login_failures_total{reason="invalid_credentials"}"#,
        1.0,
    );
    // Present before the first refusal, so that rates over it exist.
    at_least(r#"auth_login_failures_total{reason="rate_limited"}"#, 0.0);
    // So are the failure counters whose labels are known at start-up: an alert on their
    // increase sees the first failure.
    for series in [
        r#"event_publications_failed_total{event="user.registered",module="bi"}"#,
        r#"event_publications_retried_total{event="user.registered",module="bi"}"#,
        r#"mq_send_errors_total{backend="file"}"#,
        r#"mq_messages_failed_total{backend="file"}"#,
        r#"cache_errors_total{operation="get"}"#,
    ] {
        at_least(series, 0.0);
    }
    // Every readiness check, refreshed by the scrape itself.
    for dependency in ["core.database", "core.cache", "core.queue"] {
        let series = format!(r#"dependency_up{{dependency="{dependency}"}}"#);
        assert_eq!(sample(&text, &series), Some(1.0), "{series} in\n{text}");
    }
    at_least("db_pool_max_connections", 1.0);
    at_least("mq_spool_max_bytes", 1.0);
    for help in [
        "# TYPE process_cpu_seconds_total counter",
        "# HELP tokio_global_queue_depth",
        "# TYPE bus_request_duration_seconds histogram",
        "# HELP dependency_up",
    ] {
        assert!(text.contains(help), "missing {help}");
    }
}

#[tokio::test]
async fn graceful_stop_lets_in_flight_requests_finish() {
    let app = spawn_app().await;
    let client = app.client.clone();
    let url = app.url("/api/v1/probe/slow?ms=700");
    let in_flight = tokio::spawn(async move { client.get(url).send().await });
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    app.stop().await.expect("clean stop");
    let response = in_flight
        .await
        .expect("task")
        .expect("the in-flight request completes");
    assert_eq!(response.status(), 200);
}
