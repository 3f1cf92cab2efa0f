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

#[test]
fn the_demo_at_zero_delay_waits_for_no_timer() {
    // A runtime without a timer: a 0 ms sleep would panic here ("timer not
    // enabled") and, with one, wait for the wheel's next tick on every chunk.
    let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
        .build()
        .expect("runtime");
    let flags = rt.block_on(async {
        let first = monoio::spawn(async {
            super::demo::pace(std::time::Duration::ZERO).await;
            "paced"
        });
        // The pace yields once: a task spawned after it runs in between.
        let second = monoio::spawn(async { "other" });
        (first.await, second.await)
    });
    assert_eq!(flags, ("paced", "other"));
}
