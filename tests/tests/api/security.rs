//! Attacks on accounts and tokens, each named by what it tries: squatting the bootstrap
//! administrator, signing with a published secret, using a deleted account, climbing the
//! role hierarchy, locking an owner out, exhausting password hashing.

use reqwest::Method;
use serde_json::{Value, json};

use crate::helpers::Accounts as _;
use crate::helpers::{
    ADMIN_EMAIL, ADMIN_PASSWORD, TestApp, TestStorage, admin, assert_problem, spawn_app,
    spawn_app_on, spawn_app_with, test_config,
};

const PASSWORD: &str = "correct horse battery";

fn token(tokens: &Value) -> String {
    tokens["access_token"]
        .as_str()
        .expect("access token")
        .to_owned()
}

async fn roles_of(app: &TestApp, token: &str, id: &str) -> Value {
    app.get_json_authed(&format!("/api/v1/auth/users/{id}/roles"), token)
        .await["roles"]
        .clone()
}

async fn me_status(app: &TestApp, token: &str) -> u16 {
    app.authed(Method::GET, "/api/v1/users/me", token)
        .send()
        .await
        .expect("request")
        .status()
        .as_u16()
}

/// The key id in a token's header.
fn kid(token: &str) -> Option<String> {
    jsonwebtoken::decode_header(token).expect("a JWT").kid
}

#[tokio::test]
async fn registering_the_bootstrap_email_first_does_not_make_a_super_admin() {
    let app = spawn_app().await;
    let squatter = app.register(ADMIN_EMAIL, "squatters-own-password").await;
    let storage = app.stop_keeping_storage().await;

    // The operator configures the address and restarts: the squatter's password is not
    // the configured one, so nothing is granted, and start-up goes on.
    let app = spawn_app_on(storage, &admin()).await;
    let tokens = app.login(ADMIN_EMAIL, "squatters-own-password").await;
    assert_eq!(roles_of(&app, &token(&tokens), &squatter).await, json!([]));
    assert_problem(
        app.authed(Method::GET, "/api/v1/users", &token(&tokens))
            .send()
            .await
            .expect("request"),
        403,
    )
    .await;
    assert_problem(app.try_login(ADMIN_EMAIL, ADMIN_PASSWORD).await, 401).await;
}

#[tokio::test]
async fn the_bootstrap_admin_is_created_once_when_instances_start_together() {
    // Three instances at the same moment on an empty database: each migration is applied
    // once, the bootstrap account is created once, and all three become ready.
    let storage = TestStorage::new().await;
    let (second, third) = (storage.sharing().await, storage.sharing().await);
    let overrides = admin();
    let (a, b, c) = tokio::join!(
        spawn_app_on(storage, &overrides),
        spawn_app_on(second, &overrides),
        spawn_app_on(third, &overrides)
    );
    for app in [&a, &b, &c] {
        let tokens = app.login(ADMIN_EMAIL, ADMIN_PASSWORD).await;
        let me = app
            .get_json_authed("/api/v1/users/me", &token(&tokens))
            .await;
        let id = me["id"].as_str().expect("id");
        assert_eq!(
            roles_of(app, &token(&tokens), id).await,
            json!(["SUPER_ADMIN"])
        );
    }
    let listed = a
        .get_json_authed(
            "/api/v1/users?email_prefix=root@",
            &token(&a.login(ADMIN_EMAIL, ADMIN_PASSWORD).await),
        )
        .await;
    assert_eq!(
        listed["users"].as_array().map(Vec::len),
        Some(1),
        "{listed}"
    );
}

#[tokio::test]
async fn generated_secret_survives_restart() {
    let app = spawn_app_with(&[("modules.auth.jwt_secret", json!(""))]).await;
    app.register("keeper@example.com", PASSWORD).await;
    let before = token(&app.login("keeper@example.com", PASSWORD).await);
    let storage = app.stop_keeping_storage().await;

    let twin = storage.sharing().await;
    let generated = [("modules.auth.jwt_secret", json!(""))];
    let app = spawn_app_on(storage, &generated).await;
    assert_eq!(
        me_status(&app, &before).await,
        200,
        "a restart keeps the key"
    );
    let second = spawn_app_on(twin, &generated).await;
    assert_eq!(
        me_status(&second, &before).await,
        200,
        "another instance on the database finds the same key"
    );
    let elsewhere = spawn_app_with(&generated).await;
    let (_, theirs) = elsewhere.signed_up("elsewhere@example.com").await;
    assert_ne!(kid(&before), kid(&theirs), "another database, another key");
    assert_eq!(me_status(&elsewhere, &before).await, 401);
}

#[tokio::test]
async fn rotated_key_still_verifies_until_removed() {
    let (old, new) = (
        "0Jx3S9vQm7Lk2Wc8Rz5Hn4Pt6Yb1Fd0Ga7Ue3Io9Kq2M=",
        "Vb7Nc2Xz9Lq4Wm1Ks8Jd3Hf6Gt0Ry5Ue2Ia7Op4Zs1Q=",
    );
    let app = spawn_app_with(&[("modules.auth.jwt_secret", json!(old))]).await;
    let (_, signed_by_old) = app.signed_up("rotor@example.com").await;
    let storage = app.stop_keeping_storage().await;

    let app = spawn_app_on(
        storage,
        &[
            ("modules.auth.jwt_secret", json!(new)),
            ("modules.auth.jwt_previous_secrets", json!([old])),
        ],
    )
    .await;
    assert_eq!(
        me_status(&app, &signed_by_old).await,
        200,
        "old key still accepted"
    );
    let signed_by_new = token(&app.login("rotor@example.com", PASSWORD).await);
    assert_ne!(
        kid(&signed_by_new),
        kid(&signed_by_old),
        "new tokens name the new key"
    );
    let storage = app.stop_keeping_storage().await;

    let app = spawn_app_on(storage, &[("modules.auth.jwt_secret", json!(new))]).await;
    assert_eq!(
        me_status(&app, &signed_by_old).await,
        401,
        "old key removed"
    );
    assert_eq!(me_status(&app, &signed_by_new).await, 200);
}

#[tokio::test]
async fn published_and_weak_secrets_stop_start_up() {
    for (secret, profile, why) in [
        (
            "dev-only-secret-change-me-before-deploying-trellis",
            "test",
            "published in Trellis's source",
        ),
        (
            "test-profile-secret-not-for-production-0123456789",
            "production",
            "`test` profile's published secret",
        ),
        (&"x".repeat(40), "test", "too few characters"),
        ("too-short-Q7#", "test", "at least 32 bytes"),
    ] {
        let storage = TestStorage::new().await;
        let mut config = test_config();
        config.profile = profile.into();
        for (key, value) in &storage.settings {
            config = config.set(key, value).expect("storage");
        }
        let config = config.set("modules.auth.jwt_secret", secret).expect("set");
        let error = trellis_server::Application::build(config)
            .await
            .err()
            .unwrap_or_else(|| panic!("{secret:?} was accepted"));
        let text = format!("{error:#}");
        assert!(
            text.contains("modules.auth.jwt_secret") && text.contains(why),
            "{secret:?}: {text}"
        );
    }
}

#[tokio::test]
async fn deleted_account_tokens_die_in_the_same_request() {
    let app = spawn_app_with(&admin()).await;
    let root = token(&app.login(ADMIN_EMAIL, ADMIN_PASSWORD).await);
    let (id, first) = app.signed_up("leaver@example.com").await;
    let granted = app
        .authed(
            Method::PUT,
            &format!("/api/v1/auth/users/{id}/roles/ADMIN"),
            &root,
        )
        .send()
        .await
        .expect("request");
    assert_eq!(granted.status(), 204);
    let second = app.login("leaver@example.com", PASSWORD).await;
    // Both sessions have been checked once, so both sit in the session cache.
    assert_eq!(me_status(&app, &first).await, 200);
    assert_eq!(me_status(&app, &token(&second)).await, 200);

    let deleted = app
        .authed(Method::DELETE, &format!("/api/v1/users/{id}"), &first)
        .send()
        .await
        .expect("request");
    assert_eq!(deleted.status(), 204);
    assert_eq!(me_status(&app, &first).await, 401);
    assert_eq!(me_status(&app, &token(&second)).await, 401);
    let refresh = app
        .post_json(
            "/api/v1/auth/refresh",
            &json!({"refresh_token": second["refresh_token"]}),
        )
        .await;
    assert_problem(refresh, 401).await;

    // A revocation that was missed (a login racing the deletion): the session row is live
    // again behind the server's back, and still the account is dead.
    let revived = app
        .storage
        .execute_sql(&format!(
            "UPDATE auth_sessions SET revoked_at = NULL WHERE user_id = '{id}'"
        ))
        .await;
    assert_eq!(revived, 2);
    assert_eq!(me_status(&app, &token(&second)).await, 401);
    assert_eq!(
        roles_of(&app, &root, &id).await,
        json!([]),
        "grants removed"
    );
}

/// The super-administrator's token, and an administrator's (id, token).
async fn root_and_admin(app: &TestApp) -> (String, String, (String, String)) {
    let root = token(&app.login(ADMIN_EMAIL, ADMIN_PASSWORD).await);
    let root_id = app.get_json_authed("/api/v1/users/me", &root).await["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let (admin_id, _) = app.signed_up("admin@example.com").await;
    let granted = app
        .authed(
            Method::PUT,
            &format!("/api/v1/auth/users/{admin_id}/roles/ADMIN"),
            &root,
        )
        .send()
        .await
        .expect("request");
    assert_eq!(granted.status(), 204);
    let admin = token(&app.login("admin@example.com", PASSWORD).await);
    (root, root_id, (admin_id, admin))
}

#[tokio::test]
async fn admin_cannot_touch_a_super_admin() {
    let app = spawn_app_with(&admin()).await;
    let (_, root_id, (_, admin)) = root_and_admin(&app).await;
    let (plain_id, _) = app.signed_up("plain@example.com").await;

    let path = format!("/api/v1/users/{root_id}");
    let attempts = [
        app.authed(Method::PATCH, &path, &admin)
            .json(&json!({"email": "mine@example.com"})),
        app.authed(Method::PUT, &format!("{path}/details"), &admin)
            .json(&json!({"utm_source": "x"})),
        app.authed(Method::DELETE, &path, &admin),
    ];
    for attempt in attempts {
        let problem = assert_problem(attempt.send().await.expect("request"), 403).await;
        assert_eq!(
            problem["type"], "urn:trellis:problem:outranked",
            "{problem}"
        );
    }
    assert_eq!(
        me_status(&app, &token(&app.login(ADMIN_EMAIL, ADMIN_PASSWORD).await)).await,
        200
    );

    // Below the super-administrator, the administrator still manages accounts.
    let changed = app
        .authed(Method::PATCH, &format!("/api/v1/users/{plain_id}"), &admin)
        .json(&json!({"first_name": "Renamed"}))
        .send()
        .await
        .expect("request");
    assert_eq!(changed.status(), 200);
}

#[tokio::test]
async fn last_super_admin_stays() {
    let app = spawn_app_with(&admin()).await;
    let (root, root_id, _) = root_and_admin(&app).await;
    let revoke = |id: &str| {
        app.authed(
            Method::DELETE,
            &format!("/api/v1/auth/users/{id}/roles/SUPER_ADMIN"),
            &root,
        )
    };

    let problem = assert_problem(revoke(&root_id).send().await.expect("request"), 409).await;
    assert!(
        problem["detail"]
            .as_str()
            .is_some_and(|d| d.contains("last super-administrator")),
        "{problem}"
    );
    let deleted = app
        .authed(Method::DELETE, &format!("/api/v1/users/{root_id}"), &root)
        .send()
        .await
        .expect("request");
    assert_problem(deleted, 409).await;
    assert_eq!(
        me_status(&app, &root).await,
        200,
        "the refused deletion rolled back"
    );
    assert_eq!(
        roles_of(&app, &root, &root_id).await,
        json!(["SUPER_ADMIN"])
    );

    // With a second super-administrator, the first may step down, and the change shows
    // on its very next request.
    let (heir_id, _) = app.signed_up("heir@example.com").await;
    let granted = app
        .authed(
            Method::PUT,
            &format!("/api/v1/auth/users/{heir_id}/roles/SUPER_ADMIN"),
            &root,
        )
        .send()
        .await
        .expect("request");
    assert_eq!(granted.status(), 204);
    assert_eq!(
        revoke(&root_id).send().await.expect("request").status(),
        204
    );
    assert_problem(
        app.authed(Method::GET, "/api/v1/users", &root)
            .send()
            .await
            .expect("request"),
        403,
    )
    .await;
}

#[tokio::test]
async fn strangers_cannot_lock_the_owner_out() {
    let app = spawn_app_with(&[
        ("modules.auth.login_failures_per_pair", json!(3)),
        ("modules.auth.login_failures_per_account", json!(1000)),
    ])
    .await;
    app.register("owner@example.com", PASSWORD).await;
    let stranger = TestApp::client_from("127.0.0.2");
    let owner = TestApp::client_from("127.0.0.3");

    for attempt in 0..20 {
        let response = app
            .try_login_with(&stranger, "owner@example.com", "guess")
            .await;
        let expected = if attempt < 3 { 401 } else { 429 };
        assert_eq!(response.status(), expected, "attempt {attempt}");
        if expected == 429 {
            assert!(response.headers().contains_key("retry-after"));
        }
    }
    let owners = app
        .try_login_with(&owner, "owner@example.com", PASSWORD)
        .await;
    assert_eq!(
        owners.status(),
        200,
        "the owner's own address has its own budget"
    );
}

#[tokio::test]
async fn a_distributed_guesser_is_slowed_but_the_owner_gets_in() {
    let app = spawn_app_with(&[
        ("modules.auth.login_failures_per_account", json!(3)),
        ("modules.auth.login_delay_max_ms", json!(60_000)),
    ])
    .await;
    app.register("target@example.com", PASSWORD).await;
    let owner = TestApp::client_from("127.0.0.3");
    assert_eq!(
        app.try_login_with(&owner, "target@example.com", PASSWORD)
            .await
            .status(),
        200
    );

    // A guesser with a fresh address for every try.
    let mut statuses = Vec::new();
    for n in 10..20 {
        let guesser = TestApp::client_from(&format!("127.0.1.{n}"));
        let response = app
            .try_login_with(&guesser, "target@example.com", "guess")
            .await;
        if response.status() == 429 {
            let wait: u64 = response.headers()["retry-after"]
                .to_str()
                .ok()
                .and_then(|s| s.parse().ok())
                .expect("Retry-After in seconds");
            assert!((1..=60).contains(&wait), "{wait}");
        }
        statuses.push(response.status().as_u16());
    }
    assert_eq!(&statuses[..3], [401, 401, 401], "{statuses:?}");
    assert!(
        statuses[3..].iter().filter(|s| **s == 429).count() >= 6,
        "past the account's ceiling, strangers wait: {statuses:?}"
    );

    // The owner, from the address they logged in from before, is not held up.
    assert_eq!(
        app.try_login_with(&owner, "target@example.com", PASSWORD)
            .await
            .status(),
        200
    );
}

#[tokio::test]
async fn successful_logins_do_not_spend_the_address_budget() {
    let app = spawn_app_with(&[
        ("modules.auth.login_failures_per_address", json!(3)),
        ("modules.auth.login_failures_per_pair", json!(3)),
    ])
    .await;
    app.register("regular@example.com", PASSWORD).await;
    for attempt in 0..8 {
        let response = app.try_login("regular@example.com", PASSWORD).await;
        assert_eq!(response.status(), 200, "login {attempt}");
    }
}

#[tokio::test]
async fn a_password_sprayer_is_stopped_per_address() {
    let app = spawn_app_with(&[("modules.auth.login_failures_per_address", json!(4))]).await;
    for n in 0..4 {
        assert_problem(
            app.try_login(&format!("u{n}@example.com"), "Summer2026!")
                .await,
            401,
        )
        .await;
    }
    assert_problem(app.try_login("u5@example.com", "Summer2026!").await, 429).await;
    let elsewhere = TestApp::client_from("127.0.0.4");
    assert_eq!(
        app.try_login_with(&elsewhere, "u6@example.com", "Summer2026!")
            .await
            .status(),
        401
    );
}

#[tokio::test]
async fn registration_and_password_checks_are_throttled_per_address() {
    let app = spawn_app_with(&[
        ("modules.user.registrations_per_address", json!(2)),
        ("modules.user.password_checks_per_address", json!(2)),
    ])
    .await;
    let (id, me) = app.signed_up("first@example.com").await;
    app.register("second@example.com", PASSWORD).await;
    let third = app
        .post_json(
            "/api/v1/users",
            &json!({"email": "third@example.com", "password": PASSWORD,
                    "first_name": "T", "last_name": "U"}),
        )
        .await;
    assert!(third.headers().contains_key("retry-after"));
    assert_problem(third, 429).await;
    let elsewhere = TestApp::client_from("127.0.0.5");
    let other = elsewhere
        .post_json_to(
            &app,
            "/api/v1/users",
            &json!({"email": "third@example.com",
            "password": PASSWORD, "first_name": "T", "last_name": "U"}),
        )
        .await;
    assert_eq!(other.status(), 201, "another address registers");

    let change = |current: &str| {
        app.authed(Method::POST, &format!("/api/v1/users/{id}/password"), &me)
            .json(&json!({"current_password": current, "new_password": "a new passphrase"}))
    };
    for _ in 0..2 {
        assert_problem(change("wrong guess").send().await.expect("request"), 403).await;
    }
    assert_problem(change(PASSWORD).send().await.expect("request"), 429).await;
}

/// POST JSON with a particular client.
trait PostJsonTo {
    async fn post_json_to(&self, app: &TestApp, path: &str, body: &Value) -> reqwest::Response;
}

impl PostJsonTo for reqwest::Client {
    async fn post_json_to(&self, app: &TestApp, path: &str, body: &Value) -> reqwest::Response {
        self.post(app.url(path))
            .json(body)
            .send()
            .await
            .expect("request")
    }
}

#[tokio::test]
async fn password_change_revokes_other_sessions() {
    let app = spawn_app().await;
    let (id, here) = app.signed_up("changer@example.com").await;
    let there = token(&app.login("changer@example.com", PASSWORD).await);
    assert_eq!(me_status(&app, &there).await, 200);

    let change = |current: &str, new: &str| {
        app.authed(Method::POST, &format!("/api/v1/users/{id}/password"), &here)
            .json(&json!({"current_password": current, "new_password": new}))
    };
    let wrong = assert_problem(
        change("not the password", "a new passphrase")
            .send()
            .await
            .expect("request"),
        403,
    )
    .await;
    assert_eq!(wrong["type"], "urn:trellis:problem:reauthentication-failed");
    assert_eq!(wrong["errors"][0]["field"], "/current_password", "{wrong}");
    let short = assert_problem(
        change(PASSWORD, "short").send().await.expect("request"),
        400,
    )
    .await;
    assert_eq!(short["errors"][0]["field"], "/new_password", "{short}");

    let changed = change(PASSWORD, "a new passphrase")
        .send()
        .await
        .expect("request");
    assert_eq!(changed.status(), 204);
    assert_eq!(
        me_status(&app, &here).await,
        200,
        "the changing session stays"
    );
    assert_eq!(
        me_status(&app, &there).await,
        401,
        "every other session ends"
    );
    assert_problem(app.try_login("changer@example.com", PASSWORD).await, 401).await;
    app.login("changer@example.com", "a new passphrase").await;

    // Nobody changes another account's password, not even knowing it.
    let (_, stranger) = app.signed_up("stranger@example.com").await;
    let theirs = app
        .authed(
            Method::POST,
            &format!("/api/v1/users/{id}/password"),
            &stranger,
        )
        .json(&json!({"current_password": "a new passphrase", "new_password": "taken over!"}))
        .send()
        .await
        .expect("request");
    assert_problem(theirs, 404).await;
}

#[tokio::test]
async fn email_change_needs_the_current_password() {
    let app = spawn_app().await;
    let (id, me) = app.signed_up("mover@example.com").await;
    let patch = |body: Value| {
        app.authed(Method::PATCH, &format!("/api/v1/users/{id}"), &me)
            .json(&body)
    };
    let missing = assert_problem(
        patch(json!({"email": "moved@example.com"}))
            .send()
            .await
            .expect("request"),
        403,
    )
    .await;
    assert_eq!(missing["errors"][0]["field"], "/current_password");
    assert_problem(
        patch(json!({"email": "moved@example.com", "current_password": "wrong one"}))
            .send()
            .await
            .expect("request"),
        403,
    )
    .await;
    let moved = patch(json!({"email": "moved@example.com", "current_password": PASSWORD}))
        .send()
        .await
        .expect("request");
    assert_eq!(moved.status(), 200);
    let renamed = patch(json!({"first_name": "Names need no password"}))
        .send()
        .await
        .expect("request");
    assert_eq!(renamed.status(), 200);
}

#[test]
fn check_config_prints_no_secret() {
    let secrets = [
        (
            "TRELLIS_DATABASE__URL",
            "postgres://app:pg-Secret-7@db.internal:5432/app",
            "pg-Secret-7",
        ),
        (
            "TRELLIS_CACHE__URL",
            "redis://:redis-Secret-8@cache.internal:6379/0",
            "redis-Secret-8",
        ),
        (
            "TRELLIS_MODULES__AUTH__JWT_SECRET",
            "Zk3q9Vt1Lp8Wm2Xr7Yb4Nc6Hd0Gf5Js3Ae1Io9Uq2M=",
            "Zk3q9Vt1Lp8W",
        ),
        (
            "TRELLIS_MODULES__AUTH__JWT_PREVIOUS_SECRETS",
            "[\"Old-Key-Rq8Tz3Wx6Vb1Nm4Kp7Lj2Hg5Fd9Sa0\"]",
            "Old-Key-Rq8T",
        ),
        (
            "TRELLIS_MODULES__AUTH__BOOTSTRAP_ADMIN_PASSWORD",
            "bootstrap-Secret-9",
            "bootstrap-Secret-9",
        ),
    ];
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_trellis-test-server"))
        .arg("check-config")
        .current_dir(crate::helpers::workspace())
        .env_clear()
        .env("TRELLIS_PROFILE", "production")
        .envs(secrets.iter().map(|(key, value, _)| (key, value)))
        .output()
        .expect("check-config runs");
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{text}");
    for (key, _, secret) in secrets {
        assert!(!text.contains(secret), "{key}'s secret printed:\n{text}");
    }
    assert!(
        text.contains("postgres://app:***@db.internal:5432/app"),
        "{text}"
    );
    assert!(
        text.contains("jwt_secret") && text.contains("\"***\""),
        "{text}"
    );
}
