//! The cache contract on whichever store the run selected: the in-process store, or Redis
//! when `TEST_REDIS_URL` is set.

use std::time::Duration;

use trellis_core::{
    config::CacheConfig,
    storage::{Cache, CacheError},
};

fn cache() -> Cache {
    let config = CacheConfig {
        url: std::env::var("TEST_REDIS_URL").unwrap_or_default().into(),
        prefix: format!("t-{}", uuid::Uuid::new_v4().simple()),
        ..CacheConfig::default()
    };
    Cache::from_config(&config).expect("cache")
}

#[tokio::test]
async fn values_expire_are_deleted_and_stay_in_their_module() {
    let cache = cache();
    let (a, b) = (cache.for_module("a"), cache.for_module("b"));
    a.set("k", b"v".to_vec(), Duration::from_millis(300)).await;
    assert_eq!(
        a.get("k").await.as_deref(),
        Some(&b"v"[..]),
        "{}",
        cache.kind()
    );
    assert_eq!(b.get("k").await, None, "namespaced per module");
    tokio::time::sleep(Duration::from_millis(450)).await;
    assert_eq!(a.get("k").await, None, "expired");

    a.set_json("j", &[1, 2], Duration::from_secs(5)).await;
    assert_eq!(a.get_json::<Vec<u8>>("j").await, Some(vec![1, 2]));
    a.delete("j").await.expect("delete");
    assert_eq!(a.get("j").await, None);
}

#[tokio::test]
async fn incr_is_atomic_and_windows_expire() {
    let cache = cache().for_module("limits");
    let window = Duration::from_millis(600);
    let tasks: Vec<_> = (0..40)
        .map(|_| {
            let cache = cache.clone();
            tokio::spawn(async move { cache.incr("login:alice", 1, window).await })
        })
        .collect();
    let mut seen = Vec::new();
    for task in tasks {
        seen.push(task.await.expect("task").expect("incr"));
    }
    seen.sort_unstable();
    assert_eq!(
        seen,
        (1..=40).collect::<Vec<i64>>(),
        "every increment is counted once"
    );
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        cache.incr("login:alice", 1, window).await.expect("incr"),
        1,
        "new window"
    );

    cache.set("text", b"x".to_vec(), window).await;
    let err = cache
        .incr("text", 1, window)
        .await
        .expect_err("not a number");
    assert!(matches!(err, CacheError::NotAnInteger), "{err}");
}
