//! The middleware stack every request passes, outermost first:
//!
//! 1. [`RequestId`]: reuse a sane incoming `X-Request-Id` or generate one, open the
//!    [`RequestScope`], echo the id; anything still an error becomes problem+json here.
//! 2. [`AccessLog`]: one span and one access-log line per request; logs server-side
//!    failure causes carried by problem responses.
//! 3. [`HttpMetrics`]: in-flight gauge, request counter and duration histogram by method,
//!    route template and status.
//! 4. panic -> 500 problem (poem's `CatchPanic` with our handler).
//! 5. [`BodyLimit`]: 413 beyond `server.body_limit_bytes`, announced or streamed.
//! 6. [`Timeout`]: 503 beyond `server.request_timeout_ms`.
//! 7. CORS (poem's `Cors`), when origins are configured.
//! 8. [`Problems`]: router errors (no route, wrong method with its `Allow` header,
//!    unparsable input) become problem+json.
//!
//! Each layer is a plain generic endpoint: no boxing, no allocation beyond the request id.

use std::{
    sync::{Arc, LazyLock},
    time::{Duration, Instant},
};

use futures_util::StreamExt as _;
use metrics::{SharedString, counter, gauge, histogram};
use poem::{
    Body, Endpoint, IntoResponse, Request, Response,
    http::{HeaderValue, Method, header::HeaderName},
};
use tracing::Instrument as _;
use trellis_core::{
    metrics::{HTTP_REQUEST_DURATION_SECONDS, HTTP_REQUESTS_IN_FLIGHT, HTTP_REQUESTS_TOTAL},
    problem::{InternalError, ProblemJson, RequestScope},
};
use trellis_openapi::RouteIndex;

use crate::errors::{BodyTooLarge, RequestTimedOut, Unmatched, problem_response};

/// The request id header.
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

const UNMATCHED: &str = "unmatched";

/// Layer 1: request id and request scope.
pub struct RequestId<E> {
    pub(crate) inner: E,
    pub(crate) routes: Arc<RouteIndex>,
}

/// An incoming id is reused when it is 1 to 128 visible ASCII characters from a safe set,
/// so it can go into logs and headers unescaped.
fn sane_request_id(value: &HeaderValue) -> Option<&str> {
    let bytes = value.as_bytes();
    let ok = (1..=128).contains(&bytes.len())
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:/+=@".contains(b));
    if ok { value.to_str().ok() } else { None }
}

impl<E: Endpoint> Endpoint for RequestId<E> {
    type Output = Response;

    async fn call(&self, req: Request) -> poem::Result<Response> {
        let id: Arc<str> = match req.headers().get(&X_REQUEST_ID).and_then(sane_request_id) {
            Some(id) => Arc::from(id),
            None => Arc::from(uuid::Uuid::new_v4().simple().to_string()),
        };
        let header = HeaderValue::from_str(&id).ok();
        let scope = RequestScope::new(id, req.uri().clone());
        let mut resp = scope
            .run(async {
                match self.inner.call(req).await {
                    Ok(output) => output.into_response(),
                    Err(error) => problem_response(error, &self.routes),
                }
            })
            .await;
        if let Some(header) = header {
            resp.headers_mut().insert(X_REQUEST_ID.clone(), header);
        }
        Ok(resp)
    }
}

/// Layer 2: one span and one access-log line per request.
pub struct AccessLog<E> {
    pub(crate) inner: E,
    pub(crate) enabled: bool,
}

impl<E: Endpoint> Endpoint for AccessLog<E> {
    type Output = Response;

    async fn call(&self, req: Request) -> poem::Result<Response> {
        let started = Instant::now();
        let span = tracing::info_span!(
            "request",
            request_id = %RequestScope::current_id().as_deref().unwrap_or_default(),
            method = %req.method(),
            path = %req.uri().path(),
        );
        let method = req.method().clone();
        let result = self
            .inner
            .call(req)
            .instrument(span.clone())
            .await
            .map(IntoResponse::into_response);
        let _entered = span.enter();
        let (status, internal) = match &result {
            Ok(resp) => (resp.status(), resp.data::<InternalError>().cloned()),
            Err(error) => (error.status(), None),
        };
        if let Some(InternalError(cause)) = internal {
            tracing::error!(status = status.as_u16(), cause = %cause, "request failed");
        }
        if self.enabled {
            let route = RequestScope::current_route();
            tracing::info!(
                target: "trellis::access",
                method = %method,
                route = route.as_deref().unwrap_or(UNMATCHED),
                status = status.as_u16(),
                latency_ms = started.elapsed().as_secs_f64() * 1_000.0,
                "request"
            );
        }
        result
    }
}

/// Layer 3: Prometheus request metrics.
pub struct HttpMetrics<E> {
    pub(crate) inner: E,
}

static STATUS_LABELS: LazyLock<Vec<SharedString>> = LazyLock::new(|| {
    (0u16..1000)
        .map(|code| SharedString::from_owned(code.to_string()))
        .collect()
});

fn method_label(method: &Method) -> SharedString {
    let known = match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::TRACE => "TRACE",
        Method::CONNECT => "CONNECT",
        // Arbitrary methods would let clients create unbounded label values.
        _ => "OTHER",
    };
    SharedString::const_str(known)
}

struct InFlight;

impl InFlight {
    fn start() -> Self {
        gauge!(HTTP_REQUESTS_IN_FLIGHT).increment(1.0);
        Self
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        gauge!(HTTP_REQUESTS_IN_FLIGHT).decrement(1.0);
    }
}

impl<E: Endpoint> Endpoint for HttpMetrics<E> {
    type Output = Response;

    async fn call(&self, req: Request) -> poem::Result<Response> {
        let started = Instant::now();
        let method = method_label(req.method());
        let in_flight = InFlight::start();
        let result = self.inner.call(req).await.map(IntoResponse::into_response);
        drop(in_flight);
        let (status, unmatched) = match &result {
            Ok(resp) => (resp.status(), resp.data::<Unmatched>().is_some()),
            Err(error) => (error.status(), false),
        };
        let route: SharedString = match RequestScope::current_route() {
            Some(template) if !unmatched => SharedString::from(template),
            _ => SharedString::const_str(UNMATCHED),
        };
        let status = STATUS_LABELS
            .get(usize::from(status.as_u16()))
            .cloned()
            .unwrap_or_else(|| SharedString::const_str("other"));
        let labels = [("method", method), ("route", route), ("status", status)];
        let labels = labels.map(|(k, v)| metrics::Label::new(k, v));
        counter!(HTTP_REQUESTS_TOTAL, labels.iter()).increment(1);
        histogram!(HTTP_REQUEST_DURATION_SECONDS, labels.iter())
            .record(started.elapsed().as_secs_f64());
        result
    }
}

/// Layer 4's handler: a panic becomes an opaque 500 problem; the panic message is logged.
pub fn panic_response(panic: Box<dyn std::any::Any + Send + 'static>) -> Response {
    let message = panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| String::from("(non-string panic payload)"));
    ProblemJson::internal(&format!("handler panicked: {message}")).into_response()
}

/// Layer 5: the body-size limit. A `Content-Length` over the limit is refused before
/// reading; a body without one (chunked) is read up to the limit and refused beyond it.
pub struct BodyLimit<E> {
    pub(crate) inner: E,
    pub(crate) limit: usize,
}

impl<E: Endpoint> Endpoint for BodyLimit<E> {
    type Output = Response;

    async fn call(&self, mut req: Request) -> poem::Result<Response> {
        let too_large = || ProblemJson::from_error(&BodyTooLarge { limit: self.limit });
        let declared = req
            .headers()
            .get(poem::http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        match declared {
            Some(length) if length > self.limit as u64 => {
                return Ok(too_large().into_response());
            }
            Some(_) => {}
            None if req.method() == Method::GET || req.method() == Method::HEAD => {}
            None => {
                let mut stream = req.take_body().into_bytes_stream();
                let mut buffered = Vec::new();
                while let Some(chunk) = stream.next().await {
                    let chunk =
                        chunk.map_err(|e| poem::Error::from(poem::error::ReadBodyError::Io(e)))?;
                    if buffered.len() + chunk.len() > self.limit {
                        return Ok(too_large().into_response());
                    }
                    buffered.extend_from_slice(&chunk);
                }
                req.set_body(Body::from_vec(buffered));
            }
        }
        self.inner.call(req).await.map(IntoResponse::into_response)
    }
}

/// Layer 6: the request timeout.
pub struct Timeout<E> {
    pub(crate) inner: E,
    pub(crate) timeout: Duration,
}

impl<E: Endpoint> Endpoint for Timeout<E> {
    type Output = Response;

    async fn call(&self, req: Request) -> poem::Result<Response> {
        match tokio::time::timeout(self.timeout, self.inner.call(req)).await {
            Ok(result) => result.map(IntoResponse::into_response),
            Err(_) => {
                let timeout_ms = u64::try_from(self.timeout.as_millis()).unwrap_or(u64::MAX);
                Ok(ProblemJson::from_error(&RequestTimedOut { timeout_ms })
                    .with_header(
                        poem::http::header::RETRY_AFTER,
                        HeaderValue::from_static("1"),
                    )
                    .into_response())
            }
        }
    }
}

/// Layer 8: router errors as problem+json, with `Allow` on 405.
pub struct Problems<E> {
    pub(crate) inner: E,
    pub(crate) routes: Arc<RouteIndex>,
}

impl<E: Endpoint> Endpoint for Problems<E> {
    type Output = Response;

    async fn call(&self, req: Request) -> poem::Result<Response> {
        Ok(match self.inner.call(req).await {
            Ok(output) => output.into_response(),
            Err(error) => problem_response(error, &self.routes),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_reused_only_when_sane() {
        let ok = HeaderValue::from_static("abc-123_DEF.4:5");
        assert_eq!(sane_request_id(&ok), Some("abc-123_DEF.4:5"));
        for bad in ["", "has space", "semi;colon", "quote\"", &"x".repeat(129)] {
            let value = HeaderValue::from_str(bad).expect("header value");
            assert_eq!(sane_request_id(&value), None, "{bad:?} should be replaced");
        }
    }

    #[test]
    fn unknown_methods_share_one_label() {
        let custom = Method::from_bytes(b"PURGE").expect("method");
        assert_eq!(method_label(&custom).as_ref(), "OTHER");
        assert_eq!(method_label(&Method::GET).as_ref(), "GET");
    }
}
