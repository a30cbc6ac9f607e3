//! Cache semantics against real PostgreSQL: TTL modes, no query on a hit, one load for many
//! concurrent cold reads, evictions on writes, the eviction-vs-load race, and failed loads.

use crate::common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{context_yaml, opt_xml, spawn_app, spawn_with, test_config};
use openfhir_cache::app::{self, ServeOptions};
use openfhir_cache::cache::CacheName;
use openfhir_cache::node::LoadHook;
use tokio::sync::Notify;

/// Changes an OPT's concept straight in SQL, behind the node's back (no eviction).
async fn sql_set_marker(app: &common::TestApp, id: &str, marker: &str) {
    let xml = opt_xml("Growth chart", marker);
    let n = app
        .sql()
        .await
        .execute(
            "UPDATE opt SET content = $1 WHERE tenant = 'default' AND template_id = $2",
            &[&xml, &id],
        )
        .await
        .unwrap();
    assert_eq!(n, 1);
}

/// The database invalidation channels off, so only TTL and explicit eviction act.
const NO_DB_CHANNELS: [(&str, &str); 2] = [
    ("OPENFHIR_PG_NOTIFY", "false"),
    ("OPENFHIR_CATCHUP_INTERVAL_MS", "0"),
];

#[tokio::test]
async fn infinite_ttl_serves_from_memory_until_evicted() {
    let app = spawn_with(&NO_DB_CHANNELS).await;
    assert_eq!(
        app.put_opt("Growth chart", &opt_xml("Growth chart", "v1"))
            .await,
        200
    );
    assert!(app.get_text("/opt/growth_chart").await.contains("v1"));
    let loads = app.stats(CacheName::Opt).await.stats.loads;
    for _ in 0..20 {
        assert!(app.get_text("/opt/Growth%20chart").await.contains("v1"));
    }
    let s = app.stats(CacheName::Opt).await;
    assert_eq!(s.stats.loads, loads, "cached reads make no database query");
    assert!(s.stats.hits >= 20);
    assert_eq!(s.ttl, -1);

    // With the database channels off, a change behind the node's back is not seen: TTL -1
    // never expires...
    sql_set_marker(&app, "growth_chart", "v2").await;
    assert!(app.get_text("/opt/growth_chart").await.contains("v1"));
    // ...until an explicit eviction.
    let r = app
        .req(reqwest::Method::POST, "/caches/evict")
        .json(&serde_json::json!({"group": "opt", "tenant": "default", "key": "Growth chart"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(app.get_text("/opt/growth_chart").await.contains("v2"));
    assert_eq!(app.stats(CacheName::Opt).await.stats.loads, loads + 1);
}

#[tokio::test]
async fn ttl_zero_goes_to_the_database_every_time() {
    let app = spawn_with(&[("OPENFHIR_CACHE_OPT_TTL", "0")]).await;
    assert_eq!(
        app.put_opt("Growth chart", &opt_xml("Growth chart", "v1"))
            .await,
        200
    );
    for i in 1..=5 {
        assert!(app.get_text("/opt/growth_chart").await.contains("v1"));
        assert_eq!(app.stats(CacheName::Opt).await.stats.loads, i);
    }
    sql_set_marker(&app, "growth_chart", "v2").await;
    assert!(
        app.get_text("/opt/growth_chart").await.contains("v2"),
        "no cache: SQL change seen at once"
    );
    let s = app.stats(CacheName::Opt).await;
    assert_eq!((s.ttl, s.stats.entries, s.stats.hits), (0, 0, 0));
    // The other groups keep their default.
    assert_eq!(app.stats(CacheName::Context).await.ttl, -1);
    assert_eq!(app.stats(CacheName::Tenant).await.ttl, -1);
}

#[tokio::test]
async fn ttl_n_expires_after_write() {
    let app = spawn_with(&[
        ("OPENFHIR_CACHE_OPT_TTL", "2"),
        NO_DB_CHANNELS[0],
        NO_DB_CHANNELS[1],
    ])
    .await;
    assert_eq!(
        app.put_opt("Growth chart", &opt_xml("Growth chart", "v1"))
            .await,
        200
    );
    assert!(app.get_text("/opt/growth_chart").await.contains("v1"));
    sql_set_marker(&app, "growth_chart", "v2").await;
    // Within the TTL the cached value is served: this read follows the load by milliseconds.
    assert!(app.get_text("/opt/growth_chart").await.contains("v1"));
    assert_eq!(app.stats(CacheName::Opt).await.stats.loads, 1);
    // After it, the entry has expired and the next read reloads.
    let reloaded = wait_for_marker(&app, "v2").await;
    assert!(reloaded, "the entry expired and was reloaded");
    // The reload restarted the clock: a change right after it is not seen until the new TTL ends.
    sql_set_marker(&app, "growth_chart", "v3").await;
    assert!(app.get_text("/opt/growth_chart").await.contains("v2"));
    assert!(wait_for_marker(&app, "v3").await);
    let s = app.stats(CacheName::Opt).await;
    assert_eq!(s.ttl, 2);
    assert_eq!(s.stats.loads, 3, "one load per TTL period: {:?}", s.stats);
    assert!(s.stats.expirations >= 1, "{:?}", s.stats);
}

/// Polls (bounded, ~10 s) until the OPT's concept is `marker`.
async fn wait_for_marker(app: &common::TestApp, marker: &str) -> bool {
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if app.get_text("/opt/growth_chart").await.contains(marker) {
            return true;
        }
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_cold_reads_load_once() {
    let app = spawn_app().await;
    assert_eq!(
        app.put_opt("Growth chart", &opt_xml("Growth chart", "v1"))
            .await,
        200
    );
    let ctx = context_yaml("Growth chart", "1");
    let r = app
        .req(reqwest::Method::POST, "/fc/context")
        .header("content-type", "application/yaml")
        .body(ctx)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // The writes evicted the keys; make sure nothing is cached yet.
    assert!(
        !app.node
            .caches()
            .opt
            .contains("default", Some("growth_chart"))
            .await
    );
    // Every load is held open for 200 ms after its database read, so all 200 readers arrive
    // while the first load is still in flight: they must wait for it, not start their own.
    app.node.set_load_hook(Some(Arc::new(|_, _| {
        Box::pin(tokio::time::sleep(Duration::from_millis(200)))
    })));
    let before = app.stats(CacheName::Opt).await.stats.loads;
    let ctx_before = app.stats(CacheName::Context).await.stats.loads;
    let barrier = Arc::new(tokio::sync::Barrier::new(200));
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let node = app.node.clone();
            let barrier = barrier.clone();
            tokio::spawn(async move {
                barrier.wait().await;
                if i % 2 == 0 {
                    node.opt("default", "Growth chart")
                        .await
                        .map(|o| o.template.concept.clone().unwrap())
                } else {
                    node.context("default", "growth_chart")
                        .await
                        .map(|c| c.id.clone())
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert_eq!(app.stats(CacheName::Opt).await.stats.loads, before + 1);
    assert_eq!(
        app.stats(CacheName::Context).await.stats.loads,
        ctx_before + 1
    );

    // Through HTTP too: 200 concurrent cold GETs, one load.
    app.node
        .caches()
        .opt
        .evict_key("default", Some("growth_chart"))
        .await;
    let before = app.stats(CacheName::Opt).await.stats.loads;
    let reqs: Vec<_> = (0..200)
        .map(|_| {
            let (client, url) = (app.client.clone(), app.url("/opt/growth_chart"));
            tokio::spawn(async move { client.get(url).send().await.unwrap().status().as_u16() })
        })
        .collect();
    for r in reqs {
        assert_eq!(r.await.unwrap(), 200);
    }
    assert_eq!(app.stats(CacheName::Opt).await.stats.loads, before + 1);
}

#[tokio::test]
async fn api_writes_evict_what_they_changed() {
    let app = spawn_app().await;
    assert_eq!(
        app.put_opt("Growth chart", &opt_xml("Growth chart", "v1"))
            .await,
        200
    );
    assert!(app.get_text("/opt/growth_chart").await.contains("v1"));
    assert_eq!(
        app.put_opt("Growth chart", &opt_xml("Growth chart", "v2"))
            .await,
        200
    );
    assert!(app.get_text("/opt/growth_chart").await.contains("v2"));

    // Context: the single entry and the tenant's list are both evicted.
    let put_ctx = |marker: &'static str| {
        app.req(reqwest::Method::PUT, "/fc/context/Growth%20chart")
            .header("content-type", "application/yaml")
            .body(context_yaml("Growth chart", marker))
            .send()
    };
    assert_eq!(put_ctx("1").await.unwrap().status(), 200);
    let one = app.get_text("/fc/context/growth_chart").await;
    let all = app.get_text("/fc/context").await;
    assert!(
        one.contains("\"1\"") && all.contains("\"1\""),
        "{one} {all}"
    );
    assert_eq!(put_ctx("2").await.unwrap().status(), 200);
    assert!(app
        .get_text("/fc/context/growth_chart")
        .await
        .contains("\"2\""));
    assert!(app.get_text("/fc/context").await.contains("\"2\""));

    // Deletes evict too.
    let r = app
        .req(reqwest::Method::DELETE, "/opt/growth_chart")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let r = app
        .client
        .get(app.url("/opt/growth_chart"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);

    // Tenant record: update is visible at once.
    let r = app
        .req(reqwest::Method::PUT, "/tenants/acme")
        .json(&serde_json::json!({"name": "Acme", "config": {"tier": 1}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    assert!(app.get_text("/tenants/acme").await.contains("\"tier\":1"));
    let r = app
        .req(reqwest::Method::PUT, "/tenants/acme")
        .json(&serde_json::json!({"name": "Acme", "config": {"tier": 2}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(app.get_text("/tenants/acme").await.contains("\"tier\":2"));
}

/// The race the issue names: a load reads the old value and pauses; meanwhile a new value is
/// committed and evicted; the load is released. The stale value must never be served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eviction_during_an_in_flight_load_wins() {
    let app = spawn_app().await;
    assert_eq!(
        app.put_opt("Growth chart", &opt_xml("Growth chart", "old"))
            .await,
        200
    );

    let read_done = Arc::new(Notify::new());
    let release = Arc::new(Notify::new());
    let armed = Arc::new(AtomicBool::new(true));
    let hook: LoadHook = {
        let (read_done, release, armed) = (read_done.clone(), release.clone(), armed.clone());
        Arc::new(move |cache, _key| {
            let pause = cache == CacheName::Opt && armed.swap(false, Ordering::SeqCst);
            let (read_done, release) = (read_done.clone(), release.clone());
            Box::pin(async move {
                if pause {
                    read_done.notify_one();
                    release.notified().await;
                }
            })
        })
    };
    app.node.set_load_hook(Some(hook));

    // A cold read: its loader reads "old" from PostgreSQL, then pauses.
    let slow = {
        let (client, url) = (app.client.clone(), app.url("/opt/growth_chart"));
        tokio::spawn(async move { client.get(url).send().await.unwrap().text().await.unwrap() })
    };
    read_done.notified().await;

    // A new value is committed and evicted while that load is in flight.
    assert_eq!(
        app.put_opt("Growth chart", &opt_xml("Growth chart", "new"))
            .await,
        200
    );

    release.notify_one();
    let first = slow.await.unwrap();
    assert!(
        first.contains("new"),
        "the paused read did not serve the stale value: {first}"
    );
    for _ in 0..3 {
        let next = app.get_text("/opt/growth_chart").await;
        assert!(next.contains("new") && !next.contains("old"), "{next}");
    }
    assert!(
        app.node
            .caches()
            .opt
            .contains("default", Some("growth_chart"))
            .await
    );
}

/// A failed load (database down) is not cached: 503 with a clear message, the next request
/// retries; entries already cached keep being served meanwhile.
#[tokio::test]
async fn database_down_is_503_and_not_cached() {
    let server = common::pg::PrivateServer::new();
    let config = test_config(&server.url(), &[]);
    let running = app::start(config, ServeOptions::default()).await.unwrap();
    let base = format!("http://{}", running.addr);
    let client = reqwest::Client::new();
    let put = |id: &str| {
        client
            .put(format!("{base}/opt/{id}"))
            .header("content-type", "application/xml")
            .body(opt_xml(id, "v1"))
            .send()
    };
    assert_eq!(put("cached").await.unwrap().status(), 200);
    assert_eq!(put("uncached").await.unwrap().status(), 200);
    assert_eq!(
        client
            .get(format!("{base}/opt/cached"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    server.stop();
    let r = client
        .get(format!("{base}/opt/uncached"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    let body: serde_json::Value = r.json().await.unwrap();
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("database unavailable"),
        "{body}"
    );
    assert_eq!(
        client
            .get(format!("{base}/opt/cached"))
            .send()
            .await
            .unwrap()
            .status(),
        200,
        "cached entries are still served while the database is away"
    );
    let ready = client
        .get(format!("{base}/health/ready"))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 503);
    let failures = running.node.caches().report().await[0].stats.load_failures;
    assert!(failures >= 1);

    server.start();
    let mut ok = false;
    for _ in 0..50 {
        if client
            .get(format!("{base}/opt/uncached"))
            .send()
            .await
            .unwrap()
            .status()
            == 200
        {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ok, "the next request after the database is back succeeds");
    running.shutdown().await.unwrap();
}
