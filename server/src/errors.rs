//! poem's own errors (no route, wrong method, unparsable parameters or bodies, ...) in the
//! same problem+json shape as module errors.

use poem::{
    IntoResponse, Response,
    error::{MethodNotAllowedError, NotFoundError, ReadBodyError},
    http::{StatusCode, header},
};
use poem_openapi::error::{
    AuthorizationError, ContentTypeError, ParseMultipartError, ParseParamError, ParsePathError,
    ParseRequestPayloadError,
};
use trellis_core::{
    payload::violations_in_message,
    problem::{FieldViolation, Problem, ProblemError, ProblemJson, RequestScope, status_title},
};
use trellis_openapi::RouteIndex;

/// The body was larger than `server.body_limit_bytes`.
#[derive(Debug, thiserror::Error)]
#[error("the request body exceeds the limit of {limit} bytes")]
pub struct BodyTooLarge {
    /// The limit.
    pub limit: usize,
}

/// The request took longer than `server.request_timeout_ms`.
#[derive(Debug, thiserror::Error)]
#[error("the request did not complete within {timeout_ms} ms")]
pub struct RequestTimedOut {
    /// The limit.
    pub timeout_ms: u64,
}

impl ProblemError for BodyTooLarge {
    fn status(&self) -> StatusCode {
        StatusCode::PAYLOAD_TOO_LARGE
    }
    fn slug(&self) -> &'static str {
        "body-too-large"
    }
    fn title(&self) -> &'static str {
        "Request body too large"
    }
}

impl ProblemError for RequestTimedOut {
    fn status(&self) -> StatusCode {
        StatusCode::SERVICE_UNAVAILABLE
    }
    fn slug(&self) -> &'static str {
        "timeout"
    }
    fn title(&self) -> &'static str {
        "Request timed out"
    }
    fn detail(&self) -> String {
        self.to_string()
    }
}

/// Marks a response poem produced because no route matched (metrics label it `unmatched`).
#[derive(Debug, Clone, Copy)]
pub struct Unmatched;

/// Turns any error that reached the edge of the router into a problem response.
pub fn problem_response(error: poem::Error, routes: &RouteIndex) -> Response {
    if error.is_from_response() {
        return error.into_response();
    }
    if error.is::<NotFoundError>() {
        let mut resp = simple(
            StatusCode::NOT_FOUND,
            "not-found",
            "Not Found",
            no_route_detail(),
        )
        .into_response();
        resp.set_data(Unmatched);
        return resp;
    }
    if error.is::<MethodNotAllowedError>() {
        let route = error
            .data::<poem::PathPattern>()
            .and_then(|p| routes.get(&p.0));
        if let Some(route) = route {
            RequestScope::record_route(&route.template);
        }
        let allow = route.map(|route| route.allow.clone());
        let detail = match &allow {
            Some(allow) => format!(
                "this route allows only: {}",
                allow.to_str().unwrap_or_default()
            ),
            None => String::from("this route does not allow the method"),
        };
        let mut problem = simple(
            StatusCode::METHOD_NOT_ALLOWED,
            "method-not-allowed",
            "Method Not Allowed",
            detail,
        );
        if let Some(allow) = allow {
            problem = problem.with_header(header::ALLOW, allow);
        }
        return problem.into_response();
    }
    if let Some(e) = error.downcast_ref::<ParsePathError>() {
        // poem-openapi routes path variables as `param0`, `param1`, …; name them as the
        // document does.
        let name = error
            .data::<poem::PathPattern>()
            .and_then(|p| routes.get(&p.0))
            .and_then(|route| {
                let index: usize = e.name.strip_prefix("param")?.parse().ok()?;
                route.variables().nth(index)
            })
            .unwrap_or(e.name);
        return invalid_input(
            "invalid-parameter",
            "Invalid path parameter",
            format!("failed to parse path parameter `{name}`: {}", e.reason),
            vec![FieldViolation::new("path", name, &e.reason)],
        );
    }
    if let Some(e) = error.downcast_ref::<ParseParamError>() {
        return invalid_input(
            "invalid-parameter",
            "Invalid parameter",
            error.to_string(),
            vec![FieldViolation::new("parameter", e.name, &e.reason)],
        );
    }
    if let Some(e) = error.downcast_ref::<ParseRequestPayloadError>() {
        return invalid_input(
            "invalid-body",
            "Invalid request body",
            format!("the request body is invalid: {}", e.reason),
            violations_in_message(&e.reason),
        );
    }
    if let Some(e) = error.downcast_ref::<ParseMultipartError>() {
        return invalid_input(
            "invalid-body",
            "Invalid request body",
            format!("the multipart body is invalid: {}", e.reason),
            Vec::new(),
        );
    }
    if error.is::<ContentTypeError>() {
        return simple(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported-media-type",
            "Unsupported media type",
            error.to_string(),
        )
        .into_response();
    }
    if let Some(e) = error.downcast_ref::<ReadBodyError>() {
        let status = error.status();
        return simple(
            status,
            "invalid-body",
            "Request body could not be read",
            e.to_string(),
        )
        .into_response();
    }
    if error.is::<AuthorizationError>() {
        return simple(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "Unauthorized",
            "this operation needs a valid bearer token",
        )
        .with_header(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer"),
        )
        .into_response();
    }
    let status = error.status();
    if status.is_server_error() {
        return ProblemJson::internal(&error).into_response();
    }
    let title = status_title(status);
    simple(status, "http-error", title, error.to_string()).into_response()
}

fn simple(
    status: StatusCode,
    slug: &str,
    title: impl Into<String>,
    detail: impl Into<String>,
) -> ProblemJson {
    ProblemJson::new(Problem::new(status, slug, title).with_detail(detail))
}

fn invalid_input(slug: &str, title: &str, detail: String, errors: Vec<FieldViolation>) -> Response {
    ProblemJson::new(
        Problem::new(StatusCode::BAD_REQUEST, slug, title)
            .with_detail(detail)
            .with_errors(errors),
    )
    .into_response()
}

fn no_route_detail() -> String {
    match RequestScope::current() {
        Some(scope) => format!("no route matches `{}`", scope.uri.path()),
        None => String::from("no route matches the request path"),
    }
}
