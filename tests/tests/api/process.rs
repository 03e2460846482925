//! The binary as an operator runs it: environment, signals, configuration reload.

use std::{
    io::{BufRead, BufReader},
    net::TcpListener,
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use crate::helpers::{TestStorage, workspace};

const BIN: &str = env!("CARGO_BIN_EXE_trellis-test-server");

pub(crate) fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

pub(crate) fn server(port: u16, storage: &TestStorage) -> Command {
    let mut command = Command::new(BIN);
    command
        .current_dir(workspace())
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("TRELLIS_PROFILE", "test")
        .env("TRELLIS_SERVER__PORT", port.to_string())
        .envs(storage.env())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

/// Streams a child's stdout lines into a channel.
pub(crate) fn lines(child: &mut Child) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().expect("piped stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

pub(crate) async fn wait_healthy(port: u16) {
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Ok(r) = client
            .get(format!("http://127.0.0.1:{port}/healthz"))
            .send()
            .await
            && r.status() == 200
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the server did not become healthy on port {port}");
}

pub(crate) fn terminate(child: &Child) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success());
}

pub(crate) fn wait_exit(child: &mut Child, within: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the server did not exit within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test]
async fn port_comes_from_the_environment_and_sigterm_drains_in_flight_requests() {
    let port = free_port();
    let storage = TestStorage::new().await;
    let mut child = server(port, &storage).spawn().expect("server starts");
    wait_healthy(port).await;

    let url = format!("http://127.0.0.1:{port}/api/v1/probe/slow?ms=1500");
    let in_flight = tokio::spawn(async move { reqwest::get(url).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    terminate(&child);

    let response = in_flight
        .await
        .expect("task")
        .expect("in-flight request completes");
    assert_eq!(response.status(), 200);
    let status = wait_exit(&mut child, Duration::from_secs(10));
    assert_eq!(status.code(), Some(0), "exit status after SIGTERM");
}

#[tokio::test]
async fn on_sigterm_readyz_answers_draining_while_the_listener_serves_out_the_delay() {
    let port = free_port();
    let storage = TestStorage::new().await;
    let mut child = server(port, &storage)
        .env("TRELLIS_SERVER__SHUTDOWN_DELAY_MS", "1500")
        .spawn()
        .expect("server starts");
    wait_healthy(port).await;
    let client = reqwest::Client::new();
    let url = |path: &str| format!("http://127.0.0.1:{port}{path}");
    assert_eq!(
        client
            .get(url("/readyz"))
            .send()
            .await
            .expect("ready")
            .status(),
        200
    );
    let signalled = Instant::now();
    terminate(&child);
    tokio::time::sleep(Duration::from_millis(200)).await;

    let ready = client
        .get(url("/readyz"))
        .send()
        .await
        .expect("still serving");
    assert_eq!(ready.status(), 503);
    let problem: serde_json::Value = ready.json().await.expect("JSON");
    assert_eq!(problem["type"], "urn:trellis:problem:draining", "{problem}");
    let served = client
        .get(url("/healthz"))
        .send()
        .await
        .expect("still serving");
    assert_eq!(served.status(), 200);
    assert!(signalled.elapsed() < Duration::from_millis(1400));

    let status = wait_exit(&mut child, Duration::from_secs(10));
    assert!(
        signalled.elapsed() >= Duration::from_millis(1500),
        "stopped before the delay: {:?}",
        signalled.elapsed()
    );
    assert_eq!(status.code(), Some(0));
    assert!(
        reqwest::get(url("/healthz")).await.is_err(),
        "the listener is closed"
    );
}

#[tokio::test]
async fn one_budget_bounds_the_whole_shutdown_and_the_exit_code_says_what_it_cut() {
    let port = free_port();
    let storage = TestStorage::new().await;
    let mut child = server(port, &storage)
        .env("TRELLIS_SERVER__SHUTDOWN_DELAY_MS", "300")
        .env("TRELLIS_SERVER__SHUTDOWN_TIMEOUT_MS", "1500")
        .spawn()
        .expect("server starts");
    let mut stderr = child.stderr.take().expect("piped stderr");
    wait_healthy(port).await;
    let url = format!("http://127.0.0.1:{port}/api/v1/probe/slow?ms=9000");
    let stuck = tokio::spawn(async move { reqwest::get(url).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let signalled = Instant::now();
    terminate(&child);

    let status = wait_exit(&mut child, Duration::from_secs(10));
    let took = signalled.elapsed();
    assert!(
        took < Duration::from_millis(2500),
        "the shutdown took {took:?}"
    );
    assert_eq!(
        status.code(),
        Some(3),
        "exit status of a cut-short shutdown"
    );
    let mut text = String::new();
    std::io::Read::read_to_string(&mut stderr, &mut text).expect("stderr");
    assert!(
        text.contains("1 connections closed with 1 requests unanswered"),
        "{text}"
    );
    assert!(
        stuck.await.expect("task").is_err(),
        "the stuck request was cut"
    );
}

#[tokio::test]
async fn sigint_stops_with_exit_code_zero() {
    let port = free_port();
    let storage = TestStorage::new().await;
    let mut child = server(port, &storage).spawn().expect("server starts");
    wait_healthy(port).await;
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success());
    assert_eq!(
        wait_exit(&mut child, Duration::from_secs(10)).code(),
        Some(0)
    );
}

#[tokio::test]
async fn invalid_environment_value_stops_start_up_naming_the_key() {
    let storage = TestStorage::new().await;
    let output = server(0, &storage)
        .env("TRELLIS_SERVER__PORT", "eighty")
        .output()
        .expect("runs");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("`server.port`"), "{stderr}");
    assert!(stderr.contains("TRELLIS_SERVER__PORT"), "{stderr}");
}

#[tokio::test]
async fn unknown_config_key_in_a_file_stops_start_up() {
    let storage = TestStorage::new().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("extra.toml");
    std::fs::write(&file, "[server]\nbody_limit = 5\n").expect("write");
    let output = server(0, &storage)
        .arg("--config")
        .arg(&file)
        .output()
        .expect("runs");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("body_limit"), "{stderr}");
    assert!(stderr.contains("extra.toml"), "{stderr}");
}

#[tokio::test]
async fn log_level_follows_the_config_file_without_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("live.toml");
    let config = |level: &str| {
        format!("[telemetry]\nlevel = \"{level}\"\nformat = \"json\"\naccess_log = true\n")
    };
    std::fs::write(&file, config("warn")).expect("write");
    let port = free_port();
    let storage = TestStorage::new().await;
    let mut child = server(port, &storage)
        .arg("--config")
        .arg(&file)
        .spawn()
        .expect("starts");
    let lines = lines(&mut child);
    wait_healthy(port).await;

    let client = reqwest::Client::new();
    let health = format!("http://127.0.0.1:{port}/healthz");
    client.get(&health).send().await.expect("request");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let quiet: Vec<String> = lines.try_iter().collect();
    assert!(
        !quiet.iter().any(|l| l.contains("trellis::access")),
        "no access lines at warn: {quiet:?}"
    );

    std::fs::write(&file, config("info")).expect("rewrite");
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = Vec::new();
    let mut changed = false;
    while Instant::now() < deadline && !changed {
        if let Ok(line) = lines.recv_timeout(Duration::from_millis(100)) {
            changed = line.contains("log level changed");
            seen.push(line);
        }
    }
    assert!(changed, "no reload message in {seen:?}");

    client.get(&health).send().await.expect("request");
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut access = false;
    while Instant::now() < deadline && !access {
        if let Ok(line) = lines.recv_timeout(Duration::from_millis(100)) {
            access = line.contains("trellis::access");
        }
    }
    assert!(access, "access lines appear at info");
    terminate(&child);
    assert_eq!(
        wait_exit(&mut child, Duration::from_secs(10)).code(),
        Some(0)
    );
}

#[tokio::test]
async fn the_embedded_default_creates_its_sqlite_database_and_needs_no_service() {
    // A folder with no config/: built-in defaults, `sqlite://data/trellis.db`.
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let mut child = Command::new(BIN)
        .current_dir(dir.path())
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("TRELLIS_SERVER__PORT", port.to_string())
        .env("TRELLIS_TELEMETRY__LEVEL", "warn")
        .stdout(Stdio::null())
        .spawn()
        .expect("starts");
    wait_healthy(port).await;
    let ready = reqwest::get(format!("http://127.0.0.1:{port}/readyz"))
        .await
        .expect("readyz");
    assert_eq!(ready.status(), 200);
    let body: serde_json::Value = ready.json().await.expect("json");
    assert_eq!(body["status"], "up", "{body}");
    assert!(
        dir.path().join("data/trellis.db").is_file(),
        "data/trellis.db was created"
    );
    terminate(&child);
    assert_eq!(
        wait_exit(&mut child, Duration::from_secs(10)).code(),
        Some(0)
    );
}
