//! `/api/subgate/v1/events/`: Subgate's own event feed (Adapty has none), for the app's secret
//! key. Lists an app's or a profile's events with their delivery state, oldest first, with a
//! cursor; shows one; and puts one back in the delivery queue.

use super::error::ApiResult;
use super::extract::Authenticated;
use super::AppContext;
use axum::extract::{Path, Query, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use subgate_core::model::ProfileKey;
use subgate_core::service::Identity;
use subgate_core::store::{StoreError, StoredEvent};
use subgate_core::time::format_v2;
use subgate_core::{ApiError, ErrorCode};
use uuid::Uuid;

const DEFAULT_LIMIT: u32 = 100;
const MAX_LIMIT: u32 = 1000;

pub fn routes() -> Router<AppContext> {
    Router::new()
        .route("/api/subgate/v1/events/", get(list))
        .route("/api/subgate/v1/events/{id}/", get(show))
        .route("/api/subgate/v1/events/{id}/redeliver/", post(redeliver))
}

#[derive(Deserialize)]
struct ListQuery {
    profile_id: Option<String>,
    customer_user_id: Option<String>,
    cursor: Option<String>,
    limit: Option<String>,
}

fn render(e: &StoredEvent) -> Value {
    json!({
        "id": e.id,
        "event_type": e.event_type,
        "profile_id": e.profile_id,
        "environment": e.environment.as_str(),
        "created_at": format_v2(&e.created_at),
        "payload": e.payload,
        "delivery": {
            "state": e.state.as_str(),
            "attempts": e.attempts,
            "last_status": e.last_status,
            "last_error": e.last_error,
            "next_attempt_at": e.next_attempt_at.as_ref().map(format_v2),
            "delivered_at": e.delivered_at.as_ref().map(format_v2),
        },
    })
}

async fn list(
    State(ctx): State<AppContext>,
    auth: Authenticated,
    Query(query): Query<ListQuery>,
) -> ApiResult<Json<Value>> {
    auth.require_secret()?;
    let limit = match query.limit.as_deref() {
        None => DEFAULT_LIMIT,
        Some(text) => match text.parse::<u32>() {
            Ok(n) if (1..=MAX_LIMIT).contains(&n) => n,
            _ => {
                return Err(ApiError::invalid("limit", "Must be an integer from 1 to 1000.").into())
            }
        },
    };
    let after = match query.cursor.as_deref() {
        None | Some("") => None,
        Some(text) => Some(
            text.parse::<i64>()
                .map_err(|_| ApiError::invalid("cursor", "Not a cursor this feed returned."))?,
        ),
    };
    let profile_id = match (&query.profile_id, &query.customer_user_id) {
        (None, None) => None,
        (profile_id, customer_user_id) => {
            let profile_id = profile_id
                .as_deref()
                .map(Uuid::parse_str)
                .transpose()
                .map_err(|_| ApiError::invalid("profile_id", "Must be a valid UUID."))?;
            let who = Identity {
                profile_id,
                customer_user_id: customer_user_id.clone(),
            };
            // The profile may be gone while its events remain: by id, no lookup is needed.
            match who.key() {
                ProfileKey::Id(id) => Some(id),
                ProfileKey::CustomerUserId(_) => {
                    Some(ctx.services.get_profile(&auth.app, &who).await?.profile.id)
                }
            }
        }
    };
    let events = ctx
        .services
        .store
        .list_events(auth.app.id(), profile_id, after, limit)
        .await
        .map_err(ApiError::from)?;
    let next = (events.len() == limit as usize)
        .then(|| events.last().map(|e| e.seq.to_string()))
        .flatten();
    Ok(Json(json!({
        "data": events.iter().map(render).collect::<Vec<_>>(),
        "next_cursor": next,
    })))
}

fn event_id(text: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(text).map_err(|_| ApiError::new(ErrorCode::NotFound))
}

async fn show(
    State(ctx): State<AppContext>,
    auth: Authenticated,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    auth.require_secret()?;
    let id = event_id(&id)?;
    one_event(ctx.services.store.get_event(auth.app.id(), id).await)
}

/// One event as the answer, or 404 when the app has no such event.
fn one_event(found: Result<Option<StoredEvent>, StoreError>) -> ApiResult<Json<Value>> {
    match found {
        Ok(Some(event)) => Ok(Json(json!({"data": render(&event)}))),
        Ok(None) => Err(ApiError::new(ErrorCode::NotFound).into()),
        Err(e) => Err(ApiError::from(e).into()),
    }
}

async fn redeliver(
    State(ctx): State<AppContext>,
    auth: Authenticated,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    auth.require_secret()?;
    let id = event_id(&id)?;
    let now = ctx.services.now();
    one_event(ctx.services.store.redeliver(auth.app.id(), id, now).await)
}
