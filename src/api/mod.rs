//! The HTTP API (axum): openFHIR-compatible artifact routes, tenants and operations.

mod artifacts;
mod conn;
mod error;
pub mod metrics;
mod ops;
pub mod server;
mod tenants;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use bytes::Bytes;
use subtle::ConstantTimeEq;

pub use error::{ApiError, ApiResult};
pub use server::{serve, ServerLimits, ServerStats};

use crate::domain::{self, FcFormat};
use crate::node::Node;

/// Header carrying a write's consistency token (its transaction id); a read that sends it back,
/// on any node, is served only after that node applied the write's invalidations.
pub const TOKEN_HEADER: &str = "x-consistency-token";

/// Adds the consistency token to a write's response.
fn with_token(mut r: Response, xid: u64) -> Response {
    if let Ok(v) = header::HeaderValue::from_str(&xid.to_string()) {
        r.headers_mut().insert(TOKEN_HEADER, v);
    }
    r
}

/// Read-your-writes: a request carrying `X-Consistency-Token` waits until this node has applied
/// the invalidations of that write (catching up at once), or answers 504 after
/// `OPENFHIR_CONSISTENCY_WAIT_MS`.
/// Health probes ignore the header: they are neither authenticated nor limited, and must answer
/// without touching the database.
async fn consistency(State(node): State<AppState>, req: Request, next: Next) -> Response {
    if is_probe(req.uri().path()) {
        return next.run(req).await;
    }
    let Some(v) = req.headers().get(TOKEN_HEADER) else {
        return next.run(req).await;
    };
    let Some(xid) = v.to_str().ok().and_then(|s| s.trim().parse::<u64>().ok()) else {
        return ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid X-Consistency-Token",
            vec!["send back the X-Consistency-Token of a write response (a number)".into()],
        )
        .into_response();
    };
    let wait = Duration::from_millis(node.config().invalidation.consistency_wait_ms);
    match node.await_token(xid, wait).await {
        Ok(true) => next.run(req).await,
        Ok(false) => ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "this node has not caught up with the write yet",
            vec![format!(
                "waited {} ms (OPENFHIR_CONSISTENCY_WAIT_MS); retry, or read from another node",
                wait.as_millis()
            )],
        )
        .into_response(),
        Err(e) => ApiError::from(e).into_response(),
    }
}

/// The health probes: answered without authentication, concurrency limit or consistency wait.
fn is_probe(path: &str) -> bool {
    matches!(path, "/health" | "/health/live" | "/health/ready")
}

/// The FHIR Connect document routes, which have their own body limit.
fn is_fc_document(path: &str) -> bool {
    ["/fc/context", "/fc/model"]
        .iter()
        .any(|p| path == *p || path.strip_prefix(p).is_some_and(|r| r.starts_with('/')))
}

/// The body limits, for the early check of `Content-Length`.
#[derive(Clone, Copy)]
struct BodyLimits {
    any: usize,
    fc: usize,
    /// The variable that sets `fc`: `OPENFHIR_MAX_BODY_BYTES` when it is the lower of the two.
    fc_var: &'static str,
}

/// A request whose `Content-Length` is over the route's body limit is answered 413 at once,
/// from its headers: waiting for a body that large (or one that never comes) would hold a
/// connection and a concurrency slot until the request timeout.
async fn early_body_limit(State(l): State<BodyLimits>, req: Request, next: Next) -> Response {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let fc = is_fc_document(req.uri().path());
    let (limit, var) = if fc {
        (l.fc, l.fc_var)
    } else {
        (l.any, "OPENFHIR_MAX_BODY_BYTES")
    };
    match declared {
        Some(n) if n > limit as u64 => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body too large (limit: {var})"),
            vec![format!(
                "Content-Length is {n} bytes; this route takes at most {limit} ({var})"
            )],
        )
        .into_response(),
        _ => next.run(req).await,
    }
}

/// Header naming the tenant of a request; absent means `default`.
pub const TENANT_HEADER: &str = "x-tenant-id";

/// The shared state of every handler: the node, and the HTTP front's own counters (which the
/// node knows nothing of). Dereferences to the [`Node`].
#[derive(Clone)]
pub struct AppState {
    /// The node the API serves.
    pub node: Arc<Node>,
    /// Connections accepted and refused, requests shed: filled by [`serve`] and the limiter.
    pub http_stats: Arc<ServerStats>,
    /// The bootstrap run readiness waits for (none by default).
    pub bootstrap: Arc<crate::bootstrap::Progress>,
    /// The HTTP latency histograms of `/metrics`.
    pub http_metrics: Arc<metrics::HttpMetrics>,
}

impl AppState {
    /// The state of an API over `node`, its counters at zero.
    pub fn new(node: Arc<Node>) -> AppState {
        AppState {
            node,
            http_stats: Arc::default(),
            bootstrap: Arc::default(),
            http_metrics: Arc::default(),
        }
    }
}

impl std::ops::Deref for AppState {
    type Target = Node;
    fn deref(&self) -> &Node {
        &self.node
    }
}

/// The whole API with its limits (body size, request timeout) and authentication.
pub fn router(state: AppState) -> Router {
    let node = state.clone();
    let http = node.config().http.clone();
    // FHIR Connect documents get their own, lower body limit: parsing one peaks at up to ~250x its
    // size (see OPENFHIR_MAX_FC_BODY_BYTES). This layer is inside the general one, so it wins.
    let fc_limit = http.max_fc_body_bytes.min(http.max_body_bytes);
    let fc = Router::new()
        .route(
            "/fc/context",
            get(artifacts::list_contexts).post(artifacts::create_context),
        )
        .route(
            "/fc/context/{id}",
            get(artifacts::get_context)
                .put(artifacts::put_context)
                .delete(artifacts::delete_context),
        )
        .route(
            "/fc/model",
            get(artifacts::list_models).post(artifacts::create_model),
        )
        .route(
            "/fc/model/{id}",
            get(artifacts::get_model)
                .put(artifacts::put_model)
                .delete(artifacts::delete_model),
        )
        .layer(DefaultBodyLimit::max(fc_limit));
    Router::new()
        .route(
            "/opt",
            get(artifacts::list_opts).post(artifacts::create_opt),
        )
        .route(
            "/opt/{id}",
            get(artifacts::get_opt)
                .put(artifacts::put_opt)
                .delete(artifacts::delete_opt),
        )
        .merge(fc)
        .route("/$purge", get(artifacts::purge))
        .route("/fc/mapper/{id}", get(artifacts::get_mapper))
        .route("/fc/helpers/{id}", get(artifacts::get_helpers))
        .route("/tenants", get(tenants::list))
        .route(
            "/tenants/{id}",
            get(tenants::get).put(tenants::put).delete(tenants::delete),
        )
        .route("/cluster", get(ops::cluster))
        .route("/caches", get(ops::caches))
        .route("/caches/evict", post(ops::evict))
        .route("/metrics", get(metrics::metrics))
        .route("/health", get(ops::ready))
        .route("/health/live", get(ops::live))
        .route("/health/ready", get(ops::ready))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such route", vec![]) })
        .layer(middleware::from_fn_with_state(node.clone(), consistency))
        .layer(middleware::from_fn_with_state(
            Arc::new(Limiter {
                slots: Arc::new(tokio::sync::Semaphore::new(http.max_concurrent_requests)),
                node: node.clone(),
            }),
            limit_concurrency,
        ))
        .layer(middleware::from_fn_with_state(node.clone(), authenticate))
        .layer(middleware::from_fn_with_state(
            BodyLimits {
                any: http.max_body_bytes,
                fc: fc_limit,
                fc_var: if http.max_fc_body_bytes <= http.max_body_bytes {
                    "OPENFHIR_MAX_FC_BODY_BYTES"
                } else {
                    "OPENFHIR_MAX_BODY_BYTES"
                },
            },
            early_body_limit,
        ))
        .layer(DefaultBodyLimit::max(http.max_body_bytes))
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            Duration::from_secs(http.request_timeout_secs),
        ))
        // Outside the timeout, so its 408 gets the JSON body too.
        .layer(middleware::map_response(json_errors))
        .layer(
            tower_http::trace::TraceLayer::new_for_http().make_span_with(
                |req: &axum::http::Request<axum::body::Body>| {
                    // openFHIR's clients send `x-req-id`; every log line of the request names it.
                    let req_id = req
                        .headers()
                        .get("x-req-id")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("");
                    tracing::info_span!(
                        "request",
                        method = %req.method(),
                        uri = %req.uri(),
                        req_id,
                    )
                },
            ),
        )
        // Outermost, so the time includes every layer and the status is the one sent. Layers
        // wrap each route, so the matched route template is known here.
        .layer(middleware::from_fn_with_state(
            node.http_metrics.clone(),
            metrics::record_http,
        ))
        .with_state(node)
}

struct Limiter {
    slots: Arc<tokio::sync::Semaphore>,
    node: AppState,
}

/// At most `OPENFHIR_MAX_CONCURRENT_REQUESTS` requests run at once; more are answered 503 at
/// once (queueing would only turn overload into timeouts). Health probes are never refused, so
/// an orchestrator does not restart a node for being busy.
async fn limit_concurrency(State(l): State<Arc<Limiter>>, req: Request, next: Next) -> Response {
    if is_probe(req.uri().path()) {
        return next.run(req).await;
    }
    let Ok(_slot) = l.slots.clone().try_acquire_owned() else {
        l.node
            .http_stats
            .shed
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut r = ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many concurrent requests",
            vec!["OPENFHIR_MAX_CONCURRENT_REQUESTS requests are running; retry shortly".into()],
        )
        .into_response();
        r.headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        return r;
    };
    next.run(req).await
}

/// Requires `Authorization: Bearer <OPENFHIR_API_TOKEN>` on every route but `/health*`.
async fn authenticate(State(node): State<AppState>, req: Request, next: Next) -> Response {
    let Some(token) = &node.config().http.api_token else {
        return next.run(req).await;
    };
    if is_probe(req.uri().path()) {
        return next.run(req).await;
    }
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| {
            let v = v.as_bytes();
            // The scheme name is case-insensitive (RFC 9110 section 11.1).
            (v.len() > 7 && v[..7].eq_ignore_ascii_case(b"bearer ")).then(|| &v[7..])
        })
        .unwrap_or_default();
    // Constant-time comparison of fixed-length digests: the time taken reveals neither how much
    // of the token matched nor its length.
    use sha2::Digest;
    let (given, wanted) = (
        sha2::Sha256::digest(given),
        sha2::Sha256::digest(token.expose().as_bytes()),
    );
    if bool::from(given.as_slice().ct_eq(wanted.as_slice())) {
        next.run(req).await
    } else {
        let mut r = ApiError::new(
            StatusCode::UNAUTHORIZED,
            "missing or wrong bearer token",
            vec!["send Authorization: Bearer <OPENFHIR_API_TOKEN>".into()],
        )
        .into_response();
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer"),
        );
        r
    }
}

/// Gives error responses made outside our handlers (405 from routing, 408 from the timeout,
/// path decoding rejections) the same JSON `{error, details}` shape as ours.
async fn json_errors(resp: Response) -> Response {
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, 64 * 1024)
        .await
        .unwrap_or_default();
    let details: Vec<String> = std::str::from_utf8(&text)
        .ok()
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|t| vec![t.to_string()])
        .unwrap_or_default();
    let error = status
        .canonical_reason()
        .unwrap_or("error")
        .to_ascii_lowercase();
    let json = serde_json::json!({ "error": error, "details": details }).to_string();
    parts.headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, axum::body::Body::from(json))
}

/// The request's tenant, checked to exist.
pub struct TenantId(pub String);

impl FromRequestParts<AppState> for TenantId {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, node: &AppState) -> Result<Self, ApiError> {
        // A proxy that appends the header must not make a request act on another tenant.
        if parts.headers.get_all(TENANT_HEADER).iter().count() > 1 {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "more than one X-Tenant-Id header",
                vec!["send X-Tenant-Id once: with several, the tenant is ambiguous".into()],
            ));
        }
        let id = match parts.headers.get(TENANT_HEADER) {
            None => domain::DEFAULT_TENANT.to_string(),
            Some(v) => v
                .to_str()
                .map_err(|_| {
                    ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "invalid X-Tenant-Id header",
                        vec![],
                    )
                })?
                .trim()
                .to_string(),
        };
        node.tenant(&id).await?;
        Ok(TenantId(id))
    }
}

/// The body, or the reason it could not be read (413 when over the limit), as JSON.
fn body(b: Result<Bytes, BytesRejection>) -> ApiResult<Bytes> {
    b.map_err(|r| {
        let status = r.status();
        let msg = if status == StatusCode::PAYLOAD_TOO_LARGE {
            "request body too large (limit: OPENFHIR_MAX_BODY_BYTES; for FHIR Connect documents OPENFHIR_MAX_FC_BODY_BYTES)"
                .to_string()
        } else {
            "could not read the request body".to_string()
        };
        ApiError::new(status, msg, vec![r.body_text()])
    })
}

fn content_type(headers: &HeaderMap) -> Option<String> {
    headers.get(header::CONTENT_TYPE).map(|v| {
        v.to_str()
            .unwrap_or("")
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase()
    })
}

fn unsupported(got: &str, accepted: &str) -> ApiError {
    ApiError::new(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        format!("unsupported content type '{got}'"),
        vec![format!("send one of: {accepted}")],
    )
}

/// OPT uploads are XML.
fn require_xml(headers: &HeaderMap) -> ApiResult<()> {
    match content_type(headers).as_deref() {
        None | Some("application/xml" | "text/xml" | "text/plain" | "application/octet-stream") => {
            Ok(())
        }
        Some(ct) if ct.starts_with("application/") && ct.ends_with("+xml") => Ok(()),
        Some(ct) => Err(unsupported(ct, "application/xml, text/xml")),
    }
}

/// FHIR Connect uploads are YAML or JSON.
fn fc_format(headers: &HeaderMap) -> ApiResult<FcFormat> {
    match content_type(headers).as_deref() {
        None
        | Some(
            "application/yaml" | "application/x-yaml" | "text/yaml" | "text/x-yaml" | "text/plain",
        ) => Ok(FcFormat::Yaml),
        Some("application/json") => Ok(FcFormat::Json),
        Some(ct) => Err(unsupported(
            ct,
            "application/yaml, application/x-yaml, text/yaml, application/json",
        )),
    }
}

/// Tenant and JSON bodies are JSON.
fn require_json(headers: &HeaderMap) -> ApiResult<()> {
    match content_type(headers).as_deref() {
        None | Some("application/json") => Ok(()),
        Some(ct) => Err(unsupported(ct, "application/json")),
    }
}

/// True when the client asked for YAML (`Accept: application/yaml`, ...).
fn wants_yaml(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("yaml"))
}

fn parse_json<T: serde::de::DeserializeOwned>(headers: &HeaderMap, b: &[u8]) -> ApiResult<T> {
    require_json(headers)?;
    serde_json::from_slice(b).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "malformed JSON body",
            vec![e.to_string()],
        )
    })
}
