//! Monolith against split, the same scenario in one run (release build), on
//! PostgreSQL:
//!
//! - **monolith**: one `colony serve` process with every module, the in-process bus;
//! - **split**: `deploy/split.sh` — a process per module, checkout twice, NATS
//!   JetStream between them, nginx in front.
//!
//! For each shape: placements/s from closed-loop clients, placement → confirmed
//! p50/p99 at a fixed pace, each hop of the saga (placed → stock reserved →
//! confirmed → shipment created) from the modules' outboxes, the sum of the
//! resident memory of the shape's processes (idle and peak under load), their count,
//! and their PostgreSQL connections. The added latency per hop is split minus
//! monolith. Both shapes run side by side, each idle while the other is measured,
//! and their latency runs take turns, so that the machine's drift over the run
//! weighs on both. Then the outbox relay's throughput against pipelined JetStream
//! publishes of the same messages, both in this run.
//!
//! The load generator runs in this process, on the same two cores as the shape it
//! loads. Targets are printed as PASS/MISS, never asserted.
//!
//! Run: `COLONY_TEST_DATABASE_URL=postgres://… COLONY_TEST_NATS_URL=nats://…
//! cargo bench --bench split -- [--seconds S] [--clients N] [--pace R]
//! [--relay-messages N]` with nginx on the PATH (or in /usr/sbin).

mod support;

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use async_nats::jetstream;
use kernel::Db;
use kernel::benchkit::{Percentiles, percentiles};
use kernel::bus::NatsTransport;
use kernel::db::{self, DbError, Location, PoolOptions, write_tx};
use kernel::outbox::{self, Publisher};
use kernel::testing::{POSTGRES_ENV, TestDatabase};
use serde::{Deserialize, Serialize};
use support::{Rig, create_product, fill_carts, marks, paced, place_all, settle, steps, verdict};

const NATS_ENV: &str = "COLONY_TEST_NATS_URL";
const SECRET: &str = "split-benchmark-secret-0123456789abcdef";

struct Args {
    seconds: f64,
    clients: usize,
    pace: f64,
    relay_messages: usize,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        seconds: 5.0,
        clients: 32,
        pace: 50.0,
        relay_messages: 20_000,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--seconds" => args.seconds = it.next().context("--seconds S")?.parse()?,
            "--clients" => args.clients = it.next().context("--clients N")?.parse()?,
            "--pace" => args.pace = it.next().context("--pace R")?.parse()?,
            "--relay-messages" => {
                args.relay_messages = it.next().context("--relay-messages N")?.parse()?
            }
            "--bench" => {}
            other => bail!("unknown argument {other:?}"),
        }
    }
    Ok(args)
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let nats_url = std::env::var(NATS_ENV).with_context(|| format!("{NATS_ENV} is not set"))?;
    if std::env::var(POSTGRES_ENV).is_err() {
        bail!("{POSTGRES_ENV} is not set");
    }
    let commit = Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .unwrap_or_default();
    println!(
        "split benchmark: {} s of placements, {} clients, latency at {}/s, commit {}",
        args.seconds,
        args.clients,
        args.pace,
        commit.trim()
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let (mono, split) = measure(&args, &nats_url).await?;
        report(&mono, &split);
        relay_against_raw(&nats_url, args.relay_messages).await
    })
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Shape {
    Monolith,
    Split,
}

impl Shape {
    fn name(self) -> &'static str {
        match self {
            Self::Monolith => "monolith",
            Self::Split => "split",
        }
    }
}

/// What one shape measured.
struct Figures {
    shape: Shape,
    processes: usize,
    rss_idle_mib: f64,
    rss_peak_mib: f64,
    pg_connections: i64,
    placements_per_s: f64,
    saga_per_s: f64,
    /// On fresh databases, and after the burst.
    latency: [Latency; 2],
}

struct Latency {
    end_to_end: Percentiles,
    /// placed → reserved, reserved → confirmed, confirmed → shipment created.
    hops: Vec<Percentiles>,
}

const LATENCY_RUNS: [&str; 2] = ["before the burst", "after the burst"];

/// Latency runs per shape and phase, the shapes taking turns: machine drift between
/// one shape's runs and the other's then weighs on both alike.
const ROUNDS: usize = 2;

/// One latency run's samples, in milliseconds: end to end, each hop, and the
/// payment hop cut at the test gateway's ledger write.
#[derive(Default)]
struct Samples {
    end_to_end: Vec<f64>,
    hops: [Vec<f64>; 3],
    charged: [Vec<f64>; 2],
}

impl Samples {
    fn extend(&mut self, other: Samples) {
        self.end_to_end.extend(other.end_to_end);
        for (mine, theirs) in self.hops.iter_mut().zip(other.hops) {
            mine.extend(theirs);
        }
        for (mine, theirs) in self.charged.iter_mut().zip(other.charged) {
            mine.extend(theirs);
        }
    }

    /// Prints the percentiles, and returns them.
    fn summary(self, shape: Shape, args: &Args, phase: &str) -> Latency {
        let runs = self.end_to_end.len();
        let end_to_end = percentiles(self.end_to_end);
        println!(
            "{}: placement → confirmed at {}/s ({phase}, {runs} orders): p50 {:.2} ms, p99 {:.2} ms",
            shape.name(),
            args.pace,
            end_to_end.p50,
            end_to_end.p99
        );
        let hops: Vec<Percentiles> = self.hops.into_iter().map(percentiles).collect();
        for (name, p) in HOPS.iter().zip(&hops) {
            println!("  hop {name}: p50 {:.2} ms, p99 {:.2} ms", p.p50, p.p99);
        }
        let [to_charged, to_confirmed] = self.charged;
        if !to_charged.is_empty() {
            let (a, b) = (percentiles(to_charged), percentiles(to_confirmed));
            println!(
                "    of which reserved → charged: p50 {:.2} ms, p99 {:.2} ms; charged → confirmed: p50 {:.2} ms, p99 {:.2} ms",
                a.p50, a.p99, b.p50, b.p99
            );
        }
        Latency { end_to_end, hops }
    }
}

/// Orders placed at `args.pace` for `args.seconds`, each saga timed from the outboxes.
async fn latency_run(rig: &Rig, product: &str, args: &Args, phase: &str) -> Result<Samples> {
    let count = ((args.pace * args.seconds) as usize).max(50);
    let customers = fill_carts(rig, product, phase, count, args.clients).await?;
    let placed = paced(rig, &customers, args.pace).await?;
    settle(rig, &placed).await?;
    let placed_at = marks(rig, "checkout", "checkout.order_placed.v1").await?;
    let reserved_at = marks(rig, "catalog", "catalog.stock_reserved.v1").await?;
    let confirmed_at = marks(rig, "checkout", "checkout.order_confirmed.v1").await?;
    let shipped_at = shipped(rig, &placed).await?;
    let end_to_end = steps(&placed, &[&placed_at, &confirmed_at]).remove(0);
    let hops: [Vec<f64>; 3] = steps(
        &placed,
        &[&placed_at, &reserved_at, &confirmed_at, &shipped_at],
    )
    .try_into()
    .map_err(|_| anyhow::anyhow!("three hops expected"))?;
    if hops.iter().any(|h| h.len() != placed.len()) {
        bail!("some orders lack a saga event");
    }
    // The payment hop cut at the test gateway's ledger write, for reading it.
    let charged_at = support::charged(rig).await?;
    let parts = steps(&placed, &[&reserved_at, &charged_at, &confirmed_at]);
    let charged = match <[Vec<f64>; 2]>::try_from(parts) {
        Ok(parts) if parts.iter().all(|p| p.len() == placed.len()) => parts,
        _ => Default::default(),
    };
    Ok(Samples {
        end_to_end,
        hops,
        charged,
    })
}

/// `ROUNDS` latency runs of each shape, taking turns, each on a quiet machine.
async fn latency_rounds(shapes: [&Prepared; 2], args: &Args, phase: &str) -> Result<[Latency; 2]> {
    let mut samples: [Samples; 2] = Default::default();
    for round in 0..ROUNDS {
        for (shape, pooled) in shapes.iter().zip(samples.iter_mut()) {
            support::quiet().await;
            let run =
                latency_run(&shape.rig, &shape.product, args, &format!("{phase}{round}")).await?;
            pooled.extend(run);
        }
    }
    let [a, b] = samples;
    Ok([
        a.summary(shapes[0].shape, args, phase),
        b.summary(shapes[1].shape, args, phase),
    ])
}

const HOPS: [&str; 3] = [
    "checkout → catalog (placed → stock reserved)",
    "catalog → checkout (reserved → confirmed, with the payment step)",
    "checkout → delivery (confirmed → shipment created)",
];

/// A running shape: its processes, and how to stop them.
struct Running {
    base: String,
    children: Vec<Child>,
    split_dir: Option<(tempfile::TempDir, HashMap<&'static str, String>)>,
}

impl Running {
    /// Every process of the shape: colony processes, and for the split nginx's.
    fn pids(&self) -> Vec<u32> {
        let mut pids: Vec<u32> = self.children.iter().map(Child::id).collect();
        if let Some((dir, _)) = &self.split_dir {
            for entry in std::fs::read_dir(dir.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                let path = entry.path();
                if path.extension().is_some_and(|e| e == "pid")
                    && let Some(pid) = std::fs::read_to_string(&path)
                        .ok()
                        .and_then(|s| s.trim().parse::<u32>().ok())
                {
                    pids.push(pid);
                    if path.file_stem().is_some_and(|s| s == "nginx") {
                        pids.extend(children_of(pid));
                    }
                }
            }
        }
        pids
    }

    /// The last lines of each process's log, to tell why a run failed.
    fn show_logs(&self) {
        let Some((dir, _)) = &self.split_dir else {
            return;
        };
        for entry in std::fs::read_dir(dir.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "log")
                && let Ok(text) = std::fs::read_to_string(&path)
            {
                let lines: Vec<&str> = text.lines().collect();
                println!("--- {}", path.display());
                for line in &lines[lines.len().saturating_sub(5)..] {
                    println!("{line}");
                }
            }
        }
    }

    /// What the split's processes logged at warning level or above (their filter
    /// is `warn`): a count per process and the first few lines, so that a slow
    /// episode in the figures can be matched with what a process saw.
    fn show_warnings(&self) {
        let Some((dir, _)) = &self.split_dir else {
            return;
        };
        let mut paths: Vec<_> = std::fs::read_dir(dir.path())
            .into_iter()
            .flatten()
            .flatten()
            .map(|entry| entry.path())
            .filter(|path| path.extension().is_some_and(|e| e == "log"))
            .collect();
        paths.sort();
        println!("\n[warnings logged by the split's processes]");
        for path in paths {
            let Ok(text) = std::fs::read_to_string(&path) else {
                continue;
            };
            let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
            let name = path.file_stem().map(|n| n.to_string_lossy().into_owned());
            println!("{}: {}", name.unwrap_or_default(), lines.len());
            for line in lines.iter().take(3) {
                println!("    {}", line.chars().take(300).collect::<String>());
            }
        }
    }

    fn stop(mut self) -> Result<()> {
        if let Some((dir, env)) = &self.split_dir {
            let status = split_script(dir.path(), env, "stop").status()?;
            if !status.success() {
                bail!("split.sh stop failed");
            }
            // The processes end on SIGTERM; wait for them to let go of the database.
            let deadline = Instant::now() + Duration::from_secs(30);
            while self.pids().iter().any(|p| alive(*p)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        for child in &mut self.children {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let _ = child.wait();
        }
        Ok(())
    }
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

fn children_of(parent: u32) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // pid (comm) state ppid …: comm may hold spaces, so split after its ')'.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(parent) {
            found.push(pid);
        }
    }
    found
}

/// Resident memory of `pids`, summed, in MiB.
fn rss_mib(pids: &[u32]) -> f64 {
    let kib: u64 = pids
        .iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/status")).ok())
        .filter_map(|status| {
            status
                .lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .sum();
    kib as f64 / 1024.0
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A base port with the six after it free too (split.sh uses seven).
fn free_port_block() -> Result<u16> {
    for _ in 0..50 {
        let base = free_port()?;
        if base > 65_000 {
            continue;
        }
        if (0..7).all(|i| std::net::TcpListener::bind(("127.0.0.1", base + i)).is_ok()) {
            return Ok(base);
        }
    }
    bail!("no block of seven free ports")
}

fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_colony"))
}

fn path_with_sbin() -> String {
    format!(
        "{}:/usr/sbin:/sbin",
        std::env::var("PATH").unwrap_or_default()
    )
}

fn split_script(run_dir: &Path, env: &HashMap<&'static str, String>, verb: &str) -> Command {
    let mut command = Command::new("bash");
    command
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/split.sh"))
        .arg(verb)
        .env("RUN_DIR", run_dir)
        .env("PATH", path_with_sbin())
        .envs(env)
        .stdout(Stdio::null());
    command
}

async fn wait_ready(base: &str) -> Result<()> {
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Ok(res) = http.get(format!("{base}/health/ready")).send().await
            && res.status().is_success()
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("{base} did not become ready")
}

async fn start(shape: Shape, db: &TestDatabase, nats_url: &str) -> Result<Running> {
    match shape {
        Shape::Monolith => {
            let port = free_port()?;
            let child = Command::new(binary())
                .arg("serve")
                .env("COLONY__HTTP__PORT", port.to_string())
                .env("COLONY__DATABASE__URL", db.url())
                .env("COLONY__AUTH__JWT_SECRET", SECRET)
                .env("COLONY__LOG__FILTER", "warn")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("starting colony")?;
            let base = format!("http://127.0.0.1:{port}");
            let running = Running {
                base,
                children: vec![child],
                split_dir: None,
            };
            wait_ready(&running.base).await?;
            Ok(running)
        }
        Shape::Split => {
            let dir = tempfile::tempdir()?;
            let port = free_port_block()?;
            let env: HashMap<&'static str, String> = HashMap::from([
                ("COLONY_BIN", binary().display().to_string()),
                ("DATABASE_URL", db.url()),
                ("NATS_URL", nats_url.to_string()),
                (
                    "NATS_PREFIX",
                    format!("bench{}", uuid::Uuid::now_v7().simple()),
                ),
                ("BASE_PORT", port.to_string()),
                ("JWT_SECRET", SECRET.to_string()),
            ]);
            let status = split_script(dir.path(), &env, "start").status()?;
            if !status.success() {
                bail!("split.sh start failed (logs in {})", dir.path().display());
            }
            Ok(Running {
                base: format!("http://127.0.0.1:{port}"),
                children: Vec::new(),
                split_dir: Some((dir, env)),
            })
        }
    }
}

/// A module's database in `db`, as the module's processes see it (for its outbox).
fn module_db(db: &TestDatabase, module: &'static str) -> Result<Db> {
    let location = Location::resolve(&db.url(), module)?;
    let options = PoolOptions {
        max_size: 4,
        ..PoolOptions::default()
    };
    let pool = db::pool(db::prepare(&location, &options)?, &options)?;
    Ok(Db::new(module, location.backend(), pool))
}

async fn pg_connections(db: &TestDatabase) -> Result<i64> {
    let url = std::env::var(POSTGRES_ENV)?;
    let name = db.url().rsplit('/').next().unwrap_or_default().to_string();
    tokio::task::spawn_blocking(move || -> Result<i64> {
        use diesel::prelude::*;
        #[derive(QueryableByName)]
        struct Count {
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            n: i64,
        }
        let mut conn = diesel::PgConnection::establish(&url)?;
        let count: Count =
            diesel::sql_query("SELECT count(*) AS n FROM pg_stat_activity WHERE datname = $1")
                .bind::<diesel::sql_types::Text, _>(name)
                .get_result(&mut conn)?;
        Ok(count.n)
    })
    .await?
}

/// A shape started on a fresh PostgreSQL database, with a product listed and its
/// connection pools warm.
struct Prepared {
    shape: Shape,
    running: Running,
    rig: Rig,
    product: String,
    pids: Vec<u32>,
    rss_idle_mib: f64,
    // Dropped last: the shape's processes must have stopped first.
    db: TestDatabase,
}

async fn prepare(shape: Shape, args: &Args, nats_url: &str) -> Result<Prepared> {
    let db = TestDatabase::postgres().context("PostgreSQL")?;
    let running = start(shape, &db, nats_url).await?;
    let ready = async {
        let dbs = HashMap::from([
            ("checkout", module_db(&db, "checkout")?),
            ("catalog", module_db(&db, "catalog")?),
            ("delivery", module_db(&db, "delivery")?),
        ]);
        let rig = Rig::new(running.base.clone(), SECRET, dbs)?;
        let seller = rig.token("bench-seller", kernel::auth::Role::Seller);
        let product = create_product(&rig, &seller, "SPLIT-BENCH", 10_000_000).await?;
        // Let the processes warm up and settle before reading their idle memory.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let pids = running.pids();
        let rss_idle_mib = rss_mib(&pids);
        // A second of orders at the same pace first, not measured: pools open their
        // connections as load arrives, and the first orders of a process pay for it
        // (more of them in the split, whose six processes each open their own).
        let warm = fill_carts(
            &rig,
            &product,
            "warm",
            args.pace.ceil() as usize,
            args.clients,
        )
        .await?;
        let warmed = paced(&rig, &warm, args.pace).await?;
        settle(&rig, &warmed).await?;
        Ok::<_, anyhow::Error>((rig, product, pids, rss_idle_mib))
    }
    .await;
    match ready {
        Ok((rig, product, pids, rss_idle_mib)) => Ok(Prepared {
            shape,
            running,
            rig,
            product,
            pids,
            rss_idle_mib,
            db,
        }),
        Err(e) => {
            running.show_logs();
            running.stop()?;
            Err(e)
        }
    }
}

/// Throughput: placements/s and the saga's rate, with resident memory sampled
/// meanwhile and PostgreSQL connections counted at the end; returns once every
/// order of the burst is shipped.
async fn burst(shape: &Prepared, args: &Args) -> Result<(f64, f64, f64, i64)> {
    println!("\n[{}]", shape.shape.name());
    let rig = &shape.rig;
    let count = (args.seconds * 1_500.0) as usize;
    let customers = fill_carts(rig, &shape.product, "t", count, args.clients).await?;
    let peak = Arc::new(AtomicU64::new(0));
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (peak, sampling, pids) = (peak.clone(), sampling.clone(), shape.pids.clone());
        tokio::spawn(async move {
            while sampling.load(Ordering::Relaxed) {
                let now = (rss_mib(&pids) * 1024.0) as u64;
                peak.fetch_max(now, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    let (placed, elapsed) = place_all(
        rig,
        &customers,
        args.clients,
        Duration::from_secs_f64(args.seconds),
    )
    .await?;
    let connections = pg_connections(&shape.db).await?;
    sampling.store(false, Ordering::Relaxed);
    sampler.await?;
    let placements_per_s = placed.len() as f64 / elapsed.as_secs_f64();
    settle(rig, &placed).await?;
    let saga = support::saga_span(rig, &placed).await?;
    let saga_per_s = placed.len() as f64 / saga;
    println!(
        "placements/s at {} clients {placements_per_s:>8.0}   ({} placed; all confirmed {saga:.2} s after the first: {saga_per_s:.0} orders/s end to end)",
        args.clients,
        placed.len(),
    );
    // What the burst left behind (shipments, notifications) is done before the
    // latency runs that follow.
    shipped(rig, &placed).await?;
    let peak_mib = peak.load(Ordering::Relaxed) as f64 / 1024.0;
    println!(
        "{} processes, resident memory {:.0} MiB idle, {peak_mib:.0} MiB at peak; {connections} PostgreSQL connections under load",
        shape.pids.len(),
        shape.rss_idle_mib,
    );
    Ok((placements_per_s, saga_per_s, peak_mib, connections))
}

/// Both shapes, running side by side (each idle while the other is measured):
/// latency runs taking turns, each shape's burst alone, latency runs again.
async fn measure(args: &Args, nats_url: &str) -> Result<(Figures, Figures)> {
    let mono = prepare(Shape::Monolith, args, nats_url).await?;
    let split = match prepare(Shape::Split, args, nats_url).await {
        Ok(split) => split,
        Err(e) => {
            mono.running.stop()?;
            return Err(e);
        }
    };
    let result = async {
        println!("\n[latency before the burst: the shapes take turns, {ROUNDS} runs each]");
        let fresh = latency_rounds([&mono, &split], args, "fresh").await?;
        support::quiet().await;
        let mono_burst = burst(&mono, args).await?;
        support::quiet().await;
        let split_burst = burst(&split, args).await?;
        println!("\n[latency after the burst: the shapes take turns, {ROUNDS} runs each]");
        let after = latency_rounds([&mono, &split], args, "after").await?;
        let [mono_fresh, split_fresh] = fresh;
        let [mono_after, split_after] = after;
        let figures = |p: &Prepared, b: (f64, f64, f64, i64), latency: [Latency; 2]| Figures {
            shape: p.shape,
            processes: p.pids.len(),
            rss_idle_mib: p.rss_idle_mib,
            rss_peak_mib: b.2,
            pg_connections: b.3,
            placements_per_s: b.0,
            saga_per_s: b.1,
            latency,
        };
        Ok::<_, anyhow::Error>((
            figures(&mono, mono_burst, [mono_fresh, mono_after]),
            figures(&split, split_burst, [split_fresh, split_after]),
        ))
    }
    .await;
    if result.is_err() {
        split.running.show_logs();
    } else {
        split.running.show_warnings();
    }
    let stopped = (mono.running.stop(), split.running.stop());
    let figures = result?;
    stopped.0?;
    stopped.1?;
    Ok(figures)
}

/// Waits until delivery opened a shipment for each of `placed`; when each was opened.
async fn shipped(rig: &Rig, placed: &[(String, String)]) -> Result<support::Marks> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let shipped = marks(rig, "delivery", "delivery.shipment_created.v1").await?;
        if placed.iter().all(|(_, id)| shipped.contains_key(id)) {
            return Ok(shipped);
        }
        if Instant::now() > deadline {
            bail!("shipments missing after two minutes");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn report(mono: &Figures, split: &Figures) {
    println!("\n[monolith → split]");
    println!(
        "| shape | processes | RSS idle / peak MiB | PG connections | placements/s | saga orders/s | p50 / p99 ms before | p50 / p99 ms after |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for f in [mono, split] {
        let [fresh, after] = &f.latency;
        println!(
            "| {} | {} | {:.0} / {:.0} | {} | {:.0} | {:.0} | {:.2} / {:.2} | {:.2} / {:.2} |",
            f.shape.name(),
            f.processes,
            f.rss_idle_mib,
            f.rss_peak_mib,
            f.pg_connections,
            f.placements_per_s,
            f.saga_per_s,
            fresh.end_to_end.p50,
            fresh.end_to_end.p99,
            after.end_to_end.p50,
            after.end_to_end.p99
        );
    }
    println!(
        "placements/s split ÷ monolith {:.2}",
        split.placements_per_s / mono.placements_per_s
    );
    for (run, when) in LATENCY_RUNS.iter().enumerate() {
        for (i, name) in HOPS.iter().enumerate() {
            let (m, s) = (&mono.latency[run].hops[i], &split.latency[run].hops[i]);
            let (d50, d99) = (s.p50 - m.p50, s.p99 - m.p99);
            println!(
                "added by the split ({when}), hop {name}: p50 {d50:+.2} ms {}, p99 {d99:+.2} ms {}   (targets ≤ 1 / ≤ 5 ms)",
                verdict(d50 <= 1.0),
                verdict(d99 <= 5.0)
            );
        }
    }
}

/// Filler events of the size of the saga's, published from a scratch outbox.
#[derive(Serialize, Deserialize)]
struct Filler {
    order_id: uuid::Uuid,
    customer_id: String,
    note: String,
}

impl contracts::Event for Filler {
    const NAME: &'static str = "checkout.bench_filler.v1";
}

/// The outbox relay against pipelined JetStream publishes of the same messages.
async fn relay_against_raw(nats_url: &str, n: usize) -> Result<()> {
    println!("\n[relay]");
    let db = TestDatabase::postgres().context("PostgreSQL")?;
    let outbox_db = module_db(&db, "checkout")?;
    let spec = colony::registry::ALL
        .iter()
        .find(|m| m.name == "checkout")
        .context("checkout module")?;
    kernel::migrate::run_pending(&mut *outbox_db.pool().get()?, "checkout", spec.migrations)?;
    let fill = outbox_db.clone();
    tokio::task::spawn_blocking(move || -> Result<()> {
        let mut conn = fill.pool().get()?;
        let publisher = Publisher::new("checkout", uuid::Uuid::now_v7(), None);
        for chunk in 0..n.div_ceil(1000) {
            write_tx(&mut conn, |conn| {
                for i in chunk * 1000..((chunk + 1) * 1000).min(n) {
                    let event = Filler {
                        order_id: uuid::Uuid::now_v7(),
                        customer_id: format!("bench-customer-{i}"),
                        note: "x".repeat(200),
                    };
                    publisher.publish(conn, &event.order_id.to_string(), &event)?;
                }
                Ok::<_, diesel::result::Error>(())
            })?;
        }
        Ok(())
    })
    .await??;
    let envelopes: Vec<kernel::Envelope> = outbox_db
        .read(move |conn| {
            outbox::read_after(conn, "checkout", 0, i64::try_from(n).unwrap_or(i64::MAX))
                .map_err(DbError::from)
        })
        .await?
        .into_iter()
        .collect::<Result<_, _>>()
        .map_err(anyhow::Error::msg)?;
    let size = envelopes
        .iter()
        .map(|e| serde_json::to_vec(e).map(|v| v.len()).unwrap_or(0))
        .sum::<usize>()
        / envelopes.len().max(1);

    // Raw: the same messages, 256 in flight, to a stream of their own.
    let client = async_nats::connect(nats_url).await?;
    let js = jetstream::new(client);
    let raw_prefix = format!("raw{}", uuid::Uuid::now_v7().simple());
    let raw_stream = format!("{}_CHECKOUT", raw_prefix.to_ascii_uppercase());
    js.create_stream(jetstream::stream::Config {
        name: raw_stream.clone(),
        subjects: vec![format!("{raw_prefix}.checkout.>")],
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    })
    .await?;
    let started = Instant::now();
    let mut window = VecDeque::new();
    for envelope in &envelopes {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", envelope.event_id.to_string().as_str());
        let payload = serde_json::to_vec(envelope)?;
        let ack = js
            .publish_with_headers(
                kernel::bus::nats::subject(&raw_prefix, envelope),
                headers,
                payload.into(),
            )
            .await?;
        window.push_back(ack);
        if window.len() >= 256
            && let Some(ack) = window.pop_front()
        {
            ack.await?;
        }
    }
    for ack in window {
        ack.await?;
    }
    let raw = n as f64 / started.elapsed().as_secs_f64();
    js.delete_stream(&raw_stream).await?;

    // The relay, from the outbox to a stream of its own, until the server has
    // stored all n (as the raw publisher above counts acknowledgements).
    let relay_prefix = format!("relay{}", uuid::Uuid::now_v7().simple());
    let transport = Arc::new(NatsTransport::connect(nats_url, &relay_prefix).await?);
    transport.ensure_stream("checkout").await?;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let started = Instant::now();
    let relay = {
        let (transport, db) = (transport.clone(), outbox_db.clone());
        tokio::spawn(async move {
            transport
                .relay(db, Duration::from_millis(100), stopped)
                .await
        })
    };
    let target = u64::try_from(n)?;
    let mut stream = js
        .get_stream(kernel::bus::nats::stream_name(&relay_prefix, "checkout"))
        .await?;
    loop {
        let at = stream.info().await?.state.messages;
        if at >= target {
            break;
        }
        if started.elapsed() > Duration::from_secs(300) {
            bail!("the relay reached only {at} of {n}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let relayed = n as f64 / started.elapsed().as_secs_f64();
    let _ = stop.send(true);
    relay.await?;
    transport.delete_stream("checkout").await?;
    let ratio = relayed / raw;
    println!(
        "pipelined JetStream publish (256 in flight)  {raw:>8.0} msg/s   ({n} messages of {size} bytes)"
    );
    println!("outbox relay (PostgreSQL → JetStream)        {relayed:>8.0} msg/s");
    println!(
        "relay ÷ raw                                  {ratio:>8.2}   target ≥ 0.50 {}",
        verdict(ratio >= 0.5)
    );
    Ok(())
}
