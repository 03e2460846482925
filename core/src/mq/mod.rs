//! The message queue: where events leave the server.
//!
//! [`MessageQueue::publish_all`] stores messages and returns, or says why it stored none
//! ([`PublishError`]: 503 with `Retry-After` to a client). Where they are stored is
//! `mq.durability`:
//! - `disk` (the default): in the spool ([`spool`]), synced to disk before the call
//!   returns (concurrent callers share one sync), bounded by `mq.spool.max_bytes`. A
//!   crash loses nothing; the next start delivers what is left (at least once).
//! - `memory`: in a buffer of `mq.buffer` messages. A crash loses what it holds.
//!
//! A background task takes batches (as large as the backend allows), sends up to
//! `mq.concurrency` of them at once, and resends whatever failed (whole batches, or single
//! entries the backend refused for a transient reason) with exponential backoff and
//! jitter until it is accepted. An entry the backend refuses for good (e.g. malformed) is
//! counted and logged with its body. [`MessageQueue::close`] delivers what is stored
//! before the process exits, within `mq.drain_timeout_ms`; what the spool still holds
//! then waits for the next start.
//!
//! Backends implement [`Transport`]: [`FileTransport`] (the embedded default,
//! newline-delimited JSON with rotation) and, with the cargo feature `sqs`,
//! `SqsTransport`.

mod file;
mod spool;
#[cfg(feature = "sqs")]
mod sqs;

use std::{
    fs::{File, OpenOptions},
    path::Path,
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use crate::telemetry::InTrace as _;
use futures_util::future::BoxFuture;
use metrics::{counter, gauge, histogram};
use poem::http::{HeaderName, HeaderValue, StatusCode, header};
use rand::Rng as _;
use tokio::{sync::Semaphore, task::JoinHandle};

pub use file::FileTransport;
#[cfg(feature = "sqs")]
pub use sqs::{SqsTransport, https_client};

use crate::{
    config::{Durability, MqBackend, MqConfig},
    metrics::{
        MQ_BUFFER_CAPACITY, MQ_BUFFERED, MQ_FAILED_TOTAL, MQ_RETRIED_TOTAL,
        MQ_SEND_DURATION_SECONDS, MQ_SEND_ERRORS_TOTAL, MQ_SENT_TOTAL, MQ_SPOOL_MAX_BYTES, MQ_UP,
    },
    problem::ProblemError,
    readiness::CheckOutcome,
};
use spool::{Opened, Span, Spool, SpoolReader};

/// One message: a JSON body and the id of what it carries (for logs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboundMessage {
    /// The id of the event the body carries.
    pub id: String,
    /// The body (one JSON document, no raw newlines).
    pub body: String,
    /// The W3C `traceparent` of the span that published it
    /// ([`traceparent`](crate::telemetry::traceparent)): the send's span joins that trace,
    /// and SQS carries it as a message attribute.
    pub traceparent: Option<String>,
}

impl OutboundMessage {
    /// What the message weighs against a batch's `max_bytes`: its body, and its
    /// `traceparent` as a backend carries it (SQS counts an attribute's name, type and
    /// value).
    pub fn size(&self) -> usize {
        self.body.len()
            + self
                .traceparent
                .as_ref()
                .map_or(0, |t| TRACEPARENT.len() + "String".len() + t.len())
    }
}

/// The name a message's `traceparent` travels under.
pub const TRACEPARENT: &str = "traceparent";

/// How large a batch a backend takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimits {
    /// Messages per batch.
    pub max_messages: usize,
    /// Body bytes per batch.
    pub max_bytes: usize,
    /// Batches in flight at once (further bounded by `mq.concurrency`).
    pub max_in_flight: usize,
}

/// One entry of a batch the backend did not accept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryFailure {
    /// Its index in the batch.
    pub index: usize,
    /// Whether sending it again may succeed.
    pub retryable: bool,
    /// What the backend said.
    pub reason: String,
}

/// A backend: sends batches.
pub trait Transport: Send + Sync + 'static {
    /// `file`, `sqs`, …: the metrics label.
    fn backend(&self) -> &'static str;
    /// Batch limits.
    fn limits(&self) -> BatchLimits;
    /// Sends a batch. `Ok` lists the entries that were not accepted (empty: all were);
    /// `Err` means none was, and the whole batch may be sent again.
    fn send<'a>(
        &'a self,
        batch: &'a [OutboundMessage],
    ) -> BoxFuture<'a, Result<Vec<EntryFailure>, String>>;
    /// Whether the backend is reachable.
    fn check(&self) -> BoxFuture<'_, Result<(), String>>;
    /// Why the backend is close to a limit of its own (e.g. its disk use), if it is:
    /// readiness then reports the queue degraded.
    fn capacity_warning(&self) -> BoxFuture<'_, Option<String>> {
        Box::pin(async { None })
    }
    /// Makes every batch accepted so far durable, for a backend that accepts batches
    /// before they are (the file backend behind the spool). The spool's checkpoint moves
    /// past delivered batches only after this succeeds.
    fn sync(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async { Ok(()) })
    }
    /// Flushes whatever the backend itself buffers (called once, at close).
    fn close(&self) -> BoxFuture<'_, Result<(), String>>;
}

/// Why messages were not published. None of them was stored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    /// The memory buffer has no room for them (`durability = "memory"`).
    #[error("the message queue's buffer is full ({capacity} messages); retry shortly")]
    BufferFull {
        /// `mq.buffer`.
        capacity: usize,
    },
    /// The spool holds `mq.spool.max_bytes` not yet delivered.
    #[error(
        "the message queue's spool is full ({max_bytes} bytes not yet delivered); retry shortly"
    )]
    SpoolFull {
        /// `mq.spool.max_bytes`.
        max_bytes: u64,
    },
    /// The spool could not store them (a full disk, an I/O error).
    #[error("the message queue cannot store messages right now ({error}); retry shortly")]
    Storage {
        /// What the operating system said.
        error: String,
    },
    /// The server is shutting down.
    #[error("the message queue is closed; the server is shutting down")]
    Closed,
}

impl ProblemError for PublishError {
    fn status(&self) -> StatusCode {
        StatusCode::SERVICE_UNAVAILABLE
    }
    fn slug(&self) -> &'static str {
        "event-queue-unavailable"
    }
    fn title(&self) -> &'static str {
        "Events cannot be accepted right now"
    }
    fn headers(&self) -> Vec<(HeaderName, HeaderValue)> {
        let seconds = match self {
            Self::Storage { .. } => "5",
            _ => "1",
        };
        vec![(header::RETRY_AFTER, HeaderValue::from_static(seconds))]
    }
}

/// Where published messages wait for the backend.
enum Buffer {
    /// Taken at close: the pump then ends once the buffer is empty.
    Memory(RwLock<Option<flume::Sender<OutboundMessage>>>),
    Disk(Spool),
}

/// Where the pump takes batches from.
enum Source {
    Memory {
        receiver: flume::Receiver<OutboundMessage>,
        carried: Option<OutboundMessage>,
    },
    Disk(SpoolReader),
}

struct Inner {
    transport: Arc<dyn Transport>,
    config: MqConfig,
    buffer: Buffer,
    pump: Mutex<Option<JoinHandle<()>>>,
    /// Writes the spool's checkpoint; stopped at close.
    checkpoint: Mutex<Option<JoinHandle<()>>>,
    /// Published and not yet delivered (or refused for good).
    buffered: AtomicUsize,
    /// `mq_buffered_messages`, kept in step with `buffered`.
    buffered_gauge: metrics::Gauge,
    up: AtomicBool,
    /// The last failed send's error, while sends fail.
    last_error: Mutex<Option<String>>,
}

/// The message queue handle. Cheap to clone.
#[derive(Clone)]
pub struct MessageQueue {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for MessageQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MessageQueue")
            .field("backend", &self.backend())
            .field("buffered", &self.buffered())
            .finish()
    }
}

impl MessageQueue {
    /// Opens the backend `config` selects and starts sending.
    pub async fn connect(config: &MqConfig) -> anyhow::Result<Self> {
        let transport: Arc<dyn Transport> = match config.backend {
            MqBackend::File => {
                let file = FileTransport::open(&config.file)?;
                // The spool holds each batch until a checkpoint syncs the file once.
                Arc::new(match config.durability {
                    Durability::Disk => file.synced_at_checkpoints(),
                    Durability::Memory => file,
                })
            }
            #[cfg(feature = "sqs")]
            MqBackend::Sqs => Arc::new(SqsTransport::connect(&config.sqs).await?),
            // Refused by the configuration's validation.
            #[cfg(not(feature = "sqs"))]
            MqBackend::Sqs => anyhow::bail!("`mq.backend` = \"sqs\": no SQS backend"),
        };
        Self::with_transport(config, transport)
    }

    /// A queue in front of `transport`, its buffer as `config.durability` says (the
    /// spool opens and what an earlier run left in it is delivered); starts sending (call
    /// within a Tokio runtime).
    pub fn with_transport(
        config: &MqConfig,
        transport: Arc<dyn Transport>,
    ) -> anyhow::Result<Self> {
        let (buffer, source, waiting) = match config.durability {
            Durability::Memory => {
                let (sender, receiver) = flume::unbounded();
                let source = Source::Memory {
                    receiver,
                    carried: None,
                };
                (Buffer::Memory(RwLock::new(Some(sender))), source, 0)
            }
            Durability::Disk => {
                let Opened {
                    spool,
                    reader,
                    waiting,
                } = Spool::open(&config.spool)?;
                (Buffer::Disk(spool), Source::Disk(reader), waiting)
            }
        };
        let backend = transport.backend();
        let inner = Arc::new(Inner {
            transport,
            config: config.clone(),
            buffer,
            pump: Mutex::new(None),
            checkpoint: Mutex::new(None),
            buffered: AtomicUsize::new(waiting),
            buffered_gauge: gauge!(MQ_BUFFERED, "backend" => backend),
            up: AtomicBool::new(true),
            last_error: Mutex::new(None),
        });
        gauge!(MQ_UP, "backend" => backend).set(1.0);
        inner.buffered_gauge.set(waiting as f64);
        // At 0 from the start, so that an alert on their increase sees the first one.
        for outcome in [
            MQ_SENT_TOTAL,
            MQ_RETRIED_TOTAL,
            MQ_FAILED_TOTAL,
            MQ_SEND_ERRORS_TOTAL,
        ] {
            counter!(outcome, "backend" => backend).increment(0);
        }
        match config.durability {
            Durability::Memory => {
                gauge!(MQ_BUFFER_CAPACITY, "backend" => backend).set(config.buffer as f64);
            }
            Durability::Disk => gauge!(MQ_SPOOL_MAX_BYTES).set(config.spool.max_bytes as f64),
        }
        if let Some(spool) = inner.spool() {
            *inner.checkpoint.lock().unwrap_or_else(|p| p.into_inner()) =
                Some(spool.keep_checkpoint(inner.transport.clone()));
        }
        let pump = tokio::spawn(pump(inner.clone(), source));
        *inner.pump.lock().unwrap_or_else(|p| p.into_inner()) = Some(pump);
        Ok(Self { inner })
    }

    /// The backend's name.
    pub fn backend(&self) -> &'static str {
        self.inner.transport.backend()
    }

    /// Messages published and not yet delivered.
    pub fn buffered(&self) -> usize {
        self.inner.buffered.load(Ordering::Relaxed)
    }

    /// Stores `message` for delivery (see [`publish_all`](Self::publish_all)).
    pub async fn publish(&self, message: OutboundMessage) -> Result<(), PublishError> {
        self.publish_all(vec![message]).await
    }

    /// Stores `messages` for delivery, all or none: on disk (synced) or in the memory
    /// buffer, as `mq.durability` says. Refused at once when the buffer or the spool has
    /// no room, or the spool cannot write.
    pub async fn publish_all(&self, messages: Vec<OutboundMessage>) -> Result<(), PublishError> {
        let count = messages.len();
        if count == 0 {
            return Ok(());
        }
        let inner = &self.inner;
        match &inner.buffer {
            Buffer::Memory(sender) => {
                let sender = sender
                    .read()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone()
                    .ok_or(PublishError::Closed)?;
                let capacity = inner.config.buffer;
                inner
                    .buffered
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |held| {
                        (held + count <= capacity).then_some(held + count)
                    })
                    .map_err(|_| PublishError::BufferFull { capacity })?;
                inner.buffered_gauge.increment(count as f64);
                for (sent, message) in messages.into_iter().enumerate() {
                    if sender.send(message).is_err() {
                        // The pump has stopped: nothing more will be delivered.
                        inner.delivered(count - sent);
                        return Err(PublishError::Closed);
                    }
                }
            }
            Buffer::Disk(spool) => {
                spool.append(messages).await?;
                inner.buffered.fetch_add(count, Ordering::Relaxed);
                inner.buffered_gauge.increment(count as f64);
            }
        }
        Ok(())
    }

    /// Readiness: up while the backend answers and takes what is sent, the buffer or
    /// the spool has room and stores, and the backend is not near a limit of its own;
    /// degraded otherwise (publishing may still succeed).
    pub async fn check(&self) -> CheckOutcome {
        let inner = &self.inner;
        let buffered = self.buffered();
        let failing = inner
            .last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let problem = match inner.transport.check().await.err().or(failing) {
            Some(error) => Some(format!(
                "{} failing, {buffered} messages waiting: {error}",
                self.backend()
            )),
            None => match &inner.buffer {
                Buffer::Disk(spool) => spool.warning(),
                Buffer::Memory(_) => (buffered >= inner.config.buffer).then(|| {
                    format!("the buffer is full ({buffered} messages); publishing is refused")
                }),
            },
        };
        let problem = match problem {
            Some(problem) => Some(problem),
            None => inner.transport.capacity_warning().await,
        };
        problem.map_or_else(CheckOutcome::up, CheckOutcome::degraded)
    }

    /// Stops accepting messages and delivers the stored ones, within
    /// `mq.drain_timeout_ms` and within `budget` (what is left of the shutdown's). Returns
    /// how many were lost: left in the memory buffer when the deadline passed (what the
    /// spool still holds is delivered after the next start, and not counted).
    pub async fn close(&self, budget: Duration) -> usize {
        let inner = &self.inner;
        let started = Instant::now();
        match &inner.buffer {
            Buffer::Memory(sender) => {
                sender.write().unwrap_or_else(|p| p.into_inner()).take();
            }
            Buffer::Disk(spool) => spool.close_writer().await,
        }
        let Some(mut pump) = inner.pump.lock().unwrap_or_else(|p| p.into_inner()).take() else {
            return 0;
        };
        let buffered = self.buffered();
        tracing::info!(backend = self.backend(), buffered, "message queue draining");
        let deadline = Duration::from_millis(inner.config.drain_timeout_ms)
            .min(budget)
            .saturating_sub(started.elapsed());
        let drained = tokio::time::timeout(deadline, &mut pump).await.is_ok();
        // No new batch after the deadline (those under way may still land).
        pump.abort();
        if let Err(error) = inner.transport.close().await {
            tracing::error!(
                backend = self.backend(),
                error,
                "message queue close failed"
            );
        }
        if let Some(spool) = inner.spool() {
            if let Some(task) = inner
                .checkpoint
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take()
            {
                task.abort();
            }
            if let Err(error) = spool.save_checkpoint(&*inner.transport).await {
                tracing::error!(
                    backend = self.backend(),
                    error,
                    "the spool's checkpoint stays: the backend could not sync"
                );
            }
            spool.release_folder();
        }
        let left = self.buffered();
        if drained && left == 0 {
            tracing::info!(
                backend = self.backend(),
                delivered = buffered,
                "message queue drained"
            );
            return 0;
        }
        match &inner.buffer {
            Buffer::Disk(_) => {
                tracing::warn!(
                    backend = self.backend(),
                    left,
                    deadline_ms = deadline.as_millis() as u64,
                    "message queue drain deadline passed; the spool keeps what is left for the next start"
                );
                0
            }
            Buffer::Memory(_) => {
                tracing::error!(
                    backend = self.backend(),
                    left,
                    deadline_ms = deadline.as_millis() as u64,
                    "message queue drain deadline passed; buffered messages were not delivered"
                );
                left
            }
        }
    }
}

/// Takes `directory`'s exclusive lock (`<directory>/.lock`), or says which setting
/// (`key`) to change.
fn lock_folder(directory: &Path, key: &str) -> anyhow::Result<File> {
    let path = directory.join(".lock");
    let opened = std::fs::create_dir_all(directory).and_then(|()| {
        OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
    });
    let file =
        opened.map_err(|e| anyhow::anyhow!("`{key}`: cannot open {}: {e}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(anyhow::anyhow!(
            "`{key}`: {} is in use by another running instance (it holds {}); \
             give each instance a folder of its own",
            directory.display(),
            path.display()
        )),
        Err(std::fs::TryLockError::Error(e)) => Err(anyhow::anyhow!(
            "`{key}`: cannot lock {}: {e}",
            path.display()
        )),
    }
}

impl Inner {
    fn spool(&self) -> Option<&Spool> {
        match &self.buffer {
            Buffer::Disk(spool) => Some(spool),
            Buffer::Memory(_) => None,
        }
    }

    fn delivered(&self, count: usize) {
        self.buffered.fetch_sub(count, Ordering::Relaxed);
        self.buffered_gauge.decrement(count as f64);
    }

    fn mark(&self, up: bool, error: &str) {
        let backend = self.transport.backend();
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) =
            (!up).then(|| error.to_owned());
        if self.up.swap(up, Ordering::Relaxed) != up {
            gauge!(MQ_UP, "backend" => backend).set(if up { 1.0 } else { 0.0 });
            if up {
                tracing::info!(backend, "message queue reachable again");
            } else {
                tracing::error!(
                    backend,
                    error,
                    "message queue unreachable; messages wait in the buffer and are retried"
                );
            }
        }
    }

    /// `retry_backoff_ms × 2^(attempt-1)` capped at `retry_backoff_max_ms`, then a random
    /// point in its upper half.
    fn backoff(&self, attempt: u32) -> Duration {
        let ceiling = crate::backoff::exponential_ms(
            self.config.retry_backoff_ms,
            self.config.retry_backoff_max_ms,
            attempt,
        )
        .max(1);
        Duration::from_millis(rand::rng().random_range(ceiling.div_ceil(2)..=ceiling))
    }
}

impl Source {
    /// The next batch within `limits` (with where it is in the spool); `None` once the
    /// buffer is closed and empty.
    async fn next_batch(
        &mut self,
        limits: BatchLimits,
    ) -> Option<(Vec<OutboundMessage>, Option<Span>)> {
        let (receiver, carried) = match self {
            Self::Disk(reader) => {
                return reader
                    .next_batch(limits)
                    .await
                    .map(|(batch, span)| (batch, Some(span)));
            }
            Self::Memory { receiver, carried } => (receiver, carried),
        };
        let first = match carried.take() {
            Some(message) => message,
            None => receiver.recv_async().await.ok()?,
        };
        let mut bytes = first.size();
        let mut batch = vec![first];
        while batch.len() < limits.max_messages {
            let Ok(message) = receiver.try_recv() else {
                break;
            };
            if bytes + message.size() > limits.max_bytes {
                *carried = Some(message);
                break;
            }
            bytes += message.size();
            batch.push(message);
        }
        Some((batch, None))
    }
}

/// Takes batches from the buffer and sends them, several at once; ends when the buffer is
/// closed and empty and every batch has been delivered.
async fn pump(inner: Arc<Inner>, mut source: Source) {
    let limits = inner.transport.limits();
    let in_flight = inner.config.concurrency.min(limits.max_in_flight).max(1);
    let slots = Arc::new(Semaphore::new(in_flight));
    while let Some((batch, span)) = source.next_batch(limits).await {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            break;
        };
        let inner = inner.clone();
        tokio::spawn(async move {
            deliver(&inner, batch).await;
            if let (Some(spool), Some(span)) = (inner.spool(), span) {
                spool.delivered(span);
            }
            drop(slot);
        });
    }
    // Wait for the batches still in flight.
    let _ = slots.acquire_many(in_flight as u32).await;
}

/// Sends `batch` until every entry is accepted or refused for good.
async fn deliver(inner: &Inner, mut batch: Vec<OutboundMessage>) {
    let backend = inner.transport.backend();
    let mut attempt = 0;
    loop {
        let span = send_span(backend, &batch, attempt);
        let started = Instant::now();
        let outcome = inner.transport.send(&batch).in_trace(span.clone()).await;
        histogram!(MQ_SEND_DURATION_SECONDS, "backend" => backend).record(started.elapsed());
        if !matches!(&outcome, Ok(failures) if failures.is_empty()) {
            span.record("otel.status_code", "ERROR");
        }
        match outcome {
            Ok(failures) => {
                inner.mark(true, "");
                let mut retry = vec![false; batch.len()];
                let mut refused = 0;
                for failure in failures {
                    let Some(message) = batch.get(failure.index) else {
                        continue;
                    };
                    if failure.retryable {
                        retry[failure.index] = true;
                    } else {
                        refused += 1;
                        tracing::error!(
                            backend,
                            id = message.id,
                            reason = failure.reason,
                            body = message.body,
                            "the message queue refused a message for good"
                        );
                    }
                }
                let total = batch.len();
                let mut flags = retry.into_iter();
                batch.retain(|_| flags.next().unwrap_or(false));
                let sent = total - batch.len() - refused;
                counter!(MQ_SENT_TOTAL, "backend" => backend).increment(sent as u64);
                counter!(MQ_FAILED_TOTAL, "backend" => backend).increment(refused as u64);
                inner.delivered(total - batch.len());
                if batch.is_empty() {
                    return;
                }
            }
            Err(error) => {
                counter!(MQ_SEND_ERRORS_TOTAL, "backend" => backend).increment(1);
                inner.mark(false, &error);
                tracing::debug!(backend, error, messages = batch.len(), "send failed");
            }
        }
        attempt += 1;
        counter!(MQ_RETRIED_TOTAL, "backend" => backend).increment(batch.len() as u64);
        tokio::time::sleep(inner.backoff(attempt)).await;
    }
}

/// Traces a send links to at most, besides the one it joins.
const MAX_LINKS: usize = 32;

/// The span of one send, when a message of the batch was published by traced work: in
/// the trace of the first such message, linked to the others' (up to [`MAX_LINKS`]).
fn send_span(backend: &'static str, batch: &[OutboundMessage], attempt: u32) -> tracing::Span {
    let traced = batch
        .iter()
        .any(|m| crate::telemetry::trace_follows(m.traceparent.as_deref()));
    if !traced {
        return tracing::Span::none();
    }
    let span = tracing::info_span!(
        "mq.send",
        otel.name = format!("send {backend}"),
        otel.kind = "producer",
        messaging.system = backend,
        messaging.operation.type = "send",
        messaging.batch.message_count = batch.len(),
        attempt = attempt + 1,
        otel.status_code = tracing::field::Empty,
    );
    let mut traces: Vec<&str> = Vec::new();
    for traceparent in batch.iter().filter_map(|m| m.traceparent.as_deref()) {
        if traces.len() > MAX_LINKS || traces.contains(&traceparent) {
            continue;
        }
        match traces.is_empty() {
            true => crate::telemetry::follow_trace(&span, Some(traceparent)),
            false => crate::telemetry::link_trace(&span, traceparent),
        }
        traces.push(traceparent);
    }
    span
}

#[cfg(test)]
mod tests;
