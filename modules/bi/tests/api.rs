//! The bi module through the test kit: accepted events reach the message queue once each,
//! refused batches name the offending event and leave nothing behind.

use poem::http::Method;
use serde_json::{Value, json};
use trellis_bi as _;
use trellis_testkit::TestApp;

const EVENTS: &str = "/api/v1/bi/events";

#[tokio::test]
async fn an_accepted_batch_reaches_the_queue_once_each_with_its_ids() {
    let app = TestApp::builder().spawn().await;
    let answer: Value = app
        .call(Method::POST, EVENTS)
        .json(&json!([
            {"name": "page.viewed", "properties": {"path": "/"}},
            {"name": "button.clicked"}
        ]))
        .send()
        .await
        .expect_json(202);
    let ids: Vec<&str> = answer["ids"]
        .as_array()
        .expect("ids")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(ids.len(), 2, "{answer}");

    let queued = app.wait_for_queued(2).await;
    let mut seen: Vec<&str> = queued.iter().filter_map(|m| m["id"].as_str()).collect();
    seen.sort_unstable();
    let mut expected = ids.clone();
    expected.sort_unstable();
    assert_eq!(seen, expected, "{queued:?}");
    assert!(queued.iter().any(|m| m["name"] == "page.viewed"));
}

#[tokio::test]
async fn a_refused_batch_names_the_offending_event_and_queues_nothing() {
    let app = TestApp::builder().spawn().await;
    let problem = app
        .call(Method::POST, EVENTS)
        .json(&json!([{"name": "fine"}, {"name": 5}]))
        .send()
        .await
        .problem(400);
    assert_eq!(problem.kind, "invalid-body");
    assert_eq!(
        problem.fields(),
        [("body", "/1/name")],
        "{:?}",
        problem.body
    );

    app.call(Method::POST, EVENTS)
        .json(&json!({"name": "after.the.refusal"}))
        .send()
        .await
        .expect_json::<Value>(202);
    let queued = app.wait_for_queued(1).await;
    assert_eq!(queued.len(), 1, "only the accepted event: {queued:?}");
}
