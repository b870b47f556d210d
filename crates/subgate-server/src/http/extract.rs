//! Request extractors: the API key, the profile headers and a JSON body that fails in the
//! API's error format.

use super::error::ErrorResponse;
use super::input::type_name;
use super::AppContext;
use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use serde_json::{Map, Value};
use std::sync::Arc;
use subgate_core::model::App;
use subgate_core::service::Identity;
use subgate_core::{ApiError, ErrorCode};
use uuid::Uuid;

pub const MAX_BODY_BYTES: usize = 1024 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    Public,
    Secret,
}

/// The app a request's `Authorization: Api-Key <key>` belongs to.
pub struct Authenticated {
    pub app: Arc<App>,
    pub kind: KeyKind,
}

impl Authenticated {
    /// Transactions, grants and revokes need the secret key.
    pub fn require_secret(&self) -> Result<(), ErrorResponse> {
        match self.kind {
            KeyKind::Secret => Ok(()),
            KeyKind::Public => Err(ErrorResponse(ApiError::with_message(
                ErrorCode::NotAuthenticated,
                "This request needs the app's secret API key.",
            ))),
        }
    }
}

fn api_key(parts: &Parts) -> Option<&str> {
    let value = parts
        .headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, key) = value.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("Api-Key").then(|| key.trim())
}

impl FromRequestParts<AppContext> for Authenticated {
    type Rejection = ErrorResponse;

    async fn from_request_parts(
        parts: &mut Parts,
        ctx: &AppContext,
    ) -> Result<Self, Self::Rejection> {
        let Some(key) = api_key(parts) else {
            return Err(ErrorResponse(ApiError::new(ErrorCode::NotAuthenticated)));
        };
        ctx.apps
            .authenticate(key)
            .map(|(app, kind)| Authenticated { app, kind })
            .ok_or_else(|| {
                ErrorResponse(ApiError::with_message(
                    ErrorCode::NotAuthenticated,
                    "Invalid API key.",
                ))
            })
    }
}

pub const PROFILE_ID_HEADER: &str = "adapty-profile-id";
pub const CUSTOMER_USER_ID_HEADER: &str = "adapty-customer-user-id";
pub const PLATFORM_HEADER: &str = "adapty-platform";

fn header<'a>(parts: &'a Parts, name: &str) -> Result<Option<&'a str>, ErrorResponse> {
    match parts.headers.get(name) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .map(|s| Some(s.trim()).filter(|s| !s.is_empty()))
            .map_err(|_| {
                ErrorResponse(ApiError::invalid(
                    name,
                    "Header value must be visible ASCII.",
                ))
            }),
    }
}

/// The user a request is about, from `adapty-profile-id` and/or `adapty-customer-user-id`.
pub struct ProfileHeaders {
    pub identity: Identity,
    pub platform: Option<String>,
}

impl<S: Send + Sync> FromRequestParts<S> for ProfileHeaders {
    type Rejection = ErrorResponse;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let profile_id = header(parts, PROFILE_ID_HEADER)?
            .map(|s| {
                Uuid::parse_str(s).map_err(|_| {
                    ErrorResponse(ApiError::invalid(
                        PROFILE_ID_HEADER,
                        "Must be a valid UUID.",
                    ))
                })
            })
            .transpose()?;
        let customer_user_id = header(parts, CUSTOMER_USER_ID_HEADER)?.map(str::to_string);
        if profile_id.is_none() && customer_user_id.is_none() {
            return Err(ErrorResponse(ApiError::invalid(
                "non_field_errors",
                "Either the adapty-profile-id or the adapty-customer-user-id header is required.",
            )));
        }
        let platform = header(parts, PLATFORM_HEADER)?.map(str::to_string);
        Ok(Self {
            identity: Identity {
                profile_id,
                customer_user_id,
            },
            platform,
        })
    }
}

/// A request body that must be a JSON object (an empty body reads as `{}`), at most 1 MiB.
pub struct JsonObject(pub Map<String, Value>);

impl<S: Send + Sync> FromRequest<S> for JsonObject {
    type Rejection = ErrorResponse;

    async fn from_request(req: Request, _: &S) -> Result<Self, Self::Rejection> {
        let bytes: Bytes = axum::body::to_bytes(req.into_body(), MAX_BODY_BYTES)
            .await
            .map_err(|_| ErrorResponse(ApiError::new(ErrorCode::PayloadTooLarge)))?;
        parse_object(&bytes).map(JsonObject).map_err(ErrorResponse)
    }
}

fn has_nul(s: &str) -> bool {
    s.contains('\0')
}

fn holds_nul(value: &Value) -> bool {
    match value {
        Value::String(s) => has_nul(s),
        Value::Array(items) => items.iter().any(holds_nul),
        Value::Object(map) => map.iter().any(|(k, v)| has_nul(k) || holds_nul(v)),
        Value::Null | Value::Bool(_) | Value::Number(_) => false,
    }
}

pub fn parse_object(bytes: &[u8]) -> Result<Map<String, Value>, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    match serde_json::from_slice::<Value>(bytes) {
        Ok(Value::Object(map)) => match map.iter().find(|(k, v)| has_nul(k) || holds_nul(v)) {
            // Neither storage keeps NUL in text (PostgreSQL refuses it), so no field may hold it.
            Some((key, _)) => Err(ApiError::invalid(
                key.as_str(),
                "Null characters are not allowed.",
            )),
            None => Ok(map),
        },
        Ok(other) => Err(ApiError::invalid(
            "non_field_errors",
            format!(
                "Invalid data. Expected a dictionary, but got {}.",
                type_name(&other)
            ),
        )),
        Err(e) => Err(ApiError::invalid(
            "non_field_errors",
            format!("JSON parse error - {e}"),
        )),
    }
}
