use super::*;
use crate::fixtures::*;
use crate::model::*;
use chrono::Duration;

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
