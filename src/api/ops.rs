//! Operations: cache statistics and eviction, health (`/metrics` is in [`super::metrics`]).

use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use serde::Deserialize;
use serde_json::json;

use super::{body, parse_json, ApiError, ApiResult, AppState};
use crate::cache::{Change, Group};
use crate::domain;

/// This node and its invalidation channels.
pub async fn cluster(State(node): State<AppState>) -> Json<serde_json::Value> {
    Json(json!({
        "node": {
            "id": node.id(),
            "version": env!("CARGO_PKG_VERSION"),
        },
        "cluster": node.cluster().report(),
        "invalidation": node.invalidation_report(),
        "tasks": node.tasks().report(),
    }))
}

pub async fn caches(State(node): State<AppState>) -> Json<serde_json::Value> {
    Json(json!({ "caches": node.caches().report().await }))
}

/// Body of `POST /caches/evict`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvictBody {
    /// `opt`, `fhir_connect`, `tenant`, or `all` / absent for every group.
    group: Option<String>,
    /// Narrow to one tenant.
    tenant: Option<String>,
    /// Narrow to one key of the tenant (a template id; normalized).
    key: Option<String>,
}

pub async fn evict(
    State(node): State<AppState>,
    headers: HeaderMap,
    b: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let b = body(b)?;
    let req: EvictBody = if b.is_empty() {
        EvictBody {
            group: None,
            tenant: None,
            key: None,
        }
    } else {
        parse_json(&headers, &b)?
    };
    let bad =
        |d: String| ApiError::new(StatusCode::BAD_REQUEST, "invalid eviction request", vec![d]);
    let group = match req.group.as_deref().map(str::to_ascii_lowercase).as_deref() {
        None | Some("all") => None,
        Some("opt") => Some(Group::Opt),
        Some("fhir_connect") => Some(Group::FhirConnect),
        Some("tenant") => Some(Group::Tenant),
        Some(other) => {
            return Err(bad(format!(
                "group {other:?}: expected opt, fhir_connect, tenant or all"
            )))
        }
    };
    if let Some(t) = &req.tenant {
        domain::validate_tenant_id(t)?;
    }
    if req.key.is_some() && req.tenant.is_none() {
        return Err(bad("key needs tenant".into()));
    }
    let change = Change::Evict {
        group,
        tenant: req.tenant,
        key: req.key.as_deref().map(domain::normalize_template_id),
    };
    match node.evict(&change).await {
        Ok(n) => Ok(Json(json!({ "evicted": n, "change": change })).into_response()),
        Err(e) => {
            // The eviction did happen here and on the connected peers; say what is missing.
            Err(ApiError::from(e).with_detail(
                "the eviction was applied on this node and sent to the connected peers, but not \
                 recorded in the invalidation log: a peer that missed the broadcast keeps its \
                 entries; retry the eviction",
            ))
        }
    }
}

pub async fn live() -> Json<serde_json::Value> {
    Json(json!({ "status": "live" }))
}

pub async fn ready(State(node): State<AppState>) -> Response {
    if node.bootstrap.phase() == crate::bootstrap::Phase::Running {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "not ready", "error": "loading the bootstrap directory" })),
        )
            .into_response();
    }
    // A background task waiting for its restart, or dead: this node may be missing invalidations
    // or peers, so it says which part is down.
    if let Err(down) = node.tasks().readiness() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "not ready", "error": down })),
        )
            .into_response();
    }
    match node.db().readiness().await {
        Ok(Ok(())) => Json(json!({ "status": "ready" })).into_response(),
        Ok(Err(reason)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "not ready", "error": reason })),
        )
            .into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "readiness check failed");
            // A TLS failure names settings and the host, never a secret: say which.
            let error =
                match crate::store::tls::tls_failure(&e, node.node.config().database.tls.mode) {
                    Some(tls) => format!("database unreachable: {tls}"),
                    None => "database unreachable".to_string(),
                };
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({ "status": "not ready", "error": error })),
            )
                .into_response()
        }
    }
}
