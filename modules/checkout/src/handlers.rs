//! Checkout's side of the saga: catalog's answer to a placement, and delivery's
//! news about the shipment.

use contracts::catalog::{StockReservationRejected, StockReserved};
use contracts::checkout::{OrderFulfilled, OrderRejected};
use contracts::delivery::{
    CancellationRefused, ShipmentCancelled, ShipmentCreated, ShipmentDelivered, ShipmentDispatched,
};
use kernel::bus::{EventHandler, HandlerError};
use kernel::outbox::Publisher;
use kernel::{AnyConnection, Envelope};
use uuid::Uuid;

use crate::MODULE;
use crate::domain::OrderState;
use crate::payment::Handoff;
use crate::store;

/// Catalog's reservation outcomes.
pub struct CatalogEvents {
    pub payments: Handoff,
}

/// Delivery's shipment events.
pub struct DeliveryEvents {
    pub payments: Handoff,
}

/// Applies `transition` to the order; a transition that does not apply (a
/// redelivery, a step already taken) changes nothing. With `payments`, the
/// transition makes a payment step due, which this process claims and takes.
fn advance(
    conn: &mut AnyConnection,
    event: &Envelope,
    order_id: Uuid,
    transition: impl FnOnce(OrderState) -> Option<OrderState>,
    payments: Option<&Handoff>,
) -> Result<Option<(store::OrderRow, OrderState)>, HandlerError> {
    let id = order_id.to_string();
    let Some(order) = store::lock(conn, &id)? else {
        return Err(HandlerError::Permanent(format!(
            "{} names unknown order {id}",
            event.name
        )));
    };
    let Some(next) = transition(order.state()) else {
        return Ok(None);
    };
    let now = kernel::time::now();
    let due = match payments {
        Some(payments) => Some(payments.claim(order.clone().with_state(next, None, now), now)),
        None => order.payment_due_at,
    };
    store::save_state(conn, &id, next, due, now)?;
    Ok(Some((order, next)))
}

impl EventHandler for CatalogEvents {
    fn handle(&self, conn: &mut AnyConnection, event: &Envelope) -> Result<(), HandlerError> {
        if let Some(reserved) = event.decode::<StockReserved>() {
            // The payment worker takes the charge from here, outside this transaction.
            advance(
                conn,
                event,
                reserved?.order_id,
                OrderState::stock_reserved,
                Some(&self.payments),
            )?;
            return Ok(());
        }
        if let Some(refused) = event.decode::<StockReservationRejected>() {
            let refused = refused?;
            if let Some((order, next)) = advance(
                conn,
                event,
                refused.order_id,
                OrderState::stock_refused,
                None,
            )? {
                let rejected = OrderRejected {
                    order_id: refused.order_id,
                    customer_id: order.customer_id.clone(),
                    reason: next
                        .reason
                        .unwrap_or(crate::domain::OUT_OF_STOCK)
                        .to_string(),
                };
                Publisher::caused_by(MODULE, event).publish(conn, &order.id, &rejected)?;
            }
        }
        Ok(())
    }
}

impl EventHandler for DeliveryEvents {
    fn handle(&self, conn: &mut AnyConnection, event: &Envelope) -> Result<(), HandlerError> {
        if let Some(created) = event.decode::<ShipmentCreated>() {
            advance(
                conn,
                event,
                created?.order_id,
                OrderState::shipment_created,
                None,
            )?;
        } else if let Some(dispatched) = event.decode::<ShipmentDispatched>() {
            advance(
                conn,
                event,
                dispatched?.order_id,
                OrderState::dispatched,
                None,
            )?;
        } else if let Some(delivered) = event.decode::<ShipmentDelivered>() {
            let delivered = delivered?;
            if let Some((order, _)) =
                advance(conn, event, delivered.order_id, OrderState::delivered, None)?
            {
                let fulfilled = OrderFulfilled {
                    order_id: delivered.order_id,
                    customer_id: order.customer_id.clone(),
                };
                Publisher::caused_by(MODULE, event).publish(conn, &order.id, &fulfilled)?;
            }
        } else if let Some(cancelled) = event.decode::<ShipmentCancelled>() {
            // The refund is the payment worker's next step.
            advance(
                conn,
                event,
                cancelled?.order_id,
                OrderState::shipment_cancelled,
                Some(&self.payments),
            )?;
        } else if let Some(refused) = event.decode::<CancellationRefused>() {
            advance(
                conn,
                event,
                refused?.order_id,
                OrderState::cancellation_refused,
                None,
            )?;
        }
        Ok(())
    }
}
