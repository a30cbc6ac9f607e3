//! openFHIR's bootstrap directory against real nodes and PostgreSQL: three nodes started at once
//! load each file exactly once, a restart loads nothing again, a changed file is loaded again and
//! reaches the running peers, a broken file is refused alone, recursion can be switched off, and
//! a missing directory is only a log line.

use crate::common;

use std::path::Path;
use std::time::Duration;

use common::pg::TestDb;
use common::{spawn_url, unique_tag, TestApp};
use openfhir_cache::bootstrap::Summary;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");

/// A bootstrap directory as a deployment mounts it: an OPT, a context, two models, three
/// extensions (one in a sub-folder, with another model), a broken model and a file no rule
/// matches.
fn bootstrap_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    std::fs::create_dir_all(p.join("extensions")).unwrap();
    for (from, to) in [
        ("growth_chart.opt", "Growth chart.opt"),
        ("growth_chart.context.yml", "growth-chart.context.yml"),
        ("height.model.yml", "height.model.yml"),
        ("weight.model.yml", "weight.model.yml"),
        ("height.ext-add.yml", "height.ext-add.yml"),
        ("height.ext-append.yml", "extensions/height.ext-append.yml"),
        (
            "height.ext-overwrite.yml",
            "extensions/height.ext-overwrite.yaml",
        ),
        ("device_details.model.yml", "extensions/device.yml"),
        ("broken/mapping-without-name.yml", "broken.yml"),
        ("openfhir/README.md", "README.md"),
    ] {
        std::fs::copy(format!("{FIXTURES}/{from}"), p.join(to)).unwrap();
    }
    dir
}

fn node_env(dir: &Path, name: &str, ip: &str, hosts: &str) -> Vec<(String, String)> {
    vec![
        ("OPENFHIR_BOOTSTRAP_DIR".into(), dir.display().to_string()),
        ("CLUSTER_NAME".into(), name.into()),
        ("CLUSTER_BIND_ADDR".into(), ip.into()),
        ("CLUSTER_PORT".into(), "7800".into()),
        ("CLUSTER_DISCOVERY".into(), "TCP".into()),
        ("CLUSTER_INITIAL_HOSTS".into(), hosts.into()),
        ("CLUSTER_HEARTBEAT_MS".into(), "100".into()),
    ]
}

async fn start(db_url: &str, env: &[(String, String)]) -> TestApp {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    spawn_url(db_url, &env).await
}

/// Waits for the node's bootstrap run to end; its summary (`None`: nothing to load).
async fn summary(app: &TestApp) -> Option<Summary> {
    tokio::time::timeout(Duration::from_secs(60), app.bootstrap().finished())
        .await
        .expect("the bootstrap run ends")
        .expect("the bootstrap run succeeds")
}

async fn count(app: &TestApp, table: &str) -> i64 {
    app.sql()
        .await
        .query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_nodes_started_at_once_load_each_file_once_and_restarts_load_nothing() {
    let dir = bootstrap_dir();
    let db = TestDb::new().await;
    let name = format!("b{:x}", unique_tag());
    let hosts = "127.0.72.1[7800],127.0.72.2[7800],127.0.72.3[7800]";
    let envs: Vec<_> = ["127.0.72.1", "127.0.72.2", "127.0.72.3"]
        .iter()
        .map(|ip| node_env(dir.path(), &name, ip, hosts))
        .collect();
    let (a, b, c) = tokio::join!(
        start(&db.url, &envs[0]),
        start(&db.url, &envs[1]),
        start(&db.url, &envs[2])
    );
    let summaries = [
        summary(&a).await.unwrap(),
        summary(&b).await.unwrap(),
        summary(&c).await.unwrap(),
    ];
    // Eight loadable files; exactly one node created each artifact, the others found them loaded.
    assert_eq!(
        summaries.iter().map(|s| s.created).sum::<usize>(),
        8,
        "{summaries:?}"
    );
    assert_eq!(
        summaries.iter().map(|s| s.replaced).sum::<usize>(),
        0,
        "{summaries:?}"
    );
    for s in &summaries {
        assert_eq!(s.loaded() + s.unchanged, 8, "{s:?}");
        assert_eq!(
            s.refused, 1,
            "the broken file, retried by every node: {s:?}"
        );
        assert_eq!(s.ignored, 1, "README.md: {s:?}");
    }
    assert_eq!(count(&a, "opt").await, 1);
    assert_eq!(count(&a, "fhir_connect_context").await, 1);
    assert_eq!(count(&a, "fhir_connect_model").await, 6);
    assert_eq!(
        count(&a, "openfhir_bootstrap").await,
        8,
        "the broken file is not recorded"
    );
    // Every node serves it all and compiles its mapper.
    for n in [&a, &b, &c] {
        assert!(n
            .get_text("/opt/growth_chart")
            .await
            .contains("Growth chart"));
        let m: serde_json::Value =
            serde_json::from_str(&n.get_text("/fc/mapper/growth_chart").await).unwrap();
        assert_eq!(m["mergedExtensions"].as_array().unwrap().len(), 3, "{m}");
        let ready = n.client.get(n.url("/health/ready")).send().await.unwrap();
        assert_eq!(
            ready.status(),
            200,
            "a refused file does not hold readiness back"
        );
    }

    // A restart loads nothing again, and writes nothing.
    let log_before = count(&a, "openfhir_invalidation_log").await;
    c.stop().await;
    let c = start(&db.url, &envs[2]).await;
    let s = summary(&c).await.unwrap();
    assert_eq!((s.loaded(), s.unchanged, s.refused), (0, 8, 1), "{s:?}");
    assert_eq!(count(&a, "openfhir_invalidation_log").await, log_before);

    // A changed file is loaded again at the next start, and the running peers serve it.
    let weight = a.get_text("/fc/mapper/growth_chart").await;
    let before: serde_json::Value = serde_json::from_str(&weight).unwrap();
    let mappings = before["models"]["OBSERVATION.body_weight.v2"]["mappings"]
        .as_u64()
        .unwrap();
    let changed = std::fs::read_to_string(dir.path().join("weight.model.yml"))
        .unwrap()
        .replacen(
            "\nmappings:\n",
            "\nmappings:\n  - name: note\n    with:\n      fhir: \"$resource.note\"\n      openehr: \"$archetype/data[at0002]\"\n",
            1,
        );
    std::fs::write(dir.path().join("weight.model.yml"), changed).unwrap();
    c.stop().await;
    let c = start(&db.url, &envs[2]).await;
    let s = summary(&c).await.unwrap();
    assert_eq!((s.replaced, s.created, s.unchanged), (1, 0, 7), "{s:?}");
    for n in [&a, &b] {
        let (ok, body) = n
            .eventually("/fc/mapper/growth_chart", |status, body| {
                status == 200
                    && serde_json::from_str::<serde_json::Value>(body).is_ok_and(|m| {
                        m["models"]["OBSERVATION.body_weight.v2"]["mappings"].as_u64()
                            == Some(mappings + 1)
                    })
            })
            .await;
        assert!(ok, "{} still serves the old mapper: {body}", n.base);
    }
    assert_eq!(
        count(&a, "fhir_connect_model").await,
        6,
        "replaced, not added"
    );
}

#[tokio::test]
async fn without_recursion_sub_folders_are_not_read() {
    let dir = bootstrap_dir();
    let db = TestDb::new().await;
    let mut env = node_env(
        dir.path(),
        &format!("r{:x}", unique_tag()),
        "127.0.0.1",
        "127.0.0.1[0]",
    );
    env.retain(|(k, _)| !k.starts_with("CLUSTER_"));
    env.push((
        "OPENFHIR_BOOTSTRAP_RECURSIVELY_OPEN_DIRECTORIES".into(),
        "false".into(),
    ));
    let app = start(&db.url, &env).await;
    let s = summary(&app).await.unwrap();
    assert_eq!(s.created, 5, "{s:?}");
    assert_eq!(s.ignored, 2, "README.md and the folder: {s:?}");
    assert_eq!(count(&app, "fhir_connect_model").await, 3);
}

#[tokio::test]
async fn a_missing_directory_loads_nothing_and_the_node_serves() {
    let db = TestDb::new().await;
    let env = vec![(
        "OPENFHIR_BOOTSTRAP_DIR".to_string(),
        "/nonexistent/openfhir-bootstrap".to_string(),
    )];
    let app = start(&db.url, &env).await;
    assert_eq!(summary(&app).await, None);
    let ready = app
        .client
        .get(app.url("/health/ready"))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
    assert_eq!(count(&app, "opt").await, 0);
}
