//! Time and ids: the wall clock in milliseconds and time-ordered unique ids.

use std::sync::Arc;

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

#[cfg(test)]
mod tests {
    use super::*;

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
