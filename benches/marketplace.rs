//! Marketplace benchmark, per backend, in one run (release build):
//!
//! - (a) `GET /api/v1/catalog/products/{id}` req/s ÷ `GET /health/live` req/s, both
//!   served by the same process, 32 keep-alive clients each;
//! - (b) placements/s (202s) at 32 concurrent clients ÷ the backend's raw single-row
//!   commit rate at the same concurrency (measured in the same run);
//! - (c) placement → confirmed latency p50/p99 with placements paced at half of (b).
//!   It runs from the commit of `checkout.order_placed.v1` to the commit of
//!   `checkout.order_confirmed.v1` (their `occurred_at` in checkout's outbox): the
//!   whole saga through catalog's reservation and the payment step.
//!
//! The load generator runs in the same process and on the same two cores as the
//! server, so every figure is a lower bound of what the server alone would do.
//!
//! Run: `cargo bench --bench marketplace -- [--backend sqlite|postgres|both]
//! [--seconds S] [--clients N]`. PostgreSQL comes from `COLONY_TEST_DATABASE_URL`.
//! Targets are printed as PASS/MISS, never asserted.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use colony::registry;
use colony::settings::Settings;
use colony::startup::Application;
use kernel::auth::{Authenticator, Role};
use kernel::benchkit::{percentiles, raw_commit_rate};
use kernel::db::DbError;
use kernel::testing::{POSTGRES_ENV, TestDatabase};
use serde_json::{Value, json};

struct Args {
    backends: Vec<&'static str>,
    seconds: f64,
    clients: usize,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        backends: vec!["sqlite", "postgres"],
        seconds: 5.0,
        clients: 32,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--backend" => {
                args.backends = match it.next().as_deref() {
                    Some("sqlite") => vec!["sqlite"],
                    Some("postgres") => vec!["postgres"],
                    Some("both") => vec!["sqlite", "postgres"],
                    other => bail!("--backend sqlite|postgres|both, got {other:?}"),
                }
            }
            "--seconds" => args.seconds = it.next().context("--seconds S")?.parse()?,
            "--clients" => args.clients = it.next().context("--clients N")?.parse()?,
            // Passed by `cargo bench`.
            "--bench" => {}
            other => bail!("unknown argument {other:?}"),
        }
    }
    Ok(args)
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let commit = std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .unwrap_or_default();
    println!(
        "marketplace benchmark, {} s per phase, {} clients, commit {}",
        args.seconds,
        args.clients,
        commit.trim()
    );
    for backend in &args.backends {
        let db = match *backend {
            "sqlite" => TestDatabase::sqlite(),
            _ => match TestDatabase::postgres() {
                Some(db) => db,
                None if args.backends.len() > 1 => {
                    println!("\n[postgres] SKIPPED: {POSTGRES_ENV} is not set");
                    continue;
                }
                None => bail!("{POSTGRES_ENV} is not set"),
            },
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        runtime.block_on(run(backend, db, &args))?;
    }
    Ok(())
}

struct Rig {
    base: String,
    http: reqwest::Client,
    auth: Authenticator,
    app: Arc<colony::runtime::Runtime>,
    handle: actix_web::dev::ServerHandle,
}

impl Rig {
    fn token(&self, subject: &str, role: Role) -> String {
        self.auth.issue(subject, role, Duration::from_secs(3600))
    }
}

async fn run(backend: &str, db: TestDatabase, args: &Args) -> Result<()> {
    println!("\n[{backend}]");
    let mut settings = Settings::built_in()?;
    settings.http.port = 0;
    settings.database.url = db.url();
    settings.database.pool_size = 16;
    settings.auth.jwt_secret = "marketplace-benchmark-secret-0123456789".into();
    let auth = Authenticator::new(&settings.auth.jwt_secret);
    let app = Application::build(settings, registry::ALL.to_vec()).await?;
    let rig = Rig {
        base: format!("http://127.0.0.1:{}", app.port()),
        http: reqwest::Client::builder()
            .pool_max_idle_per_host(256)
            .timeout(Duration::from_secs(30))
            .build()?,
        auth,
        app: app.runtime(),
        handle: app.handle(),
    };
    let server = tokio::spawn(app.run_until_stopped());

    // (a) a catalog read against a trivial route of the same process.
    let seller = rig.token("bench-seller", Role::Seller);
    let product = create_product(&rig, &seller, "BENCH-READ", 1).await?;
    let trivial = closed_loop(&rig, args, |_| "/health/live".to_string()).await?;
    let read_path = format!("/api/v1/catalog/products/{product}");
    let read = closed_loop(&rig, args, move |_| read_path.clone()).await?;
    let ratio_a = read / trivial;
    println!("(a) GET /health/live            {trivial:>9.0} req/s");
    println!("(a) GET /catalog/products/{{id}}  {read:>9.0} req/s");
    println!(
        "(a) ratio                       {ratio_a:>9.2}   target ≥ 0.30 {}",
        verdict(ratio_a >= 0.3)
    );

    // The raw commit rate at the placement concurrency, and with one writer.
    let seconds = args.seconds;
    let clients = args.clients;
    let raw_db = match backend {
        "sqlite" => TestDatabase::sqlite(),
        _ => TestDatabase::postgres().ok_or_else(|| anyhow!("{POSTGRES_ENV} is not set"))?,
    };
    let (raw_one, raw_many) = tokio::task::spawn_blocking(move || -> Result<(f64, f64)> {
        let one = raw_commit_rate(&raw_db, 1, seconds)?.per_second();
        let many = raw_commit_rate(&raw_db, clients, seconds)?.per_second();
        Ok((one, many))
    })
    .await??;
    println!("raw single-row commits, 1 writer   {raw_one:>9.0} /s");
    println!("raw single-row commits, {clients} writers {raw_many:>9.0} /s");

    // (b) placements at full speed from customers whose carts are ready.
    let stock_product = create_product(&rig, &seller, "BENCH-STOCK", 10_000_000).await?;
    let estimate = (raw_many.max(raw_one) * 0.6 * args.seconds).clamp(2_000.0, 20_000.0) as usize;
    let customers = fill_carts(&rig, &stock_product, "b", estimate, args.clients).await?;
    let (placed, elapsed) = place_all(
        &rig,
        &customers,
        args.clients,
        Duration::from_secs_f64(args.seconds),
    )
    .await?;
    let rate_b = placed.len() as f64 / elapsed.as_secs_f64();
    let ratio_b = rate_b / raw_many;
    println!(
        "(b) placements/s at {clients} clients  {rate_b:>9.0}   ({} placed{})",
        placed.len(),
        if placed.len() == customers.len() {
            ", every prepared cart used: the figure is a lower bound"
        } else {
            ""
        }
    );
    println!(
        "(b) ÷ raw commits at {clients} writers {ratio_b:>9.2}   target ≥ 0.30 on PostgreSQL {}   (÷ 1 writer: {:.2})",
        verdict(ratio_b >= 0.3),
        rate_b / raw_one
    );
    let draining = Instant::now();
    settle(&rig, &placed).await?;
    let drained_in = draining.elapsed();
    let saga = saga_span(&rig, &placed).await?;
    println!(
        "    saga: the {} orders were all confirmed {:.2} s after the first was placed ({:.0} orders/s end to end; \
         {:.2} s of draining after placements stopped)",
        placed.len(),
        saga,
        placed.len() as f64 / saga,
        drained_in.as_secs_f64()
    );

    // (c) latency at half of (b)'s rate.
    let pace = (rate_b / 2.0).max(1.0);
    let count = ((pace * args.seconds) as usize).max(50);
    let customers = fill_carts(&rig, &stock_product, "c", count, args.clients).await?;
    let placed = paced(&rig, &customers, pace).await?;
    settle(&rig, &placed).await?;
    let latencies = saga_latencies(&rig, &placed).await?;
    let (to_reserved, to_confirmed) = saga_hops(&rig, &placed).await?;
    let p = percentiles(latencies);
    println!(
        "(c) placement → confirmed at {pace:.0}/s: p50 {:.2} ms, p99 {:.2} ms {}, max {:.2} ms",
        p.p50,
        p.p99,
        verdict(p.p99 <= 50.0),
        p.max
    );
    let (r, c) = (percentiles(to_reserved), percentiles(to_confirmed));
    println!(
        "    of which placed → stock reserved (catalog): p50 {:.2} ms, p99 {:.2} ms; \
         reserved → confirmed (checkout, payment): p50 {:.2} ms, p99 {:.2} ms",
        r.p50, r.p99, c.p50, c.p99
    );
    println!("    targets: p99 ≤ 50 ms");

    rig.handle.stop(true).await;
    server.await??;
    Ok(())
}

fn verdict(pass: bool) -> &'static str {
    if pass { "PASS" } else { "MISS" }
}

async fn create_product(rig: &Rig, seller: &str, sku: &str, stock: i64) -> Result<String> {
    let res = rig
        .http
        .post(format!("{}/api/v1/catalog/products", rig.base))
        .bearer_auth(seller)
        .json(&json!({"sku": sku, "name": sku, "price": {"amount_minor": 500, "currency": "EUR"}, "stock": stock}))
        .send()
        .await?;
    if res.status() != 201 {
        bail!("creating {sku}: {}", res.status());
    }
    let body: Value = res.json().await?;
    body["id"]
        .as_str()
        .map(str::to_string)
        .context("product id")
}

/// `clients` loops requesting `path(i)` as fast as answers come, for the phase length.
async fn closed_loop(
    rig: &Rig,
    args: &Args,
    path: impl Fn(usize) -> String + Clone + Send + 'static,
) -> Result<f64> {
    let deadline = Instant::now() + Duration::from_secs_f64(args.seconds);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..args.clients {
        let (http, base, path) = (rig.http.clone(), rig.base.clone(), path.clone());
        tasks.push(tokio::spawn(async move {
            let mut ok = 0_u64;
            while Instant::now() < deadline {
                let res = http.get(format!("{base}{}", path(i))).send().await?;
                if res.status().is_success() {
                    let _ = res.bytes().await?;
                    ok += 1;
                }
            }
            Ok::<_, reqwest::Error>(ok)
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await??;
    }
    Ok(total as f64 / started.elapsed().as_secs_f64())
}

/// `n` customers named after `phase`, each with one unit of `product` in the cart.
async fn fill_carts(
    rig: &Rig,
    product: &str,
    phase: &str,
    n: usize,
    clients: usize,
) -> Result<Vec<String>> {
    let tokens: Vec<String> = (0..n)
        .map(|i| rig.token(&format!("bench-{phase}-{i}"), Role::Customer))
        .collect();
    let next = Arc::new(AtomicUsize::new(0));
    let tokens = Arc::new(tokens);
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (http, base, next, tokens, product) = (
            rig.http.clone(),
            rig.base.clone(),
            next.clone(),
            tokens.clone(),
            product.to_string(),
        );
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(token) = tokens.get(i) else {
                    return Ok::<_, anyhow::Error>(());
                };
                loop {
                    let res = http
                        .put(format!("{base}/api/v1/cart/items/{product}"))
                        .bearer_auth(token)
                        .json(&json!({"quantity": 1}))
                        .send()
                        .await?;
                    match res.status().as_u16() {
                        200 => break,
                        // Cart has not heard of the product yet.
                        404 => tokio::time::sleep(Duration::from_millis(5)).await,
                        s => bail!("filling a cart: {s}"),
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(Arc::try_unwrap(tokens).unwrap_or_else(|t| (*t).clone()))
}

fn place(
    http: &reqwest::Client,
    base: &str,
    token: &str,
) -> impl std::future::Future<Output = Result<String>> {
    let request = http
        .post(format!("{base}/api/v1/checkout/orders"))
        .bearer_auth(token)
        .header("Idempotency-Key", "bench")
        .json(&json!({
            "shipping_address": {"name": "Bench", "line1": "1 Load St", "city": "Berlin", "postal_code": "10115", "country": "DE"},
            "payment_token": "tok_ok"
        }));
    async move {
        let res = request.send().await?;
        if res.status() != 202 {
            bail!("placement answered {}", res.status());
        }
        let order: Value = res.json().await?;
        order["id"].as_str().map(str::to_string).context("order id")
    }
}

/// Places orders from `clients` loops until `limit` passes or the carts run out.
async fn place_all(
    rig: &Rig,
    customers: &[String],
    clients: usize,
    limit: Duration,
) -> Result<(Vec<(String, String)>, Duration)> {
    let next = Arc::new(AtomicUsize::new(0));
    let customers = Arc::new(customers.to_vec());
    let started = Instant::now();
    let deadline = started + limit;
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (http, base, next, customers) = (
            rig.http.clone(),
            rig.base.clone(),
            next.clone(),
            customers.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut placed = Vec::new();
            while Instant::now() < deadline {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(token) = customers.get(i) else { break };
                placed.push((token.clone(), place(&http, &base, token).await?));
            }
            Ok::<_, anyhow::Error>((placed, Instant::now()))
        }));
    }
    let mut placed = Vec::new();
    let mut finished = started;
    for t in tasks {
        let (mine, at) = t.await??;
        placed.extend(mine);
        finished = finished.max(at);
    }
    Ok((placed, finished - started))
}

/// Places one order per customer at `rate` per second, not waiting for answers
/// before sending the next (an open loop).
async fn paced(rig: &Rig, customers: &[String], rate: f64) -> Result<Vec<(String, String)>> {
    let interval = Duration::from_secs_f64(1.0 / rate);
    let started = tokio::time::Instant::now();
    let mut tasks = Vec::new();
    for (i, token) in customers.iter().enumerate() {
        tokio::time::sleep_until(started + interval.mul_f64(i as f64)).await;
        let (http, base, token) = (rig.http.clone(), rig.base.clone(), token.clone());
        tasks.push(tokio::spawn(async move {
            let id = place(&http, &base, &token).await?;
            Ok::<_, anyhow::Error>((token, id))
        }));
    }
    let mut placed = Vec::new();
    for t in tasks {
        placed.push(t.await??);
    }
    Ok(placed)
}

/// Waits until every order in `placed` is confirmed.
async fn settle(rig: &Rig, placed: &[(String, String)]) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(300);
    for (token, id) in placed {
        loop {
            let order: Value = rig
                .http
                .get(format!("{}/api/v1/checkout/orders/{id}", rig.base))
                .bearer_auth(token)
                .send()
                .await?
                .json()
                .await?;
            match order["status"].as_str() {
                Some("confirmed") => break,
                Some("pending") if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                other => bail!("order {id} ended {other:?}"),
            }
        }
    }
    Ok(())
}

/// Seconds from the first `order_placed` to the last `order_confirmed` of `placed`.
async fn saga_span(rig: &Rig, placed: &[(String, String)]) -> Result<f64> {
    let (placed_at, confirmed_at) = saga_marks(rig).await?;
    let first = placed
        .iter()
        .filter_map(|(_, id)| placed_at.get(id))
        .min()
        .copied();
    let last = placed
        .iter()
        .filter_map(|(_, id)| confirmed_at.get(id))
        .max()
        .copied();
    match (first, last) {
        (Some(f), Some(l)) => Ok((l - f).num_microseconds().unwrap_or(0) as f64 / 1e6),
        _ => bail!("no saga events for these orders"),
    }
}

type Marks = HashMap<String, chrono::DateTime<chrono::Utc>>;

/// When each order was placed and confirmed, from checkout's outbox.
async fn saga_marks(rig: &Rig) -> Result<(Marks, Marks)> {
    let checkout = rig
        .app
        .module("checkout")
        .context("checkout runs here")?
        .db
        .clone();
    let events = checkout
        .read(|conn| {
            kernel::outbox::read_after(conn, "checkout", 0, i64::MAX / 2).map_err(DbError::from)
        })
        .await?;
    let mut placed_at = HashMap::new();
    let mut confirmed_at = HashMap::new();
    for event in events {
        let event = event.map_err(|e| anyhow!(e))?;
        match event.name.as_str() {
            "checkout.order_placed.v1" => placed_at.insert(event.aggregate_id, event.occurred_at),
            "checkout.order_confirmed.v1" => {
                confirmed_at.insert(event.aggregate_id, event.occurred_at)
            }
            _ => None,
        };
    }
    Ok((placed_at, confirmed_at))
}

/// Per order, the two hops of the saga: placed → catalog reserved the stock, and
/// reserved → checkout confirmed (the payment step), in ms.
async fn saga_hops(rig: &Rig, placed: &[(String, String)]) -> Result<(Vec<f64>, Vec<f64>)> {
    let (placed_at, confirmed_at) = saga_marks(rig).await?;
    let catalog = rig
        .app
        .module("catalog")
        .context("catalog runs here")?
        .db
        .clone();
    let events = catalog
        .read(|conn| {
            kernel::outbox::read_after(conn, "catalog", 0, i64::MAX / 2).map_err(DbError::from)
        })
        .await?;
    let mut reserved_at = HashMap::new();
    for event in events {
        let event = event.map_err(|e| anyhow!(e))?;
        if event.name == "catalog.stock_reserved.v1" {
            reserved_at.insert(event.aggregate_id, event.occurred_at);
        }
    }
    let ms = |d: chrono::Duration| d.num_microseconds().unwrap_or(0) as f64 / 1000.0;
    let mut first = Vec::new();
    let mut second = Vec::new();
    for (_, id) in placed {
        if let (Some(p), Some(r), Some(c)) =
            (placed_at.get(id), reserved_at.get(id), confirmed_at.get(id))
        {
            first.push(ms(*r - *p));
            second.push(ms(*c - *r));
        }
    }
    Ok((first, second))
}

/// Per order: from its `order_placed` commit to its `order_confirmed` commit, in ms,
/// read from checkout's outbox.
async fn saga_latencies(rig: &Rig, placed: &[(String, String)]) -> Result<Vec<f64>> {
    let (placed_at, confirmed_at) = saga_marks(rig).await?;
    placed
        .iter()
        .map(|(_, id)| {
            let (Some(p), Some(c)) = (placed_at.get(id), confirmed_at.get(id)) else {
                bail!("order {id} lacks its placed or confirmed event");
            };
            Ok((*c - *p).num_microseconds().unwrap_or(i64::MAX) as f64 / 1000.0)
        })
        .collect()
}
