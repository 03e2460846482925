//! Testing Trellis modules against the real server.
//!
//! - [`spawn_app`] / [`TestApp::builder`]: the server, with every module the test binary
//!   links, on a port of its own, with configuration overrides and [`TestStorage`] of its
//!   own (a database, a cache prefix, a message-queue folder);
//! - [`TestApp::call`]: a request through the whole middleware stack in process (no
//!   socket), or over HTTP ([`Call::send_http`]); answers as [`TestResponse`], problems
//!   as [`Problem`] with their field violations;
//! - [`ManualClock`]: the time the modules read, moved by the test;
//! - [`Captured`]: what the modules published on the bus or emitted as events, and
//!   [`TestApp::queued`]: what reached the message queue's files.
//!
//! A module tests itself in `tests/` (an integration test: its unit tests would link a
//! second copy of the crate and register it twice), linking itself with
//! `use trellis_<name> as _;`.
//!
//! ```no_run
//! # async fn example() {
//! use trellis_testkit::TestApp;
//! let app = TestApp::builder().set("modules.notes.page_max", 10).spawn().await;
//! let problem = app
//!     .call(poem::http::Method::POST, "/api/v1/notes")
//!     .json(&serde_json::json!({"title": ""}))
//!     .send()
//!     .await
//!     .problem(422);
//! assert_eq!(problem.fields(), [("body", "/title")]);
//! # }
//! ```

mod request;
mod storage;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use poem::http::Method;
use serde_json::Value;
use tokio::task::JoinHandle;
use trellis_core::{
    Extras,
    bus::Message,
    config::{ConfigSources, LoadedConfig},
    events::{Event, Published},
};
use trellis_server::{Application, ShutdownHandle};

pub use request::{
    Call, IN_PROCESS_PEER, Problem, TestResponse, Violation, assert_problem, violations,
};
pub use storage::{TestStorage, env_name};
pub use trellis_core::clock::ManualClock;

/// The workspace root, whose `config/` folder the servers read.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the kit lives in the workspace")
        .to_path_buf()
}

/// The `test` profile from the workspace's config folder, without the environment.
pub fn test_config() -> LoadedConfig {
    ConfigSources {
        dir: workspace().join("config"),
        profile: "test".into(),
        file: None,
        env: false,
    }
    .load()
    .expect("the test profile loads")
}

/// What a test saw published: every `T` since the server started, in order.
pub struct Captured<T>(Arc<Mutex<Vec<T>>>);

impl<T> Clone for Captured<T> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<T: Clone> Captured<T> {
    fn new() -> Self {
        Self(Arc::default())
    }

    fn push(&self, item: T) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(item);
    }

    /// Everything captured so far.
    pub fn all(&self) -> Vec<T> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Waits up to five seconds for at least `count` items (events and detached
    /// subscribers run after the request that caused them), then answers them all.
    pub async fn wait_for(&self, count: usize) -> Vec<T> {
        at_least(count, || self.all()).await
    }
}

/// What `read` answers once it holds at least `count` items, or after five seconds.
async fn at_least<T>(count: usize, read: impl Fn() -> Vec<T>) -> Vec<T> {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let all = read();
        if all.len() >= count || tokio::time::Instant::now() >= deadline {
            return all;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// A server being set up: configuration overrides, storage, clock and captures.
pub struct TestAppBuilder {
    overrides: Vec<(String, Value)>,
    storage: Option<TestStorage>,
    extras: Extras,
}

impl TestAppBuilder {
    /// Sets the dotted configuration `key` (over the `test` profile).
    pub fn set(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.overrides.push((key.to_owned(), value.into()));
        self
    }

    /// Runs on `storage` (for example another server's, [`TestStorage::sharing`]).
    pub fn storage(mut self, storage: TestStorage) -> Self {
        self.storage = Some(storage);
        self
    }

    /// The modules read `clock` instead of the system's.
    pub fn clock(mut self, clock: &ManualClock) -> Self {
        self.extras = self.extras.clock(clock.clock());
        self
    }

    /// Captures every `M` published on the bus.
    pub fn capture<M: Message>(&mut self) -> Captured<M> {
        let captured = Captured::new();
        let sink = captured.clone();
        self.extras = std::mem::take(&mut self.extras).observe_bus(move |m: M| sink.push(m));
        captured
    }

    /// Captures every `E` emitted, once its transaction committed (a handler of its own,
    /// so each `E` is also stored for it).
    pub fn capture_events<E: Event + Clone>(&mut self) -> Captured<Published<E>> {
        let captured = Captured::new();
        let sink = captured.clone();
        self.extras = std::mem::take(&mut self.extras).observe_events(move |e| sink.push(e));
        captured
    }

    /// Builds the server and serves it on a port of its own.
    pub async fn spawn(self) -> TestApp {
        let storage = match self.storage {
            Some(storage) => storage,
            None => TestStorage::new().await,
        };
        let mut config = test_config();
        for (key, value) in &storage.settings {
            config = config.set(key, value).expect("storage setting applies");
        }
        for (key, value) in &self.overrides {
            config = config
                .set(key, value)
                .unwrap_or_else(|e| panic!("override `{key}`: {e}"));
        }
        let app = Application::build_with(config, self.extras)
            .await
            .expect("the server builds");
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("client");
        let target = request::Target {
            addr: app.addr(),
            endpoint: app.endpoint(),
            http: http.clone(),
        };
        TestApp {
            addr: app.addr(),
            admin_addr: app.admin_addr(),
            client: http,
            storage,
            target,
            shutdown: app.shutdown_handle(),
            task: Some(tokio::spawn(app.run_until_stopped())),
        }
    }
}

/// A running server, stopped gracefully when dropped.
pub struct TestApp {
    /// The public listener's address.
    pub addr: SocketAddr,
    /// The admin listener's address, when `server.admin.enabled`.
    pub admin_addr: Option<SocketAddr>,
    /// An HTTP client that follows no redirect.
    pub client: reqwest::Client,
    /// The server's storage.
    pub storage: TestStorage,
    target: request::Target,
    shutdown: ShutdownHandle,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

/// The server on the test profile.
pub async fn spawn_app() -> TestApp {
    TestApp::builder().spawn().await
}

/// The server on the test profile with `overrides` (dotted key, JSON value).
pub async fn spawn_app_with(overrides: &[(&str, Value)]) -> TestApp {
    spawn_app_on(TestStorage::new().await, overrides).await
}

/// The server on the given storage (e.g. a second server over the same database).
pub async fn spawn_app_on(storage: TestStorage, overrides: &[(&str, Value)]) -> TestApp {
    let mut builder = TestApp::builder().storage(storage);
    for (key, value) in overrides {
        builder = builder.set(key, value.clone());
    }
    builder.spawn().await
}

impl TestApp {
    /// A server to set up: see [`TestAppBuilder`].
    pub fn builder() -> TestAppBuilder {
        TestAppBuilder {
            overrides: Vec::new(),
            storage: None,
            extras: Extras::default(),
        }
    }

    /// A request to `path` (with its query), sent in process or over HTTP.
    pub fn call(&self, method: Method, path: &str) -> Call {
        Call::new(self.target.clone(), method, path)
    }

    /// What the message queue's file backend holds, from all its files.
    pub fn queued(&self) -> Vec<Value> {
        self.storage.written_events()
    }

    /// What the file backend holds once it holds at least `count` messages (they are
    /// written after the request that accepted them), or after five seconds.
    pub async fn wait_for_queued(&self, count: usize) -> Vec<Value> {
        at_least(count, || self.queued()).await
    }

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

    /// A request with a bearer token.
    pub fn authed(&self, method: Method, path: &str, token: &str) -> reqwest::RequestBuilder {
        self.client
            .request(method, self.url(path))
            .bearer_auth(token)
    }

    /// `GET path` with a bearer token, its body as JSON.
    pub async fn get_json_authed(&self, path: &str, token: &str) -> Value {
        self.authed(Method::GET, path, token)
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

    /// Stops the server gracefully and waits for it.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.stop_in_place().await
    }

    /// Stops the server gracefully, keeping its storage for another server.
    pub async fn stop_keeping_storage(mut self) -> TestStorage {
        self.stop_in_place().await.expect("clean stop");
        std::mem::replace(&mut self.storage, TestStorage::empty())
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
