//! Hardening at the edge: response headers, CORS start-up checks, the admin listener and
//! BI ingestion limits. Each test is named by the attack it stops.

use base64::Engine as _;
use serde_json::{Value, json};
use sha2::Digest as _;
use trellis_server::Application;

use crate::helpers::Accounts as _;
use crate::helpers::{TestStorage, assert_problem, spawn_app, spawn_app_with, test_config};

/// The value of `name` in `response`, or "" when absent.
fn header(response: &reqwest::Response, name: &str) -> String {
    response
        .headers()
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The error `Application::build` returns for `overrides`, as text.
async fn build_error(overrides: &[(&str, Value)]) -> String {
    let storage = TestStorage::new().await;
    let mut config = test_config();
    for (key, value) in storage.settings.iter() {
        config = config.set(key, value).expect("storage setting applies");
    }
    for (key, value) in overrides {
        config = config.set(key, value).expect("override applies");
    }
    match Application::build(config).await {
        Ok(_) => panic!("the server built with {overrides:?}"),
        Err(error) => format!("{error:#}"),
    }
}

#[tokio::test]
async fn mime_sniffing_is_off_on_every_response() {
    let app = spawn_app().await;
    let cases = [
        ("GET", "/healthz", 200),
        ("GET", "/readyz", 200),
        ("GET", "/metrics", 200),
        ("GET", "/docs", 200),
        ("GET", "/openapi.json", 200),
        ("GET", "/openapi.yaml", 200),
        ("GET", "/api/v1/info", 200),
        ("GET", "/no/such/path", 404),
        ("DELETE", "/healthz", 405),
        ("GET", "/api/v1/users/me", 401),
        ("POST", "/api/v1/bi/events", 400),
    ];
    for (method, path, status) in cases {
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        let response = app
            .client
            .request(method.clone(), app.url(path))
            .header("content-type", "application/json")
            .body("{")
            .send()
            .await
            .expect("request");
        assert_eq!(response.status(), status, "{method} {path}");
        assert_eq!(
            header(&response, "x-content-type-options"),
            "nosniff",
            "{method} {path}"
        );
    }
}

#[tokio::test]
async fn tokens_and_personal_data_are_not_kept_by_shared_caches() {
    let app = spawn_app().await;
    let email = "cache-me@example.com";
    let password = "correct horse battery";
    let registered = app
        .post_json(
            "/api/v1/users",
            &json!({"email": email, "password": password,
                    "first_name": "Ada", "last_name": "Lovelace"}),
        )
        .await;
    assert_eq!(registered.status(), 201);
    assert_eq!(header(&registered, "cache-control"), "no-store", "register");

    let login = app.try_login(email, password).await;
    assert_eq!(login.status(), 200);
    assert_eq!(header(&login, "cache-control"), "no-store", "login");
    let tokens: Value = login.json().await.expect("json");
    let token = tokens["access_token"].as_str().expect("token");

    let refreshed = app
        .post_json(
            "/api/v1/auth/refresh",
            &json!({"refresh_token": tokens["refresh_token"]}),
        )
        .await;
    assert_eq!(refreshed.status(), 200);
    assert_eq!(header(&refreshed, "cache-control"), "no-store", "refresh");

    let me = app
        .authed(reqwest::Method::GET, "/api/v1/users/me", token)
        .send()
        .await
        .expect("request");
    assert_eq!(me.status(), 200);
    assert_eq!(header(&me, "cache-control"), "no-store", "users/me");

    let failed = app.try_login(email, "wrong password here").await;
    assert_eq!(failed.status(), 401);
    assert_eq!(header(&failed, "cache-control"), "no-store", "failed login");

    let sessions = app
        .authed(reqwest::Method::GET, "/api/v1/auth/sessions", token)
        .send()
        .await
        .expect("request");
    assert_eq!(header(&sessions, "cache-control"), "no-store", "sessions");
}

/// The contents of each `<tag ...>...</tag>` in `html`, in order.
fn inline_blocks<'a>(html: &'a str, tag: &str) -> Vec<&'a str> {
    let (open, close) = (format!("<{tag}"), format!("</{tag}>"));
    let mut blocks = Vec::new();
    let mut rest = html;
    while let Some(start) = rest.find(&open) {
        let after = &rest[start..];
        let Some(body_start) = after.find('>') else {
            break;
        };
        let body = &after[body_start + 1..];
        let Some(end) = body.find(&close) else {
            break;
        };
        blocks.push(&body[..end]);
        rest = &body[end + close.len()..];
    }
    blocks
}

fn sha256_source(text: &str) -> String {
    let digest = sha2::Sha256::digest(text.as_bytes());
    format!(
        "'sha256-{}'",
        base64::engine::general_purpose::STANDARD.encode(digest)
    )
}

#[tokio::test]
async fn docs_page_cannot_be_framed_injected_into_or_leak_its_address() {
    let app = spawn_app().await;
    let docs = app.get("/docs").await;
    assert_eq!(docs.status(), 200);
    assert_eq!(header(&docs, "x-frame-options"), "DENY");
    assert_eq!(header(&docs, "referrer-policy"), "no-referrer");
    let csp = header(&docs, "content-security-policy");
    let directive = |name: &str| -> String {
        csp.split(';')
            .map(str::trim)
            .find(|d| d.split_whitespace().next() == Some(name))
            .unwrap_or_default()
            .to_owned()
    };
    assert_eq!(directive("default-src"), "default-src 'none'", "{csp}");
    assert_eq!(
        directive("frame-ancestors"),
        "frame-ancestors 'none'",
        "{csp}"
    );
    assert_eq!(directive("base-uri"), "base-uri 'none'", "{csp}");
    let scripts = directive("script-src");
    assert!(
        !scripts.contains("unsafe"),
        "inline scripts are allowed by hash only: {csp}"
    );
    let html = docs.text().await.expect("html");
    let script_blocks = inline_blocks(&html, "script");
    assert_eq!(
        script_blocks.len(),
        2,
        "Swagger UI's bundle and its start-up"
    );
    for block in script_blocks {
        assert!(
            scripts.contains(&sha256_source(block)),
            "a script of the page is not allowed by {scripts}"
        );
    }
    let styles = directive("style-src");
    for block in inline_blocks(&html, "style") {
        assert!(
            styles.contains(&sha256_source(block)),
            "the page's style sheet is not allowed by {styles}"
        );
    }
    assert!(
        directive("connect-src").contains("'self'"),
        "try it out: {csp}"
    );
}

#[tokio::test]
async fn cross_origin_answers_are_not_cached_for_the_wrong_origin() {
    let allowed = "https://app.example";
    let refused = "https://evil.example";
    for origins in [json!([allowed]), json!(["*"])] {
        let app = spawn_app_with(&[("server.cors.allowed_origins", origins.clone())]).await;
        let mut cases = vec![
            (allowed, reqwest::Method::OPTIONS),
            (allowed, reqwest::Method::GET),
        ];
        if origins != json!(["*"]) {
            cases.push((refused, reqwest::Method::OPTIONS));
            cases.push((refused, reqwest::Method::GET));
        }
        for (origin, method) in cases {
            let response = app
                .client
                .request(method.clone(), app.url("/api/v1/info"))
                .header("origin", origin)
                .header("access-control-request-method", "GET")
                .send()
                .await
                .expect("request");
            let vary = header(&response, "vary").to_ascii_lowercase();
            assert!(
                vary.split(',').any(|v| v.trim() == "origin"),
                "{origins} {method} from {origin}: {} without Vary: Origin ({vary:?})",
                response.status()
            );
        }
        let plain = app.get("/api/v1/info").await;
        let vary = header(&plain, "vary").to_ascii_lowercase();
        assert!(
            vary.contains("origin"),
            "{origins}: same URL without Origin"
        );
    }
}

#[tokio::test]
async fn any_origin_with_credentials_is_refused_at_start_up() {
    let message = build_error(&[
        ("server.cors.allowed_origins", json!(["*"])),
        ("server.cors.allow_credentials", json!(true)),
    ])
    .await;
    assert!(
        message.contains("`server.cors.allowed_origins`")
            && message.contains("`server.cors.allow_credentials`"),
        "{message}"
    );
}

#[tokio::test]
async fn malformed_cors_header_names_stop_start_up_instead_of_panicking() {
    for key in ["allowed_headers", "exposed_headers"] {
        for origins in [json!(["https://app.example"]), json!([])] {
            let overrides = [
                ("server.cors.allowed_origins", origins.clone()),
                (
                    if key == "allowed_headers" {
                        "server.cors.allowed_headers"
                    } else {
                        "server.cors.exposed_headers"
                    },
                    json!(["x-fine", "bad header\n"]),
                ),
            ];
            let build = tokio::spawn(async move { build_error(&overrides).await });
            let message = build.await.expect("building does not panic");
            assert!(
                message.contains(&format!("`server.cors.{key}`")),
                "{key} with origins {origins}: {message}"
            );
        }
    }
}

/// Overrides that turn the admin listener on (on an ephemeral port, the test profile's).
fn admin_on() -> Vec<(&'static str, Value)> {
    vec![("server.admin.enabled", json!(true))]
}

#[tokio::test]
async fn metrics_and_dependency_details_are_not_served_to_the_public() {
    let app = spawn_app_with(&admin_on()).await;
    assert!(app.admin_addr.is_some(), "the admin listener is on");
    assert_ne!(app.admin_addr.map(|a| a.port()), Some(app.addr.port()));

    assert_eq!(app.get("/metrics").await.status(), 404, "public /metrics");
    let public: Value = app.get("/readyz").await.json().await.expect("json");
    assert_eq!(
        public,
        json!({"status": "up"}),
        "the public port gives the status only"
    );
    assert_eq!(
        app.get("/api/v1/info").await.status(),
        200,
        "info stays public"
    );

    let metrics = app.get_admin("/metrics").await;
    assert_eq!(metrics.status(), 200);
    assert_eq!(header(&metrics, "x-content-type-options"), "nosniff");
    let text = metrics.text().await.expect("text");
    assert!(
        text.contains("# TYPE http_requests_total counter"),
        "{text}"
    );
    let ready: Value = app.get_admin("/readyz").await.json().await.expect("json");
    assert_eq!(ready["status"], "up");
    assert!(
        ready["checks"].as_array().is_some_and(|c| c.len() >= 3),
        "{ready}"
    );
    let info = app.get_admin("/api/v1/info").await;
    assert_eq!(info.status(), 200);
    let info: Value = info.json().await.expect("json");
    assert_eq!(info["name"], "trellis");
    for elsewhere in [
        "/api/v1/modules",
        "/api/v1/users/me",
        "/docs",
        "/openapi.json",
    ] {
        let response = app.get_admin(elsewhere).await;
        assert_eq!(response.status(), 404, "admin {elsewhere}");
    }
}

#[tokio::test]
async fn a_failing_dependency_is_not_described_to_the_public() {
    let mut overrides = admin_on();
    overrides.push(("modules.probe.ready", json!(false)));
    let app = spawn_app_with(&overrides).await;

    let public = assert_problem(app.get("/readyz").await, 503).await;
    assert!(public.get("checks").is_none(), "{public}");
    let text = public.to_string();
    assert!(!text.contains("probe"), "{text}");

    let admin = assert_problem(app.get_admin("/readyz").await, 503).await;
    assert!(
        admin["detail"]
            .as_str()
            .is_some_and(|d| d.contains("probe.flag")),
        "{admin}"
    );
    assert!(admin["checks"].as_array().is_some(), "{admin}");
}

#[tokio::test]
async fn the_admin_listener_is_off_by_default_and_stops_with_the_server() {
    let app = spawn_app().await;
    assert_eq!(app.admin_addr, None);
    assert_eq!(app.get("/metrics").await.status(), 200);
    let ready: Value = app.get("/readyz").await.json().await.expect("json");
    assert!(ready["checks"].is_array(), "details stay public: {ready}");
    app.stop().await.expect("clean stop");

    let app = spawn_app_with(&admin_on()).await;
    let admin = app.admin_addr.expect("the admin listener is on");
    assert_eq!(app.get_admin("/readyz").await.status(), 200);
    app.stop().await.expect("clean stop");
    assert!(
        tokio::net::TcpStream::connect(admin).await.is_err(),
        "the admin listener closed with the server"
    );
}

/// A client whose requests come from `address` (any of 127.0.0.0/8 is local).
fn client_from(address: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .local_address(address.parse::<std::net::IpAddr>().expect("address"))
        .build()
        .expect("client")
}

/// Bytes of the files in `directory`, each file once: a listing taken while the live file
/// is renamed at a rotation can name it twice, under its old name and its new one.
fn folder_bytes(directory: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt as _;
    let files: std::collections::HashMap<u64, u64> = std::fs::read_dir(directory)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter_map(|e| e.metadata().ok())
                .map(|m| (m.ino(), m.len()))
                .collect()
        })
        .unwrap_or_default();
    files.values().sum()
}

#[tokio::test]
async fn anonymous_bi_flood_gets_429_and_the_disk_limit_holds() {
    const MAX_TOTAL: u64 = 64 * 1024;
    let app = spawn_app_with(&[
        ("modules.bi.max_batch", json!(50)),
        ("modules.bi.rate_per_address", json!(1)),
        ("modules.bi.burst_per_address", json!(100)),
        ("modules.bi.rate_per_user", json!(1)),
        ("modules.bi.burst_per_user", json!(100)),
        ("mq.file.max_file_bytes", json!(16 * 1024)),
        ("mq.file.max_total_bytes", json!(MAX_TOTAL)),
        ("mq.file.max_files", json!(3)),
    ])
    .await;
    let batch = json!(
        (0..50)
            .map(|i| json!({"name": "flood.event", "properties": {"i": i, "pad": "x".repeat(300)}}))
            .collect::<Vec<_>>()
    );
    let events_url = app.url("/api/v1/bi/events");
    let (_, token) = app.signed_up("neighbour@example.com").await;

    // One address floods: its burst (two batches) passes, then 429 with Retry-After.
    let mut limited = None;
    for attempt in 0..5 {
        let response = app.post_json("/api/v1/bi/events", &batch).await;
        if response.status() == 429 {
            limited = Some(response);
            break;
        }
        assert_eq!(response.status(), 202, "attempt {attempt}");
    }
    let limited = limited.expect("the flood from one address is limited");
    let retry_after: u64 = header(&limited, "retry-after")
        .parse()
        .expect("Retry-After in seconds");
    assert!(
        (1..=100).contains(&retry_after),
        "Retry-After {retry_after}"
    );
    let problem = assert_problem(limited, 429).await;
    assert_eq!(
        problem["type"], "urn:trellis:problem:rate-limited",
        "{problem}"
    );

    // Another address, and a signed-in user on the flooded address, still get 202.
    let other = client_from("127.0.0.2")
        .post(&events_url)
        .json(&batch)
        .send()
        .await
        .expect("request");
    assert_eq!(other.status(), 202, "another address");
    let user = app
        .authed(reqwest::Method::POST, "/api/v1/bi/events", &token)
        .json(&batch)
        .send()
        .await
        .expect("request");
    assert_eq!(user.status(), 202, "a user is counted as the user");

    // Many addresses, each within its burst: far more than the folder may hold.
    let events_dir = app.storage.events_dir();
    let mut accepted = 200;
    for n in 3..30 {
        let client = client_from(&format!("127.0.0.{n}"));
        for _ in 0..2 {
            let response = client
                .post(&events_url)
                .json(&batch)
                .send()
                .await
                .expect("request");
            assert_eq!(response.status(), 202, "127.0.0.{n}");
            accepted += 50;
        }
        let used = folder_bytes(&events_dir);
        assert!(used <= MAX_TOTAL, "{used} bytes in the events folder");
    }
    let storage = app.stop_keeping_storage().await;
    let used = folder_bytes(&storage.events_dir());
    assert!(
        used <= MAX_TOTAL,
        "{used} bytes in the events folder after the drain"
    );
    let files = std::fs::read_dir(storage.events_dir())
        .expect("folder")
        .filter(|entry| {
            entry
                .as_ref()
                .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "ndjson"))
        })
        .count();
    assert!(
        files <= 4,
        "{files} files: three rotated and the live one, at most"
    );
    let kept = storage
        .written_events()
        .iter()
        .filter(|e| e["name"] == "flood.event")
        .count();
    assert!(
        (1..accepted).contains(&kept),
        "the oldest files were removed: {kept} of {accepted} events kept"
    );
}
