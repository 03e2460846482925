//! `application/problem+json` (RFC 9457): the one shape every error a client sees takes.
//!
//! Module errors implement [`ProblemError`]; the api layer turns them into a [`ProblemJson`]
//! response with [`ProblemJson::from_error`]. The request id and the request path come from
//! the request scope that the server's request-id middleware opens ([`RequestScope`]), so an
//! api handler never has to thread them through by hand.
//!
//! Turning an error into a response has no side effect: a server-side failure's full text
//! rides in the response extensions ([`InternalError`]) and the access-log middleware logs
//! it once, inside the request span. The client sees an opaque detail and the request id.

use std::{
    borrow::Cow,
    sync::{Arc, OnceLock},
};

use poem::{
    IntoResponse, Response,
    http::{HeaderValue, StatusCode, Uri, header},
};
use poem_openapi::{
    ApiResponse, Object,
    payload::Payload,
    registry::{MetaMediaType, MetaResponse, MetaResponses, MetaSchemaRef, Registry},
    types::{ToJSON, Type},
};

use crate::telemetry::TraceIds;

/// The media type of every error body.
pub const PROBLEM_CONTENT_TYPE: &str = "application/problem+json";

/// The prefix of every problem `type` URI: `urn:trellis:problem:<slug>`.
pub const PROBLEM_TYPE_PREFIX: &str = "urn:trellis:problem:";

/// One offending input, named by where it came from.
#[derive(Debug, Clone, PartialEq, Eq, Object)]
pub struct FieldViolation {
    /// Where the offending value was: `body`, `path`, or `parameter` (a query or header
    /// parameter: the parser does not say which).
    pub location: String,
    /// The field: a JSON pointer into the body (`/email`, `/events/3/name`) or the parameter name.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl FieldViolation {
    /// A violation at `location` (`body`, `path`, `parameter`) for `field`.
    pub fn new(
        location: impl Into<String>,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            location: location.into(),
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Collects the violations of a request body while it is parsed into domain values field
/// by field, so the client hears about every offending field at once (the validation
/// recipe in docs/modules.md).
#[derive(Debug, Default)]
pub struct Violations(pub Vec<FieldViolation>);

impl Violations {
    /// Keeps the value, or records the message against the body's `field` (`/field`).
    pub fn check<T>(&mut self, field: &str, result: Result<T, String>) -> Option<T> {
        match result {
            Ok(value) => Some(value),
            Err(message) => {
                self.0
                    .push(FieldViolation::new("body", format!("/{field}"), message));
                None
            }
        }
    }
}

/// An RFC 9457 problem details object.
#[derive(Debug, Clone, PartialEq, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct Problem {
    /// A URI identifying the problem type (`urn:trellis:problem:<slug>`).
    #[oai(rename = "type")]
    pub problem_type: String,
    /// A short, human-readable summary of the problem type.
    pub title: String,
    /// The HTTP status code.
    pub status: u16,
    /// A human-readable explanation specific to this occurrence.
    pub detail: Option<String>,
    /// The request path this occurrence relates to.
    pub instance: Option<String>,
    /// The request id (also in the `X-Request-Id` response header); quote it when reporting.
    pub request_id: Option<String>,
    /// The request's trace id (also in the `X-Trace-Id` response header), when tracing
    /// is on.
    pub trace_id: Option<String>,
    /// For validation problems: each offending field.
    pub errors: Option<Vec<FieldViolation>>,
}

impl Problem {
    /// A problem of type `urn:trellis:problem:<slug>`, filled with the current request's id
    /// and path when called inside a request.
    pub fn new(status: StatusCode, slug: &str, title: impl Into<String>) -> Self {
        let (request_id, instance, trace_id) = REQUEST_SCOPE
            .try_with(|scope| {
                (
                    Some(scope.id.to_string()),
                    Some(scope.uri.path().to_owned()),
                    scope.trace.as_ref().map(|ids| ids.trace_id().to_owned()),
                )
            })
            .unwrap_or_default();
        Self {
            problem_type: format!("{PROBLEM_TYPE_PREFIX}{slug}"),
            title: title.into(),
            status: status.as_u16(),
            detail: None,
            instance,
            request_id,
            trace_id,
            errors: None,
        }
    }

    /// Sets the detail.
    #[must_use]
    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    /// Sets the offending fields (ignored when empty).
    #[must_use]
    pub fn with_errors(mut self, errors: Vec<FieldViolation>) -> Self {
        self.errors = (!errors.is_empty()).then_some(errors);
        self
    }

    /// The status as a [`StatusCode`].
    pub fn status_code(&self) -> StatusCode {
        StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }
}

/// A module error that knows how it looks to a client.
///
/// Implement it on each module's error enum; the api layer calls [`ProblemJson::from_error`].
/// Only [`status`](Self::status), [`slug`](Self::slug) and [`title`](Self::title) are
/// required. For a 5xx the detail is replaced by an opaque message and the error's own text
/// is logged instead, so internals never leak to clients.
pub trait ProblemError: std::error::Error + Send + Sync + 'static {
    /// The HTTP status.
    fn status(&self) -> StatusCode;
    /// The problem type's slug, e.g. `not-found`, `email-taken`.
    fn slug(&self) -> &'static str;
    /// A short summary of the problem type (the same for every occurrence).
    fn title(&self) -> &'static str;
    /// The detail for this occurrence; by default the error's `Display`.
    fn detail(&self) -> String {
        self.to_string()
    }
    /// Offending fields, for validation errors.
    fn violations(&self) -> Vec<FieldViolation> {
        Vec::new()
    }
    /// Extra response headers (e.g. `Retry-After`).
    fn headers(&self) -> Vec<(header::HeaderName, HeaderValue)> {
        Vec::new()
    }
}

/// Declares an operation's documented error responses, one `ProblemJson` variant per
/// status, and converts module errors into it by their [`ProblemError::status`]; a status
/// not listed lands in the `_` variant (the 500 one).
///
/// ```ignore
/// trellis_core::problem_responses! {
///     /// Errors of the ingest operation.
///     pub enum IngestFailure from BiError {
///         /// Invalid token.
///         401 => Unauthorized,
///         /// A field breaks a rule.
///         422 => Invalid,
///         /// An unexpected failure.
///         500 => Internal,
///         _ => Internal,
///     }
/// }
/// ```
/// The calling crate depends on `poem-openapi` (the derive names it).
#[macro_export]
macro_rules! problem_responses {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident from $($error:ty),+ {
            $( $(#[$doc:meta])* $status:literal => $variant:ident, )+
            _ => $fallback:ident $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, poem_openapi::ApiResponse)]
        $vis enum $name {
            $( $(#[$doc])* #[oai(status = $status)] $variant($crate::problem::ProblemJson), )+
        }

        impl From<$crate::problem::ProblemJson> for $name {
            fn from(body: $crate::problem::ProblemJson) -> Self {
                match body.problem.status {
                    $( $status => Self::$variant(body), )+
                    _ => Self::$fallback(body),
                }
            }
        }

        $(
            impl From<$error> for $name {
                fn from(error: $error) -> Self {
                    $crate::problem::ProblemJson::from_error(&error).into()
                }
            }
        )+
    };
}

/// The full text of a server-side failure, carried in the response extensions so that the
/// access-log middleware logs it once inside the request span.
#[derive(Debug, Clone)]
pub struct InternalError(pub Arc<str>);

/// A problem+json response: the payload type of every error variant of every operation.
#[derive(Debug, Clone)]
pub struct ProblemJson {
    /// The body.
    pub problem: Problem,
    headers: Vec<(header::HeaderName, HeaderValue)>,
    internal: Option<Arc<str>>,
}

impl ProblemJson {
    /// Wraps a problem.
    pub fn new(problem: Problem) -> Self {
        Self {
            problem,
            headers: Vec::new(),
            internal: None,
        }
    }

    /// The response for a module error.
    pub fn from_error<E: ProblemError + ?Sized>(error: &E) -> Self {
        let status = error.status();
        let mut problem = Problem::new(status, error.slug(), error.title());
        let mut internal = None;
        if status.is_server_error() {
            internal = Some(Arc::from(format!("{error:#}")));
            problem.detail = Some(String::from(
                "the server could not complete the request; quote the request id when reporting it",
            ));
        } else {
            problem.detail = Some(error.detail());
            problem = problem.with_errors(error.violations());
        }
        Self {
            problem,
            headers: error.headers(),
            internal,
        }
    }

    /// An unexpected failure: an opaque 500 whose cause is logged, never shown.
    pub fn internal(error: &(dyn std::fmt::Display + Send + Sync)) -> Self {
        let problem = Problem::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "Internal server error",
        )
        .with_detail(
            "the server could not complete the request; quote the request id when reporting it",
        );
        Self {
            problem,
            headers: Vec::new(),
            internal: Some(Arc::from(error.to_string())),
        }
    }

    /// Adds a response header.
    #[must_use]
    pub fn with_header(mut self, name: header::HeaderName, value: HeaderValue) -> Self {
        self.headers.push((name, value));
        self
    }
}

impl From<Problem> for ProblemJson {
    fn from(problem: Problem) -> Self {
        Self::new(problem)
    }
}

impl IntoResponse for ProblemJson {
    fn into_response(self) -> Response {
        let body = serde_json::to_vec(&self.problem.to_json()).unwrap_or_default();
        let mut resp = Response::builder()
            .status(self.problem.status_code())
            .content_type(PROBLEM_CONTENT_TYPE)
            .body(body);
        for (name, value) in self.headers {
            resp.headers_mut().append(name, value);
        }
        if let Some(internal) = self.internal {
            resp.set_data(InternalError(internal));
        }
        resp
    }
}

impl Payload for ProblemJson {
    const CONTENT_TYPE: &'static str = PROBLEM_CONTENT_TYPE;

    fn schema_ref() -> MetaSchemaRef {
        Problem::schema_ref()
    }

    fn register(registry: &mut Registry) {
        Problem::register(registry);
    }
}

impl ApiResponse for ProblemJson {
    fn meta() -> MetaResponses {
        MetaResponses {
            responses: vec![MetaResponse {
                description: "An error, as RFC 9457 problem details",
                status: None,
                status_range: None,
                content: vec![MetaMediaType {
                    content_type: PROBLEM_CONTENT_TYPE,
                    schema: Problem::schema_ref(),
                }],
                headers: vec![],
            }],
        }
    }

    fn register(registry: &mut Registry) {
        Problem::register(registry);
    }
}

/// What the server knows about the request being served, visible to everything that runs
/// inside it (handlers, error mapping, logging, metrics) without being passed by hand.
#[derive(Debug, Clone)]
pub struct RequestScope {
    /// The request id (reused from a sane incoming `X-Request-Id`, else generated).
    pub id: Arc<str>,
    /// The request URI.
    pub uri: Uri,
    /// The request's trace and span ids, when tracing is on.
    pub trace: Option<TraceIds>,
    route: OnceLock<Arc<str>>,
}

tokio::task_local! {
    static REQUEST_SCOPE: RequestScope;
}

impl RequestScope {
    /// A scope for the request `id` to `uri`.
    pub fn new(id: Arc<str>, uri: Uri) -> Self {
        Self {
            id,
            uri,
            trace: None,
            route: OnceLock::new(),
        }
    }

    /// The same scope, in the trace that `ids` names.
    pub fn with_trace(self, ids: TraceIds) -> Self {
        Self {
            trace: Some(ids),
            ..self
        }
    }

    /// Records the route template that matched (done by the router, before the handler).
    pub fn record_route(template: &Arc<str>) {
        let _ = REQUEST_SCOPE.try_with(|scope| scope.route.set(template.clone()));
    }

    /// The route template that matched the current request, if one did.
    pub fn current_route() -> Option<Arc<str>> {
        REQUEST_SCOPE
            .try_with(|scope| scope.route.get().cloned())
            .ok()
            .flatten()
    }

    /// Runs `fut` with this scope as the current request. A plain function, not an
    /// `async fn`: that would hold `fut` twice (argument and awaited future) in its state.
    pub fn run<F: Future>(self, fut: F) -> impl Future<Output = F::Output> {
        REQUEST_SCOPE.scope(self, fut)
    }

    /// The current request's scope, if called inside one.
    pub fn current() -> Option<RequestScope> {
        REQUEST_SCOPE.try_with(Clone::clone).ok()
    }

    /// The current request id, if called inside a request.
    pub fn current_id() -> Option<Arc<str>> {
        REQUEST_SCOPE.try_with(|scope| scope.id.clone()).ok()
    }
}

/// A title for a status, for problems that have no more specific one.
pub fn status_title(status: StatusCode) -> Cow<'static, str> {
    status
        .canonical_reason()
        .map(Cow::Borrowed)
        .unwrap_or_else(|| Cow::Owned(format!("HTTP {}", status.as_u16())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    enum SampleError {
        #[error("no widget {0}")]
        Missing(u32),
        #[error("database exploded: secret connection string")]
        Broken,
        #[error("invalid widget")]
        Invalid,
    }

    impl ProblemError for SampleError {
        fn status(&self) -> StatusCode {
            match self {
                Self::Missing(_) => StatusCode::NOT_FOUND,
                Self::Broken => StatusCode::INTERNAL_SERVER_ERROR,
                Self::Invalid => StatusCode::UNPROCESSABLE_ENTITY,
            }
        }
        fn slug(&self) -> &'static str {
            match self {
                Self::Missing(_) => "not-found",
                Self::Broken => "internal",
                Self::Invalid => "validation",
            }
        }
        fn title(&self) -> &'static str {
            "Sample"
        }
        fn violations(&self) -> Vec<FieldViolation> {
            match self {
                Self::Invalid => vec![FieldViolation::new("body", "/name", "too long")],
                _ => vec![],
            }
        }
    }

    #[tokio::test]
    async fn problem_carries_request_id_and_path_inside_a_request() {
        let scope = RequestScope::new(Arc::from("req-1"), Uri::from_static("/widgets/7?x=1"));
        let problem = scope
            .run(async { ProblemJson::from_error(&SampleError::Missing(7)).problem })
            .await;
        assert_eq!(problem.request_id.as_deref(), Some("req-1"));
        assert_eq!(problem.instance.as_deref(), Some("/widgets/7"));
        assert_eq!(problem.problem_type, "urn:trellis:problem:not-found");
        assert_eq!(problem.detail.as_deref(), Some("no widget 7"));
        assert_eq!(problem.status, 404);
    }

    #[test]
    fn server_errors_hide_their_detail_and_keep_it_for_the_log() {
        let response = ProblemJson::from_error(&SampleError::Broken).into_response();
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let internal = response.data::<InternalError>().map(|e| e.0.to_string());
        assert_eq!(
            internal.as_deref(),
            Some("database exploded: secret connection string")
        );
        assert_eq!(
            response.content_type(),
            Some(PROBLEM_CONTENT_TYPE),
            "problem responses use the problem media type"
        );
    }

    #[test]
    fn validation_errors_list_fields_and_empty_lists_are_omitted() {
        let invalid = ProblemJson::from_error(&SampleError::Invalid).problem;
        assert_eq!(invalid.errors.map(|e| e.len()), Some(1));
        let missing = ProblemJson::from_error(&SampleError::Missing(1)).problem;
        assert!(missing.errors.is_none());
    }
}
