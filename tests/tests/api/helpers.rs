//! `spawn_app()`: the real server, with the `probe` fixture module, on port 0.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use serde_json::Value;
use tokio::task::JoinHandle;
use trellis_core::config::{ConfigSources, LoadedConfig};
use trellis_server::{Application, ShutdownHandle};
use trellis_tests::probe::ProbeModule;

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the workspace")
        .to_path_buf()
}

/// The `test` profile from the workspace's config folder, without the environment.
pub fn test_config() -> LoadedConfig {
    // Naming the fixture keeps its crate, and so its registration, linked.
    let _ = &ProbeModule;
    ConfigSources {
        dir: workspace().join("config"),
        profile: "test".into(),
        file: None,
        env: false,
    }
    .load()
    .expect("the test profile loads")
}

/// Isolated storage for one test: a SQLite file and the event files in its own folder,
/// the in-process cache, or, when `TEST_POSTGRES_URL` / `TEST_REDIS_URL` name servers (scripts/test.sh
/// starts them), a fresh PostgreSQL database and a Redis key prefix of its own.
pub struct TestStorage {
    _dir: tempfile::TempDir,
    /// Configuration keys and values selecting this storage.
    pub settings: Vec<(&'static str, String)>,
}

impl TestStorage {
    pub async fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let id = uuid::Uuid::new_v4().simple().to_string();
        let database = match std::env::var("TEST_POSTGRES_URL") {
            Ok(admin) => create_postgres_database(&admin, &format!("t_{id}")).await,
            Err(_) => format!("sqlite://{}/trellis.db", dir.path().display()),
        };
        let events = dir.path().join("events").display().to_string();
        let mut settings = vec![("database.url", database), ("mq.file.directory", events)];
        if let Ok(redis) = std::env::var("TEST_REDIS_URL") {
            settings.push(("cache.url", redis));
            settings.push(("cache.prefix", format!("t-{id}")));
        }
        Self {
            _dir: dir,
            settings,
        }
    }

    /// The same database and cache for a second server (an instance beside the first);
    /// the event files go to a folder of its own.
    pub async fn sharing(&self) -> Self {
        let mut other = Self::new().await;
        for (key, value) in &mut other.settings {
            if *key != "mq.file.directory"
                && let Some((_, shared)) = self.settings.iter().find(|(k, _)| k == key)
            {
                value.clone_from(shared);
            }
        }
        other
    }

    /// Where the embedded message-queue backend writes events.
    pub fn events_dir(&self) -> PathBuf {
        self._dir.path().join("events")
    }

    /// Every event the embedded backend wrote, from all its files.
    pub fn written_events(&self) -> Vec<Value> {
        let Ok(files) = std::fs::read_dir(self.events_dir()) else {
            return Vec::new();
        };
        let mut events = Vec::new();
        for file in files {
            let text = std::fs::read_to_string(file.expect("entry").path()).expect("readable");
            events.extend(
                text.lines()
                    .map(|line| serde_json::from_str::<Value>(line).expect("one JSON per line")),
            );
        }
        events
    }

    /// A connection of the test's own to its database.
    pub async fn connection(&self) -> sqlx::AnyConnection {
        use sqlx::Connection as _;
        sqlx::any::install_default_drivers();
        let url = self
            .settings
            .iter()
            .find(|(key, _)| *key == "database.url")
            .map(|(_, url)| url.clone())
            .expect("a database URL");
        sqlx::AnyConnection::connect(&url)
            .await
            .expect("a connection to the test database")
    }

    /// Runs one SQL statement on the test's database, behind the server's back (to stage
    /// states the API cannot reach, such as a revocation that was missed).
    pub async fn execute_sql(&self, statement: &str) -> u64 {
        use sqlx::Executor as _;
        self.connection()
            .await
            .execute(sqlx::raw_sql(sqlx::AssertSqlSafe(statement.to_owned())))
            .await
            .unwrap_or_else(|e| panic!("{statement}: {e}"))
            .rows_affected()
    }

    /// The first column of every row `query` returns, as integers (counts, times).
    pub async fn fetch_i64s(&self, query: &str) -> Vec<i64> {
        use sqlx::Row as _;
        sqlx::query(sqlx::AssertSqlSafe(query.to_owned()))
            .fetch_all(&mut self.connection().await)
            .await
            .unwrap_or_else(|e| panic!("{query}: {e}"))
            .iter()
            .map(|row| row.get::<i64, _>(0))
            .collect()
    }

    /// The settings as `TRELLIS_*` environment variables, for a server process.
    pub fn env(&self) -> Vec<(String, String)> {
        self.settings
            .iter()
            .map(|(key, value)| (env_name(key), value.clone()))
            .collect()
    }
}

/// The environment variable that sets the dotted configuration `key`.
pub fn env_name(key: &str) -> String {
    format!("TRELLIS_{}", key.replace('.', "__").to_uppercase())
}

async fn create_postgres_database(admin: &str, name: &str) -> String {
    use sqlx::{Connection as _, Executor as _};
    sqlx::any::install_default_drivers();
    let mut conn = sqlx::AnyConnection::connect(admin)
        .await
        .expect("PostgreSQL admin connection");
    conn.execute(sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE DATABASE {name}"
    ))))
    .await
    .expect("CREATE DATABASE");
    let base = admin.rsplit_once('/').map_or(admin, |(base, _)| base);
    format!("{base}/{name}")
}

/// A running server.
pub struct TestApp {
    pub addr: SocketAddr,
    /// The admin listener's address, when `server.admin.enabled`.
    pub admin_addr: Option<SocketAddr>,
    pub client: reqwest::Client,
    pub storage: TestStorage,
    shutdown: ShutdownHandle,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

/// The server on the test profile.
pub async fn spawn_app() -> TestApp {
    spawn_app_with(&[]).await
}

/// The server on the test profile with `overrides` (dotted key, JSON value).
pub async fn spawn_app_with(overrides: &[(&str, Value)]) -> TestApp {
    spawn_app_on(TestStorage::new().await, overrides).await
}

/// The server on the given storage (e.g. a second server over the same database).
pub async fn spawn_app_on(storage: TestStorage, overrides: &[(&str, Value)]) -> TestApp {
    let mut config = test_config();
    for (key, value) in &storage.settings {
        config = config.set(key, value).expect("storage setting applies");
    }
    for (key, value) in overrides {
        config = config.set(key, value).expect("override applies");
    }
    let app = Application::build(config).await.expect("the server builds");
    let addr = app.addr();
    let admin_addr = app.admin_addr();
    let shutdown = app.shutdown_handle();
    let task = tokio::spawn(app.run_until_stopped());
    TestApp {
        addr,
        admin_addr,
        client: reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("client"),
        storage,
        shutdown,
        task: Some(task),
    }
}

impl TestApp {
    /// `http://addr{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// GET `path` on the admin listener (panics unless it is on).
    pub async fn get_admin(&self, path: &str) -> reqwest::Response {
        let admin = self.admin_addr.expect("the admin listener is on");
        self.client
            .get(format!("http://{admin}{path}"))
            .send()
            .await
            .expect("request")
    }

    /// GET `path`.
    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client
            .get(self.url(path))
            .send()
            .await
            .expect("request")
    }

    /// POST `body` as JSON to `path`.
    pub async fn post_json(&self, path: &str, body: &Value) -> reqwest::Response {
        self.client
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .expect("request")
    }

    /// POST raw `body` with `content_type` to `path`.
    pub async fn post_raw(
        &self,
        path: &str,
        content_type: &str,
        body: impl Into<reqwest::Body>,
    ) -> reqwest::Response {
        self.client
            .post(self.url(path))
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .expect("request")
    }

    /// Stops the server gracefully and waits for it.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.stop_in_place().await
    }

    /// Stops the server gracefully, keeping its storage for another server.
    pub async fn stop_keeping_storage(mut self) -> TestStorage {
        self.stop_in_place().await.expect("clean stop");
        let storage = TestStorage {
            _dir: tempfile::tempdir().expect("tempdir"),
            settings: Vec::new(),
        };
        std::mem::replace(&mut self.storage, storage)
    }

    async fn stop_in_place(&mut self) -> anyhow::Result<()> {
        self.shutdown.shutdown();
        match self.task.take() {
            Some(task) => task.await?,
            None => Ok(()),
        }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.shutdown.shutdown();
    }
}

/// Asserts a problem+json response with `status`, and returns its body.
pub async fn assert_problem(response: reqwest::Response, status: u16) -> Value {
    assert_eq!(response.status().as_u16(), status, "status");
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let request_id = response
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body: Value = response.json().await.expect("problem body is JSON");
    assert_eq!(
        content_type, "application/problem+json",
        "content type of {body}"
    );
    assert_eq!(body["status"], status, "{body}");
    for field in ["type", "title", "detail", "instance", "request_id"] {
        assert!(body[field].is_string(), "problem lacks `{field}`: {body}");
    }
    assert!(
        body["type"]
            .as_str()
            .unwrap_or_default()
            .starts_with("urn:trellis:problem:"),
        "{body}"
    );
    assert_eq!(
        body["request_id"].as_str(),
        request_id.as_deref(),
        "body and header ids agree"
    );
    body
}

/// The `errors` list of a problem as (location, field) pairs.
pub fn violations(problem: &Value) -> Vec<(String, String)> {
    problem["errors"]
        .as_array()
        .map(|errors| {
            errors
                .iter()
                .map(|e| {
                    (
                        e["location"].as_str().unwrap_or_default().to_owned(),
                        e["field"].as_str().unwrap_or_default().to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

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

impl TestApp {
    /// Registers an account; its id.
    pub async fn register(&self, email: &str, password: &str) -> String {
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

    /// Logs in; the token response (panics unless 200).
    pub async fn login(&self, email: &str, password: &str) -> Value {
        let response = self.try_login(email, password).await;
        assert_eq!(response.status(), 200, "login {email}");
        response.json().await.expect("json")
    }

    /// Attempts a login.
    pub async fn try_login(&self, email: &str, password: &str) -> reqwest::Response {
        self.post_json(
            "/api/v1/auth/login",
            &serde_json::json!({"email": email, "password": password}),
        )
        .await
    }

    /// A request with a bearer token.
    pub fn authed(
        &self,
        method: reqwest::Method,
        path: &str,
        token: &str,
    ) -> reqwest::RequestBuilder {
        self.client
            .request(method, self.url(path))
            .bearer_auth(token)
    }

    /// `GET path` with a bearer token, its body as JSON.
    pub async fn get_json_authed(&self, path: &str, token: &str) -> Value {
        self.authed(reqwest::Method::GET, path, token)
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"))
            .json()
            .await
            .unwrap_or_else(|e| panic!("GET {path}: body is not JSON: {e}"))
    }

    /// A client whose connections come from `ip` (any 127.0.0.0/8 address), to act as a
    /// distinct client address.
    pub fn client_from(ip: &str) -> reqwest::Client {
        reqwest::Client::builder()
            .local_address(ip.parse::<std::net::IpAddr>().expect("an address"))
            .build()
            .expect("client")
    }

    /// Attempts a login with `client`.
    pub async fn try_login_with(
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

    /// A new account, logged in: (id, access token).
    pub async fn signed_up(&self, email: &str) -> (String, String) {
        let id = self.register(email, "correct horse battery").await;
        let tokens = self.login(email, "correct horse battery").await;
        (
            id,
            tokens["access_token"].as_str().expect("token").to_owned(),
        )
    }
}
