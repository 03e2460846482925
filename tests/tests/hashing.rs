//! Password-hashing capacity when requests give up. A test binary of its own: it reads the
//! process-wide metrics recorder, which the `api` binary's servers, running side by side,
//! would all add to.

#[expect(
    dead_code,
    reason = "this binary needs only a few of the shared helpers"
)]
#[path = "api/helpers.rs"]
mod helpers;

use std::time::Duration;

use serde_json::json;

use crate::helpers::{assert_problem, spawn_app_with, test_config};

const PASSWORD: &str = "correct horse battery";

#[tokio::test]
async fn timed_out_registrations_do_not_leak_hash_capacity() {
    // Requests give up long before a hash is done, and nobody may queue: a hash whose
    // request went away must still hold the only permit.
    let app = spawn_app_with(&[
        ("modules.user.hash_concurrency", json!(1)),
        ("modules.user.hash_queue", json!(0)),
        ("modules.user.registrations_per_address", json!(1000)),
        ("server.request_timeout_ms", json!(2)),
    ])
    .await;
    // The server runs in this process: its metrics are read straight from the recorder,
    // since a scrape over HTTP would time out as fast as the registrations.
    let metrics = trellis_core::metrics::install(&test_config().config.metrics)
        .expect("the server's recorder");
    let running = || {
        metrics
            .render()
            .lines()
            .find_map(|line| line.strip_prefix("user_password_hashes_running "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let app = &app;
    let flood = futures_util::future::join_all((0..60).map(|n| async move {
        tokio::time::sleep(Duration::from_millis(2 * n)).await;
        app.post_json(
            "/api/v1/users",
            &json!({"email": format!("flood{n}@example.com"), "password": PASSWORD,
                    "first_name": "F", "last_name": "L"}),
        )
        .await
    }));
    let watch = async {
        let mut peak = 0.0_f64;
        for _ in 0..400 {
            peak = peak.max(running());
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        peak
    };
    let (responses, peak) = tokio::join!(flood, watch);
    assert!(peak <= 1.0, "{peak} hashes ran at once with capacity 1");
    let mut busy = 0;
    for response in responses {
        if response.status() == 201 {
            continue;
        }
        assert!(response.headers().contains_key("retry-after"));
        let problem = assert_problem(response, 503).await;
        if problem["type"] == "urn:trellis:problem:busy" {
            busy += 1;
        }
    }
    assert!(busy > 0, "a full hashing queue answers 503 busy");
}
