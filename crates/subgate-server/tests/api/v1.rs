//! The legacy v1 API: every route and body rule, its shapes and errors, and that v1 and v2 are
//! two views of the same data.

use crate::common::*;
use base64::Engine as _;
use chrono::Duration;
use reqwest::Method;
use serde_json::{json, Value};

const V1: &str = "/api/v1/sdk";

async fn v1(
    s: &TestServer,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> (reqwest::StatusCode, Value) {
    s.send(method, &format!("{V1}{path}"), Some(SECRET), &[], body)
        .await
}

/// Checks a JSON:API error: status, code and where it points.
fn assert_v1_error(
    status: reqwest::StatusCode,
    body: &Value,
    expected: u16,
    code: &str,
    pointer: &str,
) {
    assert_eq!(status.as_u16(), expected, "{body}");
    let error = &body["errors"][0];
    assert_eq!(error["status"], expected.to_string(), "{body}");
    assert_eq!(error["code"], code, "{body}");
    assert_eq!(error["source"]["pointer"], pointer, "{body}");
    assert!(!error["detail"].as_str().unwrap().is_empty(), "{body}");
}

fn b64(s: &str, padded: bool) -> String {
    if padded {
        base64::engine::general_purpose::URL_SAFE.encode(s)
    } else {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s)
    }
}

async fn profiles_by_every_kind_of_id(backend: Backend) {
    let s = TestServer::start(backend).await;
    let (status, created) = v1(
        &s,
        Method::POST,
        "/profiles/",
        Some(json!({
            "customer_user_id": "user/ä?1",
            "email": "v1@example.com",
            "birthday": "1991-04-05",
            "custom_attributes": {"plan": "gold", "words": 3},
        })),
    )
    .await;
    assert_eq!(status, 200, "{created}");
    let data = &created["data"];
    assert_eq!(data["customer_user_id"], "user/ä?1");
    assert_eq!(
        data["custom_attributes"],
        json!({"plan": "gold", "words": 3.0})
    );
    assert_eq!(data["paid_access_levels"], Value::Null);
    assert_eq!(data["subscriptions"], Value::Null);
    assert_eq!(data["non_subscriptions"], Value::Null);
    assert!(
        data.get("email").is_none(),
        "personal fields only when extended"
    );
    let profile_id = data["profile_id"].as_str().unwrap().to_string();

    // By profile id, by Base64URL customer user id (with and without padding).
    for path in [
        format!("/profiles/{profile_id}/"),
        format!(
            "/profiles/{}/?is_user_id_base64url_encoded=1",
            b64("user/ä?1", true)
        ),
        format!(
            "/profiles/{}/?is_user_id_base64url_encoded=1",
            b64("user/ä?1", false)
        ),
    ] {
        let (status, got) = v1(&s, Method::GET, &path, None).await;
        assert_eq!(status, 200, "{path}: {got}");
        assert_eq!(got["data"]["profile_id"], profile_id.as_str());
    }
    let (status, body) = v1(
        &s,
        Method::GET,
        "/profiles/%%%/?is_user_id_base64url_encoded=1",
        None,
    )
    .await;
    assert_v1_error(status, &body, 400, "validation_error", "/data");

    // A plain customer user id, and the extended view.
    s.create("plain").await;
    let (status, got) = v1(&s, Method::GET, "/profiles/plain/?extended=1", None).await;
    assert_eq!(status, 200);
    assert_eq!(got["data"]["customer_user_id"], "plain");
    let (_, got) = v1(
        &s,
        Method::GET,
        &format!("/profiles/{profile_id}/?extended=true"),
        None,
    )
    .await;
    assert_eq!(got["data"]["email"], "v1@example.com");
    assert_eq!(got["data"]["birthday"], "1991-04-05");
    assert!(got["data"]["created_at"]
        .as_str()
        .unwrap()
        .ends_with("+0000"));
    assert_eq!(got["data"]["idfa"], Value::Null);

    // Set attributes.
    let (status, patched) = v1(
        &s,
        Method::PATCH,
        &format!("/profiles/{profile_id}/"),
        Some(json!({"first_name": "Ann", "custom_attributes": {"words": 4, "plan": null}})),
    )
    .await;
    assert_eq!(status, 200, "{patched}");
    assert_eq!(patched["data"]["custom_attributes"], json!({"words": 4.0}));
    let (status, body) = v1(
        &s,
        Method::PATCH,
        "/profiles/plain/",
        Some(json!({"birthday": "05.04.1991"})),
    )
    .await;
    assert_v1_error(
        status,
        &body,
        400,
        "validation_error",
        "/data/attributes/birthday",
    );

    // An anonymous profile: no customer user id.
    let (status, anon) = v1(&s, Method::POST, "/profiles/", Some(json!({}))).await;
    assert_eq!(status, 200);
    assert_eq!(anon["data"]["customer_user_id"], Value::Null);

    // Delete, with and without the trailing slash.
    for path in [
        format!("/profiles/{profile_id}/delete"),
        "/profiles/plain/delete/".into(),
    ] {
        let (status, _) = v1(&s, Method::DELETE, &path, None).await;
        assert_eq!(status, 204, "{path}");
    }
    let (status, body) = v1(&s, Method::GET, "/profiles/plain/", None).await;
    assert_v1_error(status, &body, 404, "not_found", "/data");

    // Auth errors are JSON:API too; writes need the secret key.
    let (status, body) = s
        .send(Method::GET, &format!("{V1}/profiles/x/"), None, &[], None)
        .await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["errors"][0]["status"], "401");
    let (status, body) = s
        .send(
            Method::POST,
            &format!("{V1}/profiles/"),
            Some(PUBLIC),
            &[],
            Some(json!({"customer_user_id": "p"})),
        )
        .await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["errors"][0]["code"], "not_authenticated");
}

fn grant_path(cuid: &str, level: &str) -> String {
    format!("/profiles/{cuid}/paid-access-levels/{level}/grant/")
}

async fn expiry_of(s: &TestServer, cuid: &str, level: &str) -> Value {
    let (_, p) = v1(s, Method::GET, &format!("/profiles/{cuid}/"), None).await;
    p["data"]["paid_access_levels"][level]["expires_at"].clone()
}

async fn grant_follows_the_body_rules(backend: Backend) {
    let s = TestServer::start(backend).await;
    s.create("g").await;
    let now = s.now();
    let v1_date = |t| subgate_core::time::format_v1(&t);

    let (status, body) = v1(
        &s,
        Method::POST,
        &grant_path("g", "premium"),
        Some(json!({})),
    )
    .await;
    assert_v1_error(status, &body, 400, "validation_error", "/data");
    let (status, body) = v1(
        &s,
        Method::POST,
        &grant_path("g", "premium"),
        Some(json!({"duration_days": 0})),
    )
    .await;
    assert_v1_error(
        status,
        &body,
        400,
        "validation_error",
        "/data/attributes/duration_days",
    );
    let (status, body) = v1(
        &s,
        Method::POST,
        &grant_path("g", "gold"),
        Some(json!({"duration_days": 1})),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(
        body["errors"][0]["code"],
        "paid_access_level_does_not_exist"
    );

    // duration_days from now, then added to the current expiry.
    let (status, p) = v1(
        &s,
        Method::POST,
        &grant_path("g", "premium"),
        Some(json!({"duration_days": 10})),
    )
    .await;
    assert_eq!(status, 200, "{p}");
    let level = &p["data"]["paid_access_levels"]["premium"];
    assert_eq!(level["is_active"], true);
    assert_eq!(level["store"], "adapty");
    assert_eq!(level["vendor_product_id"], "adapty_server_side_product");
    assert_eq!(level["expires_at"], v1_date(now + Duration::days(10)));
    v1(
        &s,
        Method::POST,
        &grant_path("g", "premium"),
        Some(json!({"duration_days": 5})),
    )
    .await;
    assert_eq!(
        expiry_of(&s, "g", "premium").await,
        v1_date(now + Duration::days(15))
    );

    // expires_at beats duration_days; is_lifetime beats both.
    let until = now + Duration::days(40);
    v1(
        &s,
        Method::POST,
        &grant_path("g", "pro"),
        Some(json!({"expires_at": iso(until), "duration_days": 2})),
    )
    .await;
    assert_eq!(expiry_of(&s, "g", "pro").await, v1_date(until));
    let (_, p) = v1(
        &s,
        Method::POST,
        &grant_path("g", "pro"),
        Some(json!({"is_lifetime": true, "expires_at": iso(until), "duration_days": 2})),
    )
    .await;
    assert_eq!(p["data"]["paid_access_levels"]["pro"]["is_lifetime"], true);
    assert_eq!(
        p["data"]["paid_access_levels"]["pro"]["expires_at"],
        Value::Null
    );

    // A future start is not active yet.
    s.create("later").await;
    let (_, p) = v1(
        &s,
        Method::POST,
        &grant_path("later", "premium"),
        Some(json!({"starts_at": iso(now + Duration::days(3)), "duration_days": 7})),
    )
    .await;
    assert_eq!(
        p["data"]["paid_access_levels"]["premium"]["is_active"],
        false
    );
    s.advance(Duration::days(4));
    let (_, p) = v1(&s, Method::GET, "/profiles/later/", None).await;
    assert_eq!(
        p["data"]["paid_access_levels"]["premium"]["is_active"],
        true
    );

    // Naming a purchase records it once, with its revenue; price 0 first is a trial.
    s.create("buyer").await;
    let purchase = json!({
        "duration_days": 30, "vendor_product_id": "web_monthly", "vendor_transaction_id": "w1",
        "store": "web", "price": 12.5, "price_locale": "eur", "is_sandbox": true,
        "base_plan_id": "monthly-eur", "proceeds": 10.0,
    });
    for _ in 0..2 {
        let (status, p) = v1(
            &s,
            Method::POST,
            &grant_path("buyer", "premium"),
            Some(purchase.clone()),
        )
        .await;
        assert_eq!(status, 200, "{p}");
    }
    let (_, p) = v1(&s, Method::GET, "/profiles/buyer/", None).await;
    let sub = &p["data"]["subscriptions"]["web_monthly"];
    assert_eq!(sub["vendor_transaction_id"], "w1");
    assert_eq!(sub["store"], "web");
    assert_eq!(sub["is_sandbox"], true);
    assert_eq!(sub["base_plan_id"], "monthly-eur");
    let level = &p["data"]["paid_access_levels"]["premium"];
    assert_eq!(level["store"], "web");
    assert_eq!(level["vendor_product_id"], "web_monthly");
    let revenue = s.get("buyer").await["total_revenue_usd"].as_f64().unwrap();
    assert!(
        (revenue - 12.5 / 0.86).abs() < 0.01,
        "EUR 12.50 counted once: {revenue}"
    );

    s.create("trial").await;
    let (_, p) = v1(
        &s,
        Method::POST,
        &grant_path("trial", "premium"),
        Some(
            json!({"duration_days": 7, "vendor_product_id": "web_monthly",
                    "vendor_transaction_id": "tr1", "store": "web", "price": 0}),
        ),
    )
    .await;
    assert_eq!(
        p["data"]["paid_access_levels"]["premium"]["active_introductory_offer_type"],
        Value::Null,
        "the level comes from the grant"
    );
    assert_eq!(
        p["data"]["subscriptions"]["web_monthly"]["active_introductory_offer_type"],
        "free_trial"
    );

    for (body, pointer) in [
        (
            json!({"duration_days": 1, "store": "nowhere", "vendor_product_id": "x", "vendor_transaction_id": "y"}),
            "/data/attributes/store",
        ),
        (
            json!({"duration_days": 1, "introductory_offer_type": "gratis"}),
            "/data/attributes/introductory_offer_type",
        ),
        (
            json!({"duration_days": 1, "price": -1}),
            "/data/attributes/price",
        ),
        (
            json!({"duration_days": 1, "price": 1, "price_locale": "XXX"}),
            "/data/attributes/price_locale",
        ),
        (
            json!({"expires_at": "tomorrow"}),
            "/data/attributes/expires_at",
        ),
    ] {
        let (status, err) = v1(&s, Method::POST, &grant_path("g", "premium"), Some(body)).await;
        assert_v1_error(status, &err, 400, "validation_error", pointer);
    }
    let (status, err) = v1(
        &s,
        Method::POST,
        &grant_path("ghost", "premium"),
        Some(json!({"duration_days": 1})),
    )
    .await;
    assert_v1_error(status, &err, 404, "not_found", "/data");
}

async fn revoke_ends_access_and_refunds_on_request(backend: Backend) {
    let s = TestServer::start(backend).await;
    s.create("r").await;
    let (status, body) = v1(
        &s,
        Method::POST,
        "/profiles/r/paid-access-levels/premium/revoke/",
        Some(json!({})),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(
        body["errors"][0]["code"],
        "profile_paid_access_level_does_not_exist"
    );

    s.transaction("r", subscription("s1", "s1", s.now())).await;
    s.advance(Duration::hours(1));
    let (status, p) = v1(
        &s,
        Method::POST,
        "/profiles/r/paid-access-levels/premium/revoke/",
        Some(json!({"is_refund": false})),
    )
    .await;
    assert_eq!(status, 200, "{p}");
    let level = &p["data"]["paid_access_levels"]["premium"];
    assert_eq!(level["is_active"], false);
    assert_eq!(level["will_renew"], false);
    assert_eq!(level["expires_at"], subgate_core::time::format_v1(&s.now()));
    assert_eq!(s.get("r").await["total_revenue_usd"], 9.99);

    // With is_refund, the purchase behind the level is refunded and leaves the revenue.
    s.create("refund").await;
    s.transaction("refund", subscription("s2", "s2", s.now()))
        .await;
    s.advance(Duration::hours(1));
    let (status, p) = v1(
        &s,
        Method::POST,
        "/profiles/refund/paid-access-levels/premium/revoke/",
        Some(json!({"is_refund": true})),
    )
    .await;
    assert_eq!(status, 200, "{p}");
    assert_eq!(
        p["data"]["paid_access_levels"]["premium"]["is_refund"],
        true
    );
    assert_eq!(
        p["data"]["subscriptions"]["com.test.monthly"]["is_refund"],
        true
    );
    assert_eq!(s.get("refund").await["total_revenue_usd"], 0.0);
}

async fn v1_and_v2_are_two_views_of_the_same_data(backend: Backend) {
    let s = TestServer::start(backend).await;
    // v1 writes, v2 reads.
    v1(
        &s,
        Method::POST,
        "/profiles/",
        Some(json!({"customer_user_id": "both", "custom_attributes": {"level": 3}})),
    )
    .await;
    v1(
        &s,
        Method::POST,
        &grant_path("both", "pro"),
        Some(json!({"duration_days": 3})),
    )
    .await;
    let v2 = s.get("both").await;
    assert_eq!(
        v2["custom_attributes"],
        json!([{"key": "level", "value": 3.0}])
    );
    assert!(is_active(&v2, "pro", s.now()));
    assert_eq!(
        level(&v2, "pro").unwrap()["expires_at"],
        iso(s.now() + Duration::days(3))
    );
    // v2 writes, v1 reads.
    s.transaction("both", subscription("x1", "x1", s.now()))
        .await;
    s.transaction("both", one_time("o1", "com.test.lifetime", 20.0, s.now()))
        .await;
    let (_, p) = v1(&s, Method::GET, "/profiles/both/", None).await;
    let data = &p["data"];
    assert_eq!(data["profile_id"], v2["profile_id"]);
    assert_eq!(data["segment_hash"], v2["segment_hash"]);
    assert_eq!(
        data["subscriptions"]["com.test.monthly"]["vendor_transaction_id"],
        "x1"
    );
    assert_eq!(data["subscriptions"]["com.test.monthly"]["is_active"], true);
    assert_eq!(
        data["non_subscriptions"]["com.test.lifetime"][0]["vendor_transaction_id"],
        "o1"
    );
    assert_eq!(data["paid_access_levels"]["premium"]["is_lifetime"], true);
    assert_eq!(data["paid_access_levels"]["pro"]["is_active"], true);
    // A v2 revoke shows in v1, a v1 revoke in v2.
    s.post(REVOKE, "both", json!({"access_level_id": "pro"}))
        .await;
    let (_, p) = v1(&s, Method::GET, "/profiles/both/", None).await;
    assert_eq!(p["data"]["paid_access_levels"]["pro"]["is_active"], false);
    v1(
        &s,
        Method::POST,
        "/profiles/both/paid-access-levels/premium/revoke/",
        Some(json!({})),
    )
    .await;
    assert!(!is_active(&s.get("both").await, "premium", s.now()));
}

on_every_backend!(
    profiles_by_every_kind_of_id,
    grant_follows_the_body_rules,
    revoke_ends_access_and_refunds_on_request,
    v1_and_v2_are_two_views_of_the_same_data,
);
