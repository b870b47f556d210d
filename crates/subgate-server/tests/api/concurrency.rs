use crate::common::*;
use futures_util::future::join_all;
use reqwest::Method;
use serde_json::json;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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

/// The value of attribute `n` in a profile, 0 when unset.
fn counter(profile: &serde_json::Value) -> u64 {
    profile["custom_attributes"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|a| a["key"] == "n")
        .and_then(|a| a["value"].as_f64())
        .map_or(0, |n| n as u64)
}

async fn a_read_never_returns_less_than_an_answered_write(backend: Backend) {
    // Writers and readers of the same profiles at once: whatever a node keeps in memory or
    // batches, a read started after a write was answered sees that write (or a later one).
    // A SQLite node caching two of the four profiles: reads keep missing, so they race the
    // writer's commits (and its cache updates) all the time; its WAL starts over every few
    // pages, under the readers, looked at every 20 ms.
    const USERS: usize = 4;
    const WRITES: u64 = 40;
    let config = format!(
        "[database]\ncached_profiles = 2\nwal_rewind_pages = 8\ncheckpoint_interval_ms = 20\n{CONFIG}"
    );
    let s = Arc::new(TestServer::start_with(TestDb::new(backend).await, &config).await);
    for u in 0..USERS {
        s.create(&format!("u{u}")).await;
    }
    let answered: Arc<Vec<AtomicU64>> = Arc::new((0..USERS).map(|_| AtomicU64::new(0)).collect());
    let done = Arc::new(AtomicBool::new(false));
    let writers = (0..USERS).map(|u| {
        let (s, answered) = (Arc::clone(&s), Arc::clone(&answered));
        tokio::spawn(async move {
            let user = format!("u{u}");
            for n in 1..=WRITES {
                let (status, body) = s
                    .profile(
                        Method::PATCH,
                        &user,
                        Some(json!({"custom_attributes": {"n": n}})),
                    )
                    .await;
                assert_eq!(status, 200, "{body}");
                answered[u].store(n, Ordering::SeqCst);
                assert_eq!(counter(&s.get(&user).await), n, "read-your-writes");
            }
        })
    });
    let readers = (0..8).map(|r| {
        let (s, answered, done) = (Arc::clone(&s), Arc::clone(&answered), Arc::clone(&done));
        tokio::spawn(async move {
            let mut reads = 0;
            for i in 0.. {
                if done.load(Ordering::SeqCst) && i > 0 {
                    break;
                }
                let u = (r + i) % USERS;
                let floor = answered[u].load(Ordering::SeqCst);
                let seen = counter(&s.get(&format!("u{u}")).await);
                assert!(
                    seen >= floor,
                    "u{u}: read {seen} after {floor} was answered"
                );
                reads += 1;
            }
            reads
        })
    });
    let readers: Vec<_> = readers.collect();
    for writer in join_all(writers).await {
        writer.unwrap();
    }
    done.store(true, Ordering::SeqCst);
    let reads: usize = join_all(readers)
        .await
        .into_iter()
        .map(|r| r.unwrap())
        .sum();
    assert!(reads >= 8, "the readers did not run: {reads}");
    for u in 0..USERS {
        assert_eq!(counter(&s.get(&format!("u{u}")).await), WRITES);
    }
}

on_every_backend!(
    fifty_parallel_distinct_transactions_all_land_with_the_exact_revenue,
    the_same_transaction_fifty_times_in_parallel_is_recorded_once,
    parallel_attribute_writes_all_land_and_never_pass_the_limit,
    parallel_creates_of_one_user_make_one_profile,
    a_read_never_returns_less_than_an_answered_write,
);
