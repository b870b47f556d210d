//! The v2 Profile object, rendered from a profile's state at an instant.

use chrono::{DateTime, Utc};
use serde_json::{json, Map, Value};
use subgate_core::access::{self, AccessLevelView, Source};
use subgate_core::currency;
use subgate_core::model::{
    App, AttributeValue, Grant, Offer, ProductKind, ProfileState, PurchaseType, Transaction,
    GRANT_PRODUCT_ID, GRANT_STORE,
};
use subgate_core::time::format_v2;

pub(crate) fn date(dt: Option<DateTime<Utc>>) -> Value {
    dt.map_or(Value::Null, |d| Value::String(format_v2(&d)))
}

fn offer(o: &Option<Offer>) -> Value {
    match o {
        Some(o) => json!({"category": o.category, "type": o.offer_type, "id": o.id}),
        None => Value::Null,
    }
}

pub(crate) fn attribute_value(v: &AttributeValue) -> Value {
    match v {
        AttributeValue::Number(n) => json!(n),
        AttributeValue::Text(s) => json!(s),
    }
}

fn access_level(level: &AccessLevelView<'_>) -> Value {
    let mut v = json!({
        "access_level_id": level.access_level_id,
        "expires_at": date(level.expires_at),
        "renewal_cancelled_at": date(level.renewal_cancelled_at),
        "billing_issue_detected_at": date(level.billing_issue_detected_at),
        "is_in_grace_period": level.is_in_grace_period,
        "cancellation_reason": level.cancellation_reason,
    });
    let source = match level.source {
        Source::Transaction(t) => {
            let mut fields = purchase_fields(t);
            merge(
                &mut fields,
                json!({
                    "starts_at": Value::Null,
                    "originally_purchased_at": date(Some(t.originally_purchased_at.unwrap_or(t.purchased_at))),
                }),
            );
            fields
        }
        Source::Grant(g) => {
            let id = grant_identity(g);
            json!({
            "store": id.store,
            "store_product_id": id.product,
            "store_base_plan_id": id.base_plan,
            "store_transaction_id": id.transaction,
            "store_original_transaction_id": id.original_transaction,
            "offer": Value::Null,
            "environment": id.environment,
            "starts_at": date(Some(g.starts_at)),
            "purchased_at": date(Some(g.created_at)),
            "originally_purchased_at": date(Some(level.activated_at.min(g.created_at))),
            })
        }
    };
    merge(&mut v, source);
    v
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
    let own_id = g.id.simple().to_string();
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

/// What identifies a purchase, shared by access levels and subscriptions.
fn purchase_fields(t: &Transaction) -> Value {
    json!({
        "store": t.store,
        "store_product_id": t.store_product_id,
        "store_base_plan_id": t.store_base_plan_id,
        "store_transaction_id": t.store_transaction_id,
        "store_original_transaction_id": t.store_original_transaction_id,
        "offer": offer(&t.offer),
        "environment": t.environment.as_str(),
        "purchased_at": date(Some(t.purchased_at)),
    })
}

fn merge(into: &mut Value, from: Value) {
    if let (Value::Object(a), Value::Object(b)) = (into, from) {
        a.extend(b);
    }
}

/// The latest transaction of each subscription chain, in the order the chains began.
pub(crate) fn latest_of_each_chain(
    transactions: &[Transaction],
) -> Vec<(&Transaction, DateTime<Utc>)> {
    let mut chains: Vec<(&Transaction, DateTime<Utc>)> = Vec::new();
    for t in transactions
        .iter()
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

fn subscription(
    t: &Transaction,
    originally_purchased_at: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Value {
    let mut fields = purchase_fields(t);
    merge(
        &mut fields,
        json!({
        "originally_purchased_at": date(Some(originally_purchased_at)),
        "expires_at": date(t.expires_at),
        "renewal_cancelled_at": date(t.renewal_cancelled_at()),
        "billing_issue_detected_at": date(t.billing_issue_detected_at),
        "is_in_grace_period": t.is_in_grace_period(now),
        "cancellation_reason": t.cancellation_reason,
        }),
    );
    fields
}

fn non_subscription(app: &App, t: &Transaction) -> Value {
    let is_consumable = app
        .product(&t.store, &t.store_product_id)
        .is_some_and(|p| p.kind == ProductKind::Consumable);
    json!({
        "purchase_id": t.id,
        "store": t.store,
        "store_product_id": t.store_product_id,
        "store_base_plan_id": t.store_base_plan_id,
        "store_transaction_id": t.store_transaction_id,
        "store_original_transaction_id": t.store_original_transaction_id,
        "purchased_at": date(Some(t.purchased_at)),
        "environment": t.environment.as_str(),
        "is_refund": t.is_refunded(),
        "is_consumable": is_consumable,
    })
}

/// The personal fields, returned too: v2 always answers with the complete profile.
pub(crate) fn personal_fields(state: &ProfileState) -> Map<String, Value> {
    let doc = &state.profile.doc;
    let f = &doc.fields;
    let mut installation = doc.installation_meta.clone();
    if let Some(platform) = &doc.platform {
        installation
            .get_or_insert_with(Map::new)
            .entry("platform")
            .or_insert_with(|| json!(platform));
    }
    let v = json!({
        "first_name": f.first_name,
        "last_name": f.last_name,
        "gender": f.gender,
        "email": f.email,
        "phone_number": f.phone_number,
        "birthday": f.birthday.map(|d| d.format("%Y-%m-%d").to_string()),
        "ip_country": f.ip_country,
        "ip_v4_address": f.ip_v4_address,
        "store_country": f.store_country,
        "store": f.store,
        "analytics_disabled": f.analytics_disabled.unwrap_or(false),
        "att_status": f.att_status,
        "store_account_token": f.store_account_token,
        "installation_meta": installation,
        "created_at": format_v2(&state.profile.created_at),
    });
    match v {
        Value::Object(map) => map,
        _ => Map::new(),
    }
}

pub fn profile(app: &App, state: &ProfileState, now: DateTime<Utc>) -> Value {
    let p = &state.profile;
    let levels = access::derive(app, state, now);
    let mut data = json!({
        "app_id": p.app_id,
        "profile_id": p.id,
        "customer_user_id": p.customer_user_id,
        "total_revenue_usd": currency::from_micros(state.total_revenue_usd_micros()),
        "segment_hash": state.segment_hash(),
        "timestamp": now.timestamp_millis(),
        "custom_attributes": p.doc.attributes.iter()
            .map(|(k, v)| json!({"key": k, "value": attribute_value(v)}))
            .collect::<Vec<_>>(),
        "access_levels": levels.iter().map(access_level).collect::<Vec<_>>(),
        "subscriptions": latest_of_each_chain(&state.transactions).into_iter()
            .map(|(t, first)| subscription(t, first, now))
            .collect::<Vec<_>>(),
        "non_subscriptions": state.transactions.iter()
            .filter(|t| t.purchase_type == PurchaseType::OneTimePurchase)
            .map(|t| non_subscription(app, t))
            .collect::<Vec<_>>(),
    });
    merge(&mut data, Value::Object(personal_fields(state)));
    json!({ "data": data })
}
