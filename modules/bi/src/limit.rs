//! Limits on client events: a token bucket per sender, counted in events (a batch of 500
//! costs 500, one event costs 1), so a client cannot dodge the limit by batching.
//!
//! Anonymous senders are counted by client address, authenticated ones by user, so that
//! users behind one shared address (an office, a carrier's NAT) do not share a bucket with
//! anonymous traffic from it. The buckets live in this process (one set per instance);
//! idle ones are dropped every [`CLEANUP_EVERY`], which bounds their memory to the senders
//! seen within a refill period.

use std::{
    net::IpAddr,
    num::NonZeroU32,
    sync::{Arc, Weak},
    time::Duration,
};

use governor::{DefaultKeyedRateLimiter, Quota, clock::Clock as _};

use crate::BiConfig;

/// How often buckets that have filled up again are forgotten.
pub const CLEANUP_EVERY: Duration = Duration::from_secs(10);

/// Whose bucket a request's events are taken from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sender {
    /// An anonymous client, by its address key
    /// ([`client_address`](trellis_core::client::client_address)).
    Address(IpAddr),
    /// An authenticated user, by id.
    User(String),
}

/// The sender had no room for the events; it may try again after `retry_after_secs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limited {
    /// Whole seconds, at least 1.
    pub retry_after_secs: u64,
}

/// The buckets of every sender.
pub struct IngestLimits {
    by_address: DefaultKeyedRateLimiter<IpAddr>,
    by_user: DefaultKeyedRateLimiter<String>,
}

impl std::fmt::Debug for IngestLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IngestLimits")
            .field("addresses", &self.by_address.len())
            .field("users", &self.by_user.len())
            .finish()
    }
}

impl IngestLimits {
    /// The limits `config` sets, with their cleanup task (which ends when they are
    /// dropped). A burst smaller than `max_batch` would refuse full batches for ever, so
    /// it stops start-up naming the key.
    pub fn start(config: &BiConfig) -> anyhow::Result<Arc<Self>> {
        let quota = |rate: u32, burst: u32, key: &str| -> anyhow::Result<Quota> {
            let rate = NonZeroU32::new(rate).ok_or_else(|| {
                anyhow::anyhow!("`modules.bi.rate_per_{key}`: must be at least 1")
            })?;
            let burst = NonZeroU32::new(burst)
                .filter(|b| b.get() as usize >= config.max_batch)
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "`modules.bi.burst_per_{key}`: must be at least `modules.bi.max_batch` ({})",
                        config.max_batch
                    )
                })?;
            Ok(Quota::per_second(rate).allow_burst(burst))
        };
        let limits = Arc::new(Self {
            by_address: DefaultKeyedRateLimiter::keyed(quota(
                config.rate_per_address,
                config.burst_per_address,
                "address",
            )?),
            by_user: DefaultKeyedRateLimiter::keyed(quota(
                config.rate_per_user,
                config.burst_per_user,
                "user",
            )?),
        });
        tokio::spawn(cleanup(Arc::downgrade(&limits)));
        Ok(limits)
    }

    /// Takes `events` tokens from `sender`'s bucket, or none when it has fewer.
    pub fn take(&self, sender: &Sender, events: usize) -> Result<(), Limited> {
        let Some(n) = u32::try_from(events).ok().and_then(NonZeroU32::new) else {
            return match events {
                0 => Ok(()),
                _ => Err(Limited {
                    retry_after_secs: u64::MAX,
                }),
            };
        };
        let (outcome, now) = match sender {
            Sender::Address(address) => (
                self.by_address.check_key_n(address, n),
                self.by_address.clock().now(),
            ),
            Sender::User(user) => (
                self.by_user.check_key_n(user, n),
                self.by_user.clock().now(),
            ),
        };
        match outcome {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => {
                let wait = not_until.wait_time_from(now);
                Err(Limited {
                    retry_after_secs: wait.as_secs() + u64::from(wait.subsec_nanos() > 0),
                }
                .at_least_one())
            }
            // More than the burst: refused at start-up, kept for safety.
            Err(_) => Err(Limited {
                retry_after_secs: u64::MAX,
            }),
        }
    }

    fn forget_idle(&self) {
        self.by_address.retain_recent();
        self.by_address.shrink_to_fit();
        self.by_user.retain_recent();
        self.by_user.shrink_to_fit();
    }
}

impl Limited {
    fn at_least_one(self) -> Self {
        Self {
            retry_after_secs: self.retry_after_secs.max(1),
        }
    }
}

/// Forgets idle buckets every [`CLEANUP_EVERY`] while the limits are in use.
async fn cleanup(limits: Weak<IngestLimits>) {
    let mut ticker = tokio::time::interval(CLEANUP_EVERY);
    ticker.tick().await;
    loop {
        ticker.tick().await;
        match limits.upgrade() {
            Some(limits) => limits.forget_idle(),
            None => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(rate: u32, burst: u32) -> BiConfig {
        BiConfig {
            max_batch: 10,
            rate_per_address: rate,
            burst_per_address: burst,
            rate_per_user: rate,
            burst_per_user: burst,
            ..BiConfig::default()
        }
    }

    #[tokio::test]
    async fn a_batch_costs_one_token_per_event_and_senders_do_not_share() {
        let limits = IngestLimits::start(&config(1, 20)).expect("valid");
        let flooder = Sender::Address("192.0.2.1".parse().expect("ip"));
        assert_eq!(limits.take(&flooder, 10), Ok(()));
        assert_eq!(limits.take(&flooder, 10), Ok(()));
        let refused = limits.take(&flooder, 10).expect_err("the bucket is empty");
        assert!(
            (1..=10).contains(&refused.retry_after_secs),
            "ten events at one a second: {refused:?}"
        );
        let neighbour = Sender::Address("192.0.2.2".parse().expect("ip"));
        assert_eq!(limits.take(&neighbour, 10), Ok(()));
        let user = Sender::User("u1".into());
        assert_eq!(limits.take(&user, 10), Ok(()));
        assert_eq!(
            limits.take(&flooder, 0),
            Ok(()),
            "an empty batch costs nothing"
        );
    }

    #[tokio::test]
    async fn a_burst_below_the_batch_size_stops_start_up_naming_the_key() {
        let error = IngestLimits::start(&config(1, 5)).expect_err("burst < max_batch");
        assert!(
            error.to_string().contains("`modules.bi.burst_per_address`"),
            "{error}"
        );
        let error = IngestLimits::start(&config(0, 50)).expect_err("rate 0");
        assert!(
            error.to_string().contains("`modules.bi.rate_per_address`"),
            "{error}"
        );
    }
}
