//! Serving a listener: Trellis's accept loop over hyper, in place of `poem::Server`, for
//! what that one does not offer:
//!
//! - a header-read timeout counted from the first byte of each request (and from the
//!   accept for a new connection). hyper's own starts as soon as a keep-alive connection
//!   goes idle, so it would close every idle connection after a few seconds, racing the
//!   proxy that reuses them;
//! - an idle timeout: a keep-alive connection with no request, or a client that stopped
//!   reading its response, is closed;
//! - a cap on open connections: one more is answered 503 by the middleware stack (it
//!   carries [`ConnectionOverCapacity`]) and closed;
//! - a shutdown that stops accepting, lets open connections finish their requests, and
//!   says how many it had to cut when its time ran out.
//!
//! Timing costs a clock read at the first byte and at the end of each request; the
//! watchdog of a connection wakes only at its next deadline.

use std::{
    convert::Infallible,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering::Relaxed},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use hyper::{body::Incoming, service::service_fn};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use metrics::{counter, gauge};
use poem::{
    Addr, Endpoint as _, Response,
    endpoint::BoxEndpoint,
    http::uri::Scheme,
    web::{LocalAddr, RemoteAddr},
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    time::Instant,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use trellis_core::metrics::{
    HTTP_CONNECTIONS_OPEN, HTTP_HEADER_TIMEOUTS_TOTAL, HTTP_OVERLOAD_REJECTIONS_TOTAL,
};

/// Marks a request that came on a connection beyond `server.max_connections`.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionOverCapacity {
    /// The cap.
    pub limit: usize,
}

/// `[server]`'s connection settings.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// `header_read_timeout_ms`.
    pub header_read: Duration,
    /// `idle_timeout_ms`.
    pub idle: Duration,
    /// `max_connections`.
    pub max_connections: usize,
}

/// Connections beyond the cap are answered by at most this share of it more (at least
/// [`MIN_OVERFLOW`]); further ones are closed at once.
const OVERFLOW_SHARE: usize = 8;
const MIN_OVERFLOW: usize = 8;

/// The connections of every listener of a server, and how to stop them.
#[derive(Clone, Default)]
pub struct Connections {
    tracker: TaskTracker,
    /// Stop accepting; finish the requests under way, then close.
    graceful: CancellationToken,
    /// Close now.
    abort: CancellationToken,
    /// Requests that were being served when their connection was closed by `abort`.
    cut: Arc<AtomicUsize>,
}

/// What [`Connections::finish`] could not finish.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Unfinished {
    /// Connections still open when the time ran out.
    pub connections: usize,
    /// Requests they were serving.
    pub requests: usize,
}

impl Connections {
    /// Stops accepting on every listener; open connections close once their current
    /// request is answered.
    pub fn stop_accepting(&self) {
        self.graceful.cancel();
    }

    /// Waits until every connection is closed, at most `within`; then closes the rest.
    pub async fn finish(&self, within: Duration) -> Unfinished {
        self.graceful.cancel();
        self.tracker.close();
        if tokio::time::timeout(within, self.tracker.wait())
            .await
            .is_ok()
        {
            return Unfinished::default();
        }
        let connections = self.tracker.len();
        self.abort.cancel();
        self.tracker.wait().await;
        Unfinished {
            connections,
            requests: self.cut.load(Relaxed),
        }
    }

    /// Accepts on `listener` until [`Self::stop_accepting`], serving each connection
    /// with `endpoint`.
    pub async fn serve(
        &self,
        listener: TcpListener,
        endpoint: Arc<BoxEndpoint<'static, Response>>,
        limits: Limits,
    ) {
        let local = listener
            .local_addr()
            .map(|addr| LocalAddr(Addr::SocketAddr(addr)))
            .unwrap_or_default();
        let open = Arc::new(AtomicUsize::new(0));
        let overflow_cap = (limits.max_connections / OVERFLOW_SHARE).max(MIN_OVERFLOW);
        let open_gauge = gauge!(HTTP_CONNECTIONS_OPEN);
        let refused = counter!(HTTP_OVERLOAD_REJECTIONS_TOTAL, "limit" => "connections");
        loop {
            let (stream, peer) = tokio::select! {
                // Once stopping, no connection is taken that would only be closed unserved.
                biased;
                () = self.graceful.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        // Out of file descriptors, or a connection reset before it was
                        // accepted: wait a moment instead of spinning.
                        tracing::warn!(%error, "accepting a connection failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let _ = stream.set_nodelay(true);
            let count = open.fetch_add(1, Relaxed) + 1;
            let slot = Slot {
                open: open.clone(),
                gauge: open_gauge.clone(),
            };
            open_gauge.increment(1.0);
            let connection = Connection {
                endpoint: endpoint.clone(),
                local: local.clone(),
                peer,
                limits,
            };
            if count > limits.max_connections {
                refused.increment(1);
                if count > limits.max_connections + overflow_cap {
                    drop(stream);
                    drop(slot);
                    continue;
                }
                let abort = self.abort.clone();
                self.tracker.spawn(async move {
                    let _slot = slot;
                    tokio::select! {
                        () = connection.refuse(stream) => {},
                        () = abort.cancelled() => {},
                    }
                });
                continue;
            }
            let graceful = self.graceful.clone();
            let abort = self.abort.clone();
            let cut = self.cut.clone();
            self.tracker.spawn(async move {
                let _slot = slot;
                let left = connection.serve(stream, graceful, abort).await;
                cut.fetch_add(left, Relaxed);
            });
        }
    }
}

/// One open connection, counted until dropped.
struct Slot {
    open: Arc<AtomicUsize>,
    gauge: metrics::Gauge,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Relaxed);
        self.gauge.decrement(1.0);
    }
}

struct Connection {
    endpoint: Arc<BoxEndpoint<'static, Response>>,
    local: LocalAddr,
    peer: SocketAddr,
    limits: Limits,
}

impl Connection {
    /// A service handing each request to the endpoint, marked `over_capacity` when it
    /// came beyond the cap.
    fn service(
        &self,
        activity: Option<Arc<Activity>>,
        over_capacity: Option<ConnectionOverCapacity>,
    ) -> impl hyper::service::Service<
        hyper::Request<Incoming>,
        Response = hyper::Response<BoxBody<Bytes, io::Error>>,
        Error = Infallible,
        Future: Send + 'static,
    > + Clone
    + Send
    + 'static {
        let endpoint = self.endpoint.clone();
        let local = self.local.clone();
        let remote = RemoteAddr(Addr::SocketAddr(self.peer));
        service_fn(move |req: hyper::Request<Incoming>| {
            let endpoint = endpoint.clone();
            let activity = activity.clone();
            let mut req = poem::Request::from((req, local.clone(), remote.clone(), Scheme::HTTP));
            if let Some(mark) = over_capacity {
                req.extensions_mut().insert(mark);
            }
            // Ends when the request does, answered or dropped (a reset HTTP/2 stream).
            let in_service = activity.map(InService::begin);
            async move {
                let resp = match endpoint.call(req).await {
                    Ok(resp) => resp,
                    Err(error) => error.into_response(),
                };
                drop(in_service);
                Ok::<_, Infallible>(hyper::Response::from(resp))
            }
        })
    }

    /// Serves requests until the client closes, a timeout closes, or the server stops.
    /// Returns how many requests were cut short by `abort`.
    async fn serve(
        self,
        stream: TcpStream,
        graceful: CancellationToken,
        abort: CancellationToken,
    ) -> usize {
        let activity = Arc::new(Activity::new());
        let io = TokioIo::new(Watched {
            inner: stream,
            activity: activity.clone(),
        });
        let service = self.service(Some(activity.clone()), None);
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(None);
        let conn = builder.serve_connection_with_upgrades(io, service);
        tokio::pin!(conn);
        let mut closing = false;
        let mut check = Check::new(&activity, self.limits);
        let watchdog = tokio::time::sleep_until(check.next);
        tokio::pin!(watchdog);
        loop {
            tokio::select! {
                _ = conn.as_mut() => return 0,
                () = graceful.cancelled(), if !closing => {
                    closing = true;
                    conn.as_mut().graceful_shutdown();
                }
                () = abort.cancelled() => return activity.in_service(),
                () = &mut watchdog => match check.run(&activity) {
                    Verdict::Fine => watchdog.as_mut().reset(check.next),
                    Verdict::HeaderTimeout => {
                        counter!(HTTP_HEADER_TIMEOUTS_TOTAL).increment(1);
                        return 0;
                    }
                    Verdict::Idle => {
                        // Asked to close before, and nothing moved since: the client
                        // stopped reading its response.
                        let stalled = check.stalled(&activity);
                        if closing && stalled {
                            return 0;
                        }
                        closing = true;
                        conn.as_mut().graceful_shutdown();
                        watchdog.as_mut().reset(check.next);
                    }
                },
            }
        }
    }

    /// Answers a connection beyond the cap: one request, 503, then close, within the
    /// header-read timeout.
    async fn refuse(self, stream: TcpStream) {
        let limit = self.limits.max_connections;
        let service = self.service(None, Some(ConnectionOverCapacity { limit }));
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(self.limits.header_read)
            .keep_alive(false);
        let conn = builder.serve_connection(TokioIo::new(stream), service);
        let _ = tokio::time::timeout(self.limits.header_read * 2, conn).await;
    }
}

/// What a connection is doing, shared by its I/O (reads), its requests (begin and end)
/// and its watchdog. Times are milliseconds since the connection was accepted.
struct Activity {
    accepted: Instant,
    /// Requests being served (several at once over HTTP/2).
    in_service: AtomicU32,
    /// When the first byte of the next request's header arrived (0: none yet).
    head_since: AtomicU64,
    /// When the last request ended.
    idle_since: AtomicU64,
    /// Bytes read and written so far.
    progress: AtomicU64,
    /// Whether the next read may start a request's header: HTTP/1 only.
    http1: AtomicBool,
    /// Nothing was read yet.
    fresh: AtomicBool,
}

impl Activity {
    fn new() -> Self {
        Self {
            accepted: Instant::now(),
            in_service: AtomicU32::new(0),
            // A new connection's header is due from the accept.
            head_since: AtomicU64::new(1),
            idle_since: AtomicU64::new(1),
            progress: AtomicU64::new(0),
            http1: AtomicBool::new(true),
            fresh: AtomicBool::new(true),
        }
    }

    /// Milliseconds since the accept, at least 1 (0 means "none").
    fn now(&self) -> u64 {
        u64::try_from(self.accepted.elapsed().as_millis())
            .unwrap_or(u64::MAX)
            .max(1)
    }

    fn read(&self, bytes: &[u8]) {
        self.progress.fetch_add(bytes.len() as u64, Relaxed);
        if self.fresh.swap(false, Relaxed) && bytes.starts_with(b"PRI * HTTP/2.0") {
            // HTTP/2 has no idle header phase: its frames arrive between streams.
            self.http1.store(false, Relaxed);
            self.head_since.store(0, Relaxed);
        }
        if self.http1.load(Relaxed)
            && self.in_service.load(Relaxed) == 0
            && self.head_since.load(Relaxed) == 0
        {
            self.head_since.store(self.now(), Relaxed);
        }
    }

    fn in_service(&self) -> usize {
        self.in_service.load(Relaxed) as usize
    }
}

/// One request being served on a connection, until dropped.
struct InService(Arc<Activity>);

impl InService {
    fn begin(activity: Arc<Activity>) -> Self {
        activity.in_service.fetch_add(1, Relaxed);
        activity.head_since.store(0, Relaxed);
        Self(activity)
    }
}

impl Drop for InService {
    fn drop(&mut self) {
        self.0.idle_since.store(self.0.now(), Relaxed);
        self.0.in_service.fetch_sub(1, Relaxed);
    }
}

enum Verdict {
    Fine,
    HeaderTimeout,
    Idle,
}

/// The watchdog's state between its wake-ups.
struct Check {
    limits: Limits,
    next: Instant,
    progress: u64,
}

impl Check {
    fn new(activity: &Activity, limits: Limits) -> Self {
        Self {
            limits,
            next: activity.accepted + limits.header_read.min(limits.idle),
            progress: 0,
        }
    }

    /// Decides at a wake-up, and sets the next one: never later than a header-read
    /// timeout from now, since a request's header may start at any moment.
    fn run(&mut self, activity: &Activity) -> Verdict {
        let at = |ms: u64| activity.accepted + Duration::from_millis(ms);
        let now = Instant::now();
        let soon = now + self.limits.header_read.min(self.limits.idle);
        if activity.in_service.load(Relaxed) > 0 {
            // A request's own time is `server.request_timeout_ms`'s business.
            self.next = soon;
            return Verdict::Fine;
        }
        let head = activity.head_since.load(Relaxed);
        if head > 0 {
            let due = at(head) + self.limits.header_read;
            if now >= due {
                return Verdict::HeaderTimeout;
            }
            self.next = due;
            return Verdict::Fine;
        }
        let due = at(activity.idle_since.load(Relaxed)) + self.limits.idle;
        if now >= due {
            self.next = now + self.limits.idle;
            return Verdict::Idle;
        }
        self.next = due.min(soon);
        Verdict::Fine
    }

    /// Whether nothing was read or written since the last call.
    fn stalled(&mut self, activity: &Activity) -> bool {
        let progress = activity.progress.load(Relaxed);
        std::mem::replace(&mut self.progress, progress) == progress
    }
}

/// The socket, reporting what it reads and writes to the connection's [`Activity`].
struct Watched {
    inner: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled
            && buf.filled().len() > before
        {
            self.activity.read(&buf.filled()[before..]);
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(written)) = polled {
            self.activity.progress.fetch_add(written as u64, Relaxed);
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(written)) = polled {
            self.activity.progress.fetch_add(written as u64, Relaxed);
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
