//! Token buckets: the per-user message limit and the per-connection flood guard.
//!
//! Time is passed in (milliseconds), so the logic is pure and tests need no sleeps.
//! The per-user map is bounded whatever cleanup does: at capacity, full buckets
//! (users idle long enough to have refilled) go first, then the least recently used.

use std::collections::HashMap;
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

    fn is_full(&self, burst: u32, per_minute: u32, now_ms: i64) -> bool {
        let mut b = *self;
        b.refill(burst, per_minute, now_ms);
        b.tokens >= f64::from(burst)
    }
}

/// Per-user message limiter of one core. Burst equals the per-minute allowance.
pub struct Limiter {
    per_minute: u32,
    users_max: usize,
    buckets: HashMap<Arc<str>, Bucket>,
}

impl Limiter {
    pub fn new(per_minute: u32, users_max: usize) -> Limiter {
        Limiter {
            per_minute,
            users_max: users_max.max(1),
            buckets: HashMap::new(),
        }
    }

    pub fn check(&mut self, user: &Arc<str>, now_ms: i64) -> Result<(), u64> {
        let (burst, rate) = (self.per_minute, self.per_minute);
        if !self.buckets.contains_key(user) && self.buckets.len() >= self.users_max {
            self.make_room(now_ms);
        }
        self.buckets
            .entry(user.clone())
            .or_insert_with(|| Bucket::full(burst, now_ms))
            .take(burst, rate, now_ms)
    }

    /// Frees an eighth of the map at once, so a stream of new users costs O(1)
    /// amortized instead of a full scan each (found with `cargo bench`).
    fn make_room(&mut self, now_ms: i64) {
        let (burst, rate) = (self.per_minute, self.per_minute);
        // A full bucket carries no information: dropping it changes nothing.
        self.buckets.retain(|_, b| !b.is_full(burst, rate, now_ms));
        let target = self.users_max - (self.users_max / 8).max(1);
        if self.buckets.len() > target {
            // Still too many: forget the least recently used (they get a fresh
            // burst when they come back).
            let excess = self.buckets.len() - target;
            let mut ages: Vec<(i64, Arc<str>)> = self
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
