use super::*;
use crate::model::*;
use chrono::{Duration, TimeZone};
use std::collections::BTreeMap;
use uuid::Uuid;

fn at(day: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2025, 1, day, 0, 0, 0).unwrap()
}

fn app() -> App {
    App::new(AppDefinition {
        id: Uuid::nil(),
        name: "t".into(),
        access_levels: vec!["premium".into(), "pro".into()],
        products: vec![
            Product {
                id: "monthly".into(),
                access_level_id: Some("premium".into()),
                kind: ProductKind::Subscription,
                store_product_ids: BTreeMap::from([("app_store".into(), "m".into())]),
            },
            Product {
                id: "coins".into(),
                access_level_id: Some("premium".into()),
                kind: ProductKind::Consumable,
                store_product_ids: BTreeMap::from([("app_store".into(), "coins".into())]),
            },
        ],
        custom_stores: vec![],
    })
}

fn sub(id: &str, seq: i64, from: u32, to: u32) -> Transaction {
    Transaction {
        id: Uuid::new_v4(),
        profile_id: None,
        seq,
        purchase_type: PurchaseType::Subscription,
        store: "app_store".into(),
        environment: Environment::Production,
        store_product_id: "m".into(),
        store_base_plan_id: None,
        store_transaction_id: id.into(),
        store_original_transaction_id: "orig".into(),
        offer: None,
        is_family_shared: false,
        price: Price {
            country: "US".into(),
            currency: "USD".into(),
            value_micros: 1,
            usd_micros: 1,
        },
        purchased_at: at(from),
        originally_purchased_at: Some(at(from)),
        expires_at: Some(at(to)),
        refunded_at: None,
        cancellation_reason: None,
        variation_id: None,
        renew_status: Some(true),
        renew_status_changed_at: None,
        billing_issue_detected_at: None,
        grace_period_expires_at: None,
        created_at: at(from),
        updated_at: at(from),
        expiry_handled: false,
    }
}

fn grant(seq: i64, from: u32, to: Option<u32>) -> Grant {
    Grant {
        id: Uuid::new_v4(),
        access_level_id: "premium".into(),
        starts_at: at(from),
        expires_at: to.map(at),
        created_at: at(from),
        seq,
    }
}

fn revoke(seq: i64, when: u32) -> Revoke {
    Revoke {
        access_level_id: "premium".into(),
        revoke_at: at(when),
        created_at: at(when),
        seq,
    }
}

fn state(transactions: Vec<Transaction>, grants: Vec<Grant>, revokes: Vec<Revoke>) -> ProfileState {
    ProfileState {
        profile: Profile {
            id: Uuid::nil(),
            app_id: Uuid::nil(),
            customer_user_id: None,
            version: 10,
            created_at: at(1),
            updated_at: at(1),
            doc: ProfileDoc {
                grants,
                revokes,
                ..ProfileDoc::default()
            },
        },
        transactions,
    }
}

fn premium(s: &ProfileState, now: DateTime<Utc>) -> Option<(bool, Option<DateTime<Utc>>)> {
    let app = app();
    derive(&app, s, now)
        .into_iter()
        .find(|v| v.access_level_id == "premium")
        .map(|v| (v.is_active, v.expires_at))
}

#[test]
fn subscription_is_active_inside_its_period_only() {
    let s = state(vec![sub("t1", 1, 1, 10)], vec![], vec![]);
    assert_eq!(premium(&s, at(5)), Some((true, Some(at(10)))));
    assert_eq!(premium(&s, at(10)), Some((false, Some(at(10)))));
    assert_eq!(
        premium(&s, at(1) - Duration::seconds(1)).map(|p| p.0),
        Some(false)
    );
}

#[test]
fn never_active_after_a_refund() {
    let mut t = sub("t1", 1, 1, 20);
    t.refunded_at = Some(at(5));
    t.cancellation_reason = Some("refund".into());
    let s = state(vec![t], vec![], vec![]);
    for day in 5..25 {
        assert_eq!(premium(&s, at(day)).map(|p| p.0), Some(false), "day {day}");
    }
    assert_eq!(premium(&s, at(3)), Some((true, Some(at(5)))));
}

#[test]
fn grant_never_shortens() {
    // A grant ending before the subscription leaves the later expiry in place.
    let s = state(
        vec![sub("t1", 1, 1, 20)],
        vec![grant(2, 2, Some(10))],
        vec![],
    );
    assert_eq!(premium(&s, at(5)), Some((true, Some(at(20)))));
    // One ending after it extends.
    let s = state(
        vec![sub("t1", 1, 1, 20)],
        vec![grant(2, 2, Some(25))],
        vec![],
    );
    assert_eq!(premium(&s, at(5)), Some((true, Some(at(25)))));
    // Lifetime wins.
    let s = state(vec![sub("t1", 1, 1, 20)], vec![grant(2, 2, None)], vec![]);
    assert_eq!(premium(&s, at(5)), Some((true, None)));
}

#[test]
fn revoke_caps_every_older_source() {
    let s = state(
        vec![sub("t1", 1, 1, 20)],
        vec![grant(2, 1, None)],
        vec![revoke(3, 8)],
    );
    assert_eq!(premium(&s, at(5)), Some((true, Some(at(8)))));
    assert_eq!(premium(&s, at(8)).map(|p| p.0), Some(false));
    for day in 8..28 {
        assert_eq!(premium(&s, at(day)).map(|p| p.0), Some(false), "day {day}");
    }
}

#[test]
fn sources_newer_than_a_revoke_are_untouched() {
    let s = state(
        vec![sub("t1", 1, 1, 20), sub("t2", 4, 12, 25)],
        vec![],
        vec![revoke(3, 8)],
    );
    assert_eq!(premium(&s, at(10)).map(|p| p.0), Some(false));
    assert_eq!(premium(&s, at(15)), Some((true, Some(at(25)))));
}

#[test]
fn grace_period_extends_access() {
    let mut t = sub("t1", 1, 1, 10);
    t.billing_issue_detected_at = Some(at(9));
    t.grace_period_expires_at = Some(at(14));
    let s = state(vec![t], vec![], vec![]);
    let app = app();
    let v = derive(&app, &s, at(12)).remove(0);
    assert!(v.is_active && v.is_in_grace_period);
    assert_eq!(v.expires_at, Some(at(14)));
}

#[test]
fn future_grant_is_listed_but_inactive_and_unconfigured_products_grant_nothing() {
    let mut unknown = sub("t9", 1, 1, 30);
    unknown.store_product_id = "not-configured".into();
    let mut coins = sub("c1", 2, 1, 30);
    coins.store_product_id = "coins".into();
    let s = state(vec![unknown, coins], vec![grant(3, 20, None)], vec![]);
    assert_eq!(premium(&s, at(5)), Some((false, None)));
    assert_eq!(premium(&s, at(21)), Some((true, None)));
    let app = app();
    assert!(!has_ever_had(
        &app,
        &state(vec![sub("x", 1, 1, 2)], vec![], vec![]),
        "pro"
    ));
}

#[test]
fn back_to_back_sources_extend_the_expiry() {
    let s = state(
        vec![sub("t1", 1, 1, 10), sub("t2", 2, 10, 20)],
        vec![grant(3, 19, Some(25))],
        vec![],
    );
    assert_eq!(premium(&s, at(5)), Some((true, Some(at(25)))));
    // A gap breaks the coverage.
    let s = state(
        vec![sub("t1", 1, 1, 10), sub("t2", 2, 12, 20)],
        vec![],
        vec![],
    );
    assert_eq!(premium(&s, at(5)), Some((true, Some(at(10)))));
}
