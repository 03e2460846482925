//! Timestamps as modules store them: Unix milliseconds in a `BIGINT`, which SQLite and
//! PostgreSQL read and compare alike.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Now, in Unix milliseconds.
pub fn now_millis() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or_default()
}

/// A stored timestamp back as a time (negative values clamp to the epoch).
pub fn from_millis(millis: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(u64::try_from(millis).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn millis_round_trip_and_clamp() {
        let now = now_millis();
        let back = from_millis(now)
            .duration_since(UNIX_EPOCH)
            .expect("after epoch");
        assert_eq!(i64::try_from(back.as_millis()).expect("fits"), now);
        assert_eq!(from_millis(-5), UNIX_EPOCH);
    }
}
