//! Checkout tables and queries; functions take a connection so the caller owns
//! the transaction.

use std::collections::HashMap;

use chrono::NaiveDateTime;
use contracts::checkout::OrderPlaced;
use diesel::backend::Backend;
use diesel::pg::Pg;
use diesel::prelude::*;
use diesel::query_builder::{AstPass, Query, QueryFragment, QueryId};
use diesel::serialize::ToSql;
use diesel::sql_types::{Array, BigInt, Bool, HasSqlType, Integer, Nullable, Text, Timestamp};
use diesel::sqlite::Sqlite;
use kernel::AnyConnection;
use kernel::outbox::Publisher;

use crate::domain::{OrderState, Payment, Shipment, Status};
use crate::schema::{idempotency_keys, order_lines, orders};

#[derive(Debug, Clone, Queryable, Selectable, Insertable)]
#[diesel(table_name = orders)]
pub struct OrderRow {
    pub id: String,
    pub customer_id: String,
    pub status: String,
    pub reason: Option<String>,
    pub total_minor: i64,
    pub currency: String,
    pub shipping_name: String,
    pub shipping_line1: String,
    pub shipping_city: String,
    pub shipping_postal_code: String,
    pub shipping_country: String,
    pub payment_token: String,
    pub payment_state: String,
    pub payment_attempts: i32,
    pub payment_due_at: Option<NaiveDateTime>,
    pub payment_error: Option<String>,
    pub shipment_state: String,
    pub cancel_requested: bool,
    pub correlation_id: String,
    pub traceparent: Option<String>,
    pub created_at: NaiveDateTime,
    pub updated_at: NaiveDateTime,
}

impl OrderRow {
    /// A publisher for events of this order that continues its saga's trace.
    pub fn publisher(&self) -> kernel::outbox::Publisher {
        let correlation =
            uuid::Uuid::parse_str(&self.correlation_id).unwrap_or_else(|_| uuid::Uuid::now_v7());
        let trace = self
            .traceparent
            .as_deref()
            .and_then(kernel::trace::TraceContext::parse)
            .map(|t| t.child());
        kernel::outbox::Publisher::new(crate::MODULE, correlation, trace)
    }

    /// The saga state of this row (unknown values read as the safest state).
    /// The row as `save_state` leaves it.
    pub fn with_state(
        mut self,
        state: OrderState,
        payment_due_at: Option<NaiveDateTime>,
        now: NaiveDateTime,
    ) -> Self {
        self.status = state.status.as_str().to_string();
        self.reason = state.reason.map(str::to_string);
        self.payment_state = state.payment.as_str().to_string();
        self.payment_due_at = payment_due_at;
        self.shipment_state = state.shipment.as_str().to_string();
        self.cancel_requested = state.cancel_requested;
        self.updated_at = now;
        self
    }

    pub fn state(&self) -> OrderState {
        OrderState {
            status: Status::parse(&self.status).unwrap_or(Status::Pending),
            reason: self.reason.as_deref().and_then(|r| {
                [
                    crate::domain::OUT_OF_STOCK,
                    crate::domain::PAYMENT_DECLINED,
                    crate::domain::CANCELLED_BY_CUSTOMER,
                ]
                .into_iter()
                .find(|known| *known == r)
            }),
            payment: Payment::parse(&self.payment_state).unwrap_or(Payment::None),
            shipment: Shipment::parse(&self.shipment_state).unwrap_or(Shipment::None),
            cancel_requested: self.cancel_requested,
        }
    }
}

#[derive(Debug, Clone, Queryable, Selectable, Insertable)]
#[diesel(table_name = order_lines)]
pub struct LineRow {
    pub order_id: String,
    pub product_id: String,
    pub name: String,
    pub quantity: i64,
    pub unit_price_minor: i64,
    pub currency: String,
}

/// Writes a new order: its idempotency key (of concurrent duplicates exactly one
/// gets past the key's unique index, and the others fail with a unique violation,
/// writing nothing), the order, its lines and `placed`, its event. On PostgreSQL all of it is one statement, which outside
/// a transaction (`Db::write_single`) commits by itself.
pub fn place(
    conn: &mut AnyConnection,
    key: &IdempotencyRow,
    order: &OrderRow,
    lines: &[LineRow],
    publisher: &Publisher,
    placed: &OrderPlaced,
) -> QueryResult<()> {
    match conn {
        AnyConnection::Postgresql(c) => {
            let writes = PlacementPg::new(key, order, lines);
            publisher.publish_with(c, writes, &order.id, placed)?;
        }
        AnyConnection::Sqlite(c) => {
            diesel::insert_into(idempotency_keys::table)
                .values(key)
                .execute(c)?;
            diesel::insert_into(orders::table)
                .values(order)
                .execute(c)?;
            diesel::insert_into(order_lines::table)
                .values(lines)
                .execute(c)?;
            publisher.publish(conn, &order.id, placed)?;
        }
    }
    Ok(())
}

/// A placement's rows on PostgreSQL, written by the statement that also publishes
/// its event (`Publisher::publish_with`): the key, the order, and its lines from
/// arrays (one text for any number of lines, so that the statement is prepared
/// once per connection).
struct PlacementPg<'a> {
    key: &'a IdempotencyRow,
    order: &'a OrderRow,
    product_ids: Vec<&'a str>,
    names: Vec<&'a str>,
    quantities: Vec<i64>,
    unit_prices: Vec<i64>,
    currencies: Vec<&'a str>,
}

impl<'a> PlacementPg<'a> {
    fn new(key: &'a IdempotencyRow, order: &'a OrderRow, lines: &'a [LineRow]) -> Self {
        Self {
            key,
            order,
            product_ids: lines.iter().map(|l| l.product_id.as_str()).collect(),
            names: lines.iter().map(|l| l.name.as_str()).collect(),
            quantities: lines.iter().map(|l| l.quantity).collect(),
            unit_prices: lines.iter().map(|l| l.unit_price_minor).collect(),
            currencies: lines.iter().map(|l| l.currency.as_str()).collect(),
        }
    }
}

impl QueryId for PlacementPg<'_> {
    type QueryId = PlacementPg<'static>;
    const HAS_STATIC_QUERY_ID: bool = true;
}

impl QueryFragment<Pg> for PlacementPg<'_> {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        let (key, order) = (self.key, self.order);
        out.push_sql(
            "placed_key AS (INSERT INTO idempotency_keys \
             (customer_id, idempotency_key, fingerprint, order_id, created_at) VALUES (",
        );
        out.push_bind_param::<Text, _>(&key.customer_id)?;
        out.push_sql(", ");
        out.push_bind_param::<Text, _>(&key.idempotency_key)?;
        out.push_sql(", ");
        out.push_bind_param::<Text, _>(&key.fingerprint)?;
        out.push_sql(", ");
        out.push_bind_param::<Text, _>(&key.order_id)?;
        out.push_sql(", ");
        out.push_bind_param::<Timestamp, _>(&key.created_at)?;
        out.push_sql(
            ")), placed_order AS (INSERT INTO orders (id, customer_id, status, reason, \
             total_minor, currency, shipping_name, shipping_line1, shipping_city, \
             shipping_postal_code, shipping_country, payment_token, payment_state, \
             payment_attempts, payment_due_at, payment_error, shipment_state, \
             cancel_requested, correlation_id, traceparent, created_at, updated_at) VALUES (",
        );
        out.push_bind_param::<Text, _>(&order.id)?;
        for text in [&order.customer_id, &order.status] {
            out.push_sql(", ");
            out.push_bind_param::<Text, _>(text)?;
        }
        out.push_sql(", ");
        out.push_bind_param::<Nullable<Text>, _>(&order.reason)?;
        out.push_sql(", ");
        out.push_bind_param::<BigInt, _>(&order.total_minor)?;
        for text in [
            &order.currency,
            &order.shipping_name,
            &order.shipping_line1,
            &order.shipping_city,
            &order.shipping_postal_code,
            &order.shipping_country,
            &order.payment_token,
            &order.payment_state,
        ] {
            out.push_sql(", ");
            out.push_bind_param::<Text, _>(text)?;
        }
        out.push_sql(", ");
        out.push_bind_param::<Integer, _>(&order.payment_attempts)?;
        out.push_sql(", ");
        out.push_bind_param::<Nullable<Timestamp>, _>(&order.payment_due_at)?;
        out.push_sql(", ");
        out.push_bind_param::<Nullable<Text>, _>(&order.payment_error)?;
        out.push_sql(", ");
        out.push_bind_param::<Text, _>(&order.shipment_state)?;
        out.push_sql(", ");
        out.push_bind_param::<Bool, _>(&order.cancel_requested)?;
        out.push_sql(", ");
        out.push_bind_param::<Text, _>(&order.correlation_id)?;
        out.push_sql(", ");
        out.push_bind_param::<Nullable<Text>, _>(&order.traceparent)?;
        out.push_sql(", ");
        out.push_bind_param::<Timestamp, _>(&order.created_at)?;
        out.push_sql(", ");
        out.push_bind_param::<Timestamp, _>(&order.updated_at)?;
        out.push_sql(
            ")), placed_lines AS (INSERT INTO order_lines \
             (order_id, product_id, name, quantity, unit_price_minor, currency) \
             SELECT ",
        );
        out.push_bind_param::<Text, _>(&order.id)?;
        out.push_sql(", line.* FROM unnest(");
        out.push_bind_param::<Array<Text>, _>(&self.product_ids)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<Text>, _>(&self.names)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<BigInt>, _>(&self.quantities)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<BigInt>, _>(&self.unit_prices)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<Text>, _>(&self.currencies)?;
        out.push_sql(") AS line)");
        Ok(())
    }
}

pub fn find(conn: &mut AnyConnection, id: &str) -> QueryResult<Option<OrderRow>> {
    orders::table
        .find(id)
        .select(OrderRow::as_select())
        .get_result(conn)
        .optional()
}

/// Reads an order for change inside a write transaction, holding its row lock
/// until the transaction ends. (SQLite's write transactions hold the whole
/// database from their first statement: a plain read is enough there.)
pub fn lock(conn: &mut AnyConnection, id: &str) -> QueryResult<Option<OrderRow>> {
    let query = orders::table.find(id);
    match conn {
        AnyConnection::Sqlite(c) => query.select(OrderRow::as_select()).get_result(c),
        AnyConnection::Postgresql(c) => query
            .select(OrderRow::as_select())
            .for_update()
            .get_result(c),
    }
    .optional()
}

/// Orders of `ids` for change (see `lock`), in id order (concurrent lockers of
/// several orders take their locks in one order).
pub fn lock_all(conn: &mut AnyConnection, ids: &[String]) -> QueryResult<Vec<OrderRow>> {
    let query = orders::table
        .filter(orders::id.eq_any(ids))
        .order(orders::id.asc());
    match conn {
        AnyConnection::Sqlite(c) => query.select(OrderRow::as_select()).load(c),
        AnyConnection::Postgresql(c) => query.select(OrderRow::as_select()).for_update().load(c),
    }
}

/// The lines of several orders, by order.
pub fn lines_of(
    conn: &mut AnyConnection,
    order_ids: &[String],
) -> QueryResult<HashMap<String, Vec<LineRow>>> {
    let mut by_order = HashMap::<String, Vec<LineRow>>::new();
    if order_ids.is_empty() {
        return Ok(by_order);
    }
    let rows: Vec<LineRow> = order_lines::table
        .filter(order_lines::order_id.eq_any(order_ids))
        .order((order_lines::order_id.asc(), order_lines::product_id.asc()))
        .select(LineRow::as_select())
        .load(conn)?;
    for row in rows {
        by_order.entry(row.order_id.clone()).or_default().push(row);
    }
    Ok(by_order)
}

pub fn lines(conn: &mut AnyConnection, order_id: &str) -> QueryResult<Vec<LineRow>> {
    order_lines::table
        .filter(order_lines::order_id.eq(order_id))
        .order(order_lines::product_id.asc())
        .select(LineRow::as_select())
        .load(conn)
}

/// A customer's orders, newest first (at most `limit`).
pub fn of_customer(
    conn: &mut AnyConnection,
    customer_id: &str,
    limit: i64,
) -> QueryResult<Vec<OrderRow>> {
    orders::table
        .filter(orders::customer_id.eq(customer_id))
        .order((orders::created_at.desc(), orders::id.desc()))
        .limit(limit)
        .select(OrderRow::as_select())
        .load(conn)
}

/// Writes the saga state of an order.
pub fn save_state(
    conn: &mut AnyConnection,
    id: &str,
    state: OrderState,
    payment_due_at: Option<NaiveDateTime>,
    now: NaiveDateTime,
) -> QueryResult<()> {
    let save = SaveState {
        id,
        state,
        payment_due_at,
        now,
    };
    match conn {
        AnyConnection::Postgresql(c) => save.execute(c)?,
        AnyConnection::Sqlite(c) => save.execute(c)?,
    };
    Ok(())
}

/// The UPDATE of an order's step when the step was decided under the row's lock
/// (`transition_if` adds a condition to it for the usual steps), written out so
/// that each connection prepares it once: diesel prepares an UPDATE anew on every
/// run, and the server parses and plans it again.
struct SaveState<'a> {
    id: &'a str,
    state: OrderState,
    payment_due_at: Option<NaiveDateTime>,
    now: NaiveDateTime,
}

impl QueryId for SaveState<'_> {
    type QueryId = SaveState<'static>;
    const HAS_STATIC_QUERY_ID: bool = true;
}

impl<C> RunQueryDsl<C> for SaveState<'_> {}

impl<DB> QueryFragment<DB> for SaveState<'_>
where
    DB: Backend + HasSqlType<Text> + HasSqlType<Timestamp> + HasSqlType<Bool>,
    str: ToSql<Text, DB>,
    NaiveDateTime: ToSql<Timestamp, DB>,
    bool: ToSql<Bool, DB>,
    Option<&'static str>: ToSql<Nullable<Text>, DB>,
    Option<NaiveDateTime>: ToSql<Nullable<Timestamp>, DB>,
{
    fn walk_ast<'b>(&'b self, out: AstPass<'_, 'b, DB>) -> QueryResult<()> {
        self.push_update(out, Due::Set)
    }
}

/// What an UPDATE of an order's state does with its payment step's due time.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Due {
    /// Writes the value given, `NULL` included.
    Set,
    /// Writes the value given, or keeps the stored one when given none.
    SetOrKeep,
}

impl SaveState<'_> {
    fn push_update<'b, DB>(&'b self, mut out: AstPass<'_, 'b, DB>, due: Due) -> QueryResult<()>
    where
        DB: Backend + HasSqlType<Text> + HasSqlType<Timestamp> + HasSqlType<Bool>,
        str: ToSql<Text, DB>,
        NaiveDateTime: ToSql<Timestamp, DB>,
        bool: ToSql<Bool, DB>,
        Option<&'static str>: ToSql<Nullable<Text>, DB>,
        Option<NaiveDateTime>: ToSql<Nullable<Timestamp>, DB>,
    {
        let state = &self.state;
        out.push_sql("UPDATE orders SET status = ");
        out.push_bind_param::<Text, _>(state.status.as_str())?;
        out.push_sql(", reason = ");
        out.push_bind_param::<Nullable<Text>, _>(&state.reason)?;
        out.push_sql(", payment_state = ");
        out.push_bind_param::<Text, _>(state.payment.as_str())?;
        out.push_sql(", payment_due_at = ");
        if due == Due::SetOrKeep {
            out.push_sql("COALESCE(");
        }
        out.push_bind_param::<Nullable<Timestamp>, _>(&self.payment_due_at)?;
        if due == Due::SetOrKeep {
            out.push_sql(", payment_due_at)");
        }
        out.push_sql(", shipment_state = ");
        out.push_bind_param::<Text, _>(state.shipment.as_str())?;
        out.push_sql(", cancel_requested = ");
        out.push_bind_param::<Bool, _>(&state.cancel_requested)?;
        out.push_sql(", updated_at = ");
        out.push_bind_param::<Timestamp, _>(&self.now)?;
        out.push_sql(" WHERE id = ");
        out.push_bind_param::<Text, _>(self.id)?;
        Ok(())
    }
}

/// Writes the saga states of several orders and clears their payment steps (what
/// the payment worker records for a batch). On PostgreSQL one statement from
/// arrays, whatever the batch's size, prepared once per connection.
pub fn save_settled(
    conn: &mut AnyConnection,
    steps: &[(String, OrderState)],
    now: NaiveDateTime,
) -> QueryResult<()> {
    if let AnyConnection::Postgresql(c) = conn {
        if !steps.is_empty() {
            SettledPg::new(steps, now).execute(c)?;
        }
        return Ok(());
    }
    for (id, state) in steps {
        save_state(conn, id, *state, None, now)?;
    }
    Ok(())
}

/// `save_settled`'s statement on PostgreSQL: the states as columns of arrays.
struct SettledPg<'a> {
    ids: Vec<&'a str>,
    statuses: Vec<&'static str>,
    reasons: Vec<Option<&'static str>>,
    payments: Vec<&'static str>,
    shipments: Vec<&'static str>,
    cancels: Vec<bool>,
    now: NaiveDateTime,
}

impl<'a> SettledPg<'a> {
    fn new(steps: &'a [(String, OrderState)], now: NaiveDateTime) -> Self {
        Self {
            ids: steps.iter().map(|(id, _)| id.as_str()).collect(),
            statuses: steps.iter().map(|(_, s)| s.status.as_str()).collect(),
            reasons: steps.iter().map(|(_, s)| s.reason).collect(),
            payments: steps.iter().map(|(_, s)| s.payment.as_str()).collect(),
            shipments: steps.iter().map(|(_, s)| s.shipment.as_str()).collect(),
            cancels: steps.iter().map(|(_, s)| s.cancel_requested).collect(),
            now,
        }
    }
}

impl QueryId for SettledPg<'_> {
    type QueryId = SettledPg<'static>;
    const HAS_STATIC_QUERY_ID: bool = true;
}

impl RunQueryDsl<PgConnection> for SettledPg<'_> {}

impl QueryFragment<Pg> for SettledPg<'_> {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        out.push_sql(
            "UPDATE orders SET status = s.status, reason = s.reason, \
             payment_state = s.payment_state, payment_due_at = NULL, \
             shipment_state = s.shipment_state, cancel_requested = s.cancel_requested, \
             updated_at = ",
        );
        out.push_bind_param::<Timestamp, _>(&self.now)?;
        out.push_sql(" FROM unnest(");
        out.push_bind_param::<Array<Text>, _>(&self.ids)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<Text>, _>(&self.statuses)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<Nullable<Text>>, _>(&self.reasons)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<Text>, _>(&self.payments)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<Text>, _>(&self.shipments)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<Bool>, _>(&self.cancels)?;
        out.push_sql(
            ") AS s(id, status, reason, payment_state, shipment_state, cancel_requested) \
             WHERE orders.id = s.id",
        );
        Ok(())
    }
}

/// Moves an order from `from` to `to` with one statement, if `from` is the state it
/// is in; returns the row as written, or `None` when the order is anywhere else,
/// or unknown. `payment_due_at` is the due time of the payment step `to` makes
/// due; with none, the stored one is kept (as `save_state` is given it after
/// `lock`). The row lock is the UPDATE's own, taken as `lock` would take it, and
/// the condition is checked against the row's latest version. `from` has no
/// reason: the states an event usually finds an order in have none.
pub fn transition_if(
    conn: &mut AnyConnection,
    id: &str,
    from: OrderState,
    to: OrderState,
    payment_due_at: Option<NaiveDateTime>,
    now: NaiveDateTime,
) -> QueryResult<Option<OrderRow>> {
    if from.reason.is_some() {
        return Ok(None);
    }
    let save = SaveState {
        id,
        state: to,
        payment_due_at,
        now,
    };
    match conn {
        AnyConnection::Postgresql(c) => TransitionIf::<Pg>::new(save, from).get_result(c),
        AnyConnection::Sqlite(c) => TransitionIf::<Sqlite>::new(save, from).get_result(c),
    }
    .optional()
}

/// `SaveState` on a condition, returning the row written (`transition_if`).
struct TransitionIf<'a, DB: Backend>
where
    OrderRow: Selectable<DB>,
{
    save: SaveState<'a>,
    from: OrderState,
    returning: diesel::dsl::AsSelect<OrderRow, DB>,
}

impl<'a, DB: Backend> TransitionIf<'a, DB>
where
    OrderRow: Selectable<DB>,
{
    fn new(save: SaveState<'a>, from: OrderState) -> Self {
        Self {
            save,
            from,
            returning: OrderRow::as_select(),
        }
    }
}

impl<DB: Backend + 'static> QueryId for TransitionIf<'_, DB>
where
    OrderRow: Selectable<DB>,
{
    type QueryId = TransitionIf<'static, DB>;
    const HAS_STATIC_QUERY_ID: bool = true;
}

impl<DB: Backend> Query for TransitionIf<'_, DB>
where
    OrderRow: Selectable<DB>,
{
    type SqlType = diesel::dsl::AsSelect<OrderRow, DB>;
}

impl<DB: Backend, C> RunQueryDsl<C> for TransitionIf<'_, DB> where OrderRow: Selectable<DB> {}

impl<DB> QueryFragment<DB> for TransitionIf<'_, DB>
where
    DB: Backend + HasSqlType<Text> + HasSqlType<Timestamp> + HasSqlType<Bool>,
    str: ToSql<Text, DB>,
    NaiveDateTime: ToSql<Timestamp, DB>,
    bool: ToSql<Bool, DB>,
    Option<&'static str>: ToSql<Nullable<Text>, DB>,
    Option<NaiveDateTime>: ToSql<Nullable<Timestamp>, DB>,
    OrderRow: Selectable<DB>,
    diesel::dsl::AsSelect<OrderRow, DB>: QueryFragment<DB>,
{
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, DB>) -> QueryResult<()> {
        self.save.push_update(out.reborrow(), Due::SetOrKeep)?;
        // Conditions on unindexed columns only: PostgreSQL keeps a generic plan
        // chosen while the table was small, and given an index on one of them
        // (the payment step's due time) it took that index instead of the key.
        let from = &self.from;
        out.push_sql(" AND status = ");
        out.push_bind_param::<Text, _>(from.status.as_str())?;
        out.push_sql(" AND reason IS NULL AND payment_state = ");
        out.push_bind_param::<Text, _>(from.payment.as_str())?;
        out.push_sql(" AND shipment_state = ");
        out.push_bind_param::<Text, _>(from.shipment.as_str())?;
        out.push_sql(" AND cancel_requested = ");
        out.push_bind_param::<Bool, _>(&from.cancel_requested)?;
        out.push_sql(" RETURNING ");
        self.returning.walk_ast(out)
    }
}

/// Orders whose payment step is due, oldest due first.
pub fn payments_due(
    conn: &mut AnyConnection,
    now: NaiveDateTime,
    limit: i64,
) -> QueryResult<Vec<String>> {
    orders::table
        .filter(orders::payment_due_at.le(now))
        .order(orders::payment_due_at.asc())
        .limit(limit)
        .select(orders::id)
        .load(conn)
}

/// When the next payment step falls due, if any.
pub fn next_payment_due(conn: &mut AnyConnection) -> QueryResult<Option<NaiveDateTime>> {
    orders::table
        .select(diesel::dsl::min(orders::payment_due_at))
        .get_result(conn)
}

/// Takes the payment steps of `ids` that are still due until `until` (no other
/// replica will meanwhile), and returns the orders taken.
///
/// A step another replica claimed first no longer matches `payment_due_at <= now`
/// (PostgreSQL re-checks the condition once that replica's row lock is released),
/// so only this claim's rows carry `until`.
pub fn claim_payments(
    conn: &mut AnyConnection,
    ids: &[String],
    now: NaiveDateTime,
    until: NaiveDateTime,
) -> QueryResult<Vec<OrderRow>> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    diesel::update(
        orders::table
            .filter(orders::id.eq_any(ids))
            .filter(orders::payment_due_at.le(now)),
    )
    .set(orders::payment_due_at.eq(Some(until)))
    .execute(conn)?;
    orders::table
        .filter(orders::id.eq_any(ids))
        .filter(orders::payment_due_at.eq(until))
        .select(OrderRow::as_select())
        .load(conn)
}

/// A failed payment step: try again at `due`.
pub fn payment_failed(
    conn: &mut AnyConnection,
    id: &str,
    error: &str,
    due: NaiveDateTime,
) -> QueryResult<()> {
    diesel::update(orders::table.find(id))
        .set((
            orders::payment_attempts.eq(orders::payment_attempts + 1),
            orders::payment_error.eq(Some(error)),
            orders::payment_due_at.eq(Some(due)),
        ))
        .execute(conn)?;
    Ok(())
}

#[derive(Debug, Clone, Queryable, Selectable, Insertable)]
#[diesel(table_name = idempotency_keys)]
pub struct IdempotencyRow {
    pub customer_id: String,
    pub idempotency_key: String,
    pub fingerprint: String,
    pub order_id: String,
    pub created_at: NaiveDateTime,
}

pub fn find_key(
    conn: &mut AnyConnection,
    customer_id: &str,
    key: &str,
) -> QueryResult<Option<IdempotencyRow>> {
    idempotency_keys::table
        .find((customer_id, key))
        .select(IdempotencyRow::as_select())
        .get_result(conn)
        .optional()
}

/// One chunk of expired idempotency keys: up to `max` of those stored before
/// `before`, oldest first, from `from` on. Returns how many went and where the next
/// chunk starts. A key that went no longer replays: the same key places a new
/// order.
pub fn prune_keys(
    conn: &mut AnyConnection,
    from: NaiveDateTime,
    before: NaiveDateTime,
    max: i64,
) -> QueryResult<(usize, Option<NaiveDateTime>)> {
    let old = idempotency_keys::table
        .filter(idempotency_keys::created_at.ge(from))
        .filter(idempotency_keys::created_at.lt(before));
    let last: Option<NaiveDateTime> = old
        .order(idempotency_keys::created_at.asc())
        .offset(max - 1)
        .select(idempotency_keys::created_at)
        .first(conn)
        .optional()?;
    let deleted =
        diesel::delete(old.filter(idempotency_keys::created_at.le(last.unwrap_or(before))))
            .execute(conn)?;
    Ok((deleted, last))
}

pub fn is_unique_violation(e: &diesel::result::Error) -> bool {
    matches!(
        e,
        diesel::result::Error::DatabaseError(diesel::result::DatabaseErrorKind::UniqueViolation, _)
    )
}

#[cfg(test)]
mod tests {
    use contracts::Money;
    use contracts::checkout::{Address, OrderLine};
    use kernel::testing::{postgres_pool, prepared_statements, refused_by_a_check, sqlite_pool};

    use super::*;

    fn placement(key: &str, lines: usize) -> (IdempotencyRow, OrderRow, Vec<LineRow>) {
        let now = kernel::time::now();
        let id = uuid::Uuid::now_v7().to_string();
        let lines: Vec<LineRow> = (0..lines)
            .map(|i| LineRow {
                order_id: id.clone(),
                product_id: format!("product-{i}"),
                name: format!("Product {i}"),
                quantity: i as i64 + 1,
                unit_price_minor: 250,
                currency: "EUR".into(),
            })
            .collect();
        let order = OrderRow {
            id: id.clone(),
            customer_id: "customer-1".into(),
            status: "pending".into(),
            reason: None,
            total_minor: lines.iter().map(|l| l.quantity * 250).sum(),
            currency: "EUR".into(),
            shipping_name: "Ada".into(),
            shipping_line1: "1 Main St".into(),
            shipping_city: "Lyon".into(),
            shipping_postal_code: "69001".into(),
            shipping_country: "FR".into(),
            payment_token: "tok_ok".into(),
            payment_state: "awaiting_stock".into(),
            payment_attempts: 0,
            payment_due_at: None,
            payment_error: None,
            shipment_state: "none".into(),
            cancel_requested: false,
            correlation_id: uuid::Uuid::now_v7().to_string(),
            traceparent: None,
            created_at: now,
            updated_at: now,
        };
        let key = IdempotencyRow {
            customer_id: order.customer_id.clone(),
            idempotency_key: key.into(),
            fingerprint: "fingerprint".into(),
            order_id: id,
            created_at: now,
        };
        (key, order, lines)
    }

    /// Places an order as the placement handler does, outside any transaction.
    fn place_outside_a_transaction(
        conn: &mut AnyConnection,
        (key, order, lines): &(IdempotencyRow, OrderRow, Vec<LineRow>),
    ) -> QueryResult<()> {
        let event = OrderPlaced {
            order_id: uuid::Uuid::parse_str(&order.id).unwrap(),
            customer_id: order.customer_id.clone(),
            lines: lines
                .iter()
                .map(|l| OrderLine {
                    product_id: uuid::Uuid::now_v7(),
                    name: l.name.clone(),
                    quantity: l.quantity,
                    unit_price: Money::new(l.unit_price_minor, "EUR"),
                })
                .collect(),
            total: Money::new(order.total_minor, "EUR"),
            shipping_address: Address {
                name: "Ada".into(),
                line1: "1 Main St".into(),
                city: "Lyon".into(),
                postal_code: "69001".into(),
                country: "FR".into(),
            },
        };
        let publisher = Publisher::new(crate::MODULE, uuid::Uuid::now_v7(), None);
        match conn {
            // As `Db::write_single` runs it: one statement, committing by itself.
            AnyConnection::Postgresql(_) => place(conn, key, order, lines, &publisher, &event),
            AnyConnection::Sqlite(_) => kernel::db::write_tx(conn, |conn| {
                place(conn, key, order, lines, &publisher, &event)
            }),
        }
    }

    fn counts(conn: &mut AnyConnection) -> (i64, i64, i64, i64) {
        (
            orders::table.count().get_result(conn).unwrap(),
            order_lines::table.count().get_result(conn).unwrap(),
            idempotency_keys::table.count().get_result(conn).unwrap(),
            kernel::schema::colony_outbox::table
                .count()
                .get_result(conn)
                .unwrap(),
        )
    }

    /// A placement writes its key, its order, every line and its event, or, when
    /// its key was taken already, nothing at all.
    fn placement_is_written_whole_or_not_at_all(conn: &mut AnyConnection) {
        let one = placement("key-1", 1);
        let three = placement("key-3", 3);
        place_outside_a_transaction(conn, &one).unwrap();
        place_outside_a_transaction(conn, &three).unwrap();
        assert_eq!(counts(conn), (2, 4, 2, 2));
        let lines = lines(conn, &three.1.id).unwrap();
        let quantities: Vec<i64> = lines.iter().map(|l| l.quantity).collect();
        assert_eq!(quantities, [1, 2, 3]);
        assert_eq!(lines[2].name, "Product 2");
        assert_eq!(find(conn, &three.1.id).unwrap().unwrap().total_minor, 1_500);

        let mut again = placement("key-1", 2);
        again.0.fingerprint = "another body".into();
        let refused = place_outside_a_transaction(conn, &again).unwrap_err();
        assert!(is_unique_violation(&refused), "{refused:?}");
        assert_eq!(
            counts(conn),
            (2, 4, 2, 2),
            "nothing of the refused placement"
        );
        assert!(find(conn, &again.1.id).unwrap().is_none());
    }

    #[test]
    fn placement_is_written_whole_or_not_at_all_on_sqlite() {
        let (_db, pool) = sqlite_pool(crate::MODULE, crate::SPEC.migrations);
        placement_is_written_whole_or_not_at_all(&mut pool.get().unwrap());
    }

    /// On PostgreSQL it is one statement, which a session prepares once.
    #[test]
    fn placement_is_one_prepared_statement_on_postgres() {
        let Some((_db, pool)) = postgres_pool(crate::MODULE, crate::SPEC.migrations) else {
            return;
        };
        let mut conn = pool.get().unwrap();
        placement_is_written_whole_or_not_at_all(&mut conn);
        let placing = prepared_statements(&mut conn, "WITH placed_key AS");
        assert_eq!(placing.len(), 1, "{placing:?}");
    }

    /// The database refuses an order in an unknown state, a negative total, an empty
    /// line and a charge of unknown outcome, whatever the code above it does: a
    /// refused placement writes nothing.
    /// (On PostgreSQL these are domains, on SQLite column checks.)
    fn values_out_of_bounds_are_refused(conn: &mut AnyConnection) {
        let mut unknown = placement("key-status", 1);
        unknown.1.status = "lost".into();
        let mut negative = placement("key-total", 1);
        negative.1.total_minor = -1;
        let mut empty = placement("key-line", 1);
        empty.2[0].quantity = 0;
        for refused in [unknown, negative, empty] {
            let placed = place_outside_a_transaction(conn, &refused);
            assert!(refused_by_a_check(&placed), "{placed:?}");
        }
        assert_eq!(counts(conn), (0, 0, 0, 0));
        place_outside_a_transaction(conn, &placement("key-ok", 1)).unwrap();
        assert_eq!(counts(conn), (1, 1, 1, 1));
        // The test gateway's ledger knows two outcomes.
        let charge = |conn: &mut AnyConnection, outcome: &str| {
            use crate::schema::test_gateway_charges as c;
            diesel::insert_into(c::table)
                .values((
                    c::order_id.eq(format!("order-{outcome}")),
                    c::amount_minor.eq(250_i64),
                    c::currency.eq("EUR"),
                    c::outcome.eq(outcome.to_string()),
                    c::refunded.eq(false),
                    c::created_at.eq(kernel::time::now()),
                ))
                .execute(conn)
        };
        let unknown = charge(conn, "lost");
        assert!(refused_by_a_check(&unknown), "{unknown:?}");
        assert_eq!(charge(conn, "declined").unwrap(), 1);
    }

    #[test]
    fn values_out_of_bounds_are_refused_on_sqlite() {
        let (_db, pool) = sqlite_pool(crate::MODULE, crate::SPEC.migrations);
        values_out_of_bounds_are_refused(&mut pool.get().unwrap());
    }

    #[test]
    fn values_out_of_bounds_are_refused_on_postgres() {
        let Some((_db, pool)) = postgres_pool(crate::MODULE, crate::SPEC.migrations) else {
            return;
        };
        values_out_of_bounds_are_refused(&mut pool.get().unwrap());
    }

    /// Given a placed order, when it is moved on from the state it is in, then one
    /// statement moves it and returns the row as written; from any other state
    /// (another status or payment, a pending cancellation, a reason), or unknown,
    /// nothing is written.
    fn an_order_moves_only_from_the_state_named(conn: &mut AnyConnection) {
        let placed = placement("key-1", 1);
        place_outside_a_transaction(conn, &placed).unwrap();
        let id = placed.1.id.as_str();
        let now = kernel::time::now();
        let reserved = OrderState::placed().stock_reserved().unwrap();
        let confirmed = reserved.charged().unwrap();
        let moved = transition_if(conn, id, reserved, confirmed, None, now).unwrap();
        assert!(moved.is_none(), "{moved:?}");
        assert_eq!(
            find(conn, id).unwrap().unwrap().state(),
            OrderState::placed()
        );

        let due = now + chrono::Duration::seconds(30);
        let moved = transition_if(conn, id, OrderState::placed(), reserved, Some(due), now)
            .unwrap()
            .expect("moved from placed");
        assert_eq!(moved.state(), reserved);
        assert_eq!(moved.payment_due_at, Some(due));
        assert_eq!(
            (moved.customer_id.as_str(), moved.total_minor),
            ("customer-1", 250)
        );
        let stored = find(conn, id).unwrap().unwrap();
        assert_eq!(
            (stored.state(), stored.payment_due_at, stored.updated_at),
            (reserved, Some(due), now)
        );

        // Given no due time, the stored one stays.
        let later = now + chrono::Duration::seconds(1);
        let moved = transition_if(conn, id, reserved, confirmed, None, later)
            .unwrap()
            .expect("moved from reserved");
        assert_eq!(
            (moved.state(), moved.payment_due_at, moved.updated_at),
            (confirmed, Some(due), later)
        );
        let unknown = transition_if(conn, "no-such-order", reserved, confirmed, None, now);
        assert!(unknown.unwrap().is_none());
        assert_eq!(find(conn, id).unwrap().unwrap().state(), confirmed);

        // A state that differs only in a pending cancellation, or only in a reason,
        // is another state: nothing moves.
        let preparing = confirmed.shipment_created().unwrap();
        let (cancelling, _) = confirmed.request_cancel().unwrap();
        save_state(conn, id, cancelling, None, now).unwrap();
        let moved = transition_if(conn, id, confirmed, preparing, None, now).unwrap();
        assert!(moved.is_none(), "{moved:?}");
        assert_eq!(find(conn, id).unwrap().unwrap().state(), cancelling);
        let with_reason = OrderState {
            reason: Some(crate::domain::OUT_OF_STOCK),
            ..confirmed
        };
        save_state(conn, id, with_reason, None, now).unwrap();
        let moved = transition_if(conn, id, confirmed, preparing, None, now).unwrap();
        assert!(moved.is_none(), "{moved:?}");
        assert_eq!(find(conn, id).unwrap().unwrap().state(), with_reason);
    }

    #[test]
    fn an_order_moves_only_from_the_state_named_on_sqlite() {
        let (_db, pool) = sqlite_pool(crate::MODULE, crate::SPEC.migrations);
        an_order_moves_only_from_the_state_named(&mut pool.get().unwrap());
    }

    #[test]
    fn an_order_moves_only_from_the_state_named_on_postgres() {
        let Some((_db, pool)) = postgres_pool(crate::MODULE, crate::SPEC.migrations) else {
            return;
        };
        let mut conn = pool.get().unwrap();
        an_order_moves_only_from_the_state_named(&mut conn);
        let moving = prepared_statements(
            &mut conn,
            "UPDATE orders SET status = $1, reason = $2, payment_state = $3, \
             payment_due_at = COALESCE",
        );
        assert_eq!(moving.len(), 1, "one text for every step: {moving:?}");
    }

    /// Given orders with payment steps set, when a batch's outcomes are written,
    /// then each order has its own new state and no step left.
    fn settled_states_are_written_per_order(conn: &mut AnyConnection) {
        let orders = [
            placement("key-1", 1),
            placement("key-2", 1),
            placement("key-3", 2),
            placement("key-4", 1),
        ];
        let now = kernel::time::now();
        let due = now + chrono::Duration::seconds(30);
        let reserved = OrderState::placed().stock_reserved().unwrap();
        for order in &orders {
            place_outside_a_transaction(conn, order).unwrap();
            save_state(conn, &order.1.id, reserved, Some(due), now).unwrap();
        }
        let id = |n: usize| orders[n].1.id.clone();
        let confirmed = reserved.charged().unwrap();
        let declined = reserved.declined().unwrap();
        save_settled(conn, &[(id(0), confirmed)], now).unwrap();
        let later = now + chrono::Duration::seconds(1);
        save_settled(conn, &[(id(1), declined), (id(2), confirmed)], later).unwrap();
        save_settled(conn, &[], later).unwrap();
        let expected = [
            (confirmed, None, now),
            (declined, None, later),
            (confirmed, None, later),
            // Not in a batch: untouched.
            (reserved, Some(due), now),
        ];
        for (n, expected) in expected.into_iter().enumerate() {
            let stored = find(conn, &id(n)).unwrap().unwrap();
            let got = (stored.state(), stored.payment_due_at, stored.updated_at);
            assert_eq!(got, expected, "order {n}");
        }
        assert_eq!(
            find(conn, &id(1)).unwrap().unwrap().reason.as_deref(),
            Some(crate::domain::PAYMENT_DECLINED)
        );
    }

    #[test]
    fn settled_states_are_written_per_order_on_sqlite() {
        let (_db, pool) = sqlite_pool(crate::MODULE, crate::SPEC.migrations);
        settled_states_are_written_per_order(&mut pool.get().unwrap());
    }

    /// On PostgreSQL a batch of any size is one statement, prepared once.
    #[test]
    fn settled_states_are_written_per_order_on_postgres() {
        let Some((_db, pool)) = postgres_pool(crate::MODULE, crate::SPEC.migrations) else {
            return;
        };
        let mut conn = pool.get().unwrap();
        settled_states_are_written_per_order(&mut conn);
        let writing = prepared_statements(&mut conn, "UPDATE orders SET status = s.status");
        assert_eq!(writing.len(), 1, "{writing:?}");
    }

    /// On PostgreSQL a step decided under the row's lock is written by one
    /// statement that a session prepares once and runs again for the next order.
    #[test]
    fn order_states_are_written_by_one_prepared_statement() {
        let Some((_db, pool)) = postgres_pool(crate::MODULE, crate::SPEC.migrations) else {
            return;
        };
        let mut conn = pool.get().unwrap();
        let now = kernel::time::now();
        for id in ["order-1", "order-2"] {
            save_state(&mut conn, id, OrderState::placed(), Some(now), now).unwrap();
        }
        let saving = prepared_statements(&mut conn, "UPDATE orders SET status");
        assert_eq!(saving.len(), 1, "{saving:?}");
    }
}
