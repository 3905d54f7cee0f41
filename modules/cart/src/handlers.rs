//! Cart's read model of the catalog, kept from catalog events.

use contracts::catalog::{PriceChanged, ProductDelisted, ProductDetailsChanged, ProductListed};
use contracts::checkout::OrderConfirmed;
use kernel::bus::{EventHandler, HandlerError};
use kernel::{AnyConnection, Envelope};

use crate::store::{self, ProductChanges, ProductRow};

/// Applies catalog events to `cart_products`.
pub struct CatalogEvents;

fn changed(
    conn: &mut AnyConnection,
    product_id: uuid::Uuid,
    changes: ProductChanges,
) -> Result<(), HandlerError> {
    let changes = ProductChanges {
        updated_at: Some(kernel::time::now()),
        ..changes
    };
    if store::change_product(conn, &product_id.to_string(), &changes)? {
        Ok(())
    } else {
        // Events of one product arrive in order, so its listing came first.
        Err(HandlerError::Permanent(format!(
            "product {product_id} changed but was never listed"
        )))
    }
}

impl EventHandler for CatalogEvents {
    fn handle(&self, conn: &mut AnyConnection, event: &Envelope) -> Result<(), HandlerError> {
        if let Some(listed) = event.decode::<ProductListed>() {
            let e = listed?;
            return Ok(store::upsert_product(
                conn,
                &ProductRow {
                    product_id: e.product_id.to_string(),
                    name: e.name,
                    price_minor: e.price.amount_minor,
                    currency: e.price.currency,
                    listed: true,
                    updated_at: kernel::time::now(),
                },
            )?);
        }
        if let Some(details) = event.decode::<ProductDetailsChanged>() {
            let e = details?;
            let changes = ProductChanges {
                name: Some(e.name),
                ..Default::default()
            };
            return changed(conn, e.product_id, changes);
        }
        if let Some(price) = event.decode::<PriceChanged>() {
            let e = price?;
            let changes = ProductChanges {
                price_minor: Some(e.price.amount_minor),
                currency: Some(e.price.currency),
                ..Default::default()
            };
            return changed(conn, e.product_id, changes);
        }
        if let Some(delisted) = event.decode::<ProductDelisted>() {
            let e = delisted?;
            let changes = ProductChanges {
                listed: Some(false),
                ..Default::default()
            };
            return changed(conn, e.product_id, changes);
        }
        // Events cart has no use for (or newer versions it does not know yet).
        Ok(())
    }
}

/// Checkout's order events: a confirmed order takes its products out of the cart.
pub struct CheckoutEvents;

impl EventHandler for CheckoutEvents {
    fn handle(&self, conn: &mut AnyConnection, event: &Envelope) -> Result<(), HandlerError> {
        if let Some(confirmed) = event.decode::<OrderConfirmed>() {
            let order = confirmed?;
            for line in &order.lines {
                store::remove_line(conn, &order.customer_id, &line.product_id.to_string())?;
            }
        }
        Ok(())
    }
}
