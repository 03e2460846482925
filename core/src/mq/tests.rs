use std::{collections::BTreeSet, fs::OpenOptions, path::Path};

use super::*;
use crate::config::{Durability, FileMqConfig, SpoolConfig};

/// A backend that records what it accepted and fails on cue: whole sends while `down`,
/// the first attempt of every entry whose body starts with `flaky` or `bad`, and syncs
/// while `unsyncable`.
#[derive(Default)]
struct Scripted {
    accepted: Mutex<Vec<String>>,
    seen: Mutex<BTreeSet<String>>,
    down: AtomicBool,
    sends: AtomicUsize,
    unsyncable: AtomicBool,
    syncs: AtomicUsize,
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
    fn sync(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            self.syncs.fetch_add(1, Ordering::SeqCst);
            match self.unsyncable.load(Ordering::SeqCst) {
                true => Err("input/output error".into()),
                false => Ok(()),
            }
        })
    }
    fn close(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async { Ok(()) })
    }
}

/// A queue with a memory buffer of `buffer` messages.
fn config(buffer: usize) -> MqConfig {
    MqConfig {
        durability: Durability::Memory,
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
        traceparent: None,
    }
}

#[tokio::test]
async fn every_message_is_delivered_once_in_batches_within_limits_and_retried_entries_too() {
    let transport = Arc::new(Scripted::default());
    let queue = MessageQueue::with_transport(&config(1_000), transport.clone()).expect("opens");
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
    assert_eq!(
        queue.publish(message(1, "late")).await,
        Err(PublishError::Closed)
    );
}

#[tokio::test]
async fn messages_wait_while_the_backend_is_down_and_arrive_when_it_returns() {
    let transport = Arc::new(Scripted::default());
    transport.down.store(true, Ordering::SeqCst);
    let queue = MessageQueue::with_transport(&config(1_000), transport.clone()).expect("opens");
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
async fn a_full_memory_buffer_refuses_whole_batches_until_the_backend_catches_up() {
    let transport = Arc::new(Scripted::default());
    transport.down.store(true, Ordering::SeqCst);
    let queue = MessageQueue::with_transport(&config(25), transport.clone()).expect("opens");
    let batch = |from: usize| {
        (from..from + 10)
            .map(|i| message(i, "x"))
            .collect::<Vec<_>>()
    };
    queue.publish_all(batch(0)).await.expect("room");
    queue.publish_all(batch(10)).await.expect("room");
    assert_eq!(
        queue.publish_all(batch(20)).await,
        Err(PublishError::BufferFull { capacity: 25 }),
        "ten more do not fit: none of them is taken"
    );
    assert_eq!(queue.buffered(), 20);
    transport.down.store(false, Ordering::SeqCst);
    assert_eq!(queue.close(Duration::MAX).await, 0);
    assert_eq!(transport.accepted.lock().expect("accepted").len(), 20);
}

#[tokio::test]
async fn entries_refused_for_good_are_counted_not_retried() {
    let transport = Arc::new(Scripted::default());
    let queue = MessageQueue::with_transport(&config(100), transport.clone()).expect("opens");
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
            traceparent: None,
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
async fn the_file_backend_removes_a_cut_line_before_appending() {
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
    assert_eq!(text, "{\"id\":\"whole\"}\n{\"id\":\"next\"}\n");
}

/// A queue with its spool under `directory`.
fn spooled(directory: &Path, max_bytes: u64) -> MqConfig {
    MqConfig {
        durability: Durability::Disk,
        spool: SpoolConfig {
            directory: directory.to_path_buf(),
            segment_bytes: 1_000,
            max_bytes,
            ..SpoolConfig::default()
        },
        ..config(1)
    }
}

/// The spool's segment files.
fn segment_files(directory: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(directory)
        .expect("folder")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".spool"))
        .collect();
    names.sort();
    names
}

#[tokio::test]
async fn spooled_messages_are_delivered_once_each_and_delivered_segments_are_removed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let transport = Arc::new(Scripted::default());
    let queue = MessageQueue::with_transport(&spooled(dir.path(), 1 << 20), transport.clone())
        .expect("opens");
    for i in 0..300 {
        let body = if i % 50 == 0 {
            "flaky entry"
        } else {
            "an ordinary message"
        };
        queue.publish(message(i, body)).await.expect("stored");
    }
    assert_eq!(queue.close(Duration::MAX).await, 0);
    let accepted = transport.accepted.lock().expect("accepted").clone();
    assert_eq!(accepted.len(), 300);
    assert_eq!(
        accepted.iter().collect::<BTreeSet<_>>().len(),
        300,
        "no duplicates"
    );
    assert_eq!(
        segment_files(dir.path()).len(),
        1,
        "segments of 1,000 bytes, every one but the live one delivered and removed"
    );
}

#[tokio::test]
async fn delivered_segments_are_reused_and_what_they_held_is_never_delivered_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let settings = spooled(dir.path(), 1 << 20);
    let spares = || {
        std::fs::read_dir(dir.path())
            .expect("folder")
            .filter(|e| e.as_ref().expect("entry").path().extension() == Some("spare".as_ref()))
            .count()
    };
    let mut next = 0;
    for round in 0..3 {
        let transport = Arc::new(Scripted::default());
        let queue = MessageQueue::with_transport(&settings, transport.clone()).expect("opens");
        assert_eq!(queue.buffered(), 0, "round {round}: nothing was left");
        for _ in 0..200 {
            queue
                .publish(message(next, "an ordinary message"))
                .await
                .expect("stored");
            next += 1;
        }
        assert_eq!(queue.close(Duration::MAX).await, 0);
        let accepted: BTreeSet<String> = transport
            .accepted
            .lock()
            .expect("accepted")
            .iter()
            .cloned()
            .collect();
        let expected: BTreeSet<String> = (next - 200..next).map(|i| format!("m{i}")).collect();
        assert_eq!(
            accepted, expected,
            "round {round}: this round's messages, each once"
        );
        assert_eq!(segment_files(dir.path()).len(), 1);
        assert_eq!(spares(), 2, "two delivered segments kept for reuse");
    }
}

#[tokio::test]
async fn what_the_spool_held_at_close_is_delivered_after_the_next_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let first = Arc::new(Scripted::default());
    first.down.store(true, Ordering::SeqCst);
    let settings = spooled(dir.path(), 1 << 20);
    let queue = MessageQueue::with_transport(&settings, first.clone()).expect("opens");
    for i in 0..40 {
        queue.publish(message(i, "waiting")).await.expect("stored");
    }
    assert_eq!(
        queue.close(Duration::from_millis(100)).await,
        0,
        "nothing is lost: the spool keeps it"
    );

    let second = Arc::new(Scripted::default());
    let queue = MessageQueue::with_transport(&settings, second.clone()).expect("opens again");
    assert_eq!(queue.buffered(), 40);
    assert_eq!(queue.close(Duration::MAX).await, 0);
    let accepted = second.accepted.lock().expect("accepted").clone();
    assert_eq!(
        accepted.iter().collect::<BTreeSet<_>>(),
        (0..40)
            .map(|i| format!("m{i}"))
            .collect::<Vec<_>>()
            .iter()
            .collect()
    );
    assert!(first.accepted.lock().expect("accepted").is_empty());
}

#[tokio::test]
async fn the_checkpoint_waits_for_the_backends_sync_so_what_it_could_not_sync_is_sent_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let settings = spooled(dir.path(), 1 << 20);
    let unsynced = Arc::new(Scripted::default());
    unsynced.unsyncable.store(true, Ordering::SeqCst);
    let queue = MessageQueue::with_transport(&settings, unsynced.clone()).expect("opens");
    for i in 0..40 {
        queue.publish(message(i, "accepted")).await.expect("stored");
    }
    assert_eq!(queue.close(Duration::MAX).await, 0);
    assert_eq!(unsynced.accepted.lock().expect("accepted").len(), 40);
    assert!(unsynced.syncs.load(Ordering::SeqCst) >= 1);

    // Accepted but never synced: the next start sends all of it again.
    let synced = Arc::new(Scripted::default());
    let queue = MessageQueue::with_transport(&settings, synced.clone()).expect("opens again");
    assert_eq!(queue.buffered(), 40);
    assert_eq!(queue.close(Duration::MAX).await, 0);
    assert_eq!(synced.accepted.lock().expect("accepted").len(), 40);

    // Synced this time: the checkpoint moved past it.
    let queue = MessageQueue::with_transport(&settings, Arc::new(Scripted::default()))
        .expect("opens a third time");
    assert_eq!(queue.buffered(), 0);
    assert_eq!(queue.close(Duration::MAX).await, 0);
}

#[tokio::test]
async fn a_write_cut_short_by_a_crash_is_dropped_and_whole_frames_are_delivered() {
    let dir = tempfile::tempdir().expect("tempdir");
    let settings = spooled(dir.path(), 1 << 20);
    let down = Arc::new(Scripted::default());
    down.down.store(true, Ordering::SeqCst);
    let queue = MessageQueue::with_transport(&settings, down).expect("opens");
    for i in 0..3 {
        queue.publish(message(i, "whole")).await.expect("stored");
    }
    queue.close(Duration::ZERO).await;
    // A crash in the middle of the next write: half a frame at the end of the log.
    let live = dir
        .path()
        .join(segment_files(dir.path()).pop().expect("a segment"));
    let mut file = OpenOptions::new().append(true).open(&live).expect("open");
    std::io::Write::write_all(&mut file, &[40, 0, 0, 0, 1, 2, 3]).expect("write");
    drop(file);

    let transport = Arc::new(Scripted::default());
    let queue = MessageQueue::with_transport(&settings, transport.clone()).expect("opens");
    queue.publish(message(3, "after")).await.expect("stored");
    assert_eq!(queue.close(Duration::MAX).await, 0);
    let mut accepted = transport.accepted.lock().expect("accepted").clone();
    accepted.sort();
    assert_eq!(accepted, ["m0", "m1", "m2", "m3"]);
}

#[tokio::test]
async fn a_full_spool_refuses_publishing_until_deliveries_make_room() {
    let dir = tempfile::tempdir().expect("tempdir");
    let transport = Arc::new(Scripted::default());
    transport.down.store(true, Ordering::SeqCst);
    // A frame is 12 bytes, the id and the body: 12 + 2 + 10 = 24 bytes here.
    let queue =
        MessageQueue::with_transport(&spooled(dir.path(), 100), transport.clone()).expect("opens");
    for i in 0..4 {
        queue.publish(message(i, "0123456789")).await.expect("room");
    }
    assert_eq!(
        queue.publish(message(5, "0123456789")).await,
        Err(PublishError::SpoolFull { max_bytes: 100 })
    );
    let outcome = queue.check().await;
    assert_eq!(
        outcome.status,
        crate::readiness::CheckStatus::Degraded,
        "{outcome:?}"
    );
    transport.down.store(false, Ordering::SeqCst);
    tokio::time::timeout(Duration::from_secs(5), async {
        while queue.publish(message(6, "0123456789")).await.is_err() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("room again once the backend took the backlog");
    assert_eq!(queue.close(Duration::MAX).await, 0);
    assert_eq!(transport.accepted.lock().expect("accepted").len(), 5);
}

#[tokio::test]
async fn a_reader_that_falls_behind_memory_reads_the_log_and_delivers_each_message_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let transport = Arc::new(Scripted::default());
    transport.down.store(true, Ordering::SeqCst);
    let mut settings = spooled(dir.path(), 1 << 30);
    settings.spool.segment_bytes = 1 << 20;
    let queue = MessageQueue::with_transport(&settings, transport.clone()).expect("opens");
    let publish = |from: usize| {
        let queue = &queue;
        async move {
            let batch = (from..from + 1_000)
                .map(|i| message(i, "an event"))
                .collect();
            queue.publish_all(batch).await.expect("stored");
        }
    };
    // About 38 bytes a frame: 300,000 messages are more than the 8 MiB the writer keeps
    // in memory for the reader, which waits while the backend is down.
    for from in (0..300_000).step_by(1_000) {
        publish(from).await;
    }
    transport.down.store(false, Ordering::SeqCst);
    // More while the reader works through the log.
    for from in (300_000..400_000).step_by(1_000) {
        publish(from).await;
    }
    assert_eq!(queue.close(Duration::MAX).await, 0);
    let accepted = transport.accepted.lock().expect("accepted").clone();
    assert_eq!(accepted.len(), 400_000, "each message once");
    assert_eq!(accepted.iter().collect::<BTreeSet<_>>().len(), 400_000);
}
