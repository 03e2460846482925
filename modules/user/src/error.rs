//! The user module's errors and how clients see them.

use poem::http::{HeaderName, HeaderValue, StatusCode, header};
use trellis_core::{
    contracts::AccountError,
    problem::{FieldViolation, ProblemError},
    storage::DbError,
};

use crate::password::Busy;

/// What can go wrong in the user module.
#[derive(Debug, thiserror::Error)]
pub enum UserError {
    /// Another active account has the e-mail.
    #[error("an account with this e-mail already exists")]
    EmailTaken,
    /// No such user, or not one the caller may see (the same answer, so ids cannot be probed).
    #[error("no such user")]
    NotFound,
    /// The caller lacks the permission.
    #[error("this needs the `{0}` permission")]
    Forbidden(&'static str),
    /// A super-administrator's account, and only a super-administrator may change it.
    #[error("{0}")]
    Outranked(String),
    /// The change would break a rule, e.g. delete the last super-administrator.
    #[error("{0}")]
    Conflict(String),
    /// A change that needs the current password came without it, or with a wrong one
    /// (403, not 422: the request is well-formed, the caller failed to re-authenticate).
    #[error("{0}")]
    Reauthenticate(&'static str),
    /// Too many attempts from the client's address.
    #[error("too many attempts from this address; retry after {retry_after} seconds")]
    Throttled {
        /// Seconds to wait.
        retry_after: u64,
    },
    /// Password hashing is at capacity.
    #[error("too many password checks in progress; retry shortly")]
    Busy,
    /// Another module that takes part in the change cannot be reached.
    #[error("{0}")]
    Unavailable(String),
    /// Input that parsed but breaks a rule.
    #[error("{} field(s) are invalid", .0.len())]
    Invalid(Vec<FieldViolation>),
    /// The database.
    #[error(transparent)]
    Db(#[from] DbError),
    /// Anything else.
    #[error(transparent)]
    Unexpected(#[from] anyhow::Error),
}

impl From<Busy> for UserError {
    fn from(_: Busy) -> Self {
        Self::Busy
    }
}

impl From<AccountError> for UserError {
    fn from(error: AccountError) -> Self {
        match error {
            AccountError::Forbidden(why) => Self::Outranked(why),
            AccountError::Conflict(why) => Self::Conflict(why),
            AccountError::Busy => Self::Busy,
            AccountError::Invalid(why) | AccountError::Unavailable(why) => Self::Unavailable(why),
        }
    }
}

impl From<Vec<FieldViolation>> for UserError {
    fn from(violations: Vec<FieldViolation>) -> Self {
        Self::Invalid(violations)
    }
}

impl ProblemError for UserError {
    fn status(&self) -> StatusCode {
        match self {
            Self::EmailTaken => StatusCode::CONFLICT,
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::Forbidden(_) | Self::Outranked(_) | Self::Reauthenticate(_) => {
                StatusCode::FORBIDDEN
            }
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::Throttled { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::Busy | Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::Db(DbError::UniqueViolation { .. }) => StatusCode::CONFLICT,
            Self::Db(DbError::NotFound) => StatusCode::NOT_FOUND,
            Self::Db(e) => e.status(),
            Self::Unexpected(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn slug(&self) -> &'static str {
        match self {
            Self::EmailTaken | Self::Db(DbError::UniqueViolation { .. }) => "email-taken",
            Self::NotFound | Self::Db(DbError::NotFound) => "user-not-found",
            Self::Forbidden(_) => "forbidden",
            Self::Outranked(_) => "outranked",
            Self::Reauthenticate(_) => "reauthentication-failed",
            Self::Conflict(_) => "conflict",
            Self::Throttled { .. } => "rate-limited",
            Self::Busy => "busy",
            Self::Unavailable(_) => "unavailable",
            Self::Invalid(_) => "validation",
            Self::Db(e) => e.slug(),
            Self::Unexpected(_) => "internal",
        }
    }

    fn title(&self) -> &'static str {
        match self {
            Self::EmailTaken | Self::Db(DbError::UniqueViolation { .. }) => {
                "E-mail already registered"
            }
            Self::NotFound | Self::Db(DbError::NotFound) => "User not found",
            Self::Forbidden(_) | Self::Outranked(_) => "Forbidden",
            Self::Reauthenticate(_) => "Current password needed",
            Self::Conflict(_) => "Conflict",
            Self::Throttled { .. } => "Too many requests",
            Self::Busy => "Server busy",
            Self::Unavailable(_) => "Service unavailable",
            Self::Invalid(_) => "Invalid input",
            Self::Db(e) => e.title(),
            Self::Unexpected(_) => "Internal server error",
        }
    }

    fn detail(&self) -> String {
        match self {
            Self::Db(DbError::UniqueViolation { .. }) => Self::EmailTaken.to_string(),
            Self::Db(e) => e.detail(),
            other => other.to_string(),
        }
    }

    fn violations(&self) -> Vec<FieldViolation> {
        match self {
            Self::Invalid(v) => v.clone(),
            Self::Reauthenticate(why) => {
                vec![FieldViolation::new("body", "/current_password", *why)]
            }
            _ => Vec::new(),
        }
    }

    fn headers(&self) -> Vec<(HeaderName, HeaderValue)> {
        match self {
            Self::Throttled { retry_after } => {
                vec![(header::RETRY_AFTER, HeaderValue::from(*retry_after))]
            }
            Self::Busy | Self::Unavailable(_) => {
                vec![(header::RETRY_AFTER, HeaderValue::from_static("1"))]
            }
            Self::Db(e) => e.headers(),
            _ => Vec::new(),
        }
    }
}
