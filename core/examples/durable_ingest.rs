//! How fast client events are stored durably, two ways: the message queue's spool (what
//! `mq.durability = "disk"` does before a 202) and rows of an outbox table (what domain
//! events are stored as), each fed by 64 tasks storing batches of 100 events as fast as
//! they can.
//!
//! ```text
//! taskset -c 0 cargo run --release -p trellis-core --example durable_ingest [SECONDS]
//! ```
//!
//! The spool delivers to the file backend in the same process while it is measured (a
//! batch refused because the spool is at `mq.spool.max_bytes` is retried and not
//! counted); the table has no relay running. With `TEST_POSTGRES_URL`, the table is also
//! measured on PostgreSQL (its server's CPU is not counted).

use std::{
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use trellis_core::{
    config::{DatabaseConfig, Durability, FileMqConfig, MqBackend, MqConfig, SpoolConfig},
    mq::{MessageQueue, OutboundMessage, PublishError},
    storage::Database,
};

const TASKS: usize = 64;
const BATCH: usize = 100;
const COLUMNS: usize = 7;

/// A client event as the bi module queues it (about 300 bytes of JSON).
fn body(n: usize) -> String {
    format!(
        r#"{{"id":"0193a9c2-7f1e-7000-8000-{n:012}","name":"bench.page_view","timestamp":null,"received_at":"2026-12-03T05:00:00.000000Z","request_id":"0193a9c2-7f1e-7000-8000-000000000001","user_id":null,"session_id":null,"properties":{{"path":"/products/{n}","position":{n}}},"utm":{{"source":"bench","campaign":"load"}}}}"#
    )
}

/// User plus system CPU seconds of this process so far.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // The fields after the command's closing parenthesis; utime and stime are the 12th and
    // 13th of them, in clock ticks of 1/100 s.
    let fields: Vec<&str> = stat
        .rsplit_once(") ")
        .map_or(vec![], |(_, rest)| rest.split(' ').collect());
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok());
    (ticks(11).unwrap_or(0.0) + ticks(12).unwrap_or(0.0)) / 100.0
}

/// Runs `store` from [`TASKS`] tasks for `seconds`; answers events per second stored and
/// CPU seconds per million events. `store` answers false for a batch refused for now.
async fn measure<F, Fut>(seconds: u64, store: F) -> (f64, f64)
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<bool>> + Send,
{
    let store = Arc::new(store);
    let stop = Arc::new(AtomicBool::new(false));
    let stored = Arc::new(AtomicU64::new(0));
    let (started, cpu) = (Instant::now(), cpu_seconds());
    let tasks: Vec<_> = (0..TASKS)
        .map(|task| {
            let (store, stop, stored) = (store.clone(), stop.clone(), stored.clone());
            tokio::spawn(async move {
                let mut batch = task as u64 * 1_000_000_000;
                while !stop.load(Ordering::Relaxed) {
                    match store(batch).await.expect("stored or refused") {
                        true => {
                            stored.fetch_add(BATCH as u64, Ordering::Relaxed);
                        }
                        false => tokio::time::sleep(Duration::from_millis(1)).await,
                    }
                    batch += 1;
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await.expect("a task ended");
    }
    let events = stored.load(Ordering::Relaxed) as f64;
    let (elapsed, cpu) = (started.elapsed().as_secs_f64(), cpu_seconds() - cpu);
    (events / elapsed, cpu / events * 1e6)
}

async fn spool(folder: &Path, seconds: u64) -> anyhow::Result<(f64, f64)> {
    let config = MqConfig {
        backend: MqBackend::File,
        durability: Durability::Disk,
        spool: SpoolConfig {
            directory: folder.join("spool"),
            ..SpoolConfig::default()
        },
        file: FileMqConfig {
            directory: folder.join("events"),
            max_total_bytes: 1 << 50,
            max_files: 1_000_000,
            ..FileMqConfig::default()
        },
        ..MqConfig::default()
    };
    let queue = Arc::new(MessageQueue::connect(&config).await?);
    let publisher = queue.clone();
    let figures = measure(seconds, move |batch| {
        let queue = publisher.clone();
        async move {
            let messages = (0..BATCH)
                .map(|n| OutboundMessage {
                    id: format!("{batch}-{n}"),
                    body: body(n),
                    traceparent: None,
                })
                .collect();
            match queue.publish_all(messages).await {
                Ok(()) => Ok(true),
                // Delivery to the file backend falls behind: the spool is at its bound.
                Err(PublishError::SpoolFull { .. }) => Ok(false),
                Err(error) => Err(error.into()),
            }
        }
    })
    .await;
    queue.close(Duration::from_secs(60)).await;
    Ok(figures)
}

async fn table(url: String, setup: &'static str, seconds: u64) -> anyhow::Result<(f64, f64)> {
    let config = DatabaseConfig {
        url: url.into(),
        max_connections: 16,
        ..DatabaseConfig::default()
    };
    let db = Arc::new(Database::connect(&config).await?);
    sqlx::raw_sql(
        "DROP TABLE IF EXISTS bench_publications;
         CREATE TABLE bench_publications (
            id TEXT PRIMARY KEY, event_id TEXT NOT NULL, event TEXT NOT NULL,
            listener TEXT NOT NULL, payload TEXT NOT NULL, request_id TEXT,
            status TEXT NOT NULL DEFAULT 'pending', attempts BIGINT NOT NULL DEFAULT 0,
            created_at BIGINT NOT NULL, due_at BIGINT NOT NULL, claimed_by TEXT,
            completed_at BIGINT, last_error TEXT);
         CREATE INDEX bench_publications_due ON bench_publications (status, due_at);",
    )
    .execute(db.pool())
    .await?;
    let rows: Vec<String> = (0..BATCH)
        .map(|row| {
            let first = row * COLUMNS + 1;
            let params: Vec<String> = (first..first + COLUMNS).map(|p| format!("${p}")).collect();
            format!("({}, ${})", params.join(", "), first + COLUMNS - 1)
        })
        .collect();
    let sql: &'static str = format!(
        "INSERT INTO bench_publications \
         (id, event_id, event, listener, payload, request_id, created_at, due_at) VALUES {}",
        rows.join(", ")
    )
    .leak();
    let database = db.clone();
    let figures = measure(seconds, move |batch| {
        let db = database.clone();
        async move {
            let mut conn = db.pool().acquire().await?;
            if !setup.is_empty() {
                sqlx::raw_sql(setup).execute(&mut *conn).await?;
            }
            let mut query = sqlx::query(sql);
            for n in 0..BATCH {
                query = query
                    .bind(format!("{batch}-{n}"))
                    .bind(format!("{batch}-{n}"))
                    .bind("bi.client_event")
                    .bind("bi")
                    .bind(body(n))
                    .bind(None::<String>)
                    .bind(1_764_738_000_000_i64);
            }
            let mut tx = sqlx::Connection::begin(&mut *conn).await?;
            query.execute(&mut *tx).await?;
            tx.commit().await?;
            Ok(true)
        }
    })
    .await;
    db.pool().close().await;
    Ok(figures)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let seconds = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(8);
    let folder = tempfile::tempdir_in(".")?;
    let sqlite = |name: &str| format!("sqlite://{}/{name}.db", folder.path().display());
    let mut runs = vec![
        (
            "spool (fdatasync per group)",
            spool(folder.path(), seconds).await?,
        ),
        (
            "SQLite table, synchronous = NORMAL (no sync per commit)",
            table(sqlite("normal"), "", seconds).await?,
        ),
        (
            "SQLite table, synchronous = FULL (a sync per commit)",
            table(sqlite("full"), "PRAGMA synchronous = FULL", seconds).await?,
        ),
    ];
    if let Ok(url) = std::env::var("TEST_POSTGRES_URL") {
        runs.push((
            "PostgreSQL table (synchronous_commit on)",
            table(url, "", seconds).await?,
        ));
    }
    println!("| where | events/s | CPU s per million events |\n|---|---|---|");
    for (name, (rate, cpu)) in runs {
        println!("| {name} | {rate:.0} | {cpu:.2} |");
    }
    Ok(())
}
