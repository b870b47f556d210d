//! Stripe validation against localstripe, a stateful Stripe stand-in from PyPI, installed into
//! target/tmp on first use and started per test on a free loopback port.

use crate::common::*;
use reqwest::Method;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const LOCALSTRIPE: &str = "localstripe==1.15.10";
const STRIPE_KEY: &str = "sk_test_subgate";
const PLAIN_SECRET: &str = "secret_plain_app";
const VALIDATE: &str = "/api/v1/sdk/purchase/stripe/token/validate/";

/// Installs localstripe once per test run into a virtualenv under target/tmp.
fn localstripe_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let venv = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("localstripe-venv");
        let bin = venv.join("bin").join("localstripe");
        if !bin.exists() {
            let run = |cmd: &mut Command| {
                let out = cmd
                    .output()
                    .expect("python3 is needed for the Stripe tests");
                assert!(
                    out.status.success(),
                    "installing {LOCALSTRIPE} failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            };
            run(Command::new("python3").args(["-m", "venv"]).arg(&venv));
            run(Command::new(venv.join("bin").join("pip")).args([
                "install",
                "--quiet",
                "--disable-pip-version-check",
                LOCALSTRIPE,
            ]));
        }
        bin
    })
    .clone()
}

struct LocalStripe {
    url: String,
    child: Child,
    client: reqwest::Client,
}

impl Drop for LocalStripe {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl LocalStripe {
    async fn start() -> LocalStripe {
        let bin = tokio::task::spawn_blocking(localstripe_bin).await.unwrap();
        let port = free_port();
        let child = Command::new(bin)
            .args(["--port", &port.to_string(), "--from-scratch"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stripe = LocalStripe {
            url: format!("http://127.0.0.1:{port}"),
            child,
            client: reqwest::Client::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = stripe
                .client
                .get(format!("{}/v1/customers", stripe.url))
                .basic_auth(STRIPE_KEY, Some(""))
                .send()
                .await
                .is_ok_and(|r| r.status() == 200);
            if ready {
                return stripe;
            }
            assert!(Instant::now() < deadline, "localstripe did not start");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn post(&self, path: &str, form: &[(&str, &str)]) -> Value {
        let response = self
            .client
            .post(format!("{}{path}", self.url))
            .basic_auth(STRIPE_KEY, Some(""))
            .form(form)
            .send()
            .await
            .unwrap();
        let status = response.status();
        let body: Value = response.json().await.unwrap();
        assert!(status.is_success(), "{path}: {status} {body}");
        body
    }

    async fn id(&self, path: &str, form: &[(&str, &str)]) -> String {
        self.post(path, form).await["id"]
            .as_str()
            .unwrap()
            .to_string()
    }

    async fn product(&self, name: &str) -> String {
        self.id("/v1/products", &[("name", name), ("type", "service")])
            .await
    }

    /// A customer with a card, subscribed to a new monthly plan of `product`.
    async fn subscription(&self, product: &str, cents: &str) -> (String, String) {
        let plan = self
            .id(
                "/v1/plans",
                &[
                    ("amount", cents),
                    ("currency", "usd"),
                    ("interval", "month"),
                    ("product", product),
                ],
            )
            .await;
        let customer = self
            .id(
                "/v1/customers",
                &[
                    ("email", "web@example.com"),
                    ("source[object]", "card"),
                    ("source[number]", "4242424242424242"),
                    ("source[exp_month]", "12"),
                    ("source[exp_year]", "2040"),
                    ("source[cvc]", "123"),
                ],
            )
            .await;
        let sub = self
            .id(
                "/v1/subscriptions",
                &[("customer", &customer), ("items[0][plan]", &plan)],
            )
            .await;
        (sub, plan)
    }

    /// A confirmed one-time payment for `product`.
    async fn payment(&self, product: &str, cents: &str) -> String {
        let intent = self
            .id(
                "/v1/payment_intents",
                &[
                    ("amount", cents),
                    ("currency", "usd"),
                    ("payment_method", "pm_card_visa"),
                    ("metadata[product_id]", product),
                ],
            )
            .await;
        let confirmed = self
            .post(&format!("/v1/payment_intents/{intent}/confirm"), &[])
            .await;
        assert_eq!(confirmed["status"], "succeeded", "{confirmed}");
        intent
    }
}

/// The test config with the Test app on `stripe_url`, its products mapped to the Stripe ones;
/// the Other app on a Stripe that is down; and a Plain app without Stripe.
fn config(stripe_url: &str, monthly: &str, lifetime: &str) -> String {
    let closed = free_port();
    let test_app_stripe =
        format!("\n[apps.stripe]\nsecret_key = \"{STRIPE_KEY}\"\napi_base = \"{stripe_url}\"\n");
    let other = "\n[[apps]]\nname = \"Other\"";
    let config = CONFIG
        .replace("prod_123", monthly)
        .replace(
            "web = \"web_lifetime\" }",
            &format!("web = \"web_lifetime\", stripe = \"{lifetime}\" }}"),
        )
        .replace(other, &format!("{test_app_stripe}{other}"));
    format!(
        "{config}\n[apps.stripe]\nsecret_key = \"sk_test_down\"\napi_base = \"http://127.0.0.1:{closed}\"\n\n[[apps]]\nname = \"Plain\"\nsecret_keys = [\"{PLAIN_SECRET}\"]\n"
    )
}

async fn validate(s: &TestServer, key: &str, body: Value) -> (reqwest::StatusCode, Value) {
    let response = s
        .client
        .post(format!("{}{VALIDATE}", s.base))
        .header("Authorization", format!("Api-Key {key}"))
        .header("Content-Type", "application/vnd.api+json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let status = response.status();
    (status, response.json().await.unwrap())
}

fn wrapped(cuid: &str, token: &str) -> Value {
    json!({"data": {"type": "stripe_receipt_validation_result",
                    "attributes": {"customer_user_id": cuid, "stripe_token": token}}})
}

fn without_timestamp(mut profile: Value) -> Value {
    profile.as_object_mut().unwrap().remove("timestamp");
    profile
}

async fn stripe_purchases_import_once_with_their_history(backend: Backend) {
    let stripe = LocalStripe::start().await;
    let monthly = stripe.product("Monthly").await;
    let lifetime = stripe.product("Lifetime").await;
    let (sub, plan) = stripe.subscription(&monthly, "999").await;
    let intent = stripe.payment(&lifetime, "4900").await;
    let s = TestServer::start_with(
        TestDb::new(backend).await,
        &config(&stripe.url, &monthly, &lifetime),
    )
    .await;
    // Stripe stamps real times; the server's clock must be in the same era.
    s.clock.set(chrono::Utc::now());

    let (status, body) = validate(&s, SECRET, wrapped("web-user", &sub)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, json!({"data": null}));
    let p = s.get("web-user").await;
    let subs = p["subscriptions"].as_array().unwrap();
    assert_eq!(subs.len(), 1);
    assert_eq!(subs[0]["store"], "stripe");
    assert_eq!(subs[0]["store_product_id"], monthly.as_str());
    assert_eq!(subs[0]["store_base_plan_id"], plan.as_str());
    assert_eq!(subs[0]["store_original_transaction_id"], sub.as_str());
    assert!(subs[0]["store_transaction_id"]
        .as_str()
        .unwrap()
        .starts_with("in_"));
    assert_eq!(subs[0]["environment"], "Sandbox");
    assert!(is_active(&p, "premium", s.now()));
    assert_eq!(p["total_revenue_usd"], 9.99);
    let events = s.event_feed("").await["data"].as_array().unwrap().len();
    assert_eq!(events, 2, "subscription_started and access_level_updated");

    // Validating again changes nothing.
    let (status, _) = validate(&s, SECRET, wrapped("web-user", &sub)).await;
    assert_eq!(status, 200);
    assert_eq!(
        without_timestamp(s.get("web-user").await),
        without_timestamp(p)
    );
    let again = s
        .send(
            Method::GET,
            "/api/subgate/v1/events/",
            Some(SECRET),
            &[],
            None,
        )
        .await
        .1["data"]
        .as_array()
        .unwrap()
        .len();
    assert_eq!(again, events);

    // A payment intent, in the plain body shape: a one-time purchase.
    let (status, body) = validate(
        &s,
        SECRET,
        json!({"customer_user_id": "web-user", "stripe_token": intent}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let p = s.get("web-user").await;
    let bought = &p["non_subscriptions"][0];
    assert_eq!(bought["store_transaction_id"], intent.as_str());
    assert_eq!(bought["store_product_id"], lifetime.as_str());
    assert_eq!(bought["is_refund"], false);
    assert_eq!(p["total_revenue_usd"], 58.99);

    // Refunded on Stripe: validating again records the refund.
    let charge = stripe
        .client
        .get(format!("{}/v1/payment_intents/{intent}", stripe.url))
        .basic_auth(STRIPE_KEY, Some(""))
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap()["charges"]["data"][0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    stripe.post("/v1/refunds", &[("charge", &charge)]).await;
    let (status, _) = validate(&s, SECRET, wrapped("web-user", &intent)).await;
    assert_eq!(status, 200);
    let p = s.get("web-user").await;
    assert_eq!(p["non_subscriptions"][0]["is_refund"], true);
    assert_eq!(p["total_revenue_usd"], 9.99);
}

async fn stripe_errors_are_clear_and_import_nothing(backend: Backend) {
    let stripe = LocalStripe::start().await;
    let monthly = stripe.product("Monthly").await;
    let unmapped = stripe.product("Unmapped").await;
    let (unmapped_sub, _) = stripe.subscription(&unmapped, "500").await;
    let s = TestServer::start_with(
        TestDb::new(backend).await,
        &config(&stripe.url, &monthly, "prod_none"),
    )
    .await;
    s.clock.set(chrono::Utc::now());
    let pointer = |body: &Value| body["errors"][0]["source"]["pointer"].clone();

    for (token, why) in [
        ("sub_doesnotexist", "unknown token"),
        ("tok_123", "not a subscription or payment intent"),
        (unmapped_sub.as_str(), "product not configured"),
    ] {
        let (status, body) = validate(&s, SECRET, wrapped("nobody", token)).await;
        assert_eq!(status, 400, "{why}: {body}");
        assert_eq!(body["errors"][0]["status"], "400", "{why}");
        assert_eq!(pointer(&body), "/data/attributes/stripe_token", "{why}");
    }
    let (status, body) = validate(
        &s,
        SECRET,
        json!({"data": {"attributes": {"stripe_token": "sub_x"}}}),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(pointer(&body), "/data/attributes/customer_user_id");
    let (status, body) = validate(&s, PLAIN_SECRET, wrapped("nobody", "sub_x")).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(pointer(&body), "/data");
    assert!(body["errors"][0]["detail"]
        .as_str()
        .unwrap()
        .contains("not configured"));
    let (status, body) = validate(&s, OTHER_SECRET, wrapped("nobody", "sub_x")).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["errors"][0]["code"], "service_unavailable");
    let (status, _) = validate(&s, PUBLIC, wrapped("nobody", "sub_x")).await;
    assert_eq!(status, 401);
    // None of it created the profile.
    let (status, _) = s.profile(Method::GET, "nobody", None).await;
    assert_eq!(status, 404);
}

on_every_backend!(
    stripe_purchases_import_once_with_their_history,
    stripe_errors_are_clear_and_import_nothing,
);
