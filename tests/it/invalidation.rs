//! The database invalidation channel against real PostgreSQL: plain-SQL changes reach every node,
//! by NOTIFY and by catch-up alone; a late commit is never skipped; the listener survives a
//! killed connection and a server restart; retention flushes a node that fell behind; and a
//! consistency token gives read-your-writes across nodes.

use crate::common;

use std::time::{Duration, Instant};

use common::{context_yaml, opt_xml, spawn_app, spawn_url, spawn_with, TestApp};

const NOTIFY_ONLY: [(&str, &str); 2] = [
    ("OPENFHIR_PG_NOTIFY", "true"),
    ("OPENFHIR_CATCHUP_INTERVAL_MS", "0"),
];
const NO_CHANNELS: [(&str, &str); 2] = [
    ("OPENFHIR_PG_NOTIFY", "false"),
    ("OPENFHIR_CATCHUP_INTERVAL_MS", "0"),
];

async fn sql_update(app: &TestApp, id: &str, marker: &str) {
    let n = app
        .sql()
        .await
        .execute(
            "UPDATE opt SET content = $1 WHERE tenant = 'default' AND template_id = $2",
            &[&opt_xml(id, marker), &id],
        )
        .await
        .unwrap();
    assert_eq!(n, 1);
}

async fn cluster(app: &TestApp) -> serde_json::Value {
    app.client
        .get(app.url("/cluster"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Waits until the node's listener is listening (it starts in the background).
async fn listening(app: &TestApp) {
    for _ in 0..200 {
        if cluster(app).await["invalidation"]["listener"] == "listening" {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("listener never came up: {}", cluster(app).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_sql_changes_reach_every_node_by_notify() {
    let a = spawn_with(&NOTIFY_ONLY).await;
    let b = spawn_url(&a.db_url, &NOTIFY_ONLY).await;
    listening(&a).await;
    listening(&b).await;
    assert_eq!(a.put_opt("t1", &opt_xml("t1", "v1")).await, 200);
    for n in [&a, &b] {
        assert!(n.get_text("/opt/t1").await.contains("v1"));
    }
    // UPDATE straight in SQL: no API, no eviction call; both nodes see it.
    sql_update(&a, "t1", "v2").await;
    for n in [&a, &b] {
        let (ok, body) = n
            .eventually("/opt/t1", |s, b| s == 200 && b.contains("v2"))
            .await;
        assert!(ok, "node {} still serves {body}", n.base);
    }
    // DELETE in SQL.
    a.sql()
        .await
        .execute("DELETE FROM opt WHERE template_id = 't1'", &[])
        .await
        .unwrap();
    for n in [&a, &b] {
        assert!(n.eventually("/opt/t1", |s, _| s == 404).await.0);
    }
    // TRUNCATE flushes the group: the cached context list empties on both.
    let r = a
        .req(reqwest::Method::PUT, "/fc/context/t1")
        .header("content-type", "application/yaml")
        .body(context_yaml("t1", "1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    for n in [&a, &b] {
        assert!(n.get_text("/fc/context").await.contains("t1"));
    }
    a.sql()
        .await
        .batch_execute("TRUNCATE fhir_connect_context")
        .await
        .unwrap();
    for n in [&a, &b] {
        assert!(
            n.eventually("/fc/context", |s, b| s == 200 && b == "[]")
                .await
                .0
        );
    }
    let inv = &cluster(&b).await["invalidation"];
    assert!(inv["first_by_notify"].as_u64().unwrap() >= 3, "{inv}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catch_up_alone_converges_within_about_one_interval() {
    let app = spawn_with(&[
        ("OPENFHIR_PG_NOTIFY", "false"),
        ("OPENFHIR_CATCHUP_INTERVAL_MS", "200"),
    ])
    .await;
    assert_eq!(app.put_opt("t1", &opt_xml("t1", "v1")).await, 200);
    assert!(app.get_text("/opt/t1").await.contains("v1"));
    let started = Instant::now();
    sql_update(&app, "t1", "v2").await;
    let (ok, body) = app
        .eventually("/opt/t1", |s, b| s == 200 && b.contains("v2"))
        .await;
    assert!(ok, "{body}");
    eprintln!(
        "catch-up alone (interval 200 ms): stale for {:?}",
        started.elapsed()
    );
    let inv = &cluster(&app).await["invalidation"];
    assert!(inv["first_by_catchup"].as_u64().unwrap() >= 1, "{inv}");
    assert_eq!(inv["notifications"], 0, "{inv}");
}

/// Positions are assigned at INSERT, not at COMMIT. Transaction A takes the lower position and
/// commits after B; a `position > cursor` reader would skip A's change forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_that_commits_late_is_not_skipped() {
    let app = spawn_with(&NO_CHANNELS).await;
    for id in ["late", "early"] {
        assert_eq!(app.put_opt(id, &opt_xml(id, "v1")).await, 200);
        assert!(app.get_text(&format!("/opt/{id}")).await.contains("v1"));
    }
    app.node.catch_up().await.unwrap();

    let mut a = app.sql().await;
    let ta = a.transaction().await.unwrap();
    ta.execute(
        "UPDATE opt SET content = $1 WHERE template_id = 'late'",
        &[&opt_xml("late", "v2")],
    )
    .await
    .unwrap();
    sql_update(&app, "early", "v2").await; // B commits while A is open.

    let step = app.node.catch_up().await.unwrap();
    assert!(step.applied >= 1, "{step:?}");
    assert!(app.get_text("/opt/early").await.contains("v2"));
    assert!(
        app.get_text("/opt/late").await.contains("v1"),
        "A has not committed yet"
    );

    ta.commit().await.unwrap();
    let positions: Vec<(i64, String)> = app
        .sql()
        .await
        .query(
            "SELECT position, key FROM openfhir_invalidation_log WHERE key IN ('late', 'early') AND operation = 'UPDATE' ORDER BY position",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        positions[0].1, "late",
        "the late commit holds the lower position: {positions:?}"
    );

    app.node.catch_up().await.unwrap();
    assert!(
        app.get_text("/opt/late").await.contains("v2"),
        "the late commit was applied"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_listener_reconnects_and_catches_up_after_its_connection_is_killed() {
    let app = spawn_with(&NOTIFY_ONLY).await;
    listening(&app).await;
    assert_eq!(app.put_opt("t1", &opt_xml("t1", "v1")).await, 200);
    assert!(app.get_text("/opt/t1").await.contains("v1"));
    let name = openfhir_cache::invalidation::listener_application_name(app.node.id());
    let sql = app.sql().await;
    // Writes keep coming (each read right after, so the entry is cached again) while the
    // listener's connection is killed twice; some land while it is away.
    for i in 0..30 {
        if i == 5 || i == 15 {
            let killed: i64 = sql
                .query_one(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = $1",
                    &[&name],
                )
                .await
                .unwrap()
                .get(0);
            assert!(killed <= 1);
        }
        sql_update(&app, "t1", &format!("w{i}")).await;
        let _ = app.client.get(app.url("/opt/t1")).send().await.unwrap();
    }
    let (ok, body) = app
        .eventually("/opt/t1", |s, b| s == 200 && b.contains("w29"))
        .await;
    assert!(ok, "no stale entry in the end: {body}");
    for _ in 0..200 {
        let inv = cluster(&app).await["invalidation"].clone();
        if inv["listener_reconnects"].as_u64().unwrap() >= 1 && inv["listener"] == "listening" {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("no reconnect: {}", cluster(&app).await);
}

#[tokio::test]
async fn a_node_behind_the_retention_horizon_flushes() {
    let app = spawn_with(&NO_CHANNELS).await;
    assert_eq!(app.put_opt("t1", &opt_xml("t1", "v1")).await, 200);
    assert!(app.get_text("/opt/t1").await.contains("v1"));
    app.node.catch_up().await.unwrap();
    sql_update(&app, "t1", "v2").await;
    // Age the log and prune it, as another node would after the retention period.
    let sql = app.sql().await;
    sql.execute(
        "UPDATE openfhir_invalidation_log SET created = now() - interval '2 days'",
        &[],
    )
    .await
    .unwrap();
    // Pruning only takes rows below the cluster-wide xmin, which transactions of other tests
    // (other databases on the same server) may hold back for a moment: retry, bounded.
    let mut pruned = 0;
    let mut left = -1i64;
    for _ in 0..100 {
        pruned += app
            .node
            .invalidation()
            .prune(Duration::from_secs(86400))
            .await
            .unwrap()
            .unwrap_or(0);
        left = sql
            .query_one("SELECT count(*) FROM openfhir_invalidation_log", &[])
            .await
            .unwrap()
            .get(0);
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(pruned >= 1);
    assert_eq!(left, 0);
    // The change to t1 is gone from the log; the node cannot replay it, so it flushes.
    let step = app.node.catch_up().await.unwrap();
    assert!(step.flushed, "{step:?}");
    assert!(app.get_text("/opt/t1").await.contains("v2"));
    assert_eq!(cluster(&app).await["invalidation"]["horizon_flushes"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consistency_token_gives_read_your_writes_on_another_node() {
    let a = spawn_with(&NO_CHANNELS).await;
    let b = spawn_url(&a.db_url, &NO_CHANNELS).await;
    assert_eq!(a.put_opt("t1", &opt_xml("t1", "v1")).await, 200);
    assert!(b.get_text("/opt/t1").await.contains("v1"));
    let r = a
        .req(reqwest::Method::PUT, "/opt/t1")
        .header("content-type", "application/xml")
        .body(opt_xml("t1", "v2"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let token = r.headers()["x-consistency-token"]
        .to_str()
        .unwrap()
        .to_string();
    // Without the token, b (no channels) still serves its cached copy...
    assert!(b.get_text("/opt/t1").await.contains("v1"));
    // ...with it, b catches up first.
    let r = b
        .client
        .get(b.url("/opt/t1"))
        .header("x-consistency-token", &token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().contains("v2"));
    // A delete's token works too.
    let r = a
        .req(reqwest::Method::DELETE, "/opt/t1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let token = r.headers()["x-consistency-token"]
        .to_str()
        .unwrap()
        .to_string();
    let r = b
        .client
        .get(b.url("/opt/t1"))
        .header("x-consistency-token", &token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = b
        .client
        .get(b.url("/opt/t1"))
        .header("x-consistency-token", "soon")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
}

/// The PostgreSQL server restarts under a running node: requests answer 200 or 503 meanwhile
/// (never a 500 or a dropped connection), and afterwards the node reconnects and converges.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_survives_a_database_restart_and_converges() {
    let server = common::pg::PrivateServer::new();
    let app = spawn_url(&server.url(), &[("OPENFHIR_CATCHUP_INTERVAL_MS", "200")]).await;
    let peer = spawn_url(&server.url(), &[("OPENFHIR_CATCHUP_INTERVAL_MS", "200")]).await;
    listening(&app).await;
    listening(&peer).await;
    assert_eq!(app.put_opt("t1", &opt_xml("t1", "v1")).await, 200);
    assert!(app.get_text("/opt/t1").await.contains("v1"));
    assert!(peer.get_text("/opt/t1").await.contains("v1"));
    assert_eq!(app.put_opt("t2", &opt_xml("t2", "v1")).await, 200);

    server.stop();
    for path in ["/opt/t1", "/opt/t2", "/opt", "/health/ready"] {
        let status = app
            .client
            .get(app.url(path))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16();
        assert!(matches!(status, 200 | 503), "{path}: {status}");
    }
    server.start();
    sql_update(&app, "t1", "v2").await;
    for n in [&app, &peer] {
        let (ok, body) = n
            .eventually("/opt/t1", |s, b| s == 200 && b.contains("v2"))
            .await;
        assert!(ok, "{}: {body}", n.base);
        assert!(n.eventually("/health/ready", |s, _| s == 200).await.0);
        // Its listener came back.
        listening(n).await;
        assert!(
            cluster(n).await["invalidation"]["listener_reconnects"]
                .as_u64()
                .unwrap()
                >= 1
        );
    }
}

#[tokio::test]
async fn unreadable_notifications_are_counted_and_repaired_by_catch_up() {
    let app = spawn_app().await;
    listening(&app).await;
    app.sql()
        .await
        .batch_execute(
            "NOTIFY openfhir_invalidation, 'garbage'; NOTIFY openfhir_invalidation, '{\"p\":1}'",
        )
        .await
        .unwrap();
    for _ in 0..200 {
        let inv = cluster(&app).await["invalidation"].clone();
        if inv["bad_notifications"].as_u64().unwrap() >= 2 {
            assert_eq!(inv["listener"], "listening", "{inv}");
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("bad notifications not counted: {}", cluster(&app).await);
}

#[tokio::test]
async fn a_token_the_node_cannot_reach_in_time_is_a_504() {
    let app = spawn_with(&[("OPENFHIR_CONSISTENCY_WAIT_MS", "200")]).await;
    assert_eq!(app.put_opt("t1", &opt_xml("t1", "v1")).await, 200);
    // A transaction that has started and not committed: its writes cannot be applied yet.
    let mut sql = app.sql().await;
    let tx = sql.transaction().await.unwrap();
    tx.execute("INSERT INTO tenant (id, name) VALUES ('pending', 'p')", &[])
        .await
        .unwrap();
    let xid: String = tx
        .query_one("SELECT pg_current_xact_id()::text", &[])
        .await
        .unwrap()
        .get(0);
    let r = app
        .client
        .get(app.url("/opt/t1"))
        .header("x-consistency-token", &xid)
        .send()
        .await
        .unwrap();
    let status = r.status();
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(status, 504, "token {xid}: {body}");
    assert!(
        body["details"][0]
            .as_str()
            .unwrap()
            .contains("OPENFHIR_CONSISTENCY_WAIT_MS"),
        "{body}"
    );
    tx.rollback().await.unwrap();
    // A transaction id the database has not started is no token at all: 400 at once.
    let r = app
        .client
        .get(app.url("/opt/t1"))
        .header("x-consistency-token", "999999999999")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
}

/// An embedding application puts its own table under the same invalidation and registers a
/// cache group of the same name; a plain-SQL change to that table reaches the group.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_application_table_under_invalidation_reaches_its_registered_group() {
    use std::sync::{Arc, Mutex};
    struct Recorder(Mutex<Vec<(Option<String>, Option<String>)>>);
    impl openfhir_cache::cache::CustomGroup for Recorder {
        fn invalidate(&self, tenant: Option<&str>, key: Option<&str>) {
            self.0
                .lock()
                .unwrap()
                .push((tenant.map(Into::into), key.map(Into::into)));
        }
    }
    let app = spawn_with(&NOTIFY_ONLY).await;
    listening(&app).await;
    let rec = Arc::new(Recorder(Mutex::new(Vec::new())));
    app.node.caches().register_group("terminology", rec.clone());
    let sql = app.sql().await;
    sql.batch_execute(
        "CREATE TABLE term_map (tenant text, code text, system text, target text, PRIMARY KEY (tenant, code, system));
         SELECT openfhir_track_table('term_map', 'terminology', 'tenant', ARRAY['system', 'code']);
         INSERT INTO term_map VALUES ('default', '8302-2', 'loinc', 'height');
         TRUNCATE term_map;",
    )
    .await
    .unwrap();
    for _ in 0..200 {
        if rec.0.lock().unwrap().len() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(
        *rec.0.lock().unwrap(),
        vec![
            (Some("default".into()), Some("loinc:8302-2".into())),
            (None, None)
        ]
    );
    // A wrong group name or column is refused with a message naming it.
    let e = sql
        .batch_execute(
            "SELECT openfhir_track_table('term_map', 'terminology', 'tenant', ARRAY['nope'])",
        )
        .await
        .unwrap_err();
    assert!(e.as_db_error().unwrap().message().contains("nope"), "{e}");
}

/// Changes committed while the listener is away are lost to NOTIFY; the catch-up that the
/// listener runs after reconnecting (LISTEN first, then read the log) must replay them. Catch-up
/// is otherwise off, and the listener is held off deterministically by refusing connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_made_while_the_listener_is_away_are_replayed_on_reconnect() {
    let app = spawn_with(&NOTIFY_ONLY).await;
    listening(&app).await;
    let keys = ["k1", "k2", "k3", "k4", "k5"];
    for k in keys {
        assert_eq!(app.put_opt(k, &opt_xml(k, "v1")).await, 200);
        assert!(app.get_text(&format!("/opt/{k}")).await.contains("v1"));
    }
    let db = app.db.as_ref().unwrap().name.clone();
    let (admin, conn) = tokio_postgres::connect(&common::pg::admin_url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let sql = app.sql().await; // opened before connections are refused
    admin
        .batch_execute(&format!("ALTER DATABASE \"{db}\" ALLOW_CONNECTIONS false"))
        .await
        .unwrap();
    let name = openfhir_cache::invalidation::listener_application_name(app.node.id());
    let killed: i64 = sql
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = $1",
            &[&name],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(killed, 1);
    for k in keys {
        sql.execute(
            "UPDATE opt SET content = $1 WHERE template_id = $2",
            &[&opt_xml(k, "v2"), &k],
        )
        .await
        .unwrap();
    }
    // The listener cannot come back yet, and nothing else tells the node: still v1.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_ne!(cluster(&app).await["invalidation"]["listener"], "listening");
    for k in keys {
        assert!(app.get_text(&format!("/opt/{k}")).await.contains("v1"));
    }
    admin
        .batch_execute(&format!("ALTER DATABASE \"{db}\" ALLOW_CONNECTIONS true"))
        .await
        .unwrap();
    listening(&app).await;
    for k in keys {
        let (ok, body) = app
            .eventually(&format!("/opt/{k}"), |s, b| s == 200 && b.contains("v2"))
            .await;
        assert!(ok, "{k}: {body}");
    }
    let inv = &cluster(&app).await["invalidation"];
    assert!(inv["first_by_catchup"].as_u64().unwrap() >= 5, "{inv}");
}
