//! The module's errors and the problems clients see for them.

use poem::http::{HeaderName, HeaderValue, StatusCode};
use trellis_core::{
    problem::{FieldViolation, ProblemError},
    storage::DbError,
};

/// What can go wrong in the `{{name}}` module.
#[derive(Debug, thiserror::Error)]
pub enum {{Name}}Error {
    /// No item has the id.
    #[error("no such item")]
    NotFound,
    /// Input that parsed but breaks a rule.
    #[error("{} field(s) are invalid", .0.len())]
    Invalid(Vec<FieldViolation>),
    /// The database.
    #[error(transparent)]
    Db(#[from] DbError),
}

impl ProblemError for {{Name}}Error {
    fn status(&self) -> StatusCode {
        match self {
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::Db(e) => e.status(),
        }
    }

    fn slug(&self) -> &'static str {
        match self {
            Self::NotFound => "item-not-found",
            Self::Invalid(_) => "validation",
            Self::Db(e) => e.slug(),
        }
    }

    fn title(&self) -> &'static str {
        match self {
            Self::NotFound => "Item not found",
            Self::Invalid(_) => "Invalid input",
            Self::Db(e) => e.title(),
        }
    }

    fn detail(&self) -> String {
        match self {
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

    fn headers(&self) -> Vec<(HeaderName, HeaderValue)> {
        match self {
            Self::Db(e) => e.headers(),
            _ => Vec::new(),
        }
    }
}
