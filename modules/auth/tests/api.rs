//! The auth module through the test kit: tokens and sessions on the manual clock, and
//! what a login publishes. Accounts come from the user module, which auth requires.

use std::time::Duration;

use poem::http::Method;
use serde_json::{Value, json};
use trellis_auth as _;
use trellis_core::contracts::{LoginFailed, UserLoggedIn};
use trellis_testkit::{ManualClock, TestApp};
use trellis_user as _;

const PASSWORD: &str = "correct horse battery";

/// Registers `email` and logs in; the token response.
async fn signed_in(app: &TestApp, email: &str) -> Value {
    app.call(Method::POST, "/api/v1/users")
        .json(&json!({
            "email": email, "password": PASSWORD,
            "first_name": "Test", "last_name": "User"
        }))
        .send()
        .await
        .expect_json::<Value>(201);
    app.call(Method::POST, "/api/v1/auth/login")
        .json(&json!({"email": email, "password": PASSWORD}))
        .send()
        .await
        .expect_json(200)
}

#[tokio::test]
async fn an_access_token_expires_on_the_module_clock_and_the_refresh_token_renews_it() {
    let clock = ManualClock::at(1_767_225_600_000); // 2026-01-01T00:00:00Z
    let app = TestApp::builder()
        .clock(&clock)
        .set("modules.auth.access_ttl_ms", 60_000)
        .spawn()
        .await;
    let tokens = signed_in(&app, "ada@example.com").await;
    let access = tokens["access_token"].as_str().expect("access token");

    let sessions: Value = app
        .call(Method::GET, "/api/v1/auth/sessions")
        .bearer(access)
        .send()
        .await
        .expect_json(200);
    assert_eq!(
        sessions["sessions"][0]["created_at"], "2026-01-01T00:00:00Z",
        "{sessions}"
    );

    // Past its minute and the five seconds of leeway.
    clock.advance(Duration::from_secs(66));
    let problem = app
        .call(Method::GET, "/api/v1/auth/sessions")
        .bearer(access)
        .send()
        .await
        .problem(401);
    assert_eq!(problem.kind, "unauthorized", "{:?}", problem.body);

    let renewed: Value = app
        .call(Method::POST, "/api/v1/auth/refresh")
        .json(&json!({"refresh_token": tokens["refresh_token"]}))
        .send()
        .await
        .expect_json(200);
    let access = renewed["access_token"].as_str().expect("access token");
    app.call(Method::GET, "/api/v1/auth/sessions")
        .bearer(access)
        .send()
        .await
        .expect_json::<Value>(200);
}

#[tokio::test]
async fn logins_emit_who_signed_in_and_who_failed() {
    let mut builder = TestApp::builder();
    let logged_in = builder.capture_events::<UserLoggedIn>();
    let failed = builder.capture_events::<LoginFailed>();
    let app = builder.spawn().await;

    let tokens = signed_in(&app, "grace@example.com").await;
    let problem = app
        .call(Method::POST, "/api/v1/auth/login")
        .json(&json!({"email": "grace@example.com", "password": "not the password"}))
        .send()
        .await
        .problem(401);
    assert!(problem.errors.is_empty(), "{:?}", problem.body);

    let logins = logged_in.wait_for(1).await;
    assert_eq!(logins.len(), 1);
    assert!(!logins[0].session_id.is_empty());
    assert!(tokens["access_token"].is_string());
    assert_eq!(failed.wait_for(1).await.len(), 1);
}
