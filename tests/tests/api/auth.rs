//! The auth module over HTTP: tokens, sessions, refresh rotation, roles, rate limits.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::Method;
use serde_json::{Value, json};

use crate::helpers::Accounts as _;
use crate::helpers::{
    ADMIN_EMAIL, ADMIN_PASSWORD, TestApp, admin, assert_problem, spawn_app, spawn_app_with,
    test_config,
};

fn secret() -> String {
    let section: Value = test_config().module_section("auth").expect("auth section");
    section["jwt_secret"]
        .as_str()
        .expect("test secret")
        .to_owned()
}

fn claims_of(token: &str) -> Value {
    let payload = token.split('.').nth(1).expect("payload");
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).expect("base64")).expect("json")
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

async fn status_with(app: &TestApp, token: &str) -> reqwest::Response {
    app.authed(Method::GET, "/api/v1/users/me", token)
        .send()
        .await
        .expect("request")
}

#[tokio::test]
async fn expired_forged_and_wrong_algorithm_tokens_are_rejected() {
    let app = spawn_app().await;
    let (_, token) = app.signed_up("holder@example.com").await;
    assert_eq!(status_with(&app, &token).await.status(), 200);
    let claims = claims_of(&token);
    let secret = secret();
    let sign = |alg: Algorithm, claims: &Value, key: &[u8]| {
        jsonwebtoken::encode(&Header::new(alg), claims, &EncodingKey::from_secret(key))
            .expect("sign")
    };

    let mut expired = claims.clone();
    expired["iat"] = json!(now() - 3600);
    expired["exp"] = json!(now() - 600);
    let mut other_issuer = claims.clone();
    other_issuer["iss"] = json!("someone-else");
    let header_none = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
    let header_rs = URL_SAFE_NO_PAD.encode(br#"{"alg":"RS256","typ":"JWT"}"#);
    let body = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).expect("json"));
    let valid_signature = token.split('.').nth(2).expect("signature");

    for (case, bad) in [
        (
            "expired",
            sign(Algorithm::HS256, &expired, secret.as_bytes()),
        ),
        (
            "forged with another secret",
            sign(
                Algorithm::HS256,
                &claims,
                b"an-attackers-secret-of-32-bytes-or-more",
            ),
        ),
        (
            "HS512 with the right secret",
            sign(Algorithm::HS512, &claims, secret.as_bytes()),
        ),
        (
            "another issuer",
            sign(Algorithm::HS256, &other_issuer, secret.as_bytes()),
        ),
        ("alg none", format!("{header_none}.{body}.")),
        (
            "RS256 header, HMAC signature",
            format!("{header_rs}.{body}.{valid_signature}"),
        ),
        ("garbage", "not.a.token".to_owned()),
    ] {
        let problem = assert_problem(status_with(&app, &bad).await, 401).await;
        assert_eq!(
            problem["type"], "urn:trellis:problem:unauthorized",
            "{case}"
        );
    }
    let missing = app.get("/api/v1/users/me").await;
    assert!(missing.headers().contains_key("www-authenticate"));
    assert_problem(missing, 401).await;
}

#[tokio::test]
async fn logout_revokes_at_once_and_logout_all_ends_every_session() {
    let app = spawn_app().await;
    let (_, first) = app.signed_up("sessions@example.com").await;
    let second = app
        .login("sessions@example.com", "correct horse battery")
        .await["access_token"]
        .as_str()
        .expect("t")
        .to_owned();
    let third = app
        .login("sessions@example.com", "correct horse battery")
        .await["access_token"]
        .as_str()
        .expect("t")
        .to_owned();

    let list: Value = app.get_json_authed("/api/v1/auth/sessions", &first).await;
    let sessions = list["sessions"].as_array().expect("sessions");
    assert_eq!(sessions.len(), 3);
    assert_eq!(sessions.iter().filter(|s| s["current"] == true).count(), 1);

    assert_eq!(
        app.authed(Method::POST, "/api/v1/auth/logout", &first)
            .send()
            .await
            .expect("logout")
            .status(),
        204
    );
    let problem = assert_problem(status_with(&app, &first).await, 401).await;
    assert_eq!(problem["detail"], "the session has ended; log in again");
    assert_eq!(
        status_with(&app, &second).await.status(),
        200,
        "other sessions live on"
    );

    assert_eq!(
        app.authed(Method::POST, "/api/v1/auth/logout-all", &second)
            .send()
            .await
            .expect("all")
            .status(),
        204
    );
    for token in [&second, &third] {
        assert_problem(status_with(&app, token).await, 401).await;
    }
}

#[tokio::test]
async fn refresh_rotates_and_reuse_revokes_the_session() {
    let app = spawn_app().await;
    app.register("rotate@example.com", "correct horse battery")
        .await;
    let tokens = app
        .login("rotate@example.com", "correct horse battery")
        .await;
    let refresh = |token: String| {
        let app = &app;
        async move {
            app.post_json("/api/v1/auth/refresh", &json!({"refresh_token": token}))
                .await
        }
    };
    let first_refresh = tokens["refresh_token"]
        .as_str()
        .expect("refresh")
        .to_owned();

    let rotated: Value = refresh(first_refresh.clone())
        .await
        .json()
        .await
        .expect("json");
    let second_refresh = rotated["refresh_token"]
        .as_str()
        .expect("refresh")
        .to_owned();
    let access = rotated["access_token"].as_str().expect("access").to_owned();
    assert_ne!(second_refresh, first_refresh, "rotated");
    assert_eq!(rotated["session_id"], tokens["session_id"], "same session");
    assert_eq!(status_with(&app, &access).await.status(), 200);

    // The first refresh token again: it leaked. The whole session ends.
    assert_problem(refresh(first_refresh).await, 401).await;
    assert_problem(refresh(second_refresh).await, 401).await;
    assert_problem(status_with(&app, &access).await, 401).await;
    assert_problem(refresh("made-up".into()).await, 401).await;
}

#[tokio::test]
async fn login_answers_the_same_for_unknown_email_and_wrong_password() {
    let app = spawn_app().await;
    app.register("known@example.com", "correct horse battery")
        .await;
    let mut bodies = Vec::new();
    let mut timings: [Vec<Duration>; 2] = [Vec::new(), Vec::new()];
    for round in 0..4 {
        for (i, email) in ["known@example.com", "unknown@example.com"]
            .into_iter()
            .enumerate()
        {
            let started = Instant::now();
            let response = app
                .try_login(email, &format!("wrong password {round}"))
                .await;
            timings[i].push(started.elapsed());
            let mut problem = assert_problem(response, 401).await;
            problem["request_id"] = Value::Null;
            bodies.push(problem);
        }
    }
    assert!(
        bodies.windows(2).all(|w| w[0] == w[1]),
        "identical answers: {bodies:?}"
    );
    let median = |v: &mut Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let (known, unknown) = (median(&mut timings[0]), median(&mut timings[1]));
    // Both pay for one argon2id verification; skipping it would make unknown e-mails
    // orders of magnitude faster.
    assert!(
        unknown * 4 >= known,
        "unknown {unknown:?} vs wrong password {known:?}"
    );
}

#[tokio::test]
async fn login_rate_limit_trips_and_recovers() {
    let app = spawn_app_with(&[
        ("modules.auth.login_failures_per_pair", json!(3)),
        ("modules.auth.login_window_ms", json!(2000)),
    ])
    .await;
    app.register("limited@example.com", "correct horse battery")
        .await;
    for _ in 0..3 {
        assert_problem(app.try_login("limited@example.com", "wrong").await, 401).await;
    }
    let limited = app
        .try_login("LIMITED@example.com", "correct horse battery")
        .await;
    assert_eq!(limited.headers()["retry-after"], "2");
    assert_eq!(
        assert_problem(limited, 429).await["type"],
        "urn:trellis:problem:rate-limited"
    );
    tokio::time::sleep(Duration::from_millis(2300)).await;
    assert_eq!(
        app.try_login("limited@example.com", "correct horse battery")
            .await
            .status(),
        200
    );
}

#[tokio::test]
async fn roles_are_granted_by_the_super_administrator_and_apply_at_once() {
    let app = spawn_app_with(&admin()).await;
    let root = app.login(ADMIN_EMAIL, ADMIN_PASSWORD).await["access_token"]
        .as_str()
        .expect("t")
        .to_owned();
    let (id, token) = app.signed_up("promoted@example.com").await;

    assert_problem(
        app.authed(Method::GET, "/api/v1/users", &token)
            .send()
            .await
            .expect("list"),
        403,
    )
    .await;
    let denied = app
        .authed(
            Method::PUT,
            &format!("/api/v1/auth/users/{id}/roles/ADMIN"),
            &token,
        )
        .send()
        .await
        .expect("grant");
    assert_problem(denied, 403).await;

    let granted = app
        .authed(
            Method::PUT,
            &format!("/api/v1/auth/users/{id}/roles/ADMIN"),
            &root,
        )
        .send()
        .await
        .expect("grant");
    assert_eq!(granted.status(), 204);
    assert_eq!(
        app.authed(Method::GET, "/api/v1/users", &token)
            .send()
            .await
            .expect("list")
            .status(),
        200,
        "the live session sees the new role"
    );
    let roles: Value = app
        .authed(
            Method::GET,
            &format!("/api/v1/auth/users/{id}/roles"),
            &token,
        )
        .send()
        .await
        .expect("roles")
        .json()
        .await
        .expect("json");
    assert_eq!(roles["roles"], json!(["ADMIN"]));

    let unknown_role = app
        .authed(
            Method::PUT,
            &format!("/api/v1/auth/users/{id}/roles/WIZARD"),
            &root,
        )
        .send()
        .await
        .expect("grant");
    assert_problem(unknown_role, 404).await;
    let revoked = app
        .authed(
            Method::DELETE,
            &format!("/api/v1/auth/users/{id}/roles/ADMIN"),
            &root,
        )
        .send()
        .await
        .expect("revoke");
    assert_eq!(revoked.status(), 204);
    assert_problem(
        app.authed(Method::GET, "/api/v1/users", &token)
            .send()
            .await
            .expect("list"),
        403,
    )
    .await;

    let listed: Value = app.get_json_authed("/api/v1/auth/roles", &root).await;
    let names: Vec<&str> = listed["roles"]
        .as_array()
        .expect("roles")
        .iter()
        .filter_map(|r| r["name"].as_str())
        .collect();
    assert_eq!(names, ["ADMIN", "SUPER_ADMIN"]);
}
