//! openFHIR's state API against a real node, with a real HTTP client: the status codes and bodies
//! openFHIR answers (its own end-to-end suite's create, duplicate, update, list, delete and purge
//! flows, in this project's words and fixtures), addressing by id or by key, the FHIR Connect
//! files openFHIR accepts, and two nodes seeing each other's writes.

use crate::common;

use std::time::Duration;

use common::pg::TestDb;
use common::{opt_xml, spawn_app, spawn_url, unique_tag, wait_for, TestApp};
use reqwest::Method;
use serde_json::Value;

const GROWTH_OPT: &str = include_str!("../fixtures/growth_chart.opt");

/// A response, read.
struct Resp {
    status: u16,
    content_type: String,
    body: String,
}

impl Resp {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}), status {}: {}", self.status, self.body))
    }

    fn ok(self) -> Resp {
        assert_eq!(self.status, 200, "{}", self.body);
        self
    }

    /// A 400 with openFHIR's body: a JSON array of messages; returns them.
    fn messages(self) -> Vec<String> {
        assert_eq!(self.status, 400, "{}", self.body);
        assert!(
            self.content_type.starts_with("application/json"),
            "{}",
            self.content_type
        );
        let v = self.json();
        let list = v.as_array().unwrap_or_else(|| panic!("a JSON array: {v}"));
        assert!(!list.is_empty(), "{v}");
        list.iter()
            .map(|m| {
                m.as_str()
                    .unwrap_or_else(|| panic!("strings: {v}"))
                    .to_string()
            })
            .collect()
    }
}

/// `method path` with an optional content type (none at all, like a bare client) and tenant.
async fn call(
    app: &TestApp,
    method: Method,
    path: &str,
    content_type: Option<&str>,
    tenant: Option<&str>,
    body: &str,
) -> Resp {
    let mut rb = app.req(method, path);
    if let Some(ct) = content_type {
        rb = rb.header("content-type", ct);
    }
    if let Some(t) = tenant {
        rb = rb.header("x-tenant-id", t);
    }
    let r = rb.body(body.to_string()).send().await.unwrap();
    Resp {
        status: r.status().as_u16(),
        content_type: r
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default(),
        body: r.text().await.unwrap(),
    }
}

async fn get(app: &TestApp, path: &str) -> Resp {
    call(app, Method::GET, path, None, None, "").await
}

fn fixture(name: &str) -> String {
    std::fs::read_to_string(format!(
        "{}/tests/fixtures/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

/// A context for `template_id` naming the growth chart's models, `profile.url` empty.
fn context_for(template_id: &str) -> String {
    format!(
        "grammar: FHIRConnect/v0.0.1\ntype: context\nmetadata:\n  name: \"Growth chart\"\n  version: 0.0.1a\nspec:\n  system: FHIR\n  version: R4\ncontext:\n  profile:\n    url: \"\"\n  template:\n    id: \"{template_id}\"\n  archetypes:\n    - OBSERVATION.height.v2\n    - OBSERVATION.body_weight.v2\n  start: openEHR-EHR-COMPOSITION.encounter.v1\n"
    )
}

#[tokio::test]
async fn the_state_flows_answer_as_openfhir() {
    let app = spawn_app().await;

    // Purge an empty state: 204.
    let r = get(&app, "/$purge").await;
    assert_eq!(r.status, 204, "{}", r.body);

    // Create an OPT: 200 with openFHIR's entity, content redacted.
    let r = call(
        &app,
        Method::POST,
        "/opt",
        Some("application/xml"),
        None,
        GROWTH_OPT,
    )
    .await
    .ok();
    let opt = r.json();
    assert_eq!(opt["templateId"], "growth_chart");
    assert_eq!(opt["originalTemplateId"], "Growth chart");
    assert_eq!(opt["displayTemplateId"], "Growth chart");
    assert_eq!(opt["content"], "redacted");
    assert_eq!(opt["organisation"], "default");
    let opt_id = opt["id"].as_str().unwrap().to_string();
    assert!(uuid::Uuid::parse_str(&opt_id).is_ok(), "{opt}");

    // Read it by its id: the XML exactly as uploaded (query parameters ignored).
    let r = get(&app, &format!("/opt/{opt_id}?user=123")).await.ok();
    assert!(r.content_type.starts_with("text/xml"), "{}", r.content_type);
    assert_eq!(r.body.len(), GROWTH_OPT.len());
    assert_eq!(r.body, GROWTH_OPT);

    // A duplicate: 400, a JSON array whose first message says "already exists".
    let m = call(
        &app,
        Method::POST,
        "/opt",
        Some("application/xml"),
        None,
        GROWTH_OPT,
    )
    .await
    .messages();
    assert!(m[0].contains("already exists"), "{m:?}");

    // A context for "Growth chart1", then renamed to "Growth chart" by a PUT to its id.
    let r = call(
        &app,
        Method::POST,
        "/fc/context",
        Some("text/plain"),
        None,
        &context_for("Growth chart1"),
    )
    .await
    .ok();
    let ctx = r.json();
    assert_eq!(ctx["context"]["template"]["id"], "Growth chart1");
    assert_eq!(ctx["context"]["archetypes"].as_array().unwrap().len(), 2);
    assert_eq!(ctx["context"]["profile"]["url"], "");
    let ctx_id = ctx["id"].as_str().unwrap().to_string();
    let r = call(
        &app,
        Method::PUT,
        &format!("/fc/context/{ctx_id}"),
        Some("text/plain"),
        None,
        &context_for("Growth chart"),
    )
    .await
    .ok();
    let renamed = r.json();
    assert_eq!(renamed["context"]["template"]["id"], "Growth chart");
    assert_eq!(renamed["id"], ctx_id.as_str(), "a PUT keeps the id");
    assert_eq!(get(&app, "/fc/context/growth_chart1").await.status, 404);
    assert_eq!(
        get(&app, "/fc/context/growth_chart").await.ok().json()["id"],
        ctx_id.as_str()
    );

    // A second context for the same template: openFHIR's exact message.
    let m = call(
        &app,
        Method::POST,
        "/fc/context",
        None,
        None,
        &context_for("Growth chart"),
    )
    .await
    .messages();
    assert_eq!(m, ["A context mapper for this template already exists."]);

    // Models, with no content type at all (YAML), then two PUTs to one of them by id.
    let mut model_ids = Vec::new();
    for f in ["height.model.yml", "weight.model.yml"] {
        let r = call(&app, Method::POST, "/fc/model", None, None, &fixture(f))
            .await
            .ok();
        let m = r.json();
        assert_eq!(
            m["spec"]["fhirConfig"]["structureDefinition"]
                .as_str()
                .map(|s| s.starts_with("http://hl7.org/fhir/StructureDefinition/")),
            Some(true),
            "{m}"
        );
        model_ids.push(m["id"].as_str().unwrap().to_string());
    }
    let weight_id = model_ids[1].clone();
    for _ in 0..2 {
        let r = call(
            &app,
            Method::PUT,
            &format!("/fc/model/{weight_id}"),
            Some("application/x-yaml"),
            None,
            &fixture("weight.model.yml"),
        )
        .await
        .ok();
        let m = r.json();
        assert_eq!(m["id"], weight_id.as_str());
        assert_eq!(
            m["spec"]["openEhrConfig"]["archetype"],
            "openEHR-EHR-OBSERVATION.body_weight.v2"
        );
    }
    let m = call(
        &app,
        Method::POST,
        "/fc/model",
        None,
        None,
        &fixture("weight.model.yml"),
    )
    .await
    .messages();
    assert!(
        m[0].starts_with("Model mapper with this name OBSERVATION.body_weight.v2 already exists."),
        "{m:?}"
    );

    // Lists: arrays of entities or documents, each with its id.
    let models = get(&app, "/fc/model").await.ok().json();
    assert_eq!(models.as_array().unwrap().len(), 2, "{models}");
    assert!(models
        .as_array()
        .unwrap()
        .iter()
        .all(|m| m["id"].is_string()));
    let contexts = get(&app, "/fc/context").await.ok().json();
    assert_eq!(contexts[0]["id"], ctx_id.as_str());
    let opts = get(&app, "/opt").await.ok().json();
    assert_eq!(opts[0]["id"], opt_id.as_str());
    assert_eq!(opts[0]["content"], Value::Null, "a listing has no content");
    let by_template = get(&app, "/opt?templateId=growth_chart").await.ok().json();
    assert_eq!(
        by_template[0]["content"], GROWTH_OPT,
        "asked by templateId: with content"
    );
    assert_eq!(
        get(&app, "/opt?templateId=nothing").await.ok().json(),
        serde_json::json!([])
    );
    let yaml = call(&app, Method::GET, "/fc/model", None, None, "").await;
    assert_eq!(yaml.status, 200);
    let r = app
        .req(Method::GET, "/fc/context")
        .header("accept", "application/x-yaml")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let listed: Value = serde_norway::from_str(&r.text().await.unwrap()).unwrap();
    assert_eq!(listed[0]["id"], ctx_id.as_str());

    // Deletes by id: 204, then 404; deleting again is 204 too.
    for (path, id) in [
        ("opt", &opt_id),
        ("fc/model", &weight_id),
        ("fc/context", &ctx_id),
    ] {
        let url = format!("/{path}/{id}");
        let r = call(&app, Method::DELETE, &url, None, None, "").await;
        assert_eq!(r.status, 204, "DELETE {url}: {}", r.body);
        assert_eq!(get(&app, &url).await.status, 404, "GET {url} after DELETE");
        let r = call(&app, Method::DELETE, &url, None, None, "").await;
        assert_eq!(r.status, 204, "DELETE {url} again");
        assert!(r.body.is_empty());
    }
    assert_eq!(
        get(&app, "/fc/model")
            .await
            .ok()
            .json()
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

#[tokio::test]
async fn an_id_or_a_key_addresses_the_same_artifact_and_an_id_match_wins() {
    let app = spawn_app().await;
    let created = call(
        &app,
        Method::POST,
        "/opt",
        None,
        None,
        &opt_xml("Vital signs", "v1"),
    )
    .await
    .ok()
    .json();
    let id = created["id"].as_str().unwrap().to_string();

    // GET by id and by template id (as written or normalized): the same OPT.
    for path in [
        format!("/opt/{id}"),
        "/opt/vital_signs".into(),
        "/opt/Vital%20signs".into(),
    ] {
        assert!(get(&app, &path).await.ok().body.contains("v1"), "{path}");
    }

    // PUT by template id replaces and keeps the id; PUT by id too.
    let r = call(
        &app,
        Method::PUT,
        "/opt/vital_signs",
        None,
        None,
        &opt_xml("Vital signs", "v2"),
    )
    .await
    .ok()
    .json();
    assert_eq!(r["id"], id.as_str());
    let r = call(
        &app,
        Method::PUT,
        &format!("/opt/{id}"),
        None,
        None,
        &opt_xml("Vital signs", "v3"),
    )
    .await
    .ok()
    .json();
    assert_eq!(r["id"], id.as_str());
    assert!(get(&app, &format!("/opt/{id}"))
        .await
        .ok()
        .body
        .contains("v3"));

    // A PUT to an id this tenant does not have creates, with a new id (as openFHIR).
    let stranger = uuid::Uuid::new_v4();
    let r = call(
        &app,
        Method::PUT,
        &format!("/opt/{stranger}"),
        None,
        None,
        &opt_xml("Lab", "l1"),
    )
    .await
    .ok()
    .json();
    let lab_id = r["id"].as_str().unwrap().to_string();
    assert_ne!(lab_id, stranger.to_string());
    // ... and an id of another tenant is not this tenant's.
    app.node
        .put_tenant("other", "Other", &serde_json::json!({}))
        .await
        .unwrap();
    let r = call(
        &app,
        Method::GET,
        &format!("/opt/{lab_id}"),
        None,
        Some("other"),
        "",
    )
    .await;
    assert_eq!(r.status, 404);

    // A PUT to an id renames; onto a taken template id it is a duplicate, and nothing changes.
    let m = call(
        &app,
        Method::PUT,
        &format!("/opt/{lab_id}"),
        None,
        None,
        &opt_xml("Vital signs", "x"),
    )
    .await
    .messages();
    assert!(m[0].contains("already exists"), "{m:?}");
    assert!(get(&app, "/opt/lab").await.ok().body.contains("l1"));
    let r = call(
        &app,
        Method::PUT,
        &format!("/opt/{lab_id}"),
        None,
        None,
        &opt_xml("Lab results", "l2"),
    )
    .await
    .ok()
    .json();
    assert_eq!(
        (r["id"].as_str(), r["templateId"].as_str()),
        (Some(lab_id.as_str()), Some("lab_results"))
    );
    assert_eq!(
        get(&app, "/opt/lab").await.status,
        404,
        "the old key is gone (and not cached)"
    );

    // An id match wins over a template id that happens to look like an id.
    let lookalike = call(
        &app,
        Method::POST,
        "/opt",
        None,
        None,
        &opt_xml(&id, "lookalike"),
    )
    .await
    .ok()
    .json();
    assert_eq!(lookalike["templateId"], id.as_str());
    assert!(get(&app, &format!("/opt/{id}"))
        .await
        .ok()
        .body
        .contains("v3"));

    // Mapper and helpers take a context's id for its template.
    for f in [
        "height.model.yml",
        "weight.model.yml",
        "height.ext-add.yml",
        "height.ext-append.yml",
        "height.ext-overwrite.yml",
    ] {
        call(&app, Method::POST, "/fc/model", None, None, &fixture(f))
            .await
            .ok();
    }
    call(&app, Method::POST, "/opt", None, None, GROWTH_OPT)
        .await
        .ok();
    let ctx = call(
        &app,
        Method::POST,
        "/fc/context",
        None,
        None,
        &fixture("growth_chart.context.yml"),
    )
    .await
    .ok()
    .json();
    let ctx_id = ctx["id"].as_str().unwrap();
    let mapper = get(&app, &format!("/fc/mapper/{ctx_id}")).await.ok().json();
    assert_eq!(mapper["templateId"], "growth_chart");
    let helpers = get(&app, &format!("/fc/helpers/{ctx_id}"))
        .await
        .ok()
        .json();
    assert_eq!(helpers["template_id"], "growth_chart");
}

#[tokio::test]
async fn opt_bodies_with_leading_whitespace_or_a_byte_order_mark_are_stored_as_sent() {
    let app = spawn_app().await;
    for (name, prefix) in [
        ("Bom", "\u{feff}"),
        ("Spaces", " \r\n\t "),
        ("Both", "\u{feff}\n  "),
    ] {
        let body = format!("{prefix}{}", opt_xml(name, "lead"));
        let r = call(&app, Method::POST, "/opt", Some("text/plain"), None, &body)
            .await
            .ok();
        let id = r.json()["id"].as_str().unwrap().to_string();
        let back = get(&app, &format!("/opt/{id}")).await.ok();
        assert_eq!(back.body, body, "{name}: stored byte for byte");
        // The stored text still parses when read back cold (another node, a restart).
        app.node
            .caches()
            .apply(&openfhir_cache::cache::Change::Evict {
                group: None,
                tenant: None,
                key: None,
            })
            .await;
        assert_eq!(
            get(&app, &format!("/opt/{}", name.to_lowercase()))
                .await
                .ok()
                .body,
            body
        );
    }
    // Text before the markup is still refused, with a 400 naming the problem.
    let m = call(
        &app,
        Method::POST,
        "/opt",
        None,
        None,
        &format!("junk{}", opt_xml("J", "j")),
    )
    .await
    .messages();
    assert!(
        m[0].to_lowercase().contains("xml") || m[0].contains("OPT"),
        "{m:?}"
    );
}

#[tokio::test]
async fn validation_failures_are_a_json_array_and_other_errors_keep_their_shape() {
    let app = spawn_app().await;
    let m = call(
        &app,
        Method::POST,
        "/fc/model",
        None,
        None,
        "type: model\nmetadata: {name: x}\n",
    )
    .await
    .messages();
    assert!(m.iter().any(|x| x.starts_with("grammar:")), "{m:?}");
    assert!(
        m.iter().any(|x| x.starts_with("metadata.version:")),
        "{m:?}"
    );
    let m = call(
        &app,
        Method::POST,
        "/fc/context",
        Some("application/json"),
        None,
        "{",
    )
    .await
    .messages();
    assert!(m[0].starts_with("malformed JSON"), "{m:?}");
    let m = call(&app, Method::POST, "/opt", None, None, "<composition/>")
        .await
        .messages();
    assert!(m[0].contains("<template>"), "{m:?}");
    // Not found, unsupported media type: this API's {error, details}.
    let r = get(&app, "/fc/model/nothing").await;
    assert_eq!(r.status, 404);
    assert!(r.json()["error"].is_string());
    let r = call(
        &app,
        Method::POST,
        "/fc/model",
        Some("image/png"),
        None,
        "x",
    )
    .await;
    assert_eq!(r.status, 415);
    assert!(r.json()["details"].is_array());
}

#[tokio::test]
async fn fhir_connect_files_openfhir_accepts_are_accepted_and_compile() {
    let app = spawn_app().await;
    call(
        &app,
        Method::POST,
        "/opt",
        None,
        None,
        &opt_xml("Blood Pressure Panel", "bp"),
    )
    .await
    .ok();
    for f in [
        "bp.model.yml",
        "bp-device.model.yml",
        "bp.ext-cuff.yml",
        "bp.ext-cuff-detail.yml",
        "bp.ext-overwrite.yml",
    ] {
        let r = call(
            &app,
            Method::POST,
            "/fc/model",
            Some("text/plain"),
            None,
            &fixture(&format!("openfhir/{f}")),
        )
        .await;
        assert_eq!(r.status, 200, "{f}: {}", r.body);
    }
    call(
        &app,
        Method::POST,
        "/fc/context",
        Some("application/x-yaml"),
        None,
        &fixture("openfhir/bp.context.yml"),
    )
    .await
    .ok();
    let mapper = get(&app, "/fc/mapper/blood_pressure_panel")
        .await
        .ok()
        .json();
    assert_eq!(
        mapper["byArchetype"]["openEHR-EHR-OBSERVATION.blood_pressure.v2"],
        serde_json::json!([
            "OBSERVATION.blood_pressure.v2",
            "OBSERVATION.blood_pressure.v2-device"
        ]),
        "{mapper}"
    );
    assert_eq!(
        mapper["mergedExtensions"],
        serde_json::json!(["bp-ext-cuff", "bp-ext-cuff-detail", "bp-ext-overwrite"])
    );
    assert_eq!(mapper["warnings"], serde_json::json!([]), "{mapper}");
    assert_eq!(
        mapper["models"]["OBSERVATION.blood_pressure.v2"]["mappings"],
        4
    );

    // The helper tree: both models of the start archetype, the chain merged in order.
    let helpers = get(&app, "/fc/helpers/blood_pressure_panel")
        .await
        .ok()
        .json();
    let roots = helpers["roots"].as_array().unwrap();
    let names: Vec<(&str, &str)> = roots
        .iter()
        .map(|h| (h["model"].as_str().unwrap(), h["mapping"].as_str().unwrap()))
        .collect();
    assert_eq!(
        names,
        [
            ("OBSERVATION.blood_pressure.v2", "systolic"),
            ("OBSERVATION.blood_pressure.v2", "diastolic"),
            ("OBSERVATION.blood_pressure.v2", "code"),
            ("OBSERVATION.blood_pressure.v2", "cuff"),
            ("OBSERVATION.blood_pressure.v2-device", "device"),
        ]
    );
    assert!(
        roots[0]["fhir_path"].as_str().unwrap().contains("8480-6"),
        "overwritten by name"
    );
    let cuff: Vec<(&str, &str)> = roots[3]["children"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            (
                h["mapping"].as_str().unwrap(),
                h["openehr_path"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(cuff.len(), 2, "{cuff:?}");
    assert_eq!(cuff[0].0, "cuffSize");
    assert!(
        cuff[0].1.ends_with("/value/value"),
        "cuffSize overwritten by the chain: {cuff:?}"
    );
    assert_eq!(cuff[1].0, "cuffLocationCode", "appended by the chain");
    let code_children = roots[2]["children"].as_array().unwrap();
    assert_eq!(
        code_children.len(),
        2,
        "followedBy mappings without `with` are kept"
    );
    assert!(code_children.iter().all(|h| h["openehr_path"].is_null()));

    // Directions were stored as written.
    let model = get(&app, "/fc/model/OBSERVATION.blood_pressure.v2")
        .await
        .ok()
        .json();
    assert_eq!(model["mappings"][0]["unidirectional"], "openEHR->fhir");
    assert_eq!(model["metadata"]["version"], 1.0);
}

#[tokio::test]
async fn purge_deletes_the_tenants_state_only_and_evicts_it() {
    let app = spawn_app().await;
    app.node
        .put_tenant("acme", "Acme", &serde_json::json!({}))
        .await
        .unwrap();
    for tenant in [None, Some("acme")] {
        call(&app, Method::POST, "/opt", None, tenant, GROWTH_OPT)
            .await
            .ok();
        call(
            &app,
            Method::POST,
            "/fc/context",
            None,
            tenant,
            &fixture("growth_chart.context.yml"),
        )
        .await
        .ok();
        for f in [
            "height.model.yml",
            "weight.model.yml",
            "height.ext-add.yml",
            "height.ext-append.yml",
            "height.ext-overwrite.yml",
        ] {
            call(&app, Method::POST, "/fc/model", None, tenant, &fixture(f))
                .await
                .ok();
        }
    }
    // Warm every cache of the default tenant.
    for path in [
        "/opt/growth_chart",
        "/fc/context/growth_chart",
        "/fc/context",
        "/fc/mapper/growth_chart",
        "/fc/helpers/growth_chart",
    ] {
        get(&app, path).await.ok();
    }
    let r = get(&app, "/$purge").await;
    assert_eq!(r.status, 204, "{}", r.body);
    assert!(r.body.is_empty());
    for path in [
        "/opt/growth_chart",
        "/fc/context/growth_chart",
        "/fc/model/OBSERVATION.height.v2",
    ] {
        assert_eq!(get(&app, path).await.status, 404, "{path} after purge");
    }
    assert_eq!(
        get(&app, "/fc/context").await.ok().json(),
        serde_json::json!([])
    );
    assert_eq!(get(&app, "/fc/mapper/growth_chart").await.status, 404);
    // The other tenant keeps everything.
    let r = call(&app, Method::GET, "/fc/model", None, Some("acme"), "")
        .await
        .ok();
    assert_eq!(r.json().as_array().unwrap().len(), 5);
    let r = call(
        &app,
        Method::GET,
        "/fc/mapper/growth_chart",
        None,
        Some("acme"),
        "",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    // The same state can be uploaded again.
    call(&app, Method::POST, "/opt", None, None, GROWTH_OPT)
        .await
        .ok();
}

/// Settings of a peer of a two-node cluster on `ip`; NOTIFY and catch-up stay on, as in
/// production (the peer channel or the database, whichever is first).
fn peer_env(name: &str, ip: &str, hosts: &str) -> Vec<(&'static str, String)> {
    vec![
        ("CLUSTER_NAME", name.to_string()),
        ("CLUSTER_BIND_ADDR", ip.to_string()),
        ("CLUSTER_PORT", "7800".to_string()),
        ("CLUSTER_DISCOVERY", "TCP".to_string()),
        ("CLUSTER_INITIAL_HOSTS", hosts.to_string()),
        ("CLUSTER_HEARTBEAT_MS", "100".to_string()),
    ]
}

async fn start_peer(db_url: &str, env: &[(&'static str, String)]) -> TestApp {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    spawn_url(db_url, &env).await
}

/// Reads `path` on `app` until `ok` holds for its status and body (bounded).
async fn until(app: &TestApp, path: &str, ok: impl Fn(u16, &str) -> bool) -> bool {
    for _ in 0..200 {
        let r = get(app, path).await;
        if ok(r.status, &r.body) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_nodes_see_each_others_post_put_delete_and_purge() {
    let db = TestDb::new().await;
    let name = format!("of{:x}", unique_tag());
    let hosts = "127.0.70.1[7800],127.0.70.2[7800]";
    let a = start_peer(&db.url, &peer_env(&name, "127.0.70.1", hosts)).await;
    let b = start_peer(&db.url, &peer_env(&name, "127.0.70.2", hosts)).await;
    assert!(
        wait_for(10, || a.node.cluster().peers().len() == 1
            && b.node.cluster().peers().len() == 1)
        .await,
        "the two nodes never met"
    );

    // POST on A; B reads it (by id) and caches it.
    let opt = call(
        &a,
        Method::POST,
        "/opt",
        None,
        None,
        &opt_xml("Shared", "one"),
    )
    .await
    .ok()
    .json();
    let id = opt["id"].as_str().unwrap().to_string();
    assert!(
        until(&b, &format!("/opt/{id}"), |s, body| s == 200
            && body.contains("one"))
        .await
    );
    let ctx = call(
        &a,
        Method::POST,
        "/fc/context",
        None,
        None,
        &context_for("Shared"),
    )
    .await
    .ok()
    .json();
    let ctx_id = ctx["id"].as_str().unwrap().to_string();
    assert!(
        until(&b, "/fc/context", |s, body| s == 200
            && body.contains(&ctx_id))
        .await
    );

    // PUT by id on A (a rename too): B serves the new version, and not the old key.
    call(
        &a,
        Method::PUT,
        &format!("/opt/{id}"),
        None,
        None,
        &opt_xml("Shared", "two"),
    )
    .await
    .ok();
    assert!(
        until(&b, &format!("/opt/{id}"), |s, body| s == 200
            && body.contains("two"))
        .await
    );
    call(
        &a,
        Method::PUT,
        &format!("/fc/context/{ctx_id}"),
        None,
        None,
        &context_for("Renamed"),
    )
    .await
    .ok();
    assert!(
        until(&b, "/fc/context/shared", |s, _| s == 404).await,
        "old key gone on B"
    );
    assert!(
        until(&b, "/fc/context/renamed", |s, body| s == 200
            && body.contains(&ctx_id))
        .await
    );

    // DELETE by id on B: gone on A.
    let r = call(&b, Method::DELETE, &format!("/opt/{id}"), None, None, "").await;
    assert_eq!(r.status, 204);
    assert!(until(&a, &format!("/opt/{id}"), |s, _| s == 404).await);

    // Purge on A: B's cached context list and context are gone.
    assert_eq!(get(&b, "/fc/context/renamed").await.status, 200);
    assert_eq!(get(&a, "/$purge").await.status, 204);
    assert!(until(&b, "/fc/context/renamed", |s, _| s == 404).await);
    assert!(until(&b, "/fc/context", |s, body| s == 200 && body == "[]").await);
}

/// Every artifact row, as text, without its id.
async fn snapshot(sql: &tokio_postgres::Client) -> Vec<String> {
    let mut rows = Vec::new();
    for q in [
        "SELECT tenant || template_id || original_template_id || content || created::text || updated::text FROM opt ORDER BY 1",
        "SELECT tenant || template_id || content || parsed::text || created::text FROM fhir_connect_context ORDER BY 1",
        "SELECT tenant || name || kind || content || parsed::text || created::text FROM fhir_connect_model ORDER BY 1",
    ] {
        for r in sql.query(q, &[]).await.unwrap() {
            rows.push(r.get::<_, String>(0));
        }
    }
    rows
}

#[tokio::test]
async fn the_migration_gives_existing_rows_ids_and_changes_nothing_else() {
    use openfhir_cache::store::migrate::{migrate, MIGRATIONS};
    let db = TestDb::new().await;
    let mut sql = db.connect().await;
    // A database at schema version 3, with artifacts stored before ids existed.
    for m in MIGRATIONS.iter().filter(|m| m.version <= 3) {
        sql.batch_execute(m.sql).await.unwrap();
    }
    sql.batch_execute(&format!(
        "INSERT INTO opt (tenant, template_id, original_template_id, content) VALUES ('default', 'a', 'A', $${}$$), ('default', 'b', 'B', 'x');
         INSERT INTO fhir_connect_context (tenant, template_id, original_template_id, content, content_format, parsed)
             VALUES ('default', 'a', 'A', 'type: context', 'yaml', '{{\"type\": \"context\"}}');
         INSERT INTO fhir_connect_model (tenant, name, kind, content, content_format, parsed)
             VALUES ('default', 'm1', 'model', 'm', 'yaml', '{{}}'), ('default', 'm2', 'extension', 'e', 'yaml', '{{}}');",
        opt_xml("A", "before")
    ))
    .await
    .unwrap();
    let before = snapshot(&sql).await;
    let log_before: i64 = sql
        .query_one("SELECT count(*) FROM openfhir_invalidation_log", &[])
        .await
        .unwrap()
        .get(0);

    let later: Vec<i32> = MIGRATIONS[3..].iter().map(|m| m.version).collect();
    assert_eq!(migrate(&mut sql).await.unwrap(), later);
    assert_eq!(
        snapshot(&sql).await,
        before,
        "nothing stored before is changed"
    );
    for table in ["opt", "fhir_connect_context", "fhir_connect_model"] {
        let r = sql
            .query_one(
                &format!("SELECT count(*), count(DISTINCT id), count(id) FROM {table}"),
                &[],
            )
            .await
            .unwrap();
        let (n, distinct, with_id): (i64, i64, i64) = (r.get(0), r.get(1), r.get(2));
        assert!(
            n > 0 && n == distinct && n == with_id,
            "{table}: {n} rows, {distinct} ids"
        );
    }
    let log_after: i64 = sql
        .query_one("SELECT count(*) FROM openfhir_invalidation_log", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(log_after, log_before, "adding ids logs no invalidation");
    // Running it again changes nothing.
    assert!(migrate(&mut sql).await.unwrap().is_empty());
    let ids: Vec<uuid::Uuid> = sql
        .query("SELECT id FROM opt ORDER BY template_id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    sql.batch_execute(MIGRATIONS[3].sql).await.unwrap();
    let again: Vec<uuid::Uuid> = sql
        .query("SELECT id FROM opt ORDER BY template_id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(ids, again, "the SQL file run again by hand keeps the ids");
}
