//! `/opt`, `/fc/context`, `/fc/model` and `/$purge`: openFHIR's state API, answered as openFHIR
//! answers it (status codes, bodies, the JSON array of messages of a 400), plus this project's
//! `/fc/mapper` and `/fc/helpers`.
//!
//! Every OPT, context and model is addressed by its id (the UUID every response carries) or by
//! its template id or model name; an id match wins.

use std::sync::Arc;

use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use serde_json::{json, Map, Value};

use super::{
    body, fc_format, require_xml, wants_yaml, with_token, ApiError, ApiResult, AppState, TenantId,
};
use crate::domain::{FcDocument, FcFormat, FcList};
use crate::node::Put;
use crate::rendered::Representation;
use crate::store::{FcTable, OptSummary, Written};

/// An error of an openFHIR route: a 400 is a JSON array of messages, as openFHIR's
/// `RequestValidationException` answers; every other status is this API's `{error, details}`.
pub struct OpenFhirError(ApiError);

impl<E: Into<ApiError>> From<E> for OpenFhirError {
    fn from(e: E) -> Self {
        OpenFhirError(e.into())
    }
}

impl IntoResponse for OpenFhirError {
    fn into_response(self) -> Response {
        if self.0.status() != StatusCode::BAD_REQUEST {
            return self.0.into_response();
        }
        let messages = self.0.messages();
        (StatusCode::BAD_REQUEST, Json(messages)).into_response()
    }
}

type OfResult = Result<Response, OpenFhirError>;

/// The request id a client sent in `x-req-id` (openFHIR logs it with every write).
fn req_id(headers: &HeaderMap) -> &str {
    headers
        .get("x-req-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

fn xml_text(b: &Bytes) -> ApiResult<&str> {
    std::str::from_utf8(b).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "OPT is not UTF-8",
            vec![format!("the OPT is not UTF-8: {e}")],
        )
    })
}

fn rfc3339(t: time::OffsetDateTime) -> Value {
    t.format(&time::format_description::well_known::Rfc3339)
        .map_or(Value::Null, Value::String)
}

/// openFHIR's OPT entity: `id`, `templateId` (normalized), `originalTemplateId`,
/// `displayTemplateId`, `content` (`"redacted"` after a write, `null` in a listing, the XML when
/// asked by `templateId`), `user`, `organisation` (the tenant), `created`, `updated`; plus this
/// API's `tenant` and `size`.
fn opt_entity(s: &OptSummary, content: Value) -> Value {
    json!({
        "id": s.id,
        "templateId": s.template_id,
        "originalTemplateId": s.original_template_id,
        "displayTemplateId": s.original_template_id,
        "content": content,
        "user": Value::Null,
        "organisation": s.tenant,
        "tenant": s.tenant,
        "size": s.size,
        "created": rfc3339(s.created),
        "updated": rfc3339(s.updated),
    })
}

// ---- OPT ----

/// `GET /opt?templateId=`: the tenant's OPT with that template id (normalized), as a list of
/// at most one.
#[derive(serde::Deserialize)]
pub struct OptQuery {
    #[serde(rename = "templateId")]
    template_id: Option<String>,
}

pub async fn list_opts(
    State(node): State<AppState>,
    TenantId(t): TenantId,
    Query(q): Query<OptQuery>,
) -> OfResult {
    if let Some(tid) = q.template_id.as_deref().filter(|s| !s.trim().is_empty()) {
        // As openFHIR: the entity with its content, or an empty list.
        let key = crate::domain::normalize_template_id(tid);
        let found = match node.opt(&t, &key).await {
            Ok(doc) if doc.template.normalized_id == key => Some(doc),
            Ok(_) => None,
            Err(e) if matches!(e.root(), crate::Error::NotFound { .. }) => None,
            Err(e) => return Err(e.into()),
        };
        let list: Vec<Value> = found
            .into_iter()
            .map(|doc| {
                let s = OptSummary {
                    id: doc.id,
                    tenant: doc.tenant.clone(),
                    template_id: doc.template.normalized_id.clone(),
                    original_template_id: doc.template.template_id.clone(),
                    size: doc.size as i64,
                    created: doc.created,
                    updated: doc.updated,
                };
                opt_entity(
                    &s,
                    Value::String(String::from_utf8_lossy(&doc.content).into_owned()),
                )
            })
            .collect();
        return Ok(Json(list).into_response());
    }
    let list: Vec<Value> = node
        .opts(&t)
        .await?
        .iter()
        .map(|s| opt_entity(s, Value::Null))
        .collect();
    Ok(Json(list).into_response())
}

async fn write_opt(
    node: &AppState,
    tenant: &str,
    put: Put<'_>,
    headers: &HeaderMap,
    b: Result<Bytes, BytesRejection>,
) -> OfResult {
    require_xml(headers)?;
    let b = body(b)?;
    let (summary, w) = node.put_opt(tenant, xml_text(&b)?, put).await?;
    tracing::info!(
        req_id = req_id(headers),
        tenant,
        id = %summary.id,
        template_id = %summary.template_id,
        created = w.created,
        "stored OPT"
    );
    Ok(with_token(
        Json(opt_entity(&summary, json!("redacted"))).into_response(),
        w.xid,
    ))
}

pub async fn create_opt(
    State(node): State<AppState>,
    TenantId(t): TenantId,
    headers: HeaderMap,
    b: Result<Bytes, BytesRejection>,
) -> OfResult {
    write_opt(&node, &t, Put::Create, &headers, b).await
}

pub async fn put_opt(
    State(node): State<AppState>,
    TenantId(t): TenantId,
    Path(id): Path<String>,
    headers: HeaderMap,
    b: Result<Bytes, BytesRejection>,
) -> OfResult {
    write_opt(&node, &t, Put::At(&id), &headers, b).await
}

pub async fn get_opt(
    State(node): State<AppState>,
    TenantId(t): TenantId,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> OfResult {
    let opt = node.opt(&t, &id).await?;
    let wants_json = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("application/json"));
    if wants_json {
        return Ok(Json(&*opt).into_response());
    }
    Ok((
        [(header::CONTENT_TYPE, "text/xml;charset=UTF-8")],
        opt.content.clone(),
    )
        .into_response())
}

/// A DELETE answers 204 whether or not there was something to delete, as openFHIR's does; the
/// consistency token comes only with a delete that happened.
fn deleted(xid: Option<u64>) -> Response {
    let r = StatusCode::NO_CONTENT.into_response();
    match xid {
        Some(xid) => with_token(r, xid),
        None => r,
    }
}

pub async fn delete_opt(
    State(node): State<AppState>,
    TenantId(t): TenantId,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> OfResult {
    let xid = node.delete_opt(&t, &id).await?;
    tracing::info!(req_id = req_id(&headers), tenant = %t, path = %id, deleted = xid.is_some(), "delete OPT");
    Ok(deleted(xid))
}

// ---- purge ----

/// `GET /$purge`: deletes the tenant's OPTs, contexts and models; 204.
pub async fn purge(
    State(node): State<AppState>,
    TenantId(t): TenantId,
    headers: HeaderMap,
) -> OfResult {
    let xid = node.purge(&t).await?;
    tracing::info!(req_id = req_id(&headers), tenant = %t, "purged the tenant's state");
    Ok(with_token(StatusCode::NO_CONTENT.into_response(), xid))
}

// ---- FHIR Connect: shared response shapes ----

/// A document as openFHIR answers it: its fields, with its `id`.
fn with_id(doc: &FcDocument) -> Value {
    let mut out = Map::new();
    out.insert("id".to_string(), json!(doc.uuid));
    if let Value::Object(fields) = &*doc.json {
        for (k, v) in fields {
            if k != "id" {
                out.insert(k.clone(), v.clone());
            }
        }
    }
    Value::Object(out)
}

/// One document: JSON with its `id` by default; with `Accept: ...yaml` the YAML as uploaded (or
/// converted). Rendered once per cached document (see [`crate::rendered::Rendered`]).
fn document(doc: &FcDocument, headers: &HeaderMap) -> ApiResult<Response> {
    if !wants_yaml(headers) {
        let body = doc
            .rendered
            .get_or_render(Representation::Json, || to_json(&with_id(doc)))?;
        return Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response());
    }
    let body = doc
        .rendered
        .get_or_render(Representation::Yaml, || match doc.format {
            FcFormat::Yaml => Ok(Bytes::copy_from_slice(doc.content.as_bytes())),
            FcFormat::Json => to_yaml(&*doc.json),
        })?;
    Ok(([(header::CONTENT_TYPE, "application/x-yaml")], body).into_response())
}

/// A list of contexts or models: an array of documents with their ids, as JSON or YAML.
/// Rendered once per cached list, so a cached GET of every context costs no serialization.
fn listing(list: &FcList, headers: &HeaderMap) -> ApiResult<Response> {
    let items = || list.docs.iter().map(|d| with_id(d)).collect::<Vec<_>>();
    if wants_yaml(headers) {
        let body = list
            .rendered
            .get_or_render(Representation::Yaml, || to_yaml(&items()))?;
        return Ok(([(header::CONTENT_TYPE, "application/x-yaml")], body).into_response());
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

/// `POST` (create) or `PUT` of a FHIR Connect document in `table`: 200 with the stored document
/// and its id (YAML when asked), and the consistency token.
async fn write_fc(
    node: &AppState,
    table: FcTable,
    tenant: &str,
    put: Put<'_>,
    headers: &HeaderMap,
    b: Result<Bytes, BytesRejection>,
) -> OfResult {
    let fmt = fc_format(headers)?;
    let b = body(b)?;
    let (doc, w): (FcDocument, Written) = node.put_fc(table, tenant, &b, fmt, put).await?;
    tracing::info!(
        req_id = req_id(headers),
        tenant,
        id = %doc.uuid,
        key = %doc.id,
        created = w.created,
        "stored {}",
        table.what()
    );
    Ok(with_token(document(&doc, headers)?, w.xid))
}

async fn delete_fc(
    node: &AppState,
    table: FcTable,
    tenant: &str,
    path: &str,
    headers: &HeaderMap,
) -> OfResult {
    let xid = node.delete_artifact(table.into(), tenant, path).await?;
    tracing::info!(
        req_id = req_id(headers),
        tenant,
        path,
        deleted = xid.is_some(),
        "delete {}",
        table.what()
    );
    Ok(deleted(xid))
}

// ---- contexts ----

pub async fn list_contexts(
    State(node): State<AppState>,
    TenantId(t): TenantId,
    headers: HeaderMap,
) -> OfResult {
    let list = node.contexts(&t).await?;
    Ok(listing(&list, &headers)?)
}

pub async fn create_context(
    State(node): State<AppState>,
    TenantId(t): TenantId,
    headers: HeaderMap,
    b: Result<Bytes, BytesRejection>,
) -> OfResult {
    write_fc(&node, FcTable::Context, &t, Put::Create, &headers, b).await
}

pub async fn put_context(
    State(node): State<AppState>,
    TenantId(t): TenantId,
    Path(id): Path<String>,
    headers: HeaderMap,
    b: Result<Bytes, BytesRejection>,
) -> OfResult {
    write_fc(&node, FcTable::Context, &t, Put::At(&id), &headers, b).await
}

pub async fn get_context(
    State(node): State<AppState>,
    TenantId(t): TenantId,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> OfResult {
    Ok(document(&*node.context(&t, &id).await?, &headers)?)
}

pub async fn delete_context(
    State(node): State<AppState>,
    TenantId(t): TenantId,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> OfResult {
    delete_fc(&node, FcTable::Context, &t, &id, &headers).await
}

// ---- models ----

pub async fn list_models(
    State(node): State<AppState>,
    TenantId(t): TenantId,
    headers: HeaderMap,
) -> OfResult {
    // Models are not cached as a list: this list and its rendering live for one request.
    let list = FcList {
        docs: node.models(&t).await?.into_iter().map(Arc::new).collect(),
        rendered: Default::default(),
    };
    Ok(listing(&list, &headers)?)
}

pub async fn create_model(
    State(node): State<AppState>,
    TenantId(t): TenantId,
    headers: HeaderMap,
    b: Result<Bytes, BytesRejection>,
) -> OfResult {
    write_fc(&node, FcTable::Model, &t, Put::Create, &headers, b).await
}

pub async fn put_model(
    State(node): State<AppState>,
    TenantId(t): TenantId,
    Path(id): Path<String>,
    headers: HeaderMap,
    b: Result<Bytes, BytesRejection>,
) -> OfResult {
    write_fc(&node, FcTable::Model, &t, Put::At(&id), &headers, b).await
}

pub async fn get_model(
    State(node): State<AppState>,
    TenantId(t): TenantId,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> OfResult {
    Ok(document(&node.model(&t, &id).await?, &headers)?)
}

pub async fn delete_model(
    State(node): State<AppState>,
    TenantId(t): TenantId,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> OfResult {
    delete_fc(&node, FcTable::Model, &t, &id, &headers).await
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
        "warnings": s["warnings"],
        "start": s["start"],
        "compiledAt": rfc3339(m.compiled_at),
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
