//! Delivery reacts to checkout: a confirmed order gets a shipment; a requested
//! cancellation is granted or refused here.

use contracts::checkout::{CancellationRequested, OrderConfirmed};
use kernel::bus::{EventHandler, HandlerError};
use kernel::outbox::Publisher;
use kernel::{AnyConnection, Envelope};
use uuid::Uuid;

use crate::MODULE;
use crate::domain::Status;
use crate::shipping::{self, ShippingError};
use crate::store::ShipmentRow;

pub struct CheckoutEvents;

fn handler_error(e: ShippingError) -> HandlerError {
    match e {
        ShippingError::Query(e) => e.into(),
        ShippingError::Db(e) => HandlerError::Retry(e.to_string()),
        other => HandlerError::Permanent(other.to_string()),
    }
}

impl EventHandler for CheckoutEvents {
    fn handle(&self, conn: &mut AnyConnection, event: &Envelope) -> Result<(), HandlerError> {
        let publisher = Publisher::caused_by(MODULE, event);
        if let Some(confirmed) = event.decode::<OrderConfirmed>() {
            let order = confirmed?;
            let now = kernel::time::now();
            let address = order.shipping_address;
            let row = ShipmentRow {
                id: Uuid::now_v7().to_string(),
                order_id: order.order_id.to_string(),
                customer_id: order.customer_id,
                status: Status::Preparing.as_str().into(),
                name: address.name,
                line1: address.line1,
                city: address.city,
                postal_code: address.postal_code,
                country: address.country,
                created_at: now,
                updated_at: now,
            };
            return shipping::open(conn, &publisher, row).map_err(handler_error);
        }
        if let Some(requested) = event.decode::<CancellationRequested>() {
            let order_id = requested?.order_id.to_string();
            return shipping::cancel(conn, &publisher, &order_id).map_err(handler_error);
        }
        Ok(())
    }
}
