//! Password hashing: argon2id with at least OWASP's parameters (Password Storage Cheat
//! Sheet: m = 19 MiB, t = 2, p = 1), always on the blocking pool, never on the async
//! runtime's workers.
//!
//! Capacity is bounded twice: at most `concurrency` hashes run at once (each needs 19 MiB,
//! and a login flood must not exhaust memory), and at most `queue` wait for their turn;
//! past that the caller is told to come back later ([`Busy`]) instead of queueing without
//! bound. A running hash keeps its permit until it finishes, even when the request that
//! asked for it timed out or its client went away: the work goes on in the blocking pool,
//! so the capacity it holds must too.

use std::sync::{
    Arc, LazyLock,
    atomic::{AtomicUsize, Ordering},
};

use argon2::{
    Algorithm, Argon2, Params, Version,
    password_hash::{PasswordHasher as _, PasswordVerifier as _},
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use trellis_core::telemetry::InTrace as _;

use crate::domain::Password;

/// How many hashes are running now.
pub const PASSWORD_HASHES_RUNNING: &str = "user_password_hashes_running";
/// Hashes refused because the queue was full.
pub const PASSWORD_HASHES_REFUSED_TOTAL: &str = "user_password_hashes_refused_total";

/// Describes the metrics above to the recorder, the refusals from 0.
pub fn describe_metrics() {
    metrics::describe_gauge!(
        PASSWORD_HASHES_RUNNING,
        "Password hashes (argon2id) computing now; at most `modules.user.hash_concurrency`."
    );
    metrics::describe_counter!(
        PASSWORD_HASHES_REFUSED_TOTAL,
        "Password hashes refused with 503 because `modules.user.hash_queue` was full."
    );
    // At 0 from the start, so that an alert on its increase sees the first refusal.
    metrics::counter!(PASSWORD_HASHES_REFUSED_TOTAL).increment(0);
}

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

/// Hashing is at capacity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("too many password hashes in progress; retry shortly")]
pub struct Busy;

/// The module's hashing capacity. Cheap to clone; one per module instance.
#[derive(Debug, Clone)]
pub struct Hasher {
    running: Arc<Semaphore>,
    waiting: Arc<AtomicUsize>,
    queue: usize,
}

/// Counts a caller waiting for a permit until it gets one or goes away.
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Hasher {
    /// `concurrency` hashes at once (0: one per CPU), `queue` more waiting.
    pub fn new(concurrency: usize, queue: usize) -> Self {
        let concurrency = if concurrency == 0 {
            std::thread::available_parallelism().map_or(2, std::num::NonZero::get)
        } else {
            concurrency
        };
        Self {
            running: Arc::new(Semaphore::new(concurrency)),
            waiting: Arc::new(AtomicUsize::new(0)),
            queue,
        }
    }

    async fn permit(&self) -> Result<OwnedSemaphorePermit, Busy> {
        if let Ok(permit) = self.running.clone().try_acquire_owned() {
            return Ok(permit);
        }
        if self.waiting.fetch_add(1, Ordering::Relaxed) >= self.queue {
            self.waiting.fetch_sub(1, Ordering::Relaxed);
            metrics::counter!(PASSWORD_HASHES_REFUSED_TOTAL).increment(1);
            return Err(Busy);
        }
        let _waiting = Waiting(&self.waiting);
        self.running.clone().acquire_owned().await.map_err(|_| Busy)
    }

    /// Runs `work` on the blocking pool with a permit that it keeps until it returns,
    /// whatever happens to the caller. With traces on, the wait and the work are one span,
    /// `password <operation>`.
    async fn run<T: Send + 'static>(
        &self,
        operation: &'static str,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, Busy> {
        let span = trellis_core::trace_span!(
            "password",
            otel.name = format!("password {operation}"),
            password.operation = operation,
            password.algorithm = "argon2id",
        );
        async {
            let permit = self.permit().await?;
            tokio::task::spawn_blocking(move || {
                let _permit = permit;
                let gauge = metrics::gauge!(PASSWORD_HASHES_RUNNING);
                gauge.increment(1.0);
                let out = work();
                gauge.decrement(1.0);
                out
            })
            .await
            .map_err(|_| Busy)
        }
        .in_trace(span)
        .await
    }

    /// Hashes a new password.
    pub async fn hash(&self, password: Password) -> Result<anyhow::Result<String>, Busy> {
        self.run("hash", move || {
            argon2()
                .hash_password(password.expose().as_bytes())
                .map(|hash| hash.to_string())
                .map_err(|e| anyhow::anyhow!("cannot hash the password: {e}"))
        })
        .await
    }

    /// Checks `password` against `stored`; with no stored hash, checks against the decoy
    /// and answers false.
    pub async fn verify(&self, password: String, stored: Option<String>) -> Result<bool, Busy> {
        self.run("verify", move || {
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
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn hashes_use_argon2id_with_owasp_parameters_and_verify() {
        let hasher = Hasher::new(0, 8);
        let password = Password::parse("correct horse battery".into()).expect("valid");
        let hashed = hasher
            .hash(password)
            .await
            .expect("capacity")
            .expect("hash");
        assert!(
            hashed.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"),
            "{hashed}"
        );
        let verify = |p: &str, stored| hasher.verify(p.into(), stored);
        assert_eq!(
            verify("correct horse battery", Some(hashed.clone())).await,
            Ok(true)
        );
        assert_eq!(verify("wrong", Some(hashed)).await, Ok(false));
        assert_eq!(
            verify("anything", None).await,
            Ok(false),
            "no account, no match"
        );
    }

    #[tokio::test]
    async fn an_abandoned_hash_keeps_its_permit_until_it_finishes() {
        let hasher = Hasher::new(1, 0);
        let password = Password::parse("correct horse battery".into()).expect("valid");
        // The caller gives up almost at once; the hash goes on in the blocking pool.
        let abandoned =
            tokio::time::timeout(Duration::from_millis(1), hasher.hash(password.clone())).await;
        assert!(abandoned.is_err(), "the hash takes longer than 1 ms");
        assert_eq!(
            hasher.running.available_permits(),
            0,
            "the running hash still holds the only permit"
        );
        assert_eq!(
            hasher.hash(password).await.err(),
            Some(Busy),
            "with no queue, the next caller is refused"
        );
        tokio::time::timeout(Duration::from_secs(10), async {
            while hasher.running.available_permits() == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the permit comes back when the hash finishes");
    }

    #[tokio::test]
    async fn callers_past_the_queue_are_refused_and_waiting_ones_are_served() {
        let hasher = Hasher::new(1, 1);
        let verify = || hasher.verify("password".into(), None);
        let (a, b, c) = tokio::join!(verify(), verify(), async {
            tokio::time::sleep(Duration::from_millis(2)).await;
            verify().await
        });
        assert_eq!((a, b), (Ok(false), Ok(false)), "one runs, one waits");
        assert_eq!(c, Err(Busy), "the third finds the queue full");
        assert_eq!(hasher.waiting.load(Ordering::Relaxed), 0);
    }
}
