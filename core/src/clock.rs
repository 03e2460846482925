//! Time as modules read and store it: a [`Clock`] from the module's context (the
//! system's, or a [`ManualClock`] a test moves by hand), and timestamps stored as Unix
//! milliseconds in a `BIGINT`, which SQLite and PostgreSQL read and compare alike.

use std::{
    sync::{
        Arc,
        atomic::{AtomicI64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

/// The time a module reads ([`ModuleContext::clock`](crate::ModuleContext::clock)): the
/// system's, or a test's [`ManualClock`]. Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct Clock(Option<Arc<AtomicI64>>);

impl Clock {
    /// The system's clock.
    pub fn system() -> Self {
        Self(None)
    }

    /// Now, in Unix milliseconds.
    pub fn now_millis(&self) -> i64 {
        match &self.0 {
            None => now_millis(),
            Some(millis) => millis.load(Ordering::Relaxed),
        }
    }

    /// Now, in whole Unix seconds.
    pub fn now_secs(&self) -> u64 {
        u64::try_from(self.now_millis() / 1000).unwrap_or_default()
    }
}

/// A clock that moves only when told to, for tests of expiry and lockout rules: give
/// [`ManualClock::clock`] to the server, then [`ManualClock::advance`] it.
#[derive(Clone, Debug)]
pub struct ManualClock(Arc<AtomicI64>);

impl ManualClock {
    /// Stopped at the system's now.
    pub fn new() -> Self {
        Self::at(now_millis())
    }

    /// Stopped at `millis` (Unix milliseconds).
    pub fn at(millis: i64) -> Self {
        Self(Arc::new(AtomicI64::new(millis)))
    }

    /// The [`Clock`] that reads this one.
    pub fn clock(&self) -> Clock {
        Clock(Some(self.0.clone()))
    }

    /// Moves the time forward by `by`.
    pub fn advance(&self, by: Duration) {
        let by = i64::try_from(by.as_millis()).unwrap_or(i64::MAX);
        self.0.fetch_add(by, Ordering::Relaxed);
    }

    /// Now, in Unix milliseconds.
    pub fn now_millis(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

impl Default for ManualClock {
    fn default() -> Self {
        Self::new()
    }
}

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
    fn a_manual_clock_moves_only_when_advanced() {
        let manual = ManualClock::at(1_000);
        let clock = manual.clock();
        assert_eq!(clock.now_millis(), 1_000);
        manual.advance(Duration::from_millis(2_500));
        assert_eq!(clock.now_millis(), 3_500);
        assert_eq!(clock.now_secs(), 3);
        let system = Clock::system().now_millis();
        assert!(
            (system - now_millis()).abs() < 1_000,
            "the system clock reads now"
        );
    }

    #[test]
    fn timestamps_are_written_in_rfc3339_utc() {
        let written = timestamp(1_764_660_505_176)
            .format(&time::format_description::well_known::Rfc3339)
            .expect("formats");
        assert_eq!(written, "2025-12-02T07:28:25.176Z");
    }
}
