//! The test kit (`trellis-testkit`), and the account helpers these tests share.

use serde_json::Value;
pub use trellis_testkit::*;

/// The super-administrator the `admin` overrides bootstrap.
pub const ADMIN_EMAIL: &str = "root@example.com";
pub const ADMIN_PASSWORD: &str = "root-password-for-tests";

/// Overrides that bootstrap the super-administrator.
pub fn admin() -> Vec<(&'static str, Value)> {
    vec![
        (
            "modules.auth.bootstrap_admin_email",
            Value::from(ADMIN_EMAIL),
        ),
        (
            "modules.auth.bootstrap_admin_password",
            Value::from(ADMIN_PASSWORD),
        ),
    ]
}

/// Accounts through the user and auth modules' API.
pub trait Accounts {
    /// Registers an account; its id.
    async fn register(&self, email: &str, password: &str) -> String;
    /// Logs in; the token response (panics unless 200).
    async fn login(&self, email: &str, password: &str) -> Value;
    /// Attempts a login.
    async fn try_login(&self, email: &str, password: &str) -> reqwest::Response;
    /// Attempts a login with `client`.
    async fn try_login_with(
        &self,
        client: &reqwest::Client,
        email: &str,
        password: &str,
    ) -> reqwest::Response;
    /// A new account, logged in: (id, access token).
    async fn signed_up(&self, email: &str) -> (String, String);
}

impl Accounts for TestApp {
    async fn register(&self, email: &str, password: &str) -> String {
        let response = self
            .post_json(
                "/api/v1/users",
                &serde_json::json!({
                    "email": email, "password": password,
                    "first_name": "Test", "last_name": "User"
                }),
            )
            .await;
        assert_eq!(response.status(), 201, "register {email}");
        let body: Value = response.json().await.expect("json");
        body["id"].as_str().expect("id").to_owned()
    }

    async fn login(&self, email: &str, password: &str) -> Value {
        let response = self.try_login(email, password).await;
        assert_eq!(response.status(), 200, "login {email}");
        response.json().await.expect("json")
    }

    async fn try_login(&self, email: &str, password: &str) -> reqwest::Response {
        self.try_login_with(&self.client, email, password).await
    }

    async fn try_login_with(
        &self,
        client: &reqwest::Client,
        email: &str,
        password: &str,
    ) -> reqwest::Response {
        client
            .post(self.url("/api/v1/auth/login"))
            .json(&serde_json::json!({"email": email, "password": password}))
            .send()
            .await
            .expect("request")
    }

    async fn signed_up(&self, email: &str) -> (String, String) {
        let id = self.register(email, "correct horse battery").await;
        let tokens = self.login(email, "correct horse battery").await;
        (
            id,
            tokens["access_token"].as_str().expect("token").to_owned(),
        )
    }
}

/// `/readyz`: its status code, and the status of the check `name` (empty if absent).
pub async fn check_status(app: &TestApp, name: &str) -> (u16, String) {
    let response = app.get("/readyz").await;
    let status = response.status().as_u16();
    let body: Value = response.json().await.expect("json");
    let check = body["checks"]
        .as_array()
        .and_then(|checks| checks.iter().find(|c| c["name"] == name))
        .map(|c| c["status"].as_str().unwrap_or_default().to_owned())
        .unwrap_or_default();
    (status, check)
}
