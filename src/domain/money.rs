//! Money as integer cents. Prices arrive from buyers and config as JSON numbers or strings
//! ("12.5", "$12.50"); inside the exchange they are never floating point.

use std::fmt;
use std::ops::Add;

/// A non-negative amount of money in cents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Price(i64);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PriceError {
    #[error("not a number")]
    NotANumber,
    #[error("negative amount")]
    Negative,
    #[error("amount too large")]
    TooLarge,
}

/// Largest accepted price: ten million units. Anything above is a typo or an attack.
const MAX_CENTS: i64 = 1_000_000_000;

impl Price {
    pub const ZERO: Price = Price(0);

    pub const fn from_cents(cents: i64) -> Price {
        Price(cents)
    }

    pub const fn cents(self) -> i64 {
        self.0
    }

    pub fn is_zero(self) -> bool {
        self.0 == 0
    }

    /// Parses a decimal amount such as `12`, `12.5`, `12.505`, `$1,250.00`, rounding half up
    /// to the cent. Exponent notation (`1e3`) is accepted as JSON numbers may use it.
    pub fn parse_decimal(text: &str) -> Result<Price, PriceError> {
        let trimmed = text.trim();
        let trimmed = trimmed.strip_prefix('$').unwrap_or(trimmed).trim();
        let cleaned: String = trimmed.chars().filter(|c| *c != ',').collect();
        if cleaned.is_empty() {
            return Err(PriceError::NotANumber);
        }
        if let Some(rest) = cleaned.strip_prefix('-') {
            return match Price::parse_decimal(rest) {
                Ok(p) if p.is_zero() => Ok(Price::ZERO),
                Ok(_) => Err(PriceError::Negative),
                Err(e) => Err(e),
            };
        }
        if cleaned.contains(['e', 'E']) {
            let value: f64 = cleaned.parse().map_err(|_| PriceError::NotANumber)?;
            if !value.is_finite() {
                return Err(PriceError::NotANumber);
            }
            return Price::parse_decimal(&format!("{value}"));
        }
        let (whole, frac) = match cleaned.split_once('.') {
            Some((w, f)) => (w, f),
            None => (cleaned.as_str(), ""),
        };
        if whole.is_empty() && frac.is_empty() {
            return Err(PriceError::NotANumber);
        }
        if !whole.chars().all(|c| c.is_ascii_digit()) || !frac.chars().all(|c| c.is_ascii_digit()) {
            return Err(PriceError::NotANumber);
        }
        let whole = whole.trim_start_matches('0');
        if whole.len() > 12 {
            return Err(PriceError::TooLarge);
        }
        let units: i64 = if whole.is_empty() {
            0
        } else {
            whole.parse().map_err(|_| PriceError::TooLarge)?
        };
        let mut digits = frac.bytes().map(|b| i64::from(b - b'0'));
        let tens = digits.next().unwrap_or(0);
        let ones = digits.next().unwrap_or(0);
        let round_up = digits.next().is_some_and(|d| d >= 5);
        let cents = units
            .checked_mul(100)
            .and_then(|c| c.checked_add(tens * 10 + ones + i64::from(round_up)))
            .ok_or(PriceError::TooLarge)?;
        if cents > MAX_CENTS {
            return Err(PriceError::TooLarge);
        }
        Ok(Price(cents))
    }

    /// Converts a configuration or JSON float, rounding to the nearest cent.
    pub fn from_f64(value: f64) -> Result<Price, PriceError> {
        if !value.is_finite() {
            return Err(PriceError::NotANumber);
        }
        if value < 0.0 {
            return Err(PriceError::Negative);
        }
        // The shortest decimal text of the float is what the sender wrote (12.345, not
        // 12.3449999...), so rounding it as text avoids binary-fraction surprises.
        Price::parse_decimal(&format!("{value}"))
    }

    /// The amount as a float for places that need one (metrics); never used for arithmetic.
    pub fn as_f64(self) -> f64 {
        self.0 as f64 / 100.0
    }
}

impl Add for Price {
    type Output = Price;
    fn add(self, rhs: Price) -> Price {
        Price(self.0.saturating_add(rhs.0))
    }
}

impl std::iter::Sum for Price {
    fn sum<I: Iterator<Item = Price>>(iter: I) -> Price {
        iter.fold(Price::ZERO, Add::add)
    }
}

impl fmt::Display for Price {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{:02}", self.0 / 100, self.0 % 100)
    }
}

/// Config files and buyer replies write prices as numbers or numeric strings.
impl<'de> serde::Deserialize<'de> for Price {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Price, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Price;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a non-negative amount of money (number or numeric string)")
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Price, E> {
                Price::from_f64(v).map_err(E::custom)
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Price, E> {
                Price::parse_decimal(&v.to_string()).map_err(E::custom)
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Price, E> {
                Price::parse_decimal(&v.to_string()).map_err(E::custom)
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Price, E> {
                Price::parse_decimal(v).map_err(E::custom)
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_decimals_and_rounds_half_up() {
        let cases = [
            ("12", 1200),
            ("12.5", 1250),
            ("12.50", 1250),
            ("$12.50", 1250),
            ("1,250.00", 125000),
            ("0.005", 1),
            ("0.004", 0),
            (".5", 50),
            ("7.", 700),
            ("1e2", 10000),
            (" 3.99 ", 399),
        ];
        for (text, cents) in cases {
            assert_eq!(
                Price::parse_decimal(text),
                Ok(Price::from_cents(cents)),
                "{text}"
            );
        }
    }

    #[test]
    fn refuses_garbage() {
        for text in ["", "abc", "12a", "-3", "1.2.3", "$", ".", "NaN"] {
            assert!(Price::parse_decimal(text).is_err(), "{text}");
        }
        assert_eq!(Price::parse_decimal("-0"), Ok(Price::ZERO));
        assert_eq!(
            Price::parse_decimal("99999999999999"),
            Err(PriceError::TooLarge)
        );
    }

    #[test]
    fn displays_two_decimals() {
        assert_eq!(Price::from_cents(4500).to_string(), "45.00");
        assert_eq!(Price::from_cents(5).to_string(), "0.05");
        assert_eq!(Price::from_cents(1234).to_string(), "12.34");
    }

    #[test]
    fn floats_round_to_cents() {
        assert_eq!(Price::from_f64(12.345).unwrap().cents(), 1235);
        assert_eq!(Price::from_f64(0.1 + 0.2).unwrap().cents(), 30);
        assert!(Price::from_f64(-1.0).is_err());
        assert!(Price::from_f64(f64::NAN).is_err());
    }
}
