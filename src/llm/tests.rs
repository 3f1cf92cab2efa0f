//! Unit tests of the provider task's retry policy.

use super::retry::RETRY_WAIT_MAX;
use super::*;

#[test]
fn backoff_grows_with_jitter_and_honours_retry_after() {
    for attempt in 0..4 {
        let cap = Duration::from_millis(200 << attempt);
        let b = backoff(attempt, None);
        assert!(b >= cap / 2 && b <= cap, "{b:?}");
    }
    assert_eq!(
        backoff(0, Some(Duration::from_secs(3))),
        Duration::from_secs(3)
    );
    assert_eq!(backoff(0, Some(Duration::from_secs(3600))), RETRY_WAIT_MAX);
}
