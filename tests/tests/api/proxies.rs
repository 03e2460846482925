//! Behind a reverse proxy: the client is the address a trusted proxy names, for every
//! limit and in the access line; what an untrusted peer claims is ignored.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::helpers::Accounts as _;
use crate::{
    helpers::{TestApp, TestStorage, spawn_app_with},
    process::{free_port, lines, server, terminate, wait_exit, wait_healthy},
};

const PASSWORD: &str = "correct horse battery";

/// A wrong login from `client`, naming `forwarded_for`; its status.
async fn wrong_login(app: &TestApp, client: &reqwest::Client, forwarded_for: &str) -> u16 {
    client
        .post(app.url("/api/v1/auth/login"))
        .header("x-forwarded-for", forwarded_for)
        .json(&json!({"email": "owner@example.com", "password": "guess"}))
        .send()
        .await
        .expect("request")
        .status()
        .as_u16()
}

#[tokio::test]
async fn clients_behind_a_trusted_proxy_have_budgets_of_their_own() {
    let app = spawn_app_with(&[
        ("server.trusted_proxies", json!(["127.0.0.1/32"])),
        ("modules.auth.login_failures_per_pair", json!(2)),
    ])
    .await;
    app.register("owner@example.com", PASSWORD).await;
    let proxy = TestApp::client_from("127.0.0.1");
    for expected in [401, 401, 429] {
        assert_eq!(
            wrong_login(&app, &proxy, "198.51.100.1, 203.0.113.7").await,
            expected
        );
    }
    assert_eq!(
        wrong_login(&app, &proxy, "203.0.113.8").await,
        401,
        "another client behind the same proxy is not throttled"
    );
}

#[tokio::test]
async fn a_spoofed_forwarding_header_from_an_untrusted_peer_is_ignored() {
    let app = spawn_app_with(&[
        ("server.trusted_proxies", json!(["127.0.0.1/32"])),
        ("modules.auth.login_failures_per_pair", json!(2)),
    ])
    .await;
    app.register("owner@example.com", PASSWORD).await;
    let stranger = TestApp::client_from("127.0.0.2");
    let statuses = [
        wrong_login(&app, &stranger, "198.51.100.1").await,
        wrong_login(&app, &stranger, "198.51.100.2").await,
        wrong_login(&app, &stranger, "198.51.100.3").await,
    ];
    assert_eq!(
        statuses,
        [401, 401, 429],
        "a fresh claimed address buys no fresh budget"
    );
}

#[tokio::test]
async fn the_access_line_names_the_client_the_proxy_forwarded() {
    let port = free_port();
    let storage = TestStorage::new().await;
    let mut child = server(port, &storage)
        .env("TRELLIS_TELEMETRY__LEVEL", "info")
        .env("TRELLIS_SERVER__TRUSTED_PROXIES", "[\"127.0.0.1/32\"]")
        .spawn()
        .expect("server starts");
    let out = lines(&mut child);
    wait_healthy(port).await;
    let forwarded = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{port}/api/v1/modules"))
        .header("x-forwarded-for", "2001:db8::7")
        .send()
        .await
        .expect("request");
    assert_eq!(forwarded.status(), 200);
    let deadline = Instant::now() + Duration::from_secs(10);
    let line = loop {
        let line = out
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("an access line");
        if line.contains("trellis::access") && line.contains("route=/api/v1/modules") {
            break line;
        }
    };
    assert!(line.contains(" client=2001:db8::7"), "{line}");
    terminate(&child);
    wait_exit(&mut child, Duration::from_secs(10));
}
