//! The cart's query port: what checkout asks the cart at placement.

use std::future::Future;
use std::pin::Pin;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::Money;

/// One line of a cart as it stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CartLine {
    pub product_id: Uuid,
    pub name: String,
    pub quantity: i64,
    pub unit_price: Money,
    pub line_total: Money,
    /// False when the product was delisted: such a cart cannot be ordered.
    pub available: bool,
}

/// A customer's cart at one moment; `total` is `None` for an empty cart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CartSnapshot {
    pub customer_id: String,
    pub lines: Vec<CartLine>,
    pub total: Option<Money>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PortError {
    /// The module that answers this port cannot be reached right now.
    #[error("{module} is unavailable: {detail}")]
    Unavailable { module: String, detail: String },
}

pub type PortFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, PortError>> + Send + 'a>>;

/// Who is asking, carried across a process boundary: the caller's bearer token
/// (the other side authorises it as it would the caller) and the trace to continue.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CallContext {
    pub bearer: Option<String>,
    pub traceparent: Option<String>,
}

/// Answers questions about carts, now. Bound to the cart module in-process, or to
/// an HTTP client when cart runs elsewhere.
pub trait CartQueries: Send + Sync {
    /// The customer's cart as it stands.
    fn snapshot<'a>(
        &'a self,
        customer_id: &'a str,
        call: &'a CallContext,
    ) -> PortFuture<'a, CartSnapshot>;
}
