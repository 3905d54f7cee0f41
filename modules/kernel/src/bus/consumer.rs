//! The consumer engine: pulls events from a subscription and hands them to the
//! module's handler, one transaction per batch, with per-key ordering, retries
//! with backoff and dead letters. The same for every transport.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::NaiveDateTime;
use diesel::prelude::*;
use tokio::sync::watch;
use tracing::Instrument;
use uuid::Uuid;

use super::{BusError, Consumer, Handled, HandlerError, Queued, RetryPolicy, Subscription};
use crate::db::{AnyConnection, Db, DbError, write_tx};
use crate::envelope::Envelope;
use crate::metrics::Metrics;
use crate::schema::{colony_dead_letters, colony_deferred, colony_inbox};

/// What one pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PassReport {
    pub pulled: usize,
    pub handled: usize,
    /// Events of the source this consumer does not act on.
    pub passed_by: usize,
    pub duplicates: usize,
    pub queued_behind: usize,
    pub retried: usize,
    pub parked: usize,
    /// When the earliest deferred event is due, if any.
    pub next_due: Option<NaiveDateTime>,
}

#[derive(Debug, Clone, Queryable, Selectable, Insertable)]
#[diesel(table_name = colony_deferred)]
struct DeferredRow {
    consumer: String,
    event_id: String,
    source: String,
    sequence: i64,
    aggregate_id: String,
    envelope: String,
    attempts: i32,
    next_attempt_at: NaiveDateTime,
    last_error: Option<String>,
}

/// Runs one consumer of one source.
pub struct ConsumerEngine {
    consumer: Consumer,
    db: Db,
    policy: RetryPolicy,
    metrics: Arc<Metrics>,
}

enum Outcome {
    Handled,
    /// Its inbox record exists already: handled before, nothing done now.
    Duplicate,
    Failed(HandlerError),
}

/// How a pass handles its batch.
enum Mode {
    /// All events in the one transaction, as if none will fail.
    Whole,
    /// Each event in a savepoint of its own; the event that failed the whole
    /// batch, if one did, with its failure.
    EventByEvent(Option<(Uuid, HandlerError)>),
}

/// A pass's failure, or its request to be run again event by event (with the
/// event whose handler failed, if that was the reason).
enum PassError {
    Bus(BusError),
    Rerun(Option<(Uuid, HandlerError)>),
}

impl From<BusError> for PassError {
    fn from(e: BusError) -> Self {
        Self::Bus(e)
    }
}

impl From<diesel::result::Error> for PassError {
    fn from(e: diesel::result::Error) -> Self {
        Self::Bus(e.into())
    }
}

/// Why an attempt's savepoint was rolled back.
enum Undo {
    Duplicate,
    Failed(HandlerError),
}

impl From<diesel::result::Error> for Undo {
    fn from(e: diesel::result::Error) -> Self {
        Self::Failed(e.into())
    }
}

impl ConsumerEngine {
    /// `db` is the consuming module's database, where inbox, retries and dead letters live.
    pub fn new(consumer: Consumer, db: Db, policy: RetryPolicy, metrics: Arc<Metrics>) -> Self {
        Self {
            consumer,
            db,
            policy,
            metrics,
        }
    }

    pub fn consumer(&self) -> &Consumer {
        &self.consumer
    }

    /// Handles what is due: retries first, then new events, in one transaction.
    ///
    /// Most batches go through whole: they are handled without a savepoint per
    /// event and their inbox records written in one statement. Should a handler
    /// fail (or an event turn out handled already), that transaction is rolled back
    /// and the batch run again with a savepoint per event, so the failure is dealt
    /// with alone (retried, queued behind or parked) and the others still commit.
    pub fn pass(
        &self,
        conn: &mut AnyConnection,
        sub: &mut dyn Subscription,
        now: NaiveDateTime,
    ) -> Result<PassReport, BusError> {
        crate::outbox::take_published();
        let report = match self.pass_as(conn, sub, now, Mode::Whole) {
            Err(PassError::Rerun(failed)) => {
                // What the rolled-back run published never committed.
                crate::outbox::forget_kept();
                sub.rewind();
                self.pass_as(conn, sub, now, Mode::EventByEvent(failed))
            }
            other => other,
        }
        .map_err(|e| match e {
            PassError::Bus(e) => e,
            PassError::Rerun(_) => BusError::Transport("a pass asked to run again twice".into()),
        })?;
        if report.handled > 0 {
            // Committed: wake this module's own waiters as any other writer would
            // (its outbox readers only if the handlers published).
            self.db.announce(crate::outbox::take_published());
        }
        Ok(report)
    }

    fn pass_as(
        &self,
        conn: &mut AnyConnection,
        sub: &mut dyn Subscription,
        now: NaiveDateTime,
        mode: Mode,
    ) -> Result<PassReport, PassError> {
        let report = write_tx(conn, |conn| {
            let mut report = PassReport::default();
            // Pull first: it claims this consumer's turn before anything else is read.
            let events = sub.pull(conn, self.policy.batch_size)?;
            report.pulled = events.len();
            // Most passes find no retries waiting: the claim or one query says so.
            let Queued { waiting, earliest } = match sub.queued() {
                Some(queued) => queued,
                None => {
                    let (waiting, earliest) = colony_deferred::table
                        .filter(colony_deferred::consumer.eq(self.consumer.name))
                        .filter(colony_deferred::source.eq(self.consumer.source))
                        .select((
                            diesel::dsl::count_star(),
                            diesel::dsl::min(colony_deferred::next_attempt_at),
                        ))
                        .get_result(conn)?;
                    Queued { waiting, earliest }
                }
            };
            let mut blocked = HashSet::new();
            if waiting > 0 {
                if earliest.is_some_and(|e| e <= now) {
                    self.run_deferred(conn, now, &mut report)?;
                }
                blocked = self.blocked_keys(conn)?;
            }
            // Retries and keys waiting behind them: event by event from the start.
            let whole = matches!(mode, Mode::Whole) && waiting == 0;
            let seen = if sub.may_redeliver() {
                // A whole batch leaves the inbox out: an event handled before makes
                // its inbox record collide at the end, and the batch runs again event
                // by event, with the inbox checked. (The inbox is the one table here
                // that keeps growing, and a lookup in it costs most.)
                self.already_seen(conn, &events, !whole)?
            } else {
                HashSet::new()
            };
            // The handler that failed the whole batch has had its attempt: its
            // outcome is that failure, not a second call.
            let mut failed_before = match mode {
                Mode::EventByEvent(failed) => failed,
                Mode::Whole => None,
            };
            let mut handled_whole = Vec::new();
            for event in &events {
                if !self.consumer.wants(&event.name) {
                    report.passed_by += 1;
                    continue;
                }
                if seen.contains(&event.event_id.to_string()) {
                    report.duplicates += 1;
                    continue;
                }
                if blocked.contains(&event.aggregate_id) {
                    // An earlier event of this key is waiting for a retry: keep the order.
                    self.defer(conn, event, 0, now, None)?;
                    report.queued_behind += 1;
                    continue;
                }
                if whole {
                    self.handle(conn, event)
                        .map_err(|e| PassError::Rerun(Some((event.event_id, e))))?;
                    handled_whole.push(event.event_id.to_string());
                    report.handled += 1;
                    continue;
                }
                let outcome = match failed_before.take() {
                    Some((id, error)) if id == event.event_id => {
                        tracing::warn!(parent: &self.span(event), error = %error, "event handler failed");
                        Outcome::Failed(error)
                    }
                    other => {
                        failed_before = other;
                        self.attempt(conn, event)
                    }
                };
                match outcome {
                    Outcome::Handled => report.handled += 1,
                    Outcome::Duplicate => report.duplicates += 1,
                    Outcome::Failed(HandlerError::Retry(error)) if self.policy.max_attempts > 1 => {
                        let due = failed_at(now) + self.backoff(1);
                        self.defer(conn, event, 1, due, Some(&error))?;
                        blocked.insert(event.aggregate_id.clone());
                        report.retried += 1;
                    }
                    Outcome::Failed(
                        HandlerError::Retry(error) | HandlerError::Permanent(error),
                    ) => {
                        self.park(conn, event, 1, &error, now)?;
                        report.parked += 1;
                    }
                }
            }
            if let Some(last) = events.last() {
                let handled = Handled {
                    consumer: self.consumer.name,
                    event_ids: &handled_whole,
                    at: crate::time::now(),
                };
                // An event recorded already (a redelivery the already-seen check
                // could not see) sends the batch round again, event by event.
                sub.advance(conn, last, &handled).map_err(|e| match e {
                    BusError::Query(diesel::result::Error::DatabaseError(
                        diesel::result::DatabaseErrorKind::UniqueViolation,
                        _,
                    )) if !handled_whole.is_empty() => PassError::Rerun(None),
                    e => PassError::Bus(e),
                })?;
            }
            let deferred_changed = report.retried + report.queued_behind + report.parked > 0;
            report.next_due = if waiting > 0 || deferred_changed {
                colony_deferred::table
                    .filter(colony_deferred::consumer.eq(self.consumer.name))
                    .filter(colony_deferred::source.eq(self.consumer.source))
                    .select(diesel::dsl::min(colony_deferred::next_attempt_at))
                    .get_result::<Option<NaiveDateTime>>(conn)?
            } else {
                None
            };
            Ok::<_, PassError>(report)
        })?;
        self.record(&report);
        Ok(report)
    }

    fn backoff(&self, attempts: i32) -> chrono::Duration {
        chrono::Duration::from_std(self.policy.backoff(attempts))
            .unwrap_or_else(|_| chrono::Duration::seconds(60))
    }

    /// Runs the handler on one event, in its span.
    fn handle(&self, conn: &mut AnyConnection, event: &Envelope) -> Result<(), HandlerError> {
        let _entered = self.span(event).entered();
        self.consumer.handler.handle(conn, event)
    }

    fn span(&self, event: &Envelope) -> tracing::Span {
        let trace = event.trace();
        tracing::info_span!(
            "event.handle",
            consumer = self.consumer.name,
            event.name = %event.name,
            event.id = %event.event_id,
            event.aggregate_id = %event.aggregate_id,
            correlation_id = %event.correlation_id,
            trace_id = trace.map(|t| t.trace_id_hex()).unwrap_or_default(),
            parent_span_id = trace.map(|t| t.span_id_hex()).unwrap_or_default(),
        )
    }

    /// Handles one event in a savepoint: its writes and its inbox record commit
    /// together or are undone together. The inbox record goes first, so an event
    /// handled before is recognised by its key (at no extra query) and skipped.
    fn attempt(&self, conn: &mut AnyConnection, event: &Envelope) -> Outcome {
        let span = self.span(event);
        let _entered = span.enter();
        let hooks = crate::db::after_commit_mark();
        let queued = crate::outbox::queued_mark(conn);
        let result = conn.transaction::<_, Undo, _>(|conn| {
            let recorded = diesel::insert_into(colony_inbox::table)
                .values((
                    colony_inbox::consumer.eq(self.consumer.name),
                    colony_inbox::event_id.eq(event.event_id.to_string()),
                    colony_inbox::handled_at.eq(crate::time::now()),
                ))
                .execute(conn);
            match recorded {
                Err(diesel::result::Error::DatabaseError(
                    diesel::result::DatabaseErrorKind::UniqueViolation,
                    _,
                )) => return Err(Undo::Duplicate),
                other => other?,
            };
            self.consumer
                .handler
                .handle(conn, event)
                .map_err(Undo::Failed)?;
            Ok(())
        });
        if result.is_err() {
            // Its savepoint rolled back: what it meant to run after commit goes too,
            // and what it published is neither appended nor handed to a relay nor
            // kept.
            crate::db::forget_after_commit(hooks);
            crate::outbox::forget_queued(conn, queued);
            crate::outbox::forget_kept();
        }
        match result {
            Ok(()) => Outcome::Handled,
            Err(Undo::Duplicate) => Outcome::Duplicate,
            Err(Undo::Failed(e)) => {
                tracing::warn!(error = %e, "event handler failed");
                Outcome::Failed(e)
            }
        }
    }

    /// Retries that are due, key by key, oldest first; a key stops at its first
    /// event that is not due or fails again.
    fn run_deferred(
        &self,
        conn: &mut AnyConnection,
        now: NaiveDateTime,
        report: &mut PassReport,
    ) -> Result<(), BusError> {
        let rows: Vec<DeferredRow> = colony_deferred::table
            .filter(colony_deferred::consumer.eq(self.consumer.name))
            .filter(colony_deferred::source.eq(self.consumer.source))
            .order((
                colony_deferred::aggregate_id.asc(),
                colony_deferred::sequence.asc(),
            ))
            .limit(i64::try_from(self.policy.batch_size.max(1) * 4).unwrap_or(1024))
            .select(DeferredRow::as_select())
            .load(conn)?;
        let mut stopped: Option<&str> = None;
        for row in &rows {
            if stopped == Some(row.aggregate_id.as_str()) {
                continue;
            }
            if row.next_attempt_at > now {
                stopped = Some(&row.aggregate_id);
                continue;
            }
            let event: Envelope = serde_json::from_str(&row.envelope)
                .map_err(|e| BusError::Corrupt(format!("deferred {}: {e}", row.event_id)))?;
            let attempts = row.attempts + 1;
            let key = colony_deferred::table.find((self.consumer.name, row.event_id.as_str()));
            match self.attempt(conn, &event) {
                Outcome::Handled => {
                    diesel::delete(key).execute(conn)?;
                    report.handled += 1;
                }
                Outcome::Duplicate => {
                    diesel::delete(key).execute(conn)?;
                    report.duplicates += 1;
                }
                Outcome::Failed(HandlerError::Retry(error))
                    if attempts < self.policy.max_attempts =>
                {
                    diesel::update(key)
                        .set((
                            colony_deferred::attempts.eq(attempts),
                            colony_deferred::next_attempt_at
                                .eq(failed_at(now) + self.backoff(attempts)),
                            colony_deferred::last_error.eq(Some(error)),
                        ))
                        .execute(conn)?;
                    report.retried += 1;
                    stopped = Some(&row.aggregate_id);
                }
                Outcome::Failed(HandlerError::Retry(error) | HandlerError::Permanent(error)) => {
                    self.park(conn, &event, attempts, &error, now)?;
                    diesel::delete(key).execute(conn)?;
                    report.parked += 1;
                }
            }
        }
        Ok(())
    }

    fn blocked_keys(&self, conn: &mut AnyConnection) -> Result<HashSet<String>, BusError> {
        Ok(colony_deferred::table
            .filter(colony_deferred::consumer.eq(self.consumer.name))
            .filter(colony_deferred::source.eq(self.consumer.source))
            .select(colony_deferred::aggregate_id)
            .distinct()
            .load::<String>(conn)?
            .into_iter()
            .collect())
    }

    /// Ids among `events` this consumer has handled, queued or parked already: a
    /// redelivery must have no second effect.
    fn already_seen(
        &self,
        conn: &mut AnyConnection,
        events: &[Envelope],
        with_inbox: bool,
    ) -> Result<HashSet<String>, BusError> {
        if events.is_empty() {
            return Ok(HashSet::new());
        }
        let ids: Vec<String> = events.iter().map(|e| e.event_id.to_string()).collect();
        if !with_inbox {
            // A whole batch runs only when nothing of this source waits for a
            // retry: of the places an event may be, the dead letters remain.
            return Ok(colony_dead_letters::table
                .filter(colony_dead_letters::consumer.eq(self.consumer.name))
                .filter(colony_dead_letters::event_id.eq_any(&ids))
                .select(colony_dead_letters::event_id)
                .load::<String>(conn)?
                .into_iter()
                .collect());
        }
        // One statement for the three places an event may already be.
        let handled = colony_inbox::table
            .filter(colony_inbox::consumer.eq(self.consumer.name))
            .filter(colony_inbox::event_id.eq_any(&ids))
            .select(colony_inbox::event_id);
        let queued = colony_deferred::table
            .filter(colony_deferred::consumer.eq(self.consumer.name))
            .filter(colony_deferred::event_id.eq_any(&ids))
            .select(colony_deferred::event_id);
        let parked = colony_dead_letters::table
            .filter(colony_dead_letters::consumer.eq(self.consumer.name))
            .filter(colony_dead_letters::event_id.eq_any(&ids))
            .select(colony_dead_letters::event_id);
        let all = handled.union_all(queued).union_all(parked);
        // Unions are built per backend (the multi-backend has no such fragment).
        let seen: Vec<String> = match conn {
            AnyConnection::Sqlite(c) => all.load(c)?,
            AnyConnection::Postgresql(c) => all.load(c)?,
        };
        Ok(seen.into_iter().collect())
    }

    fn defer(
        &self,
        conn: &mut AnyConnection,
        event: &Envelope,
        attempts: i32,
        due: NaiveDateTime,
        error: Option<&str>,
    ) -> Result<(), BusError> {
        let queued: i64 = colony_deferred::table
            .filter(colony_deferred::consumer.eq(self.consumer.name))
            .filter(colony_deferred::event_id.eq(event.event_id.to_string()))
            .count()
            .get_result(conn)?;
        if queued > 0 {
            return Ok(());
        }
        diesel::insert_into(colony_deferred::table)
            .values(DeferredRow {
                consumer: self.consumer.name.to_string(),
                event_id: event.event_id.to_string(),
                source: event.source.clone(),
                sequence: event.sequence,
                aggregate_id: event.aggregate_id.clone(),
                envelope: encode(event)?,
                attempts,
                next_attempt_at: due,
                last_error: error.map(str::to_string),
            })
            .execute(conn)?;
        Ok(())
    }

    fn park(
        &self,
        conn: &mut AnyConnection,
        event: &Envelope,
        attempts: i32,
        error: &str,
        now: NaiveDateTime,
    ) -> Result<(), BusError> {
        tracing::error!(
            consumer = self.consumer.name,
            event.name = %event.name,
            event.id = %event.event_id,
            attempts,
            error,
            "event parked as a dead letter"
        );
        diesel::insert_into(colony_dead_letters::table)
            .values((
                colony_dead_letters::id.eq(Uuid::now_v7().to_string()),
                colony_dead_letters::consumer.eq(self.consumer.name),
                colony_dead_letters::event_id.eq(event.event_id.to_string()),
                colony_dead_letters::source.eq(&event.source),
                colony_dead_letters::name.eq(&event.name),
                colony_dead_letters::sequence.eq(event.sequence),
                colony_dead_letters::aggregate_id.eq(&event.aggregate_id),
                colony_dead_letters::envelope.eq(encode(event)?),
                colony_dead_letters::error.eq(error),
                colony_dead_letters::attempts.eq(attempts),
                colony_dead_letters::parked_at.eq(now),
            ))
            .execute(conn)?;
        Ok(())
    }

    fn record(&self, report: &PassReport) {
        let labels = [
            ("consumer", self.consumer.name),
            ("source", self.consumer.source),
        ];
        let m = &self.metrics;
        m.inc(
            "colony_events_handled_total",
            &labels,
            report.handled as u64,
        );
        m.inc(
            "colony_events_retried_total",
            &labels,
            report.retried as u64,
        );
        m.inc("colony_events_parked_total", &labels, report.parked as u64);
        m.inc(
            "colony_events_duplicate_total",
            &labels,
            report.duplicates as u64,
        );
    }

    /// Runs passes until `shutdown` turns true; a pass in progress is finished first.
    pub async fn run(self, mut sub: Box<dyn Subscription>, mut shutdown: watch::Receiver<bool>) {
        let engine = Arc::new(self);
        sub.wake_for(engine.consumer.events);
        let mut nudges = engine.db.nudges();
        let span = tracing::info_span!(
            "consumer",
            consumer = engine.consumer.name,
            source = engine.consumer.source
        );
        async move {
            let mut failures: u32 = 0;
            // A wake-up or a poll may skip the pass when the subscription says nothing
            // is new and no retry is due (an idle pass would still write: it renews
            // this consumer's turn). A nudge or a failure always runs one, and so
            // does a poll once `full_every` has passed without one, for what only a
            // pass sees (retries another process queued for this consumer).
            let full_every = engine.policy.poll_interval.saturating_mul(10);
            let mut last_pass = Instant::now();
            let mut may_skip = false;
            let mut next_due: Option<NaiveDateTime> = None;
            while !*shutdown.borrow() {
                let retry_due = next_due.is_some_and(|d| d <= crate::time::now());
                let skip = may_skip && !retry_due && last_pass.elapsed() < full_every;
                let Some((returned, result)) = engine.clone().pass_blocking(sub, skip).await else {
                    break;
                };
                if !matches!(result, Ok(None)) {
                    last_pass = Instant::now();
                }
                sub = returned;
                sub.settle(result.is_ok()).await;
                let wait = match &result {
                    Ok(None) => {
                        failures = 0;
                        engine.idle_time(0, next_due)
                    }
                    Ok(Some(report)) => {
                        failures = 0;
                        next_due = report.next_due;
                        engine.idle_time(report.pulled, next_due)
                    }
                    Err(e) => {
                        failures = failures.saturating_add(1);
                        tracing::warn!(error = %e, failures, "consumer pass failed");
                        let secs = 2u64.saturating_pow(failures.min(5)).min(30);
                        Duration::from_millis(250).max(Duration::from_secs(secs) / 4)
                    }
                };
                may_skip = false;
                if wait.is_zero() {
                    continue;
                }
                let mut woken = false;
                tokio::select! {
                    new = sub.wait(wait) => {
                        may_skip = result.is_ok();
                        woken = new;
                    }
                    _ = nudges.changed() => {}
                    _ = shutdown.changed() => {}
                }
                if woken && engine.lingers() {
                    tokio::select! {
                        () = tokio::time::sleep(engine.policy.linger) => {}
                        _ = nudges.changed() => {}
                        _ = shutdown.changed() => {}
                    }
                }
            }
            tracing::debug!("consumer stopped");
        }
        .instrument(span)
        .await;
    }

    /// Whether a wake-up is followed by `RetryPolicy::linger` before the pass.
    fn lingers(&self) -> bool {
        !self.consumer.prompt && !self.policy.linger.is_zero()
    }

    /// How long to sleep after a pass: not at all while batches come full.
    fn idle_time(&self, pulled: usize, next_due: Option<NaiveDateTime>) -> Duration {
        if pulled >= self.policy.batch_size {
            return Duration::ZERO;
        }
        let poll = self.policy.poll_interval;
        match next_due {
            Some(due) => {
                let until = (due - crate::time::now())
                    .to_std()
                    .unwrap_or(Duration::ZERO);
                until.min(poll).max(Duration::from_millis(1))
            }
            None => poll,
        }
    }

    /// Runs a pass on the blocking pool (`Ok(None)`: skipped, nothing was new);
    /// `None` when the runtime is shutting down.
    async fn pass_blocking(
        self: Arc<Self>,
        mut sub: Box<dyn Subscription>,
        may_skip: bool,
    ) -> Option<(Box<dyn Subscription>, Result<Option<PassReport>, BusError>)> {
        let turn = self.db.write_turn().await;
        let handle = tokio::task::spawn_blocking(move || {
            let run = std::panic::AssertUnwindSafe(|| {
                if may_skip && sub.nothing_wanted(&|name| self.consumer.wants(name))? {
                    return Ok(None);
                }
                let mut conn = self.db.pool().get().map_err(DbError::from)?;
                self.pass(&mut conn, sub.as_mut(), crate::time::now())
                    .map(Some)
            });
            // A panicking handler must not take the consumer down: the transaction
            // was rolled back with the connection, and the batch comes again.
            let result = std::panic::catch_unwind(run)
                .unwrap_or_else(|_| Err(BusError::Transport("event handler panicked".into())));
            drop(turn);
            (sub, result)
        });
        handle.await.ok()
    }
}

/// When an attempt failed: the backoff counts from then, not from the start of
/// the pass (`now` may also lie ahead when a caller drives passes by hand).
fn failed_at(now: NaiveDateTime) -> NaiveDateTime {
    crate::time::now().max(now)
}

fn encode(event: &Envelope) -> Result<String, BusError> {
    serde_json::to_string(event).map_err(|e| BusError::Corrupt(e.to_string()))
}
