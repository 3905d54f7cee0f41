//! Turns order and shipment events into notifications: exactly one per kind per
//! order, sent on the configured channel.

use std::sync::Arc;

use contracts::checkout::{OrderCancelled, OrderConfirmed, OrderRejected};
use contracts::delivery::{ShipmentDelivered, ShipmentDispatched};
use diesel::prelude::*;
use kernel::bus::{EventHandler, HandlerError};
use kernel::{AnyConnection, Envelope};
use uuid::Uuid;

use crate::schema::notifications;
use crate::sender::{Message, SendError, Sender};

pub struct Notify {
    pub sender: Arc<dyn Sender>,
}

/// The notification an event calls for, if any.
fn message_for(event: &Envelope) -> Result<Option<Message>, HandlerError> {
    let (kind, order_id, customer_id, subject, body) = if let Some(e) =
        event.decode::<OrderConfirmed>()
    {
        let e = e?;
        let total = format!("{} {}", e.total.amount_minor, e.total.currency);
        (
            "order_confirmed",
            e.order_id,
            e.customer_id,
            "Your order is confirmed".to_string(),
            format!("We have your payment ({total} minor units) and are preparing the shipment."),
        )
    } else if let Some(e) = event.decode::<OrderRejected>() {
        let e = e?;
        (
            "order_rejected",
            e.order_id,
            e.customer_id,
            "Your order could not be completed".to_string(),
            format!(
                "Reason: {}. Nothing was charged that was not given back.",
                e.reason
            ),
        )
    } else if let Some(e) = event.decode::<OrderCancelled>() {
        let e = e?;
        (
            "order_cancelled",
            e.order_id,
            e.customer_id,
            "Your order is cancelled".to_string(),
            "Your payment has been refunded.".to_string(),
        )
    } else if let Some(e) = event.decode::<ShipmentDispatched>() {
        let e = e?;
        (
            "shipment_dispatched",
            e.order_id,
            e.customer_id,
            "Your order is on its way".to_string(),
            format!("Shipment {} has left the warehouse.", e.shipment_id),
        )
    } else if let Some(e) = event.decode::<ShipmentDelivered>() {
        let e = e?;
        (
            "shipment_delivered",
            e.order_id,
            e.customer_id,
            "Your order was delivered".to_string(),
            format!("Shipment {} was delivered.", e.shipment_id),
        )
    } else {
        return Ok(None);
    };
    // One id per (order, kind), so a redelivered event names the same notification.
    let id = Uuid::new_v5(&order_id, kind.as_bytes()).to_string();
    Ok(Some(Message {
        id,
        kind: kind.to_string(),
        customer_id,
        order_id: order_id.to_string(),
        subject,
        body,
    }))
}

impl EventHandler for Notify {
    fn handle(&self, conn: &mut AnyConnection, event: &Envelope) -> Result<(), HandlerError> {
        let Some(message) = message_for(event)? else {
            return Ok(());
        };
        // The record first: it is the check for one of this kind already (the id is
        // one per order and kind), and it holds that id until the commit. Should
        // the channel fail, the transaction and the record go back.
        let record = diesel::insert_into(notifications::table).values((
            notifications::id.eq(&message.id),
            notifications::customer_id.eq(&message.customer_id),
            notifications::order_id.eq(&message.order_id),
            notifications::kind.eq(&message.kind),
            notifications::channel.eq(self.sender.channel()),
            notifications::status.eq("sent"),
            notifications::created_at.eq(kernel::time::now()),
        ));
        let recorded = match conn {
            AnyConnection::Sqlite(c) => record.on_conflict_do_nothing().execute(c)?,
            AnyConnection::Postgresql(c) => record.on_conflict_do_nothing().execute(c)?,
        };
        if recorded == 0 {
            return Ok(());
        }
        self.sender.send(&message).map_err(|e| match e {
            SendError::Transient(m) => HandlerError::Retry(m),
            SendError::Refused(m) => HandlerError::Permanent(m),
        })?;
        Ok(())
    }
}
