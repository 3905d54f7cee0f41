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

/// A fetch that counts its rounds and their keys, reads (or fails, while
/// `failing` is set), and then waits for `open` before answering.
struct Probe {
    /// While false, rounds wait before answering.
    open: AtomicBool,
    rounds: AtomicUsize,
    keys: AtomicUsize,
    failing: AtomicBool,
}

impl Probe {
    fn new() -> Self {
        Self {
            open: AtomicBool::new(true),
            rounds: AtomicUsize::new(0),
            keys: AtomicUsize::new(0),
            failing: AtomicBool::new(false),
        }
    }

    fn fetch(
        &self,
        conn: &mut AnyConnection,
        keys: &[String],
    ) -> Result<Vec<(String, i64)>, DbError> {
        self.rounds.fetch_add(1, Ordering::SeqCst);
        self.keys.fetch_add(keys.len(), Ordering::SeqCst);
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
        while !self.open.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(rows?)
    }

    fn rounds(&self) -> usize {
        self.rounds.load(Ordering::SeqCst)
    }

    /// Waits until `n` rounds have begun.
    async fn until_rounds(&self, n: usize) {
        for _ in 0..500 {
            if self.rounds() >= n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("{n} rounds expected within 5 s, {} began", self.rounds());
    }
}

/// Lookups spawned now, answered later.
fn spawn_gets(
    lookups: &Lookups<String, i64>,
    keys: &[String],
) -> Vec<JoinHandle<Result<Option<i64>, DbError>>> {
    keys.iter()
        .map(|key| {
            let (lookups, key) = (lookups.clone(), key.clone());
            tokio::spawn(async move { lookups.get(key).await })
        })
        .collect()
}

/// Lets lookups spawned just before reach the queue.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(50)).await;
}

async fn lookups_queued_behind_a_round_are_answered_by_the_next(test_db: TestDatabase) {
    let probe = Arc::new(Probe::new());
    let db = open(&test_db);
    for i in 0..20 {
        put(&db, &format!("k{i}"), i);
    }
    let lookups = Lookups::new(db, 1, {
        let probe = probe.clone();
        move |conn, keys| probe.fetch(conn, keys)
    });

    probe.open.store(false, Ordering::SeqCst);
    let first = spawn_gets(&lookups, &["k0".to_string()]);
    probe.until_rounds(1).await;
    // Each key twice, and one no row has.
    let keys: Vec<String> = (0..20)
        .flat_map(|i| [format!("k{i}"), format!("k{i}")])
        .chain(["missing".to_string()])
        .collect();
    let rest = spawn_gets(&lookups, &keys);
    settle().await;
    probe.open.store(true, Ordering::SeqCst);

    for answer in first {
        assert_eq!(answer.await.unwrap().unwrap(), Some(0));
    }
    for (key, answer) in keys.iter().zip(rest) {
        let expected = key.strip_prefix('k').map(|n| n.parse::<i64>().unwrap());
        assert_eq!(answer.await.unwrap().unwrap(), expected, "lookup of {key}");
    }
    // One round for "k0"; one for the 41 lookups queued behind it, each key once.
    assert_eq!(probe.rounds(), 2);
    assert_eq!(probe.keys.load(Ordering::SeqCst), 1 + 21);
}

async fn a_lookup_never_joins_a_round_that_has_read(test_db: TestDatabase) {
    let probe = Arc::new(Probe::new());
    let db = open(&test_db);
    put(&db, "k", 1);
    let lookups = Lookups::new(db.clone(), 1, {
        let probe = probe.clone();
        move |conn, keys| probe.fetch(conn, keys)
    });

    probe.open.store(false, Ordering::SeqCst);
    let before = spawn_gets(&lookups, &["k".to_string()]);
    // The round has read 1 and waits to answer; then 2 is committed.
    probe.until_rounds(1).await;
    put(&db, "k", 2);
    let after = spawn_gets(&lookups, &["k".to_string()]);
    settle().await;
    probe.open.store(true, Ordering::SeqCst);

    assert_eq!(
        before.into_iter().next().unwrap().await.unwrap().unwrap(),
        Some(1)
    );
    assert_eq!(
        after.into_iter().next().unwrap().await.unwrap().unwrap(),
        Some(2)
    );
    assert_eq!(probe.rounds(), 2);
}

async fn a_failed_round_fails_its_lookups_only(test_db: TestDatabase) {
    let probe = Arc::new(Probe::new());
    let db = open(&test_db);
    put(&db, "k", 7);
    let lookups = Lookups::new(db, 2, {
        let probe = probe.clone();
        move |conn, keys| probe.fetch(conn, keys)
    });

    probe.failing.store(true, Ordering::SeqCst);
    probe.open.store(false, Ordering::SeqCst);
    let failed = spawn_gets(&lookups, &["k".to_string()]);
    probe.until_rounds(1).await;
    let queued: Vec<String> = (0..5).map(|_| "k".to_string()).collect();
    let queued = spawn_gets(&lookups, &queued);
    settle().await;
    probe.open.store(true, Ordering::SeqCst);
    for answer in failed {
        assert!(
            answer.await.unwrap().is_err(),
            "the failed round's lookup fails"
        );
    }
    // The second lane took the queued lookups while the first was held: they
    // failed too, as the same fetch was failing.
    for answer in queued {
        assert!(answer.await.unwrap().is_err());
    }

    // No lane is left counted as running: a later lookup starts one and is answered.
    probe.failing.store(false, Ordering::SeqCst);
    let later = spawn_gets(&lookups, &["k".to_string(), "k".to_string()]);
    for answer in later {
        assert_eq!(answer.await.unwrap().unwrap(), Some(7));
    }
}

macro_rules! on_both_backends {
    ($($scenario:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    super::$scenario(super::TestDatabase::sqlite()).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    match super::TestDatabase::postgres() {
                        Some(db) => super::$scenario(db).await,
                        None => eprintln!("skipped: {} is not set", super::kernel::testing::POSTGRES_ENV),
                    }
                }
            )*
        }
    };
}

on_both_backends!(
    lookups_queued_behind_a_round_are_answered_by_the_next,
    a_lookup_never_joins_a_round_that_has_read,
    a_failed_round_fails_its_lookups_only,
);
