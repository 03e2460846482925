//! The listener under slow, idle, oversized and too many clients, spoken to over raw TCP
//! so that every byte and every close is the test's own.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use serde_json::json;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

use crate::helpers::{assert_problem, spawn_app_with};

/// One HTTP/1.1 response read off a raw connection.
struct RawResponse {
    status: u16,
    head: String,
    body: Vec<u8>,
}

impl RawResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.trim().eq_ignore_ascii_case(name).then(|| value.trim())
        })
    }
}

/// Reads one response (a `Content-Length` body) within `within`.
async fn read_response(stream: &mut TcpStream, within: Duration) -> std::io::Result<RawResponse> {
    tokio::time::timeout(within, async {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 8192];
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                let status = head
                    .split(' ')
                    .nth(1)
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
                let mut response = RawResponse {
                    status,
                    head,
                    body: Vec::new(),
                };
                let length: usize = response
                    .header("content-length")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                let mut body = buf[end + 4..].to_vec();
                while body.len() < length {
                    let n = stream.read(&mut chunk).await?;
                    if n == 0 {
                        break;
                    }
                    body.extend_from_slice(&chunk[..n]);
                }
                response.body = body;
                return Ok(response);
            }
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    })
    .await
    .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))?
}

/// Whether the server closed `stream` (end of file or reset) within `within`.
async fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    let mut byte = [0u8; 1];
    matches!(
        tokio::time::timeout(within, stream.read(&mut byte)).await,
        Ok(Ok(0) | Err(_))
    )
}

/// Sends `head` and then `a`s, a byte per `pace`, until the server closes the connection
/// or `give_up` has passed since `started`; answers the time since `started`.
pub(crate) async fn drip(
    stream: &mut TcpStream,
    head: &str,
    pace: Duration,
    started: Instant,
    give_up: Duration,
) -> Duration {
    for byte in head.bytes().chain(std::iter::repeat(b'a')) {
        if stream.write_all(&[byte]).await.is_err()
            || closed_within(stream, pace).await
            || started.elapsed() > give_up
        {
            break;
        }
    }
    started.elapsed()
}

async fn get_on(stream: &mut TcpStream, path: &str) -> RawResponse {
    let request = format!("GET {path} HTTP/1.1\r\nHost: trellis\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("write");
    read_response(stream, Duration::from_secs(5))
        .await
        .expect("a response")
}

async fn connect(addr: SocketAddr) -> TcpStream {
    TcpStream::connect(addr).await.expect("connect")
}

#[tokio::test]
async fn slow_header_senders_are_closed_after_the_header_timeout_while_others_are_served() {
    let app = spawn_app_with(&[("server.header_read_timeout_ms", json!(1000))]).await;
    let started = Instant::now();
    let mut drips = Vec::new();
    for i in 0..300 {
        let mut stream = connect(app.addr).await;
        drips.push(tokio::spawn(async move {
            let head = format!("GET /healthz HTTP/1.1\r\nHost: trellis\r\nX-Slow-{i}: ");
            let pace = Duration::from_millis(200);
            drip(&mut stream, &head, pace, started, Duration::from_secs(8)).await
        }));
    }
    for _ in 0..10 {
        let asked = Instant::now();
        assert_eq!(app.get("/healthz").await.status(), 200);
        assert!(
            asked.elapsed() < Duration::from_millis(500),
            "a normal request waited {:?}",
            asked.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for drip in drips {
        let closed_after = drip.await.expect("task");
        assert!(
            closed_after < Duration::from_secs(4),
            "a connection sending its headers one byte at a time was still open after {closed_after:?}"
        );
    }
}

#[tokio::test]
async fn a_slow_header_on_a_kept_alive_connection_is_closed_after_the_header_timeout() {
    let app = spawn_app_with(&[
        ("server.header_read_timeout_ms", json!(500)),
        ("server.idle_timeout_ms", json!(10_000)),
    ])
    .await;
    let mut stream = connect(app.addr).await;
    assert_eq!(get_on(&mut stream, "/healthz").await.status, 200);
    // Idle past a header timeout first: the next header is not due from the accept.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let head = "GET /healthz HTTP/1.1\r\nHost: trellis\r\nX-Slow: ";
    let pace = Duration::from_millis(100);
    let held = drip(
        &mut stream,
        head,
        pace,
        Instant::now(),
        Duration::from_secs(5),
    )
    .await;
    assert!(
        held < Duration::from_millis(1500),
        "a slow second request's header held the connection for {held:?}"
    );
}

#[tokio::test]
async fn idle_keep_alive_connections_outlive_the_header_timeout_and_close_after_the_idle_timeout() {
    let app = spawn_app_with(&[
        ("server.header_read_timeout_ms", json!(300)),
        ("server.idle_timeout_ms", json!(1500)),
    ])
    .await;
    let mut stream = connect(app.addr).await;
    assert_eq!(get_on(&mut stream, "/healthz").await.status, 200);
    // Idle for longer than the header timeout: the connection is kept.
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(get_on(&mut stream, "/healthz").await.status, 200);
    let idle_from = Instant::now();
    assert!(
        !closed_within(&mut stream, Duration::from_millis(1000)).await,
        "closed before the idle timeout"
    );
    assert!(
        closed_within(&mut stream, Duration::from_millis(2000)).await,
        "an idle connection was still open {:?} after its last response",
        idle_from.elapsed()
    );
}

#[tokio::test]
async fn connections_over_the_cap_are_answered_503_with_retry_after() {
    let app = spawn_app_with(&[("server.max_connections", json!(3))]).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut stream = connect(app.addr).await;
        assert_eq!(get_on(&mut stream, "/healthz").await.status, 200);
        held.push(stream);
    }
    let mut over = connect(app.addr).await;
    let refused = get_on(&mut over, "/healthz").await;
    assert_eq!(refused.status, 503, "{}", refused.head);
    assert_eq!(refused.header("retry-after"), Some("1"));
    assert_eq!(
        refused.header("content-type"),
        Some("application/problem+json")
    );
    let problem: serde_json::Value = serde_json::from_slice(&refused.body).expect("JSON");
    assert_eq!(problem["type"], "urn:trellis:problem:over-capacity");
    assert!(closed_within(&mut over, Duration::from_secs(2)).await);

    drop(held.pop());
    tokio::time::sleep(Duration::from_millis(100)).await;
    let metrics = app.get("/metrics").await.text().await.expect("text");
    let refused_connections = metrics
        .lines()
        .find(|l| l.starts_with("http_overload_rejections_total{limit=\"connections\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(refused_connections >= 1.0, "{metrics}");
}

#[tokio::test]
async fn requests_over_the_in_flight_cap_are_answered_503_and_probes_still_answer() {
    let app = spawn_app_with(&[("server.max_in_flight", json!(2))]).await;
    let slow: Vec<_> = (0..2)
        .map(|_| {
            let client = app.client.clone();
            let url = app.url("/api/v1/probe/slow?ms=1500");
            tokio::spawn(async move { client.get(url).send().await.map(|r| r.status()) })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(400)).await;
    let over = app.get("/api/v1/probe/slow?ms=1").await;
    assert_eq!(
        over.headers().get("retry-after").map(|v| v.as_bytes()),
        Some(&b"1"[..])
    );
    let problem = assert_problem(over, 503).await;
    assert_eq!(problem["type"], "urn:trellis:problem:over-capacity");
    assert_eq!(app.get("/healthz").await.status(), 200);
    for request in slow {
        assert_eq!(request.await.expect("task").expect("answered"), 200);
    }
    assert_eq!(app.get("/api/v1/probe/slow?ms=1").await.status(), 200);
}

#[tokio::test]
async fn the_request_timeout_covers_reading_the_body() {
    let app = spawn_app_with(&[("server.request_timeout_ms", json!(500))]).await;
    for head in [
        "POST /api/v1/probe/echo HTTP/1.1\r\nHost: trellis\r\nContent-Type: application/json\r\n\
         Transfer-Encoding: chunked\r\n\r\n1\r\n{\r\n",
        "POST /api/v1/probe/echo HTTP/1.1\r\nHost: trellis\r\nContent-Type: application/json\r\n\
         Content-Length: 40\r\n\r\n{",
    ] {
        let mut stream = connect(app.addr).await;
        stream.write_all(head.as_bytes()).await.expect("write");
        let response = read_response(&mut stream, Duration::from_secs(3))
            .await
            .unwrap_or_else(|e| panic!("no answer to a stalled body ({e}): {head:?}"));
        assert_eq!(response.status, 503, "{head:?}");
    }
}

#[tokio::test]
async fn an_oversized_body_is_answered_413_to_a_client_that_sends_it_all_first() {
    let app = spawn_app_with(&[("server.body_limit_bytes", json!(1024))]).await;
    let body = vec![b'x'; 4 * 1024 * 1024];
    for chunked in [false, true] {
        let mut stream = connect(app.addr).await;
        let framing = match chunked {
            false => format!("Content-Length: {}", body.len()),
            true => String::from("Transfer-Encoding: chunked"),
        };
        let head = format!(
            "POST /api/v1/probe/echo HTTP/1.1\r\nHost: trellis\r\n\
             Content-Type: application/json\r\n{framing}\r\n\r\n"
        );
        stream.write_all(head.as_bytes()).await.expect("write head");
        // As Python's urllib does: the whole body, then the response.
        let sent = match chunked {
            false => stream.write_all(&body).await,
            true => {
                let mut sent = Ok(());
                for piece in body.chunks(64 * 1024) {
                    let frame =
                        [format!("{:x}\r\n", piece.len()).as_bytes(), piece, b"\r\n"].concat();
                    sent = stream.write_all(&frame).await;
                    if sent.is_err() {
                        break;
                    }
                }
                match sent {
                    Ok(()) => stream.write_all(b"0\r\n\r\n").await,
                    failed => failed,
                }
            }
        };
        sent.unwrap_or_else(|e| panic!("sending the body failed ({e}), chunked: {chunked}"));
        let response = read_response(&mut stream, Duration::from_secs(5))
            .await
            .unwrap_or_else(|e| panic!("no 413 ({e}), chunked: {chunked}"));
        assert_eq!(response.status, 413, "chunked: {chunked}");
    }
}
