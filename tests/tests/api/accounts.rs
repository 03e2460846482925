//! The user module over HTTP: the account lifecycle, who may see whom, listing.

use reqwest::Method;
use serde_json::{Value, json};

use crate::helpers::Accounts as _;
use crate::helpers::{
    ADMIN_EMAIL, ADMIN_PASSWORD, admin, assert_problem, spawn_app, spawn_app_with, violations,
};

#[tokio::test]
async fn the_whole_account_lifecycle() {
    let app = spawn_app().await;
    let response = app
        .post_json(
            "/api/v1/users",
            &json!({"email": "Ada@Example.com", "password": "analytical engine",
                    "first_name": "Ada", "last_name": "Lovelace"}),
        )
        .await;
    assert_eq!(response.status(), 201);
    let location = response.headers()["location"]
        .to_str()
        .expect("ascii")
        .to_owned();
    let created: Value = response.json().await.expect("json");
    let id = created["id"].as_str().expect("id").to_owned();
    assert_eq!(location, format!("/api/v1/users/{id}"));
    assert_eq!(
        created["email"], "ada@example.com",
        "e-mails are stored lower-case"
    );
    assert!(created.get("password").is_none() && created.get("password_hash").is_none());

    let duplicate = app
        .post_json(
            "/api/v1/users",
            &json!({"email": "ADA@example.com", "password": "another one!",
                    "first_name": "A", "last_name": "L"}),
        )
        .await;
    assert_eq!(
        assert_problem(duplicate, 409).await["type"],
        "urn:trellis:problem:email-taken"
    );

    let tokens = app.login("ada@EXAMPLE.com", "analytical engine").await;
    let token = tokens["access_token"].as_str().expect("token");
    let me: Value = app.get_json_authed("/api/v1/users/me", token).await;
    assert_eq!(me["id"], id.as_str());

    let patched: Value = app
        .authed(Method::PATCH, &location, token)
        .json(&json!({"first_name": "Augusta"}))
        .send()
        .await
        .expect("patch")
        .json()
        .await
        .expect("json");
    assert_eq!(
        (
            patched["first_name"].as_str(),
            patched["last_name"].as_str()
        ),
        (Some("Augusta"), Some("Lovelace"))
    );
    // The account read above was cached; the change removed it.
    let me: Value = app.get_json_authed("/api/v1/users/me", token).await;
    assert_eq!(me["first_name"], "Augusta");

    let details = json!({"utm_source": "newsletter", "utm_campaign": "launch", "utm_medium": "email", "utm_content": "hero"});
    let put = app
        .authed(Method::PUT, &format!("{location}/details"), token)
        .json(&details)
        .send()
        .await
        .expect("put");
    assert_eq!(put.status(), 200);
    let got: Value = app
        .get_json_authed(&format!("{location}/details"), token)
        .await;
    assert_eq!(got["utm_campaign"], "launch");

    let deleted = app
        .authed(Method::DELETE, &location, token)
        .send()
        .await
        .expect("delete");
    assert_eq!(deleted.status(), 204);
    let after = app
        .authed(Method::GET, "/api/v1/users/me", token)
        .send()
        .await
        .expect("me");
    assert_problem(after, 401).await;
    let relogin = app.try_login("ada@example.com", "analytical engine").await;
    assert_problem(relogin, 401).await;
    app.register("ada@example.com", "a new account now").await;
}

#[tokio::test]
async fn email_changes_recheck_uniqueness() {
    let app = spawn_app().await;
    app.register("taken@example.com", "correct horse battery")
        .await;
    let (id, token) = app.signed_up("mover@example.com").await;
    let clash = app
        .authed(Method::PATCH, &format!("/api/v1/users/{id}"), &token)
        .json(&json!({"email": "TAKEN@example.com", "current_password": "correct horse battery"}))
        .send()
        .await
        .expect("patch");
    assert_problem(clash, 409).await;
}

#[tokio::test]
async fn another_users_resources_are_not_found() {
    let app = spawn_app().await;
    let (other, _) = app.signed_up("other@example.com").await;
    let (_, token) = app.signed_up("nosy@example.com").await;
    for (method, path) in [
        (Method::GET, format!("/api/v1/users/{other}")),
        (Method::PATCH, format!("/api/v1/users/{other}")),
        (Method::DELETE, format!("/api/v1/users/{other}")),
        (Method::GET, format!("/api/v1/users/{other}/details")),
        (Method::PUT, format!("/api/v1/users/{other}/details")),
        (Method::GET, "/api/v1/users/does-not-exist".to_owned()),
    ] {
        let response = app
            .authed(method.clone(), &path, &token)
            .json(&json!({}))
            .send()
            .await
            .expect("request");
        let problem = assert_problem(response, 404).await;
        assert_eq!(
            problem["type"], "urn:trellis:problem:user-not-found",
            "{method} {path}"
        );
    }
}

#[tokio::test]
async fn listing_needs_the_permission_and_pages_with_a_cursor() {
    let app = spawn_app_with(&admin()).await;
    let (_, user_token) = app.signed_up("plain@example.com").await;
    let forbidden = app
        .authed(Method::GET, "/api/v1/users", &user_token)
        .send()
        .await
        .expect("list");
    assert_problem(forbidden, 403).await;

    for i in 0..5 {
        app.register(&format!("page{i}@example.com"), "correct horse battery")
            .await;
    }
    let admin_token = app.login(ADMIN_EMAIL, ADMIN_PASSWORD).await["access_token"]
        .as_str()
        .expect("token")
        .to_owned();
    let mut seen = Vec::new();
    let mut path = "/api/v1/users?email_prefix=PAGE&limit=2".to_owned();
    loop {
        let page: Value = app.get_json_authed(&path, &admin_token).await;
        let users = page["users"].as_array().expect("users");
        assert!(users.len() <= 2);
        seen.extend(
            users
                .iter()
                .map(|u| u["email"].as_str().expect("email").to_owned()),
        );
        match page["next_cursor"].as_str() {
            Some(cursor) => {
                path = format!("/api/v1/users?email_prefix=page&limit=2&cursor={cursor}")
            }
            None => break,
        }
    }
    let expected: Vec<String> = (0..5).map(|i| format!("page{i}@example.com")).collect();
    assert_eq!(seen, expected);

    let too_big = app
        .authed(Method::GET, "/api/v1/users?limit=1000", &admin_token)
        .send()
        .await
        .expect("list");
    let problem = assert_problem(too_big, 400).await;
    assert_eq!(violations(&problem), [("parameter".into(), "limit".into())]);
}

#[tokio::test]
async fn malformed_registrations_name_each_field() {
    let app = spawn_app().await;
    for (case, body, fields) in [
        (
            "bad e-mail",
            json!({"email": "not-an-email", "password": "correct horse", "first_name": "A", "last_name": "B"}),
            vec!["/email"],
        ),
        (
            "short password",
            json!({"email": "a@b.co", "password": "short", "first_name": "A", "last_name": "B"}),
            vec!["/password"],
        ),
        (
            "missing names",
            json!({"email": "a@b.co", "password": "correct horse"}),
            vec!["/first_name", "/last_name"],
        ),
        (
            "wrong type",
            json!({"email": "a@b.co", "password": 12345678, "first_name": "A", "last_name": "B"}),
            vec!["/password"],
        ),
        (
            "unknown field",
            json!({"email": "a@b.co", "password": "correct horse", "first_name": "A", "last_name": "B", "admin": true}),
            vec!["/admin"],
        ),
    ] {
        let response = app.post_json("/api/v1/users", &body).await;
        let problem = assert_problem(response, 400).await;
        let named: Vec<String> = violations(&problem).into_iter().map(|(_, f)| f).collect();
        assert_eq!(named, fields, "{case}: {problem}");
    }
}
