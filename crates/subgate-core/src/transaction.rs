//! Set-transaction's documented validation rules, each with its `error_code` and `source`.

use crate::currency::{self, Rates};
use crate::error::{ApiError, ErrorCode};
use crate::model::{App, Environment, Offer, Price, PurchaseType};
use chrono::{DateTime, Utc};

pub const CANCELLATION_REASONS: &[&str] = &[
    "voluntarily_cancelled",
    "billing_error",
    "price_increase",
    "product_was_not_available",
    "refund",
    "cancelled_by_developer",
    "new_subscription_replace",
    "upgraded",
    "unknown",
    "adapty_revoked",
];
pub const OFFER_CATEGORIES: &[&str] = &["introductory", "promotional", "offer_code", "win_back"];
pub const OFFER_TYPES: &[&str] = &["free_trial", "pay_as_you_go", "pay_up_front"];
pub const MAX_TRANSACTION_ID_CHARS: usize = 50;

/// An offer's `id` key: left out, sent as null, or given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OfferIdInput {
    Absent,
    Null,
    Value(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OfferInput {
    pub category: String,
    pub offer_type: String,
    pub id: OfferIdInput,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PriceInput {
    pub country: String,
    pub currency: String,
    pub value: f64,
}

/// A transaction as a client described it, fields already of the right types.
#[derive(Debug, Clone, PartialEq)]
pub struct TransactionInput {
    pub purchase_type: PurchaseType,
    pub store: String,
    pub environment: Environment,
    pub store_product_id: String,
    pub store_base_plan_id: Option<String>,
    pub store_transaction_id: String,
    pub store_original_transaction_id: String,
    pub offer: Option<OfferInput>,
    pub is_family_shared: bool,
    pub price: PriceInput,
    pub purchased_at: DateTime<Utc>,
    pub originally_purchased_at: Option<DateTime<Utc>>,
    pub expires_at: Option<DateTime<Utc>>,
    pub refunded_at: Option<DateTime<Utc>>,
    pub cancellation_reason: Option<String>,
    pub variation_id: Option<String>,
    pub renew_status: Option<bool>,
    pub renew_status_changed_at: Option<DateTime<Utc>>,
    pub billing_issue_detected_at: Option<DateTime<Utc>>,
    pub grace_period_expires_at: Option<DateTime<Utc>>,
}

/// The result of validation: what is recorded.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidTransaction {
    pub input: TransactionInput,
    pub offer: Option<Offer>,
    pub price: Price,
}

/// Applies every documented rule; the first broken one is reported.
pub fn validate(
    input: TransactionInput,
    app: &App,
    rates: &Rates,
) -> Result<ValidTransaction, ApiError> {
    if !app.knows_store(&input.store) {
        return Err(ApiError::invalid(
            "store",
            format!(
                "Unknown store `{}`: use app_store, play_store, stripe, paddle, adapty or a custom store configured for the app.",
                input.store
            ),
        ));
    }
    for (field, id) in [
        ("store_transaction_id", &input.store_transaction_id),
        (
            "store_original_transaction_id",
            &input.store_original_transaction_id,
        ),
    ] {
        if id.is_empty() || id.chars().count() > MAX_TRANSACTION_ID_CHARS {
            return Err(ApiError::invalid(
                field,
                format!("Must be 1 to {MAX_TRANSACTION_ID_CHARS} characters long."),
            ));
        }
    }
    if input.store_product_id.is_empty() {
        return Err(ApiError::invalid(
            "store_product_id",
            "This field may not be blank.",
        ));
    }
    if let Some(reason) = &input.cancellation_reason {
        if !CANCELLATION_REASONS.contains(&reason.as_str()) {
            return Err(ApiError::invalid(
                "cancellation_reason",
                format!("`{reason}` is not a valid choice."),
            ));
        }
    }
    let price = validate_price(&input.price, rates)?;
    let offer = validate_offer(input.offer.as_ref(), input.price.value)?;

    if input.is_family_shared && price.value_micros != 0 {
        return Err(ApiError::new(ErrorCode::FamilySharePriceError));
    }
    if input.purchase_type == PurchaseType::OneTimePurchase
        && input.store_transaction_id != input.store_original_transaction_id
    {
        return Err(ApiError::new(ErrorCode::StoreTransactionIdError));
    }
    let purchased_at = input.purchased_at;
    if let Some(expires_at) = input.expires_at {
        if expires_at <= purchased_at {
            return Err(ApiError::new(ErrorCode::ExpiresDateError));
        }
    }
    if let Some(original) = input.originally_purchased_at {
        if original > purchased_at {
            return Err(ApiError::new(ErrorCode::OriginallyPurchasedDateError));
        }
    }
    if let Some(refunded_at) = input.refunded_at {
        if refunded_at <= purchased_at {
            return Err(ApiError::new(ErrorCode::RefundDateError));
        }
    }
    // A refund needs its date and a reason; the reason `refund` needs a date.
    let reason_is_refund = input.cancellation_reason.as_deref() == Some("refund");
    if (input.refunded_at.is_some() && input.cancellation_reason.is_none())
        || (reason_is_refund && input.refunded_at.is_none())
    {
        return Err(ApiError::new(ErrorCode::RefundFieldsError));
    }
    if let Some(changed) = input.renew_status_changed_at {
        if changed < purchased_at {
            return Err(ApiError::new(ErrorCode::RenewStatusChangedDateError));
        }
    }
    if let Some(billing) = input.billing_issue_detected_at {
        if billing <= purchased_at {
            return Err(ApiError::new(
                ErrorCode::BillingIssueDetectedAtDateComparisonError,
            ));
        }
    }
    if let Some(grace) = input.grace_period_expires_at {
        match input.billing_issue_detected_at {
            None => return Err(ApiError::new(ErrorCode::GracePeriodBillingError)),
            Some(billing) if grace <= billing => {
                return Err(ApiError::new(ErrorCode::GracePeriodExpiresDateError))
            }
            Some(_) => {}
        }
    }
    Ok(ValidTransaction {
        input,
        offer,
        price,
    })
}

fn validate_price(price: &PriceInput, rates: &Rates) -> Result<Price, ApiError> {
    if !price.value.is_finite() || price.value < 0.0 || price.value > 1.0e9 {
        return Err(ApiError::invalid(
            "price.value",
            "Must be a number from 0 to 1000000000.",
        ));
    }
    let currency = price.currency.to_ascii_uppercase();
    if currency.len() != 3 || !currency.chars().all(|c| c.is_ascii_alphabetic()) {
        return Err(ApiError::invalid(
            "price.currency",
            "Must be an ISO 4217 currency code such as USD.",
        ));
    }
    let value_micros = currency::to_micros(price.value);
    let usd_micros = rates.to_usd_micros(&currency, value_micros).ok_or_else(|| {
        ApiError::invalid(
            "price.currency",
            format!("No USD rate is known for `{currency}`; add one under [currency_rates] in the config."),
        )
    })?;
    Ok(Price {
        country: price.country.clone(),
        currency,
        value_micros,
        usd_micros,
    })
}

fn validate_offer(offer: Option<&OfferInput>, price_value: f64) -> Result<Option<Offer>, ApiError> {
    let Some(offer) = offer else {
        return Ok(None);
    };
    if !OFFER_CATEGORIES.contains(&offer.category.as_str()) {
        return Err(ApiError::invalid(
            "offer.category",
            format!("`{}` is not a valid choice.", offer.category),
        ));
    }
    if !OFFER_TYPES.contains(&offer.offer_type.as_str()) {
        return Err(ApiError::invalid(
            "offer.type",
            format!("`{}` is not a valid choice.", offer.offer_type),
        ));
    }
    let is_free_trial = offer.offer_type == "free_trial";
    let id = match &offer.id {
        OfferIdInput::Value(id) => Some(id.clone()),
        OfferIdInput::Null if is_free_trial => {
            return Err(ApiError::new(ErrorCode::FreeTrialPriceError))
        }
        OfferIdInput::Null => return Err(ApiError::new(ErrorCode::MissingOfferId)),
        OfferIdInput::Absent if offer.category != "introductory" => {
            return Err(ApiError::new(ErrorCode::MissingOfferId))
        }
        OfferIdInput::Absent => None,
    };
    if is_free_trial && price_value != 0.0 {
        return Err(ApiError::new(ErrorCode::FreeTrialPriceError));
    }
    Ok(Some(Offer {
        category: offer.category.clone(),
        offer_type: offer.offer_type.clone(),
        id,
    }))
}

#[cfg(test)]
mod tests;
