//! Cart rules, free of I/O: quantities, line totals, one currency per cart.

use contracts::Money;

/// Most units of one product a cart may hold.
pub const MAX_QUANTITY: i64 = 999;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CartRule {
    #[error("quantity must be between 0 and {MAX_QUANTITY}")]
    QuantityOutOfRange,
    #[error("this cart is in {cart}; a product priced in {product} cannot join it")]
    CurrencyMismatch { cart: String, product: String },
    #[error("the total overflows")]
    Overflow,
}

/// A requested quantity: 0 removes the line.
pub fn parse_quantity(raw: i64) -> Result<i64, CartRule> {
    if (0..=MAX_QUANTITY).contains(&raw) {
        Ok(raw)
    } else {
        Err(CartRule::QuantityOutOfRange)
    }
}

/// A line as priced now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PricedLine {
    pub quantity: i64,
    pub unit_price: Money,
}

impl PricedLine {
    pub fn total(&self) -> Result<Money, CartRule> {
        let amount = self
            .unit_price
            .amount_minor
            .checked_mul(self.quantity)
            .ok_or(CartRule::Overflow)?;
        Ok(Money::new(amount, self.unit_price.currency.clone()))
    }
}

/// The sum of the lines; `None` for an empty cart. Lines must share one currency.
pub fn total(lines: &[PricedLine]) -> Result<Option<Money>, CartRule> {
    let Some(first) = lines.first() else {
        return Ok(None);
    };
    let currency = &first.unit_price.currency;
    let mut sum: i64 = 0;
    for line in lines {
        if line.unit_price.currency != *currency {
            return Err(CartRule::CurrencyMismatch {
                cart: currency.clone(),
                product: line.unit_price.currency.clone(),
            });
        }
        sum = sum
            .checked_add(line.total()?.amount_minor)
            .ok_or(CartRule::Overflow)?;
    }
    Ok(Some(Money::new(sum, currency.clone())))
}

/// A product may join a cart only in the currency the cart already uses.
pub fn check_currency(cart_currency: Option<&str>, product_currency: &str) -> Result<(), CartRule> {
    match cart_currency {
        Some(cart) if cart != product_currency => Err(CartRule::CurrencyMismatch {
            cart: cart.to_string(),
            product: product_currency.to_string(),
        }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(quantity: i64, amount: i64, currency: &str) -> PricedLine {
        PricedLine {
            quantity,
            unit_price: Money::new(amount, currency),
        }
    }

    #[test]
    fn given_lines_in_one_currency_then_the_total_is_their_sum() {
        let lines = [line(2, 250, "EUR"), line(1, 1000, "EUR")];
        assert_eq!(total(&lines), Ok(Some(Money::new(1500, "EUR"))));
        assert_eq!(total(&[]), Ok(None));
    }

    #[test]
    fn given_a_euro_cart_when_a_dollar_product_joins_then_refused() {
        assert!(check_currency(Some("EUR"), "USD").is_err());
        assert!(check_currency(Some("EUR"), "EUR").is_ok());
        assert!(check_currency(None, "USD").is_ok());
        assert!(total(&[line(1, 1, "EUR"), line(1, 1, "USD")]).is_err());
    }

    #[test]
    fn given_absurd_quantities_then_refused_without_overflow() {
        assert_eq!(parse_quantity(-1), Err(CartRule::QuantityOutOfRange));
        assert_eq!(
            parse_quantity(MAX_QUANTITY + 1),
            Err(CartRule::QuantityOutOfRange)
        );
        assert_eq!(parse_quantity(0), Ok(0));
        assert_eq!(line(2, i64::MAX, "EUR").total(), Err(CartRule::Overflow));
    }
}
