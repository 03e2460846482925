//! The `events` module through the test kit: the registry's publications as an
//! administrator sees them, and who may not see them. Accounts and tokens come from the
//! user and auth modules; a captured event gives the registry a handler to publish for.

use poem::http::Method;
use serde_json::{Value, json};
use trellis_auth as _;
use trellis_core::contracts::UserRegistered;
use trellis_events as _;
use trellis_testkit::{TestApp, TestAppBuilder};
use trellis_user as _;

const PUBLICATIONS: &str = "/api/v1/events/publications";
const ADMIN: &str = "root@example.com";
const PASSWORD: &str = "correct horse battery";

fn with_admin() -> TestAppBuilder {
    TestApp::builder()
        .set("modules.auth.bootstrap_admin_email", ADMIN)
        .set("modules.auth.bootstrap_admin_password", PASSWORD)
}

async fn register(app: &TestApp, email: &str) -> Value {
    app.call(Method::POST, "/api/v1/users")
        .json(&json!({
            "email": email, "password": PASSWORD,
            "first_name": "Test", "last_name": "User"
        }))
        .send()
        .await
        .expect_json(201)
}

async fn token(app: &TestApp, email: &str) -> String {
    let tokens: Value = app
        .call(Method::POST, "/api/v1/auth/login")
        .json(&json!({"email": email, "password": PASSWORD}))
        .send()
        .await
        .expect_json(200);
    tokens["access_token"].as_str().expect("a token").to_owned()
}

#[tokio::test]
async fn publications_need_the_events_manage_permission() {
    let app = with_admin().spawn().await;
    let anonymous = app
        .call(Method::GET, PUBLICATIONS)
        .send()
        .await
        .problem(401);
    assert_eq!(anonymous.kind, "unauthorized");
    register(&app, "someone@example.com").await;
    let someone = token(&app, "someone@example.com").await;
    for (method, path) in [
        (Method::GET, PUBLICATIONS.to_owned()),
        (Method::POST, format!("{PUBLICATIONS}/resubmit-failed")),
        (Method::POST, format!("{PUBLICATIONS}/any/resubmit")),
    ] {
        let problem = app
            .call(method, &path)
            .bearer(&someone)
            .send()
            .await
            .problem(403);
        assert!(
            problem.detail.contains("events:manage"),
            "{path}: {problem:?}"
        );
    }
}

#[tokio::test]
async fn an_administrator_pages_through_the_publications_of_committed_events() {
    let mut builder = with_admin();
    let captured = builder.capture_events::<UserRegistered>();
    let app = builder.spawn().await;
    let mut ids = Vec::new();
    for n in 0..3 {
        let user = register(&app, &format!("user{n}@example.com")).await;
        ids.push(user["id"].as_str().expect("id").to_owned());
    }
    // The bootstrap account's registration is captured too.
    assert_eq!(captured.wait_for(4).await.len(), 4);
    let root = token(&app, ADMIN).await;

    let first: Value = app
        .call(
            Method::GET,
            &format!("{PUBLICATIONS}?status=completed&limit=3"),
        )
        .bearer(&root)
        .send()
        .await
        .expect_json(200);
    let cursor = first["next_cursor"].as_str().expect("a second page");
    let second: Value = app
        .call(
            Method::GET,
            &format!("{PUBLICATIONS}?status=completed&cursor={cursor}"),
        )
        .bearer(&root)
        .send()
        .await
        .expect_json(200);
    assert!(second.get("next_cursor").is_none(), "{second}");
    let all: Vec<&Value> = first["publications"]
        .as_array()
        .into_iter()
        .chain(second["publications"].as_array())
        .flatten()
        .collect();
    assert_eq!(all.len(), 4, "{first} {second}");
    let publication = all[3];
    assert_eq!(publication["event"], "user.registered");
    assert_eq!(publication["module"], "observer");
    assert_eq!(publication["status"], "completed");
    assert_eq!(publication["attempts"], 1);
    assert_eq!(publication["payload"]["user_id"], ids[2].as_str());

    let none: Value = app
        .call(Method::GET, &format!("{PUBLICATIONS}?status=failed"))
        .bearer(&root)
        .send()
        .await
        .expect_json(200);
    assert_eq!(none["publications"], json!([]));
    let id = publication["id"].as_str().expect("id");
    let problem = app
        .call(Method::POST, &format!("{PUBLICATIONS}/{id}/resubmit"))
        .bearer(&root)
        .send()
        .await
        .problem(409);
    assert_eq!(problem.kind, "publication-not-failed");
    app.call(Method::POST, &format!("{PUBLICATIONS}/no-such-id/resubmit"))
        .bearer(&root)
        .send()
        .await
        .problem(404);
    let invalid = app
        .call(Method::GET, &format!("{PUBLICATIONS}?status=lost"))
        .bearer(&root)
        .send()
        .await
        .problem(400);
    assert_eq!(invalid.fields(), [("parameter", "status")]);
}
