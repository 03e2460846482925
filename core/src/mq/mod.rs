//! The message queue: where events leave the server.
//!
//! [`MessageQueue::publish`] puts a message into a bounded in-memory buffer (`mq.buffer`)
//! and returns; when the buffer is full it waits, which holds back the event dispatcher,
//! whose full-queue policy then answers clients. A background task takes batches from
//! the buffer (as large as the backend allows), sends up to `mq.concurrency` of them at
//! once, and resends whatever failed (whole batches, or single entries the backend
//! refused for a transient reason) with exponential backoff and jitter until it is
//! accepted. An entry the backend refuses for good (e.g. malformed) is counted and
//! logged with its body. [`MessageQueue::close`] delivers what is buffered before the
//! process exits, within `mq.drain_timeout_ms`.
//!
//! Backends implement [`Transport`]: [`FileTransport`] (the embedded default,
//! newline-delimited JSON with rotation) and, with the cargo feature `sqs`,
//! `SqsTransport`.

mod file;
#[cfg(feature = "sqs")]
mod sqs;

use std::{
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use futures_util::future::BoxFuture;
use metrics::{counter, gauge, histogram};
use rand::Rng as _;
use tokio::{sync::Semaphore, task::JoinHandle};

pub use file::FileTransport;
#[cfg(feature = "sqs")]
pub use sqs::SqsTransport;

use crate::{
    config::{MqBackend, MqConfig},
    metrics::{
        MQ_BUFFERED, MQ_FAILED_TOTAL, MQ_RETRIED_TOTAL, MQ_SEND_DURATION_SECONDS,
        MQ_SEND_ERRORS_TOTAL, MQ_SENT_TOTAL, MQ_UP,
    },
    readiness::CheckOutcome,
};

/// One message: a JSON body and the id of what it carries (for logs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboundMessage {
    /// The id of the event the body carries.
    pub id: String,
    /// The body (one JSON document, no raw newlines).
    pub body: String,
}

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
    /// Flushes whatever the backend itself buffers (called once, at close).
    fn close(&self) -> BoxFuture<'_, Result<(), String>>;
}

/// Publishing failed: the queue is closed (the server is shutting down).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the message queue is closed")]
pub struct QueueClosed;

struct Inner {
    transport: Arc<dyn Transport>,
    config: MqConfig,
    /// Taken at close: the pump then ends once the buffer is empty.
    sender: RwLock<Option<flume::Sender<OutboundMessage>>>,
    pump: Mutex<Option<JoinHandle<()>>>,
    /// Published and not yet delivered (or refused for good).
    buffered: AtomicUsize,
    /// `mq_buffered_messages`, kept in step with `buffered`.
    buffered_gauge: metrics::Gauge,
    up: AtomicBool,
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
            MqBackend::File => Arc::new(FileTransport::open(&config.file)?),
            #[cfg(feature = "sqs")]
            MqBackend::Sqs => Arc::new(SqsTransport::connect(&config.sqs).await?),
            // Refused by the configuration's validation.
            #[cfg(not(feature = "sqs"))]
            MqBackend::Sqs => anyhow::bail!("`mq.backend` = \"sqs\": no SQS backend"),
        };
        Ok(Self::with_transport(config, transport))
    }

    /// A queue in front of `transport`; starts sending (call within a Tokio runtime).
    pub fn with_transport(config: &MqConfig, transport: Arc<dyn Transport>) -> Self {
        let (sender, receiver) = flume::bounded(config.buffer.max(1));
        let backend = transport.backend();
        let inner = Arc::new(Inner {
            transport,
            config: config.clone(),
            sender: RwLock::new(Some(sender)),
            pump: Mutex::new(None),
            buffered: AtomicUsize::new(0),
            buffered_gauge: gauge!(MQ_BUFFERED, "backend" => backend),
            up: AtomicBool::new(true),
        });
        gauge!(MQ_UP, "backend" => backend).set(1.0);
        inner.buffered_gauge.set(0.0);
        let pump = tokio::spawn(pump(inner.clone(), receiver));
        *inner.pump.lock().unwrap_or_else(|p| p.into_inner()) = Some(pump);
        Self { inner }
    }

    /// The backend's name.
    pub fn backend(&self) -> &'static str {
        self.inner.transport.backend()
    }

    /// Messages published and not yet delivered.
    pub fn buffered(&self) -> usize {
        self.inner.buffered.load(Ordering::Relaxed)
    }

    /// Buffers `message` for delivery, waiting while the buffer is full.
    pub async fn publish(&self, message: OutboundMessage) -> Result<(), QueueClosed> {
        let sender = self
            .inner
            .sender
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or(QueueClosed)?;
        self.inner.buffered.fetch_add(1, Ordering::Relaxed);
        self.inner.buffered_gauge.increment(1.0);
        // Counted before it is sent (the pump may deliver it at once); uncounted if the
        // send fails or the caller gives up waiting.
        let mut counted = Counted(Some(&self.inner));
        sender.send_async(message).await.map_err(|_| QueueClosed)?;
        counted.0 = None;
        Ok(())
    }

    fn queued(&self) -> usize {
        self.inner
            .sender
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map_or(0, flume::Sender::len)
    }

    /// Readiness: up while the backend answers, the buffer has room and the backend is
    /// not near a limit of its own; degraded (events still accepted and buffered)
    /// otherwise.
    pub async fn check(&self) -> CheckOutcome {
        let buffered = self.buffered();
        match self.inner.transport.check().await {
            Ok(()) if self.queued() >= self.inner.config.buffer => CheckOutcome::degraded(format!(
                "the buffer is full ({buffered} messages); publishing waits"
            )),
            Ok(()) => match self.inner.transport.capacity_warning().await {
                Some(warning) => CheckOutcome::degraded(warning),
                None => CheckOutcome::up(),
            },
            Err(error) => CheckOutcome::degraded(format!(
                "{} unreachable, {buffered} messages buffered: {error}",
                self.backend()
            )),
        }
    }

    /// Stops accepting messages and delivers the buffered ones, within
    /// `mq.drain_timeout_ms` and within `budget` (what is left of the shutdown's). Returns
    /// how many were left undelivered (0 unless the deadline passed).
    pub async fn close(&self, budget: Duration) -> usize {
        let inner = &self.inner;
        inner
            .sender
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let Some(pump) = inner.pump.lock().unwrap_or_else(|p| p.into_inner()).take() else {
            return self.buffered();
        };
        let buffered = self.buffered();
        tracing::info!(backend = self.backend(), buffered, "message queue draining");
        let deadline = Duration::from_millis(inner.config.drain_timeout_ms).min(budget);
        let drained = tokio::time::timeout(deadline, pump).await.is_ok();
        if let Err(error) = inner.transport.close().await {
            tracing::error!(
                backend = self.backend(),
                error,
                "message queue close failed"
            );
        }
        let left = self.buffered();
        if drained && left == 0 {
            tracing::info!(
                backend = self.backend(),
                delivered = buffered,
                "message queue drained"
            );
        } else {
            tracing::error!(
                backend = self.backend(),
                left,
                deadline_ms = deadline.as_millis() as u64,
                "message queue drain deadline passed; buffered messages were not delivered"
            );
        }
        left
    }
}

/// A published message counted as buffered before it is in the buffer.
struct Counted<'a>(Option<&'a Inner>);

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        if let Some(inner) = self.0 {
            inner.delivered(1);
        }
    }
}

impl Inner {
    fn delivered(&self, count: usize) {
        self.buffered.fetch_sub(count, Ordering::Relaxed);
        self.buffered_gauge.decrement(count as f64);
    }

    fn mark(&self, up: bool, error: &str) {
        let backend = self.transport.backend();
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

/// Takes batches from the buffer and sends them, several at once; ends when the buffer is
/// closed and empty and every batch has been delivered.
async fn pump(inner: Arc<Inner>, receiver: flume::Receiver<OutboundMessage>) {
    let limits = inner.transport.limits();
    let in_flight = inner.config.concurrency.min(limits.max_in_flight).max(1);
    let slots = Arc::new(Semaphore::new(in_flight));
    let mut carried: Option<OutboundMessage> = None;
    loop {
        let first = match carried.take() {
            Some(message) => message,
            None => match receiver.recv_async().await {
                Ok(message) => message,
                Err(_) => break,
            },
        };
        let mut bytes = first.body.len();
        let mut batch = vec![first];
        while batch.len() < limits.max_messages {
            let Ok(message) = receiver.try_recv() else {
                break;
            };
            if bytes + message.body.len() > limits.max_bytes {
                carried = Some(message);
                break;
            }
            bytes += message.body.len();
            batch.push(message);
        }
        let Ok(slot) = slots.clone().acquire_owned().await else {
            break;
        };
        let inner = inner.clone();
        tokio::spawn(async move {
            deliver(&inner, batch).await;
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
        let started = Instant::now();
        let outcome = inner.transport.send(&batch).await;
        histogram!(MQ_SEND_DURATION_SECONDS, "backend" => backend).record(started.elapsed());
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

#[cfg(test)]
mod tests;
