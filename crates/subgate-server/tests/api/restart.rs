//! The real binary, restarted gracefully and killed with SIGKILL mid-write.

use crate::common::{one_time, Backend, TestDb, PROFILE, SET_TRANSACTION};
use crate::nodes::{call, Node};
use serde_json::json;
use std::time::Duration;

async fn no_answered_write_is_lost_to_a_restart_or_a_kill(backend: Backend) {
    let db = TestDb::new(backend).await;
    let dir = db.dir.path();
    let client = reqwest::Client::new();
    let mut node = Node::spawn(dir, &db.url).await;
    let (status, _) = call(
        &client,
        &node.base,
        reqwest::Method::POST,
        PROFILE,
        "durable",
        Some(json!({"custom_attributes": {"plan": "gold"}})),
    )
    .await
    .unwrap();
    assert_eq!(status, 200);

    // Writers run flat out while the process is killed; remember what was answered 200.
    let now = chrono::Utc::now();
    let mut tasks = Vec::new();
    for w in 0..8 {
        let (client, base) = (client.clone(), node.base.clone());
        tasks.push(tokio::spawn(async move {
            let mut answered = Vec::new();
            for i in 0.. {
                let id = format!("w{w}-{i}");
                match call(
                    &client,
                    &base,
                    reqwest::Method::POST,
                    SET_TRANSACTION,
                    "durable",
                    Some(one_time(&id, "com.test.coins", 1.0, now)),
                )
                .await
                {
                    Ok((200, _)) => answered.push(id),
                    Ok((status, body)) => panic!("{status} {body}"),
                    Err(_) => break,
                }
            }
            answered
        }));
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    node.kill();
    let mut answered = Vec::new();
    for t in tasks {
        answered.extend(t.await.unwrap());
    }
    assert!(
        answered.len() > 10,
        "too few writes before the kill: {}",
        answered.len()
    );

    let mut node = Node::spawn(dir, &db.url).await;
    let (status, p) = call(
        &client,
        &node.base,
        reqwest::Method::GET,
        PROFILE,
        "durable",
        None,
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    let stored: std::collections::HashSet<&str> = p["data"]["non_subscriptions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["store_transaction_id"].as_str().unwrap())
        .collect();
    for id in &answered {
        assert!(stored.contains(id.as_str()), "answered write {id} was lost");
    }
    assert_eq!(
        p["data"]["custom_attributes"],
        json!([{"key": "plan", "value": "gold"}])
    );
    let revenue = p["data"]["total_revenue_usd"].as_f64().unwrap();
    assert_eq!(revenue, stored.len() as f64);

    // A graceful stop (SIGTERM) keeps everything too.
    node.terminate();
    let mut node = Node::spawn(dir, &db.url).await;
    let (_, again) = call(
        &client,
        &node.base,
        reqwest::Method::GET,
        PROFILE,
        "durable",
        None,
    )
    .await
    .unwrap();
    assert_eq!(
        again["data"]["non_subscriptions"].as_array().unwrap().len(),
        stored.len()
    );
    node.kill();
}

on_every_backend!(no_answered_write_is_lost_to_a_restart_or_a_kill);
