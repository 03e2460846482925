//! The deployment operators run: three instances (processes) behind nginx as a round-robin
//! reverse proxy, on one PostgreSQL, one Redis and one SQS-compatible server. nginx (from
//! Debian, installed by `scripts/services.sh install`) connects to the instances from
//! 127.0.0.2, the only trusted proxy; tests reach the instances directly from 127.0.0.1.
//! `scripts/test.sh` runs these (`--ignored`, one at a time) with the services started.

use std::{
    path::Path,
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use reqwest::Method;
use serde_json::{Value, json};
use tokio::sync::Mutex;

use crate::{
    connections::drip,
    helpers::{ADMIN_EMAIL, ADMIN_PASSWORD, TestApp, TestStorage, env_name},
    process::{free_port, server, terminate, wait_exit, wait_healthy},
    sqs::{Sqs, tally},
};

const PASSWORD: &str = "correct horse battery";
/// The address nginx connects to the instances from.
const PROXY_SOURCE: &str = "127.0.0.2";
const NGINX: &str = "/usr/sbin/nginx";

/// One instance: its port and, while it runs, its process.
struct Instance {
    port: u16,
    child: Option<Child>,
}

/// nginx in front of three instances.
struct Cluster {
    storage: TestStorage,
    env: Vec<(String, String)>,
    instances: Vec<Instance>,
    proxy_port: u16,
    nginx: Option<Child>,
    dir: tempfile::TempDir,
    client: reqwest::Client,
}

impl Cluster {
    /// Starts three instances at the same moment on fresh storage (with `settings` as
    /// configuration), waits until all are healthy, then starts nginx in front of them.
    async fn start(settings: &[(&str, Value)]) -> Self {
        assert!(
            std::env::var("TEST_POSTGRES_URL").is_ok() && std::env::var("TEST_REDIS_URL").is_ok(),
            "the cluster needs TEST_POSTGRES_URL and TEST_REDIS_URL (scripts/services.sh start)"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        // nginx's workers must reach their temporary folders.
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .expect("chmod");
        let mut env: Vec<(String, String)> = [
            ("server.trusted_proxies", json!([PROXY_SOURCE])),
            ("server.shutdown_delay_ms", json!(1000)),
            ("server.shutdown_timeout_ms", json!(60_000)),
            ("modules.auth.bootstrap_admin_email", json!(ADMIN_EMAIL)),
            (
                "modules.auth.bootstrap_admin_password",
                json!(ADMIN_PASSWORD),
            ),
        ]
        .iter()
        .chain(settings)
        .map(|(key, value)| {
            let value = value
                .as_str()
                .map_or_else(|| value.to_string(), str::to_owned);
            (env_name(key), value)
        })
        .collect();
        for key in [
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_EC2_METADATA_DISABLED",
        ] {
            if let Ok(value) = std::env::var(key) {
                env.push((key.to_owned(), value));
            }
        }
        let storage = TestStorage::new().await;
        let mut cluster = Self {
            storage,
            env,
            instances: (0..3)
                .map(|_| Instance {
                    port: free_port(),
                    child: None,
                })
                .collect(),
            proxy_port: free_port(),
            nginx: None,
            dir,
            client: reqwest::Client::new(),
        };
        for i in 0..3 {
            cluster.spawn(i);
        }
        for instance in &cluster.instances {
            wait_healthy(instance.port).await;
        }
        cluster.nginx = Some(cluster.start_nginx());
        cluster.wait_proxy().await;
        cluster
    }

    fn spawn(&mut self, i: usize) {
        let port = self.instances[i].port;
        let log = |name: &str| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.dir.path().join(format!("instance-{i}.{name}")))
                .expect("log file")
        };
        let folder = |name: &str| {
            self.dir
                .path()
                .join(format!("{name}-{i}"))
                .display()
                .to_string()
        };
        let child = server(port, &self.storage)
            .envs(self.env.iter().cloned())
            // The spool's and the file backend's folders are one instance's own.
            .env(env_name("mq.file.directory"), folder("events"))
            .env(env_name("mq.spool.directory"), folder("spool"))
            .stdout(Stdio::from(log("out")))
            .stderr(Stdio::from(log("err")))
            .spawn()
            .expect("instance starts");
        self.instances[i].child = Some(child);
    }

    fn start_nginx(&self) -> Child {
        let dir = self.dir.path().display().to_string();
        let upstreams: String = self
            .instances
            .iter()
            .map(|i| format!("server 127.0.0.1:{} max_fails=0;\n", i.port))
            .collect();
        let conf = format!(
            "worker_processes 1; daemon off; pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  client_body_temp_path {dir}/body; proxy_temp_path {dir}/proxy;
  fastcgi_temp_path {dir}/f; uwsgi_temp_path {dir}/u; scgi_temp_path {dir}/s;
  client_header_timeout 5s;
  upstream trellis {{ {upstreams} keepalive 32; }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://trellis;
      proxy_http_version 1.1;
      proxy_set_header Connection \"\";
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
      proxy_set_header X-Forwarded-Proto $scheme;
      proxy_bind {PROXY_SOURCE};
      proxy_next_upstream error timeout http_502;
      proxy_next_upstream_tries 3;
    }}
  }}
}}
",
            port = self.proxy_port,
        );
        let path = self.dir.path().join("nginx.conf");
        std::fs::write(&path, conf).expect("nginx.conf");
        assert!(
            Path::new(NGINX).exists(),
            "{NGINX} is missing: scripts/services.sh install installs it"
        );
        Command::new(NGINX)
            .args(["-c", &path.display().to_string(), "-p", &dir])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nginx starts")
    }

    async fn wait_proxy(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(r) = self.client.get(self.url("/healthz")).send().await
                && r.status() == 200
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("nginx did not answer on port {}", self.proxy_port);
    }

    /// Through nginx.
    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.proxy_port)
    }

    /// Straight to instance `i`.
    fn direct(&self, i: usize, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.instances[i].port)
    }

    /// SIGTERM to instance `i`; waits for a clean exit.
    fn stop(&mut self, i: usize) {
        let mut child = self.instances[i].child.take().expect("running");
        terminate(&child);
        let status = wait_exit(&mut child, Duration::from_secs(90));
        assert_eq!(status.code(), Some(0), "instance {i} stopped cleanly");
    }

    /// Stops instance `i` and starts it again on the same port.
    async fn restart(&mut self, i: usize) {
        self.stop(i);
        self.spawn(i);
        wait_healthy(self.instances[i].port).await;
    }

    async fn status(&self, method: Method, url: &str, token: &str) -> u16 {
        self.client
            .request(method, url)
            .bearer_auth(token)
            .send()
            .await
            .expect("request")
            .status()
            .as_u16()
    }

    async fn register(&self, email: &str) -> String {
        let response = self
            .client
            .post(self.url("/api/v1/users"))
            .json(
                &json!({"email": email, "password": PASSWORD, "first_name": "C", "last_name": "L"}),
            )
            .send()
            .await
            .expect("register");
        assert_eq!(response.status(), 201, "register {email}");
        let body: Value = response.json().await.expect("json");
        body["id"].as_str().expect("id").to_owned()
    }

    async fn login(&self, email: &str, password: &str) -> String {
        let response = self
            .client
            .post(self.url("/api/v1/auth/login"))
            .json(&json!({"email": email, "password": password}))
            .send()
            .await
            .expect("login");
        assert_eq!(response.status(), 200, "login {email}");
        let body: Value = response.json().await.expect("json");
        body["access_token"].as_str().expect("token").to_owned()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // SIGTERM: nginx's master stops its workers (SIGKILL would orphan them, holding
        // the port).
        if let Some(mut nginx) = self.nginx.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &nginx.id().to_string()])
                .status();
            let _ = nginx.wait();
        }
        for instance in &mut self.instances {
            if let Some(mut child) = instance.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

#[tokio::test]
#[ignore = "needs nginx, PostgreSQL, Redis and moto; scripts/test.sh runs it"]
async fn three_instances_starting_together_on_an_empty_database_share_it_cleanly() {
    let cluster = Cluster::start(&[]).await;
    for i in 0..3 {
        let ready = cluster
            .client
            .get(cluster.direct(i, "/readyz"))
            .send()
            .await
            .expect("readyz");
        assert_eq!(ready.status(), 200, "instance {i} is ready");
    }
    let supers = cluster
        .storage
        .fetch_i64s("SELECT COUNT(*) FROM auth_user_roles WHERE role = 'SUPER_ADMIN'")
        .await;
    assert_eq!(supers, [1], "one super-administrator");
    let twice = cluster
        .storage
        .fetch_i64s(
            "SELECT COUNT(*) FROM (SELECT module, version FROM trellis_migrations \
             GROUP BY module, version HAVING COUNT(*) > 1) AS repeated",
        )
        .await;
    assert_eq!(twice, [0], "each migration applied once");
    let applied = cluster
        .storage
        .fetch_i64s("SELECT COUNT(*) FROM trellis_migrations")
        .await;
    assert!(applied[0] >= 6, "{applied:?} migrations recorded");
    let root = cluster.login(ADMIN_EMAIL, ADMIN_PASSWORD).await;
    assert_eq!(
        cluster
            .status(Method::GET, &cluster.url("/api/v1/users"), &root)
            .await,
        200
    );
}

#[tokio::test]
#[ignore = "needs nginx, PostgreSQL, Redis and moto; scripts/test.sh runs it"]
async fn a_logout_deletion_or_revoked_role_through_the_proxy_binds_every_instance_at_once() {
    let cluster = Cluster::start(&[]).await;
    let root = cluster.login(ADMIN_EMAIL, ADMIN_PASSWORD).await;
    let me_everywhere = |token: String| {
        let cluster = &cluster;
        async move {
            let mut statuses = Vec::new();
            for i in 0..3 {
                statuses.push(
                    cluster
                        .status(Method::GET, &cluster.direct(i, "/api/v1/users/me"), &token)
                        .await,
                );
            }
            statuses
        }
    };

    cluster.register("leaving@example.com").await;
    let token = cluster.login("leaving@example.com", PASSWORD).await;
    assert_eq!(me_everywhere(token.clone()).await, [200, 200, 200]);
    let logout = cluster.url("/api/v1/auth/logout");
    assert_eq!(cluster.status(Method::POST, &logout, &token).await, 204);
    assert_eq!(me_everywhere(token).await, [401, 401, 401], "logout");

    let id = cluster.register("deleted@example.com").await;
    let token = cluster.login("deleted@example.com", PASSWORD).await;
    assert_eq!(me_everywhere(token.clone()).await, [200, 200, 200]);
    let account = cluster.url(&format!("/api/v1/users/{id}"));
    assert_eq!(cluster.status(Method::DELETE, &account, &token).await, 204);
    assert_eq!(me_everywhere(token).await, [401, 401, 401], "deletion");

    let id = cluster.register("demoted@example.com").await;
    let token = cluster.login("demoted@example.com", PASSWORD).await;
    let role = cluster.url(&format!("/api/v1/auth/users/{id}/roles/ADMIN"));
    assert_eq!(cluster.status(Method::PUT, &role, &root).await, 204);
    let mut lists = Vec::new();
    for i in 0..3 {
        let url = cluster.direct(i, "/api/v1/users");
        lists.push(cluster.status(Method::GET, &url, &token).await);
    }
    assert_eq!(lists, [200, 200, 200]);
    assert_eq!(cluster.status(Method::DELETE, &role, &root).await, 204);
    let mut lists = Vec::new();
    for i in 0..3 {
        let url = cluster.direct(i, "/api/v1/users");
        lists.push(cluster.status(Method::GET, &url, &token).await);
    }
    assert_eq!(lists, [403, 403, 403], "revoked role");
}

#[tokio::test]
#[ignore = "needs nginx, PostgreSQL, Redis and moto; scripts/test.sh runs it"]
async fn limits_follow_the_client_nginx_forwards_and_ignore_what_others_claim() {
    let cluster = Cluster::start(&[("modules.auth.login_failures_per_address", json!(3))]).await;
    cluster.register("target@example.com").await;
    let wrong = |client: reqwest::Client, url: String, forwarded: Option<&'static str>| async move {
        let mut request = client
            .post(url)
            .json(&json!({"email": "target@example.com", "password": "not it"}));
        if let Some(forwarded) = forwarded {
            request = request.header("x-forwarded-for", forwarded);
        }
        request.send().await.expect("login").status().as_u16()
    };
    // Client A (127.0.0.3, as nginx forwards it) spends its budget over the instances.
    let a = TestApp::client_from("127.0.0.3");
    let mut statuses = Vec::new();
    for _ in 0..4 {
        statuses.push(wrong(a.clone(), cluster.url("/api/v1/auth/login"), None).await);
    }
    assert_eq!(statuses, [401, 401, 401, 429], "client A");
    // Client B, through the same nginx, is not throttled.
    let b = TestApp::client_from("127.0.0.4");
    assert_eq!(
        wrong(b, cluster.url("/api/v1/auth/login"), None).await,
        401,
        "client B"
    );
    // Straight to an instance, a peer that is not the proxy cannot pass as another
    // client: its made-up addresses are ignored and its own budget runs out.
    let direct = TestApp::client_from("127.0.0.5");
    let mut statuses = Vec::new();
    for forwarded in [
        "198.51.100.1",
        "198.51.100.2",
        "198.51.100.3",
        "198.51.100.4",
    ] {
        let url = cluster.direct(0, "/api/v1/auth/login");
        statuses.push(wrong(direct.clone(), url, Some(forwarded)).await);
    }
    assert_eq!(statuses, [401, 401, 401, 429], "spoofed X-Forwarded-For");
}

#[tokio::test]
#[ignore = "needs nginx, PostgreSQL, Redis and moto; scripts/test.sh runs it"]
async fn a_rolling_restart_under_load_fails_no_request_and_loses_no_event() {
    let sqs = Sqs::queue().await;
    let consumer = sqs.consume();
    let mut cluster = Cluster::start(&sqs.settings()).await;
    cluster.register("reader@example.com").await;
    let token = cluster.login("reader@example.com", PASSWORD).await;

    let running = Arc::new(AtomicBool::new(true));
    let accepted = Arc::new(Mutex::new(Vec::<String>::new()));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let requests = Arc::new(AtomicUsize::new(0));
    let mut load = Vec::new();
    for worker in 0..3 {
        let (running, accepted, failures, requests) = (
            running.clone(),
            accepted.clone(),
            failures.clone(),
            requests.clone(),
        );
        let (client, token) = (cluster.client.clone(), token.clone());
        let base = cluster.url("");
        load.push(tokio::spawn(async move {
            let mut round = 0u64;
            while running.load(Ordering::Relaxed) {
                round += 1;
                let request = match round % 10 {
                    0 => client
                        .post(format!("{base}/api/v1/auth/login"))
                        .json(&json!({"email": "reader@example.com", "password": PASSWORD})),
                    1 | 2 => client
                        .post(format!("{base}/api/v1/bi/events"))
                        .json(&crate::bi::batch(2, &format!("w{worker}r{round}"))),
                    _ => client
                        .get(format!("{base}/api/v1/users/me"))
                        .bearer_auth(&token),
                };
                requests.fetch_add(1, Ordering::Relaxed);
                match request.send().await {
                    Ok(response) if response.status().is_server_error() => {
                        let status = response.status();
                        let body = response.text().await.unwrap_or_default();
                        failures.lock().await.push(format!("{status}: {body}"));
                    }
                    Ok(response) if response.status() == 202 => {
                        let answer: Value = response.json().await.expect("ids");
                        let ids = answer["ids"].as_array().expect("ids");
                        accepted
                            .lock()
                            .await
                            .extend(ids.iter().map(|id| id.as_str().expect("id").to_owned()));
                    }
                    Ok(_) => {}
                    Err(error) => failures.lock().await.push(format!("connection: {error}")),
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    for i in 0..3 {
        cluster.restart(i).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    running.store(false, Ordering::Relaxed);
    for task in load {
        task.await.expect("load task");
    }
    let served = requests.load(Ordering::Relaxed);
    let failures = failures.lock().await.clone();
    assert!(
        failures.is_empty(),
        "{} of {served} requests failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(10)]
    );
    for i in 0..3 {
        cluster.stop(i);
    }
    let accepted = accepted.lock().await.clone();
    assert!(accepted.len() >= 50, "{} events accepted", accepted.len());
    let (ids, _) = tally(&consumer.finish().await);
    let missing = accepted.iter().filter(|id| !ids.contains(*id)).count();
    assert_eq!(
        missing,
        0,
        "of {} accepted events, {missing} never reached the queue",
        accepted.len()
    );
    println!(
        "rolling restart: {served} requests, none failed; {} events, all on the queue",
        accepted.len()
    );
}

#[tokio::test]
#[ignore = "needs nginx, PostgreSQL, Redis and moto; scripts/test.sh runs it"]
async fn slow_header_senders_at_one_instance_stop_no_request_and_are_closed() {
    let cluster = Cluster::start(&[("server.header_read_timeout_ms", json!(2000))]).await;
    let started = Instant::now();
    let target = std::net::SocketAddr::from(([127, 0, 0, 1], cluster.instances[0].port));
    let mut drips = Vec::new();
    for i in 0..300 {
        let mut stream = tokio::net::TcpStream::connect(target)
            .await
            .expect("connect");
        drips.push(tokio::spawn(async move {
            let head = format!("GET /healthz HTTP/1.1\r\nHost: trellis\r\nX-Slow-{i}: ");
            // One byte a second, watching for the server closing.
            let pace = Duration::from_secs(1);
            drip(&mut stream, &head, pace, started, Duration::from_secs(15)).await
        }));
    }
    // Meanwhile every instance serves, the slowed one too.
    for round in 0..30 {
        let asked = Instant::now();
        let i = round % 3;
        let through_proxy = cluster
            .client
            .get(cluster.url("/healthz"))
            .send()
            .await
            .expect("through nginx");
        let direct = cluster
            .client
            .get(cluster.direct(i, "/healthz"))
            .send()
            .await
            .expect("direct");
        assert_eq!(
            (through_proxy.status().as_u16(), direct.status().as_u16()),
            (200, 200)
        );
        assert!(
            asked.elapsed() < Duration::from_secs(1),
            "requests waited {:?}",
            asked.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for drip in drips {
        let closed_after = drip.await.expect("task");
        assert!(
            closed_after < Duration::from_secs(5),
            "a slow connection was open for {closed_after:?}"
        );
    }
}

#[tokio::test]
#[ignore = "needs nginx, PostgreSQL, Redis and moto; scripts/test.sh runs it"]
async fn the_housekeeping_job_runs_on_one_instance_per_period() {
    let cluster = Cluster::start(&[("modules.probe.job_every_ms", json!(500))]).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let runs = cluster
        .storage
        .fetch_i64s("SELECT ran_at FROM probe_job_runs ORDER BY ran_at")
        .await;
    assert!(runs.len() >= 4, "{} runs: {runs:?}", runs.len());
    for pair in runs.windows(2) {
        assert!(
            pair[1] - pair[0] >= 450,
            "two runs {} ms apart: {runs:?}",
            pair[1] - pair[0]
        );
    }
    let instances = cluster
        .storage
        .fetch_i64s("SELECT COUNT(DISTINCT instance) FROM probe_job_runs")
        .await;
    println!(
        "housekeeping: {} runs by {} instances",
        runs.len(),
        instances[0]
    );
}
