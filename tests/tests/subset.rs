//! Build-time module selection: a binary built with some module features serves exactly
//! those modules and documents exactly their operations.
//!
//! The test script builds `trellis` with each feature set and runs this test with
//! `TEST_SUBSET_BIN` (the binary) and `TEST_SUBSET_MODULES` (comma-separated
//! expected modules, possibly empty), and `TEST_SUBSET_CHECKS`, more checks for builds
//! without some backends (comma-separated): `creates-nothing` (started in an empty folder,
//! the server leaves it empty) and `no-postgres` (a PostgreSQL URL stops start-up naming
//! the feature). `TEST_SUBSET_OPERATIONS` (`module=opA,opB`), when set, names exactly
//! the operations one module documents. It is ignored in a plain `cargo test`.

use std::{
    collections::BTreeSet,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

#[tokio::test]
#[ignore = "run by scripts/test.sh with TEST_SUBSET_BIN and TEST_SUBSET_MODULES"]
async fn binary_serves_exactly_the_selected_modules() {
    let bin = std::env::var("TEST_SUBSET_BIN").expect("TEST_SUBSET_BIN names the binary");
    let expected: BTreeSet<String> = std::env::var("TEST_SUBSET_MODULES")
        .expect("TEST_SUBSET_MODULES lists the expected modules")
        .split(',')
        .filter(|m| !m.is_empty())
        .map(str::to_owned)
        .collect();

    // The document, printed without starting the server.
    let printed = Command::new(&bin).arg("openapi").output().expect("runs");
    assert!(printed.status.success());
    let doc: Value = serde_json::from_slice(&printed.stdout).expect("document is JSON");
    let mut tags = BTreeSet::new();
    for item in doc["paths"]
        .as_object()
        .into_iter()
        .flat_map(|p| p.values())
    {
        for op in item.as_object().into_iter().flat_map(|o| o.values()) {
            tags.insert(op["tags"][0].as_str().expect("tagged").to_owned());
        }
    }
    assert_eq!(tags, expected, "modules with operations in the document");
    // `module=opA,opB`: exactly these operations are the module's.
    if let Ok(spec) = std::env::var("TEST_SUBSET_OPERATIONS") {
        let (module, operations) = spec.split_once('=').expect("module=op,op");
        let expected: BTreeSet<&str> = operations.split(',').collect();
        let documented: BTreeSet<&str> = doc["paths"]
            .as_object()
            .into_iter()
            .flat_map(|p| p.values())
            .flat_map(|item| item.as_object().into_iter().flat_map(|o| o.values()))
            .filter(|op| op["tags"][0] == module)
            .filter_map(|op| op["operationId"].as_str())
            .collect();
        assert_eq!(documented, expected, "the operations of `{module}`");
    }

    // The running server.
    let workspace = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let data = tempfile::tempdir().expect("tempdir");
    let client = reqwest::Client::new();
    let mut command = Command::new(&bin);
    command
        .current_dir(&workspace)
        .env("TRELLIS_PROFILE", "test")
        .env(
            "TRELLIS_DATABASE__URL",
            format!("sqlite://{}/subset.db", data.path().display()),
        );
    let (server, base, served) = serve(command, &client).await;
    assert_eq!(served, doc, "served and printed documents agree");

    let modules = client
        .get(format!("{base}/api/v1/modules"))
        .send()
        .await
        .expect("request");
    if expected.contains("common") {
        let body: Value = modules.json().await.expect("json");
        let listed: BTreeSet<String> = body["modules"]
            .as_array()
            .expect("modules")
            .iter()
            .filter_map(|m| m["name"].as_str().map(str::to_owned))
            .collect();
        assert_eq!(listed, expected);
    } else {
        assert_eq!(
            modules.status(),
            404,
            "without `common` there is no module list"
        );
    }
    if expected.contains("user") && !expected.contains("auth") {
        // Authentication is an extension point: with no module answering it, protected
        // operations are 401 problems, not 500s.
        let me = client
            .get(format!("{base}/api/v1/users/me"))
            .bearer_auth("any-token")
            .send()
            .await
            .expect("request");
        assert_eq!(me.status(), 401);
        assert_eq!(me.headers()["content-type"], "application/problem+json");
        let body: Value = me.json().await.expect("json");
        assert_eq!(
            body["detail"],
            "authentication is not available on this server"
        );
    }
    drop(server);

    let checks = std::env::var("TEST_SUBSET_CHECKS").unwrap_or_default();
    if checks.split(',').any(|c| c == "creates-nothing") {
        creates_nothing(&bin, &client).await;
    }
    if checks.split(',').any(|c| c == "no-postgres") {
        let refused = Command::new(&bin)
            .current_dir(&workspace)
            .env("TRELLIS_PROFILE", "test")
            .env(
                "TRELLIS_DATABASE__URL",
                "postgres://trellis@127.0.0.1:1/trellis",
            )
            .output()
            .expect("runs");
        assert!(!refused.status.success(), "a PostgreSQL URL was taken");
        let text = String::from_utf8_lossy(&refused.stderr);
        assert!(text.contains("cargo feature `postgres`"), "{text}");
    }

    if std::env::var_os("TEST_SUBSET_WITHOUT_BACKENDS").is_some() {
        // Built without the `sqs` and `redis` features: asking for either stops start-up
        // and says why.
        for (settings, feature) in [
            (
                [
                    ("TRELLIS_MQ__SQS__QUEUE_URL", "http://127.0.0.1:1/q"),
                    ("TRELLIS_MQ__BACKEND", "sqs"),
                ],
                "cargo feature `sqs`",
            ),
            (
                [
                    ("TRELLIS_CACHE__URL", "redis://127.0.0.1:1/0"),
                    ("TRELLIS_CACHE__PREFIX", "subset"),
                ],
                "cargo feature `redis`",
            ),
        ] {
            let refused = Command::new(&bin)
                .current_dir(&workspace)
                .env("TRELLIS_PROFILE", "test")
                .env(
                    "TRELLIS_DATABASE__URL",
                    format!("sqlite://{}/subset.db", data.path().display()),
                )
                .envs(settings)
                .output()
                .expect("runs");
            assert!(!refused.status.success(), "{feature}");
            let text = String::from_utf8_lossy(&refused.stderr);
            assert!(text.contains(feature), "{text}");
        }
    }
}

/// Started in an empty folder on the default settings (the database and the event folder
/// under `data/`), served and stopped, a server whose modules need no database and no
/// message queue leaves the folder empty.
async fn creates_nothing(bin: &str, client: &reqwest::Client) {
    let config = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../config");
    let folder = tempfile::tempdir().expect("tempdir");
    let mut command = Command::new(bin);
    command
        .current_dir(folder.path())
        .env("TRELLIS_CONFIG_DIR", &config)
        .stderr(Stdio::null());
    let (mut child, _, _) = serve(command, client).await;
    let stopped = Command::new("kill")
        .arg(child.0.id().to_string())
        .status()
        .expect("kill runs");
    assert!(stopped.success());
    let status = child.0.wait().expect("exits");
    assert!(status.success(), "{status}");
    let left: Vec<_> = std::fs::read_dir(folder.path())
        .expect("folder")
        .map(|e| e.expect("entry").path())
        .collect();
    assert!(left.is_empty(), "the server created {left:?}");
}

/// Starts `command` on a free port and waits until it serves its OpenAPI document (the
/// server's own, whichever modules it has). Answers the process, its base URL and the
/// document.
async fn serve(mut command: Command, client: &reqwest::Client) -> (Stopped, String, Value) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port");
    let mut child = Stopped(
        command
            .env("TRELLIS_SERVER__PORT", port.to_string())
            .stdout(Stdio::null())
            .spawn()
            .expect("starts"),
    );
    let base = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        assert!(Instant::now() < deadline, "server did not start");
        if let Some(status) = child.0.try_wait().expect("wait") {
            panic!("the server exited at start-up: {status}");
        }
        if let Ok(r) = client.get(format!("{base}/openapi.json")).send().await
            && r.status() == 200
        {
            let document = r.json().await.expect("json");
            return (child, base, document);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A server process, killed if the test ends before stopping it.
struct Stopped(std::process::Child);

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
