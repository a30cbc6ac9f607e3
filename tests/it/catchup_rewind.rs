//! Regression test for issue 8: the database's transaction ids go backwards under a running
//! node (commits lost in a crash with `synchronous_commit=off`, a failover to an async
//! standby, a restore of a backup).
//!
//! The node's catch-up watermark then sits above the ids the server hands out again, so a
//! change written under a reused id was dropped by NOTIFY (below the watermark: "already
//! applied") and never read by catch-up (it only reads `xid >= watermark`): the node served the
//! old value until it restarted. The fix (`src/catchup.rs`, commit 69a06de) compares the
//! snapshot's `xmax` with the watermark at every catch-up step and, when the database is
//! behind, flushes every cache and restarts the cursor from the current snapshot.
//!
//! The rewind is made deterministic with a cold backup of a private server's data directory:
//! back up, let the node's watermark move well past the backup's next transaction id, kill the
//! server, put the backup back and start it again on the same port.
//!
//! The second test covers the other way a crash takes log rows away from a node since schema
//! version 8: the log is UNLOGGED, so crash recovery empties it (issue 17).

use crate::common;

use std::time::{Duration, Instant};

use common::pg::PrivateServer;
use common::{opt_xml, spawn_url, TestApp};

/// Transactions committed after the backup, so the node's watermark ends up well above the
/// ids the restored server hands out again.
const XIDS_AHEAD: u64 = 100;

/// Generous bound for anything the node does in the background (catch-up runs every 100 ms).
const WAIT: Duration = Duration::from_secs(20);

const NODE_ENV: [(&str, &str); 2] = [
    ("OPENFHIR_PG_NOTIFY", "true"),
    ("OPENFHIR_CATCHUP_INTERVAL_MS", "100"),
];

/// `/cluster`'s `invalidation` section.
async fn invalidation(app: &TestApp) -> serde_json::Value {
    let r = app.client.get(app.url("/cluster")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    r.json::<serde_json::Value>().await.unwrap()["invalidation"].clone()
}

/// Polls `check` (every 50 ms, at most [`WAIT`]) until it yields `Some`; panics with `what`
/// and the node's invalidation state otherwise.
async fn poll<T, F, Fut>(app: &TestApp, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if Instant::now() >= deadline {
            panic!(
                "{what} (waited {WAIT:?}); node invalidation state: {}",
                invalidation(app).await
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The server's next transaction id (`xmax` of a fresh snapshot).
async fn next_xid(sql: &tokio_postgres::Client) -> u64 {
    sql.query_one("SELECT pg_snapshot_xmax(pg_current_snapshot())::text", &[])
        .await
        .unwrap()
        .get::<_, String>(0)
        .parse()
        .unwrap()
}

/// Is the OPT `id` of the default tenant in the node's cache?
async fn cached(app: &TestApp, id: &str) -> bool {
    app.node.caches().opt.contains("default", Some(id)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_recovers_when_the_database_rewinds_its_transaction_ids() {
    let server = PrivateServer::new();

    // Schema and the key, written by a node that is gone again before the backup.
    let setup = spawn_url(&server.url(), &NODE_ENV).await;
    assert_eq!(setup.put_opt("t1", &opt_xml("t1", "v1")).await, 200);
    setup.stop().await;
    server.backup();

    let app = spawn_url(&server.url(), &NODE_ENV).await;
    poll(&app, "listener never came up", || async {
        (invalidation(&app).await["listener"] == "listening").then_some(())
    })
    .await;
    assert!(app.get_text("/opt/t1").await.contains("v1"));
    assert!(cached(&app, "t1").await);

    // Move the transaction ids (and with them the node's watermark) past the backup's.
    let sql = app.sql().await;
    let backup_next = next_xid(&sql).await;
    for _ in 0..XIDS_AHEAD {
        sql.batch_execute("SELECT pg_current_xact_id()")
            .await
            .unwrap();
    }
    let ahead = next_xid(&sql).await;
    assert!(
        ahead >= backup_next + XIDS_AHEAD,
        "{backup_next} -> {ahead}"
    );
    let watermark = poll(&app, "the watermark never reached the new ids", || async {
        invalidation(&app).await["watermark"]
            .as_u64()
            .filter(|w| *w >= ahead)
    })
    .await;
    drop(sql);

    // Lose every commit since the backup: crash, restore, start on the same port.
    server.kill();
    server.restore_backup();
    server.start();
    let sql = app.sql().await;
    let rewound = next_xid(&sql).await;
    assert!(
        rewound < watermark,
        "the restore did not rewind the transaction ids: next xid {rewound}, watermark {watermark}"
    );

    // The node reconnects: its listener runs a catch-up step before it listens again.
    poll(&app, "the listener did not reconnect", || async {
        let inv = invalidation(&app).await;
        (inv["listener_reconnects"].as_u64() >= Some(1) && inv["listener"] == "listening")
            .then_some(())
    })
    .await;
    // The key is in the cache (kept from before, or loaded again after a flush).
    assert!(app.get_text("/opt/t1").await.contains("v1"));
    assert!(cached(&app, "t1").await);

    // A plain-SQL change under a reused transaction id, below the node's old watermark.
    let xid: u64 = sql
        .query_one(
            "UPDATE opt SET content = $1 WHERE tenant = 'default' AND template_id = 't1' \
             RETURNING pg_current_xact_id()::text",
            &[&opt_xml("t1", "v2")],
        )
        .await
        .unwrap()
        .get::<_, String>(0)
        .parse()
        .unwrap();
    assert!(
        xid < watermark,
        "xid {xid} is not below watermark {watermark}"
    );

    poll(
        &app,
        &format!(
            "the node still serves v1 after an UPDATE under reused xid {xid} \
             (its watermark before the restore was {watermark})"
        ),
        || async {
            let r = app.client.get(app.url("/opt/t1")).send().await.ok()?;
            (r.status() == 200 && r.text().await.ok()?.contains("v2")).then_some(())
        },
    )
    .await;

    let inv = invalidation(&app).await;
    assert_eq!(inv["xid_rewinds"], 1, "{inv}");
    assert!(inv["watermark"].as_u64().unwrap() < watermark, "{inv}");
    app.stop().await;
}

/// Issue 17: the invalidation log is UNLOGGED (schema version 8), so PostgreSQL empties it when it
/// recovers from a crash, and a change committed just before the crash that no node had read yet
/// loses its log row. Every node must still stop serving the old value: the first catch-up step
/// after the crash finds the log's horizon gone with it, recreates it at the current snapshot's
/// `xmin`, and every node whose watermark is below it flushes.
///
/// The change is made unflushed on purpose: a plain-SQL UPDATE that defers its NOTIFY (nobody
/// sends it) under nodes whose catch-up timer is off, so before the crash only the log row knows
/// of it. The crash is an immediate shutdown (no shutdown checkpoint: crash recovery on start).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_node_serves_the_database_after_a_crash_empties_the_log() {
    const CRASH_ENV: [(&str, &str); 2] = [
        ("OPENFHIR_PG_NOTIFY", "true"),
        // Only the listener's reconnect runs a catch-up step.
        ("OPENFHIR_CATCHUP_INTERVAL_MS", "0"),
    ];
    let server = PrivateServer::new();
    let nodes = [
        spawn_url(&server.url(), &CRASH_ENV).await,
        spawn_url(&server.url(), &CRASH_ENV).await,
    ];
    for app in &nodes {
        poll(app, "listener never came up", || async {
            (invalidation(app).await["listener"] == "listening").then_some(())
        })
        .await;
    }
    assert_eq!(nodes[0].put_opt("t1", &opt_xml("t1", "v1")).await, 200);
    for app in &nodes {
        // The write's own notification (sent after COMMIT by node 0's notifier) evicts t1 when
        // it arrives: load t1 only after it did, so that it stays cached.
        poll(app, "the write's notification never arrived", || async {
            (invalidation(app).await["notifications"].as_u64() >= Some(1)).then_some(())
        })
        .await;
        assert!(app.get_text("/opt/t1").await.contains("v1"));
        assert!(cached(app, "t1").await);
    }

    // The unflushed change: committed, its log row written, no notification.
    let mut sql = nodes[0].sql().await;
    let tx = sql.transaction().await.unwrap();
    // Durable before the crash: the test servers commit asynchronously.
    tx.execute(
        "SELECT set_config('openfhir.notify', 'deferred', true), \
                set_config('synchronous_commit', 'on', true)",
        &[],
    )
    .await
    .unwrap();
    let updated = tx
        .execute(
            "UPDATE opt SET content = $1 WHERE tenant = 'default' AND template_id = 't1'",
            &[&opt_xml("t1", "v2")],
        )
        .await
        .unwrap();
    assert_eq!(updated, 1);
    tx.commit().await.unwrap();
    let logged: i64 = sql
        .query_one("SELECT count(*) FROM openfhir_invalidation_log", &[])
        .await
        .unwrap()
        .get(0);
    assert!(logged >= 1, "the UPDATE wrote no log row");
    // Nothing told the nodes: they still serve v1 from their caches.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for app in &nodes {
        assert!(
            app.get_text("/opt/t1").await.contains("v1"),
            "a node learnt of the change before the crash, so the test proves nothing"
        );
    }
    drop(sql);

    // Crash: PostgreSQL recovers on start and empties the UNLOGGED log and horizon.
    server.kill();
    server.start();
    let sql = nodes[0].sql().await;
    let (rows, horizon): (i64, i64) = {
        let r = sql
            .query_one(
                "SELECT (SELECT count(*) FROM openfhir_invalidation_log), \
                        (SELECT count(*) FROM openfhir_invalidation_horizon)",
                &[],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };
    // A node may already have recreated the horizon; the log row of the UPDATE is gone.
    assert_eq!(rows, 0, "the crash did not empty the invalidation log");
    assert!(horizon <= 1);
    let content: String = sql
        .query_one(
            "SELECT content FROM opt WHERE tenant = 'default' AND template_id = 't1'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(content.contains("v2"), "the committed UPDATE was lost");

    for (i, app) in nodes.iter().enumerate() {
        poll(
            app,
            &format!("node {i} still serves v1 after the crash emptied the log"),
            || async {
                let r = app.client.get(app.url("/opt/t1")).send().await.ok()?;
                (r.status() == 200 && r.text().await.ok()?.contains("v2")).then_some(())
            },
        )
        .await;
    }
    let mut resets = 0;
    for app in &nodes {
        let inv = invalidation(app).await;
        assert!(inv["horizon_flushes"].as_u64() >= Some(1), "{inv}");
        assert_eq!(inv["xid_rewinds"], 0, "{inv}");
        resets += inv["log_resets"].as_u64().unwrap_or(0);
    }
    assert!(resets >= 1, "no node recreated the horizon");
    let [a, b] = nodes;
    a.stop().await;
    b.stop().await;
}
