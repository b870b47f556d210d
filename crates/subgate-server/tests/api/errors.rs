use crate::common::*;
use reqwest::Method;
use serde_json::{json, Value};

async fn malformed_mistyped_and_oversized_bodies_are_4xx_in_the_api_format(backend: Backend) {
    let s = TestServer::start(backend).await;
    s.create("u").await;
    let raw = |body: &'static str| {
        s.client
            .post(format!("{}{SET_TRANSACTION}", s.base))
            .header("Authorization", format!("Api-Key {SECRET}"))
            .header("adapty-customer-user-id", "u")
            .header("Content-Type", "application/json")
            .body(body)
    };
    for body in ["{not json", "[1, 2]", "\"text\""] {
        let resp = raw(body).send().await.unwrap();
        assert_eq!(resp.status(), 400);
        let v: Value = resp.json().await.unwrap();
        assert_error(
            reqwest::StatusCode::BAD_REQUEST,
            &v,
            400,
            "validation_error",
            "non_field_errors",
        );
    }
    // NUL cannot be stored as text (PostgreSQL refuses it): a 400 naming the field, on every
    // backend, and nothing changes.
    let before = s.get("u").await;
    for (body, field) in [
        (json!({"first_name": "a\u{0}b"}), "first_name"),
        (
            json!({"custom_attributes": {"plan": "x\u{0}"}}),
            "custom_attributes",
        ),
        (
            json!({"custom_attributes": [{"key": "k\u{0}", "value": 1}]}),
            "custom_attributes",
        ),
    ] {
        let (status, v) = s.profile(Method::PATCH, "u", Some(body)).await;
        assert_error(status, &v, 400, "validation_error", field);
    }
    assert_eq!(
        s.get("u").await["custom_attributes"],
        before["custom_attributes"]
    );
    let (status, v) = s
        .post(
            SET_TRANSACTION,
            "u",
            with(
                one_time("t", "com.test.coins", 1.0, s.now()),
                json!({"store_transaction_id": "t\u{0}"}),
            ),
        )
        .await;
    assert_error(status, &v, 400, "validation_error", "store_transaction_id");

    let huge = format!("{{\"pad\": \"{}\"}}", "x".repeat(1_100_000));
    let resp = s
        .client
        .post(format!("{}{PROFILE}", s.base))
        .header("Authorization", format!("Api-Key {SECRET}"))
        .header("adapty-customer-user-id", "u")
        .body(huge)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 413);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error_code"], "payload_too_large");

    let now = s.now();
    let cases = [
        (
            with(subscription("t", "t", now), json!({"price": "9.99"})),
            "price",
        ),
        (
            with(
                subscription("t", "t", now),
                json!({"price": {"country": "US", "currency": "USD", "value": "x"}}),
            ),
            "price.value",
        ),
        (
            with(
                subscription("t", "t", now),
                json!({"purchased_at": "yesterday"}),
            ),
            "purchased_at",
        ),
        (
            with(
                subscription("t", "t", now),
                json!({"-store_transaction_id": null}),
            ),
            "store_transaction_id",
        ),
        (
            with(subscription("t", "t", now), json!({"-expires_at": null})),
            "expires_at",
        ),
        (
            with(subscription("t", "t", now), json!({"renew_status": "yes"})),
            "renew_status",
        ),
        (
            with(
                subscription("t", "t", now),
                json!({"purchase_type": "rental"}),
            ),
            "purchase_type",
        ),
        (
            with(
                subscription("t", "t", now),
                json!({"environment": "Staging"}),
            ),
            "environment",
        ),
        (
            with(subscription("t", "t", now), json!({"store": 5})),
            "store",
        ),
    ];
    for (body, source) in cases {
        let (status, resp) = s.post(SET_TRANSACTION, "u", body).await;
        assert_error(status, &resp, 400, "validation_error", source);
    }
    let (status, resp) = s
        .profile(Method::PATCH, "u", Some(json!({"birthday": "31/12/2000"})))
        .await;
    assert_error(status, &resp, 400, "validation_error", "birthday");
    let (status, resp) = s
        .profile(
            Method::PATCH,
            "u",
            Some(json!({"analytics_disabled": null})),
        )
        .await;
    assert_error(status, &resp, 400, "validation_error", "analytics_disabled");
    let (status, resp) = s
        .send(
            Method::GET,
            PROFILE,
            Some(SECRET),
            &[("adapty-profile-id", "not-a-uuid")],
            None,
        )
        .await;
    assert_error(status, &resp, 400, "validation_error", "adapty-profile-id");
    let (status, resp) = s.send(Method::GET, PROFILE, Some(SECRET), &[], None).await;
    assert_error(status, &resp, 400, "validation_error", "non_field_errors");

    // Nothing of the above changed the profile.
    let p = s.get("u").await;
    assert_eq!(p["subscriptions"], json!([]));
    assert_eq!(p["birthday"], Value::Null);

    let (status, resp) = s
        .send(Method::GET, "/api/v2/nothing/", Some(SECRET), &[], None)
        .await;
    assert_error(status, &resp, 404, "not_found", "non_field_errors");
    let (status, resp) = s.send(Method::PUT, PROFILE, Some(SECRET), &[], None).await;
    assert_error(status, &resp, 405, "method_not_allowed", "non_field_errors");
}

async fn every_documented_transaction_error_code_and_source(backend: Backend) {
    let s = TestServer::start(backend).await;
    s.create("u").await;
    let now = s.now();
    let later = |days: i64| iso(now + chrono::Duration::days(days));
    let sub = || subscription("t1", "t1", now);
    let cases: Vec<(Value, &str, &str)> = vec![
        (
            with(sub(), json!({"billing_issue_detected_at": iso(now)})),
            "billing_issue_detected_at_date_comparison_error",
            "billing_issue_detected_at",
        ),
        (
            with(sub(), json!({"expires_at": iso(now)})),
            "expires_date_error",
            "expires_at",
        ),
        (
            with(sub(), json!({"is_family_shared": true})),
            "family_share_price_error",
            "is_family_shared",
        ),
        (
            with(
                sub(),
                json!({"offer": {"category": "introductory", "type": "free_trial"}}),
            ),
            "free_trial_price_error",
            "offer_type",
        ),
        (
            with(
                sub(),
                json!({"offer": {"category": "introductory", "type": "free_trial", "id": null}, "price": {"country": "US", "currency": "USD", "value": 0}}),
            ),
            "free_trial_price_error",
            "offer_type",
        ),
        (
            with(sub(), json!({"grace_period_expires_at": later(3)})),
            "grace_period_billing_error",
            "grace_period_billing_error",
        ),
        (
            with(
                sub(),
                json!({"billing_issue_detected_at": later(2), "grace_period_expires_at": later(2)}),
            ),
            "grace_period_expires_date_error",
            "grace_period_expires_at",
        ),
        (
            with(
                sub(),
                json!({"offer": {"category": "promotional", "type": "pay_as_you_go"}}),
            ),
            "missing_offer_id",
            "offer_category",
        ),
        (
            with(
                sub(),
                json!({"offer": {"offer_category": "introductory", "offer_type": "pay_up_front", "offer_id": null}}),
            ),
            "missing_offer_id",
            "offer_category",
        ),
        (
            with(sub(), json!({"originally_purchased_at": later(1)})),
            "originally_purchased_date_error",
            "originally_purchased_at",
        ),
        (
            with(
                sub(),
                json!({"refunded_at": iso(now), "cancellation_reason": "refund"}),
            ),
            "refund_date_error",
            "refunded_at",
        ),
        (
            with(sub(), json!({"refunded_at": later(1)})),
            "refund_fields_error",
            "refunded_at",
        ),
        (
            with(sub(), json!({"cancellation_reason": "refund"})),
            "refund_fields_error",
            "refunded_at",
        ),
        (
            with(
                sub(),
                json!({"renew_status_changed_at": iso(now - chrono::Duration::days(1))}),
            ),
            "renew_status_changed_date_error",
            "renew_status_changed_at",
        ),
        (
            with(
                one_time("a", "com.test.lifetime", 1.0, now),
                json!({"store_original_transaction_id": "b"}),
            ),
            "store_transaction_id_error",
            "store_transaction_id",
        ),
    ];
    for (body, code, source) in cases {
        let (status, resp) = s.post(SET_TRANSACTION, "u", body.clone()).await;
        assert_error(status, &resp, 400, code, source);
    }
    let p = s.get("u").await;
    assert_eq!(p["subscriptions"], json!([]));
    assert_eq!(p["non_subscriptions"], json!([]));

    // Unknown profile on the purchase routes.
    let (status, resp) = s.post(SET_TRANSACTION, "nobody", sub()).await;
    assert_error(
        status,
        &resp,
        400,
        "profile_does_not_exist",
        "non_field_errors",
    );
    let (status, resp) = s
        .post(GRANT, "nobody", json!({"access_level_id": "premium"}))
        .await;
    assert_error(
        status,
        &resp,
        400,
        "profile_does_not_exist",
        "non_field_errors",
    );
    let (status, resp) = s
        .post(REVOKE, "nobody", json!({"access_level_id": "premium"}))
        .await;
    assert_error(
        status,
        &resp,
        400,
        "profile_does_not_exist",
        "non_field_errors",
    );
    let (status, resp) = s.post(GRANT, "u", json!({"access_level_id": "gold"})).await;
    assert_error(
        status,
        &resp,
        400,
        "paid_access_level_does_not_exist",
        "non_field_errors",
    );
    assert_eq!(
        resp["errors"][0]["errors"][0],
        "Paid access level `gold` does not exist"
    );
    let (status, resp) = s
        .post(REVOKE, "u", json!({"access_level_id": "gold"}))
        .await;
    assert_error(
        status,
        &resp,
        400,
        "paid_access_level_does_not_exist",
        "non_field_errors",
    );
    let (status, resp) = s
        .post(REVOKE, "u", json!({"access_level_id": "premium"}))
        .await;
    assert_error(
        status,
        &resp,
        400,
        "profile_paid_access_level_does_not_exist",
        "non_field_errors",
    );
    let (status, resp) = s.post(GRANT, "u", json!({})).await;
    assert_error(status, &resp, 400, "validation_error", "access_level_id");
}

on_every_backend!(
    malformed_mistyped_and_oversized_bodies_are_4xx_in_the_api_format,
    every_documented_transaction_error_code_and_source,
);
