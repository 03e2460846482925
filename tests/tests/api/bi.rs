//! BI events on the embedded default: accepted events land in the event files exactly
//! once, enriched; rejected requests leave nothing behind.

use std::collections::BTreeSet;

use serde_json::{Value, json};

use crate::helpers::Accounts as _;
use crate::helpers::{TestApp, assert_problem, spawn_app, violations};

const EVENTS: &str = "/api/v1/bi/events";

/// Posts `body`; the ids of a 202.
pub async fn accepted_ids(app: &TestApp, body: &Value) -> Vec<String> {
    let response = app.post_json(EVENTS, body).await;
    assert_eq!(response.status(), 202, "accepted");
    let answer: Value = response.json().await.expect("json");
    let ids: Vec<String> = answer["ids"]
        .as_array()
        .expect("ids")
        .iter()
        .map(|id| id.as_str().expect("string id").to_owned())
        .collect();
    assert_eq!(answer["accepted"], ids.len());
    ids
}

/// A batch of `n` valid events.
pub fn batch(n: usize, tag: &str) -> Value {
    Value::Array(
        (0..n)
            .map(|i| json!({"name": "load.tick", "properties": {"tag": tag, "i": i}}))
            .collect(),
    )
}

/// Every kind of hostile request, each refused with the right problem and the offending
/// event's index and field named. None may enqueue anything.
pub async fn refuse_hostile_requests(app: &TestApp) {
    let ok = json!({"name": "fine.event"});

    let oversized_batch = batch(501, "too-many");
    let problem = assert_problem(app.post_json(EVENTS, &oversized_batch).await, 422).await;
    assert!(
        problem["errors"][0]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("501"),
        "{problem}"
    );

    let big = "x".repeat(17 * 1024);
    let body = json!([ok, ok, {"name": "fat", "properties": {"blob": big}}]);
    let problem = assert_problem(app.post_json(EVENTS, &body).await, 422).await;
    assert_eq!(
        violations(&problem),
        [("body".into(), "/2/properties".into())]
    );

    let body = json!([ok, {"name": 5, "properties": [1], "timestamp": true, "utm": {"source": 1}}]);
    let problem = assert_problem(app.post_json(EVENTS, &body).await, 400).await;
    let fields: BTreeSet<String> = violations(&problem).into_iter().map(|(_, f)| f).collect();
    assert_eq!(
        fields,
        BTreeSet::from(
            ["/1/name", "/1/properties", "/1/timestamp", "/1/utm/source"].map(String::from)
        )
    );

    for bad in [
        "Bad",
        "has space",
        "trailing.",
        ".lead",
        "x".repeat(65).as_str(),
        "emoji😀",
        "",
    ] {
        let body = json!([ok, {"name": bad}]);
        let problem = assert_problem(app.post_json(EVENTS, &body).await, 400).await;
        assert_eq!(
            violations(&problem),
            [("body".into(), "/1/name".into())],
            "name {bad:?}"
        );
    }

    let body = json!({"name": "ok", "timestamp": "last tuesday"});
    let problem = assert_problem(app.post_json(EVENTS, &body).await, 400).await;
    assert_eq!(violations(&problem), [("body".into(), "/timestamp".into())]);

    let body = json!([ok, {"name": "ok", "utm": null}]);
    let problem = assert_problem(app.post_json(EVENTS, &body).await, 400).await;
    assert_eq!(violations(&problem), [("body".into(), "/1/utm".into())]);

    let body = json!({"name": "ok", "surprise": 1});
    let problem = assert_problem(app.post_json(EVENTS, &body).await, 400).await;
    assert_eq!(violations(&problem), [("body".into(), "/surprise".into())]);

    // An array where an object belongs (serde's structs would take one).
    let body = json!({"name": "ok", "utm": []});
    let problem = assert_problem(app.post_json(EVENTS, &body).await, 400).await;
    assert_eq!(violations(&problem), [("body".into(), "/utm".into())]);
    let body = json!([["ok"]]);
    assert_problem(app.post_json(EVENTS, &body).await, 400).await;

    for (content_type, raw, status) in [
        ("application/json", "{\"name\":", 400),
        ("application/json", "null", 400),
        ("application/json", "\"just a string\"", 400),
        ("text/plain", "{\"name\":\"ok\"}", 415),
    ] {
        assert_problem(app.post_raw(EVENTS, content_type, raw).await, status).await;
    }

    let huge = batch(100, &"y".repeat(11 * 1024));
    assert_problem(app.post_json(EVENTS, &huge).await, 413).await;

    let response = app
        .client
        .post(app.url(EVENTS))
        .bearer_auth("not-a-token")
        .json(&ok)
        .send()
        .await
        .expect("request");
    assert_problem(response, 401).await;
}

#[tokio::test]
async fn accepted_events_are_written_once_each_enriched_with_request_and_caller() {
    let app = spawn_app().await;
    let (user_id, token) = app.signed_up("bi-caller@example.com").await;

    let mut ids = BTreeSet::new();
    for round in 0..5 {
        ids.extend(accepted_ids(&app, &batch(100, &format!("r{round}"))).await);
    }
    let single = json!({
        "name": "checkout.completed",
        "timestamp": "2026-11-24T11:00:00.250+01:00",
        "properties": {"total": 12.5, "items": [1, 2], "nested": {"ok": true}},
        "utm": {"source": "newsletter", "campaign": "winter"}
    });
    let response = app
        .authed(reqwest::Method::POST, EVENTS, &token)
        .header("x-request-id", "bi-request-1")
        .json(&single)
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 202);
    let answer: Value = response.json().await.expect("json");
    let single_id = answer["ids"][0].as_str().expect("id").to_owned();
    ids.insert(single_id.clone());
    assert_eq!(ids.len(), 501, "ids are unique");

    let storage = app.stop_keeping_storage().await;
    let written: Vec<Value> = storage
        .written_events()
        .into_iter()
        .filter(|e| e["source"] == "client")
        .collect();
    let written_ids: BTreeSet<String> = written
        .iter()
        .map(|e| e["id"].as_str().expect("id").to_owned())
        .collect();
    assert_eq!(written.len(), 501, "each accepted event written once");
    assert_eq!(written_ids, ids);

    let event = written
        .iter()
        .find(|e| e["id"] == single_id.as_str())
        .expect("the single event");
    assert_eq!(event["name"], "checkout.completed");
    assert_eq!(event["timestamp"], "2026-11-24T10:00:00.25Z", "in UTC");
    assert_eq!(event["request_id"], "bi-request-1");
    assert_eq!(event["user_id"], user_id.as_str());
    assert!(event["session_id"].is_string());
    assert_eq!(event["properties"], single["properties"]);
    assert_eq!(
        event["utm"],
        json!({"source": "newsletter", "campaign": "winter"})
    );
    assert!(
        event["received_at"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z'))
    );
    let anonymous = written
        .iter()
        .find(|e| e["id"] != single_id.as_str())
        .expect("one");
    assert!(anonymous.get("user_id").is_none(), "{anonymous}");
}

#[tokio::test]
async fn rejected_requests_write_nothing() {
    let app = spawn_app().await;
    refuse_hostile_requests(&app).await;
    assert!(
        accepted_ids(&app, &json!([])).await.is_empty(),
        "an empty batch is a no-op"
    );
    let storage = app.stop_keeping_storage().await;
    let client: Vec<Value> = storage
        .written_events()
        .into_iter()
        .filter(|e| e["source"] == "client")
        .collect();
    assert!(client.is_empty(), "{client:?}");
}

#[tokio::test]
async fn domain_events_become_server_bi_events_without_personal_data() {
    let app = spawn_app().await;
    let (user_id, _) = app.signed_up("bi-domain@example.com").await;
    let failed = app
        .try_login("bi-domain@example.com", "wrong password!")
        .await;
    assert_eq!(failed.status(), 401);
    let storage = app.stop_keeping_storage().await;
    let server: Vec<Value> = storage
        .written_events()
        .into_iter()
        .filter(|e| e["source"] == "server")
        .collect();
    let names: BTreeSet<&str> = server.iter().filter_map(|e| e["name"].as_str()).collect();
    assert_eq!(
        names,
        BTreeSet::from(["user.registered", "auth.logged_in", "auth.login_failed"])
    );
    for event in &server {
        assert!(
            !event.to_string().contains("bi-domain@"),
            "no e-mail: {event}"
        );
        if event["name"] != "auth.login_failed" {
            assert_eq!(event["user_id"], user_id.as_str(), "{event}");
        }
    }
}

#[tokio::test]
async fn queue_and_spool_metrics_are_exported() {
    let app = spawn_app().await;
    accepted_ids(&app, &batch(3, "metrics")).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let text = app.get("/metrics").await.text().await.expect("text");
        let ready = [
            "mq_messages_sent_total{backend=\"file\"}",
            "mq_spool_syncs_total",
            "mq_spool_written_bytes_total",
            "mq_spool_bytes",
            "mq_buffered_messages{backend=\"file\"}",
            "mq_up{backend=\"file\"} 1",
        ]
        .iter()
        .all(|m| text.contains(m));
        if ready {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "metrics missing:\n{text}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
