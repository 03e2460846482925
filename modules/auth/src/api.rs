//! HTTP surface of the auth module.

use poem::Request;
use poem_openapi::{ApiResponse, Object, OpenApi, param::Path, payload::Json};
use trellis_core::{
    auth::BearerAuth,
    clock::{Timestamp, timestamp},
    payload::JsonBody,
};

use crate::{
    app::{Auth, Client, TokenPair},
    error::AuthModuleError,
};

/// Credentials.
#[derive(Debug, Object)]
pub struct LoginRequest {
    /// E-mail address.
    #[oai(validator(max_length = 254))]
    pub email: String,
    /// Password.
    #[oai(validator(max_length = 128))]
    pub password: String,
}

/// A refresh token to exchange.
#[derive(Debug, Object)]
pub struct RefreshRequest {
    /// The refresh token from the last login or refresh; it works once.
    #[oai(validator(max_length = 200))]
    pub refresh_token: String,
}

/// Tokens.
#[derive(Debug, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct TokenResponse {
    /// The access token (JWT, HS256); send it as `Authorization: Bearer …`.
    pub access_token: String,
    /// Always `Bearer`.
    pub token_type: String,
    /// Seconds until the access token expires.
    pub expires_in: u64,
    /// Exchange it at `/api/v1/auth/refresh` for new tokens; it works once.
    pub refresh_token: String,
    /// The session the tokens belong to.
    pub session_id: String,
}

impl From<TokenPair> for TokenResponse {
    fn from(pair: TokenPair) -> Self {
        Self {
            access_token: pair.access_token,
            token_type: "Bearer".into(),
            expires_in: pair.expires_in,
            refresh_token: pair.refresh_token,
            session_id: pair.session_id,
        }
    }
}

/// A live session.
#[derive(Debug, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct Session {
    /// Id.
    pub id: String,
    /// Whether it is the session of this request's token.
    pub current: bool,
    /// Created.
    pub created_at: Timestamp,
    /// Last login or refresh.
    pub last_used_at: Timestamp,
    /// Expires.
    pub expires_at: Timestamp,
    /// The client's user agent at login.
    pub user_agent: Option<String>,
}

/// One's live sessions.
#[derive(Debug, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct SessionList {
    /// Newest first.
    pub sessions: Vec<Session>,
}

/// A role.
#[derive(Debug, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct Role {
    /// Name.
    pub name: String,
    /// What it is for.
    pub description: String,
    /// Its permissions (`sudo` implies all).
    pub permissions: Vec<String>,
}

/// Roles.
#[derive(Debug, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct RoleList {
    /// The roles.
    pub roles: Vec<Role>,
}

/// A user's roles.
#[derive(Debug, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct UserRoles {
    /// Role names.
    pub roles: Vec<String>,
}

trellis_core::problem_responses! {
    /// Errors of the auth operations.
    pub enum AuthFailure from AuthModuleError {
        /// Invalid credentials, refresh token or bearer token.
        401 => Unauthorized,
        /// The caller lacks the permission.
        403 => Forbidden,
        /// No such user or role.
        404 => NotFound,
        /// The change would leave no super-administrator.
        409 => Conflict,
        /// Too many login attempts; see `Retry-After`.
        429 => TooManyRequests,
        /// An unexpected failure.
        500 => Internal,
        /// The database is unavailable, or password hashing is at capacity; retry after
        /// `Retry-After`.
        503 => Unavailable,
        _ => Internal,
    }
}

#[derive(ApiResponse)]
enum TokensResponse {
    /// New tokens.
    #[oai(status = 200)]
    Ok(Json<TokenResponse>),
}

#[derive(ApiResponse)]
enum DoneResponse {
    /// Done.
    #[oai(status = 204)]
    Done,
}

#[derive(ApiResponse)]
enum SessionsResponse {
    /// The caller's live sessions.
    #[oai(status = 200)]
    Ok(Json<SessionList>),
}

#[derive(ApiResponse)]
enum RolesResponse {
    /// The roles.
    #[oai(status = 200)]
    Ok(Json<RoleList>),
}

#[derive(ApiResponse)]
enum UserRolesResponse {
    /// The user's roles.
    #[oai(status = 200)]
    Ok(Json<UserRoles>),
}

/// The auth module's API.
pub struct AuthApi {
    auth: std::sync::Arc<Auth>,
}

impl AuthApi {
    /// The API over the service.
    pub fn new(auth: std::sync::Arc<Auth>) -> Self {
        Self { auth }
    }
}

fn client(req: &Request) -> Client {
    Client {
        address: trellis_core::client::client_ip(req),
        user_agent: req
            .headers()
            .get(poem::http::header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.chars().take(200).collect()),
    }
}

#[OpenApi(prefix_path = "/api/v1/auth")]
impl AuthApi {
    /// Log in
    ///
    /// Exchanges e-mail and password for an access token and a refresh token. Unknown
    /// e-mails and wrong passwords get the same answer. Failed attempts are limited per
    /// account and client address, per client address, and per account from addresses
    /// that never logged into it (429 with `Retry-After`).
    #[oai(path = "/login", method = "post", operation_id = "login")]
    async fn login(
        &self,
        req: &Request,
        body: JsonBody<LoginRequest>,
    ) -> Result<TokensResponse, AuthFailure> {
        let LoginRequest { email, password } = body.0;
        let pair = self.auth.login(&email, password, client(req)).await?;
        Ok(TokensResponse::Ok(Json(pair.into())))
    }

    /// Refresh tokens
    ///
    /// Exchanges a refresh token for new tokens. Each refresh token works once; presenting
    /// a used one revokes its session.
    #[oai(path = "/refresh", method = "post", operation_id = "refreshTokens")]
    async fn refresh(&self, body: JsonBody<RefreshRequest>) -> Result<TokensResponse, AuthFailure> {
        let pair = self.auth.refresh(&body.0.refresh_token).await?;
        Ok(TokensResponse::Ok(Json(pair.into())))
    }

    /// Log out
    ///
    /// Revokes the current session at once: its tokens stop working.
    #[oai(path = "/logout", method = "post", operation_id = "logout")]
    async fn logout(&self, auth: BearerAuth) -> Result<DoneResponse, AuthFailure> {
        self.auth
            .revoke(&auth.0.user_id, &auth.0.session_id, "logout")
            .await?;
        Ok(DoneResponse::Done)
    }

    /// Log out everywhere
    ///
    /// Revokes every session of the caller.
    #[oai(path = "/logout-all", method = "post", operation_id = "logoutAll")]
    async fn logout_all(&self, auth: BearerAuth) -> Result<DoneResponse, AuthFailure> {
        self.auth
            .revoke_all(&auth.0.user_id, None, "logout_all")
            .await?;
        Ok(DoneResponse::Done)
    }

    /// My sessions
    ///
    /// The caller's live sessions, newest first.
    #[oai(path = "/sessions", method = "get", operation_id = "listSessions")]
    async fn sessions(&self, auth: BearerAuth) -> Result<SessionsResponse, AuthFailure> {
        let sessions = self
            .auth
            .sessions(&auth.0)
            .await?
            .into_iter()
            .map(|s| Session {
                current: s.id == auth.0.session_id,
                id: s.id,
                created_at: timestamp(s.created_at),
                last_used_at: timestamp(s.last_used_at),
                expires_at: timestamp(s.expires_at),
                user_agent: s.user_agent,
            })
            .collect();
        Ok(SessionsResponse::Ok(Json(SessionList { sessions })))
    }

    /// List roles
    ///
    /// Roles and their permissions. Needs `roles:read`.
    #[oai(path = "/roles", method = "get", operation_id = "listRoles")]
    async fn roles(&self, auth: BearerAuth) -> Result<RolesResponse, AuthFailure> {
        let roles = self
            .auth
            .roles(&auth.0)
            .await?
            .into_iter()
            .map(|(name, description, permissions)| Role {
                name,
                description,
                permissions,
            })
            .collect();
        Ok(RolesResponse::Ok(Json(RoleList { roles })))
    }

    /// A user's roles
    ///
    /// One's own roles, or anyone's with `roles:read`.
    #[oai(
        path = "/users/:id/roles",
        method = "get",
        operation_id = "getUserRoles"
    )]
    async fn user_roles(
        &self,
        auth: BearerAuth,
        /// The user id.
        #[oai(validator(max_length = 64))]
        id: Path<String>,
    ) -> Result<UserRolesResponse, AuthFailure> {
        let roles = self.auth.user_roles(&auth.0, &id.0).await?;
        Ok(UserRolesResponse::Ok(Json(UserRoles { roles })))
    }

    /// Grant a role
    ///
    /// Gives a user a role. Needs `sudo`.
    #[oai(
        path = "/users/:id/roles/:role",
        method = "put",
        operation_id = "grantRole"
    )]
    async fn grant(
        &self,
        auth: BearerAuth,
        /// The user id.
        #[oai(validator(max_length = 64))]
        id: Path<String>,
        /// The role, e.g. `ADMIN`.
        #[oai(validator(max_length = 64))]
        role: Path<String>,
    ) -> Result<DoneResponse, AuthFailure> {
        self.auth.set_role(&auth.0, &id.0, &role.0, true).await?;
        Ok(DoneResponse::Done)
    }

    /// Revoke a role
    ///
    /// Takes a role from a user. Needs `sudo`. The last super-administrator cannot lose
    /// `SUPER_ADMIN` (409).
    #[oai(
        path = "/users/:id/roles/:role",
        method = "delete",
        operation_id = "revokeRole"
    )]
    async fn revoke_role(
        &self,
        auth: BearerAuth,
        /// The user id.
        #[oai(validator(max_length = 64))]
        id: Path<String>,
        /// The role.
        #[oai(validator(max_length = 64))]
        role: Path<String>,
    ) -> Result<DoneResponse, AuthFailure> {
        self.auth.set_role(&auth.0, &id.0, &role.0, false).await?;
        Ok(DoneResponse::Done)
    }
}
