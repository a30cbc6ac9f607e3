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
