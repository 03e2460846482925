//! Faults on the real services: Redis stopped and started under load, PostgreSQL
//! restarted under load. They stop shared services, so they are ignored in a plain run;
//! scripts/test.sh runs them one at a time with `TEST_SERVICES_CTL` (scripts/services.sh)
//! and the PostgreSQL and Redis URLs set.

use std::{
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use tokio::task::JoinHandle;

use crate::helpers::{TestApp, check_status, spawn_app_with};

fn services(args: &[&str]) {
    let ctl = std::env::var("TEST_SERVICES_CTL")
        .expect("TEST_SERVICES_CTL names scripts/services.sh (run through scripts/test.sh)");
    let status = Command::new(&ctl)
        .args(args)
        .status()
        .expect("services script runs");
    assert!(status.success(), "{ctl} {args:?} failed");
}

fn require_services() {
    for var in ["TEST_POSTGRES_URL", "TEST_REDIS_URL", "TEST_SERVICES_CTL"] {
        assert!(
            std::env::var_os(var).is_some(),
            "{var} must be set (run through scripts/test.sh)"
        );
    }
}

/// One observed response: when, status, and whether the body was problem+json.
#[derive(Debug, Clone)]
struct Observation {
    at: Instant,
    status: u16,
    problem: bool,
}

/// Sends requests back to back until stopped; a transport error or a request slower than
/// 10 s fails the test (a hung request).
struct Load {
    stop: Arc<AtomicBool>,
    task: JoinHandle<Vec<Observation>>,
}

impl Load {
    fn start<F>(app: &TestApp, make: F) -> Self
    where
        F: Fn(&reqwest::Client, &str, usize) -> reqwest::RequestBuilder + Send + 'static,
    {
        let stop = Arc::new(AtomicBool::new(false));
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .expect("client");
        let base = app.url("");
        let flag = stop.clone();
        let counter = AtomicUsize::new(0);
        let task = tokio::spawn(async move {
            let mut seen = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                let n = counter.fetch_add(1, Ordering::Relaxed);
                let response = make(&client, &base, n)
                    .send()
                    .await
                    .unwrap_or_else(|e| panic!("request {n} failed or hung: {e}"));
                let problem = response
                    .headers()
                    .get("content-type")
                    .is_some_and(|v| v == "application/problem+json");
                seen.push(Observation {
                    at: Instant::now(),
                    status: response.status().as_u16(),
                    problem,
                });
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            seen
        });
        Self { stop, task }
    }

    async fn finish(self) -> Vec<Observation> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.expect("load task")
    }
}

#[tokio::test]
#[ignore = "stops Redis; run by scripts/test.sh"]
async fn redis_outage_falls_back_to_the_database_and_recovers_by_itself() {
    require_services();
    let app = spawn_app_with(&[("cache.timeout_ms", json!(200))]).await;
    let mut ids = Vec::new();
    for i in 0..10 {
        let note: Value = app
            .post_json(
                "/api/v1/probe/notes",
                &json!({ "text": format!("cached {i}") }),
            )
            .await
            .json()
            .await
            .expect("json");
        ids.push(note["id"].as_i64().expect("id"));
    }
    let load = Load::start(&app, move |client, base, n| {
        if n % 3 == 0 {
            client
                .post(format!("{base}/api/v1/probe/notes"))
                .json(&json!({ "text": format!("during redis outage {n}") }))
        } else {
            client.get(format!("{base}/api/v1/probe/notes/{}", ids[n % ids.len()]))
        }
    });

    tokio::time::sleep(Duration::from_millis(500)).await;
    services(&["stop", "redis"]);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (status, cache) = check_status(&app, "core.cache").await;
    assert_eq!(
        (status, cache.as_str()),
        (200, "degraded"),
        "readyz during the outage"
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    services(&["start", "redis"]);

    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, cache) = check_status(&app, "core.cache").await;
        if (status, cache.as_str()) == (200, "up") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the cache did not recover: {status} {cache}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let seen = load.finish().await;
    let failed: Vec<&Observation> = seen.iter().filter(|o| o.status >= 300).collect();
    assert!(seen.len() > 50, "the load ran ({} requests)", seen.len());
    println!(
        "redis outage: {} requests, {} failed",
        seen.len(),
        failed.len()
    );
    assert!(
        failed.is_empty(),
        "requests failed during the Redis outage: {failed:?}"
    );

    let metrics = app.get("/metrics").await.text().await.expect("metrics");
    assert!(
        metrics.contains("cache_errors_total{operation="),
        "outage errors are counted"
    );
}

#[tokio::test]
#[ignore = "restarts PostgreSQL; run by scripts/test.sh"]
async fn postgres_restart_answers_503_problems_then_recovers_within_5_seconds() {
    require_services();
    let app = spawn_app_with(&[("database.acquire_timeout_ms", json!(1000))]).await;
    let load = Load::start(&app, |client, base, n| {
        client
            .post(format!("{base}/api/v1/probe/notes"))
            .json(&json!({ "text": format!("write {n}") }))
    });

    tokio::time::sleep(Duration::from_millis(500)).await;
    services(&["stop", "pg"]);
    tokio::time::sleep(Duration::from_secs(2)).await;
    services(&["start", "pg"]);
    let back = Instant::now();
    tokio::time::sleep(Duration::from_secs(6)).await;
    let seen = load.finish().await;

    let unexpected: Vec<&Observation> = seen
        .iter()
        .filter(|o| !(o.status == 201 || (o.status == 503 && o.problem)))
        .collect();
    assert!(
        unexpected.is_empty(),
        "only 201 or 503 problem+json expected: {unexpected:?}"
    );
    assert!(
        seen.iter().any(|o| o.status == 503),
        "the outage was observed as 503s ({} requests)",
        seen.len()
    );
    let recovered = seen
        .iter()
        .find(|o| o.at > back && o.status == 201)
        .map(|o| o.at.duration_since(back))
        .expect("writes succeed again after PostgreSQL returns");
    println!(
        "postgres restart: {} requests, {} answered 503, first success {recovered:?} after restart",
        seen.len(),
        seen.iter().filter(|o| o.status == 503).count()
    );
    assert!(
        recovered <= Duration::from_secs(5),
        "first success {recovered:?} after PostgreSQL was back"
    );
    assert!(
        seen.iter()
            .filter(|o| o.at > back + recovered)
            .all(|o| o.status == 201)
    );
}
