//! Events and webhooks, end to end: real purchases through the API, a real HTTP receiver, the
//! test clock for expiries and retry schedules.

use crate::common::*;
use crate::nodes::Node;
use crate::receiver::{Answer, Received, Receiver};
use base64::Engine as _;
use chrono::Duration;
use reqwest::Method;
use serde_json::{json, Value};
use std::collections::HashSet;
use std::time::Duration as StdDuration;

const SIGNING_KEY: &[u8] = b"subgate-test-signing-key";

fn signing_secret() -> String {
    format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(SIGNING_KEY)
    )
}

/// The test config with a webhook for the Test app pointing at `url`.
fn config_with_webhook(url: &str, retry_delays: &str) -> String {
    let webhook = format!(
        r#"
[apps.webhook]
url = "{url}/production"
sandbox_url = "{url}/sandbox"
authorization = "Bearer s3cret"
signing_secret = "{secret}"
event_names = {{ subscription_started = "sub_started" }}

[webhooks]
retry_delays_seconds = {retry_delays}
timeout_seconds = 1
poll_interval_ms = 20
"#,
        secret = signing_secret()
    );
    let other = "\n[[apps]]\nname = \"Other\"";
    assert!(CONFIG.contains(other));
    CONFIG.replace(other, &format!("{webhook}{other}"))
}

async fn start(backend: Backend, receiver: &Receiver) -> TestServer {
    let config = config_with_webhook(&receiver.url, "[60, 300]");
    TestServer::start_with(TestDb::new(backend).await, &config).await
}

fn types(received: &[Received]) -> Vec<String> {
    received
        .iter()
        .map(|r| r.event_type().to_string())
        .collect()
}

/// Waits for the calls after the first `seen` and checks their event types, in order.
async fn expect(receiver: &Receiver, seen: &mut usize, expected: &[&str]) -> Vec<Received> {
    let all = receiver.exactly(*seen + expected.len()).await;
    let new = all[*seen..].to_vec();
    assert_eq!(types(&new), expected);
    *seen += expected.len();
    new
}

fn trial(id: &str, original: &str, at: chrono::DateTime<chrono::Utc>) -> Value {
    with(
        subscription(id, original, at),
        json!({
            "offer": {"category": "introductory", "type": "free_trial"},
            "price": {"country": "US", "currency": "USD", "value": 0},
            "expires_at": iso(at + Duration::days(7)),
        }),
    )
}

async fn purchases_fire_adapty_events_with_adapty_payloads(backend: Backend) {
    let receiver = Receiver::start().await;
    let s = start(backend, &receiver).await;
    let mut seen = 0;
    let now = s.now();
    let (status, _) = s
        .profile(
            Method::POST,
            "sub",
            Some(json!({"custom_attributes": {"plan": "gold", "words": 12}})),
        )
        .await;
    assert_eq!(status, 200);

    // First purchase: started (renamed as configured) and the level.
    s.transaction("sub", subscription("s1", "s1", now)).await;
    let first = expect(
        &receiver,
        &mut seen,
        &["sub_started", "access_level_updated"],
    )
    .await;
    let started = &first[0];
    assert_eq!(started.path, "/production");
    assert_eq!(started.header("authorization"), Some("Bearer s3cret"));
    assert_eq!(started.header("content-type"), Some("application/json"));
    let body = &started.body;
    assert_eq!(body["customer_user_id"], "sub");
    assert_eq!(body["event_api_version"], 1);
    assert_eq!(body["profiles_sharing_access_level"], json!([]));
    assert_eq!(
        body["user_attributes"],
        json!({"plan": "gold", "words": 12.0})
    );
    assert!(body["event_datetime"].as_str().unwrap().ends_with("+0000"));
    let props = &body["event_properties"];
    assert_eq!(props["transaction_id"], "s1");
    assert_eq!(props["original_transaction_id"], "s1");
    assert_eq!(props["vendor_product_id"], "com.test.monthly");
    assert_eq!(props["store"], "app_store");
    assert_eq!(props["environment"], "Production");
    assert_eq!(props["price_usd"], 9.99);
    assert_eq!(props["price_local"], 9.99);
    assert_eq!(props["currency"], "USD");
    assert_eq!(props["profile_total_revenue_usd"], 9.99);
    assert_eq!(props["profile_has_access_level"], true);
    assert_eq!(props["consecutive_payments"], 1);
    assert_eq!(props["profile_id"], body["profile_id"]);
    assert_eq!(
        props["subscription_expires_at"],
        subgate_core::time::format_v1(&(now + Duration::days(30)))
    );
    // Standard Webhooks signature over id.timestamp.body.
    let id = started.header("webhook-id").unwrap();
    assert_eq!(id, props["profile_event_id"].as_str().unwrap());
    let timestamp = started.header("webhook-timestamp").unwrap();
    let expected = subgate_server::webhooks::sign(SIGNING_KEY, id, timestamp, &started.raw);
    assert_eq!(started.header("webhook-signature"), Some(expected.as_str()));
    let level = &first[1].body["event_properties"];
    assert_eq!(level["access_level_id"], "premium");
    assert_eq!(level["is_active"], true);
    assert_eq!(level["is_lifetime"], false);
    assert_eq!(level["will_renew"], true);
    assert_eq!(level["is_refund"], false);
    assert_eq!(level["is_in_grace_period"], false);
    assert_eq!(level["expires_at"], props["subscription_expires_at"]);

    // The same transaction again: nothing new.
    s.transaction("sub", subscription("s1", "s1", now)).await;
    // A new transaction in the chain: a renewal.
    s.advance(Duration::days(29));
    let renewal = subscription("s2", "s1", s.now());
    s.transaction("sub", renewal.clone()).await;
    let renewed = expect(
        &receiver,
        &mut seen,
        &["subscription_renewed", "access_level_updated"],
    )
    .await;
    assert_eq!(
        renewed[0].body["event_properties"]["consecutive_payments"],
        2
    );
    assert_eq!(
        renewed[0].body["event_properties"]["profile_total_revenue_usd"],
        19.98
    );
    s.transaction("sub", with(renewal.clone(), json!({"renew_status": false})))
        .await;
    let cancelled = expect(
        &receiver,
        &mut seen,
        &["subscription_renewal_cancelled", "access_level_updated"],
    )
    .await;
    assert_eq!(cancelled[1].body["event_properties"]["will_renew"], false);
    s.transaction("sub", with(renewal.clone(), json!({"renew_status": true})))
        .await;
    expect(
        &receiver,
        &mut seen,
        &["subscription_renewal_reactivated", "access_level_updated"],
    )
    .await;
    let refunded_at = s.now() + Duration::hours(1);
    s.advance(Duration::hours(2));
    s.transaction(
        "sub",
        with(
            renewal,
            json!({"refunded_at": iso(refunded_at), "cancellation_reason": "refund"}),
        ),
    )
    .await;
    let refund = expect(
        &receiver,
        &mut seen,
        &["subscription_refunded", "access_level_updated"],
    )
    .await;
    assert_eq!(
        refund[0].body["event_properties"]["cancellation_reason"],
        "refund"
    );

    // One-time purchases and their refund; a consumable has no level to update.
    s.create("buyer").await;
    let bought_at = s.now() - Duration::hours(1);
    let lifetime = one_time("o1", "com.test.lifetime", 49.0, bought_at);
    s.transaction("buyer", lifetime.clone()).await;
    expect(
        &receiver,
        &mut seen,
        &["non_subscription_purchase", "access_level_updated"],
    )
    .await;
    s.transaction(
        "buyer",
        with(
            lifetime,
            json!({"refunded_at": iso(s.now()), "cancellation_reason": "refund"}),
        ),
    )
    .await;
    expect(
        &receiver,
        &mut seen,
        &["non_subscription_purchase_refunded", "access_level_updated"],
    )
    .await;
    s.transaction("buyer", one_time("c1", "com.test.coins", 0.99, s.now()))
        .await;
    expect(&receiver, &mut seen, &["non_subscription_purchase"]).await;

    // A trial: started, cancelled, reactivated, converted; Sandbox goes to the sandbox URL.
    s.create("trial").await;
    let t1 = with(
        trial("t1", "t1", s.now()),
        json!({"environment": "Sandbox"}),
    );
    s.transaction("trial", t1.clone()).await;
    let trial_started = expect(
        &receiver,
        &mut seen,
        &["trial_started", "access_level_updated"],
    )
    .await;
    assert_eq!(trial_started[0].path, "/sandbox");
    assert_eq!(
        trial_started[0].body["event_properties"]["environment"],
        "Sandbox"
    );
    s.transaction("trial", with(t1.clone(), json!({"renew_status": false})))
        .await;
    expect(
        &receiver,
        &mut seen,
        &["trial_renewal_cancelled", "access_level_updated"],
    )
    .await;
    s.transaction("trial", with(t1, json!({"renew_status": true})))
        .await;
    expect(
        &receiver,
        &mut seen,
        &["trial_renewal_reactivated", "access_level_updated"],
    )
    .await;
    s.advance(Duration::days(6));
    s.transaction("trial", subscription("t2", "t1", s.now()))
        .await;
    expect(
        &receiver,
        &mut seen,
        &["trial_converted", "access_level_updated"],
    )
    .await;

    // A billing issue with a grace period.
    s.create("billing").await;
    let b1 = subscription("b1", "b1", s.now() - Duration::days(29));
    s.transaction("billing", b1.clone()).await;
    expect(
        &receiver,
        &mut seen,
        &["sub_started", "access_level_updated"],
    )
    .await;
    s.transaction(
        "billing",
        with(
            b1,
            json!({
                "billing_issue_detected_at": iso(s.now()),
                "grace_period_expires_at": iso(s.now() + Duration::days(16)),
            }),
        ),
    )
    .await;
    expect(
        &receiver,
        &mut seen,
        &[
            "billing_issue_detected",
            "entered_grace_period",
            "access_level_updated",
        ],
    )
    .await;

    // Grants and revokes change access only.
    s.create("granted").await;
    let (status, _) = s
        .post(
            GRANT,
            "granted",
            json!({"access_level_id": "pro", "expires_at": iso(s.now() + Duration::days(7))}),
        )
        .await;
    assert_eq!(status, 200);
    let granted = expect(&receiver, &mut seen, &["access_level_updated"]).await;
    let props = &granted[0].body["event_properties"];
    assert_eq!(props["access_level_id"], "pro");
    assert_eq!(props["is_active"], true);
    assert_eq!(props["environment"], "Production");
    let (status, _) = s
        .post(REVOKE, "granted", json!({"access_level_id": "pro"}))
        .await;
    assert_eq!(status, 200);
    let revoked = expect(&receiver, &mut seen, &["access_level_updated"]).await;
    assert_eq!(revoked[0].body["event_properties"]["is_active"], false);

    let ids: HashSet<String> = receiver
        .received()
        .iter()
        .map(|r| r.event_id().to_string())
        .collect();
    assert_eq!(ids.len(), seen, "every event has its own profile_event_id");
}

async fn expiry_events_fire_when_the_time_passes(backend: Backend) {
    let receiver = Receiver::start().await;
    let s = start(backend, &receiver).await;
    let mut seen = 0;
    s.create("exp").await;
    s.create("renewing").await;
    s.create("tri").await;
    let now = s.now();
    s.transaction("exp", subscription("e1", "e1", now)).await;
    s.transaction("renewing", subscription("r1", "r1", now))
        .await;
    s.transaction("tri", trial("tr1", "tr1", now)).await;
    receiver.wait_for(6).await;
    seen += 6;
    // Day 8: the trial has ended, unpaid. No request touches the profile.
    s.advance(Duration::days(8));
    let expired = expect(
        &receiver,
        &mut seen,
        &["trial_expired", "access_level_updated"],
    )
    .await;
    assert_eq!(expired[0].body["customer_user_id"], "tri");
    assert_eq!(expired[1].body["event_properties"]["is_active"], false);
    // Day 20: renewed before its end, so that period's end will be no expiry.
    s.advance(Duration::days(12));
    s.transaction("renewing", subscription("r2", "r1", s.now()))
        .await;
    expect(
        &receiver,
        &mut seen,
        &["subscription_renewed", "access_level_updated"],
    )
    .await;
    // Day 31: the plain subscription has ended; the renewed one has not.
    s.advance(Duration::days(11));
    let expired = expect(
        &receiver,
        &mut seen,
        &["subscription_expired", "access_level_updated"],
    )
    .await;
    assert_eq!(expired[0].body["customer_user_id"], "exp");
    assert_eq!(
        expired[0].body["event_properties"]["cancellation_reason"],
        "unknown"
    );
    // Day 51: the renewal ends too; and nothing fires twice.
    s.advance(Duration::days(20));
    let expired = expect(
        &receiver,
        &mut seen,
        &["subscription_expired", "access_level_updated"],
    )
    .await;
    assert_eq!(expired[0].body["customer_user_id"], "renewing");
    assert_eq!(expired[0].body["event_properties"]["transaction_id"], "r2");
    s.advance(Duration::days(60));
    receiver.exactly(seen).await;
}

async fn wait_for_state(s: &TestServer, id: &str, state: &str, attempts: i64) -> Value {
    let deadline = std::time::Instant::now() + StdDuration::from_secs(20);
    loop {
        let (_, body) = s
            .send(
                Method::GET,
                &format!("/api/subgate/v1/events/{id}/"),
                Some(SECRET),
                &[],
                None,
            )
            .await;
        let delivery = &body["data"]["delivery"];
        if delivery["state"] == state && delivery["attempts"] == attempts {
            return body["data"].clone();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "event {id} never reached {state} after {attempts} attempts: {body}"
        );
        tokio::time::sleep(StdDuration::from_millis(20)).await;
    }
}

async fn grant_for(s: &TestServer, cuid: &str) {
    let (status, body) = s
        .post(GRANT, cuid, json!({"access_level_id": "premium"}))
        .await;
    assert_eq!(status, 200, "{body}");
}

async fn failed_deliveries_are_retried_on_schedule_and_never_dropped(backend: Backend) {
    let receiver = Receiver::start().await;
    let s = start(backend, &receiver).await;
    s.create("r").await;

    // 500, then no answer within the timeout, then 200.
    receiver.script(&[
        Answer::Status(500),
        Answer::Hang(StdDuration::from_secs(3)),
        Answer::Status(200),
    ]);
    grant_for(&s, "r").await;
    receiver.wait_for(1).await;
    let events = s.event_feed("?customer_user_id=r").await;
    let id = events["data"][0]["id"].as_str().unwrap().to_string();
    let event = wait_for_state(&s, &id, "pending", 1).await;
    assert_eq!(event["delivery"]["last_status"], 500);
    assert_eq!(
        event["delivery"]["next_attempt_at"],
        iso(s.now() + Duration::seconds(60))
    );
    s.advance(Duration::seconds(60));
    let event = wait_for_state(&s, &id, "pending", 2).await;
    assert_eq!(event["delivery"]["last_status"], Value::Null);
    assert!(event["delivery"]["last_error"]
        .as_str()
        .unwrap()
        .contains("no answer"));
    s.advance(Duration::seconds(300));
    let event = wait_for_state(&s, &id, "delivered", 3).await;
    assert_eq!(event["delivery"]["last_status"], 200);
    assert_eq!(receiver.received().len(), 3);

    // 404 counts as done: no retry.
    receiver.script(&[Answer::Status(404)]);
    grant_for(&s, "r").await;
    let events = s.event_feed("?customer_user_id=r").await;
    let id = events["data"][1]["id"].as_str().unwrap().to_string();
    let event = wait_for_state(&s, &id, "delivered", 1).await;
    assert_eq!(event["delivery"]["last_status"], 404);
    s.advance(Duration::seconds(400));
    receiver.exactly(4).await;

    // Every retry failing: marked failed, kept, and sent again on request.
    receiver.script(&[
        Answer::Status(503),
        Answer::Status(502),
        Answer::Status(500),
    ]);
    grant_for(&s, "r").await;
    let events = s.event_feed("?customer_user_id=r").await;
    let id = events["data"][2]["id"].as_str().unwrap().to_string();
    wait_for_state(&s, &id, "pending", 1).await;
    s.advance(Duration::seconds(60));
    wait_for_state(&s, &id, "pending", 2).await;
    s.advance(Duration::seconds(300));
    let event = wait_for_state(&s, &id, "failed", 3).await;
    assert_eq!(event["delivery"]["last_status"], 500);
    assert_eq!(event["delivery"]["next_attempt_at"], Value::Null);
    let (status, body) = s
        .send(
            Method::POST,
            &format!("/api/subgate/v1/events/{id}/redeliver/"),
            Some(SECRET),
            &[],
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    wait_for_state(&s, &id, "delivered", 4).await;
    assert_eq!(receiver.received().len(), 8);
}

async fn a_profiles_events_arrive_in_the_order_they_happened(backend: Backend) {
    let receiver = Receiver::start().await;
    let s = start(backend, &receiver).await;
    s.create("ordered").await;
    s.create("other").await;
    // The first event fails once; the four after it must wait for it.
    receiver.script(&[Answer::Status(500)]);
    for _ in 0..5 {
        grant_for(&s, "ordered").await;
    }
    let first = receiver.wait_for(1).await;
    assert_eq!(first[0].body["customer_user_id"], "ordered");
    // Another profile's event is not held up.
    grant_for(&s, "other").await;
    let early = receiver.wait_for(2).await;
    assert_eq!(early[1].body["customer_user_id"], "other");
    tokio::time::sleep(StdDuration::from_millis(300)).await;
    assert_eq!(receiver.received().len(), 2, "the rest wait for the first");
    s.advance(Duration::seconds(60));
    let all = receiver.exactly(7).await;
    let arrived: Vec<&str> = all
        .iter()
        .filter(|r| r.body["customer_user_id"] == "ordered")
        .map(|r| r.event_id())
        .collect();
    let events = s.event_feed("?customer_user_id=ordered").await;
    let created: Vec<&str> = events["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap())
        .collect();
    assert_eq!(created.len(), 5);
    assert_eq!(arrived[0], created[0]);
    assert_eq!(
        &arrived[1..],
        &created[..],
        "redelivery first, then in order"
    );
}

async fn the_event_feed_pages_filters_and_guards(backend: Backend) {
    let receiver = Receiver::start().await;
    let s = start(backend, &receiver).await;
    s.create("a").await;
    s.create("b").await;
    for cuid in ["a", "b", "a", "b", "a"] {
        grant_for(&s, cuid).await;
    }
    let page = s.event_feed("?limit=2").await;
    assert_eq!(page["data"].as_array().unwrap().len(), 2);
    let cursor = page["next_cursor"].as_str().unwrap().to_string();
    let rest = s.event_feed(&format!("?limit=10&cursor={cursor}")).await;
    assert_eq!(rest["data"].as_array().unwrap().len(), 3);
    assert_eq!(rest["next_cursor"], Value::Null);
    let only_a = s.event_feed("?customer_user_id=a").await;
    let events = only_a["data"].as_array().unwrap();
    assert_eq!(events.len(), 3);
    let profile_id = events[0]["profile_id"].as_str().unwrap();
    assert!(events.iter().all(|e| e["profile_id"] == profile_id));
    assert!(events
        .iter()
        .all(|e| e["event_type"] == "access_level_updated"));
    let by_id = s.event_feed(&format!("?profile_id={profile_id}")).await;
    let ids = |page: &Value| -> Vec<Value> {
        page["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["id"].clone())
            .collect()
    };
    assert_eq!(ids(&by_id), ids(&only_a));
    receiver.wait_for(5).await;

    let get = |path: String, key: &'static str| {
        let s = &s;
        async move { s.send(Method::GET, &path, Some(key), &[], None).await }
    };
    let (status, body) = get("/api/subgate/v1/events/".into(), PUBLIC).await;
    assert_error(status, &body, 401, "not_authenticated", "non_field_errors");
    let (status, body) = get("/api/subgate/v1/events/?limit=0".into(), SECRET).await;
    assert_error(status, &body, 400, "validation_error", "limit");
    let (status, body) = get("/api/subgate/v1/events/?cursor=abc".into(), SECRET).await;
    assert_error(status, &body, 400, "validation_error", "cursor");
    let (status, body) = get(
        "/api/subgate/v1/events/?customer_user_id=nobody".into(),
        SECRET,
    )
    .await;
    assert_error(status, &body, 404, "not_found", "non_field_errors");
    let (status, body) = get(
        format!("/api/subgate/v1/events/{}/", uuid::Uuid::new_v4()),
        SECRET,
    )
    .await;
    assert_error(status, &body, 404, "not_found", "non_field_errors");
    // Another app's key sees none of them.
    let id = events[0]["id"].as_str().unwrap();
    let (status, _) = get(format!("/api/subgate/v1/events/{id}/"), OTHER_SECRET).await;
    assert_eq!(status, 404);
}

async fn pending_events_are_delivered_after_a_restart(backend: Backend) {
    let db = TestDb::new(backend).await;
    // The receiver's port is closed at first: attempts fail and stay pending.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let config = config_with_webhook(&url, "[1, 1, 1, 1, 1, 1, 1, 1, 1]");
    let client = reqwest::Client::new();
    let mut node = Node::spawn_with(db.dir.path(), &db.url, &config).await;
    for cuid in ["x", "y"] {
        let (status, _) =
            crate::nodes::call(&client, &node.base, Method::POST, PROFILE, cuid, None)
                .await
                .unwrap();
        assert_eq!(status, 200);
        let (status, _) = crate::nodes::call(
            &client,
            &node.base,
            Method::POST,
            GRANT,
            cuid,
            Some(json!({"access_level_id": "premium"})),
        )
        .await
        .unwrap();
        assert_eq!(status, 200);
    }
    tokio::time::sleep(StdDuration::from_millis(300)).await;
    node.kill();
    let receiver = Receiver::start_on(port).await;
    let _node = Node::spawn_with(db.dir.path(), &db.url, &config).await;
    let received = receiver.wait_for(2).await;
    let who: HashSet<&str> = received
        .iter()
        .map(|r| r.body["customer_user_id"].as_str().unwrap())
        .collect();
    assert_eq!(who, HashSet::from(["x", "y"]));
}

async fn webhook_test_command_checks_an_endpoint(backend: Backend) {
    let receiver = Receiver::start().await;
    let db = TestDb::new(backend).await;
    let config = db.dir.path().join("hook.toml");
    std::fs::write(&config, config_with_webhook(&receiver.url, "[60]")).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_subgate"))
        .args(["webhook-test", "--app", "Test", "--config"])
        .arg(&config)
        .args(["--database-url", &db.url])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("200 OK"), "{stdout}");
    let received = receiver.wait_for(1).await;
    assert_eq!(received[0].body, json!({}));
    assert_eq!(received[0].header("authorization"), Some("Bearer s3cret"));
    assert!(received[0].header("webhook-signature").is_some());
}

/// Grants premium to `cuid` of the app `key` belongs to, creating the profile first.
async fn grant_as(s: &TestServer, key: &str, cuid: &str) {
    let who = [("adapty-customer-user-id", cuid)];
    let (status, body) = s
        .send(Method::POST, PROFILE, Some(key), &who, Some(json!({})))
        .await;
    assert_eq!(status, 200, "{body}");
    let grant =
        json!({"access_level_id": "premium", "expires_at": iso(s.now() + Duration::days(7))});
    let (status, body) = s
        .send(Method::POST, GRANT, Some(key), &who, Some(grant))
        .await;
    assert_eq!(status, 200, "{body}");
}

/// Who each event of the feed of the app `key` belongs to, and its delivery state.
async fn feed_of(s: &TestServer, key: &str) -> Vec<(String, String)> {
    s.event_feed_as(key, "").await["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["payload"]["customer_user_id"]
                    .as_str()
                    .unwrap()
                    .to_string(),
                e["delivery"]["state"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// With `events.retention_days`, settled events older than that are deleted; a pending one
/// is kept however old.
async fn settled_events_past_their_retention_are_deleted(backend: Backend) {
    // The Test app's webhook points at a port nothing listens on and retries after 100 days:
    // its events stay pending. The Other app has no webhook: its events are settled at once.
    let config = format!(
        "{}\n[events]\nretention_days = 30\n",
        config_with_webhook("http://127.0.0.1:9", "[8640000]")
    );
    let s = TestServer::start_with(TestDb::new(backend).await, &config).await;
    grant_as(&s, SECRET, "waiting").await;
    grant_as(&s, OTHER_SECRET, "old").await;
    assert_eq!(
        feed_of(&s, OTHER_SECRET).await,
        [("old".to_string(), "no_endpoint".to_string())]
    );

    s.advance(Duration::days(31));
    grant_as(&s, OTHER_SECRET, "recent").await;
    let deadline = std::time::Instant::now() + StdDuration::from_secs(20);
    loop {
        let other = feed_of(&s, OTHER_SECRET).await;
        if other.len() == 1 {
            assert_eq!(other[0].0, "recent");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{other:?}");
        tokio::time::sleep(StdDuration::from_millis(50)).await;
    }
    assert_eq!(
        feed_of(&s, SECRET).await,
        [("waiting".to_string(), "pending".to_string())]
    );
}

on_every_backend!(
    settled_events_past_their_retention_are_deleted,
    purchases_fire_adapty_events_with_adapty_payloads,
    expiry_events_fire_when_the_time_passes,
    failed_deliveries_are_retried_on_schedule_and_never_dropped,
    a_profiles_events_arrive_in_the_order_they_happened,
    the_event_feed_pages_filters_and_guards,
    pending_events_are_delivered_after_a_restart,
    webhook_test_command_checks_an_endpoint,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_nodes_send_each_event_once() {
    let receiver = Receiver::start().await;
    let db = TestDb::new(Backend::Postgres).await;
    let config = config_with_webhook(&receiver.url, "[1, 1, 1]");
    let a = Node::spawn_with(db.dir.path(), &db.url, &config).await;
    let b = Node::spawn_with(db.dir.path(), &db.url, &config).await;
    let client = reqwest::Client::new();
    let calls = (0..30).map(|i| {
        let (client, base) = (client.clone(), if i % 2 == 0 { &a.base } else { &b.base });
        async move {
            let cuid = format!("u{}", i % 10);
            crate::nodes::call(&client, base, Method::POST, PROFILE, &cuid, None)
                .await
                .unwrap();
            let (status, body) = crate::nodes::call(
                &client,
                base,
                Method::POST,
                GRANT,
                &cuid,
                Some(json!({"access_level_id": "premium"})),
            )
            .await
            .unwrap();
            assert_eq!(status, 200, "{body}");
        }
    });
    futures_util::future::join_all(calls).await;
    let received = receiver.exactly(30).await;
    let ids: HashSet<&str> = received.iter().map(Received::event_id).collect();
    assert_eq!(ids.len(), 30, "no event was sent twice");
}
