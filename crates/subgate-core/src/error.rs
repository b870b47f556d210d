//! The one catalogue of error codes the API can answer with, and the error value every layer
//! passes up. The HTTP layer turns an [`ApiError`] into Adapty's error body in one place.

use serde::Serialize;

macro_rules! error_codes {
    ($($variant:ident => ($code:literal, $status:literal, $source:literal, $message:literal),)*) => {
        /// Every `error_code` Subgate answers with: its HTTP status, and the `source` and
        /// message used when a call site gives none.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum ErrorCode { $($variant,)* }

        impl ErrorCode {
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$variant,)*];

            pub fn as_str(self) -> &'static str {
                match self { $(ErrorCode::$variant => $code,)* }
            }

            pub fn status(self) -> u16 {
                match self { $(ErrorCode::$variant => $status,)* }
            }

            pub fn default_source(self) -> &'static str {
                match self { $(ErrorCode::$variant => $source,)* }
            }

            pub fn default_message(self) -> &'static str {
                match self { $(ErrorCode::$variant => $message,)* }
            }
        }
    };
}

error_codes! {
    NotAuthenticated => ("not_authenticated", 401, "non_field_errors", "Authentication credentials were not provided."),
    NotFound => ("not_found", 404, "non_field_errors", "Not found."),
    MethodNotAllowed => ("method_not_allowed", 405, "non_field_errors", "Method not allowed."),
    PayloadTooLarge => ("payload_too_large", 413, "non_field_errors", "Request body is larger than 1 MiB."),
    ValidationError => ("validation_error", 400, "non_field_errors", "Invalid input."),
    ProfileDoesNotExist => ("profile_does_not_exist", 400, "non_field_errors", "Profile not found"),
    PaidAccessLevelDoesNotExist => ("paid_access_level_does_not_exist", 400, "non_field_errors", "Paid access level does not exist"),
    ProfilePaidAccessLevelDoesNotExist => ("profile_paid_access_level_does_not_exist", 400, "non_field_errors", "Profile has no such access level"),
    RevocationDateMoreThanExpirationDate => ("revocation_date_more_than_expiration_date", 400, "revoke_at", "Revocation date is more than current expiration date"),
    BillingIssueDetectedAtDateComparisonError => ("billing_issue_detected_at_date_comparison_error", 400, "billing_issue_detected_at", "billing_issue_detected_at must be later than purchased_at."),
    ExpiresDateError => ("expires_date_error", 400, "expires_at", "expires_at must be later than purchased_at."),
    FamilySharePriceError => ("family_share_price_error", 400, "is_family_shared", "If is_family_shared is true, price.value must be 0."),
    FreeTrialPriceError => ("free_trial_price_error", 400, "offer_type", "If offer_type is 'free_trial', price.value must be 0."),
    GracePeriodBillingError => ("grace_period_billing_error", 400, "grace_period_billing_error", "If grace_period_expires_at is specified, billing_issue_detected_at must also be specified."),
    GracePeriodExpiresDateError => ("grace_period_expires_date_error", 400, "grace_period_expires_at", "grace_period_expires_at must be later than billing_issue_detected_at."),
    MissingOfferId => ("missing_offer_id", 400, "offer_category", "offer_id must be specified for all offer types except 'introductory'."),
    OriginallyPurchasedDateError => ("originally_purchased_date_error", 400, "originally_purchased_at", "originally_purchased_at must be earlier than or equal to purchased_at."),
    RefundDateError => ("refund_date_error", 400, "refunded_at", "refunded_at must be later than purchased_at."),
    RefundFieldsError => ("refund_fields_error", 400, "refunded_at", "refunded_at and cancellation_reason=refund must be specified together."),
    RenewStatusChangedDateError => ("renew_status_changed_date_error", 400, "renew_status_changed_at", "renew_status_changed_at must be later than purchased_at."),
    StoreTransactionIdError => ("store_transaction_id_error", 400, "store_transaction_id", "store_transaction_id must be equal to store_original_transaction_id for purchase."),
    ServiceUnavailable => ("service_unavailable", 503, "non_field_errors", "The service is temporarily unavailable; try again."),
    InternalServerError => ("internal_server_error", 500, "non_field_errors", "Internal server error."),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ErrorDetail {
    pub source: String,
    pub errors: Vec<String>,
}

/// An error as the API reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub code: ErrorCode,
    pub details: Vec<ErrorDetail>,
}

impl ApiError {
    /// The code with its documented source and message.
    pub fn new(code: ErrorCode) -> Self {
        Self::at(code, code.default_source(), code.default_message())
    }

    pub fn at(code: ErrorCode, source: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            code,
            details: vec![ErrorDetail {
                source: source.into(),
                errors: vec![message.into()],
            }],
        }
    }

    /// The code with its documented source and a more specific message.
    pub fn with_message(code: ErrorCode, message: impl Into<String>) -> Self {
        Self::at(code, code.default_source(), message)
    }

    /// A 400 `validation_error` naming the offending field.
    pub fn invalid(source: impl Into<String>, message: impl Into<String>) -> Self {
        Self::at(ErrorCode::ValidationError, source, message)
    }

    pub fn status(&self) -> u16 {
        self.code.status()
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.code.as_str())?;
        for detail in &self.details {
            write!(f, " [{}: {}]", detail.source, detail.errors.join("; "))?;
        }
        Ok(())
    }
}

impl std::error::Error for ApiError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_and_statuses_are_errors() {
        let mut seen = std::collections::HashSet::new();
        for code in ErrorCode::ALL {
            assert!(seen.insert(code.as_str()), "duplicate {}", code.as_str());
            assert!(code.status() >= 400, "{}", code.as_str());
        }
    }
}
