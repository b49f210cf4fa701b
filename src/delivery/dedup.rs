//! In-process deduplication of delivered notifications.
//!
//! The platforms re-send until they get a success answer, and WeChat may send the same
//! notification from several servers within seconds. An entry is kept for the retention
//! (at least 25 h) once every target accepted the event; a concurrent duplicate waits for
//! the first copy's outcome instead of being delivered twice. Memory is bounded: when the
//! cache is full the oldest entry goes first, and that is counted.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// What the caller must do with a notification.
pub enum Claim {
    /// Delivered before: answer success, deliver nothing.
    Duplicate,
    /// Another request is delivering it now: wait for its outcome.
    InFlight(watch::Receiver<Option<bool>>),
    /// Deliver it, then report through the guard.
    Owner(ClaimGuard),
}

struct Inner {
    done: HashMap<String, Instant>,
    order: VecDeque<(String, Instant)>,
    in_flight: HashMap<String, watch::Sender<Option<bool>>>,
}

/// The deduplication cache.
pub struct Dedup {
    inner: Arc<Mutex<Inner>>,
    retention: Duration,
    max_entries: usize,
}

/// Held by the request that delivers; dropping it without `finish` counts as a failure.
pub struct ClaimGuard {
    inner: Arc<Mutex<Inner>>,
    key: String,
    finished: bool,
    retention: Duration,
    max_entries: usize,
    evicted: usize,
}

fn lock(m: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    // A panic while holding the lock leaves plain maps behind, still consistent enough to
    // keep serving; deduplication is best effort on top of at-least-once delivery.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Dedup {
    /// A cache keeping entries for `retention`, at most `max_entries` of them.
    pub fn new(retention: Duration, max_entries: usize) -> Self {
        Dedup {
            inner: Arc::new(Mutex::new(Inner {
                done: HashMap::new(),
                order: VecDeque::new(),
                in_flight: HashMap::new(),
            })),
            retention,
            max_entries: max_entries.max(1),
        }
    }

    /// Claims `key` at `now`.
    pub fn claim(&self, key: &str, now: Instant) -> Claim {
        let mut inner = lock(&self.inner);
        expire(&mut inner, now, self.retention);
        if inner.done.contains_key(key) {
            return Claim::Duplicate;
        }
        if let Some(tx) = inner.in_flight.get(key) {
            return Claim::InFlight(tx.subscribe());
        }
        let (tx, _) = watch::channel(None);
        inner.in_flight.insert(key.to_string(), tx);
        Claim::Owner(ClaimGuard {
            inner: self.inner.clone(),
            key: key.to_string(),
            finished: false,
            retention: self.retention,
            max_entries: self.max_entries,
            evicted: 0,
        })
    }

    /// Entries currently remembered.
    pub fn len(&self) -> usize {
        lock(&self.inner).done.len()
    }

    /// True when nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn expire(inner: &mut Inner, now: Instant, retention: Duration) {
    while let Some((key, at)) = inner.order.front() {
        if now.saturating_duration_since(*at) < retention {
            break;
        }
        // Only drop the map entry if it is the one this queue slot recorded.
        if inner.done.get(key) == Some(at) {
            inner.done.remove(key);
        }
        inner.order.pop_front();
    }
}

impl ClaimGuard {
    /// Records the outcome at `now`; returns how many old entries were evicted for room.
    pub fn finish(mut self, delivered: bool, now: Instant) -> usize {
        self.complete(delivered, now);
        self.evicted
    }

    fn complete(&mut self, delivered: bool, now: Instant) {
        if self.finished {
            return;
        }
        self.finished = true;
        let mut inner = lock(&self.inner);
        if delivered {
            expire(&mut inner, now, self.retention);
            while inner.done.len() >= self.max_entries {
                let Some((key, at)) = inner.order.pop_front() else {
                    break;
                };
                if inner.done.get(&key) == Some(&at) {
                    inner.done.remove(&key);
                    self.evicted += 1;
                }
            }
            inner.done.insert(self.key.clone(), now);
            inner.order.push_back((self.key.clone(), now));
        }
        if let Some(tx) = inner.in_flight.remove(&self.key) {
            let _ = tx.send(Some(delivered));
        }
    }
}

impl Drop for ClaimGuard {
    fn drop(&mut self) {
        self.complete(false, Instant::now());
    }
}

/// Waits for the owner of an in-flight notification; true when it was delivered.
pub async fn wait(mut rx: watch::Receiver<Option<bool>>) -> bool {
    match rx.wait_for(Option::is_some).await {
        Ok(v) => v.unwrap_or(false),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(c: Claim) -> ClaimGuard {
        match c {
            Claim::Owner(g) => g,
            _ => panic!("expected owner"),
        }
    }

    #[test]
    fn delivered_entries_are_duplicates_until_retention_ends() {
        let d = Dedup::new(Duration::from_secs(100), 10);
        let t0 = Instant::now();
        owner(d.claim("a", t0)).finish(true, t0);
        assert!(matches!(
            d.claim("a", t0 + Duration::from_secs(99)),
            Claim::Duplicate
        ));
        assert!(matches!(
            d.claim("a", t0 + Duration::from_secs(100)),
            Claim::Owner(_)
        ));
        assert_eq!(d.len(), 0);
    }

    #[test]
    fn failures_are_not_remembered() {
        let d = Dedup::new(Duration::from_secs(100), 10);
        let t0 = Instant::now();
        owner(d.claim("a", t0)).finish(false, t0);
        assert!(matches!(d.claim("a", t0), Claim::Owner(_)));
    }

    #[test]
    fn memory_is_bounded_and_evictions_counted() {
        let d = Dedup::new(Duration::from_secs(100), 3);
        let t0 = Instant::now();
        let mut evicted = 0;
        for i in 0..5 {
            evicted += owner(d.claim(&i.to_string(), t0)).finish(true, t0);
        }
        assert_eq!((d.len(), evicted), (3, 2));
        assert!(matches!(d.claim("0", t0), Claim::Owner(_)));
        assert!(matches!(d.claim("4", t0), Claim::Duplicate));
    }

    #[tokio::test]
    async fn concurrent_duplicate_waits_for_the_owner() {
        let d = Dedup::new(Duration::from_secs(100), 10);
        let t0 = Instant::now();
        let guard = owner(d.claim("a", t0));
        let Claim::InFlight(rx) = d.claim("a", t0) else {
            panic!("expected in flight")
        };
        let waiter = tokio::spawn(wait(rx));
        guard.finish(true, t0);
        assert!(waiter.await.unwrap());
        let guard = owner(d.claim("b", t0));
        let Claim::InFlight(rx) = d.claim("b", t0) else {
            panic!("expected in flight")
        };
        drop(guard);
        assert!(!wait(rx).await);
    }
}
