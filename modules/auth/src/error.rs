//! The auth module's errors and how clients see them.

use poem::http::{HeaderName, HeaderValue, StatusCode, header};
use trellis_core::{contracts::AccountError, problem::ProblemError, storage::DbError};

/// What can go wrong in the auth module.
#[derive(Debug, thiserror::Error)]
pub enum AuthModuleError {
    /// Unknown e-mail or wrong password: one answer for both, so accounts cannot be
    /// enumerated.
    #[error("invalid e-mail or password")]
    InvalidCredentials,
    /// Unknown, used, expired or revoked refresh token.
    #[error("the refresh token is invalid, expired or already used")]
    InvalidRefreshToken,
    /// Too many login attempts.
    #[error("too many login attempts; retry after {retry_after} seconds")]
    RateLimited {
        /// Seconds until the window ends.
        retry_after: u64,
    },
    /// The caller lacks the permission.
    #[error("this needs the `{0}` permission")]
    Forbidden(&'static str),
    /// No such user or role.
    #[error("{0}")]
    NotFound(&'static str),
    /// The change would leave no super-administrator.
    #[error("the last super-administrator cannot be removed; make another one first")]
    LastSuperAdmin,
    /// Password hashing is at capacity.
    #[error("too many password checks in progress; retry shortly")]
    Busy,
    /// The database.
    #[error(transparent)]
    Db(#[from] DbError),
    /// Anything else.
    #[error(transparent)]
    Unexpected(#[from] anyhow::Error),
}

impl AuthModuleError {
    /// The module's view of another module's account answer.
    pub fn from_account_error(error: AccountError) -> Self {
        match error {
            AccountError::Busy => Self::Busy,
            AccountError::Unavailable(why) => Self::Db(DbError::Unavailable(why)),
            other => Self::Unexpected(anyhow::anyhow!(other)),
        }
    }

    /// Its answer to another module.
    pub fn into_account_error(self) -> AccountError {
        match self {
            Self::LastSuperAdmin => AccountError::Conflict(self.to_string()),
            Self::Busy => AccountError::Busy,
            other => AccountError::Unavailable(other.to_string()),
        }
    }
}

impl ProblemError for AuthModuleError {
    fn status(&self) -> StatusCode {
        match self {
            Self::InvalidCredentials | Self::InvalidRefreshToken => StatusCode::UNAUTHORIZED,
            Self::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::LastSuperAdmin => StatusCode::CONFLICT,
            Self::Busy => StatusCode::SERVICE_UNAVAILABLE,
            Self::Db(e) => e.status(),
            Self::Unexpected(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn slug(&self) -> &'static str {
        match self {
            Self::InvalidCredentials => "invalid-credentials",
            Self::InvalidRefreshToken => "invalid-refresh-token",
            Self::RateLimited { .. } => "rate-limited",
            Self::Forbidden(_) => "forbidden",
            Self::NotFound(_) => "not-found",
            Self::LastSuperAdmin => "last-super-admin",
            Self::Busy => "busy",
            Self::Db(e) => e.slug(),
            Self::Unexpected(_) => "internal",
        }
    }

    fn title(&self) -> &'static str {
        match self {
            Self::InvalidCredentials => "Invalid credentials",
            Self::InvalidRefreshToken => "Invalid refresh token",
            Self::RateLimited { .. } => "Too many requests",
            Self::Forbidden(_) => "Forbidden",
            Self::NotFound(_) => "Not found",
            Self::LastSuperAdmin => "Last super-administrator",
            Self::Busy => "Server busy",
            Self::Db(e) => e.title(),
            Self::Unexpected(_) => "Internal server error",
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
            Self::RateLimited { retry_after } => vec![(
                header::RETRY_AFTER,
                HeaderValue::from_str(&retry_after.to_string())
                    .unwrap_or(HeaderValue::from_static("60")),
            )],
            Self::InvalidCredentials | Self::InvalidRefreshToken => {
                vec![(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"))]
            }
            Self::Busy => vec![(header::RETRY_AFTER, HeaderValue::from_static("1"))],
            Self::Db(e) => e.headers(),
            _ => Vec::new(),
        }
    }
}
