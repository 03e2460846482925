//! The bi module's errors and how clients see them.

use poem::http::{HeaderName, HeaderValue, StatusCode};
use trellis_core::{
    events::DispatchError,
    problem::{FieldViolation, ProblemError},
};

/// What can go wrong when accepting events.
#[derive(Debug, thiserror::Error)]
pub enum BiError {
    /// Events that break a rule; nothing of the request was accepted.
    #[error("{} field(s) are invalid; no event of this request was accepted", .0.len())]
    Invalid(Vec<FieldViolation>),
    /// The event queue did not take the events.
    #[error(transparent)]
    Dispatch(#[from] DispatchError),
}

impl ProblemError for BiError {
    fn status(&self) -> StatusCode {
        match self {
            Self::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::Dispatch(e) => e.status(),
        }
    }

    fn slug(&self) -> &'static str {
        match self {
            Self::Invalid(_) => "validation",
            Self::Dispatch(e) => e.slug(),
        }
    }

    fn title(&self) -> &'static str {
        match self {
            Self::Invalid(_) => "Invalid events",
            Self::Dispatch(e) => e.title(),
        }
    }

    fn violations(&self) -> Vec<FieldViolation> {
        match self {
            Self::Invalid(v) => v.clone(),
            Self::Dispatch(_) => Vec::new(),
        }
    }

    fn headers(&self) -> Vec<(HeaderName, HeaderValue)> {
        match self {
            Self::Invalid(_) => Vec::new(),
            Self::Dispatch(e) => e.headers(),
        }
    }
}
