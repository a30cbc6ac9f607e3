//! Embedding without HTTP: `app::start_embedded` and `examples/embedded.rs`.
//!
//! The example's own code is compiled into this test (`#[path]`), and its [`example::run`] is
//! called against a throwaway database: what `cargo run --example embedded` does, minus reading
//! the configuration from the process environment. (`cargo test` also builds the example binary,
//! and `cargo clippy --all-targets` lints it.) Running the built example as a child process
//! instead would need its path, which Cargo gives only for `[[bin]]` targets, or a nested
//! `cargo run`, which waits on the build lock the running `cargo test` holds.

use crate::common;

#[allow(dead_code)] // its `main` is not used here
#[path = "../../examples/embedded.rs"]
mod example;

use common::pg::TestDb;
use common::{opt_xml, spawn_url, test_config, unique_tag, wait_for, TestApp};
use openfhir_cache::app::{self, ServeOptions};
use openfhir_cache::cluster::PeerState;
use openfhir_cache::node::Put;

#[tokio::test]
async fn the_example_writes_reads_compiles_and_shuts_down() {
    let db = TestDb::new().await;
    let s = example::run(test_config(&db.url, &[]))
        .await
        .expect("the example runs");
    assert_eq!(s.template_id, "growth_chart", "{s:?}");
    assert!(s.opt_created, "{s:?}");
    assert!(s.opt_round_trip, "{s:?}");
    assert!(s.template_nodes > 10, "{s:?}");
    // Two reads: one database load, then a cache hit.
    assert_eq!((s.opt_loads, s.opt_hits), (1, 1), "{s:?}");
    assert_eq!(
        s.mapper_models,
        ["OBSERVATION.body_weight.v2", "OBSERVATION.height.v2"],
        "{s:?}"
    );
    assert_eq!(
        s.merged_extensions,
        [
            "height-ext-add",
            "height-ext-append",
            "height-ext-overwrite"
        ],
        "{s:?}"
    );
    assert!(s.helpers > 0 && s.helpers_resolved > 0, "{s:?}");
    assert!(s.cluster_addr.is_some(), "the cluster channel ran: {s:?}");

    // Everything is in PostgreSQL, in the example's tenant.
    let sql = db.connect().await;
    for (table, n) in [
        ("opt", 1),
        ("fhir_connect_context", 1),
        ("fhir_connect_model", 5),
    ] {
        let count: i64 = sql
            .query_one(
                &format!("SELECT count(*) FROM {table} WHERE tenant = $1"),
                &[&example::TENANT],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(count, n, "{table}");
    }

    // A second run replaces what the first wrote (a new node id, a later transaction).
    let again = example::run(test_config(&db.url, &[])).await.unwrap();
    assert!(!again.opt_created, "{again:?}");
    assert!(again.opt_xid > s.opt_xid, "{again:?} after {s:?}");
    assert_ne!(again.node_id, s.node_id);
}

/// Cluster settings on 127.0.31.x:7800 (this test's own addresses), TCP discovery, 1 s
/// heartbeats (a silent peer is gone only after 10 s) and the database channels off, so only
/// the peer channel can invalidate.
fn member_env<'a>(name: &'a str, ip: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("CLUSTER_NAME", name),
        ("CLUSTER_BIND_ADDR", ip),
        ("CLUSTER_PORT", "7800"),
        ("CLUSTER_DISCOVERY", "TCP"),
        ("CLUSTER_INITIAL_HOSTS", "127.0.31.2[7800],127.0.31.3[7800]"),
        ("CLUSTER_HEARTBEAT_MS", "1000"),
        ("OPENFHIR_PG_NOTIFY", "false"),
        ("OPENFHIR_CATCHUP_INTERVAL_MS", "0"),
    ]
}

fn connected(node: &openfhir_cache::Node) -> bool {
    node.cluster()
        .peers()
        .iter()
        .any(|p| p.state == PeerState::Alive && p.inbound && p.outbound)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_embedded_node_is_a_full_cluster_member() {
    let db = TestDb::new().await;
    let name = format!("e{:x}", unique_tag());
    let http: TestApp = spawn_url(&db.url, &member_env(&name, "127.0.31.2")).await;
    let embedded = app::start_embedded(
        test_config(&db.url, &member_env(&name, "127.0.31.3")),
        ServeOptions::default(),
    )
    .await
    .expect("the embedded node starts");
    assert!(
        wait_for(10, || connected(&http.node) && connected(&embedded.node)).await,
        "not connected: {:#}",
        http.cluster_json().await["cluster"]
    );

    // The HTTP node caches version one.
    assert_eq!(
        http.put_opt("growth", &opt_xml("growth", "version-one"))
            .await,
        200
    );
    assert!(http.get_text("/opt/growth").await.contains("version-one"));

    // A write through the embedded node evicts it there, over the peer channel alone.
    embedded
        .node
        .put_opt(
            "default",
            &opt_xml("growth", "version-two"),
            Put::At("growth"),
        )
        .await
        .unwrap();
    let (ok, body) = http
        .eventually("/opt/growth", |s, b| s == 200 && b.contains("version-two"))
        .await;
    assert!(ok, "the HTTP node still serves: {body}");

    // Shutting the embedded node down says goodbye: "left" only comes from a Leave message
    // (without it the peer would be suspect, and gone after 10 s).
    let id = embedded.node.id().to_string();
    embedded.shutdown().await;
    let left = || {
        http.node
            .cluster()
            .peers()
            .iter()
            .any(|p| p.node_id == id && p.state == PeerState::Left)
    };
    assert!(
        wait_for(5, left).await,
        "{:#}",
        http.cluster_json().await["cluster"]["peers"]
    );
    http.stop().await;
}
