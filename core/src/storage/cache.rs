//! The cache: an in-process store (moka) by default, Redis when `cache.url` is set, with
//! the entries read kept near, in each instance, and invalidated by Redis itself
//! (`RedisStore`, cargo feature `redis`). Keys are `<prefix>:<module>:<key>`.
//!
//! The cache never decides an answer: the database is the truth. A read that fails is a
//! miss, a write that fails is skipped, so a Redis outage costs speed, not requests. The
//! first failure of an outage is logged (and `/readyz` shows the cache degraded); every
//! failure is counted; the first success afterwards logs the recovery. Redis operations
//! are bounded by `cache.timeout_ms`, so a hung Redis cannot hang a request.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use crate::telemetry::InTrace as _;
use futures_util::future::BoxFuture;
use serde::{Serialize, de::DeserializeOwned};

use crate::{
    config::CacheConfig,
    metrics::{CACHE_ERRORS_TOTAL, CACHE_HITS_TOTAL, CACHE_MISSES_TOTAL, CACHE_UP},
    readiness::CheckOutcome,
};

/// The cache's operations, as its metrics and spans name them.
mod op {
    pub(super) const GET: &str = "get";
    pub(super) const SET: &str = "set";
    pub(super) const DELETE: &str = "delete";
    pub(super) const INCR: &str = "incr";
    pub(super) const TAKE: &str = "take";
    /// Every one: their error counters exist from the start.
    pub(super) const ALL: [&str; 5] = [GET, SET, DELETE, INCR, TAKE];
}

/// Why a cache operation failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CacheError {
    /// The store did not answer, or answered with an error.
    #[error("cache unavailable: {0}")]
    Unavailable(String),
    /// The store did not answer within `cache.timeout_ms`.
    #[error("cache did not answer within {0} ms")]
    Timeout(u64),
    /// A counter holds something that is not an integer.
    #[error("cache value is not an integer")]
    NotAnInteger,
}

/// A cache store. Keys arrive fully prefixed.
pub trait CacheStore: Send + Sync + 'static {
    /// The value, if present and not expired.
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Vec<u8>>, CacheError>>;
    /// Stores `value` for `ttl`.
    fn set<'a>(
        &'a self,
        key: &'a str,
        value: Vec<u8>,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<(), CacheError>>;
    /// Removes the key.
    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), CacheError>>;
    /// Adds `by` atomically and returns the new value; a new counter expires after `ttl`
    /// (later increments keep that expiry: a fixed window).
    fn incr<'a>(
        &'a self,
        key: &'a str,
        by: i64,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<i64, CacheError>>;
    /// Takes `cost` tokens from the bucket under `key` (a generic cell rate algorithm:
    /// one token per `interval`, at most `burst` saved up), or none when it has fewer;
    /// then answers how long until it has enough.
    fn take<'a>(
        &'a self,
        key: &'a str,
        cost: u64,
        interval: Duration,
        burst: u64,
    ) -> BoxFuture<'a, Result<Option<Duration>, CacheError>>;
    /// Checks that the store answers.
    fn ping(&self) -> BoxFuture<'_, Result<(), CacheError>>;
    /// Drops every entry this process holds (removals may have been missed).
    fn forget_all(&self) {}
    /// `memory` or `redis`.
    fn kind(&self) -> &'static str;
}

/// The shared cache. Cheap to clone.
#[derive(Clone)]
pub struct Cache {
    store: Arc<dyn CacheStore>,
    prefix: Arc<str>,
    down: Arc<AtomicBool>,
    /// Where removals are announced to the other instances, if anywhere.
    #[cfg(feature = "postgres")]
    announce: Option<sqlx::AnyPool>,
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache")
            .field("kind", &self.store.kind())
            .field("prefix", &self.prefix)
            .finish()
    }
}

impl Cache {
    /// The store `config` describes. Connecting to Redis is lazy: a Redis that is down at
    /// start-up leaves the server running with the cache degraded.
    pub fn from_config(config: &CacheConfig) -> anyhow::Result<Self> {
        let store: Arc<dyn CacheStore> = if config.url.is_empty() {
            Arc::new(MemoryStore::new(config.max_entries))
        } else {
            #[cfg(feature = "redis")]
            let store = Arc::new(super::redis::RedisStore::new(config)?);
            #[cfg(not(feature = "redis"))]
            anyhow::bail!(
                "`cache.url`: this build has no Redis cache (cargo feature `redis` of \
                 trellis-server); leave it empty for the in-process cache"
            );
            #[cfg(feature = "redis")]
            store
        };
        Ok(Self::with_store(store, &config.prefix))
    }

    /// A cache over `store` with `prefix`.
    pub fn with_store(store: Arc<dyn CacheStore>, prefix: &str) -> Self {
        metrics::gauge!(CACHE_UP).set(1.0);
        // At 0 from the start, so that an alert on their increase sees the first one.
        for operation in op::ALL {
            metrics::counter!(CACHE_ERRORS_TOTAL, "operation" => operation).increment(0);
        }
        Self {
            store,
            prefix: Arc::from(prefix),
            down: Arc::new(AtomicBool::new(false)),
            #[cfg(feature = "postgres")]
            announce: None,
        }
    }

    /// With the in-process cache on a PostgreSQL that several instances share: every
    /// removal is announced to all of them (`NOTIFY`), and each drops its own copy
    /// (`LISTEN`, on a connection of its own to `url`), so that a logout, a deletion or a
    /// role change made through one instance is seen by every instance on its next
    /// request. While that connection is lost, and when it is back, this instance drops
    /// every entry it holds: removals may have been missed meanwhile.
    #[cfg(feature = "postgres")]
    pub fn announce_removals(&mut self, pool: sqlx::AnyPool, url: &str) {
        self.announce = Some(pool);
        let store = self.store.clone();
        let url = url.to_owned();
        tokio::spawn(async move {
            let mut listening = None;
            loop {
                let listener = match listening.as_mut() {
                    Some(listener) => listener,
                    None => match subscribe(&url).await {
                        Ok(listener) => listening.insert(listener),
                        Err(error) => {
                            tracing::warn!(%error, "cache removals: cannot listen; retrying");
                            store.forget_all();
                            tokio::time::sleep(Duration::from_secs(1)).await;
                            continue;
                        }
                    },
                };
                match listener.try_recv().await {
                    Ok(Some(removal)) => {
                        let _ = store.delete(removal.payload()).await;
                    }
                    // The connection was lost (and is made again on the next call).
                    Ok(None) => store.forget_all(),
                    Err(error) => {
                        tracing::warn!(%error, "cache removals: listening failed; retrying");
                        store.forget_all();
                        listening = None;
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        });
    }

    /// `memory` or `redis`.
    pub fn kind(&self) -> &'static str {
        self.store.kind()
    }

    /// `module`'s namespace.
    pub fn for_module(&self, module: &'static str) -> ModuleCache {
        ModuleCache {
            cache: self.clone(),
            namespace: Arc::from(format!("{}:{module}:", self.prefix)),
            module,
            hits: metrics::counter!(CACHE_HITS_TOTAL, "module" => module),
            misses: metrics::counter!(CACHE_MISSES_TOTAL, "module" => module),
        }
    }

    /// Whether the last operation failed.
    pub fn is_degraded(&self) -> bool {
        self.down.load(Ordering::Relaxed)
    }

    /// The readiness probe: a failing cache is degraded, never down.
    pub async fn ping(&self) -> CheckOutcome {
        match self.store.ping().await {
            Ok(()) => {
                self.record_ok();
                CheckOutcome::up()
            }
            Err(error) => {
                self.record_error("ping", &error);
                CheckOutcome::degraded(format!("{error}; requests fall back to the database"))
            }
        }
    }

    fn record_ok(&self) {
        if self.down.load(Ordering::Relaxed) && self.down.swap(false, Ordering::Relaxed) {
            metrics::gauge!(CACHE_UP).set(1.0);
            tracing::info!(kind = self.store.kind(), "cache available again");
        }
    }

    fn record_error(&self, operation: &'static str, error: &CacheError) {
        if matches!(error, CacheError::NotAnInteger) {
            // The store answered: a caller's mistake, not an outage.
            return;
        }
        metrics::counter!(CACHE_ERRORS_TOTAL, "operation" => operation).increment(1);
        if !self.down.swap(true, Ordering::Relaxed) {
            metrics::gauge!(CACHE_UP).set(0.0);
            tracing::warn!(
                kind = self.store.kind(),
                %error,
                "cache unavailable; falling back to the database until it returns"
            );
        }
    }
}

/// The channel removals are announced on.
#[cfg(feature = "postgres")]
const REMOVALS: &str = "trellis_cache_removals";

#[cfg(feature = "postgres")]
async fn subscribe(url: &str) -> Result<sqlx::postgres::PgListener, sqlx::Error> {
    let mut listener = sqlx::postgres::PgListener::connect(url).await?;
    listener.listen(REMOVALS).await?;
    Ok(listener)
}

/// A module's namespace in the cache.
#[derive(Debug, Clone)]
pub struct ModuleCache {
    cache: Cache,
    namespace: Arc<str>,
    module: &'static str,
    hits: metrics::Counter,
    misses: metrics::Counter,
}

impl ModuleCache {
    fn key(&self, key: &str) -> String {
        let mut full = String::with_capacity(self.namespace.len() + key.len());
        full.push_str(&self.namespace);
        full.push_str(key);
        full
    }

    /// The span of one call, with traces on.
    fn span(&self, operation: &'static str) -> tracing::Span {
        crate::trace_span!(
            "cache",
            otel.name = format!("cache {operation}"),
            otel.kind = "client",
            cache.system = self.cache.kind(),
            cache.operation = operation,
            module = self.module,
        )
    }

    /// The cached bytes; a failure is a miss.
    pub async fn get(&self, key: &str) -> Option<Vec<u8>> {
        let key = self.key(key);
        match self
            .cache
            .store
            .get(&key)
            .in_trace(self.span(op::GET))
            .await
        {
            Ok(Some(value)) => {
                self.cache.record_ok();
                self.hits.increment(1);
                Some(value)
            }
            Ok(None) => {
                self.cache.record_ok();
                self.misses.increment(1);
                None
            }
            Err(error) => {
                self.cache.record_error(op::GET, &error);
                self.misses.increment(1);
                None
            }
        }
    }

    /// Stores bytes for `ttl`; a failure is logged once per outage and otherwise ignored.
    pub async fn set(&self, key: &str, value: Vec<u8>, ttl: Duration) {
        let key = self.key(key);
        let stored = self.cache.store.set(&key, value, ttl);
        match stored.in_trace(self.span(op::SET)).await {
            Ok(()) => self.cache.record_ok(),
            Err(error) => self.cache.record_error(op::SET, &error),
        }
    }

    /// The cached value decoded from JSON; a failure or an undecodable value is a miss.
    pub async fn get_json<T: DeserializeOwned>(&self, key: &str) -> Option<T> {
        let bytes = self.get(key).await?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Stores `value` as JSON for `ttl`.
    pub async fn set_json<T: Serialize>(&self, key: &str, value: &T, ttl: Duration) {
        if let Ok(bytes) = serde_json::to_vec(value) {
            self.set(key, bytes, ttl).await;
        }
    }

    /// The value under `key`, else what `load` finds, which is then cached for `ttl`.
    /// A failed or undecodable read is a miss; a `load` error is returned and nothing is
    /// cached. For entries that every change to the underlying row removes.
    pub async fn read_through<T, E, F, Fut>(
        &self,
        key: &str,
        ttl: Duration,
        load: F,
    ) -> Result<Option<T>, E>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Option<T>, E>>,
    {
        if let Some(hit) = self.get_json(key).await {
            return Ok(Some(hit));
        }
        let loaded = load().await?;
        if let Some(value) = &loaded {
            self.set_json(key, value, ttl).await;
        }
        Ok(loaded)
    }

    /// Removes the key. The error is returned: a caller invalidating an entry may need to
    /// know that the stale value could not be removed.
    pub async fn delete(&self, key: &str) -> Result<(), CacheError> {
        let key = self.key(key);
        let result = self
            .cache
            .store
            .delete(&key)
            .in_trace(self.span(op::DELETE))
            .await;
        match &result {
            Ok(()) => self.cache.record_ok(),
            Err(error) => self.cache.record_error(op::DELETE, error),
        }
        #[cfg(feature = "postgres")]
        if let Some(pool) = &self.cache.announce {
            let announced = sqlx::query("SELECT pg_notify($1, $2)")
                .bind(REMOVALS)
                .bind(&key)
                .execute(pool)
                .await;
            if let Err(error) = announced {
                // The other instances keep their copy until it expires.
                return Err(CacheError::Unavailable(format!(
                    "the removal could not be announced to the other instances: {error}"
                )));
            }
        }
        result
    }

    /// Adds `by` atomically; a new counter expires after `ttl` (a fixed window, as rate
    /// limits need). The error is returned so the caller decides whether to fail open.
    pub async fn incr(&self, key: &str, by: i64, ttl: Duration) -> Result<i64, CacheError> {
        let result = self
            .cache
            .store
            .incr(&self.key(key), by, ttl)
            .in_trace(self.span(op::INCR))
            .await;
        match &result {
            Ok(_) => self.cache.record_ok(),
            Err(error) => self.cache.record_error(op::INCR, error),
        }
        result
    }
}

impl ModuleCache {
    /// Counts one attempt under `key` in a fixed window; `Err(seconds to wait)` once more
    /// than `limit` were counted. When the cache is down it fails open (the failure is
    /// logged and counted by the cache): locking every client out would be worse.
    pub async fn throttle(&self, key: &str, limit: i64, window: Duration) -> Result<(), u64> {
        match self.incr(key, 1, window).await {
            Ok(count) if count > limit => Err(window.as_secs().max(1)),
            _ => Ok(()),
        }
    }

    /// Takes `cost` tokens from the bucket under `key`, refilled at `rate` tokens a
    /// second up to `burst`; `Err(seconds to wait)` when it has fewer (nothing is taken
    /// then). Shared by every instance when the cache is Redis (timed by Redis's clock).
    /// When the cache is down it fails open, as [`Self::throttle`] does.
    pub async fn take(&self, key: &str, cost: u64, rate: u32, burst: u64) -> Result<(), u64> {
        let interval = Duration::from_secs(1) / rate.max(1);
        let result = self
            .cache
            .store
            .take(&self.key(key), cost, interval, burst)
            .in_trace(self.span(op::TAKE))
            .await;
        match result {
            Ok(None) => {
                self.cache.record_ok();
                Ok(())
            }
            Ok(Some(wait)) => {
                self.cache.record_ok();
                Err(wait.as_secs() + u64::from(wait.subsec_nanos() > 0))
            }
            Err(error) => {
                self.cache.record_error(op::TAKE, &error);
                Ok(())
            }
        }
    }

    /// The attempts counted under `key` in the current window (0 when the cache is down).
    pub async fn counted(&self, key: &str, window: Duration) -> i64 {
        self.incr(key, 0, window).await.unwrap_or(0)
    }
}

/// An in-process entry with its own deadline.
#[derive(Clone)]
struct Entry {
    value: Arc<[u8]>,
    expires_at: Instant,
}

struct EntryExpiry;

impl moka::Expiry<String, Entry> for EntryExpiry {
    fn expire_after_create(&self, _: &String, entry: &Entry, now: Instant) -> Option<Duration> {
        Some(entry.expires_at.saturating_duration_since(now))
    }

    fn expire_after_update(
        &self,
        _: &String,
        entry: &Entry,
        now: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(entry.expires_at.saturating_duration_since(now))
    }
}

/// The in-process store (moka), bounded by entry count.
pub struct MemoryStore {
    entries: moka::future::Cache<String, Entry>,
}

impl MemoryStore {
    /// A store holding at most `capacity` entries.
    pub fn new(capacity: u64) -> Self {
        Self {
            entries: moka::future::Cache::builder()
                .max_capacity(capacity)
                .expire_after(EntryExpiry)
                .build(),
        }
    }
}

impl CacheStore for MemoryStore {
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Vec<u8>>, CacheError>> {
        Box::pin(async move {
            Ok(self
                .entries
                .get(key)
                .await
                .filter(|e| e.expires_at > Instant::now())
                .map(|e| e.value.to_vec()))
        })
    }

    fn set<'a>(
        &'a self,
        key: &'a str,
        value: Vec<u8>,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<(), CacheError>> {
        Box::pin(async move {
            let entry = Entry {
                value: Arc::from(value),
                expires_at: Instant::now() + ttl,
            };
            self.entries.insert(key.to_owned(), entry).await;
            Ok(())
        })
    }

    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), CacheError>> {
        Box::pin(async move {
            self.entries.invalidate(key).await;
            Ok(())
        })
    }

    fn incr<'a>(
        &'a self,
        key: &'a str,
        by: i64,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<i64, CacheError>> {
        Box::pin(async move {
            let mut outcome = Ok(0);
            self.entries
                .entry(key.to_owned())
                .and_compute_with(|current| {
                    let now = Instant::now();
                    let (base, expires_at) = match current.map(moka::Entry::into_value) {
                        Some(entry) if entry.expires_at > now => {
                            let parsed = std::str::from_utf8(&entry.value)
                                .ok()
                                .and_then(|s| s.parse::<i64>().ok());
                            match parsed {
                                Some(n) => (n, entry.expires_at),
                                None => {
                                    outcome = Err(CacheError::NotAnInteger);
                                    return std::future::ready(moka::ops::compute::Op::Nop);
                                }
                            }
                        }
                        _ => (0, now + ttl),
                    };
                    let next = base.saturating_add(by);
                    outcome = Ok(next);
                    std::future::ready(moka::ops::compute::Op::Put(Entry {
                        value: Arc::from(next.to_string().into_bytes()),
                        expires_at,
                    }))
                })
                .await;
            outcome
        })
    }

    fn take<'a>(
        &'a self,
        key: &'a str,
        cost: u64,
        interval: Duration,
        burst: u64,
    ) -> BoxFuture<'a, Result<Option<Duration>, CacheError>> {
        Box::pin(async move {
            let mut wait = None;
            self.entries
                .entry(key.to_owned())
                .and_compute_with(|current| {
                    let now = Instant::now();
                    // The bucket is the time it will be full again (its entry's deadline).
                    let full_at = current
                        .map(|entry| entry.into_value().expires_at)
                        .filter(|at| *at > now)
                        .unwrap_or(now);
                    let op = match gcra(full_at.duration_since(now), cost, interval, burst) {
                        Ok(full_in) => moka::ops::compute::Op::Put(Entry {
                            value: Arc::from(Vec::new()),
                            expires_at: now + full_in,
                        }),
                        Err(until) => {
                            wait = Some(until);
                            moka::ops::compute::Op::Nop
                        }
                    };
                    std::future::ready(op)
                })
                .await;
            Ok(wait)
        })
    }

    fn ping(&self) -> BoxFuture<'_, Result<(), CacheError>> {
        Box::pin(async { Ok(()) })
    }

    fn forget_all(&self) {
        self.entries.invalidate_all();
    }

    fn kind(&self) -> &'static str {
        "memory"
    }
}

/// The generic cell rate algorithm: a bucket that is full `full_in` from now, asked for
/// `cost` tokens at one per `interval` with at most `burst` saved up. `Ok(when it will be
/// full again)` when the tokens are taken, `Err(how long until they could be)` when not.
pub(super) fn gcra(
    full_in: Duration,
    cost: u64,
    interval: Duration,
    burst: u64,
) -> Result<Duration, Duration> {
    let times = |n: u64| interval.saturating_mul(u32::try_from(n).unwrap_or(u32::MAX));
    let after = full_in.saturating_add(times(cost));
    match after.checked_sub(times(burst)) {
        Some(wait) if !wait.is_zero() => Err(wait),
        _ => Ok(after),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memory() -> Cache {
        Cache::with_store(Arc::new(MemoryStore::new(1_000)), "t")
    }

    #[tokio::test]
    async fn values_expire_and_modules_do_not_see_each_other() {
        let cache = memory();
        let a = cache.for_module("a");
        let b = cache.for_module("b");
        a.set("k", b"1".to_vec(), Duration::from_millis(80)).await;
        assert_eq!(a.get("k").await.as_deref(), Some(&b"1"[..]));
        assert_eq!(b.get("k").await, None, "namespaced per module");
        tokio::time::sleep(Duration::from_millis(120)).await;
        assert_eq!(a.get("k").await, None, "expired");
    }

    #[tokio::test]
    async fn json_round_trips_and_delete_removes() {
        let cache = memory().for_module("m");
        cache
            .set_json("k", &vec![1, 2, 3], Duration::from_secs(5))
            .await;
        assert_eq!(cache.get_json::<Vec<i32>>("k").await, Some(vec![1, 2, 3]));
        cache.delete("k").await.expect("deleted");
        assert_eq!(cache.get_json::<Vec<i32>>("k").await, None);
    }

    #[tokio::test]
    async fn incr_counts_atomically_within_a_fixed_window() {
        let cache = memory().for_module("m");
        let ttl = Duration::from_millis(150);
        let tasks: Vec<_> = (0..50)
            .map(|_| {
                let cache = cache.clone();
                tokio::spawn(async move { cache.incr("hits", 1, ttl).await })
            })
            .collect();
        for task in tasks {
            task.await.expect("task").expect("incr");
        }
        assert_eq!(cache.incr("hits", 0, ttl).await.expect("read"), 50);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(cache.incr("hits", 1, ttl).await.expect("new window"), 1);
        cache.set("text", b"x".to_vec(), ttl).await;
        assert!(matches!(
            cache.incr("text", 1, ttl).await,
            Err(CacheError::NotAnInteger)
        ));
    }

    #[test]
    fn the_cell_rate_algorithm_spends_the_burst_then_meters() {
        let second = Duration::from_secs(1);
        // An empty (full) bucket of 10, one token a second: 10 now, then one a second.
        assert_eq!(gcra(Duration::ZERO, 10, second, 10), Ok(10 * second));
        assert_eq!(gcra(10 * second, 1, second, 10), Err(second));
        assert_eq!(gcra(9 * second, 1, second, 10), Ok(10 * second));
        assert_eq!(gcra(Duration::ZERO, 11, second, 10), Err(second));
    }

    #[tokio::test]
    async fn buckets_are_taken_from_whole_or_not_at_all_and_refill() {
        let cache = memory().for_module("m");
        // 100 a second, 10 saved up.
        assert_eq!(cache.take("k", 10, 100, 10).await, Ok(()));
        assert_eq!(cache.take("k", 5, 100, 10).await, Err(1));
        assert_eq!(cache.take("other", 10, 100, 10).await, Ok(()), "per key");
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert_eq!(
            cache.take("k", 5, 100, 10).await,
            Ok(()),
            "refilled at the rate"
        );
        assert_eq!(cache.take("k", 5, 100, 10).await, Err(1));
    }

    #[cfg(feature = "redis")]
    #[tokio::test]
    async fn an_unreachable_redis_is_a_miss_and_a_degraded_check() {
        let config = CacheConfig {
            url: "redis://127.0.0.1:1/0".into(),
            timeout_ms: 200,
            ..CacheConfig::default()
        };
        let cache = Cache::from_config(&config).expect("lazy pool");
        let module = cache.for_module("m");
        assert_eq!(module.get("k").await, None);
        module.set("k", b"v".to_vec(), Duration::from_secs(1)).await;
        assert!(module.incr("n", 1, Duration::from_secs(1)).await.is_err());
        assert!(cache.is_degraded());
        let outcome = cache.ping().await;
        assert_eq!(outcome.status, crate::readiness::CheckStatus::Degraded);
    }
}
