//! Checkout's rules, free of I/O: the order's state machine and what a valid
//! placement is.

use contracts::checkout::Address;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Pending,
    Confirmed,
    Rejected,
    Cancelled,
    Fulfilled,
}

/// Where the money stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Payment {
    /// Placed; waiting for catalog to reserve the stock.
    AwaitingStock,
    /// Stock reserved: the charge is to be taken.
    ChargeDue,
    Charged,
    Declined,
    /// Cancelled before dispatch: the charge is to be refunded.
    RefundDue,
    Refunded,
    /// Nothing was ever charged (stock refused).
    None,
}

/// What checkout knows of the shipment, from delivery's events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shipment {
    None,
    Preparing,
    Dispatched,
    Delivered,
    Cancelled,
}

pub const OUT_OF_STOCK: &str = "out_of_stock";
pub const PAYMENT_DECLINED: &str = "payment_declined";
pub const CANCELLED_BY_CUSTOMER: &str = "cancelled_by_customer";

macro_rules! string_enum {
    ($t:ty { $($variant:ident => $text:literal),* $(,)? }) => {
        impl $t {
            pub fn as_str(self) -> &'static str {
                match self { $(Self::$variant => $text),* }
            }

            pub fn parse(raw: &str) -> Option<Self> {
                match raw { $($text => Some(Self::$variant),)* _ => None }
            }
        }
    };
}

string_enum!(Status { Pending => "pending", Confirmed => "confirmed", Rejected => "rejected", Cancelled => "cancelled", Fulfilled => "fulfilled" });
string_enum!(Payment { AwaitingStock => "awaiting_stock", ChargeDue => "charge_due", Charged => "charged", Declined => "declined", RefundDue => "refund_due", Refunded => "refunded", None => "none" });
string_enum!(Shipment { None => "none", Preparing => "preparing", Dispatched => "dispatched", Delivered => "delivered", Cancelled => "cancelled" });

/// The parts of an order the saga moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OrderState {
    pub status: Status,
    pub reason: Option<&'static str>,
    pub payment: Payment,
    pub shipment: Shipment,
    pub cancel_requested: bool,
}

/// What a customer's cancel request leads to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelDecision {
    /// Ask delivery (202); `true` when this request is the one that asks.
    Requested { first: bool },
    /// Already cancelled (200).
    AlreadyCancelled,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CancelRefusal {
    #[error("the shipment was already dispatched")]
    AlreadyDispatched,
    #[error("an order can be cancelled once confirmed and before dispatch; this one is {0}")]
    NotCancellable(&'static str),
}

impl OrderState {
    pub fn placed() -> Self {
        Self {
            status: Status::Pending,
            reason: None,
            payment: Payment::AwaitingStock,
            shipment: Shipment::None,
            cancel_requested: false,
        }
    }

    /// Catalog reserved the stock: take the payment. `None`: nothing to do (a
    /// redelivery, or an order no longer waiting).
    pub fn stock_reserved(self) -> Option<Self> {
        (self.status == Status::Pending && self.payment == Payment::AwaitingStock).then_some(Self {
            payment: Payment::ChargeDue,
            ..self
        })
    }

    /// Catalog could not reserve: the order is rejected, nothing was charged.
    pub fn stock_refused(self) -> Option<Self> {
        (self.status == Status::Pending && self.payment == Payment::AwaitingStock).then_some(Self {
            status: Status::Rejected,
            reason: Some(OUT_OF_STOCK),
            payment: Payment::None,
            ..self
        })
    }

    /// The gateway took the money.
    pub fn charged(self) -> Option<Self> {
        (self.status == Status::Pending && self.payment == Payment::ChargeDue).then_some(Self {
            status: Status::Confirmed,
            payment: Payment::Charged,
            ..self
        })
    }

    /// The gateway declined: rejected, and the reservation is to be released.
    pub fn declined(self) -> Option<Self> {
        (self.status == Status::Pending && self.payment == Payment::ChargeDue).then_some(Self {
            status: Status::Rejected,
            reason: Some(PAYMENT_DECLINED),
            payment: Payment::Declined,
            ..self
        })
    }

    pub fn request_cancel(self) -> Result<(Self, CancelDecision), CancelRefusal> {
        match self.status {
            Status::Cancelled => return Ok((self, CancelDecision::AlreadyCancelled)),
            Status::Fulfilled => return Err(CancelRefusal::AlreadyDispatched),
            Status::Pending => return Err(CancelRefusal::NotCancellable("pending")),
            Status::Rejected => return Err(CancelRefusal::NotCancellable("rejected")),
            Status::Confirmed => {}
        }
        if matches!(self.shipment, Shipment::Dispatched | Shipment::Delivered) {
            return Err(CancelRefusal::AlreadyDispatched);
        }
        if self.cancel_requested {
            return Ok((self, CancelDecision::Requested { first: false }));
        }
        Ok((
            Self {
                cancel_requested: true,
                ..self
            },
            CancelDecision::Requested { first: true },
        ))
    }

    pub fn shipment_created(self) -> Option<Self> {
        (self.shipment == Shipment::None).then_some(Self {
            shipment: Shipment::Preparing,
            ..self
        })
    }

    /// Dispatched: a pending cancellation will be refused by delivery.
    pub fn dispatched(self) -> Option<Self> {
        matches!(self.shipment, Shipment::None | Shipment::Preparing).then_some(Self {
            shipment: Shipment::Dispatched,
            ..self
        })
    }

    pub fn delivered(self) -> Option<Self> {
        (self.status == Status::Confirmed && self.shipment != Shipment::Delivered).then_some(Self {
            status: Status::Fulfilled,
            shipment: Shipment::Delivered,
            cancel_requested: false,
            ..self
        })
    }

    /// Delivery cancelled the shipment: refund, then the order is cancelled.
    pub fn shipment_cancelled(self) -> Option<Self> {
        let before_dispatch = matches!(self.shipment, Shipment::None | Shipment::Preparing);
        (self.status == Status::Confirmed && self.payment == Payment::Charged && before_dispatch)
            .then_some(Self {
                shipment: Shipment::Cancelled,
                payment: Payment::RefundDue,
                ..self
            })
    }

    pub fn refunded(self) -> Option<Self> {
        (self.status == Status::Confirmed && self.payment == Payment::RefundDue).then_some(Self {
            status: Status::Cancelled,
            reason: Some(CANCELLED_BY_CUSTOMER),
            payment: Payment::Refunded,
            cancel_requested: false,
            ..self
        })
    }

    pub fn cancellation_refused(self) -> Option<Self> {
        self.cancel_requested.then_some(Self {
            cancel_requested: false,
            ..self
        })
    }
}

/// A rule broken by the placement request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct Invalid {
    pub field: &'static str,
    pub message: String,
}

/// A shipping address with every field present and of sane length.
pub fn parse_address(raw: &Address) -> Result<Address, Invalid> {
    fn field(name: &'static str, value: &str, max: usize) -> Result<String, Invalid> {
        let v = value.trim();
        if v.is_empty() {
            return Err(Invalid {
                field: name,
                message: "must not be blank".into(),
            });
        }
        if v.chars().count() > max {
            return Err(Invalid {
                field: name,
                message: format!("must be at most {max} characters"),
            });
        }
        Ok(v.to_string())
    }
    let country = field("shipping_address.country", &raw.country, 2)?.to_ascii_uppercase();
    if country.len() != 2 || !country.chars().all(|c| c.is_ascii_alphabetic()) {
        return Err(Invalid {
            field: "shipping_address.country",
            message: "must be an ISO 3166-1 alpha-2 code, like DE".into(),
        });
    }
    Ok(Address {
        name: field("shipping_address.name", &raw.name, 200)?,
        line1: field("shipping_address.line1", &raw.line1, 200)?,
        city: field("shipping_address.city", &raw.city, 100)?,
        postal_code: field("shipping_address.postal_code", &raw.postal_code, 16)?,
        country,
    })
}

/// Idempotency keys: 1 to 255 visible ASCII characters.
pub fn parse_idempotency_key(raw: &str) -> Option<String> {
    let key = raw.trim();
    (!key.is_empty() && key.len() <= 255 && key.chars().all(|c| c.is_ascii_graphic()))
        .then(|| key.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn confirmed() -> OrderState {
        OrderState::placed()
            .stock_reserved()
            .and_then(OrderState::charged)
            .unwrap()
    }

    #[test]
    fn given_a_placed_order_when_stock_and_payment_succeed_then_confirmed() {
        let order = confirmed();
        assert_eq!(
            (order.status, order.payment),
            (Status::Confirmed, Payment::Charged)
        );
        assert_eq!(
            order.stock_reserved(),
            None,
            "a redelivered reservation changes nothing"
        );
    }

    #[test]
    fn given_a_placed_order_when_stock_is_refused_then_rejected_out_of_stock() {
        let order = OrderState::placed().stock_refused().unwrap();
        assert_eq!(
            (order.status, order.reason),
            (Status::Rejected, Some(OUT_OF_STOCK))
        );
        assert_eq!(order.stock_reserved(), None);
    }

    #[test]
    fn given_reserved_stock_when_payment_is_declined_then_rejected() {
        let order = OrderState::placed()
            .stock_reserved()
            .and_then(OrderState::declined)
            .unwrap();
        assert_eq!(
            (order.status, order.reason),
            (Status::Rejected, Some(PAYMENT_DECLINED))
        );
        assert_eq!(order.charged(), None);
    }

    #[test]
    fn given_a_confirmed_order_when_cancelled_before_dispatch_then_refunded_and_cancelled() {
        let (order, decision) = confirmed()
            .shipment_created()
            .unwrap()
            .request_cancel()
            .unwrap();
        assert_eq!(decision, CancelDecision::Requested { first: true });
        assert_eq!(
            order.request_cancel().unwrap().1,
            CancelDecision::Requested { first: false }
        );
        let order = order.shipment_cancelled().unwrap();
        assert_eq!(order.payment, Payment::RefundDue);
        let order = order.refunded().unwrap();
        assert_eq!(
            (order.status, order.reason),
            (Status::Cancelled, Some(CANCELLED_BY_CUSTOMER))
        );
        assert_eq!(
            order.request_cancel().unwrap().1,
            CancelDecision::AlreadyCancelled
        );
    }

    #[test]
    fn given_a_dispatched_shipment_then_cancel_is_refused_and_delivery_fulfils() {
        let order = confirmed()
            .shipment_created()
            .and_then(OrderState::dispatched)
            .unwrap();
        assert_eq!(
            order.request_cancel(),
            Err(CancelRefusal::AlreadyDispatched)
        );
        let order = order.delivered().unwrap();
        assert_eq!(order.status, Status::Fulfilled);
        assert_eq!(
            order.request_cancel(),
            Err(CancelRefusal::AlreadyDispatched)
        );
    }

    #[test]
    fn given_a_cancel_racing_dispatch_when_delivery_refuses_then_the_order_stays_confirmed() {
        let (order, _) = confirmed()
            .shipment_created()
            .unwrap()
            .request_cancel()
            .unwrap();
        let order = order.dispatched().unwrap().cancellation_refused().unwrap();
        assert_eq!(
            (order.status, order.cancel_requested),
            (Status::Confirmed, false)
        );
        assert_eq!(
            order.shipment_cancelled(),
            None,
            "a dispatched order is never cancelled"
        );
    }

    #[test]
    fn pending_and_rejected_orders_cannot_be_cancelled() {
        assert!(matches!(
            OrderState::placed().request_cancel(),
            Err(CancelRefusal::NotCancellable(_))
        ));
        let rejected = OrderState::placed().stock_refused().unwrap();
        assert!(matches!(
            rejected.request_cancel(),
            Err(CancelRefusal::NotCancellable(_))
        ));
    }

    #[test]
    fn addresses_and_keys_are_checked() {
        let good = Address {
            name: "Ada".into(),
            line1: "1 Main St".into(),
            city: "Berlin".into(),
            postal_code: "10115".into(),
            country: "de".into(),
        };
        assert_eq!(parse_address(&good).unwrap().country, "DE");
        let bad = Address {
            city: " ".into(),
            ..good.clone()
        };
        assert_eq!(
            parse_address(&bad).unwrap_err().field,
            "shipping_address.city"
        );
        let bad = Address {
            country: "Germany".into(),
            ..good
        };
        assert!(parse_address(&bad).is_err());
        assert!(parse_idempotency_key("").is_none());
        assert!(parse_idempotency_key("has space").is_none());
        assert_eq!(
            parse_idempotency_key("order-42").as_deref(),
            Some("order-42")
        );
    }
}
