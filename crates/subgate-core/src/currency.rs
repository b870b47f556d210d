//! Converting prices to US dollars with a rates table that ships with the server; the
//! configuration can add or override rates.

use std::collections::HashMap;

/// Units of each currency per US dollar (approximate mid-market rates, late 2025).
const DEFAULT_RATES: &[(&str, f64)] = &[
    ("USD", 1.0),
    ("EUR", 0.86),
    ("GBP", 0.76),
    ("JPY", 155.0),
    ("CNY", 7.1),
    ("INR", 88.5),
    ("CAD", 1.40),
    ("AUD", 1.53),
    ("NZD", 1.76),
    ("CHF", 0.80),
    ("SEK", 9.45),
    ("NOK", 10.1),
    ("DKK", 6.45),
    ("PLN", 3.65),
    ("CZK", 20.9),
    ("HUF", 332.0),
    ("RON", 4.38),
    ("BGN", 1.68),
    ("TRY", 42.3),
    ("RUB", 80.0),
    ("UAH", 41.9),
    ("ILS", 3.25),
    ("AED", 3.6725),
    ("SAR", 3.75),
    ("QAR", 3.64),
    ("EGP", 47.3),
    ("ZAR", 17.2),
    ("NGN", 1450.0),
    ("KES", 129.0),
    ("BRL", 5.35),
    ("MXN", 18.4),
    ("ARS", 1450.0),
    ("CLP", 940.0),
    ("COP", 3800.0),
    ("PEN", 3.38),
    ("KRW", 1460.0),
    ("TWD", 31.0),
    ("HKD", 7.78),
    ("SGD", 1.30),
    ("MYR", 4.15),
    ("THB", 32.4),
    ("IDR", 16700.0),
    ("PHP", 59.0),
    ("VND", 26300.0),
    ("PKR", 281.0),
    ("KZT", 520.0),
];

#[derive(Debug, Clone)]
pub struct Rates {
    per_usd: HashMap<String, f64>,
}

impl Default for Rates {
    fn default() -> Self {
        Self {
            per_usd: DEFAULT_RATES
                .iter()
                .map(|(code, rate)| (code.to_string(), *rate))
                .collect(),
        }
    }
}

impl Rates {
    /// The shipped table with `overrides` (currency code to units per dollar) applied.
    pub fn with_overrides<'a>(overrides: impl IntoIterator<Item = (&'a String, &'a f64)>) -> Self {
        let mut rates = Self::default();
        for (code, rate) in overrides {
            rates.per_usd.insert(code.to_ascii_uppercase(), *rate);
        }
        rates
    }

    pub fn knows(&self, currency: &str) -> bool {
        self.per_usd.contains_key(currency)
    }

    /// Converts millionths of `currency` to millionths of a dollar, or `None` for an unknown
    /// currency.
    pub fn to_usd_micros(&self, currency: &str, micros: i64) -> Option<i64> {
        let rate = *self.per_usd.get(currency)?;
        Some((micros as f64 / rate).round() as i64)
    }
}

/// Millionths of a unit from a decimal amount, rounded to the nearest.
pub fn to_micros(amount: f64) -> i64 {
    (amount * 1_000_000.0).round() as i64
}

pub fn from_micros(micros: i64) -> f64 {
    micros as f64 / 1_000_000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usd_is_identity_and_sums_are_exact() {
        let rates = Rates::default();
        let one = rates.to_usd_micros("USD", to_micros(9.99)).unwrap();
        assert_eq!(one, 9_990_000);
        assert_eq!(from_micros(one * 50), 499.5);
        assert!(rates.to_usd_micros("XXX", 1).is_none());
    }

    #[test]
    fn overrides_win() {
        let overrides = HashMap::from([("eur".to_string(), 0.5)]);
        let rates = Rates::with_overrides(&overrides);
        assert_eq!(rates.to_usd_micros("EUR", 1_000_000), Some(2_000_000));
    }
}
