//! The `events` module through the test kit: the registry's publications as an
//! administrator sees them, and who may not see them. Accounts and tokens come from the
//! user and auth modules; a captured event gives the registry a handler to publish for.

use std::time::Duration;

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

/// The completed publications, page by page (three to a page), and how many pages.
async fn completed_publications(app: &TestApp, token: &str) -> (Vec<Value>, usize) {
    let (mut all, mut pages, mut after) = (Vec::new(), 0, String::new());
    loop {
        let page: Value = app
            .call(
                Method::GET,
                &format!("{PUBLICATIONS}?status=completed&limit=3{after}"),
            )
            .bearer(token)
            .send()
            .await
            .expect_json(200);
        pages += 1;
        all.extend(
            page["publications"]
                .as_array()
                .into_iter()
                .flatten()
                .cloned(),
        );
        match page["next_cursor"].as_str() {
            Some(next) => after = format!("&cursor={next}"),
            None => return (all, pages),
        }
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

    // Each handler the test server links has a publication per event: the observer's,
    // and bi's when the build links bi too. The observer's four, once each has completed,
    // read three at a time.
    let mut observed = Vec::new();
    for _ in 0..50 {
        let (completed, pages) = completed_publications(&app, &root).await;
        assert!(pages >= 2, "four or more in pages of three");
        observed = completed
            .into_iter()
            .filter(|p| p["module"] == "observer")
            .collect();
        if observed.len() == 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(observed.len(), 4, "{observed:?}");
    let publication = &observed[3];
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
