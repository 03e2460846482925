//! Authentication, as an extension point: core defines the bearer security scheme and the
//! principal every module's API receives; the `auth` module answers [`Authenticate`] on the
//! bus. With no module answering (auth compiled out), protected operations answer 401.
//!
//! Put [`BearerAuth`] in an operation's parameters: that both enforces authentication and
//! documents the operation's security requirement. [`OptionalAuth`] is for operations open
//! to anonymous callers that still want to know who calls: no `Authorization` header is
//! anonymous, a bad token is still 401.

use std::collections::BTreeSet;

use poem::{IntoResponse as _, Request, RequestBody, http::StatusCode};
use poem_openapi::{
    ApiExtractor, ApiExtractorType, ExtractParamOptions, SecurityScheme, auth::Bearer,
    registry::Registry,
};

use crate::{
    bus::Bus,
    contracts::Authenticate,
    problem::{ProblemError, ProblemJson},
};

/// The permission that implies every other one.
pub const SUDO: &str = "sudo";

/// Who is calling: the authenticated user, their session, and what they may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The user id.
    pub user_id: String,
    /// The session the token belongs to.
    pub session_id: String,
    /// Role names.
    pub roles: BTreeSet<String>,
    /// Permission names (from the roles).
    pub permissions: BTreeSet<String>,
}

impl Principal {
    /// Whether the principal holds `permission` (or `sudo`).
    pub fn can(&self, permission: &str) -> bool {
        self.permissions.contains(permission) || self.permissions.contains(SUDO)
    }

    /// Whether the principal is `user_id`.
    pub fn is(&self, user_id: &str) -> bool {
        self.user_id == user_id
    }
}

/// Why a token was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No module can check tokens (auth is not compiled in).
    #[error("authentication is not available on this server")]
    Unavailable,
    /// Malformed, forged, wrong algorithm, or expired.
    #[error("the token is invalid or expired")]
    InvalidToken,
    /// The session was revoked (logout) or the account deleted.
    #[error("the session has ended; log in again")]
    SessionEnded,
    /// The token could not be checked right now (database unavailable).
    #[error("authentication is temporarily unavailable; try again shortly")]
    Temporarily,
}

impl ProblemError for AuthError {
    fn status(&self) -> StatusCode {
        match self {
            Self::Temporarily => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::UNAUTHORIZED,
        }
    }
    fn slug(&self) -> &'static str {
        match self {
            Self::Temporarily => "auth-unavailable",
            _ => "unauthorized",
        }
    }
    fn title(&self) -> &'static str {
        match self {
            Self::Temporarily => "Authentication unavailable",
            _ => "Unauthorized",
        }
    }
    fn headers(&self) -> Vec<(poem::http::HeaderName, poem::http::HeaderValue)> {
        match self {
            Self::Temporarily => vec![(
                poem::http::header::RETRY_AFTER,
                poem::http::HeaderValue::from_static("1"),
            )],
            _ => vec![(
                poem::http::header::WWW_AUTHENTICATE,
                poem::http::HeaderValue::from_static("Bearer"),
            )],
        }
    }
}

/// The bearer token scheme (`Authorization: Bearer <JWT>`), checked by the module that
/// answers [`Authenticate`].
#[derive(Debug, SecurityScheme)]
#[oai(
    rename = "bearer",
    ty = "bearer",
    bearer_format = "JWT",
    checker = "check_bearer"
)]
pub struct BearerAuth(pub Principal);

async fn check_bearer(req: &Request, bearer: Bearer) -> poem::Result<Principal> {
    let outcome = match req.data::<Bus>() {
        Some(bus) => bus
            .request(Authenticate {
                token: bearer.token,
            })
            .await
            .unwrap_or(Err(AuthError::Unavailable)),
        None => Err(AuthError::Unavailable),
    };
    outcome.map_err(|error| {
        poem::Error::from_response(ProblemJson::from_error(&error).into_response())
    })
}

/// The principal when the request carries a bearer token, `None` when it carries no
/// `Authorization` header. A token that is present but not accepted is answered 401 (or
/// 503) as with [`BearerAuth`]. Documented as "bearer, or none".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptionalAuth(pub Option<Principal>);

impl<'a> ApiExtractor<'a> for OptionalAuth {
    const TYPES: &'static [ApiExtractorType] = &[ApiExtractorType::SecurityScheme];

    type ParamType = ();
    type ParamRawType = ();

    fn register(registry: &mut Registry) {
        <BearerAuth as ApiExtractor>::register(registry);
    }

    fn security_schemes() -> Vec<&'static str> {
        <BearerAuth as ApiExtractor>::security_schemes()
    }

    fn has_security_fallback() -> bool {
        true
    }

    async fn from_request(
        req: &'a Request,
        body: &mut RequestBody,
        param_opts: ExtractParamOptions<Self::ParamType>,
    ) -> poem::Result<Self> {
        if !req
            .headers()
            .contains_key(poem::http::header::AUTHORIZATION)
        {
            return Ok(Self(None));
        }
        let BearerAuth(principal) =
            <BearerAuth as ApiExtractor>::from_request(req, body, param_opts).await?;
        Ok(Self(Some(principal)))
    }
}
