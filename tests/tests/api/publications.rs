//! The event publication registry end to end: a handler whose dependency is down leaves
//! its publication failed (listed with the error, counted); once the fault is gone, a
//! resubmission delivers it. Two instances on one database share the publications and
//! deliver each once.

use std::time::{Duration, Instant};

use poem::http::Method;
use serde_json::{Value, json};

use crate::helpers::{
    ADMIN_EMAIL, ADMIN_PASSWORD, Accounts as _, TestApp, TestStorage, admin, spawn_app_on,
    spawn_app_with,
};

const PUBLICATIONS: &str = "/api/v1/events/publications";

/// The value of the series `name{labels}` on `/metrics` (0 when absent).
async fn metric(app: &TestApp, series: &str) -> f64 {
    let text = app.get("/metrics").await.text().await.expect("metrics");
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// The probe module's publications with `status`, polled until there are `count`.
async fn probe_publications(app: &TestApp, token: &str, status: &str, count: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let page = app
            .get_json_authed(&format!("{PUBLICATIONS}?status={status}&limit=100"), token)
            .await;
        let found: Vec<Value> = page["publications"]
            .as_array()
            .expect("publications")
            .iter()
            .filter(|p| p["module"] == "probe")
            .cloned()
            .collect();
        if found.len() >= count || Instant::now() > deadline {
            return found;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_failed_handler_leaves_a_failed_publication_that_a_resubmission_delivers() {
    let mut settings = admin();
    settings.extend([
        ("events.max_attempts", json!(2)),
        ("events.retry_backoff_ms", json!(10)),
        ("events.poll_ms", json!(50)),
    ]);
    let app = spawn_app_with(&settings).await;
    let root = app.login(ADMIN_EMAIL, ADMIN_PASSWORD).await["access_token"]
        .as_str()
        .expect("token")
        .to_owned();
    let series = |name: &str| format!(r#"{name}{{event="user.registered",module="probe"}}"#);
    let failed_before = metric(&app, &series("event_publications_failed_total")).await;
    let resubmitted_before = metric(&app, "event_publications_resubmitted_total").await;

    app.storage
        .execute_sql("INSERT INTO probe_event_faults (reason) VALUES ('the probe store is down')")
        .await;
    let user = app
        .register("failing@example.com", "correct horse battery")
        .await;

    let failed = probe_publications(&app, &root, "failed", 1).await;
    assert_eq!(failed.len(), 1, "{failed:?}");
    let publication = &failed[0];
    assert_eq!(publication["event"], "user.registered");
    assert_eq!(publication["attempts"], 2);
    assert_eq!(publication["last_error"], "the probe store is down");
    assert_eq!(publication["payload"]["user_id"], user.as_str());
    assert_eq!(
        metric(&app, &series("event_publications_failed_total")).await - failed_before,
        1.0
    );

    // Once the fault is mended, a resubmission delivers it.
    app.storage
        .execute_sql("DELETE FROM probe_event_faults")
        .await;
    let answer: Value = app
        .authed(
            Method::POST,
            &format!("{PUBLICATIONS}/resubmit-failed"),
            &root,
        )
        .send()
        .await
        .expect("resubmits")
        .json()
        .await
        .expect("json");
    assert!(answer["resubmitted"].as_u64() >= Some(1), "{answer}");
    let completed = probe_publications(&app, &root, "completed", 2).await;
    assert!(
        completed.iter().any(|p| p["id"] == publication["id"]),
        "the resubmitted publication completed: {completed:?}"
    );
    assert!(
        probe_publications(&app, &root, "failed", 0)
            .await
            .is_empty()
    );
    assert!(metric(&app, "event_publications_resubmitted_total").await - resubmitted_before >= 1.0);
    assert!(metric(&app, &series("event_publications_completed_total")).await >= 1.0);
}

#[tokio::test]
async fn two_instances_share_the_publications_and_deliver_each_once() {
    // Both relays look every 20 ms, so they contend for every publication.
    let settings = [("events.poll_ms", json!(20))];
    let first = spawn_app_on(TestStorage::new().await, &settings).await;
    let second = spawn_app_on(first.storage.sharing().await, &settings).await;
    let mut users = Vec::new();
    for n in 0..20 {
        let app = if n % 2 == 0 { &first } else { &second };
        users.push(
            app.register(&format!("pair{n}@example.com"), "correct horse battery")
                .await,
        );
    }
    // Each instance's bi handler writes to its own message-queue folder.
    let delivered = || {
        [&first, &second]
            .iter()
            .flat_map(|app| app.storage.written_events())
            .filter(|event| event["name"] == "user.registered")
            .map(|event| event["user_id"].as_str().expect("user_id").to_owned())
            .collect::<Vec<_>>()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while delivered().len() < users.len() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut seen = delivered();
    seen.sort();
    users.sort();
    assert_eq!(
        seen, users,
        "each registration's event once, by one instance"
    );
}
