//! Payment: the `PaymentGateway` port, the built-in test gateway, the guard every
//! call goes through (timeout, circuit breaker), and the worker that takes the
//! saga's payment steps outside any database transaction.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::NaiveDateTime;
use contracts::Money;
use contracts::checkout::{OrderCancelled, OrderConfirmed, OrderRejected};
use diesel::pg::Pg;
use diesel::query_builder::{AstPass, Query, QueryFragment, QueryId};
use diesel::sql_types::{Array, BigInt, Text, Timestamp};
use diesel::{QueryResult, RunQueryDsl};
use kernel::bus::BoxFuture;
use kernel::db::DbError;
use kernel::resilience::CircuitBreaker;
use kernel::{AnyConnection, Db};
use serde::Deserialize;
use tokio::sync::{mpsc, oneshot, watch};
use uuid::Uuid;

use crate::domain::{OrderState, Payment};
use crate::store;

/// A charge to take; `order_id` is its idempotency key at the gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChargeRequest {
    pub order_id: Uuid,
    pub amount: Money,
    pub token: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChargeOutcome {
    Succeeded,
    Declined(String),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GatewayError {
    #[error("the payment gateway did not answer in time")]
    Timeout,
    #[error("the payment gateway is unavailable: {0}")]
    Unavailable(String),
    #[error("the payment gateway is failing; calls are paused")]
    CircuitOpen,
}

/// A payment service provider. Charges and refunds are idempotent per order: a
/// step retried after a crash never charges twice.
pub trait PaymentGateway: Send + Sync {
    /// Whether `token` is one this gateway can charge (checked at placement).
    fn accepts(&self, token: &str) -> bool;
    fn charge(&self, request: ChargeRequest) -> BoxFuture<'_, Result<ChargeOutcome, GatewayError>>;
    fn refund(&self, order_id: Uuid) -> BoxFuture<'_, Result<(), GatewayError>>;
}

/// `modules.checkout.payment` settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PaymentSettings {
    /// Simulated latency of the test gateway, per call.
    pub latency_ms: u64,
    /// Share of test gateway calls that fail as if the provider were down (0–1).
    pub failure_rate: f64,
    /// Longest wait for the gateway before a call counts as failed.
    pub timeout_ms: u64,
    /// Consecutive failures that open the circuit, and how long it stays open.
    pub breaker_failures: u32,
    pub breaker_cooldown_ms: u64,
    /// The wait before a failed step is tried again, doubling with each failure
    /// up to `retry_max_ms`.
    pub retry_base_ms: u64,
    pub retry_max_ms: u64,
}

impl Default for PaymentSettings {
    fn default() -> Self {
        Self {
            latency_ms: 0,
            failure_rate: 0.0,
            timeout_ms: 5_000,
            breaker_failures: 5,
            breaker_cooldown_ms: 5_000,
            retry_base_ms: 200,
            retry_max_ms: 30_000,
        }
    }
}

/// How long a failed payment step waits before it is tried again.
#[derive(Debug, Clone, Copy)]
pub struct RetryDelays {
    base: chrono::Duration,
    max: chrono::Duration,
}

impl RetryDelays {
    pub fn new(settings: &PaymentSettings) -> Self {
        let ms = |v: u64| chrono::Duration::milliseconds(i64::try_from(v).unwrap_or(i64::MAX / 2));
        Self {
            base: ms(settings.retry_base_ms.max(1)),
            max: ms(settings.retry_max_ms.max(settings.retry_base_ms).max(1)),
        }
    }

    /// After `failures` failed attempts (the one just made included).
    fn after(&self, failures: u32) -> chrono::Duration {
        let factor = 1_i32 << failures.saturating_sub(1).min(20);
        self.base
            .checked_mul(factor)
            .unwrap_or(self.max)
            .min(self.max)
    }
}

/// The built-in gateway: `tok_ok` succeeds, `tok_decline` is declined. It keeps
/// its own ledger (one charge per order, ever) as a real provider would.
pub struct TestGateway {
    db: Db,
    ledger: Arc<Ledger>,
    latency: Duration,
    failure_rate: f64,
}

impl TestGateway {
    pub fn new(db: Db, settings: &PaymentSettings) -> Self {
        Self {
            ledger: Arc::new(Ledger {
                db: db.clone(),
                queue: std::sync::Mutex::default(),
            }),
            db,
            latency: Duration::from_millis(settings.latency_ms),
            failure_rate: settings.failure_rate.clamp(0.0, 1.0),
        }
    }

    async fn simulate(&self) -> Result<(), GatewayError> {
        if !self.latency.is_zero() {
            tokio::time::sleep(self.latency).await;
        }
        if self.failure_rate > 0.0 && rand::random::<f64>() < self.failure_rate {
            return Err(GatewayError::Unavailable(
                "simulated provider failure".into(),
            ));
        }
        Ok(())
    }
}

fn ledger_error(e: DbError) -> GatewayError {
    GatewayError::Unavailable(e.to_string())
}

impl PaymentGateway for TestGateway {
    fn accepts(&self, token: &str) -> bool {
        matches!(token, "tok_ok" | "tok_decline")
    }

    fn charge(&self, request: ChargeRequest) -> BoxFuture<'_, Result<ChargeOutcome, GatewayError>> {
        Box::pin(async move {
            self.simulate().await?;
            self.ledger.charge(request).await
        })
    }

    fn refund(&self, order_id: Uuid) -> BoxFuture<'_, Result<(), GatewayError>> {
        Box::pin(async move {
            self.simulate().await?;
            self.db
                .write_one(move |conn| {
                    use crate::schema::test_gateway_charges as c;
                    use diesel::prelude::*;
                    diesel::update(c::table.find(order_id.to_string()))
                        .set(c::refunded.eq(true))
                        .execute(conn)?;
                    Ok::<_, DbError>(())
                })
                .await
                .map_err(ledger_error)
        })
    }
}

/// Charges written to the test gateway's ledger at most, in one statement.
const LEDGER_BATCH: usize = 128;

type LedgerAnswer = oneshot::Sender<Result<ChargeOutcome, GatewayError>>;

/// The test gateway's ledger, written as a provider batching its own writes would
/// write it: a charge that arrives while others are being written waits for them,
/// and is then written together with whatever else arrived meanwhile, in one
/// statement (one round trip and one commit for all). Alone, a charge is one
/// statement, as before.
struct Ledger {
    db: Db,
    queue: std::sync::Mutex<LedgerQueue>,
}

#[derive(Default)]
struct LedgerQueue {
    waiting: Vec<(ChargeRequest, LedgerAnswer)>,
    /// Whether a writer task is running; it takes what waits until nothing does.
    writing: bool,
}

impl Ledger {
    fn queue(&self) -> std::sync::MutexGuard<'_, LedgerQueue> {
        self.queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    async fn charge(
        self: &Arc<Self>,
        request: ChargeRequest,
    ) -> Result<ChargeOutcome, GatewayError> {
        let (answer, answered) = oneshot::channel();
        let lead = {
            let mut queue = self.queue();
            queue.waiting.push((request, answer));
            !std::mem::replace(&mut queue.writing, true)
        };
        if lead {
            // A task of its own: a caller that stops waiting (its call timed out)
            // leaves the others' writes going.
            tokio::spawn(self.clone().write_waiting());
        }
        answered.await.unwrap_or_else(|_| {
            Err(GatewayError::Unavailable(
                "the ledger writer stopped".into(),
            ))
        })
    }

    async fn write_waiting(self: Arc<Self>) {
        // Should this task end early (a panic), the next charge starts another,
        // which takes what still waits.
        let mut writer = WriterGuard {
            ledger: &self,
            running: true,
        };
        loop {
            let batch: Vec<_> = {
                let mut queue = self.queue();
                if queue.waiting.is_empty() {
                    // Under the same lock as the look: a charge queued after it
                    // finds no writer, and starts one.
                    queue.writing = false;
                    writer.running = false;
                    return;
                }
                let n = queue.waiting.len().min(LEDGER_BATCH);
                queue.waiting.drain(..n).collect()
            };
            let (requests, answers): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
            match self
                .db
                .write_one(move |conn| charge_all(conn, &requests))
                .await
            {
                Ok(outcomes) => {
                    for (answer, outcome) in answers.into_iter().zip(outcomes) {
                        let _ = answer.send(Ok(outcome));
                    }
                }
                Err(e) => {
                    let error = ledger_error(e);
                    for answer in answers {
                        let _ = answer.send(Err(error.clone()));
                    }
                }
            }
        }
    }
}

/// Marks the ledger's writer stopped should its task end while it runs (a panic).
struct WriterGuard<'a> {
    ledger: &'a Ledger,
    running: bool,
}

impl Drop for WriterGuard<'_> {
    fn drop(&mut self) {
        if self.running {
            self.ledger.queue().writing = false;
        }
    }
}

/// The outcomes of `requests`, in their order: each order's ledger entry created
/// on its first charge only. On PostgreSQL one statement inserts the new entries and
/// says which they were; an order charged before (a retried step) has its recorded
/// outcome read. SQLite, whose writers take turns in this process anyway, takes them
/// one at a time.
fn charge_all(
    conn: &mut AnyConnection,
    requests: &[ChargeRequest],
) -> Result<Vec<ChargeOutcome>, DbError> {
    use crate::schema::test_gateway_charges as c;
    use diesel::prelude::*;
    let pg = match conn {
        AnyConnection::Sqlite(lite) => {
            return requests.iter().map(|r| charge_once(lite, r)).collect();
        }
        AnyConnection::Postgresql(pg) => pg,
    };
    let ids: Vec<String> = requests.iter().map(|r| r.order_id.to_string()).collect();
    let created: HashSet<String> = NewChargesPg {
        order_ids: &ids,
        amounts: requests.iter().map(|r| r.amount.amount_minor).collect(),
        currencies: requests
            .iter()
            .map(|r| r.amount.currency.as_str())
            .collect(),
        outcomes: requests
            .iter()
            .map(|r| outcome_of_token(&r.token))
            .collect(),
        at: kernel::time::now(),
    }
    .load::<String>(pg)?
    .into_iter()
    .collect();
    // An order named twice in the batch (a step retried while its first call was
    // queued) has its entry read back: which of its rows went in is the table's to say.
    let mut named = HashMap::<&String, usize>::new();
    for id in &ids {
        *named.entry(id).or_default() += 1;
    }
    let earlier: Vec<&String> = ids
        .iter()
        .filter(|id| !created.contains(*id) || named[id] > 1)
        .collect();
    let recorded: HashMap<String, String> = if earlier.is_empty() {
        HashMap::new()
    } else {
        c::table
            .filter(c::order_id.eq_any(earlier))
            .select((c::order_id, c::outcome))
            .load::<(String, String)>(pg)?
            .into_iter()
            .collect()
    };
    Ok(requests
        .iter()
        .zip(&ids)
        .map(|(request, id)| {
            let outcome = recorded
                .get(id)
                .map_or_else(|| outcome_of_token(&request.token), String::as_str);
            charge_outcome(outcome)
        })
        .collect())
}

/// PostgreSQL: a batch's new ledger entries, from arrays, returning the orders whose
/// entry went in (an order charged before keeps its entry). One text for any
/// number of charges, so that the statement is prepared once per connection: diesel
/// writes a multi-row insert anew for each count of rows, and the server plans it
/// anew each time.
struct NewChargesPg<'a> {
    order_ids: &'a [String],
    amounts: Vec<i64>,
    currencies: Vec<&'a str>,
    outcomes: Vec<&'static str>,
    at: NaiveDateTime,
}

impl QueryId for NewChargesPg<'_> {
    type QueryId = NewChargesPg<'static>;
    const HAS_STATIC_QUERY_ID: bool = true;
}

impl Query for NewChargesPg<'_> {
    type SqlType = Text;
}

impl RunQueryDsl<diesel::PgConnection> for NewChargesPg<'_> {}

impl QueryFragment<Pg> for NewChargesPg<'_> {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        out.push_sql(
            "INSERT INTO test_gateway_charges \
             (order_id, amount_minor, currency, outcome, refunded, created_at) \
             SELECT charge.*, false, ",
        );
        out.push_bind_param::<Timestamp, _>(&self.at)?;
        out.push_sql(" FROM unnest(");
        out.push_bind_param::<Array<Text>, _>(self.order_ids)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<BigInt>, _>(&self.amounts)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<Text>, _>(&self.currencies)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<Text>, _>(&self.outcomes)?;
        out.push_sql(") AS charge ON CONFLICT DO NOTHING RETURNING order_id");
        Ok(())
    }
}

fn outcome_of_token(token: &str) -> &'static str {
    if token == "tok_ok" {
        "succeeded"
    } else {
        "declined"
    }
}

fn charge_outcome(recorded: &str) -> ChargeOutcome {
    if recorded == "succeeded" {
        ChargeOutcome::Succeeded
    } else {
        ChargeOutcome::Declined("the card was declined".into())
    }
}

/// SQLite: the ledger entry of the order's charge, created on the first call only: the
/// insert is the check (one statement, no transaction), and a call that finds the
/// entry there already reads the outcome it recorded.
fn charge_once(
    conn: &mut diesel::SqliteConnection,
    request: &ChargeRequest,
) -> Result<ChargeOutcome, DbError> {
    use crate::schema::test_gateway_charges as c;
    use diesel::prelude::*;
    let id = request.order_id.to_string();
    let outcome = outcome_of_token(&request.token);
    let entry = (
        c::order_id.eq(&id),
        c::amount_minor.eq(request.amount.amount_minor),
        c::currency.eq(&request.amount.currency),
        c::outcome.eq(outcome),
        c::refunded.eq(false),
        c::created_at.eq(kernel::time::now()),
    );
    let inserted = diesel::insert_into(c::table)
        .values(entry)
        .on_conflict_do_nothing()
        .execute(conn)?;
    if inserted > 0 {
        return Ok(charge_outcome(outcome));
    }
    let recorded: String = c::table.find(&id).select(c::outcome).get_result(conn)?;
    Ok(charge_outcome(&recorded))
}

/// Every gateway call goes through here: bounded in time, and failed fast while
/// the gateway keeps failing.
pub struct GuardedGateway {
    inner: Arc<dyn PaymentGateway>,
    timeout: Duration,
    breaker: CircuitBreaker,
}

impl GuardedGateway {
    pub fn new(inner: Arc<dyn PaymentGateway>, settings: &PaymentSettings) -> Self {
        Self {
            inner,
            timeout: Duration::from_millis(settings.timeout_ms.max(1)),
            breaker: CircuitBreaker::new(
                settings.breaker_failures,
                Duration::from_millis(settings.breaker_cooldown_ms),
            ),
        }
    }

    async fn guard<T>(
        &self,
        call: BoxFuture<'_, Result<T, GatewayError>>,
    ) -> Result<T, GatewayError> {
        if !self.breaker.allow() {
            return Err(GatewayError::CircuitOpen);
        }
        let result = match tokio::time::timeout(self.timeout, call).await {
            Ok(result) => result,
            Err(_) => Err(GatewayError::Timeout),
        };
        match &result {
            Ok(_) => self.breaker.record_success(),
            Err(_) => self.breaker.record_failure(),
        }
        result
    }
}

impl PaymentGateway for GuardedGateway {
    fn accepts(&self, token: &str) -> bool {
        self.inner.accepts(token)
    }

    fn charge(&self, request: ChargeRequest) -> BoxFuture<'_, Result<ChargeOutcome, GatewayError>> {
        Box::pin(self.guard(self.inner.charge(request)))
    }

    fn refund(&self, order_id: Uuid) -> BoxFuture<'_, Result<(), GatewayError>> {
        Box::pin(self.guard(self.inner.refund(order_id)))
    }
}

const POLL: Duration = Duration::from_secs(1);

/// How long a claimed payment step stays with the process that took it: longer than
/// its gateway call may last, so only a process that died loses it (and then the
/// step is taken again once the lease runs out).
pub fn lease_for(settings: &PaymentSettings) -> chrono::Duration {
    chrono::Duration::milliseconds(
        i64::try_from(settings.timeout_ms.saturating_mul(2)).unwrap_or(i64::MAX / 2) + 1_000,
    )
}

/// Payment steps made due by this process's own transactions (a reservation
/// confirmed, a shipment cancelled): claimed by that transaction and handed to this
/// process's worker once it has committed, so the step takes no look and no claim
/// of its own.
#[derive(Clone)]
pub struct Handoff {
    steps: mpsc::UnboundedSender<store::OrderRow>,
    lease: chrono::Duration,
}

impl Handoff {
    pub fn new(lease: chrono::Duration) -> (Self, mpsc::UnboundedReceiver<store::OrderRow>) {
        let (steps, handed) = mpsc::unbounded_channel();
        (Self { steps, lease }, handed)
    }

    /// Inside the transaction that makes an order's payment step due: until when
    /// this process claims the step, to be stored as its due time; the step is then
    /// handed to the worker after the commit (`hand_over`, once the row is
    /// written). `None` outside a transaction, or with the worker gone: the step is
    /// due now, for whichever worker looks first.
    pub fn lease_until(&self, now: NaiveDateTime) -> Option<NaiveDateTime> {
        (!self.steps.is_closed() && kernel::db::in_write_tx()).then(|| now + self.lease)
    }

    /// After the commit, gives the worker `order`, whose step was stored with the
    /// time `lease_until` gave. Should the worker stop before it takes the step,
    /// the claim runs out and a worker finds the step due then.
    pub fn hand_over(&self, order: store::OrderRow) {
        let steps = self.steps.clone();
        kernel::db::after_commit(move || {
            let _ = steps.send(order);
        });
    }
}

/// Takes payment steps (charges after reservation, refunds after a cancelled
/// shipment) until `shutdown`: those `handed` over by this process's transactions,
/// and those a look finds due (retries, and steps whose claim ran out because the
/// process that took them died). A look is a read; only due steps are claimed, in a
/// short transaction. Each batch of steps: the gateway calls (no transaction open),
/// then one transaction records the outcomes and publishes.
///
/// Batches run side by side (up to `BATCHES_IN_FLIGHT`), so a step that falls due
/// while an earlier batch waits for the gateway or its commit is taken at once
/// instead of after it. On shutdown the batches in flight are finished.
pub async fn run_worker(
    db: Db,
    gateway: Arc<dyn PaymentGateway>,
    lease: chrono::Duration,
    retry: RetryDelays,
    mut handed: mpsc::UnboundedReceiver<store::OrderRow>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut batches = tokio::task::JoinSet::new();
    let mut waiting: Vec<store::OrderRow> = Vec::new();
    let mut next_look = tokio::time::Instant::now();
    while !*shutdown.borrow() {
        while let Some(done) = batches.try_join_next() {
            report_batch(done, &mut next_look);
        }
        if batches.len() < BATCHES_IN_FLIGHT {
            while waiting.len() < BATCH {
                match handed.try_recv() {
                    Ok(order) => waiting.push(order),
                    Err(_) => break,
                }
            }
            let mut steps = std::mem::take(&mut waiting);
            // Looked for even while steps are handed over, so retries are not held
            // back by a steady flow of new ones.
            if tokio::time::Instant::now() >= next_look {
                match claim_due_steps(&db, lease).await {
                    // More may be due: the next round looks again.
                    Ok(Claim::Taken(claimed)) => steps.extend(claimed),
                    Ok(Claim::NextDue(next)) => {
                        let until = next.map_or(POLL, |next| {
                            (next - kernel::time::now())
                                .to_std()
                                .unwrap_or(Duration::ZERO)
                                .min(POLL)
                        });
                        next_look = tokio::time::Instant::now() + until;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "payment worker could not read due steps");
                        next_look = tokio::time::Instant::now() + POLL;
                    }
                }
            }
            if !steps.is_empty() {
                let (db, gateway) = (db.clone(), gateway.clone());
                batches.spawn(async move {
                    let answers = call_gateway(&gateway, steps).await;
                    db.write(move |conn| record(conn, answers, retry)).await
                });
                continue;
            }
        }
        let room = batches.len() < BATCHES_IN_FLIGHT;
        tokio::select! {
            Some(order) = handed.recv(), if room => waiting.push(order),
            () = tokio::time::sleep_until(next_look), if room => {}
            _ = shutdown.changed() => {}
            Some(done) = batches.join_next(), if !batches.is_empty() => {
                report_batch(done, &mut next_look);
            }
        }
    }
    while let Some(done) = batches.join_next().await {
        report_batch(done, &mut next_look);
    }
}

/// A batch ended: a step it set to be retried brings the next look forward.
fn report_batch(
    done: Result<Result<Option<NaiveDateTime>, DbError>, tokio::task::JoinError>,
    next_look: &mut tokio::time::Instant,
) {
    let retry_at = match done {
        Ok(Ok(None)) => return,
        Ok(Ok(Some(due))) => (due - kernel::time::now())
            .to_std()
            .unwrap_or(Duration::ZERO),
        // Its claims run out and the steps are taken again.
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "recording payment steps failed");
            POLL
        }
        Err(e) => {
            tracing::error!(error = %e, "a payment batch panicked");
            POLL
        }
    };
    *next_look = (*next_look).min(tokio::time::Instant::now() + retry_at);
}

/// Payment steps claimed at once, batches of them in flight at once, and gateway
/// calls in flight at once per batch.
const BATCH: usize = 128;
const BATCHES_IN_FLIGHT: usize = 4;
const IN_FLIGHT: usize = 32;

/// What the gateway answered for one claimed step.
enum Answer {
    Charged(ChargeOutcome),
    Refunded,
    Failed(GatewayError),
    /// Nothing was due any more (settled meanwhile): stop asking.
    Nothing,
}

/// What a look for due steps found.
enum Claim {
    /// Steps due now, claimed by this process.
    Taken(Vec<store::OrderRow>),
    /// Nothing due now; when the next step falls due, if any.
    NextDue(Option<NaiveDateTime>),
}

/// Claims the steps due now: a read first, so a look that finds nothing writes
/// nothing.
async fn claim_due_steps(db: &Db, lease: chrono::Duration) -> Result<Claim, DbError> {
    loop {
        let next = db
            .read(|conn| store::next_payment_due(conn).map_err(DbError::from))
            .await?;
        match next {
            Some(due) if due <= kernel::time::now() => {}
            later => return Ok(Claim::NextDue(later)),
        }
        let claimed = db
            .write(move |conn| {
                let now = kernel::time::now();
                let due = store::payments_due(conn, now, i64::try_from(BATCH).unwrap_or(i64::MAX))?;
                store::claim_payments(conn, &due, now, now + lease).map_err(DbError::from)
            })
            .await?;
        if !claimed.is_empty() {
            return Ok(Claim::Taken(claimed));
        }
        // Another replica took them: look again for what falls due next.
    }
}

/// The gateway call each claimed order's step needs, at most `IN_FLIGHT` at once.
async fn call_gateway(
    gateway: &Arc<dyn PaymentGateway>,
    orders: Vec<store::OrderRow>,
) -> Vec<(store::OrderRow, Answer)> {
    let mut answers = Vec::with_capacity(orders.len());
    let mut calls = tokio::task::JoinSet::new();
    let mut pending = orders.into_iter();
    loop {
        while calls.len() < IN_FLIGHT {
            let Some(order) = pending.next() else { break };
            let gateway = gateway.clone();
            calls.spawn(async move {
                let order_id = Uuid::parse_str(&order.id).unwrap_or_default();
                let answer = match order.state().payment {
                    Payment::ChargeDue => {
                        let request = ChargeRequest {
                            order_id,
                            amount: Money::new(order.total_minor, order.currency.clone()),
                            token: order.payment_token.clone(),
                        };
                        gateway
                            .charge(request)
                            .await
                            .map_or_else(Answer::Failed, Answer::Charged)
                    }
                    Payment::RefundDue => gateway
                        .refund(order_id)
                        .await
                        .map_or_else(Answer::Failed, |()| Answer::Refunded),
                    _ => Answer::Nothing,
                };
                (order, answer)
            });
        }
        match calls.join_next().await {
            Some(Ok(answer)) => answers.push(answer),
            // A panicked call: its claim runs out and the step is taken again.
            Some(Err(e)) => tracing::error!(error = %e, "a payment call panicked"),
            None => break,
        }
    }
    answers
}

/// Applies the gateway's answers to their orders and publishes what follows;
/// returns when the earliest step it set to be retried falls due.
fn record(
    conn: &mut AnyConnection,
    answers: Vec<(store::OrderRow, Answer)>,
    retry: RetryDelays,
) -> Result<Option<NaiveDateTime>, DbError> {
    let mut retry_at: Option<NaiveDateTime> = None;
    let now = kernel::time::now();
    let ids: Vec<String> = answers.iter().map(|(order, _)| order.id.clone()).collect();
    let mut locked: HashMap<String, store::OrderRow> = store::lock_all(conn, &ids)?
        .into_iter()
        .map(|order| (order.id.clone(), order))
        .collect();
    let mut settled = Vec::new();
    let mut writes = Vec::new();
    for (claimed, answer) in answers {
        let Some(order) = locked.remove(&claimed.id) else {
            continue;
        };
        let state = order.state();
        let next = match &answer {
            Answer::Charged(ChargeOutcome::Succeeded) => state.charged(),
            Answer::Charged(ChargeOutcome::Declined(_)) => state.declined(),
            Answer::Refunded => state.refunded(),
            Answer::Nothing => None,
            Answer::Failed(error) => {
                let attempts = u32::try_from(order.payment_attempts.max(0)).unwrap_or(0);
                let due = now + retry.after(attempts + 1);
                tracing::warn!(order.id = %order.id, error = %error, attempts = attempts + 1, "payment step will be retried");
                store::payment_failed(conn, &order.id, &error.to_string(), due)?;
                retry_at = Some(retry_at.map_or(due, |at| at.min(due)));
                continue;
            }
        };
        let Some(next) = next else {
            // Settled meanwhile, or nothing was due: stop asking.
            writes.push((order.id, state));
            continue;
        };
        writes.push((order.id.clone(), next));
        tracing::info!(order.id = %order.id, status = next.status.as_str(), "payment step recorded");
        settled.push((order, next));
    }
    store::save_settled(conn, &writes, now)?;
    let confirmed: Vec<String> = settled
        .iter()
        .filter(|(_, next)| next.status == crate::domain::Status::Confirmed)
        .map(|(order, _)| order.id.clone())
        .collect();
    let mut lines = store::lines_of(conn, &confirmed)?;
    let outcomes: Vec<_> = settled
        .into_iter()
        .filter_map(|(order, next)| {
            let lines = lines.remove(&order.id).unwrap_or_default();
            outcome_of(&order, next, lines).map(|outcome| (order, outcome))
        })
        .collect();
    // Publishing takes the outbox's ordering lock (on PostgreSQL) until commit: last.
    for (order, outcome) in &outcomes {
        publish_outcome(conn, order, outcome)?;
    }
    Ok(retry_at)
}

/// The event an order's new state calls for (reading what it needs now, so that
/// publishing, which holds the outbox's ordering lock, is short).
enum Outcome {
    Confirmed(OrderConfirmed),
    Rejected(OrderRejected),
    Cancelled(OrderCancelled),
}

fn outcome_of(
    order: &store::OrderRow,
    next: OrderState,
    lines: Vec<store::LineRow>,
) -> Option<Outcome> {
    let order_id = Uuid::parse_str(&order.id).unwrap_or_default();
    let customer_id = order.customer_id.clone();
    match next.status {
        crate::domain::Status::Confirmed => Some(Outcome::Confirmed(OrderConfirmed {
            order_id,
            customer_id,
            lines: crate::http::contract_lines(&lines),
            total: Money::new(order.total_minor, order.currency.clone()),
            shipping_address: crate::http::address_of(order),
        })),
        crate::domain::Status::Rejected => Some(Outcome::Rejected(OrderRejected {
            order_id,
            customer_id,
            reason: next
                .reason
                .unwrap_or(crate::domain::PAYMENT_DECLINED)
                .to_string(),
        })),
        crate::domain::Status::Cancelled => Some(Outcome::Cancelled(OrderCancelled {
            order_id,
            customer_id,
            reason: crate::domain::CANCELLED_BY_CUSTOMER.to_string(),
        })),
        _ => None,
    }
}

fn publish_outcome(
    conn: &mut AnyConnection,
    order: &store::OrderRow,
    outcome: &Outcome,
) -> Result<(), DbError> {
    let publisher = order.publisher();
    match outcome {
        Outcome::Confirmed(e) => publisher.publish(conn, &order.id, e)?,
        Outcome::Rejected(e) => publisher.publish(conn, &order.id, e)?,
        Outcome::Cancelled(e) => publisher.publish(conn, &order.id, e)?,
    };
    Ok(())
}

#[cfg(test)]
mod tests {
    use kernel::db::Backend;
    use kernel::on_both_backends;
    use kernel::testing::{TestDatabase, migrated_pool, postgres_pool, prepared_statements};

    use super::*;

    fn request(order_id: Uuid, token: &str) -> ChargeRequest {
        ChargeRequest {
            order_id,
            amount: Money::new(1_250, "EUR"),
            token: token.into(),
        }
    }

    /// Given many charges at once, some of them for the same order with the other
    /// token (a step retried), when the test gateway takes them, then each order has
    /// one ledger entry and every charge of an order gets the outcome of its first.
    async fn concurrent_charges_are_recorded_once_per_order(test_db: TestDatabase) {
        let backend = if test_db.is_postgres() {
            Backend::Postgres
        } else {
            Backend::Sqlite
        };
        let pool = migrated_pool(&test_db, crate::MODULE, crate::SPEC.migrations);
        let db = Db::new(crate::MODULE, backend, pool);
        let gateway = Arc::new(TestGateway::new(db.clone(), &PaymentSettings::default()));
        let orders: Vec<Uuid> = (0..40).map(|_| Uuid::now_v7()).collect();
        let token = |n: usize| {
            if n.is_multiple_of(4) {
                "tok_decline"
            } else {
                "tok_ok"
            }
        };
        // Recorded first, so the retries below find them.
        for (n, order) in orders.iter().enumerate().take(5) {
            gateway.charge(request(*order, token(n))).await.unwrap();
        }
        let mut calls = tokio::task::JoinSet::new();
        for (n, order) in orders.iter().enumerate() {
            let (order, first) = (*order, token(n));
            let charging = gateway.clone();
            calls.spawn(async move { (n, charging.charge(request(order, first)).await) });
            if n < 10 {
                // The same order again with the other token: the first outcome stands.
                let gateway = gateway.clone();
                let other = if first == "tok_ok" {
                    "tok_decline"
                } else {
                    "tok_ok"
                };
                calls.spawn(async move { (n, gateway.charge(request(order, other)).await) });
            }
        }
        // Every call is answered (a charge left without a writer would never be).
        let mut answers: HashMap<usize, Vec<ChargeOutcome>> = HashMap::new();
        let all = tokio::time::timeout(Duration::from_secs(10), async {
            while let Some(call) = calls.join_next().await {
                let (n, outcome) = call.unwrap();
                answers.entry(n).or_default().push(outcome.unwrap());
            }
        })
        .await;
        assert!(all.is_ok(), "a charge was never answered");
        assert_eq!(answers.values().map(Vec::len).sum::<usize>(), 50);
        let entries: Vec<(String, String)> = db
            .read(|conn| {
                use crate::schema::test_gateway_charges as c;
                use diesel::prelude::*;
                c::table
                    .select((c::order_id, c::outcome))
                    .load(conn)
                    .map_err(DbError::from)
            })
            .await
            .unwrap();
        assert_eq!(entries.len(), 40, "one entry per order");
        let recorded: HashMap<String, String> = entries.into_iter().collect();
        for (n, order) in orders.iter().enumerate() {
            let entry = recorded[&order.to_string()].as_str();
            // Orders charged once, or charged first before the others, keep the
            // outcome of their token; the two racing charges of orders 5 to 9 may
            // go either way, but agree with the entry.
            if !(5..10).contains(&n) {
                assert_eq!(entry, outcome_of_token(token(n)), "order {n}");
            }
            for answer in &answers[&n] {
                assert_eq!(*answer, charge_outcome(entry), "order {n}");
            }
        }
    }

    on_both_backends!(concurrent_charges_are_recorded_once_per_order);

    /// On PostgreSQL a batch of charges, whatever its size, is one statement that a
    /// session prepares once.
    #[test]
    fn charges_are_one_prepared_statement_on_postgres() {
        let Some((_db, pool)) = postgres_pool(crate::MODULE, crate::SPEC.migrations) else {
            return;
        };
        let mut conn = pool.get().unwrap();
        let (a, b, c) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
        let first = charge_all(&mut conn, &[request(a, "tok_ok")]).unwrap();
        assert_eq!(first, [ChargeOutcome::Succeeded]);
        let batch = [
            request(b, "tok_decline"),
            request(a, "tok_decline"),
            request(c, "tok_ok"),
            request(c, "tok_decline"),
        ];
        let outcomes = charge_all(&mut conn, &batch).unwrap();
        assert_eq!(outcomes[0], charge_outcome("declined"));
        assert_eq!(
            outcomes[1],
            ChargeOutcome::Succeeded,
            "a's first charge stands"
        );
        assert_eq!(outcomes[2], outcomes[3], "one entry for c, one answer");
        let charging = prepared_statements(&mut conn, "INSERT INTO test_gateway_charges");
        assert_eq!(charging.len(), 1, "{charging:?}");
    }

    #[test]
    fn given_failures_when_retried_then_the_wait_doubles_up_to_the_cap() {
        let retry = RetryDelays::new(&PaymentSettings {
            retry_base_ms: 200,
            retry_max_ms: 1_000,
            ..PaymentSettings::default()
        });
        let waits: Vec<i64> = (1..=5)
            .map(|failures| retry.after(failures).num_milliseconds())
            .collect();
        assert_eq!(waits, vec![200, 400, 800, 1_000, 1_000]);
        assert_eq!(retry.after(u32::MAX).num_milliseconds(), 1_000);
    }
}
