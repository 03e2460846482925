//! The `common` module's endpoints.

use serde_json::{Value, json};

use crate::helpers::{assert_problem, spawn_app, spawn_app_with};

#[tokio::test]
async fn healthz_answers_ok() {
    let app = spawn_app().await;
    let response = app.get("/healthz").await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.expect("json");
    assert_eq!(body, json!({"status": "ok"}));
}

#[tokio::test]
async fn readyz_reports_every_check_with_latency() {
    let app = spawn_app().await;
    let response = app.get("/readyz").await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["status"], "up");
    let names: Vec<&str> = body["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert_eq!(
        names,
        ["core.database", "core.cache", "core.queue", "probe.flag"]
    );
    for check in body["checks"].as_array().expect("checks") {
        assert_eq!(check["status"], "up", "{check}");
        assert!(check["latency_ms"].as_f64().is_some(), "{body}");
    }
}

#[tokio::test]
async fn readyz_names_the_failing_check() {
    let app = spawn_app_with(&[("modules.probe.ready", json!(false))]).await;
    let body = assert_problem(app.get("/readyz").await, 503).await;
    assert!(
        body["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("probe.flag"),
        "{body}"
    );
    let flag = body["checks"]
        .as_array()
        .and_then(|checks| checks.iter().find(|c| c["name"] == "probe.flag"))
        .expect("probe.flag is listed");
    assert_eq!(flag["status"], "down");
}

#[tokio::test]
async fn info_reports_build_and_process_facts() {
    let app = spawn_app().await;
    let body: Value = app.get("/api/v1/info").await.json().await.expect("json");
    for field in [
        "name",
        "version",
        "git_commit",
        "git_branch",
        "build_number",
        "build_time",
        "start_time",
    ] {
        assert!(
            body[field].as_str().is_some_and(|v| !v.is_empty()),
            "`{field}` missing in {body}"
        );
    }
    assert!(body["uptime_seconds"].is_u64(), "{body}");
    assert_eq!(body["version"], env!("CARGO_PKG_VERSION"));
}

#[tokio::test]
async fn modules_lists_every_linked_module_in_start_order() {
    let app = spawn_app().await;
    let body: Value = app.get("/api/v1/modules").await.json().await.expect("json");
    let names: Vec<&str> = body["modules"]
        .as_array()
        .expect("modules")
        .iter()
        .filter_map(|m| m["name"].as_str())
        .collect();
    // Every module the registry resolves, in its order (whatever modules are linked).
    let registry: Vec<&str> = trellis_core::registered_modules()
        .expect("the registry resolves")
        .iter()
        .map(|m| m.name())
        .collect();
    assert_eq!(names, registry);
    // `probe` requires `common`, so it starts after it.
    let at = |name: &str| names.iter().position(|n| *n == name).expect("listed");
    assert!(at("common") < at("probe"), "{names:?}");
    assert_eq!(body["modules"][at("probe")]["requires"], json!(["common"]));
}
