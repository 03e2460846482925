//! Limits on client events: a token bucket per sender, counted in events (a batch of 500
//! costs 500, one event costs 1), so a client cannot dodge the limit by batching.
//!
//! Anonymous senders are counted by client address, authenticated ones by user, so that
//! users behind one shared address (an office, a carrier's NAT) do not share a bucket with
//! anonymous traffic from it. The buckets live in the module's cache
//! ([`ModuleCache::take`]): shared by every instance when the cache is Redis, one set per
//! instance with the in-process cache. A bucket is forgotten once it is full again.

use std::net::IpAddr;

use trellis_core::storage::ModuleCache;

use crate::BiConfig;

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

/// A bucket's refill rate (events a second) and size.
#[derive(Debug, Clone, Copy)]
struct Quota {
    rate: u32,
    burst: u64,
}

/// The buckets of every sender.
#[derive(Debug, Clone)]
pub struct IngestLimits {
    cache: ModuleCache,
    by_address: Quota,
    by_user: Quota,
}

impl IngestLimits {
    /// The limits `config` sets, kept in `cache`. A burst smaller than `max_batch` would
    /// refuse full batches for ever, so it stops start-up naming the key.
    pub fn new(config: &BiConfig, cache: ModuleCache) -> anyhow::Result<Self> {
        let quota = |rate: u32, burst: u32, key: &str| -> anyhow::Result<Quota> {
            if rate == 0 {
                anyhow::bail!("`modules.bi.rate_per_{key}`: must be at least 1");
            }
            if burst == 0 || (burst as usize) < config.max_batch {
                anyhow::bail!(
                    "`modules.bi.burst_per_{key}`: must be at least `modules.bi.max_batch` ({})",
                    config.max_batch
                );
            }
            Ok(Quota {
                rate,
                burst: u64::from(burst),
            })
        };
        Ok(Self {
            cache,
            by_address: quota(config.rate_per_address, config.burst_per_address, "address")?,
            by_user: quota(config.rate_per_user, config.burst_per_user, "user")?,
        })
    }

    /// Takes `events` tokens from `sender`'s bucket, or none when it has fewer.
    pub async fn take(&self, sender: &Sender, events: usize) -> Result<(), Limited> {
        if events == 0 {
            return Ok(());
        }
        let (key, quota) = match sender {
            Sender::Address(address) => (format!("ingest:address:{address}"), self.by_address),
            Sender::User(user) => (format!("ingest:user:{user}"), self.by_user),
        };
        self.cache
            .take(&key, events as u64, quota.rate, quota.burst)
            .await
            .map_err(|wait| Limited {
                retry_after_secs: wait.max(1),
            })
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

    fn cache() -> ModuleCache {
        let store = std::sync::Arc::new(trellis_core::storage::MemoryStore::new(1_000));
        trellis_core::storage::Cache::with_store(store, "t").for_module("bi")
    }

    #[tokio::test]
    async fn a_batch_costs_one_token_per_event_and_senders_do_not_share() {
        let limits = IngestLimits::new(&config(1, 20), cache()).expect("valid");
        let flooder = Sender::Address("192.0.2.1".parse().expect("ip"));
        assert_eq!(limits.take(&flooder, 10).await, Ok(()));
        assert_eq!(limits.take(&flooder, 10).await, Ok(()));
        let refused = limits
            .take(&flooder, 10)
            .await
            .expect_err("the bucket is empty");
        assert!(
            (1..=10).contains(&refused.retry_after_secs),
            "ten events at one a second: {refused:?}"
        );
        let neighbour = Sender::Address("192.0.2.2".parse().expect("ip"));
        assert_eq!(limits.take(&neighbour, 10).await, Ok(()));
        let user = Sender::User("u1".into());
        assert_eq!(limits.take(&user, 10).await, Ok(()));
        assert_eq!(
            limits.take(&flooder, 0).await,
            Ok(()),
            "an empty batch costs nothing"
        );
    }

    #[tokio::test]
    async fn a_burst_below_the_batch_size_stops_start_up_naming_the_key() {
        let error = IngestLimits::new(&config(1, 5), cache()).expect_err("burst < max_batch");
        assert!(
            error.to_string().contains("`modules.bi.burst_per_address`"),
            "{error}"
        );
        let error = IngestLimits::new(&config(0, 50), cache()).expect_err("rate 0");
        assert!(
            error.to_string().contains("`modules.bi.rate_per_address`"),
            "{error}"
        );
    }
}
