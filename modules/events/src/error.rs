//! The module's errors and the problems clients see for them.

use poem::http::{HeaderName, HeaderValue, StatusCode};
use trellis_core::{problem::ProblemError, storage::DbError};

use crate::app::MANAGE_EVENTS;

/// What can go wrong in the `events` module.
#[derive(Debug, thiserror::Error)]
pub enum EventsError {
    /// The caller lacks `events:manage`.
    #[error("this needs the `{MANAGE_EVENTS}` permission")]
    Forbidden,
    /// No publication has the id.
    #[error("no such publication")]
    NotFound,
    /// Only a failed publication can be resubmitted.
    #[error("the publication is {0}, not failed: only a failed publication can be resubmitted")]
    NotFailed(&'static str),
    /// The database.
    #[error(transparent)]
    Db(#[from] DbError),
}

impl ProblemError for EventsError {
    fn status(&self) -> StatusCode {
        match self {
            Self::Forbidden => StatusCode::FORBIDDEN,
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::NotFailed(_) => StatusCode::CONFLICT,
            Self::Db(e) => e.status(),
        }
    }

    fn slug(&self) -> &'static str {
        match self {
            Self::Forbidden => "forbidden",
            Self::NotFound => "publication-not-found",
            Self::NotFailed(_) => "publication-not-failed",
            Self::Db(e) => e.slug(),
        }
    }

    fn title(&self) -> &'static str {
        match self {
            Self::Forbidden => "Forbidden",
            Self::NotFound => "Publication not found",
            Self::NotFailed(_) => "Publication not failed",
            Self::Db(e) => e.title(),
        }
    }

    fn detail(&self) -> String {
        match self {
            Self::Db(e) => e.detail(),
            other => other.to_string(),
        }
    }

    fn headers(&self) -> Vec<(HeaderName, HeaderValue)> {
        match self {
            Self::Db(e) => e.headers(),
            _ => Vec::new(),
        }
    }
}
