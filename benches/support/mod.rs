//! What the marketplace and split benchmarks share: a client of a running colony
//! (in the benchmark's process or not), seeding, placement loops, and saga timings
//! read from the modules' outboxes.

#![allow(dead_code, reason = "each benchmark uses a part")]

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use kernel::Db;
use kernel::auth::{Authenticator, Role};
use kernel::db::DbError;
use serde_json::{Value, json};

/// A colony to load: its address, and the databases of the modules whose outboxes
/// give the saga's timings.
pub struct Rig {
    pub base: String,
    pub http: reqwest::Client,
    pub auth: Authenticator,
    pub dbs: HashMap<&'static str, Db>,
}

impl Rig {
    pub fn new(base: String, jwt_secret: &str, dbs: HashMap<&'static str, Db>) -> Result<Self> {
        Ok(Self {
            base,
            http: reqwest::Client::builder()
                .pool_max_idle_per_host(256)
                // Below the server's keep-alive (actix: 5 s), so that a connection
                // left idle between phases (while the saga drains) is dropped here
                // first, not closed by the server under a request sent on it.
                .pool_idle_timeout(Duration::from_secs(2))
                .timeout(Duration::from_secs(30))
                .build()?,
            auth: Authenticator::new(jwt_secret),
            dbs,
        })
    }

    pub fn token(&self, subject: &str, role: Role) -> String {
        self.auth.issue(subject, role, Duration::from_secs(3600))
    }

    pub fn db(&self, module: &str) -> Result<Db> {
        self.dbs
            .get(module)
            .cloned()
            .with_context(|| format!("no database of {module}"))
    }
}

pub fn verdict(pass: bool) -> &'static str {
    if pass { "PASS" } else { "MISS" }
}

pub async fn create_product(rig: &Rig, seller: &str, sku: &str, stock: i64) -> Result<String> {
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

/// `clients` loops requesting `path(i)` as fast as answers come, for `seconds`.
pub async fn closed_loop(
    rig: &Rig,
    clients: usize,
    seconds: f64,
    path: impl Fn(usize) -> String + Clone + Send + 'static,
) -> Result<f64> {
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..clients {
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
pub async fn fill_carts(
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
                        s => bail!("filling a cart: {s} {}", res.text().await?),
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
pub async fn place_all(
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
pub async fn paced(rig: &Rig, customers: &[String], rate: f64) -> Result<Vec<(String, String)>> {
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
pub async fn settle(rig: &Rig, placed: &[(String, String)]) -> Result<()> {
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

pub type Marks = HashMap<String, chrono::DateTime<chrono::Utc>>;

/// When each aggregate got an event named `name`, from `module`'s outbox.
pub async fn marks(rig: &Rig, module: &'static str, name: &'static str) -> Result<Marks> {
    let events = rig
        .db(module)?
        .read(move |conn| {
            kernel::outbox::read_after(conn, module, 0, i64::MAX / 2).map_err(DbError::from)
        })
        .await?;
    let mut at = HashMap::new();
    for event in events {
        let event = event.map_err(|e| anyhow!(e))?;
        if event.name == name {
            at.insert(event.aggregate_id, event.occurred_at);
        }
    }
    Ok(at)
}

/// Seconds from the first `order_placed` to the last `order_confirmed` of `placed`.
pub async fn saga_span(rig: &Rig, placed: &[(String, String)]) -> Result<f64> {
    let placed_at = marks(rig, "checkout", "checkout.order_placed.v1").await?;
    let confirmed_at = marks(rig, "checkout", "checkout.order_confirmed.v1").await?;
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

/// Per order, in ms, the time between consecutive marks: `marks[i + 1] - marks[i]`
/// for each `i`, one list per step. Orders missing a mark are left out.
pub fn steps(placed: &[(String, String)], marks: &[&Marks]) -> Vec<Vec<f64>> {
    let ms = |d: chrono::Duration| d.num_microseconds().unwrap_or(0) as f64 / 1000.0;
    let mut out = vec![Vec::new(); marks.len().saturating_sub(1)];
    for (_, id) in placed {
        let Some(at) = marks
            .iter()
            .map(|m| m.get(id).copied())
            .collect::<Option<Vec<_>>>()
        else {
            continue;
        };
        for (i, pair) in at.windows(2).enumerate() {
            out[i].push(ms(pair[1] - pair[0]));
        }
    }
    out
}

/// Per order: from its `order_placed` commit to its `order_confirmed` commit, in ms.
pub async fn saga_latencies(rig: &Rig, placed: &[(String, String)]) -> Result<Vec<f64>> {
    let placed_at = marks(rig, "checkout", "checkout.order_placed.v1").await?;
    let confirmed_at = marks(rig, "checkout", "checkout.order_confirmed.v1").await?;
    let all = steps(placed, &[&placed_at, &confirmed_at]).remove(0);
    if all.len() != placed.len() {
        bail!(
            "{} of {} orders lack their placed or confirmed event",
            placed.len() - all.len(),
            placed.len()
        );
    }
    Ok(all)
}

/// CPU time the whole machine has been busy so far, in clock ticks (every state of
/// `/proc/stat`'s first line but idle and iowait).
pub fn machine_busy_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(cpu) = stat.lines().next() else {
        return 0;
    };
    cpu.split_whitespace()
        .skip(1)
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .filter_map(|(_, v)| v.parse::<u64>().ok())
        .sum()
}

/// Waits (up to a minute) until the machine as a whole uses less than a tenth of a
/// core over half a second: the work a burst left behind is done, in colony's
/// processes and in PostgreSQL and NATS (whose background work after a burst —
/// vacuum, checkpoints, stream housekeeping — would otherwise land on the next run).
pub async fn quiet() {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut before = machine_busy_ticks();
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = machine_busy_ticks();
        // Clock ticks are 1/100 s: 5 ticks in 0.5 s is a tenth of a core.
        if now.saturating_sub(before) < 5 {
            return;
        }
        before = now;
    }
    println!("(the machine did not go quiet within a minute)");
}

/// Cores the machine as a whole kept busy, on average, while `work` ran.
pub async fn busy_cores_during<T>(work: impl std::future::Future<Output = T>) -> (T, f64) {
    let (ticks, started) = (machine_busy_ticks(), Instant::now());
    let out = work.await;
    let busy = machine_busy_ticks().saturating_sub(ticks) as f64 / 100.0;
    (out, busy / started.elapsed().as_secs_f64())
}

/// When the test gateway recorded each order's charge.
pub async fn charged(rig: &Rig) -> Result<Marks> {
    #[derive(diesel::QueryableByName)]
    struct Charge {
        #[diesel(sql_type = diesel::sql_types::Text)]
        order_id: String,
        #[diesel(sql_type = diesel::sql_types::Timestamp)]
        created_at: chrono::NaiveDateTime,
    }
    let charges = rig
        .db("checkout")?
        .read(|conn| {
            let query = diesel::sql_query("SELECT order_id, created_at FROM test_gateway_charges");
            match conn {
                kernel::AnyConnection::Postgresql(c) => {
                    diesel::RunQueryDsl::load::<Charge>(query, c).map_err(DbError::from)
                }
                kernel::AnyConnection::Sqlite(c) => {
                    diesel::RunQueryDsl::load::<Charge>(query, c).map_err(DbError::from)
                }
            }
        })
        .await?;
    Ok(charges
        .into_iter()
        .map(|c| (c.order_id, c.created_at.and_utc()))
        .collect())
}
