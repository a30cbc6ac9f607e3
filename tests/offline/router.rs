//! The HTTP API's router in memory: `api::router` over a node, driven with
//! `tower::ServiceExt::oneshot` as axum's testing example does. No socket is bound, and the
//! database is one that is not there (`NO_DATABASE`): the pool connects lazily, so building the
//! node touches nothing.
//!
//! Checked here: every answer the API gives before it needs the database (routing, methods,
//! authentication, headers, content types, body limits, malformed bodies, invalid ids, health,
//! metrics, eviction), with its status, content type and exact body; and what a request that
//! does need the database gets while it is down (503). What needs PostgreSQL or a real server
//! (stored data, connection limits, header timeouts) is in the `it` binary: `http_api`,
//! `openfhir_api`, `http_limits`, `hardening`.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderMap, HeaderValue, Method, Request, StatusCode};
use axum::Router;
use openfhir_cache::api::{self, AppState, TENANT_HEADER, TOKEN_HEADER};
use openfhir_cache::bootstrap::Progress;
use openfhir_cache::domain::Tenant;
use openfhir_cache::node::Put;
use openfhir_cache::{Config, Node};
use serde_json::{json, Value};
use tower::ServiceExt;

/// A database URL nothing answers at: nothing listens on port 1 of loopback, so every
/// connection attempt is refused at once.
const NO_DATABASE: &str = "postgres://nobody@127.0.0.1:1/none";

/// The API state of a fresh node over [`NO_DATABASE`], with `env` on top of the defaults.
fn state_with(env: &[(&str, &str)]) -> AppState {
    let mut vars: HashMap<String, String> = HashMap::from([
        ("DATABASE_URL".into(), NO_DATABASE.into()),
        // No bootstrap directory (a machine may have /app/bootstrap/).
        ("OPENFHIR_BOOTSTRAP_DIR".into(), String::new()),
    ]);
    vars.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let config = Config::from_sources(None, |k| vars.get(k).cloned()).expect("valid config");
    AppState::new(Arc::new(Node::new(config).expect("node builds")))
}

/// The router of a fresh node over no database, and its node.
fn api_with(env: &[(&str, &str)]) -> (Router, Arc<Node>) {
    let state = state_with(env);
    (api::router(state.clone()), state.node)
}

fn api() -> (Router, Arc<Node>) {
    api_with(&[])
}

/// Puts tenant `default` in the node's tenant cache, as a load from the database would: the
/// artifact routes look their tenant up before anything else, so this is what lets a request
/// reach their content-type and body checks without a database.
async fn with_default_tenant(node: &Node) {
    let t = Tenant {
        id: "default".into(),
        name: "default".into(),
        config: json!({}),
        created: time::OffsetDateTime::UNIX_EPOCH,
        updated: time::OffsetDateTime::UNIX_EPOCH,
    };
    node.caches()
        .tenant
        .get_or_load("default", None, || {
            let t = t.clone();
            async move { Ok(t) }
        })
        .await
        .expect("cached");
}

/// A response, fully read.
struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Reply {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    fn header(&self, name: header::HeaderName) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().expect("ASCII"))
    }

    /// Asserts the status and a JSON content type; the body as JSON.
    fn json(&self, status: u16) -> Value {
        assert_eq!(self.status.as_u16(), status, "body: {}", self.text());
        assert_eq!(
            self.header(header::CONTENT_TYPE),
            Some("application/json"),
            "{}",
            self.text()
        );
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }

    /// Asserts the `{error, details}` body of this API, exactly.
    fn error(&self, status: u16, error: &str, details: &[&str]) {
        assert_eq!(
            self.json(status),
            json!({ "error": error, "details": details })
        );
    }

    /// Asserts a 400 of an openFHIR route (openFHIR's JSON array of messages); the messages.
    fn messages(&self) -> Vec<String> {
        let v = self.json(400);
        serde_json::from_value(v.clone())
            .unwrap_or_else(|_| panic!("not an array of messages: {v}"))
    }

    /// Asserts the 503 of a request that needed the database.
    fn database_unavailable(&self) {
        self.error(503, "database unavailable; retry later", &[]);
    }
}

/// Asserts the 400 of a malformed tenant id.
fn invalid_tenant(r: &Reply, id: &str) {
    r.error(
        400,
        "invalid tenant id",
        &[&format!(
            "tenant id {id:?} must be 1-64 characters of A-Z, a-z, 0-9, '.', '_' or '-'"
        )],
    );
}

/// Sends `req` through the router.
async fn send(app: &Router, req: Request<Body>) -> Reply {
    let r = app.clone().oneshot(req).await.expect("infallible");
    let (parts, body) = r.into_parts();
    let body = axum::body::to_bytes(body, usize::MAX)
        .await
        .expect("body reads");
    Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

fn get(path: &str) -> Request<Body> {
    req(Method::GET, path, &[], Body::empty())
}

/// `method path` with `headers` and `body`.
fn req(method: Method, path: &str, headers: &[(&str, &str)], body: Body) -> Request<Body> {
    let mut b = Request::builder().method(method).uri(path);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(body).expect("valid request")
}

/// `method path` with a content type and a body whose length is declared, as real clients send.
fn upload(method: Method, path: &str, content_type: &str, body: impl Into<Bytes>) -> Request<Body> {
    let body: Bytes = body.into();
    let len = body.len().to_string();
    req(
        method,
        path,
        &[("content-type", content_type), ("content-length", &len)],
        Body::from(body),
    )
}

fn opt_xml(template_id: &str, marker: &str) -> String {
    openfhir_cache::bench::data::small_opt(template_id, marker)
}

// ---------------------------------------------------------------------------------------------
// Health and operations

#[tokio::test]
async fn liveness_answers_without_a_database() {
    let (app, _) = api();
    let r = send(&app, get("/health/live")).await;
    assert_eq!(r.json(200), json!({ "status": "live" }));
}

#[tokio::test]
async fn readiness_with_the_database_down_is_503_naming_the_cause() {
    let (app, _) = api();
    for path in ["/health/ready", "/health"] {
        let r = send(&app, get(path)).await;
        assert_eq!(
            r.json(503),
            json!({ "status": "not ready", "error": "database unreachable" }),
            "{path}"
        );
    }
}

#[tokio::test]
async fn readiness_waits_for_the_bootstrap_directory() {
    let mut state = state_with(&[]);
    state.bootstrap = Arc::new(Progress::running());
    let app = api::router(state);
    for path in ["/health/ready", "/health"] {
        let r = send(&app, get(path)).await;
        assert_eq!(
            r.json(503),
            json!({ "status": "not ready", "error": "loading the bootstrap directory" }),
            "{path}"
        );
    }
    // Liveness does not wait for it.
    assert_eq!(send(&app, get("/health/live")).await.status, 200);
}

#[tokio::test]
async fn head_answers_like_get_without_a_body() {
    let (app, _) = api();
    let r = send(&app, req(Method::HEAD, "/health/live", &[], Body::empty())).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header(header::CONTENT_TYPE), Some("application/json"));
    assert!(r.body.is_empty(), "{}", r.text());
}

#[tokio::test]
async fn metrics_are_prometheus_text_without_a_database() {
    let (app, _) = api();
    let r = send(&app, get("/metrics")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.header(header::CONTENT_TYPE),
        Some("text/plain; version=0.0.4")
    );
    let text = r.text();
    for line in [
        "# TYPE openfhir_cache_hits_total counter",
        "openfhir_cache_hits_total{cache=\"opt\"} 0",
        "openfhir_cache_ttl_seconds{cache=\"tenant\"} -1",
        "openfhir_invalidation_listener_up 0",
        "openfhir_cluster_peers{state=\"alive\"} 0",
        "openfhir_http_shed_total 0",
        "openfhir_db_pool_connections{state=\"open\"} 0",
    ] {
        assert!(text.lines().any(|l| l == line), "no {line:?} in:\n{text}");
    }
    // Every sample line is `name{labels} number`.
    for l in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (series, value) = l.rsplit_once(' ').expect("name and value");
        let name = series.split('{').next().unwrap_or_default();
        assert!(
            !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'),
            "{l}"
        );
        assert!(!series.contains('{') || series.ends_with('}'), "{l}");
        assert!(value.parse::<f64>().is_ok(), "not a number: {l}");
    }
}

#[tokio::test]
async fn caches_and_cluster_answer_without_a_database() {
    let (app, node) = api();
    let v = send(&app, get("/caches")).await.json(200);
    let names: Vec<&str> = v["caches"]
        .as_array()
        .unwrap_or_else(|| panic!("{v}"))
        .iter()
        .map(|c| c["cache"].as_str().unwrap_or_else(|| panic!("{c}")))
        .collect();
    assert_eq!(
        names,
        [
            "opt",
            "context",
            "all_contexts",
            "mapper",
            "helpers",
            "tenant"
        ],
        "{v}"
    );
    let v = send(&app, get("/cluster")).await.json(200);
    assert_eq!(v["node"]["id"], node.id(), "{v}");
    assert_eq!(v["node"]["version"], env!("CARGO_PKG_VERSION"), "{v}");
    assert_eq!(v["cluster"]["peers"], json!([]), "{v}");
}

/// Moved here from `http_api` (it never needed the database): bad eviction requests are 400
/// with what is wrong, a non-JSON one is 415, and good ones are applied.
#[tokio::test]
async fn bad_eviction_requests_are_400() {
    let (app, _) = api();
    let invalid = "invalid eviction request";
    let cases = [
        (
            json!({ "group": "bogus" }),
            invalid,
            "group \"bogus\": expected opt, fhir_connect, tenant or all",
        ),
        (json!({ "key": "x" }), invalid, "key needs tenant"),
        (
            json!({ "group": "opt", "key": "x" }),
            invalid,
            "key needs tenant",
        ),
    ];
    for (body, error, detail) in cases {
        let r = send(
            &app,
            upload(
                Method::POST,
                "/caches/evict",
                "application/json",
                body.to_string(),
            ),
        )
        .await;
        r.error(400, error, &[detail]);
    }
    // A malformed tenant id and an unknown field: the message names them.
    for (body, needle) in [
        (json!({ "tenant": "a:b" }), "tenant id"),
        (json!({ "group": "opt", "colour": "red" }), "colour"),
    ] {
        let r = send(
            &app,
            upload(
                Method::POST,
                "/caches/evict",
                "application/json",
                body.to_string(),
            ),
        )
        .await;
        let v = r.json(400);
        assert!(v.to_string().contains(needle), "{needle}: {v}");
        assert!(v["error"].is_string() && v["details"].is_array(), "{v}");
    }
    let r = send(
        &app,
        upload(
            Method::POST,
            "/caches/evict",
            "text/plain",
            r#"{"group":"opt"}"#,
        ),
    )
    .await;
    r.error(
        415,
        "unsupported content type 'text/plain'",
        &["send one of: application/json"],
    );
    for group in ["all", "opt", "fhir_connect", "tenant", "OPT"] {
        let r = send(
            &app,
            upload(
                Method::POST,
                "/caches/evict",
                "application/json",
                json!({ "group": group }).to_string(),
            ),
        )
        .await;
        // Valid, and applied here; but this node has no database, so the eviction cannot be
        // recorded in the invalidation log, and the answer says what that means.
        let v = r.json(503);
        assert!(
            v["details"]
                .to_string()
                .contains("not recorded in the invalidation log"),
            "{group}: {v}"
        );
    }
    // An empty body evicts everything (the same answer without a database).
    let r = send(&app, req(Method::POST, "/caches/evict", &[], Body::empty())).await;
    assert!(r.json(503)["error"].is_string());
}

// ---------------------------------------------------------------------------------------------
// Routing

#[tokio::test]
async fn unknown_routes_are_404_no_such_route() {
    let (app, _) = api();
    for (method, path) in [
        (Method::GET, "/no/such/route"),
        (Method::GET, "/healthz"),
        (Method::POST, "/opt/x/y"),
        (Method::DELETE, "/"),
    ] {
        let r = send(&app, req(method.clone(), path, &[], Body::empty())).await;
        r.error(404, "no such route", &[]);
    }
}

#[tokio::test]
async fn a_wrong_method_is_405_with_allow_and_a_json_body() {
    let (app, _) = api();
    for (method, path, allowed) in [
        (Method::PATCH, "/opt", ["GET", "POST"].as_slice()),
        (Method::POST, "/opt/x", &["GET", "PUT", "DELETE"]),
        (Method::DELETE, "/tenants", &["GET"]),
        (Method::POST, "/health/live", &["GET"]),
        (Method::GET, "/caches/evict", &["POST"]),
        (Method::OPTIONS, "/fc/context", &["GET", "POST"]),
    ] {
        let r = send(&app, req(method.clone(), path, &[], Body::empty())).await;
        let allow = r
            .header(header::ALLOW)
            .unwrap_or_else(|| panic!("{method} {path}: no Allow"))
            .to_string();
        for m in allowed {
            assert!(
                allow.split(',').any(|a| a.trim() == *m),
                "{method} {path}: {allow}"
            );
        }
        r.error(405, "method not allowed", &[]);
    }
}

// ---------------------------------------------------------------------------------------------
// Authentication

#[tokio::test]
async fn the_api_token_guards_every_route_but_health() {
    let (app, _) = api_with(&[("OPENFHIR_API_TOKEN", "s3cret")]);
    for path in ["/health/live", "/health/ready", "/health"] {
        let r = send(&app, get(path)).await;
        assert_ne!(r.status, 401, "{path}");
    }
    // Unknown routes too: without the token nothing tells which routes exist.
    for path in [
        "/opt",
        "/fc/model",
        "/tenants",
        "/caches",
        "/metrics",
        "/healthz",
    ] {
        for auth in [
            None,
            Some("Bearer wrong"),
            Some("Bearer s3cre"),
            Some("s3cret"),
        ] {
            let headers: Vec<(&str, &str)> =
                auth.map(|a| ("authorization", a)).into_iter().collect();
            let r = send(&app, req(Method::GET, path, &headers, Body::empty())).await;
            assert_eq!(r.header(header::WWW_AUTHENTICATE), Some("Bearer"), "{path}");
            r.error(
                401,
                "missing or wrong bearer token",
                &["send Authorization: Bearer <OPENFHIR_API_TOKEN>"],
            );
        }
    }
    // The scheme is case-insensitive; with the token, a request goes on.
    for auth in ["Bearer s3cret", "bearer s3cret", "BEARER s3cret"] {
        let r = send(
            &app,
            req(
                Method::GET,
                "/metrics",
                &[("authorization", auth)],
                Body::empty(),
            ),
        )
        .await;
        assert_eq!(r.status, 200, "{auth}: {}", r.text());
    }
    // A write is refused before its body is looked at.
    let r = send(
        &app,
        upload(Method::PUT, "/opt/x", "application/json", "{}"),
    )
    .await;
    assert_eq!(r.status, 401);
}

// ---------------------------------------------------------------------------------------------
// Headers: X-Tenant-Id and X-Consistency-Token

#[tokio::test]
async fn bad_tenant_headers_are_400() {
    let (app, node) = api();
    with_default_tenant(&node).await;
    for bad in [
        "a:b",
        "../x",
        "a b",
        "x'; DROP TABLE tenant; --",
        &"x".repeat(65),
    ] {
        for (method, path) in [(Method::GET, "/opt"), (Method::DELETE, "/fc/model/x")] {
            let r = send(
                &app,
                req(method.clone(), path, &[(TENANT_HEADER, bad)], Body::empty()),
            )
            .await;
            invalid_tenant(&r, bad);
        }
    }
    let two = Request::builder()
        .uri("/opt")
        .header(TENANT_HEADER, "default")
        .header(TENANT_HEADER, "acme")
        .body(Body::empty())
        .expect("request");
    send(&app, two).await.error(
        400,
        "more than one X-Tenant-Id header",
        &["send X-Tenant-Id once: with several, the tenant is ambiguous"],
    );
    let not_text = Request::builder()
        .uri("/opt")
        .header(
            TENANT_HEADER,
            HeaderValue::from_bytes(b"caf\xe9").expect("obs-text"),
        )
        .body(Body::empty())
        .expect("request");
    send(&app, not_text)
        .await
        .error(400, "invalid X-Tenant-Id header", &[]);
    // A well-formed tenant the node has not cached needs the database.
    send(
        &app,
        req(
            Method::GET,
            "/opt",
            &[(TENANT_HEADER, "acme")],
            Body::empty(),
        ),
    )
    .await
    .database_unavailable();
}

#[tokio::test]
async fn consistency_tokens_that_are_not_numbers_are_400() {
    let (app, _) = api();
    for token in ["abc", "-1", "1.5", "", "18446744073709551616", "0x10"] {
        let r = send(
            &app,
            req(
                Method::GET,
                "/caches",
                &[(TOKEN_HEADER, token)],
                Body::empty(),
            ),
        )
        .await;
        r.error(
            400,
            "invalid X-Consistency-Token",
            &["send back the X-Consistency-Token of a write response (a number)"],
        );
    }
    // The health probes ignore the header.
    let r = send(
        &app,
        req(
            Method::GET,
            "/health/live",
            &[(TOKEN_HEADER, "abc")],
            Body::empty(),
        ),
    )
    .await;
    assert_eq!(r.json(200), json!({ "status": "live" }));
    // A number is looked up in the database: unavailable.
    send(
        &app,
        req(
            Method::GET,
            "/caches",
            &[(TOKEN_HEADER, " 42 ")],
            Body::empty(),
        ),
    )
    .await
    .database_unavailable();
}

// ---------------------------------------------------------------------------------------------
// Ids in the path

#[tokio::test]
async fn invalid_ids_in_the_path_are_400() {
    let (app, node) = api();
    with_default_tenant(&node).await;
    // Percent-decoded before the check.
    for (path, id) in [
        ("/tenants/a:b", "a:b"),
        ("/tenants/..%2Fx", "../x"),
        ("/tenants/a%20b", "a b"),
    ] {
        for method in [Method::GET, Method::DELETE] {
            let r = send(&app, req(method.clone(), path, &[], Body::empty())).await;
            invalid_tenant(&r, id);
        }
        let r = send(
            &app,
            upload(Method::PUT, path, "application/json", r#"{"name":"x"}"#),
        )
        .await;
        invalid_tenant(&r, id);
    }
    // Not percent-encoded UTF-8: refused by the path extractor, with the JSON shape.
    let v = send(&app, get("/tenants/%FF")).await.json(400);
    assert_eq!(v["error"], "bad request", "{v}");
    assert_eq!(v["details"].as_array().map(Vec::len), Some(1), "{v}");
    // OPT and context ids with a control character or over 512 characters: openFHIR's 400 array.
    let long = format!("/opt/{}", "x".repeat(513));
    let long_model = format!("/fc/model/{}", "x".repeat(513));
    for path in [
        "/opt/a%00b",
        "/opt/a%0Ab",
        "/opt/a%07b",
        "/fc/context/a%00b",
        "/fc/model/a%00b",
        "/fc/model/a%0Ab",
        long.as_str(),
        long_model.as_str(),
    ] {
        let r = send(&app, get(path)).await;
        assert_eq!(r.status, 400, "{path}: {}", r.text());
        let messages = r.messages();
        assert_eq!(messages.len(), 1, "{path}: {messages:?}");
        assert!(
            messages[0].contains("must be 1-512 characters without control characters"),
            "{path}: {messages:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Content types and bodies

#[tokio::test]
async fn unsupported_content_types_are_415_listing_the_accepted_ones() {
    let (app, node) = api();
    with_default_tenant(&node).await;
    let opt = opt_xml("Growth chart", "v");
    let xml_types = "send one of: application/xml, text/xml";
    let fc_types = "send one of: application/yaml, application/x-yaml, text/yaml, application/json";
    let cases = [
        (Method::POST, "/opt", "application/json", xml_types),
        (
            Method::PUT,
            "/opt/x",
            "application/x-www-form-urlencoded",
            xml_types,
        ),
        (Method::POST, "/fc/context", "text/html", fc_types),
        (Method::PUT, "/fc/context/x", "application/xml", fc_types),
        (Method::POST, "/fc/model", "text/html", fc_types),
        (Method::PUT, "/fc/model/x", "multipart/form-data", fc_types),
        (
            Method::PUT,
            "/tenants/acme",
            "text/plain",
            "send one of: application/json",
        ),
        (
            Method::PUT,
            "/tenants/acme",
            "application/yaml",
            "send one of: application/json",
        ),
    ];
    for (method, path, ct, accepted) in cases {
        let r = send(&app, upload(method.clone(), path, ct, opt.clone())).await;
        r.error(
            415,
            &format!("unsupported content type '{ct}'"),
            &[accepted],
        );
    }
    // Parameters are ignored and the type is compared in lower case.
    let r = send(
        &app,
        upload(Method::POST, "/opt", "Text/HTML; charset=utf-8", opt),
    )
    .await;
    r.error(415, "unsupported content type 'text/html'", &[xml_types]);
}

#[tokio::test]
async fn malformed_documents_are_400_before_the_database() {
    let (app, node) = api();
    with_default_tenant(&node).await;
    let mut non_utf8 = b"<template><template_id><value>".to_vec();
    non_utf8.extend_from_slice(&[0xff, 0xfe, 0xc3]);
    non_utf8.extend_from_slice(b"</value></template_id></template>");
    let n = 50_000;
    let deep_xml = format!(
        "<template>{}{}</template>",
        "<a>".repeat(n),
        "</a>".repeat(n)
    );
    let deep_flow = format!("{}1{}", "[".repeat(n), "]".repeat(n));
    let cases: [(Method, &str, &str, Vec<u8>, &str); 9] = [
        (
            Method::POST,
            "/opt",
            "application/xml",
            b"<template><template_id><value>x</value></template_id>".to_vec(),
            "malformed",
        ),
        (Method::PUT, "/opt/x", "application/xml", non_utf8, "UTF-8"),
        (Method::POST, "/opt", "text/xml", Vec::new(), "xml"),
        (
            Method::POST,
            "/opt",
            "application/xml",
            br#"<!DOCTYPE t [<!ENTITY a "a">]><template/>"#.to_vec(),
            "DTD",
        ),
        (
            Method::POST,
            "/opt",
            "application/xml",
            deep_xml.into_bytes(),
            "deep",
        ),
        (
            Method::POST,
            "/fc/context",
            "application/yaml",
            b"grammar: [unclosed\ntype: context\n".to_vec(),
            "malformed YAML",
        ),
        (
            Method::PUT,
            "/fc/model/x",
            "application/json",
            b"{\"metadata\": {\"name\": }}".to_vec(),
            "malformed JSON",
        ),
        (
            Method::POST,
            "/fc/model",
            "application/yaml",
            deep_flow.clone().into_bytes(),
            "64",
        ),
        (
            Method::POST,
            "/fc/context",
            "application/json",
            deep_flow.into_bytes(),
            "malformed JSON",
        ),
    ];
    for (method, path, ct, body, needle) in cases {
        let messages = send(&app, upload(method.clone(), path, ct, body))
            .await
            .messages();
        assert!(
            !messages.is_empty()
                && messages
                    .iter()
                    .any(|m| m.to_lowercase().contains(&needle.to_lowercase())),
            "{method} {path} ({needle}): {messages:?}"
        );
    }
    // A well-formed document passes every check and needs the database.
    send(
        &app,
        upload(Method::PUT, "/opt/x", "application/xml", opt_xml("x", "1")),
    )
    .await
    .database_unavailable();
}

/// One OPT header parse, with its template id check, on every way an OPT is stored: POST /opt,
/// PUT /opt/{id} (by id, by key, and to a path that names nothing) and the Node API the bootstrap
/// directory uses. Each refuses before the database (which is not there).
#[tokio::test]
async fn an_invalid_template_id_is_refused_on_every_opt_upload_path() {
    let (app, node) = api();
    with_default_tenant(&node).await;
    let rule = "must be 1-512 characters without control characters";
    for id in [
        "x".repeat(513),
        "line\nbreak".to_string(),
        "tab\there".to_string(),
    ] {
        let xml = opt_xml(&id, "1");
        for (method, path) in [
            (Method::POST, "/opt".to_string()),
            (
                Method::PUT,
                "/opt/7d3c2a8e-5b1f-4c39-9e4a-2f6b8d0c1e5a".to_string(),
            ),
            (Method::PUT, "/opt/growth_chart".to_string()),
            (Method::PUT, "/opt/nothing-here".to_string()),
        ] {
            let messages = send(
                &app,
                upload(method.clone(), &path, "application/xml", xml.clone()),
            )
            .await
            .messages();
            assert!(
                messages.len() == 1 && messages[0].contains(rule),
                "{method} {path} ({} chars): {messages:?}",
                id.len()
            );
        }
        for put in [Put::Create, Put::Upsert, Put::At("growth_chart")] {
            match node.put_opt("default", &xml, put).await {
                Err(openfhir_cache::Error::Invalid { message, details }) => assert!(
                    message.contains("template id") && details.iter().any(|d| d.contains(rule)),
                    "{message}: {details:?}"
                ),
                Err(e) => panic!("Node::put_opt: {e}"),
                Ok(_) => panic!("Node::put_opt stored an invalid template id"),
            }
        }
    }
}

#[tokio::test]
async fn malformed_tenant_bodies_are_400_before_the_database() {
    let (app, _) = api();
    let cases = [
        (r#"{"name": "#, "malformed JSON body"),
        (r#"{"name":"Acme","colour":"red"}"#, "malformed JSON body"),
        (r#"["Acme"]"#, "malformed JSON body"),
    ];
    for (body, error) in cases {
        let v = send(
            &app,
            upload(Method::PUT, "/tenants/acme", "application/json", body),
        )
        .await
        .json(400);
        assert_eq!(v["error"], error, "{body}: {v}");
        assert_eq!(
            v["details"].as_array().map(Vec::len),
            Some(1),
            "{body}: {v}"
        );
    }
    let v = send(
        &app,
        upload(
            Method::PUT,
            "/tenants/acme",
            "application/json",
            r#"{"name":"Acme","colour":"red"}"#,
        ),
    )
    .await
    .json(400);
    assert!(
        v["details"][0]
            .as_str()
            .is_some_and(|d| d.contains("colour")),
        "{v}"
    );
    for body in [r#"{"config":[1,2]}"#, r#"{"config":"region=eu"}"#] {
        send(
            &app,
            upload(Method::PUT, "/tenants/acme", "application/json", body),
        )
        .await
        .error(400, "invalid tenant", &["config must be a JSON object"]);
    }
    // A valid body needs the database.
    send(
        &app,
        upload(
            Method::PUT,
            "/tenants/acme",
            "application/json",
            r#"{"name":"Acme"}"#,
        ),
    )
    .await
    .database_unavailable();
}

// ---------------------------------------------------------------------------------------------
// Body limits

#[tokio::test]
async fn a_declared_length_over_the_limit_is_413_from_the_headers() {
    let (app, node) = api_with(&[("OPENFHIR_MAX_BODY_BYTES", "2048")]);
    with_default_tenant(&node).await;
    let body = "x".repeat(4096);
    let general = "OPENFHIR_MAX_BODY_BYTES";
    // The FHIR Connect routes take the smaller of the two limits and name the one that applies:
    // here the general limit (2048) is below the FHIR Connect default (128 KiB).
    for (method, path, ct, var) in [
        (Method::POST, "/opt", "application/xml", general),
        (Method::PUT, "/opt/big", "application/xml", general),
        (Method::PUT, "/tenants/big", "application/json", general),
        (Method::POST, "/caches/evict", "application/json", general),
        (Method::POST, "/fc/context", "application/yaml", general),
        (Method::PUT, "/fc/model/Big", "application/yaml", general),
    ] {
        let r = send(&app, upload(method.clone(), path, ct, body.clone())).await;
        r.error(
            413,
            &format!("request body too large (limit: {var})"),
            &[&format!(
                "Content-Length is 4096 bytes; this route takes at most 2048 ({var})"
            )],
        );
    }
}

#[tokio::test]
async fn fhir_connect_documents_have_their_own_smaller_limit() {
    let (app, node) = api_with(&[("OPENFHIR_MAX_FC_BODY_BYTES", "2048")]);
    with_default_tenant(&node).await;
    let pad = "x".repeat(4096);
    for path in ["/fc/context/big", "/fc/model/Big"] {
        let r = send(
            &app,
            upload(Method::PUT, path, "application/yaml", pad.clone()),
        )
        .await;
        r.error(
            413,
            "request body too large (limit: OPENFHIR_MAX_FC_BODY_BYTES)",
            &["Content-Length is 4096 bytes; this route takes at most 2048 (OPENFHIR_MAX_FC_BODY_BYTES)"],
        );
    }
    // An OPT of that size is under the general limit: it is parsed and goes on to the database.
    let opt = opt_xml("Big", &pad);
    assert!(opt.len() > 4096);
    send(&app, upload(Method::POST, "/opt", "application/xml", opt))
        .await
        .database_unavailable();
}

/// A body without `Content-Length` (chunked) is cut off while it is read.
#[tokio::test]
async fn an_undeclared_body_over_the_limit_is_413_while_read() {
    let (app, node) = api_with(&[("OPENFHIR_MAX_BODY_BYTES", "2048")]);
    with_default_tenant(&node).await;
    let chunks = || {
        let chunk = || Ok::<_, std::io::Error>(Bytes::from(vec![b'x'; 1024]));
        Body::from_stream(futures_util::stream::iter([
            chunk(),
            chunk(),
            chunk(),
            chunk(),
        ]))
    };
    for (method, path, ct) in [
        (Method::PUT, "/opt/big", "application/xml"),
        (Method::PUT, "/fc/context/big", "application/yaml"),
        (Method::PUT, "/tenants/big", "application/json"),
    ] {
        let r = send(
            &app,
            req(method.clone(), path, &[("content-type", ct)], chunks()),
        )
        .await;
        r.error(
            413,
            "request body too large (limit: OPENFHIR_MAX_BODY_BYTES; for FHIR Connect documents OPENFHIR_MAX_FC_BODY_BYTES)",
            &["Failed to buffer the request body: length limit exceeded"],
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The database down

#[tokio::test]
async fn requests_that_need_the_database_get_503_while_it_is_down() {
    let (app, node) = api();
    for path in [
        "/opt",
        "/fc/context",
        "/fc/model/x",
        "/tenants",
        "/tenants/acme",
        "/$purge",
    ] {
        send(&app, get(path)).await.database_unavailable();
    }
    // With the tenant cached, the artifact itself still needs the database.
    with_default_tenant(&node).await;
    for path in [
        "/opt/growth_chart",
        "/fc/mapper/growth_chart",
        "/fc/helpers/growth_chart",
    ] {
        send(&app, get(path)).await.database_unavailable();
    }
    send(
        &app,
        req(Method::DELETE, "/opt/growth_chart", &[], Body::empty()),
    )
    .await
    .database_unavailable();
    // The node is not dead for it: liveness still answers.
    assert_eq!(send(&app, get("/health/live")).await.status, 200);
}
