//! Events published by the delivery module. All are keyed by order id.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::Event;

pub const EVENT_NAMES: &[&str] = &[
    ShipmentCreated::NAME,
    ShipmentDispatched::NAME,
    ShipmentDelivered::NAME,
    ShipmentCancelled::NAME,
    CancellationRefused::NAME,
];

/// A shipment was opened for a confirmed order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShipmentCreated {
    pub shipment_id: Uuid,
    pub order_id: Uuid,
    pub customer_id: String,
}

impl Event for ShipmentCreated {
    const NAME: &'static str = "delivery.shipment_created.v1";
}

/// The shipment left: the order can no longer be cancelled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShipmentDispatched {
    pub shipment_id: Uuid,
    pub order_id: Uuid,
    pub customer_id: String,
}

impl Event for ShipmentDispatched {
    const NAME: &'static str = "delivery.shipment_dispatched.v1";
}

/// The shipment reached the customer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShipmentDelivered {
    pub shipment_id: Uuid,
    pub order_id: Uuid,
    pub customer_id: String,
}

impl Event for ShipmentDelivered {
    const NAME: &'static str = "delivery.shipment_delivered.v1";
}

/// The shipment was cancelled before dispatch, at the customer's request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShipmentCancelled {
    pub shipment_id: Uuid,
    pub order_id: Uuid,
    pub customer_id: String,
}

impl Event for ShipmentCancelled {
    const NAME: &'static str = "delivery.shipment_cancelled.v1";
}

/// A cancellation came too late: the shipment had already been dispatched.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CancellationRefused {
    pub shipment_id: Uuid,
    pub order_id: Uuid,
    pub customer_id: String,
    pub reason: String,
}

impl Event for CancellationRefused {
    const NAME: &'static str = "delivery.cancellation_refused.v1";
}
