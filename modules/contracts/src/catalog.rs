//! Events published by the catalog module.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::{Event, Money};

/// The events about products themselves (not about orders' stock).
pub const PRODUCT_EVENTS: &[&str] = &[
    ProductListed::NAME,
    ProductDetailsChanged::NAME,
    PriceChanged::NAME,
    StockChanged::NAME,
    ProductDelisted::NAME,
];

pub const EVENT_NAMES: &[&str] = &[
    ProductListed::NAME,
    ProductDetailsChanged::NAME,
    PriceChanged::NAME,
    StockChanged::NAME,
    ProductDelisted::NAME,
    StockReserved::NAME,
    StockReservationRejected::NAME,
    StockReleased::NAME,
    StockCommitted::NAME,
];

/// A seller listed a new product.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProductListed {
    pub product_id: Uuid,
    pub seller_id: String,
    pub sku: String,
    pub name: String,
    pub description: Option<String>,
    pub price: Money,
    pub available: i64,
}

impl Event for ProductListed {
    const NAME: &'static str = "catalog.product_listed.v1";
}

/// A product's name or description changed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProductDetailsChanged {
    pub product_id: Uuid,
    pub name: String,
    pub description: Option<String>,
}

impl Event for ProductDetailsChanged {
    const NAME: &'static str = "catalog.product_details_changed.v1";
}

/// A product's price changed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PriceChanged {
    pub product_id: Uuid,
    pub old_price: Money,
    pub price: Money,
}

impl Event for PriceChanged {
    const NAME: &'static str = "catalog.price_changed.v1";
}

/// A product's stock changed (restocked, counted, reserved or released).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StockChanged {
    pub product_id: Uuid,
    pub on_hand: i64,
    pub reserved: i64,
    pub available: i64,
}

impl Event for StockChanged {
    const NAME: &'static str = "catalog.stock_changed.v1";
}

/// A product was withdrawn from sale; it can no longer be ordered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProductDelisted {
    pub product_id: Uuid,
}

impl Event for ProductDelisted {
    const NAME: &'static str = "catalog.product_delisted.v1";
}

/// A quantity of one product, held for or taken by an order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReservedLine {
    pub product_id: Uuid,
    pub quantity: i64,
}

/// Every line of an order is reserved (all or nothing). Keyed by order id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StockReserved {
    pub order_id: Uuid,
    pub lines: Vec<ReservedLine>,
}

impl Event for StockReserved {
    const NAME: &'static str = "catalog.stock_reserved.v1";
}

/// An order could not be reserved; nothing was held. `reason` is `out_of_stock`
/// (or `product_unavailable` for a delisted or unknown product). Keyed by order id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StockReservationRejected {
    pub order_id: Uuid,
    pub reason: String,
    pub product_ids: Vec<Uuid>,
}

impl Event for StockReservationRejected {
    const NAME: &'static str = "catalog.stock_reservation_rejected.v1";
}

/// An order's reservation was given back to available stock. Keyed by order id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StockReleased {
    pub order_id: Uuid,
}

impl Event for StockReleased {
    const NAME: &'static str = "catalog.stock_released.v1";
}

/// An order's reserved stock left the warehouse (on hand went down). Keyed by order id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StockCommitted {
    pub order_id: Uuid,
}

impl Event for StockCommitted {
    const NAME: &'static str = "catalog.stock_committed.v1";
}
