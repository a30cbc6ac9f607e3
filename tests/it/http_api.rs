//! The HTTP API end to end: a real node (real HTTP server, real PostgreSQL database per test).
//!
//! Every test starts its own node on its own fresh database (`spawn_app` / `spawn_with`), so
//! tests are independent and may run in parallel.

use crate::common;

use common::{context_yaml, model_yaml, opt_xml, spawn_app, spawn_with, TestApp};
use openfhir_cache::cache::CacheName;
use reqwest::header::HeaderMap;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// A response, fully read.
struct Resp {
    status: StatusCode,
    headers: HeaderMap,
    body: Vec<u8>,
}

impl Resp {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}), status {}: {}", self.status, self.text()))
    }

    fn content_type(&self) -> String {
        self.headers
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default()
    }

    /// Asserts the status, with the body in the message.
    fn expect(self, status: u16) -> Resp {
        assert_eq!(
            self.status.as_u16(),
            status,
            "unexpected status; body: {}",
            self.text()
        );
        self
    }

    /// Asserts `status` and a JSON error body whose text contains every needle
    /// (case-insensitive); returns the body. A 400 of an openFHIR route is openFHIR's JSON array
    /// of messages; every other error is `{error, details}`.
    fn expect_error(self, status: u16, needles: &[&str]) -> Value {
        let r = self.expect(status);
        assert!(
            r.content_type().starts_with("application/json"),
            "error body is JSON, got content-type {:?}",
            r.content_type()
        );
        let v = r.json();
        let all = if let Some(messages) = v.as_array().filter(|_| status == 400) {
            assert!(!messages.is_empty(), "{v}");
            messages
                .iter()
                .map(|m| {
                    m.as_str()
                        .unwrap_or_else(|| panic!("message is a string: {v}"))
                })
                .collect::<Vec<_>>()
                .join(" ")
        } else {
            let error = v["error"]
                .as_str()
                .unwrap_or_else(|| panic!("`error` is a string: {v}"));
            let details = v["details"]
                .as_array()
                .unwrap_or_else(|| panic!("`details` is an array: {v}"));
            assert!(!error.is_empty(), "{v}");
            format!(
                "{error} {}",
                details
                    .iter()
                    .map(|d| d
                        .as_str()
                        .unwrap_or_else(|| panic!("detail is a string: {v}")))
                    .collect::<Vec<_>>()
                    .join(" ")
            )
        }
        .to_lowercase();
        for n in needles {
            assert!(all.contains(&n.to_lowercase()), "{n:?} not named in {v}");
        }
        v
    }
}

/// Sends `method path` with optional content type, extra headers and body.
async fn send(
    app: &TestApp,
    method: Method,
    path: &str,
    content_type: Option<&str>,
    headers: &[(&str, &str)],
    body: impl Into<reqwest::Body>,
) -> Resp {
    let mut rb = app.req(method, path);
    if let Some(ct) = content_type {
        rb = rb.header("content-type", ct);
    }
    for (k, v) in headers {
        rb = rb.header(*k, *v);
    }
    let r = rb.body(body).send().await.unwrap();
    let status = r.status();
    let headers = r.headers().clone();
    let body = r.bytes().await.unwrap().to_vec();
    Resp {
        status,
        headers,
        body,
    }
}

async fn get(app: &TestApp, path: &str, headers: &[(&str, &str)]) -> Resp {
    send(app, Method::GET, path, None, headers, Vec::new()).await
}

async fn delete(app: &TestApp, path: &str, headers: &[(&str, &str)]) -> Resp {
    send(app, Method::DELETE, path, None, headers, Vec::new()).await
}

async fn post_xml(app: &TestApp, xml: &str, headers: &[(&str, &str)]) -> Resp {
    send(
        app,
        Method::POST,
        "/opt",
        Some("application/xml"),
        headers,
        xml.to_string(),
    )
    .await
}

async fn put_xml(app: &TestApp, path: &str, xml: &str, headers: &[(&str, &str)]) -> Resp {
    send(
        app,
        Method::PUT,
        path,
        Some("application/xml"),
        headers,
        xml.to_string(),
    )
    .await
}

async fn send_yaml(
    app: &TestApp,
    method: Method,
    path: &str,
    yaml: &str,
    headers: &[(&str, &str)],
) -> Resp {
    send(
        app,
        method,
        path,
        Some("application/yaml"),
        headers,
        yaml.to_string(),
    )
    .await
}

async fn put_json(app: &TestApp, path: &str, body: &Value) -> Resp {
    send(
        app,
        Method::PUT,
        path,
        Some("application/json"),
        &[],
        body.to_string(),
    )
    .await
}

/// Number of rows of `table` (a fixed table name; never user input).
async fn count(app: &TestApp, table: &str) -> i64 {
    app.sql()
        .await
        .query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await
        .unwrap()
        .get(0)
}

/// Number of rows of `table` owned by `tenant`.
async fn count_in(app: &TestApp, table: &str, tenant: &str) -> i64 {
    app.sql()
        .await
        .query_one(
            &format!("SELECT count(*) FROM {table} WHERE tenant = $1"),
            &[&tenant],
        )
        .await
        .unwrap()
        .get(0)
}

/// Row counts of every artifact table plus the tenant table.
async fn all_counts(app: &TestApp) -> [i64; 4] {
    [
        count(app, "opt").await,
        count(app, "fhir_connect_context").await,
        count(app, "fhir_connect_model").await,
        count(app, "tenant").await,
    ]
}

async fn create_tenant(app: &TestApp, id: &str) {
    put_json(app, &format!("/tenants/{id}"), &json!({ "name": id }))
        .await
        .expect(201);
}

fn tenant(id: &str) -> [(&'static str, &str); 1] {
    [("X-Tenant-Id", id)]
}

fn extension_yaml(name: &str, extends: Option<&str>) -> String {
    let extends = extends
        .map(|e| format!("  extends: {e}\n"))
        .unwrap_or_default();
    format!(
        "grammar: FHIRConnect/v1.0.0\ntype: extension\nmetadata:\n  name: {name}\n  version: \"1\"\nspec:\n  system: FHIR\n  version: R4\n{extends}mappings: []\n"
    )
}

// ---------------------------------------------------------------------------
// OPT
// ---------------------------------------------------------------------------

#[tokio::test]
async fn opt_post_returns_normalized_metadata_and_conflicts_on_second_post() {
    let app = spawn_app().await;
    let xml = opt_xml("Growth chart", "v1");
    let r = post_xml(&app, &xml, &[]).await.expect(200);
    assert!(r.content_type().starts_with("application/json"));
    let m = r.json();
    assert_eq!(m["templateId"], "growth_chart", "{m}");
    assert_eq!(m["originalTemplateId"], "Growth chart", "{m}");
    assert_eq!(m["displayTemplateId"], "Growth chart", "{m}");
    assert_eq!(m["content"], "redacted", "{m}");
    assert_eq!(m["organisation"], "default", "{m}");
    assert_eq!(m["tenant"], "default", "{m}");
    assert_eq!(m["size"], xml.len(), "{m}");
    assert!(m["id"].is_string(), "{m}");
    assert!(m["created"].is_string() && m["updated"].is_string(), "{m}");

    // The same template again, even spelled differently, is a duplicate: openFHIR's 400.
    post_xml(&app, &opt_xml("GROWTH chart", "v2"), &[])
        .await
        .expect_error(400, &["growth_chart", "already exists"]);
    assert_eq!(count(&app, "opt").await, 1);
    // The first upload is untouched.
    assert_eq!(app.get_text("/opt/growth_chart").await, xml);
}

#[tokio::test]
async fn opt_put_creates_then_replaces_with_normalized_path_ids() {
    let app = spawn_app().await;
    let v1 = opt_xml("Growth chart", "v1");
    let v2 = opt_xml("Growth chart", "v2");
    // Path with an encoded space.
    let m = put_xml(&app, "/opt/Growth%20chart", &v1, &[])
        .await
        .expect(200)
        .json();
    assert_eq!(m["templateId"], "growth_chart", "{m}");
    // Already-normalized, upper-case path names the same OPT: replaced.
    let m = put_xml(&app, "/opt/GROWTH_CHART", &v2, &[])
        .await
        .expect(200)
        .json();
    assert_eq!(m["templateId"], "growth_chart", "{m}");
    assert_eq!(app.get_text("/opt/growth_chart").await, v2);
    assert_eq!(app.get_text("/opt/Growth%20Chart").await, v2);

    // A path that names nothing creates, as in openFHIR: a duplicate when the XML's template id
    // is taken (nothing written), else a new OPT.
    put_xml(&app, "/opt/other", &opt_xml("Growth chart", "v3"), &[])
        .await
        .expect_error(400, &["growth_chart", "already exists"]);
    put_xml(&app, "/opt/other", &opt_xml("Other", "v3"), &[])
        .await
        .expect(200);
    // A path that names an OPT rewrites it, renamed if the XML says so; onto a taken template
    // id it is a duplicate, and nothing changes.
    put_xml(&app, "/opt/growth_chart", &opt_xml("Other", "v4"), &[])
        .await
        .expect_error(400, &["other", "already exists"]);
    assert_eq!(count(&app, "opt").await, 2);
    assert_eq!(app.get_text("/opt/growth_chart").await, v2);
    assert_eq!(app.get_text("/opt/other").await, opt_xml("Other", "v3"));
    put_xml(&app, "/opt/other", &opt_xml("Renamed", "v5"), &[])
        .await
        .expect(200);
    get(&app, "/opt/other", &[]).await.expect(404);
    assert_eq!(app.get_text("/opt/renamed").await, opt_xml("Renamed", "v5"));
}

#[tokio::test]
async fn opt_get_serves_the_xml_byte_for_byte_or_metadata_as_json() {
    let app = spawn_app().await;
    // CRLF line ends, a comment, odd indentation, non-ASCII text, trailing spaces: all kept.
    let xml = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\r\n<!-- uploaded by a test;  keep   me -->\r\n<template   xmlns=\"http://schemas.openehr.org/v1\">\r\n\t<language><terminology_id><value>ISO_639-1</value></terminology_id><code_string>de</code_string></language>\r\n      <description><other_details id=\"sem_ver\">2.1.0</other_details></description>\r\n  <template_id><value>Größe und Gewicht</value></template_id>   \r\n<concept>Körpergröße – 身长</concept>\r\n<definition><rm_type_name>COMPOSITION</rm_type_name><node_id/></definition>\r\n</template>\r\n\r\n";
    put_xml(&app, "/opt/Gr%C3%B6%C3%9Fe%20und%20Gewicht", xml, &[])
        .await
        .expect(200);
    for _ in 0..2 {
        // First a load, then a cache hit: both identical to the upload.
        let r = get(&app, "/opt/gr%C3%B6%C3%9Fe_und_gewicht", &[])
            .await
            .expect(200);
        assert!(
            r.content_type().starts_with("text/xml"),
            "{}",
            r.content_type()
        );
        assert_eq!(r.body, xml.as_bytes());
    }
    assert!(app.stats(CacheName::Opt).await.stats.hits >= 1);

    let m = get(
        &app,
        "/opt/gr%C3%B6%C3%9Fe_und_gewicht",
        &[("Accept", "application/json")],
    )
    .await
    .expect(200)
    .json();
    assert_eq!(m["originalTemplateId"], "Größe und Gewicht", "{m}");
    assert_eq!(m["templateId"], "größe_und_gewicht", "{m}");
    assert_eq!(m["language"], "de", "{m}");
    assert_eq!(m["semVer"], "2.1.0", "{m}");
    assert_eq!(m["tenant"], "default", "{m}");
    assert_eq!(m["size"], xml.len(), "{m}");
    assert!(m.get("content").is_none(), "metadata only: {m}");

    get(&app, "/opt/absent", &[])
        .await
        .expect_error(404, &["absent"]);
}

#[tokio::test]
async fn opt_list_gives_metadata_of_every_opt() {
    let app = spawn_app().await;
    let list = get(&app, "/opt", &[]).await.expect(200).json();
    assert_eq!(list, json!([]));
    let b = opt_xml("B template", "x");
    let a = opt_xml("A template", "yy");
    post_xml(&app, &b, &[]).await.expect(200);
    post_xml(&app, &a, &[]).await.expect(200);
    let list = get(&app, "/opt", &[]).await.expect(200).json();
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 2, "{list:?}");
    assert_eq!(list[0]["templateId"], "a_template");
    assert_eq!(list[0]["originalTemplateId"], "A template");
    assert_eq!(list[0]["size"], a.len());
    assert_eq!(list[1]["templateId"], "b_template");
    assert_eq!(list[1]["size"], b.len());
    for item in list {
        assert!(item["content"].is_null(), "no XML in the list: {item}");
        assert!(item["id"].is_string(), "{item}");
    }
}

#[tokio::test]
async fn opt_delete_then_404_everywhere() {
    let app = spawn_app().await;
    assert_eq!(
        app.put_opt("growth_chart", &opt_xml("Growth chart", "v1"))
            .await,
        200
    );
    // Cache it first, so the delete must evict.
    app.get_text("/opt/growth_chart").await;
    delete(&app, "/opt/Growth%20chart", &[]).await.expect(204);
    get(&app, "/opt/growth_chart", &[])
        .await
        .expect_error(404, &["growth_chart"]);
    // Nothing to delete: 204 all the same, as in openFHIR (and no consistency token).
    let r = delete(&app, "/opt/growth_chart", &[]).await.expect(204);
    assert!(r.headers.get("x-consistency-token").is_none());
    assert_eq!(get(&app, "/opt", &[]).await.expect(200).json(), json!([]));
    assert_eq!(count(&app, "opt").await, 0);
}

// ---------------------------------------------------------------------------
// FHIR Connect contexts
// ---------------------------------------------------------------------------

/// A context with comments, flow style and odd spacing: its bytes must come back unchanged.
const ODD_CONTEXT: &str = "# FHIR Connect context for the growth chart\n\
grammar:    FHIRConnect/v1.0.0   # trailing comment\n\
type: context\n\
metadata:\n\
\x20   name:   growth\n\
\x20   version: \"0.0.1\"\n\
spec: { system: FHIR,   version: R4 }\n\
\n\
context:\n\
\x20 profile:\n\
\x20   url: http://hl7.org/fhir/StructureDefinition/Observation\n\
\x20 template:\n\
\x20     id:   Growth chart    # the OPT\n\
\x20 archetypes: [ OBSERVATION.height.v2 ]\n\
\x20 start: OBSERVATION.height.v2\n\
\x20 x-custom: kept\n\
# end\n";

#[tokio::test]
async fn context_yaml_is_keyed_by_template_id_and_served_as_json_or_verbatim_yaml() {
    let app = spawn_app().await;
    // The answer is the document with its id, as openFHIR's.
    let m = send_yaml(&app, Method::POST, "/fc/context", ODD_CONTEXT, &[])
        .await
        .expect(200)
        .json();
    let id = m["id"]
        .as_str()
        .unwrap_or_else(|| panic!("an id: {m}"))
        .to_string();
    assert_eq!(m["context"]["template"]["id"], "Growth chart", "{m}");
    assert_eq!(m["type"], "context", "{m}");
    assert_eq!(
        get(&app, &format!("/fc/context/{id}"), &[])
            .await
            .expect(200)
            .json(),
        m
    );

    // JSON by default.
    let r = get(&app, "/fc/context/growth_chart", &[]).await.expect(200);
    assert!(r.content_type().starts_with("application/json"));
    let doc = r.json();
    assert_eq!(doc["context"]["template"]["id"], "Growth chart", "{doc}");
    assert_eq!(doc["metadata"]["version"], "0.0.1", "{doc}");
    assert_eq!(doc["spec"]["version"], "R4", "{doc}");
    assert_eq!(
        doc["context"]["x-custom"], "kept",
        "unknown fields kept: {doc}"
    );

    // YAML on request: the upload byte for byte (comments and spacing included), also by the
    // un-normalized id.
    for path in ["/fc/context/growth_chart", "/fc/context/Growth%20chart"] {
        let r = get(&app, path, &[("Accept", "application/yaml")])
            .await
            .expect(200);
        assert!(r.content_type().contains("yaml"), "{}", r.content_type());
        assert_eq!(r.text(), ODD_CONTEXT);
    }

    send_yaml(&app, Method::POST, "/fc/context", ODD_CONTEXT, &[])
        .await
        .expect_error(400, &["A context mapper for this template already exists."]);
    assert_eq!(count(&app, "fhir_connect_context").await, 1);
}

#[tokio::test]
async fn context_json_upload_is_served_as_json_and_converted_to_yaml() {
    let app = spawn_app().await;
    let doc = json!({
        "grammar": "FHIRConnect/v1.0.0",
        "type": "context",
        "metadata": { "name": "vitals", "version": "1.2.3" },
        "spec": { "system": "FHIR", "version": "R4" },
        "context": {
            "profile": { "url": "http://hl7.org/fhir/StructureDefinition/Observation" },
            "template": { "id": "Vital Signs" },
            "archetypes": ["OBSERVATION.blood_pressure.v2"],
            "start": "OBSERVATION.blood_pressure.v2"
        }
    });
    let m = send(
        &app,
        Method::POST,
        "/fc/context",
        Some("application/json"),
        &[],
        doc.to_string(),
    )
    .await
    .expect(200)
    .json();
    let id = m["id"].clone();
    let mut with_id = doc.clone();
    with_id["id"] = id;
    assert_eq!(m, with_id);

    let got = get(&app, "/fc/context/vital_signs", &[])
        .await
        .expect(200)
        .json();
    assert_eq!(got, with_id);

    let r = get(
        &app,
        "/fc/context/vital_signs",
        &[("Accept", "application/yaml")],
    )
    .await
    .expect(200);
    assert!(r.content_type().contains("yaml"), "{}", r.content_type());
    let yaml: Value = serde_norway::from_str(&r.text())
        .unwrap_or_else(|e| panic!("YAML answer does not parse ({e}): {}", r.text()));
    assert_eq!(yaml, doc);
    assert!(
        !r.text().trim_start().starts_with('{'),
        "converted, not JSON: {}",
        r.text()
    );
}

#[tokio::test]
async fn context_uploads_accept_every_yaml_content_type() {
    let app = spawn_app().await;
    for (i, ct) in [
        "application/yaml",
        "application/x-yaml",
        "text/yaml",
        "application/yaml; charset=utf-8",
    ]
    .iter()
    .enumerate()
    {
        let id = format!("T{i}");
        send(
            &app,
            Method::POST,
            "/fc/context",
            Some(ct),
            &[],
            context_yaml(&id, "1"),
        )
        .await
        .expect(200);
    }
    assert_eq!(count(&app, "fhir_connect_context").await, 4);
}

#[tokio::test]
async fn context_list_comes_from_the_all_contexts_cache_and_follows_writes() {
    let app = spawn_app().await;
    assert_eq!(
        get(&app, "/fc/context", &[]).await.expect(200).json(),
        json!([])
    );
    send_yaml(
        &app,
        Method::PUT,
        "/fc/context/first",
        &context_yaml("First", "1"),
        &[],
    )
    .await
    .expect(200);
    let list = get(&app, "/fc/context", &[]).await.expect(200).json();
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    assert!(list[0]["id"].is_string(), "{list}");
    assert_eq!(list[0]["context"]["template"]["id"], "First");

    // Served from the cache: a hit, no new load.
    let before = app.stats(CacheName::AllContexts).await.stats;
    let again = get(&app, "/fc/context", &[]).await.expect(200).json();
    assert_eq!(again, list);
    let after = app.stats(CacheName::AllContexts).await.stats;
    assert_eq!(after.loads, before.loads, "{after:?}");
    assert_eq!(after.hits, before.hits + 1, "{after:?}");

    // A second context invalidates the cached list.
    send_yaml(
        &app,
        Method::PUT,
        "/fc/context/second",
        &context_yaml("Second", "1"),
        &[],
    )
    .await
    .expect(200);
    let list = get(&app, "/fc/context", &[]).await.expect(200).json();
    let ids: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["context"]["template"]["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["First", "Second"], "{list}");

    // A replacement shows too.
    send_yaml(
        &app,
        Method::PUT,
        "/fc/context/first",
        &context_yaml("First", "2"),
        &[],
    )
    .await
    .expect(200);
    let list = get(&app, "/fc/context", &[]).await.expect(200).json();
    assert_eq!(list[0]["metadata"]["version"], "2", "{list}");

    // As YAML on request.
    let r = get(&app, "/fc/context", &[("Accept", "application/yaml")])
        .await
        .expect(200);
    assert!(r.content_type().contains("yaml"));
    let yaml: Value = serde_norway::from_str(&r.text()).unwrap();
    assert_eq!(yaml, list);

    // Both renderings are remembered with the cached list, and dropped with it: after another
    // replacement neither representation serves the old bytes.
    send_yaml(
        &app,
        Method::PUT,
        "/fc/context/first",
        &context_yaml("First", "3"),
        &[],
    )
    .await
    .expect(200);
    let list = get(&app, "/fc/context", &[]).await.expect(200).json();
    assert_eq!(list[0]["metadata"]["version"], "3", "{list}");
    let r = get(&app, "/fc/context", &[("Accept", "application/yaml")])
        .await
        .expect(200);
    let yaml: Value = serde_norway::from_str(&r.text()).unwrap();
    assert_eq!(yaml, list);
    let one = get(&app, "/fc/context/first", &[("Accept", "application/yaml")])
        .await
        .expect(200);
    assert!(one.text().contains('3'), "{}", one.text());
    let one = get(&app, "/fc/context/first", &[]).await.expect(200).json();
    assert_eq!(one["metadata"]["version"], "3", "{one}");
}

#[tokio::test]
async fn context_put_replaces_and_delete_removes() {
    let app = spawn_app().await;
    send_yaml(
        &app,
        Method::PUT,
        "/fc/context/Growth%20chart",
        &context_yaml("Growth chart", "1"),
        &[],
    )
    .await
    .expect(200);
    // Cached, then replaced: the replacement is served.
    app.get_text("/fc/context/growth_chart").await;
    let v2 = context_yaml("Growth chart", "2");
    send_yaml(&app, Method::PUT, "/fc/context/growth_chart", &v2, &[])
        .await
        .expect(200);
    let doc = get(&app, "/fc/context/growth_chart", &[])
        .await
        .expect(200)
        .json();
    assert_eq!(doc["metadata"]["version"], "2", "{doc}");
    let r = get(
        &app,
        "/fc/context/growth_chart",
        &[("Accept", "application/yaml")],
    )
    .await
    .expect(200);
    assert_eq!(r.text(), v2);

    // A path that names no context creates one: a duplicate of this template's, refused.
    send_yaml(
        &app,
        Method::PUT,
        "/fc/context/other",
        &context_yaml("Growth chart", "3"),
        &[],
    )
    .await
    .expect_error(400, &["A context mapper for this template already exists."]);
    assert_eq!(count(&app, "fhir_connect_context").await, 1);

    delete(&app, "/fc/context/Growth%20chart", &[])
        .await
        .expect(204);
    get(&app, "/fc/context/growth_chart", &[])
        .await
        .expect_error(404, &["growth_chart"]);
    delete(&app, "/fc/context/growth_chart", &[])
        .await
        .expect(204);
    assert_eq!(
        get(&app, "/fc/context", &[]).await.expect(200).json(),
        json!([])
    );
    assert_eq!(count(&app, "fhir_connect_context").await, 0);
}

// ---------------------------------------------------------------------------
// FHIR Connect models
// ---------------------------------------------------------------------------

#[tokio::test]
async fn model_five_routes() {
    let app = spawn_app().await;
    let v1 = model_yaml("Height", "1");
    let m = send_yaml(&app, Method::POST, "/fc/model", &v1, &[])
        .await
        .expect(200)
        .json();
    let id = m["id"]
        .as_str()
        .unwrap_or_else(|| panic!("an id: {m}"))
        .to_string();
    assert_eq!(m["metadata"]["name"], "Height", "{m}");
    assert_eq!(m["type"], "model", "{m}");
    assert_eq!(
        m["spec"]["openEhrConfig"]["archetype"], "openEHR-EHR-OBSERVATION.height.v2",
        "{m}"
    );
    send_yaml(&app, Method::POST, "/fc/model", &v1, &[])
        .await
        .expect_error(400, &["Model mapper with this name Height already exists."]);

    let v2 = model_yaml("Height", "2");
    send_yaml(&app, Method::PUT, "/fc/model/Height", &v2, &[])
        .await
        .expect(200);
    let doc = get(&app, "/fc/model/Height", &[]).await.expect(200).json();
    assert_eq!(doc["metadata"]["version"], "2", "{doc}");
    assert_eq!(doc["mappings"][0]["name"], "height", "{doc}");
    let r = get(&app, "/fc/model/Height", &[("Accept", "application/yaml")])
        .await
        .expect(200);
    assert!(r.content_type().contains("yaml"));
    assert_eq!(r.text(), v2);

    send_yaml(
        &app,
        Method::PUT,
        "/fc/model/Weight",
        &model_yaml("Weight", "1"),
        &[],
    )
    .await
    .expect(200);
    send_yaml(&app, Method::PUT, "/fc/model/Other", &v1, &[])
        .await
        .expect_error(400, &["Height already exists"]);
    // By id, the same model.
    let by_id = get(&app, &format!("/fc/model/{id}"), &[])
        .await
        .expect(200)
        .json();
    assert_eq!(by_id["metadata"]["version"], "2", "{by_id}");

    let list = get(&app, "/fc/model", &[]).await.expect(200).json();
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["metadata"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["Height", "Weight"], "{list}");
    assert_eq!(list[0]["metadata"]["version"], "2", "{list}");
    assert_eq!(list[0]["id"], id.as_str(), "{list}");

    delete(&app, "/fc/model/Height", &[]).await.expect(204);
    get(&app, "/fc/model/Height", &[])
        .await
        .expect_error(404, &["Height"]);
    delete(&app, "/fc/model/Height", &[]).await.expect(204);
    assert_eq!(count(&app, "fhir_connect_model").await, 1);
}

#[tokio::test]
async fn model_route_checks_the_document_type() {
    let app = spawn_app().await;
    // openFHIR takes an extension without `spec.extends` (only compiling a mapper needs it).
    let m = send_yaml(
        &app,
        Method::POST,
        "/fc/model",
        &extension_yaml("HeightExt", None),
        &[],
    )
    .await
    .expect(200)
    .json();
    assert_eq!(m["type"], "extension", "{m}");
    let m = send_yaml(
        &app,
        Method::PUT,
        "/fc/model/HeightExt",
        &extension_yaml("HeightExt", Some("Height")),
        &[],
    )
    .await
    .expect(200)
    .json();
    assert_eq!(m["spec"]["extends"], "Height", "{m}");

    // A context is not a model, and a model is not a context.
    send_yaml(
        &app,
        Method::POST,
        "/fc/model",
        &context_yaml("Growth chart", "1"),
        &[],
    )
    .await
    .expect_error(400, &["type", "context"]);
    send_yaml(
        &app,
        Method::POST,
        "/fc/context",
        &model_yaml("Height", "1"),
        &[],
    )
    .await
    .expect_error(400, &["type", "model"]);
    assert_eq!(count(&app, "fhir_connect_model").await, 1);
    assert_eq!(count(&app, "fhir_connect_context").await, 0);
}

// ---------------------------------------------------------------------------
// Bad input: status, {error, details}, and nothing written
// ---------------------------------------------------------------------------

/// One bad upload: what it is, its body and content type, the status expected and the words
/// the `{error, details}` answer must contain.
struct Case {
    what: &'static str,
    body: Vec<u8>,
    content_type: &'static str,
    status: u16,
    needles: &'static [&'static str],
}

fn case(
    what: &'static str,
    body: impl Into<Vec<u8>>,
    content_type: &'static str,
    status: u16,
    needles: &'static [&'static str],
) -> Case {
    Case {
        what,
        body: body.into(),
        content_type,
        status,
        needles,
    }
}

/// Sends every case to every route and checks the answers.
async fn check_cases(app: &TestApp, cases: &[Case], routes: &[(Method, &str)]) {
    for c in cases {
        for (method, path) in routes {
            let r = send(
                app,
                method.clone(),
                path,
                Some(c.content_type),
                &[],
                c.body.clone(),
            )
            .await;
            assert_eq!(
                r.status.as_u16(),
                c.status,
                "{} ({method} {path}): {}",
                c.what,
                r.text()
            );
            r.expect_error(c.status, c.needles);
        }
    }
}

#[tokio::test]
async fn bad_opt_uploads_are_refused_and_nothing_is_written() {
    let app = spawn_app().await;
    let before = all_counts(&app).await;
    let xxe = r#"<?xml version="1.0"?><!DOCTYPE t [<!ENTITY x SYSTEM "file:///etc/passwd">]><template xmlns="http://schemas.openehr.org/v1"><template_id><value>&x;</value></template_id></template>"#;
    let laughs = r#"<!DOCTYPE t [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;">]><template><template_id><value>&b;</value></template_id></template>"#;
    let mut non_utf8 = b"<template><template_id><value>".to_vec();
    non_utf8.extend_from_slice(&[0xff, 0xfe, 0xc3]);
    non_utf8.extend_from_slice(b"</value></template_id></template>");
    let xml = "application/xml";
    let cases = [
        case(
            "malformed XML",
            "<template><template_id><value>x</value></template_id>",
            xml,
            400,
            &["malformed"],
        ),
        case(
            "not an OPT",
            "<composition><template_id><value>x</value></template_id></composition>",
            xml,
            400,
            &["not an opt", "composition"],
        ),
        case(
            "no template id",
            "<template xmlns=\"http://schemas.openehr.org/v1\"><concept>x</concept></template>",
            xml,
            400,
            &["template id", "template_id"],
        ),
        case(
            "empty template id",
            "<template><template_id><value>  </value></template_id></template>",
            "text/xml",
            400,
            &["template id"],
        ),
        case("XXE", xxe, xml, 400, &["DTD"]),
        case("billion laughs", laughs, xml, 400, &["DTD"]),
        case("empty body", "", xml, 400, &["xml"]),
        case("non-UTF-8", non_utf8, xml, 400, &["UTF-8"]),
        case(
            "form content type",
            opt_xml("Growth chart", "v"),
            "application/x-www-form-urlencoded",
            415,
            &["application/x-www-form-urlencoded", "application/xml"],
        ),
        case(
            "JSON content type",
            opt_xml("Growth chart", "v"),
            "application/json",
            415,
            &["application/json"],
        ),
    ];
    check_cases(
        &app,
        &cases,
        &[(Method::POST, "/opt"), (Method::PUT, "/opt/x")],
    )
    .await;
    assert_eq!(all_counts(&app).await, before);
    assert_eq!(count(&app, "opt").await, 0);
}

#[tokio::test]
async fn bad_fhir_connect_uploads_are_refused_and_nothing_is_written() {
    let app = spawn_app().await;
    let before = all_counts(&app).await;
    let mut non_utf8 = context_yaml("Growth chart", "1").into_bytes();
    non_utf8.extend_from_slice(&[0xff, 0xc3, 0x28]);
    let no_template_id = "grammar: FHIRConnect/v1.0.0\ntype: context\nmetadata:\n  name: ctx\ncontext:\n  profile:\n    url: x\n  template: {}\n";
    let no_name = "grammar: FHIRConnect/v1.0.0\ntype: model\nmetadata:\n  version: \"1\"\nspec:\n  system: FHIR\n";
    let (yaml, json) = ("application/yaml", "application/json");
    let context_cases = [
        case(
            "malformed YAML",
            "grammar: [unclosed\ntype: context\n",
            yaml,
            400,
            &["malformed YAML"],
        ),
        case(
            "malformed JSON",
            "{\"type\": \"context\", ",
            json,
            400,
            &["malformed JSON"],
        ),
        case(
            "YAML sent as JSON",
            context_yaml("Growth chart", "1"),
            json,
            400,
            &["malformed JSON"],
        ),
        case(
            "openFHIR's required fields missing",
            no_template_id,
            yaml,
            400,
            &[
                "metadata.version",
                "spec:",
                "context.archetypes",
                "context.start",
            ],
        ),
        case("not a mapping", "- a\n- b\n", yaml, 400, &["mapping"]),
        case("non-UTF-8", non_utf8, yaml, 400, &["UTF-8"]),
        case(
            "HTML",
            context_yaml("Growth chart", "1"),
            "text/html",
            415,
            &["text/html", "application/yaml"],
        ),
    ];
    check_cases(
        &app,
        &context_cases,
        &[
            (Method::POST, "/fc/context"),
            (Method::PUT, "/fc/context/growth_chart"),
        ],
    )
    .await;
    let model_cases = [
        case(
            "malformed YAML",
            "metadata:\n  name: x\n   bad: indent\n\t- tab",
            yaml,
            400,
            &["malformed YAML"],
        ),
        case(
            "malformed JSON",
            "{\"metadata\": {\"name\": }}",
            json,
            400,
            &["malformed JSON"],
        ),
        case("no metadata.name", no_name, yaml, 400, &["metadata.name"]),
        case(
            "non-UTF-8",
            [model_yaml("Height", "1").as_bytes(), &[0xfe, 0xff]].concat(),
            "application/x-yaml",
            400,
            &["UTF-8"],
        ),
        case(
            "HTML",
            model_yaml("Height", "1"),
            "text/html",
            415,
            &["text/html"],
        ),
        case(
            "XML",
            model_yaml("Height", "1"),
            "application/xml",
            415,
            &["application/xml"],
        ),
    ];
    check_cases(
        &app,
        &model_cases,
        &[
            (Method::POST, "/fc/model"),
            (Method::PUT, "/fc/model/Height"),
        ],
    )
    .await;
    assert_eq!(all_counts(&app).await, before);
    assert_eq!(count(&app, "fhir_connect_context").await, 0);
    assert_eq!(count(&app, "fhir_connect_model").await, 0);
}

#[tokio::test]
async fn bodies_over_the_limit_get_413_and_nothing_is_written() {
    let app = spawn_with(&[("OPENFHIR_MAX_BODY_BYTES", "2048")]).await;
    let before = all_counts(&app).await;
    let pad = "x".repeat(4096);
    // Well-formed documents, only too large.
    let big_opt = opt_xml("Big", &pad);
    let big_ctx = context_yaml("Big", &pad);
    let big_model = model_yaml("Big", &pad);
    let big_tenant = json!({ "name": pad }).to_string();
    let cases: Vec<(Method, &str, &str, String)> = vec![
        (Method::POST, "/opt", "application/xml", big_opt.clone()),
        (Method::PUT, "/opt/big", "application/xml", big_opt),
        (
            Method::POST,
            "/fc/context",
            "application/yaml",
            big_ctx.clone(),
        ),
        (Method::PUT, "/fc/context/big", "application/yaml", big_ctx),
        (
            Method::POST,
            "/fc/model",
            "application/yaml",
            big_model.clone(),
        ),
        (Method::PUT, "/fc/model/Big", "application/yaml", big_model),
        (Method::PUT, "/tenants/big", "application/json", big_tenant),
    ];
    for (method, path, ct, body) in cases {
        assert!(body.len() > 4096);
        let r = send(&app, method.clone(), path, Some(ct), &[], body).await;
        assert_eq!(r.status.as_u16(), 413, "{method} {path}: {}", r.text());
        r.expect_error(413, &["too large"]);
    }
    assert_eq!(all_counts(&app).await, before);
    // Bodies under the limit still work.
    post_xml(&app, &opt_xml("Small", "s"), &[])
        .await
        .expect(200);
}

#[tokio::test]
async fn fhir_connect_bodies_have_their_own_smaller_limit() {
    // The general limit stays large; only the FHIR Connect routes are bounded by
    // OPENFHIR_MAX_FC_BODY_BYTES (their typed models cost far more memory than their text).
    let app = spawn_with(&[("OPENFHIR_MAX_FC_BODY_BYTES", "2048")]).await;
    let before = all_counts(&app).await;
    let pad = "x".repeat(4096);
    for (path, body) in [
        ("/fc/context/big", context_yaml("Big", &pad)),
        ("/fc/model/Big", model_yaml("Big", &pad)),
    ] {
        let r = send(&app, Method::PUT, path, Some("application/yaml"), &[], body).await;
        assert_eq!(r.status.as_u16(), 413, "PUT {path}: {}", r.text());
        r.expect_error(413, &["too large", "OPENFHIR_MAX_FC_BODY_BYTES"]);
    }
    assert_eq!(all_counts(&app).await, before);
    // An OPT of the same size is under the general limit and is stored.
    post_xml(&app, &opt_xml("Big", &pad), &[]).await.expect(200);
    // A small FHIR Connect document still works.
    send_yaml(
        &app,
        Method::PUT,
        "/fc/context/small",
        &context_yaml("Small", "1"),
        &[],
    )
    .await
    .expect(200);
}

#[tokio::test]
async fn bad_tenant_bodies_are_refused_and_nothing_is_written() {
    let app = spawn_app().await;
    let json = "application/json";
    let cases = [
        case(
            "text/plain",
            r#"{"name":"Acme"}"#,
            "text/plain",
            415,
            &["text/plain", "application/json"],
        ),
        case(
            "YAML",
            "name: Acme\n",
            "application/yaml",
            415,
            &["application/yaml"],
        ),
        case(
            "unknown field",
            r#"{"name":"Acme","colour":"red"}"#,
            json,
            400,
            &["colour"],
        ),
        case(
            "config is an array",
            r#"{"name":"Acme","config":[1,2]}"#,
            json,
            400,
            &["config"],
        ),
        case(
            "config is a string",
            r#"{"config":"region=eu"}"#,
            json,
            400,
            &["config"],
        ),
        case(
            "malformed JSON",
            r#"{"name": "#,
            json,
            400,
            &["malformed JSON"],
        ),
        case("body is not an object", r#"["Acme"]"#, json, 400, &["JSON"]),
    ];
    check_cases(&app, &cases, &[(Method::PUT, "/tenants/acme")]).await;
    assert_eq!(count(&app, "tenant").await, 1, "only the default tenant");
    get(&app, "/tenants/acme", &[])
        .await
        .expect_error(404, &["acme"]);
}

// ---------------------------------------------------------------------------
// Tenants
// ---------------------------------------------------------------------------

#[tokio::test]
async fn tenant_put_get_list() {
    let app = spawn_app().await;
    let t = put_json(
        &app,
        "/tenants/acme",
        &json!({ "name": "Acme", "config": { "region": "eu", "limits": { "opts": 10 } } }),
    )
    .await
    .expect(201)
    .json();
    assert_eq!(t["id"], "acme", "{t}");
    assert_eq!(t["name"], "Acme", "{t}");
    assert_eq!(t["config"]["region"], "eu", "{t}");

    // Cache the record, then update it: the update is served.
    get(&app, "/tenants/acme", &[]).await.expect(200);
    let t = put_json(
        &app,
        "/tenants/acme",
        &json!({ "name": "Acme Corp", "config": { "region": "us" } }),
    )
    .await
    .expect(200)
    .json();
    assert_eq!(t["name"], "Acme Corp", "{t}");
    let t = get(&app, "/tenants/acme", &[]).await.expect(200).json();
    assert_eq!(t["name"], "Acme Corp", "{t}");
    assert_eq!(t["config"], json!({ "region": "us" }), "{t}");

    // Name and config are optional.
    let t = put_json(&app, "/tenants/beta-2.eu_west", &json!({}))
        .await
        .expect(201)
        .json();
    assert_eq!(t["name"], "beta-2.eu_west", "{t}");
    assert_eq!(t["config"], json!({}), "{t}");

    let list = get(&app, "/tenants", &[]).await.expect(200).json();
    let ids: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["acme", "beta-2.eu_west", "default"], "{list}");
    get(&app, "/tenants/nobody", &[])
        .await
        .expect_error(404, &["nobody"]);
}

#[tokio::test]
async fn x_tenant_id_routes_artifacts_to_the_tenant() {
    let app = spawn_app().await;
    let xml = opt_xml("Growth chart", "acme");
    // Unknown tenant: 404 naming it, on reads and writes, and nothing written.
    get(&app, "/opt", &tenant("acme"))
        .await
        .expect_error(404, &["tenant", "acme"]);
    post_xml(&app, &xml, &tenant("acme"))
        .await
        .expect_error(404, &["tenant", "acme"]);
    send_yaml(
        &app,
        Method::POST,
        "/fc/context",
        &context_yaml("Growth chart", "1"),
        &tenant("acme"),
    )
    .await
    .expect_error(404, &["acme"]);
    assert_eq!(count(&app, "opt").await, 0);
    assert_eq!(count(&app, "fhir_connect_context").await, 0);

    // Once created (the earlier 404 was not cached), the header routes to it.
    create_tenant(&app, "acme").await;
    let m = post_xml(&app, &xml, &tenant("acme"))
        .await
        .expect(200)
        .json();
    assert_eq!(m["tenant"], "acme", "{m}");
    assert_eq!(count_in(&app, "opt", "acme").await, 1);
    assert_eq!(count_in(&app, "opt", "default").await, 0);
    let r = get(&app, "/opt/growth_chart", &tenant("acme"))
        .await
        .expect(200);
    assert_eq!(r.text(), xml);
    // The default tenant (no header) does not see it.
    get(&app, "/opt/growth_chart", &[]).await.expect(404);
    assert_eq!(get(&app, "/opt", &[]).await.expect(200).json(), json!([]));
    // The header value is the tenant id; the default tenant can be named explicitly.
    assert_eq!(
        get(&app, "/opt", &tenant("default"))
            .await
            .expect(200)
            .json(),
        json!([])
    );
}

#[tokio::test]
async fn invalid_tenant_ids_are_400() {
    let app = spawn_app().await;
    for bad in ["a:b", "../x", "a b", "x'; DROP TABLE tenant; --", "a/b"] {
        get(&app, "/opt", &tenant(bad))
            .await
            .expect_error(400, &["tenant id"]);
        put_xml(&app, "/opt/x", &opt_xml("x", "1"), &tenant(bad))
            .await
            .expect_error(400, &["tenant id"]);
    }
    let long = "x".repeat(65);
    get(&app, "/opt", &tenant(&long))
        .await
        .expect_error(400, &["tenant id"]);
    for path in ["/tenants/a:b", "/tenants/..%2Fx", "/tenants/a%20b"] {
        put_json(&app, path, &json!({ "name": "x" }))
            .await
            .expect_error(400, &["tenant id"]);
        get(&app, path, &[]).await.expect_error(400, &["tenant id"]);
        delete(&app, path, &[])
            .await
            .expect_error(400, &["tenant id"]);
    }
    assert_eq!(count(&app, "tenant").await, 1);
    assert_eq!(count(&app, "opt").await, 0);
}

#[tokio::test]
async fn deleting_a_tenant_cascades_and_its_cached_artifacts_are_gone() {
    let app = spawn_app().await;
    create_tenant(&app, "acme").await;
    let h = tenant("acme");
    // The same ids in the default tenant must survive.
    for hdr in [&h[..], &[][..]] {
        put_xml(
            &app,
            "/opt/growth_chart",
            &opt_xml("Growth chart", "1"),
            hdr,
        )
        .await
        .expect(200);
        send_yaml(
            &app,
            Method::PUT,
            "/fc/context/growth_chart",
            &context_yaml("Growth chart", "1"),
            hdr,
        )
        .await
        .expect(200);
        send_yaml(
            &app,
            Method::PUT,
            "/fc/model/Height",
            &model_yaml("Height", "1"),
            hdr,
        )
        .await
        .expect(200);
    }
    // Load every cache of the tenant.
    get(&app, "/opt/growth_chart", &h).await.expect(200);
    get(&app, "/fc/context/growth_chart", &h).await.expect(200);
    get(&app, "/fc/context", &h).await.expect(200);
    get(&app, "/tenants/acme", &[]).await.expect(200);

    delete(&app, "/tenants/acme", &[]).await.expect(204);
    for table in ["opt", "fhir_connect_context", "fhir_connect_model"] {
        assert_eq!(count_in(&app, table, "acme").await, 0, "{table}");
        assert_eq!(count_in(&app, table, "default").await, 1, "{table}");
    }
    // The tenant is gone, so are its cached artifacts.
    get(&app, "/opt/growth_chart", &h)
        .await
        .expect_error(404, &["tenant", "acme"]);
    get(&app, "/fc/context/growth_chart", &h)
        .await
        .expect_error(404, &["acme"]);
    get(&app, "/fc/context", &h)
        .await
        .expect_error(404, &["acme"]);
    get(&app, "/tenants/acme", &[])
        .await
        .expect_error(404, &["acme"]);
    delete(&app, "/tenants/acme", &[])
        .await
        .expect_error(404, &["acme"]);
    // Default's are intact.
    app.get_text("/opt/growth_chart").await;
    app.get_text("/fc/context/growth_chart").await;
    app.get_text("/fc/model/Height").await;

    // A new tenant of the same name starts empty.
    create_tenant(&app, "acme").await;
    get(&app, "/opt/growth_chart", &h).await.expect(404);
    assert_eq!(
        get(&app, "/fc/context", &h).await.expect(200).json(),
        json!([])
    );
}

#[tokio::test]
async fn the_default_tenant_cannot_be_deleted() {
    let app = spawn_app().await;
    app.put_opt("x", &opt_xml("x", "1")).await;
    delete(&app, "/tenants/default", &[])
        .await
        .expect_error(409, &["default"]);
    assert_eq!(count(&app, "tenant").await, 1);
    assert_eq!(count(&app, "opt").await, 1);
    app.get_text("/tenants/default").await;
}

#[tokio::test]
async fn tenants_are_isolated_on_every_route() {
    let app = spawn_app().await;
    create_tenant(&app, "a").await;
    create_tenant(&app, "b").await;
    for t in ["a", "b"] {
        let h = tenant(t);
        put_xml(&app, "/opt/shared_id", &opt_xml("Shared id", t), &h)
            .await
            .expect(200);
        send_yaml(
            &app,
            Method::PUT,
            "/fc/context/shared_id",
            &context_yaml("Shared id", t),
            &h,
        )
        .await
        .expect(200);
        send_yaml(
            &app,
            Method::PUT,
            "/fc/model/Shared",
            &model_yaml("Shared", t),
            &h,
        )
        .await
        .expect(200);
    }
    // Read everything twice (load, then cache hit) for both tenants.
    for _ in 0..2 {
        for t in ["a", "b"] {
            let h = tenant(t);
            assert_eq!(
                get(&app, "/opt/shared_id", &h).await.expect(200).text(),
                opt_xml("Shared id", t)
            );
            let list = get(&app, "/opt", &h).await.expect(200).json();
            assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
            assert_eq!(list[0]["tenant"], t, "{list}");
            assert_eq!(list[0]["size"], opt_xml("Shared id", t).len(), "{list}");
            let c = get(&app, "/fc/context/shared_id", &h)
                .await
                .expect(200)
                .json();
            assert_eq!(c["metadata"]["version"], t, "{c}");
            let cl = get(&app, "/fc/context", &h).await.expect(200).json();
            assert_eq!(cl.as_array().unwrap().len(), 1, "{cl}");
            assert_eq!(cl[0]["metadata"]["version"], t, "{cl}");
            let m = get(&app, "/fc/model/Shared", &h).await.expect(200).json();
            assert_eq!(m["metadata"]["version"], t, "{m}");
            let ml = get(&app, "/fc/model", &h).await.expect(200).json();
            assert_eq!(ml.as_array().unwrap().len(), 1, "{ml}");
            assert_eq!(ml[0]["metadata"]["version"], t, "{ml}");
        }
        // The default tenant sees none of it.
        get(&app, "/opt/shared_id", &[]).await.expect(404);
        get(&app, "/fc/context/shared_id", &[]).await.expect(404);
        get(&app, "/fc/model/Shared", &[]).await.expect(404);
        assert_eq!(
            get(&app, "/fc/context", &[]).await.expect(200).json(),
            json!([])
        );
    }

    // Deleting in A leaves B's, cached or not.
    let a = tenant("a");
    delete(&app, "/opt/shared_id", &a).await.expect(204);
    delete(&app, "/fc/context/shared_id", &a).await.expect(204);
    delete(&app, "/fc/model/Shared", &a).await.expect(204);
    get(&app, "/opt/shared_id", &a).await.expect(404);
    get(&app, "/fc/context/shared_id", &a).await.expect(404);
    get(&app, "/fc/model/Shared", &a).await.expect(404);
    assert_eq!(
        get(&app, "/fc/context", &a).await.expect(200).json(),
        json!([])
    );
    let b = tenant("b");
    assert_eq!(
        get(&app, "/opt/shared_id", &b).await.expect(200).text(),
        opt_xml("Shared id", "b")
    );
    let c = get(&app, "/fc/context/shared_id", &b)
        .await
        .expect(200)
        .json();
    assert_eq!(c["metadata"]["version"], "b");
    assert_eq!(
        get(&app, "/fc/context", &b)
            .await
            .expect(200)
            .json()
            .as_array()
            .unwrap()
            .len(),
        1
    );
    let m = get(&app, "/fc/model/Shared", &b).await.expect(200).json();
    assert_eq!(m["metadata"]["version"], "b");
    for table in ["opt", "fhir_connect_context", "fhir_connect_model"] {
        assert_eq!(count_in(&app, table, "a").await, 0, "{table}");
        assert_eq!(count_in(&app, table, "b").await, 1, "{table}");
    }
}

// ---------------------------------------------------------------------------
// Ids are plain data
// ---------------------------------------------------------------------------

#[tokio::test]
async fn sql_metacharacters_and_path_tricks_in_ids_are_plain_data() {
    let app = spawn_app().await;
    let id = "x'; DROP TABLE opt; --";
    let xml = opt_xml(id, "sql");
    let encoded = "/opt/x%27%3B%20DROP%20TABLE%20opt%3B%20--";
    let m = put_xml(&app, encoded, &xml, &[]).await.expect(200).json();
    assert_eq!(m["templateId"], "x';_drop_table_opt;_--", "{m}");
    assert_eq!(m["originalTemplateId"], id, "{m}");
    assert_eq!(get(&app, encoded, &[]).await.expect(200).text(), xml);
    assert_eq!(
        get(&app, "/opt/x%27%3B_drop_table_opt%3B_--", &[])
            .await
            .expect(200)
            .text(),
        xml
    );
    let list = get(&app, "/opt", &[]).await.expect(200).json();
    assert_eq!(list[0]["originalTemplateId"], id, "{list}");

    // A context and a model with quotes, a path traversal and a percent sign in their ids.
    let ctx_id = "Robert'); DROP TABLE fhir_connect_context;--";
    let ctx = context_yaml(&format!("\"{ctx_id}\""), "1");
    send_yaml(&app, Method::POST, "/fc/context", &ctx, &[])
        .await
        .expect(200);
    let got = get(
        &app,
        "/fc/context/robert%27)%3B_drop_table_fhir_connect_context%3B--",
        &[],
    )
    .await
    .expect(200)
    .json();
    assert_eq!(got["context"]["template"]["id"], ctx_id);
    let name = "../../etc/passwd 100%";
    let model = model_yaml(&format!("\"{name}\""), "1");
    send_yaml(
        &app,
        Method::PUT,
        "/fc/model/..%2F..%2Fetc%2Fpasswd%20100%25",
        &model,
        &[],
    )
    .await
    .expect(200);
    let got = get(&app, "/fc/model/..%2F..%2Fetc%2Fpasswd%20100%25", &[])
        .await
        .expect(200)
        .json();
    assert_eq!(got["metadata"]["name"], name);
    let list = get(&app, "/fc/model", &[]).await.expect(200).json();
    assert_eq!(list[0]["metadata"]["name"], name, "{list}");

    // Every table is still there, with exactly the rows written.
    let client = app.sql().await;
    for table in [
        "opt",
        "fhir_connect_context",
        "fhir_connect_model",
        "tenant",
    ] {
        let exists: bool = client
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[&table])
            .await
            .unwrap()
            .get(0);
        assert!(exists, "table {table} still exists");
    }
    assert_eq!(
        all_counts(&app).await,
        [1, 1, 1, 1],
        "opt, context, model, tenant"
    );
    delete(&app, encoded, &[]).await.expect(204);
    assert_eq!(count(&app, "opt").await, 0);
}

// ---------------------------------------------------------------------------
// Authentication
// ---------------------------------------------------------------------------

#[tokio::test]
async fn api_token_guards_everything_but_health() {
    let app = spawn_with(&[("OPENFHIR_API_TOKEN", "s3cret")]).await;
    for path in ["/health/live", "/health/ready"] {
        get(&app, path, &[]).await.expect(200);
    }
    let bearer = |t: &str| format!("Bearer {t}");
    let guarded = [
        "/opt",
        "/fc/context",
        "/fc/model",
        "/tenants",
        "/caches",
        "/metrics",
    ];
    for path in guarded {
        for auth in [
            None,
            Some(bearer("wrong")),
            Some(bearer("s3cre")),
            Some("s3cret".into()),
        ] {
            let hdrs: Vec<(&str, &str)> = auth
                .as_deref()
                .map(|a| vec![("Authorization", a)])
                .unwrap_or_default();
            let r = get(&app, path, &hdrs).await;
            let www = r
                .headers
                .get("www-authenticate")
                .map(|v| v.to_str().unwrap().to_string());
            r.expect_error(401, &["token"]);
            assert_eq!(www.as_deref(), Some("Bearer"), "{path} {auth:?}");
        }
        get(&app, path, &[("Authorization", &bearer("s3cret"))])
            .await
            .expect(200);
    }
    // Writes are refused before anything is stored.
    put_xml(&app, "/opt/x", &opt_xml("x", "1"), &[])
        .await
        .expect_error(401, &["token"]);
    send(
        &app,
        Method::POST,
        "/caches/evict",
        Some("application/json"),
        &[],
        "{}",
    )
    .await
    .expect(401);
    assert_eq!(count(&app, "opt").await, 0);
    put_xml(
        &app,
        "/opt/x",
        &opt_xml("x", "1"),
        &[("Authorization", &bearer("s3cret"))],
    )
    .await
    .expect(200);
}

// ---------------------------------------------------------------------------
// Operations
// ---------------------------------------------------------------------------

#[tokio::test]
async fn caches_report_every_cache_with_ttl_and_counters() {
    let app = spawn_with(&[
        ("OPENFHIR_CACHE_OPT_TTL", "300"),
        ("OPENFHIR_CACHE_TENANT_TTL", "0"),
    ])
    .await;
    let v = get(&app, "/caches", &[]).await.expect(200).json();
    let caches = v["caches"].as_array().unwrap_or_else(|| panic!("{v}"));
    let names: Vec<&str> = caches
        .iter()
        .map(|c| c["cache"].as_str().unwrap())
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
    for c in caches {
        for counter in [
            "entries",
            "hits",
            "misses",
            "loads",
            "load_failures",
            "evictions",
            "expirations",
        ] {
            assert!(c[counter].is_u64(), "{counter} in {c}");
        }
        assert!(c["ttl"].is_i64(), "{c}");
        assert!(c["group"].is_string(), "{c}");
    }
    let ttl = |name: &str| {
        caches.iter().find(|c| c["cache"] == name).unwrap()["ttl"]
            .as_i64()
            .unwrap()
    };
    assert_eq!(ttl("opt"), 300);
    assert_eq!(ttl("context"), -1);
    assert_eq!(ttl("all_contexts"), -1);
    assert_eq!(ttl("tenant"), 0);
}

#[tokio::test]
async fn evicting_a_key_makes_the_next_read_a_load() {
    let app = spawn_app().await;
    app.put_opt("Growth%20chart", &opt_xml("Growth chart", "1"))
        .await;
    app.get_text("/opt/growth_chart").await;
    let loads = app.stats(CacheName::Opt).await.stats.loads;
    app.get_text("/opt/growth_chart").await;
    assert_eq!(app.stats(CacheName::Opt).await.stats.loads, loads, "a hit");

    let r = send(
        &app,
        Method::POST,
        "/caches/evict",
        Some("application/json"),
        &[],
        json!({ "group": "opt", "tenant": "default", "key": "growth chart" }).to_string(),
    )
    .await
    .expect(200)
    .json();
    assert!(r["evicted"].as_u64().unwrap() >= 1, "{r}");
    app.get_text("/opt/growth_chart").await;
    assert_eq!(
        app.stats(CacheName::Opt).await.stats.loads,
        loads + 1,
        "the key was evicted"
    );

    // Evicting everything (empty body) also forces loads.
    send(&app, Method::POST, "/caches/evict", None, &[], Vec::new())
        .await
        .expect(200);
    app.get_text("/opt/growth_chart").await;
    assert_eq!(app.stats(CacheName::Opt).await.stats.loads, loads + 2);
}

#[tokio::test]
async fn metrics_are_prometheus_text() {
    let app = spawn_app().await;
    app.put_opt("x", &opt_xml("x", "1")).await;
    app.get_text("/opt/x").await;
    app.get_text("/opt/x").await;
    let hits = app.stats(CacheName::Opt).await.stats.hits;
    assert!(hits >= 1);
    let r = get(&app, "/metrics", &[]).await.expect(200);
    assert!(
        r.content_type().starts_with("text/plain"),
        "{}",
        r.content_type()
    );
    let text = r.text();
    assert!(
        text.contains("# TYPE openfhir_cache_hits_total counter"),
        "{text}"
    );
    let line = text
        .lines()
        .find(|l| l.starts_with("openfhir_cache_hits_total{cache=\"opt\"}"))
        .unwrap_or_else(|| panic!("no opt hits series in:\n{text}"));
    let value: u64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert_eq!(value, hits, "{line}");
    for cache in [
        "opt",
        "context",
        "all_contexts",
        "mapper",
        "helpers",
        "tenant",
    ] {
        assert!(
            text.contains(&format!(
                "openfhir_cache_ttl_seconds{{cache=\"{cache}\"}} -1"
            )),
            "{cache}: {text}"
        );
    }
    // Every sample line is `name{labels} number`.
    for l in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (series, value) = l.rsplit_once(' ').unwrap();
        let name = series.split('{').next().unwrap();
        assert!(
            !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'),
            "{l}"
        );
        assert!(!series.contains('{') || series.ends_with('}'), "{l}");
        value
            .parse::<f64>()
            .unwrap_or_else(|_| panic!("not a number: {l}"));
    }
}

#[tokio::test]
async fn health_endpoints() {
    let app = spawn_app().await;
    let r = get(&app, "/health/ready", &[]).await.expect(200).json();
    assert_eq!(r, json!({ "status": "ready" }));
    let r = get(&app, "/health/live", &[]).await.expect(200).json();
    assert_eq!(r["status"], "live");
    get(&app, "/no/such/route", &[])
        .await
        .expect_error(404, &["route"]);
}

#[tokio::test]
async fn yaml_alias_bombs_are_refused_quickly() {
    let app = spawn_app().await;
    let mut bomb = String::from(
        "a: &a [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]\n",
    );
    let names = ["a", "b", "c", "d", "e", "f", "g", "h", "i"];
    for w in names.windows(2) {
        let refs = vec![format!("*{}", w[0]); 9].join(",");
        bomb.push_str(&format!("{}: &{} [{refs}]\n", w[1], w[1]));
    }
    bomb.push_str("type: model\nmetadata: {name: bomb}\n");
    send_yaml(&app, Method::POST, "/fc/model", &bomb, &[])
        .await
        .expect_error(400, &["malformed YAML"]);
    assert_eq!(count(&app, "fhir_connect_model").await, 0);
}

// ---------------------------------------------------------------------------
// Known bugs (see the report): client input answered as "database unavailable"
// ---------------------------------------------------------------------------

#[tokio::test]
async fn nul_bytes_in_path_ids_are_client_errors_not_503() {
    let app = spawn_app().await;
    for path in ["/opt/a%00b", "/fc/context/a%00b", "/fc/model/a%00b"] {
        for method in [Method::GET, Method::DELETE] {
            let r = send(&app, method.clone(), path, None, &[], Vec::new()).await;
            assert!(
                matches!(r.status.as_u16(), 400 | 404),
                "{method} {path}: {} {}",
                r.status,
                r.text()
            );
        }
    }
    // Nor is it a failure of the source.
    assert_eq!(app.stats(CacheName::Opt).await.stats.load_failures, 0);
    assert_eq!(app.stats(CacheName::Context).await.stats.load_failures, 0);
}

#[tokio::test]
async fn nul_characters_in_documents_are_400() {
    let app = spawn_app().await;
    let before = all_counts(&app).await;
    send(
        &app,
        Method::POST,
        "/fc/model",
        Some("application/json"),
        &[],
        r#"{"type":"model","metadata":{"name":"x","note":"a\u0000b"}}"#,
    )
    .await
    .expect_error(400, &[]);
    send_yaml(
        &app,
        Method::POST,
        "/fc/context",
        "type: context\ncontext:\n  template:\n    id: t\n  note: \"a\\0b\"\n",
        &[],
    )
    .await
    .expect_error(400, &[]);
    put_json(&app, "/tenants/t1", &json!({ "name": "a\u{0}b" }))
        .await
        .expect_error(400, &[]);
    put_json(
        &app,
        "/tenants/t2",
        &json!({ "config": { "k": "a\u{0}b" } }),
    )
    .await
    .expect_error(400, &[]);
    assert_eq!(all_counts(&app).await, before);
}

#[tokio::test]
async fn errors_from_routing_are_json_too() {
    let app = spawn_with(&[("OPENFHIR_API_TOKEN", "s3cret")]).await;
    // Only the three health routes are exempt from the token.
    let r = app.client.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = app
        .client
        .patch(app.url("/opt"))
        .bearer_auth("s3cret")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    assert!(r.headers().get("allow").is_some());
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"], "method not allowed", "{body}");
    // An empty tenant body means defaults: name = id, config = {}.
    let r = app
        .client
        .put(app.url("/tenants/empty-body"))
        .bearer_auth("s3cret")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let t: serde_json::Value = r.json().await.unwrap();
    assert_eq!(
        (t["name"].as_str(), t["config"].clone()),
        (Some("empty-body"), serde_json::json!({}))
    );
}

/// Deeply nested documents are refused with 400, never by overflowing the stack (which would
/// kill the whole node, not just the request).
#[tokio::test]
async fn deep_nesting_is_a_400_not_a_crash() {
    let app = spawn_app().await;
    let n = 50_000;
    let xml = format!(
        "<template>{}{}</template>",
        "<a>".repeat(n),
        "</a>".repeat(n)
    );
    let yaml = format!("{}1{}", "[".repeat(n), "]".repeat(n));
    let json = format!("{}1{}", "[".repeat(n), "]".repeat(n));
    for (path, ct, body) in [
        ("/opt", "application/xml", xml),
        ("/fc/model", "application/yaml", yaml),
        ("/fc/context", "application/json", json.clone()),
    ] {
        let r = app
            .client
            .post(app.url(path))
            .header("content-type", ct)
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{path}");
    }
    let r = app
        .client
        .put(app.url("/tenants/deep"))
        .header("content-type", "application/json")
        .body(format!("{{\"config\": {{\"x\": {json}}}}}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    // The node is still up.
    assert_eq!(app.live_status().await, 200);
}
