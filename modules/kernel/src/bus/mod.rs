//! The event bus: outbox → transport → consumer, at least once on the wire and
//! exactly once in effect (each consumer records handled events in its inbox in the
//! same transaction as its state change).
//!
//! A transport moves events from a source module's outbox to a consumer; the
//! consumer engine (`consumer.rs`) is the same whichever transport runs.

mod consumer;
pub mod dead_letters;
pub mod lease;
mod local;
pub mod nats;
pub mod retention;
pub mod stats;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

pub use consumer::{ConsumerEngine, PassReport};
pub use local::LocalTransport;
pub use nats::NatsTransport;

use diesel::QueryResult;

use crate::db::{AnyConnection, DbError};
use crate::envelope::Envelope;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// How a handler's attempt ended when it did not succeed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandlerError {
    /// Transient: try again later, with backoff, up to the retry limit.
    #[error("retry: {0}")]
    Retry(String),
    /// Will never succeed: park the event as a dead letter at once.
    #[error("permanent: {0}")]
    Permanent(String),
}

impl From<diesel::result::Error> for HandlerError {
    fn from(e: diesel::result::Error) -> Self {
        Self::Retry(format!("database: {e}"))
    }
}

impl From<serde_json::Error> for HandlerError {
    fn from(e: serde_json::Error) -> Self {
        Self::Permanent(format!("undecodable payload: {e}"))
    }
}

/// Reacts to events. Runs inside the consumer's transaction: every write it makes
/// on `conn` commits together with the inbox record, or not at all.
pub trait EventHandler: Send + Sync + 'static {
    fn handle(&self, conn: &mut AnyConnection, event: &Envelope) -> Result<(), HandlerError>;
}

/// One module's subscription to the events of one source module.
#[derive(Clone)]
pub struct Consumer {
    /// The consuming module.
    pub name: &'static str,
    /// The module whose events it reads.
    pub source: &'static str,
    /// The event names the handler acts on; others pass by without a transaction
    /// of their own or an inbox record. Empty: every event of the source.
    pub events: &'static [&'static str],
    /// Whether someone waits on this consumer's work as it happens (a step of the
    /// order saga): it passes as soon as it is woken. Any other consumer lets
    /// `RetryPolicy::linger` go by after a wake-up first, so that one pass handles
    /// what arrives meanwhile.
    pub prompt: bool,
    pub handler: Arc<dyn EventHandler>,
}

impl Consumer {
    pub fn wants(&self, name: &str) -> bool {
        self.events.is_empty() || self.events.contains(&name)
    }
}

/// Retry and batching rules of consumers.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Attempts before an event is parked (including the first).
    pub max_attempts: i32,
    pub base_delay: Duration,
    pub max_delay: Duration,
    /// Events pulled and handled per transaction.
    pub batch_size: usize,
    /// Fallback poll when no commit signal arrives (other replicas, a crash).
    pub poll_interval: Duration,
    /// How long a consumer that is not `prompt` waits after being woken before its
    /// pass: what else arrives meanwhile costs no transaction of its own.
    pub linger: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 8,
            base_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(60),
            batch_size: 256,
            poll_interval: Duration::from_secs(1),
            linger: Duration::ZERO,
        }
    }
}

impl RetryPolicy {
    /// Delay before attempt `attempts + 1`: exponential, capped, jittered between
    /// half and nine tenths of the step, so replicas do not retry in lockstep and
    /// each delay is still longer than the one before.
    pub fn backoff(&self, attempts: i32) -> Duration {
        let exp = u32::try_from(attempts.saturating_sub(1).clamp(0, 30)).unwrap_or(0);
        let full = self
            .base_delay
            .saturating_mul(2u32.saturating_pow(exp))
            .min(self.max_delay);
        let jitter_ms = u64::try_from((full * 2 / 5).as_millis()).unwrap_or(u64::MAX);
        full / 2 + Duration::from_millis(rand::random_range(0..=jitter_ms))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Query(#[from] diesel::result::Error),
    #[error("transport: {0}")]
    Transport(String),
    #[error("corrupt event: {0}")]
    Corrupt(String),
}

/// The retries queued for a consumer: how many, and when the earliest is due.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Queued {
    pub waiting: i64,
    pub earliest: Option<chrono::NaiveDateTime>,
}

/// The inbox records a pass writes at its end: one per event handled in a whole
/// batch.
pub struct Handled<'a> {
    pub consumer: &'a str,
    pub event_ids: &'a [String],
    pub at: chrono::NaiveDateTime,
}

/// Writes `handled`'s inbox records in one statement.
pub fn record_handled(conn: &mut AnyConnection, handled: &Handled<'_>) -> QueryResult<()> {
    use crate::schema::colony_inbox;
    use diesel::prelude::*;
    if handled.event_ids.is_empty() {
        return Ok(());
    }
    let rows: Vec<_> = handled
        .event_ids
        .iter()
        .map(|id| {
            (
                colony_inbox::consumer.eq(handled.consumer),
                colony_inbox::event_id.eq(id.as_str()),
                colony_inbox::handled_at.eq(handled.at),
            )
        })
        .collect();
    let insert = diesel::insert_into(colony_inbox::table).values(rows);
    // Multi-row inserts are built per backend (the multi-backend has none).
    match conn {
        AnyConnection::Sqlite(c) => insert.execute(c),
        AnyConnection::Postgresql(c) => insert.execute(c),
    }
    .map(|_| ())
}

/// A consumer's durable subscription to one source, as a transport provides it.
///
/// Shaped after JetStream's pull consumers: the position is durable per consumer,
/// events after it are pulled in order, and they count as delivered only once the
/// consumer's transaction has committed (`settle(true)`); otherwise they come again.
pub trait Subscription: Send + 'static {
    /// Waits until new events may be available (`true`), or `timeout` passes (`false`).
    fn wait(&mut self, timeout: Duration) -> BoxFuture<'_, bool>;
    /// Tells the subscription the only events its consumer acts on (empty: all),
    /// so that `wait` may sleep through new events of other names.
    fn wake_for(&mut self, events: &'static [&'static str]) {
        let _ = events;
    }
    /// Cheaply and outside any transaction: `true` only when certainly nothing this
    /// consumer `wants` waits after its position — nothing new, or only events it
    /// passes by. Those count as passed: the next `pull` starts after them (or they
    /// are acknowledged at the next `settle(true)`), so a consumer woken by events
    /// it does not act on commits nothing. `false` when unsure.
    fn nothing_wanted(&mut self, wants: &dyn Fn(&str) -> bool) -> Result<bool, BusError> {
        let _ = wants;
        Ok(false)
    }
    /// Inside the consumer's transaction: claims this consumer's turn on the source
    /// (replicas take turns) and returns up to `max` events after its position.
    fn pull(&mut self, conn: &mut AnyConnection, max: usize) -> Result<Vec<Envelope>, BusError>;
    /// After `pull`: the retries queued for this consumer, if the transport read
    /// them with its claim and is sure no other replica queued any since (others
    /// may have run some: the consumer reads those afresh before it runs them).
    /// `None`: the consumer reads them itself.
    fn queued(&mut self) -> Option<Queued> {
        None
    }
    /// Inside the same transaction: everything through `last` is dealt with, and
    /// `handled` (events handled without a savepoint each) get their inbox records,
    /// with `record_handled` or, where the backend allows, in the statement that
    /// moves the position. An event recorded already fails it with a unique
    /// violation.
    fn advance(
        &mut self,
        conn: &mut AnyConnection,
        last: &Envelope,
        handled: &Handled<'_>,
    ) -> Result<(), BusError>;
    /// Whether an event already handled (or queued for a retry) may be pulled again,
    /// so the consumer must check its inbox. False when the position moves in the
    /// consumer's own transaction.
    fn may_redeliver(&self) -> bool {
        true
    }
    /// The transaction that pulled was rolled back to be run again: the next `pull`
    /// returns the same events first.
    fn rewind(&mut self) {}
    /// After the transaction ended: acknowledge (committed) or let them come again.
    fn settle(&mut self, committed: bool) -> BoxFuture<'_, ()>;
}

/// Carries events from producers to consumers.
pub trait Transport: Send + Sync + 'static {
    fn name(&self) -> &'static str;
    /// Whether events of `source` can reach this process through this transport.
    fn reaches(&self, source: &str) -> bool;
    /// Opens or resumes the durable subscription of `consumer` to `source`.
    fn subscribe(&self, consumer: &str, source: &str) -> Result<Box<dyn Subscription>, BusError>;
    /// Whether the transport can carry events right now.
    fn is_up(&self) -> bool;
}
