//! Delivery tables and queries; functions take a connection so the caller owns
//! the transaction.

use chrono::NaiveDateTime;
use diesel::pg::Pg;
use diesel::prelude::*;
use diesel::query_builder::{AstPass, QueryFragment, QueryId};
use diesel::sql_types::{Text, Timestamp};
use kernel::AnyConnection;

use crate::schema::{shipment_events, shipments};

#[derive(Debug, Clone, Queryable, Selectable, Insertable)]
#[diesel(table_name = shipments)]
pub struct ShipmentRow {
    pub id: String,
    pub order_id: String,
    pub customer_id: String,
    pub status: String,
    pub name: String,
    pub line1: String,
    pub city: String,
    pub postal_code: String,
    pub country: String,
    pub created_at: NaiveDateTime,
    pub updated_at: NaiveDateTime,
}

/// Stores the shipment of an order that has none yet, with its first event;
/// returns false, writing nothing, when the order has one already. On PostgreSQL
/// both rows go in one statement.
pub fn insert(conn: &mut AnyConnection, row: &ShipmentRow) -> QueryResult<bool> {
    let inserted = match conn {
        AnyConnection::Postgresql(c) => return Ok(OpenPg(row).execute(c)? > 0),
        AnyConnection::Sqlite(c) => diesel::insert_into(shipments::table)
            .values(row)
            .on_conflict(shipments::order_id)
            .do_nothing()
            .execute(c)?,
    };
    if inserted == 0 {
        return Ok(false);
    }
    record_event(conn, &row.id, &row.status, row.created_at)?;
    Ok(true)
}

/// PostgreSQL: the shipment unless its order has one, and the first event of the
/// shipment inserted; written out so that it is prepared once per connection.
/// Affects one row (the event) or none.
struct OpenPg<'a>(&'a ShipmentRow);

impl QueryId for OpenPg<'_> {
    type QueryId = OpenPg<'static>;
    const HAS_STATIC_QUERY_ID: bool = true;
}

impl RunQueryDsl<diesel::PgConnection> for OpenPg<'_> {}

impl QueryFragment<Pg> for OpenPg<'_> {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        let row = self.0;
        out.push_sql(
            "WITH opened AS (INSERT INTO shipments (id, order_id, customer_id, status, name, \
             line1, city, postal_code, country, created_at, updated_at) VALUES (",
        );
        let texts = [
            &row.id,
            &row.order_id,
            &row.customer_id,
            &row.status,
            &row.name,
            &row.line1,
            &row.city,
            &row.postal_code,
            &row.country,
        ];
        for text in texts {
            out.push_bind_param::<Text, _>(text)?;
            out.push_sql(", ");
        }
        out.push_bind_param::<Timestamp, _>(&row.created_at)?;
        out.push_sql(", ");
        out.push_bind_param::<Timestamp, _>(&row.updated_at)?;
        out.push_sql(
            ") ON CONFLICT (order_id) DO NOTHING RETURNING id, status, created_at) \
             INSERT INTO shipment_events (shipment_id, status, at) \
             SELECT id, status, created_at FROM opened",
        );
        Ok(())
    }
}

pub fn record_event(
    conn: &mut AnyConnection,
    shipment_id: &str,
    status: &str,
    at: NaiveDateTime,
) -> QueryResult<()> {
    diesel::insert_into(shipment_events::table)
        .values((
            shipment_events::shipment_id.eq(shipment_id),
            shipment_events::status.eq(status),
            shipment_events::at.eq(at),
        ))
        .execute(conn)?;
    Ok(())
}

pub fn find(conn: &mut AnyConnection, id: &str) -> QueryResult<Option<ShipmentRow>> {
    shipments::table
        .find(id)
        .select(ShipmentRow::as_select())
        .get_result(conn)
        .optional()
}

pub fn of_order(conn: &mut AnyConnection, order_id: &str) -> QueryResult<Option<ShipmentRow>> {
    shipments::table
        .filter(shipments::order_id.eq(order_id))
        .select(ShipmentRow::as_select())
        .get_result(conn)
        .optional()
}

/// Reads a shipment for change inside a write transaction, holding its row lock
/// until the transaction ends. (SQLite's write transactions hold the whole
/// database from their first statement: a plain read is enough there.)
pub fn lock(conn: &mut AnyConnection, id: &str) -> QueryResult<Option<ShipmentRow>> {
    let query = shipments::table.find(id);
    match conn {
        AnyConnection::Sqlite(c) => query.select(ShipmentRow::as_select()).get_result(c),
        AnyConnection::Postgresql(c) => query
            .select(ShipmentRow::as_select())
            .for_update()
            .get_result(c),
    }
    .optional()
}

pub fn set_status(
    conn: &mut AnyConnection,
    id: &str,
    status: &str,
    now: NaiveDateTime,
) -> QueryResult<()> {
    diesel::update(shipments::table.find(id))
        .set((shipments::status.eq(status), shipments::updated_at.eq(now)))
        .execute(conn)?;
    record_event(conn, id, status, now)
}

/// Shipments, newest first, of one customer (or all for `None`), optionally of one order.
pub fn list(
    conn: &mut AnyConnection,
    customer_id: Option<&str>,
    order_id: Option<&str>,
) -> QueryResult<Vec<ShipmentRow>> {
    let mut query = shipments::table
        .order((shipments::created_at.desc(), shipments::id.desc()))
        .limit(100)
        .select(ShipmentRow::as_select())
        .into_boxed();
    if let Some(customer) = customer_id {
        query = query.filter(shipments::customer_id.eq(customer.to_string()));
    }
    if let Some(order) = order_id {
        query = query.filter(shipments::order_id.eq(order.to_string()));
    }
    query.load(conn)
}

pub fn events(
    conn: &mut AnyConnection,
    shipment_id: &str,
) -> QueryResult<Vec<(String, NaiveDateTime)>> {
    shipment_events::table
        .filter(shipment_events::shipment_id.eq(shipment_id))
        .order(shipment_events::at.asc())
        .select((shipment_events::status, shipment_events::at))
        .load(conn)
}

/// Shipments in `status` not changed since `before`, oldest first.
pub fn idle_since(
    conn: &mut AnyConnection,
    status: &str,
    before: NaiveDateTime,
) -> QueryResult<Vec<String>> {
    shipments::table
        .filter(shipments::status.eq(status))
        .filter(shipments::updated_at.le(before))
        .order(shipments::updated_at.asc())
        .limit(100)
        .select(shipments::id)
        .load(conn)
}

#[cfg(test)]
mod tests {
    use kernel::testing::{postgres_pool, refused_by_a_check, sqlite_pool};

    use super::*;

    fn shipment(order_id: &str, status: &str) -> ShipmentRow {
        let now = kernel::time::now();
        ShipmentRow {
            id: format!("shipment-of-{order_id}"),
            order_id: order_id.into(),
            customer_id: "customer-1".into(),
            status: status.into(),
            name: "Ada".into(),
            line1: "1 Main St".into(),
            city: "Lyon".into(),
            postal_code: "69001".into(),
            country: "FR".into(),
            created_at: now,
            updated_at: now,
        }
    }

    /// Whatever the code above it does, the database holds no shipment in a status
    /// it does not know. (On PostgreSQL a domain, on SQLite a column check.)
    fn an_unknown_status_is_refused(conn: &mut AnyConnection) {
        let refused = kernel::db::write_tx(conn, |conn| insert(conn, &shipment("order-1", "lost")));
        assert!(refused_by_a_check(&refused), "{refused:?}");
        let count = |conn: &mut AnyConnection| -> (i64, i64) {
            (
                shipments::table.count().get_result(conn).unwrap(),
                shipment_events::table.count().get_result(conn).unwrap(),
            )
        };
        assert_eq!(count(conn), (0, 0));
        assert!(insert(conn, &shipment("order-1", "preparing")).unwrap());
        assert_eq!(count(conn), (1, 1));
        let refused = set_status(conn, "shipment-of-order-1", "lost", kernel::time::now());
        assert!(refused_by_a_check(&refused), "{refused:?}");
        assert_eq!(
            find(conn, "shipment-of-order-1").unwrap().unwrap().status,
            "preparing"
        );
    }

    #[test]
    fn an_unknown_status_is_refused_on_sqlite() {
        let (_db, pool) = sqlite_pool(crate::MODULE, crate::SPEC.migrations);
        an_unknown_status_is_refused(&mut pool.get().unwrap());
    }

    #[test]
    fn an_unknown_status_is_refused_on_postgres() {
        let Some((_db, pool)) = postgres_pool(crate::MODULE, crate::SPEC.migrations) else {
            return;
        };
        an_unknown_status_is_refused(&mut pool.get().unwrap());
    }
}
