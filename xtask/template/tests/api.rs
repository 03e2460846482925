//! The `{{name}}` module through the test kit: the sample resource end to end, in process.

use std::time::Duration;

use poem::http::Method;
use serde_json::{Value, json};
use trellis_testkit::{ManualClock, TestApp};
use trellis_{{name}} as _;

const ITEMS: &str = "/api/v1/{{name}}/items";

async fn create(app: &TestApp, title: &str) -> Value {
    app.call(Method::POST, ITEMS)
        .json(&json!({ "title": title }))
        .send()
        .await
        .expect_json(201)
}

#[tokio::test]
async fn an_item_is_created_stamped_by_the_clock_and_read_back() {
    let clock = ManualClock::at(1_767_225_600_000); // 2026-01-01T00:00:00Z
    let app = TestApp::builder().clock(&clock).spawn().await;
    let created = create(&app, "  First  ").await;
    assert_eq!(created["title"], "First");
    assert_eq!(created["created_at"], "2026-01-01T00:00:00Z");
    clock.advance(Duration::from_secs(60));

    let id = created["id"].as_str().expect("an id");
    let read: Value = app
        .call(Method::GET, &format!("{ITEMS}/{id}"))
        .send()
        .await
        .expect_json(200);
    assert_eq!(read, created);
}

#[tokio::test]
async fn items_are_listed_a_page_at_a_time() {
    let app = TestApp::builder().spawn().await;
    for title in ["one", "two", "three"] {
        create(&app, title).await;
    }
    let first: Value = app
        .call(Method::GET, &format!("{ITEMS}?limit=2"))
        .send()
        .await
        .expect_json(200);
    assert_eq!(first["items"].as_array().map(Vec::len), Some(2), "{first}");
    let cursor = first["next_cursor"].as_str().expect("another page");
    let second: Value = app
        .call(Method::GET, &format!("{ITEMS}?limit=2&cursor={cursor}"))
        .send()
        .await
        .expect_json(200);
    assert_eq!(second["items"][0]["title"], "three", "{second}");
    assert!(second.get("next_cursor").is_none(), "the last page");
}

#[tokio::test]
async fn bad_input_and_unknown_ids_are_problems_naming_what_was_wrong() {
    let app = TestApp::builder().spawn().await;
    let blank = app
        .call(Method::POST, ITEMS)
        .json(&json!({ "title": "   " }))
        .send()
        .await
        .problem(422);
    assert_eq!(blank.fields(), [("body", "/title")]);

    let missing = app
        .call(Method::POST, ITEMS)
        .json(&json!({}))
        .send()
        .await
        .problem(400);
    assert_eq!(missing.fields(), [("body", "/title")]);

    let unknown = app
        .call(Method::GET, &format!("{ITEMS}/no-such-id"))
        .send()
        .await
        .problem(404);
    assert_eq!(unknown.kind, "item-not-found");

    let too_big = app
        .call(Method::GET, &format!("{ITEMS}?limit=1000"))
        .send()
        .await
        .problem(400);
    assert_eq!(too_big.fields(), [("parameter", "limit")]);
}
