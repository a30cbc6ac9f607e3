//! `/tenants`: tenant configuration records.

use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use serde::Deserialize;

use super::{body, parse_json, with_token, ApiError, ApiResult, AppState};

/// Body of `PUT /tenants/{id}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantBody {
    /// Display name (default: the id).
    name: Option<String>,
    /// Free-form configuration object (default: `{}`).
    config: Option<serde_json::Value>,
}

pub async fn list(State(node): State<AppState>) -> ApiResult<Response> {
    Ok(Json(node.tenants().await?).into_response())
}

pub async fn get(State(node): State<AppState>, Path(id): Path<String>) -> ApiResult<Response> {
    Ok(Json(&*node.tenant(&id).await?).into_response())
}

pub async fn put(
    State(node): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    b: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let b = body(b)?;
    // Both fields are optional, so an empty body means "defaults".
    let req: TenantBody = if b.is_empty() {
        TenantBody {
            name: None,
            config: None,
        }
    } else {
        parse_json(&headers, &b)?
    };
    let config = req.config.unwrap_or_else(|| serde_json::json!({}));
    if !config.is_object() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid tenant",
            vec!["config must be a JSON object".into()],
        ));
    }
    let name = req.name.unwrap_or_else(|| id.clone());
    let (tenant, w) = node.put_tenant(&id, &name, &config).await?;
    let status = if w.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok(with_token((status, Json(tenant)).into_response(), w.xid))
}

pub async fn delete(State(node): State<AppState>, Path(id): Path<String>) -> ApiResult<Response> {
    let xid = node.delete_tenant(&id).await?;
    Ok(with_token(StatusCode::NO_CONTENT.into_response(), xid))
}
