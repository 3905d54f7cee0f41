//! Moving a shipment along and publishing what happened; shared by the admin
//! routes, the simulated carrier and the event handlers.

use contracts::delivery::{
    CancellationRefused, ShipmentCancelled, ShipmentCreated, ShipmentDelivered, ShipmentDispatched,
};
use kernel::AnyConnection;
use kernel::outbox::Publisher;
use uuid::Uuid;

use crate::domain::{self, InvalidTransition, Status};
use crate::store::{self, ShipmentRow};

#[derive(Debug, thiserror::Error)]
pub enum ShippingError {
    #[error("no shipment {0}")]
    NotFound(String),
    #[error(transparent)]
    Transition(#[from] InvalidTransition),
    #[error(transparent)]
    Query(#[from] diesel::result::Error),
    #[error(transparent)]
    Db(#[from] kernel::db::DbError),
}

/// The transitions an operator (or the simulated carrier) may make.
#[derive(Debug, Clone, Copy)]
pub enum Move {
    Dispatch,
    Deliver,
}

fn ids(row: &ShipmentRow) -> (Uuid, Uuid) {
    (
        Uuid::parse_str(&row.id).unwrap_or_default(),
        Uuid::parse_str(&row.order_id).unwrap_or_default(),
    )
}

/// Dispatches or delivers shipment `id`, publishing the event, keyed by order.
pub fn advance(
    conn: &mut AnyConnection,
    publisher: &Publisher,
    id: &str,
    step: Move,
) -> Result<ShipmentRow, ShippingError> {
    let row = store::lock(conn, id)?.ok_or_else(|| ShippingError::NotFound(id.to_string()))?;
    let from = Status::parse(&row.status).unwrap_or(Status::Cancelled);
    let to = match step {
        Move::Dispatch => domain::dispatch(from)?,
        Move::Deliver => domain::deliver(from)?,
    };
    store::set_status(conn, id, to.as_str(), kernel::time::now())?;
    let (shipment_id, order_id) = ids(&row);
    let customer_id = row.customer_id.clone();
    match step {
        Move::Dispatch => publisher.publish(
            conn,
            &row.order_id,
            &ShipmentDispatched {
                shipment_id,
                order_id,
                customer_id,
            },
        )?,
        Move::Deliver => publisher.publish(
            conn,
            &row.order_id,
            &ShipmentDelivered {
                shipment_id,
                order_id,
                customer_id,
            },
        )?,
    };
    store::find(conn, id)?.ok_or_else(|| ShippingError::NotFound(id.to_string()))
}

/// Opens the shipment of a confirmed order (once).
pub fn open(
    conn: &mut AnyConnection,
    publisher: &Publisher,
    row: ShipmentRow,
) -> Result<(), ShippingError> {
    // One shipment per order: the insert is the check (a redelivered
    // confirmation finds the order's shipment there, and changes nothing).
    if !store::insert(conn, &row)? {
        return Ok(());
    }
    let (shipment_id, order_id) = ids(&row);
    publisher.publish(
        conn,
        &row.order_id,
        &ShipmentCreated {
            shipment_id,
            order_id,
            customer_id: row.customer_id.clone(),
        },
    )?;
    Ok(())
}

/// A customer's cancellation: delivery's state decides. A shipment still preparing
/// is cancelled; one already dispatched refuses, whatever the race.
pub fn cancel(
    conn: &mut AnyConnection,
    publisher: &Publisher,
    order_id: &str,
) -> Result<(), ShippingError> {
    let Some(found) = store::of_order(conn, order_id)? else {
        return Err(ShippingError::NotFound(format!("for order {order_id}")));
    };
    let row =
        store::lock(conn, &found.id)?.ok_or_else(|| ShippingError::NotFound(found.id.clone()))?;
    let from = Status::parse(&row.status).unwrap_or(Status::Cancelled);
    let (shipment_id, order) = ids(&row);
    let customer_id = row.customer_id.clone();
    match domain::cancel(from) {
        Ok(to) => {
            store::set_status(conn, &row.id, to.as_str(), kernel::time::now())?;
            publisher.publish(
                conn,
                order_id,
                &ShipmentCancelled {
                    shipment_id,
                    order_id: order,
                    customer_id,
                },
            )?;
        }
        Err(_) if from == Status::Cancelled => {}
        Err(_) => {
            publisher.publish(
                conn,
                order_id,
                &CancellationRefused {
                    shipment_id,
                    order_id: order,
                    customer_id,
                    reason: "already_dispatched".into(),
                },
            )?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use contracts::Event;
    use diesel::prelude::*;
    use kernel::db;
    use kernel::on_both_backends;
    use kernel::testing::TestDatabase;

    use super::*;
    use crate::schema::{shipment_events, shipments};

    fn shipment(id: Uuid, order_id: Uuid) -> ShipmentRow {
        let now = kernel::time::now();
        ShipmentRow {
            id: id.to_string(),
            order_id: order_id.to_string(),
            customer_id: "c-1".into(),
            status: Status::Preparing.as_str().into(),
            name: "Ada Lovelace".into(),
            line1: "12 Analytical Row".into(),
            city: "London".into(),
            postal_code: "N1 9GU".into(),
            country: "GB".into(),
            created_at: now,
            updated_at: now,
        }
    }

    fn migrated(test_db: &TestDatabase) -> db::DbPool {
        kernel::testing::migrated_pool(test_db, crate::MODULE, crate::SPEC.migrations)
    }

    /// The order's shipments, shipment events and published events.
    fn opened(conn: &mut AnyConnection) -> (Vec<String>, i64, Vec<String>) {
        let ids = shipments::table.select(shipments::id).load(conn).unwrap();
        let events = shipment_events::table.count().get_result(conn).unwrap();
        let published = kernel::outbox::read_after(conn, crate::MODULE, 0, 10)
            .unwrap()
            .into_iter()
            .map(|e| e.unwrap().name)
            .collect();
        (ids, events, published)
    }

    /// Given an order's confirmation handled once, when it comes again (a second
    /// event for the same order, with a shipment id of its own), then the order
    /// still has one shipment, one shipment event and one `shipment_created`.
    async fn a_second_confirmation_opens_no_second_shipment(test_db: TestDatabase) {
        let pool = migrated(&test_db);
        let mut conn = pool.get().unwrap();
        let publisher = Publisher::new(crate::MODULE, Uuid::now_v7(), None);
        let order_id = Uuid::now_v7();
        let first = Uuid::now_v7();

        for id in [first, Uuid::now_v7()] {
            db::write_tx(&mut conn, |c| open(c, &publisher, shipment(id, order_id))).unwrap();
        }

        assert_eq!(
            opened(&mut conn),
            (
                vec![first.to_string()],
                1,
                vec![ShipmentCreated::NAME.to_string()]
            )
        );
    }

    /// Given one confirmation's shipment inserted and not yet committed, when a
    /// second confirmation of the order is handled meanwhile, then it waits for the
    /// first (on PostgreSQL its insert waits on the order's unique key; SQLite
    /// serialises the two transactions) and, once the first commits, writes
    /// nothing and does not fail. (A read before the insert saw no shipment there,
    /// and its insert then failed on the key.)
    async fn racing_confirmations_open_one_shipment(test_db: TestDatabase) {
        let pool = migrated(&test_db);
        let publisher = Publisher::new(crate::MODULE, Uuid::now_v7(), None);
        let order_id = Uuid::now_v7();
        let first = Uuid::now_v7();

        let second = std::thread::scope(|scope| {
            let mut conn = pool.get().unwrap();
            let second = db::write_tx(&mut conn, |c| {
                open(c, &publisher, shipment(first, order_id))?;
                let second = scope.spawn(|| {
                    let mut conn = pool.get().unwrap();
                    db::write_tx(&mut conn, |c| {
                        open(c, &publisher, shipment(Uuid::now_v7(), order_id))
                    })
                });
                wait_for_a_waiter(c);
                Ok::<_, ShippingError>(second)
            })
            .unwrap();
            second.join().unwrap()
        });

        assert!(second.is_ok(), "the second confirmation failed: {second:?}");
        assert_eq!(
            opened(&mut pool.get().unwrap()),
            (
                vec![first.to_string()],
                1,
                vec![ShipmentCreated::NAME.to_string()]
            )
        );
    }

    /// On PostgreSQL, until another session of this database waits for a lock.
    /// (On SQLite the second transaction cannot begin before the first ends: a
    /// short pause lets it try.)
    fn wait_for_a_waiter(conn: &mut AnyConnection) {
        #[derive(QueryableByName)]
        struct Waiting {
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            n: i64,
        }
        if matches!(conn, AnyConnection::Sqlite(_)) {
            std::thread::sleep(std::time::Duration::from_millis(50));
            return;
        }
        for _ in 0..500 {
            let waiting: Waiting = diesel::sql_query(
                "SELECT count(*) AS n FROM pg_stat_activity \
                 WHERE datname = current_database() AND wait_event_type = 'Lock'",
            )
            .get_result(conn)
            .unwrap();
            if waiting.n > 0 {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        panic!("the second confirmation never waited for the first");
    }

    /// On PostgreSQL a shipment and its first event are one statement, which a
    /// session prepares once and runs again for the next shipment.
    #[test]
    fn opening_shipments_runs_one_prepared_statement() {
        let Some((_db, pool)) =
            kernel::testing::postgres_pool(crate::MODULE, crate::SPEC.migrations)
        else {
            return;
        };
        let mut conn = pool.get().unwrap();
        for _ in 0..2 {
            let row = shipment(Uuid::now_v7(), Uuid::now_v7());
            assert!(store::insert(&mut conn, &row).unwrap());
        }
        let (ids, events, _) = opened(&mut conn);
        assert_eq!((ids.len(), events), (2, 2));
        let opening = kernel::testing::prepared_statements(&mut conn, "WITH opened AS");
        assert_eq!(opening.len(), 1, "{opening:?}");
    }

    on_both_backends!(
        a_second_confirmation_opens_no_second_shipment,
        racing_confirmations_open_one_shipment
    );
}
