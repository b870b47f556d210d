//! What only a shared database has: two nodes racing on one PostgreSQL, a node losing its
//! database and getting it back, and the copy from SQLite to PostgreSQL.

use crate::common::*;
use crate::nodes::{call, Node};
use futures_util::future::join_all;
use reqwest::Method;
use serde_json::{json, Value};
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_nodes_on_one_database_never_lose_or_double_count() {
    let db = TestDb::new(Backend::Postgres).await;
    let a = Node::spawn(db.dir.path(), &db.url).await;
    let b = Node::spawn(db.dir.path(), &db.url).await;
    let nodes = [a.base.clone(), b.base.clone()];
    let client = reqwest::Client::new();
    let now = chrono::Utc::now();
    for cuid in ["buyer", "subscriber", "collector"] {
        let (status, body) = call(&client, &nodes[0], Method::POST, PROFILE, cuid, None)
            .await
            .unwrap();
        assert_eq!(status, 200, "{body}");
    }

    // 60 distinct purchases for one user, alternating nodes, all at once.
    let distinct = (0..60).map(|i| {
        let (client, base) = (client.clone(), nodes[i % 2].clone());
        async move {
            let body = one_time(&format!("d{i}"), "com.test.coins", 0.99, now);
            call(
                &client,
                &base,
                Method::POST,
                SET_TRANSACTION,
                "buyer",
                Some(body),
            )
            .await
            .unwrap()
        }
    });
    // The same purchase posted 20 times to each node at once.
    let same = (0..40).map(|i| {
        let (client, base) = (client.clone(), nodes[i % 2].clone());
        async move {
            let body = subscription("same", "same", now);
            call(
                &client,
                &base,
                Method::POST,
                SET_TRANSACTION,
                "subscriber",
                Some(body),
            )
            .await
            .unwrap()
        }
    });
    // 40 new attributes for one profile: exactly 30 may land.
    let attributes = (0..40).map(|i| {
        let (client, base) = (client.clone(), nodes[i % 2].clone());
        async move {
            let body = json!({"custom_attributes": {format!("k{i}"): i}});
            call(
                &client,
                &base,
                Method::POST,
                PROFILE,
                "collector",
                Some(body),
            )
            .await
            .unwrap()
        }
    });
    // One new user created on both nodes at once.
    let creates = (0..20).map(|i| {
        let (client, base) = (client.clone(), nodes[i % 2].clone());
        async move {
            call(
                &client,
                &base,
                Method::POST,
                PROFILE,
                "twin",
                Some(json!({})),
            )
            .await
            .unwrap()
        }
    });
    let (distinct, same, attributes, creates) = tokio::join!(
        join_all(distinct),
        join_all(same),
        join_all(attributes),
        join_all(creates)
    );
    for (status, body) in distinct.iter().chain(&same).chain(&creates) {
        assert_eq!(*status, 200, "{body}");
    }
    let accepted = attributes.iter().filter(|(s, _)| *s == 200).count();
    assert_eq!(accepted, 30, "{attributes:?}");
    assert!(attributes.iter().all(|(s, _)| *s == 200 || *s == 400));
    let twins: HashSet<&str> = creates
        .iter()
        .map(|(_, b)| b["data"]["profile_id"].as_str().unwrap())
        .collect();
    assert_eq!(twins.len(), 1, "one profile for one customer user id");

    // Both nodes read the same, complete state.
    for base in &nodes {
        let get = |cuid: &'static str| {
            let (client, base) = (client.clone(), base.clone());
            async move {
                let (status, body) = call(&client, &base, Method::GET, PROFILE, cuid, None)
                    .await
                    .unwrap();
                assert_eq!(status, 200, "{body}");
                body["data"].clone()
            }
        };
        let buyer = get("buyer").await;
        assert_eq!(buyer["non_subscriptions"].as_array().unwrap().len(), 60);
        assert_eq!(buyer["total_revenue_usd"], 59.4);
        let subscriber = get("subscriber").await;
        assert_eq!(subscriber["subscriptions"].as_array().unwrap().len(), 1);
        assert_eq!(subscriber["total_revenue_usd"], 9.99);
        let collector = get("collector").await;
        assert_eq!(collector["custom_attributes"].as_array().unwrap().len(), 30);
    }

    // Each node sees the other's write on the very next read.
    for i in 0..20 {
        let (writer, reader) = (&nodes[i % 2], &nodes[(i + 1) % 2]);
        let body = json!({"custom_attributes": {"round": i}});
        let (status, _) = call(
            &client,
            writer,
            Method::POST,
            PROFILE,
            "pingpong",
            Some(body),
        )
        .await
        .unwrap();
        assert_eq!(status, 200);
        let (_, read) = call(&client, reader, Method::GET, PROFILE, "pingpong", None)
            .await
            .unwrap();
        assert_eq!(
            read["data"]["custom_attributes"],
            json!([{"key": "round", "value": i as f64}])
        );
    }
}

/// A TCP relay between a node and PostgreSQL that can be cut (connections reset, new ones
/// refused) and restored on the same port.
struct Relay {
    port: u16,
    target: String,
    tasks: Arc<Mutex<Vec<JoinHandle<()>>>>,
    acceptor: Option<JoinHandle<()>>,
}

impl Relay {
    async fn start(target: String) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut relay = Relay {
            port,
            target,
            tasks: Arc::default(),
            acceptor: None,
        };
        relay.accept_on(listener);
        relay
    }

    fn accept_on(&mut self, listener: TcpListener) {
        let (target, tasks) = (self.target.clone(), self.tasks.clone());
        self.acceptor = Some(tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let target = target.clone();
                let task = tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(&target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                tasks.lock().unwrap().push(task);
            }
        }));
    }

    fn cut(&mut self) {
        if let Some(acceptor) = self.acceptor.take() {
            acceptor.abort();
        }
        for task in self.tasks.lock().unwrap().drain(..) {
            task.abort();
        }
    }

    async fn restore(&mut self) {
        let listener = TcpListener::bind(("127.0.0.1", self.port)).await.unwrap();
        self.accept_on(listener);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_that_loses_its_database_answers_503_and_recovers() {
    let db = TestDb::new(Backend::Postgres).await;
    let config: tokio_postgres::Config = postgres_base_url().parse().unwrap();
    let host = match &config.get_hosts()[0] {
        tokio_postgres::config::Host::Tcp(host) => host.clone(),
        other => panic!("the relay needs a TCP PostgreSQL, not {other:?}"),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let mut relay = Relay::start(format!("{host}:{port}")).await;
    let relayed_url = db.url.replace(
        &format!("{host}:{port}"),
        &format!("127.0.0.1:{}", relay.port),
    );
    assert_ne!(relayed_url, db.url, "the URL must go through the relay");
    let mut db = db;
    db.url = relayed_url;
    let s = TestServer::start_on(db).await;
    s.create("survivor").await;

    relay.cut();
    let started = Instant::now();
    let (status, body) = s.profile(Method::GET, "survivor", None).await;
    assert_error(
        status,
        &body,
        503,
        "service_unavailable",
        "non_field_errors",
    );
    let (status, body) = s
        .profile(
            Method::PATCH,
            "survivor",
            Some(json!({"first_name": "Ann"})),
        )
        .await;
    assert_error(
        status,
        &body,
        503,
        "service_unavailable",
        "non_field_errors",
    );
    let ready = s
        .client
        .get(format!("{}/ready", s.base))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 503);
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "a lost database is answered promptly, not hung on"
    );

    relay.restore().await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, body) = s.profile(Method::GET, "survivor", None).await;
        if status == 200 {
            assert_eq!(body["data"]["customer_user_id"], "survivor");
            assert_eq!(
                body["data"]["first_name"],
                Value::Null,
                "the failed write left nothing"
            );
            break;
        }
        assert_eq!(status, 503, "{body}");
        assert!(Instant::now() < deadline, "the node did not recover");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (status, _) = s
        .profile(
            Method::PATCH,
            "survivor",
            Some(json!({"first_name": "Ann"})),
        )
        .await;
    assert_eq!(status, 200);
}

/// Everything a profile can hold, on a few profiles, written through the API.
async fn seed(s: &TestServer) {
    let now = s.now();
    let (status, body) = s
        .profile(
            Method::POST,
            "full",
            Some(json!({
                "first_name": "Ada", "email": "ada@example.com", "birthday": "1990-02-03",
                "custom_attributes": {"plan": "gold", "words": 120},
                "installation_meta": {"device_id": "d1", "app_version": "1.2"},
            })),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    for (id, at) in [("s1", 40), ("s2", 10)] {
        s.transaction(
            "full",
            subscription(id, "s1", now - chrono::Duration::days(at)),
        )
        .await;
    }
    s.transaction("full", one_time("life", "com.test.lifetime", 49.0, now))
        .await;
    let refunded = with(
        one_time(
            "coin",
            "com.test.coins",
            1.99,
            now - chrono::Duration::days(1),
        ),
        json!({"refunded_at": iso(now), "cancellation_reason": "refund"}),
    );
    s.transaction("full", refunded).await;
    s.create("granted").await;
    for (cuid, level) in [("granted", "premium"), ("full", "pro")] {
        let (status, body) = s
            .post(
                GRANT,
                cuid,
                json!({"access_level_id": level, "expires_at": iso(now + chrono::Duration::days(7))}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
    }
    let (status, body) = s
        .post(REVOKE, "granted", json!({"access_level_id": "premium"}))
        .await;
    assert_eq!(status, 200, "{body}");
    // A deleted profile leaves its purchases behind, detached.
    s.create("leaver").await;
    s.transaction("leaver", one_time("left", "com.test.coins", 5.0, now))
        .await;
    let (status, _) = s.profile(Method::DELETE, "leaver", None).await;
    assert_eq!(status, 204);
}

fn copy_store(from: &str, to: &str, overwrite: bool) -> std::process::Output {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_subgate"));
    command.args(["copy-store", "--from", from, "--to", to]);
    if overwrite {
        command.arg("--overwrite");
    }
    command.env("SUBGATE_LOG", "warn").output().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn copy_store_moves_a_sqlite_install_to_postgres() {
    let sqlite = TestServer::start(Backend::Sqlite).await;
    seed(&sqlite).await;
    let mut anonymous = Vec::new();
    for _ in 0..3 {
        let id = uuid::Uuid::new_v4().to_string();
        let (status, body) = sqlite
            .send(
                Method::POST,
                PROFILE,
                Some(SECRET),
                &[("adapty-profile-id", &id)],
                Some(json!({"custom_attributes": {"anon": 1}})),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        anonymous.push(id);
    }

    let target = TestDb::new(Backend::Postgres).await;
    let out = copy_store(&sqlite.db.url, &target.url, false);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("5 profiles")
            && stdout.contains("1 detached transactions")
            && !stdout.contains(" 0 events"),
        "{stdout}"
    );

    // A second copy into the now non-empty target is refused, unless told to.
    let again = copy_store(&sqlite.db.url, &target.url, false);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--overwrite"));
    let forced = copy_store(&sqlite.db.url, &target.url, true);
    assert!(
        forced.status.success(),
        "{}",
        String::from_utf8_lossy(&forced.stderr)
    );

    let postgres = TestServer::start_on(target).await;
    postgres.clock.set(sqlite.now());
    let mut compared = 0;
    let mut headers: Vec<(&str, String)> = vec![
        ("adapty-customer-user-id", "full".into()),
        ("adapty-customer-user-id", "granted".into()),
    ];
    headers.extend(anonymous.iter().map(|id| ("adapty-profile-id", id.clone())));
    for (header, value) in &headers {
        let who = [(*header, value.as_str())];
        let (status_a, a) = sqlite
            .send(Method::GET, PROFILE, Some(SECRET), &who, None)
            .await;
        let (status_b, b) = postgres
            .send(Method::GET, PROFILE, Some(SECRET), &who, None)
            .await;
        assert_eq!(
            (status_a.as_u16(), status_b.as_u16()),
            (200, 200),
            "{a} {b}"
        );
        assert_eq!(a, b, "{header}: {value} reads the same from both stores");
        compared += 1;
    }
    assert_eq!(compared, 5);
    // The event feed came along, cursors included.
    let (a, b) = (sqlite.event_feed("").await, postgres.event_feed("").await);
    assert!(a["data"].as_array().is_some_and(|e| e.len() > 5), "{a}");
    assert_eq!(a, b);
    // The deleted user's history came along, detached: posting it again on PostgreSQL brings
    // it back exactly as it would on SQLite.
    for s in [&sqlite, &postgres] {
        s.create("returner").await;
        let p = s
            .transaction(
                "returner",
                one_time("left", "com.test.coins", 5.0, start_of_test_time()),
            )
            .await;
        assert_eq!(p["non_subscriptions"].as_array().unwrap().len(), 1);
    }
    let (_, a) = sqlite.profile(Method::GET, "returner", None).await;
    let (_, b) = postgres.profile(Method::GET, "returner", None).await;
    assert_eq!(
        a["data"]["non_subscriptions"][0]["purchase_id"],
        b["data"]["non_subscriptions"][0]["purchase_id"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn documents_stored_as_jsonb_by_an_older_version_are_migrated_with_their_data() {
    let db = TestDb::new(Backend::Postgres).await;
    let client = reqwest::Client::new();
    let now = chrono::Utc::now();
    let profile = |base: String| {
        let client = client.clone();
        async move {
            let (status, body) = call(&client, &base, Method::GET, PROFILE, "kept", None)
                .await
                .unwrap();
            assert_eq!(status, 200, "{body}");
            body["data"].clone()
        }
    };
    let before = {
        let node = Node::spawn(db.dir.path(), &db.url).await;
        let attributes = json!({"custom_attributes": {"plan": "gold", "words": 12}});
        let (status, body) = call(
            &client,
            &node.base,
            Method::POST,
            PROFILE,
            "kept",
            Some(attributes),
        )
        .await
        .unwrap();
        assert_eq!(status, 200, "{body}");
        let purchase = one_time("kept-1", "com.test.coins", 0.99, now);
        let (status, body) = call(
            &client,
            &node.base,
            Method::POST,
            SET_TRANSACTION,
            "kept",
            Some(purchase),
        )
        .await
        .unwrap();
        assert_eq!(status, 200, "{body}");
        profile(node.base.clone()).await
    };

    // Back to schema version 2: the documents as jsonb, as versions before 0003 wrote them,
    // transactions only in their own table, as before 0004, their indexes before 0006, and no
    // stored answers, as before 0007, nor the hash index of 0008.
    let pg = pg_connect(&db.url).await;
    pg.batch_execute(
        "DROP INDEX profiles_customer_user_id_hash;
         DROP TRIGGER profiles_drop_stale_rendered ON profiles;
         DROP FUNCTION profiles_drop_stale_rendered();
         ALTER TABLE profiles ALTER COLUMN doc TYPE jsonb USING doc::jsonb;
         ALTER TABLE transactions ALTER COLUMN data TYPE jsonb USING data::jsonb;
         ALTER TABLE events ALTER COLUMN payload TYPE jsonb USING payload::jsonb;
         ALTER TABLE profiles DROP COLUMN transactions;
         ALTER TABLE profiles DROP COLUMN rendered;
         DROP INDEX transactions_chain;
         CREATE INDEX transactions_chain
             ON transactions (app_id, store, store_original_transaction_id);
         CREATE INDEX transactions_profile ON transactions (app_id, profile_id, position);
         DELETE FROM subgate_migrations WHERE version >= 3;",
    )
    .await
    .unwrap();

    let node = Node::spawn(db.dir.path(), &db.url).await;
    let after = profile(node.base.clone()).await;
    for field in ["custom_attributes", "non_subscriptions", "profile_id"] {
        assert_eq!(after[field], before[field], "{field}");
    }
    assert_eq!(
        before["non_subscriptions"].as_array().map(Vec::len),
        Some(1)
    );
    let types = strings(
        &pg,
        "SELECT data_type FROM information_schema.columns
         WHERE table_schema = current_schema()
           AND (table_name, column_name) IN
               (('profiles', 'doc'), ('transactions', 'data'), ('events', 'payload'))",
    )
    .await;
    assert_eq!(types, ["json", "json", "json"]);

    // Migration 0005: LZ4 where the server has it (then this setting is accepted), else pglz.
    let lz4 = pg
        .batch_execute("SET default_toast_compression = lz4")
        .await
        .is_ok();
    let methods = strings(
        &pg,
        "SELECT attcompression::text FROM pg_attribute
         WHERE (attrelid, attname) IN (('profiles'::regclass, 'doc'),
             ('profiles'::regclass, 'transactions'), ('transactions'::regclass, 'data'),
             ('events'::regclass, 'payload'))",
    )
    .await;
    assert_eq!(methods, [if lz4 { "l" } else { "" }; 4]);

    // Migration 0006: no index by profile, and the chain index only for later transactions.
    let indexes = strings(
        &pg,
        "SELECT indexname || ': ' || indexdef FROM pg_indexes
         WHERE schemaname = current_schema() AND tablename = 'transactions'
           AND indexname IN ('transactions_profile', 'transactions_chain')",
    )
    .await;
    assert_eq!(indexes.len(), 1, "{indexes:?}");
    assert!(
        indexes[0].starts_with("transactions_chain: ")
            && indexes[0]
                .ends_with("WHERE (store_original_transaction_id <> store_transaction_id)"),
        "{indexes:?}"
    );
}

/// During a rolling upgrade, nodes of the version before stored answers still write profiles,
/// without knowing of them: such a write drops the answer instead of leaving one that shows
/// the profile as it was.
#[tokio::test]
async fn a_write_by_a_node_unaware_of_stored_answers_drops_the_stale_one() {
    let db = TestDb::new(Backend::Postgres).await;
    let client = reqwest::Client::new();
    let node = Node::spawn(db.dir.path(), &db.url).await;
    let plan = || {
        let (client, base) = (client.clone(), node.base.clone());
        async move {
            let (status, body) = call(&client, &base, Method::GET, PROFILE, "kept", None)
                .await
                .unwrap();
            assert_eq!(status, 200, "{body}");
            body["data"]["custom_attributes"].clone()
        }
    };
    let set_plan = |value: &'static str| {
        let (client, base) = (client.clone(), node.base.clone());
        async move {
            let body = json!({"custom_attributes": {"plan": value}});
            let (status, body) = call(&client, &base, Method::POST, PROFILE, "kept", Some(body))
                .await
                .unwrap();
            assert_eq!(status, 200, "{body}");
        }
    };
    let pg = pg_connect(&db.url).await;
    let stored = || async {
        strings(
            &pg,
            "SELECT (rendered IS NOT NULL)::text FROM profiles WHERE customer_user_id = 'kept'",
        )
        .await
    };
    set_plan("gold").await;
    assert_eq!(stored().await, ["true"], "a write stores its answer");
    assert_eq!(plan().await, json!([{"key": "plan", "value": "gold"}]));

    // What a node of the earlier version writes: the new document and version, nothing else.
    pg.batch_execute(
        "UPDATE profiles
         SET doc = jsonb_set(doc::jsonb, '{attributes,plan}', '\"silver\"')::json,
             version = version + 1
         WHERE customer_user_id = 'kept'",
    )
    .await
    .unwrap();
    assert_eq!(stored().await, ["false"]);
    assert_eq!(plan().await, json!([{"key": "plan", "value": "silver"}]));

    // This version's writes store answers again; rewriting a row unchanged keeps its answer.
    set_plan("bronze").await;
    assert_eq!(stored().await, ["true"]);
    pg.batch_execute("UPDATE profiles SET doc = doc, rendered = rendered")
        .await
        .unwrap();
    assert_eq!(stored().await, ["true"]);
    assert_eq!(plan().await, json!([{"key": "plan", "value": "bronze"}]));
}

/// The first column of every row `sql` returns.
async fn strings(pg: &tokio_postgres::Client, sql: &str) -> Vec<String> {
    pg.query(sql, &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}
