//! Periodic jobs: one run per period over several instances, and the auth module's purge
//! of ended sessions.

use std::time::Duration;

use reqwest::Method;
use serde_json::json;

use crate::helpers::Accounts as _;
use crate::helpers::{TestStorage, spawn_app_on, spawn_app_with};

#[tokio::test]
async fn a_job_runs_on_exactly_one_instance_per_period() {
    let storage = TestStorage::new().await;
    let every = [("modules.probe.job_every_ms", json!(400))];
    let first = spawn_app_on(storage, &every).await;
    let second = spawn_app_on(first.storage.sharing().await, &every).await;
    let third = spawn_app_on(first.storage.sharing().await, &every).await;
    tokio::time::sleep(Duration::from_millis(2600)).await;
    for app in [second, third] {
        app.stop().await.expect("clean stop");
    }
    let storage = first.stop_keeping_storage().await;

    let runs = storage
        .fetch_i64s("SELECT ran_at FROM probe_job_runs ORDER BY ran_at")
        .await;
    // About one per 400 ms over 2.6 s: never three instances' worth.
    assert!(
        (4..=8).contains(&runs.len()),
        "{} runs: {runs:?}",
        runs.len()
    );
    // `ran_at` is written by the run, after its claim: a run that waited for the database
    // records a later time. Two instances running one period would be milliseconds apart;
    // half a period apart is two periods.
    for pair in runs.windows(2) {
        assert!(
            pair[1] - pair[0] >= 200,
            "two runs {} ms apart in one period: {runs:?}",
            pair[1] - pair[0]
        );
    }
    let instances = storage
        .fetch_i64s("SELECT COUNT(DISTINCT instance) FROM probe_job_runs")
        .await;
    assert!(instances[0] >= 1);
}

#[tokio::test]
async fn the_purge_removes_ended_sessions_and_their_refresh_tokens_and_keeps_live_ones() {
    let app = spawn_app_with(&[
        ("modules.auth.purge_every_ms", json!(1000)),
        ("modules.auth.purge_after_ms", json!(0)),
    ])
    .await;
    app.register("purged@example.com", "correct horse battery")
        .await;
    let login = || app.login("purged@example.com", "correct horse battery");
    let (logged_out, expired, live) = (login().await, login().await, login().await);
    let token =
        |tokens: &serde_json::Value| tokens["access_token"].as_str().expect("token").to_owned();
    let out = app
        .authed(Method::POST, "/api/v1/auth/logout", &token(&logged_out))
        .send()
        .await
        .expect("logout");
    assert_eq!(out.status(), 204);
    let claims = |t: &str| -> serde_json::Value {
        use base64::Engine as _;
        let payload = t.split('.').nth(1).expect("payload");
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .expect("base64");
        serde_json::from_slice(&bytes).expect("claims")
    };
    let expired_sid = claims(&token(&expired))["sid"]
        .as_str()
        .expect("sid")
        .to_owned();
    app.storage
        .execute_sql(&format!(
            "UPDATE auth_sessions SET expires_at = 1 WHERE id = '{expired_sid}'"
        ))
        .await;
    let sessions = || app.storage.fetch_i64s("SELECT COUNT(*) FROM auth_sessions");
    let tokens = || {
        app.storage
            .fetch_i64s("SELECT COUNT(*) FROM auth_refresh_tokens")
    };
    assert_eq!(sessions().await, [3]);
    assert_eq!(tokens().await, [3]);

    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while sessions().await != [1] {
        assert!(
            std::time::Instant::now() < deadline,
            "ended sessions were not purged"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(tokens().await, [1], "refresh tokens of purged sessions");
    let me = app
        .authed(Method::GET, "/api/v1/users/me", &token(&live))
        .send()
        .await
        .expect("me");
    assert_eq!(me.status(), 200, "the live session was kept");

    let metrics = app.get("/metrics").await.text().await.expect("text");
    for needle in [
        r#"jobs_runs_total{job="auth.purge",outcome="ok"}"#,
        r#"jobs_items_total{job="auth.purge"}"#,
        r#"jobs_last_success_timestamp_seconds{job="auth.purge"}"#,
    ] {
        assert!(metrics.contains(needle), "missing {needle}");
    }
}
