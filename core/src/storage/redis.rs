//! The Redis cache store (cargo feature `redis`).

use std::time::Duration;

use futures_util::future::BoxFuture;

use super::cache::{CacheError, CacheStore};
use crate::config::CacheConfig;

/// Redis through one multiplexed connection (redis-rs's `ConnectionManager`, which
/// reconnects by itself), with Redis's server-assisted client-side caching when
/// `cache.near_entries` is above 0: a value read is kept in this process, and Redis tells
/// every instance holding it the moment any instance changes or deletes the key (RESP3
/// invalidation pushes). Reads of unchanged entries then cost no round trip, and a
/// revocation on one instance is seen by every instance on its next request. A lost
/// connection drops every near entry (the reconnection starts a new cache epoch).
pub struct RedisStore {
    conn: redis::aio::ConnectionManager,
    timeout: Duration,
    incr_script: redis::Script,
    take_script: redis::Script,
}

impl RedisStore {
    /// A connection to `config.url`, made on first use.
    pub fn new(config: &CacheConfig) -> anyhow::Result<Self> {
        let bad =
            |e: redis::RedisError| anyhow::anyhow!("`cache.url` `{}`: {e}", config.url.redacted());
        let timeout = Duration::from_millis(config.timeout_ms);
        let mut info =
            redis::IntoConnectionInfo::into_connection_info(config.url.expose()).map_err(bad)?;
        let mut manager = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(2);
        if let Some(entries) = std::num::NonZeroUsize::new(config.near_entries) {
            let settings = info
                .redis_settings()
                .clone()
                .set_protocol(redis::ProtocolVersion::RESP3);
            info = info.set_redis_settings(settings);
            manager = manager.set_cache_config(
                redis::caching::CacheConfig::new()
                    .set_mode(redis::caching::CacheMode::OptIn)
                    .set_size(entries),
            );
        }
        let client = redis::Client::open(info).map_err(bad)?;
        let conn =
            redis::aio::ConnectionManager::new_lazy_with_config(client, manager).map_err(bad)?;
        Ok(Self {
            conn,
            timeout,
            // INCRBY, and start the window's expiry when the counter is new.
            incr_script: redis::Script::new(
                "local v = redis.call('INCRBY', KEYS[1], ARGV[1]) \
                 if v == tonumber(ARGV[1]) then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end \
                 return v",
            ),
            // The bucket as the time (Redis's, in microseconds) it will be full again;
            // answers the microseconds to wait, 0 when the tokens were taken.
            take_script: redis::Script::new(
                "local t = redis.call('TIME') \
                 local now = tonumber(t[1]) * 1000000 + tonumber(t[2]) \
                 local cost, interval, burst = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]) \
                 local full = math.max(tonumber(redis.call('GET', KEYS[1]) or now), now) \
                 local after = full + cost * interval \
                 local wait = after - burst * interval - now \
                 if wait > 0 then return math.ceil(wait) end \
                 redis.call('SET', KEYS[1], string.format('%.0f', after), 'PX', math.ceil((after - now) / 1000) + 1) \
                 return 0",
            ),
        })
    }

    async fn run<T, F, Fut>(&self, op: F) -> Result<T, CacheError>
    where
        F: FnOnce(redis::aio::ConnectionManager) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let work = async {
            op(self.conn.clone()).await.map_err(|e| {
                // The server answered with an error about the value: not an outage.
                if e.to_string().contains("not an integer") {
                    CacheError::NotAnInteger
                } else {
                    CacheError::Unavailable(e.to_string())
                }
            })
        };
        tokio::time::timeout(self.timeout, work)
            .await
            .unwrap_or_else(|_| Err(CacheError::Timeout(self.timeout.as_millis() as u64)))
    }
}

fn ttl_millis(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1)
}

impl CacheStore for RedisStore {
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Vec<u8>>, CacheError>> {
        Box::pin(self.run(move |mut conn| async move {
            let mut get = redis::cmd("GET");
            get.arg(key)
                .set_cache_config(redis::CommandCacheConfig::new().set_enable_cache(true));
            get.query_async(&mut conn).await
        }))
    }

    fn set<'a>(
        &'a self,
        key: &'a str,
        value: Vec<u8>,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<(), CacheError>> {
        Box::pin(self.run(move |mut conn| async move {
            redis::cmd("SET")
                .arg(key)
                .arg(value)
                .arg("PX")
                .arg(ttl_millis(ttl))
                .query_async(&mut conn)
                .await
        }))
    }

    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), CacheError>> {
        Box::pin(self.run(move |mut conn| async move {
            redis::cmd("DEL").arg(key).query_async(&mut conn).await
        }))
    }

    fn incr<'a>(
        &'a self,
        key: &'a str,
        by: i64,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<i64, CacheError>> {
        Box::pin(self.run(move |mut conn| async move {
            self.incr_script
                .key(key)
                .arg(by)
                .arg(ttl_millis(ttl))
                .invoke_async(&mut conn)
                .await
        }))
    }

    fn take<'a>(
        &'a self,
        key: &'a str,
        cost: u64,
        interval: Duration,
        burst: u64,
    ) -> BoxFuture<'a, Result<Option<Duration>, CacheError>> {
        let micros = |d: Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        Box::pin(self.run(move |mut conn| async move {
            let wait_us: u64 = self
                .take_script
                .key(key)
                .arg(cost)
                .arg(micros(interval).max(1))
                .arg(burst)
                .invoke_async(&mut conn)
                .await?;
            Ok((wait_us > 0).then(|| Duration::from_micros(wait_us)))
        }))
    }

    fn ping(&self) -> BoxFuture<'_, Result<(), CacheError>> {
        Box::pin(self.run(|mut conn| async move {
            redis::cmd("PING")
                .query_async::<String>(&mut conn)
                .await
                .map(|_| ())
        }))
    }

    fn kind(&self) -> &'static str {
        "redis"
    }
}
