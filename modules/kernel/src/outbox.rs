//! Publishing: an event is a row in the producer's outbox, written in the same
//! transaction as the state change it reports.

use contracts::Event;
use diesel::pg::Pg;
use diesel::prelude::*;
use diesel::query_builder::{AstPass, Query, QueryFragment, QueryId};
use diesel::sql_types::{Array, BigInt, Nullable, Text, Timestamp};
use uuid::Uuid;

use crate::db::AnyConnection;
use crate::envelope::Envelope;
use crate::schema::colony_outbox;
use crate::trace::TraceContext;

thread_local! {
    static PUBLISHED: std::cell::RefCell<Publications> =
        const { std::cell::RefCell::new(Publications::new()) };
}

thread_local! {
    /// Events that the PostgreSQL write transactions running on this thread
    /// (`db::write_tx`; more than one when a transaction on another connection is
    /// nested in one) publish, each appended to its outbox together just before its
    /// transaction commits (see `Publisher::publish`).
    static QUEUED: std::cell::RefCell<Vec<Queue>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The events queued by one write transaction, on the connection it runs on.
struct Queue {
    /// That connection's address: an event published on another connection is not
    /// this transaction's.
    conn: usize,
    envelopes: Vec<(&'static str, Envelope)>,
}

fn address(conn: &PgConnection) -> usize {
    std::ptr::from_ref(conn) as usize
}

/// `f` on the queue of `conn`'s transaction, if it has one.
fn with_queue<T>(conn: usize, f: impl FnOnce(&mut Queue) -> T) -> Option<T> {
    QUEUED.with(|q| {
        q.borrow_mut()
            .iter_mut()
            .find(|queue| queue.conn == conn)
            .map(f)
    })
}

/// Where `write_tx` keeps a PostgreSQL transaction's queued events. A `write_tx`
/// nested on the same connection (a savepoint) joins the enclosing one's queue:
/// its events are appended with those, in publication order, and dropped if the
/// savepoint rolls back.
pub(crate) struct QueueScope {
    conn: usize,
    /// Whether this scope opened the queue (rather than joined an enclosing one).
    owner: bool,
    /// Where the joined queue stood when this scope opened.
    mark: usize,
    /// Whether the joined scope's work stays (its savepoint was released).
    kept: bool,
}

impl QueueScope {
    pub(crate) fn open(conn: &PgConnection) -> Self {
        let conn = address(conn);
        let mark = with_queue(conn, |queue| queue.envelopes.len());
        if mark.is_none() {
            QUEUED.with(|q| {
                q.borrow_mut().push(Queue {
                    conn,
                    envelopes: Vec::new(),
                });
            });
        }
        Self {
            conn,
            owner: mark.is_none(),
            mark: mark.unwrap_or(0),
            kept: false,
        }
    }

    /// Appends what the transaction queued to `conn`'s outbox, in one statement
    /// (a joined scope leaves that to the enclosing transaction).
    pub(crate) fn flush(&self, conn: &mut PgConnection) -> QueryResult<()> {
        if !self.owner {
            return Ok(());
        }
        flush_queued(conn)
    }

    /// The transaction ended: committed (`kept`) or rolled back.
    pub(crate) fn close(mut self, kept: bool) {
        self.kept = kept;
    }
}

impl Drop for QueueScope {
    fn drop(&mut self) {
        if self.owner {
            QUEUED.with(|q| q.borrow_mut().retain(|queue| queue.conn != self.conn));
        } else if !self.kept {
            with_queue(self.conn, |queue| queue.envelopes.truncate(self.mark));
        }
    }
}

/// Appends what `conn`'s transaction has queued so far, if anything.
fn flush_queued(conn: &mut PgConnection) -> QueryResult<()> {
    let envelopes = with_queue(address(conn), |queue| std::mem::take(&mut queue.envelopes));
    append_all(conn, envelopes.unwrap_or_default())
}

/// How many events `conn`'s write transaction has queued: a mark, for a savepoint,
/// to `forget_queued` back to.
pub fn queued_mark(conn: &AnyConnection) -> usize {
    match conn {
        AnyConnection::Postgresql(c) => {
            with_queue(address(c), |queue| queue.envelopes.len()).unwrap_or(0)
        }
        AnyConnection::Sqlite(_) => 0,
    }
}

/// Drops the events `conn`'s transaction queued since `mark` (their savepoint
/// rolled back).
pub fn forget_queued(conn: &AnyConnection, mark: usize) {
    if let AnyConnection::Postgresql(c) = conn {
        with_queue(address(c), |queue| queue.envelopes.truncate(mark));
    }
}

/// Queues `envelope` if `conn` is running a `write_tx`; otherwise hands it back.
fn queue(conn: &PgConnection, name: &'static str, envelope: Envelope) -> Option<Envelope> {
    let conn = address(conn);
    QUEUED.with(
        |q| match q.borrow_mut().iter_mut().find(|queue| queue.conn == conn) {
            Some(queue) => {
                queue.envelopes.push((name, envelope));
                None
            }
            None => Some(envelope),
        },
    )
}

/// Appends `envelopes` to the outbox, numbered in their order, with one statement
/// (none for none), and records them as published.
fn append_all(
    conn: &mut PgConnection,
    envelopes: Vec<(&'static str, Envelope)>,
) -> QueryResult<()> {
    if envelopes.is_empty() {
        return Ok(());
    }
    append_all_after::<NoWrites>(conn, None, envelopes)
}

/// Where `conn` runs a `write_tx` that has queued events: runs `writes` and appends
/// them, in one statement, and says `true`. Otherwise runs nothing and says `false`
/// (the caller runs its writes alone). For a consumer's pass, whose last statement
/// (its inbox records and position) can carry the events its handlers published.
pub(crate) fn append_queued_after<W: QueryFragment<Pg> + QueryId>(
    conn: &mut PgConnection,
    writes: &W,
) -> QueryResult<bool> {
    let envelopes =
        with_queue(address(conn), |queue| std::mem::take(&mut queue.envelopes)).unwrap_or_default();
    if envelopes.is_empty() {
        return Ok(false);
    }
    append_all_after(conn, Some(writes), envelopes)?;
    Ok(true)
}

fn append_all_after<W: QueryFragment<Pg> + QueryId>(
    conn: &mut PgConnection,
    writes: Option<&W>,
    mut envelopes: Vec<(&'static str, Envelope)>,
) -> QueryResult<()> {
    let rows = AppendAllPg {
        writes,
        events: EventColumns::of(envelopes.iter().map(|(_, e)| e)),
    };
    let numbered: Vec<(String, i64)> = rows.get_results(conn)?;
    let numbers: std::collections::HashMap<String, i64> = numbered.into_iter().collect();
    for (name, envelope) in &mut envelopes {
        let id = envelope.event_id.to_string();
        envelope.sequence = *numbers.get(&id).ok_or_else(|| {
            diesel::result::Error::QueryBuilderError(
                format!("event {id} was not appended to the outbox").into(),
            )
        })?;
        note_published(name, envelope);
    }
    Ok(())
}

/// Whether committed envelopes are kept, for a relay or the local readers of this
/// process (set once one starts: `Db::relay_handoff`, `Db::keep_recent`);
/// otherwise only names and numbers are.
static KEEP_ENVELOPES: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Envelopes kept per transaction at most; a transaction that publishes more is
/// left to its readers' reads. (With the relay's queue of 256 commits, this bounds
/// what waits in memory while the relay cannot publish.)
const KEPT_AT_MOST: usize = 64;

/// What a thread's transaction published: see `take_published`.
#[derive(Debug)]
pub struct Publications {
    /// Each event name once, with the highest sequence number it got.
    pub names: Vec<(&'static str, i64)>,
    /// The envelopes, while a relay or a local reader runs in this process;
    /// `complete` says whether they are all there.
    pub envelopes: Vec<Envelope>,
    pub complete: bool,
}

impl Publications {
    const fn new() -> Self {
        Self {
            names: Vec::new(),
            envelopes: Vec::new(),
            complete: true,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

impl Default for Publications {
    fn default() -> Self {
        Self::new()
    }
}

/// What this thread has published since the last call, committed or not; the
/// record is emptied. Database work runs synchronously on one thread, so a caller
/// that takes it before a transaction and again after its commit learns what that
/// transaction published (which outbox readers to wake, what to hand to a relay
/// and to local readers). Left over from a rolled-back transaction, an entry costs
/// only a needless wake-up; names are kept once each, envelopes only while they are
/// kept at all (`KEEP_ENVELOPES`) and up to `KEPT_AT_MOST`.
pub fn take_published() -> Publications {
    PUBLISHED.with(|p| std::mem::take(&mut *p.borrow_mut()))
}

/// Work of this thread's transaction was rolled back (to a savepoint, or the whole
/// transaction before it runs again): the envelopes kept so far may include events
/// that will never commit, or whose numbers are taken again. None of this
/// transaction's envelopes is handed to a relay or kept for local readers (who
/// would take such events as committed, and handle them); they read the outbox
/// instead.
/// Whoever rolls back to a savepoint in a transaction that may have published calls
/// this (the consumer engine does).
pub fn forget_kept() {
    PUBLISHED.with(|p| {
        let mut p = p.borrow_mut();
        p.envelopes.clear();
        p.complete = false;
    });
}

pub(crate) fn keep_envelopes() {
    KEEP_ENVELOPES.store(true, std::sync::atomic::Ordering::Relaxed);
}

fn note_published(name: &'static str, envelope: &Envelope) {
    PUBLISHED.with(|p| {
        let mut p = p.borrow_mut();
        match p.names.iter_mut().find(|(n, _)| *n == name) {
            Some((_, highest)) => *highest = (*highest).max(envelope.sequence),
            None => p.names.push((name, envelope.sequence)),
        }
        if KEEP_ENVELOPES.load(std::sync::atomic::Ordering::Relaxed) {
            if p.envelopes.len() < KEPT_AT_MOST {
                p.envelopes.push(envelope.clone());
            } else {
                p.complete = false;
            }
        }
    });
}

/// Publishes events of one module on behalf of one request or one handled event.
#[derive(Debug, Clone)]
pub struct Publisher {
    source: &'static str,
    correlation_id: Uuid,
    causation_id: Option<Uuid>,
    trace: Option<TraceContext>,
}

impl Publisher {
    /// For work started by a request (or a command): a new correlation unless given.
    pub fn new(source: &'static str, correlation_id: Uuid, trace: Option<TraceContext>) -> Self {
        Self {
            source,
            correlation_id,
            causation_id: None,
            trace,
        }
    }

    /// For events published while handling `cause`: same correlation and trace.
    pub fn caused_by(source: &'static str, cause: &Envelope) -> Self {
        Self {
            source,
            correlation_id: cause.correlation_id,
            causation_id: Some(cause.event_id),
            trace: cause.trace().map(|t| t.child()),
        }
    }

    /// Publishes `event` about `aggregate_id` on `conn`, which must be inside the
    /// caller's write transaction: the event commits with it, or not at all.
    ///
    /// On PostgreSQL, in a `db::write_tx`, the event is queued and appended to the
    /// outbox with the transaction's other events, in one statement, just before
    /// the transaction commits: one round trip for all of them. Elsewhere (SQLite,
    /// whose statements cost no round trip, or a transaction begun otherwise) it is
    /// appended at once, as by `publish_now`.
    ///
    /// Readers hand events on in sequence order. On SQLite sequences are gapless and
    /// in commit order. On PostgreSQL they are in the order of appending: a
    /// transaction must therefore publish about an aggregate only while it holds
    /// that aggregate's row lock (or has just created it), so that of two
    /// transactions publishing about the same aggregate the one that commits first
    /// also published first. (Queued events are appended while the transaction
    /// still holds its locks.) A transaction's events are numbered in the order it
    /// published them.
    ///
    /// A transaction that rolls back to a savepoint after publishing must call
    /// `forget_queued` with the `queued_mark` taken before it, and `forget_kept`, or
    /// the rolled-back events would be appended at commit, or handed to a relay
    /// (and this process's consumers) as committed.
    pub fn publish<E: Event>(
        &self,
        conn: &mut AnyConnection,
        aggregate_id: &str,
        event: &E,
    ) -> QueryResult<()> {
        if let AnyConnection::Postgresql(c) = conn {
            let envelope = self.envelope(aggregate_id, event)?;
            if let Some(envelope) = queue(c, E::NAME, envelope) {
                append_all(c, vec![(E::NAME, envelope)])?;
            }
            return Ok(());
        }
        self.publish_now(conn, aggregate_id, event).map(drop)
    }

    /// As `publish`, but appended at once, whatever the transaction: returns the
    /// event as stored, with its number.
    pub fn publish_now<E: Event>(
        &self,
        conn: &mut AnyConnection,
        aggregate_id: &str,
        event: &E,
    ) -> QueryResult<Envelope> {
        let mut envelope = self.envelope(aggregate_id, event)?;
        match conn {
            AnyConnection::Postgresql(c) => {
                // Numbered after what the transaction published before it.
                flush_queued(c)?;
                let row = OutboxRow::from_envelope(&envelope);
                envelope.sequence = AppendPg::<NoWrites> {
                    writes: None,
                    row: &row,
                }
                .get_result(c)?;
            }
            AnyConnection::Sqlite(_) => {
                envelope.sequence = next_sequence(conn)?;
                diesel::insert_into(colony_outbox::table)
                    .values(OutboxRow::from_envelope(&envelope))
                    .execute(conn)?;
            }
        }
        note_published(E::NAME, &envelope);
        Ok(envelope)
    }

    /// The envelope of `event`, numbered once it is appended.
    fn envelope<E: Event>(&self, aggregate_id: &str, event: &E) -> QueryResult<Envelope> {
        debug_assert_eq!(
            E::source(),
            self.source,
            "a module publishes only its own events"
        );
        let payload = serde_json::to_value(event)
            .map_err(|e| diesel::result::Error::SerializationError(Box::new(e)))?;
        Ok(Envelope {
            event_id: Uuid::now_v7(),
            name: E::NAME.to_string(),
            source: self.source.to_string(),
            aggregate_id: aggregate_id.to_string(),
            sequence: 0,
            occurred_at: crate::time::now().and_utc(),
            correlation_id: self.correlation_id,
            causation_id: self.causation_id,
            traceparent: self.trace.map(|t| t.to_string()),
            payload,
        })
    }
}

impl Publisher {
    /// PostgreSQL: runs `writes`, a module's own change, and appends `event` about
    /// `aggregate_id` to the outbox, in one statement. Outside a transaction (see
    /// `Db::write_single`) that statement commits or fails as a whole by itself,
    /// with no `BEGIN` or `COMMIT` to wait for.
    ///
    /// `writes` renders one or more comma-separated common table expressions,
    /// `name AS (INSERT …)`, none of them named `colony_tx` (PostgreSQL accepts
    /// data-modifying statements only at the top of a `WITH`, so they cannot be
    /// nested). All of them run, whether read or not. Give it a fixed text (see
    /// `AppendPg`) and the whole statement is prepared once per connection.
    ///
    /// What `publish` says about row locks holds here as well: `writes` creates or
    /// locks the aggregate.
    pub fn publish_with<E: Event, W: QueryFragment<Pg> + QueryId>(
        &self,
        conn: &mut PgConnection,
        writes: W,
        aggregate_id: &str,
        event: &E,
    ) -> QueryResult<Envelope> {
        let mut envelope = self.envelope(aggregate_id, event)?;
        // Numbered after what a transaction around it published before it.
        flush_queued(conn)?;
        let row = OutboxRow::from_envelope(&envelope);
        envelope.sequence = AppendPg {
            writes: Some(&writes),
            row: &row,
        }
        .get_result(conn)?;
        note_published(E::NAME, &envelope);
        Ok(envelope)
    }
}

/// No writes before the outbox's own statement. A type of its own, used with
/// `writes: None` only, so that the statement without writes never shares its
/// prepared-statement key (`QueryId`) with one that has them.
struct NoWrites;

impl QueryId for NoWrites {
    type QueryId = Self;
    const HAS_STATIC_QUERY_ID: bool = true;
}

impl QueryFragment<Pg> for NoWrites {
    fn walk_ast<'b>(&'b self, _out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        Ok(())
    }
}

/// The start of both outbox statements, up to the number of the first row: the
/// writes before it, if any, and the transaction's id. That id is taken before the
/// numbers (the materialised CTE is read before the outer select runs): a reader that
/// sees a later number can then tell, from transaction ids, when an earlier one is
/// settled.
fn push_append_head<'b, W: QueryFragment<Pg>>(
    writes: Option<&'b W>,
    mut out: AstPass<'_, 'b, Pg>,
) -> QueryResult<()> {
    out.push_sql("WITH ");
    if let Some(writes) = writes {
        writes.walk_ast(out.reborrow())?;
        out.push_sql(", ");
    }
    out.push_sql(
        "colony_tx AS MATERIALIZED (SELECT pg_current_xact_id()) \
         INSERT INTO colony_outbox (sequence, event_id, name, aggregate_id, occurred_at, \
         correlation_id, causation_id, traceparent, payload) \
         SELECT nextval('colony_outbox_sequence'), ",
    );
    Ok(())
}

/// PostgreSQL: takes the next number from the outbox's sequence and appends the row
/// in one statement (one round trip, prepared once per connection), after the
/// module's own `writes` if any (`Publisher::publish_with`); returns the number. No
/// lock is held until commit, so publishers commit together; numbers follow
/// publication order, and may become visible out of order (see `Gaps`). For one
/// event (`publish_now`, `publish_with`) it is cheaper than `AppendAllPg`: with that
/// statement for one event, placements on the marketplace benchmark ran about a
/// tenth slower.
struct AppendPg<'a, W> {
    writes: Option<&'a W>,
    row: &'a OutboxRow,
}

impl<W: QueryId> QueryId for AppendPg<'_, W> {
    type QueryId = AppendPg<'static, W::QueryId>;
    const HAS_STATIC_QUERY_ID: bool = W::HAS_STATIC_QUERY_ID;
}

impl<W> Query for AppendPg<'_, W> {
    type SqlType = BigInt;
}

impl<W> RunQueryDsl<PgConnection> for AppendPg<'_, W> {}

impl<W: QueryFragment<Pg>> QueryFragment<Pg> for AppendPg<'_, W> {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        let row = self.row;
        push_append_head(self.writes, out.reborrow())?;
        out.push_bind_param::<Text, _>(&row.event_id)?;
        out.push_sql(", ");
        out.push_bind_param::<Text, _>(&row.name)?;
        out.push_sql(", ");
        out.push_bind_param::<Text, _>(&row.aggregate_id)?;
        out.push_sql(", ");
        out.push_bind_param::<Timestamp, _>(&row.occurred_at)?;
        out.push_sql(", ");
        out.push_bind_param::<Text, _>(&row.correlation_id)?;
        out.push_sql(", ");
        out.push_bind_param::<Nullable<Text>, _>(&row.causation_id)?;
        out.push_sql(", ");
        out.push_bind_param::<Nullable<Text>, _>(&row.traceparent)?;
        out.push_sql(", ");
        out.push_bind_param::<Text, _>(&row.payload)?;
        out.push_sql(" FROM colony_tx RETURNING sequence");
        Ok(())
    }
}

/// PostgreSQL: appends a transaction's queued events, numbered from the outbox's
/// sequence in the order given, in one statement (one text for any number of
/// events, so prepared once per connection), after `writes` if any (common table
/// expressions, as for `Publisher::publish_with`); returns each event's id and
/// number. The transaction's id is taken before the numbers, as in `AppendPg`.
struct AppendAllPg<'a, W> {
    /// A module's or the bus's own writes, run in the same statement.
    writes: Option<&'a W>,
    events: EventColumns,
}

/// Events as columns, one array each.
struct EventColumns {
    event_ids: Vec<String>,
    names: Vec<String>,
    aggregate_ids: Vec<String>,
    occurred_at: Vec<chrono::NaiveDateTime>,
    correlation_ids: Vec<String>,
    causation_ids: Vec<Option<String>>,
    traceparents: Vec<Option<String>>,
    payloads: Vec<String>,
}

impl EventColumns {
    fn of<'e>(envelopes: impl Iterator<Item = &'e Envelope>) -> Self {
        let mut all = Self {
            event_ids: Vec::new(),
            names: Vec::new(),
            aggregate_ids: Vec::new(),
            occurred_at: Vec::new(),
            correlation_ids: Vec::new(),
            causation_ids: Vec::new(),
            traceparents: Vec::new(),
            payloads: Vec::new(),
        };
        for envelope in envelopes {
            let row = OutboxRow::from_envelope(envelope);
            all.event_ids.push(row.event_id);
            all.names.push(row.name);
            all.aggregate_ids.push(row.aggregate_id);
            all.occurred_at.push(row.occurred_at);
            all.correlation_ids.push(row.correlation_id);
            all.causation_ids.push(row.causation_id);
            all.traceparents.push(row.traceparent);
            all.payloads.push(row.payload);
        }
        all
    }
}

impl<W: QueryId> QueryId for AppendAllPg<'_, W> {
    type QueryId = AppendAllPg<'static, W::QueryId>;
    const HAS_STATIC_QUERY_ID: bool = W::HAS_STATIC_QUERY_ID;
}

impl<W> Query for AppendAllPg<'_, W> {
    type SqlType = (Text, BigInt);
}

impl<W> RunQueryDsl<PgConnection> for AppendAllPg<'_, W> {}

impl<W: QueryFragment<Pg>> QueryFragment<Pg> for AppendAllPg<'_, W> {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        let events = &self.events;
        push_append_head(self.writes, out.reborrow())?;
        // The inner select is sorted and kept apart (OFFSET 0), so the numbers are
        // drawn in the order the events were published.
        out.push_sql(
            "e.event_id, e.name, e.aggregate_id, e.occurred_at, e.correlation_id, \
             e.causation_id, e.traceparent, e.payload \
             FROM (SELECT u.* FROM colony_tx, unnest(",
        );
        out.push_bind_param::<Array<Text>, _>(&events.event_ids)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<Text>, _>(&events.names)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<Text>, _>(&events.aggregate_ids)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<Timestamp>, _>(&events.occurred_at)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<Text>, _>(&events.correlation_ids)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<Nullable<Text>>, _>(&events.causation_ids)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<Nullable<Text>>, _>(&events.traceparents)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<Text>, _>(&events.payloads)?;
        out.push_sql(
            ") WITH ORDINALITY AS u(event_id, name, aggregate_id, occurred_at, correlation_id, \
             causation_id, traceparent, payload, n) ORDER BY u.n OFFSET 0) e \
             RETURNING event_id, sequence",
        );
        Ok(())
    }
}

/// The next sequence of this module's outbox, on SQLite.
///
/// PostgreSQL takes numbers from a sequence instead (`AppendPg`), and readers wait
/// at gaps (`Gaps`). SQLite's write transactions (`BEGIN IMMEDIATE`) are
/// serialised already, so the largest sequence plus one is safe and writes no page
/// besides the new row's. (Outbox pruning must therefore keep the newest row.)
fn next_sequence(conn: &mut AnyConnection) -> QueryResult<i64> {
    colony_outbox::table
        .select(diesel::dsl::max(colony_outbox::sequence))
        .get_result::<Option<i64>>(conn)
        .map(|max| max.unwrap_or(0) + 1)
}

/// One outbox row.
#[derive(Debug, Clone, Queryable, Selectable, Insertable)]
#[diesel(table_name = colony_outbox)]
pub struct OutboxRow {
    pub sequence: i64,
    pub event_id: String,
    pub name: String,
    pub aggregate_id: String,
    pub occurred_at: chrono::NaiveDateTime,
    pub correlation_id: String,
    pub causation_id: Option<String>,
    pub traceparent: Option<String>,
    pub payload: String,
}

impl OutboxRow {
    fn from_envelope(e: &Envelope) -> Self {
        Self {
            sequence: e.sequence,
            event_id: e.event_id.to_string(),
            name: e.name.clone(),
            aggregate_id: e.aggregate_id.clone(),
            occurred_at: e.occurred_at.naive_utc(),
            correlation_id: e.correlation_id.to_string(),
            causation_id: e.causation_id.map(|c| c.to_string()),
            traceparent: e.traceparent.clone(),
            payload: e.payload.to_string(),
        }
    }

    /// The envelope this row stores, published by `source`.
    pub fn into_envelope(self, source: &str) -> Result<Envelope, String> {
        let parse =
            |s: &str| Uuid::parse_str(s).map_err(|e| format!("outbox row {}: {e}", self.sequence));
        Ok(Envelope {
            event_id: parse(&self.event_id)?,
            correlation_id: parse(&self.correlation_id)?,
            causation_id: self.causation_id.as_deref().map(parse).transpose()?,
            name: self.name,
            source: source.to_string(),
            aggregate_id: self.aggregate_id,
            sequence: self.sequence,
            occurred_at: self.occurred_at.and_utc(),
            traceparent: self.traceparent,
            payload: serde_json::from_str(&self.payload)
                .map_err(|e| format!("outbox row {}: {e}", self.sequence))?,
        })
    }
}

/// Events published after `after`, oldest first, at most `limit`, as stored now
/// (a reader that must not skip an event uses `Gaps::read`).
///
/// SQLite: sequences are gapless, so a range replaces `LIMIT` (SQLite re-plans a
/// statement whose `LIMIT` is a bound parameter every time it runs).
pub fn read_after(
    conn: &mut AnyConnection,
    source: &str,
    after: i64,
    limit: i64,
) -> QueryResult<Vec<Result<Envelope, String>>> {
    Ok(rows_after(conn, after, limit)?
        .into_iter()
        .map(|r| r.into_envelope(source))
        .collect())
}

fn rows_after(conn: &mut AnyConnection, after: i64, limit: i64) -> QueryResult<Vec<OutboxRow>> {
    let query = colony_outbox::table
        .filter(colony_outbox::sequence.gt(after))
        .order(colony_outbox::sequence.asc());
    match conn {
        AnyConnection::Sqlite(c) => {
            let rows = query
                .filter(colony_outbox::sequence.le(after.saturating_add(limit)))
                .select(OutboxRow::as_select())
                .load(c)?;
            if !rows.is_empty() {
                return Ok(rows);
            }
            // Nothing in the range: either nothing is there yet, or the range lies
            // in a pruned prefix (`bus::retention`) and the rows go on later.
            let next: Option<i64> = colony_outbox::table
                .filter(colony_outbox::sequence.gt(after))
                .select(diesel::dsl::min(colony_outbox::sequence))
                .get_result(c)?;
            match next {
                Some(next) if next > after.saturating_add(limit) => {
                    rows_after(conn, next - 1, limit)
                }
                _ => Ok(rows),
            }
        }
        AnyConnection::Postgresql(c) => query.limit(limit).select(OutboxRow::as_select()).load(c),
    }
}

/// A reader's view of the gaps in a PostgreSQL outbox.
///
/// Numbers there are taken in publication order but become visible at commit, so a
/// reader may see N+1 before N. It hands events on only up to the first gap. A gap
/// is permanent once every transaction that could still fill it has ended (it
/// rolled back): the gap's numbers were taken before the next visible one was
/// committed, by transactions that already had an id (the publish statement takes
/// the id first) and were still running or had ended when the gap was seen. So the
/// ids of the transactions running then are noted, and once none of them runs, a
/// read taken after that knows the gap for good. (The snapshot's `xmax` is no bound
/// for those ids: it is one past the newest *finished* transaction, and running
/// ones may have ids at or above it.) SQLite's outbox has no gaps.
#[derive(Debug, Default)]
pub struct Gaps {
    /// Missing numbers below this are permanent.
    floor: i64,
    /// A gap seen and not yet settled: the number after it, and the ids of the
    /// transactions running when it was seen.
    pending: Option<(i64, Vec<String>)>,
}

impl Gaps {
    /// Whether the last read stopped at a gap that may still fill: worth reading
    /// again soon, since a rolled-back transaction wakes no one.
    pub fn waiting(&self) -> bool {
        self.pending.is_some()
    }

    /// The events through `through` were all taken without a read (committed, none
    /// missing): a gap waited for below it has filled.
    pub fn passed(&mut self, through: i64) {
        if self
            .pending
            .as_ref()
            .is_some_and(|(until, _)| through >= *until)
        {
            self.pending = None;
        }
    }

    /// Events after `after`, oldest first, at most `limit`, up to the first gap that
    /// may still fill.
    pub fn read(
        &mut self,
        conn: &mut AnyConnection,
        source: &str,
        after: i64,
        limit: i64,
    ) -> QueryResult<Vec<Result<Envelope, String>>> {
        // Settled before reading, so that the read sees whatever filled the gap.
        if let Some((until, running)) = &self.pending
            && !any_still_running(conn, running)?
        {
            self.floor = self.floor.max(*until);
            self.pending = None;
        }
        let mut expected = after.saturating_add(1);
        let mut ready = Vec::new();
        for row in rows_after(conn, after, limit)? {
            if row.sequence > expected && expected < self.floor {
                expected = self.floor.min(row.sequence);
            }
            if row.sequence > expected {
                match conn {
                    AnyConnection::Postgresql(_) => {
                        if self.pending.is_none() {
                            self.pending = Some((row.sequence, running_transactions(conn)?));
                        }
                        break;
                    }
                    // Never seen: writers there are serialised. Nothing could fill it.
                    AnyConnection::Sqlite(_) => {
                        tracing::warn!(
                            source,
                            from = expected,
                            to = row.sequence,
                            "gap in a SQLite outbox skipped"
                        );
                    }
                }
            }
            // A gap waited for that is behind has filled.
            self.passed(row.sequence);
            expected = row.sequence.saturating_add(1);
            ready.push(row.into_envelope(source));
        }
        Ok(ready)
    }
}

/// The ids of the transactions running on the PostgreSQL server now (every
/// database, every role: `backend_xid` is shown to any role), as text.
fn running_transactions(conn: &mut AnyConnection) -> QueryResult<Vec<String>> {
    #[derive(QueryableByName)]
    struct Running {
        #[diesel(sql_type = diesel::sql_types::Text)]
        xid: String,
    }
    match conn {
        AnyConnection::Postgresql(c) => Ok(diesel::sql_query(
            "SELECT backend_xid::text AS xid FROM pg_stat_activity WHERE backend_xid IS NOT NULL",
        )
        .load::<Running>(c)?
        .into_iter()
        .map(|r| r.xid)
        .collect()),
        AnyConnection::Sqlite(_) => Ok(Vec::new()),
    }
}

/// Whether any of the transactions `ids` still runs.
fn any_still_running(conn: &mut AnyConnection, ids: &[String]) -> QueryResult<bool> {
    if ids.is_empty() {
        return Ok(false);
    }
    #[derive(QueryableByName)]
    struct Count {
        #[diesel(sql_type = BigInt)]
        running: i64,
    }
    match conn {
        AnyConnection::Postgresql(c) => Ok(diesel::sql_query(
            "SELECT count(*) AS running FROM pg_stat_activity \
             WHERE backend_xid IS NOT NULL AND backend_xid::text = ANY($1)",
        )
        .bind::<diesel::sql_types::Array<diesel::sql_types::Text>, _>(ids)
        .get_result::<Count>(c)?
        .running
            > 0),
        AnyConnection::Sqlite(_) => Ok(false),
    }
}

/// The newest sequence this module has published and committed.
pub fn last_sequence(conn: &mut AnyConnection) -> QueryResult<i64> {
    colony_outbox::table
        .select(diesel::dsl::max(colony_outbox::sequence))
        .get_result::<Option<i64>>(conn)
        .map(Option::unwrap_or_default)
}

/// The name under which a relay keeps its position among the consumer positions.
const RELAY: &str = "_relay";

/// How far a publishing transport has relayed this module's outbox.
pub fn relay_position(conn: &mut AnyConnection, source: &str) -> QueryResult<i64> {
    use crate::schema::colony_consumer_positions as p;
    Ok(p::table
        .find((RELAY, source))
        .select(p::position)
        .get_result::<i64>(conn)
        .optional()?
        .unwrap_or(0))
}

/// Records that the transport acknowledged everything through `sequence`.
pub fn set_relay_position(
    conn: &mut AnyConnection,
    source: &str,
    sequence: i64,
) -> QueryResult<()> {
    use crate::schema::colony_consumer_positions as p;
    let now = crate::time::now();
    let updated = diesel::update(p::table.find((RELAY, source)))
        .set((p::position.eq(sequence), p::updated_at.eq(now)))
        .execute(conn)?;
    if updated == 0 {
        diesel::insert_into(p::table)
            .values((
                p::consumer.eq(RELAY),
                p::source.eq(source),
                p::position.eq(sequence),
                p::updated_at.eq(now),
            ))
            .execute(conn)?;
    }
    Ok(())
}
