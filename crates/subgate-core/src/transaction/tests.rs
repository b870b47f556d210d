use super::*;
use crate::model::{AppDefinition, Environment, PurchaseType};
use chrono::TimeZone;
use uuid::Uuid;

fn app() -> App {
    App::new(AppDefinition {
        id: Uuid::nil(),
        name: "t".into(),
        access_levels: vec![],
        products: vec![],
        custom_stores: vec!["web".into()],
    })
}

fn at(day: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2025, 1, day, 0, 0, 0).unwrap()
}

fn subscription() -> TransactionInput {
    TransactionInput {
        purchase_type: PurchaseType::Subscription,
        store: "app_store".into(),
        environment: Environment::Production,
        store_product_id: "m".into(),
        store_base_plan_id: None,
        store_transaction_id: "t1".into(),
        store_original_transaction_id: "t1".into(),
        offer: None,
        is_family_shared: false,
        price: PriceInput {
            country: "US".into(),
            currency: "USD".into(),
            value: 9.99,
        },
        purchased_at: at(10),
        originally_purchased_at: Some(at(10)),
        expires_at: Some(at(20)),
        refunded_at: None,
        cancellation_reason: None,
        variation_id: None,
        renew_status: Some(true),
        renew_status_changed_at: None,
        billing_issue_detected_at: None,
        grace_period_expires_at: None,
    }
}

fn code(input: TransactionInput) -> Option<&'static str> {
    validate(input, &app(), &Rates::default())
        .err()
        .map(|e| e.code.as_str())
}

#[test]
fn a_plain_subscription_is_valid() {
    assert_eq!(code(subscription()), None);
    assert_eq!(
        code(TransactionInput {
            store: "web".into(),
            ..subscription()
        }),
        None
    );
}

#[test]
fn every_documented_rule_has_its_code() {
    let s = subscription;
    let cases: Vec<(TransactionInput, &str)> = vec![
        (
            TransactionInput {
                expires_at: Some(at(10)),
                ..s()
            },
            "expires_date_error",
        ),
        (
            TransactionInput {
                is_family_shared: true,
                ..s()
            },
            "family_share_price_error",
        ),
        (
            TransactionInput {
                offer: Some(OfferInput {
                    category: "introductory".into(),
                    offer_type: "free_trial".into(),
                    id: OfferIdInput::Absent,
                }),
                ..s()
            },
            "free_trial_price_error",
        ),
        (
            TransactionInput {
                offer: Some(OfferInput {
                    category: "introductory".into(),
                    offer_type: "pay_up_front".into(),
                    id: OfferIdInput::Null,
                }),
                ..s()
            },
            "missing_offer_id",
        ),
        (
            TransactionInput {
                offer: Some(OfferInput {
                    category: "promotional".into(),
                    offer_type: "pay_up_front".into(),
                    id: OfferIdInput::Absent,
                }),
                ..s()
            },
            "missing_offer_id",
        ),
        (
            TransactionInput {
                grace_period_expires_at: Some(at(15)),
                ..s()
            },
            "grace_period_billing_error",
        ),
        (
            TransactionInput {
                billing_issue_detected_at: Some(at(15)),
                grace_period_expires_at: Some(at(15)),
                ..s()
            },
            "grace_period_expires_date_error",
        ),
        (
            TransactionInput {
                billing_issue_detected_at: Some(at(10)),
                ..s()
            },
            "billing_issue_detected_at_date_comparison_error",
        ),
        (
            TransactionInput {
                originally_purchased_at: Some(at(11)),
                ..s()
            },
            "originally_purchased_date_error",
        ),
        (
            TransactionInput {
                refunded_at: Some(at(9)),
                cancellation_reason: Some("refund".into()),
                ..s()
            },
            "refund_date_error",
        ),
        (
            TransactionInput {
                refunded_at: Some(at(12)),
                ..s()
            },
            "refund_fields_error",
        ),
        (
            TransactionInput {
                cancellation_reason: Some("refund".into()),
                ..s()
            },
            "refund_fields_error",
        ),
        (
            TransactionInput {
                renew_status_changed_at: Some(at(9)),
                ..s()
            },
            "renew_status_changed_date_error",
        ),
        (
            TransactionInput {
                purchase_type: PurchaseType::OneTimePurchase,
                store_original_transaction_id: "other".into(),
                ..s()
            },
            "store_transaction_id_error",
        ),
        (
            TransactionInput {
                store: "nowhere".into(),
                ..s()
            },
            "validation_error",
        ),
        (
            TransactionInput {
                cancellation_reason: Some("bored".into()),
                ..s()
            },
            "validation_error",
        ),
        (
            TransactionInput {
                store_transaction_id: "x".repeat(51),
                ..s()
            },
            "validation_error",
        ),
    ];
    for (input, expected) in cases {
        assert_eq!(code(input.clone()), Some(expected), "{input:?}");
    }
}

#[test]
fn a_free_trial_at_zero_with_an_id_is_valid() {
    let input = TransactionInput {
        offer: Some(OfferInput {
            category: "introductory".into(),
            offer_type: "free_trial".into(),
            id: OfferIdInput::Value("trial".into()),
        }),
        price: PriceInput {
            country: "US".into(),
            currency: "usd".into(),
            value: 0.0,
        },
        ..subscription()
    };
    let valid = validate(input, &app(), &Rates::default()).unwrap();
    assert_eq!(valid.price.currency, "USD");
    assert_eq!(valid.offer.unwrap().id.as_deref(), Some("trial"));
}
