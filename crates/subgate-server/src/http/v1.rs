//! `/api/v1/sdk/...`: Adapty's legacy API, a second view of the same data as v2. Profiles are
//! named in the path (a profile id, a customer user id, or a Base64URL customer user id), and
//! errors use the JSON:API style.

use super::error::ErrorResponse;
use super::extract::{Authenticated, JsonObject};
use super::input::Fields;
use super::v2::profile_update;
use super::wire::{attribute_value, grant_identity, latest_of_each_chain, personal_fields};
use super::AppContext;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use base64::Engine as _;
use chrono::{DateTime, Utc};
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use subgate_core::access::{self, AccessLevelView, Source};
use subgate_core::model::{
    App, Environment, GrantPurchase, Price, ProductKind, ProfileKey, ProfileState, PurchaseType,
    Transaction, GRANT_PRODUCT_ID, GRANT_STORE,
};
use subgate_core::service::{GrantLength, GrantV1Input, Identity};
use subgate_core::time::format_v1;
use subgate_core::{currency, ApiError, ErrorCode};
use uuid::Uuid;

pub fn routes() -> Router<AppContext> {
    Router::new()
        .route("/api/v1/sdk/profiles/", post(create_profile))
        .route(
            "/api/v1/sdk/profiles/{id}/",
            get(get_profile).patch(update_profile),
        )
        // Documented without the trailing slash; both are accepted.
        .route("/api/v1/sdk/profiles/{id}/delete", delete(delete_profile))
        .route("/api/v1/sdk/profiles/{id}/delete/", delete(delete_profile))
        .route(
            "/api/v1/sdk/profiles/{id}/paid-access-levels/{level}/grant/",
            post(grant),
        )
        .route(
            "/api/v1/sdk/profiles/{id}/paid-access-levels/{level}/revoke/",
            post(revoke),
        )
        .route(
            "/api/v1/sdk/purchase/stripe/token/validate/",
            post(validate_stripe),
        )
}

/// An error in v1's JSON:API style.
pub struct V1Error(pub ApiError);

impl From<ApiError> for V1Error {
    fn from(e: ApiError) -> Self {
        Self(e)
    }
}

impl From<ErrorResponse> for V1Error {
    fn from(e: ErrorResponse) -> Self {
        Self(e.0)
    }
}

fn pointer(source: &str) -> String {
    match source {
        "non_field_errors" => "/data".to_string(),
        field => format!("/data/attributes/{}", field.replace('.', "/")),
    }
}

impl IntoResponse for V1Error {
    fn into_response(self) -> Response {
        let e = self.0;
        let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        if status.is_server_error() {
            tracing::error!(error = %e, "request failed");
        }
        let (code, status_text) = (e.code.as_str(), e.status().to_string());
        let errors: Vec<Value> = e
            .details
            .iter()
            .flat_map(|d| {
                let status_text = &status_text;
                d.errors.iter().map(move |message| {
                    json!({
                        "detail": message,
                        "status": status_text,
                        "source": {"pointer": pointer(&d.source)},
                        "code": code,
                    })
                })
            })
            .collect();
        (status, Json(json!({ "errors": errors }))).into_response()
    }
}

type V1Result<T> = Result<T, V1Error>;

fn secret(auth: Result<Authenticated, ErrorResponse>) -> V1Result<Authenticated> {
    let auth = auth?;
    auth.require_secret()?;
    Ok(auth)
}

fn body(json: Result<JsonObject, ErrorResponse>) -> V1Result<Map<String, Value>> {
    let JsonObject(mut map) = json?;
    // JSON:API clients wrap the fields in data.attributes; plain ones do not.
    if let Some(Value::Object(data)) = map.get("data") {
        if let Some(Value::Object(attributes)) = data.get("attributes") {
            map = attributes.clone();
        }
    }
    Ok(map)
}

fn flag(query: &HashMap<String, String>, name: &str) -> bool {
    query
        .get(name)
        .is_some_and(|v| !matches!(v.as_str(), "" | "0" | "false" | "False"))
}

/// Who `{id}` names: a Base64URL customer user id when the query says so, else a profile id
/// if one exists with it, else a customer user id.
async fn identity(
    ctx: &AppContext,
    app: &App,
    raw: &str,
    query: &HashMap<String, String>,
) -> V1Result<Identity> {
    if flag(query, "is_user_id_base64url_encoded") {
        let trimmed = raw.trim_end_matches('=');
        let decoded = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(trimmed)
            .ok()
            .and_then(|bytes| String::from_utf8(bytes).ok())
            .filter(|s| !s.is_empty())
            .ok_or_else(|| {
                ApiError::invalid(
                    "non_field_errors",
                    "The profile id is not a Base64URL-encoded customer user id.",
                )
            })?;
        return Ok(Identity {
            profile_id: None,
            customer_user_id: Some(decoded),
        });
    }
    if let Ok(id) = Uuid::parse_str(raw) {
        let found = ctx
            .services
            .store
            .load_profile(app.id(), &ProfileKey::Id(id))
            .await
            .map_err(ApiError::from)?;
        if found.is_some() {
            return Ok(Identity {
                profile_id: Some(id),
                customer_user_id: None,
            });
        }
    }
    Ok(Identity {
        profile_id: None,
        customer_user_id: Some(raw.to_string()),
    })
}

fn date(t: Option<DateTime<Utc>>) -> Value {
    t.map_or(Value::Null, |t| Value::String(format_v1(&t)))
}

fn offer_types(t: Option<&Transaction>) -> (Value, Value, Value) {
    let offer = t.and_then(|t| t.offer.as_ref());
    let of = |category: &str| offer.filter(|o| o.category == category);
    (
        json!(of("introductory").map(|o| &o.offer_type)),
        json!(of("promotional").map(|o| &o.offer_type)),
        json!(of("promotional").and_then(|o| o.id.as_ref())),
    )
}

fn access_level(level: &AccessLevelView<'_>) -> Value {
    let t = level.transaction();
    let (intro, promo_type, promo_id) = offer_types(t);
    let (store, product, base_plan, transaction, original) = match level.source {
        Source::Transaction(t) => (
            t.store.clone(),
            t.store_product_id.clone(),
            t.store_base_plan_id.clone(),
            t.store_transaction_id.clone(),
            t.store_original_transaction_id.clone(),
        ),
        Source::Grant(g) => {
            let id = grant_identity(g);
            (
                id.store.to_string(),
                id.product.to_string(),
                id.base_plan.map(str::to_string),
                id.transaction,
                id.original_transaction,
            )
        }
    };
    let renewed_at = t
        .filter(|t| t.store_transaction_id != t.store_original_transaction_id)
        .map(|t| t.purchased_at);
    json!({
        "id": level.access_level_id,
        "is_active": level.is_active,
        "is_lifetime": level.is_lifetime(),
        "expires_at": date(level.expires_at),
        "starts_at": date(Some(level.starts_at)),
        "will_renew": level.will_renew,
        "vendor_product_id": product,
        "base_plan_id": base_plan,
        "vendor_transaction_id": transaction,
        "vendor_original_transaction_id": original,
        "store": store,
        "activated_at": date(Some(level.activated_at)),
        "renewed_at": date(renewed_at),
        "unsubscribed_at": date(level.renewal_cancelled_at),
        "billing_issue_detected_at": date(level.billing_issue_detected_at),
        "is_in_grace_period": level.is_in_grace_period,
        "active_introductory_offer_type": intro,
        "active_promotional_offer_type": promo_type,
        "active_promotional_offer_id": promo_id,
        "cancellation_reason": level.cancellation_reason,
        "is_refund": level.is_refund,
    })
}

fn subscription(t: &Transaction, first: DateTime<Utc>, now: DateTime<Utc>) -> Value {
    let (start, end) = access::transaction_interval(t);
    let is_active = start <= now && end.is_none_or(|e| now < e);
    let (intro, promo_type, promo_id) = offer_types(Some(t));
    json!({
        "is_active": is_active,
        "is_lifetime": false,
        "expires_at": date(t.expires_at),
        "starts_at": Value::Null,
        "will_renew": is_active && t.renew_status != Some(false) && !t.is_refunded(),
        "vendor_product_id": t.store_product_id,
        "base_plan_id": t.store_base_plan_id,
        "vendor_transaction_id": t.store_transaction_id,
        "vendor_original_transaction_id": t.store_original_transaction_id,
        "store": t.store,
        "activated_at": date(Some(first)),
        "renewed_at": date((t.store_transaction_id != t.store_original_transaction_id).then_some(t.purchased_at)),
        "unsubscribed_at": date(t.renewal_cancelled_at()),
        "billing_issue_detected_at": date(t.billing_issue_detected_at),
        "is_in_grace_period": t.is_in_grace_period(now),
        "active_introductory_offer_type": intro,
        "active_promotional_offer_type": promo_type,
        "active_promotional_offer_id": promo_id,
        "cancellation_reason": t.cancellation_reason,
        "is_refund": t.is_refunded(),
        "is_sandbox": t.environment == Environment::Sandbox,
    })
}

fn non_empty(map: Map<String, Value>) -> Value {
    if map.is_empty() {
        Value::Null
    } else {
        Value::Object(map)
    }
}

/// The v1 profile object.
pub fn profile(app: &App, state: &ProfileState, now: DateTime<Utc>, extended: bool) -> Value {
    let p = &state.profile;
    let levels: Map<String, Value> = access::derive(app, state, now)
        .iter()
        .map(|l| (l.access_level_id.clone(), access_level(l)))
        .collect();
    let subscriptions: Map<String, Value> = latest_of_each_chain(&state.transactions)
        .into_iter()
        .map(|(t, first)| (t.store_product_id.clone(), subscription(t, first, now)))
        .collect();
    let mut purchases: Map<String, Value> = Map::new();
    for t in state
        .transactions
        .iter()
        .filter(|t| t.purchase_type == PurchaseType::OneTimePurchase)
    {
        let is_consumable = app
            .product(&t.store, &t.store_product_id)
            .is_some_and(|p| p.kind == ProductKind::Consumable);
        let entry = purchases
            .entry(t.store_product_id.clone())
            .or_insert_with(|| Value::Array(Vec::new()));
        if let Value::Array(list) = entry {
            list.push(json!({
                "purchase_id": t.id,
                "vendor_product_id": t.store_product_id,
                "vendor_transaction_id": t.store_transaction_id,
                "store": t.store,
                "purchased_at": date(Some(t.purchased_at)),
                "is_sandbox": t.environment == Environment::Sandbox,
                "is_refund": t.is_refunded(),
                "is_consumable": is_consumable,
            }));
        }
    }
    let mut data = json!({
        "app_id": p.app_id,
        "profile_id": p.id,
        "customer_user_id": p.customer_user_id,
        "segment_hash": state.segment_hash(),
        "timestamp": now.timestamp_millis(),
        "custom_attributes": p.doc.attributes.iter()
            .map(|(k, v)| (k.clone(), attribute_value(v)))
            .collect::<Map<String, Value>>(),
        "paid_access_levels": non_empty(levels),
        "subscriptions": non_empty(subscriptions),
        "non_subscriptions": non_empty(purchases),
    });
    if extended {
        let mut personal = personal_fields(state);
        personal.insert("created_at".into(), date(Some(p.created_at)));
        let meta = p.doc.installation_meta.as_ref();
        for key in ["idfa", "idfv", "advertising_id"] {
            personal.insert(
                key.into(),
                meta.and_then(|m| m.get(key))
                    .cloned()
                    .unwrap_or(Value::Null),
            );
        }
        if let Value::Object(d) = &mut data {
            d.extend(personal);
        }
    }
    json!({ "data": data })
}

fn render(ctx: &AppContext, app: &App, state: &ProfileState, extended: bool) -> Json<Value> {
    Json(profile(app, state, ctx.services.now(), extended))
}

async fn create_profile(
    State(ctx): State<AppContext>,
    auth: Result<Authenticated, ErrorResponse>,
    json: Result<JsonObject, ErrorResponse>,
) -> V1Result<Json<Value>> {
    let auth = secret(auth)?;
    let mut map = body(json)?;
    let customer_user_id = Fields::new(&map).string("customer_user_id", true)?;
    map.remove("customer_user_id");
    let update = profile_update(&map, None)?;
    let who = match customer_user_id {
        Some(cuid) => Identity {
            profile_id: None,
            customer_user_id: Some(cuid),
        },
        None => Identity {
            profile_id: Some(Uuid::new_v4()),
            customer_user_id: None,
        },
    };
    let state = ctx.services.upsert_profile(&auth.app, &who, update).await?;
    Ok(render(&ctx, &auth.app, &state, false))
}

async fn get_profile(
    State(ctx): State<AppContext>,
    auth: Result<Authenticated, ErrorResponse>,
    Path(id): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> V1Result<Json<Value>> {
    // Reading is allowed with the public key, as in v2.
    let auth = auth?;
    let who = identity(&ctx, &auth.app, &id, &query).await?;
    let state = ctx.services.get_profile(&auth.app, &who).await?;
    Ok(render(&ctx, &auth.app, &state, flag(&query, "extended")))
}

async fn update_profile(
    State(ctx): State<AppContext>,
    auth: Result<Authenticated, ErrorResponse>,
    Path(id): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    json: Result<JsonObject, ErrorResponse>,
) -> V1Result<Json<Value>> {
    let auth = secret(auth)?;
    let map = body(json)?;
    let update = profile_update(&map, None)?;
    let who = identity(&ctx, &auth.app, &id, &query).await?;
    let state = ctx.services.update_profile(&auth.app, &who, update).await?;
    Ok(render(&ctx, &auth.app, &state, false))
}

async fn delete_profile(
    State(ctx): State<AppContext>,
    auth: Result<Authenticated, ErrorResponse>,
    Path(id): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> V1Result<StatusCode> {
    let auth = secret(auth)?;
    let who = identity(&ctx, &auth.app, &id, &query).await?;
    ctx.services.delete_profile(&auth.app, &who).await?;
    Ok(StatusCode::NO_CONTENT)
}

const OFFER_TYPES: &[&str] = &["free_trial", "pay_as_you_go", "pay_up_front"];

fn grant_input(
    ctx: &AppContext,
    level: String,
    map: &Map<String, Value>,
) -> Result<GrantV1Input, ApiError> {
    let f = Fields::new(map);
    let is_lifetime = f.bool("is_lifetime", true)?.unwrap_or(false);
    let expires_at = f.datetime("expires_at", true)?;
    let duration_days = f.integer("duration_days", true)?;
    if let Some(days) = duration_days {
        if days <= 0 {
            return Err(ApiError::invalid(
                "duration_days",
                "Must be a positive number of days.",
            ));
        }
    }
    let length = match (is_lifetime, expires_at, duration_days) {
        (true, _, _) => GrantLength::Lifetime,
        (false, Some(at), _) => GrantLength::Until(at),
        (false, None, Some(days)) => GrantLength::Days(days),
        (false, None, None) => {
            return Err(ApiError::invalid(
                "non_field_errors",
                "One of is_lifetime, expires_at or duration_days is required.",
            ))
        }
    };
    let starts_at = f.datetime("starts_at", true)?;
    let product = f.string("vendor_product_id", true)?;
    let store = f.string("store", true)?;
    let transaction_id = f.string("vendor_transaction_id", true)?;
    let original_id = f.string("vendor_original_transaction_id", true)?;
    let base_plan_id = f.string("base_plan_id", true)?;
    let offer = f.string("introductory_offer_type", true)?;
    if let Some(offer) = &offer {
        if !OFFER_TYPES.contains(&offer.as_str()) {
            return Err(ApiError::invalid(
                "introductory_offer_type",
                format!("Must be one of {}.", OFFER_TYPES.join(", ")),
            ));
        }
    }
    let is_sandbox = f.bool("is_sandbox", true)?.unwrap_or(false);
    let price = f.number("price", true)?;
    let locale = f
        .string("price_locale", true)?
        .unwrap_or_else(|| "USD".to_string())
        .to_ascii_uppercase();
    // `proceeds` is accepted and not kept: revenue counts the price.
    f.number("proceeds", true)?;
    let price = match price {
        None => None,
        Some(v) if !(v.is_finite() && v >= 0.0) => {
            return Err(ApiError::invalid(
                "price",
                "Must be a number of at least 0.",
            ))
        }
        Some(v) => {
            let value_micros = currency::to_micros(v);
            let usd_micros = ctx
                .services
                .rates
                .to_usd_micros(&locale, value_micros)
                .ok_or_else(|| {
                    ApiError::invalid(
                        "price_locale",
                        format!("No USD rate is known for `{locale}`."),
                    )
                })?;
            Some(Price {
                country: String::new(),
                currency: locale,
                value_micros,
                usd_micros,
            })
        }
    };
    let names_purchase = product.is_some() || store.is_some() || transaction_id.is_some();
    let records = product.is_some() && store.is_some() && transaction_id.is_some();
    let purchase = names_purchase.then(|| GrantPurchase {
        store: store.unwrap_or_else(|| GRANT_STORE.to_string()),
        vendor_product_id: product.unwrap_or_else(|| GRANT_PRODUCT_ID.to_string()),
        base_plan_id,
        vendor_transaction_id: if records { transaction_id } else { None },
        vendor_original_transaction_id: if records { original_id } else { None },
        introductory_offer_type: offer,
        environment: if is_sandbox {
            Environment::Sandbox
        } else {
            Environment::Production
        },
    });
    Ok(GrantV1Input {
        access_level_id: level,
        length,
        starts_at,
        purchase,
        price,
    })
}

async fn grant(
    State(ctx): State<AppContext>,
    auth: Result<Authenticated, ErrorResponse>,
    Path((id, level)): Path<(String, String)>,
    Query(query): Query<HashMap<String, String>>,
    json: Result<JsonObject, ErrorResponse>,
) -> V1Result<Json<Value>> {
    let auth = secret(auth)?;
    let map = body(json)?;
    let input = grant_input(&ctx, level, &map)?;
    let who = identity(&ctx, &auth.app, &id, &query).await?;
    let state = ctx.services.grant_v1(&auth.app, &who, input).await?;
    Ok(render(&ctx, &auth.app, &state, false))
}

async fn revoke(
    State(ctx): State<AppContext>,
    auth: Result<Authenticated, ErrorResponse>,
    Path((id, level)): Path<(String, String)>,
    Query(query): Query<HashMap<String, String>>,
    json: Result<JsonObject, ErrorResponse>,
) -> V1Result<Json<Value>> {
    let auth = secret(auth)?;
    let map = body(json)?;
    let is_refund = Fields::new(&map).bool("is_refund", true)?.unwrap_or(false);
    let who = identity(&ctx, &auth.app, &id, &query).await?;
    let state = ctx
        .services
        .revoke_v1(&auth.app, &who, level, is_refund)
        .await?;
    Ok(render(&ctx, &auth.app, &state, false))
}

async fn validate_stripe(
    State(ctx): State<AppContext>,
    auth: Result<Authenticated, ErrorResponse>,
    json: Result<JsonObject, ErrorResponse>,
) -> V1Result<Json<Value>> {
    let auth = secret(auth)?;
    let map = body(json)?;
    let f = Fields::new(&map);
    let customer_user_id = f.required_string("customer_user_id")?;
    let token = f.required_string("stripe_token")?;
    let client = ctx.stripe.get(&auth.app.id()).ok_or_else(|| {
        ApiError::with_message(
            ErrorCode::ValidationError,
            "Stripe is not configured for this app: add [apps.stripe] with its secret_key.",
        )
    })?;
    let purchase = client
        .purchase(&auth.app, &ctx.services.rates, &token)
        .await?;
    ctx.services
        .import_purchases(
            &auth.app,
            &customer_user_id,
            purchase.chain,
            purchase.transactions,
        )
        .await?;
    Ok(Json(json!({ "data": null })))
}
