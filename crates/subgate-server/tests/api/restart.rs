//! The real binary, restarted gracefully and killed with SIGKILL mid-write.

use crate::common::{one_time, CONFIG, PROFILE, SECRET, SET_TRANSACTION};
use serde_json::{json, Value};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Node {
    child: Child,
    base: String,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn spawn(dir: &std::path::Path) -> Node {
    let config = dir.join("subgate.toml");
    std::fs::write(&config, CONFIG).unwrap();
    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_subgate"))
        .args(["serve", "--config"])
        .arg(&config)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .arg("--database-url")
        .arg(format!("sqlite://{}", dir.join("data.db").display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while reqwest::get(format!("{base}/ready"))
        .await
        .map(|r| r.status() != 200)
        .unwrap_or(true)
    {
        assert!(Instant::now() < deadline, "the server did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Node { child, base }
}

async fn call(
    client: &reqwest::Client,
    base: &str,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> Result<(u16, Value), reqwest::Error> {
    let mut req = client
        .request(method, format!("{base}{path}"))
        .header("Authorization", format!("Api-Key {SECRET}"))
        .header("adapty-customer-user-id", "durable");
    if let Some(body) = body {
        req = req.json(&body);
    }
    let resp = req.send().await?;
    let status = resp.status().as_u16();
    Ok((status, resp.json().await.unwrap_or(Value::Null)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_answered_write_is_lost_to_a_restart_or_a_kill() {
    let dir = tempfile::tempdir().unwrap();
    let client = reqwest::Client::new();
    let mut node = spawn(dir.path()).await;
    let (status, _) = call(
        &client,
        &node.base,
        reqwest::Method::POST,
        PROFILE,
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
    node.child.kill().unwrap(); // SIGKILL
    node.child.wait().unwrap();
    let mut answered = Vec::new();
    for t in tasks {
        answered.extend(t.await.unwrap());
    }
    assert!(
        answered.len() > 10,
        "too few writes before the kill: {}",
        answered.len()
    );

    let mut node = spawn(dir.path()).await;
    let (status, p) = call(&client, &node.base, reqwest::Method::GET, PROFILE, None)
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
    Command::new("kill")
        .arg(node.child.id().to_string())
        .status()
        .unwrap();
    node.child.wait().unwrap();
    let mut node = spawn(dir.path()).await;
    let (_, again) = call(&client, &node.base, reqwest::Method::GET, PROFILE, None)
        .await
        .unwrap();
    assert_eq!(
        again["data"]["non_subscriptions"].as_array().unwrap().len(),
        stored.len()
    );
    node.child.kill().unwrap();
    node.child.wait().unwrap();
}
