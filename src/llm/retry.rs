//! When a provider's request is worth another try, and how long to wait first:
//! shared by the chat providers and speech-to-text, so both back off alike.

use std::time::Duration;

use super::ErrorKind;

/// Longest wait between retries, whatever Retry-After says.
pub const RETRY_WAIT_MAX: Duration = Duration::from_secs(10);

/// What an error status of a provider means: 429 and 5xx are worth a retry.
pub fn status_kind(status: reqwest::StatusCode) -> ErrorKind {
    match status.as_u16() {
        429 => ErrorKind::RateLimited,
        500..=599 => ErrorKind::ServerError,
        _ => ErrorKind::ClientError,
    }
}

/// The wait a `Retry-After` header (in seconds) asks for.
pub fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    headers
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok())
        .map(Duration::from_secs)
}

/// Exponential backoff with full jitter, or what Retry-After asked for (the
/// chat providers and speech-to-text alike).
pub fn backoff(attempt: u32, retry_after: Option<Duration>) -> Duration {
    const FIRST_WAIT: Duration = Duration::from_millis(200);
    match retry_after {
        Some(wait) => wait.min(RETRY_WAIT_MAX),
        None => crate::clock::backoff(FIRST_WAIT, attempt.min(6), RETRY_WAIT_MAX),
    }
}
