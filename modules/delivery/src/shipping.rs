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
    if store::of_order(conn, &row.order_id)?.is_some() {
        return Ok(());
    }
    store::insert(conn, &row)?;
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
