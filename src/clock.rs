//! Time and ids: the wall clock in milliseconds, time-ordered unique ids, and how
//! long to wait before trying again.

use std::sync::Arc;
use std::time::Duration;

/// Milliseconds since the Unix epoch.
pub type Millis = i64;

/// Wall-clock milliseconds; the one place the crate reads the time of day.
pub fn now_ms() -> Millis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as Millis)
}

/// Wall-clock seconds (JWT `exp` and `iat`).
pub fn now_secs() -> u64 {
    (now_ms() / 1000).max(0) as u64
}

/// A new id: `prefix`, the time in milliseconds, then 64 random bits. Time first,
/// so ids created together sort together and the store's indexes grow at one end
/// instead of at random pages (random ids made index page reads the store's top
/// cost).
pub fn new_id(prefix: &str) -> Arc<str> {
    let random = hex::encode(rand::random::<[u8; 8]>());
    format!("{prefix}_{:012x}{random}", now_ms()).into()
}

/// Exponential backoff with jitter: `base` x 2^`doublings`, drawn from the upper
/// half of that (so retries of many clients spread out), never above `max`.
pub fn backoff(base: Duration, doublings: u32, max: Duration) -> Duration {
    let exp = base.saturating_mul(1 << doublings.min(20));
    exp.mul_f64(0.5 + rand::random::<f64>() / 2.0).min(max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_and_stays_under_its_cap() {
        let base = Duration::from_millis(100);
        for doublings in 0..5 {
            let full = base * (1 << doublings);
            let b = backoff(base, doublings, Duration::from_secs(60));
            assert!(b >= full / 2 && b <= full, "{b:?} for {doublings}");
        }
        assert_eq!(
            backoff(base, 40, Duration::from_secs(1)),
            Duration::from_secs(1)
        );
    }

    #[test]
    fn ids_are_unique_and_sort_by_time() {
        let a = new_id("m");
        let b = new_id("m");
        assert_ne!(a, b);
        assert!(a.starts_with("m_") && a.len() == 2 + 12 + 16);
        // The time part of a later id is never smaller.
        assert!(a[2..14] <= b[2..14]);
    }
}
