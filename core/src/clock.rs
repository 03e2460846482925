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

/// How every response writes a time: RFC 3339 in UTC, documented as `format: date-time`.
pub type Timestamp = time::OffsetDateTime;

/// A stored timestamp as a response writes it.
pub fn timestamp(millis: i64) -> Timestamp {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(millis) * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
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

    #[test]
    fn timestamps_are_written_in_rfc3339_utc() {
        let written = timestamp(1_764_660_505_176)
            .format(&time::format_description::well_known::Rfc3339)
            .expect("formats");
        assert_eq!(written, "2025-12-02T07:28:25.176Z");
    }
}
