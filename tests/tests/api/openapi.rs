//! The one OpenAPI document and its UI, as served.

use std::collections::BTreeSet;

use serde_json::Value;

use crate::helpers::spawn_app;

fn operations(doc: &Value) -> Vec<(String, String, &Value)> {
    let mut out = Vec::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for (method, op) in item.as_object().expect("path item") {
            out.push((method.to_uppercase(), path.clone(), op));
        }
    }
    out
}

#[tokio::test]
async fn document_covers_exactly_the_linked_modules() {
    let app = spawn_app().await;
    let response = app.get("/openapi.json").await;
    assert_eq!(response.status(), 200);
    let doc: Value = response.json().await.expect("json");
    assert!(
        doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")),
        "{}",
        doc["openapi"]
    );

    let tags: BTreeSet<&str> = operations(&doc)
        .iter()
        .map(|(_, _, op)| op["tags"][0].as_str().expect("every operation is tagged"))
        .collect();
    let registry: BTreeSet<&str> = trellis_core::registered_modules()
        .expect("the registry resolves")
        .iter()
        .map(|m| m.name())
        .collect();
    assert_eq!(
        tags, registry,
        "every linked module has operations, and only they"
    );
    let declared: BTreeSet<&str> = doc["tags"]
        .as_array()
        .expect("tags")
        .iter()
        .filter_map(|t| t["name"].as_str())
        .collect();
    assert_eq!(declared, tags);
}

#[tokio::test]
async fn every_operation_documents_its_problem_responses() {
    let app = spawn_app().await;
    let doc: Value = app.get("/openapi.json").await.json().await.expect("json");
    for (method, path, op) in operations(&doc) {
        let responses = op["responses"].as_object().expect("responses");
        for status in ["500", "503"] {
            let content = &responses
                .get(status)
                .unwrap_or_else(|| panic!("{method} {path} lacks {status}"))["content"];
            assert!(
                content.get("application/problem+json").is_some(),
                "{method} {path} {status} is not problem+json"
            );
        }
        let has_input = op.get("requestBody").is_some() || op.get("parameters").is_some();
        assert_eq!(
            responses.contains_key("400"),
            has_input,
            "{method} {path}: 400"
        );
        if op.get("requestBody").is_some() {
            assert!(
                responses.contains_key("413") && responses.contains_key("415"),
                "{method} {path}"
            );
        }
    }
}

#[tokio::test]
async fn yaml_and_swagger_ui_are_served() {
    let app = spawn_app().await;
    let yaml = app.get("/openapi.yaml").await;
    assert_eq!(yaml.status(), 200);
    assert!(yaml.text().await.expect("text").contains("openapi:"));
    let docs = app.get("/docs").await;
    assert_eq!(docs.status(), 200);
    assert!(
        docs.text()
            .await
            .expect("text")
            .to_lowercase()
            .contains("swagger")
    );
}

#[tokio::test]
async fn every_time_in_an_answer_is_a_documented_rfc3339_date_time() {
    let app = spawn_app().await;
    let doc: Value = app.get("/openapi.json").await.json().await.expect("json");
    let mut times = Vec::new();
    for (name, schema) in doc["components"]["schemas"].as_object().expect("schemas") {
        for (field, property) in schema["properties"].as_object().into_iter().flatten() {
            if field.ends_with("_at") || field.ends_with("_time") || field == "timestamp" {
                assert_eq!(
                    (property["type"].as_str(), property["format"].as_str()),
                    (Some("string"), Some("date-time")),
                    "{name}.{field}"
                );
                times.push(format!("{name}.{field}"));
            }
        }
    }
    assert!(times.len() >= 8, "{times:?}");

    // And what the answers carry parses as such.
    let info: Value = app.get("/api/v1/info").await.json().await.expect("json");
    for field in ["start_time", "build_time"] {
        let text = info[field].as_str().expect("a time");
        assert!(
            time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
                .is_ok(),
            "{field}: {text}"
        );
    }
}
