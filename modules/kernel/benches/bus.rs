//! Event bus benchmark, per backend, in one run:
//!
//! - (a) the backend's raw single-row commit rate: one-row INSERT transactions through
//!   `write_tx` on a pooled connection (PostgreSQL also with 8 concurrent writers);
//! - (b) bus end-to-end throughput: one producer commits N events, one transaction per
//!   event, while a `ConsumerEngine` (its real `run` loop, default `RetryPolicy`, batch
//!   256) handles them through the `LocalTransport`, each handling writing one state
//!   row besides the engine's inbox row;
//! - (c) commit→handled latency p50/p99 with the producer paced at half of (b);
//! - (d) when `COLONY_TEST_NATS_URL` names a JetStream server: commit→handled at a
//!   moderate pace (`--hop-rate`, 200 events/s), in process and then with NATS
//!   JetStream between the two modules (the producer's outbox relay publishing, the
//!   consumer's `NatsTransport` subscription pulling, production ack wait), and what
//!   NATS adds — the cost of one hop between processes, without the rest of a split
//!   topology around it;
//! - for reading (b), no target: the producer loop with no consumer running, then the
//!   consumer draining that backlog in full batches.
//!
//! (b)/(a) divides by the 1-writer raw figure: (b) has one serial producer.
//!
//! "Handled" means the consumer's transaction holding the event's state row and inbox
//! row has committed: a thin wrapper around the subscription stamps every event of a
//! pass when the engine settles it, which it does right after that pass committed.
//!
//! Run: `cargo bench -p colony-kernel --bench bus -- [--backend sqlite|postgres|both]
//! [--events N] [--seconds S]`. PostgreSQL comes from `COLONY_TEST_DATABASE_URL`,
//! NATS from `COLONY_TEST_NATS_URL`.
//! Targets are printed as PASS/MISS, never asserted: machines are noisy.

use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use colony_kernel as kernel;
use diesel::prelude::*;
use diesel_migrations::{EmbeddedMigrations, embed_migrations};
use kernel::benchkit::{Percentiles, RawRate, percentiles, raw_commit_rate};
use kernel::bus::{
    BoxFuture, BusError, Consumer, ConsumerEngine, EventHandler, Handled, HandlerError,
    LocalTransport, NatsTransport, RetryPolicy, Subscription, Transport,
};
use kernel::db::{self, Backend, Location, PoolOptions, write_tx};
use kernel::metrics::Metrics;
use kernel::migrate::{self, Migrations};
use kernel::outbox::{self, Publisher};
use kernel::testing::{POSTGRES_ENV, TestDatabase};
use kernel::{AnyConnection, Db, Envelope};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use uuid::Uuid;

const SQLITE: EmbeddedMigrations = embed_migrations!("tests/migrations/sqlite");
const POSTGRES: EmbeddedMigrations = embed_migrations!("tests/migrations/postgres");
const MIGRATIONS: Migrations = Migrations {
    sqlite: &SQLITE,
    postgres: &POSTGRES,
};

diesel::table! {
    bus_test_effects (event_id) {
        event_id -> Text,
        consumer -> Text,
        aggregate_id -> Text,
        sequence -> BigInt,
        position -> BigInt,
    }
}

/// Targets (the issue "foundation"): (b)/(a), p50 and p99 in milliseconds.
const TARGET_RATIO: f64 = 0.5;
const TARGET_P50_MS: f64 = 1.0;
const TARGET_P99_MS: f64 = 10.0;
/// Targets of (d) (the issue "extraction"): what NATS adds to (c), p50 and p99 ms.
const TARGET_ADDED_P50_MS: f64 = 1.0;
const TARGET_ADDED_P99_MS: f64 = 5.0;
const NATS_ENV: &str = "COLONY_TEST_NATS_URL";
/// Events published and handled before each timed bus run (connections, first pass).
const WARMUP_EVENTS: usize = 50;
/// Concurrent writers of the second PostgreSQL raw figure.
const PG_WRITERS: usize = 8;
/// Aggregates the events are spread over.
const KEYS: i64 = 16;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct BenchHappened {
    n: i64,
    note: String,
}

impl contracts::Event for BenchHappened {
    const NAME: &'static str = "alpha.bench_happened.v1";
}

// ---------------------------------------------------------------- arguments

struct Args {
    backends: Vec<Backend>,
    /// Events of the throughput runs; `None`: the backend's default.
    events: Option<usize>,
    seconds: f64,
    /// Events/s of the (d) runs.
    hop_rate: f64,
}

impl Args {
    /// Defaults that keep each backend under a minute on a small machine: PostgreSQL
    /// commits one event per fsync, SQLite (WAL, synchronous=NORMAL) does not fsync.
    fn events(&self, backend: Backend) -> usize {
        self.events.unwrap_or(match backend {
            Backend::Sqlite => 20_000,
            Backend::Postgres => 5_000,
        })
    }
}

fn parse_args() -> Result<Args> {
    let mut backend = "both".to_string();
    let mut events = None;
    let mut seconds = 5.0_f64;
    let mut hop_rate = 200.0_f64;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) => (f.to_string(), Some(v.to_string())),
            None => (arg.clone(), None),
        };
        let mut value = |name: &str| -> Result<String> {
            inline
                .clone()
                .or_else(|| args.next())
                .ok_or_else(|| anyhow!("{name} needs a value"))
        };
        match flag.as_str() {
            // cargo bench passes --bench to harness = false targets.
            "--bench" => {}
            "--backend" => backend = value("--backend")?,
            "--events" => events = Some(value("--events")?.parse().context("--events")?),
            "--seconds" => seconds = value("--seconds")?.parse().context("--seconds")?,
            "--hop-rate" => hop_rate = value("--hop-rate")?.parse().context("--hop-rate")?,
            "-h" | "--help" => {
                println!(
                    "usage: cargo bench -p colony-kernel --bench bus -- \
                     [--backend sqlite|postgres|both] [--events N] [--seconds S] [--hop-rate R]\n\
                     N: events of the throughput runs (default 20000 on SQLite, 5000 on PostgreSQL)\n\
                     S: length of each raw commit loop and of each paced latency run (default 5)\n\
                     R: events/s of the (d) runs, locally and over NATS (default 200)\n\
                     PostgreSQL: {POSTGRES_ENV}; NATS JetStream, for (d): {NATS_ENV}"
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?} (try --help)"),
        }
    }
    let backends = match backend.as_str() {
        "sqlite" => vec![Backend::Sqlite],
        "postgres" => vec![Backend::Postgres],
        "both" => vec![Backend::Sqlite, Backend::Postgres],
        other => bail!("--backend must be sqlite, postgres or both, got {other:?}"),
    };
    if events == Some(0) || seconds <= 0.0 || hop_rate <= 0.0 {
        bail!("--events, --seconds and --hop-rate must be positive");
    }
    Ok(Args {
        backends,
        events,
        seconds,
        hop_rate,
    })
}

// ---------------------------------------------------------------- databases

fn fresh_database(backend: Backend) -> Result<TestDatabase> {
    match backend {
        Backend::Sqlite => Ok(TestDatabase::sqlite()),
        Backend::Postgres => {
            TestDatabase::postgres().ok_or_else(|| anyhow!("{POSTGRES_ENV} is not set"))
        }
    }
}

/// The pool of module `name`, as the application builds it (default options).
fn module_pool(test_db: &TestDatabase, name: &'static str) -> Result<(Location, db::DbPool)> {
    let location = Location::resolve(&test_db.url(), name)?;
    let options = PoolOptions::default();
    let connector = db::prepare(&location, &options)?;
    let pool = db::pool(connector, &options)?;
    Ok((location, pool))
}

/// Opens and migrates the database of module `name`, as a starting process would.
fn open(test_db: &TestDatabase, name: &'static str) -> Result<Db> {
    let (location, pool) = module_pool(test_db, name)?;
    let mut conn = pool.get()?;
    migrate::run_pending(&mut conn, name, MIGRATIONS)?;
    drop(conn);
    Ok(Db::new(name, location.backend(), pool))
}

fn count_rows(db: &Db, table: &str) -> Result<i64> {
    let mut conn = db.pool().get()?;
    let n = diesel::select(diesel::dsl::sql::<diesel::sql_types::BigInt>(&format!(
        "COUNT(*) FROM {table}"
    )))
    .get_result::<i64>(&mut conn)?;
    Ok(n)
}

/// What the run is measuring against, for the header of each backend.
fn describe_backend(backend: Backend) -> Result<String> {
    let test_db = fresh_database(backend)?;
    let (_, pool) = module_pool(&test_db, "probe")?;
    let mut conn = pool.get()?;
    let text = |conn: &mut AnyConnection, expr: &str| -> Result<String> {
        Ok(
            diesel::select(diesel::dsl::sql::<diesel::sql_types::Text>(expr))
                .get_result::<String>(conn)?,
        )
    };
    Ok(match &test_db {
        TestDatabase::Sqlite { dir } => {
            format!(
                "SQLite {}, journal_mode={}, synchronous={} (1 = NORMAL), files under {} ({})",
                text(&mut conn, "sqlite_version()")?,
                text(&mut conn, "journal_mode FROM pragma_journal_mode")?,
                text(
                    &mut conn,
                    "CAST(synchronous AS TEXT) FROM pragma_synchronous"
                )?,
                std::env::temp_dir().display(),
                filesystem_of(dir)
            )
        }
        TestDatabase::Postgres { .. } => format!(
            "PostgreSQL {}, synchronous_commit={}, fsync={}, on {}",
            text(&mut conn, "current_setting('server_version')")?,
            text(&mut conn, "current_setting('synchronous_commit')")?,
            text(&mut conn, "current_setting('fsync')")?,
            kernel::db::redact(&test_db.url())
        ),
    })
}

/// The filesystem type `path` lives on, from /proc/mounts (best effort).
fn filesystem_of(path: &Path) -> String {
    let Ok(mounts) = std::fs::read_to_string("/proc/mounts") else {
        return "filesystem unknown".into();
    };
    let path = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    mounts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let _device = fields.next()?;
            let mount = fields.next()?;
            let fstype = fields.next()?;
            path.starts_with(mount)
                .then(|| (mount.len(), format!("{fstype} at {mount}")))
        })
        .max_by_key(|(len, _)| *len)
        .map_or_else(|| "filesystem unknown".into(), |(_, d)| d)
}

// ---------------------------------------------------------------- (a) raw commits

// ---------------------------------------------------------------- (b), (c) the bus

/// Per sequence: when the handler ran and when its pass committed.
#[derive(Default)]
struct Marks {
    handler_at: Vec<Option<Instant>>,
    handled_at: Vec<Option<Instant>>,
    handled: usize,
    passes: usize,
    largest_pass: usize,
}

struct Tracker {
    marks: Mutex<Marks>,
    progress: watch::Sender<usize>,
}

impl Tracker {
    fn new(total: usize) -> Self {
        Self {
            marks: Mutex::new(Marks {
                handler_at: vec![None; total + 1],
                handled_at: vec![None; total + 1],
                ..Marks::default()
            }),
            progress: watch::Sender::new(0),
        }
    }

    fn marks(&self) -> std::sync::MutexGuard<'_, Marks> {
        self.marks.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Handles `alpha` events by writing one state row; the engine adds the inbox row.
struct Handler {
    tracker: Arc<Tracker>,
}

impl EventHandler for Handler {
    fn handle(&self, conn: &mut AnyConnection, event: &Envelope) -> Result<(), HandlerError> {
        let payload = event
            .decode::<BenchHappened>()
            .ok_or_else(|| HandlerError::Permanent(format!("unexpected {}", event.name)))??;
        diesel::insert_into(bus_test_effects::table)
            .values((
                bus_test_effects::event_id.eq(event.event_id.to_string()),
                bus_test_effects::consumer.eq("beta"),
                bus_test_effects::aggregate_id.eq(&event.aggregate_id),
                bus_test_effects::sequence.eq(payload.n),
                bus_test_effects::position.eq(event.sequence),
            ))
            .execute(conn)?;
        let now = Instant::now();
        let mut marks = self.tracker.marks();
        if let Some(slot) = usize::try_from(event.sequence)
            .ok()
            .and_then(|s| marks.handler_at.get_mut(s))
        {
            *slot = Some(now);
        }
        Ok(())
    }
}

/// The transport's subscription, unchanged, plus a stamp on every event of a pass
/// once the engine settles it as committed.
struct Timed {
    inner: Box<dyn Subscription>,
    in_pass: Vec<i64>,
    tracker: Arc<Tracker>,
}

impl Subscription for Timed {
    fn wait(&mut self, timeout: Duration) -> BoxFuture<'_, bool> {
        self.inner.wait(timeout)
    }

    fn nothing_wanted(&mut self, wants: &dyn Fn(&str) -> bool) -> Result<bool, BusError> {
        self.inner.nothing_wanted(wants)
    }

    fn may_redeliver(&self) -> bool {
        self.inner.may_redeliver()
    }

    fn wake_for(&mut self, events: &'static [&'static str]) {
        self.inner.wake_for(events)
    }

    fn queued(&mut self) -> Option<kernel::bus::Queued> {
        self.inner.queued()
    }

    fn rewind(&mut self) {
        self.inner.rewind()
    }

    fn pull(&mut self, conn: &mut AnyConnection, max: usize) -> Result<Vec<Envelope>, BusError> {
        let events = self.inner.pull(conn, max)?;
        self.in_pass = events.iter().map(|e| e.sequence).collect();
        Ok(events)
    }

    fn advance(
        &mut self,
        conn: &mut AnyConnection,
        last: &Envelope,
        handled: &Handled<'_>,
    ) -> Result<(), BusError> {
        self.inner.advance(conn, last, handled)
    }

    fn settle(&mut self, committed: bool) -> BoxFuture<'_, ()> {
        let now = Instant::now();
        if committed && !self.in_pass.is_empty() {
            let handled = {
                let mut marks = self.tracker.marks();
                marks.passes += 1;
                marks.largest_pass = marks.largest_pass.max(self.in_pass.len());
                for &seq in &self.in_pass {
                    let Ok(seq) = usize::try_from(seq) else {
                        continue;
                    };
                    // Only what the handler actually handled in this pass.
                    let ran = marks.handler_at.get(seq).copied().flatten().is_some();
                    if let Some(slot) = marks.handled_at.get_mut(seq)
                        && slot.is_none()
                        && ran
                    {
                        *slot = Some(now);
                        marks.handled += 1;
                    }
                }
                marks.handled
            };
            self.tracker.progress.send_replace(handled);
        }
        self.in_pass.clear();
        self.inner.settle(committed)
    }
}

/// One producer and one consumer module, with the consumer's engine running or not.
struct BusRig {
    producer: Db,
    consumer: Db,
    tracker: Arc<Tracker>,
    stop: watch::Sender<bool>,
    engine: Option<tokio::task::JoinHandle<()>>,
    /// The engine and its subscription while the consumer is not running yet.
    parked: Option<(ConsumerEngine, Box<dyn Subscription>, watch::Receiver<bool>)>,
    published: usize,
    _test_db: TestDatabase,
}

/// What carries the events from producer to consumer.
#[derive(Clone)]
enum Carrier {
    Local,
    /// JetStream, under a subject prefix of this run's own.
    Nats(Arc<NatsTransport>),
}

impl BusRig {
    async fn start(
        backend: Backend,
        total: usize,
        consume: bool,
        carrier: &Carrier,
    ) -> Result<Self> {
        let test_db = fresh_database(backend)?;
        let producer = open(&test_db, "alpha")?;
        let consumer = open(&test_db, "beta")?;
        let (stop, stopped) = watch::channel(false);
        let policy = RetryPolicy::default();
        let inner = match carrier {
            Carrier::Local => {
                let mut transport = LocalTransport::new();
                transport.add_source(producer.clone());
                transport.subscribe("beta", "alpha")?
            }
            Carrier::Nats(nats) => {
                // A fresh stream: each rig's outbox numbers events from 1.
                let _ = nats.delete_stream("alpha").await;
                nats.ensure_stream("alpha").await?;
                let (relay, db, stopped) = (nats.clone(), producer.clone(), stop.subscribe());
                let poll = policy.poll_interval;
                tokio::spawn(async move { relay.relay(db, poll, stopped).await });
                nats.subscribe("beta", "alpha")?
            }
        };
        let tracker = Arc::new(Tracker::new(total));
        let engine = ConsumerEngine::new(
            Consumer {
                name: "beta",
                source: "alpha",
                events: &[],
                prompt: true,
                handler: Arc::new(Handler {
                    tracker: tracker.clone(),
                }),
            },
            consumer.clone(),
            policy,
            Arc::new(Metrics::default()),
        );
        let sub = Box::new(Timed {
            inner,
            in_pass: Vec::new(),
            tracker: tracker.clone(),
        });
        // As the application runs them: SQLite logs copied into their files beside
        // the writers (nothing on PostgreSQL).
        for db in [&producer, &consumer] {
            tokio::spawn(db.clone().checkpoints(stop.subscribe()));
        }
        let mut rig = Self {
            producer,
            consumer,
            tracker,
            stop,
            engine: None,
            parked: Some((engine, sub, stopped)),
            published: 0,
            _test_db: test_db,
        };
        if consume {
            rig.start_consumer();
        }
        Ok(rig)
    }

    fn start_consumer(&mut self) {
        if let Some((engine, sub, stopped)) = self.parked.take() {
            self.engine = Some(tokio::spawn(engine.run(sub, stopped)));
        }
    }

    /// Publishes `count` events, one write transaction each (as `publish()` in the bus
    /// tests), at `rate` events/s or as fast as it commits; returns each commit instant.
    async fn produce(&mut self, count: usize, rate: Option<f64>) -> Result<Vec<Instant>> {
        let db = self.producer.clone();
        let first = self.published + 1;
        let commits = tokio::task::spawn_blocking(move || -> Result<Vec<Instant>> {
            let publisher = Publisher::new("alpha", Uuid::now_v7(), None);
            let note = "x".repeat(64);
            let mut commits = Vec::with_capacity(count);
            let t0 = Instant::now();
            for i in 0..count {
                if let Some(rate) = rate {
                    let due = t0 + Duration::from_secs_f64(i as f64 / rate);
                    let now = Instant::now();
                    if due > now {
                        std::thread::sleep(due - now);
                    }
                }
                let n = i64::try_from(first + i)?;
                let event = BenchHappened {
                    n,
                    note: note.clone(),
                };
                let mut conn = db.pool().get()?;
                // As `Db::write` does: the commit tells the consumer what it published.
                outbox::take_published();
                write_tx(&mut conn, |conn| {
                    publisher.publish(conn, &format!("k{}", n % KEYS), &event)
                })?;
                commits.push(Instant::now());
                drop(conn);
                let published = outbox::take_published();
                let sequence = published.names.first().map(|(_, sequence)| *sequence);
                db.announce(published);
                if sequence != Some(n) {
                    bail!("event {n} got sequence {sequence:?}");
                }
            }
            Ok(commits)
        })
        .await??;
        self.published += count;
        Ok(commits)
    }

    /// Waits until every published event is handled (committed by the consumer).
    async fn drained(&self, limit: Duration) -> Result<()> {
        let target = self.published;
        let mut progress = self.tracker.progress.subscribe();
        let wait = progress.wait_for(|handled| *handled >= target);
        match tokio::time::timeout(limit, wait).await {
            Ok(Ok(_)) => Ok(()),
            _ => bail!(
                "only {} of {target} events handled after {limit:?}",
                *self.tracker.progress.borrow()
            ),
        }
    }

    async fn shutdown(self) -> Result<()> {
        self.stop.send_replace(true);
        let Some(engine) = self.engine else {
            return Ok(());
        };
        engine.await?;
        // Every event had exactly one effect and one inbox row.
        let effects = count_rows(&self.consumer, "bus_test_effects")?;
        let inbox = count_rows(&self.consumer, "colony_inbox")?;
        let expected = i64::try_from(self.published)?;
        if effects != expected || inbox != expected {
            bail!("expected {expected} effects and inbox rows, found {effects} and {inbox}");
        }
        Ok(())
    }
}

struct Throughput {
    events: usize,
    elapsed: Duration,
    producer_elapsed: Duration,
    behind_at_producer_end: usize,
    passes: usize,
    largest_pass: usize,
}

impl Throughput {
    fn per_second(&self) -> f64 {
        self.events as f64 / self.elapsed.as_secs_f64()
    }
    fn producer_per_second(&self) -> f64 {
        self.events as f64 / self.producer_elapsed.as_secs_f64()
    }
}

/// For reading (b): each side on its own.
struct Alone {
    /// The producer loop of (b) with no consumer running, events/s.
    producer: f64,
    /// The consumer then started on that backlog (full batches), events/s.
    consumer: f64,
    consumer_passes: usize,
}

async fn each_side_alone(backend: Backend, events: usize) -> Result<Alone> {
    let mut rig = BusRig::start(backend, events, false, &Carrier::Local).await?;
    let started = Instant::now();
    rig.produce(events, None).await?;
    let producer = events as f64 / started.elapsed().as_secs_f64();
    let started = Instant::now();
    rig.start_consumer();
    rig.drained(Duration::from_secs(300)).await?;
    let (last, consumer_passes) = {
        let m = rig.tracker.marks();
        let last = m.handled_at.iter().flatten().max().copied();
        (last.unwrap_or(started), m.passes)
    };
    rig.shutdown().await?;
    Ok(Alone {
        producer,
        consumer: events as f64 / (last - started).as_secs_f64(),
        consumer_passes,
    })
}

/// (b): N events as fast as one producer commits them; from the first timed commit
/// until the last event's consumer transaction committed.
async fn bus_throughput(backend: Backend, events: usize) -> Result<Throughput> {
    let mut rig = BusRig::start(backend, WARMUP_EVENTS + events, true, &Carrier::Local).await?;
    rig.produce(WARMUP_EVENTS, None).await?;
    rig.drained(Duration::from_secs(30)).await?;
    let passes_before = rig.tracker.marks().passes;
    let started = Instant::now();
    let commits = rig.produce(events, None).await?;
    let producer_done = Instant::now();
    let behind_at_producer_end = rig.published - *rig.tracker.progress.borrow();
    rig.drained(Duration::from_secs(300)).await?;
    let (first_commit, last_handled, passes, largest_pass) = {
        let m = rig.tracker.marks();
        let first = commits.first().copied().unwrap_or(started);
        let last = m.handled_at[WARMUP_EVENTS + 1..]
            .iter()
            .flatten()
            .max()
            .copied()
            .ok_or_else(|| anyhow!("no event handled"))?;
        (first, last, m.passes - passes_before, m.largest_pass)
    };
    rig.shutdown().await?;
    Ok(Throughput {
        events,
        elapsed: last_handled - first_commit,
        producer_elapsed: producer_done - started,
        behind_at_producer_end,
        passes,
        largest_pass,
    })
}

struct Latency {
    events: usize,
    rate_asked: f64,
    rate_achieved: f64,
    committed: Percentiles,
    handler: Percentiles,
    passes: usize,
}

/// (c), and (d) over NATS: events paced at `rate`; per event, from its producer
/// commit to its consumer commit (and, for reference, to the moment the handler ran
/// inside that transaction).
async fn bus_latency(
    backend: Backend,
    rate: f64,
    events: usize,
    carrier: &Carrier,
) -> Result<Latency> {
    let mut rig = BusRig::start(backend, WARMUP_EVENTS + events, true, carrier).await?;
    rig.produce(WARMUP_EVENTS, None).await?;
    rig.drained(Duration::from_secs(30)).await?;
    let passes_before = rig.tracker.marks().passes;
    let started = Instant::now();
    let commits = rig.produce(events, Some(rate)).await?;
    let produced_in = started.elapsed();
    rig.drained(Duration::from_secs(300)).await?;
    let (committed, handler, passes) = {
        let m = rig.tracker.marks();
        let mut committed = Vec::with_capacity(events);
        let mut handler = Vec::with_capacity(events);
        for (i, commit) in commits.iter().enumerate() {
            let seq = WARMUP_EVENTS + 1 + i;
            let since = |t: Option<Instant>| {
                t.map(|t| t.saturating_duration_since(*commit).as_secs_f64() * 1e3)
            };
            committed.extend(since(m.handled_at[seq]));
            handler.extend(since(m.handler_at[seq]));
        }
        (committed, handler, m.passes - passes_before)
    };
    rig.shutdown().await?;
    Ok(Latency {
        events,
        rate_asked: rate,
        rate_achieved: events as f64 / produced_in.as_secs_f64(),
        committed: percentiles(committed),
        handler: percentiles(handler),
        passes,
    })
}

// ---------------------------------------------------------------- report

struct Figures {
    backend: Backend,
    raw: RawRate,
    raw_concurrent: Option<RawRate>,
    alone: Alone,
    bus: Throughput,
    latency: Latency,
    /// (d), when NATS was configured.
    over_nats: Option<Hop>,
}

/// (d): the same paced run in process and over NATS.
struct Hop {
    local: Latency,
    nats: Latency,
}

impl Hop {
    fn added(&self) -> (f64, f64) {
        (
            self.nats.committed.p50 - self.local.committed.p50,
            self.nats.committed.p99 - self.local.committed.p99,
        )
    }
}

fn verdict(ok: bool) -> &'static str {
    if ok { "PASS" } else { "MISS" }
}

fn git_commit() -> String {
    let run = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    match run(&["rev-parse", "--short", "HEAD"]) {
        Some(commit) => {
            let dirty = run(&["status", "--porcelain", "--untracked-files=no"])
                .is_some_and(|s| !s.is_empty());
            if dirty {
                format!("{commit} (with uncommitted changes)")
            } else {
                commit
            }
        }
        None => "unknown (git unavailable)".into(),
    }
}

async fn measure(backend: Backend, args: &Args) -> Result<Figures> {
    let name = backend.as_str();
    println!();
    println!("-- {name} --");
    println!("   {}", describe_backend(backend)?);

    eprintln!(
        "   [{name}] (a) raw commits, 1 writer, {} s ...",
        args.seconds
    );
    let seconds = args.seconds;
    let raw =
        tokio::task::spawn_blocking(move || raw_commit_rate(&fresh_database(backend)?, 1, seconds))
            .await??;
    println!(
        "(a) raw one-row commit txns, 1 writer    {:>10.0} commits/s   ({} in {:.2} s)",
        raw.per_second(),
        raw.commits,
        raw.elapsed.as_secs_f64()
    );
    let raw_concurrent = if backend == Backend::Postgres {
        eprintln!("   [{name}] (a) raw commits, {PG_WRITERS} writers, {seconds} s ...");
        let r = tokio::task::spawn_blocking(move || {
            raw_commit_rate(&fresh_database(backend)?, PG_WRITERS, seconds)
        })
        .await??;
        println!(
            "    raw one-row commit txns, {PG_WRITERS} writers   {:>10.0} commits/s   ({} in {:.2} s)",
            r.per_second(),
            r.commits,
            r.elapsed.as_secs_f64()
        );
        Some(r)
    } else {
        None
    };

    let n = args.events(backend);
    eprintln!("   [{name}] each side alone, {n} events ...");
    let alone = each_side_alone(backend, n).await?;
    println!(
        "    producer alone, no consumer running   {:>10.0} events/s    (one publish transaction per event; for reading (b), not a target)",
        alone.producer
    );
    println!(
        "    consumer alone, draining that backlog {:>10.0} events/s    ({} passes of up to 256; for reading (b), not a target)",
        alone.consumer, alone.consumer_passes
    );
    eprintln!("   [{name}] (b) bus throughput, {n} events ...");
    let bus = bus_throughput(backend, n).await?;
    println!(
        "(b) bus end to end, 1 producer            {:>10.0} events/s    ({} events in {:.2} s, first commit -> last handled)",
        bus.per_second(),
        bus.events,
        bus.elapsed.as_secs_f64()
    );
    println!(
        "    producer during (b) committed         {:>10.0} events/s    ({} still unhandled when it finished; {} consumer passes, largest {})",
        bus.producer_per_second(),
        bus.behind_at_producer_end,
        bus.passes,
        bus.largest_pass
    );
    let ratio = bus.per_second() / raw.per_second();
    println!(
        "    (b)/(a), denominator = 1 writer       {ratio:>10.2}        target >= {TARGET_RATIO}   {}",
        verdict(ratio >= TARGET_RATIO)
    );
    if let Some(c) = &raw_concurrent {
        println!(
            "    (b)/(a {PG_WRITERS} writers), for reference     {:>10.2}        (not the target: (b) has one serial producer)",
            bus.per_second() / c.per_second()
        );
    }

    let rate = bus.per_second() * 0.5;
    let events = ((rate * args.seconds).round() as usize).clamp(200.min(n), n);
    eprintln!("   [{name}] (c) latency at {rate:.0} events/s, {events} events ...");
    let latency = bus_latency(backend, rate, events, &Carrier::Local).await?;
    println!(
        "(c) commit -> handled (consumer txn committed), paced at {:.0} events/s asked, {:.0} achieved, {} events, {} passes",
        latency.rate_asked, latency.rate_achieved, latency.events, latency.passes
    );
    println!(
        "    p50 {:>8.3} ms   target <= {TARGET_P50_MS} ms   {}",
        latency.committed.p50,
        verdict(latency.committed.p50 <= TARGET_P50_MS)
    );
    println!(
        "    p99 {:>8.3} ms   target <= {TARGET_P99_MS} ms  {}",
        latency.committed.p99,
        verdict(latency.committed.p99 <= TARGET_P99_MS)
    );
    println!(
        "    max {:>8.3} ms;  commit -> handler ran (before its commit): p50 {:.3} ms, p99 {:.3} ms",
        latency.committed.max, latency.handler.p50, latency.handler.p99
    );
    let over_nats = match nats_carrier().await? {
        Some(carrier) => {
            let rate = args.hop_rate;
            let events = ((rate * args.seconds).round() as usize).max(100);
            eprintln!(
                "   [{name}] (d) latency at {rate:.0} events/s, locally then over NATS, {events} events each ..."
            );
            let local = bus_latency(backend, rate, events, &Carrier::Local).await?;
            let nats = bus_latency(backend, rate, events, &carrier).await;
            if let Carrier::Nats(transport) = &carrier {
                let _ = transport.delete_stream("alpha").await;
            }
            let nats = nats?;
            let hop = Hop { local, nats };
            println!(
                "(d) one hop over NATS JetStream (relay -> stream -> pull consumer) against the same in process, paced at {rate:.0} events/s, {events} events each"
            );
            let (added_p50, added_p99) = hop.added();
            for (label, local, nats, added, target) in [
                (
                    "p50",
                    hop.local.committed.p50,
                    hop.nats.committed.p50,
                    added_p50,
                    TARGET_ADDED_P50_MS,
                ),
                (
                    "p99",
                    hop.local.committed.p99,
                    hop.nats.committed.p99,
                    added_p99,
                    TARGET_ADDED_P99_MS,
                ),
            ] {
                println!(
                    "    {label} {nats:>8.3} ms over NATS, {local:.3} ms in process: added {added:+.3} ms   target <= +{target} ms   {}",
                    verdict(added <= target)
                );
            }
            println!(
                "    max {:>8.3} ms over NATS, {:.3} ms in process",
                hop.nats.committed.max, hop.local.committed.max
            );
            Some(hop)
        }
        None => {
            println!("(d) SKIPPED: {NATS_ENV} is not set (a NATS server with JetStream)");
            None
        }
    };
    Ok(Figures {
        backend,
        raw,
        raw_concurrent,
        alone,
        bus,
        latency,
        over_nats,
    })
}

/// JetStream under a prefix of this run's own, when `NATS_ENV` is set.
async fn nats_carrier() -> Result<Option<Carrier>> {
    let Some(url) = std::env::var(NATS_ENV).ok().filter(|u| !u.is_empty()) else {
        return Ok(None);
    };
    let prefix = format!("bench{}", Uuid::now_v7().simple());
    let transport = NatsTransport::connect(&url, &prefix)
        .await
        .map_err(|e| anyhow!("{NATS_ENV}={url}: {e}"))?;
    Ok(Some(Carrier::Nats(Arc::new(transport))))
}

fn summary(all: &[Figures]) {
    println!();
    println!(
        "| backend | (a) commits/s, 1 writer | (a) commits/s, {PG_WRITERS} writers | producer alone, events/s | consumer alone, events/s | (b) events/s | (b)/(a), 1 writer | p50 ms | p99 ms | (d) NATS adds, p50 / p99 ms |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for f in all {
        let ratio = f.bus.per_second() / f.raw.per_second();
        println!(
            "| {} | {:.0} | {} | {:.0} | {:.0} | {:.0} | {:.2} {} | {:.3} {} | {:.3} {} | {} |",
            f.backend.as_str(),
            f.raw.per_second(),
            f.raw_concurrent
                .as_ref()
                .map_or_else(|| "–".to_string(), |c| format!("{:.0}", c.per_second())),
            f.alone.producer,
            f.alone.consumer,
            f.bus.per_second(),
            ratio,
            verdict(ratio >= TARGET_RATIO),
            f.latency.committed.p50,
            verdict(f.latency.committed.p50 <= TARGET_P50_MS),
            f.latency.committed.p99,
            verdict(f.latency.committed.p99 <= TARGET_P99_MS),
            f.over_nats.as_ref().map_or_else(
                || "–".to_string(),
                |hop| {
                    let (p50, p99) = hop.added();
                    format!(
                        "{p50:+.3} {} / {p99:+.3} {}",
                        verdict(p50 <= TARGET_ADDED_P50_MS),
                        verdict(p99 <= TARGET_ADDED_P99_MS)
                    )
                }
            ),
        );
    }
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let cores = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    println!("== colony event bus benchmark ==");
    println!(
        "date      {}",
        chrono::Utc::now().format("%Y-%m-%d %H:%M:%S UTC")
    );
    println!("git       {}", git_commit());
    println!("machine   {cores} cores available");
    println!(
        "backends  {}",
        args.backends
            .iter()
            .map(|b| b.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "N         {} events for (b) (+{WARMUP_EVENTS} warm-up); {} s per raw loop and for the (c) run",
        args.backends
            .iter()
            .map(|&b| format!("{} on {}", args.events(b), b.as_str()))
            .collect::<Vec<_>>()
            .join(", "),
        args.seconds
    );
    println!(
        "targets   (b)/(a) >= {TARGET_RATIO}, p50 <= {TARGET_P50_MS} ms, p99 <= {TARGET_P99_MS} ms; (d) adds <= {TARGET_ADDED_P50_MS} ms p50, <= {TARGET_ADDED_P99_MS} ms p99 (printed, not asserted)"
    );

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let explicit = args.backends.len() == 1;
    let mut all = Vec::new();
    for &backend in &args.backends {
        let configured = std::env::var(POSTGRES_ENV).is_ok_and(|v| !v.is_empty());
        if backend == Backend::Postgres && !configured {
            if explicit {
                bail!(
                    "--backend postgres needs {POSTGRES_ENV} (e.g. postgres://postgres@127.0.0.1:5432/postgres)"
                );
            }
            println!();
            println!("-- postgres --");
            println!(
                "   SKIPPED: {POSTGRES_ENV} is not set; set it to a server the benchmark may create databases on."
            );
            continue;
        }
        all.push(runtime.block_on(measure(backend, &args))?);
    }
    summary(&all);
    Ok(())
}
