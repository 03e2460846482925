//! Requests to a [`TestApp`](crate::TestApp): built once with [`Call`], sent in process
//! (no socket) or over HTTP, answered as a [`TestResponse`]; problem bodies as
//! [`Problem`].

use std::{net::SocketAddr, sync::Arc};

use bytes::Bytes;
use poem::{
    Addr, Endpoint as _, Response,
    endpoint::BoxEndpoint,
    http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header},
    web::{LocalAddr, RemoteAddr},
};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::Value;

/// The peer address in-process requests come from, unless [`Call::from`] says otherwise.
pub const IN_PROCESS_PEER: &str = "127.0.0.1:40000";

/// What a request needs to reach the server, one way or the other.
#[derive(Clone)]
pub(crate) struct Target {
    pub(crate) addr: SocketAddr,
    pub(crate) endpoint: Arc<BoxEndpoint<'static, Response>>,
    pub(crate) http: reqwest::Client,
}

/// A request being built: [`Call::send`] runs it in process, [`Call::send_http`] over a
/// connection to the server's port. Both go through the same middleware and routes.
#[must_use = "a call does nothing until sent"]
pub struct Call {
    target: Target,
    method: Method,
    path: String,
    headers: HeaderMap,
    body: Bytes,
    peer: SocketAddr,
}

impl Call {
    pub(crate) fn new(target: Target, method: Method, path: &str) -> Self {
        Self {
            target,
            method,
            path: path.to_owned(),
            headers: HeaderMap::new(),
            body: Bytes::new(),
            peer: IN_PROCESS_PEER.parse().expect("an address"),
        }
    }

    /// Sets a header.
    pub fn header(mut self, name: &'static str, value: &str) -> Self {
        self.headers.insert(
            HeaderName::from_static(name),
            HeaderValue::from_str(value).expect("a valid header value"),
        );
        self
    }

    /// `Authorization: Bearer <token>`.
    pub fn bearer(self, token: &str) -> Self {
        self.header("authorization", &format!("Bearer {token}"))
    }

    /// `body` as JSON.
    pub fn json(self, body: &impl Serialize) -> Self {
        let body = serde_json::to_vec(body).expect("serialisable");
        self.raw("application/json", body)
    }

    /// A body as it is, with its content type.
    pub fn raw(mut self, content_type: &str, body: impl Into<Bytes>) -> Self {
        self.body = body.into();
        self.header("content-type", content_type)
    }

    /// The client address an in-process request comes from (over HTTP it is the socket's).
    pub fn from(mut self, peer: SocketAddr) -> Self {
        self.peer = peer;
        self
    }

    /// Runs the request in process: through the server's whole stack, without a socket.
    pub async fn send(self) -> TestResponse {
        let mut request = poem::http::Request::builder()
            .method(self.method)
            .uri(&self.path)
            .body(())
            .expect("a valid request");
        *request.headers_mut() = self.headers;
        let (parts, ()) = request.into_parts();
        let parts = poem::RequestParts::from((
            parts,
            LocalAddr(Addr::SocketAddr(self.target.addr)),
            RemoteAddr(Addr::SocketAddr(self.peer)),
            poem::http::uri::Scheme::HTTP,
        ));
        let request = poem::Request::from_parts(parts, self.body.into());
        let response = match self.target.endpoint.call(request).await {
            Ok(response) => response,
            Err(error) => error.into_response(),
        };
        let status = response.status();
        let headers = response.headers().clone();
        let body = response
            .into_body()
            .into_bytes()
            .await
            .expect("the response body reads");
        TestResponse {
            status,
            headers,
            body,
        }
    }

    /// Sends the request over HTTP to the server's port.
    pub async fn send_http(self) -> TestResponse {
        let url = format!("http://{}{}", self.target.addr, self.path);
        let response = self
            .target
            .http
            .request(self.method, url)
            .headers(self.headers)
            .body(self.body)
            .send()
            .await
            .expect("the request is answered");
        TestResponse {
            status: response.status(),
            headers: response.headers().clone(),
            body: response.bytes().await.expect("the response body reads"),
        }
    }
}

/// An answer, read whole.
#[derive(Debug, Clone)]
pub struct TestResponse {
    /// The status.
    pub status: StatusCode,
    /// The headers.
    pub headers: HeaderMap,
    /// The body.
    pub body: Bytes,
}

impl TestResponse {
    /// A header's value, when present and text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The body as `T`; panics, showing the body, unless `status` is as expected.
    pub fn expect_json<T: DeserializeOwned>(&self, status: u16) -> T {
        assert_eq!(
            self.status.as_u16(),
            status,
            "status; body: {}",
            self.text()
        );
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("the body is not the expected JSON ({e}): {}", self.text()))
    }

    /// The body as a problem with `status`, checked for every field Trellis problems
    /// carry; panics otherwise.
    pub fn problem(&self, status: u16) -> Problem {
        let body: Value = serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("the problem body is not JSON ({e}): {}", self.text()));
        let body = check_problem(
            self.status.as_u16(),
            self.header(header::CONTENT_TYPE.as_str()),
            self.header("x-request-id"),
            body,
            status,
        );
        Problem::from_body(body)
    }

    /// The body as text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// An `application/problem+json` body.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    /// `status`.
    pub status: u16,
    /// `type`: `urn:trellis:problem:<kind>`.
    pub kind: String,
    /// `title`.
    pub title: String,
    /// `detail`.
    pub detail: String,
    /// `errors`: what was wrong with each field, when the input was refused.
    pub errors: Vec<Violation>,
    /// The whole body, for the fields a module adds.
    pub body: Value,
}

/// One field's refusal in a problem's `errors`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// `body`, `path` or `parameter` (a query or header parameter).
    pub location: String,
    /// The field's name (a JSON pointer into a body).
    pub field: String,
    /// What was wrong.
    pub message: String,
}

impl Problem {
    fn from_body(body: Value) -> Self {
        let text = |key: &str| body[key].as_str().unwrap_or_default().to_owned();
        let errors = body["errors"]
            .as_array()
            .map(|errors| {
                errors
                    .iter()
                    .map(|e| Violation {
                        location: e["location"].as_str().unwrap_or_default().to_owned(),
                        field: e["field"].as_str().unwrap_or_default().to_owned(),
                        message: e["message"].as_str().unwrap_or_default().to_owned(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        Self {
            status: body["status"]
                .as_u64()
                .and_then(|s| u16::try_from(s).ok())
                .unwrap_or(0),
            kind: text("type")
                .strip_prefix("urn:trellis:problem:")
                .unwrap_or_default()
                .to_owned(),
            title: text("title"),
            detail: text("detail"),
            errors,
            body,
        }
    }

    /// The refused fields as (location, field) pairs.
    pub fn fields(&self) -> Vec<(&str, &str)> {
        self.errors
            .iter()
            .map(|v| (v.location.as_str(), v.field.as_str()))
            .collect()
    }
}

/// Asserts a problem+json response with `status`, and returns its body.
pub async fn assert_problem(response: reqwest::Response, status: u16) -> Value {
    let got = response.status().as_u16();
    let header_text = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let content_type = header_text("content-type");
    let request_id = header_text("x-request-id");
    let body: Value = response.json().await.expect("problem body is JSON");
    check_problem(
        got,
        content_type.as_deref(),
        request_id.as_deref(),
        body,
        status,
    )
}

/// The checks every problem passes: its status, content type, fields and request id.
fn check_problem(
    got: u16,
    content_type: Option<&str>,
    request_id: Option<&str>,
    body: Value,
    status: u16,
) -> Value {
    assert_eq!(got, status, "status; body: {body}");
    assert_eq!(
        content_type.unwrap_or_default(),
        "application/problem+json",
        "content type of {body}"
    );
    assert_eq!(body["status"], status, "{body}");
    for field in ["type", "title", "detail", "instance", "request_id"] {
        assert!(body[field].is_string(), "problem lacks `{field}`: {body}");
    }
    assert!(
        body["type"]
            .as_str()
            .unwrap_or_default()
            .starts_with("urn:trellis:problem:"),
        "{body}"
    );
    assert_eq!(
        body["request_id"].as_str(),
        request_id,
        "body and header ids agree"
    );
    body
}

/// The `errors` list of a problem body as (location, field) pairs.
pub fn violations(problem: &Value) -> Vec<(String, String)> {
    Problem::from_body(problem.clone())
        .errors
        .into_iter()
        .map(|v| (v.location, v.field))
        .collect()
}
