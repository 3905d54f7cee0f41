//! Measuring helpers shared by the benchmarks: the backend's raw commit rate (the
//! denominator of every ratio the benchmarks print) and latency percentiles.

use std::sync::Barrier;
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow};
use diesel::connection::SimpleConnection;
use diesel::prelude::*;

use crate::db::{self, Location, PoolOptions, write_tx};
use crate::testing::TestDatabase;

diesel::table! {
    bench_raw (id) {
        id -> BigInt,
        writer -> Integer,
        note -> Text,
    }
}

/// Commits counted over a span of time.
pub struct RawRate {
    pub commits: u64,
    pub elapsed: Duration,
}

impl RawRate {
    pub fn per_second(&self) -> f64 {
        self.commits as f64 / self.elapsed.as_secs_f64()
    }
}

/// One-row INSERT transactions from `writers` threads for `seconds`, each taking a
/// pooled connection per transaction as a module does, in a throwaway module
/// database `bench_raw` of `test_db`.
pub fn raw_commit_rate(test_db: &TestDatabase, writers: usize, seconds: f64) -> Result<RawRate> {
    let location = Location::resolve(&test_db.url(), "bench_raw")?;
    let options = PoolOptions {
        max_size: u32::try_from(writers).unwrap_or(64).max(2),
        ..PoolOptions::default()
    };
    let pool = db::pool(db::prepare(&location, &options)?, &options)?;
    pool.get()?.batch_execute(
        "CREATE TABLE IF NOT EXISTS bench_raw \
         (id BIGINT PRIMARY KEY NOT NULL, writer INTEGER NOT NULL, note TEXT NOT NULL); \
         DELETE FROM bench_raw;",
    )?;
    let note = "x".repeat(64);
    let barrier = Barrier::new(writers + 1);
    let duration = Duration::from_secs_f64(seconds);
    let (started, results) = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..writers)
            .map(|w| {
                let (pool, barrier, note) = (&pool, &barrier, &note);
                scope.spawn(move || -> Result<(u64, Instant)> {
                    let writer = i32::try_from(w)?;
                    let mut id = i64::from(writer) << 40;
                    let insert = |id: i64| -> Result<()> {
                        let mut conn = pool.get()?;
                        write_tx(&mut conn, |c| {
                            diesel::insert_into(bench_raw::table)
                                .values((
                                    bench_raw::id.eq(id),
                                    bench_raw::writer.eq(writer),
                                    bench_raw::note.eq(note),
                                ))
                                .execute(c)
                        })?;
                        Ok(())
                    };
                    // Warm-up commit (opens this writer's connection), then all start together.
                    let warm = insert(id);
                    barrier.wait();
                    warm?;
                    let deadline = Instant::now() + duration;
                    let mut commits = 0_u64;
                    while Instant::now() < deadline {
                        id += 1;
                        insert(id)?;
                        commits += 1;
                    }
                    Ok((commits, Instant::now()))
                })
            })
            .collect();
        barrier.wait();
        let started = Instant::now();
        let results: Vec<_> = handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow!("raw writer panicked")))
            })
            .collect();
        (started, results)
    });
    let mut commits = 0;
    let mut finished = started;
    for result in results {
        let (n, at) = result?;
        commits += n;
        finished = finished.max(at);
    }
    Ok(RawRate {
        commits,
        elapsed: finished - started,
    })
}

/// The middle, the 99th percentile and the largest of a set of milliseconds.
pub struct Percentiles {
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

pub fn percentiles(mut ms: Vec<f64>) -> Percentiles {
    ms.sort_by(f64::total_cmp);
    let rank = |p: f64| {
        if ms.is_empty() {
            return f64::NAN;
        }
        let i = ((p * ms.len() as f64).ceil() as usize).clamp(1, ms.len()) - 1;
        ms[i]
    };
    Percentiles {
        p50: rank(0.50),
        p99: rank(0.99),
        max: ms.last().copied().unwrap_or(f64::NAN),
    }
}
