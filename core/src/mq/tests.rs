use std::collections::BTreeSet;

use super::*;
use crate::config::FileMqConfig;

/// A backend that records what it accepted and fails on cue: whole sends while `down`,
/// and the first attempt of every entry whose body starts with `flaky` or `bad`.
#[derive(Default)]
struct Scripted {
    accepted: Mutex<Vec<String>>,
    seen: Mutex<BTreeSet<String>>,
    down: AtomicBool,
    sends: AtomicUsize,
}

impl Transport for Scripted {
    fn backend(&self) -> &'static str {
        "scripted"
    }
    fn limits(&self) -> BatchLimits {
        BatchLimits {
            max_messages: 10,
            max_bytes: 100,
            max_in_flight: 4,
        }
    }
    fn send<'a>(
        &'a self,
        batch: &'a [OutboundMessage],
    ) -> BoxFuture<'a, Result<Vec<EntryFailure>, String>> {
        Box::pin(async move {
            self.sends.fetch_add(1, Ordering::SeqCst);
            assert!(batch.len() <= 10);
            assert!(batch.iter().map(|m| m.body.len()).sum::<usize>() <= 100);
            if self.down.load(Ordering::SeqCst) {
                return Err("connection refused".into());
            }
            let mut failures = Vec::new();
            for (index, message) in batch.iter().enumerate() {
                let first = self.seen.lock().expect("seen").insert(message.id.clone());
                if message.body.starts_with("bad") {
                    failures.push(EntryFailure {
                        index,
                        retryable: false,
                        reason: "malformed".into(),
                    });
                } else if message.body.starts_with("flaky") && first {
                    failures.push(EntryFailure {
                        index,
                        retryable: true,
                        reason: "throttled".into(),
                    });
                } else {
                    self.accepted
                        .lock()
                        .expect("accepted")
                        .push(message.id.clone());
                }
            }
            Ok(failures)
        })
    }
    fn check(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            if self.down.load(Ordering::SeqCst) {
                Err("connection refused".into())
            } else {
                Ok(())
            }
        })
    }
    fn close(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async { Ok(()) })
    }
}

fn config(buffer: usize) -> MqConfig {
    MqConfig {
        buffer,
        retry_backoff_ms: 1,
        retry_backoff_max_ms: 5,
        drain_timeout_ms: 5_000,
        ..MqConfig::default()
    }
}

fn message(id: usize, body: &str) -> OutboundMessage {
    OutboundMessage {
        id: format!("m{id}"),
        body: body.to_owned(),
    }
}

#[tokio::test]
async fn every_message_is_delivered_once_in_batches_within_limits_and_retried_entries_too() {
    let transport = Arc::new(Scripted::default());
    let queue = MessageQueue::with_transport(&config(1_000), transport.clone());
    for i in 0..500 {
        let body = match i % 50 {
            0 => "flaky entry",
            _ => "an ordinary message",
        };
        queue.publish(message(i, body)).await.expect("open");
    }
    assert_eq!(queue.close(Duration::MAX).await, 0);
    let accepted = transport.accepted.lock().expect("accepted").clone();
    assert_eq!(accepted.len(), 500);
    assert_eq!(
        accepted.iter().collect::<BTreeSet<_>>().len(),
        500,
        "no duplicates"
    );
    assert!(
        transport.sends.load(Ordering::SeqCst) >= 100,
        "at most 5 bodies of 19 bytes fit 100 bytes"
    );
    assert_eq!(queue.publish(message(1, "late")).await, Err(QueueClosed));
}

#[tokio::test]
async fn messages_wait_while_the_backend_is_down_and_arrive_when_it_returns() {
    let transport = Arc::new(Scripted::default());
    transport.down.store(true, Ordering::SeqCst);
    let queue = MessageQueue::with_transport(&config(1_000), transport.clone());
    for i in 0..30 {
        queue.publish(message(i, "waiting")).await.expect("open");
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(queue.buffered(), 30);
    assert_eq!(
        queue.check().await.status,
        crate::readiness::CheckStatus::Degraded
    );
    transport.down.store(false, Ordering::SeqCst);
    assert_eq!(queue.close(Duration::MAX).await, 0);
    assert_eq!(transport.accepted.lock().expect("accepted").len(), 30);
}

#[tokio::test]
async fn a_full_buffer_makes_publishing_wait() {
    let transport = Arc::new(Scripted::default());
    transport.down.store(true, Ordering::SeqCst);
    let queue = MessageQueue::with_transport(&config(5), transport.clone());
    // Up to 4 batches leave the buffer for sending, so at most 4 × 10 + 5 fit.
    let mut published = 0;
    while published < 100 {
        let publish = queue.publish(message(published, "x"));
        if tokio::time::timeout(Duration::from_millis(50), publish)
            .await
            .is_err()
        {
            break;
        }
        published += 1;
    }
    assert!(published < 100, "publishing waits once the buffer is full");
    transport.down.store(false, Ordering::SeqCst);
    assert_eq!(queue.close(Duration::MAX).await, 0);
    assert_eq!(
        transport.accepted.lock().expect("accepted").len(),
        published
    );
}

#[tokio::test]
async fn entries_refused_for_good_are_counted_not_retried() {
    let transport = Arc::new(Scripted::default());
    let queue = MessageQueue::with_transport(&config(100), transport.clone());
    queue.publish(message(1, "bad body")).await.expect("open");
    queue.publish(message(2, "good body")).await.expect("open");
    assert_eq!(queue.close(Duration::MAX).await, 0);
    assert_eq!(*transport.accepted.lock().expect("accepted"), ["m2"]);
}

#[tokio::test]
async fn the_file_backend_appends_lines_and_rotates_keeping_every_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = FileMqConfig {
        directory: dir.path().join("events"),
        max_file_bytes: 1_000,
        ..FileMqConfig::default()
    };
    let transport = FileTransport::open(&file).expect("opens");
    let bodies: Vec<_> = (0..100)
        .map(|i| OutboundMessage {
            id: format!("e{i}"),
            body: serde_json::json!({ "id": format!("e{i}"), "pad": "0123456789" }).to_string(),
        })
        .collect();
    let batch_bytes = bodies[..5].iter().map(|m| m.body.len() + 1).sum::<usize>();
    for batch in bodies.chunks(5) {
        assert_eq!(transport.send(batch).await, Ok(Vec::new()));
    }
    assert_eq!(transport.check().await, Ok(()));
    assert_eq!(transport.close().await, Ok(()));
    let mut ids = BTreeSet::new();
    let mut files = 0;
    for entry in std::fs::read_dir(&file.directory).expect("dir") {
        let path = entry.expect("entry").path();
        files += 1;
        let text = std::fs::read_to_string(&path).expect("read");
        assert!(
            text.len() <= 1_000 + batch_bytes,
            "{} has {} bytes",
            path.display(),
            text.len()
        );
        for line in text.lines() {
            let value: serde_json::Value = serde_json::from_str(line).expect("one JSON per line");
            ids.insert(value["id"].as_str().expect("id").to_owned());
        }
    }
    assert!(files > 2, "rotated into {files} files");
    assert_eq!(ids.len(), 100);
}

#[tokio::test]
async fn the_file_backend_ends_a_cut_line_before_appending() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("events.ndjson"),
        "{\"id\":\"whole\"}\n{\"id\":\"cu",
    )
    .expect("write");
    let file = FileMqConfig {
        directory: dir.path().to_path_buf(),
        max_file_bytes: 1 << 20,
        ..FileMqConfig::default()
    };
    let transport = FileTransport::open(&file).expect("opens");
    transport
        .send(&[message(1, "{\"id\":\"next\"}")])
        .await
        .expect("written");
    let text = std::fs::read_to_string(dir.path().join("events.ndjson")).expect("read");
    assert_eq!(text.lines().last(), Some("{\"id\":\"next\"}"));
}
