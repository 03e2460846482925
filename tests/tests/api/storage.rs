//! Storage through the module contract: the probe's own table, migrations and cache, on
//! whichever backend the run selected (SQLite + in-process cache, or PostgreSQL + Redis).

use serde_json::{Value, json};
use sqlx::Row as _;

use crate::helpers::{TestApp, assert_problem, spawn_app, spawn_app_on};

async fn create_note(app: &TestApp, text: &str) -> Value {
    let response = app
        .post_json("/api/v1/probe/notes", &json!({ "text": text }))
        .await;
    assert_eq!(response.status(), 201, "create {text}");
    response.json().await.expect("json")
}

#[tokio::test]
async fn notes_are_stored_read_through_the_cache_and_unique() {
    let app = spawn_app().await;
    let note = create_note(&app, "hello").await;
    let id = note["id"].as_i64().expect("id");
    assert_eq!(note["tag"], "none", "the second migration ran");

    let first: Value = app
        .get(&format!("/api/v1/probe/notes/{id}"))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(
        (first["text"].as_str(), first["cached"].as_bool()),
        (Some("hello"), Some(false))
    );
    let second: Value = app
        .get(&format!("/api/v1/probe/notes/{id}"))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(
        second["cached"], true,
        "the second read comes from the cache"
    );

    let duplicate = app
        .post_json("/api/v1/probe/notes", &json!({"text": "hello"}))
        .await;
    let problem = assert_problem(duplicate, 409).await;
    assert_eq!(problem["type"], "urn:trellis:problem:conflict");
    assert_problem(app.get("/api/v1/probe/notes/999999").await, 404).await;
}

#[tokio::test]
async fn migrations_are_recorded_per_module_and_not_rerun_on_restart() {
    let app = spawn_app().await;
    let note = create_note(&app, "survives a restart").await;
    let storage = app.stop_keeping_storage().await;

    let app = spawn_app_on(storage, &[]).await;
    let id = note["id"].as_i64().expect("id");
    let again: Value = app
        .get(&format!("/api/v1/probe/notes/{id}"))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(again["text"], "survives a restart");

    let mut conn = app.storage.connection().await;
    let rows = sqlx::query(
        "SELECT module, version FROM trellis_migrations \
         WHERE module IN ('probe', 'user') ORDER BY module, version",
    )
    .fetch_all(&mut conn)
    .await
    .expect("migrations table");
    let applied: Vec<(String, i64)> = rows
        .iter()
        .map(|r| (r.get::<String, _>(0), r.get::<i64, _>(1)))
        .collect();
    // Both modules have a version 1: recorded per module, they do not collide.
    let expected = [
        ("probe", 1),
        ("probe", 2),
        ("probe", 3),
        ("probe", 4),
        ("user", 1),
    ]
    .map(|(m, v)| (m.to_owned(), v));
    assert_eq!(applied, expected);
}

#[tokio::test]
async fn storage_metrics_are_exported() {
    let app = spawn_app().await;
    let note = create_note(&app, "measured").await;
    let id = note["id"].as_i64().expect("id");
    for _ in 0..2 {
        app.get(&format!("/api/v1/probe/notes/{id}")).await;
    }
    let text = app.get("/metrics").await.text().await.expect("text");
    for needle in [
        r#"db_query_duration_seconds_bucket{module="probe",operation="insert_note""#,
        r#"db_query_duration_seconds_count{module="probe",operation="find_note"}"#,
        r#"db_pool_connections{state="idle"}"#,
        r#"db_pool_connections{state="in_use"}"#,
        r#"cache_hits_total{module="probe"}"#,
        r#"cache_misses_total{module="probe"}"#,
        "# TYPE cache_up gauge",
    ] {
        assert!(text.contains(needle), "missing {needle}");
    }
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let name = rest.split(' ').next().unwrap_or_default();
            assert!(
                text.contains(&format!("# HELP {name} ")),
                "{name} has no HELP"
            );
        }
    }
}

#[tokio::test]
async fn an_instance_waits_out_another_instances_migrations_past_the_statement_timeout() {
    let storage = crate::helpers::TestStorage::new().await;
    let on_postgres = storage
        .settings
        .iter()
        .any(|(key, value)| *key == "database.url" && value.starts_with("postgres"));
    if !on_postgres {
        return; // PostgreSQL only: SQLite has no advisory lock to wait on.
    }
    // Another instance is migrating: it holds the lock for longer than the statement
    // timeout the waiting instance runs with.
    let mut holder = storage.connection().await;
    sqlx::query("SELECT pg_advisory_lock(32776877234743667)")
        .execute(&mut holder)
        .await
        .expect("lock");
    let release = tokio::spawn(async move {
        tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
        sqlx::query("SELECT pg_advisory_unlock(32776877234743667)")
            .execute(&mut holder)
            .await
            .expect("unlock");
        holder
    });
    let app = spawn_app_on(storage, &[("database.statement_timeout_ms", json!(300))]).await;
    assert_eq!(app.get("/healthz").await.status(), 200);
    drop(release.await.expect("released"));
}

#[tokio::test]
async fn a_second_instance_on_the_same_event_folder_refuses_to_start_naming_the_key() {
    let app = spawn_app().await;
    let mut config = crate::helpers::test_config();
    for (key, value) in &app.storage.settings {
        config = config.set(key, value).expect("setting applies");
    }
    let refused = match trellis_server::Application::build(config).await {
        Ok(_) => panic!("a second instance started on the same event folder"),
        Err(error) => format!("{error:#}"),
    };
    assert!(refused.contains("`mq.file.directory`"), "{refused}");
    assert!(refused.contains("another running instance"), "{refused}");
    // The first one is unaffected.
    assert_eq!(app.get("/healthz").await.status(), 200);
}
