//! The user module alone (plus whatever else the build links) through the test kit:
//! requests in process, the manual clock, and what registration publishes.

use std::time::Duration;

use poem::http::Method;
use serde_json::{Value, json};
use trellis_core::contracts::UserRegistered;
use trellis_testkit::{ManualClock, TestApp};
use trellis_user as _;

fn registration(email: &str) -> Value {
    json!({
        "email": email, "password": "correct horse battery",
        "first_name": "Ada", "last_name": "Lovelace"
    })
}

#[tokio::test]
async fn registration_is_timed_by_the_module_clock_and_emitted_as_an_event() {
    let clock = ManualClock::at(1_767_225_600_000); // 2026-01-01T00:00:00Z
    let mut builder = TestApp::builder().clock(&clock);
    let registered = builder.capture_events::<UserRegistered>();
    let app = builder.spawn().await;

    let created: Value = app
        .call(Method::POST, "/api/v1/users")
        .json(&registration("ada@example.com"))
        .send()
        .await
        .expect_json(201);
    assert_eq!(created["created_at"], "2026-01-01T00:00:00Z", "{created}");
    clock.advance(Duration::from_secs(90));

    let published = registered.wait_for(1).await;
    assert_eq!(published.len(), 1);
    assert_eq!(published[0].email, "ada@example.com");
    assert_eq!(Some(published[0].user_id.as_str()), created["id"].as_str());
}

#[tokio::test]
async fn a_refused_registration_names_each_field_and_emits_nothing() {
    let mut builder = TestApp::builder();
    let registered = builder.capture_events::<UserRegistered>();
    let app = builder.spawn().await;

    let problem = app
        .call(Method::POST, "/api/v1/users")
        .json(&json!({
            "email": "not-an-address", "password": "short",
            "first_name": "Ada", "last_name": "Lovelace"
        }))
        .send()
        .await
        .problem(400);
    assert_eq!(problem.kind, "invalid-body");
    assert_eq!(
        problem.fields(),
        [("body", "/email"), ("body", "/password")],
        "{:?}",
        problem.body
    );
    assert!(registered.all().is_empty());
}

#[tokio::test]
async fn an_e_mail_is_registered_once_whatever_its_case_in_process_or_over_http() {
    let app = TestApp::builder().spawn().await;
    app.call(Method::POST, "/api/v1/users")
        .json(&registration("grace@example.com"))
        .send()
        .await
        .expect_json::<Value>(201);
    let problem = app
        .call(Method::POST, "/api/v1/users")
        .json(&registration("Grace@Example.com"))
        .send_http()
        .await
        .problem(409);
    assert_eq!(problem.kind, "email-taken", "{:?}", problem.body);
}
