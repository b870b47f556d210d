use crate::common::*;
use chrono::Duration;
use reqwest::Method;
use serde_json::json;

async fn a_subscription_grants_access_until_it_expires(backend: Backend) {
    let s = TestServer::start(backend).await;
    s.create("u").await;
    let now = s.now();
    let p = s.transaction("u", subscription("t1", "t1", now)).await;
    let premium = level(&p, "premium").expect("premium granted");
    assert_eq!(premium["store_transaction_id"], "t1");
    assert_eq!(premium["expires_at"], iso(now + Duration::days(30)));
    assert_eq!(premium["purchased_at"], iso(now));
    assert_eq!(p["subscriptions"].as_array().unwrap().len(), 1);
    assert_eq!(p["total_revenue_usd"], 9.99);
    s.advance(Duration::days(31));
    assert!(!is_active(&s.get("u").await, "premium", s.now()));
}

async fn posting_a_transaction_again_updates_it_and_never_adds_revenue_twice(backend: Backend) {
    let s = TestServer::start(backend).await;
    s.create("u").await;
    let now = s.now();
    s.transaction("u", subscription("t1", "t1", now)).await;
    let changed_at = now + Duration::days(2);
    let p = s
        .transaction(
            "u",
            with(
                subscription("t1", "t1", now),
                json!({"renew_status": false, "renew_status_changed_at": iso(changed_at)}),
            ),
        )
        .await;
    assert_eq!(p["subscriptions"].as_array().unwrap().len(), 1);
    assert_eq!(p["total_revenue_usd"], 9.99);
    assert_eq!(
        p["subscriptions"][0]["renewal_cancelled_at"],
        iso(changed_at)
    );
    assert_eq!(
        level(&p, "premium").unwrap()["renewal_cancelled_at"],
        iso(changed_at)
    );
}

async fn renewals_extend_the_chain_and_add_revenue(backend: Backend) {
    let s = TestServer::start(backend).await;
    s.create("u").await;
    let now = s.now();
    s.transaction("u", subscription("t1", "t1", now)).await;
    let renewal = with(
        subscription("t2", "t1", now + Duration::days(30)),
        json!({"originally_purchased_at": iso(now)}),
    );
    let p = s.transaction("u", renewal).await;
    let subs = p["subscriptions"].as_array().unwrap();
    assert_eq!(subs.len(), 1, "one chain, one subscription");
    assert_eq!(subs[0]["store_transaction_id"], "t2");
    assert_eq!(subs[0]["originally_purchased_at"], iso(now));
    assert_eq!(p["total_revenue_usd"], 19.98);
    assert_eq!(
        level(&p, "premium").unwrap()["expires_at"],
        iso(now + Duration::days(60))
    );
}

async fn one_time_purchases_refunds_and_unconfigured_products(backend: Backend) {
    let s = TestServer::start(backend).await;
    s.create("u").await;
    let now = s.now();
    let p = s
        .transaction("u", one_time("life", "com.test.lifetime", 49.99, now))
        .await;
    let premium = level(&p, "premium").unwrap();
    assert_eq!(
        premium["expires_at"],
        json!(null),
        "a one-time product is lifetime access"
    );
    let purchase = &p["non_subscriptions"][0];
    assert_eq!(purchase["is_refund"], false);
    assert_eq!(purchase["is_consumable"], false);
    assert!(uuid::Uuid::parse_str(purchase["purchase_id"].as_str().unwrap()).is_ok());

    // Consumables and unknown products are recorded and counted, but grant nothing.
    let p = s
        .transaction("u", one_time("c1", "com.test.coins", 1.0, now))
        .await;
    assert_eq!(p["non_subscriptions"][1]["is_consumable"], true);
    let p = s
        .transaction(
            "u",
            with(
                subscription("x1", "x1", now),
                json!({"store_product_id": "not.configured"}),
            ),
        )
        .await;
    assert_eq!(p["subscriptions"].as_array().unwrap().len(), 1);
    assert_eq!(p["total_revenue_usd"], 60.98, "exact, not a float sum");

    // A refund ends access at refunded_at and takes the revenue out.
    let refunded_at = now + Duration::days(1);
    let refund = with(
        one_time("life", "com.test.lifetime", 49.99, now),
        json!({"refunded_at": iso(refunded_at), "cancellation_reason": "refund"}),
    );
    let p = s.transaction("u", refund).await;
    assert_eq!(
        level(&p, "premium").unwrap()["expires_at"],
        iso(refunded_at)
    );
    assert_eq!(p["non_subscriptions"][0]["is_refund"], true);
    assert_eq!(p["total_revenue_usd"], 10.99);
    s.advance(Duration::days(2));
    assert!(!is_active(&s.get("u").await, "premium", s.now()));
}

async fn custom_stores_currencies_and_offers(backend: Backend) {
    let s = TestServer::start(backend).await;
    s.create("web-user").await;
    let now = s.now();
    let web = with(
        subscription("w1", "w1", now),
        json!({"store": "web", "store_product_id": "web_monthly", "price": {"country": "DE", "currency": "EUR", "value": 8.6},
               "offer": {"offer_category": "promotional", "offer_type": "pay_up_front", "offer_id": "promo1"}}),
    );
    let p = s.transaction("web-user", web).await;
    assert!(
        is_active(&p, "premium", now),
        "a custom store's purchase grants access like any other"
    );
    assert_eq!(p["total_revenue_usd"], 10.0, "8.60 EUR at 0.86 per USD");
    assert_eq!(
        p["subscriptions"][0]["offer"],
        json!({"category": "promotional", "type": "pay_up_front", "id": "promo1"})
    );
    let (status, resp) = s
        .post(
            SET_TRANSACTION,
            "web-user",
            with(subscription("w2", "w2", now), json!({"store": "mystery"})),
        )
        .await;
    assert_error(status, &resp, 400, "validation_error", "store");
    let (status, resp) = s
        .post(
            SET_TRANSACTION,
            "web-user",
            with(
                subscription("w3", "w3", now),
                json!({"price": {"country": "US", "currency": "ZZZ", "value": 1}}),
            ),
        )
        .await;
    assert_error(status, &resp, 400, "validation_error", "price.currency");
}

async fn deleted_profiles_keep_their_history_detached_until_the_chain_comes_back(backend: Backend) {
    let s = TestServer::start(backend).await;
    s.create("old").await;
    let now = s.now();
    s.transaction("old", subscription("t1", "chain", now)).await;
    let (status, _) = s.profile(Method::DELETE, "old", None).await;
    assert_eq!(status, 204);
    s.create("new").await;
    let p = s
        .transaction("new", subscription("t2", "chain", now + Duration::days(1)))
        .await;
    assert_eq!(
        p["total_revenue_usd"], 19.98,
        "the chain's earlier transaction moved here"
    );
    assert!(is_active(&p, "premium", now + Duration::days(1)));
}

async fn a_chain_restored_on_another_profile_leaves_the_first_one(backend: Backend) {
    let s = TestServer::start(backend).await;
    let now = s.now();
    s.create("phone").await;
    s.create("tablet").await;
    s.transaction("phone", subscription("r1", "restored", now))
        .await;
    // Read first: a node that keeps profiles in memory now holds this one.
    assert!(is_active(&s.get("phone").await, "premium", now));
    s.transaction(
        "tablet",
        subscription("r2", "restored", now + Duration::days(1)),
    )
    .await;
    let phone = s.get("phone").await;
    assert_eq!(phone["subscriptions"], json!([]), "{phone}");
    assert!(!is_active(&phone, "premium", now + Duration::days(1)));
    let tablet = s.get("tablet").await;
    assert_eq!(tablet["total_revenue_usd"], 19.98);
}

async fn web_and_mobile_see_the_same_access(backend: Backend) {
    // Use case 1: a web checkout records the purchase; the app asks by the same user id.
    let s = TestServer::start(backend).await;
    s.create("user-42").await;
    s.transaction(
        "user-42",
        with(
            subscription("cs_1", "cs_1", s.now()),
            json!({"store": "stripe", "store_product_id": "prod_123"}),
        ),
    )
    .await;
    let (status, p) = s
        .send(
            Method::GET,
            PROFILE,
            Some(PUBLIC),
            &[
                ("adapty-customer-user-id", "user-42"),
                ("adapty-platform", "iOS"),
            ],
            None,
        )
        .await;
    assert_eq!(status, 200);
    assert!(is_active(&p["data"], "premium", s.now()));
}

on_every_backend!(
    a_subscription_grants_access_until_it_expires,
    posting_a_transaction_again_updates_it_and_never_adds_revenue_twice,
    renewals_extend_the_chain_and_add_revenue,
    one_time_purchases_refunds_and_unconfigured_products,
    custom_stores_currencies_and_offers,
    deleted_profiles_keep_their_history_detached_until_the_chain_comes_back,
    web_and_mobile_see_the_same_access,
    a_chain_restored_on_another_profile_leaves_the_first_one,
);
