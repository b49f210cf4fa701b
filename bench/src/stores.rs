//! `paynotify-bench stores`: durable appends measured side by side on the embedded store of
//! Queued delivery (paynotify's SQLite [`Store`]) and on redb, a pure-Rust engine, each with
//! and without group commit, in one run on one filesystem. docs/benchmarks.md ("Embedded
//! store: SQLite vs redb") explains the method and the decision; this module makes its tables.
//!
//! What each engine stores per append, so that the work is comparable:
//! - SQLite: paynotify's own `Store::append`, unchanged: a size-cap check, a savepoint, one
//!   `events` row (rowid table, plus the `sqlite_sequence` counter of AUTOINCREMENT) with its
//!   three indexes (unique id, `(order_key, seq)`, `(route, received_at)`), and one
//!   `deliveries` row per target with its primary key and `(state, next_attempt_at)` index.
//! - redb: the same records as six B-trees written in one write transaction: `events`
//!   (seq → id, route, order key, received at, body), `event_ids` (id → seq, the duplicate
//!   check), `events_order` ((order key, seq)), `events_route_time` ((route, received at,
//!   seq)), `deliveries` ((seq, target) → state, attempts, next attempt, claimed, updated at)
//!   and `deliveries_due` ((state, next attempt, seq, target)). No size cap and no savepoint
//!   per append: redb has neither cheaply, so this side does slightly less work.

use crate::Error;
use crate::proc_stats;
use hdrhistogram::Histogram;
use paynotify::delivery::store::{Appended, NewEvent, Store};
use redb::{ConcurrencyMode, ReadableDatabase, ReadableTable, ReadableTableMetadata};
use redb::{Database, TableDefinition};
use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// Size of each event's JSON body: a normalized Alipay payment with its data fields.
const BODY_BYTES: usize = 1536;
/// The size cap given to the SQLite store: far above what a run writes, so it never refuses.
const SQLITE_CAP: u64 = 64 << 30;
/// Appends per redb transaction, at most: the bound paynotify's store uses.
const MAX_BATCH: usize = 256;
/// Producers that fill the stores for the size measurement.
const FILL_PRODUCERS: usize = 64;
const ROUTE: &str = "bench-alipay";
const TARGET: &str = "http://orders.shop.svc.cluster.local:8080/payments";
/// `deliveries.state` of a delivery still to make (SQLite stores the word `pending`).
const PENDING: u8 = 0;

pub const BEGIN: &str = "<!-- stores:begin -->";
pub const END: &str = "<!-- stores:end -->";

type EventRow = (&'static str, &'static str, &'static str, i64, &'static [u8]);
type DeliveryRow = (u8, u32, i64, bool, i64);
const EVENTS: TableDefinition<u64, EventRow> = TableDefinition::new("events");
const EVENT_IDS: TableDefinition<&str, u64> = TableDefinition::new("event_ids");
const EVENTS_ORDER: TableDefinition<(&str, u64), ()> = TableDefinition::new("events_order");
const EVENTS_ROUTE_TIME: TableDefinition<(&str, i64, u64), ()> =
    TableDefinition::new("events_route_time");
const DELIVERIES: TableDefinition<(u64, &str), DeliveryRow> = TableDefinition::new("deliveries");
const DELIVERIES_DUE: TableDefinition<(u8, i64, u64, &str), ()> =
    TableDefinition::new("deliveries_due");

/// Arguments of `paynotify-bench stores`.
#[derive(clap::Args)]
pub struct StoresArgs {
    /// `smoke` proves the pipeline in a few seconds; `full` measures (about 3.5 minutes).
    #[arg(long, value_parser = ["smoke", "full"])]
    mode: String,
    /// Where the database files go. It must be a real disk: on tmpfs an fsync costs nothing
    /// and the comparison says nothing.
    #[arg(long)]
    dir: PathBuf,
    /// Markdown file whose store results (between its markers) are replaced; stdout if absent.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// Arguments of `paynotify-bench store-probe`: one access to a store file that another
/// process (`stores`) holds open.
#[derive(clap::Args)]
pub struct ProbeArgs {
    /// `sqlite`, `redb-exclusive`, `redb-single` or `redb-multi`.
    #[arg(long)]
    store: String,
    /// `read`: open without writing and count; `write`: open to write, count, append one.
    #[arg(long, value_parser = ["read", "write"])]
    access: String,
    /// The file.
    #[arg(long)]
    path: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Engine {
    Sqlite,
    Redb,
    RedbMulti,
}

impl Engine {
    const ALL: [Engine; 3] = [Engine::Sqlite, Engine::Redb, Engine::RedbMulti];

    fn label(self) -> &'static str {
        match self {
            Engine::Sqlite => "SQLite (paynotify `Store`)",
            Engine::Redb => "redb, ExclusiveWriter (default)",
            Engine::RedbMulti => "redb, MultiWriter",
        }
    }

    fn file(self) -> &'static str {
        match self {
            Engine::Sqlite => "sqlite.db",
            Engine::Redb => "redb.redb",
            Engine::RedbMulti => "redb-multi.redb",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Commit {
    /// Appends queued while a commit runs share the next transaction.
    Group,
    /// Each append is alone in its transaction: one fsync per append.
    Single,
}

impl Commit {
    fn label(self) -> &'static str {
        match self {
            Commit::Group => "group",
            Commit::Single => "one per append",
        }
    }
}

/// The knobs of one mode.
struct Plan {
    producers: &'static [usize],
    rounds: usize,
    secs: f64,
    fill: u64,
}

impl Plan {
    fn of(mode: &str) -> Plan {
        if mode == "full" {
            Plan {
                producers: &[1, 16, 64],
                rounds: 7,
                secs: 1.5,
                fill: 20_000,
            }
        } else {
            Plan {
                producers: &[1, 8],
                rounds: 2,
                secs: 0.15,
                fill: 300,
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// The events.

/// splitmix64: spreads the ids over the key space as the real (hashed) ids are.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Event `i` of a run tagged `tag`: distinct id and order key, one target, a body shaped like
/// a normalized Alipay payment of [`BODY_BYTES`] bytes.
fn event(tag: u64, i: u64) -> NewEvent {
    let h = mix((tag << 40) ^ i);
    let id = format!("evt_{h:016x}{:016x}", mix(h));
    let order = format!("BENCH{tag:03}-{i:012}");
    let trade_no = format!("2026120322001{:015}", h % 1_000_000_000_000_000);
    let now = paynotify::delivery::queue::now_ms();
    let mut body = format!(
        concat!(
            r#"{{"schemaVersion":"1","id":"{id}","type":"payment.succeeded","provider":"alipay","#,
            r#""route":"{route}","receivedAt":"2026-12-03T16:06:46Z","occurredAt":"2026-12-03T12:00:05+08:00","#,
            r#""status":"TRADE_SUCCESS","amount":{{"value":8888,"original":"88.88","currency":"CNY"}},"#,
            r#""orderId":"{order}","transactionId":"{trade_no}","data":{{"app_id":"2021000000000001","#,
            r#""auth_app_id":"2021000000000001","buyer_id":"2088000000000001","buyer_logon_id":"de***@example.com","#,
            r#""buyer_pay_amount":"88.88","charset":"utf-8","#,
            r#""fund_bill_list":"[{{\"amount\":\"88.88\",\"fundChannel\":\"ALIPAYACCOUNT\"}}]","#,
            r#""gmt_create":"2026-12-03 12:00:00","gmt_payment":"2026-12-03 12:00:05","invoice_amount":"88.88","#,
            r#""notify_id":"2026120300222120000{h:016x}","notify_time":"2026-12-03 12:00:06","#,
            r#""notify_type":"trade_status_sync","out_trade_no":"{order}","point_amount":"0.00","#,
            r#""receipt_amount":"88.88","seller_email":"merchant@example.com","seller_id":"2088000000000002","#,
            r#""subject":"演示商品 demo","total_amount":"88.88","trade_no":"{trade_no}","#,
            r#""trade_status":"TRADE_SUCCESS","version":"1.0","body":""#
        ),
        id = id,
        route = ROUTE,
        order = order,
        trade_no = trade_no,
        h = h,
    );
    const TAIL: &str = r#""}}"#;
    const ITEMS: &str = "sku=DEMO-0001;qty=1;price=88.88;";
    let pad = BODY_BYTES.saturating_sub(body.len() + TAIL.len());
    body.extend(ITEMS.chars().cycle().take(pad));
    body.push_str(TAIL);
    NewEvent {
        id,
        route: ROUTE.into(),
        order_key: format!("{ROUTE}|{order}"),
        received_at_ms: now,
        body: body.into_bytes(),
        targets: vec![TARGET.into()],
    }
}

// ---------------------------------------------------------------------------------------
// redb, driven like paynotify's store: one writer thread, group commit.

type RedbCommand = (NewEvent, oneshot::Sender<Result<Appended, String>>);

/// A redb database behind one writer thread that commits whatever queued up meanwhile in
/// one write transaction (`Durability::Immediate`, redb's default: durable when `commit`
/// returns), and answers each append only after that commit.
struct RedbStore {
    tx: mpsc::Sender<RedbCommand>,
    db: Arc<Database>,
    commits: Arc<AtomicU64>,
    writer: std::thread::JoinHandle<()>,
}

fn redb_builder(mode: ConcurrencyMode) -> redb::Builder {
    let mut builder = redb::Builder::new();
    builder.set_concurrency_mode(mode);
    builder
}

/// Opens or creates `path` and its tables.
fn redb_create(path: &Path, mode: ConcurrencyMode) -> Result<Database, Error> {
    let db = redb_builder(mode).create(path)?;
    // Create every table up front, so the first measured transaction does not.
    redb_commit(&db, std::iter::empty::<&NewEvent>())?;
    Ok(db)
}

impl RedbStore {
    fn open(path: &Path, mode: ConcurrencyMode) -> Result<RedbStore, Error> {
        let db = Arc::new(redb_create(path, mode)?);
        let (tx, rx) = mpsc::channel(4096);
        let commits = Arc::new(AtomicU64::new(0));
        let writer = {
            let (db, commits) = (db.clone(), commits.clone());
            std::thread::Builder::new()
                .name("bench-redb".into())
                .spawn(move || redb_writer(&db, rx, &commits))?
        };
        Ok(RedbStore {
            tx,
            db,
            commits,
            writer,
        })
    }

    async fn append(&self, event: NewEvent) -> Result<Appended, Error> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send((event, reply))
            .await
            .map_err(|_| "redb writer is gone")?;
        Ok(rx.await.map_err(|_| "redb writer is gone")??)
    }

    fn stored(&self) -> Result<u64, Error> {
        Ok(self.db.begin_read()?.open_table(EVENTS)?.len()?)
    }

    /// Stops the writer and closes the file; returns how many transactions it committed.
    fn close(self) -> Result<u64, Error> {
        drop(self.tx);
        self.writer.join().map_err(|_| "redb writer panicked")?;
        let db = Arc::try_unwrap(self.db).map_err(|_| "redb database still shared")?;
        db.close()?;
        Ok(self.commits.load(Ordering::Relaxed))
    }
}

fn redb_writer(db: &Database, mut rx: mpsc::Receiver<RedbCommand>, commits: &AtomicU64) {
    while let Some(first) = rx.blocking_recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(command) => batch.push(command),
                Err(_) => break,
            }
        }
        match redb_commit(db, batch.iter().map(|(e, _)| e)) {
            Ok(results) => {
                commits.fetch_add(1, Ordering::Relaxed);
                for ((_, reply), result) in batch.into_iter().zip(results) {
                    let _ = reply.send(Ok(result));
                }
            }
            // A failed transaction stored nothing: every append in it fails.
            Err(e) => {
                let e = e.to_string();
                for (_, reply) in batch {
                    let _ = reply.send(Err(e.clone()));
                }
            }
        }
    }
}

/// One write transaction storing `events`, committed with redb's default durability.
fn redb_commit<'a>(
    db: &Database,
    events: impl Iterator<Item = &'a NewEvent>,
) -> Result<Vec<Appended>, redb::Error> {
    let txn = db.begin_write()?;
    let mut results = Vec::new();
    {
        let mut rows = txn.open_table(EVENTS)?;
        let mut ids = txn.open_table(EVENT_IDS)?;
        let mut order = txn.open_table(EVENTS_ORDER)?;
        let mut route_time = txn.open_table(EVENTS_ROUTE_TIME)?;
        let mut deliveries = txn.open_table(DELIVERIES)?;
        let mut due = txn.open_table(DELIVERIES_DUE)?;
        for e in events {
            if ids.get(e.id.as_str())?.is_some() {
                results.push(Appended::Duplicate);
                continue;
            }
            let seq = rows.last()?.map_or(1, |(k, _)| k.value() + 1);
            rows.insert(
                seq,
                (
                    e.id.as_str(),
                    e.route.as_str(),
                    e.order_key.as_str(),
                    e.received_at_ms,
                    e.body.as_slice(),
                ),
            )?;
            ids.insert(e.id.as_str(), seq)?;
            order.insert((e.order_key.as_str(), seq), ())?;
            route_time.insert((e.route.as_str(), e.received_at_ms, seq), ())?;
            for target in &e.targets {
                let at = e.received_at_ms;
                deliveries.insert((seq, target.as_str()), (PENDING, 0, at, false, at))?;
                due.insert((PENDING, at, seq, target.as_str()), ())?;
            }
            results.push(Appended::Stored);
        }
    }
    txn.commit()?;
    Ok(results)
}

// ---------------------------------------------------------------------------------------
// One store under test.

enum Backend {
    Sqlite(Store),
    Redb(RedbStore),
}

struct UnderTest {
    backend: Backend,
    path: PathBuf,
    /// Without group commit, producers take turns (a fair FIFO lock): each append is alone
    /// in its transaction, whatever the engine.
    turn: Option<tokio::sync::Mutex<()>>,
}

impl UnderTest {
    fn open(engine: Engine, commit: Commit, path: &Path) -> Result<UnderTest, Error> {
        let backend = match engine {
            Engine::Sqlite => Backend::Sqlite(Store::open(path, SQLITE_CAP)?),
            Engine::Redb => Backend::Redb(RedbStore::open(path, ConcurrencyMode::ExclusiveWriter)?),
            Engine::RedbMulti => {
                Backend::Redb(RedbStore::open(path, ConcurrencyMode::MultiWriter)?)
            }
        };
        Ok(UnderTest {
            backend,
            path: path.to_path_buf(),
            turn: (commit == Commit::Single).then(|| tokio::sync::Mutex::new(())),
        })
    }

    async fn append(&self, event: NewEvent) -> Result<Appended, Error> {
        let _turn = match &self.turn {
            Some(turn) => Some(turn.lock().await),
            None => None,
        };
        match &self.backend {
            Backend::Sqlite(store) => Ok(store.append(event).await?),
            Backend::Redb(store) => store.append(event).await,
        }
    }

    /// Events stored (pending deliveries, one target each).
    async fn stored(&self) -> Result<u64, Error> {
        match &self.backend {
            Backend::Sqlite(store) => Ok(store.stats(0).await?.iter().map(|s| s.depth).sum()),
            Backend::Redb(store) => store.stored(),
        }
    }

    /// Closes the store and waits until its file is closed; returns redb's commit count.
    fn close(self) -> Result<Option<u64>, Error> {
        match self.backend {
            Backend::Sqlite(store) => {
                drop(store);
                wait_sqlite_closed(&self.path)?;
                Ok(None)
            }
            Backend::Redb(store) => Ok(Some(store.close()?)),
        }
    }
}

fn sidecar(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_os_string();
    name.push(suffix);
    PathBuf::from(name)
}

/// The store thread closes the connection once every handle is gone, and SQLite then
/// checkpoints and deletes the WAL file: its disappearance says the file is closed, so the
/// next measurement does not share the disk with that last checkpoint.
fn wait_sqlite_closed(path: &Path) -> Result<(), Error> {
    let wal = sidecar(path, "-wal");
    let deadline = Instant::now() + Duration::from_secs(30);
    while wal.exists() {
        if Instant::now() > deadline {
            return Err(format!("{} was not closed within 30 s", path.display()).into());
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(())
}

fn remove_files(path: &Path) -> Result<(), Error> {
    for p in [
        path.to_path_buf(),
        sidecar(path, "-wal"),
        sidecar(path, "-shm"),
    ] {
        match std::fs::remove_file(&p) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(format!("{}: {e}", p.display()).into());
            }
            _ => {}
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Measurement.

#[derive(Clone, Copy)]
enum Until {
    Elapsed(Duration),
    Count(u64),
}

fn new_histogram() -> Result<Histogram<u64>, Error> {
    // Microseconds, 1 µs to 60 s.
    Ok(Histogram::new_with_bounds(1, 60_000_000, 3)?)
}

/// `producers` tasks append fresh events back to back (closed loop: each waits for its
/// append to be durable before the next) until `until`; returns the wall time and the
/// latency of every append.
async fn drive(
    under: Arc<UnderTest>,
    producers: usize,
    until: Until,
    tag: u64,
) -> Result<(Duration, Histogram<u64>), Error> {
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..producers {
        let (under, next) = (under.clone(), next.clone());
        tasks.spawn(async move {
            let mut latency = new_histogram()?;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                match until {
                    Until::Elapsed(d) if start.elapsed() >= d => break,
                    Until::Count(n) if i >= n => break,
                    _ => {}
                }
                let event = event(tag, i);
                let sent = Instant::now();
                if under.append(event).await? != Appended::Stored {
                    return Err::<_, Error>("a fresh event was taken for a duplicate".into());
                }
                latency.record((sent.elapsed().as_micros() as u64).max(1))?;
            }
            Ok(latency)
        });
    }
    let mut latency = new_histogram()?;
    while let Some(joined) = tasks.join_next().await {
        latency.add(joined??)?;
    }
    Ok((start.elapsed(), latency))
}

/// One configuration measured once, on a fresh file.
struct Sample {
    appends: u64,
    elapsed: Duration,
    p50_ms: f64,
    p99_ms: f64,
    cpu_us_per_append: f64,
    appends_per_commit: Option<f64>,
}

impl Sample {
    fn rate(&self) -> f64 {
        self.appends as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

fn measure(
    runtime: &tokio::runtime::Runtime,
    dir: &Path,
    (engine, commit, producers): (Engine, Commit, usize),
    secs: f64,
    tag: u64,
) -> Result<Sample, Error> {
    let path = dir.join(engine.file());
    remove_files(&path)?;
    let under = Arc::new(UnderTest::open(engine, commit, &path)?);
    let pid = std::process::id();
    let cpu_before = proc_stats::cpu_seconds(pid)?;
    let (elapsed, latency) = runtime.block_on(drive(
        under.clone(),
        producers,
        Until::Elapsed(Duration::from_secs_f64(secs)),
        tag,
    ))?;
    let cpu = proc_stats::cpu_seconds(pid)? - cpu_before;
    let under = Arc::into_inner(under).ok_or("a producer still holds the store")?;
    let commits = under.close()?;
    remove_files(&path)?;
    let appends = latency.len();
    Ok(Sample {
        appends,
        elapsed,
        p50_ms: latency.value_at_quantile(0.5) as f64 / 1000.0,
        p99_ms: latency.value_at_quantile(0.99) as f64 / 1000.0,
        cpu_us_per_append: cpu / appends.max(1) as f64 * 1e6,
        appends_per_commit: commits.map(|c| appends as f64 / c.max(1) as f64),
    })
}

/// Bytes of the store's files.
fn bytes(path: &Path) -> u64 {
    [
        path.to_path_buf(),
        sidecar(path, "-wal"),
        sidecar(path, "-shm"),
    ]
    .iter()
    .filter_map(|p| std::fs::metadata(p).ok())
    .map(|m| m.len())
    .sum()
}

struct Size {
    engine: Engine,
    events: u64,
    open_bytes: u64,
    closed_bytes: u64,
    /// redb only: after `compact(CompactionMode::Maximum)`.
    compacted_bytes: Option<u64>,
}

/// Fills a fresh store with `n` events (group commit, many producers), checks they are all
/// there, and measures its files while open and after close.
fn size_after(
    runtime: &tokio::runtime::Runtime,
    dir: &Path,
    engine: Engine,
    n: u64,
) -> Result<Size, Error> {
    let path = dir.join(engine.file());
    remove_files(&path)?;
    let under = Arc::new(UnderTest::open(engine, Commit::Group, &path)?);
    runtime.block_on(drive(under.clone(), FILL_PRODUCERS, Until::Count(n), 999))?;
    let stored = runtime.block_on(under.stored())?;
    if stored != n {
        return Err(format!("{}: {stored} events stored, {n} appended", engine.label()).into());
    }
    let open_bytes = bytes(&path);
    let under = Arc::into_inner(under).ok_or("a producer still holds the store")?;
    under.close()?;
    let closed_bytes = bytes(&path);
    // redb writes copy-on-write pages and keeps the freed ones in the file: compaction tells
    // how much of its size is free space rather than data.
    let compacted_bytes = match engine {
        Engine::Sqlite => None,
        Engine::Redb | Engine::RedbMulti => {
            let mut db = Database::open(&path)?;
            db.compact(redb::CompactionMode::Maximum)?;
            db.close()?;
            Some(bytes(&path))
        }
    };
    remove_files(&path)?;
    Ok(Size {
        engine,
        events: n,
        open_bytes,
        closed_bytes,
        compacted_bytes,
    })
}

/// The disk's durability primitive alone, to read the tables by: appending 4 KiB to a file
/// and `fdatasync`, back to back for `secs`. Returns p50 and p99 in milliseconds.
fn fsync_latency(dir: &Path, secs: f64) -> Result<(f64, f64), Error> {
    use std::io::Write as _;
    let path = dir.join("fsync.probe");
    let mut file = std::fs::File::create(&path)?;
    let mut latency = new_histogram()?;
    let page = [0x5a_u8; 4096];
    let start = Instant::now();
    while start.elapsed().as_secs_f64() < secs {
        let t = Instant::now();
        file.write_all(&page)?;
        file.sync_data()?;
        latency.record((t.elapsed().as_micros() as u64).max(1))?;
    }
    drop(file);
    std::fs::remove_file(&path)?;
    Ok((
        latency.value_at_quantile(0.5) as f64 / 1000.0,
        latency.value_at_quantile(0.99) as f64 / 1000.0,
    ))
}

// ---------------------------------------------------------------------------------------
// Multi-process access: what another process (the CLI's `events` and `replay` are one)
// can do with a file the server holds open.

fn redb_mode(store: &str) -> Option<ConcurrencyMode> {
    match store {
        "redb-exclusive" => Some(ConcurrencyMode::ExclusiveWriter),
        "redb-single" => Some(ConcurrencyMode::SingleWriter),
        "redb-multi" => Some(ConcurrencyMode::MultiWriter),
        _ => None,
    }
}

/// `paynotify-bench store-probe`: prints what one access did.
pub fn probe(args: ProbeArgs) -> Result<(), Error> {
    let outcome = match redb_mode(&args.store) {
        Some(mode) => probe_redb(&args.path, mode, args.access == "write"),
        None if args.store == "sqlite" => probe_sqlite(&args.path, args.access == "write"),
        None => return Err(format!("unknown store {:?}", args.store).into()),
    };
    println!(
        "{}",
        outcome.unwrap_or_else(|e| format!("refused: {e}").replace('\n', " "))
    );
    Ok(())
}

fn probe_redb(path: &Path, mode: ConcurrencyMode, write: bool) -> Result<String, Error> {
    let builder = redb_builder(mode);
    if !write {
        let db = builder.open_read_only(path)?;
        let n = db.begin_read()?.open_table(EVENTS)?.len()?;
        return Ok(format!("opened read-only; sees {n} events"));
    }
    let db = builder.open(path)?;
    let n = db.begin_read()?.open_table(EVENTS)?.len()?;
    redb_commit(&db, std::iter::once(&event(7, 0)))?;
    Ok(format!("opened to write; sees {n} events; appended 1"))
}

fn probe_sqlite(path: &Path, write: bool) -> Result<String, Error> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        // As `paynotify events` and `paynotify replay` do.
        let store = Store::open(path, SQLITE_CAP)?;
        let n: u64 = store.stats(0).await?.iter().map(|s| s.depth).sum();
        if !write {
            return Ok(format!("opened; sees {n} events"));
        }
        store.append(event(7, 0)).await?;
        Ok(format!("opened; sees {n} events; appended 1"))
    })
}

/// Runs `store-probe` in a child process against `path`.
fn child_probe(store: &str, access: &str, path: &Path) -> Result<String, Error> {
    let out = Command::new(std::env::current_exe()?)
        .args([
            "store-probe",
            "--store",
            store,
            "--access",
            access,
            "--path",
        ])
        .arg(path)
        .output()?;
    if !out.status.success() {
        return Err(format!(
            "store-probe failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )
        .into());
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn probes(runtime: &tokio::runtime::Runtime, dir: &Path) -> Result<Vec<(String, String)>, Error> {
    const HELD: u64 = 10;
    let held: Vec<NewEvent> = (0..HELD).map(|i| event(3, i)).collect();
    let mut rows = Vec::new();
    for (store, label) in [
        ("redb-exclusive", "redb, ExclusiveWriter (default)"),
        ("redb-single", "redb, SingleWriter"),
        ("redb-multi", "redb, MultiWriter"),
    ] {
        let mode = redb_mode(store).ok_or("unknown mode")?;
        let path = dir.join(format!("probe-{store}.redb"));
        remove_files(&path)?;
        let db = redb_create(&path, mode)?;
        redb_commit(&db, held.iter())?;
        let second = match redb_builder(mode).create(&path) {
            Ok(_) => "opened (two handles on one file in one process)".to_string(),
            Err(e) => format!("refused: {e}"),
        };
        rows.push((
            format!("{label}: a second `Builder::create` of the open file, same process"),
            second,
        ));
        for access in ["read", "write"] {
            rows.push((
                format!("{label}: another process opens it to {access}"),
                child_probe(store, access, &path)?,
            ));
        }
        let n = db.begin_read()?.open_table(EVENTS)?.len()?;
        rows.push((
            format!("{label}: the owner counts again"),
            format!("{n} events"),
        ));
        db.close()?;
        remove_files(&path)?;
    }
    let path = dir.join("probe.sqlite");
    remove_files(&path)?;
    let store = Store::open(&path, SQLITE_CAP)?;
    runtime.block_on(async {
        for e in &held {
            store.append(e.clone()).await?;
        }
        Ok::<_, Error>(())
    })?;
    for access in ["read", "write"] {
        let what = if access == "read" {
            "like `paynotify events`"
        } else {
            "and appends, like `paynotify replay` writes"
        };
        rows.push((
            format!("SQLite (paynotify `Store`): another process opens it {what}"),
            child_probe("sqlite", access, &path)?,
        ));
    }
    let cli = match Command::new("sqlite3")
        .arg("-readonly")
        .arg(&path)
        .arg("SELECT count(*) FROM events")
        .output()
    {
        Ok(out) if out.status.success() => format!(
            "counts {} events",
            String::from_utf8_lossy(&out.stdout).trim()
        ),
        Ok(out) => format!("failed: {}", String::from_utf8_lossy(&out.stderr).trim()),
        Err(e) => format!("not run: {e}"),
    };
    rows.push((
        "SQLite: the `sqlite3 -readonly` shell, while the store is open".into(),
        cli,
    ));
    let n: u64 = runtime
        .block_on(store.stats(0))?
        .iter()
        .map(|s| s.depth)
        .sum();
    rows.push((
        "SQLite: the owner counts again".into(),
        format!("{n} events"),
    ));
    drop(store);
    wait_sqlite_closed(&path)?;
    remove_files(&path)?;
    Ok(rows)
}

// ---------------------------------------------------------------------------------------
// The run and its report.

/// `paynotify-bench stores`.
pub fn run(args: StoresArgs) -> Result<(), Error> {
    let plan = Plan::of(&args.mode);
    std::fs::create_dir_all(&args.dir)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let mut cells = Vec::new();
    for &producers in plan.producers {
        for commit in [Commit::Group, Commit::Single] {
            for engine in Engine::ALL {
                cells.push((engine, commit, producers));
            }
        }
    }
    let fsync_before = fsync_latency(&args.dir, plan.secs)?;
    // Warm-up, not recorded: the first files, page cache and thread start-up.
    for engine in Engine::ALL {
        measure(
            &runtime,
            &args.dir,
            (engine, Commit::Group, 16),
            plan.secs / 3.0,
            0,
        )?;
    }
    // Every configuration once per round, in an order that shifts and reverses from round
    // to round, so that no engine always runs in the same place; engines alternate within
    // a round, so a noisy stretch of the machine hits them alike.
    let mut samples: HashMap<(Engine, Commit, usize), Vec<Sample>> = HashMap::new();
    for round in 0..plan.rounds {
        let mut order = cells.clone();
        order.rotate_left(round * cells.len() / plan.rounds);
        if round % 2 == 1 {
            order.reverse();
        }
        for (k, &cell) in order.iter().enumerate() {
            let tag = (round * cells.len() + k + 1) as u64;
            let s = measure(&runtime, &args.dir, cell, plan.secs, tag)?;
            eprintln!(
                "stores: round {}/{} {} / {} / {} producers: {:.0} appends/s, p99 {:.2} ms",
                round + 1,
                plan.rounds,
                cell.0.label(),
                cell.1.label(),
                cell.2,
                s.rate(),
                s.p99_ms
            );
            samples.entry(cell).or_default().push(s);
        }
    }
    let mut sizes = Vec::new();
    for engine in Engine::ALL {
        sizes.push(size_after(&runtime, &args.dir, engine, plan.fill)?);
    }
    let fsync_after = fsync_latency(&args.dir, plan.secs)?;
    let probes = probes(&runtime, &args.dir)?;
    let measured = Measured {
        cells,
        samples,
        sizes,
        probes,
        fsync: [fsync_before, fsync_after],
    };
    let section = render(&args, &plan, &measured)?;
    match &args.out {
        Some(out) => {
            crate::report::write_section(out, &section, BEGIN, END)?;
            eprintln!("store comparison written to {}", out.display());
        }
        None => print!("{section}"),
    }
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

/// Version of a package in the workspace's Cargo.lock.
fn locked_version(name: &str) -> String {
    let lock = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.lock");
    let text = std::fs::read_to_string(lock).unwrap_or_default();
    let wanted = format!("name = \"{name}\"");
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        if line == wanted
            && let Some(v) = lines.next().and_then(|l| l.strip_prefix("version = "))
        {
            return v.trim_matches('"').to_string();
        }
    }
    "unknown".into()
}

fn command_line(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// Everything one run measured.
struct Measured {
    cells: Vec<(Engine, Commit, usize)>,
    samples: HashMap<(Engine, Commit, usize), Vec<Sample>>,
    sizes: Vec<Size>,
    probes: Vec<(String, String)>,
    /// p50 and p99 ms of 4 KiB + fdatasync, before and after the rounds.
    fsync: [(f64, f64); 2],
}

fn render(args: &StoresArgs, plan: &Plan, run: &Measured) -> Result<String, Error> {
    let Measured {
        cells,
        samples,
        sizes,
        probes,
        fsync,
    } = run;
    let mut out = String::new();
    let date = command_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"]);
    writeln!(out, "### Store results ({} run, {date})\n", args.mode)?;
    let dir = args.dir.display().to_string();
    let fs = command_line("stat", &["-f", "-c", "%T", &dir]);
    let warning = if fs == "tmpfs" || fs == "ramfs" {
        " — **in memory: fsync costs nothing here, these numbers do not measure durability**"
    } else {
        ""
    };
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    writeln!(
        out,
        "- Machine: {cores} cores, Linux {}; files on {fs}{warning}",
        command_line("uname", &["-r"])
    )?;
    writeln!(
        out,
        "- Versions: {}; {}; rusqlite {} (libsqlite3-sys {}, bundled SQLite); redb {}",
        command_line("git", &["describe", "--always", "--dirty"]),
        command_line("rustc", &["-V"]),
        locked_version("rusqlite"),
        locked_version("libsqlite3-sys"),
        locked_version("redb"),
    )?;
    writeln!(
        out,
        "- The disk alone (append 4 KiB + `fdatasync`, back to back): p50 {:.2} ms, p99 {:.2} ms before the rounds; p50 {:.2} ms, p99 {:.2} ms after",
        fsync[0].0, fsync[0].1, fsync[1].0, fsync[1].1
    )?;
    writeln!(
        out,
        "- Plan: {} rounds; in each, every configuration for {:.2} s on a fresh file, in a shifted order; producers append back to back (closed loop), events of {BODY_BYTES} B with one target; medians over the rounds.\n",
        plan.rounds, plan.secs
    )?;
    writeln!(
        out,
        "| Store | Commit | Producers | Appends/s (median) | Appends/s (min–max) | p50 ms | p99 ms | CPU µs per append | Appends per commit |"
    )?;
    writeln!(out, "|---|---|---:|---:|---:|---:|---:|---:|---:|")?;
    let get = |cell: &(Engine, Commit, usize)| samples.get(cell).map_or(&[][..], |v| &v[..]);
    for cell in cells {
        let s = get(cell);
        let rates: Vec<f64> = s.iter().map(Sample::rate).collect();
        let min = rates.iter().copied().fold(f64::INFINITY, f64::min);
        let max = rates.iter().copied().fold(0.0, f64::max);
        let per_commit = if s.iter().any(|x| x.appends_per_commit.is_some()) {
            format!(
                "{:.1}",
                median(s.iter().filter_map(|x| x.appends_per_commit).collect())
            )
        } else {
            "not observable".into()
        };
        writeln!(
            out,
            "| {} | {} | {} | {:.0} | {:.0}–{:.0} | {:.2} | {:.2} | {:.0} | {per_commit} |",
            cell.0.label(),
            cell.1.label(),
            cell.2,
            median(rates),
            min,
            max,
            median(s.iter().map(|x| x.p50_ms).collect()),
            median(s.iter().map(|x| x.p99_ms).collect()),
            median(s.iter().map(|x| x.cpu_us_per_append).collect()),
        )?;
    }
    // Ratios of throughput, paired by round (the two ran minutes apart at most, under the
    // same machine noise), then the median over the rounds.
    let ratio = |a: (Engine, Commit, usize), b: (Engine, Commit, usize)| {
        let pairs: Vec<f64> = get(&a)
            .iter()
            .zip(get(&b))
            .map(|(x, y)| x.rate() / y.rate().max(1e-9))
            .collect();
        format!("{:.2}", median(pairs))
    };
    use {Commit::*, Engine::*};
    writeln!(
        out,
        "\n| Producers | redb / SQLite, group | redb MultiWriter / SQLite, group | redb / SQLite, one per append | SQLite group / one per append | redb group / one per append | redb MultiWriter group / one per append |"
    )?;
    writeln!(out, "|---:|---:|---:|---:|---:|---:|---:|")?;
    for &p in plan.producers {
        writeln!(
            out,
            "| {p} | {} | {} | {} | {} | {} | {} |",
            ratio((Redb, Group, p), (Sqlite, Group, p)),
            ratio((RedbMulti, Group, p), (Sqlite, Group, p)),
            ratio((Redb, Single, p), (Sqlite, Single, p)),
            ratio((Sqlite, Group, p), (Sqlite, Single, p)),
            ratio((Redb, Group, p), (Redb, Single, p)),
            ratio((RedbMulti, Group, p), (RedbMulti, Single, p)),
        )?;
    }
    writeln!(
        out,
        "\n| Store | Events | Body bytes | Files while open MiB | File after close MiB | Bytes per event after close | After redb compaction MiB |"
    )?;
    writeln!(out, "|---|---:|---:|---:|---:|---:|---:|")?;
    for s in sizes {
        writeln!(
            out,
            "| {} | {} | {:.1} MiB | {:.1} | {:.1} | {:.0} | {} |",
            s.engine.label(),
            s.events,
            mib(s.events * BODY_BYTES as u64),
            mib(s.open_bytes),
            mib(s.closed_bytes),
            s.closed_bytes as f64 / s.events.max(1) as f64,
            s.compacted_bytes
                .map_or("—".to_string(), |b| format!("{:.1}", mib(b)))
        )?;
    }
    writeln!(
        out,
        "\n| While the owner holds the file open (10 events) | Outcome |"
    )?;
    writeln!(out, "|---|---|")?;
    for (what, outcome) in probes {
        writeln!(out, "| {what} | {} |", outcome.replace('|', "\\|"))?;
    }
    Ok(out)
}
