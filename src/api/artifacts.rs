//! `/opt`, `/fc/context` and `/fc/model`: the openFHIR-compatible artifact routes.

use std::sync::Arc;

use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use serde_json::json;

use super::{
    body, fc_format, require_xml, wants_yaml, with_token, ApiError, ApiResult, AppState, TenantId,
};
use crate::cache::Representation;
use crate::domain::{FcDocument, FcFormat, FcList};
use crate::store::{FcTable, WriteMode, Written};

fn status(w: Written) -> StatusCode {
    if w.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    }
}

fn xml_text(b: &Bytes) -> ApiResult<&str> {
    std::str::from_utf8(b).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "OPT is not UTF-8",
            vec![e.to_string()],
        )
    })
}

// ---- OPT ----

pub async fn list_opts(State(node): State<AppState>, TenantId(t): TenantId) -> ApiResult<Response> {
    Ok(Json(node.opts(&t).await?).into_response())
}

pub async fn create_opt(
    State(node): State<AppState>,
    TenantId(t): TenantId,
    headers: HeaderMap,
    b: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    require_xml(&headers)?;
    let b = body(b)?;
    let (summary, w) = node
        .put_opt(&t, xml_text(&b)?, None, WriteMode::Create)
        .await?;
    Ok(with_token(
        (status(w), Json(summary)).into_response(),
        w.xid,
    ))
}

pub async fn put_opt(
    State(node): State<AppState>,
    TenantId(t): TenantId,
    Path(id): Path<String>,
    headers: HeaderMap,
    b: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    require_xml(&headers)?;
    let b = body(b)?;
    let (summary, w) = node
        .put_opt(&t, xml_text(&b)?, Some(&id), WriteMode::Upsert)
        .await?;
    Ok(with_token(
        (status(w), Json(summary)).into_response(),
        w.xid,
    ))
}

pub async fn get_opt(
    State(node): State<AppState>,
    TenantId(t): TenantId,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let opt = node.opt(&t, &id).await?;
    let wants_json = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("application/json"));
    if wants_json {
        return Ok(Json(&*opt).into_response());
    }
    Ok((
        [(header::CONTENT_TYPE, "application/xml")],
        opt.content.clone(),
    )
        .into_response())
}

pub async fn delete_opt(
    State(node): State<AppState>,
    TenantId(t): TenantId,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let xid = node.delete_opt(&t, &id).await?;
    Ok(with_token(StatusCode::NO_CONTENT.into_response(), xid))
}

// ---- FHIR Connect: shared response shapes ----

/// One document: its JSON by default; with `Accept: ...yaml` the YAML as uploaded (or converted).
/// Rendered once per cached document (see [`crate::cache::Rendered`]).
fn document(doc: &FcDocument, headers: &HeaderMap) -> ApiResult<Response> {
    if !wants_yaml(headers) {
        let body = doc
            .rendered
            .get_or_render(Representation::Json, || to_json(&*doc.json))?;
        return Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response());
    }
    let body = doc
        .rendered
        .get_or_render(Representation::Yaml, || match doc.format {
            FcFormat::Yaml => Ok(Bytes::copy_from_slice(doc.content.as_bytes())),
            FcFormat::Json => to_yaml(&*doc.json),
        })?;
    Ok(([(header::CONTENT_TYPE, "application/yaml")], body).into_response())
}

/// A list of contexts or models: metadata plus each document, as JSON or YAML. Rendered once per
/// cached list, so a cached GET of every context costs no serialization.
fn listing(list: &FcList, headers: &HeaderMap) -> ApiResult<Response> {
    /// One element: the document's metadata with the document itself under `document`.
    #[derive(serde::Serialize)]
    struct Item<'a> {
        #[serde(flatten)]
        meta: &'a FcDocument,
        document: &'a serde_json::Value,
    }
    let items = || -> Vec<Item<'_>> {
        list.docs
            .iter()
            .map(|d| Item {
                meta: d,
                document: &d.json,
            })
            .collect()
    };
    if wants_yaml(headers) {
        let body = list
            .rendered
            .get_or_render(Representation::Yaml, || to_yaml(&items()))?;
        return Ok(([(header::CONTENT_TYPE, "application/yaml")], body).into_response());
    }
    let body = list
        .rendered
        .get_or_render(Representation::Json, || to_json(&items()))?;
    Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
}

fn to_json<T: serde::Serialize + ?Sized>(v: &T) -> ApiResult<Bytes> {
    serde_json::to_vec(v).map(Bytes::from).map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "cannot render JSON",
            vec![e.to_string()],
        )
    })
}

fn to_yaml<T: serde::Serialize + ?Sized>(v: &T) -> ApiResult<Bytes> {
    serde_norway::to_string(v).map(Bytes::from).map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "cannot render YAML",
            vec![e.to_string()],
        )
    })
}

fn written(doc: FcDocument, w: Written) -> Response {
    with_token((status(w), Json(json!(doc))).into_response(), w.xid)
}

// ---- contexts ----

pub async fn list_contexts(
    State(node): State<AppState>,
    TenantId(t): TenantId,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let list = node.contexts(&t).await?;
    listing(&list, &headers)
}

/// `POST` (create) or `PUT` (create or replace) of a FHIR Connect document in `table`.
async fn put_fc(
    node: &AppState,
    table: FcTable,
    tenant: &str,
    path_id: Option<&str>,
    headers: &HeaderMap,
    b: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let fmt = fc_format(headers)?;
    let b = body(b)?;
    let mode = if path_id.is_some() {
        WriteMode::Upsert
    } else {
        WriteMode::Create
    };
    let (doc, w) = node.put_fc(table, tenant, &b, fmt, path_id, mode).await?;
    Ok(written(doc, w))
}

async fn delete_fc(node: &AppState, table: FcTable, tenant: &str, id: &str) -> ApiResult<Response> {
    let xid = node.delete_fc(table, tenant, id).await?;
    Ok(with_token(StatusCode::NO_CONTENT.into_response(), xid))
}

pub async fn create_context(
    State(node): State<AppState>,
    TenantId(t): TenantId,
    headers: HeaderMap,
    b: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    put_fc(&node, FcTable::Context, &t, None, &headers, b).await
}

pub async fn put_context(
    State(node): State<AppState>,
    TenantId(t): TenantId,
    Path(id): Path<String>,
    headers: HeaderMap,
    b: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    put_fc(&node, FcTable::Context, &t, Some(&id), &headers, b).await
}

pub async fn get_context(
    State(node): State<AppState>,
    TenantId(t): TenantId,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    document(&*node.context(&t, &id).await?, &headers)
}

pub async fn delete_context(
    State(node): State<AppState>,
    TenantId(t): TenantId,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    delete_fc(&node, FcTable::Context, &t, &id).await
}

// ---- models ----

pub async fn list_models(
    State(node): State<AppState>,
    TenantId(t): TenantId,
    headers: HeaderMap,
) -> ApiResult<Response> {
    // Models are not cached as a list: this list and its rendering live for one request.
    let list = FcList {
        docs: node.models(&t).await?.into_iter().map(Arc::new).collect(),
        rendered: Default::default(),
    };
    listing(&list, &headers)
}

pub async fn create_model(
    State(node): State<AppState>,
    TenantId(t): TenantId,
    headers: HeaderMap,
    b: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    put_fc(&node, FcTable::Model, &t, None, &headers, b).await
}

pub async fn put_model(
    State(node): State<AppState>,
    TenantId(t): TenantId,
    Path(name): Path<String>,
    headers: HeaderMap,
    b: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    put_fc(&node, FcTable::Model, &t, Some(&name), &headers, b).await
}

pub async fn get_model(
    State(node): State<AppState>,
    TenantId(t): TenantId,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    document(&node.model(&t, &name).await?, &headers)
}

pub async fn delete_model(
    State(node): State<AppState>,
    TenantId(t): TenantId,
    Path(name): Path<String>,
) -> ApiResult<Response> {
    delete_fc(&node, FcTable::Model, &t, &name).await
}

// ---- compiled artifacts ----

pub async fn get_mapper(
    State(node): State<AppState>,
    TenantId(t): TenantId,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let m = node.mapper(&t, &id).await?;
    let s = m.index.summary();
    Ok(Json(json!({
        "templateId": m.index.template_id,
        "models": s["models"],
        "byArchetype": s["by_archetype"],
        "mergedExtensions": s["merged_extensions"],
        "compiledAt": m.compiled_at.format(&time::format_description::well_known::Rfc3339).unwrap_or_default(),
        "node": m.node,
        "compileMicros": m.compile_us,
    }))
    .into_response())
}

pub async fn get_helpers(
    State(node): State<AppState>,
    TenantId(t): TenantId,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    Ok(Json(&*node.helpers(&t, &id).await?).into_response())
}
