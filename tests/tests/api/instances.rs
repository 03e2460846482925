//! Several instances on one PostgreSQL: a logout, an account deletion or a role change
//! made through one instance is seen by the others on their very next request, whether
//! they share Redis (whose client-side caching invalidates each instance's copy) or each
//! keep an in-process cache (whose removals are announced through PostgreSQL).

use reqwest::Method;
use serde_json::{Value, json};

use crate::helpers::Accounts as _;
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

#[tokio::test]
async fn with_redis_an_address_spends_one_bi_budget_over_every_instance() {
    if std::env::var("TEST_REDIS_URL").is_err() {
        eprintln!("skipped: needs TEST_REDIS_URL (scripts/test.sh)");
        return;
    }
    let limits = [
        ("modules.bi.max_batch", json!(50)),
        ("modules.bi.rate_per_address", json!(1)),
        ("modules.bi.burst_per_address", json!(100)),
    ];
    let one = spawn_app_on(TestStorage::new().await, &limits).await;
    let other = spawn_app_on(one.storage.sharing().await, &limits).await;
    let batch = json!(
        (0..50)
            .map(|i| json!({"name": "shared.budget", "properties": {"i": i}}))
            .collect::<Vec<_>>()
    );
    // The burst is two batches: one through each instance, then none through either.
    assert_eq!(
        one.post_json("/api/v1/bi/events", &batch).await.status(),
        202
    );
    assert_eq!(
        other.post_json("/api/v1/bi/events", &batch).await.status(),
        202
    );
    assert_eq!(
        one.post_json("/api/v1/bi/events", &batch).await.status(),
        429
    );
    assert_eq!(
        other.post_json("/api/v1/bi/events", &batch).await.status(),
        429
    );
}
