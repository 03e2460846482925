//! BI events through a real SQS-compatible server (moto), read back through the SQS API.
//! `scripts/test.sh` runs these (`--ignored`, one at a time: one pauses the server) after
//! `scripts/services.sh start` exported `TEST_SQS_ENDPOINT`, dummy credentials and
//! `AWS_EC2_METADATA_DISABLED=true`.

use std::{
    collections::{BTreeMap, BTreeSet},
    process::Command,
    sync::Arc,
    time::{Duration, Instant},
};

use aws_sdk_sqs::Client;
use serde_json::{Value, json};
use tokio::sync::Mutex;

use crate::{
    bi::{accepted_ids, batch, refuse_hostile_requests},
    helpers::{TestStorage, assert_problem, check_status, env_name, spawn_app_with},
    process::{free_port, server, terminate, wait_exit, wait_healthy},
    traces,
};

pub(crate) struct Sqs {
    client: Client,
    endpoint: String,
    url: String,
}

impl Sqs {
    /// A fresh queue on the server `TEST_SQS_ENDPOINT` names.
    pub(crate) async fn queue() -> Self {
        let endpoint = std::env::var("TEST_SQS_ENDPOINT")
            .expect("TEST_SQS_ENDPOINT (scripts/services.sh start prints it)");
        assert_eq!(
            std::env::var("AWS_EC2_METADATA_DISABLED").as_deref(),
            Ok("true"),
            "never reach for cloud metadata in tests"
        );
        let config = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .http_client(trellis_core::mq::https_client())
            .endpoint_url(&endpoint)
            .region(aws_config::Region::new("us-east-1"))
            .load()
            .await;
        let client = Client::new(&config);
        let name = format!("t-{}", uuid::Uuid::new_v4().simple());
        let url = client
            .create_queue()
            .queue_name(&name)
            .send()
            .await
            .expect("CreateQueue")
            .queue_url()
            .expect("queue url")
            .to_owned();
        Self {
            client,
            endpoint,
            url,
        }
    }

    /// Settings that point the server at this queue.
    pub(crate) fn settings(&self) -> Vec<(&'static str, Value)> {
        // The backend last: each setting is checked as it applies.
        vec![
            ("mq.sqs.queue_url", json!(self.url)),
            ("mq.sqs.endpoint_url", json!(self.endpoint)),
            ("mq.sqs.region", json!("us-east-1")),
            ("mq.retry_backoff_max_ms", json!(500)),
            // moto takes about 100 ms per SendMessageBatch: give the drain time, within
            // a shutdown budget as long.
            ("mq.drain_timeout_ms", json!(120_000)),
            ("server.shutdown_timeout_ms", json!(120_000)),
            // The loads here come from one address; the ingest limits are tested elsewhere.
            ("modules.bi.rate_per_address", json!(1_000_000)),
            ("modules.bi.burst_per_address", json!(1_000_000)),
            ("mq.backend", json!("sqs")),
        ]
    }

    /// The binary on `port`, sending to this queue.
    pub(crate) fn server(&self, port: u16, storage: &TestStorage) -> Command {
        let mut command = server(port, storage);
        for (key, value) in self.settings() {
            let value = value
                .as_str()
                .map_or_else(|| value.to_string(), str::to_owned);
            command.env(env_name(key), value);
        }
        for key in [
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_EC2_METADATA_DISABLED",
        ] {
            command.env(key, std::env::var(key).expect("set by services.sh"));
        }
        command
    }

    /// Starts reading (and deleting) messages as they arrive, as a real consumer does;
    /// moto slows down as its queues grow.
    pub(crate) fn consume(&self) -> Consumer {
        let (client, url) = (self.client.clone(), self.url.clone());
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            let mut bodies = Vec::new();
            let mut empty_after_stop = 0;
            while empty_after_stop < 3 {
                let output = client
                    .receive_message()
                    .queue_url(&url)
                    .max_number_of_messages(10)
                    .send()
                    .await
                    .expect("ReceiveMessage");
                let messages = output.messages();
                if messages.is_empty() {
                    if *stopped.borrow_and_update() {
                        empty_after_stop += 1;
                    }
                    // Short polls: moto's long poll spins and slows every other call.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
                empty_after_stop = 0;
                let mut delete = client.delete_message_batch().queue_url(&url);
                for (i, message) in messages.iter().enumerate() {
                    let body = message.body().expect("body");
                    bodies.push(serde_json::from_str(body).expect("each body is one JSON event"));
                    delete = delete.entries(
                        aws_sdk_sqs::types::DeleteMessageBatchRequestEntry::builder()
                            .id(i.to_string())
                            .receipt_handle(message.receipt_handle().expect("handle"))
                            .build()
                            .expect("entry"),
                    );
                }
                delete.send().await.expect("DeleteMessageBatch");
            }
            bodies
        });
        Consumer { stop, task }
    }
}

/// Reads the queue in the background.
pub(crate) struct Consumer {
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<Vec<Value>>,
}

impl Consumer {
    /// Every body read, once the queue has stayed empty for three polls.
    pub(crate) async fn finish(self) -> Vec<Value> {
        self.stop.send_replace(true);
        self.task.await.expect("consumer")
    }
}

/// Ids per occurrence: (distinct ids, ids seen more than once).
pub(crate) fn tally(bodies: &[Value]) -> (BTreeSet<String>, usize) {
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for body in bodies {
        *counts
            .entry(
                body["id"]
                    .as_str()
                    .expect("every message carries its id")
                    .to_owned(),
            )
            .or_default() += 1;
    }
    let repeated = counts.values().filter(|n| **n > 1).count();
    (counts.into_keys().collect(), repeated)
}

/// Freezes the SQS server (SIGSTOP) until dropped.
struct Paused;

impl Paused {
    fn sqs() -> Self {
        services("pause");
        Self
    }
}

impl Drop for Paused {
    fn drop(&mut self) {
        services("resume");
    }
}

fn services(action: &str) {
    let ctl = std::env::var("TEST_SERVICES_CTL").expect("TEST_SERVICES_CTL (scripts/services.sh)");
    let status = Command::new(ctl)
        .args([action, "sqs"])
        .status()
        .expect("services.sh runs");
    assert!(status.success(), "services.sh {action} sqs");
}

#[tokio::test]
#[ignore = "needs the SQS-compatible server; scripts/test.sh runs it"]
async fn thousands_of_events_arrive_exactly_once() {
    let sqs = Sqs::queue().await;
    let consumer = sqs.consume();
    let app = Arc::new(spawn_app_with(&sqs.settings()).await);
    let mut tasks = Vec::new();
    for worker in 0..5 {
        let app = app.clone();
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for round in 0..4 {
                ids.extend(accepted_ids(&app, &batch(100, &format!("w{worker}r{round}"))).await);
                ids.extend(accepted_ids(&app, &json!({"name": "single.event"})).await);
            }
            ids
        }));
    }
    let mut accepted = Vec::new();
    for task in tasks {
        accepted.extend(task.await.expect("task"));
    }
    assert_eq!(accepted.len(), 2_020);
    Arc::into_inner(app)
        .expect("sole owner")
        .stop()
        .await
        .expect("clean stop");

    let bodies = consumer.finish().await;
    let (ids, repeated) = tally(&bodies);
    assert_eq!(repeated, 0, "no event twice");
    assert_eq!(bodies.len(), 2_020, "no event lost, none extra");
    assert_eq!(ids, accepted.into_iter().collect::<BTreeSet<_>>());
    println!("exactly once: {} events", bodies.len());
}

#[tokio::test]
#[ignore = "pauses the SQS-compatible server; scripts/test.sh runs it alone"]
async fn events_wait_out_an_sqs_outage_and_a_full_queue_answers_503() {
    let sqs = Sqs::queue().await;
    let consumer = sqs.consume();
    let mut settings = sqs.settings();
    settings.extend([
        // Above moto's own pace with a backlog (a call takes seconds with 2,000 messages
        // queued), so that only the pause times a send out.
        ("mq.sqs.timeout_ms", json!(5000)),
        // About 250 events of this test fit before publishing is refused.
        ("mq.spool.segment_bytes", json!(32 * 1024)),
        ("mq.spool.max_bytes", json!(128 * 1024)),
    ]);
    let app = spawn_app_with(&settings).await;
    accepted_ids(&app, &batch(10, "before")).await;

    let mut accepted: Vec<String> = Vec::new();
    let mut rejected = 0;
    {
        let _paused = Paused::sqs();
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(4) {
            let response = app
                .post_json("/api/v1/bi/events", &batch(20, "outage"))
                .await;
            if response.status() == 503 {
                assert_eq!(
                    response
                        .headers()
                        .get("retry-after")
                        .map(|v| v.to_str().ok()),
                    Some(Some("1"))
                );
                assert_problem(response, 503).await;
                rejected += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            } else {
                assert_eq!(response.status(), 202);
                let answer: Value = response.json().await.expect("json");
                accepted.extend(
                    answer["ids"]
                        .as_array()
                        .expect("ids")
                        .iter()
                        .map(|id| id.as_str().expect("id").to_owned()),
                );
            }
        }
        let (_, queue) = check_status(&app, "core.queue").await;
        assert!(!queue.is_empty(), "/readyz lists core.queue");
        assert_ne!(queue, "up");
    }
    assert!(rejected > 0, "the bounded queue filled up and said so");
    assert!(!accepted.is_empty());
    println!(
        "outage: {} events accepted, {rejected} requests answered 503",
        accepted.len()
    );
    // The backlog drains at moto's pace; a client honours Retry-After meanwhile.
    let deadline = Instant::now() + Duration::from_secs(60);
    let after = loop {
        let response = app
            .post_json("/api/v1/bi/events", &batch(10, "after"))
            .await;
        if response.status() == 202 {
            let answer: Value = response.json().await.expect("json");
            break vec![answer["ids"][0].as_str().expect("id").to_owned()];
        }
        assert_problem(response, 503).await;
        assert!(Instant::now() < deadline, "the queue never recovered");
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    app.stop().await.expect("clean stop");

    let bodies = consumer.finish().await;
    let (ids, repeated) = tally(&bodies);
    let missing: Vec<_> = accepted
        .iter()
        .chain(&after)
        .filter(|id| !ids.contains(*id))
        .collect();
    assert!(missing.is_empty(), "{} accepted events lost", missing.len());
    println!(
        "outage: {} messages read, {repeated} ids seen twice (a send that timed out while the server was frozen, then landed)",
        bodies.len()
    );
}

#[tokio::test]
#[ignore = "needs the SQS-compatible server; scripts/test.sh runs it"]
async fn sigterm_during_a_load_loses_no_accepted_event() {
    let sqs = Sqs::queue().await;
    let consumer = sqs.consume();
    let storage = TestStorage::new().await;
    let port = free_port();
    let mut child = sqs.server(port, &storage).spawn().expect("server starts");
    wait_healthy(port).await;

    let accepted = Arc::new(Mutex::new(Vec::<String>::new()));
    let client = reqwest::Client::new();
    let mut load = Vec::new();
    for worker in 0..2 {
        let (accepted, client) = (accepted.clone(), client.clone());
        load.push(tokio::spawn(async move {
            let url = format!("http://127.0.0.1:{port}/api/v1/bi/events");
            for round in 0.. {
                tokio::time::sleep(Duration::from_millis(50)).await;
                let Ok(response) = client
                    .post(&url)
                    .json(&batch(10, &format!("w{worker}r{round}")))
                    .send()
                    .await
                else {
                    return; // the server stopped listening
                };
                if response.status() != 202 {
                    continue;
                }
                let Ok(answer) = response.json::<Value>().await else {
                    return;
                };
                let ids = answer["ids"].as_array().expect("ids");
                accepted
                    .lock()
                    .await
                    .extend(ids.iter().map(|id| id.as_str().expect("id").to_owned()));
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    terminate(&child);
    let status = wait_exit(&mut child, Duration::from_secs(150));
    assert_eq!(status.code(), Some(0));
    for task in load {
        task.await.expect("load task");
    }
    let accepted = accepted.lock().await.clone();
    assert!(
        accepted.len() >= 100,
        "the load ran ({} accepted)",
        accepted.len()
    );

    let (ids, repeated) = tally(&consumer.finish().await);
    let missing = accepted.iter().filter(|id| !ids.contains(*id)).count();
    assert_eq!(
        missing,
        0,
        "of {} accepted events, {missing} missing",
        accepted.len()
    );
    assert_eq!(repeated, 0);
    println!(
        "sigterm: {} accepted events all on the queue",
        accepted.len()
    );
}

#[tokio::test]
#[ignore = "needs the SQS-compatible server; scripts/test.sh runs it"]
async fn rejected_requests_enqueue_nothing_and_odd_characters_survive() {
    let sqs = Sqs::queue().await;
    let consumer = sqs.consume();
    let app = spawn_app_with(&sqs.settings()).await;
    refuse_hostile_requests(&app).await;
    let odd = json!({"name": "odd.text", "properties": {"text": "nul\u{0} ffff\u{ffff} fffe\u{fffe} 😀 \"quoted\"\n"}});
    let ids = accepted_ids(&app, &odd).await;
    app.stop().await.expect("clean stop");

    let bodies: Vec<Value> = consumer
        .finish()
        .await
        .into_iter()
        .filter(|b| b["source"] == "client")
        .collect();
    assert_eq!(bodies.len(), 1, "only the accepted event: {bodies:?}");
    assert_eq!(bodies[0]["id"], ids[0].as_str());
    assert_eq!(bodies[0]["properties"], odd["properties"]);
}

#[tokio::test]
#[ignore = "needs the SQS-compatible server; scripts/test.sh runs it"]
async fn a_message_carries_the_traceparent_of_the_request_that_accepted_it() {
    const TRACE: &str = "5a000000000000000000000000000005";
    let sqs = Sqs::queue().await;
    let (endpoint, received) = traces::receiver().await;
    let storage = TestStorage::new().await;
    let port = free_port();
    let mut command = sqs.server(port, &storage);
    traces::export_to(&mut command, &endpoint);
    let mut child = command.spawn().expect("server starts");
    wait_healthy(port).await;

    let response = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{port}/api/v1/bi/events"))
        .header("traceparent", format!("00-{TRACE}-00f067aa0ba902b7-01"))
        .json(&json!({"name": "traced.event"}))
        .send()
        .await
        .expect("answers");
    assert_eq!(response.status(), 202);
    let spans = received
        .trace_with(TRACE, &["POST /api/v1/bi/events", "send sqs"])
        .await;
    let request = traces::named(&spans, "POST /api/v1/bi/events");
    let send = traces::named(&spans, "send sqs");
    assert!(
        traces::inside(send, request, &spans),
        "{}",
        traces::tree(&spans)
    );

    let deadline = Instant::now() + Duration::from_secs(20);
    let message = loop {
        let output = sqs
            .client
            .receive_message()
            .queue_url(&sqs.url)
            .message_attribute_names("All")
            .send()
            .await
            .expect("ReceiveMessage");
        if let Some(message) = output.messages().first() {
            break message.clone();
        }
        assert!(Instant::now() < deadline, "the message arrives");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let expected = format!("00-{TRACE}-{}-01", traces::hex(&request.span_id));
    let attribute = message
        .message_attributes()
        .and_then(|a| a.get("traceparent"))
        .unwrap_or_else(|| panic!("a traceparent attribute: {message:?}"));
    assert_eq!(attribute.data_type(), "String");
    assert_eq!(attribute.string_value(), Some(expected.as_str()));
    let body: Value = serde_json::from_str(message.body().expect("body")).expect("JSON");
    assert_eq!(body["traceparent"], expected);

    terminate(&child);
    assert_eq!(
        wait_exit(&mut child, Duration::from_secs(60)).code(),
        Some(0)
    );
}
