//! Events that survive a crash: with `mq.durability = "disk"` (the default) an event
//! answered 202 is in the spool, synced, so SIGKILL loses none of them and a full disk
//! answers 503 instead of a 202 it cannot keep.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use serde_json::{Value, json};

use crate::{
    bi::batch,
    helpers::{
        Accounts as _, TestStorage, assert_problem, check_status, env_name, spawn_app_on,
        spawn_app_with,
    },
    process::{free_port, server, terminate, wait_exit, wait_healthy},
    sqs::{Sqs, tally},
};

/// The ids of a 202 answer.
fn ids(answer: &Value) -> impl Iterator<Item = String> + '_ {
    answer["ids"]
        .as_array()
        .expect("ids")
        .iter()
        .map(|id| id.as_str().expect("id").to_owned())
}

/// Clients posting batches of 20 events as fast as they can, each on its own
/// connection, until the server stops answering.
struct Load {
    accepted: Arc<Mutex<Vec<String>>>,
    clients: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(port: u16, clients: usize) -> Self {
        let accepted = Arc::new(Mutex::new(Vec::new()));
        let clients = (0..clients)
            .map(|client| {
                let accepted = accepted.clone();
                tokio::spawn(async move {
                    let http = reqwest::Client::new();
                    let url = format!("http://127.0.0.1:{port}/api/v1/bi/events");
                    for round in 0.. {
                        let body = batch(20, &format!("c{client}r{round}"));
                        let Ok(response) = http.post(&url).json(&body).send().await else {
                            return; // the server is gone
                        };
                        if response.status() != 202 {
                            continue;
                        }
                        let Ok(answer) = response.json::<Value>().await else {
                            return;
                        };
                        accepted.lock().expect("ids").extend(ids(&answer));
                    }
                })
            })
            .collect();
        Self { accepted, clients }
    }

    fn accepted(&self) -> usize {
        self.accepted.lock().expect("ids").len()
    }

    /// The ids answered 202, once every client has stopped.
    async fn finish(self) -> Vec<String> {
        for client in self.clients {
            client.await.expect("client");
        }
        std::mem::take(&mut *self.accepted.lock().expect("ids"))
    }
}

/// The server binary on `storage`, with `settings` on top.
fn trellis(port: u16, storage: &TestStorage, settings: &[(&str, Value)]) -> Command {
    let mut command = server(port, storage);
    for (key, value) in settings {
        let value = value
            .as_str()
            .map_or_else(|| value.to_string(), str::to_owned);
        command.env(env_name(key), value);
    }
    command.stdout(Stdio::null()).stderr(Stdio::inherit());
    command
}

/// A server from `command` on a free port, once it answers `/healthz`.
async fn started(command: impl FnOnce(u16) -> Command) -> (u16, Child) {
    let port = free_port();
    let child = command(port).spawn().expect("the server starts");
    wait_healthy(port).await;
    (port, child)
}

/// The loads come from one address; the ingest limits are tested elsewhere.
fn unlimited() -> Vec<(&'static str, Value)> {
    vec![
        ("modules.bi.rate_per_address", json!(1_000_000)),
        ("modules.bi.burst_per_address", json!(1_000_000)),
    ]
}

/// Starts the server, loads it, kills it with SIGKILL once `enough` events were answered
/// 202 (or after `within`), starts it again on the same storage and stops it gracefully
/// (which delivers what the spool holds). Answers the ids that were answered 202.
async fn killed_under_load(
    command: impl Fn(u16) -> Command,
    enough: usize,
    within: Duration,
) -> Vec<String> {
    let (port, mut child) = started(&command).await;
    let load = Load::start(port, 4);
    let loading = Instant::now();
    while load.accepted() < enough && loading.elapsed() < within {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    child.kill().expect("SIGKILL");
    child.wait().expect("killed");
    let accepted = load.finish().await;
    assert!(
        accepted.len() >= 100,
        "the load ran ({} accepted)",
        accepted.len()
    );

    let (_, mut child) = started(&command).await;
    terminate(&child);
    let status = wait_exit(&mut child, Duration::from_secs(150));
    assert_eq!(status.code(), Some(0), "the drain delivered everything");
    accepted
}

/// Fails naming how many of `accepted` are not among `delivered`; prints the duplicates.
fn assert_all_delivered(backend: &str, accepted: &[String], delivered: &[Value]) {
    let (ids, repeated) = tally(delivered);
    let missing = accepted.iter().filter(|id| !ids.contains(*id)).count();
    assert_eq!(
        missing,
        0,
        "{backend}: {missing} of {} events answered 202 were lost",
        accepted.len()
    );
    println!(
        "sigkill ({backend}): {} events answered 202 before the kill, all delivered; \
         {repeated} ids delivered twice (sent after the last checkpoint)",
        accepted.len()
    );
}

#[tokio::test]
async fn sigkill_under_bi_load_loses_no_event_answered_202() {
    let storage = TestStorage::new().await;
    let settings = unlimited();
    let accepted = killed_under_load(
        |port| trellis(port, &storage, &settings),
        usize::MAX,
        Duration::from_secs(1),
    )
    .await;
    // Each line is one whole JSON document (written_events parses every one).
    assert_all_delivered("file", &accepted, &storage.written_events());
}

#[tokio::test]
#[ignore = "needs the SQS-compatible server; scripts/test.sh runs it"]
async fn sigkill_under_bi_load_loses_no_event_answered_202_on_sqs() {
    let sqs = Sqs::queue().await;
    let consumer = sqs.consume();
    let storage = TestStorage::new().await;
    let accepted = killed_under_load(
        |port| {
            let mut command = sqs.server(port, &storage);
            command.stdout(Stdio::null()).stderr(Stdio::inherit());
            command
        },
        // moto slows down as its queue grows: a few hundred events are enough.
        200,
        Duration::from_secs(5),
    )
    .await;
    assert_all_delivered("sqs", &accepted, &consumer.finish().await);
}

/// A small tmpfs, unmounted when dropped (lazily: a server that failed may still hold
/// files there).
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("mount runs");
        assert!(status.success(), "mount a tmpfs (needs root)");
        Self { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// The lines of the event files in `events` (rotated ones, or all), in file order.
fn event_files(events: &Path, rotated_only: bool) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(events)
        .expect("events folder")
        .map(|e| e.expect("entry").path())
        .filter(|p| {
            let name = p.file_name().map(|n| n.to_string_lossy().into_owned());
            name.is_some_and(|n| {
                n.ends_with(".ndjson") && (!rotated_only || n.starts_with("events-"))
            })
        })
        .collect();
    files.sort();
    files
}

/// Every line of `file` as JSON: a cut or damaged line fails, naming the file.
fn lines(file: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(file).expect("readable");
    assert!(
        text.is_empty() || text.ends_with('\n'),
        "{} ends with a cut line",
        file.display()
    );
    text.lines()
        .map(|line| {
            serde_json::from_str(line).unwrap_or_else(|e| {
                panic!("{}: not one JSON document ({e}): {line}", file.display())
            })
        })
        .collect()
}

#[tokio::test]
#[ignore = "mounts a tmpfs (needs root); scripts/test.sh runs it"]
async fn a_full_disk_answers_503_loses_nothing_and_recovers_when_space_is_freed() {
    let small = Tmpfs::mount("2m");
    let events = small.path().join("events");
    let mut settings = unlimited();
    settings.extend([
        ("mq.spool.directory", json!(small.path().join("spool"))),
        ("mq.spool.segment_bytes", json!(64 * 1024)),
        ("mq.file.directory", json!(events)),
        ("mq.file.max_file_bytes", json!(128 * 1024)),
        ("mq.file.max_total_bytes", json!(1u64 << 30)),
        ("mq.retry_backoff_max_ms", json!(200)),
    ]);
    let app = spawn_app_with(&settings).await;

    let mut accepted: Vec<String> = Vec::new();
    let mut refused = 0;
    for round in 0..5_000 {
        let response = app
            .post_json("/api/v1/bi/events", &batch(20, &format!("r{round}")))
            .await;
        if response.status() == 503 {
            assert!(response.headers().contains_key("retry-after"));
            let problem = assert_problem(response, 503).await;
            assert_eq!(
                problem["type"], "urn:trellis:problem:event-queue-unavailable",
                "{problem}"
            );
            refused += 1;
            if refused == 5 {
                break;
            }
            continue;
        }
        assert_eq!(response.status(), 202);
        let answer: Value = response.json().await.expect("json");
        accepted.extend(ids(&answer));
    }
    assert_eq!(refused, 5, "the disk filled up and publishing said so");
    let (_, queue) = check_status(&app, "core.queue").await;
    assert_eq!(queue, "degraded");

    // A shipper takes the rotated files away; ingestion then recovers by itself.
    let mut delivered = Vec::new();
    for file in event_files(&events, true) {
        delivered.extend(lines(&file));
        std::fs::remove_file(&file).expect("removed");
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let response = app
            .post_json("/api/v1/bi/events", &batch(20, "after"))
            .await;
        if response.status() == 202 {
            let answer: Value = response.json().await.expect("json");
            accepted.extend(ids(&answer));
            break;
        }
        assert_problem(response, 503).await;
        assert!(Instant::now() < deadline, "ingestion never recovered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    app.stop().await.expect("clean stop");

    for file in event_files(&events, false) {
        delivered.extend(lines(&file));
    }
    let (ids, repeated) = tally(&delivered);
    let missing = accepted.iter().filter(|id| !ids.contains(*id)).count();
    assert_eq!(missing, 0, "of {} events answered 202", accepted.len());
    assert_eq!(
        repeated, 0,
        "a failed write is cut off, never written twice"
    );
    let unique: BTreeSet<&String> = accepted.iter().collect();
    assert_eq!(unique.len(), accepted.len());
    println!(
        "disk full: {} events answered 202, {refused} requests answered 503, all delivered once",
        accepted.len()
    );
}

/// Clients registering accounts as fast as they can (a tenth of them with an e-mail
/// already taken), until the server stops answering. Answers the ids answered 201.
async fn register_until_gone(port: u16, clients: usize) -> Vec<String> {
    let created = Arc::new(Mutex::new(Vec::new()));
    let tasks: Vec<_> = (0..clients)
        .map(|client| {
            let created = created.clone();
            tokio::spawn(async move {
                let http = reqwest::Client::new();
                let url = format!("http://127.0.0.1:{port}/api/v1/users");
                for n in 0.. {
                    let taken = n % 10 == 9;
                    let email = if taken {
                        format!("c{client}n0@example.com")
                    } else {
                        format!("c{client}n{n}@example.com")
                    };
                    let body = json!({
                        "email": email, "password": "correct horse battery",
                        "first_name": "Ada", "last_name": "Lovelace"
                    });
                    let Ok(response) = http.post(&url).json(&body).send().await else {
                        return;
                    };
                    if response.status() != 201 {
                        continue;
                    }
                    let Ok(user) = response.json::<Value>().await else {
                        return;
                    };
                    let id = user["id"].as_str().expect("id").to_owned();
                    created.lock().expect("ids").push(id);
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("client");
    }
    std::mem::take(&mut *created.lock().expect("ids"))
}

/// The user ids of the `user.registered` BI events written so far.
fn registered_events(storage: &TestStorage) -> Vec<String> {
    storage
        .written_events()
        .iter()
        .filter(|event| event["name"] == "user.registered")
        .map(|event| event["user_id"].as_str().expect("user_id").to_owned())
        .collect()
}

#[tokio::test]
async fn sigkill_during_registrations_loses_no_event_of_a_committed_account() {
    let storage = TestStorage::new().await;
    let settings = vec![
        ("modules.user.registrations_per_address", json!(1_000_000)),
        // A relay that dies with its claims hands them over quickly.
        ("events.lease_ms", json!(3_000)),
        ("events.handler_timeout_ms", json!(2_000)),
    ];
    let (port, mut child) = started(|port| trellis(port, &storage, &settings)).await;
    let load = tokio::spawn(register_until_gone(port, 4));
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    child.kill().expect("SIGKILL");
    child.wait().expect("killed");
    let created = load.await.expect("load");
    assert!(
        created.len() >= 10,
        "the load ran ({} created)",
        created.len()
    );

    let (_, mut child) = started(|port| trellis(port, &storage, &settings)).await;
    let wanted: BTreeSet<&String> = created.iter().collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    while registered_events(&storage)
        .iter()
        .collect::<BTreeSet<_>>()
        .intersection(&wanted)
        .count()
        < wanted.len()
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    terminate(&child);
    assert_eq!(
        wait_exit(&mut child, Duration::from_secs(30)).code(),
        Some(0)
    );

    let events = registered_events(&storage);
    let delivered: BTreeSet<&String> = events.iter().collect();
    let missing = wanted.difference(&delivered).count();
    assert_eq!(
        missing,
        0,
        "{missing} of {} accounts answered 201 have no user.registered event",
        wanted.len()
    );
    // An event only for a committed account: every one names an account in the database
    // (registrations cut by the kill, or refused as taken, left neither).
    let mut conn = storage.connection().await;
    let accounts: BTreeSet<String> = sqlx::query_scalar::<_, String>("SELECT id FROM users")
        .fetch_all(&mut conn)
        .await
        .expect("users")
        .into_iter()
        .collect();
    let orphans: Vec<&&String> = delivered
        .iter()
        .filter(|id| !accounts.contains(id.as_str()))
        .collect();
    assert!(orphans.is_empty(), "events without an account: {orphans:?}");
    println!(
        "sigkill (registrations): {} accounts answered 201 before the kill, {} in the \
         database, {} user.registered events delivered ({} ids twice)",
        wanted.len(),
        accounts.len(),
        events.len(),
        events.len() - delivered.len()
    );
}

#[tokio::test]
async fn registrations_answered_while_the_queue_refuses_get_their_events_once_it_takes_them() {
    // A spool that fits no message: the queue refuses every BI event.
    let refusing = [
        ("mq.spool.segment_bytes", json!(100)),
        ("mq.spool.max_bytes", json!(100)),
        ("events.max_attempts", json!(1_000)),
        ("events.retry_backoff_ms", json!(50)),
        ("events.retry_backoff_max_ms", json!(200)),
    ];
    let app = spawn_app_on(TestStorage::new().await, &refusing).await;
    let mut ids = BTreeSet::new();
    for n in 0..3 {
        ids.insert(
            app.register(&format!("refused{n}@example.com"), "correct horse battery")
                .await,
        );
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let storage = app.stop_keeping_storage().await;
    assert!(
        registered_events(&storage).is_empty(),
        "nothing reached the queue while it refused"
    );

    // The same storage, a queue that takes them: the events were kept, not dropped.
    let app = spawn_app_on(storage, &[("events.poll_ms", json!(50))]).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let delivered = loop {
        let delivered: BTreeSet<String> = registered_events(&app.storage).into_iter().collect();
        if delivered.is_superset(&ids) || Instant::now() > deadline {
            break delivered;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        delivered.is_superset(&ids),
        "user.registered events of {:?} were lost",
        ids.difference(&delivered).collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn a_killed_instances_claims_are_delivered_by_another_once_their_lease_runs_out() {
    let storage = TestStorage::new().await;
    let settings = vec![
        ("events.lease_ms", json!(2_000)),
        ("events.handler_timeout_ms", json!(1_500)),
        ("events.poll_ms", json!(100)),
    ];
    let count = |sql: &'static str| {
        let storage = &storage;
        async move { storage.fetch_i64s(sql).await[0] }
    };
    let (port, mut first) = started(|port| trellis(port, &storage, &settings)).await;
    // The probe module's handler hangs, holding its claim, while this row is there.
    storage
        .execute_sql("INSERT INTO probe_event_faults (reason) VALUES ('hang')")
        .await;
    let response = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{port}/api/v1/users"))
        .json(&json!({
            "email": "claimed@example.com", "password": "correct horse battery",
            "first_name": "Ada", "last_name": "Lovelace"
        }))
        .send()
        .await
        .expect("registers");
    assert_eq!(response.status(), 201);
    let claimed = "SELECT COUNT(*) FROM trellis_event_publications \
                   WHERE listener = 'probe' AND claimed_by IS NOT NULL AND status = 'pending'";
    let deadline = Instant::now() + Duration::from_secs(10);
    while count(claimed).await == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(count(claimed).await, 1, "the first instance claimed it");
    let claimed_at = Instant::now();
    first.kill().expect("SIGKILL");
    first.wait().expect("killed");
    storage.execute_sql("DELETE FROM probe_event_faults").await;

    let (_, mut second) = started(|port| trellis(port, &storage, &settings)).await;
    let completed = "SELECT COUNT(*) FROM trellis_event_publications \
                     WHERE listener = 'probe' AND status = 'completed'";
    let deadline = Instant::now() + Duration::from_secs(15);
    while count(completed).await == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let waited = claimed_at.elapsed();
    assert_eq!(
        count(completed).await,
        1,
        "the second instance delivered it"
    );
    assert!(
        waited >= Duration::from_millis(1_800),
        "not before the lease ran out ({waited:?} after the claim was seen)"
    );
    terminate(&second);
    assert_eq!(
        wait_exit(&mut second, Duration::from_secs(30)).code(),
        Some(0)
    );
    println!("lease take-over: delivered {waited:?} after the claim was seen (lease 2 s)");
}
