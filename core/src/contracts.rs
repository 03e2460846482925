//! Messages that several modules share, so that none imports another: the module that
//! answers a request and the modules that ask both depend only on core.
//!
//! - Identity: `user` answers [`VerifyCredentials`], [`FindUser`] and [`BootstrapAccount`];
//!   `auth` asks. Account guards: `auth` answers [`GuardAccount`], [`CloseAccount`] and
//!   [`RevokeUserSessions`]; `user` asks before and while it changes an account.
//! - Authentication: `auth` answers [`Authenticate`]; every module's API asks, through the
//!   [`BearerAuth`](crate::auth::BearerAuth) extractor.
//! - Domain events ([`Event`]s, past tense, emitted in the transaction of their change):
//!   `UserRegistered`, `UserUpdated`, `UserDeleted`, `PasswordChanged` from `user`;
//!   `UserLoggedIn`, `LoginFailed`, `SessionRevoked` from `auth`. `UserDeleted` is also
//!   published on the bus once the deletion committed, for what must happen before the
//!   deletion is answered (forgetting cached sessions).

#[cfg(feature = "storage")]
use crate::storage::Tx;
use serde::{Deserialize, Serialize};

use crate::{
    auth::{AuthError, Principal},
    bus::{Message, Request},
    events::Event,
};

/// A user as other modules see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserIdentity {
    /// The user id.
    pub id: String,
    /// The e-mail address (lower-case).
    pub email: String,
}

/// Why an account request was refused or could not be answered. Kept apart from each
/// module's own errors so that the asking module can answer its client precisely.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AccountError {
    /// The caller may not do this to this account (e.g. an administrator acting on a
    /// super-administrator).
    #[error("{0}")]
    Forbidden(String),
    /// The change would break a rule (e.g. remove the last super-administrator).
    #[error("{0}")]
    Conflict(String),
    /// A value breaks a rule (bootstrap configuration).
    #[error("{0}")]
    Invalid(String),
    /// Password hashing is at capacity; retry shortly.
    #[error("too many password checks in progress; retry shortly")]
    Busy,
    /// The database (or another dependency) is unavailable.
    #[error("{0}")]
    Unavailable(String),
}

#[cfg(feature = "storage")]
impl From<crate::storage::DbError> for AccountError {
    fn from(error: crate::storage::DbError) -> Self {
        Self::Unavailable(error.to_string())
    }
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
    type Response = Result<Option<UserIdentity>, AccountError>;
}

/// Finds an active (not deleted) user by id.
#[derive(Debug, Clone)]
pub struct FindUser {
    /// The user id.
    pub id: String,
}

impl Request for FindUser {
    type Response = Result<Option<UserIdentity>, AccountError>;
}

/// Creates the bootstrap super-administrator's account, or proves that the existing
/// account with the e-mail is theirs: its password must be the configured one. Safe when
/// several instances ask at once.
#[derive(Debug, Clone)]
pub struct BootstrapAccount {
    /// E-mail.
    pub email: String,
    /// The configured password.
    pub password: String,
    /// First name, for a new account.
    pub first_name: String,
    /// Last name, for a new account.
    pub last_name: String,
}

/// What [`BootstrapAccount`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bootstrapped {
    /// The account was created with the configured password.
    Created(UserIdentity),
    /// The account existed and its password is the configured one.
    Verified(UserIdentity),
    /// An account with the e-mail exists and its password is not the configured one:
    /// somebody else may have registered the address, so nothing may be granted.
    PasswordMismatch,
}

impl Request for BootstrapAccount {
    type Response = Result<Bootstrapped, AccountError>;
}

/// May `actor` change, or delete, the account `user_id`? Asked before an administrator
/// acts on somebody else's account; the module keeping roles answers (a super-administrator
/// outranks an administrator).
#[derive(Debug, Clone)]
pub struct GuardAccount {
    /// Who acts.
    pub actor: Principal,
    /// The account acted on.
    pub user_id: String,
}

impl Request for GuardAccount {
    type Response = Result<(), AccountError>;
}

/// The account `user_id` is being deleted in `tx`: end its sessions and refresh tokens and
/// remove its grants in the same transaction, or refuse (the last super-administrator, an
/// outranked actor), which rolls the deletion back.
#[cfg(feature = "storage")]
#[derive(Debug, Clone)]
pub struct CloseAccount {
    /// Who deletes.
    pub actor: Principal,
    /// The account.
    pub user_id: String,
    /// The deleting transaction.
    pub tx: Tx,
}

#[cfg(feature = "storage")]
impl Request for CloseAccount {
    type Response = Result<(), AccountError>;
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

/// Revokes every session of a user but `except` (the caller's own, after a password
/// change); answers how many.
#[derive(Debug, Clone)]
pub struct RevokeUserSessions {
    /// The user id.
    pub user_id: String,
    /// A session to keep.
    pub except: Option<String>,
    /// Why, as recorded in `SessionRevoked`.
    pub reason: &'static str,
}

impl Request for RevokeUserSessions {
    type Response = Result<u64, AccountError>;
}

/// A user registered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRegistered {
    /// The user id.
    pub user_id: String,
    /// The e-mail.
    pub email: String,
}
impl Event for UserRegistered {
    const NAME: &'static str = "user.registered";
}

/// A user's profile changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserUpdated {
    /// The user id.
    pub user_id: String,
    /// Names of the changed fields.
    pub fields: Vec<String>,
}
impl Event for UserUpdated {
    const NAME: &'static str = "user.updated";
}

/// A user was (soft-)deleted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserDeleted {
    /// The user id.
    pub user_id: String,
}
impl Event for UserDeleted {
    const NAME: &'static str = "user.deleted";
}
impl Message for UserDeleted {}

/// A user changed their password (their other sessions are revoked).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PasswordChanged {
    /// The user id.
    pub user_id: String,
}
impl Event for PasswordChanged {
    const NAME: &'static str = "user.password_changed";
}

/// A user logged in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserLoggedIn {
    /// The user id.
    pub user_id: String,
    /// The new session.
    pub session_id: String,
}
impl Event for UserLoggedIn {
    const NAME: &'static str = "auth.logged_in";
}

/// A login attempt failed (the e-mail is as typed; it may not exist).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoginFailed {
    /// The e-mail as typed.
    pub email: String,
    /// Why: `invalid_credentials` or `rate_limited`.
    pub reason: String,
}
impl Event for LoginFailed {
    const NAME: &'static str = "auth.login_failed";
}

/// A session was revoked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRevoked {
    /// The user id.
    pub user_id: String,
    /// The session.
    pub session_id: String,
    /// Why: `logout`, `logout_all`, `refresh_reuse`, `user_deleted`.
    pub reason: String,
}
impl Event for SessionRevoked {
    const NAME: &'static str = "auth.session_revoked";
}
