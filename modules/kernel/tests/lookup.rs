#![expect(clippy::unwrap_used, reason = "test helpers panic to fail the test")]

//! Lookups by key made together (`kernel::lookup`), through real databases: on
//! SQLite, and on PostgreSQL when `COLONY_TEST_DATABASE_URL` is set. Each test's
//! fetch can be held after its statement, so the test holds a round while it
//! queues lookups behind it: which round a lookup joins is decided by the test,
//! not by timing.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use colony_kernel as kernel;
use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use kernel::db::{self, DbError, Location, PoolOptions};
use kernel::lookup::Lookups;
use kernel::metrics::Metrics;
use kernel::on_both_backends;
use kernel::testing::TestDatabase;
use kernel::{AnyConnection, Db};
use tokio::task::JoinHandle;

diesel::table! {
    lookup_rows (id) {
        id -> Text,
        n -> BigInt,
    }
}

fn open(test_db: &TestDatabase) -> Db {
    let location = Location::resolve(&test_db.url(), "lookup").unwrap();
    let options = PoolOptions::default();
    let connector = db::prepare(&location, &options).unwrap();
    let pool = db::pool(connector, &options).unwrap();
    pool.get()
        .unwrap()
        .batch_execute("CREATE TABLE lookup_rows (id TEXT PRIMARY KEY, n BIGINT NOT NULL)")
        .unwrap();
    Db::new("lookup", location.backend(), pool)
}

fn put(db: &Db, id: &str, n: i64) {
    let mut conn = db.pool().get().unwrap();
    let query = diesel::insert_into(lookup_rows::table)
        .values((lookup_rows::id.eq(id), lookup_rows::n.eq(n)))
        .on_conflict(lookup_rows::id)
        .do_update()
        .set(lookup_rows::n.eq(n));
    match &mut *conn {
        AnyConnection::Postgresql(c) => query.execute(c),
        AnyConnection::Sqlite(c) => query.execute(c),
    }
    .unwrap();
}

/// A fetch that reads (or fails, while `failing` is set), counts its rounds and
/// their keys, waits while `open` is false, and then answers (or panics, while
/// `panicking` is set).
struct Probe {
    open: AtomicBool,
    failing: AtomicBool,
    panicking: AtomicBool,
    /// Rounds whose statement has run.
    rounds: AtomicUsize,
    keys: AtomicUsize,
    metrics: Arc<Metrics>,
}

impl Probe {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            open: AtomicBool::new(true),
            failing: AtomicBool::new(false),
            panicking: AtomicBool::new(false),
            rounds: AtomicUsize::new(0),
            keys: AtomicUsize::new(0),
            metrics: Arc::default(),
        })
    }

    fn lookups(self: &Arc<Self>, db: Db) -> Lookups<String, i64> {
        let probe = self.clone();
        Lookups::new(db, "rows", self.metrics.clone(), 1, move |conn, keys| {
            probe.fetch(conn, keys)
        })
    }

    fn fetch(&self, conn: &mut AnyConnection, keys: &[String]) -> QueryResult<Vec<(String, i64)>> {
        let rows = if self.failing.load(Ordering::SeqCst) {
            diesel::sql_query("SELECT n FROM no_such_table")
                .execute(conn)
                .map(|_| Vec::new())
        } else {
            lookup_rows::table
                .filter(lookup_rows::id.eq_any(keys))
                .select((lookup_rows::id, lookup_rows::n))
                .load(conn)
        };
        self.keys.fetch_add(keys.len(), Ordering::SeqCst);
        self.rounds.fetch_add(1, Ordering::SeqCst);
        while !self.open.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(
            !self.panicking.load(Ordering::SeqCst),
            "the probe panics, as asked"
        );
        rows
    }

    fn hold(&self) {
        self.open.store(false, Ordering::SeqCst);
    }

    fn release(&self) {
        self.open.store(true, Ordering::SeqCst);
    }

    fn rounds(&self) -> usize {
        self.rounds.load(Ordering::SeqCst)
    }
}

/// Waits until `done` holds, at most 5 s.
async fn until(what: &str, mut done: impl FnMut() -> bool) {
    for _ in 0..500 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{what}: not within 5 s");
}

/// Lookups spawned now, answered later.
fn spawn_gets(lookups: &Lookups<String, i64>, keys: &[String]) -> Vec<Pending> {
    keys.iter()
        .map(|key| {
            let (lookups, key) = (lookups.clone(), key.clone());
            tokio::spawn(async move { lookups.get(key).await })
        })
        .collect()
}

type Pending = JoinHandle<Result<Option<i64>, DbError>>;

/// The answers of `pending`, each within 5 s (a lookup left waiting fails the test
/// instead of hanging it).
async fn answers(pending: Vec<Pending>) -> Vec<Result<Option<i64>, DbError>> {
    let mut answers = Vec::new();
    for p in pending {
        let Ok(answer) = tokio::time::timeout(Duration::from_secs(5), p).await else {
            panic!("a lookup was not answered within 5 s");
        };
        answers.push(answer.unwrap());
    }
    answers
}

fn keys(key: &str, n: usize) -> Vec<String> {
    vec![key.to_string(); n]
}

/// A lookup of `key` whose round has read and is held until `probe.release()`.
async fn held_round(probe: &Probe, lookups: &Lookups<String, i64>, key: &str) -> Vec<Pending> {
    probe.hold();
    let pending = spawn_gets(lookups, &keys(key, 1));
    until("the first round has read", || probe.rounds() == 1).await;
    pending
}

/// Lookups of `keys`, once all of them wait for a round.
async fn queued(lookups: &Lookups<String, i64>, keys: &[String]) -> Vec<Pending> {
    let pending = spawn_gets(lookups, keys);
    until("the lookups queued", || lookups.waiting() == keys.len()).await;
    pending
}

async fn lookups_queued_behind_a_round_are_answered_by_the_next(test_db: TestDatabase) {
    let probe = Probe::new();
    let db = open(&test_db);
    for i in 0..20 {
        put(&db, &format!("k{i}"), i);
    }
    let lookups = probe.lookups(db);

    let first = held_round(&probe, &lookups, "k0").await;
    // Each key twice, and one no row has.
    let behind: Vec<String> = (0..20)
        .flat_map(|i| [format!("k{i}"), format!("k{i}")])
        .chain(["missing".to_string()])
        .collect();
    let rest = queued(&lookups, &behind).await;
    probe.release();

    assert_eq!(answers(first).await[0].as_ref().unwrap(), &Some(0));
    for (key, answer) in behind.iter().zip(answers(rest).await) {
        let expected = key.strip_prefix('k').map(|n| n.parse::<i64>().unwrap());
        assert_eq!(answer.unwrap(), expected, "lookup of {key}");
    }
    // One round for "k0"; one for the 41 lookups queued behind it, each key once.
    assert_eq!(probe.rounds(), 2);
    assert_eq!(probe.keys.load(Ordering::SeqCst), 1 + 21);
    let labels = [("module", "lookup"), ("lookup", "rows")];
    assert_eq!(
        probe.metrics.counter("colony_lookup_rounds_total", &labels),
        2
    );
    assert_eq!(probe.metrics.counter("colony_lookups_total", &labels), 42);
}

async fn a_lookup_never_joins_a_round_that_has_read(test_db: TestDatabase) {
    let probe = Probe::new();
    let db = open(&test_db);
    put(&db, "k", 1);
    let lookups = probe.lookups(db.clone());

    let before = held_round(&probe, &lookups, "k").await;
    // The round has read 1 and waits to answer; then 2 is committed.
    put(&db, "k", 2);
    let after = queued(&lookups, &keys("k", 1)).await;
    probe.release();

    assert_eq!(answers(before).await[0].as_ref().unwrap(), &Some(1));
    assert_eq!(answers(after).await[0].as_ref().unwrap(), &Some(2));
    assert_eq!(probe.rounds(), 2);
}

async fn a_failed_round_fails_its_lookups_only(test_db: TestDatabase) {
    let probe = Probe::new();
    let db = open(&test_db);
    put(&db, "k", 7);
    let lookups = probe.lookups(db);

    probe.failing.store(true, Ordering::SeqCst);
    let failed = held_round(&probe, &lookups, "k").await;
    let behind = queued(&lookups, &keys("k", 5)).await;
    probe.failing.store(false, Ordering::SeqCst);
    probe.release();

    let failure = answers(failed).await.pop().unwrap().unwrap_err();
    assert!(
        failure.to_string().contains("no_such_table"),
        "the round's own failure, got {failure}"
    );
    for answer in answers(behind).await {
        assert_eq!(
            answer.unwrap(),
            Some(7),
            "the next round is a round of its own"
        );
    }
    assert_eq!(probe.rounds(), 2);
}

async fn a_panicking_lane_is_given_back(test_db: TestDatabase) {
    let probe = Probe::new();
    let db = open(&test_db);
    put(&db, "k", 7);
    let lookups = probe.lookups(db);

    probe.panicking.store(true, Ordering::SeqCst);
    let first = held_round(&probe, &lookups, "k").await;
    let behind = queued(&lookups, &keys("k", 3)).await;
    probe.release();

    // The only lane panicked: its lookups and those queued fail rather than wait.
    for answer in answers(first)
        .await
        .into_iter()
        .chain(answers(behind).await)
    {
        assert!(answer.is_err());
    }
    assert_eq!(lookups.waiting(), 0);
    // Its count was given back: the next lookup starts a lane and is answered.
    probe.panicking.store(false, Ordering::SeqCst);
    let later = spawn_gets(&lookups, &keys("k", 2));
    for answer in answers(later).await {
        assert_eq!(answer.unwrap(), Some(7));
    }
}

on_both_backends!(
    lookups_queued_behind_a_round_are_answered_by_the_next,
    a_lookup_never_joins_a_round_that_has_read,
    a_failed_round_fails_its_lookups_only,
    a_panicking_lane_is_given_back,
);
