//! Shared helpers of the integration tests: a real node (library code, real HTTP server on
//! port 0) against its own fresh PostgreSQL database, and fixture builders.
#![allow(dead_code)]

pub mod dns;
pub mod pg;
pub mod proc;

use std::collections::HashMap;
use std::sync::Arc;

use openfhir_cache::app::{self, Running, ServeOptions};
use openfhir_cache::cache::{CacheName, CacheReport};
use openfhir_cache::{Config, Node};
use pg::TestDb;

/// A node under test with its database.
pub struct TestApp {
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    /// The node's store (statistics, hooks).
    pub node: Arc<Node>,
    /// HTTP client.
    pub client: reqwest::Client,
    /// The database URL.
    pub db_url: String,
    /// The database, when this app owns it (dropped with the app).
    pub db: Option<TestDb>,
    running: Option<Running>,
}

/// Starts a node on a fresh database with the default configuration.
pub async fn spawn_app() -> TestApp {
    spawn_with(&[]).await
}

/// Starts a node on a fresh database with extra environment settings.
pub async fn spawn_with(env: &[(&str, &str)]) -> TestApp {
    let db = TestDb::new().await;
    spawn_on(db, env).await
}

/// Starts a node on the given database (several nodes may share one).
pub async fn spawn_on(db: TestDb, env: &[(&str, &str)]) -> TestApp {
    let mut app = spawn_url(&db.url, env).await;
    app.db = Some(db);
    app
}

/// Starts a node on a database another app owns (a second node of the same cluster).
pub async fn spawn_url(db_url: &str, env: &[(&str, &str)]) -> TestApp {
    let config = test_config(db_url, env);
    let running = app::start(config, ServeOptions::default())
        .await
        .expect("node starts");
    TestApp {
        base: format!("http://{}", running.addr),
        node: running.node.clone(),
        client: reqwest::Client::new(),
        db_url: db_url.to_string(),
        db: None,
        running: Some(running),
    }
}

/// The configuration of a test node: its database, port 0, a small pool, plus `env`.
/// Cluster settings that keep a test node to itself: loopback, any free port, its own cluster
/// name and multicast port (so parallel tests never see each other's announcements).
pub fn isolated_cluster_env() -> Vec<(String, String)> {
    let tag = unique_tag();
    let port = 20000 + (tag % 40000) as u16;
    vec![
        ("CLUSTER_BIND_ADDR".into(), "127.0.0.1".into()),
        ("CLUSTER_PORT".into(), "0".into()),
        ("CLUSTER_NAME".into(), format!("test-{tag:x}")),
        (
            "CLUSTER_MULTICAST_ADDR".into(),
            format!("239.255.78.1:{port}"),
        ),
    ]
}

/// A number unique to this call in this machine's recent history (pid, counter and clock).
pub fn unique_tag() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as u64)
        .unwrap_or(0);
    (u64::from(std::process::id()) << 20) ^ (n << 8) ^ t
}

pub fn test_config(db_url: &str, env: &[(&str, &str)]) -> Config {
    let mut map: HashMap<String, String> = HashMap::from([
        ("DATABASE_URL".into(), db_url.to_string()),
        ("OPENFHIR_HTTP_ADDR".into(), "127.0.0.1:0".into()),
        ("OPENFHIR_DB_POOL_SIZE".into(), "8".into()),
        // No bootstrap directory unless a test gives one (a machine may have /app/bootstrap/).
        ("OPENFHIR_BOOTSTRAP_DIR".into(), String::new()),
    ]);
    map.extend(isolated_cluster_env());
    for (k, v) in env {
        map.insert(k.to_string(), v.to_string());
    }
    Config::from_sources(None, |k| map.get(k).cloned()).expect("valid test config")
}

impl TestApp {
    /// A full URL for `path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// A request builder for `method path`.
    pub fn req(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.client.request(method, self.url(path))
    }

    /// `PUT /opt/{id}` with XML in the default tenant; returns the status.
    pub async fn put_opt(&self, template_id: &str, xml: &str) -> u16 {
        self.req(reqwest::Method::PUT, &format!("/opt/{template_id}"))
            .header("content-type", "application/xml")
            .body(xml.to_string())
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    }

    /// `GET path` body as text, asserting 200.
    pub async fn get_text(&self, path: &str) -> String {
        let r = self.client.get(self.url(path)).send().await.unwrap();
        let status = r.status();
        let text = r.text().await.unwrap();
        assert_eq!(status, 200, "GET {path}: {text}");
        text
    }

    /// Statistics of one cache.
    pub async fn stats(&self, cache: CacheName) -> CacheReport {
        self.node
            .caches()
            .report()
            .await
            .into_iter()
            .find(|r| r.cache == cache)
            .unwrap()
    }

    /// A direct SQL connection to the node's database.
    pub async fn sql(&self) -> tokio_postgres::Client {
        let (client, conn) = tokio_postgres::connect(&self.db_url, tokio_postgres::NoTls)
            .await
            .expect("test SQL connection");
        tokio::spawn(async move {
            let _ = conn.await;
        });
        client
    }

    /// Polls `GET path` (up to ~10 s) until its body satisfies `ok`; returns the last body and
    /// whether it did.
    pub async fn eventually(&self, path: &str, ok: impl Fn(u16, &str) -> bool) -> (bool, String) {
        let mut last = String::new();
        for _ in 0..200 {
            if let Ok(r) = self.client.get(self.url(path)).send().await {
                let status = r.status().as_u16();
                last = r.text().await.unwrap_or_default();
                if ok(status, &last) {
                    return (true, last);
                }
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        (false, last)
    }

    /// Stops the node gracefully.
    pub async fn stop(mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown().await.unwrap();
        }
    }

    /// Stops the node at once, as a crash would: no goodbye to its peers.
    pub fn abort(mut self) {
        if let Some(r) = self.running.take() {
            r.abort();
        }
    }

    /// Where the node's run over the bootstrap directory is.
    pub fn bootstrap(&self) -> Arc<openfhir_cache::bootstrap::Progress> {
        self.running
            .as_ref()
            .expect("the node runs")
            .bootstrap()
            .clone()
    }

    /// The status of `GET /health/live` (is the node still serving?).
    pub async fn live_status(&self) -> u16 {
        let r = self.client.get(self.url("/health/live")).send().await;
        r.map(|r| r.status().as_u16()).unwrap_or(0)
    }

    /// `GET /cluster` as JSON.
    pub async fn cluster_json(&self) -> serde_json::Value {
        let r = self.client.get(self.url("/cluster")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        r.json().await.unwrap()
    }
}

/// A small but well-formed OPT whose `concept` carries `marker` (to tell versions apart): the
/// bench harness's fixture, so tests and benchmarks exercise the same document.
pub fn opt_xml(template_id: &str, marker: &str) -> String {
    openfhir_cache::bench::data::small_opt(template_id, marker)
}

/// A FHIR Connect context for `template_id`; `marker` goes into `metadata.version`.
pub fn context_yaml(template_id: &str, marker: &str) -> String {
    format!(
        "grammar: FHIRConnect/v1.0.0\ntype: context\nmetadata:\n  name: ctx\n  version: \"{marker}\"\nspec:\n  system: FHIR\n  version: R4\ncontext:\n  profile:\n    url: http://hl7.org/fhir/StructureDefinition/Observation\n  template:\n    id: {template_id}\n  archetypes:\n    - OBSERVATION.height.v2\n  start: OBSERVATION.height.v2\n"
    )
}

/// A FHIR Connect model named `name`; `marker` goes into `metadata.version`.
pub fn model_yaml(name: &str, marker: &str) -> String {
    format!(
        "grammar: FHIRConnect/v1.0.0\ntype: model\nmetadata:\n  name: {name}\n  version: \"{marker}\"\nspec:\n  system: FHIR\n  version: R4\n  openEhrConfig:\n    archetype: openEHR-EHR-OBSERVATION.height.v2\n  fhirConfig:\n    structureDefinition: http://hl7.org/fhir/StructureDefinition/Observation\nmappings:\n  - name: height\n    with:\n      fhir: \"$resource.value\"\n      openehr: \"$archetype/data[at0001]/events[at0002]/data[at0003]/items[at0004]/value\"\n"
    )
}

/// Polls `check` every 20 ms for up to `secs` seconds; the last result.
pub async fn wait_for(secs: u64, mut check: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while std::time::Instant::now() < deadline {
        if check() {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    check()
}
