//! Client mistakes get 4xx problem+json naming what was wrong; server failures get an
//! opaque 500 problem and the server keeps serving.

use serde_json::json;

use crate::helpers::{assert_problem, spawn_app, violations};

#[tokio::test]
async fn unknown_route_is_a_404_problem() {
    let app = spawn_app().await;
    let body = assert_problem(app.get("/no/such/route").await, 404).await;
    assert_eq!(body["instance"], "/no/such/route");
}

#[tokio::test]
async fn wrong_method_is_a_405_problem_with_allow() {
    let app = spawn_app().await;
    for (method, path, allow) in [
        (reqwest::Method::DELETE, "/healthz", "GET, HEAD"),
        (reqwest::Method::PUT, "/api/v1/probe/echo", "POST"),
        (reqwest::Method::POST, "/api/v1/probe/items/7", "GET, HEAD"),
    ] {
        let response = app
            .client
            .request(method.clone(), app.url(path))
            .send()
            .await
            .expect("request");
        let header = response
            .headers()
            .get("allow")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        assert_eq!(header.as_deref(), Some(allow), "{method} {path}");
        assert_problem(response, 405).await;
    }
}

#[tokio::test]
async fn malformed_json_is_a_400_problem() {
    let app = spawn_app().await;
    let response = app
        .post_raw("/api/v1/probe/echo", "application/json", "{\"name\": ")
        .await;
    let body = assert_problem(response, 400).await;
    assert_eq!(body["type"], "urn:trellis:problem:invalid-body");
}

#[tokio::test]
async fn invalid_bodies_name_the_field() {
    let app = spawn_app().await;
    let cases = [
        (
            "too long",
            json!({"name": "x".repeat(21), "count": 1}),
            "/name",
        ),
        ("over maximum", json!({"name": "a", "count": 101}), "/count"),
    ];
    for (case, body, field) in cases {
        let response = app.post_json("/api/v1/probe/echo", &body).await;
        let problem = assert_problem(response, 400).await;
        assert!(
            violations(&problem).contains(&("body".into(), field.into())),
            "{case}: expected {field} in {problem}"
        );
    }
}

#[tokio::test]
async fn wrong_types_and_missing_fields_name_each_field() {
    let app = spawn_app().await;
    for (case, body, fields) in [
        ("wrong type", json!({"name": 5, "count": 1}), vec!["/name"]),
        ("missing field", json!({"name": "a"}), vec!["/count"]),
        (
            "two at once",
            json!({"name": "", "count": -1}),
            vec!["/name", "/count"],
        ),
        (
            "wrong item type",
            json!({"name": "a", "count": 1, "tags": ["x", 2]}),
            vec!["/tags/1"],
        ),
        ("not an object", json!([1, 2]), vec![""]),
    ] {
        let response = app.post_json("/api/v1/probe/echo", &body).await;
        let problem = assert_problem(response, 400).await;
        assert_eq!(
            problem["type"], "urn:trellis:problem:invalid-body",
            "{case}"
        );
        let named: Vec<String> = violations(&problem).into_iter().map(|(_, f)| f).collect();
        assert_eq!(named, fields, "{case}: {problem}");
    }
}

#[tokio::test]
async fn wrong_content_type_is_a_415_problem() {
    let app = spawn_app().await;
    let response = app
        .post_raw("/api/v1/probe/echo", "text/plain", "hello")
        .await;
    assert_problem(response, 415).await;
}

#[tokio::test]
async fn bad_path_and_query_parameters_name_the_parameter() {
    let app = spawn_app().await;
    let problem = assert_problem(app.get("/api/v1/probe/items/abc").await, 400).await;
    assert_eq!(
        violations(&problem),
        [("path".into(), "id".into())],
        "{problem}"
    );

    for query in ["ms=soon", "ms=20000", ""] {
        let path = format!("/api/v1/probe/slow?{query}");
        let problem = assert_problem(app.get(&path).await, 400).await;
        assert_eq!(
            violations(&problem),
            [("parameter".into(), "ms".into())],
            "{query}: {problem}"
        );
    }
}

#[tokio::test]
async fn module_errors_map_to_their_problem() {
    let app = spawn_app().await;
    let problem = assert_problem(app.get("/api/v1/probe/items/5000").await, 404).await;
    assert_eq!(problem["title"], "Item not found");
    assert_eq!(problem["detail"], "item 5000 does not exist");
}

#[tokio::test]
async fn the_bus_answers_requests_through_the_module_contract() {
    let app = spawn_app().await;
    let body: serde_json::Value = app
        .get("/api/v1/probe/items/21")
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(body, json!({"id": 21, "doubled": 42}));
}

#[tokio::test]
async fn unhandled_bus_request_is_an_opaque_500() {
    let app = spawn_app().await;
    let problem = assert_problem(app.get("/api/v1/probe/unhandled").await, 500).await;
    let detail = problem["detail"].as_str().unwrap_or_default();
    assert!(
        !detail.contains("Unhandled"),
        "internals stay out of the answer: {detail}"
    );
}

#[tokio::test]
async fn a_panic_is_a_500_problem_and_the_server_keeps_serving() {
    let app = spawn_app().await;
    assert_problem(app.get("/api/v1/probe/panic").await, 500).await;
    assert_eq!(app.get("/healthz").await.status(), 200);
}
