use chrono::{DateTime, Duration, TimeZone, Utc};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use std::sync::Arc;
use subgate_core::ManualClock;
use subgate_server::config::Settings;
use subgate_server::Running;

pub const SECRET: &str = "secret_test_key";
pub const PUBLIC: &str = "public_test_key";
pub const OTHER_SECRET: &str = "secret_other_app";

/// The config every test server starts from: two apps, products in every kind of store.
pub const CONFIG: &str = r#"
[server]
listen = "127.0.0.1:0"

[[apps]]
id = "5d3c1c1e-9a57-4d8e-b5e2-0c9a4a1f2b10"
name = "Test"
public_keys = ["public_test_key"]
secret_keys = ["secret_test_key"]
custom_stores = ["web"]

[[apps.access_levels]]
id = "premium"

[[apps.access_levels]]
id = "pro"

[[apps.products]]
id = "monthly"
access_level_id = "premium"
type = "subscription"
store_product_ids = { app_store = "com.test.monthly", play_store = "monthly", stripe = "prod_123", web = "web_monthly" }

[[apps.products]]
id = "pro_yearly"
access_level_id = "pro"
type = "subscription"
store_product_ids = { app_store = "com.test.pro" }

[[apps.products]]
id = "lifetime"
access_level_id = "premium"
type = "one_time"
store_product_ids = { app_store = "com.test.lifetime", web = "web_lifetime" }

[[apps.products]]
id = "coins"
type = "consumable"
store_product_ids = { app_store = "com.test.coins" }

[[apps]]
name = "Other"
secret_keys = ["secret_other_app"]
"#;

pub fn start_of_test_time() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2025, 6, 1, 12, 0, 0).unwrap()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// The PostgreSQL server the suite uses; these machines and CI run one with trust auth.
pub fn postgres_base_url() -> String {
    std::env::var("SUBGATE_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_string())
}

/// A fresh, empty database for one test: a SQLite file in a temporary directory, or a new
/// PostgreSQL schema (dropped when the test ends). A missing PostgreSQL fails the test.
pub struct TestDb {
    pub url: String,
    pub dir: tempfile::TempDir,
    schema: Option<String>,
}

impl TestDb {
    pub async fn new(backend: Backend) -> Self {
        let dir = tempfile::tempdir().unwrap();
        match backend {
            Backend::Sqlite => Self {
                url: format!("sqlite://{}", dir.path().join("test.db").display()),
                dir,
                schema: None,
            },
            Backend::Postgres => {
                let schema = format!("subgate_test_{}", uuid::Uuid::new_v4().simple());
                let base = postgres_base_url();
                let client = pg_connect(&base).await;
                client
                    .batch_execute(&format!("CREATE SCHEMA {schema}"))
                    .await
                    .unwrap();
                let separator = if base.contains('?') { '&' } else { '?' };
                Self {
                    url: format!("{base}{separator}options=-csearch_path%3D{schema}"),
                    dir,
                    schema: Some(schema),
                }
            }
        }
    }
}

pub async fn pg_connect(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "the PostgreSQL tests need a server at {url} (set SUBGATE_TEST_POSTGRES to \
                 another one): {e}"
            )
        });
    tokio::spawn(connection);
    client
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let Some(schema) = self.schema.take() else {
            return;
        };
        // Drop runs inside the test's runtime, which cannot be blocked on: clean up from a
        // thread with its own.
        let cleanup = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                let client = pg_connect(&postgres_base_url()).await;
                let _ = client
                    .batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
                    .await;
            });
        });
        let _ = cleanup.join();
    }
}

pub struct TestServer {
    pub base: String,
    pub clock: Arc<ManualClock>,
    pub client: reqwest::Client,
    pub db: TestDb,
    // Held so the server lives as long as the test.
    _running: Running,
}

/// `config`, on `database_url`, listening on a free port.
pub fn settings_from(config: &str, dir: &std::path::Path, database_url: &str) -> Settings {
    let path = dir.join("subgate.toml");
    std::fs::write(&path, config).unwrap();
    let overrides = subgate_server::config::Overrides {
        listen: Some("127.0.0.1:0".into()),
        database_url: Some(database_url.to_string()),
    };
    Settings::load(Some(&path), &overrides).unwrap()
}

impl TestServer {
    pub async fn start(backend: Backend) -> Self {
        Self::start_on(TestDb::new(backend).await).await
    }

    pub async fn start_on(db: TestDb) -> Self {
        Self::start_with(db, CONFIG).await
    }

    pub async fn start_with(db: TestDb, config: &str) -> Self {
        let settings = settings_from(config, db.dir.path(), &db.url);
        let clock = Arc::new(ManualClock::new(start_of_test_time()));
        let running = subgate_server::start(&settings, clock.clone())
            .await
            .unwrap();
        Self {
            base: format!("http://{}", running.addr),
            clock,
            client: reqwest::Client::new(),
            db,
            _running: running,
        }
    }

    pub fn now(&self) -> DateTime<Utc> {
        subgate_core::Clock::now(&*self.clock)
    }

    pub fn advance(&self, by: Duration) {
        self.clock.advance(by);
    }

    /// Sends a request and returns the status, the Request-Id header and the JSON body
    /// (`Null` when there is none).
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        key: Option<&str>,
        who: &[(&str, &str)],
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut req = self.client.request(method, format!("{}{path}", self.base));
        if let Some(key) = key {
            req = req.header("Authorization", format!("Api-Key {key}"));
        }
        for (k, v) in who {
            req = req.header(*k, *v);
        }
        if let Some(body) = body {
            req = req.json(&body);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status();
        let request_id = resp
            .headers()
            .get("request-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let id = request_id.expect("every response carries a Request-Id");
        assert!(
            id.len() == 32 && id.chars().all(|c| c.is_ascii_hexdigit()),
            "{id}"
        );
        let text = resp.text().await.unwrap();
        let value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"))
        };
        (status, value)
    }

    pub async fn profile(
        &self,
        method: Method,
        cuid: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        self.send(
            method,
            PROFILE,
            Some(SECRET),
            &[("adapty-customer-user-id", cuid)],
            body,
        )
        .await
    }

    pub async fn create(&self, cuid: &str) -> Value {
        let (status, body) = self.profile(Method::POST, cuid, Some(json!({}))).await;
        assert_eq!(status, 200, "{body}");
        body["data"].clone()
    }

    pub async fn get(&self, cuid: &str) -> Value {
        let (status, body) = self.profile(Method::GET, cuid, None).await;
        assert_eq!(status, 200, "{body}");
        body["data"].clone()
    }

    pub async fn post(&self, path: &str, cuid: &str, body: Value) -> (StatusCode, Value) {
        self.send(
            Method::POST,
            path,
            Some(SECRET),
            &[("adapty-customer-user-id", cuid)],
            Some(body),
        )
        .await
    }

    /// The Test app's event feed (`query` starts with `?`, or is empty), which must answer 200.
    pub async fn event_feed(&self, query: &str) -> Value {
        self.event_feed_as(SECRET, query).await
    }

    /// The event feed of the app `key` belongs to.
    pub async fn event_feed_as(&self, key: &str, query: &str) -> Value {
        let (status, body) = self
            .send(
                Method::GET,
                &format!("/api/subgate/v1/events/{query}"),
                Some(key),
                &[],
                None,
            )
            .await;
        assert_eq!(status, 200, "{body}");
        body
    }

    pub async fn transaction(&self, cuid: &str, body: Value) -> Value {
        let (status, resp) = self.post(SET_TRANSACTION, cuid, body).await;
        assert_eq!(status, 200, "{resp}");
        resp["data"].clone()
    }
}

pub const PROFILE: &str = "/api/v2/server-side-api/profile/";
pub const SET_TRANSACTION: &str = "/api/v2/server-side-api/purchase/set/transaction/";
pub const GRANT: &str = "/api/v2/server-side-api/purchase/profile/grant/access-level/";
pub const GRANT_ALIAS: &str = "/api/v2/server-side-api/grant/access-level/";
pub const REVOKE: &str = "/api/v2/server-side-api/purchase/profile/revoke/access-level/";

pub fn iso(dt: DateTime<Utc>) -> String {
    subgate_core::time::format_v2(&dt)
}

/// A valid monthly subscription purchased at `at`, expiring 30 days later.
pub fn subscription(id: &str, original: &str, at: DateTime<Utc>) -> Value {
    json!({
        "purchase_type": "subscription",
        "store": "app_store",
        "environment": "Production",
        "store_product_id": "com.test.monthly",
        "store_transaction_id": id,
        "store_original_transaction_id": original,
        "price": {"country": "US", "currency": "USD", "value": 9.99},
        "purchased_at": iso(at),
        "originally_purchased_at": iso(at),
        "expires_at": iso(at + Duration::days(30)),
        "renew_status": true,
    })
}

pub fn one_time(id: &str, product: &str, value: f64, at: DateTime<Utc>) -> Value {
    json!({
        "purchase_type": "one_time_purchase",
        "store": "app_store",
        "store_product_id": product,
        "store_transaction_id": id,
        "store_original_transaction_id": id,
        "price": {"country": "US", "currency": "USD", "value": value},
        "purchased_at": iso(at),
    })
}

pub fn with(mut base: Value, changes: Value) -> Value {
    for (k, v) in changes.as_object().unwrap() {
        if v.is_null() && k.starts_with('-') {
            base.as_object_mut().unwrap().remove(&k[1..]);
        } else {
            base[k] = v.clone();
        }
    }
    base
}

pub fn level<'a>(profile: &'a Value, id: &str) -> Option<&'a Value> {
    profile["access_levels"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["access_level_id"] == id)
}

/// Whether the level is active at `now` by the v2 rule clients use: `expires_at` null or later.
pub fn is_active(profile: &Value, id: &str, now: DateTime<Utc>) -> bool {
    level(profile, id).is_some_and(|l| {
        let starts_ok = l["starts_at"]
            .as_str()
            .is_none_or(|s| subgate_core::time::parse_datetime(s).unwrap() <= now);
        let expires_ok = l["expires_at"]
            .as_str()
            .is_none_or(|s| subgate_core::time::parse_datetime(s).unwrap() > now);
        starts_ok && expires_ok
    })
}

pub fn assert_error(
    status: StatusCode,
    body: &Value,
    expected_status: u16,
    code: &str,
    source: &str,
) {
    assert_eq!(status.as_u16(), expected_status, "{body}");
    assert_eq!(body["error_code"], code, "{body}");
    assert_eq!(body["status_code"], expected_status, "{body}");
    assert_eq!(body["errors"][0]["source"], source, "{body}");
    assert!(
        !body["errors"][0]["errors"][0].as_str().unwrap().is_empty(),
        "{body}"
    );
}
