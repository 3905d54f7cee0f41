//! The in-process transport: the producer's outbox is the durable log and each
//! consumer keeps its position in its own database, advanced in the same
//! transaction as its handling. Consumers wake when the producer commits.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use chrono::NaiveDateTime;
use diesel::backend::Backend;
use diesel::pg::Pg;
use diesel::prelude::*;
use diesel::query_builder::{AstPass, Query, QueryFragment, QueryId};
use diesel::serialize::ToSql;
use diesel::sql_types::HasSqlType;
use diesel::sql_types::{Array, BigInt, Nullable, Text, Timestamp};
use tokio::sync::watch;

use super::{BoxFuture, BusError, Handled, Queued, Subscription, Transport, record_handled};
use crate::db::{AnyConnection, Db, DbError, Published};
use crate::envelope::Envelope;
use crate::outbox;
use crate::schema::colony_consumer_positions as positions;

/// Reads the outboxes of the modules that run in this process.
#[derive(Default, Clone)]
pub struct LocalTransport {
    sources: HashMap<&'static str, Db>,
}

impl LocalTransport {
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes the events of the module behind `db` available to subscribers.
    pub fn add_source(&mut self, db: Db) {
        db.keep_recent();
        self.sources.insert(db.module(), db);
    }
}

impl Transport for LocalTransport {
    fn name(&self) -> &'static str {
        "local"
    }

    fn reaches(&self, source: &str) -> bool {
        self.sources.contains_key(source)
    }

    fn subscribe(&self, consumer: &str, source: &str) -> Result<Box<dyn Subscription>, BusError> {
        let db = self.sources.get(source).ok_or_else(|| {
            BusError::Transport(format!(
                "{consumer} consumes events of {source}, which does not run in this process; \
                 run both here or use bus.transport = \"nats\""
            ))
        })?;
        Ok(Box::new(LocalSubscription {
            consumer: consumer.to_string(),
            source: db.clone(),
            commits: db.publications(),
            wanted: db.publications_of(&[]),
            signalled: false,
            unknown_seen: 0,
            known_position: None,
            queued: None,
            passed_to: 0,
            passed_since: None,
            gaps: outbox::Gaps::default(),
        }))
    }

    fn is_up(&self) -> bool {
        true
    }
}

/// How soon a reader stopped at a gap looks again when nothing wakes it.
pub(crate) const GAP_RECHECK: Duration = Duration::from_millis(10);

/// Events read at a time when looking outside a pass for any this consumer wants.
const PEEK: i64 = 256;

/// How long the stored position may trail events passed by outside a pass.
const CATCH_UP: Duration = Duration::from_secs(1);

struct LocalSubscription {
    consumer: String,
    source: Db,
    /// Changes with every commit that published.
    commits: watch::Receiver<u64>,
    /// Changes with the commits that published an event this consumer acts on.
    wanted: watch::Receiver<Published>,
    /// Whether the last wait ended with such a commit (not a timeout or another
    /// event's commit).
    signalled: bool,
    /// `Published::unknown` as last read.
    unknown_seen: u64,
    /// The position as this process last read or wrote it (`None`: unsure).
    known_position: Option<i64>,
    /// The retries queued for this consumer as the last pull's claim read them,
    /// if they can be trusted (see `lock_position`).
    queued: Option<Queued>,
    /// Everything through this number is settled and of no interest to this
    /// consumer (seen outside a pass): the next pass starts after it.
    passed_to: i64,
    /// Since when `passed_to` has been ahead of the stored position.
    passed_since: Option<Instant>,
    /// Where the source's outbox has numbers not yet visible (PostgreSQL).
    gaps: outbox::Gaps,
}

impl LocalSubscription {
    /// With nothing wanted new: whether the pass may still be skipped. The stored
    /// position (what lag figures read) trails the events passed by by at most
    /// about `CATCH_UP`: then a pass runs and writes it.
    fn caught_up(&mut self, known: i64) -> bool {
        if self.passed_to > known {
            let since = *self.passed_since.get_or_insert_with(Instant::now);
            return since.elapsed() < CATCH_UP;
        }
        true
    }

    /// Stores this consumer's position (in the pass's transaction).
    fn write_position(&self, conn: &mut AnyConnection, position: i64) -> Result<(), BusError> {
        diesel::update(positions::table.find((self.consumer.as_str(), self.source.module())))
            .set((
                positions::position.eq(position),
                positions::updated_at.eq(crate::time::now()),
            ))
            .execute(conn)?;
        Ok(())
    }

    /// Takes the row lock on this consumer's position (creating it at 0) and reads
    /// it, with the retries queued for this consumer in the same statement.
    ///
    /// Those are kept (`queued`) only when the position is the one this process
    /// knew. On PostgreSQL the statement's subqueries read the snapshot taken before
    /// the lock was granted, so they could miss what another replica's pass queued
    /// meanwhile; but such a pass pulled events and moved the position. A pass that
    /// pulls nothing queues no new retries: it runs or parks those queued, or finds
    /// none (a replayed dead letter is queued outside a pass, in no particular order
    /// with new events, and read by the next pass).
    fn lock_position(&mut self, conn: &mut AnyConnection) -> Result<i64, BusError> {
        let now = crate::time::now();
        let lock = Lock {
            now,
            consumer: &self.consumer,
            source: self.source.module(),
        };
        let locked: Option<(i64, i64, Option<NaiveDateTime>)> = match conn {
            AnyConnection::Postgresql(c) => lock.get_result(c).optional()?,
            AnyConnection::Sqlite(c) => lock.get_result(c).optional()?,
        };
        self.queued = None;
        if let Some((position, waiting, earliest)) = locked {
            if self.known_position == Some(position) {
                self.queued = Some(Queued { waiting, earliest });
            }
            return Ok(position);
        }
        diesel::insert_into(positions::table)
            .values((
                positions::consumer.eq(&self.consumer),
                positions::source.eq(self.source.module()),
                positions::position.eq(0_i64),
                positions::updated_at.eq(now),
            ))
            .execute(conn)?;
        Ok(0)
    }
}

impl Subscription for LocalSubscription {
    fn wait(&mut self, timeout: Duration) -> BoxFuture<'_, bool> {
        // Stopped at a gap: it fills with a commit (of any event) that wakes this
        // wait, or, if its transaction rolled back, is settled by a read soon after.
        // Otherwise only the commits of wanted events wake it: the events passed by
        // in between are read by the pass that follows, or by a poll.
        let at_gap = self.gaps.waiting();
        Box::pin(async move {
            self.signalled = false;
            if !at_gap {
                self.commits.borrow_and_update();
                self.signalled = matches!(
                    tokio::time::timeout(timeout, self.wanted.changed()).await,
                    Ok(Ok(()))
                );
                return self.signalled;
            }
            let woken = async {
                tokio::select! {
                    r = self.commits.changed() => r.map(|()| false),
                    r = self.wanted.changed() => r.map(|()| true),
                }
            };
            match tokio::time::timeout(timeout.min(GAP_RECHECK), woken).await {
                Ok(Ok(wanted)) => {
                    self.signalled = wanted;
                    true
                }
                _ => false,
            }
        })
    }

    fn wake_for(&mut self, events: &'static [&'static str]) {
        self.wanted = self.source.publications_of(events);
    }

    fn nothing_wanted(&mut self, wants: &dyn Fn(&str) -> bool) -> Result<bool, BusError> {
        let Some(known) = self.known_position else {
            return Ok(false);
        };
        if std::mem::take(&mut self.signalled) {
            // Woken by this process's commits of wanted events: their numbers say
            // whether any is new, without a read. (Another process's commits wake
            // no one here; polls read for those.)
            let told = *self.wanted.borrow_and_update();
            if told.unknown == self.unknown_seen {
                if told.up_to > known.max(self.passed_to) {
                    return Ok(false);
                }
                return Ok(self.caught_up(known));
            }
            self.unknown_seen = told.unknown;
        }
        let mut source_conn = self.source.pool().get().map_err(DbError::from)?;
        let mut after = known.max(self.passed_to);
        loop {
            let events = self
                .gaps
                .read(&mut source_conn, self.source.module(), after, PEEK)?;
            let full = events.len() >= PEEK as usize;
            for event in events {
                // An event that does not decode is the pass's to deal with.
                match event {
                    Ok(event) if !wants(&event.name) => after = event.sequence,
                    _ => {
                        self.passed_to = after;
                        return Ok(false);
                    }
                }
            }
            self.passed_to = after;
            if !full {
                break;
            }
        }
        Ok(self.caught_up(known))
    }

    fn pull(&mut self, conn: &mut AnyConnection, max: usize) -> Result<Vec<Envelope>, BusError> {
        let durable = self.lock_position(conn)?;
        // Events passed by outside a pass are not read again; the position catches up
        // with them here, in this pass's transaction.
        let after = durable.max(self.passed_to);
        if after > durable {
            self.write_position(conn, after)?;
        }
        self.passed_since = None;
        self.known_position = Some(after);
        // What this process committed comes without a read.
        if let Some(events) = self.source.committed_after(after, max) {
            if let Some(last) = events.last() {
                self.gaps.passed(last.sequence);
            }
            return Ok(events);
        }
        let mut source_conn = self.source.pool().get().map_err(DbError::from)?;
        let limit = i64::try_from(max).unwrap_or(i64::MAX);
        self.gaps
            .read(&mut source_conn, self.source.module(), after, limit)?
            .into_iter()
            .map(|e| e.map_err(BusError::Corrupt))
            .collect()
    }

    fn queued(&mut self) -> Option<Queued> {
        self.queued.take()
    }

    fn advance(
        &mut self,
        conn: &mut AnyConnection,
        last: &Envelope,
        handled: &Handled<'_>,
    ) -> Result<(), BusError> {
        self.known_position = Some(last.sequence);
        let AnyConnection::Postgresql(c) = conn else {
            record_handled(conn, handled)?;
            return self.write_position(conn, last.sequence);
        };
        // On PostgreSQL one statement writes both (SQLite has no writing CTEs), and
        // appends what the pass's handlers published.
        let advance = AdvancePg {
            handled,
            position: last.sequence,
            consumer: &self.consumer,
            source: self.source.module(),
        };
        if !outbox::append_queued_after(c, &AdvanceWrites(&advance))? {
            advance.execute(c)?;
        }
        Ok(())
    }

    fn may_redeliver(&self) -> bool {
        // The position moves only in the transaction that handled the events.
        false
    }

    fn settle(&mut self, committed: bool) -> BoxFuture<'_, ()> {
        // The position moved (or not) with the consumer's own commit; after a
        // rollback what this process believes of it is no longer sure.
        if !committed {
            self.known_position = None;
        }
        Box::pin(async {})
    }
}

// Statements of every pass, written out so that diesel prepares them once per
// connection: it prepares `sql_query` text, and every UPDATE, anew on each run, and
// the server then parses and plans them anew.

/// Locks a consumer's position row and reads it, with the retries queued for the
/// consumer (see `LocalSubscription::lock_position`). The same text on both
/// backends (SQLite allows subqueries in RETURNING, as long as the aggregates are
/// inside them).
struct Lock<'a> {
    now: NaiveDateTime,
    consumer: &'a str,
    source: &'a str,
}

impl QueryId for Lock<'_> {
    type QueryId = Lock<'static>;
    const HAS_STATIC_QUERY_ID: bool = true;
}

impl Query for Lock<'_> {
    type SqlType = (BigInt, BigInt, Nullable<Timestamp>);
}

impl<C> RunQueryDsl<C> for Lock<'_> {}

impl<DB> QueryFragment<DB> for Lock<'_>
where
    DB: Backend + HasSqlType<Timestamp> + HasSqlType<Text>,
    NaiveDateTime: ToSql<Timestamp, DB>,
    str: ToSql<Text, DB>,
{
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, DB>) -> QueryResult<()> {
        out.push_sql("UPDATE colony_consumer_positions SET updated_at = ");
        out.push_bind_param::<Timestamp, _>(&self.now)?;
        out.push_sql(" WHERE consumer = ");
        out.push_bind_param::<Text, _>(self.consumer)?;
        out.push_sql(" AND source = ");
        out.push_bind_param::<Text, _>(self.source)?;
        out.push_sql(
            " RETURNING position, (SELECT count(*) FROM colony_deferred d WHERE d.consumer = ",
        );
        out.push_bind_param::<Text, _>(self.consumer)?;
        out.push_sql(" AND d.source = ");
        out.push_bind_param::<Text, _>(self.source)?;
        out.push_sql(
            "), (SELECT min(d.next_attempt_at) FROM colony_deferred d WHERE d.consumer = ",
        );
        out.push_bind_param::<Text, _>(self.consumer)?;
        out.push_sql(" AND d.source = ");
        out.push_bind_param::<Text, _>(self.source)?;
        out.push_sql(")");
        Ok(())
    }
}

/// Writes a pass's inbox records and moves its position, in one statement.
struct AdvancePg<'a> {
    handled: &'a Handled<'a>,
    position: i64,
    consumer: &'a str,
    source: &'a str,
}

impl QueryId for AdvancePg<'_> {
    type QueryId = AdvancePg<'static>;
    const HAS_STATIC_QUERY_ID: bool = true;
}

impl RunQueryDsl<PgConnection> for AdvancePg<'_> {}

impl QueryFragment<Pg> for AdvancePg<'_> {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        out.push_sql("WITH ");
        self.push_inbox(out.reborrow())?;
        out.push_sql(" ");
        self.push_position(out)
    }
}

impl<'a> AdvancePg<'a> {
    fn push_inbox<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        out.push_sql("inbox AS (INSERT INTO colony_inbox (consumer, event_id, handled_at) SELECT ");
        out.push_bind_param::<Text, _>(self.handled.consumer)?;
        out.push_sql(", id, ");
        out.push_bind_param::<Timestamp, _>(&self.handled.at)?;
        out.push_sql(" FROM unnest(");
        out.push_bind_param::<Array<Text>, _>(self.handled.event_ids)?;
        out.push_sql(") AS id)");
        Ok(())
    }

    fn push_position<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        out.push_sql("UPDATE colony_consumer_positions SET position = ");
        out.push_bind_param::<BigInt, _>(&self.position)?;
        out.push_sql(", updated_at = ");
        out.push_bind_param::<Timestamp, _>(&self.handled.at)?;
        out.push_sql(" WHERE consumer = ");
        out.push_bind_param::<Text, _>(self.consumer)?;
        out.push_sql(" AND source = ");
        out.push_bind_param::<Text, _>(self.source)?;
        Ok(())
    }
}

/// The same writes as common table expressions, ahead of the outbox append of what
/// the pass published (`outbox::append_queued_after`).
struct AdvanceWrites<'a>(&'a AdvancePg<'a>);

impl QueryId for AdvanceWrites<'_> {
    type QueryId = AdvanceWrites<'static>;
    const HAS_STATIC_QUERY_ID: bool = true;
}

impl QueryFragment<Pg> for AdvanceWrites<'_> {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        self.0.push_inbox(out.reborrow())?;
        out.push_sql(", advanced AS (");
        self.0.push_position(out.reborrow())?;
        out.push_sql(")");
        Ok(())
    }
}
