//! The user module's errors and how clients see them.

use poem::http::StatusCode;
use trellis_core::{
    problem::{FieldViolation, ProblemError},
    storage::DbError,
};

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
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
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
            Self::Forbidden(_) => "Forbidden",
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
            _ => Vec::new(),
        }
    }

    fn headers(&self) -> Vec<(poem::http::HeaderName, poem::http::HeaderValue)> {
        match self {
            Self::Db(e) => e.headers(),
            _ => Vec::new(),
        }
    }
}
