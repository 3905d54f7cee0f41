//! Catalog tables and queries. Functions take a connection so the caller owns
//! the transaction (and the outbox rows written with it).

use chrono::NaiveDateTime;
use diesel::backend::Backend;
use diesel::pg::Pg;
use diesel::prelude::*;
use diesel::query_builder::{AstPass, Query, QueryFragment, QueryId};
use diesel::serialize::ToSql;
use diesel::sql_types::{BigInt, HasSqlType, Text, Timestamp};
use diesel::sqlite::Sqlite;
use kernel::AnyConnection;

use crate::schema::products;

#[derive(Debug, Clone, Queryable, Selectable, Insertable)]
#[diesel(table_name = products)]
pub struct ProductRow {
    pub id: String,
    pub sku: String,
    pub seller_id: String,
    pub name: String,
    pub description: Option<String>,
    pub price_minor: i64,
    pub currency: String,
    pub on_hand: i64,
    pub reserved: i64,
    pub listed: bool,
    pub created_at: NaiveDateTime,
    pub updated_at: NaiveDateTime,
}

/// Columns a details/price update may change.
#[derive(Debug, Default, AsChangeset)]
#[diesel(table_name = products)]
pub struct ProductChanges {
    pub name: Option<String>,
    pub description: Option<Option<String>>,
    pub price_minor: Option<i64>,
    pub currency: Option<String>,
    pub updated_at: Option<NaiveDateTime>,
}

pub fn insert(conn: &mut AnyConnection, row: &ProductRow) -> QueryResult<()> {
    diesel::insert_into(products::table)
        .values(row)
        .execute(conn)?;
    Ok(())
}

pub fn find(conn: &mut AnyConnection, id: &str) -> QueryResult<Option<ProductRow>> {
    products::table
        .find(id)
        .select(ProductRow::as_select())
        .get_result(conn)
        .optional()
}

/// The products among `ids` (distinct), with their ids: one round of
/// `http::ProductLookups`. On PostgreSQL the ids go as one array, so the
/// statement is the same whatever their number and is prepared once.
pub fn find_many(
    conn: &mut AnyConnection,
    ids: &[String],
) -> QueryResult<Vec<(String, ProductRow)>> {
    let query = products::table.filter(products::id.eq_any(ids));
    let rows = match conn {
        AnyConnection::Postgresql(c) => query.select(ProductRow::as_select()).load(c)?,
        AnyConnection::Sqlite(c) => query.select(ProductRow::as_select()).load(c)?,
    };
    Ok(rows.into_iter().map(|r| (r.id.clone(), r)).collect())
}

/// Reads a product for change inside a write transaction, holding its row lock
/// until the transaction ends. (SQLite's write transactions hold the whole
/// database from their first statement: a plain read is enough there.)
pub fn lock(conn: &mut AnyConnection, id: &str) -> QueryResult<Option<ProductRow>> {
    let query = products::table.find(id);
    match conn {
        AnyConnection::Sqlite(c) => query.select(ProductRow::as_select()).get_result(c),
        AnyConnection::Postgresql(c) => query
            .select(ProductRow::as_select())
            .for_update()
            .get_result(c),
    }
    .optional()
}

/// Listed products after `after` (by id, which is time-ordered), at most `limit`.
pub fn page(
    conn: &mut AnyConnection,
    after: Option<&str>,
    limit: i64,
) -> QueryResult<Vec<ProductRow>> {
    let mut query = products::table
        .filter(products::listed.eq(true))
        .order(products::id.asc())
        .limit(limit)
        .select(ProductRow::as_select())
        .into_boxed();
    if let Some(after) = after {
        query = query.filter(products::id.gt(after.to_string()));
    }
    query.load(conn)
}

pub fn update(conn: &mut AnyConnection, id: &str, changes: &ProductChanges) -> QueryResult<()> {
    diesel::update(products::table.find(id))
        .set(changes)
        .execute(conn)?;
    Ok(())
}

pub fn set_on_hand(
    conn: &mut AnyConnection,
    id: &str,
    on_hand: i64,
    now: NaiveDateTime,
) -> QueryResult<()> {
    diesel::update(products::table.find(id))
        .set((products::on_hand.eq(on_hand), products::updated_at.eq(now)))
        .execute(conn)?;
    Ok(())
}

pub fn delist(conn: &mut AnyConnection, id: &str, now: NaiveDateTime) -> QueryResult<()> {
    diesel::update(products::table.find(id))
        .set((products::listed.eq(false), products::updated_at.eq(now)))
        .execute(conn)?;
    Ok(())
}

/// Whether `e` is a unique-constraint violation (on either backend).
pub fn is_unique_violation(e: &diesel::result::Error) -> bool {
    matches!(
        e,
        diesel::result::Error::DatabaseError(diesel::result::DatabaseErrorKind::UniqueViolation, _)
    )
}

impl ProductRow {
    pub fn stock(&self) -> crate::domain::Stock {
        crate::domain::Stock {
            on_hand: self.on_hand,
            reserved: self.reserved,
        }
    }
}

/// Writes both stock figures of a product (its row is locked by the caller).
pub fn set_stock(
    conn: &mut AnyConnection,
    id: &str,
    stock: crate::domain::Stock,
    now: NaiveDateTime,
) -> QueryResult<()> {
    let set = SetStock { id, stock, now };
    match conn {
        AnyConnection::Postgresql(c) => set.execute(c)?,
        AnyConnection::Sqlite(c) => set.execute(c)?,
    };
    Ok(())
}

/// A product's stock, written out so that each connection prepares it once (diesel
/// prepares an UPDATE anew on every run): every reservation, release and commit
/// runs it for each line.
struct SetStock<'a> {
    id: &'a str,
    stock: crate::domain::Stock,
    now: NaiveDateTime,
}

impl QueryId for SetStock<'_> {
    type QueryId = SetStock<'static>;
    const HAS_STATIC_QUERY_ID: bool = true;
}

impl<C> RunQueryDsl<C> for SetStock<'_> {}

impl<DB> QueryFragment<DB> for SetStock<'_>
where
    DB: Backend + HasSqlType<Text> + HasSqlType<BigInt> + HasSqlType<Timestamp>,
    str: ToSql<Text, DB>,
    i64: ToSql<BigInt, DB>,
    NaiveDateTime: ToSql<Timestamp, DB>,
{
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, DB>) -> QueryResult<()> {
        out.push_sql("UPDATE products SET on_hand = ");
        out.push_bind_param::<BigInt, _>(&self.stock.on_hand)?;
        out.push_sql(", reserved = ");
        out.push_bind_param::<BigInt, _>(&self.stock.reserved)?;
        out.push_sql(", updated_at = ");
        out.push_bind_param::<Timestamp, _>(&self.now)?;
        out.push_sql(" WHERE id = ");
        out.push_bind_param::<Text, _>(self.id)?;
        Ok(())
    }
}

#[derive(Debug, Clone, Queryable, Selectable, Insertable)]
#[diesel(table_name = crate::schema::reservations)]
pub struct ReservationRow {
    pub order_id: String,
    pub product_id: String,
    pub quantity: i64,
    pub status: String,
    pub created_at: NaiveDateTime,
    pub updated_at: NaiveDateTime,
}

/// Reserves `row.quantity` of a product for an order: its new stock (the row is
/// locked by the caller) and the reservation line. One statement on PostgreSQL,
/// prepared once per connection.
pub fn reserve_line(
    conn: &mut AnyConnection,
    stock: crate::domain::Stock,
    row: &ReservationRow,
) -> QueryResult<()> {
    let set = SetStock {
        id: &row.product_id,
        stock,
        now: row.updated_at,
    };
    match conn {
        AnyConnection::Postgresql(c) => {
            ReserveLinePg { set, row }.execute(c)?;
        }
        AnyConnection::Sqlite(c) => {
            set.execute(c)?;
            diesel::insert_into(crate::schema::reservations::table)
                .values(row)
                .execute(c)?;
        }
    }
    Ok(())
}

struct ReserveLinePg<'a> {
    set: SetStock<'a>,
    row: &'a ReservationRow,
}

impl QueryId for ReserveLinePg<'_> {
    type QueryId = ReserveLinePg<'static>;
    const HAS_STATIC_QUERY_ID: bool = true;
}

impl RunQueryDsl<PgConnection> for ReserveLinePg<'_> {}

impl QueryFragment<Pg> for ReserveLinePg<'_> {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        out.push_sql("WITH stocked AS (");
        self.set.walk_ast(out.reborrow())?;
        out.push_sql(
            ") INSERT INTO reservations \
             (order_id, product_id, quantity, status, created_at, updated_at) VALUES (",
        );
        push_line(self.row, out.reborrow())?;
        out.push_sql(")");
        Ok(())
    }
}

/// A reservation line's values, in the column order of the INSERTs above and below.
fn push_line<'b>(row: &'b ReservationRow, mut out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
    out.push_bind_param::<Text, _>(&row.order_id)?;
    out.push_sql(", ");
    out.push_bind_param::<Text, _>(&row.product_id)?;
    out.push_sql(", ");
    out.push_bind_param::<BigInt, _>(&row.quantity)?;
    out.push_sql(", ");
    out.push_bind_param::<Text, _>(&row.status)?;
    out.push_sql(", ");
    out.push_bind_param::<Timestamp, _>(&row.created_at)?;
    out.push_sql(", ");
    out.push_bind_param::<Timestamp, _>(&row.updated_at)?;
    Ok(())
}

/// Reserves `quantity` units of one product for an order, if the order is not
/// decided yet (`decided`) and the product is listed with that many units
/// available (`domain::reserve`'s rule for one line): its stock and the
/// reservation line. Returns the new stock, or `None` when any of that does not
/// hold, and then nothing is written. On PostgreSQL one statement, prepared once
/// per connection; the product's row lock is the UPDATE's own, and the condition
/// is checked against the row's latest version.
pub fn reserve_if_available(
    conn: &mut AnyConnection,
    order_id: &str,
    product_id: &str,
    quantity: i64,
    now: NaiveDateTime,
) -> QueryResult<Option<crate::domain::Stock>> {
    let line = ReservationRow {
        order_id: order_id.into(),
        product_id: product_id.into(),
        quantity,
        status: RESERVED.into(),
        created_at: now,
        updated_at: now,
    };
    let reserve = ReserveIfAvailable {
        line: &line,
        decided: Decided { order_id },
    };
    let stock: Option<(i64, i64)> = match conn {
        AnyConnection::Postgresql(c) => reserve.get_result(c).optional()?,
        AnyConnection::Sqlite(c) => {
            let stock = reserve.get_result(c).optional()?;
            if stock.is_some() {
                diesel::insert_into(crate::schema::reservations::table)
                    .values(&line)
                    .execute(c)?;
            }
            stock
        }
    };
    Ok(stock.map(|(on_hand, reserved)| crate::domain::Stock { on_hand, reserved }))
}

/// The status of a reservation line that holds its units.
pub const RESERVED: &str = "reserved";

/// `reserve_if_available`'s statement: on SQLite the stock's UPDATE alone (it has
/// no writing CTEs), on PostgreSQL with the line's INSERT.
struct ReserveIfAvailable<'a> {
    line: &'a ReservationRow,
    decided: Decided<'a>,
}

impl QueryId for ReserveIfAvailable<'_> {
    type QueryId = ReserveIfAvailable<'static>;
    const HAS_STATIC_QUERY_ID: bool = true;
}

impl Query for ReserveIfAvailable<'_> {
    type SqlType = (BigInt, BigInt);
}

impl<C> RunQueryDsl<C> for ReserveIfAvailable<'_> {}

impl ReserveIfAvailable<'_> {
    fn push_update<'b, DB>(&'b self, mut out: AstPass<'_, 'b, DB>) -> QueryResult<()>
    where
        DB: Backend + HasSqlType<Text> + HasSqlType<BigInt> + HasSqlType<Timestamp>,
        str: ToSql<Text, DB>,
        i64: ToSql<BigInt, DB>,
        NaiveDateTime: ToSql<Timestamp, DB>,
    {
        let line = self.line;
        out.push_sql("UPDATE products SET reserved = reserved + ");
        out.push_bind_param::<BigInt, _>(&line.quantity)?;
        out.push_sql(", updated_at = ");
        out.push_bind_param::<Timestamp, _>(&line.updated_at)?;
        out.push_sql(" WHERE id = ");
        out.push_bind_param::<Text, _>(&line.product_id)?;
        out.push_sql(" AND listed AND ");
        out.push_bind_param::<BigInt, _>(&line.quantity)?;
        out.push_sql(" > 0 AND on_hand - reserved >= ");
        out.push_bind_param::<BigInt, _>(&line.quantity)?;
        out.push_sql(" AND (");
        self.decided.walk_ast(out.reborrow())?;
        out.push_sql(") = 0 RETURNING on_hand, reserved");
        Ok(())
    }
}

impl QueryFragment<Sqlite> for ReserveIfAvailable<'_> {
    fn walk_ast<'b>(&'b self, out: AstPass<'_, 'b, Sqlite>) -> QueryResult<()> {
        self.push_update(out)
    }
}

impl QueryFragment<Pg> for ReserveIfAvailable<'_> {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        out.push_sql("WITH stocked AS (");
        self.push_update(out.reborrow())?;
        out.push_sql(
            "), line AS (INSERT INTO reservations \
             (order_id, product_id, quantity, status, created_at, updated_at) SELECT ",
        );
        push_line(self.line, out.reborrow())?;
        out.push_sql(" FROM stocked) SELECT on_hand, reserved FROM stocked");
        Ok(())
    }
}

/// An order's reservation lines in `status`, by product id.
pub fn reservations(
    conn: &mut AnyConnection,
    order_id: &str,
    status: &str,
) -> QueryResult<Vec<ReservationRow>> {
    use crate::schema::reservations as r;
    r::table
        .filter(r::order_id.eq(order_id))
        .filter(r::status.eq(status))
        .order(r::product_id.asc())
        .select(ReservationRow::as_select())
        .load(conn)
}

/// Whether the catalog already decided on this order (reserved or refused).
pub fn decided(conn: &mut AnyConnection, order_id: &str) -> QueryResult<bool> {
    let decided = Decided { order_id };
    let found: i64 = match conn {
        AnyConnection::Postgresql(c) => decided.get_result(c)?,
        AnyConnection::Sqlite(c) => decided.get_result(c)?,
    };
    Ok(found > 0)
}

/// `decided`'s one statement: the two lookups by key, each as it would be alone.
/// (`SELECT EXISTS (…) OR EXISTS (…)` was slower by far on PostgreSQL, built with
/// diesel and written out alike: 0.19–0.5 ms a call against 0.014 for two
/// counts, and growing with the tables, as a plan chosen while they were small
/// scanned them whole.)
struct Decided<'a> {
    order_id: &'a str,
}

impl QueryId for Decided<'_> {
    type QueryId = Decided<'static>;
    const HAS_STATIC_QUERY_ID: bool = true;
}

impl Query for Decided<'_> {
    type SqlType = BigInt;
}

impl<C> RunQueryDsl<C> for Decided<'_> {}

impl<DB> QueryFragment<DB> for Decided<'_>
where
    DB: Backend + HasSqlType<Text>,
    str: ToSql<Text, DB>,
{
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, DB>) -> QueryResult<()> {
        out.push_sql("SELECT count(*) FROM (SELECT order_id FROM reservations WHERE order_id = ");
        out.push_bind_param::<Text, _>(self.order_id)?;
        out.push_sql(" UNION ALL SELECT order_id FROM reservation_refusals WHERE order_id = ");
        out.push_bind_param::<Text, _>(self.order_id)?;
        out.push_sql(") AS decided");
        Ok(())
    }
}

pub fn set_reservation_status(
    conn: &mut AnyConnection,
    order_id: &str,
    product_id: &str,
    status: &str,
    now: NaiveDateTime,
) -> QueryResult<()> {
    use crate::schema::reservations as r;
    diesel::update(r::table.find((order_id, product_id)))
        .set((r::status.eq(status), r::updated_at.eq(now)))
        .execute(conn)?;
    Ok(())
}

pub fn insert_refusal(
    conn: &mut AnyConnection,
    order_id: &str,
    reason: &str,
    now: NaiveDateTime,
) -> QueryResult<()> {
    use crate::schema::reservation_refusals as f;
    diesel::insert_into(f::table)
        .values((
            f::order_id.eq(order_id),
            f::reason.eq(reason),
            f::created_at.eq(now),
        ))
        .execute(conn)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use kernel::testing::{postgres_pool, prepared_statements, refused_by_a_check, sqlite_pool};

    use super::*;
    use crate::domain::Stock;

    /// On PostgreSQL a product's stock, written by every reservation, release and
    /// commit, is one statement that a session prepares once and runs again.
    #[test]
    fn stock_is_written_by_one_prepared_statement() {
        let Some((_db, pool)) = postgres_pool(crate::MODULE, crate::SPEC.migrations) else {
            return;
        };
        let mut conn = pool.get().unwrap();
        let now = kernel::time::now();
        for reserved in 0..2 {
            let stock = Stock {
                on_hand: 10,
                reserved,
            };
            set_stock(&mut conn, &format!("product-{reserved}"), stock, now).unwrap();
        }
        let setting = prepared_statements(&mut conn, "UPDATE products SET on_hand");
        assert_eq!(setting.len(), 1, "{setting:?}");
    }

    fn insert_product(
        conn: &mut AnyConnection,
        sku: &str,
        price: i64,
        on_hand: i64,
    ) -> QueryResult<usize> {
        use crate::schema::products as p;
        let now = kernel::time::now();
        diesel::insert_into(p::table)
            .values((
                p::id.eq(format!("product-{sku}")),
                p::sku.eq(sku),
                p::seller_id.eq("seller"),
                p::name.eq(sku),
                p::description.eq(Some("")),
                p::price_minor.eq(price),
                p::currency.eq("EUR"),
                p::on_hand.eq(on_hand),
                p::reserved.eq(0_i64),
                p::listed.eq(true),
                p::created_at.eq(now),
                p::updated_at.eq(now),
            ))
            .execute(conn)
    }

    /// A reservation line and the stock it takes are written together: by one
    /// statement, prepared once, on PostgreSQL.
    fn reserving_a_line_writes_stock_and_reservation(conn: &mut AnyConnection) {
        use crate::schema::products as p;
        let now = kernel::time::now();
        for (sku, on_hand) in [("A", 10), ("B", 3)] {
            insert_product(conn, sku, 100, on_hand).unwrap();
        }
        for (product, quantity) in [("product-A", 4), ("product-B", 3)] {
            let row = ReservationRow {
                order_id: "order-1".into(),
                product_id: product.into(),
                quantity,
                status: "reserved".into(),
                created_at: now,
                updated_at: now,
            };
            let held = lock(conn, product).unwrap().unwrap().stock();
            let stock = Stock {
                reserved: held.reserved + quantity,
                ..held
            };
            reserve_line(conn, stock, &row).unwrap();
        }
        let stocks: Vec<(i64, i64)> = p::table
            .order(p::id)
            .select((p::on_hand, p::reserved))
            .load(conn)
            .unwrap();
        assert_eq!(stocks, [(10, 4), (3, 3)]);
        let lines = reservations(conn, "order-1", "reserved").unwrap();
        let quantities: Vec<(&str, i64)> = lines
            .iter()
            .map(|l| (l.product_id.as_str(), l.quantity))
            .collect();
        assert_eq!(quantities, [("product-A", 4), ("product-B", 3)]);
    }

    #[test]
    fn a_reserved_line_is_written_with_its_stock_on_sqlite() {
        let (_db, pool) = sqlite_pool(crate::MODULE, crate::SPEC.migrations);
        reserving_a_line_writes_stock_and_reservation(&mut pool.get().unwrap());
    }

    #[test]
    fn a_reserved_line_is_one_prepared_statement_on_postgres() {
        let Some((_db, pool)) = postgres_pool(crate::MODULE, crate::SPEC.migrations) else {
            return;
        };
        let mut conn = pool.get().unwrap();
        reserving_a_line_writes_stock_and_reservation(&mut conn);
        let reserving = prepared_statements(&mut conn, "WITH stocked AS (UPDATE products");
        assert_eq!(reserving.len(), 1, "{reserving:?}");
    }

    /// An order is decided once it holds a reservation line or was refused, and
    /// not before.
    fn an_order_is_decided_once_reserved_or_refused(conn: &mut AnyConnection) {
        let now = kernel::time::now();
        insert_product(conn, "A", 100, 10).unwrap();
        assert!(!decided(conn, "order-1").unwrap());
        let row = ReservationRow {
            order_id: "order-1".into(),
            product_id: "product-A".into(),
            quantity: 2,
            status: "reserved".into(),
            created_at: now,
            updated_at: now,
        };
        let stock = Stock {
            on_hand: 10,
            reserved: 2,
        };
        reserve_line(conn, stock, &row).unwrap();
        insert_refusal(conn, "order-2", "out_of_stock", now).unwrap();
        let found: Vec<bool> = ["order-1", "order-2", "order-3"]
            .into_iter()
            .map(|order| decided(conn, order).unwrap())
            .collect();
        assert_eq!(found, [true, true, false]);
    }

    #[test]
    fn an_order_is_decided_once_reserved_or_refused_on_sqlite() {
        let (_db, pool) = sqlite_pool(crate::MODULE, crate::SPEC.migrations);
        an_order_is_decided_once_reserved_or_refused(&mut pool.get().unwrap());
    }

    /// On PostgreSQL the lookup is one statement, prepared once.
    #[test]
    fn an_order_is_decided_once_reserved_or_refused_on_postgres() {
        let Some((_db, pool)) = postgres_pool(crate::MODULE, crate::SPEC.migrations) else {
            return;
        };
        let mut conn = pool.get().unwrap();
        an_order_is_decided_once_reserved_or_refused(&mut conn);
        let looking = prepared_statements(&mut conn, "SELECT count(*) FROM (SELECT order_id");
        assert_eq!(looking.len(), 1, "{looking:?}");
    }

    /// Given products in several states, when one line is reserved by the one
    /// statement, then it succeeds exactly where `domain::reserve` would reserve
    /// that line, with the stock the domain plans, and otherwise writes nothing;
    /// an order decided already (reserved or refused) is never reserved again.
    fn one_line_is_reserved_as_the_domain_decides(conn: &mut AnyConnection) {
        use crate::domain::{self, Offer, ProductId};
        use crate::schema::{products as p, reservations as r};
        let now = kernel::time::now();
        let cases = [
            (10, 0, true, 1),
            (10, 9, true, 1),
            (10, 10, true, 1),
            (10, 8, true, 3),
            (10, 0, false, 1),
            (10, 0, true, 0),
            (10, 0, true, -1),
        ];
        for (n, (on_hand, reserved, listed, quantity)) in cases.into_iter().enumerate() {
            let sku = format!("case-{n}");
            let product = format!("product-{sku}");
            let order = format!("order-{n}");
            insert_product(conn, &sku, 100, on_hand).unwrap();
            diesel::update(p::table.find(&product))
                .set((p::reserved.eq(reserved), p::listed.eq(listed)))
                .execute(conn)
                .unwrap();
            let before = Stock { on_hand, reserved };
            let id = ProductId(uuid::Uuid::now_v7());
            let expected = domain::reserve(&[(
                id,
                quantity,
                Some(Offer {
                    listed,
                    stock: before,
                }),
            )])
            .ok()
            .map(|planned| planned[0].1);
            let got = reserve_if_available(conn, &order, &product, quantity, now).unwrap();
            assert_eq!(got, expected, "case {n}");
            let stored = lock(conn, &product).unwrap().unwrap().stock();
            assert_eq!(stored, got.unwrap_or(before), "case {n}");
            let lines: Vec<(i64, String)> = r::table
                .filter(r::order_id.eq(&order))
                .select((r::quantity, r::status))
                .load(conn)
                .unwrap();
            let line = got.map(|_| (quantity, RESERVED.to_string()));
            assert_eq!(lines, Vec::from_iter(line), "case {n}");
        }
        // Decided orders: order-0 holds a line, order-x was refused.
        insert_refusal(conn, "order-x", "out_of_stock", now).unwrap();
        for order in ["order-0", "order-x"] {
            let got = reserve_if_available(conn, order, "product-case-0", 1, now).unwrap();
            assert_eq!(got, None, "{order}");
        }
        let stored = lock(conn, "product-case-0").unwrap().unwrap().stock();
        assert_eq!(
            stored,
            Stock {
                on_hand: 10,
                reserved: 1
            }
        );
    }

    #[test]
    fn one_line_is_reserved_as_the_domain_decides_on_sqlite() {
        let (_db, pool) = sqlite_pool(crate::MODULE, crate::SPEC.migrations);
        one_line_is_reserved_as_the_domain_decides(&mut pool.get().unwrap());
    }

    /// On PostgreSQL it is one statement, prepared once.
    #[test]
    fn one_line_is_reserved_as_the_domain_decides_on_postgres() {
        let Some((_db, pool)) = postgres_pool(crate::MODULE, crate::SPEC.migrations) else {
            return;
        };
        let mut conn = pool.get().unwrap();
        one_line_is_reserved_as_the_domain_decides(&mut conn);
        let reserving =
            prepared_statements(&mut conn, "WITH stocked AS (UPDATE products SET reserved");
        assert_eq!(reserving.len(), 1, "{reserving:?}");
    }

    /// Whatever the code above it does, the database keeps stock within bounds (no
    /// negative units, no more reserved than on hand), prices not negative and
    /// reservations of known status and at least one unit. (On PostgreSQL the
    /// single-column rules are domains, on SQLite column checks; on both, stock is
    /// a check on the table.)
    fn values_out_of_bounds_are_refused(conn: &mut AnyConnection) {
        use crate::schema::products as p;
        let now = kernel::time::now();
        assert!(refused_by_a_check(&insert_product(conn, "NEGATIVE", -1, 3)));
        assert!(refused_by_a_check(&insert_product(conn, "NONE", 100, -1)));
        insert_product(conn, "A", 100, 3).unwrap();
        for (on_hand, reserved) in [(-1, 0), (3, -1), (3, 4)] {
            let stock = Stock { on_hand, reserved };
            let set = set_stock(conn, "product-A", stock, now);
            assert!(refused_by_a_check(&set), "{stock:?}: {set:?}");
        }
        let line = |quantity: i64, status: &str| ReservationRow {
            order_id: "order-1".into(),
            product_id: "product-A".into(),
            quantity,
            status: status.into(),
            created_at: now,
            updated_at: now,
        };
        let within = Stock {
            on_hand: 3,
            reserved: 1,
        };
        for refused in [line(0, "reserved"), line(1, "lost")] {
            // In a transaction, as a consumer's pass runs it (on SQLite it is two
            // statements).
            let reserved = kernel::db::write_tx(conn, |conn| reserve_line(conn, within, &refused));
            assert!(refused_by_a_check(&reserved), "{refused:?}: {reserved:?}");
        }
        let stocks: Vec<(i64, i64)> = p::table
            .select((p::on_hand, p::reserved))
            .load(conn)
            .unwrap();
        assert_eq!(stocks, [(3, 0)], "nothing of the refused writes");
        reserve_line(conn, within, &line(1, "reserved")).unwrap();
        assert_eq!(lock(conn, "product-A").unwrap().unwrap().stock(), within);
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
}
