//! The v2 Profile object, rendered from a profile's state at an instant.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::ser::{SerializeMap, Serializer};
use serde::Serialize;
use serde_json::{json, Map, Value};
use std::borrow::Cow;
use std::sync::Arc;
use subgate_core::access::{self, AccessLevelView, Source};
use subgate_core::currency;
use subgate_core::model::{
    App, AttributeValue, Grant, Offer, ProductKind, ProfileState, PurchaseType, Transaction,
    GRANT_PRODUCT_ID, GRANT_STORE,
};
use subgate_core::time::V2Date;
use uuid::Uuid;

pub(crate) fn attribute_value(v: &AttributeValue) -> Value {
    match v {
        AttributeValue::Number(n) => json!(n),
        AttributeValue::Text(s) => json!(s),
    }
}

#[derive(Serialize)]
struct OfferView<'a> {
    category: &'a str,
    #[serde(rename = "type")]
    offer_type: &'a str,
    id: Option<&'a str>,
}

fn offer(o: &Option<Offer>) -> Option<OfferView<'_>> {
    o.as_ref().map(|o| OfferView {
        category: &o.category,
        offer_type: &o.offer_type,
        id: o.id.as_deref(),
    })
}

/// What identifies a purchase, shared by access levels and subscriptions.
#[derive(Serialize)]
struct PurchaseView<'a> {
    store: &'a str,
    store_product_id: &'a str,
    store_base_plan_id: Option<&'a str>,
    store_transaction_id: Cow<'a, str>,
    store_original_transaction_id: Cow<'a, str>,
    offer: Option<OfferView<'a>>,
    environment: &'a str,
    purchased_at: V2Date,
}

fn purchase_fields(t: &Transaction) -> PurchaseView<'_> {
    PurchaseView {
        store: &t.store,
        store_product_id: &t.store_product_id,
        store_base_plan_id: t.store_base_plan_id.as_deref(),
        store_transaction_id: Cow::Borrowed(&t.store_transaction_id),
        store_original_transaction_id: Cow::Borrowed(&t.store_original_transaction_id),
        offer: offer(&t.offer),
        environment: t.environment.as_str(),
        purchased_at: V2Date(Some(t.purchased_at)),
    }
}

#[derive(Serialize)]
struct AccessLevelOut<'a> {
    access_level_id: &'a str,
    expires_at: V2Date,
    renewal_cancelled_at: V2Date,
    billing_issue_detected_at: V2Date,
    is_in_grace_period: bool,
    cancellation_reason: Option<&'a str>,
    #[serde(flatten)]
    purchase: PurchaseView<'a>,
    starts_at: V2Date,
    originally_purchased_at: V2Date,
}

fn access_level<'a>(level: &'a AccessLevelView<'a>) -> AccessLevelOut<'a> {
    let (purchase, starts_at, originally_purchased_at) = match level.source {
        Source::Transaction(t) => (
            purchase_fields(t),
            None,
            t.originally_purchased_at.unwrap_or(t.purchased_at),
        ),
        Source::Grant(g) => {
            let id = grant_identity(g);
            let purchase = PurchaseView {
                store: id.store,
                store_product_id: id.product,
                store_base_plan_id: id.base_plan,
                store_transaction_id: Cow::Owned(id.transaction),
                store_original_transaction_id: Cow::Owned(id.original_transaction),
                offer: None,
                environment: id.environment,
                purchased_at: V2Date(Some(g.created_at)),
            };
            (
                purchase,
                Some(g.starts_at),
                level.activated_at.min(g.created_at),
            )
        }
    };
    AccessLevelOut {
        access_level_id: &level.access_level_id,
        expires_at: V2Date(level.expires_at),
        renewal_cancelled_at: V2Date(level.renewal_cancelled_at),
        billing_issue_detected_at: V2Date(level.billing_issue_detected_at),
        is_in_grace_period: level.is_in_grace_period,
        cancellation_reason: level.cancellation_reason.as_deref(),
        purchase,
        starts_at: V2Date(starts_at),
        originally_purchased_at: V2Date(Some(originally_purchased_at)),
    }
}

/// How a grant presents itself: the server-side product, or the store purchase a v1 grant named.
pub struct GrantIdentity<'a> {
    pub store: &'a str,
    pub product: &'a str,
    pub base_plan: Option<&'a str>,
    pub transaction: String,
    pub original_transaction: String,
    pub environment: &'static str,
}

pub fn grant_identity(g: &Grant) -> GrantIdentity<'_> {
    let own_id =
        g.id.simple()
            .encode_lower(&mut Uuid::encode_buffer())
            .to_owned();
    match &g.purchase {
        None => GrantIdentity {
            store: GRANT_STORE,
            product: GRANT_PRODUCT_ID,
            base_plan: None,
            transaction: own_id.clone(),
            original_transaction: own_id,
            environment: "Production",
        },
        Some(p) => {
            let transaction = p.vendor_transaction_id.clone().unwrap_or(own_id);
            GrantIdentity {
                store: &p.store,
                product: &p.vendor_product_id,
                base_plan: p.base_plan_id.as_deref(),
                original_transaction: p
                    .vendor_original_transaction_id
                    .clone()
                    .unwrap_or_else(|| transaction.clone()),
                transaction,
                environment: p.environment.as_str(),
            }
        }
    }
}

/// The latest transaction of each subscription chain, in the order the chains began.
pub(crate) fn latest_of_each_chain(
    transactions: &[Arc<Transaction>],
) -> Vec<(&Transaction, DateTime<Utc>)> {
    let mut chains: Vec<(&Transaction, DateTime<Utc>)> = Vec::new();
    for t in transactions
        .iter()
        .map(|t| &**t)
        .filter(|t| t.purchase_type == PurchaseType::Subscription)
    {
        let first = t.originally_purchased_at.unwrap_or(t.purchased_at);
        match chains
            .iter_mut()
            .find(|(c, _)| c.same_chain(&t.store, &t.store_original_transaction_id))
        {
            Some((latest, earliest)) => {
                *earliest = (*earliest).min(first);
                if (t.purchased_at, t.seq) > (latest.purchased_at, latest.seq) {
                    *latest = t;
                }
            }
            None => chains.push((t, first)),
        }
    }
    chains
}

#[derive(Serialize)]
struct SubscriptionOut<'a> {
    #[serde(flatten)]
    purchase: PurchaseView<'a>,
    originally_purchased_at: V2Date,
    expires_at: V2Date,
    renewal_cancelled_at: V2Date,
    billing_issue_detected_at: V2Date,
    is_in_grace_period: bool,
    cancellation_reason: Option<&'a str>,
}

fn subscription(
    t: &Transaction,
    originally_purchased_at: DateTime<Utc>,
    now: DateTime<Utc>,
) -> SubscriptionOut<'_> {
    SubscriptionOut {
        purchase: purchase_fields(t),
        originally_purchased_at: V2Date(Some(originally_purchased_at)),
        expires_at: V2Date(t.expires_at),
        renewal_cancelled_at: V2Date(t.renewal_cancelled_at()),
        billing_issue_detected_at: V2Date(t.billing_issue_detected_at),
        is_in_grace_period: t.is_in_grace_period(now),
        cancellation_reason: t.cancellation_reason.as_deref(),
    }
}

#[derive(Serialize)]
struct NonSubscriptionOut<'a> {
    purchase_id: Uuid,
    store: &'a str,
    store_product_id: &'a str,
    store_base_plan_id: Option<&'a str>,
    store_transaction_id: &'a str,
    store_original_transaction_id: &'a str,
    purchased_at: V2Date,
    environment: &'a str,
    is_refund: bool,
    is_consumable: bool,
}

fn non_subscription<'a>(app: &App, t: &'a Transaction) -> NonSubscriptionOut<'a> {
    NonSubscriptionOut {
        purchase_id: t.id,
        store: &t.store,
        store_product_id: &t.store_product_id,
        store_base_plan_id: t.store_base_plan_id.as_deref(),
        store_transaction_id: &t.store_transaction_id,
        store_original_transaction_id: &t.store_original_transaction_id,
        purchased_at: V2Date(Some(t.purchased_at)),
        environment: t.environment.as_str(),
        is_refund: t.is_refunded(),
        is_consumable: app
            .product(&t.store, &t.store_product_id)
            .is_some_and(|p| p.kind == ProductKind::Consumable),
    }
}

/// The installation meta as last posted, with the `adapty-platform` header's platform
/// unless the meta names one itself.
struct InstallationMeta<'a> {
    posted: Option<&'a Map<String, Value>>,
    platform: Option<&'a str>,
}

impl Serialize for InstallationMeta<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let platform = self
            .platform
            .filter(|_| !self.posted.is_some_and(|m| m.contains_key("platform")));
        if self.posted.is_none() && platform.is_none() {
            return s.serialize_none();
        }
        let mut map = s.serialize_map(None)?;
        for (k, v) in self.posted.into_iter().flatten() {
            map.serialize_entry(k, v)?;
        }
        if let Some(platform) = platform {
            map.serialize_entry("platform", platform)?;
        }
        map.end()
    }
}

/// The personal fields, returned too: v2 always answers with the complete profile.
#[derive(Serialize)]
struct PersonalOut<'a> {
    first_name: Option<&'a str>,
    last_name: Option<&'a str>,
    gender: Option<&'a str>,
    email: Option<&'a str>,
    phone_number: Option<&'a str>,
    birthday: Option<String>,
    ip_country: Option<&'a str>,
    ip_v4_address: Option<&'a str>,
    store_country: Option<&'a str>,
    store: Option<&'a str>,
    analytics_disabled: bool,
    att_status: Option<i64>,
    store_account_token: Option<&'a str>,
    installation_meta: InstallationMeta<'a>,
    created_at: V2Date,
}

fn personal(state: &ProfileState) -> PersonalOut<'_> {
    let doc = &state.profile.doc;
    let f = &doc.fields;
    PersonalOut {
        first_name: f.first_name.as_deref(),
        last_name: f.last_name.as_deref(),
        gender: f.gender.as_deref(),
        email: f.email.as_deref(),
        phone_number: f.phone_number.as_deref(),
        birthday: f.birthday.map(|d| d.format("%Y-%m-%d").to_string()),
        ip_country: f.ip_country.as_deref(),
        ip_v4_address: f.ip_v4_address.as_deref(),
        store_country: f.store_country.as_deref(),
        store: f.store.as_deref(),
        analytics_disabled: f.analytics_disabled.unwrap_or(false),
        att_status: f.att_status,
        store_account_token: f.store_account_token.as_deref(),
        installation_meta: InstallationMeta {
            posted: doc.installation_meta.as_ref(),
            platform: doc.platform.as_deref(),
        },
        created_at: V2Date(Some(state.profile.created_at)),
    }
}

/// The personal fields as a JSON object, for v1's extended profile.
pub(crate) fn personal_fields(state: &ProfileState) -> Map<String, Value> {
    match serde_json::to_value(personal(state)) {
        Ok(Value::Object(map)) => map,
        _ => Map::new(),
    }
}

#[derive(Serialize)]
struct AttributeOut<'a> {
    key: &'a str,
    value: &'a AttributeValue,
}

#[derive(Serialize)]
struct ProfileOut<'a> {
    app_id: Uuid,
    profile_id: Uuid,
    customer_user_id: Option<&'a str>,
    total_revenue_usd: f64,
    segment_hash: String,
    timestamp: i64,
    custom_attributes: Vec<AttributeOut<'a>>,
    access_levels: Vec<AccessLevelOut<'a>>,
    subscriptions: Vec<SubscriptionOut<'a>>,
    non_subscriptions: Vec<NonSubscriptionOut<'a>>,
    #[serde(flatten)]
    personal: PersonalOut<'a>,
}

#[derive(Serialize)]
struct Envelope<T> {
    data: T,
}

/// The v2 Profile object as response bytes.
pub fn profile(app: &App, state: &ProfileState, now: DateTime<Utc>) -> Response {
    match profile_json(app, state, now) {
        Some(bytes) => json_bytes_response(bytes),
        None => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

/// The body [`profile`] answers with.
pub fn profile_json(app: &App, state: &ProfileState, now: DateTime<Utc>) -> Option<Vec<u8>> {
    let levels = access::derive(app, state, now);
    to_json(&profile_body(app, state, &levels, now))
}

/// A JSON body answered as such.
pub fn json_bytes_response(bytes: Vec<u8>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        bytes,
    )
        .into_response()
}

fn profile_body<'a>(
    app: &'a App,
    state: &'a ProfileState,
    levels: &'a [AccessLevelView<'a>],
    now: DateTime<Utc>,
) -> Envelope<ProfileOut<'a>> {
    let p = &state.profile;
    Envelope {
        data: ProfileOut {
            app_id: p.app_id,
            profile_id: p.id,
            customer_user_id: p.customer_user_id.as_deref(),
            total_revenue_usd: currency::from_micros(state.total_revenue_usd_micros()),
            segment_hash: state.segment_hash(),
            timestamp: now.timestamp_millis(),
            custom_attributes: p
                .doc
                .attributes
                .iter()
                .map(|(key, value)| AttributeOut { key, value })
                .collect(),
            access_levels: levels.iter().map(access_level).collect(),
            subscriptions: latest_of_each_chain(&state.transactions)
                .into_iter()
                .map(|(t, first)| subscription(t, first, now))
                .collect(),
            non_subscriptions: state
                .transactions
                .iter()
                .filter(|t| t.purchase_type == PurchaseType::OneTimePurchase)
                .map(|t| non_subscription(app, t))
                .collect(),
            personal: personal(state),
        },
    }
}

/// Serializes `body` into one buffer sized for a typical profile, with sonic-rs: serde_json
/// escapes strings (keys too) a byte at a time, which was the largest cost of a cached read.
fn to_json(body: &impl Serialize) -> Option<Vec<u8>> {
    let mut bytes = Vec::with_capacity(4096);
    match sonic_rs::to_writer(&mut bytes, body) {
        Ok(()) => Some(bytes),
        Err(e) => {
            tracing::error!(error = %e, "cannot serialize a response");
            None
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde_json::json;
    use subgate_core::model::{AppDefinition, Profile, ProfileDoc};

    /// A profile that reaches every part of the response, with awkward strings and numbers,
    /// and its app.
    pub(crate) fn rich_profile() -> (App, ProfileState) {
        let transaction = |id: &str, kind: &str, product: &str, extra: Value| {
            let mut t = json!({
                "id": Uuid::new_v4(), "seq": 1, "purchase_type": kind, "store": "app_store",
                "environment": "Sandbox", "store_product_id": product,
                "store_transaction_id": id, "store_original_transaction_id": "orig \"1\"",
                "is_family_shared": false,
                "price": {"country": "US", "currency": "USD", "value_micros": 9_990_000,
                          "usd_micros": 9_990_000},
                "purchased_at": "2026-11-01T10:00:00.123456Z",
                "expires_at": "2036-11-01T10:00:00Z",
                "created_at": "2026-11-01T10:00:00Z", "updated_at": "2026-11-01T10:00:00Z"
            });
            if let (Value::Object(t), Value::Object(extra)) = (&mut t, extra) {
                t.extend(extra);
            }
            serde_json::from_value::<Transaction>(t).unwrap()
        };
        let transactions = vec![
            transaction(
                "t1",
                "subscription",
                "monthly",
                json!({
                    "offer": {"category": "introductory", "type": "free_trial", "id": null},
                    "cancellation_reason": "voluntarily_cancelled",
                    "billing_issue_detected_at": "2026-11-02T00:00:00Z"
                }),
            ),
            transaction(
                "t2",
                "one_time_purchase",
                "coins",
                json!({
                    "refunded_at": "2026-11-03T00:00:00Z", "store_base_plan_id": "base/\u{1}"
                }),
            ),
        ];
        let numbers = [
            0.1,
            1e-7,
            1e21,
            1.7976931348623157e308,
            5e-324,
            -0.0,
            42.0,
            123.456,
        ];
        let mut attributes: std::collections::BTreeMap<String, AttributeValue> = numbers
            .iter()
            .enumerate()
            .map(|(i, n)| (format!("n{i}"), AttributeValue::Number(*n)))
            .collect();
        for (i, text) in [
            "quote \" slash \\ / tab \t nl \n",
            "\u{1} \u{1f} \u{7f}",
            "é 😀 \u{2028}",
        ]
        .iter()
        .enumerate()
        {
            attributes.insert(format!("s{i}"), AttributeValue::Text((*text).to_string()));
        }
        let doc: ProfileDoc = serde_json::from_value(json!({
            "fields": {"email": "a@b.c", "birthday": "1990-05-17", "att_status": 3,
                       "analytics_disabled": true},
            "installation_meta": {"app_version": "1.0", "nested": {"list": [1, 2.5, null, true]}},
            "platform": "iOS",
            "grants": [{"id": Uuid::new_v4(), "access_level_id": "premium",
                        "starts_at": "2026-11-01T00:00:00Z", "expires_at": null,
                        "created_at": "2026-11-01T00:00:00Z", "seq": 3}]
        }))
        .unwrap();
        let state = ProfileState {
            profile: Profile {
                id: Uuid::new_v4(),
                app_id: Uuid::nil(),
                customer_user_id: Some("user \"7\"".into()),
                version: 4,
                created_at: DateTime::from_timestamp(1_700_000_000, 0).unwrap(),
                updated_at: DateTime::from_timestamp(1_700_000_000, 0).unwrap(),
                doc: ProfileDoc { attributes, ..doc },
            },
            transactions: transactions.into_iter().map(Arc::new).collect(),
        };
        let app = App::new(
            serde_json::from_value::<AppDefinition>(json!({
                "id": Uuid::nil(), "name": "t", "access_levels": ["premium"],
                "custom_stores": [],
                "products": [
                    {"id": "monthly", "access_level_id": "premium", "kind": "subscription",
                     "store_product_ids": {"app_store": "monthly"}},
                    {"id": "coins", "access_level_id": null, "kind": "consumable",
                     "store_product_ids": {"app_store": "coins"}}
                ]
            }))
            .unwrap(),
        );
        (app, state)
    }

    /// Clients were written against serde_json's output: sonic-rs must write the same bytes,
    /// numbers and escapes included.
    #[test]
    fn profile_responses_are_the_bytes_serde_json_writes() {
        let (app, state) = rich_profile();
        let now = DateTime::from_timestamp(1_800_000_000, 5_000).unwrap();
        let levels = access::derive(&app, &state, now);
        let body = profile_body(&app, &state, &levels, now);
        let ours = sonic_rs::to_vec(&body).unwrap();
        let reference = serde_json::to_vec(&body).unwrap();
        assert_eq!(
            String::from_utf8_lossy(&ours),
            String::from_utf8_lossy(&reference)
        );
        // The profile above reaches every part of the response.
        let parsed: Value = serde_json::from_slice(&ours).unwrap();
        for part in [
            "access_levels",
            "subscriptions",
            "non_subscriptions",
            "custom_attributes",
        ] {
            assert!(
                !parsed["data"][part].as_array().unwrap().is_empty(),
                "{part}"
            );
        }
        assert!(parsed["data"]["installation_meta"].is_object());
    }
}
