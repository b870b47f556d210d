//! `/api/v2/server-side-api/...`: profiles, set-transaction, grant and revoke.

use super::error::ApiResult;
use super::extract::{Authenticated, JsonObject, ProfileHeaders};
use super::input::Fields;
use super::{wire, AppContext};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use serde_json::{Map, Value};
use subgate_core::attributes;
use subgate_core::model::{Environment, PurchaseType};
use subgate_core::service::{FieldsPatch, GrantInput, ProfileUpdate, RevokeInput, Written};
use subgate_core::transaction::{OfferIdInput, OfferInput, PriceInput, TransactionInput};
use subgate_core::ApiError;

pub fn routes() -> Router<AppContext> {
    Router::new()
        .route(
            "/api/v2/server-side-api/profile/",
            get(get_profile)
                .post(create_profile)
                .patch(update_profile)
                .delete(delete_profile),
        )
        .route(
            "/api/v2/server-side-api/purchase/set/transaction/",
            post(set_transaction),
        )
        .route(
            "/api/v2/server-side-api/purchase/profile/grant/access-level/",
            post(grant),
        )
        // The migration guide's path for the same request.
        .route("/api/v2/server-side-api/grant/access-level/", post(grant))
        .route(
            "/api/v2/server-side-api/purchase/profile/revoke/access-level/",
            post(revoke),
        )
}

/// A write's response: the answer to a read the write stored, while it holds (the same bytes
/// a read would send now), or the profile rendered anew.
fn render(ctx: &AppContext, auth: &Authenticated, written: &Written) -> Response {
    let now = ctx.services.now();
    let stored = written.answer.as_deref();
    match stored.and_then(|stored| ctx.rendered.answer(&auth.app, stored, now)) {
        Some(body) => wire::json_bytes_response(body),
        None => wire::profile(&auth.app, written, now),
    }
}

async fn get_profile(
    State(ctx): State<AppContext>,
    auth: Authenticated,
    who: ProfileHeaders,
) -> ApiResult<Response> {
    let now = ctx.services.now();
    let stored = ctx
        .services
        .get_rendered_profile(&auth.app, &who.identity)
        .await?;
    if let Some(body) = stored.and_then(|s| ctx.rendered.answer(&auth.app, &s, now)) {
        return Ok(wire::json_bytes_response(body));
    }
    let state = ctx.services.get_profile(&auth.app, &who.identity).await?;
    let response = wire::profile(&auth.app, &state, now);
    ctx.renewals.renew(&ctx.services, state);
    Ok(response)
}

async fn create_profile(
    State(ctx): State<AppContext>,
    auth: Authenticated,
    who: ProfileHeaders,
    JsonObject(body): JsonObject,
) -> ApiResult<Response> {
    let update = profile_update(&body, who.platform)?;
    let state = ctx
        .services
        .upsert_profile(&auth.app, &who.identity, update)
        .await?;
    Ok(render(&ctx, &auth, &state))
}

async fn update_profile(
    State(ctx): State<AppContext>,
    auth: Authenticated,
    who: ProfileHeaders,
    JsonObject(body): JsonObject,
) -> ApiResult<Response> {
    let update = profile_update(&body, who.platform)?;
    let state = ctx
        .services
        .update_profile(&auth.app, &who.identity, update)
        .await?;
    Ok(render(&ctx, &auth, &state))
}

async fn delete_profile(
    State(ctx): State<AppContext>,
    auth: Authenticated,
    who: ProfileHeaders,
) -> ApiResult<StatusCode> {
    ctx.services
        .delete_profile(&auth.app, &who.identity)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn set_transaction(
    State(ctx): State<AppContext>,
    auth: Authenticated,
    who: ProfileHeaders,
    JsonObject(body): JsonObject,
) -> ApiResult<Response> {
    auth.require_secret()?;
    let input = transaction_input(&Fields::new(&body))?;
    let state = ctx
        .services
        .set_transaction(&auth.app, &who.identity, input)
        .await?;
    Ok(render(&ctx, &auth, &state))
}

async fn grant(
    State(ctx): State<AppContext>,
    auth: Authenticated,
    who: ProfileHeaders,
    JsonObject(body): JsonObject,
) -> ApiResult<Response> {
    auth.require_secret()?;
    let f = Fields::new(&body);
    let input = GrantInput {
        access_level_id: f.required_string("access_level_id")?,
        starts_at: f.datetime("starts_at", true)?,
        expires_at: f.datetime("expires_at", true)?,
    };
    let state = ctx.services.grant(&auth.app, &who.identity, input).await?;
    Ok(render(&ctx, &auth, &state))
}

async fn revoke(
    State(ctx): State<AppContext>,
    auth: Authenticated,
    who: ProfileHeaders,
    JsonObject(body): JsonObject,
) -> ApiResult<Response> {
    auth.require_secret()?;
    let f = Fields::new(&body);
    let input = RevokeInput {
        access_level_id: f.required_string("access_level_id")?,
        revoke_at: f.datetime("revoke_at", true)?,
    };
    let state = ctx.services.revoke(&auth.app, &who.identity, input).await?;
    Ok(render(&ctx, &auth, &state))
}

/// The profile fields of a create or update body; nullability as the pages document it.
pub fn profile_update(
    body: &Map<String, Value>,
    platform: Option<String>,
) -> Result<ProfileUpdate, ApiError> {
    let f = Fields::new(body);
    let s = Fields::string;
    let fields = FieldsPatch {
        first_name: f.patch("first_name", true, s)?,
        last_name: f.patch("last_name", true, s)?,
        gender: f.patch("gender", true, s)?,
        email: f.patch("email", true, s)?,
        phone_number: f.patch("phone_number", true, s)?,
        birthday: f.patch("birthday", false, Fields::date)?,
        ip_country: f.patch("ip_country", false, s)?,
        ip_v4_address: f.patch("ip_v4_address", true, s)?,
        store_country: f.patch("store_country", true, s)?,
        store: f.patch("store", true, s)?,
        analytics_disabled: f.patch("analytics_disabled", false, Fields::bool)?,
        att_status: f.patch("att_status", true, Fields::integer)?,
        store_account_token: f.patch("store_account_token", true, s)?,
    };
    let attributes = match f.raw("custom_attributes") {
        None => None,
        Some(Value::Null) => {
            return Err(ApiError::invalid(
                "custom_attributes",
                super::input::NOT_NULL,
            ))
        }
        Some(v) => Some(attributes::parse_changes(v, "custom_attributes")?),
    };
    let installation_meta = f
        .object("installation_meta", false)?
        .map(|o| o.into_map().clone());
    Ok(ProfileUpdate {
        fields,
        attributes,
        installation_meta,
        platform,
    })
}

fn choice<T>(f: &Fields<'_>, name: &str, value: &str, options: &[(&str, T)]) -> Result<T, ApiError>
where
    T: Copy,
{
    options
        .iter()
        .find(|(label, _)| *label == value)
        .map(|(_, v)| *v)
        .ok_or_else(|| {
            ApiError::invalid(
                f.source(name),
                format!("\"{value}\" is not a valid choice."),
            )
        })
}

/// Reads a set-transaction body; the documented rules are then checked by the core.
pub fn transaction_input(f: &Fields<'_>) -> Result<TransactionInput, ApiError> {
    let purchase_type = f.required_string("purchase_type")?;
    let purchase_type = choice(
        f,
        "purchase_type",
        &purchase_type,
        &[
            ("subscription", PurchaseType::Subscription),
            ("one_time_purchase", PurchaseType::OneTimePurchase),
        ],
    )?;
    let environment = match f.string("environment", false)? {
        None => Environment::Production,
        Some(e) => choice(
            f,
            "environment",
            &e,
            &[
                ("Production", Environment::Production),
                ("Sandbox", Environment::Sandbox),
            ],
        )?,
    };
    let is_subscription = purchase_type == PurchaseType::Subscription;
    let mut input = TransactionInput {
        purchase_type,
        store: f.required_string("store")?,
        environment,
        store_product_id: f.required_string("store_product_id")?,
        store_base_plan_id: f.string("store_base_plan_id", true)?,
        store_transaction_id: f.required_string("store_transaction_id")?,
        store_original_transaction_id: f.required_string("store_original_transaction_id")?,
        offer: f
            .object("offer", true)?
            .map(|o| offer_input(&o))
            .transpose()?,
        is_family_shared: f.bool("is_family_shared", false)?.unwrap_or(false),
        price: price_input(f)?,
        purchased_at: f.required_datetime("purchased_at")?,
        originally_purchased_at: None,
        expires_at: None,
        refunded_at: f.datetime("refunded_at", true)?,
        cancellation_reason: f.string("cancellation_reason", true)?,
        variation_id: f.string("variation_id", true)?,
        renew_status: None,
        renew_status_changed_at: None,
        billing_issue_detected_at: None,
        grace_period_expires_at: None,
    };
    if is_subscription {
        input.originally_purchased_at = Some(f.required_datetime("originally_purchased_at")?);
        if !f.has("expires_at") {
            return Err(ApiError::invalid("expires_at", super::input::REQUIRED));
        }
        input.expires_at = f.datetime("expires_at", true)?;
        input.renew_status = Some(
            f.bool("renew_status", false)?
                .ok_or_else(|| ApiError::invalid("renew_status", super::input::REQUIRED))?,
        );
        input.renew_status_changed_at = f.datetime("renew_status_changed_at", true)?;
        input.billing_issue_detected_at = f.datetime("billing_issue_detected_at", true)?;
        input.grace_period_expires_at = f.datetime("grace_period_expires_at", true)?;
    }
    Ok(input)
}

fn price_input(f: &Fields<'_>) -> Result<PriceInput, ApiError> {
    let price = f
        .object("price", false)?
        .ok_or_else(|| ApiError::invalid("price", super::input::REQUIRED))?;
    Ok(PriceInput {
        country: price.required_string("country")?,
        currency: price.required_string("currency")?,
        value: price
            .number("value", false)?
            .ok_or_else(|| ApiError::invalid(price.source("value"), super::input::REQUIRED))?,
    })
}

/// Accepts `{category, type, id}` and `{offer_category, offer_type, offer_id}`.
fn offer_input(o: &Fields<'_>) -> Result<OfferInput, ApiError> {
    let pick = |short: &'static str, long: &'static str| {
        if o.has(long) && !o.has(short) {
            long
        } else {
            short
        }
    };
    let (category, offer_type, id) = (
        pick("category", "offer_category"),
        pick("type", "offer_type"),
        pick("id", "offer_id"),
    );
    Ok(OfferInput {
        category: o.required_string(category)?,
        offer_type: o.required_string(offer_type)?,
        id: match o.raw(id) {
            None => OfferIdInput::Absent,
            Some(Value::Null) => OfferIdInput::Null,
            Some(_) => OfferIdInput::Value(o.required_string(id)?),
        },
    })
}
