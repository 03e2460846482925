//! Password hashing: argon2id with at least OWASP's parameters (m = 19 MiB, t = 2, p = 1),
//! always on the blocking pool, never on the async runtime's workers, and at most one
//! hash per CPU at a time: each needs 19 MiB, and a login flood must queue, not exhaust
//! memory.

use std::sync::LazyLock;

use tokio::sync::Semaphore;

static HASHING: LazyLock<Semaphore> = LazyLock::new(|| {
    Semaphore::new(std::thread::available_parallelism().map_or(2, std::num::NonZero::get))
});

use argon2::{
    Algorithm, Argon2, Params, Version,
    password_hash::{PasswordHasher as _, PasswordVerifier as _},
};

use crate::domain::Password;

fn argon2() -> Argon2<'static> {
    let params = Params::new(19 * 1024, 2, 1, None).unwrap_or_default();
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
}

/// A hash of a random password, verified against when the account does not exist, so an
/// unknown e-mail costs the same time as a wrong password.
static DECOY: LazyLock<String> = LazyLock::new(|| {
    let random: [u8; 16] = rand::random();
    argon2()
        .hash_password(&random)
        .map(|hash| hash.to_string())
        .unwrap_or_default()
});

/// Hashes a new password.
pub async fn hash(password: Password) -> anyhow::Result<String> {
    let _permit = HASHING.acquire().await?;
    tokio::task::spawn_blocking(move || {
        argon2()
            .hash_password(password.expose().as_bytes())
            .map(|hash| hash.to_string())
            .map_err(|e| anyhow::anyhow!("cannot hash the password: {e}"))
    })
    .await?
}

/// Checks `password` against `stored`; with no stored hash, checks against the decoy and
/// answers false.
pub async fn verify(password: String, stored: Option<String>) -> bool {
    let Ok(_permit) = HASHING.acquire().await else {
        return false;
    };
    tokio::task::spawn_blocking(move || {
        let exists = stored.is_some();
        let hash = stored.unwrap_or_else(|| DECOY.clone());
        let matches = argon2::PasswordHash::new(&hash).is_ok_and(|parsed| {
            argon2()
                .verify_password(password.as_bytes(), &parsed)
                .is_ok()
        });
        exists && matches
    })
    .await
    .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn hashes_use_argon2id_with_owasp_parameters_and_verify() {
        let password = Password::parse("correct horse battery".into()).expect("valid");
        let hashed = hash(password).await.expect("hash");
        assert!(
            hashed.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"),
            "{hashed}"
        );
        assert!(verify("correct horse battery".into(), Some(hashed.clone())).await);
        assert!(!verify("wrong".into(), Some(hashed)).await);
        assert!(
            !verify("anything".into(), None).await,
            "no account, no match"
        );
    }
}
