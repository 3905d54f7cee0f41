//! Events published by the checkout module. All are keyed by order id.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::{Event, Money};

pub const EVENT_NAMES: &[&str] = &[
    OrderPlaced::NAME,
    OrderConfirmed::NAME,
    OrderRejected::NAME,
    CancellationRequested::NAME,
    OrderCancelled::NAME,
    OrderFulfilled::NAME,
];

/// Where an order goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Address {
    pub name: String,
    pub line1: String,
    pub city: String,
    pub postal_code: String,
    /// ISO 3166-1 alpha-2.
    pub country: String,
}

/// One line of an order, priced at placement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderLine {
    pub product_id: Uuid,
    pub name: String,
    pub quantity: i64,
    pub unit_price: Money,
}

/// A customer placed an order; stock is to be reserved for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderPlaced {
    pub order_id: Uuid,
    pub customer_id: String,
    pub lines: Vec<OrderLine>,
    pub total: Money,
    pub shipping_address: Address,
}

impl Event for OrderPlaced {
    const NAME: &'static str = "checkout.order_placed.v1";
}

/// Stock is reserved and payment taken: the order will be shipped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderConfirmed {
    pub order_id: Uuid,
    pub customer_id: String,
    pub lines: Vec<OrderLine>,
    pub total: Money,
    pub shipping_address: Address,
}

impl Event for OrderConfirmed {
    const NAME: &'static str = "checkout.order_confirmed.v1";
}

/// The order failed: `out_of_stock` or `payment_declined`. Any reservation is to be
/// released.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderRejected {
    pub order_id: Uuid,
    pub customer_id: String,
    pub reason: String,
}

impl Event for OrderRejected {
    const NAME: &'static str = "checkout.order_rejected.v1";
}

/// The customer asked to cancel a confirmed order; delivery decides whether it can.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CancellationRequested {
    pub order_id: Uuid,
    pub customer_id: String,
}

impl Event for CancellationRequested {
    const NAME: &'static str = "checkout.cancellation_requested.v1";
}

/// The order is cancelled and refunded; its reservation is to be released.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderCancelled {
    pub order_id: Uuid,
    pub customer_id: String,
    pub reason: String,
}

impl Event for OrderCancelled {
    const NAME: &'static str = "checkout.order_cancelled.v1";
}

/// The order was delivered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderFulfilled {
    pub order_id: Uuid,
    pub customer_id: String,
}

impl Event for OrderFulfilled {
    const NAME: &'static str = "checkout.order_fulfilled.v1";
}
