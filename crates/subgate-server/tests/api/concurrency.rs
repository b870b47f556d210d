use crate::common::*;
use futures_util::future::join_all;
use reqwest::Method;
use serde_json::json;
use std::sync::Arc;

async fn fifty_parallel_distinct_transactions_all_land_with_the_exact_revenue(backend: Backend) {
    let s = Arc::new(TestServer::start(backend).await);
    s.create("u").await;
    let now = s.now();
    let requests = (0..50).map(|i| {
        let s = Arc::clone(&s);
        async move {
            s.post(
                SET_TRANSACTION,
                "u",
                one_time(&format!("p{i}"), "com.test.coins", 9.99, now),
            )
            .await
            .0
        }
    });
    assert!(join_all(requests).await.iter().all(|status| *status == 200));
    let p = s.get("u").await;
    assert_eq!(p["non_subscriptions"].as_array().unwrap().len(), 50);
    assert_eq!(p["total_revenue_usd"], 499.5);
}

async fn the_same_transaction_fifty_times_in_parallel_is_recorded_once(backend: Backend) {
    let s = Arc::new(TestServer::start(backend).await);
    s.create("u").await;
    let now = s.now();
    let requests = (0..50).map(|_| {
        let s = Arc::clone(&s);
        async move {
            s.post(SET_TRANSACTION, "u", subscription("same", "same", now))
                .await
                .0
        }
    });
    assert!(join_all(requests).await.iter().all(|status| *status == 200));
    let p = s.get("u").await;
    assert_eq!(p["subscriptions"].as_array().unwrap().len(), 1);
    assert_eq!(p["total_revenue_usd"], 9.99);
}

async fn parallel_attribute_writes_all_land_and_never_pass_the_limit(backend: Backend) {
    let s = Arc::new(TestServer::start(backend).await);
    s.create("u").await;
    let requests = (0..40).map(|i| {
        let s = Arc::clone(&s);
        async move {
            s.profile(
                Method::PATCH,
                "u",
                Some(json!({"custom_attributes": {format!("k{i}"): i}})),
            )
            .await
            .0
        }
    });
    let statuses = join_all(requests).await;
    let accepted = statuses.iter().filter(|s| **s == 200).count();
    assert_eq!(accepted, 30, "{statuses:?}");
    assert!(statuses.iter().all(|s| *s == 200 || *s == 400));
    assert_eq!(
        s.get("u").await["custom_attributes"]
            .as_array()
            .unwrap()
            .len(),
        30
    );
}

async fn parallel_creates_of_one_user_make_one_profile(backend: Backend) {
    let s = Arc::new(TestServer::start(backend).await);
    let requests = (0..20).map(|_| {
        let s = Arc::clone(&s);
        async move { s.profile(Method::POST, "racer", Some(json!({}))).await }
    });
    let answers = join_all(requests).await;
    let ids: std::collections::HashSet<_> = answers
        .iter()
        .map(|(status, body)| {
            assert_eq!(*status, 200, "{body}");
            body["data"]["profile_id"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(ids.len(), 1);
}

on_every_backend!(
    fifty_parallel_distinct_transactions_all_land_with_the_exact_revenue,
    the_same_transaction_fifty_times_in_parallel_is_recorded_once,
    parallel_attribute_writes_all_land_and_never_pass_the_limit,
    parallel_creates_of_one_user_make_one_profile,
);
