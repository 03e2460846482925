//! The auth module's rules. No HTTP types here.

use std::time::Duration;

use anyhow::Context as _;
use trellis_core::{
    AppContext, ModuleContext,
    auth::{AuthError, Principal, SUDO},
    bus::Bus,
    clock::now_millis,
    contracts::{
        EnsureUser, FindUser, LoginFailed, SessionRevoked, UserLoggedIn, VerifyCredentials,
    },
    storage::DbError,
};

use crate::{
    AuthConfig, DEV_SECRET,
    error::AuthModuleError,
    repo::{AuthRepo, SessionForCreate, SessionRow},
    tokens::{Claims, Signer, digest, new_refresh_token},
};

/// The permission to list roles.
pub const READ_ROLES: &str = "roles:read";

/// Tokens handed out by login and refresh.
#[derive(Debug, Clone)]
pub struct TokenPair {
    pub access_token: String,
    pub expires_in: u64,
    pub refresh_token: String,
    pub session_id: String,
}

/// Where a login comes from.
#[derive(Debug, Clone, Default)]
pub struct Client {
    pub address: Option<String>,
    pub user_agent: Option<String>,
}

/// The auth service.
#[derive(Clone)]
pub struct Auth {
    repo: AuthRepo,
    bus: Bus,
    signer: Signer,
    config: AuthConfig,
}

impl Auth {
    /// The service over the module's context. Refuses the development secret outside the
    /// `dev` profile, and secrets shorter than 32 bytes anywhere.
    pub fn from_context(ctx: &ModuleContext<'_>) -> anyhow::Result<Self> {
        let config: AuthConfig = ctx.config()?;
        let profile = &ctx.app().loaded_config().profile;
        if config.jwt_secret == DEV_SECRET && profile != "dev" {
            anyhow::bail!(
                "`modules.auth.jwt_secret` is the development default; set a secret of your own \
                 (e.g. TRELLIS_MODULES__AUTH__JWT_SECRET) for the `{profile}` profile"
            );
        }
        if config.jwt_secret.len() < 32 {
            anyhow::bail!("`modules.auth.jwt_secret` must be at least 32 bytes");
        }
        Ok(Self {
            repo: AuthRepo::new(
                ctx.database(),
                ctx.cache(),
                Duration::from_secs(config.session_cache_secs),
            ),
            bus: ctx.bus().clone(),
            signer: Signer::new(config.jwt_secret.as_bytes(), &config.issuer),
            config,
        })
    }

    /// Init hook: creates the configured super-administrator if missing and grants the role.
    pub async fn bootstrap_admin(ctx: &AppContext) -> anyhow::Result<()> {
        let config: AuthConfig = ctx.loaded_config().module_section("auth")?;
        if config.bootstrap_admin_email.is_empty() {
            return Ok(());
        }
        let user = ctx
            .bus()
            .request(EnsureUser {
                email: config.bootstrap_admin_email.clone(),
                password: config.bootstrap_admin_password.clone(),
                first_name: "Super".into(),
                last_name: "Admin".into(),
            })
            .await?
            .map_err(|e| anyhow::anyhow!("`modules.auth.bootstrap_admin_*`: {e}"))?;
        let repo = AuthRepo::new(
            ctx.database().for_module("auth"),
            ctx.storage().cache.for_module("auth"),
            Duration::from_secs(config.session_cache_secs),
        );
        repo.grant(&user.id, "SUPER_ADMIN", now_millis())
            .await
            .context("cannot grant SUPER_ADMIN to the bootstrap administrator")?;
        tracing::info!(user_id = %user.id, "super-administrator ensured");
        Ok(())
    }

    async fn limit(&self, key: &str, allowed: i64) -> Result<(), AuthModuleError> {
        let window = Duration::from_secs(self.config.login_window_secs);
        match self.repo.cache().incr(key, 1, window).await {
            Ok(count) if count > allowed => Err(AuthModuleError::RateLimited {
                retry_after: self.config.login_window_secs,
            }),
            Ok(_) => Ok(()),
            // The cache is down: fail open (logged by the cache) rather than lock everyone out.
            Err(_) => Ok(()),
        }
    }

    /// Logs in: rate limits per address and per account, then the same answer for an
    /// unknown e-mail and a wrong password (the user module spends the same hashing time).
    pub async fn login(
        &self,
        email: &str,
        password: String,
        client: Client,
    ) -> Result<TokenPair, AuthModuleError> {
        let account = email.trim().to_lowercase();
        let limited = async {
            if let Some(address) = &client.address {
                self.limit(
                    &format!("login:address:{address}"),
                    self.config.login_attempts_per_address,
                )
                .await?;
            }
            self.limit(
                &format!("login:account:{account}"),
                self.config.login_attempts_per_account,
            )
            .await
        }
        .await;
        if let Err(error) = limited {
            self.bus
                .publish(LoginFailed {
                    email: account,
                    reason: "rate_limited",
                })
                .await;
            return Err(error);
        }
        let verified = self
            .bus
            .request(VerifyCredentials {
                email: email.to_owned(),
                password,
            })
            .await
            .map_err(anyhow::Error::from)?
            .map_err(DbError::Unavailable)?;
        let Some(user) = verified else {
            self.bus
                .publish(LoginFailed {
                    email: account,
                    reason: "invalid_credentials",
                })
                .await;
            return Err(AuthModuleError::InvalidCredentials);
        };
        let _ = self
            .repo
            .cache()
            .delete(&format!("login:account:{account}"))
            .await;
        let session_id = uuid::Uuid::new_v4().to_string();
        let now_ms = now_millis();
        let expires_at =
            now_ms + i64::try_from(self.config.session_ttl_secs * 1000).unwrap_or(i64::MAX);
        self.repo
            .insert_session(SessionForCreate {
                id: &session_id,
                user_id: &user.id,
                now: now_ms,
                expires_at,
                user_agent: client.user_agent.as_deref(),
                address: client.address.as_deref(),
            })
            .await?;
        let pair = self.issue(&user.id, &session_id, now_ms).await?;
        tracing::info!(user_id = %user.id, session_id = %session_id, "logged in");
        self.bus
            .publish(UserLoggedIn {
                user_id: user.id,
                session_id,
            })
            .await;
        Ok(pair)
    }

    async fn issue(
        &self,
        user_id: &str,
        session_id: &str,
        now_ms: i64,
    ) -> Result<TokenPair, AuthModuleError> {
        let refresh_token = new_refresh_token();
        self.repo
            .insert_refresh(&digest(&refresh_token), session_id, now_ms)
            .await?;
        let iat = u64::try_from(now_millis() / 1000).unwrap_or_default();
        let access_token = self.signer.sign(&Claims {
            sub: user_id.to_owned(),
            sid: session_id.to_owned(),
            iat,
            exp: iat + self.config.access_ttl_secs,
            iss: self.config.issuer.clone(),
        })?;
        Ok(TokenPair {
            access_token,
            expires_in: self.config.access_ttl_secs,
            refresh_token,
            session_id: session_id.to_owned(),
        })
    }

    /// Exchanges a refresh token for new tokens. Each refresh token works once; presenting
    /// a used one again means it leaked, and the session is revoked.
    pub async fn refresh(&self, token: &str) -> Result<TokenPair, AuthModuleError> {
        let hash = digest(token);
        let now_ms = now_millis();
        let row = self
            .repo
            .find_refresh(&hash, now_ms)
            .await?
            .ok_or(AuthModuleError::InvalidRefreshToken)?;
        if !row.live {
            return Err(AuthModuleError::InvalidRefreshToken);
        }
        if row.used || !self.repo.use_refresh(&hash, now_ms).await? {
            tracing::warn!(session_id = %row.session_id, "refresh token reused; revoking the session");
            self.revoke(&row.user_id, &row.session_id, "refresh_reuse")
                .await?;
            return Err(AuthModuleError::InvalidRefreshToken);
        }
        self.repo.touch_session(&row.session_id, now_ms).await?;
        self.issue(&row.user_id, &row.session_id, now_ms).await
    }

    /// Revokes one of the principal's sessions.
    pub async fn revoke(
        &self,
        user_id: &str,
        session_id: &str,
        reason: &'static str,
    ) -> Result<(), AuthModuleError> {
        if self
            .repo
            .revoke_session(user_id, session_id, now_millis())
            .await?
        {
            self.bus
                .publish(SessionRevoked {
                    user_id: user_id.to_owned(),
                    session_id: session_id.to_owned(),
                    reason,
                })
                .await;
        }
        Ok(())
    }

    /// Revokes every session of a user; how many.
    pub async fn revoke_all(
        &self,
        user_id: &str,
        reason: &'static str,
    ) -> Result<u64, AuthModuleError> {
        let ids = self.repo.revoke_all(user_id, now_millis()).await?;
        for session_id in &ids {
            self.bus
                .publish(SessionRevoked {
                    user_id: user_id.to_owned(),
                    session_id: session_id.clone(),
                    reason,
                })
                .await;
        }
        Ok(ids.len() as u64)
    }

    /// The principal's live sessions.
    pub async fn sessions(
        &self,
        principal: &Principal,
    ) -> Result<Vec<SessionRow>, AuthModuleError> {
        Ok(self
            .repo
            .live_sessions(&principal.user_id, now_millis())
            .await?)
    }

    /// Bus: a bearer token's principal, if the token is valid and its session live.
    pub async fn authenticate(&self, token: &str) -> Result<Principal, AuthError> {
        let claims = self.signer.verify(token).ok_or(AuthError::InvalidToken)?;
        let live = self
            .repo
            .live_session(&claims.sid, now_millis())
            .await
            .map_err(|_| AuthError::Temporarily)?
            .filter(|live| live.user_id == claims.sub)
            .ok_or(AuthError::SessionEnded)?;
        Ok(Principal {
            user_id: claims.sub,
            session_id: claims.sid,
            roles: live.roles,
            permissions: live.permissions,
        })
    }

    /// Roles and their permissions.
    pub async fn roles(
        &self,
        principal: &Principal,
    ) -> Result<Vec<(String, String, Vec<String>)>, AuthModuleError> {
        if !principal.can(READ_ROLES) {
            return Err(AuthModuleError::Forbidden(READ_ROLES));
        }
        Ok(self.repo.roles().await?)
    }

    /// A user's roles.
    pub async fn user_roles(
        &self,
        principal: &Principal,
        user_id: &str,
    ) -> Result<Vec<String>, AuthModuleError> {
        if !principal.is(user_id) && !principal.can(READ_ROLES) {
            return Err(AuthModuleError::NotFound("no such user"));
        }
        Ok(self.repo.user_roles(user_id).await?)
    }

    /// Grants or revokes a role (super-administrators only); takes effect on the user's
    /// next request.
    pub async fn set_role(
        &self,
        principal: &Principal,
        user_id: &str,
        role: &str,
        granted: bool,
    ) -> Result<(), AuthModuleError> {
        if !principal.can(SUDO) {
            return Err(AuthModuleError::Forbidden(SUDO));
        }
        if !self.repo.role_exists(role).await? {
            return Err(AuthModuleError::NotFound("no such role"));
        }
        let user = self
            .bus
            .request(FindUser {
                id: user_id.to_owned(),
            })
            .await
            .map_err(anyhow::Error::from)?
            .map_err(DbError::Unavailable)?;
        if user.is_none() {
            return Err(AuthModuleError::NotFound("no such user"));
        }
        if granted {
            self.repo.grant(user_id, role, now_millis()).await?;
        } else {
            self.repo.revoke_role(user_id, role).await?;
        }
        let sessions = self.repo.live_session_ids(user_id, now_millis()).await?;
        self.repo.forget_sessions(&sessions).await;
        tracing::info!(user_id, role, granted, by = %principal.user_id, "role changed");
        Ok(())
    }
}
