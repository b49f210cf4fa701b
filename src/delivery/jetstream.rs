//! The distributed store of Queued delivery: NATS JetStream, shared by every ingress replica.
//!
//! Layout (`S` is the configured stream name):
//! - stream `S` (limits retention, `max_age` = retention ≥ the dedup window) holds
//!   events on `S.events.<route>.<order>.<event id>` and attempt records on
//!   `S.attempts.<stream seq>.<target>`. Events are published with `Nats-Msg-Id` = the event
//!   id, so a notification re-sent to any replica within the duplicate window is stored
//!   once. Messages stay after delivery so that the server rebuilds its duplicate table from
//!   them after a restart.
//! - stream `S_DLQ` holds dead letters on `S.dlq.<route>`, with the event and the target.
//! - one durable pull consumer per Queued route (`S_<route>`), explicit ack. A message is
//!   acked once every target is delivered or dead; otherwise it is nak'ed with the delay of
//!   the earliest next attempt (the route's retry schedule). A replica that dies holding a
//!   message loses it to another replica after the ack wait; max deliver bounds the total.
//!
//! Attempts are counted from the attempt records, not from redeliveries, because a message
//! also comes back when it waits for an earlier event of its order: the records are the truth
//! for "attempt n of the schedule" and for `paynotify events`. Tokens in subjects are hashes,
//! because route names, order ids and URLs may hold characters subjects cannot.

use super::queue::{self, now_ms, try_once};
use super::store::{
    Appended, AttemptView, DeliveryView, EventView, NewEvent, NextState, RESPONSE_SNIPPET,
    RouteStats, Selector, StoreError,
};
use crate::ingress::Ingress;
use crate::spec::DeliveryMode;
use async_nats::HeaderMap;
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, pull};
use async_nats::jetstream::{self, AckKind, Message, stream};
use bytes::Bytes;
use futures_util::StreamExt;
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::sync::Semaphore;

/// Attempts running at once in one replica.
const CONCURRENCY: usize = 32;
/// Messages fetched per pull request.
const BATCH: usize = 64;
/// How long a message waits before it looks again at an earlier event of its order that has
/// not been attempted yet.
const ORDER_WAIT: Duration = Duration::from_millis(250);
/// How often backlog gauges are refreshed and consumers matched to the routing table.
const HOUSEKEEPING: Duration = Duration::from_secs(2);

const ROUTE: &str = "Paynotify-Route";
const TARGETS: &str = "Paynotify-Targets";
const RECEIVED: &str = "Paynotify-Received-At";
const EVENT_ID: &str = "Paynotify-Event-Id";
const REPLAY_OF: &str = "Paynotify-Replay-Of";
const TARGET: &str = "Paynotify-Target";

/// Where the JetStream store is and how it is shaped.
#[derive(Debug, Clone, PartialEq)]
pub struct NatsSettings {
    /// Server URL(s), comma-separated, e.g. `nats://nats:4222`.
    pub url: String,
    /// A `.creds` file (JWT and NKey seed), if the server wants one.
    pub credentials_file: Option<PathBuf>,
    /// The stream name; subjects and the other names derive from it.
    pub stream: String,
    /// Stream replicas (1 for a single server, 3 or 5 for a cluster).
    pub replicas: usize,
    /// How long a re-sent notification is recognised (at least 25 h).
    pub dedup_window: Duration,
    /// How long events and their attempts are kept (at least the dedup window).
    pub retention: Duration,
    /// How long dead letters are kept.
    pub dead_letter_retention: Duration,
    /// Longest wait for the stream's acknowledgement before the platform is told to retry.
    pub publish_timeout: Duration,
}

impl NatsSettings {
    /// Settings with the defaults for everything but the address.
    pub fn new(url: impl Into<String>) -> Self {
        NatsSettings {
            url: url.into(),
            credentials_file: None,
            stream: "PAYNOTIFY".into(),
            replicas: 1,
            dedup_window: crate::config::MIN_DEDUP_RETENTION,
            retention: Duration::from_secs(7 * 86400),
            dead_letter_retention: Duration::from_secs(14 * 86400),
            publish_timeout: Duration::from_secs(2),
        }
    }

    /// What is wrong with these settings, if anything.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.url.trim().is_empty() {
            problems.push("store.nats.url: must not be empty".to_string());
        }
        if self.stream.is_empty()
            || !self
                .stream
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            problems.push("store.nats.stream: letters, digits, '_' and '-' only".to_string());
        }
        if !(1..=5).contains(&self.replicas) {
            problems.push("store.nats.replicas: between 1 and 5".to_string());
        }
        if self.dedup_window < crate::config::MIN_DEDUP_RETENTION {
            problems.push(
                "store.nats.dedupWindow: at least 25h (the platforms retry that long)".to_string(),
            );
        }
        if self.retention < self.dedup_window {
            problems.push("store.nats.retention: at least the dedup window".to_string());
        }
        if self.publish_timeout.is_zero() {
            problems.push("store.nats.publishTimeout: must be positive".to_string());
        }
        problems
    }

    fn events_stream(&self) -> String {
        self.stream.clone()
    }
    fn dlq_stream(&self) -> String {
        format!("{}_DLQ", self.stream)
    }
    fn consumer(&self, route: &str) -> String {
        format!("{}_{}", self.stream, token(route, 16))
    }
    fn route_filter(&self, route: &str) -> String {
        format!("{}.events.{}.>", self.stream, token(route, 16))
    }
    fn event_subject(&self, route: &str, order_key: &str, id: &str) -> String {
        format!(
            "{}.events.{}.{}.{}",
            self.stream,
            token(route, 16),
            token(order_key, 24),
            id
        )
    }
    fn attempts_subject(&self, seq: u64, target: &str) -> String {
        format!("{}.attempts.{seq}.{}", self.stream, token(target, 16))
    }
    fn dlq_subject(&self, route: &str) -> String {
        format!("{}.dlq.{}", self.stream, token(route, 16))
    }
}

/// The events stream, read without fetching its info first.
type Events = stream::Stream<()>;

/// A short, subject-safe name for any string.
fn token(s: &str, hex_digits: usize) -> String {
    let hex = crate::crypto::hex_lower(&crate::crypto::sha256(s.as_bytes()));
    hex[..hex_digits].to_string()
}

/// A handle on the JetStream store; cheap to clone.
#[derive(Clone)]
pub struct JetStream {
    inner: Arc<Inner>,
}

struct Inner {
    settings: NatsSettings,
    js: jetstream::Context,
    /// The streams exist with our configuration.
    ready: AtomicBool,
}

impl std::fmt::Debug for JetStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JetStream")
            .field("url", &self.inner.settings.url)
            .field("stream", &self.inner.settings.stream)
            .finish()
    }
}

/// The record of one attempt, as stored on the attempts subject.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct AttemptDoc {
    target: String,
    attempt: u32,
    at_ms: i64,
    status: Option<u16>,
    latency_ms: i64,
    response: String,
    error: Option<String>,
    /// `pending`, `delivered` or `dead`.
    state: String,
    /// When the next attempt is due (pending only).
    next_attempt_at_ms: i64,
}

impl AttemptDoc {
    fn finished(&self) -> bool {
        self.state != "pending"
    }
}

/// One event message as read back from the stream.
struct EventMessage {
    seq: u64,
    subject: String,
    id: String,
    route: String,
    targets: Vec<String>,
    received_at_ms: i64,
    body: Bytes,
}

impl EventMessage {
    fn parse(
        seq: u64,
        subject: &str,
        headers: Option<&HeaderMap>,
        body: Bytes,
    ) -> Option<EventMessage> {
        let h = headers?;
        let get = |name: &str| h.get(name).map(|v| v.as_str().to_string());
        Some(EventMessage {
            seq,
            subject: subject.to_string(),
            id: get(EVENT_ID)?,
            route: get(ROUTE)?,
            targets: serde_json::from_str(&get(TARGETS)?).ok()?,
            received_at_ms: get(RECEIVED)?.parse().ok()?,
            body,
        })
    }

    /// The subject filter of every event of the same order.
    fn order_filter(&self) -> Option<String> {
        let (prefix, _id) = self.subject.rsplit_once('.')?;
        Some(format!("{prefix}.*"))
    }
}

fn unavailable(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("{what}: {e}"))
}

impl JetStream {
    /// Connects in the background: the ingress starts even while NATS is down, and answers
    /// the platforms with their failure format until the streams are ready.
    pub async fn connect(settings: NatsSettings) -> Result<JetStream, StoreError> {
        let js = Self::client(&settings, true).await?;
        let store = JetStream {
            inner: Arc::new(Inner {
                settings,
                js,
                ready: AtomicBool::new(false),
            }),
        };
        let setup = store.clone();
        tokio::spawn(async move {
            let mut delay = Duration::from_millis(200);
            loop {
                match setup.ensure_streams().await {
                    Ok(()) => {
                        setup.inner.ready.store(true, Ordering::SeqCst);
                        tracing::info!(stream = %setup.inner.settings.stream, "JetStream store ready");
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "JetStream store not ready; retrying");
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_secs(5));
                    }
                }
            }
        });
        Ok(store)
    }

    /// Connects for a one-off command (the CLI): fails at once when NATS is unreachable.
    pub async fn open(settings: NatsSettings) -> Result<JetStream, StoreError> {
        let js = Self::client(&settings, false).await?;
        let store = JetStream {
            inner: Arc::new(Inner {
                settings,
                js,
                ready: AtomicBool::new(true),
            }),
        };
        store
            .js()
            .get_stream(store.inner.settings.events_stream())
            .await
            .map_err(|e| unavailable("the events stream", e))?;
        Ok(store)
    }

    async fn client(
        settings: &NatsSettings,
        background: bool,
    ) -> Result<jetstream::Context, StoreError> {
        let mut options = async_nats::ConnectOptions::new()
            .name("paynotify")
            .connection_timeout(settings.publish_timeout.max(Duration::from_secs(2)))
            .request_timeout(Some(settings.publish_timeout));
        if let Some(creds) = &settings.credentials_file {
            options = options.credentials_file(creds).await.map_err(|e| {
                StoreError::Unavailable(format!(
                    "cannot read NATS credentials {}: {e}",
                    creds.display()
                ))
            })?;
        }
        if background {
            options = options.retry_on_initial_connect();
        }
        let servers: Vec<async_nats::ServerAddr> = settings
            .url
            .split(',')
            .map(|u| u.trim().parse())
            .collect::<Result<_, _>>()
            .map_err(|e| StoreError::Unavailable(format!("store.nats.url: {e}")))?;
        let client = options
            .connect(servers)
            .await
            .map_err(|e| unavailable("cannot connect to NATS", e))?;
        Ok(jetstream::new(client))
    }

    fn js(&self) -> &jetstream::Context {
        &self.inner.js
    }

    fn settings(&self) -> &NatsSettings {
        &self.inner.settings
    }

    /// Whether the streams are set up (appends fail until they are).
    pub fn is_ready(&self) -> bool {
        self.inner.ready.load(Ordering::SeqCst)
    }

    async fn ensure_streams(&self) -> Result<(), StoreError> {
        let s = self.settings();
        let events = stream::Config {
            name: s.events_stream(),
            description: Some("paynotify: verified events and their delivery attempts".into()),
            subjects: vec![
                format!("{}.events.>", s.stream),
                format!("{}.attempts.>", s.stream),
            ],
            retention: stream::RetentionPolicy::Limits,
            max_age: s.retention,
            duplicate_window: s.dedup_window,
            storage: stream::StorageType::File,
            num_replicas: s.replicas,
            allow_direct: true,
            ..Default::default()
        };
        let dlq = stream::Config {
            name: s.dlq_stream(),
            description: Some("paynotify: dead letters".into()),
            subjects: vec![format!("{}.dlq.>", s.stream)],
            retention: stream::RetentionPolicy::Limits,
            max_age: s.dead_letter_retention,
            duplicate_window: Duration::from_secs(3600),
            storage: stream::StorageType::File,
            num_replicas: s.replicas,
            ..Default::default()
        };
        for config in [events, dlq] {
            let name = config.name.clone();
            self.js()
                .create_or_update_stream(config)
                .await
                .map_err(|e| unavailable(&format!("cannot create or update stream {name}"), e))?;
        }
        Ok(())
    }

    /// Publishes the event; success means the stream acknowledged it (on a quorum of its
    /// replicas). A re-sent notification comes back as a duplicate.
    pub async fn append(&self, event: NewEvent) -> Result<Appended, StoreError> {
        if !self.is_ready() {
            return Err(StoreError::Unavailable(
                "the JetStream store is not ready".into(),
            ));
        }
        let s = self.settings();
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", event.id.as_str());
        headers.insert(EVENT_ID, event.id.as_str());
        headers.insert(ROUTE, event.route.as_str());
        headers.insert(RECEIVED, event.received_at_ms.to_string().as_str());
        let targets = serde_json::to_string(&event.targets)
            .map_err(|e| StoreError::Unavailable(format!("cannot encode targets: {e}")))?;
        headers.insert(TARGETS, targets.as_str());
        let subject = s.event_subject(&event.route, &event.order_key, &event.id);
        let ack = self.publish(subject, headers, event.body.into()).await?;
        Ok(if ack.duplicate {
            Appended::Duplicate
        } else {
            Appended::Stored
        })
    }

    async fn publish(
        &self,
        subject: String,
        headers: HeaderMap,
        body: Bytes,
    ) -> Result<jetstream::publish::PublishAck, StoreError> {
        let publish = async {
            self.js()
                .publish_with_headers(subject, headers, body)
                .await
                .map_err(|e| unavailable("publish", e))?
                .await
                .map_err(|e| unavailable("publish acknowledgement", e))
        };
        tokio::time::timeout(self.settings().publish_timeout, publish)
            .await
            .map_err(|_| {
                StoreError::Unavailable("no acknowledgement from JetStream in time".into())
            })?
    }

    /// The last attempt record of one delivery, if any attempt was made.
    async fn last_attempt(
        &self,
        events: &Events,
        seq: u64,
        target: &str,
    ) -> Result<Option<AttemptDoc>, StoreError> {
        let subject = self.settings().attempts_subject(seq, target);
        match events.get_last_raw_message_by_subject(&subject).await {
            Ok(m) => serde_json::from_slice(&m.payload)
                .map(Some)
                .map_err(|e| StoreError::Unavailable(format!("attempt record {subject}: {e}"))),
            Err(e) if matches!(e.kind(), stream::LastRawMessageErrorKind::NoMessageFound) => {
                Ok(None)
            }
            Err(e) => Err(unavailable("read an attempt record", e)),
        }
    }

    /// Every attempt record of one event message, oldest first.
    async fn attempts_of(&self, events: &Events, seq: u64) -> Result<Vec<AttemptDoc>, StoreError> {
        let filter = format!("{}.attempts.{seq}.*", self.settings().stream);
        let mut out = Vec::new();
        let mut from = seq + 1;
        loop {
            match next_by_subject(events, &filter, from).await? {
                Some(m) => {
                    if let Ok(doc) = serde_json::from_slice(&m.payload) {
                        out.push(doc);
                    }
                    from = m.sequence + 1;
                }
                None => return Ok(out),
            }
        }
    }

    /// The events of one order stored before `seq`.
    async fn earlier_in_order(
        &self,
        events: &Events,
        event: &EventMessage,
    ) -> Result<Vec<EventMessage>, StoreError> {
        let Some(filter) = event.order_filter() else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        let mut from = 1;
        while let Some(m) = next_by_subject(events, &filter, from).await? {
            if m.sequence >= event.seq {
                break;
            }
            if let Some(e) =
                EventMessage::parse(m.sequence, &m.subject, Some(&m.headers), m.payload.clone())
            {
                out.push(e);
            }
            from = m.sequence + 1;
        }
        Ok(out)
    }

    async fn record(
        &self,
        seq: u64,
        route: &str,
        target: &str,
        doc: &AttemptDoc,
        event: &EventMessage,
    ) -> Result<(), StoreError> {
        let body = serde_json::to_vec(doc)
            .map_err(|e| StoreError::Unavailable(format!("cannot encode an attempt: {e}")))?;
        let mut headers = HeaderMap::new();
        headers.insert(TARGET, target);
        self.publish(
            self.settings().attempts_subject(seq, target),
            headers,
            body.into(),
        )
        .await?;
        if doc.state == "dead" {
            let mut headers = HeaderMap::new();
            headers.insert(
                "Nats-Msg-Id",
                format!("{seq}.{}.{}", token(target, 16), doc.attempt).as_str(),
            );
            headers.insert(EVENT_ID, event.id.as_str());
            headers.insert(ROUTE, route);
            headers.insert(TARGET, target);
            headers.insert(REPLAY_OF, seq.to_string().as_str());
            self.publish(
                self.settings().dlq_subject(route),
                headers,
                event.body.clone(),
            )
            .await?;
        }
        Ok(())
    }

    /// Reads events (the latest message of each event id) matching the selector, oldest
    /// first, with the stream sequence of every message of each event.
    async fn select(
        &self,
        events: &Events,
        selector: &Selector,
    ) -> Result<Vec<(EventMessage, Vec<u64>)>, StoreError> {
        let s = self.settings();
        let mut filters = Vec::new();
        if !selector.ids.is_empty() {
            for id in &selector.ids {
                // An id becomes a subject token: `*`, `>` or `.` would widen the selection.
                if id.is_empty() || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                    return Err(StoreError::Request(format!("not an event id: {id:?}")));
                }
                filters.push(format!("{}.events.*.*.{id}", s.stream));
            }
        } else if let Some(route) = &selector.route {
            filters.push(s.route_filter(route));
        } else {
            filters.push(format!("{}.events.>", s.stream));
        }
        let mut by_id: BTreeMap<String, (EventMessage, Vec<u64>)> = BTreeMap::new();
        for filter in filters {
            let start = selector.since_ms.map(|ms| {
                time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
                    .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
            });
            let config = pull::OrderedConfig {
                filter_subject: filter,
                deliver_policy: match start {
                    Some(start_time) => DeliverPolicy::ByStartTime { start_time },
                    None => DeliverPolicy::All,
                },
                ..Default::default()
            };
            let mut consumer = events
                .create_consumer(config)
                .await
                .map_err(|e| unavailable("read the events stream", e))?;
            let pending = consumer
                .info()
                .await
                .map_err(|e| unavailable("read the events stream", e))?
                .num_pending;
            if pending == 0 {
                continue;
            }
            let mut messages = consumer
                .messages()
                .await
                .map_err(|e| unavailable("read the events stream", e))?;
            while let Some(m) = messages.next().await {
                let m = m.map_err(|e| unavailable("read the events stream", e))?;
                let info = m
                    .info()
                    .map_err(|e| unavailable("read the events stream", e))?;
                let (seq, left) = (info.stream_sequence, info.pending);
                if let Some(e) =
                    EventMessage::parse(seq, &m.subject, m.headers.as_ref(), m.payload.clone())
                {
                    let in_range = selector.until_ms.is_none_or(|u| e.received_at_ms < u)
                        && selector.since_ms.is_none_or(|s| e.received_at_ms >= s);
                    if in_range {
                        // The latest message of an event id stands for it; every
                        // message's attempts count.
                        let mut seqs = by_id.remove(&e.id).map(|(_, s)| s).unwrap_or_default();
                        seqs.push(seq);
                        by_id.insert(e.id.clone(), (e, seqs));
                    }
                }
                if left == 0 {
                    break;
                }
            }
        }
        let mut out: Vec<_> = by_id.into_values().collect();
        out.sort_by_key(|(e, _)| e.seq);
        Ok(out)
    }

    /// The state of every target of an event: the last attempt over all its messages.
    async fn target_states(
        &self,
        events: &Events,
        seqs: &[u64],
    ) -> Result<BTreeMap<String, (AttemptDoc, Vec<AttemptDoc>)>, StoreError> {
        let mut states: BTreeMap<String, (AttemptDoc, Vec<AttemptDoc>)> = BTreeMap::new();
        for &seq in seqs {
            for doc in self.attempts_of(events, seq).await? {
                let entry = states
                    .entry(doc.target.clone())
                    .or_insert_with(|| (doc.clone(), Vec::new()));
                entry.0 = doc.clone();
                entry.1.push(doc);
            }
        }
        Ok(states)
    }

    /// Re-queues dead deliveries (and, if asked, delivered ones) of the selected events by
    /// publishing the event again for those targets; returns how many deliveries.
    pub async fn replay(&self, selector: Selector) -> Result<usize, StoreError> {
        let events = self.events_stream().await?;
        let mut requeued = 0;
        for (event, seqs) in self.select(&events, &selector).await? {
            let states = self.target_states(&events, &seqs).await?;
            let targets: Vec<String> = states
                .iter()
                .filter(|(_, (last, _))| {
                    last.state == "dead"
                        || (selector.include_delivered && last.state == "delivered")
                })
                .map(|(t, _)| t.clone())
                .collect();
            if targets.is_empty() {
                continue;
            }
            let mut headers = HeaderMap::new();
            let replay_id = format!("{}.replay.{}", event.id, random_hex()?);
            headers.insert("Nats-Msg-Id", replay_id.as_str());
            headers.insert(EVENT_ID, event.id.as_str());
            headers.insert(ROUTE, event.route.as_str());
            headers.insert(RECEIVED, event.received_at_ms.to_string().as_str());
            headers.insert(REPLAY_OF, event.seq.to_string().as_str());
            let list = serde_json::to_string(&targets)
                .map_err(|e| StoreError::Unavailable(format!("cannot encode targets: {e}")))?;
            headers.insert(TARGETS, list.as_str());
            // The same order subject: a replay queues behind later events of its order.
            self.publish(event.subject.clone(), headers, event.body.clone())
                .await?;
            requeued += targets.len();
        }
        Ok(requeued)
    }

    /// The selected events with their deliveries and attempts, newest first.
    pub async fn events(
        &self,
        selector: Selector,
        limit: usize,
    ) -> Result<Vec<EventView>, StoreError> {
        let events = self.events_stream().await?;
        let selected = self.select(&events, &selector).await?;
        let mut out = Vec::new();
        for (event, seqs) in selected.into_iter().rev().take(limit) {
            let states = self.target_states(&events, &seqs).await?;
            let mut targets = event.targets.clone();
            for t in states.keys() {
                if !targets.contains(t) {
                    targets.push(t.clone());
                }
            }
            let deliveries = targets
                .iter()
                .map(|t| match states.get(t) {
                    Some((last, all)) => DeliveryView {
                        target: t.clone(),
                        state: last.state.clone(),
                        attempts: all.len() as u32,
                        next_attempt_at_ms: last.next_attempt_at_ms,
                    },
                    None => DeliveryView {
                        target: t.clone(),
                        state: "pending".into(),
                        attempts: 0,
                        next_attempt_at_ms: event.received_at_ms,
                    },
                })
                .collect();
            let mut attempts: Vec<AttemptView> = states
                .values()
                .flat_map(|(_, all)| all.iter())
                .map(|d| AttemptView {
                    target: d.target.clone(),
                    attempt: d.attempt,
                    at_ms: d.at_ms,
                    status: d.status,
                    latency_ms: d.latency_ms,
                    response: d.response.clone(),
                    error: d.error.clone(),
                })
                .collect();
            attempts.sort_by_key(|a| a.at_ms);
            out.push(EventView {
                id: event.id.clone(),
                route: event.route.clone(),
                received_at_ms: event.received_at_ms,
                deliveries,
                attempts,
            });
        }
        Ok(out)
    }

    async fn events_stream(&self) -> Result<Events, StoreError> {
        self.js()
            .get_stream_no_info(self.settings().events_stream())
            .await
            .map_err(|e| unavailable("the events stream", e))
    }

    /// The durable consumer of one route, created or brought in line with the route.
    async fn consumer(
        &self,
        events: &Events,
        route: &crate::table::Route,
    ) -> Result<jetstream::consumer::Consumer<pull::Config>, StoreError> {
        let config = consumer_config(self.settings(), route);
        events
            .create_consumer(config)
            .await
            .map_err(|e| unavailable(&format!("consumer of route {}", route.name), e))
    }

    async fn backlog(
        &self,
        events: &Events,
        routes: &[String],
    ) -> Result<Vec<RouteStats>, StoreError> {
        let s = self.settings();
        let dlq = self
            .js()
            .get_stream_no_info(s.dlq_stream())
            .await
            .map_err(|e| unavailable("the dead-letter stream", e))?;
        let mut dead: HashMap<String, u64> = HashMap::new();
        let mut subjects = dlq
            .info_with_subjects(format!("{}.dlq.>", s.stream))
            .await
            .map_err(|e| unavailable("the dead-letter stream", e))?;
        while let Some(entry) = subjects.next().await {
            let (subject, n) = entry.map_err(|e| unavailable("the dead-letter stream", e))?;
            dead.insert(subject, n as u64);
        }
        let now = now_ms();
        let mut out = Vec::new();
        for route in routes {
            let info = events
                .consumer_info(s.consumer(route))
                .await
                .map_err(|e| unavailable("consumer info", e))?;
            let depth = info.num_pending + info.num_ack_pending as u64;
            let mut oldest_age_secs = 0.0;
            if depth > 0
                && let Some(m) = next_by_subject(
                    events,
                    &s.route_filter(route),
                    info.ack_floor.stream_sequence + 1,
                )
                .await?
            {
                let at_ms = (m.time.unix_timestamp_nanos() / 1_000_000) as i64;
                oldest_age_secs = ((now - at_ms).max(0) as f64) / 1000.0;
            }
            out.push(RouteStats {
                route: route.clone(),
                depth,
                oldest_age_secs,
                dead: dead.get(&s.dlq_subject(route)).copied().unwrap_or(0),
            });
        }
        Ok(out)
    }
}

/// The first message at or after `from` on `filter`, if any.
async fn next_by_subject(
    events: &Events,
    filter: &str,
    from: u64,
) -> Result<Option<jetstream::message::StreamMessage>, StoreError> {
    match events
        .raw_message_builder()
        .sequence(from)
        .next_by_subject(filter)
        .send()
        .await
    {
        Ok(m) => Ok(Some(m)),
        Err(e) if matches!(e.kind(), stream::RawMessageErrorKind::NoMessageFound) => Ok(None),
        Err(e) => Err(unavailable("read the events stream", e)),
    }
}

/// How a route's consumer is configured. The ack wait covers one round of attempts (one per
/// target, one after the other). The backoff is per message: every failed round ends in a
/// nak whose delay is the route's schedule (with jitter and `Retry-After`). The consumer's
/// own `backoff` list is left empty on purpose: nats-server measures a nak delay from the
/// ack wait, and with a backoff list the n-th delivery waits backoff[n] on top of the delay
/// (measured: every retry came a whole ack wait late).
fn consumer_config(s: &NatsSettings, route: &crate::table::Route) -> pull::Config {
    let targets = route.targets.len().max(1) as u32;
    let ack_wait = route.timeout * 2 * targets + Duration::from_secs(5);
    let rounds = (route.retry_schedule.len() as i64 + 1) * i64::from(targets);
    pull::Config {
        durable_name: Some(s.consumer(&route.name)),
        description: Some(format!("paynotify: deliveries of route {}", route.name)),
        filter_subject: s.route_filter(&route.name),
        deliver_policy: DeliverPolicy::All,
        ack_policy: AckPolicy::Explicit,
        ack_wait,
        // Attempts, plus waits behind earlier events of the order, plus crashes: the
        // dispatcher dead-letters a message itself on its last delivery.
        max_deliver: rounds * 4 + 16,
        max_ack_pending: 10_000,
        num_replicas: s.replicas,
        ..Default::default()
    }
}

/// Runs the dispatcher of this replica: one pull loop per Queued route, kept in line with
/// the routing table, and the backlog gauges.
pub async fn dispatch(ingress: Arc<Ingress>, js: JetStream) {
    while !js.is_ready() {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let slots = Arc::new(Semaphore::new(CONCURRENCY));
    // Route name → (consumer config, pull loop).
    let mut running: HashMap<String, (pull::Config, tokio::task::JoinHandle<()>)> = HashMap::new();
    loop {
        let table = ingress.table();
        let queued: Vec<&crate::table::Route> = table
            .routes()
            .filter(|r| r.mode == DeliveryMode::Queued)
            .map(|r| r.as_ref())
            .collect();
        match js.events_stream().await {
            Ok(events) => {
                for route in &queued {
                    let wanted = consumer_config(js.settings(), route);
                    if running
                        .get(&route.name)
                        .is_some_and(|(c, task)| *c == wanted && !task.is_finished())
                    {
                        continue;
                    }
                    match js.consumer(&events, route).await {
                        Ok(consumer) => {
                            if let Some((_, old)) = running.remove(&route.name) {
                                old.abort();
                            }
                            let task = tokio::spawn(pull_loop(
                                ingress.clone(),
                                js.clone(),
                                route.name.clone(),
                                consumer,
                                slots.clone(),
                            ));
                            running.insert(route.name.clone(), (wanted, task));
                        }
                        Err(e) => {
                            ingress.metrics.store_errors.inc();
                            tracing::error!(route = %route.name, error = %e, "cannot set up the route's consumer");
                        }
                    }
                }
                running.retain(|name, (_, task)| {
                    let keep = queued.iter().any(|r| &r.name == name);
                    if !keep {
                        task.abort();
                    }
                    keep
                });
                let names: Vec<String> = running.keys().cloned().collect();
                match js.backlog(&events, &names).await {
                    Ok(stats) => queue::set_backlog(&ingress, &stats),
                    Err(e) => {
                        ingress.metrics.store_errors.inc();
                        tracing::warn!(error = %e, "cannot read the backlog");
                    }
                }
            }
            Err(e) => {
                ingress.metrics.store_errors.inc();
                tracing::warn!(error = %e, "cannot reach the events stream");
            }
        }
        tokio::time::sleep(HOUSEKEEPING).await;
    }
}

async fn pull_loop(
    ingress: Arc<Ingress>,
    js: JetStream,
    route: String,
    consumer: jetstream::consumer::Consumer<pull::Config>,
    slots: Arc<Semaphore>,
) {
    let max_deliver = consumer.cached_info().config.max_deliver;
    loop {
        let mut messages = match consumer
            .stream()
            .max_messages_per_batch(BATCH)
            .expires(Duration::from_secs(5))
            .messages()
            .await
        {
            Ok(m) => m,
            Err(e) => {
                ingress.metrics.store_errors.inc();
                tracing::warn!(route = %route, error = %e, "cannot pull from the route's consumer");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        while let Some(next) = messages.next().await {
            let message = match next {
                Ok(m) => m,
                Err(e) => {
                    tracing::debug!(route = %route, error = %e, "pull interrupted");
                    break;
                }
            };
            let Ok(slot) = slots.clone().acquire_owned().await else {
                return;
            };
            let (ingress, js) = (ingress.clone(), js.clone());
            tokio::spawn(async move {
                handle(&ingress, &js, message, max_deliver).await;
                drop(slot);
            });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Works one delivery of an event message: every unfinished target whose time has come and
/// whose earlier events of the same order are finished gets one attempt; then the message
/// is acked (all finished) or nak'ed until the earliest next attempt.
async fn handle(ingress: &Ingress, js: &JetStream, message: Message, max_deliver: i64) {
    let Ok(info) = message.info() else {
        return;
    };
    let (seq, delivered) = (info.stream_sequence, info.delivered);
    let Some(event) = EventMessage::parse(
        seq,
        &message.subject,
        message.headers.as_ref(),
        message.payload.clone(),
    ) else {
        // Not ours (or damaged): nothing could ever deliver it.
        tracing::error!(
            seq,
            "a message without paynotify headers in the events stream"
        );
        let _ = message.ack_with(AckKind::Term).await;
        return;
    };
    let last_chance = max_deliver > 0 && delivered >= max_deliver;
    match work(ingress, js, &event, last_chance).await {
        Ok(None) => {
            if let Err(e) = message.double_ack().await {
                tracing::warn!(event_id = %event.id, error = %e, "ack not confirmed; the event may be worked again");
            }
        }
        Ok(Some(at_ms)) => {
            let delay = Duration::from_millis((at_ms - now_ms()).max(0) as u64);
            let _ = message.ack_with(AckKind::Nak(Some(delay))).await;
        }
        Err(e) => {
            ingress.metrics.store_errors.inc();
            tracing::error!(event_id = %event.id, error = %e, "cannot work a queued event; it comes back");
            let _ = message
                .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                .await;
        }
    }
}

/// `None` when every target is finished, else when to look again.
async fn work(
    ingress: &Ingress,
    js: &JetStream,
    event: &EventMessage,
    last_chance: bool,
) -> Result<Option<i64>, StoreError> {
    let events = js.events_stream().await?;
    let earlier = js.earlier_in_order(&events, event).await?;
    let now = now_ms();
    let mut wake: Option<i64> = None;
    let mut soonest = |at: i64| wake = Some(wake.map_or(at, |w: i64| w.min(at)));
    for target in &event.targets {
        let last = js.last_attempt(&events, event.seq, target).await?;
        if last.as_ref().is_some_and(AttemptDoc::finished) {
            continue;
        }
        if let Some(l) = &last
            && l.next_attempt_at_ms > now
            && !last_chance
        {
            soonest(l.next_attempt_at_ms);
            continue;
        }
        if let Some(blocked_until) = blocked(js, &events, &earlier, target, now).await?
            && !last_chance
        {
            soonest(blocked_until);
            continue;
        }
        let made = last.as_ref().map_or(0, |l| l.attempt);
        let doc = if last_chance {
            // The server will not hand this message out again: dead-letter what is left.
            AttemptDoc {
                target: target.clone(),
                attempt: made,
                at_ms: now,
                status: None,
                latency_ms: 0,
                response: String::new(),
                error: Some("delivery budget of the consumer exhausted".into()),
                state: "dead".into(),
                next_attempt_at_ms: 0,
            }
        } else {
            let tried = try_once(
                ingress,
                &event.route,
                target,
                &event.id,
                event.body.clone(),
                made,
            )
            .await;
            let (state, next_at) = match tried.next {
                NextState::Delivered => ("delivered", 0),
                NextState::Dead => ("dead", 0),
                NextState::RetryAt(at) => ("pending", at),
            };
            let mut response = tried.response;
            response.truncate(floor_char_boundary(&response, RESPONSE_SNIPPET));
            AttemptDoc {
                target: target.clone(),
                attempt: made + 1,
                at_ms: tried.at_ms,
                status: tried.status,
                latency_ms: tried.latency.as_millis() as i64,
                response,
                error: tried.error,
                state: state.into(),
                next_attempt_at_ms: next_at,
            }
        };
        js.record(event.seq, &event.route, target, &doc, event)
            .await?;
        if !doc.finished() {
            soonest(doc.next_attempt_at_ms);
        }
    }
    Ok(wake)
}

/// When an earlier event of the order still holds `target` back: the time to look again.
async fn blocked(
    js: &JetStream,
    events: &Events,
    earlier: &[EventMessage],
    target: &str,
    now: i64,
) -> Result<Option<i64>, StoreError> {
    for e in earlier
        .iter()
        .filter(|e| e.targets.iter().any(|t| t == target))
    {
        match js.last_attempt(events, e.seq, target).await? {
            Some(l) if l.finished() => continue,
            Some(l) if l.next_attempt_at_ms > now => return Ok(Some(l.next_attempt_at_ms + 50)),
            _ => return Ok(Some(now + ORDER_WAIT.as_millis() as i64)),
        }
    }
    Ok(None)
}

/// A random message id suffix, so that each replay is a new message.
fn random_hex() -> Result<String, StoreError> {
    let mut b = [0u8; 12];
    aws_lc_rs::rand::fill(&mut b)
        .map_err(|_| StoreError::Unavailable("no randomness for a replay id".into()))?;
    Ok(crate::crypto::hex_lower(&b))
}

fn floor_char_boundary(s: &str, max: usize) -> usize {
    if s.len() <= max {
        return s.len();
    }
    (0..=max)
        .rev()
        .find(|&i| s.is_char_boundary(i))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_refuse_a_short_dedup_window_and_bad_names() {
        let mut s = NatsSettings::new("nats://127.0.0.1:4222");
        assert!(s.problems().is_empty());
        s.dedup_window = Duration::from_secs(3600);
        s.stream = "pay.notify".into();
        s.replicas = 0;
        let p = s.problems().join("\n");
        assert!(p.contains("dedupWindow"), "{p}");
        assert!(p.contains("stream"), "{p}");
        assert!(p.contains("replicas"), "{p}");
    }

    #[test]
    fn subjects_are_tokens_and_orders_share_a_filter() {
        let s = NatsSettings::new("nats://x");
        let a = s.event_subject("ns/route a", "ns/route a|ORDER.1 *>", "evt_1");
        let b = s.event_subject("ns/route a", "ns/route a|ORDER.1 *>", "evt_2");
        assert_eq!(a.split('.').count(), 5, "{a}");
        let e = EventMessage {
            seq: 1,
            subject: a.clone(),
            id: "evt_1".into(),
            route: "r".into(),
            targets: vec![],
            received_at_ms: 0,
            body: Bytes::new(),
        };
        let filter = e.order_filter().unwrap();
        assert!(filter.ends_with(".*"));
        assert_eq!(filter.trim_end_matches('*'), b.trim_end_matches("evt_2"));
        assert!(
            s.route_filter("ns/route a")
                .starts_with("PAYNOTIFY.events.")
        );
    }

    #[test]
    fn snippets_are_cut_on_character_boundaries() {
        let s = "ab€";
        assert_eq!(floor_char_boundary(s, 3), 2);
        assert_eq!(floor_char_boundary(s, 10), s.len());
    }
}
