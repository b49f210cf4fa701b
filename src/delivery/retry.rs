//! What to do after one delivery attempt: the pure rules of Queued delivery.

use std::time::Duration;

/// Longest `Retry-After` a target can ask for; longer requests are capped.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(6 * 3600);

/// The verdict on one attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The target took it.
    Delivered,
    /// Try again later (timeouts, connection errors, 5xx, 408, 409, 429).
    Retry,
    /// The target refused it for good (other 3xx/4xx): a dead letter at once.
    Refused,
}

/// Classifies an attempt by its HTTP status (`None`: no answer at all).
pub fn classify(status: Option<u16>) -> Verdict {
    match status {
        Some(200..=299) => Verdict::Delivered,
        None | Some(408 | 409 | 429) | Some(500..=599) => Verdict::Retry,
        Some(_) => Verdict::Refused,
    }
}

/// The wait before the next attempt after `attempts` failed ones, or `None` when the
/// schedule is exhausted (the event becomes a dead letter). `jitter` in [0, 1) spreads the
/// wait by ±10%; a `Retry-After` longer than the schedule's wait is honoured up to
/// [`MAX_RETRY_AFTER`].
pub fn next_wait(
    schedule: &[Duration],
    attempts: u32,
    retry_after: Option<Duration>,
    jitter: f64,
) -> Option<Duration> {
    let base = *schedule.get(usize::try_from(attempts).ok()?.checked_sub(1)?)?;
    let spread = base.mul_f64(0.9 + 0.2 * jitter.clamp(0.0, 1.0));
    Some(match retry_after {
        Some(asked) => spread.max(asked.min(MAX_RETRY_AFTER)),
        None => spread,
    })
}

/// Parses a `Retry-After` header given in seconds (HTTP dates are ignored: targets behind
/// paynotify answer quickly or not at all).
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    value.trim().parse::<u64>().ok().map(Duration::from_secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses() {
        assert_eq!(classify(Some(204)), Verdict::Delivered);
        for retry in [None, Some(408), Some(409), Some(429), Some(500), Some(503)] {
            assert_eq!(classify(retry), Verdict::Retry, "{retry:?}");
        }
        for refused in [Some(301), Some(400), Some(401), Some(404), Some(422)] {
            assert_eq!(classify(refused), Verdict::Refused, "{refused:?}");
        }
    }

    #[test]
    fn schedule_jitter_and_retry_after() {
        let s = [Duration::from_secs(10), Duration::from_secs(100)];
        assert_eq!(next_wait(&s, 0, None, 0.5), None);
        assert_eq!(next_wait(&s, 1, None, 0.5), Some(Duration::from_secs(10)));
        assert_eq!(next_wait(&s, 1, None, 0.0), Some(Duration::from_secs(9)));
        assert_eq!(
            next_wait(&s, 2, None, 0.999_999).map(|d| d.as_secs()),
            Some(109)
        );
        assert_eq!(next_wait(&s, 3, None, 0.5), None, "exhausted: dead letter");
        assert_eq!(
            next_wait(&s, 1, Some(Duration::from_secs(60)), 0.5),
            Some(Duration::from_secs(60))
        );
        assert_eq!(
            next_wait(&s, 1, Some(Duration::from_secs(1)), 0.5),
            Some(Duration::from_secs(10))
        );
        assert_eq!(
            next_wait(&s, 1, Some(Duration::from_secs(999_999)), 0.5),
            Some(MAX_RETRY_AFTER)
        );
        assert_eq!(parse_retry_after(" 120 "), Some(Duration::from_secs(120)));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), None);
    }
}
