//! Compiled artifacts end to end through the HTTP API against real PostgreSQL: the fixtures are
//! uploaded, the mapper index and helper tree are compiled once and cached, and every change that
//! affects them evicts them.

use crate::common;

use std::sync::Arc;

use common::{spawn_app, TestApp};
use openfhir_cache::cache::CacheName;
use openfhir_cache::domain::helpers::{Helper, HelperTree};

fn fixture(name: &str) -> String {
    std::fs::read_to_string(format!(
        "{}/tests/fixtures/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap_or_else(|e| panic!("fixture {name}: {e}"))
}

async fn upload(app: &TestApp, path: &str, content_type: &str, body: String) -> reqwest::Response {
    app.client
        .put(app.url(path))
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .unwrap()
}

/// Uploads the growth chart OPT, its context, both core models and the three extensions.
async fn upload_all(app: &TestApp) {
    upload_all_but_context(app).await;
    let r = upload(
        app,
        "/fc/context/Growth%20chart",
        "application/yaml",
        fixture("growth_chart.context.yml"),
    )
    .await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
}

/// Adds a mapping to the weight model through the API (an update: 200).
async fn add_a_weight_mapping(app: &TestApp) -> reqwest::Response {
    let weight = fixture("weight.model.yml").replacen(
        "\nmappings:\n",
        "\nmappings:\n  - name: extraNote\n    with:\n      fhir: \"$resource.note\"\n      openehr: \"$archetype/data[at0002]\"\n",
        1,
    );
    upload(
        app,
        "/fc/model/OBSERVATION.body_weight.v2",
        "application/yaml",
        weight,
    )
    .await
}

/// How many mappings the compiled weight model has, from a `/fc/mapper` answer.
fn weight_mappings(mapper: &serde_json::Value) -> u64 {
    mapper["models"]["OBSERVATION.body_weight.v2"]["mappings"]
        .as_u64()
        .unwrap_or_else(|| panic!("no weight model in {mapper}"))
}

async fn json(app: &TestApp, path: &str) -> (u16, serde_json::Value) {
    let r = app.client.get(app.url(path)).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(serde_json::Value::Null))
}

#[tokio::test]
async fn the_mapper_and_helpers_compile_once_and_follow_every_change() {
    let app = spawn_app().await;
    upload_all(&app).await;

    let (s, m) = json(&app, "/fc/mapper/growth_chart").await;
    assert_eq!(s, 200, "{m}");
    assert_eq!(m["templateId"], "growth_chart", "{m}");
    assert_eq!(
        m["mergedExtensions"],
        serde_json::json!([
            "height-ext-add",
            "height-ext-append",
            "height-ext-overwrite"
        ]),
        "{m}"
    );
    assert_eq!(
        m["byArchetype"]["openEHR-EHR-OBSERVATION.height.v2"],
        serde_json::json!(["OBSERVATION.height.v2"]),
        "{m}"
    );
    assert_eq!(m["warnings"], serde_json::json!([]), "{m}");
    assert_eq!(m["node"], app.node.id(), "{m}");
    let (s, h) = json(&app, "/fc/helpers/growth_chart").await;
    assert_eq!(s, 200, "{h}");
    assert!(!h["roots"].as_array().unwrap().is_empty(), "{h}");

    // Cached: a second read compiles nothing.
    let compiles = app.stats(CacheName::Mapper).await.stats.loads;
    let helper_builds = app.stats(CacheName::Helpers).await.stats.loads;
    assert_eq!(json(&app, "/fc/mapper/growth_chart").await.0, 200);
    assert_eq!(json(&app, "/fc/helpers/growth_chart").await.0, 200);
    assert_eq!(app.stats(CacheName::Mapper).await.stats.loads, compiles);
    assert_eq!(
        app.stats(CacheName::Helpers).await.stats.loads,
        helper_builds
    );

    // A model update changes the next compiled index.
    let before = weight_mappings(&m);
    let r = add_a_weight_mapping(&app).await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let (_, m2) = json(&app, "/fc/mapper/growth_chart").await;
    assert_eq!(weight_mappings(&m2), before + 1, "{m2}");
    assert_eq!(app.stats(CacheName::Mapper).await.stats.loads, compiles + 1);

    // An OPT change evicts the mapper and the helpers of that template.
    let r = upload(
        &app,
        "/opt/Growth%20chart",
        "application/xml",
        fixture("growth_chart.opt"),
    )
    .await;
    assert_eq!(r.status(), 200);
    assert!(
        !app.node
            .caches()
            .mapper
            .contains("default", Some("growth_chart"))
            .await
    );
    assert!(
        !app.node
            .caches()
            .helpers
            .contains("default", Some("growth_chart"))
            .await
    );
}

#[tokio::test]
async fn compile_errors_list_every_missing_name_and_cache_nothing() {
    let app = spawn_app().await;
    // No OPT, no models: only the context.
    let r = upload(
        &app,
        "/fc/context/Growth%20chart",
        "application/yaml",
        fixture("growth_chart.context.yml"),
    )
    .await;
    assert_eq!(r.status(), 200);
    let (s, body) = json(&app, "/fc/mapper/growth_chart").await;
    assert_eq!(s, 422, "{body}");
    let details = body["details"].to_string();
    for name in [
        "OBSERVATION.height.v2",
        "OBSERVATION.body_weight.v2",
        "growth_chart",
    ] {
        assert!(details.contains(name), "{name} missing from {details}");
    }
    assert_eq!(json(&app, "/fc/helpers/growth_chart").await.0, 422);
    assert_eq!(app.stats(CacheName::Mapper).await.stats.entries, 0);
    // Uploading what was missing makes it compile: nothing stale was cached.
    upload_all_but_context(&app).await;
    assert_eq!(json(&app, "/fc/mapper/growth_chart").await.0, 200);
    // No context at all: 404.
    assert_eq!(json(&app, "/fc/mapper/unknown").await.0, 404);
}

async fn upload_all_but_context(app: &TestApp) {
    let r = upload(
        app,
        "/opt/Growth%20chart",
        "application/xml",
        fixture("growth_chart.opt"),
    )
    .await;
    assert_eq!(r.status(), 200);
    for (name, file) in [
        ("OBSERVATION.height.v2", "height.model.yml"),
        ("OBSERVATION.body_weight.v2", "weight.model.yml"),
        ("height-ext-add", "height.ext-add.yml"),
        ("height-ext-append", "height.ext-append.yml"),
        ("height-ext-overwrite", "height.ext-overwrite.yml"),
    ] {
        let r = upload(
            app,
            &format!("/fc/model/{name}"),
            "application/yaml",
            fixture(file),
        )
        .await;
        assert_eq!(r.status(), 200, "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hundred_concurrent_cold_requests_compile_once() {
    let app = spawn_app().await;
    upload_all(&app).await;
    // Hold each load open so every request arrives while the first compile is in flight.
    app.node.set_load_hook(Some(Arc::new(|_, _| {
        Box::pin(tokio::time::sleep(std::time::Duration::from_millis(200)))
    })));
    let compiles = app.stats(CacheName::Mapper).await.stats.loads;
    let reqs: Vec<_> = (0..200)
        .map(|_| {
            let (c, u) = (app.client.clone(), app.url("/fc/mapper/growth_chart"));
            tokio::spawn(async move { c.get(u).send().await.unwrap().status().as_u16() })
        })
        .collect();
    for r in reqs {
        assert_eq!(r.await.unwrap(), 200);
    }
    assert_eq!(app.stats(CacheName::Mapper).await.stats.loads, compiles + 1);
}

/// The index path of the deepest helper of `t` (the first one found at that depth).
fn deepest(t: &HelperTree) -> Vec<usize> {
    fn walk(h: &[Arc<Helper>], here: &mut Vec<usize>, best: &mut Vec<usize>) {
        for (i, c) in h.iter().enumerate() {
            here.push(i);
            if here.len() > best.len() {
                *best = here.clone();
            }
            walk(c.children(), here, best);
            here.pop();
        }
    }
    let mut best = Vec::new();
    walk(t.roots(), &mut Vec::new(), &mut best);
    best
}

#[tokio::test]
async fn every_use_of_the_helpers_gets_an_isolated_copy() {
    let app = spawn_app().await;
    upload_all(&app).await;
    let copy = || app.node.helpers_copy("default", "growth_chart");
    let mut mine = copy().await.unwrap();
    let theirs = copy().await.unwrap();
    let cached = app.node.helpers("default", "growth_chart").await.unwrap();
    let snapshot = (*cached).clone();

    // A deep node: its state and a field change in `mine` only.
    let path = deepest(&mine);
    assert!(
        path.len() >= 2,
        "the growth chart has nested helpers: {path:?}"
    );
    let node = mine.get_mut(&path).unwrap();
    node.state_mut()
        .insert("request".into(), serde_json::json!("mine"));
    node.set_fhir_path(Some("changed"));
    mine.get_mut(&path[..1])
        .unwrap()
        .state_mut()
        .insert("seen".into(), serde_json::json!(true));

    let again = copy().await.unwrap();
    assert_eq!(
        theirs, again,
        "the cached tree and other copies are untouched"
    );
    assert_eq!(*cached, snapshot, "the cached tree is untouched");
    assert_eq!(
        *app.node.helpers("default", "growth_chart").await.unwrap(),
        snapshot
    );
    for t in [&theirs, &again, &*cached] {
        assert!(t.iter().all(|h| h.state().is_empty()));
        assert_ne!(t.get(&path).unwrap().fhir_path(), Some("changed"));
    }
    assert_eq!(mine.get(&path).unwrap().state()["request"], "mine");
    assert_ne!(mine, again);

    // The sharing: copies that wrote nothing share the cached tree's nodes; `mine` copied the
    // nodes on the path to the node it wrote, and shares everything off that path.
    for t in [&theirs, &again] {
        assert!(std::ptr::eq(t.roots(), cached.roots()));
    }
    let (mut m, mut c): (&[Arc<Helper>], &[Arc<Helper>]) = (mine.roots(), cached.roots());
    for &step in &path {
        assert_eq!(m.len(), c.len());
        for i in 0..m.len() {
            assert_eq!(
                Arc::ptr_eq(&m[i], &c[i]),
                i != step,
                "only the node on the path is copied (index {i} at step {step} of {path:?})"
            );
        }
        (m, c) = (m[step].children(), c[step].children());
    }
    // Below the written node, its children (if any) are still shared.
    for (a, b) in m.iter().zip(c) {
        assert!(Arc::ptr_eq(a, b));
    }
}

/// `GET /fc/helpers/{id}` answers the bytes it answered before the tree's nodes were shared
/// (`tests/fixtures/growth_chart.helpers.json` was written by the owned tree).
#[tokio::test]
async fn the_helpers_json_is_byte_for_byte_what_it_was() {
    let app = spawn_app().await;
    upload_all(&app).await;
    let r = app
        .client
        .get(app.url("/fc/helpers/growth_chart"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body = r.text().await.unwrap();
    assert_eq!(body, fixture("growth_chart.helpers.json").trim_end());
}

#[tokio::test]
async fn broken_fhir_connect_files_report_every_field() {
    let app = spawn_app().await;
    let r = upload(
        &app,
        "/fc/model/x",
        "application/yaml",
        fixture("broken/many-errors.yml"),
    )
    .await;
    let status = r.status().as_u16();
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(status, 400, "{body}");
    assert!(
        body.as_array().unwrap().len() >= 2,
        "every error at once, openFHIR's array of messages: {body}"
    );
    let n: i64 = app
        .sql()
        .await
        .query_one("SELECT count(*) FROM fhir_connect_model", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0, "nothing written");
}

/// The eviction-wins guard for compiled artifacts: a compile pauses after it read its inputs, a
/// model is updated meanwhile, the compile is released; the stale index is never served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_update_during_a_compile_wins() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use tokio::sync::Notify;
    let app = spawn_app().await;
    upload_all(&app).await;
    let (_, original) = json(&app, "/fc/mapper/growth_chart").await;
    let before = weight_mappings(&original);
    app.node
        .caches()
        .mapper
        .evict_key("default", Some("growth_chart"))
        .await;
    let (paused, release) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let armed = Arc::new(AtomicBool::new(true));
    {
        let (paused, release, armed) = (paused.clone(), release.clone(), armed.clone());
        app.node.set_load_hook(Some(Arc::new(move |cache, _| {
            let pause = cache == CacheName::Mapper && armed.swap(false, Ordering::SeqCst);
            let (paused, release) = (paused.clone(), release.clone());
            Box::pin(async move {
                if pause {
                    paused.notify_one();
                    release.notified().await;
                }
            })
        })));
    }
    let slow = {
        let (c, u) = (app.client.clone(), app.url("/fc/mapper/growth_chart"));
        tokio::spawn(async move {
            c.get(u)
                .send()
                .await
                .unwrap()
                .json::<serde_json::Value>()
                .await
                .unwrap()
        })
    };
    paused.notified().await;
    let r = add_a_weight_mapping(&app).await;
    assert_eq!(r.status(), 200);
    release.notify_one();
    let first = slow.await.unwrap();
    let (_, next) = json(&app, "/fc/mapper/growth_chart").await;
    assert_eq!(
        weight_mappings(&first),
        before + 1,
        "the paused request did not serve the stale index"
    );
    assert_eq!(
        weight_mappings(&next),
        before + 1,
        "the stale index was not cached"
    );
    // The compile that read the old model was not cached: a second compile ran.
    assert!(app.stats(CacheName::Mapper).await.stats.loads >= 2);
}

#[tokio::test]
async fn a_failed_compile_is_not_cached() {
    let app = spawn_app().await;
    let r = upload(
        &app,
        "/fc/context/Growth%20chart",
        "application/yaml",
        fixture("growth_chart.context.yml"),
    )
    .await;
    assert_eq!(r.status(), 200);
    let before = app.stats(CacheName::Mapper).await.stats;
    assert_eq!(json(&app, "/fc/mapper/growth_chart").await.0, 422);
    assert_eq!(json(&app, "/fc/mapper/growth_chart").await.0, 422);
    let after = app.stats(CacheName::Mapper).await.stats;
    assert_eq!(
        after.loads,
        before.loads + 2,
        "each request compiled again: nothing was cached"
    );
    assert_eq!(after.hits, before.hits);
}
