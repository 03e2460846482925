//! Exponential backoff, shared by the event relay's handler retries and the message
//! queue's resends.

/// `base_ms × 2^(attempt-1)`, at most `max_ms` (attempts count from 1).
pub(crate) fn exponential_ms(base_ms: u64, max_ms: u64, attempt: u32) -> u64 {
    let factor = 1u64 << (attempt.max(1) - 1).min(20);
    base_ms.saturating_mul(factor).min(max_ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap() {
        let waits: Vec<_> = (1..=5).map(|a| exponential_ms(100, 500, a)).collect();
        assert_eq!(waits, [100, 200, 400, 500, 500]);
        assert_eq!(exponential_ms(100, u64::MAX, 64), 100 << 20);
    }
}
