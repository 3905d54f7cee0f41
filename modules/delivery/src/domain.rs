//! Delivery's rules: a shipment moves `preparing` → `dispatched` → `delivered`,
//! or is cancelled while still preparing. Delivery's state decides a race between
//! a cancellation and a dispatch.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Preparing,
    Dispatched,
    Delivered,
    Cancelled,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Preparing => "preparing",
            Self::Dispatched => "dispatched",
            Self::Delivered => "delivered",
            Self::Cancelled => "cancelled",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        [
            Self::Preparing,
            Self::Dispatched,
            Self::Delivered,
            Self::Cancelled,
        ]
        .into_iter()
        .find(|s| s.as_str() == raw)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a {from} shipment cannot become {to}")]
pub struct InvalidTransition {
    pub from: &'static str,
    pub to: &'static str,
}

fn step(from: Status, allowed: Status, to: Status) -> Result<Status, InvalidTransition> {
    if from == allowed {
        Ok(to)
    } else {
        Err(InvalidTransition {
            from: from.as_str(),
            to: to.as_str(),
        })
    }
}

pub fn dispatch(from: Status) -> Result<Status, InvalidTransition> {
    step(from, Status::Preparing, Status::Dispatched)
}

pub fn deliver(from: Status) -> Result<Status, InvalidTransition> {
    step(from, Status::Dispatched, Status::Delivered)
}

/// A customer's cancellation: granted only while the shipment is still preparing.
pub fn cancel(from: Status) -> Result<Status, InvalidTransition> {
    step(from, Status::Preparing, Status::Cancelled)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_a_preparing_shipment_then_it_is_dispatched_then_delivered() {
        let s = dispatch(Status::Preparing).unwrap();
        assert_eq!(deliver(s), Ok(Status::Delivered));
        assert!(
            deliver(Status::Preparing).is_err(),
            "no delivery before dispatch"
        );
    }

    #[test]
    fn given_a_dispatched_shipment_when_cancelling_then_refused() {
        assert!(cancel(Status::Dispatched).is_err());
        assert!(cancel(Status::Delivered).is_err());
        assert_eq!(cancel(Status::Preparing), Ok(Status::Cancelled));
    }

    #[test]
    fn given_a_cancelled_shipment_when_dispatching_then_refused() {
        assert_eq!(
            dispatch(Status::Cancelled),
            Err(InvalidTransition {
                from: "cancelled",
                to: "dispatched"
            })
        );
    }
}
