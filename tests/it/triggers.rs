//! The invalidation triggers of `sql/0003_specialised_triggers.sql` against real PostgreSQL:
//! generated per table (quoted names, multi-column keys, key moves, TRUNCATE, exactly version 2's
//! keys), NOTIFY from the trigger for plain-SQL writes and after COMMIT for a node's own writes
//! (once, with the trigger's payload), and the upgrade of a database at version 2.

use crate::common;

use std::time::Duration;

use common::pg::TestDb;
use common::{opt_xml, spawn_app, spawn_url, spawn_with, TestApp};
use openfhir_cache::invalidation::{parse_payload, Notification};
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, NoTls};

const NOTIFY_ONLY: [(&str, &str); 2] = [
    ("OPENFHIR_PG_NOTIFY", "true"),
    ("OPENFHIR_CATCHUP_INTERVAL_MS", "0"),
];

/// A raw connection that LISTENs on the invalidation channel; payloads arrive on the receiver.
async fn listen(url: &str) -> (tokio_postgres::Client, mpsc::UnboundedReceiver<String>) {
    let (client, mut conn) = tokio_postgres::connect(url, NoTls).await.unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(Ok(m)) = std::future::poll_fn(|cx| conn.poll_message(cx)).await {
            if let AsyncMessage::Notification(n) = m {
                let _ = tx.send(n.payload().to_string());
            }
        }
    });
    client
        .batch_execute("LISTEN openfhir_invalidation")
        .await
        .unwrap();
    (client, rx)
}

/// Every payload that arrives within `wait`.
async fn drain(rx: &mut mpsc::UnboundedReceiver<String>, wait: Duration) -> Vec<String> {
    let mut got = Vec::new();
    while let Ok(Some(p)) = tokio::time::timeout(wait, rx.recv()).await {
        got.push(p);
    }
    got
}

/// The log rows after `after`: (position, xid, group, tenant, key, operation, origin).
type Logged = (
    i64,
    String,
    String,
    Option<String>,
    Option<String>,
    String,
    Option<String>,
);

async fn log_after(sql: &tokio_postgres::Client, after: i64) -> Vec<Logged> {
    sql.query(
        "SELECT position, xid::text, cache_group, tenant, key, operation, origin \
         FROM openfhir_invalidation_log WHERE position > $1 ORDER BY position",
        &[&after],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| {
        (
            r.get(0),
            r.get(1),
            r.get(2),
            r.get(3),
            r.get(4),
            r.get(5),
            r.get(6),
        )
    })
    .collect()
}

async fn generated_functions(sql: &tokio_postgres::Client) -> i64 {
    sql.query_one(
        "SELECT count(*) FROM pg_proc WHERE proname LIKE 'openfhir\\_invalidation\\_row\\_%'",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

async fn head(sql: &tokio_postgres::Client) -> i64 {
    sql.query_one(
        "SELECT coalesce(max(position), 0) FROM openfhir_invalidation_log",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

/// (group, tenant, key, operation) of log rows, for comparisons.
fn keys(rows: &[Logged]) -> Vec<(&str, Option<&str>, Option<&str>, &str)> {
    rows.iter()
        .map(|r| (r.2.as_str(), r.3.as_deref(), r.4.as_deref(), r.5.as_str()))
        .collect()
}

fn row_of(payload: &str) -> openfhir_cache::invalidation::LogRow {
    match parse_payload(payload).as_deref() {
        Ok([Notification::Row(r)]) => r.clone(),
        other => panic!("{payload}: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_sql_notifies_from_the_trigger_and_a_deferring_transaction_does_not() {
    let app = spawn_app().await;
    assert_eq!(app.put_opt("t1", &opt_xml("t1", "v1")).await, 200);
    let (_l, mut rx) = listen(&app.db_url).await;
    drain(&mut rx, Duration::from_millis(200)).await; // the node's own write, if late
    let sql = app.sql().await;

    // Plain SQL: the trigger notifies, with the log row's position and xid.
    let before = head(&sql).await;
    sql.execute(
        "UPDATE opt SET content = $1 WHERE template_id = 't1'",
        &[&opt_xml("t1", "v2")],
    )
    .await
    .unwrap();
    let got = drain(&mut rx, Duration::from_millis(500)).await;
    let logged = log_after(&sql, before).await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(logged.len(), 1);
    let r = row_of(&got[0]);
    assert_eq!(
        (r.position, r.xid.to_string(), r.key.as_deref(), r.origin),
        (logged[0].0, logged[0].1.clone(), Some("t1"), None)
    );

    // A transaction that defers: logged, not announced...
    let before = head(&sql).await;
    let xid: String = sql
        .query_one(
            "WITH u AS (UPDATE opt SET content = $1 FROM (SELECT set_config('openfhir.notify', 'deferred', true)) s \
             WHERE template_id = 't1' RETURNING 1) SELECT pg_current_xact_id()::text FROM u",
            &[&opt_xml("t1", "v3")],
        )
        .await
        .unwrap()
        .get(0);
    assert!(drain(&mut rx, Duration::from_millis(500)).await.is_empty());
    let logged = log_after(&sql, before).await;
    assert_eq!(
        keys(&logged),
        [("opt", Some("default"), Some("t1"), "UPDATE")]
    );
    assert_eq!(logged[0].1, xid);
    // ...until the writer announces it, with the payload the trigger would have sent.
    let n: i64 = sql
        .query_one(
            "SELECT openfhir_notify_transactions(ARRAY[$1]::text[]::xid8[])",
            &[&xid],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
    let got = drain(&mut rx, Duration::from_millis(500)).await;
    assert_eq!(got.len(), 1, "{got:?}");
    let r = row_of(&got[0]);
    assert_eq!(
        (r.position, r.xid.to_string(), r.key.as_deref()),
        (logged[0].0, xid, Some("t1"))
    );

    // The setting ended with its transaction: the same session notifies again.
    sql.execute(
        "UPDATE opt SET content = $1 WHERE template_id = 't1'",
        &[&opt_xml("t1", "v4")],
    )
    .await
    .unwrap();
    assert_eq!(drain(&mut rx, Duration::from_millis(500)).await.len(), 1);
}

/// Two nodes in different clusters (no peer channel) and no catch-up: NOTIFY is the only way the
/// second learns of the first's writes, and the first's writes are announced after COMMIT by its
/// notifier, exactly once per log row, with its id as origin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_write_is_announced_once_after_commit_and_reaches_a_node_by_notify_alone() {
    let a = spawn_with(&NOTIFY_ONLY).await;
    let b = spawn_url(&a.db_url, &NOTIFY_ONLY).await;
    for n in [&a, &b] {
        listening(n).await;
    }
    let (_l, mut rx) = listen(&a.db_url).await;
    let sql = a.sql().await;
    assert_eq!(a.put_opt("t1", &opt_xml("t1", "v1")).await, 200);
    assert!(b.get_text("/opt/t1").await.contains("v1"));
    drain(&mut rx, Duration::from_millis(300)).await;

    let before = head(&sql).await;
    assert_eq!(a.put_opt("t1", &opt_xml("t1", "v2")).await, 200);
    let (ok, body) = b
        .eventually("/opt/t1", |s, body| s == 200 && body.contains("v2"))
        .await;
    assert!(ok, "b still serves {body}");
    let got = drain(&mut rx, Duration::from_millis(500)).await;
    let logged = log_after(&sql, before).await;
    assert_eq!(
        keys(&logged),
        [("opt", Some("default"), Some("t1"), "UPDATE")]
    );
    assert_eq!(
        got.len(),
        1,
        "announced once, not by the trigger too: {got:?}"
    );
    let r = row_of(&got[0]);
    assert_eq!(
        (r.position, r.xid.to_string(), r.origin.as_deref()),
        (logged[0].0, logged[0].1.clone(), Some(a.node.id()))
    );

    let inv = a.cluster_json().await["invalidation"].clone();
    assert_eq!(inv["deferred_notify"]["enabled"], true, "{inv}");
    assert!(
        inv["deferred_notify"]["sent"].as_u64().unwrap() >= 2,
        "{inv}"
    );
    assert!(inv["own_writes"].as_u64().unwrap() >= 1, "{inv}");
    let inv = b.cluster_json().await["invalidation"].clone();
    assert!(inv["first_by_notify"].as_u64().unwrap() >= 1, "{inv}");
    let metrics = a
        .client
        .get(a.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("openfhir_invalidation_deferred_notifications_total"),
        "{metrics}"
    );

    // A delete (and its cascade) is announced the same way.
    let before = head(&sql).await;
    let r = a
        .req(reqwest::Method::DELETE, "/opt/t1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert!(b.eventually("/opt/t1", |s, _| s == 404).await.0);
    let got = drain(&mut rx, Duration::from_millis(500)).await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(row_of(&got[0]).position, log_after(&sql, before).await[0].0);
}

async fn listening(app: &TestApp) {
    for _ in 0..200 {
        if app.cluster_json().await["invalidation"]["listener"] == "listening" {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("listener never came up");
}

#[tokio::test]
async fn the_generated_trigger_reads_key_columns_and_a_key_move_logs_both_keys() {
    let app = spawn_app().await;
    let sql = app.sql().await;
    let def: String = sql
        .query_one(
            "SELECT pg_get_functiondef(tgfoid) FROM pg_trigger \
             WHERE tgrelid = 'opt'::regclass AND tgname = 'openfhir_invalidation_row'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(!def.contains("to_jsonb"), "{def}");
    assert!(
        def.contains("OLD.template_id") && def.contains("NEW.tenant"),
        "{def}"
    );

    assert_eq!(app.put_opt("a", &opt_xml("a", "v1")).await, 200);
    let before = head(&sql).await;
    sql.batch_execute(
        "UPDATE opt SET template_id = 'b' WHERE template_id = 'a';
         UPDATE opt SET updated = now() WHERE template_id = 'b';",
    )
    .await
    .unwrap();
    assert_eq!(
        keys(&log_after(&sql, before).await),
        [
            ("opt", Some("default"), Some("a"), "UPDATE"),
            ("opt", Some("default"), Some("b"), "UPDATE"),
            ("opt", Some("default"), Some("b"), "UPDATE"),
        ]
    );
}

/// Names that need quoting (spaces, '$', ',', upper case) in the table and in the tenant and key
/// columns, a key of two columns of which one is not text: every operation logs exactly the keys
/// version 2's generic trigger logged (its `to_jsonb(row) ->> column` text, NULLs left out).
#[tokio::test]
async fn quoted_names_and_multi_column_keys() {
    let app = spawn_app().await;
    let sql = app.sql().await;
    sql.batch_execute(
        r#"SET TimeZone = 'UTC';
           CREATE TABLE "Odd $x$ Table" ("Ten ant" text, "k,1" text, "K$2" int, "when" timestamptz, body text);
           SELECT openfhir_track_table('"Odd $x$ Table"', 'odd_group', 'Ten ant', ARRAY['k,1', 'K$2', 'when']);
           SELECT openfhir_track_table('"Odd $x$ Table"', 'odd_group', 'Ten ant', ARRAY['k,1', 'K$2', 'when']);"#,
    )
    .await
    .unwrap();
    let before = head(&sql).await;
    sql.batch_execute(
        r#"INSERT INTO "Odd $x$ Table" VALUES ('t', 'a', 1, '2024-05-01 10:00+00', 'x');
           INSERT INTO "Odd $x$ Table" VALUES ('t', NULL, NULL, NULL, 'y');
           UPDATE "Odd $x$ Table" SET body = 'z' WHERE "k,1" = 'a';
           UPDATE "Odd $x$ Table" SET "K$2" = 2, "Ten ant" = 'u' WHERE "k,1" = 'a';
           UPDATE "Odd $x$ Table" SET "k,1" = '' WHERE "k,1" IS NULL;
           DELETE FROM "Odd $x$ Table";
           TRUNCATE "Odd $x$ Table";"#,
    )
    .await
    .unwrap();
    let logged = log_after(&sql, before).await;
    let k = Some("a:1:2024-05-01T10:00:00+00:00");
    let k2 = Some("a:2:2024-05-01T10:00:00+00:00");
    assert_eq!(
        keys(&logged),
        [
            ("odd_group", Some("t"), k, "INSERT"),
            ("odd_group", Some("t"), None, "INSERT"),
            ("odd_group", Some("t"), k, "UPDATE"),
            ("odd_group", Some("t"), k, "UPDATE"),
            ("odd_group", Some("u"), k2, "UPDATE"),
            ("odd_group", Some("t"), None, "UPDATE"),
            ("odd_group", Some("t"), Some(""), "UPDATE"),
            ("odd_group", Some("u"), k2, "DELETE"),
            ("odd_group", Some("t"), Some(""), "DELETE"),
            ("odd_group", None, None, "TRUNCATE"),
        ]
    );
    // Tracking twice, then renaming and tracking again, leaves one generated function.
    sql.batch_execute(
        r#"ALTER TABLE "Odd $x$ Table" RENAME TO "Odder Table";
           SELECT openfhir_track_table('"Odder Table"', 'odd_group', 'Ten ant', ARRAY['k,1']);"#,
    )
    .await
    .unwrap();
    assert_eq!(
        generated_functions(&sql).await,
        5,
        "four built-in tables and this one"
    );
    sql.batch_execute(r#"SELECT openfhir_untrack_table('"Odder Table"')"#)
        .await
        .unwrap();
    assert_eq!(generated_functions(&sql).await, 4);

    // Wrong group names and columns are refused with a message naming them.
    for (call, names) in [
        (
            r#"SELECT openfhir_track_table('"Odder Table"', 'Bad-Group', 'Ten ant', ARRAY[]::text[])"#,
            "Bad-Group",
        ),
        (
            r#"SELECT openfhir_track_table('"Odder Table"', 'odd_group', 'Ten ant', ARRAY['nope'])"#,
            "nope",
        ),
        (
            r#"SELECT openfhir_track_table('"Odder Table"', 'odd_group', 'tenant', ARRAY[]::text[])"#,
            "tenant",
        ),
    ] {
        let e = sql.batch_execute(call).await.unwrap_err();
        let msg = e.as_db_error().map(|d| d.message().to_string());
        assert!(msg.as_deref().is_some_and(|m| m.contains(names)), "{e}");
    }
}

/// A database at version 2 (the generic trigger, an application table tracked with it) upgrades
/// to version 3: every tracked table gets its generated trigger, and logs the same keys.
#[tokio::test]
async fn a_database_at_version_2_upgrades() {
    use openfhir_cache::store::migrate::{current_version, migrate, MIGRATIONS};
    let db = TestDb::new().await;
    let mut sql = db.connect().await;
    for m in &MIGRATIONS[..2] {
        sql.batch_execute(m.sql).await.unwrap();
    }
    sql.batch_execute(
        r#"CREATE TABLE term_map (tenant text, "System" text, code text, target text);
           SELECT openfhir_track_table('term_map', 'terminology', 'tenant', ARRAY['System', 'code']);"#,
    )
    .await
    .unwrap();
    assert_eq!(current_version(&sql).await.unwrap(), Some(2));

    let later: Vec<i32> = MIGRATIONS[2..].iter().map(|m| m.version).collect();
    assert_eq!(migrate(&mut sql).await.unwrap(), later);
    assert_eq!(
        current_version(&sql).await.unwrap(),
        Some(MIGRATIONS.len() as i32)
    );
    let generic: i64 = sql
        .query_one(
            "SELECT count(*) FROM pg_trigger WHERE tgfoid = 'openfhir_invalidation_row()'::regprocedure",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(generic, 0, "every table was regenerated");
    let tracked: i64 = sql
        .query_one(
            "SELECT count(*) FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid \
             WHERE t.tgname = 'openfhir_invalidation_row' AND p.proname LIKE 'openfhir\\_invalidation\\_row\\_%'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(tracked, 5);
    let before = head(&sql).await;
    sql.batch_execute(
        "INSERT INTO term_map VALUES ('default', 'loinc', '8302-2', 'height');
         INSERT INTO tenant (id, name) VALUES ('t2', 'T2');
         INSERT INTO opt (tenant, template_id, original_template_id, content) VALUES ('t2', 'x', 'X', '<t/>');
         DELETE FROM tenant WHERE id = 't2';",
    )
    .await
    .unwrap();
    let logged = log_after(&sql, before).await;
    let mut got = keys(&logged);
    got.sort();
    assert_eq!(
        got,
        [
            ("opt", Some("t2"), Some("x"), "DELETE"),
            ("opt", Some("t2"), Some("x"), "INSERT"),
            ("tenant", Some("t2"), None, "DELETE"),
            ("tenant", Some("t2"), None, "INSERT"),
            (
                "terminology",
                Some("default"),
                Some("loinc:8302-2"),
                "INSERT"
            ),
        ]
    );
    // The file is idempotent, as psql users run it.
    sql.batch_execute(MIGRATIONS[2].sql).await.unwrap();
    assert_eq!(migrate(&mut sql).await.unwrap(), Vec::<i32>::new());
    // A node starts on it.
    let app = spawn_url(&db.url, &[]).await;
    assert_eq!(app.put_opt("t1", &opt_xml("t1", "v1")).await, 200);
}

/// A node's deferred notifications go out packed (schema version 9): the rows of many
/// transactions in as few notifications as fit in 7,900 bytes, every row once and in log order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deferred_notifications_are_packed_in_log_order() {
    let app = spawn_app().await;
    let (_l, mut rx) = listen(&app.db_url).await;
    let sql = app.sql().await;
    let before = head(&sql).await;
    // 60 transactions that defer, each writing one OPT with a long template id (so their payloads
    // need more than one notification).
    let mut xids = Vec::new();
    for i in 0..60 {
        let id = format!("packed_{i:02}_{}", "x".repeat(120));
        let xid: String = sql
            .query_one(
                "WITH w AS (INSERT INTO opt (tenant, template_id, original_template_id, content) \
                 SELECT 'default', $1, $1, 'c' FROM (SELECT set_config('openfhir.notify', 'deferred', true)) s \
                 RETURNING 1) SELECT pg_current_xact_id()::text FROM w",
                &[&id],
            )
            .await
            .unwrap()
            .get(0);
        xids.push(xid);
    }
    assert!(drain(&mut rx, Duration::from_millis(300)).await.is_empty());
    let logged = log_after(&sql, before).await;
    assert_eq!(logged.len(), 60);

    let n: i64 = sql
        .query_one(
            "SELECT openfhir_notify_transactions($1::text[]::xid8[])",
            &[&xids],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 60);

    let got = drain(&mut rx, Duration::from_millis(500)).await;
    assert!(
        (2..60).contains(&got.len()),
        "60 rows of about 250 bytes need a few notifications, not {}",
        got.len()
    );
    let mut positions = Vec::new();
    for p in &got {
        assert!(
            p.starts_with('[') && p.len() <= 7900,
            "{} bytes: {p:.80}",
            p.len()
        );
        for n in parse_payload(p).unwrap() {
            let Notification::Row(r) = n else {
                panic!("{p}")
            };
            positions.push((r.position, r.xid.to_string(), r.key));
        }
    }
    let want: Vec<_> = logged
        .iter()
        .map(|l| (l.0, l.1.clone(), l.4.clone()))
        .collect();
    assert_eq!(positions, want, "every row once, in log order");
}
