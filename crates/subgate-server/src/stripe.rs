//! Reads a purchase from Stripe with the app's secret key and turns its history into
//! transactions: a subscription's paid invoices (one transaction each, in one chain named by
//! the subscription id), or a succeeded payment intent (a one-time purchase).

use chrono::{DateTime, TimeZone, Utc};
use serde_json::Value;
use std::time::Duration;
use subgate_core::currency::Rates;
use subgate_core::model::{App, Environment, Offer, Price, PurchaseType, Transaction};
use subgate_core::store::ChainRef;
use subgate_core::{ApiError, ErrorCode};
use uuid::Uuid;

/// Currencies Stripe counts in whole units (its "zero-decimal" list).
const ZERO_DECIMAL: &[&str] = &[
    "BIF", "CLP", "DJF", "GNF", "JPY", "KMF", "KRW", "MGA", "PYG", "RWF", "UGX", "VND", "VUV",
    "XAF", "XOF", "XPF",
];

pub const TOKEN_POINTER: &str = "stripe_token";

pub struct StripeClient {
    http: reqwest::Client,
    api_base: String,
    secret_key: String,
}

/// A Stripe purchase, ready to import.
pub struct Purchase {
    pub chain: ChainRef,
    pub transactions: Vec<Transaction>,
}

fn token_error(message: impl Into<String>) -> ApiError {
    ApiError::invalid(TOKEN_POINTER, message)
}

fn unavailable(message: impl std::fmt::Display) -> ApiError {
    tracing::warn!(error = %message, "Stripe unavailable");
    ApiError::with_message(
        ErrorCode::ServiceUnavailable,
        "Stripe could not be reached; try again.",
    )
}

fn time(v: &Value) -> Option<DateTime<Utc>> {
    v.as_i64().and_then(|s| Utc.timestamp_opt(s, 0).single())
}

fn text(v: &Value) -> Option<String> {
    v.as_str().map(str::to_string)
}

/// An expandable field: the id whether Stripe sent the id or the object.
fn id_of(v: &Value) -> Option<String> {
    text(v).or_else(|| text(&v["id"]))
}

impl StripeClient {
    pub fn new(api_base: &str, secret_key: &str) -> anyhow::Result<Self> {
        Ok(Self {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(15))
                .build()?,
            api_base: api_base.trim_end_matches('/').to_string(),
            secret_key: secret_key.to_string(),
        })
    }

    async fn get(&self, path: &str, query: &[(&str, &str)]) -> Result<Value, ApiError> {
        let response = self
            .http
            .get(format!("{}{path}", self.api_base))
            .basic_auth(&self.secret_key, Some(""))
            .query(query)
            .send()
            .await
            .map_err(unavailable)?;
        let status = response.status();
        let body: Value = response.json().await.map_err(unavailable)?;
        let message = body["error"]["message"]
            .as_str()
            .unwrap_or("no message")
            .to_string();
        match status.as_u16() {
            200..=299 => Ok(body),
            // Stripe answers 404 for an unknown id and for an id of another account alike.
            404 => Err(token_error(format!(
                "Stripe does not know this token with the app's key (unknown, or from another Stripe account): {message}"
            ))),
            401 | 403 => Err(ApiError::invalid(
                "non_field_errors",
                format!("Stripe refused the app's secret key: {message}"),
            )),
            400..=499 => Err(token_error(format!("Stripe refused the request: {message}"))),
            _ => Err(unavailable(format!("Stripe answered {status}: {message}"))),
        }
    }

    /// A charge, whether the invoice or intent carried it expanded or as an id.
    async fn charge(&self, v: &Value) -> Result<Option<Value>, ApiError> {
        if v.is_object() {
            return Ok(Some(v.clone()));
        }
        match v.as_str() {
            Some(id) => self.get(&format!("/v1/charges/{id}"), &[]).await.map(Some),
            None => Ok(None),
        }
    }

    pub async fn purchase(
        &self,
        app: &App,
        rates: &Rates,
        token: &str,
    ) -> Result<Purchase, ApiError> {
        if token.starts_with("sub_") {
            self.subscription(app, rates, token).await
        } else if token.starts_with("pi_") {
            self.payment_intent(app, rates, token).await
        } else {
            Err(token_error(
                "Must be a Stripe subscription (sub_...) or payment intent (pi_...) id.",
            ))
        }
    }

    async fn paid_invoices(&self, subscription: &str) -> Result<Vec<Value>, ApiError> {
        let mut invoices = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let mut query = vec![("subscription", subscription), ("limit", "100")];
            if let Some(last) = &after {
                query.push(("starting_after", last));
            }
            let page = self.get("/v1/invoices", &query).await?;
            let data = page["data"].as_array().cloned().unwrap_or_default();
            after = data.last().and_then(|i| text(&i["id"]));
            invoices.extend(
                data.into_iter()
                    .filter(|i| i["status"] == "paid" || i["paid"] == true),
            );
            if page["has_more"] != true || after.is_none() {
                break;
            }
        }
        invoices.sort_by_key(|i| i["created"].as_i64().unwrap_or(0));
        Ok(invoices)
    }

    async fn subscription(&self, app: &App, rates: &Rates, id: &str) -> Result<Purchase, ApiError> {
        let sub = self.get(&format!("/v1/subscriptions/{id}"), &[]).await?;
        let invoices = self.paid_invoices(id).await?;
        if invoices.is_empty() {
            return Err(token_error(format!(
                "Subscription {id} has no paid invoice yet."
            )));
        }
        let environment = environment(&sub);
        let item = &sub["items"]["data"][0];
        let started = time(&sub["start_date"]).or_else(|| time(&sub["created"]));
        let renews = sub["cancel_at_period_end"] != true
            && matches!(sub["status"].as_str(), Some("active" | "trialing"));
        let trial_end = time(&sub["trial_end"]);
        let ended = time(&sub["ended_at"]);
        let mut transactions = Vec::new();
        for (index, invoice) in invoices.iter().enumerate() {
            let line = &invoice["lines"]["data"][0];
            // The line's price (or its older form, the plan), else the subscription item's.
            let price = [&line["price"], &line["plan"], &item["price"], &item["plan"]]
                .into_iter()
                .find(|p| p.is_object())
                .unwrap_or(&Value::Null);
            let product = id_of(&price["product"]).ok_or_else(|| {
                token_error(format!("Invoice {} names no product.", invoice["id"]))
            })?;
            require_product(app, &product)?;
            let period_start =
                time(&line["period"]["start"]).or_else(|| time(&invoice["period_start"]));
            let period_end = time(&line["period"]["end"]).or_else(|| time(&invoice["period_end"]));
            let purchased_at = period_start
                .or_else(|| time(&invoice["created"]))
                .ok_or_else(|| token_error("An invoice has no date."))?;
            let last = index + 1 == invoices.len();
            let mut expires_at = period_end;
            if let (true, Some(ended)) = (last, ended) {
                expires_at = expires_at.map(|e| e.min(ended));
            }
            let amount = invoice["amount_paid"].as_i64().unwrap_or(0);
            let is_trial = amount == 0 && trial_end.zip(period_end).is_some_and(|(t, e)| t >= e);
            let charge = self.charge(&invoice["charge"]).await?;
            let invoice_id =
                text(&invoice["id"]).ok_or_else(|| token_error("An invoice has no id."))?;
            let mut t = base_transaction(
                rates,
                &invoice_id,
                id,
                &product,
                id_of(&price["id"]),
                environment,
                amount,
                invoice["currency"].as_str().unwrap_or("usd"),
                purchased_at,
            )?;
            t.purchase_type = PurchaseType::Subscription;
            t.originally_purchased_at = started;
            t.expires_at = expires_at;
            t.offer = is_trial.then(|| Offer {
                category: "introductory".into(),
                offer_type: "free_trial".into(),
                id: None,
            });
            t.renew_status = Some(if last { renews } else { true });
            if last && !renews {
                t.renew_status_changed_at = time(&sub["canceled_at"]);
            }
            apply_refund(&mut t, charge.as_ref());
            transactions.push(t);
        }
        Ok(Purchase {
            chain: chain_of(transactions.last(), id),
            transactions,
        })
    }

    async fn payment_intent(
        &self,
        app: &App,
        rates: &Rates,
        id: &str,
    ) -> Result<Purchase, ApiError> {
        let intent = self.get(&format!("/v1/payment_intents/{id}"), &[]).await?;
        if intent["status"] != "succeeded" {
            return Err(token_error(format!(
                "Payment intent {id} is `{}`, not a completed purchase.",
                intent["status"].as_str().unwrap_or("unknown")
            )));
        }
        let metadata = &intent["metadata"];
        let product = ["product_id", "vendor_product_id", "product"]
            .iter()
            .find_map(|k| text(&metadata[k]))
            .ok_or_else(|| {
                token_error(format!(
                    "Payment intent {id} names no product: set metadata.product_id to the Stripe product id."
                ))
            })?;
        require_product(app, &product)?;
        let amount = intent["amount_received"]
            .as_i64()
            .or_else(|| intent["amount"].as_i64())
            .unwrap_or(0);
        let purchased_at = time(&intent["created"]).unwrap_or_else(Utc::now);
        let mut t = base_transaction(
            rates,
            id,
            id,
            &product,
            text(&metadata["price_id"]),
            environment(&intent),
            amount,
            intent["currency"].as_str().unwrap_or("usd"),
            purchased_at,
        )?;
        t.originally_purchased_at = Some(purchased_at);
        let charge = match intent["latest_charge"].is_null() {
            false => self.charge(&intent["latest_charge"]).await?,
            true => intent["charges"]["data"][0]
                .as_object()
                .map(|c| Value::Object(c.clone())),
        };
        apply_refund(&mut t, charge.as_ref());
        Ok(Purchase {
            chain: chain_of(Some(&t), id),
            transactions: vec![t],
        })
    }
}

fn environment(object: &Value) -> Environment {
    if object["livemode"] == true {
        Environment::Production
    } else {
        Environment::Sandbox
    }
}

fn require_product(app: &App, product: &str) -> Result<(), ApiError> {
    match app.product("stripe", product) {
        Some(_) => Ok(()),
        None => Err(token_error(format!(
            "Stripe product {product} is not configured for this app (add it under store_product_ids.stripe)."
        ))),
    }
}

fn chain_of(last: Option<&Transaction>, original: &str) -> ChainRef {
    ChainRef {
        store: "stripe".into(),
        store_transaction_id: last
            .map_or_else(|| original.to_string(), |t| t.store_transaction_id.clone()),
        store_original_transaction_id: original.to_string(),
    }
}

fn apply_refund(t: &mut Transaction, charge: Option<&Value>) {
    let Some(charge) = charge else { return };
    let refunded =
        charge["refunded"] == true || charge["amount_refunded"].as_i64().unwrap_or(0) > 0;
    if refunded {
        let at = time(&charge["refunds"]["data"][0]["created"])
            .filter(|at| *at > t.purchased_at)
            .unwrap_or(t.purchased_at + chrono::Duration::seconds(1));
        t.refunded_at = Some(at);
        t.cancellation_reason = Some("refund".into());
    }
}

#[allow(clippy::too_many_arguments)]
fn base_transaction(
    rates: &Rates,
    transaction_id: &str,
    original_id: &str,
    product: &str,
    base_plan: Option<String>,
    environment: Environment,
    minor_units: i64,
    currency: &str,
    purchased_at: DateTime<Utc>,
) -> Result<Transaction, ApiError> {
    let currency = currency.to_ascii_uppercase();
    let per_unit: i64 = if ZERO_DECIMAL.contains(&currency.as_str()) {
        1_000_000
    } else {
        10_000
    };
    let value_micros = minor_units.saturating_mul(per_unit);
    let usd_micros = rates
        .to_usd_micros(&currency, value_micros)
        .ok_or_else(|| {
            token_error(format!(
            "No USD rate is known for `{currency}`; add one under [currency_rates] in the config."
        ))
        })?;
    Ok(Transaction {
        id: Uuid::new_v4(),
        profile_id: None,
        seq: 0,
        purchase_type: PurchaseType::OneTimePurchase,
        store: "stripe".into(),
        environment,
        store_product_id: product.to_string(),
        store_base_plan_id: base_plan,
        store_transaction_id: transaction_id.to_string(),
        store_original_transaction_id: original_id.to_string(),
        offer: None,
        is_family_shared: false,
        price: Price {
            country: String::new(),
            currency,
            value_micros,
            usd_micros,
        },
        purchased_at,
        originally_purchased_at: None,
        expires_at: None,
        refunded_at: None,
        cancellation_reason: None,
        variation_id: None,
        renew_status: None,
        renew_status_changed_at: None,
        billing_issue_detected_at: None,
        grace_period_expires_at: None,
        created_at: purchased_at,
        updated_at: purchased_at,
        expiry_handled: false,
    })
}
