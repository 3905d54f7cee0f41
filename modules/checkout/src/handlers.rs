//! Checkout's side of the saga: catalog's answer to a placement, and delivery's
//! news about the shipment.

use chrono::NaiveDateTime;
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
/// Returns the order as written and its new state.
///
/// `usual` is the state such an event almost always finds the order in: from
/// there the step is one conditional statement. Anywhere else, the order is read
/// under its lock and the transition decides.
fn advance(
    conn: &mut AnyConnection,
    event: &Envelope,
    order_id: Uuid,
    transition: impl Fn(OrderState) -> Option<OrderState>,
    usual: Option<OrderState>,
    payments: Option<&Handoff>,
) -> Result<Option<(store::OrderRow, OrderState)>, HandlerError> {
    let id = order_id.to_string();
    let now = kernel::time::now();
    if let Some((usual, next)) = usual.and_then(|usual| Some((usual, transition(usual)?))) {
        let lease = payments.and_then(|payments| payments.lease_until(now));
        let due = payments.map(|_| lease.unwrap_or(now));
        if let Some(order) = store::transition_if(conn, &id, usual, next, due, now)? {
            return Ok(Some((handed(payments, lease, order), next)));
        }
    }
    let Some(order) = store::lock(conn, &id)? else {
        return Err(HandlerError::Permanent(format!(
            "{} names unknown order {id}",
            event.name
        )));
    };
    let Some(next) = transition(order.state()) else {
        return Ok(None);
    };
    // Taken again: the lock may have waited.
    let now = kernel::time::now();
    let lease = payments.and_then(|payments| payments.lease_until(now));
    let due = match payments {
        Some(_) => Some(lease.unwrap_or(now)),
        None => order.payment_due_at,
    };
    store::save_state(conn, &id, next, due, now)?;
    Ok(Some((
        handed(payments, lease, order.with_state(next, due, now)),
        next,
    )))
}

/// `order` as written; when this process claimed its payment step (`lease`), the
/// worker is given it after the commit.
fn handed(
    payments: Option<&Handoff>,
    lease: Option<NaiveDateTime>,
    order: store::OrderRow,
) -> store::OrderRow {
    if let (Some(payments), Some(_)) = (payments, lease) {
        payments.hand_over(order.clone());
    }
    order
}

/// Where an order is once confirmed and before delivery's first news of it.
fn confirmed() -> Option<OrderState> {
    OrderState::placed()
        .stock_reserved()
        .and_then(OrderState::charged)
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
                Some(OrderState::placed()),
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
                Some(OrderState::placed()),
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
                confirmed(),
                None,
            )?;
        } else if let Some(dispatched) = event.decode::<ShipmentDispatched>() {
            advance(
                conn,
                event,
                dispatched?.order_id,
                OrderState::dispatched,
                confirmed().and_then(OrderState::shipment_created),
                None,
            )?;
        } else if let Some(delivered) = event.decode::<ShipmentDelivered>() {
            let delivered = delivered?;
            if let Some((order, _)) = advance(
                conn,
                event,
                delivered.order_id,
                OrderState::delivered,
                confirmed()
                    .and_then(OrderState::shipment_created)
                    .and_then(OrderState::dispatched),
                None,
            )? {
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
                None,
                Some(&self.payments),
            )?;
        } else if let Some(refused) = event.decode::<CancellationRefused>() {
            advance(
                conn,
                event,
                refused?.order_id,
                OrderState::cancellation_refused,
                None,
                None,
            )?;
        }
        Ok(())
    }
}
