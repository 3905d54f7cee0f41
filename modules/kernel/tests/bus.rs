#![expect(clippy::unwrap_used, reason = "test helpers panic to fail the test")]

//! The event bus, end to end through real databases: a producer module ("alpha")
//! publishes through its outbox; consumer modules ("beta", "gamma") handle the
//! events in their own databases. Every test runs on SQLite, and on PostgreSQL
//! when `COLONY_TEST_DATABASE_URL` is set.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{NaiveDateTime, Utc};
use colony_kernel as kernel;
use diesel::prelude::*;
use diesel_migrations::{EmbeddedMigrations, embed_migrations};
use kernel::bus::dead_letters::{self, ReplayError};
use kernel::bus::{
    Consumer, ConsumerEngine, EventHandler, HandlerError, LocalTransport, NatsTransport,
    RetryPolicy, Subscription, Transport,
};
use kernel::db::{self, DbError, Location, PoolOptions, write_tx};
use kernel::metrics::Metrics;
use kernel::migrate::{self, Migrations};
use kernel::on_both_backends;
use kernel::outbox::{self, Publisher};
use kernel::testing::TestDatabase;
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

#[derive(Debug, Clone, Serialize, Deserialize)]
struct ThingHappened {
    n: i64,
}

impl contracts::Event for ThingHappened {
    const NAME: &'static str = "alpha.thing_happened.v1";
}

/// Opens (and migrates) the database of module `name`, as a fresh process would.
fn open(test_db: &TestDatabase, name: &'static str) -> Db {
    let location = Location::resolve(&test_db.url(), name).unwrap();
    let options = PoolOptions::default();
    let connector = db::prepare(&location, &options).unwrap();
    let pool = db::pool(connector, &options).unwrap();
    migrate::run_pending(&mut pool.get().unwrap(), name, MIGRATIONS).unwrap();
    Db::new(name, location.backend(), pool)
}

fn publish(db: &Db, key: &str, n: i64) -> Envelope {
    publish_event(db, key, &ThingHappened { n })
}

/// Publishes `event` in a write transaction of its own, as a module does, and
/// returns it as stored.
fn publish_event<E: contracts::Event>(db: &Db, key: &str, event: &E) -> Envelope {
    let mut conn = db.pool().get().unwrap();
    let publisher = Publisher::new("alpha", Uuid::now_v7(), None);
    outbox::take_published();
    write_tx(&mut conn, |conn| publisher.publish(conn, key, event)).unwrap();
    let published = outbox::take_published();
    db.notify_committed();
    let [(_, sequence)] = published.names[..] else {
        panic!("one event published, got {:?}", published.names)
    };
    stored(&mut conn, sequence)
}

/// The event stored in alpha's outbox under `sequence`.
fn stored(conn: &mut AnyConnection, sequence: i64) -> Envelope {
    outbox::read_after(conn, "alpha", sequence - 1, 1)
        .unwrap()
        .pop()
        .unwrap()
        .unwrap()
}

/// What a scripted handler answers for an attempt.
#[derive(Clone, Copy, Debug)]
enum Step {
    Retry,
    Permanent,
}

/// Handles `alpha` events by writing an effect row, unless a scripted failure for
/// the event's `n` says otherwise. Records every attempt and flags overlaps.
struct Recorder {
    consumer: &'static str,
    script: Mutex<HashMap<i64, VecDeque<Step>>>,
    always_fail: bool,
    attempts: Mutex<Vec<(i64, Instant)>>,
    in_flight: Mutex<HashSet<Uuid>>,
    overlaps: AtomicI64,
    position: AtomicI64,
    pause: Duration,
}

impl Recorder {
    fn new(consumer: &'static str) -> Self {
        Self {
            consumer,
            script: Mutex::new(HashMap::new()),
            always_fail: false,
            attempts: Mutex::new(Vec::new()),
            in_flight: Mutex::new(HashSet::new()),
            overlaps: AtomicI64::new(0),
            position: AtomicI64::new(0),
            pause: Duration::ZERO,
        }
    }

    fn failing(mut self) -> Self {
        self.always_fail = true;
        self
    }

    fn script(self, n: i64, steps: &[Step]) -> Self {
        self.script
            .lock()
            .unwrap()
            .insert(n, steps.iter().copied().collect());
        self
    }

    fn attempts_of(&self, n: i64) -> Vec<Instant> {
        self.attempts
            .lock()
            .unwrap()
            .iter()
            .filter(|(m, _)| *m == n)
            .map(|(_, t)| *t)
            .collect()
    }
}

impl EventHandler for Recorder {
    fn handle(&self, conn: &mut AnyConnection, event: &Envelope) -> Result<(), HandlerError> {
        let payload: ThingHappened = event.decode::<ThingHappened>().unwrap()?;
        self.attempts
            .lock()
            .unwrap()
            .push((payload.n, Instant::now()));
        if !self.in_flight.lock().unwrap().insert(event.event_id) {
            self.overlaps.fetch_add(1, Ordering::SeqCst);
        }
        if !self.pause.is_zero() {
            std::thread::sleep(self.pause);
        }
        let step = self
            .script
            .lock()
            .unwrap()
            .get_mut(&payload.n)
            .and_then(VecDeque::pop_front);
        self.in_flight.lock().unwrap().remove(&event.event_id);
        if self.always_fail {
            return Err(HandlerError::Retry("downstream is down".into()));
        }
        match step {
            Some(Step::Retry) => return Err(HandlerError::Retry("not yet".into())),
            Some(Step::Permanent) => return Err(HandlerError::Permanent("poison".into())),
            None => {}
        }
        diesel::insert_into(bus_test_effects::table)
            .values((
                bus_test_effects::event_id.eq(event.event_id.to_string()),
                bus_test_effects::consumer.eq(self.consumer),
                bus_test_effects::aggregate_id.eq(&event.aggregate_id),
                bus_test_effects::sequence.eq(payload.n),
                bus_test_effects::position.eq(self.position.fetch_add(1, Ordering::SeqCst)),
            ))
            .execute(conn)?;
        Ok(())
    }
}

fn policy() -> RetryPolicy {
    RetryPolicy {
        max_attempts: 5,
        base_delay: Duration::from_millis(40),
        max_delay: Duration::from_secs(2),
        batch_size: 64,
        poll_interval: Duration::from_millis(200),
        linger: Duration::ZERO,
    }
}

struct Setup {
    producer: Db,
    consumer: Db,
    transport: Arc<dyn Transport>,
    /// With NATS: the transport (to tear its stream down), the relay's stop switch
    /// and the subject prefix.
    nats: Option<(Arc<NatsTransport>, watch::Sender<bool>, String)>,
}

/// Which transport carries the events.
#[derive(Clone, Copy)]
enum Via {
    Local,
    Nats,
}

fn setup(test_db: &TestDatabase) -> Setup {
    let producer = open(test_db, "alpha");
    let consumer = open(test_db, "beta");
    let mut transport = LocalTransport::new();
    transport.add_source(producer.clone());
    Setup {
        producer,
        consumer,
        transport: Arc::new(transport),
        nats: None,
    }
}

const NATS_ENV: &str = "COLONY_TEST_NATS_URL";

/// The same, with NATS JetStream between producer and consumer (streams of their
/// own) and the producer's outbox relay running.
async fn setup_via(test_db: &TestDatabase, via: Via) -> Setup {
    let Via::Nats = via else {
        return setup(test_db);
    };
    let producer = open(test_db, "alpha");
    let consumer = open(test_db, "beta");
    let prefix = format!("t{}", Uuid::now_v7().simple());
    let nats = Arc::new(nats_process(&prefix).await);
    nats.ensure_stream("alpha").await.unwrap();
    let (stop, stopped) = watch::channel(false);
    let relay = nats.clone();
    let db = producer.clone();
    tokio::spawn(async move { relay.relay(db, Duration::from_millis(100), stopped).await });
    Setup {
        producer,
        consumer,
        transport: nats.clone(),
        nats: Some((nats, stop, prefix)),
    }
}

/// A process's connection to NATS: a short ack wait, so a dead holder's events
/// come again (and its lease ends) within about two seconds.
async fn nats_process(prefix: &str) -> NatsTransport {
    let url = std::env::var(NATS_ENV).unwrap();
    NatsTransport::connect(&url, prefix)
        .await
        .unwrap()
        .with_ack_wait(Duration::from_secs(1))
}

impl Setup {
    async fn teardown(self) {
        if let Some((nats, stop, _)) = self.nats {
            let _ = stop.send(true);
            let _ = nats.delete_stream("alpha").await;
        }
    }
}

/// Whether the NATS scenarios can run here (CI must provide the server).
fn nats_available() -> bool {
    let set = std::env::var(NATS_ENV).is_ok_and(|u| !u.is_empty());
    let in_ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false");
    assert!(set || !in_ci, "CI must provide {NATS_ENV}");
    if !set {
        eprintln!("skipped: {NATS_ENV} is not set");
    }
    set
}

fn engine(db: &Db, handler: Arc<Recorder>, policy: RetryPolicy) -> ConsumerEngine {
    engine_wanting(db, handler, policy, &[])
}

/// A consumer that acts on `events` only (all when empty) and passes the others by.
fn engine_wanting(
    db: &Db,
    handler: Arc<Recorder>,
    policy: RetryPolicy,
    events: &'static [&'static str],
) -> ConsumerEngine {
    let consumer = Consumer {
        name: handler.consumer,
        source: "alpha",
        events,
        prompt: true,
        handler,
    };
    ConsumerEngine::new(consumer, db.clone(), policy, Arc::new(Metrics::default()))
}

fn now() -> NaiveDateTime {
    Utc::now().naive_utc()
}

/// Effects written by `consumer`, as (key, n) in the order they happened.
fn effects(db: &Db, consumer: &str) -> Vec<(String, i64)> {
    let mut conn = db.pool().get().unwrap();
    bus_test_effects::table
        .filter(bus_test_effects::consumer.eq(consumer))
        .order(bus_test_effects::position.asc())
        .select((bus_test_effects::aggregate_id, bus_test_effects::sequence))
        .load(&mut conn)
        .unwrap()
}

fn pass(
    engine: &ConsumerEngine,
    db: &Db,
    sub: &mut Box<dyn Subscription>,
    at: NaiveDateTime,
) -> kernel::bus::PassReport {
    engine
        .pass(&mut db.pool().get().unwrap(), sub.as_mut(), at)
        .unwrap()
}

/// Polls `check` until it holds or `limit` passes.
async fn eventually(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let started = Instant::now();
    while started.elapsed() < limit {
        if check() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    check()
}

async fn undelivered_events_are_delivered_after_a_restart(test_db: TestDatabase, via: Via) {
    {
        // The first process commits events, then dies before any consumer ran.
        let first = setup(&test_db);
        for n in 1..=3 {
            publish(&first.producer, "k1", n);
        }
    }
    let second = setup_via(&test_db, via).await;
    let handler = Arc::new(Recorder::new("beta"));
    let engine = engine(&second.consumer, handler, policy());
    let (stop, stopped) = watch::channel(false);
    let sub = second.transport.subscribe("beta", "alpha").unwrap();
    let running = tokio::spawn(engine.run(sub, stopped));
    let delivered = eventually(Duration::from_secs(10), || {
        effects(&second.consumer, "beta").len() == 3
    })
    .await;
    stop.send(true).unwrap();
    running.await.unwrap();
    assert!(delivered, "got {:?}", effects(&second.consumer, "beta"));
    assert_eq!(
        effects(&second.consumer, "beta"),
        vec![("k1".into(), 1), ("k1".into(), 2), ("k1".into(), 3)]
    );
    second.teardown().await;
}

async fn a_redelivered_event_has_no_second_effect(test_db: TestDatabase) {
    let s = setup(&test_db);
    publish(&s.producer, "k1", 1);
    publish(&s.producer, "k2", 2);
    let handler = Arc::new(Recorder::new("beta"));
    let engine = engine(&s.consumer, handler, policy());
    let mut sub = s.transport.subscribe("beta", "alpha").unwrap();
    assert_eq!(pass(&engine, &s.consumer, &mut sub, now()).handled, 2);
    // The transport forgets it delivered them (as a broker does after a lost ack).
    diesel::update(kernel::schema::colony_consumer_positions::table)
        .set(kernel::schema::colony_consumer_positions::position.eq(0_i64))
        .execute(&mut s.consumer.pool().get().unwrap())
        .unwrap();
    let report = pass(&engine, &s.consumer, &mut sub, now());
    assert_eq!(
        (report.pulled, report.duplicates, report.handled),
        (2, 2, 0)
    );
    assert_eq!(effects(&s.consumer, "beta").len(), 2);
}

async fn a_handler_failing_twice_is_retried_with_growing_delays(test_db: TestDatabase, via: Via) {
    let s = setup_via(&test_db, via).await;
    publish(&s.producer, "k1", 1);
    let handler = Arc::new(Recorder::new("beta").script(1, &[Step::Retry, Step::Retry]));
    let slower = RetryPolicy {
        base_delay: Duration::from_millis(200),
        ..policy()
    };
    let engine = engine(&s.consumer, handler.clone(), slower);
    let (stop, stopped) = watch::channel(false);
    let sub = s.transport.subscribe("beta", "alpha").unwrap();
    let running = tokio::spawn(engine.run(sub, stopped));
    let handled = eventually(Duration::from_secs(10), || {
        effects(&s.consumer, "beta").len() == 1
    })
    .await;
    stop.send(true).unwrap();
    running.await.unwrap();
    assert!(handled, "the event was never handled");
    let attempts = handler.attempts_of(1);
    assert_eq!(attempts.len(), 3, "two failures then one success");
    let first_delay = attempts[1] - attempts[0];
    let second_delay = attempts[2] - attempts[1];
    // Base 200 ms: the first wait is 100–180 ms, the second 200–360 ms. A busy
    // machine can only make a wait longer, so lower bounds are what is checked: a
    // second wait as short as the first would fall below 200 ms.
    assert!(first_delay >= Duration::from_millis(100), "{first_delay:?}");
    assert!(
        second_delay >= Duration::from_millis(200),
        "{first_delay:?} then {second_delay:?}"
    );
    s.teardown().await;
}

async fn a_permanent_failure_is_parked_and_the_consumer_continues(test_db: TestDatabase) {
    let s = setup(&test_db);
    publish(&s.producer, "k1", 1);
    publish(&s.producer, "k1", 2);
    publish(&s.producer, "k2", 3);
    let handler = Arc::new(Recorder::new("beta").script(1, &[Step::Permanent]));
    let engine = engine(&s.consumer, handler, policy());
    let mut sub = s.transport.subscribe("beta", "alpha").unwrap();
    let report = pass(&engine, &s.consumer, &mut sub, now());
    assert_eq!((report.handled, report.parked), (2, 1));
    assert_eq!(
        effects(&s.consumer, "beta"),
        vec![("k1".into(), 2), ("k2".into(), 3)]
    );
    let parked = dead_letters::list(&mut s.consumer.pool().get().unwrap()).unwrap();
    assert_eq!(parked.len(), 1);
    assert_eq!(
        (parked[0].name.as_str(), parked[0].attempts),
        ("alpha.thing_happened.v1", 1)
    );
    assert!(parked[0].error.contains("poison"), "{}", parked[0].error);
}

async fn a_poison_key_does_not_hold_back_other_keys(test_db: TestDatabase) {
    let s = setup(&test_db);
    publish(&s.producer, "poison", 1);
    publish(&s.producer, "healthy", 2);
    publish(&s.producer, "poison", 3);
    publish(&s.producer, "healthy", 4);
    let handler =
        Arc::new(Recorder::new("beta").script(1, &[Step::Retry, Step::Retry, Step::Retry]));
    let engine = engine(&s.consumer, handler, policy());
    let mut sub = s.transport.subscribe("beta", "alpha").unwrap();
    let t0 = now();
    let report = pass(&engine, &s.consumer, &mut sub, t0);
    assert_eq!(
        (report.handled, report.retried, report.queued_behind),
        (2, 1, 1)
    );
    // The healthy key went through; the poisoned key's later event waits its turn.
    assert_eq!(
        effects(&s.consumer, "beta"),
        vec![("healthy".into(), 2), ("healthy".into(), 4)]
    );
    // Later passes, each after the backoff, until the poisoned event succeeds.
    let mut at = t0;
    for _ in 0..4 {
        at += chrono::Duration::seconds(5);
        pass(&engine, &s.consumer, &mut sub, at);
    }
    assert_eq!(
        effects(&s.consumer, "beta"),
        vec![
            ("healthy".into(), 2),
            ("healthy".into(), 4),
            ("poison".into(), 1),
            ("poison".into(), 3)
        ],
        "the poisoned key kept its order"
    );
}

async fn a_broken_consumer_does_not_hold_back_another(test_db: TestDatabase, via: Via) {
    let s = setup_via(&test_db, via).await;
    let gamma = open(&test_db, "gamma");
    for n in 1..=20 {
        publish(&s.producer, &format!("k{}", n % 4), n);
    }
    let broken = engine(
        &s.consumer,
        Arc::new(Recorder::new("beta").failing()),
        policy(),
    );
    let healthy = engine(&gamma, Arc::new(Recorder::new("gamma")), policy());
    let (stop, stopped) = watch::channel(false);
    let a = tokio::spawn(broken.run(
        s.transport.subscribe("beta", "alpha").unwrap(),
        stopped.clone(),
    ));
    let b = tokio::spawn(healthy.run(s.transport.subscribe("gamma", "alpha").unwrap(), stopped));
    let done = eventually(Duration::from_secs(10), || {
        effects(&gamma, "gamma").len() == 20
    })
    .await;
    stop.send(true).unwrap();
    a.await.unwrap();
    b.await.unwrap();
    assert!(
        done,
        "gamma handled only {:?}",
        effects(&gamma, "gamma").len()
    );
    assert!(effects(&s.consumer, "beta").is_empty());
    s.teardown().await;
}

/// Counts the passes that did not commit.
struct CountingFailures {
    inner: Box<dyn Subscription>,
    failed: Arc<AtomicI64>,
}

impl Subscription for CountingFailures {
    fn wait(&mut self, timeout: Duration) -> kernel::bus::BoxFuture<'_, bool> {
        self.inner.wait(timeout)
    }

    fn pull(
        &mut self,
        conn: &mut AnyConnection,
        max: usize,
    ) -> Result<Vec<Envelope>, kernel::bus::BusError> {
        self.inner.pull(conn, max)
    }

    fn advance(
        &mut self,
        conn: &mut AnyConnection,
        last: &Envelope,
        handled: &kernel::bus::Handled<'_>,
    ) -> Result<(), kernel::bus::BusError> {
        self.inner.advance(conn, last, handled)
    }

    fn may_redeliver(&self) -> bool {
        self.inner.may_redeliver()
    }

    fn rewind(&mut self) {
        self.inner.rewind();
    }

    fn settle(&mut self, committed: bool) -> kernel::bus::BoxFuture<'_, ()> {
        if !committed {
            self.failed.fetch_add(1, Ordering::SeqCst);
        }
        self.inner.settle(committed)
    }
}

/// A pass that fails (here: the consumer's inbox table is gone) is run again
/// only after a backoff, even though the events it failed on are in hand.
async fn a_failing_pass_waits_its_backoff(test_db: TestDatabase, via: Via) {
    let s = setup_via(&test_db, via).await;
    publish(&s.producer, "k1", 1);
    diesel::sql_query("DROP TABLE colony_inbox")
        .execute(&mut s.consumer.pool().get().unwrap())
        .unwrap();
    let failed = Arc::new(AtomicI64::new(0));
    let sub = Box::new(CountingFailures {
        inner: s.transport.subscribe("beta", "alpha").unwrap(),
        failed: failed.clone(),
    });
    let engine = engine(&s.consumer, Arc::new(Recorder::new("beta")), policy());
    let (stop, stopped) = watch::channel(false);
    let running = tokio::spawn(engine.run(sub, stopped));
    let failing = eventually(Duration::from_secs(10), || {
        failed.load(Ordering::SeqCst) > 0
    })
    .await;
    assert!(failing, "no pass failed");
    // The backoff starts at half a second and doubles.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.send(true).unwrap();
    running.await.unwrap();
    let failed = failed.load(Ordering::SeqCst);
    assert!(
        failed <= 5,
        "{failed} failed passes in about 1.5 s: retried without backing off"
    );
    s.teardown().await;
}

async fn a_failing_pass_waits_its_backoff_locally(test_db: TestDatabase) {
    a_failing_pass_waits_its_backoff(test_db, Via::Local).await;
}

async fn a_rolled_back_transaction_publishes_nothing(test_db: TestDatabase) {
    let s = setup(&test_db);
    let mut conn = s.producer.pool().get().unwrap();
    let publisher = Publisher::new("alpha", Uuid::now_v7(), None);
    // Appended at once, so that on PostgreSQL it takes a number (a queued event
    // would take none: `a_transaction_appends_its_events_in_the_order_published`).
    let result: Result<(), diesel::result::Error> = write_tx(&mut conn, |conn| {
        publisher.publish_now(conn, "k1", &ThingHappened { n: 1 })?;
        Err(diesel::result::Error::RollbackTransaction)
    });
    assert!(result.is_err());
    assert_eq!(outbox::last_sequence(&mut conn).unwrap(), 0);
    let engine = engine(&s.consumer, Arc::new(Recorder::new("beta")), policy());
    let mut sub = s.transport.subscribe("beta", "alpha").unwrap();
    assert_eq!(pass(&engine, &s.consumer, &mut sub, now()).pulled, 0);
    let next = publish(&s.producer, "k1", 2);
    match s.producer.backend() {
        // The next event takes sequence 1: no gap was left behind.
        kernel::db::Backend::Sqlite => assert_eq!(next.sequence, 1),
        // Sequence 1 was taken and rolled back: a gap, which readers pass once the
        // transaction that took it has ended (it has).
        kernel::db::Backend::Postgres => assert_eq!(next.sequence, 2),
    }
    let mut handled = 0;
    let passed = eventually(Duration::from_secs(10), || {
        handled += pass(&engine, &s.consumer, &mut sub, now()).handled;
        handled > 0
    })
    .await;
    assert!(passed, "the event after the gap was never handled");
    assert_eq!(effects(&s.consumer, "beta"), vec![("k1".into(), 2)]);
}

/// A write transaction's events are stored in the order it published them, with
/// numbers in that order. On PostgreSQL they are queued and appended together just
/// before the commit, by one statement prepared once: none is there before, and a
/// transaction that rolls back takes no number. Events published in a savepoint
/// that rolls back are dropped from the queue.
async fn a_transaction_appends_its_events_in_the_order_published(test_db: TestDatabase) {
    let s = setup(&test_db);
    let postgres = s.producer.backend() == kernel::db::Backend::Postgres;
    let mut conn = s.producer.pool().get().unwrap();
    let publisher = Publisher::new("alpha", Uuid::now_v7(), None);
    let rolled_back: Result<(), diesel::result::Error> = write_tx(&mut conn, |conn| {
        publisher.publish(conn, "a", &ThingHappened { n: -1 })?;
        Err(diesel::result::Error::RollbackTransaction)
    });
    assert!(rolled_back.is_err());
    for (count, first) in [(5, 0), (2, 10)] {
        write_tx(&mut conn, |conn| {
            for n in first..first + count {
                let key = if n % 2 == 0 { "a" } else { "b" };
                publisher.publish(conn, key, &ThingHappened { n })?;
                if n == first + 1 {
                    // A savepoint that publishes and rolls back, as a consumer's
                    // failed attempt does.
                    let mark = outbox::queued_mark(conn);
                    let undone = conn.transaction::<(), _, _>(|conn| {
                        publisher.publish(conn, "a", &ThingHappened { n: -2 })?;
                        Err(diesel::result::Error::RollbackTransaction)
                    });
                    assert!(undone.is_err());
                    outbox::forget_queued(conn, mark);
                }
            }
            let stored_yet = outbox::last_sequence(conn)?;
            let before = if first == 0 { 0 } else { 5 };
            let expected = if postgres { before } else { before + count };
            assert_eq!(stored_yet, expected, "events stored before the commit");
            Ok::<_, diesel::result::Error>(())
        })
        .unwrap();
    }
    let stored: Vec<(i64, String, i64)> = outbox::read_after(&mut conn, "alpha", 0, 100)
        .unwrap()
        .into_iter()
        .map(|e| {
            let e = e.unwrap();
            (e.sequence, e.aggregate_id, e.payload["n"].as_i64().unwrap())
        })
        .collect();
    let numbers: Vec<i64> = stored.iter().map(|(_, _, n)| *n).collect();
    assert_eq!(numbers, [0, 1, 2, 3, 4, 10, 11]);
    let keys: Vec<&str> = stored.iter().map(|(_, key, _)| key.as_str()).collect();
    assert_eq!(keys, ["a", "b", "a", "b", "a", "a", "b"]);
    let sequences: Vec<i64> = stored.iter().map(|(sequence, _, _)| *sequence).collect();
    assert_eq!(
        sequences,
        [1, 2, 3, 4, 5, 6, 7],
        "no number taken by what rolled back"
    );
    if postgres {
        let appending = kernel::testing::prepared_statements(
            &mut conn,
            "WITH colony_tx AS MATERIALIZED (SELECT pg_current_xact_id()) INSERT INTO colony_outbox",
        );
        assert_eq!(appending.len(), 1, "{appending:?}");
    }
}

/// Publication order holds within a transaction whatever appends when: an event
/// appended at once comes after those queued before it, and a write transaction
/// nested on the same connection (a savepoint) joins the queue, which keeps its
/// events if it commits and drops them if it rolls back.
async fn publication_order_holds_across_savepoints_and_immediate_appends(test_db: TestDatabase) {
    let s = setup(&test_db);
    let mut conn = s.producer.pool().get().unwrap();
    let publisher = Publisher::new("alpha", Uuid::now_v7(), None);
    let thing = |n| ThingHappened { n };
    write_tx(&mut conn, |conn| {
        publisher.publish(conn, "k", &thing(1))?;
        let now = publisher.publish_now(conn, "k", &thing(2))?;
        assert_eq!(now.sequence, 2, "appended after the event queued before it");
        // A nested `write_tx` (SQLite, whose write transactions begin with
        // `BEGIN IMMEDIATE`, takes a savepoint of diesel's instead).
        fn nested(
            conn: &mut AnyConnection,
            f: impl FnOnce(&mut AnyConnection) -> QueryResult<()>,
        ) -> QueryResult<()> {
            match conn {
                AnyConnection::Postgresql(_) => write_tx(conn, f),
                AnyConnection::Sqlite(_) => conn.transaction(f),
            }
        }
        nested(conn, |conn| publisher.publish(conn, "k", &thing(3)))?;
        let undone = nested(conn, |conn| {
            publisher.publish(conn, "k", &thing(-1))?;
            Err(diesel::result::Error::RollbackTransaction)
        });
        assert!(undone.is_err());
        publisher.publish(conn, "k", &thing(4))
    })
    .unwrap();
    let stored: Vec<(i64, i64)> = outbox::read_after(&mut conn, "alpha", 0, 100)
        .unwrap()
        .into_iter()
        .map(|e| {
            let e = e.unwrap();
            (e.sequence, e.payload["n"].as_i64().unwrap())
        })
        .collect();
    assert_eq!(stored, [(1, 1), (2, 2), (3, 3), (4, 4)]);
}

/// The events a consumer acts on when it passes `NoiseHappened` by.
const THINGS: &[&str] = &["alpha.thing_happened.v1"];

#[derive(Debug, Clone, Serialize, Deserialize)]
struct NoiseHappened {
    n: i64,
}

impl contracts::Event for NoiseHappened {
    const NAME: &'static str = "alpha.noise_happened.v1";
}

/// The consumer's stored position and when a pass last touched it (none before
/// its first pass).
fn stored_position(db: &Db, consumer: &str) -> (i64, Option<NaiveDateTime>) {
    use kernel::schema::colony_consumer_positions as p;
    p::table
        .filter(p::consumer.eq(consumer))
        .filter(p::source.eq("alpha"))
        .select((p::position, p::updated_at))
        .get_result::<(i64, NaiveDateTime)>(&mut db.pool().get().unwrap())
        .optional()
        .unwrap()
        .map_or((0, None), |(position, at)| (position, Some(at)))
}

/// Events a consumer does not act on wake it, but cost it no transaction: they are
/// passed by outside a pass, the next pass starts after them, and the stored
/// position catches up with them within about a second even when nothing else
/// comes.
async fn events_passed_by_commit_nothing(test_db: TestDatabase) {
    let s = setup(&test_db);
    let handler = Arc::new(Recorder::new("beta"));
    let engine = engine_wanting(&s.consumer, handler, policy(), THINGS);
    let (stop, stopped) = watch::channel(false);
    let sub = s.transport.subscribe("beta", "alpha").unwrap();
    let running = tokio::spawn(engine.run(sub, stopped));
    let publish_noise = |n: i64| publish_event(&s.producer, "k1", &NoiseHappened { n });

    let first = publish(&s.producer, "k1", 1);
    let handled = eventually(Duration::from_secs(10), || {
        stored_position(&s.consumer, "beta").0 == first.sequence
    })
    .await;
    assert!(handled, "the first event was never handled");
    let (_, touched) = stored_position(&s.consumer, "beta");
    let started = Instant::now();
    for n in 0..20 {
        publish_noise(n);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let quiet = started.elapsed() < Duration::from_millis(900);
    let after_noise = stored_position(&s.consumer, "beta");

    let wanted = publish(&s.producer, "k1", 2);
    let handled = eventually(Duration::from_secs(10), || {
        stored_position(&s.consumer, "beta").0 == wanted.sequence
    })
    .await;
    assert!(handled, "the event after the noise was never handled");
    for n in 20..24 {
        publish_noise(n);
    }
    let last_noise = publish_noise(24);
    let caught_up = eventually(Duration::from_secs(5), || {
        stored_position(&s.consumer, "beta").0 == last_noise.sequence
    })
    .await;
    stop.send(true).unwrap();
    running.await.unwrap();

    if quiet {
        assert_eq!(
            after_noise,
            (first.sequence, touched),
            "a consumer woken only by events it passes by ran a pass"
        );
    }
    assert_eq!(
        effects(&s.consumer, "beta"),
        vec![("k1".into(), 1), ("k1".into(), 2)]
    );
    assert!(
        caught_up,
        "the stored position never caught up with events passed by"
    );
}

/// PostgreSQL numbers events when they are published, and they become visible when
/// their transactions commit: a reader must not hand on a later number while an
/// earlier one may still commit.
async fn an_event_committed_after_a_later_one_is_not_skipped(test_db: TestDatabase) {
    let s = setup(&test_db);
    let engine = engine(&s.consumer, Arc::new(Recorder::new("beta")), policy());
    let mut sub = s.transport.subscribe("beta", "alpha").unwrap();
    // An open transaction takes sequence 1 ...
    let mut slow = s.producer.pool().get().unwrap();
    fn pg(conn: &mut kernel::db::AnyConnection) -> &mut diesel::PgConnection {
        match conn {
            kernel::db::AnyConnection::Postgresql(c) => c,
            kernel::db::AnyConnection::Sqlite(_) => unreachable!("PostgreSQL only"),
        }
    }
    type Manager = diesel::connection::AnsiTransactionManager;
    <Manager as diesel::connection::TransactionManager<diesel::PgConnection>>::begin_transaction(
        pg(&mut slow),
    )
    .unwrap();
    let first = Publisher::new("alpha", Uuid::now_v7(), None)
        .publish_now(&mut slow, "k1", &ThingHappened { n: 1 })
        .unwrap();
    // ... while another commits sequence 2 about another key.
    let second = publish(&s.producer, "k2", 2);
    assert_eq!((first.sequence, second.sequence), (1, 2));
    for _ in 0..3 {
        let report = pass(&engine, &s.consumer, &mut sub, now());
        assert_eq!(report.pulled, 0, "2 handed on while 1 may still commit");
    }
    <Manager as diesel::connection::TransactionManager<diesel::PgConnection>>::commit_transaction(
        pg(&mut slow),
    )
    .unwrap();
    let report = pass(&engine, &s.consumer, &mut sub, now());
    assert_eq!(report.handled, 2);
    assert_eq!(
        effects(&s.consumer, "beta"),
        vec![("k1".into(), 1), ("k2".into(), 2)]
    );
}

/// The same when the transaction holding the missing number is the younger one:
/// an older transaction (it wrote first) publishes after it and commits, so the
/// newest finished transaction id is below the holder's. The reader must still wait.
async fn an_event_of_a_younger_transaction_is_not_skipped(test_db: TestDatabase) {
    let s = setup(&test_db);
    let engine = engine(&s.consumer, Arc::new(Recorder::new("beta")), policy());
    let mut sub = s.transport.subscribe("beta", "alpha").unwrap();
    fn pg(conn: &mut kernel::db::AnyConnection) -> &mut diesel::PgConnection {
        match conn {
            kernel::db::AnyConnection::Postgresql(c) => c,
            kernel::db::AnyConnection::Sqlite(_) => unreachable!("PostgreSQL only"),
        }
    }
    type Manager = diesel::connection::AnsiTransactionManager;
    use diesel::connection::TransactionManager;
    let (mut older, mut younger) = (
        s.producer.pool().get().unwrap(),
        s.producer.pool().get().unwrap(),
    );
    // The older transaction takes its id first (any write does) ...
    Manager::begin_transaction(pg(&mut older)).unwrap();
    diesel::sql_query("SELECT pg_current_xact_id()")
        .execute(&mut *older)
        .unwrap();
    // ... the younger one takes an id and sequence 1, and stays open ...
    Manager::begin_transaction(pg(&mut younger)).unwrap();
    let first = Publisher::new("alpha", Uuid::now_v7(), None)
        .publish_now(&mut younger, "k1", &ThingHappened { n: 1 })
        .unwrap();
    // ... while the older one publishes sequence 2 and commits.
    let second = Publisher::new("alpha", Uuid::now_v7(), None)
        .publish_now(&mut older, "k2", &ThingHappened { n: 2 })
        .unwrap();
    Manager::commit_transaction(pg(&mut older)).unwrap();
    assert_eq!((first.sequence, second.sequence), (1, 2));
    for _ in 0..3 {
        let report = pass(&engine, &s.consumer, &mut sub, now());
        assert_eq!(report.pulled, 0, "2 handed on while 1 may still commit");
    }
    Manager::commit_transaction(pg(&mut younger)).unwrap();
    let report = pass(&engine, &s.consumer, &mut sub, now());
    assert_eq!(report.handled, 2);
    assert_eq!(
        effects(&s.consumer, "beta"),
        vec![("k1".into(), 1), ("k2".into(), 2)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_of_a_younger_transaction_is_not_skipped_on_postgres() {
    match TestDatabase::postgres() {
        Some(db) => an_event_of_a_younger_transaction_is_not_skipped(db).await,
        None => eprintln!("skipped: {} is not set", kernel::testing::POSTGRES_ENV),
    }
}

/// A SQLite module's write-ahead log is copied into its file by a task beside the
/// writers, not by the writer whose commit happens to fill it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_logs_are_checkpointed_beside_the_writers() {
    let test_db = TestDatabase::sqlite();
    let db = open(&test_db, "alpha");
    let Location::SqliteFile(file) = Location::resolve(&test_db.url(), "alpha").unwrap() else {
        unreachable!("a SQLite location");
    };
    let size = || std::fs::metadata(&file).unwrap().len();
    for n in 0..100 {
        publish(&db, "k1", n);
    }
    // Below the automatic checkpoint (1 000 pages): the events are in the log only.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = size();
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(db.clone().checkpoints(stopped));
    let copied = eventually(Duration::from_secs(5), || size() > before).await;
    stop.send(true).unwrap();
    task.await.unwrap();
    assert!(copied, "the database file stayed at {before} bytes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_committed_after_a_later_one_is_not_skipped_on_postgres() {
    match TestDatabase::postgres() {
        Some(db) => an_event_committed_after_a_later_one_is_not_skipped(db).await,
        None => eprintln!("skipped: {} is not set", kernel::testing::POSTGRES_ENV),
    }
}

async fn two_bus_instances_never_handle_the_same_event_at_once(test_db: TestDatabase) {
    let s = setup(&test_db);
    for n in 1..=120 {
        publish(&s.producer, &format!("k{}", n % 7), n);
    }
    // Two instances: separate pools on the same databases, one handler's bookkeeping
    // so an overlap between them would show.
    let mut shared = Recorder::new("beta");
    shared.pause = Duration::from_millis(1);
    let handler = Arc::new(shared);
    let other = setup(&test_db);
    let small = RetryPolicy {
        batch_size: 8,
        ..policy()
    };
    let first = engine(&s.consumer, handler.clone(), small.clone());
    let second = engine(&other.consumer, handler.clone(), small);
    let (stop, stopped) = watch::channel(false);
    let a = tokio::spawn(first.run(
        s.transport.subscribe("beta", "alpha").unwrap(),
        stopped.clone(),
    ));
    let b = tokio::spawn(second.run(other.transport.subscribe("beta", "alpha").unwrap(), stopped));
    let done = eventually(Duration::from_secs(30), || {
        effects(&s.consumer, "beta").len() >= 120
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.send(true).unwrap();
    a.await.unwrap();
    b.await.unwrap();
    assert!(done, "only {} handled", effects(&s.consumer, "beta").len());
    assert_eq!(
        handler.overlaps.load(Ordering::SeqCst),
        0,
        "an event was handled twice at once"
    );
    let all = effects(&s.consumer, "beta");
    let distinct: HashSet<i64> = all.iter().map(|(_, n)| *n).collect();
    assert_eq!(
        (all.len(), distinct.len()),
        (120, 120),
        "each event exactly once"
    );
}

/// Two replicas of one consumer in one process, both woken by every commit, while
/// a quarter of the events fail once: a retry one replica queues holds back the
/// key's later events in the other too, so every key keeps its order.
async fn replicas_keep_key_order_through_retries(test_db: TestDatabase) {
    let s = setup(&test_db);
    let mut handler = Recorder::new("beta");
    for w in 0..6_i64 {
        for i in (1..40_i64).step_by(4) {
            handler = handler.script(w * 1000 + i, &[Step::Retry]);
        }
    }
    // Both replicas in this process, so both wake for every commit.
    two_replicas_handle_240_in_key_order(&test_db, &s, &Arc::new(handler), &*s.transport).await;
}

/// Runs two replicas of beta on `handler` (the second with its own pool on the same
/// database, subscribed through `other`) while six writers publish 240 events at
/// once; checks that each event took effect once, in key order.
async fn two_replicas_handle_240_in_key_order(
    test_db: &TestDatabase,
    s: &Setup,
    handler: &Arc<Recorder>,
    other: &dyn Transport,
) {
    let small = RetryPolicy {
        batch_size: 8,
        ..policy()
    };
    let first = engine(&s.consumer, handler.clone(), small.clone());
    let second = engine(&open(test_db, "beta"), handler.clone(), small);
    let (stop, stopped) = watch::channel(false);
    let a = tokio::spawn(first.run(
        s.transport.subscribe("beta", "alpha").unwrap(),
        stopped.clone(),
    ));
    let b = tokio::spawn(second.run(other.subscribe("beta", "alpha").unwrap(), stopped));
    publish_concurrently(&s.producer).await;
    let done = eventually(Duration::from_secs(30), || {
        effects(&s.consumer, "beta").len() >= 240
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.send(true).unwrap();
    a.await.unwrap();
    b.await.unwrap();
    assert!(done, "only {} handled", effects(&s.consumer, "beta").len());
    assert_once_in_key_order(&effects(&s.consumer, "beta"), 240);
}

async fn replaying_a_dead_letter_delivers_it_once(test_db: TestDatabase) {
    let s = setup(&test_db);
    publish(&s.producer, "k1", 1);
    let handler = Arc::new(Recorder::new("beta").script(1, &[Step::Permanent]));
    let engine = engine(&s.consumer, handler, policy());
    let mut sub = s.transport.subscribe("beta", "alpha").unwrap();
    assert_eq!(pass(&engine, &s.consumer, &mut sub, now()).parked, 1);
    assert!(effects(&s.consumer, "beta").is_empty());
    let mut conn = s.consumer.pool().get().unwrap();
    let id = dead_letters::list(&mut conn).unwrap()[0].id.clone();
    write_tx(&mut conn, |c| dead_letters::replay(c, &id)).unwrap();
    assert!(matches!(
        write_tx(&mut conn, |c| dead_letters::replay(c, &id)),
        Err(ReplayError::AlreadyReplayed(_))
    ));
    drop(conn);
    for _ in 0..3 {
        pass(&engine, &s.consumer, &mut sub, now());
    }
    assert_eq!(effects(&s.consumer, "beta"), vec![("k1".into(), 1)]);
    assert!(
        dead_letters::list(&mut s.consumer.pool().get().unwrap())
            .unwrap()
            .is_empty()
    );
}

async fn concurrent_publishers_lose_nothing_and_keep_key_order(test_db: TestDatabase, via: Via) {
    let s = setup_via(&test_db, via).await;
    let handler = Arc::new(Recorder::new("beta"));
    let engine = engine(&s.consumer, handler, policy());
    let (stop, stopped) = watch::channel(false);
    let running =
        tokio::spawn(engine.run(s.transport.subscribe("beta", "alpha").unwrap(), stopped));
    publish_concurrently(&s.producer).await;
    all_240_once_in_key_order(&s.consumer, stop, running).await;
    s.teardown().await;
}

/// Commits wake the readers of the events they published, and no others.
async fn commits_wake_only_readers_of_their_events(test_db: TestDatabase) {
    let s = setup(&test_db);
    let mut everything = s.producer.publications();
    let mut things = s.producer.publications_of(THINGS);
    let mut any_name = s.producer.publications_of(&[]);
    let publisher = Publisher::new("alpha", Uuid::now_v7(), None);

    let p = publisher.clone();
    s.producer
        .write(move |conn| Ok::<_, DbError>(p.publish(conn, "k1", &NoiseHappened { n: 1 })?))
        .await
        .unwrap();
    assert!(
        everything.has_changed().unwrap(),
        "the outbox's readers slept"
    );
    assert!(
        any_name.has_changed().unwrap(),
        "a reader of every event slept"
    );
    assert!(
        !things.has_changed().unwrap(),
        "a reader of other events was woken"
    );
    everything.borrow_and_update();
    any_name.borrow_and_update();

    // Nothing published, nobody woken.
    s.producer.write(|_| Ok::<_, DbError>(())).await.unwrap();
    assert!(!everything.has_changed().unwrap());

    let p = publisher.clone();
    s.producer
        .write(move |conn| {
            p.publish(conn, "k1", &ThingHappened { n: 2 })?;
            p.publish(conn, "k1", &NoiseHappened { n: 3 })?;
            Ok::<_, DbError>(())
        })
        .await
        .unwrap();
    let stored = outbox::read_after(&mut s.producer.pool().get().unwrap(), "alpha", 0, 100)
        .unwrap()
        .into_iter()
        .map(Result::unwrap)
        .collect::<Vec<_>>();
    let last = |name: &str| {
        stored
            .iter()
            .rev()
            .find(|e| e.name == name)
            .unwrap()
            .sequence
    };
    use contracts::Event;
    let (thing, noise) = (last(ThingHappened::NAME), last(NoiseHappened::NAME));
    assert!(things.has_changed().unwrap(), "the reader of things slept");
    assert!(everything.has_changed().unwrap());
    // Each reader learns the highest number of the events it reads.
    assert_eq!(things.borrow_and_update().up_to, thing);
    assert_eq!(any_name.borrow_and_update().up_to, noise);
    // A commit that does not say what it published wakes every reader.
    s.producer.notify_committed();
    let told = *things.borrow_and_update();
    assert_eq!((told.up_to, told.unknown), (thing, 1));

    // A rolled-back transaction wakes nobody, and the next commit does not
    // announce its events either.
    let p = publisher.clone();
    let failed = s
        .producer
        .write(move |conn| {
            p.publish(conn, "k1", &ThingHappened { n: 4 })?;
            Err::<(), _>(DbError::from(diesel::result::Error::RollbackTransaction))
        })
        .await;
    assert!(failed.is_err());
    assert!(!things.has_changed().unwrap(), "a rollback woke a reader");
    let p = publisher;
    s.producer
        .write(move |conn| Ok::<_, DbError>(p.publish(conn, "k1", &NoiseHappened { n: 5 })?))
        .await
        .unwrap();
    assert!(
        !things.has_changed().unwrap(),
        "the events of a rolled-back transaction were announced by the next commit"
    );
}

/// A local reader takes what this process's commits kept only as a run of numbers
/// with none missing from its position on. At a missing number that a later kept
/// one follows, at one never kept, or with nothing new kept, it reads the outbox.
#[test]
fn kept_events_are_taken_only_without_gaps() {
    let test_db = TestDatabase::sqlite();
    let db = open(&test_db, "alpha");
    let envelope = |sequence: i64| Envelope {
        event_id: Uuid::now_v7(),
        name: <ThingHappened as contracts::Event>::NAME.into(),
        source: "alpha".into(),
        aggregate_id: "k".into(),
        sequence,
        occurred_at: Utc::now(),
        correlation_id: Uuid::now_v7(),
        causation_id: None,
        traceparent: None,
        payload: serde_json::json!({ "n": sequence }),
    };
    let commit = |numbers: &[i64], complete: bool| {
        db.announce(outbox::Publications {
            names: vec![(
                <ThingHappened as contracts::Event>::NAME,
                *numbers.iter().max().unwrap(),
            )],
            envelopes: numbers.iter().map(|&n| envelope(n)).collect(),
            complete,
        })
    };
    let taken = |after: i64, max: usize| {
        db.committed_after(after, max)
            .map(|run| run.iter().map(|e| e.sequence).collect::<Vec<_>>())
    };
    commit(&[1], true);
    assert_eq!(taken(0, 10), None, "kept before anyone asked");
    db.keep_recent();
    commit(&[1, 2], true);
    // 3 is still running, or rolled back.
    commit(&[4], true);
    assert_eq!(
        taken(0, 10),
        None,
        "a run stopping short of a later kept number"
    );
    assert_eq!(taken(0, 2), Some(vec![1, 2]), "a full run");
    assert_eq!(taken(0, 3), None, "a run across a missing number");
    assert_eq!(taken(2, 10), None, "3 was never kept");
    commit(&[3], true);
    assert_eq!(taken(0, 10), Some(vec![1, 2, 3, 4]));
    assert_eq!(taken(1, 2), Some(vec![2, 3]));
    assert_eq!(
        taken(4, 10),
        None,
        "nothing new kept: others' commits need a read"
    );
    // Its envelopes were not all kept.
    commit(&[5], false);
    commit(&[6], true);
    assert_eq!(taken(4, 10), None);
    assert_eq!(taken(5, 10), Some(vec![6]));
}

/// Writers publish events the consumer wants between many it passes by, and commit
/// out of publishing order (some hold their transaction open a moment): the
/// consumer, which passes the others by outside its passes, still handles every
/// event it wants, once, in key order.
async fn a_consumer_passing_events_by_misses_none_it_wants(test_db: TestDatabase) {
    // Half the writers say what they published, as `Db::write` does; the others
    // do not.
    concurrent_writers_with_noise(&test_db, |w| w % 2 == 0, false).await;
}

/// Every writer says what it published, and some transactions roll back after
/// publishing: the consumer takes most events as the commits kept them, without
/// a read, and reads at the numbers that were never kept. Each event it wants is
/// handled once, in key order.
async fn kept_events_reach_a_consumer_once_in_key_order(test_db: TestDatabase) {
    concurrent_writers_with_noise(&test_db, |_| true, true).await;
}

async fn concurrent_writers_with_noise(
    test_db: &TestDatabase,
    announcing: fn(i64) -> bool,
    roll_some_back: bool,
) {
    let s = setup(test_db);
    let small = RetryPolicy {
        batch_size: 8,
        ..policy()
    };
    let engine = engine_wanting(&s.consumer, Arc::new(Recorder::new("beta")), small, THINGS);
    let (stop, stopped) = watch::channel(false);
    let running =
        tokio::spawn(engine.run(s.transport.subscribe("beta", "alpha").unwrap(), stopped));
    let mut writers = Vec::new();
    for w in 0..6_i64 {
        let producer = s.producer.clone();
        writers.push(tokio::task::spawn_blocking(move || {
            let publisher = Publisher::new("alpha", Uuid::now_v7(), None);
            for i in 0..40_i64 {
                let mut conn = producer.pool().get().unwrap();
                if roll_some_back && (i + w) % 5 == 0 {
                    kernel::outbox::take_published();
                    let rolled_back = write_tx(&mut conn, |conn| {
                        publisher.publish(conn, "noise", &NoiseHappened { n: -1 })?;
                        Err::<(), _>(diesel::result::Error::RollbackTransaction)
                    });
                    assert!(rolled_back.is_err());
                }
                kernel::outbox::take_published();
                write_tx(&mut conn, |conn| {
                    for noise in 0..(i % 3) {
                        publisher.publish(conn, "noise", &NoiseHappened { n: noise })?;
                    }
                    publisher.publish(
                        conn,
                        &format!("writer{w}"),
                        &ThingHappened { n: w * 1000 + i },
                    )?;
                    if (i + w) % 4 == 0 {
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    Ok::<_, diesel::result::Error>(())
                })
                .unwrap();
                if announcing(w) {
                    producer.announce(kernel::outbox::take_published());
                } else {
                    producer.notify_committed();
                }
            }
        }));
    }
    for w in writers {
        w.await.unwrap();
    }
    all_240_once_in_key_order(&s.consumer, stop, running).await;
}

/// Waits for the 240 events of six concurrent writers to take effect, stops the
/// consumer, and checks that each took effect once, in key order.
async fn all_240_once_in_key_order(
    consumer: &Db,
    stop: watch::Sender<bool>,
    running: tokio::task::JoinHandle<()>,
) {
    let done = eventually(Duration::from_secs(20), || {
        effects(consumer, "beta").len() == 240
    })
    .await;
    stop.send(true).unwrap();
    running.await.unwrap();
    assert!(
        done,
        "only {} of 240 handled",
        effects(consumer, "beta").len()
    );
    assert_once_in_key_order(&effects(consumer, "beta"), 240);
}

/// Checks that each key's events took effect in publishing order, each once.
fn assert_once_in_key_order(all: &[(String, i64)], expected: usize) {
    let distinct: HashSet<i64> = all.iter().map(|(_, n)| *n).collect();
    assert_eq!(
        (all.len(), distinct.len()),
        (expected, expected),
        "each event exactly once"
    );
    let mut last: HashMap<&str, i64> = HashMap::new();
    for (key, n) in all {
        if let Some(prev) = last.insert(key, *n) {
            assert!(*n > prev, "{key}: {n} handled after {prev}");
        }
    }
}

/// Publishes 40 events on each of 6 keys from 6 writers at once.
async fn publish_concurrently(producer: &Db) {
    let mut writers = Vec::new();
    for w in 0..6_i64 {
        let producer = producer.clone();
        writers.push(tokio::task::spawn_blocking(move || {
            for i in 0..40_i64 {
                publish(&producer, &format!("writer{w}"), w * 1000 + i);
            }
        }));
    }
    for w in writers {
        w.await.unwrap();
    }
}

/// Commits hand their envelopes to the relay, which publishes those that follow on
/// from the last one without reading the outbox. Whether commits land in number
/// order (SQLite) or not (PostgreSQL, where a later number may commit first and
/// the relay must read), every event arrives once, in key order.
async fn handed_over_events_arrive_once_in_key_order(test_db: TestDatabase) {
    let s = setup_via(&test_db, Via::Nats).await;
    let engine = engine(&s.consumer, Arc::new(Recorder::new("beta")), policy());
    let (stop, stopped) = watch::channel(false);
    let running =
        tokio::spawn(engine.run(s.transport.subscribe("beta", "alpha").unwrap(), stopped));
    let attached = eventually(Duration::from_secs(10), || s.producer.relay_attached()).await;
    assert!(attached, "the relay never took the hand-over");
    let before = s.producer.unhanded();
    let mut writers = Vec::new();
    for w in 0..6_i64 {
        let producer = s.producer.clone();
        writers.push(tokio::spawn(async move {
            let publisher = Publisher::new("alpha", Uuid::now_v7(), None);
            for i in 0..40_i64 {
                let p = publisher.clone();
                producer
                    .write(move |conn| {
                        let event = ThingHappened { n: w * 1000 + i };
                        p.publish(conn, &format!("writer{w}"), &event)?;
                        // Some commits take longer, so later numbers overtake them.
                        if (i + w) % 4 == 0 {
                            std::thread::sleep(Duration::from_millis(2));
                        }
                        Ok::<_, DbError>(())
                    })
                    .await
                    .unwrap();
            }
        }));
    }
    for w in writers {
        w.await.unwrap();
    }
    assert_eq!(
        s.producer.unhanded(),
        before,
        "a commit did not hand its events over"
    );
    all_240_once_in_key_order(&s.consumer, stop, running).await;
    s.teardown().await;
}

/// Published by beta's handler for each alpha event it handles.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Echoed {
    n: i64,
}

impl contracts::Event for Echoed {
    const NAME: &'static str = "beta.echoed.v1";
}

/// Publishes an `Echoed` for each event, then fails on those in `fail_on` (so that
/// what it published there is rolled back): for good, or to be retried.
struct Echo {
    fail_on: &'static [i64],
    retry: bool,
}

impl EventHandler for Echo {
    fn handle(&self, conn: &mut AnyConnection, event: &Envelope) -> Result<(), HandlerError> {
        let n = event.decode::<ThingHappened>().unwrap()?.n;
        Publisher::caused_by("beta", event).publish(conn, &event.aggregate_id, &Echoed { n })?;
        if self.fail_on.contains(&n) {
            let error = "echo refused".to_string();
            return Err(if self.retry {
                HandlerError::Retry(error)
            } else {
                HandlerError::Permanent(error)
            });
        }
        Ok(())
    }
}

/// Beta as a consumer of alpha whose handler is an `Echo`.
fn echo(db: &Db, fail_on: &'static [i64], retry: bool) -> ConsumerEngine {
    let consumer = Consumer {
        name: "beta",
        source: "alpha",
        events: &[],
        prompt: true,
        handler: Arc::new(Echo { fail_on, retry }),
    };
    ConsumerEngine::new(consumer, db.clone(), policy(), Arc::new(Metrics::default()))
}

/// Commits a `ThingHappened` for each of `numbers` (key `k<n>`), in one transaction.
async fn publish_things(producer: &Db, numbers: std::ops::RangeInclusive<i64>) {
    let publisher = Publisher::new("alpha", Uuid::now_v7(), None);
    producer
        .write(move |conn| {
            for n in numbers {
                publisher.publish(conn, &format!("k{n}"), &ThingHappened { n })?;
            }
            Ok::<_, DbError>(())
        })
        .await
        .unwrap();
}

/// A consumer whose handler publishes, then fails on two events of a batch: the
/// batch is rolled back and run again event by event, and the second failure's
/// savepoint rolls back (the first has had its attempt). What that rolled-back work published must never reach
/// the consumer module's own relay as if committed: JetStream ends up holding
/// exactly the committed events of beta's outbox, no more, no fewer.
async fn rolled_back_events_are_never_relayed(test_db: TestDatabase) {
    let s = setup(&test_db);
    let url = std::env::var(NATS_ENV).unwrap();
    let prefix = format!("t{}", Uuid::now_v7().simple());
    let nats = Arc::new(nats_process(&prefix).await);
    nats.ensure_stream("beta").await.unwrap();
    let (stop_relay, relay_stopped) = watch::channel(false);
    let relay = {
        let (nats, db) = (nats.clone(), s.consumer.clone());
        tokio::spawn(async move {
            nats.relay(db, Duration::from_millis(100), relay_stopped)
                .await
        })
    };
    let attached = eventually(Duration::from_secs(10), || s.consumer.relay_attached()).await;
    assert!(attached, "the relay never took the hand-over");
    let js = async_nats::jetstream::new(async_nats::connect(&url).await.unwrap());
    let mut stream = js
        .get_stream(kernel::bus::nats::stream_name(&prefix, "beta"))
        .await
        .unwrap();
    let engine = echo(&s.consumer, &[5, 7], false);
    let (stop, stopped) = watch::channel(false);
    let running =
        tokio::spawn(engine.run(s.transport.subscribe("beta", "alpha").unwrap(), stopped));
    // A first echo, relayed: the relay is caught up, and takes what commits hand it.
    publish_things(&s.producer, 0..=0).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while stream.info().await.unwrap().state.messages < 1 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Ten more in one commit: one pass takes them all, and fails on the fifth and
    // the seventh.
    publish_things(&s.producer, 1..=10).await;

    let outbox_ids = || -> HashSet<Uuid> {
        let mut conn = s.consumer.pool().get().unwrap();
        outbox::read_after(&mut conn, "beta", 0, 1_000)
            .unwrap()
            .into_iter()
            .map(|e| e.unwrap().event_id)
            .collect()
    };
    let committed = eventually(Duration::from_secs(10), || outbox_ids().len() == 9).await;
    assert!(
        committed,
        "beta committed {} echoes, not 9",
        outbox_ids().len()
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while stream.info().await.unwrap().state.messages < 9 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Anything relayed wrongly would have arrived by now too.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stored = stream.info().await.unwrap().state.messages;
    let mut relayed = HashSet::new();
    for sequence in 1..=stored {
        let message = stream.get_raw_message(sequence).await.unwrap();
        let envelope: Envelope = serde_json::from_slice(&message.payload).unwrap();
        relayed.insert(envelope.event_id);
    }
    stop.send(true).unwrap();
    running.await.unwrap();
    let _ = stop_relay.send(true);
    relay.await.unwrap();
    let _ = nats.delete_stream("beta").await;
    assert_eq!(
        relayed,
        outbox_ids(),
        "JetStream holds other events than beta committed"
    );
}

/// A commit of this process that kept nothing (it did not say what it published)
/// right after one that kept its event: the next pass takes both, instead of the
/// kept one only, which would leave the other to a poll.
async fn a_commit_that_kept_nothing_is_not_passed_over(test_db: TestDatabase) {
    let s = setup(&test_db);
    let engine = engine(&s.consumer, Arc::new(Recorder::new("beta")), policy());
    let mut sub = s.transport.subscribe("beta", "alpha").unwrap();
    assert_eq!(pass(&engine, &s.consumer, &mut sub, now()).pulled, 0);
    let publisher = Publisher::new("alpha", Uuid::now_v7(), None);
    s.producer
        .write(move |conn| {
            publisher.publish(conn, "k", &ThingHappened { n: 1 })?;
            Ok::<_, DbError>(())
        })
        .await
        .unwrap();
    publish(&s.producer, "k", 2);
    let report = pass(&engine, &s.consumer, &mut sub, now());
    assert_eq!(report.handled, 2, "{report:?}");
    assert_once_in_key_order(&effects(&s.consumer, "beta"), 2);
}

/// Gamma's handler: notes every event it handles.
struct Collect {
    seen: Mutex<Vec<Uuid>>,
}

impl EventHandler for Collect {
    fn handle(&self, _: &mut AnyConnection, event: &Envelope) -> Result<(), HandlerError> {
        self.seen.lock().unwrap().push(event.event_id);
        Ok(())
    }
}

/// What a pass's handlers publish is stored with the pass, in the order published;
/// on PostgreSQL it is appended by the pass's last statement, the one that records
/// the events handled and moves the position (prepared once).
async fn a_pass_appends_what_its_handlers_published_with_its_position(test_db: TestDatabase) {
    let s = setup(&test_db);
    let beta = echo(&s.consumer, &[], true);
    let mut sub = s.transport.subscribe("beta", "alpha").unwrap();
    publish_things(&s.producer, 1..=3).await;
    let mut conn = s.consumer.pool().get().unwrap();
    let report = beta.pass(&mut conn, &mut *sub, now()).unwrap();
    assert_eq!(report.handled, 3, "{report:?}");
    let echoes: Vec<i64> = outbox::read_after(&mut conn, "beta", 0, 10)
        .unwrap()
        .into_iter()
        .map(|e| e.unwrap().payload["n"].as_i64().unwrap())
        .collect();
    assert_eq!(echoes, [1, 2, 3]);
    assert_eq!(stored_position(&s.consumer, "beta").0, 3);
    if s.consumer.backend() == kernel::db::Backend::Postgres {
        let advancing = kernel::testing::prepared_statements(
            &mut conn,
            "WITH inbox AS (INSERT INTO colony_inbox",
        );
        assert_eq!(advancing.len(), 1, "{advancing:?}");
        assert!(
            advancing[0].contains("advanced AS (UPDATE colony_consumer_positions")
                && advancing[0].contains("INSERT INTO colony_outbox"),
            "{advancing:?}"
        );
    }
}

/// Like `rolled_back_events_are_never_relayed`, with a consumer of beta's events in
/// the same process instead of a relay: it takes what beta's commits kept, and
/// must handle exactly the echoes beta committed. Beta's failure here is retried in
/// a savepoint of a later pass that also handles a new event (a pass that, unlike a
/// batch run again, has not given up what it kept before).
async fn rolled_back_events_never_reach_a_local_consumer(test_db: TestDatabase) {
    let s = setup(&test_db);
    let gamma = open(&test_db, "gamma");
    let mut transport = LocalTransport::new();
    transport.add_source(s.producer.clone());
    transport.add_source(s.consumer.clone());
    let beta = echo(&s.consumer, &[2], true);
    let collect = Arc::new(Collect {
        seen: Mutex::new(Vec::new()),
    });
    let gamma_engine = ConsumerEngine::new(
        Consumer {
            name: "gamma",
            source: "beta",
            events: &[],
            prompt: true,
            handler: collect.clone(),
        },
        gamma.clone(),
        policy(),
        Arc::new(Metrics::default()),
    );
    let mut beta_sub = transport.subscribe("beta", "alpha").unwrap();
    let mut gamma_sub = transport.subscribe("gamma", "beta").unwrap();
    // Beta's first pass fails on 2, runs again event by event, and queues 2 for a
    // retry; gamma takes the two echoes.
    publish_things(&s.producer, 1..=3).await;
    assert_eq!(pass(&beta, &s.consumer, &mut beta_sub, now()).retried, 1);
    pass(&gamma_engine, &gamma, &mut gamma_sub, now());
    // The retry of 2 fails in its savepoint; 4 is handled in the same pass.
    publish_things(&s.producer, 4..=4).await;
    let later = now() + chrono::Duration::seconds(10);
    let report = pass(&beta, &s.consumer, &mut beta_sub, later);
    assert_eq!((report.retried, report.handled), (1, 1), "{report:?}");
    // (Had the retry's echo taken a number before it rolled back, on PostgreSQL,
    // that number would be a gap, which a later read settles.)
    for _ in 0..10 {
        pass(&gamma_engine, &gamma, &mut gamma_sub, now());
        if collect.seen.lock().unwrap().len() >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let committed: HashSet<Uuid> =
        outbox::read_after(&mut s.consumer.pool().get().unwrap(), "beta", 0, 100)
            .unwrap()
            .into_iter()
            .map(|e| e.unwrap().event_id)
            .collect();
    assert_eq!(committed.len(), 3, "beta's committed echoes");
    let seen = collect.seen.lock().unwrap().clone();
    assert_eq!(
        seen.into_iter().collect::<HashSet<_>>(),
        committed,
        "gamma handled other echoes than beta committed"
    );
}

/// Two processes run the same consumer on one shared JetStream consumer: the lease
/// lets one handle at a time, so keys keep their order and nothing is handled twice.
async fn replicas_of_a_consumer_keep_key_order(test_db: TestDatabase) {
    let s = setup_via(&test_db, Via::Nats).await;
    let prefix = s.nats.as_ref().unwrap().2.clone();
    let other = nats_process(&prefix).await;
    let handler = Arc::new(Recorder::new("beta"));
    // The second process: its own pool on the same database, its own connection.
    two_replicas_handle_240_in_key_order(&test_db, &s, &handler, &other).await;
    assert_eq!(
        handler.overlaps.load(Ordering::SeqCst),
        0,
        "handled twice at once"
    );
    s.teardown().await;
}

/// The holder dies mid-stream (no acknowledgement, events delivered to it and not
/// handled): the standby takes over once the lease ends and handles the rest, the
/// dead one's undelivered events first, so every key keeps its order.
async fn a_dead_holder_hands_over_in_key_order(test_db: TestDatabase) {
    let s = setup_via(&test_db, Via::Nats).await;
    let prefix = s.nats.as_ref().unwrap().2.clone();
    let mut slow = Recorder::new("beta");
    slow.pause = Duration::from_millis(5);
    let dying = Arc::new(slow);
    let standby = Arc::new(Recorder::new("beta"));
    // Its effects sort after the dead holder's.
    standby.position.store(1_000_000, Ordering::SeqCst);
    let small = RetryPolicy {
        batch_size: 8,
        ..policy()
    };
    let first = engine(&s.consumer, dying.clone(), small.clone());
    let (stop_first, first_stopped) = watch::channel(false);
    let a = tokio::spawn(first.run(
        s.transport.subscribe("beta", "alpha").unwrap(),
        first_stopped,
    ));
    // The first takes the lease before the standby starts.
    assert!(
        eventually(Duration::from_secs(5), || {
            let mut conn = s.consumer.pool().get().unwrap();
            kernel::bus::lease::holder(&mut conn, "beta", "alpha")
                .unwrap()
                .is_some()
        })
        .await
    );
    let other = nats_process(&prefix).await;
    let second = engine(&open(&test_db, "beta"), standby.clone(), small);
    let (stop, stopped) = watch::channel(false);
    let b = tokio::spawn(second.run(other.subscribe("beta", "alpha").unwrap(), stopped));
    publish_concurrently(&s.producer).await;
    assert!(
        eventually(Duration::from_secs(10), || {
            effects(&s.consumer, "beta").len() >= 40
        })
        .await
    );
    // Killed: no pass finishes its settling, its connection's deliveries stay unacked.
    a.abort();
    let _ = a.await;
    drop(stop_first);
    let died_after = effects(&s.consumer, "beta").len();
    let done = eventually(Duration::from_secs(20), || {
        effects(&s.consumer, "beta").len() >= 240
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.send(true).unwrap();
    b.await.unwrap();
    assert!(done, "only {} handled", effects(&s.consumer, "beta").len());
    assert!(died_after < 240, "the holder finished before it died");
    assert!(
        !standby.attempts.lock().unwrap().is_empty(),
        "the standby never took over"
    );
    assert_once_in_key_order(&effects(&s.consumer, "beta"), 240);
    s.teardown().await;
}

fn outbox_sequences(db: &Db) -> Vec<i64> {
    use kernel::schema::colony_outbox as o;
    o::table
        .select(o::sequence)
        .order(o::sequence.asc())
        .load(&mut db.pool().get().unwrap())
        .unwrap()
}

fn inbox_size(db: &Db) -> i64 {
    use kernel::schema::colony_inbox as i;
    i::table
        .count()
        .get_result(&mut db.pool().get().unwrap())
        .unwrap()
}

/// Pruning deletes outbox rows only once every reader passed them and they are
/// older than the retention, never the newest row, and inbox records only of
/// events older than it; the consumer goes on as before, and a reader that starts
/// behind the pruned rows reads on from the first one kept.
async fn pruning_keeps_what_a_reader_still_needs(test_db: TestDatabase) {
    use kernel::bus::retention::{self, Readers};
    let s = setup(&test_db);
    let handler = Arc::new(Recorder::new("beta"));
    let engine = engine(&s.consumer, handler, policy());
    let mut sub = s.transport.subscribe("beta", "alpha").unwrap();
    let published: Vec<Envelope> = (1..=10).map(|n| publish(&s.producer, "k", n)).collect();
    assert_eq!(pass(&engine, &s.consumer, &mut sub, now()).handled, 10);
    let unread: Vec<Envelope> = (11..=15).map(|n| publish(&s.producer, "k", n)).collect();
    let readers = Readers::Consumers(vec![("beta", s.consumer.clone())]);
    let later = now() + chrono::Duration::hours(1);
    let earlier = now() - chrono::Duration::hours(1);

    // Younger than the retention: nothing goes.
    let pruned = retention::prune(&s.producer, &readers, &[], earlier)
        .await
        .unwrap();
    assert_eq!(pruned.outbox, 0);
    // A reader this process cannot ask: nothing goes.
    let pruned = retention::prune(&s.producer, &Readers::Unknown, &[], later)
        .await
        .unwrap();
    assert_eq!(pruned.outbox, 0);
    // Old enough: what the consumer read goes, what it did not stays.
    let pruned = retention::prune(&s.producer, &readers, &[], later)
        .await
        .unwrap();
    assert_eq!(pruned.outbox, 10);
    let kept: Vec<i64> = unread.iter().map(|e| e.sequence).collect();
    assert_eq!(outbox_sequences(&s.producer), kept);

    // The inbox: records handled before the cut go, later ones stay. Five of the
    // ten were handled two hours ago (of events made just now).
    assert_eq!(inbox_size(&s.consumer), 10);
    let two_hours_ago = now() - chrono::Duration::hours(2);
    let aged: Vec<String> = published[..5]
        .iter()
        .map(|e| e.event_id.to_string())
        .collect();
    {
        use kernel::schema::colony_inbox as i;
        diesel::update(i::table.filter(i::event_id.eq_any(&aged)))
            .set(i::handled_at.eq(two_hours_ago))
            .execute(&mut s.consumer.pool().get().unwrap())
            .unwrap();
    }
    let pruned = retention::prune(&s.consumer, &Readers::Unknown, &["beta"], earlier)
        .await
        .unwrap();
    assert_eq!(pruned.inbox, 5);
    assert_eq!(inbox_size(&s.consumer), 5);

    // The consumer goes on from its position.
    assert_eq!(pass(&engine, &s.consumer, &mut sub, now()).handled, 5);
    assert_eq!(
        effects(&s.consumer, "beta")
            .iter()
            .map(|(_, n)| *n)
            .collect::<Vec<_>>(),
        (1..=15).collect::<Vec<_>>()
    );
    // Everything read: all but the newest row go, and the next event is numbered
    // after it.
    let pruned = retention::prune(&s.producer, &readers, &[], later)
        .await
        .unwrap();
    assert_eq!(pruned.outbox, 4);
    assert_eq!(outbox_sequences(&s.producer), vec![unread[4].sequence]);
    let next = publish(&s.producer, "k", 16);
    assert!(next.sequence > unread[4].sequence);

    // A reader that starts behind the pruned rows reads on from the first kept.
    let mut conn = s.producer.pool().get().unwrap();
    let read: Vec<i64> = outbox::read_after(&mut conn, "alpha", 0, 4)
        .unwrap()
        .into_iter()
        .map(|e| e.unwrap().sequence)
        .collect();
    assert_eq!(read, vec![unread[4].sequence, next.sequence]);
    // PostgreSQL: the missing numbers are a gap until no transaction that was
    // running on the server when it was seen runs any more.
    let mut gaps = outbox::Gaps::default();
    let settled = eventually(Duration::from_secs(10), || {
        gaps.read(&mut conn, "alpha", 0, 4).unwrap().len() == 2
    })
    .await;
    assert!(settled, "the pruned prefix is passed over");
    // And so does the consumer, whose next pass takes event 16.
    assert_eq!(pass(&engine, &s.consumer, &mut sub, now()).handled, 1);
}

/// A backlog larger than a chunk goes in several, each starting where the last
/// ended, until nothing old is left.
async fn pruning_goes_on_chunk_by_chunk(test_db: TestDatabase) {
    use kernel::bus::retention::{self, CHUNK, Readers};
    let producer = open(&test_db, "alpha");
    let total = 2 * CHUNK + 500;
    let mut conn = producer.pool().get().unwrap();
    let publisher = Publisher::new("alpha", Uuid::now_v7(), None);
    let ids: Vec<String> = write_tx(&mut conn, |conn| {
        (0..total)
            .map(|n| {
                publisher
                    .publish_now(conn, "k", &ThingHappened { n })
                    .map(|e| e.event_id.to_string())
            })
            .collect::<Result<Vec<_>, diesel::result::Error>>()
    })
    .unwrap();
    // Handled in passes of 100, a second apart, two hours ago.
    let long_ago = now() - chrono::Duration::hours(2);
    for (pass, ids) in (0_i64..).zip(ids.chunks(100)) {
        kernel::bus::record_handled(
            &mut conn,
            &kernel::bus::Handled {
                consumer: "alpha",
                event_ids: ids,
                at: long_ago + chrono::Duration::seconds(pass),
            },
        )
        .unwrap();
    }
    drop(conn);
    // No one reads alpha's events: all but the newest row may go.
    let pruned = retention::prune(
        &producer,
        &Readers::Consumers(Vec::new()),
        &["alpha"],
        now() + chrono::Duration::hours(1),
    )
    .await
    .unwrap();
    assert_eq!(
        (pruned.outbox, pruned.inbox),
        (usize::try_from(total - 1).unwrap(), ids.len())
    );
    assert_eq!(outbox_sequences(&producer).len(), 1);
    assert_eq!(inbox_size(&producer), 0);
}

/// A consumer that is not `prompt` lets the policy's linger go by after a wake-up:
/// five commits made one after the other within it are handled by one pass (one
/// inbox time), no sooner than the linger after the first; a prompt consumer with
/// the same policy passes at once.
async fn a_consumer_off_the_saga_lingers_and_handles_a_burst_in_one_pass(test_db: TestDatabase) {
    let s = setup(&test_db);
    let linger = Duration::from_millis(400);
    let lingering = RetryPolicy { linger, ..policy() };
    let mut engines = Vec::new();
    for (name, prompt) in [("beta", false), ("gamma", true)] {
        let consumer = Consumer {
            name,
            source: "alpha",
            events: &[],
            prompt,
            handler: Arc::new(Recorder::new(name)),
        };
        let engine = ConsumerEngine::new(
            consumer,
            s.consumer.clone(),
            lingering.clone(),
            Arc::new(Metrics::default()),
        );
        let (stop, stopped) = watch::channel(false);
        let sub = s.transport.subscribe(name, "alpha").unwrap();
        engines.push((stop, tokio::spawn(engine.run(sub, stopped))));
    }
    // Both caught up (an empty first pass) before the burst.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    for n in 0..5 {
        publish(&s.producer, "burst", n);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let prompt_first = eventually(Duration::from_secs(5), || {
        !effects(&s.consumer, "gamma").is_empty()
    })
    .await;
    assert!(prompt_first, "the prompt consumer handled nothing");
    assert!(
        effects(&s.consumer, "beta").is_empty() || started.elapsed() >= linger,
        "the lingering consumer passed before its linger was over"
    );
    let all = eventually(Duration::from_secs(5), || {
        effects(&s.consumer, "beta").len() == 5
    })
    .await;
    assert!(all, "the lingering consumer did not handle the burst");
    assert!(started.elapsed() >= linger);
    let passes = |consumer: &'static str| -> usize {
        use kernel::schema::colony_inbox as i;
        let mut conn = s.consumer.pool().get().unwrap();
        let times: Vec<NaiveDateTime> = i::table
            .filter(i::consumer.eq(consumer))
            .select(i::handled_at)
            .load(&mut conn)
            .unwrap();
        times.into_iter().collect::<HashSet<_>>().len()
    };
    assert_eq!(passes("beta"), 1, "the burst took more than one pass");
    // The prompt one took the first event at once, a linger before the other.
    let first_handled = |consumer: &'static str| -> NaiveDateTime {
        use kernel::schema::colony_inbox as i;
        let mut conn = s.consumer.pool().get().unwrap();
        i::table
            .filter(i::consumer.eq(consumer))
            .select(diesel::dsl::min(i::handled_at))
            .first::<Option<NaiveDateTime>>(&mut conn)
            .unwrap()
            .unwrap()
    };
    let ahead = first_handled("beta") - first_handled("gamma");
    assert!(
        ahead >= chrono::Duration::from_std(linger / 2).unwrap(),
        "the prompt consumer was only {ahead} ahead"
    );
    for (stop, running) in engines {
        stop.send(true).unwrap();
        running.await.unwrap();
    }
}

async fn undelivered_events_are_delivered_after_a_restart_locally(test_db: TestDatabase) {
    undelivered_events_are_delivered_after_a_restart(test_db, Via::Local).await;
}

async fn a_handler_failing_twice_is_retried_with_growing_delays_locally(test_db: TestDatabase) {
    a_handler_failing_twice_is_retried_with_growing_delays(test_db, Via::Local).await;
}

async fn a_broken_consumer_does_not_hold_back_another_locally(test_db: TestDatabase) {
    a_broken_consumer_does_not_hold_back_another(test_db, Via::Local).await;
}

async fn concurrent_publishers_lose_nothing_and_keep_key_order_locally(test_db: TestDatabase) {
    concurrent_publishers_lose_nothing_and_keep_key_order(test_db, Via::Local).await;
}

/// The scenarios that run the consumer's own loop, with NATS JetStream carrying the
/// events (SQLite for the databases).
mod nats {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn undelivered_events_are_delivered_after_a_restart() {
        if super::nats_available() {
            super::undelivered_events_are_delivered_after_a_restart(
                super::TestDatabase::sqlite(),
                super::Via::Nats,
            )
            .await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_handler_failing_twice_is_retried_with_growing_delays() {
        if super::nats_available() {
            super::a_handler_failing_twice_is_retried_with_growing_delays(
                super::TestDatabase::sqlite(),
                super::Via::Nats,
            )
            .await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_broken_consumer_does_not_hold_back_another() {
        if super::nats_available() {
            super::a_broken_consumer_does_not_hold_back_another(
                super::TestDatabase::sqlite(),
                super::Via::Nats,
            )
            .await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_publishers_lose_nothing_and_keep_key_order() {
        if super::nats_available() {
            super::concurrent_publishers_lose_nothing_and_keep_key_order(
                super::TestDatabase::sqlite(),
                super::Via::Nats,
            )
            .await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failing_pass_waits_its_backoff() {
        if super::nats_available() {
            super::a_failing_pass_waits_its_backoff(
                super::TestDatabase::sqlite(),
                super::Via::Nats,
            )
            .await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn replicas_of_a_consumer_keep_key_order() {
        if super::nats_available() {
            super::replicas_of_a_consumer_keep_key_order(super::TestDatabase::sqlite()).await;
            if let Some(db) = super::TestDatabase::postgres() {
                super::replicas_of_a_consumer_keep_key_order(db).await;
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dead_holder_hands_over_in_key_order() {
        if super::nats_available() {
            super::a_dead_holder_hands_over_in_key_order(super::TestDatabase::sqlite()).await;
            if let Some(db) = super::TestDatabase::postgres() {
                super::a_dead_holder_hands_over_in_key_order(db).await;
            }
        }
    }
}

on_both_backends!(
    undelivered_events_are_delivered_after_a_restart_locally,
    a_redelivered_event_has_no_second_effect,
    a_handler_failing_twice_is_retried_with_growing_delays_locally,
    a_permanent_failure_is_parked_and_the_consumer_continues,
    a_poison_key_does_not_hold_back_other_keys,
    a_broken_consumer_does_not_hold_back_another_locally,
    a_failing_pass_waits_its_backoff_locally,
    a_rolled_back_transaction_publishes_nothing,
    a_transaction_appends_its_events_in_the_order_published,
    publication_order_holds_across_savepoints_and_immediate_appends,
    a_pass_appends_what_its_handlers_published_with_its_position,
    two_bus_instances_never_handle_the_same_event_at_once,
    replicas_keep_key_order_through_retries,
    replaying_a_dead_letter_delivers_it_once,
    concurrent_publishers_lose_nothing_and_keep_key_order_locally,
    events_passed_by_commit_nothing,
    commits_wake_only_readers_of_their_events,
    a_consumer_passing_events_by_misses_none_it_wants,
    kept_events_reach_a_consumer_once_in_key_order,
    a_commit_that_kept_nothing_is_not_passed_over,
    rolled_back_events_never_reach_a_local_consumer,
    pruning_keeps_what_a_reader_still_needs,
    pruning_goes_on_chunk_by_chunk,
    a_consumer_off_the_saga_lingers_and_handles_a_burst_in_one_pass,
);

// With NATS JetStream carrying the events.
on_both_backends!(
    @in nats_sqlite, nats_postgres, if super::nats_available();
    rolled_back_events_are_never_relayed,
    handed_over_events_arrive_once_in_key_order,
);
