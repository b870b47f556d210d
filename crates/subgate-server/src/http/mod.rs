//! The HTTP surface: routes, request ids, auth, and errors in Adapty's format everywhere
//! (unknown routes, wrong methods, panics included).

pub mod error;
pub mod events;
pub mod extract;
pub mod input;
pub mod rendered;
pub mod v1;
pub mod v2;
pub mod wire;

use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use error::ErrorResponse;
use extract::KeyKind;
use serde_json::json;
use std::collections::HashMap;
use std::sync::Arc;
use subgate_core::model::App;
use subgate_core::service::Services;
use subgate_core::{ApiError, ErrorCode};
use tower_http::catch_panic::CatchPanicLayer;
use tracing::Instrument;

/// API keys to their app.
#[derive(Default)]
pub struct AppRegistry {
    by_key: HashMap<String, (Arc<App>, KeyKind)>,
}

impl AppRegistry {
    pub fn insert(&mut self, app: Arc<App>, public_keys: &[String], secret_keys: &[String]) {
        for key in public_keys {
            self.by_key
                .insert(key.clone(), (Arc::clone(&app), KeyKind::Public));
        }
        for key in secret_keys {
            self.by_key
                .insert(key.clone(), (Arc::clone(&app), KeyKind::Secret));
        }
    }

    pub fn authenticate(&self, key: &str) -> Option<(Arc<App>, KeyKind)> {
        self.by_key.get(key).cloned()
    }
}

pub struct Context {
    pub services: Services,
    pub apps: AppRegistry,
    /// The same renderer as the services', to judge stored answers at read time.
    pub rendered: Arc<rendered::RenderedProfiles>,
    /// Answers being stored in the background after reads that rendered them.
    pub renewals: rendered::Renewals,
    /// Per app with a Stripe account configured.
    pub stripe: HashMap<uuid::Uuid, crate::stripe::StripeClient>,
}

pub type AppContext = Arc<Context>;

pub const REQUEST_ID_HEADER: &str = "request-id";

pub fn router(ctx: AppContext) -> Router {
    Router::new()
        .merge(v2::routes())
        .merge(v1::routes())
        .merge(events::routes())
        .route("/health", get(health))
        .route("/ready", get(ready))
        .fallback(|| async { ErrorResponse(ApiError::new(ErrorCode::NotFound)) })
        .method_not_allowed_fallback(|| async {
            ErrorResponse(ApiError::new(ErrorCode::MethodNotAllowed))
        })
        .with_state(ctx)
        .layer(CatchPanicLayer::custom(|_| {
            ErrorResponse(ApiError::new(ErrorCode::InternalServerError)).into_response()
        }))
        .layer(middleware::from_fn(request_id))
}

/// Gives every request a 32-hex-digit id: in its log span and in the `Request-Id` header.
async fn request_id(request: Request, next: Next) -> Response {
    let id = uuid::Uuid::new_v4().simple().to_string();
    let span = tracing::info_span!("request", request_id = %id, method = %request.method(), path = %request.uri().path());
    let mut response = next.run(request).instrument(span.clone()).await;
    span.in_scope(|| tracing::debug!(status = response.status().as_u16(), "answered"));
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(REQUEST_ID_HEADER, value);
    }
    response
}

async fn health() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

async fn ready(State(ctx): State<AppContext>) -> Response {
    match ctx.services.store.ping().await {
        Ok(()) => Json(json!({"status": "ready"})).into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "not ready");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({"status": "unavailable"})),
            )
                .into_response()
        }
    }
}
