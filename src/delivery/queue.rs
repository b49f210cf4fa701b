//! Queued delivery: the ack path stores the event durably and answers the platform; the
//! dispatcher then owns delivery — due deliveries, one attempt each, retries on the route's
//! schedule, dead letters after the last attempt — and keeps the backlog metrics current.

use super::jetstream::JetStream;
use super::retry::{self, Verdict};
use super::store::{
    Appended, AttemptOutcome, AttemptRecord, EventView, NewEvent, NextState, Selector, Store,
    StoreError,
};
use crate::ingress::Ingress;
use bytes::Bytes;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Notify, Semaphore};

/// Attempts running at once.
const CONCURRENCY: usize = 32;
/// Due deliveries fetched per round.
const BATCH: usize = 64;
/// A claimed delivery becomes due again after this long if its attempt never reports back;
/// claims left by a process that died are released when the next one starts.
const CLAIM: Duration = Duration::from_secs(90);
/// How often the dispatcher looks for due work when nothing wakes it (replays made by the
/// CLI in another process, retries coming due).
const IDLE_POLL: Duration = Duration::from_millis(250);
/// How often backlog metrics are refreshed and old events pruned.
const HOUSEKEEPING: Duration = Duration::from_secs(5);

/// Where Queued events are stored: one file on this machine, or a replicated NATS JetStream
/// stream shared by every ingress replica.
#[derive(Debug, Clone)]
pub enum Backend {
    /// The embedded SQLite store.
    Embedded(Store),
    /// NATS JetStream.
    JetStream(JetStream),
}

impl Backend {
    /// Stores a verified event durably (or finds it already stored).
    pub async fn append(&self, event: NewEvent) -> Result<Appended, StoreError> {
        match self {
            Backend::Embedded(store) => store.append(event).await,
            Backend::JetStream(js) => js.append(event).await,
        }
    }

    /// Re-queues the selected deliveries and counts them.
    pub async fn replay(&self, selector: Selector) -> Result<usize, StoreError> {
        match self {
            Backend::Embedded(store) => store.replay(selector, now_ms()).await,
            Backend::JetStream(js) => js.replay(selector).await,
        }
    }

    /// The selected events with their deliveries and attempts, newest first.
    pub async fn events(
        &self,
        selector: Selector,
        limit: usize,
    ) -> Result<Vec<EventView>, StoreError> {
        match self {
            Backend::Embedded(store) => store.events(selector, limit).await,
            Backend::JetStream(js) => js.events(selector, limit).await,
        }
    }
}

/// The store and the bell that wakes the dispatcher.
#[derive(Debug, Clone)]
pub struct Queue {
    /// The durable store.
    pub store: Backend,
    /// Rung after every append.
    pub wake: Arc<Notify>,
    /// Delivered events are kept (for dedup) this long.
    pub retention: Duration,
    /// Dead letters are kept this long.
    pub dead_letter_retention: Duration,
}

/// Unix milliseconds now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn jitter() -> f64 {
    let mut b = [0u8; 4];
    // Jitter only spreads retries; a failed draw falls back to the middle.
    if aws_lc_rs::rand::fill(&mut b).is_err() {
        return 0.5;
    }
    f64::from(u32::from_le_bytes(b)) / f64::from(u32::MAX)
}

/// Runs the dispatcher until the task is dropped.
pub async fn dispatch(ingress: Arc<Ingress>, queue: Queue) {
    match &queue.store {
        Backend::Embedded(store) => dispatch_embedded(ingress, store.clone(), queue).await,
        Backend::JetStream(js) => super::jetstream::dispatch(ingress, js.clone()).await,
    }
}

async fn dispatch_embedded(ingress: Arc<Ingress>, store: Store, queue: Queue) {
    match store.release_claims(now_ms()).await {
        Ok(0) => {}
        Ok(n) => tracing::info!(
            deliveries = n,
            "resuming deliveries interrupted by the last stop"
        ),
        Err(e) => {
            tracing::error!(error = %e, "cannot release old claims; they resume when they expire")
        }
    }
    let slots = Arc::new(Semaphore::new(CONCURRENCY));
    let mut last_housekeeping = tokio::time::Instant::now() - HOUSEKEEPING;
    loop {
        if last_housekeeping.elapsed() >= HOUSEKEEPING {
            housekeeping(&ingress, &store, &queue).await;
            last_housekeeping = tokio::time::Instant::now();
        }
        let due = match store.due(now_ms(), CLAIM, BATCH).await {
            Ok(due) => due,
            Err(e) => {
                ingress.metrics.store_errors.inc();
                tracing::error!(error = %e, "cannot read due deliveries");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let idle = due.is_empty();
        for delivery in due {
            let Ok(slot) = slots.clone().acquire_owned().await else {
                return;
            };
            let (ingress, store) = (ingress.clone(), store.clone());
            tokio::spawn(async move {
                attempt(&ingress, &store, delivery).await;
                drop(slot);
            });
        }
        if idle {
            let _ = tokio::time::timeout(IDLE_POLL, queue.wake.notified()).await;
        }
    }
}

async fn attempt(ingress: &Ingress, store: &Store, d: super::store::DueDelivery) {
    let tried = try_once(
        ingress,
        &d.route,
        &d.target,
        &d.event_id,
        Bytes::from(d.body),
        d.attempts,
    )
    .await;
    let record = AttemptRecord {
        seq: d.seq,
        target: d.target.clone(),
        outcome: tried,
    };
    if let Err(e) = store.record(record).await {
        // The claim expires and the delivery is attempted again: at least once.
        ingress.metrics.store_errors.inc();
        tracing::error!(error = %e, event_id = %d.event_id, "cannot record a delivery attempt");
    }
}

/// Makes attempt number `made + 1` of one delivery and decides what comes next: the
/// route's schedule (with jitter and `Retry-After`), an immediate dead letter for a refusal,
/// a dead letter after the last attempt. Counts retries and dead letters.
pub async fn try_once(
    ingress: &Ingress,
    route_name: &str,
    target_label: &str,
    event_id: &str,
    body: Bytes,
    made: u32,
) -> AttemptOutcome {
    let table = ingress.table();
    let at_ms = now_ms();
    let route = table.by_name(route_name);
    let target = route.and_then(|r| r.targets.iter().find(|t| t.label() == target_label));
    let tried = match (route, target) {
        (Some(route), Some(target)) => {
            let sent = ingress
                .forwarder
                .send(
                    route,
                    target,
                    event_id,
                    &body,
                    at_ms / 1000,
                    &ingress.metrics,
                )
                .await;
            let made = made + 1;
            let next = match retry::classify(sent.status) {
                Verdict::Delivered => NextState::Delivered,
                Verdict::Refused => NextState::Dead,
                Verdict::Retry => {
                    match retry::next_wait(&route.retry_schedule, made, sent.retry_after, jitter())
                    {
                        Some(wait) => NextState::RetryAt(at_ms + wait.as_millis() as i64),
                        None => NextState::Dead,
                    }
                }
            };
            AttemptOutcome {
                at_ms,
                status: sent.status,
                latency: sent.latency,
                response: sent.response,
                error: sent.error,
                next,
            }
        }
        // The route or target left the configuration: keep the event as a dead letter,
        // replayable once it is back.
        _ => AttemptOutcome {
            at_ms,
            status: None,
            latency: Duration::ZERO,
            response: String::new(),
            error: Some("route or target no longer configured".into()),
            next: NextState::Dead,
        },
    };
    match tried.next {
        NextState::RetryAt(_) => ingress
            .metrics
            .retries
            .with_label_values(&[route_name])
            .inc(),
        NextState::Dead => {
            ingress
                .metrics
                .dead_lettered
                .with_label_values(&[route_name])
                .inc();
            tracing::warn!(route = %route_name, target = %target_label, event_id = %event_id, "dead letter");
        }
        NextState::Delivered => {}
    }
    tried
}

/// Publishes a fresh set of backlog gauges (routes without backlog disappear).
pub fn set_backlog(ingress: &Ingress, stats: &[super::store::RouteStats]) {
    let m = &ingress.metrics;
    m.queue_depth.reset();
    m.queue_oldest_age.reset();
    m.dead_letters.reset();
    for s in stats {
        m.queue_depth
            .with_label_values(&[&s.route])
            .set(s.depth as i64);
        m.queue_oldest_age
            .with_label_values(&[&s.route])
            .set(s.oldest_age_secs);
        m.dead_letters
            .with_label_values(&[&s.route])
            .set(s.dead as i64);
    }
}

async fn housekeeping(ingress: &Ingress, store: &Store, queue: &Queue) {
    let now = now_ms();
    match store.stats(now).await {
        Ok(stats) => set_backlog(ingress, &stats),
        Err(e) => {
            ingress.metrics.store_errors.inc();
            tracing::error!(error = %e, "cannot read queue statistics");
        }
    }
    let delivered_before = now - queue.retention.as_millis() as i64;
    let dead_before = now - queue.dead_letter_retention.as_millis() as i64;
    if let Err(e) = store.prune(delivered_before, dead_before).await {
        ingress.metrics.store_errors.inc();
        tracing::error!(error = %e, "cannot prune the store");
    }
}

/// Re-queues the selected deliveries and counts them.
pub async fn replay(
    ingress: &Ingress,
    queue: &Queue,
    selector: Selector,
) -> Result<usize, StoreError> {
    let route = selector.route.clone().unwrap_or_else(|| "all".into());
    let n = queue.store.replay(selector).await?;
    ingress
        .metrics
        .replayed
        .with_label_values(&[&route])
        .inc_by(n as u64);
    queue.wake.notify_one();
    Ok(n)
}
