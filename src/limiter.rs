//! Token buckets: the per-user message limit, the per-address handshake rate and
//! the per-connection flood guard.
//!
//! Time is passed in (milliseconds), so the logic is pure and tests need no sleeps.
//! A keyed map is bounded whatever cleanup does: at capacity, full buckets (keys
//! idle long enough to have refilled) go first, then the least recently used.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Arc;

/// A bucket holding up to `burst` tokens, refilled at `per_minute` tokens a minute.
#[derive(Debug, Clone, Copy)]
pub struct Bucket {
    tokens: f64,
    updated_ms: i64,
}

impl Bucket {
    pub fn full(burst: u32, now_ms: i64) -> Bucket {
        Bucket {
            tokens: f64::from(burst),
            updated_ms: now_ms,
        }
    }

    fn refill(&mut self, burst: u32, per_minute: u32, now_ms: i64) {
        let elapsed = (now_ms - self.updated_ms).max(0) as f64;
        self.tokens =
            (self.tokens + elapsed * f64::from(per_minute) / 60_000.0).min(f64::from(burst));
        self.updated_ms = now_ms.max(self.updated_ms);
    }

    /// Takes a token, or says how many milliseconds until one is there.
    pub fn take(&mut self, burst: u32, per_minute: u32, now_ms: i64) -> Result<(), u64> {
        self.refill(burst, per_minute, now_ms);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            let missing = 1.0 - self.tokens;
            Err((missing * 60_000.0 / f64::from(per_minute.max(1))).ceil() as u64)
        }
    }

    /// Takes every whole token there is; how many.
    pub fn take_all(&mut self, burst: u32, per_minute: u32, now_ms: i64) -> u32 {
        self.refill(burst, per_minute, now_ms);
        let whole = self.tokens.floor();
        self.tokens -= whole;
        whole as u32
    }

    fn is_full(&self, burst: u32, per_minute: u32, now_ms: i64) -> bool {
        let mut b = *self;
        b.refill(burst, per_minute, now_ms);
        b.tokens >= f64::from(burst)
    }
}

/// The per-connection flood guard: frames of every kind drawn from a bucket whose
/// burst is the per-minute allowance. Tokens are taken in batches (all there are),
/// so counting a frame is a decrement; the clock is read once per batch. Taking
/// ahead changes nothing: frames in any window still never exceed what the bucket
/// gave.
#[derive(Debug, Clone, Copy)]
pub struct FrameGuard {
    bucket: Bucket,
    per_minute: u32,
    /// Frames already paid for.
    left: u32,
}

impl FrameGuard {
    pub fn new(per_minute: u32, now_ms: i64) -> FrameGuard {
        FrameGuard {
            bucket: Bucket::full(per_minute, now_ms),
            per_minute,
            left: 0,
        }
    }

    /// Counts one frame; `false` when the connection is over its allowance.
    /// `now_ms` is called only when the paid-for frames run out.
    #[inline]
    pub fn frame(&mut self, now_ms: impl FnOnce() -> i64) -> bool {
        if self.left == 0 {
            let rate = self.per_minute;
            self.left = self.bucket.take_all(rate, rate, now_ms());
            if self.left == 0 {
                return false;
            }
        }
        self.left -= 1;
        true
    }
}

/// Keyed token buckets of one core (users, client addresses), the map bounded.
pub struct Limiter<K = Arc<str>> {
    burst: u32,
    per_minute: u32,
    keys_max: usize,
    buckets: HashMap<K, Bucket>,
}

impl<K: Hash + Eq + Clone> Limiter<K> {
    /// Burst equals the per-minute allowance (the per-user message limit).
    pub fn new(per_minute: u32, keys_max: usize) -> Limiter<K> {
        Limiter::with_burst(per_minute, per_minute, keys_max)
    }

    pub fn with_burst(burst: u32, per_minute: u32, keys_max: usize) -> Limiter<K> {
        Limiter {
            burst,
            per_minute,
            keys_max: keys_max.max(1),
            buckets: HashMap::new(),
        }
    }

    /// Takes a token for `key`, or says how many milliseconds until one is there.
    pub fn check(&mut self, key: &K, now_ms: i64) -> Result<(), u64> {
        let (burst, rate) = (self.burst, self.per_minute);
        if !self.buckets.contains_key(key) && self.buckets.len() >= self.keys_max {
            self.make_room(now_ms);
        }
        self.buckets
            .entry(key.clone())
            .or_insert_with(|| Bucket::full(burst, now_ms))
            .take(burst, rate, now_ms)
    }

    /// Frees an eighth of the map at once, so a stream of new keys costs O(1)
    /// amortized instead of a full scan each (found with `cargo bench`).
    fn make_room(&mut self, now_ms: i64) {
        let (burst, rate) = (self.burst, self.per_minute);
        // A full bucket carries no information: dropping it changes nothing.
        self.buckets.retain(|_, b| !b.is_full(burst, rate, now_ms));
        let target = self.keys_max - (self.keys_max / 8).max(1);
        if self.buckets.len() > target {
            // Still too many: forget the least recently used (they get a fresh
            // burst when they come back).
            let excess = self.buckets.len() - target;
            let mut ages: Vec<(i64, K)> = self
                .buckets
                .iter()
                .map(|(k, b)| (b.updated_ms, k.clone()))
                .collect();
            ages.select_nth_unstable_by_key(excess - 1, |(t, _)| *t);
            for (_, k) in &ages[..excess] {
                self.buckets.remove(k);
            }
        }
    }

    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_frame_guard_pays_in_batches_and_never_exceeds_the_bucket() {
        let mut g = FrameGuard::new(60, 0); // burst 60, one a second
        let mut clock_reads = 0;
        for _ in 0..60 {
            assert!(g.frame(|| {
                clock_reads += 1;
                0
            }));
        }
        assert_eq!(clock_reads, 1, "one clock read for the whole burst");
        assert!(!g.frame(|| 999), "the 61st frame within the first second");
        assert!(g.frame(|| 1000), "one more a second later");
        assert!(!g.frame(|| 1000));
        assert!(
            g.frame(|| 3500) && g.frame(|| 3500),
            "2.5 s later: two more"
        );
        assert!(!g.frame(|| 3500));
        assert!(g.frame(|| 4000), "the half token left over counts");
    }

    #[test]
    fn burst_and_rate_can_differ_and_keys_are_generic() {
        let mut l: Limiter<u32> = Limiter::with_burst(2, 60, 10);
        l.check(&7, 0).unwrap();
        l.check(&7, 0).unwrap();
        assert_eq!(l.check(&7, 0), Err(1000));
        l.check(&8, 0).unwrap();
    }

    #[test]
    fn burst_equals_the_allowance_then_refills() {
        let mut l = Limiter::new(3, 100);
        let u: Arc<str> = "u".into();
        for _ in 0..3 {
            l.check(&u, 0).unwrap();
        }
        let wait = l.check(&u, 0).unwrap_err();
        assert_eq!(wait, 20_000, "one token every 20 s at 3/min");
        assert!(l.check(&u, 19_999).is_err());
        l.check(&u, 20_000).unwrap();
        assert!(l.check(&u, 20_000).is_err());
    }

    #[test]
    fn memory_stays_bounded_without_any_cleanup() {
        let mut l = Limiter::new(60, 1000);
        for i in 0..100_000 {
            let u: Arc<str> = format!("user-{i}").into();
            l.check(&u, i).unwrap();
        }
        assert!(l.len() <= 1000, "{}", l.len());
    }

    #[test]
    fn a_limited_user_is_not_forgotten_while_idle_users_are() {
        let mut l = Limiter::new(2, 2);
        let busy: Arc<str> = "busy".into();
        l.check(&"idle".into(), 0).unwrap();
        l.check(&busy, 10).unwrap();
        l.check(&busy, 10).unwrap();
        // Room for "new" is made by forgetting the least recently used: "idle".
        l.check(&"new".into(), 11).unwrap();
        assert!(
            l.check(&busy, 11).is_err(),
            "busy user keeps its empty bucket"
        );
        assert_eq!(l.len(), 2);
    }
}
