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

/// What a profile shows at `now` through its time-bound parts.
fn shown_at(app: &App, s: &ProfileState, now: DateTime<Utc>) -> (Vec<String>, Vec<bool>) {
    let levels = derive(app, s, now)
        .iter()
        .map(|v| format!("{v:?}"))
        .collect();
    let grace = s
        .transactions
        .iter()
        .map(|t| t.is_in_grace_period(now))
        .collect();
    (levels, grace)
}

#[test]
fn nothing_shown_changes_inside_the_steady_window() {
    let mut refunded = sub("r", 2, 6, 12);
    refunded.refunded_at = Some(at(9));
    let mut graced = sub("g", 3, 12, 16);
    graced.billing_issue_detected_at = Some(at(15));
    graced.grace_period_expires_at = Some(at(19));
    let mut lifetime = sub("l", 6, 21, 22);
    lifetime.purchase_type = PurchaseType::OneTimePurchase;
    lifetime.expires_at = None;
    let states = [
        state(vec![sub("t1", 1, 2, 8)], vec![], vec![]),
        state(vec![refunded.clone()], vec![], vec![]),
        state(vec![], vec![grant(1, 3, Some(9))], vec![]),
        state(vec![graced.clone()], vec![], vec![]),
        state(
            vec![sub("t1", 1, 2, 8)],
            vec![grant(2, 3, None)],
            vec![revoke(3, 5)],
        ),
        state(
            vec![sub("t1", 1, 2, 8), refunded, graced, lifetime],
            vec![grant(4, 7, Some(14)), grant(7, 24, None)],
            vec![revoke(5, 11)],
        ),
    ];
    let app = app();
    let hours = |h: i64| at(1) + Duration::hours(h);
    for s in &states {
        for h in 0..(30 * 24) {
            let now = hours(h);
            let (from, until) = steady_window(s, now);
            let from = from.unwrap_or(hours(-48));
            let until = until.unwrap_or(hours(40 * 24));
            assert!(from <= now && now < until, "{now}: {from}..{until}");
            let shown = shown_at(&app, s, now);
            let last = until - Duration::microseconds(1);
            for t in [from, last, from + (until - from) / 2] {
                assert_eq!(shown_at(&app, s, t), shown, "at {t}, window of {now}");
            }
        }
    }
}
