//! HTTP surface of the user module: parse into domain types, call the service, map results.

use poem::Request;
use poem_openapi::{
    ApiResponse, Object, OpenApi,
    param::{Path, Query},
    payload::Json,
};
use trellis_core::{
    auth::BearerAuth,
    client::client_address,
    clock::{Timestamp, timestamp},
    payload::JsonBody,
    problem::Violations,
};

use crate::{
    app::{CurrentPassword, Page, Users},
    domain::{Account, Details, Email, NewUser, Password, PersonName, UserChanges, UtmValue},
    error::UserError,
};

/// A new account.
#[derive(Debug, Object)]
pub struct RegisterRequest {
    /// E-mail address; unique, compared case-insensitively.
    #[oai(validator(
        max_length = 254,
        pattern = r"^[^@\s\x00-\x1f\x7f-\x9f]{1,64}@[^@.\s\x00-\x1f\x7f-\x9f]+(\.[^@.\s\x00-\x1f\x7f-\x9f]+)+$"
    ))]
    pub email: String,
    /// 8 to 128 characters, not only spaces. Never returned or logged.
    #[oai(validator(min_length = 8, max_length = 128, pattern = r"\S"))]
    pub password: String,
    /// First name, 1 to 100 characters, no control characters.
    #[oai(validator(
        max_length = 100,
        pattern = r"^[^\x00-\x1f\x7f-\x9f]*[^\s\x00-\x1f\x7f-\x9f][^\x00-\x1f\x7f-\x9f]*$"
    ))]
    pub first_name: String,
    /// Last name, 1 to 100 characters, no control characters.
    #[oai(validator(
        max_length = 100,
        pattern = r"^[^\x00-\x1f\x7f-\x9f]*[^\s\x00-\x1f\x7f-\x9f][^\x00-\x1f\x7f-\x9f]*$"
    ))]
    pub last_name: String,
}

/// Profile changes; absent fields stay as they are.
#[derive(Debug, Object)]
pub struct UpdateUserRequest {
    /// New e-mail address (must be free).
    #[oai(validator(
        max_length = 254,
        pattern = r"^[^@\s\x00-\x1f\x7f-\x9f]{1,64}@[^@.\s\x00-\x1f\x7f-\x9f]+(\.[^@.\s\x00-\x1f\x7f-\x9f]+)+$"
    ))]
    pub email: Option<String>,
    /// New first name.
    #[oai(validator(
        max_length = 100,
        pattern = r"^[^\x00-\x1f\x7f-\x9f]*[^\s\x00-\x1f\x7f-\x9f][^\x00-\x1f\x7f-\x9f]*$"
    ))]
    pub first_name: Option<String>,
    /// New last name.
    #[oai(validator(
        max_length = 100,
        pattern = r"^[^\x00-\x1f\x7f-\x9f]*[^\s\x00-\x1f\x7f-\x9f][^\x00-\x1f\x7f-\x9f]*$"
    ))]
    pub last_name: Option<String>,
    /// The current password: required to change one's own e-mail.
    #[oai(validator(max_length = 128))]
    pub current_password: Option<String>,
}

/// A password change.
#[derive(Debug, Object)]
pub struct ChangePasswordRequest {
    /// The current password.
    #[oai(validator(max_length = 128))]
    pub current_password: String,
    /// The new password: 8 to 128 characters, not only spaces. Never returned or logged.
    #[oai(validator(min_length = 8, max_length = 128, pattern = r"\S"))]
    pub new_password: String,
}

/// An account.
#[derive(Debug, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct User {
    /// Id.
    pub id: String,
    /// E-mail address (lower-case).
    pub email: String,
    /// First name.
    pub first_name: String,
    /// Last name.
    pub last_name: String,
    /// When the account was created.
    pub created_at: Timestamp,
    /// When the account last changed.
    pub updated_at: Timestamp,
}

/// UTM attribution of an account.
#[derive(Debug, Object)]
pub struct UserDetailsRequest {
    /// `utm_source`, at most 200 characters.
    #[oai(validator(max_length = 200, pattern = r"^[^\x00-\x1f\x7f-\x9f]*$"))]
    pub utm_source: Option<String>,
    /// `utm_campaign`, at most 200 characters.
    #[oai(validator(max_length = 200, pattern = r"^[^\x00-\x1f\x7f-\x9f]*$"))]
    pub utm_campaign: Option<String>,
    /// `utm_medium`, at most 200 characters.
    #[oai(validator(max_length = 200, pattern = r"^[^\x00-\x1f\x7f-\x9f]*$"))]
    pub utm_medium: Option<String>,
    /// `utm_content`, at most 200 characters.
    #[oai(validator(max_length = 200, pattern = r"^[^\x00-\x1f\x7f-\x9f]*$"))]
    pub utm_content: Option<String>,
}

/// UTM attribution of an account.
#[derive(Debug, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct UserDetails {
    /// `utm_source`.
    pub utm_source: Option<String>,
    /// `utm_campaign`.
    pub utm_campaign: Option<String>,
    /// `utm_medium`.
    pub utm_medium: Option<String>,
    /// `utm_content`.
    pub utm_content: Option<String>,
    /// When the details last changed.
    pub updated_at: Timestamp,
}

/// A page of accounts.
#[derive(Debug, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct UserPage {
    /// The accounts, in e-mail order.
    pub users: Vec<User>,
    /// Pass as `cursor` for the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

impl From<Account> for User {
    fn from(row: Account) -> Self {
        Self {
            id: row.id,
            email: row.email,
            first_name: row.first_name,
            last_name: row.last_name,
            created_at: timestamp(row.created_at),
            updated_at: timestamp(row.updated_at),
        }
    }
}

fn details_view((details, updated_at): (Details, i64)) -> UserDetails {
    UserDetails {
        utm_source: details.source,
        utm_campaign: details.campaign,
        utm_medium: details.medium,
        utm_content: details.content,
        updated_at: timestamp(updated_at),
    }
}

impl TryFrom<RegisterRequest> for NewUser {
    type Error = UserError;

    fn try_from(request: RegisterRequest) -> Result<Self, UserError> {
        let mut v = Violations::default();
        let email = v.check("email", Email::parse(&request.email));
        let password = v.check("password", Password::parse(request.password));
        let first_name = v.check("first_name", PersonName::parse(&request.first_name));
        let last_name = v.check("last_name", PersonName::parse(&request.last_name));
        match (email, password, first_name, last_name) {
            (Some(email), Some(password), Some(first_name), Some(last_name)) => Ok(Self {
                email,
                password,
                first_name,
                last_name,
            }),
            _ => Err(UserError::Invalid(v.0)),
        }
    }
}

impl TryFrom<&UpdateUserRequest> for UserChanges {
    type Error = UserError;

    fn try_from(request: &UpdateUserRequest) -> Result<Self, UserError> {
        let mut v = Violations::default();
        let changes = Self {
            email: request
                .email
                .as_deref()
                .and_then(|e| v.check("email", Email::parse(e))),
            first_name: request
                .first_name
                .as_deref()
                .and_then(|n| v.check("first_name", PersonName::parse(n))),
            last_name: request
                .last_name
                .as_deref()
                .and_then(|n| v.check("last_name", PersonName::parse(n))),
        };
        if v.0.is_empty() {
            Ok(changes)
        } else {
            Err(UserError::Invalid(v.0))
        }
    }
}

impl TryFrom<UserDetailsRequest> for Details {
    type Error = UserError;

    fn try_from(request: UserDetailsRequest) -> Result<Self, UserError> {
        let mut v = Violations::default();
        let mut field = |name: &str, value: Option<String>| {
            v.check(name, UtmValue::parse(value.as_deref()))
                .and_then(UtmValue::into_inner)
        };
        let details = Self {
            source: field("utm_source", request.utm_source),
            campaign: field("utm_campaign", request.utm_campaign),
            medium: field("utm_medium", request.utm_medium),
            content: field("utm_content", request.utm_content),
        };
        if v.0.is_empty() {
            Ok(details)
        } else {
            Err(UserError::Invalid(v.0))
        }
    }
}

trellis_core::problem_responses! {
    /// Errors of the public operation (registration).
    pub enum PublicFailure from UserError {
        /// The e-mail is already registered.
        409 => Conflict,
        /// A field breaks a rule; `errors` names each.
        422 => Invalid,
        /// An unexpected failure.
        500 => Internal,
        /// Too many registrations from this address; `Retry-After` says when to retry.
        429 => TooManyRequests,
        /// The database is unavailable or password hashing is at capacity; retry after
        /// `Retry-After`.
        503 => Unavailable,
        _ => Internal,
    }
}

trellis_core::problem_responses! {
    /// Errors of the authenticated operations.
    pub enum UserFailure from UserError {
        /// Missing, invalid or expired token, or ended session.
        401 => Unauthorized,
        /// The caller lacks the permission, is outranked by the account's owner, or gave no
        /// or a wrong `current_password`.
        403 => Forbidden,
        /// No such user (or not one the caller may see).
        404 => NotFound,
        /// The new e-mail is already registered.
        409 => Conflict,
        /// A field breaks a rule; `errors` names each.
        422 => Invalid,
        /// Too many password checks from this address; `Retry-After` says when to retry.
        429 => TooManyRequests,
        /// An unexpected failure.
        500 => Internal,
        /// A dependency is unavailable or password hashing is at capacity; retry after
        /// `Retry-After`.
        503 => Unavailable,
        _ => Internal,
    }
}

#[derive(ApiResponse)]
enum RegisterResponse {
    /// Registered; `Location` names the new account.
    #[oai(status = 201)]
    Created(Json<User>, #[oai(header = "Location")] String),
}

#[derive(ApiResponse)]
enum UserResponse {
    /// The account.
    #[oai(status = 200)]
    Ok(Json<User>),
}

#[derive(ApiResponse)]
enum DeletedResponse {
    /// Deleted: the account no longer authenticates and its sessions are revoked.
    #[oai(status = 204)]
    Deleted,
}

#[derive(ApiResponse)]
enum PasswordChangedResponse {
    /// Changed: every other session of the account has ended.
    #[oai(status = 204)]
    Changed,
}

#[derive(ApiResponse)]
enum DetailsResponse {
    /// The UTM details.
    #[oai(status = 200)]
    Ok(Json<UserDetails>),
}

#[derive(ApiResponse)]
enum ListResponse {
    /// A page of accounts.
    #[oai(status = 200)]
    Ok(Json<UserPage>),
}

/// The user module's API.
pub struct UserApi {
    users: Users,
}

impl UserApi {
    /// The API over the service.
    pub fn new(users: Users) -> Self {
        Self { users }
    }
}

#[OpenApi(prefix_path = "/api/v1/users")]
impl UserApi {
    /// Register
    ///
    /// Creates an account. The password is hashed with argon2id and never returned.
    #[oai(path = "/", method = "post", operation_id = "registerUser")]
    async fn register(
        &self,
        req: &Request,
        body: JsonBody<RegisterRequest>,
    ) -> Result<RegisterResponse, PublicFailure> {
        let user = NewUser::try_from(body.0)?;
        let client = client_address(req).map(|ip| ip.to_string());
        let row = self.users.register(user, client.as_deref()).await?;
        let location = format!("/api/v1/users/{}", row.id);
        Ok(RegisterResponse::Created(Json(row.into()), location))
    }

    /// List users
    ///
    /// Accounts in e-mail order, filtered by e-mail prefix, a page at a time. Needs the
    /// `users:manage` permission.
    #[oai(path = "/", method = "get", operation_id = "listUsers")]
    async fn list(
        &self,
        auth: BearerAuth,
        /// Only e-mails starting with this.
        #[oai(validator(max_length = 254))]
        email_prefix: Query<Option<String>>,
        /// The `next_cursor` of the previous page.
        #[oai(validator(max_length = 400))]
        cursor: Query<Option<String>>,
        /// Page size, 1 to 100 (default 20).
        #[oai(validator(minimum(value = "1"), maximum(value = "100")))]
        limit: Query<Option<u32>>,
    ) -> Result<ListResponse, UserFailure> {
        let Page { users, next_cursor } = self
            .users
            .list(
                &auth.0,
                email_prefix.0.as_deref(),
                cursor.0.as_deref(),
                limit.0,
            )
            .await?;
        Ok(ListResponse::Ok(Json(UserPage {
            users: users.into_iter().map(User::from).collect(),
            next_cursor,
        })))
    }

    /// My account
    ///
    /// The authenticated user's own account.
    #[oai(path = "/me", method = "get", operation_id = "getMe")]
    async fn me(&self, auth: BearerAuth) -> Result<UserResponse, UserFailure> {
        let row = self.users.get(&auth.0, &auth.0.user_id).await?;
        Ok(UserResponse::Ok(Json(row.into())))
    }

    /// Get a user
    ///
    /// One's own account, or anyone's with `users:manage`; otherwise 404.
    #[oai(path = "/:id", method = "get", operation_id = "getUser")]
    async fn get(
        &self,
        auth: BearerAuth,
        /// The user id.
        #[oai(validator(max_length = 64))]
        id: Path<String>,
    ) -> Result<UserResponse, UserFailure> {
        let row = self.users.get(&auth.0, &id.0).await?;
        Ok(UserResponse::Ok(Json(row.into())))
    }

    /// Update a user
    ///
    /// Changes names or e-mail (a new e-mail must be free). Changing one's own e-mail
    /// needs `current_password`. A super-administrator's account can be changed only by a
    /// super-administrator.
    #[oai(path = "/:id", method = "patch", operation_id = "updateUser")]
    async fn update(
        &self,
        req: &Request,
        auth: BearerAuth,
        /// The user id.
        #[oai(validator(max_length = 64))]
        id: Path<String>,
        body: JsonBody<UpdateUserRequest>,
    ) -> Result<UserResponse, UserFailure> {
        let changes = UserChanges::try_from(&body.0)?;
        let client = client_address(req).map(|ip| ip.to_string());
        let current = body.0.current_password.map(|password| CurrentPassword {
            password,
            client: client.as_deref(),
        });
        let row = self.users.update(&auth.0, &id.0, changes, current).await?;
        Ok(UserResponse::Ok(Json(row.into())))
    }

    /// Change password
    ///
    /// Changes one's own password: `current_password` must be right, and the new one
    /// follows the registration rules. Every other session of the account ends.
    #[oai(
        path = "/:id/password",
        method = "post",
        operation_id = "changePassword"
    )]
    async fn change_password(
        &self,
        req: &Request,
        auth: BearerAuth,
        /// The user id (one's own).
        #[oai(validator(max_length = 64))]
        id: Path<String>,
        body: JsonBody<ChangePasswordRequest>,
    ) -> Result<PasswordChangedResponse, UserFailure> {
        let ChangePasswordRequest {
            current_password,
            new_password,
        } = body.0;
        let new = Password::parse(new_password).map_err(|message| {
            UserError::Invalid(vec![trellis_core::problem::FieldViolation::new(
                "body",
                "/new_password",
                message,
            )])
        })?;
        let client = client_address(req).map(|ip| ip.to_string());
        let current = CurrentPassword {
            password: current_password,
            client: client.as_deref(),
        };
        self.users
            .change_password(&auth.0, &id.0, current, new)
            .await?;
        Ok(PasswordChangedResponse::Changed)
    }

    /// Delete a user
    ///
    /// Soft delete: in the same transaction the account's sessions, refresh tokens and
    /// roles end, so it stops authenticating at once. The last super-administrator cannot
    /// be deleted (409), nor a super-administrator by an administrator (403).
    #[oai(path = "/:id", method = "delete", operation_id = "deleteUser")]
    async fn delete(
        &self,
        auth: BearerAuth,
        /// The user id.
        #[oai(validator(max_length = 64))]
        id: Path<String>,
    ) -> Result<DeletedResponse, UserFailure> {
        self.users.delete(&auth.0, &id.0).await?;
        Ok(DeletedResponse::Deleted)
    }

    /// Set UTM details
    ///
    /// Replaces the account's UTM attribution (source, campaign, medium, content).
    #[oai(path = "/:id/details", method = "put", operation_id = "putUserDetails")]
    async fn put_details(
        &self,
        auth: BearerAuth,
        /// The user id.
        #[oai(validator(max_length = 64))]
        id: Path<String>,
        body: JsonBody<UserDetailsRequest>,
    ) -> Result<DetailsResponse, UserFailure> {
        let details = Details::try_from(body.0)?;
        let saved = self.users.put_details(&auth.0, &id.0, details).await?;
        Ok(DetailsResponse::Ok(Json(details_view(saved))))
    }

    /// Get UTM details
    ///
    /// The account's UTM attribution.
    #[oai(path = "/:id/details", method = "get", operation_id = "getUserDetails")]
    async fn details(
        &self,
        auth: BearerAuth,
        /// The user id.
        #[oai(validator(max_length = 64))]
        id: Path<String>,
    ) -> Result<DetailsResponse, UserFailure> {
        let details = self.users.details(&auth.0, &id.0).await?;
        Ok(DetailsResponse::Ok(Json(details_view(details))))
    }
}
