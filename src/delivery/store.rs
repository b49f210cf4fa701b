//! The embedded durable store of Queued delivery: SQLite (bundled) in WAL mode with
//! `synchronous=FULL`, so a commit is on stable storage before the platform hears "success".
//!
//! One thread owns the connection. Commands queue up while a commit is under way and the
//! next transaction takes them all at once (group commit): under load, one fsync acknowledges
//! many notifications. Several processes may open the same file (the CLI's `replay` and
//! `events` do), SQLite's locking keeps them consistent.

use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// Commands per transaction, at most.
const MAX_BATCH: usize = 256;
/// New events are refused beyond this share of the size limit, so that attempts, replays
/// and pruning (which free space) still have room.
const APPEND_SHARE: f64 = 0.9;
/// Bytes of a target's answer kept with each attempt.
pub const RESPONSE_SNIPPET: usize = 512;

/// Why a store could not do something. Every failure of an append means "do not tell the
/// platform success".
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The request itself is wrong (an id that cannot be one).
    #[error("{0}")]
    Request(String),
    /// The distributed store (NATS JetStream) did not answer or refused.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// SQLite refused (full, read-only, corrupt…).
    #[error("store: {0}")]
    Sql(String),
    /// The store thread is gone.
    #[error("store is closed")]
    Closed,
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::Sql(e.to_string())
    }
}

/// A verified event to store, with the targets it must reach.
#[derive(Debug, Clone)]
pub struct NewEvent {
    /// The event id (the dedup key's hash).
    pub id: String,
    /// The route's name.
    pub route: String,
    /// Events with the same key are delivered in the order they were stored.
    pub order_key: String,
    /// When it was received, unix milliseconds.
    pub received_at_ms: i64,
    /// The event JSON, sent byte for byte on every attempt.
    pub body: Vec<u8>,
    /// Target labels (URLs, or `log`).
    pub targets: Vec<String>,
}

/// What an append did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Appended {
    /// Stored now.
    Stored,
    /// Already stored before (a re-send): nothing changed.
    Duplicate,
}

/// A delivery whose time has come, claimed for one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DueDelivery {
    /// Internal sequence of the event (receive order).
    pub seq: i64,
    /// The event id.
    pub event_id: String,
    /// The route's name.
    pub route: String,
    /// The target label.
    pub target: String,
    /// Attempts made so far.
    pub attempts: u32,
    /// The event JSON.
    pub body: Vec<u8>,
}

/// Where a delivery goes after an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NextState {
    /// Done.
    Delivered,
    /// Try again at this unix millisecond.
    RetryAt(i64),
    /// A dead letter, until replayed.
    Dead,
}

/// One attempt of a delivery, to record.
#[derive(Debug, Clone)]
pub struct AttemptRecord {
    /// The event's sequence.
    pub seq: i64,
    /// The target label.
    pub target: String,
    /// What happened.
    pub outcome: AttemptOutcome,
}

/// The outcome of one delivery attempt, whichever store keeps it.
#[derive(Debug, Clone)]
pub struct AttemptOutcome {
    /// When the attempt started, unix milliseconds.
    pub at_ms: i64,
    /// HTTP status, if any answer came.
    pub status: Option<u16>,
    /// How long it took.
    pub latency: Duration,
    /// The start of the target's answer.
    pub response: String,
    /// Transport error, if any.
    pub error: Option<String>,
    /// What happens next.
    pub next: NextState,
}

/// Which events to re-queue.
#[derive(Debug, Clone, Default)]
pub struct Selector {
    /// These event ids.
    pub ids: Vec<String>,
    /// Or every event of this route…
    pub route: Option<String>,
    /// …received at or after this unix millisecond…
    pub since_ms: Option<i64>,
    /// …and before this one.
    pub until_ms: Option<i64>,
    /// Re-send deliveries that already succeeded too (not only dead letters).
    pub include_delivered: bool,
}

impl Selector {
    /// A selector from user input: ids, or a route and an RFC 3339 time range. Refuses an
    /// empty selection, so that "replay everything" is never an accident.
    pub fn parse(
        ids: Vec<String>,
        route: Option<String>,
        since: Option<&str>,
        until: Option<&str>,
        include_delivered: bool,
    ) -> Result<Self, String> {
        let time = |t: &str| -> Result<i64, String> {
            time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339)
                .map(|t| (t.unix_timestamp_nanos() / 1_000_000) as i64)
                .map_err(|e| format!("{t:?} is not an RFC 3339 time: {e}"))
        };
        if ids.is_empty() && route.is_none() {
            return Err("give event ids, or a route (with an optional time range)".into());
        }
        Ok(Selector {
            ids,
            route,
            since_ms: since.map(time).transpose()?,
            until_ms: until.map(time).transpose()?,
            include_delivered,
        })
    }
}

/// One delivery of an event, as `paynotify events` shows it.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DeliveryView {
    /// The target label.
    pub target: String,
    /// `pending`, `delivered` or `dead`.
    pub state: String,
    /// Attempts made.
    pub attempts: u32,
    /// Next attempt (unix ms) when pending.
    pub next_attempt_at_ms: i64,
}

/// One recorded attempt.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AttemptView {
    /// The target label.
    pub target: String,
    /// 1 for the first attempt.
    pub attempt: u32,
    /// When, unix ms.
    pub at_ms: i64,
    /// HTTP status.
    pub status: Option<u16>,
    /// Milliseconds.
    pub latency_ms: i64,
    /// The start of the answer.
    pub response: String,
    /// Transport error.
    pub error: Option<String>,
}

/// An event with its deliveries and attempts.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EventView {
    /// The event id.
    pub id: String,
    /// The route.
    pub route: String,
    /// Unix ms.
    pub received_at_ms: i64,
    /// Per target.
    pub deliveries: Vec<DeliveryView>,
    /// Every attempt, oldest first.
    pub attempts: Vec<AttemptView>,
}

/// Backlog of one route.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteStats {
    /// The route.
    pub route: String,
    /// Deliveries waiting.
    pub depth: u64,
    /// Age in seconds of the oldest waiting event.
    pub oldest_age_secs: f64,
    /// Dead letters.
    pub dead: u64,
}

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;
/// Answers one command once its transaction committed (or failed).
type Answer = Box<dyn FnOnce(Option<&StoreError>)>;

enum Command {
    Append(NewEvent, Reply<Appended>),
    Due {
        now_ms: i64,
        claim_ms: i64,
        limit: usize,
        reply: Reply<Vec<DueDelivery>>,
    },
    Record(AttemptRecord, Reply<()>),
    Replay {
        selector: Selector,
        now_ms: i64,
        reply: Reply<usize>,
    },
    Events {
        selector: Selector,
        limit: usize,
        reply: Reply<Vec<EventView>>,
    },
    Stats {
        now_ms: i64,
        reply: Reply<Vec<RouteStats>>,
    },
    Prune {
        delivered_before_ms: i64,
        dead_before_ms: i64,
        reply: Reply<usize>,
    },
    ReleaseClaims {
        now_ms: i64,
        reply: Reply<usize>,
    },
}

/// The store handle; cheap to clone.
#[derive(Clone)]
pub struct Store {
    tx: mpsc::Sender<Command>,
    path: PathBuf,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    route TEXT NOT NULL,
    order_key TEXT NOT NULL,
    received_at INTEGER NOT NULL,
    body BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS deliveries (
    event_seq INTEGER NOT NULL REFERENCES events(seq) ON DELETE CASCADE,
    target TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'delivered', 'dead')),
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL,
    claimed INTEGER NOT NULL DEFAULT 0,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (event_seq, target)
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (state, next_attempt_at);
CREATE INDEX IF NOT EXISTS events_order ON events (order_key, seq);
CREATE INDEX IF NOT EXISTS events_route_time ON events (route, received_at);
CREATE TABLE IF NOT EXISTS attempts (
    event_seq INTEGER NOT NULL REFERENCES events(seq) ON DELETE CASCADE,
    target TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    at INTEGER NOT NULL,
    status INTEGER,
    latency_ms INTEGER NOT NULL,
    response TEXT NOT NULL,
    error TEXT
);
CREATE INDEX IF NOT EXISTS attempts_event ON attempts (event_seq);
";

impl Store {
    /// Opens (creating if needed) the store at `path`, at most `max_size_bytes` large.
    pub fn open(path: &Path, max_size_bytes: u64) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| StoreError::Sql(format!("{}: {e}", dir.display())))?;
        }
        let conn = rusqlite::Connection::open(path)?;
        conn.busy_timeout(Duration::from_secs(5))?;
        conn.execute_batch(
            "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; PRAGMA foreign_keys=ON;",
        )?;
        conn.execute_batch(SCHEMA)?;
        let page_size: i64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
        let pages = (max_size_bytes / page_size.max(512) as u64).max(16);
        conn.query_row(&format!("PRAGMA max_page_count = {pages}"), [], |_| Ok(()))?;
        let append_pages = (pages as f64 * APPEND_SHARE) as i64;
        let (tx, rx) = mpsc::channel(4096);
        std::thread::Builder::new()
            .name("paynotify-store".into())
            .spawn(move || run(conn, rx, append_pages))
            .map_err(|e| StoreError::Sql(format!("cannot start the store thread: {e}")))?;
        Ok(Store {
            tx,
            path: path.to_path_buf(),
        })
    }

    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(make(reply))
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Stores `event` durably (returns after the commit is on disk).
    pub async fn append(&self, event: NewEvent) -> Result<Appended, StoreError> {
        self.call(|reply| Command::Append(event, reply)).await
    }

    /// Up to `limit` deliveries due at `now_ms`, each claimed for `claim` (a crash during the
    /// attempt makes it due again then). A delivery waits while an earlier event of the same
    /// order is still pending for the same target.
    pub async fn due(
        &self,
        now_ms: i64,
        claim: Duration,
        limit: usize,
    ) -> Result<Vec<DueDelivery>, StoreError> {
        let claim_ms = claim.as_millis() as i64;
        self.call(|reply| Command::Due {
            now_ms,
            claim_ms,
            limit,
            reply,
        })
        .await
    }

    /// Records an attempt and the delivery's next state.
    pub async fn record(&self, attempt: AttemptRecord) -> Result<(), StoreError> {
        self.call(|reply| Command::Record(attempt, reply)).await
    }

    /// Re-queues the selected dead (and, if asked, delivered) deliveries; returns how many.
    pub async fn replay(&self, selector: Selector, now_ms: i64) -> Result<usize, StoreError> {
        self.call(|reply| Command::Replay {
            selector,
            now_ms,
            reply,
        })
        .await
    }

    /// The selected events, newest first.
    pub async fn events(
        &self,
        selector: Selector,
        limit: usize,
    ) -> Result<Vec<EventView>, StoreError> {
        self.call(|reply| Command::Events {
            selector,
            limit,
            reply,
        })
        .await
    }

    /// Backlog per route.
    pub async fn stats(&self, now_ms: i64) -> Result<Vec<RouteStats>, StoreError> {
        self.call(|reply| Command::Stats { now_ms, reply }).await
    }

    /// Makes deliveries claimed by a previous process due now: the attempt it was making
    /// died with it. Only the one process that dispatches from this store calls this, at start.
    pub async fn release_claims(&self, now_ms: i64) -> Result<usize, StoreError> {
        self.call(|reply| Command::ReleaseClaims { now_ms, reply })
            .await
    }

    /// Forgets fully delivered events received before `delivered_before_ms` and dead letters
    /// received before `dead_before_ms`; returns how many events went.
    pub async fn prune(
        &self,
        delivered_before_ms: i64,
        dead_before_ms: i64,
    ) -> Result<usize, StoreError> {
        self.call(|reply| Command::Prune {
            delivered_before_ms,
            dead_before_ms,
            reply,
        })
        .await
    }
}

fn run(mut conn: rusqlite::Connection, mut rx: mpsc::Receiver<Command>, append_pages: i64) {
    while let Some(first) = rx.blocking_recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(c) => batch.push(c),
                Err(_) => break,
            }
        }
        let mut done: Vec<Answer> = Vec::with_capacity(batch.len());
        let outcome = (|| -> Result<(), StoreError> {
            let mut tx = conn.transaction()?;
            for command in batch.drain(..) {
                done.push(execute(&mut tx, command, append_pages));
            }
            tx.commit()?;
            Ok(())
        })();
        // Replies go out only after the commit: a failed commit fails every command in it
        // (SQLite rolls the whole transaction back when, say, the disk is full).
        let failure = outcome.err();
        for reply in done {
            reply(failure.as_ref());
        }
        for command in batch {
            // Commands never reached because the transaction could not start.
            fail(command, failure.clone().unwrap_or(StoreError::Closed));
        }
    }
}

fn fail(command: Command, e: StoreError) {
    match command {
        Command::Append(_, r) => drop(r.send(Err(e))),
        Command::Due { reply, .. } => drop(reply.send(Err(e))),
        Command::Record(_, r) => drop(r.send(Err(e))),
        Command::Replay { reply, .. } => drop(reply.send(Err(e))),
        Command::Events { reply, .. } => drop(reply.send(Err(e))),
        Command::Stats { reply, .. } => drop(reply.send(Err(e))),
        Command::Prune { reply, .. } => drop(reply.send(Err(e))),
        Command::ReleaseClaims { reply, .. } => drop(reply.send(Err(e))),
    }
}

/// Runs one command inside the open transaction; the returned closure answers it once the
/// transaction's fate is known.
fn execute(tx: &mut rusqlite::Transaction<'_>, command: Command, append_pages: i64) -> Answer {
    fn deferred<T: Send + 'static>(reply: Reply<T>, result: Result<T, StoreError>) -> Answer {
        Box::new(move |commit: Option<&StoreError>| {
            let _ = reply.send(match (commit, result) {
                // The command's own error says more than the failed commit it caused.
                (Some(_), Err(own)) => Err(own),
                (Some(e), Ok(_)) => Err(e.clone()),
                (None, result) => result,
            });
        })
    }
    match command {
        Command::Append(event, reply) => deferred(reply, append(tx, &event, append_pages)),
        Command::Due {
            now_ms,
            claim_ms,
            limit,
            reply,
        } => deferred(reply, due(tx, now_ms, claim_ms, limit)),
        Command::Record(attempt, reply) => deferred(reply, record(tx, &attempt)),
        Command::Replay {
            selector,
            now_ms,
            reply,
        } => deferred(reply, replay(tx, &selector, now_ms)),
        Command::Events {
            selector,
            limit,
            reply,
        } => deferred(reply, events(tx, &selector, limit)),
        Command::Stats { now_ms, reply } => deferred(reply, stats(tx, now_ms)),
        Command::Prune {
            delivered_before_ms,
            dead_before_ms,
            reply,
        } => deferred(reply, prune(tx, delivered_before_ms, dead_before_ms)),
        Command::ReleaseClaims { now_ms, reply } => deferred(
            reply,
            tx.execute(
                "UPDATE deliveries SET next_attempt_at = ?1, claimed = 0 WHERE state = 'pending' AND claimed = 1",
                [now_ms],
            )
            .map_err(StoreError::from),
        ),
    }
}

fn append(
    tx: &mut rusqlite::Transaction<'_>,
    e: &NewEvent,
    append_pages: i64,
) -> Result<Appended, StoreError> {
    let used: i64 = tx.query_row(
        "SELECT (SELECT page_count FROM pragma_page_count()) - (SELECT freelist_count FROM pragma_freelist_count())",
        [],
        |r| r.get(0),
    )?;
    if used >= append_pages {
        return Err(StoreError::Sql(
            "database or disk is full: the store reached its size limit".into(),
        ));
    }
    // A savepoint keeps a failed append (say, the store is full) from undoing the others
    // of the same group commit.
    let sp = tx.savepoint_with_name("append")?;
    let inserted = sp.execute(
        "INSERT OR IGNORE INTO events (id, route, order_key, received_at, body) VALUES (?1, ?2, ?3, ?4, ?5)",
        rusqlite::params![e.id, e.route, e.order_key, e.received_at_ms, e.body],
    )?;
    if inserted == 0 {
        return Ok(Appended::Duplicate);
    }
    let seq = sp.last_insert_rowid();
    for target in &e.targets {
        sp.execute(
            "INSERT INTO deliveries (event_seq, target, state, attempts, next_attempt_at, updated_at)
             VALUES (?1, ?2, 'pending', 0, ?3, ?3)",
            rusqlite::params![seq, target, e.received_at_ms],
        )?;
    }
    sp.commit()?;
    Ok(Appended::Stored)
}

fn due(
    tx: &rusqlite::Transaction<'_>,
    now_ms: i64,
    claim_ms: i64,
    limit: usize,
) -> Result<Vec<DueDelivery>, StoreError> {
    let mut stmt = tx.prepare_cached(
        "SELECT d.event_seq, e.id, e.route, d.target, d.attempts, e.body
         FROM deliveries d JOIN events e ON e.seq = d.event_seq
         WHERE d.state = 'pending' AND d.next_attempt_at <= ?1
           AND NOT EXISTS (
             SELECT 1 FROM events e2 JOIN deliveries d2 ON d2.event_seq = e2.seq
             WHERE e2.order_key = e.order_key AND e2.seq < e.seq
               AND d2.target = d.target AND d2.state = 'pending')
         ORDER BY d.next_attempt_at, d.event_seq
         LIMIT ?2",
    )?;
    let rows = stmt
        .query_map(rusqlite::params![now_ms, limit as i64], |r| {
            Ok(DueDelivery {
                seq: r.get(0)?,
                event_id: r.get(1)?,
                route: r.get(2)?,
                target: r.get(3)?,
                attempts: r.get(4)?,
                body: r.get(5)?,
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    let mut claim = tx.prepare_cached(
        "UPDATE deliveries SET next_attempt_at = ?1, claimed = 1 WHERE event_seq = ?2 AND target = ?3",
    )?;
    for d in &rows {
        claim.execute(rusqlite::params![now_ms + claim_ms, d.seq, d.target])?;
    }
    Ok(rows)
}

fn record(tx: &rusqlite::Transaction<'_>, r: &AttemptRecord) -> Result<(), StoreError> {
    let (seq, target, a) = (r.seq, &r.target, &r.outcome);
    let attempts: u32 = tx.query_row(
        "UPDATE deliveries SET attempts = attempts + 1, updated_at = ?3 WHERE event_seq = ?1 AND target = ?2 RETURNING attempts",
        rusqlite::params![seq, target, a.at_ms],
        |r| r.get(0),
    )?;
    let (state, next) = match a.next {
        NextState::Delivered => ("delivered", a.at_ms),
        NextState::RetryAt(t) => ("pending", t),
        NextState::Dead => ("dead", a.at_ms),
    };
    tx.execute(
        "UPDATE deliveries SET state = ?3, next_attempt_at = ?4, claimed = 0 WHERE event_seq = ?1 AND target = ?2",
        rusqlite::params![seq, target, state, next],
    )?;
    tx.execute(
        "INSERT INTO attempts (event_seq, target, attempt, at, status, latency_ms, response, error)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        rusqlite::params![
            seq,
            target,
            attempts,
            a.at_ms,
            a.status,
            a.latency.as_millis() as i64,
            a.response,
            a.error
        ],
    )?;
    Ok(())
}

/// The `WHERE` clause over `events e` for a selector, with its parameters.
fn selection(s: &Selector) -> (String, Vec<rusqlite::types::Value>) {
    use rusqlite::types::Value;
    let mut clauses = Vec::new();
    let mut params: Vec<Value> = Vec::new();
    if !s.ids.is_empty() {
        let marks: Vec<String> = s
            .ids
            .iter()
            .map(|id| {
                params.push(Value::Text(id.clone()));
                format!("?{}", params.len())
            })
            .collect();
        clauses.push(format!("e.id IN ({})", marks.join(", ")));
    }
    if let Some(route) = &s.route {
        params.push(Value::Text(route.clone()));
        clauses.push(format!("e.route = ?{}", params.len()));
    }
    if let Some(since) = s.since_ms {
        params.push(Value::Integer(since));
        clauses.push(format!("e.received_at >= ?{}", params.len()));
    }
    if let Some(until) = s.until_ms {
        params.push(Value::Integer(until));
        clauses.push(format!("e.received_at < ?{}", params.len()));
    }
    if clauses.is_empty() {
        clauses.push("1 = 1".into());
    }
    (clauses.join(" AND "), params)
}

fn replay(tx: &rusqlite::Transaction<'_>, s: &Selector, now_ms: i64) -> Result<usize, StoreError> {
    let (clause, mut params) = selection(s);
    let states = if s.include_delivered {
        "('dead', 'delivered')"
    } else {
        "('dead')"
    };
    params.push(rusqlite::types::Value::Integer(now_ms));
    let n = params.len();
    let sql = format!(
        "UPDATE deliveries SET state = 'pending', attempts = 0, next_attempt_at = ?{n}, updated_at = ?{n}
         WHERE state IN {states} AND event_seq IN (SELECT e.seq FROM events e WHERE {clause})"
    );
    Ok(tx.execute(&sql, rusqlite::params_from_iter(params))?)
}

fn events(
    tx: &rusqlite::Transaction<'_>,
    s: &Selector,
    limit: usize,
) -> Result<Vec<EventView>, StoreError> {
    let (clause, params) = selection(s);
    let sql = format!(
        "SELECT e.seq, e.id, e.route, e.received_at FROM events e WHERE {clause} ORDER BY e.seq DESC LIMIT {limit}"
    );
    let mut stmt = tx.prepare(&sql)?;
    let heads = stmt
        .query_map(rusqlite::params_from_iter(params), |r| {
            Ok((r.get::<_, i64>(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
        })?
        .collect::<Result<Vec<(i64, String, String, i64)>, _>>()?;
    let mut out = Vec::new();
    for (seq, id, route, received_at_ms) in heads {
        let deliveries = tx
            .prepare_cached("SELECT target, state, attempts, next_attempt_at FROM deliveries WHERE event_seq = ?1 ORDER BY target")?
            .query_map([seq], |r| {
                Ok(DeliveryView { target: r.get(0)?, state: r.get(1)?, attempts: r.get(2)?, next_attempt_at_ms: r.get(3)? })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        let attempts = tx
            .prepare_cached(
                "SELECT target, attempt, at, status, latency_ms, response, error FROM attempts WHERE event_seq = ?1 ORDER BY at, rowid",
            )?
            .query_map([seq], |r| {
                Ok(AttemptView {
                    target: r.get(0)?,
                    attempt: r.get(1)?,
                    at_ms: r.get(2)?,
                    status: r.get(3)?,
                    latency_ms: r.get(4)?,
                    response: r.get(5)?,
                    error: r.get(6)?,
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        out.push(EventView {
            id,
            route,
            received_at_ms,
            deliveries,
            attempts,
        });
    }
    Ok(out)
}

fn stats(tx: &rusqlite::Transaction<'_>, now_ms: i64) -> Result<Vec<RouteStats>, StoreError> {
    let mut stmt = tx.prepare_cached(
        "SELECT e.route,
                SUM(d.state = 'pending'),
                MIN(CASE WHEN d.state = 'pending' THEN e.received_at END),
                SUM(d.state = 'dead')
         FROM deliveries d JOIN events e ON e.seq = d.event_seq
         WHERE d.state != 'delivered'
         GROUP BY e.route",
    )?;
    let rows = stmt
        .query_map([], |r| {
            let oldest: Option<i64> = r.get(2)?;
            Ok(RouteStats {
                route: r.get(0)?,
                depth: r.get::<_, i64>(1)? as u64,
                oldest_age_secs: oldest.map_or(0.0, |t| (now_ms - t).max(0) as f64 / 1000.0),
                dead: r.get::<_, i64>(3)? as u64,
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

fn prune(
    tx: &rusqlite::Transaction<'_>,
    delivered_before_ms: i64,
    dead_before_ms: i64,
) -> Result<usize, StoreError> {
    let n = tx.execute(
        "DELETE FROM events WHERE
           (received_at < ?1 AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.event_seq = seq AND d.state != 'delivered'))
           OR (received_at < ?2 AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.event_seq = seq AND d.state = 'pending'))",
        rusqlite::params![delivered_before_ms, dead_before_ms],
    )?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_store(name: &str, max: u64) -> (Store, PathBuf) {
        let dir =
            std::env::temp_dir().join(format!("paynotify-store-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("queue.db");
        (Store::open(&path, max).unwrap(), dir)
    }

    fn event(id: &str, order: &str, at: i64) -> NewEvent {
        NewEvent {
            id: id.into(),
            route: "shop/r".into(),
            order_key: format!("shop/r|{order}"),
            received_at_ms: at,
            body: format!("{{\"id\":\"{id}\"}}").into_bytes(),
            targets: vec!["http://a/".into(), "http://b/".into()],
        }
    }

    fn attempt(d: &DueDelivery, at: i64, next: NextState) -> AttemptRecord {
        AttemptRecord {
            seq: d.seq,
            target: d.target.clone(),
            outcome: AttemptOutcome {
                at_ms: at,
                status: Some(503),
                latency: Duration::from_millis(5),
                response: "busy".into(),
                error: None,
                next,
            },
        }
    }

    #[tokio::test]
    async fn append_is_idempotent_and_orders_deliveries_per_order() {
        let (store, dir) = temp_store("order", 1 << 30);
        assert_eq!(
            store.append(event("e1", "o1", 1000)).await.unwrap(),
            Appended::Stored
        );
        assert_eq!(
            store.append(event("e1", "o1", 1000)).await.unwrap(),
            Appended::Duplicate
        );
        store.append(event("e2", "o1", 1001)).await.unwrap();
        store.append(event("e3", "o2", 1002)).await.unwrap();
        // e2 waits behind e1 (same order); e3 is another order.
        let due = store.due(2000, Duration::from_secs(30), 10).await.unwrap();
        let ids: Vec<(&str, &str)> = due
            .iter()
            .map(|d| (d.event_id.as_str(), d.target.as_str()))
            .collect();
        assert_eq!(
            ids,
            [
                ("e1", "http://a/"),
                ("e1", "http://b/"),
                ("e3", "http://a/"),
                ("e3", "http://b/")
            ]
        );
        // Claimed: not due again until the claim expires.
        assert!(
            store
                .due(2000, Duration::from_secs(30), 10)
                .await
                .unwrap()
                .is_empty()
        );
        // e1 delivered to a, retried later for b: e2 may go to a, not yet to b.
        store
            .record(attempt(&due[0], 2100, NextState::Delivered))
            .await
            .unwrap();
        store
            .record(attempt(&due[1], 2100, NextState::RetryAt(50_000)))
            .await
            .unwrap();
        let due = store
            .due(40_000, Duration::from_secs(30), 10)
            .await
            .unwrap();
        let ids: Vec<(&str, &str)> = due
            .iter()
            .map(|d| (d.event_id.as_str(), d.target.as_str()))
            .collect();
        assert_eq!(
            ids,
            [
                ("e2", "http://a/"),
                ("e3", "http://a/"),
                ("e3", "http://b/")
            ]
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn claims_of_a_stopped_process_are_released_at_the_next_start() {
        let (store, dir) = temp_store("claims", 1 << 30);
        store.append(event("e1", "o1", 1000)).await.unwrap();
        assert_eq!(
            store
                .due(1000, Duration::from_secs(90), 10)
                .await
                .unwrap()
                .len(),
            2
        );
        assert!(
            store
                .due(5000, Duration::from_secs(90), 10)
                .await
                .unwrap()
                .is_empty()
        );
        // A retry scheduled by a finished attempt is not a claim and stays where it is.
        store.append(event("e2", "o2", 1000)).await.unwrap();
        for d in store.due(1000, Duration::from_secs(90), 10).await.unwrap() {
            store
                .record(attempt(&d, 1000, NextState::RetryAt(60_000)))
                .await
                .unwrap();
        }
        assert_eq!(store.release_claims(5000).await.unwrap(), 2);
        let due = store.due(5000, Duration::from_secs(90), 10).await.unwrap();
        assert_eq!(
            due.iter().map(|d| d.event_id.as_str()).collect::<Vec<_>>(),
            ["e1", "e1"]
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn dead_letters_replay_and_history() {
        let (store, dir) = temp_store("dead", 1 << 30);
        store.append(event("e1", "o1", 1000)).await.unwrap();
        for d in store.due(1000, Duration::from_secs(1), 10).await.unwrap() {
            store
                .record(attempt(&d, 1500, NextState::Dead))
                .await
                .unwrap();
        }
        let stats = store.stats(11_000).await.unwrap();
        assert_eq!(
            stats,
            vec![RouteStats {
                route: "shop/r".into(),
                depth: 0,
                oldest_age_secs: 0.0,
                dead: 2
            }]
        );
        assert!(
            store
                .due(99_000, Duration::from_secs(1), 10)
                .await
                .unwrap()
                .is_empty()
        );
        let by_route = Selector {
            route: Some("shop/r".into()),
            since_ms: Some(900),
            until_ms: Some(1100),
            ..Default::default()
        };
        assert_eq!(store.replay(by_route, 20_000).await.unwrap(), 2);
        let due = store.due(20_000, Duration::from_secs(1), 10).await.unwrap();
        assert_eq!(due.len(), 2);
        assert_eq!(due[0].attempts, 0);
        let view = store
            .events(
                Selector {
                    ids: vec!["e1".into()],
                    ..Default::default()
                },
                10,
            )
            .await
            .unwrap();
        assert_eq!(view[0].attempts.len(), 2);
        assert_eq!(view[0].attempts[0].status, Some(503));
        assert_eq!(view[0].deliveries[0].state, "pending");
        // Delivered events are kept until pruned; only then may the same id come back.
        for d in due {
            store
                .record(attempt(&d, 21_000, NextState::Delivered))
                .await
                .unwrap();
        }
        assert_eq!(
            store
                .replay(
                    Selector {
                        ids: vec!["e1".into()],
                        ..Default::default()
                    },
                    22_000
                )
                .await
                .unwrap(),
            0
        );
        assert_eq!(store.prune(1001, 0).await.unwrap(), 1);
        assert_eq!(
            store.append(event("e1", "o1", 30_000)).await.unwrap(),
            Appended::Stored
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn a_full_store_refuses_appends_and_keeps_what_it_has() {
        let (store, dir) = temp_store("full", 64 * 1024);
        let mut stored = 0;
        let refused = loop {
            let mut e = event(&format!("e{stored}"), "o", 1000);
            e.body = vec![b'x'; 4000];
            match store.append(e).await {
                Ok(_) => stored += 1,
                Err(err) => break err,
            }
            assert!(stored < 1000, "the size limit is not enforced");
        };
        assert!(refused.to_string().contains("full"), "{refused}");
        assert!(stored > 0);
        let kept = store.events(Selector::default(), 10_000).await.unwrap();
        assert_eq!(kept.len(), stored);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
