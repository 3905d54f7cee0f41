//! Catalog's side of the order saga: reserve stock when an order is placed (all
//! lines or none), release it when the order is rejected or cancelled, commit it
//! when the shipment leaves.

use std::collections::BTreeMap;

use contracts::catalog::{
    ReservedLine, StockChanged, StockCommitted, StockReleased, StockReservationRejected,
    StockReserved,
};
use contracts::checkout::{OrderCancelled, OrderPlaced, OrderRejected};
use contracts::delivery::ShipmentDispatched;
use kernel::bus::{EventHandler, HandlerError};
use kernel::outbox::Publisher;
use kernel::{AnyConnection, Envelope};
use uuid::Uuid;

use crate::MODULE;
use crate::domain::{self, Offer, ProductId, Stock};
use crate::store::{self, RESERVED, ReservationRow};

/// Checkout's order events.
pub struct CheckoutEvents;

/// Delivery's shipment events.
pub struct DeliveryEvents;

impl EventHandler for CheckoutEvents {
    fn handle(&self, conn: &mut AnyConnection, event: &Envelope) -> Result<(), HandlerError> {
        let publisher = Publisher::caused_by(MODULE, event);
        if let Some(placed) = event.decode::<OrderPlaced>() {
            return reserve_order(conn, &publisher, &placed?);
        }
        if let Some(rejected) = event.decode::<OrderRejected>() {
            return settle_order(conn, &publisher, rejected?.order_id, Settlement::Release);
        }
        if let Some(cancelled) = event.decode::<OrderCancelled>() {
            return settle_order(conn, &publisher, cancelled?.order_id, Settlement::Release);
        }
        Ok(())
    }
}

impl EventHandler for DeliveryEvents {
    fn handle(&self, conn: &mut AnyConnection, event: &Envelope) -> Result<(), HandlerError> {
        if let Some(dispatched) = event.decode::<ShipmentDispatched>() {
            let publisher = Publisher::caused_by(MODULE, event);
            return settle_order(conn, &publisher, dispatched?.order_id, Settlement::Commit);
        }
        Ok(())
    }
}

fn publish_stock(
    conn: &mut AnyConnection,
    publisher: &Publisher,
    id: &str,
    stock: Stock,
) -> Result<(), HandlerError> {
    let event = StockChanged {
        product_id: Uuid::parse_str(id).unwrap_or_default(),
        on_hand: stock.on_hand,
        reserved: stock.reserved,
        available: stock.available(),
    };
    publisher.publish(conn, id, &event)?;
    Ok(())
}

fn reserve_order(
    conn: &mut AnyConnection,
    publisher: &Publisher,
    order: &OrderPlaced,
) -> Result<(), HandlerError> {
    let order_id = order.order_id.to_string();
    // Sorted, so concurrent reservations lock products in the same order.
    let mut wanted: BTreeMap<Uuid, i64> = BTreeMap::new();
    for line in &order.lines {
        *wanted.entry(line.product_id).or_default() += line.quantity;
    }
    let reserved = StockReserved {
        order_id: order.order_id,
        lines: wanted
            .iter()
            .map(|(product_id, quantity)| ReservedLine {
                product_id: *product_id,
                quantity: *quantity,
            })
            .collect(),
    };
    let now = kernel::time::now();
    // The usual order, one product in stock, is one conditional statement; the
    // rest (several products, too few units, a redelivery) is read under lock
    // and decided by `domain::reserve`.
    if let [(product_id, quantity)] = wanted.iter().collect::<Vec<_>>()[..] {
        let product_id = product_id.to_string();
        if let Some(stock) =
            store::reserve_if_available(conn, &order_id, &product_id, *quantity, now)?
        {
            publish_stock(conn, publisher, &product_id, stock)?;
            publisher.publish(conn, &order_id, &reserved)?;
            tracing::info!(order.id = %order_id, "stock reserved");
            return Ok(());
        }
    }
    if store::decided(conn, &order_id)? {
        return Ok(());
    }
    let mut lines = Vec::with_capacity(wanted.len());
    for (product_id, quantity) in &wanted {
        let row = store::lock(conn, &product_id.to_string())?;
        let offer = row.map(|r| Offer {
            listed: r.listed,
            stock: r.stock(),
        });
        lines.push((ProductId(*product_id), *quantity, offer));
    }
    match domain::reserve(&lines) {
        Ok(planned) => {
            for ((id, stock), (_, quantity, _)) in planned.iter().zip(&lines) {
                let product_id = id.to_string();
                store::reserve_line(
                    conn,
                    *stock,
                    &ReservationRow {
                        order_id: order_id.clone(),
                        product_id: product_id.clone(),
                        quantity: *quantity,
                        status: RESERVED.into(),
                        created_at: now,
                        updated_at: now,
                    },
                )?;
                publish_stock(conn, publisher, &product_id, *stock)?;
            }
            publisher.publish(conn, &order_id, &reserved)?;
            tracing::info!(order.id = %order_id, "stock reserved");
        }
        Err(refusal) => {
            store::insert_refusal(conn, &order_id, refusal.reason, now)?;
            let rejected = StockReservationRejected {
                order_id: order.order_id,
                reason: refusal.reason.to_string(),
                product_ids: refusal.product_ids.iter().map(|p| p.0).collect(),
            };
            publisher.publish(conn, &order_id, &rejected)?;
            tracing::info!(order.id = %order_id, reason = refusal.reason, "stock reservation refused");
        }
    }
    Ok(())
}

#[derive(Clone, Copy)]
enum Settlement {
    Release,
    Commit,
}

/// Releases or commits whatever the order still holds; nothing when it holds nothing
/// (never reserved, or settled already).
fn settle_order(
    conn: &mut AnyConnection,
    publisher: &Publisher,
    order_id: Uuid,
    settlement: Settlement,
) -> Result<(), HandlerError> {
    let order = order_id.to_string();
    let held = store::reservations(conn, &order, RESERVED)?;
    if held.is_empty() {
        return Ok(());
    }
    let now = kernel::time::now();
    for line in &held {
        let Some(product) = store::lock(conn, &line.product_id)? else {
            return Err(HandlerError::Permanent(format!(
                "reservation of order {order} names unknown product {}",
                line.product_id
            )));
        };
        let (stock, status) = match settlement {
            Settlement::Release => (product.stock().release(line.quantity), "released"),
            Settlement::Commit => (product.stock().commit(line.quantity), "committed"),
        };
        store::set_stock(conn, &line.product_id, stock, now)?;
        store::set_reservation_status(conn, &order, &line.product_id, status, now)?;
        publish_stock(conn, publisher, &line.product_id, stock)?;
    }
    match settlement {
        Settlement::Release => publisher.publish(conn, &order, &StockReleased { order_id })?,
        Settlement::Commit => publisher.publish(conn, &order, &StockCommitted { order_id })?,
    };
    Ok(())
}
