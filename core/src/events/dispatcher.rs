//! The event dispatcher: a bounded queue and a fixed pool of workers.
//!
//! - **Bounded**: `events.queue_capacity` counts every event accepted and not yet handled
//!   (queued or in a handler), and `events.queue_max_bytes` bounds their estimated size
//!   ([`Event::size_bytes`]), so a flood of large events cannot take the memory that
//!   the count alone would allow. A batch is accepted whole or not at all.
//! - **Full queue**: `events.full_policy` waits for room up to `events.wait_timeout_ms`, or
//!   rejects at once; either way a rejection is a [`DispatchError`] (503 with
//!   `Retry-After`), never a silent drop.
//! - **Handlers**: each event's handlers run concurrently; a failing (or panicking) handler
//!   is retried with exponential backoff up to `events.max_attempts`, then counted and
//!   logged with the event's id, without holding back the others.
//! - **Drain**: [`EventDispatcher::drain`] stops accepting, lets the workers handle
//!   everything already accepted (within `events.drain_timeout_ms`) and reports what was
//!   left if the deadline passes.

use std::{
    panic::AssertUnwindSafe,
    sync::{Arc, Mutex, OnceLock, RwLock},
    time::{Duration, Instant},
};

use futures_util::{
    FutureExt as _,
    future::{BoxFuture, join_all},
};
use metrics::{Gauge, counter, gauge};
use poem::http::{HeaderName, HeaderValue, StatusCode, header};
use tokio::{sync::Semaphore, task::JoinHandle};

use super::{Event, EventHandlerEntry, EventHandlerTable, EventHandlers};
use crate::{
    config::{EventsConfig, FullPolicy},
    metrics::{
        EVENTS_FAILED_TOTAL, EVENTS_QUEUE_DEPTH, EVENTS_REJECTED_TOTAL, EVENTS_RETRIED_TOTAL,
    },
    problem::ProblemError,
};

/// Why events were not accepted. Nothing of the batch was queued.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DispatchError {
    /// The queue stayed full (policy `reject`, or `wait` past its deadline).
    #[error("the event queue is full ({capacity} events); retry shortly")]
    QueueFull {
        /// `events.queue_capacity`.
        capacity: usize,
    },
    /// The batch alone is larger than the whole queue.
    #[error("{count} events do not fit in the event queue ({capacity} events)")]
    TooLarge {
        /// Events in the batch.
        count: usize,
        /// `events.queue_capacity`.
        capacity: usize,
    },
    /// The queued events hold `events.queue_max_bytes` (policy `reject`, or `wait` past
    /// its deadline).
    #[error("the event queue is full ({max_bytes} bytes); retry shortly")]
    BytesFull {
        /// `events.queue_max_bytes`.
        max_bytes: usize,
    },
    /// The batch alone is larger, in bytes, than the whole queue.
    #[error("{bytes} bytes of events do not fit in the event queue ({max_bytes} bytes)")]
    TooManyBytes {
        /// The batch's estimated size.
        bytes: usize,
        /// `events.queue_max_bytes`.
        max_bytes: usize,
    },
    /// The server is shutting down and accepts no more events.
    #[error("the server is shutting down and accepts no more events")]
    ShuttingDown,
}

impl DispatchError {
    fn reason(&self) -> &'static str {
        match self {
            Self::QueueFull { .. } | Self::BytesFull { .. } => "full",
            Self::TooLarge { .. } | Self::TooManyBytes { .. } => "too_large",
            Self::ShuttingDown => "shutting_down",
        }
    }
}

/// The problem type of events refused for want of room or storage, by the dispatcher and
/// the message queue alike: its slug and title (503, `Retry-After`).
pub const QUEUE_UNAVAILABLE: (&str, &str) = (
    "event-queue-unavailable",
    "Events cannot be accepted right now",
);

impl ProblemError for DispatchError {
    fn status(&self) -> StatusCode {
        StatusCode::SERVICE_UNAVAILABLE
    }
    fn slug(&self) -> &'static str {
        QUEUE_UNAVAILABLE.0
    }
    fn title(&self) -> &'static str {
        QUEUE_UNAVAILABLE.1
    }
    fn headers(&self) -> Vec<(HeaderName, HeaderValue)> {
        vec![(header::RETRY_AFTER, HeaderValue::from_static("1"))]
    }
}

/// One accepted event, erased to its type.
trait Envelope: Send {
    fn deliver<'a>(self: Box<Self>, inner: &'a Inner) -> BoxFuture<'a, ()>;
}

struct Typed<E> {
    event: Arc<E>,
}

impl<E: Event> Envelope for Typed<E> {
    fn deliver<'a>(self: Box<Self>, inner: &'a Inner) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let Some(handlers) = inner.handlers::<E>() else {
                return;
            };
            match handlers.entries.as_slice() {
                [only] => run_handler(&inner.config, only, &self.event).await,
                entries => {
                    join_all(
                        entries
                            .iter()
                            .map(|entry| run_handler(&inner.config, entry, &self.event)),
                    )
                    .await;
                }
            }
            handlers.handled.increment(1);
        })
    }
}

/// Calls one handler for one event, retrying with backoff; logs the final failure.
async fn run_handler<E: Event>(
    config: &EventsConfig,
    entry: &EventHandlerEntry<E>,
    event: &Arc<E>,
) {
    let mut attempt = 1;
    loop {
        let started = Instant::now();
        let outcome = AssertUnwindSafe((entry.handler)(event.clone()))
            .catch_unwind()
            .await;
        entry.duration.record(started.elapsed());
        let error = match outcome {
            Ok(Ok(())) => return,
            Ok(Err(error)) => format!("{error:#}"),
            Err(_) => "the handler panicked".to_owned(),
        };
        let event_id = event.id().unwrap_or("-");
        if attempt >= config.max_attempts {
            counter!(EVENTS_FAILED_TOTAL, "event" => E::NAME, "module" => entry.module)
                .increment(1);
            tracing::error!(
                event = E::NAME,
                event_id,
                module = entry.module,
                attempts = attempt,
                error,
                "event handler failed; giving up on this event"
            );
            return;
        }
        counter!(EVENTS_RETRIED_TOTAL, "event" => E::NAME, "module" => entry.module).increment(1);
        let backoff = backoff(config, attempt);
        tracing::warn!(
            event = E::NAME,
            event_id,
            module = entry.module,
            attempt,
            retry_in_ms = backoff.as_millis() as u64,
            error,
            "event handler failed; retrying"
        );
        tokio::time::sleep(backoff).await;
        attempt += 1;
    }
}

/// `retry_backoff_ms × 2^(attempt-1)`, at most `retry_backoff_max_ms`.
fn backoff(config: &EventsConfig, attempt: u32) -> Duration {
    Duration::from_millis(crate::backoff::exponential_ms(
        config.retry_backoff_ms,
        config.retry_backoff_max_ms,
        attempt,
    ))
}

/// An accepted event and the bytes it holds of `events.queue_max_bytes`.
type Job = (Box<dyn Envelope>, u32);

struct Inner {
    config: EventsConfig,
    table: OnceLock<EventHandlerTable>,
    /// Taken at drain: the workers then see the end of the queue once it is empty.
    sender: RwLock<Option<flume::Sender<Job>>>,
    receiver: flume::Receiver<Job>,
    /// One permit per free place; an event holds its permit until it is handled.
    room: Semaphore,
    /// One permit per free byte of `queue_max_bytes`, held the same way.
    bytes: Semaphore,
    workers: Mutex<Vec<JoinHandle<()>>>,
    /// `events_queue_depth`.
    depth: Gauge,
}

impl Inner {
    fn handlers<E: Event>(&self) -> Option<&EventHandlers<E>> {
        self.table
            .get()
            .and_then(EventHandlerTable::handlers_of::<E>)
    }
}

/// Queues events and calls their handlers from a pool of workers. Cheap to clone.
#[derive(Clone)]
pub struct EventDispatcher {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for EventDispatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventDispatcher")
            .field("capacity", &self.inner.config.queue_capacity)
            .field("queued", &self.inner.receiver.len())
            .finish()
    }
}

impl EventDispatcher {
    /// A dispatcher that queues nothing until [`start`](Self::start)ed.
    pub fn new(config: &EventsConfig) -> Self {
        let (sender, receiver) = flume::unbounded();
        Self {
            inner: Arc::new(Inner {
                config: config.clone(),
                table: OnceLock::new(),
                sender: RwLock::new(Some(sender)),
                receiver,
                room: Semaphore::new(config.queue_capacity.min(Semaphore::MAX_PERMITS)),
                bytes: Semaphore::new(config.queue_max_bytes.min(Semaphore::MAX_PERMITS)),
                workers: Mutex::new(Vec::new()),
                depth: gauge!(EVENTS_QUEUE_DEPTH),
            }),
        }
    }

    /// Freezes the handler table and starts the workers (later calls are ignored).
    pub fn start(&self, table: EventHandlerTable) {
        if self.inner.table.set(table).is_err() {
            return;
        }
        self.inner.depth.set(0.0);
        let mut workers = self.inner.workers.lock().unwrap_or_else(|p| p.into_inner());
        for _ in 0..self.inner.config.workers.max(1) {
            let inner = self.inner.clone();
            workers.push(tokio::spawn(async move {
                while let Ok((job, bytes)) = inner.receiver.recv_async().await {
                    job.deliver(&inner).await;
                    inner.room.add_permits(1);
                    inner.bytes.add_permits(bytes as usize);
                    inner.depth.decrement(1.0);
                }
            }));
        }
    }

    /// Whether any module handles `E`.
    pub fn handles<E: Event>(&self) -> bool {
        self.inner
            .handlers::<E>()
            .is_some_and(|h| !h.entries.is_empty())
    }

    /// Queues one event. See [`emit_all`](Self::emit_all).
    pub async fn emit<E: Event>(&self, event: E) -> Result<(), DispatchError> {
        self.emit_all(vec![event]).await
    }

    /// Queues every event of `events`, or none: when the queue has no room for all of
    /// them (after waiting, under policy `wait`) nothing is queued and the error says why.
    /// Events that no module handles are accepted and dropped at once.
    pub async fn emit_all<E: Event>(&self, events: Vec<E>) -> Result<(), DispatchError> {
        let count = events.len();
        let handlers = match self.inner.handlers::<E>() {
            Some(handlers) if count > 0 && !handlers.entries.is_empty() => handlers,
            _ => return Ok(()),
        };
        let result = self.enqueue(events).await;
        match &result {
            Ok(()) => handlers.accepted.increment(count as u64),
            Err(error) => {
                counter!(EVENTS_REJECTED_TOTAL, "event" => E::NAME, "reason" => error.reason())
                    .increment(count as u64);
            }
        }
        result
    }

    async fn enqueue<E: Event>(&self, events: Vec<E>) -> Result<(), DispatchError> {
        let inner = &self.inner;
        let count = events.len();
        let capacity = inner.config.queue_capacity;
        let max_bytes = inner.config.queue_max_bytes;
        let permits = u32::try_from(count)
            .ok()
            .filter(|_| count <= capacity)
            .ok_or(DispatchError::TooLarge { count, capacity })?;
        // One event's estimate is capped so that it fits a permit count; the sum is what
        // the batch needs.
        let sizes: Vec<u32> = events
            .iter()
            .map(|e| u32::try_from(e.size_bytes()).unwrap_or(u32::MAX))
            .collect();
        let bytes: usize = sizes.iter().map(|&b| b as usize).sum();
        let byte_permits = u32::try_from(bytes)
            .ok()
            .filter(|_| bytes <= max_bytes)
            .ok_or(DispatchError::TooManyBytes { bytes, max_bytes })?;
        let closed = |_| DispatchError::ShuttingDown;
        let (room, held) = match inner.config.full_policy {
            FullPolicy::Reject => {
                let full = |e, error| match e {
                    tokio::sync::TryAcquireError::Closed => DispatchError::ShuttingDown,
                    tokio::sync::TryAcquireError::NoPermits => error,
                };
                let room = inner
                    .room
                    .try_acquire_many(permits)
                    .map_err(|e| full(e, DispatchError::QueueFull { capacity }))?;
                let held = inner
                    .bytes
                    .try_acquire_many(byte_permits)
                    .map_err(|e| full(e, DispatchError::BytesFull { max_bytes }))?;
                (room, held)
            }
            FullPolicy::Wait => {
                let wait = Duration::from_millis(inner.config.wait_timeout_ms);
                let deadline = tokio::time::Instant::now() + wait;
                let room = tokio::time::timeout_at(deadline, inner.room.acquire_many(permits))
                    .await
                    .map_err(|_| DispatchError::QueueFull { capacity })?
                    .map_err(closed)?;
                let held =
                    tokio::time::timeout_at(deadline, inner.bytes.acquire_many(byte_permits))
                        .await
                        .map_err(|_| DispatchError::BytesFull { max_bytes })?
                        .map_err(closed)?;
                (room, held)
            }
        };
        let sender = inner.sender.read().unwrap_or_else(|p| p.into_inner());
        let Some(sender) = sender.as_ref() else {
            return Err(DispatchError::ShuttingDown);
        };
        // The permits now travel with the events; workers give them back one by one.
        room.forget();
        held.forget();
        inner.depth.increment(count as f64);
        for (event, size) in events.into_iter().zip(sizes) {
            let job: Box<dyn Envelope> = Box::new(Typed {
                event: Arc::new(event),
            });
            // The receiver lives as long as `inner`, so sending cannot fail.
            let _ = sender.send((job, size));
        }
        Ok(())
    }

    /// Events accepted and not yet handled.
    pub fn pending(&self) -> usize {
        self.inner.config.queue_capacity - self.inner.room.available_permits()
    }

    /// The estimated bytes of the events accepted and not yet handled.
    pub fn pending_bytes(&self) -> usize {
        self.inner
            .config
            .queue_max_bytes
            .min(Semaphore::MAX_PERMITS)
            - self.inner.bytes.available_permits()
    }

    /// Stops accepting (new events get [`DispatchError::ShuttingDown`]) and waits until
    /// every accepted event has been handled, at most `events.drain_timeout_ms` and at most
    /// `budget` (what is left of the shutdown's). Returns how many accepted events were
    /// left unhandled (0 unless the deadline passed).
    pub async fn drain(&self, budget: Duration) -> usize {
        let inner = &self.inner;
        inner.room.close();
        inner.bytes.close();
        inner
            .sender
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let workers = std::mem::take(&mut *inner.workers.lock().unwrap_or_else(|p| p.into_inner()));
        let pending = self.pending();
        if workers.is_empty() {
            return 0;
        }
        tracing::info!(pending, "event dispatcher draining");
        let deadline = Duration::from_millis(inner.config.drain_timeout_ms).min(budget);
        let started = Instant::now();
        if tokio::time::timeout(deadline, join_all(workers))
            .await
            .is_ok()
        {
            tracing::info!(
                handled = pending,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "event dispatcher drained"
            );
            return 0;
        }
        let left = self.pending();
        tracing::error!(
            left,
            deadline_ms = deadline.as_millis() as u64,
            "event dispatcher drain deadline passed; accepted events were not handled"
        );
        left
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    struct Tick(usize);
    impl Event for Tick {
        const NAME: &'static str = "tick";
    }

    fn config(capacity: usize, policy: FullPolicy) -> EventsConfig {
        EventsConfig {
            queue_capacity: capacity,
            queue_max_bytes: 1 << 20,
            workers: 2,
            full_policy: policy,
            wait_timeout_ms: 50,
            max_attempts: 3,
            retry_backoff_ms: 1,
            retry_backoff_max_ms: 4,
            drain_timeout_ms: 5_000,
        }
    }

    fn counting(table: &mut EventHandlerTable, module: &'static str) -> Arc<AtomicUsize> {
        let seen = Arc::new(AtomicUsize::new(0));
        let counter = seen.clone();
        table.add(module, move |event: Arc<Tick>| {
            counter.fetch_add(event.0, Ordering::SeqCst);
            async { Ok(()) }
        });
        seen
    }

    #[tokio::test]
    async fn every_accepted_event_is_handled_by_every_handler_before_drain_returns() {
        let mut table = EventHandlerTable::default();
        let a = counting(&mut table, "a");
        let b = counting(&mut table, "b");
        let dispatcher = EventDispatcher::new(&config(1_000, FullPolicy::Wait));
        dispatcher.start(table);
        for _ in 0..10 {
            dispatcher
                .emit_all((0..100).map(|_| Tick(1)).collect())
                .await
                .expect("room");
        }
        assert_eq!(dispatcher.drain(Duration::MAX).await, 0);
        assert_eq!(a.load(Ordering::SeqCst), 1_000);
        assert_eq!(b.load(Ordering::SeqCst), 1_000);
        assert_eq!(
            dispatcher.emit(Tick(1)).await,
            Err(DispatchError::ShuttingDown)
        );
    }

    #[tokio::test]
    async fn a_failing_handler_is_retried_and_does_not_stop_the_others() {
        let mut table = EventHandlerTable::default();
        let attempts = Arc::new(AtomicUsize::new(0));
        let tries = attempts.clone();
        table.add("flaky", move |_: Arc<Tick>| {
            let n = tries.fetch_add(1, Ordering::SeqCst);
            async move {
                match n {
                    0 => anyhow::bail!("first attempt fails"),
                    1 => panic!("second attempt panics"),
                    _ => Ok(()),
                }
            }
        });
        let healthy = counting(&mut table, "healthy");
        table.add("broken", |_: Arc<Tick>| async { anyhow::bail!("always") });
        let dispatcher = EventDispatcher::new(&config(10, FullPolicy::Wait));
        dispatcher.start(table);
        dispatcher.emit(Tick(1)).await.expect("room");
        assert_eq!(dispatcher.drain(Duration::MAX).await, 0);
        assert_eq!(attempts.load(Ordering::SeqCst), 3, "retried up to success");
        assert_eq!(healthy.load(Ordering::SeqCst), 1);
    }

    /// A handler that blocks until released, so the queue can be filled.
    fn gated<E: Event>(table: &mut EventHandlerTable) -> Arc<Semaphore> {
        let gate = Arc::new(Semaphore::new(0));
        let open = gate.clone();
        table.add("gated", move |_: Arc<E>| {
            let open = open.clone();
            async move {
                open.acquire().await?.forget();
                Ok(())
            }
        });
        gate
    }

    #[tokio::test]
    async fn a_full_queue_rejects_whole_batches_under_either_policy() {
        for policy in [FullPolicy::Reject, FullPolicy::Wait] {
            let mut table = EventHandlerTable::default();
            let gate = gated::<Tick>(&mut table);
            let dispatcher = EventDispatcher::new(&config(5, policy));
            dispatcher.start(table);
            dispatcher
                .emit_all((0..4).map(Tick).collect())
                .await
                .expect("fits");
            assert_eq!(
                dispatcher.emit_all((0..2).map(Tick).collect()).await,
                Err(DispatchError::QueueFull { capacity: 5 }),
                "{policy:?}: all or nothing"
            );
            assert_eq!(
                dispatcher.emit_all((0..6).map(Tick).collect()).await,
                Err(DispatchError::TooLarge {
                    count: 6,
                    capacity: 5
                })
            );
            dispatcher.emit(Tick(1)).await.expect("one more fits");
            assert_eq!(dispatcher.pending(), 5);
            gate.add_permits(5);
            assert_eq!(dispatcher.drain(Duration::MAX).await, 0);
        }
    }

    #[tokio::test]
    async fn the_wait_policy_takes_room_freed_while_waiting() {
        let mut table = EventHandlerTable::default();
        let gate = gated::<Tick>(&mut table);
        let mut config = config(2, FullPolicy::Wait);
        config.wait_timeout_ms = 5_000;
        let dispatcher = EventDispatcher::new(&config);
        dispatcher.start(table);
        dispatcher
            .emit_all(vec![Tick(1), Tick(1)])
            .await
            .expect("fits");
        let release = gate.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            release.add_permits(1);
        });
        dispatcher.emit(Tick(1)).await.expect("room freed");
        gate.add_permits(2);
        assert_eq!(dispatcher.drain(Duration::MAX).await, 0);
    }

    #[tokio::test]
    async fn drain_reports_events_left_when_the_deadline_passes() {
        let mut table = EventHandlerTable::default();
        let _gate = gated::<Tick>(&mut table);
        let mut config = config(10, FullPolicy::Wait);
        config.drain_timeout_ms = 50;
        let dispatcher = EventDispatcher::new(&config);
        dispatcher.start(table);
        dispatcher
            .emit_all((0..3).map(Tick).collect())
            .await
            .expect("fits");
        assert_eq!(dispatcher.drain(Duration::MAX).await, 3);
    }

    /// An event of a given size.
    struct Blob(usize);
    impl Event for Blob {
        const NAME: &'static str = "blob";
        fn size_bytes(&self) -> usize {
            self.0
        }
    }

    #[tokio::test]
    async fn the_queue_is_bounded_by_bytes_as_well_as_count() {
        let mut table = EventHandlerTable::default();
        let gate = gated::<Blob>(&mut table);
        let mut config = config(100, FullPolicy::Reject);
        config.queue_max_bytes = 1_000;
        let dispatcher = EventDispatcher::new(&config);
        dispatcher.start(table);
        dispatcher
            .emit_all(vec![Blob(400), Blob(400)])
            .await
            .expect("800 bytes fit");
        assert_eq!(
            dispatcher.emit(Blob(300)).await,
            Err(DispatchError::BytesFull { max_bytes: 1_000 }),
            "two events of a hundred fit by count, not by bytes"
        );
        assert_eq!(
            dispatcher.emit(Blob(2_000)).await,
            Err(DispatchError::TooManyBytes {
                bytes: 2_000,
                max_bytes: 1_000
            })
        );
        dispatcher.emit(Blob(200)).await.expect("exactly full");
        assert_eq!(dispatcher.pending_bytes(), 1_000);
        gate.add_permits(3);
        assert_eq!(dispatcher.drain(Duration::MAX).await, 0);
        assert_eq!(
            dispatcher.pending_bytes(),
            0,
            "handled events give their bytes back"
        );
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let config = EventsConfig {
            retry_backoff_ms: 100,
            retry_backoff_max_ms: 500,
            ..EventsConfig::default()
        };
        let waits: Vec<_> = (1..=5).map(|a| backoff(&config, a).as_millis()).collect();
        assert_eq!(waits, [100, 200, 400, 500, 500]);
    }
}
