//! The bi module's errors and how clients see them.

use poem::http::{HeaderName, HeaderValue, StatusCode, header};
use trellis_core::{
    mq::PublishError,
    problem::{FieldViolation, ProblemError},
};

/// What can go wrong when accepting events.
#[derive(Debug, thiserror::Error)]
pub enum BiError {
    /// Events that break a rule; nothing of the request was accepted.
    #[error("{} field(s) are invalid; no event of this request was accepted", .0.len())]
    Invalid(Vec<FieldViolation>),
    /// The sender's bucket has fewer tokens than the request has events.
    #[error("too many events from this client; retry in {retry_after_secs} s")]
    RateLimited {
        /// Whole seconds until the events would fit.
        retry_after_secs: u64,
    },
    /// The message queue did not store the events.
    #[error(transparent)]
    Queue(#[from] PublishError),
}

impl ProblemError for BiError {
    fn status(&self) -> StatusCode {
        match self {
            Self::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::Queue(e) => e.status(),
        }
    }

    fn slug(&self) -> &'static str {
        match self {
            Self::Invalid(_) => "validation",
            Self::RateLimited { .. } => "rate-limited",
            Self::Queue(e) => e.slug(),
        }
    }

    fn title(&self) -> &'static str {
        match self {
            Self::Invalid(_) => "Invalid events",
            Self::RateLimited { .. } => "Too many requests",
            Self::Queue(e) => e.title(),
        }
    }

    fn violations(&self) -> Vec<FieldViolation> {
        match self {
            Self::Invalid(v) => v.clone(),
            Self::RateLimited { .. } | Self::Queue(_) => Vec::new(),
        }
    }

    fn headers(&self) -> Vec<(HeaderName, HeaderValue)> {
        match self {
            Self::Invalid(_) => Vec::new(),
            Self::RateLimited { retry_after_secs } => {
                vec![(header::RETRY_AFTER, HeaderValue::from(*retry_after_secs))]
            }
            Self::Queue(e) => e.headers(),
        }
    }
}
