//! Several instances on one PostgreSQL: a logout, an account deletion or a role change
//! made through one instance is seen by the others on their very next request, whether
//! they share Redis (whose client-side caching invalidates each instance's copy) or each
//! keep an in-process cache (whose removals are announced through PostgreSQL).

use reqwest::Method;
use serde_json::{Value, json};

use crate::helpers::{ADMIN_EMAIL, ADMIN_PASSWORD, TestApp, TestStorage, admin, spawn_app_on};

fn token(tokens: &Value) -> String {
    tokens["access_token"].as_str().expect("token").to_owned()
}

async fn status(app: &TestApp, method: Method, path: &str, token: &str) -> u16 {
    app.authed(method, path, token)
        .send()
        .await
        .expect("request")
        .status()
        .as_u16()
}

/// Two instances on shared storage, each with `overrides`.
async fn pair(overrides: &[(&str, Value)]) -> (TestApp, TestApp) {
    let mut settings = admin();
    settings.extend(overrides.iter().cloned());
    let first = spawn_app_on(TestStorage::new().await, &settings).await;
    let second = spawn_app_on(first.storage.sharing().await, &settings).await;
    (first, second)
}

async fn changes_on_one_instance_are_seen_by_the_other_at_once(overrides: &[(&str, Value)]) {
    let (one, other) = pair(overrides).await;
    let root = token(&one.login(ADMIN_EMAIL, ADMIN_PASSWORD).await);

    // A logout.
    let (_, leaving) = one.signed_up("logout@example.com").await;
    assert_eq!(
        status(&other, Method::GET, "/api/v1/users/me", &leaving).await,
        200
    );
    assert_eq!(
        status(&one, Method::POST, "/api/v1/auth/logout", &leaving).await,
        204
    );
    assert_eq!(
        status(&other, Method::GET, "/api/v1/users/me", &leaving).await,
        401
    );

    // An account deletion.
    let (id, deleted) = one.signed_up("deleted@example.com").await;
    assert_eq!(
        status(&other, Method::GET, "/api/v1/users/me", &deleted).await,
        200
    );
    let path = format!("/api/v1/users/{id}");
    assert_eq!(status(&one, Method::DELETE, &path, &deleted).await, 204);
    assert_eq!(
        status(&other, Method::GET, "/api/v1/users/me", &deleted).await,
        401
    );

    // A revoked role.
    let (id, demoted) = one.signed_up("demoted@example.com").await;
    let role = format!("/api/v1/auth/users/{id}/roles/ADMIN");
    assert_eq!(status(&one, Method::PUT, &role, &root).await, 204);
    assert_eq!(
        status(&other, Method::GET, "/api/v1/users", &demoted).await,
        200
    );
    assert_eq!(status(&one, Method::DELETE, &role, &root).await, 204);
    assert_eq!(
        status(&other, Method::GET, "/api/v1/users", &demoted).await,
        403
    );
}

#[tokio::test]
async fn with_redis_a_change_on_one_instance_is_seen_by_another_at_once() {
    if std::env::var("TEST_POSTGRES_URL").is_err() || std::env::var("TEST_REDIS_URL").is_err() {
        eprintln!("skipped: needs TEST_POSTGRES_URL and TEST_REDIS_URL (scripts/test.sh)");
        return;
    }
    changes_on_one_instance_are_seen_by_the_other_at_once(&[]).await;
}

#[tokio::test]
async fn with_in_process_caches_a_change_on_one_instance_is_seen_by_another_at_once() {
    if std::env::var("TEST_POSTGRES_URL").is_err() {
        eprintln!("skipped: needs TEST_POSTGRES_URL (scripts/test.sh)");
        return;
    }
    changes_on_one_instance_are_seen_by_the_other_at_once(&[("cache.url", json!(""))]).await;
}
