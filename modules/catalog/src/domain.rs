//! Catalog rules, free of I/O: what a valid product, price and stock level are.

use contracts::Money;
use uuid::Uuid;

/// A rule broken by input, naming the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct Invalid {
    pub field: &'static str,
    pub message: String,
}

fn invalid(field: &'static str, message: impl Into<String>) -> Invalid {
    Invalid {
        field,
        message: message.into(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ProductId(pub Uuid);

impl ProductId {
    pub fn new() -> Self {
        Self(Uuid::now_v7())
    }
}

impl Default for ProductId {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Display for ProductId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// A stock-keeping unit: 1–64 letters, digits, `-`, `_` or `.`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sku(String);

impl Sku {
    pub fn parse(raw: &str) -> Result<Self, Invalid> {
        let s = raw.trim();
        if s.is_empty() || s.len() > 64 {
            return Err(invalid("sku", "must be 1 to 64 characters"));
        }
        if !s
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(invalid(
                "sku",
                "may hold only letters, digits, '-', '_' and '.'",
            ));
        }
        Ok(Self(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A product name: not blank, at most 200 characters.
pub fn parse_name(raw: &str) -> Result<String, Invalid> {
    let s = raw.trim();
    if s.is_empty() {
        return Err(invalid("name", "must not be blank"));
    }
    if s.chars().count() > 200 {
        return Err(invalid("name", "must be at most 200 characters"));
    }
    Ok(s.to_string())
}

/// An optional description: at most 5000 characters; blank means none.
pub fn parse_description(raw: Option<&str>) -> Result<Option<String>, Invalid> {
    match raw.map(str::trim) {
        None | Some("") => Ok(None),
        Some(s) if s.chars().count() > 5000 => {
            Err(invalid("description", "must be at most 5000 characters"))
        }
        Some(s) => Ok(Some(s.to_string())),
    }
}

/// A price: zero or more minor units of a currency written as three capitals.
pub fn parse_price(price: &Money) -> Result<Money, Invalid> {
    if price.amount_minor < 0 {
        return Err(invalid("price.amount_minor", "must not be negative"));
    }
    let c = &price.currency;
    if c.len() != 3 || !c.chars().all(|ch| ch.is_ascii_uppercase()) {
        return Err(invalid(
            "price.currency",
            "must be an ISO 4217 code of three capital letters, like EUR",
        ));
    }
    Ok(price.clone())
}

/// Units held and units promised to orders not yet shipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stock {
    pub on_hand: i64,
    pub reserved: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum StockError {
    #[error("stock must not be negative")]
    Negative,
    #[error("{reserved} units are reserved for orders; on hand cannot go below that")]
    BelowReserved { reserved: i64 },
}

impl Stock {
    pub fn new(on_hand: i64) -> Result<Self, StockError> {
        if on_hand < 0 {
            return Err(StockError::Negative);
        }
        Ok(Self {
            on_hand,
            reserved: 0,
        })
    }

    /// Units that can still be sold.
    pub fn available(&self) -> i64 {
        self.on_hand - self.reserved
    }

    /// A counted level: never below what orders already hold.
    pub fn with_on_hand(self, on_hand: i64) -> Result<Self, StockError> {
        if on_hand < 0 {
            return Err(StockError::Negative);
        }
        if on_hand < self.reserved {
            return Err(StockError::BelowReserved {
                reserved: self.reserved,
            });
        }
        Ok(Self { on_hand, ..self })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_reserved_units_when_counting_below_them_then_refused() {
        let stock = Stock {
            on_hand: 10,
            reserved: 4,
        };
        assert_eq!(
            stock.with_on_hand(3),
            Err(StockError::BelowReserved { reserved: 4 })
        );
        let counted = stock.with_on_hand(4).unwrap();
        assert_eq!(counted.available(), 0);
    }

    #[test]
    fn given_negative_input_then_refused() {
        assert_eq!(Stock::new(-1), Err(StockError::Negative));
        assert!(parse_price(&Money::new(-5, "EUR")).is_err());
        assert!(parse_price(&Money::new(5, "eur")).is_err());
        assert!(parse_price(&Money::new(0, "EUR")).is_ok());
    }

    #[test]
    fn skus_names_and_descriptions_are_checked_and_trimmed() {
        assert_eq!(Sku::parse("  TEA-01 ").unwrap().as_str(), "TEA-01");
        assert!(Sku::parse("has space").is_err());
        assert!(Sku::parse("").is_err());
        assert!(parse_name("   ").is_err());
        assert_eq!(parse_description(Some("  ")).unwrap(), None);
    }
}

/// Why an order's stock could not be reserved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// `out_of_stock` or `product_unavailable`.
    pub reason: &'static str,
    pub product_ids: Vec<ProductId>,
}

/// A product as reservation sees it: `None` when unknown to the catalog.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Offer {
    pub listed: bool,
    pub stock: Stock,
}

/// Decides an order's reservation, all lines or none: every product must be
/// listed with enough available units. Returns the new stock of each line.
pub fn reserve(
    lines: &[(ProductId, i64, Option<Offer>)],
) -> Result<Vec<(ProductId, Stock)>, Refusal> {
    let unavailable: Vec<ProductId> = lines
        .iter()
        .filter(|(_, _, offer)| !offer.is_some_and(|o| o.listed))
        .map(|(id, _, _)| *id)
        .collect();
    if !unavailable.is_empty() {
        return Err(Refusal {
            reason: "product_unavailable",
            product_ids: unavailable,
        });
    }
    let mut planned = Vec::with_capacity(lines.len());
    let mut short = Vec::new();
    for (id, quantity, offer) in lines {
        let Some(offer) = offer else { continue };
        if *quantity <= 0 || offer.stock.available() < *quantity {
            short.push(*id);
        } else {
            planned.push((
                *id,
                Stock {
                    on_hand: offer.stock.on_hand,
                    reserved: offer.stock.reserved + quantity,
                },
            ));
        }
    }
    if short.is_empty() {
        Ok(planned)
    } else {
        Err(Refusal {
            reason: "out_of_stock",
            product_ids: short,
        })
    }
}

impl Stock {
    /// Gives `quantity` reserved units back to available stock.
    pub fn release(self, quantity: i64) -> Self {
        Self {
            reserved: (self.reserved - quantity).max(0),
            ..self
        }
    }

    /// Reserved units leave the warehouse: on hand and reserved both go down.
    pub fn commit(self, quantity: i64) -> Self {
        let taken = quantity.min(self.reserved);
        Self {
            on_hand: self.on_hand - taken,
            reserved: self.reserved - taken,
        }
    }
}

#[cfg(test)]
mod reservation_tests {
    use super::*;

    fn offer(on_hand: i64, reserved: i64) -> Option<Offer> {
        Some(Offer {
            listed: true,
            stock: Stock { on_hand, reserved },
        })
    }

    #[test]
    fn given_enough_stock_for_every_line_when_reserving_then_all_are_held() {
        let (a, b) = (ProductId::new(), ProductId::new());
        let planned = reserve(&[(a, 2, offer(5, 1)), (b, 1, offer(1, 0))]).unwrap();
        assert_eq!(
            planned[0].1,
            Stock {
                on_hand: 5,
                reserved: 3
            }
        );
        assert_eq!(planned[1].1.available(), 0);
    }

    #[test]
    fn given_one_short_line_when_reserving_then_nothing_is_held() {
        let (a, b) = (ProductId::new(), ProductId::new());
        let refusal = reserve(&[(a, 2, offer(5, 0)), (b, 2, offer(3, 2))]).unwrap_err();
        assert_eq!(refusal.reason, "out_of_stock");
        assert_eq!(refusal.product_ids, vec![b]);
    }

    #[test]
    fn given_a_delisted_or_unknown_product_when_reserving_then_unavailable() {
        let (a, b) = (ProductId::new(), ProductId::new());
        let delisted = Some(Offer {
            listed: false,
            stock: Stock {
                on_hand: 9,
                reserved: 0,
            },
        });
        let refusal = reserve(&[(a, 1, delisted), (b, 1, None)]).unwrap_err();
        assert_eq!(
            (refusal.reason, refusal.product_ids.len()),
            ("product_unavailable", 2)
        );
    }

    #[test]
    fn given_reserved_units_when_released_or_committed_then_stock_balances() {
        let stock = Stock {
            on_hand: 10,
            reserved: 4,
        };
        assert_eq!(
            stock.release(3),
            Stock {
                on_hand: 10,
                reserved: 1
            }
        );
        assert_eq!(
            stock.commit(4),
            Stock {
                on_hand: 6,
                reserved: 0
            }
        );
        assert_eq!(stock.commit(4).available(), 6);
    }
}
