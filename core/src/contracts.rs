//! Messages that several modules share, so that none imports another: the module that
//! answers a request and the modules that ask both depend only on core.
//!
//! - Identity: `user` answers [`VerifyCredentials`], [`FindUser`] and [`EnsureUser`];
//!   `auth` asks.
//! - Authentication: `auth` answers [`Authenticate`]; every module's API asks, through the
//!   [`BearerAuth`](crate::auth::BearerAuth) extractor.
//! - Domain events (published, past tense): `UserRegistered`, `UserUpdated`, `UserDeleted`
//!   from `user`; `UserLoggedIn`, `LoginFailed`, `SessionRevoked` from `auth`.

use crate::{
    auth::{AuthError, Principal},
    bus::{Message, Request},
};

/// A user as other modules see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserIdentity {
    /// The user id.
    pub id: String,
    /// The e-mail address (lower-case).
    pub email: String,
}

/// Checks an e-mail and password. Answers `None` for an unknown e-mail, a wrong password or
/// a deleted account alike, taking about the same time in each case.
#[derive(Debug, Clone)]
pub struct VerifyCredentials {
    /// The e-mail as typed.
    pub email: String,
    /// The password as typed.
    pub password: String,
}

impl Request for VerifyCredentials {
    type Response = Result<Option<UserIdentity>, String>;
}

/// Finds an active (not deleted) user by id.
#[derive(Debug, Clone)]
pub struct FindUser {
    /// The user id.
    pub id: String,
}

impl Request for FindUser {
    type Response = Result<Option<UserIdentity>, String>;
}

/// Creates the user if the e-mail is not registered yet (used to bootstrap the first
/// administrator); answers the user either way.
#[derive(Debug, Clone)]
pub struct EnsureUser {
    /// E-mail.
    pub email: String,
    /// Password, used only when the user is created.
    pub password: String,
    /// First name.
    pub first_name: String,
    /// Last name.
    pub last_name: String,
}

impl Request for EnsureUser {
    type Response = Result<UserIdentity, String>;
}

/// Turns a bearer token into the principal it authenticates.
#[derive(Debug, Clone)]
pub struct Authenticate {
    /// The token from `Authorization: Bearer …`.
    pub token: String,
}

impl Request for Authenticate {
    type Response = Result<Principal, AuthError>;
}

/// Revokes every session of a user (e.g. when the account is deleted).
#[derive(Debug, Clone)]
pub struct RevokeUserSessions {
    /// The user id.
    pub user_id: String,
}

impl Request for RevokeUserSessions {
    type Response = Result<u64, String>;
}

/// A user registered.
#[derive(Debug, Clone)]
pub struct UserRegistered {
    /// The user id.
    pub user_id: String,
    /// The e-mail.
    pub email: String,
}
impl Message for UserRegistered {}

/// A user's profile changed.
#[derive(Debug, Clone)]
pub struct UserUpdated {
    /// The user id.
    pub user_id: String,
    /// Names of the changed fields.
    pub fields: Vec<&'static str>,
}
impl Message for UserUpdated {}

/// A user was (soft-)deleted.
#[derive(Debug, Clone)]
pub struct UserDeleted {
    /// The user id.
    pub user_id: String,
}
impl Message for UserDeleted {}

/// A user logged in.
#[derive(Debug, Clone)]
pub struct UserLoggedIn {
    /// The user id.
    pub user_id: String,
    /// The new session.
    pub session_id: String,
}
impl Message for UserLoggedIn {}

/// A login attempt failed (the e-mail is as typed; it may not exist).
#[derive(Debug, Clone)]
pub struct LoginFailed {
    /// The e-mail as typed.
    pub email: String,
    /// Why: `invalid_credentials` or `rate_limited`.
    pub reason: &'static str,
}
impl Message for LoginFailed {}

/// A session was revoked.
#[derive(Debug, Clone)]
pub struct SessionRevoked {
    /// The user id.
    pub user_id: String,
    /// The session.
    pub session_id: String,
    /// Why: `logout`, `logout_all`, `refresh_reuse`, `user_deleted`.
    pub reason: &'static str,
}
impl Message for SessionRevoked {}
