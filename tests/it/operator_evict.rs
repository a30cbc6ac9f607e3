//! Durable operator evictions: `POST /caches/evict` is recorded in the invalidation log, so a peer
//! whose link to the evicting node is cut still applies it, by NOTIFY or by catch-up.
//!
//! Three nodes on 127.0.95.1-3 (TCP discovery, port 7800): `a` evicts; `b` listens for NOTIFY;
//! `c` does not listen and catches up every 200 ms. The OPT is changed in SQL with the triggers
//! off (`session_replication_role = replica`, as a restore or a replica promotion would), so
//! nothing but the eviction can tell the nodes; then `b` and `c` are cut from the peer channel
//! with iptables (root, as in CI; `.ci/run` installs iptables) and `a` evicts.

use std::process::Command;

use crate::common::pg::TestDb;
use crate::common::{opt_xml, spawn_url, unique_tag, wait_for, TestApp};
use openfhir_cache::cluster::PeerState;

const HOSTS: &str = "127.0.95.1[7800],127.0.95.2[7800],127.0.95.3[7800]";

async fn start(db: &str, name: &str, ip: &str, extra: &[(&str, &str)]) -> TestApp {
    let mut env = vec![
        ("CLUSTER_NAME", name),
        ("CLUSTER_BIND_ADDR", ip),
        ("CLUSTER_PORT", "7800"),
        ("CLUSTER_DISCOVERY", "TCP"),
        ("CLUSTER_INITIAL_HOSTS", HOSTS),
        ("CLUSTER_HEARTBEAT_MS", "100"),
    ];
    env.extend_from_slice(extra);
    spawn_url(db, &env).await
}

fn alive_peers(app: &TestApp) -> usize {
    app.node
        .cluster()
        .peers()
        .iter()
        .filter(|p| p.state == PeerState::Alive && p.inbound && p.outbound)
        .count()
}

/// iptables DROP rules on peer-port traffic of some addresses, removed on drop (also on panic).
struct Cut {
    rules: Vec<Vec<String>>,
}

fn iptables(args: &[String]) {
    let out = Command::new("iptables")
        .args(["-w", "10"])
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run iptables (this test needs root and iptables): {e}"));
    assert!(
        out.status.success(),
        "iptables {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Cut {
    fn peers_of(ips: &[&str]) -> Cut {
        let mut cut = Cut { rules: Vec::new() };
        for ip in ips {
            for (addr, port) in [
                ("-s", "--dport"),
                ("-s", "--sport"),
                ("-d", "--dport"),
                ("-d", "--sport"),
            ] {
                let rule: Vec<String> =
                    ["INPUT", "-p", "tcp", addr, ip, port, "7800", "-j", "DROP"]
                        .iter()
                        .map(|s| s.to_string())
                        .collect();
                let mut args = vec!["-I".to_string()];
                args.extend(rule.iter().cloned());
                iptables(&args);
                cut.rules.push(rule);
            }
        }
        cut
    }
}

impl Drop for Cut {
    fn drop(&mut self) {
        for rule in self.rules.drain(..) {
            let mut args = vec!["-D".to_string()];
            args.extend(rule);
            let _ = Command::new("iptables")
                .args(["-w", "10"])
                .args(&args)
                .output();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_eviction_by_hand_reaches_peers_cut_from_the_evicting_node() {
    let db = TestDb::new().await;
    let name = format!("ev{:x}", unique_tag());
    let a = start(&db.url, &name, "127.0.95.1", &[]).await;
    let b = start(&db.url, &name, "127.0.95.2", &[]).await;
    let c = start(
        &db.url,
        &name,
        "127.0.95.3",
        &[
            ("OPENFHIR_PG_NOTIFY", "false"),
            ("OPENFHIR_CATCHUP_INTERVAL_MS", "200"),
        ],
    )
    .await;
    assert!(
        wait_for(20, || [&a, &b, &c].iter().all(|n| alive_peers(n) == 2)).await,
        "the three nodes never linked"
    );

    assert_eq!(
        a.put_opt("evicted", &opt_xml("evicted", "before")).await,
        200
    );
    for n in [&a, &b, &c] {
        let (ok, last) = n
            .eventually("/opt/evicted", |s, body| {
                s == 200 && body.contains("<concept>before<")
            })
            .await;
        assert!(ok, "{} never served the upload: {last}", n.base);
    }

    // A node may have read the upload before the upload's own invalidation reached it (`c`
    // catches up every 200 ms); let every channel settle, then cache it everywhere.
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    for n in [&a, &b, &c] {
        n.get_text("/opt/evicted").await;
    }

    // Behind every node's back: no trigger fires, no log row, no NOTIFY.
    let sql = a.sql().await;
    sql.batch_execute("SET session_replication_role = replica")
        .await
        .expect("triggers off");
    let changed = sql
        .execute(
            "UPDATE opt SET content = $1 WHERE tenant = 'default' AND template_id = 'evicted'",
            &[&opt_xml("evicted", "after")],
        )
        .await
        .expect("update without triggers");
    assert_eq!(changed, 1);
    for (n, label) in [(&a, "a"), (&b, "b"), (&c, "c")] {
        let body = n.get_text("/opt/evicted").await;
        assert!(
            body.contains("<concept>before<"),
            "{label} ({}) is not caching the OPT; the test would prove nothing: {:?} {:?}",
            n.base,
            n.stats(openfhir_cache::cache::CacheName::Opt).await,
            n.node.invalidation().report()
        );
    }

    let cut = Cut::peers_of(&["127.0.95.2", "127.0.95.3"]);
    let before = (
        b.node.invalidation().report().first_by_notify,
        c.node.invalidation().report().first_by_catchup,
        b.node.invalidation().report().first_by_peer,
        c.node.invalidation().report().first_by_peer,
    );
    let r = a
        .req(reqwest::Method::POST, "/caches/evict")
        .json(&serde_json::json!({"group": "opt", "tenant": "default", "key": "evicted"}))
        .send()
        .await
        .expect("POST /caches/evict");
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());
    assert!(a.get_text("/opt/evicted").await.contains("<concept>after<"));

    for (n, how) in [(&b, "NOTIFY"), (&c, "catch-up")] {
        let (ok, last) = n
            .eventually("/opt/evicted", |s, body| {
                s == 200 && body.contains("<concept>after<")
            })
            .await;
        assert!(
            ok,
            "{} (cut off, {how}) still serves the old OPT: {last}",
            n.base
        );
    }
    // It came through the log, not over the (cut) peer channel.
    let after = (
        b.node.invalidation().report().first_by_notify,
        c.node.invalidation().report().first_by_catchup,
        b.node.invalidation().report().first_by_peer,
        c.node.invalidation().report().first_by_peer,
    );
    assert!(
        after.0 > before.0,
        "b did not apply it by NOTIFY: {before:?} -> {after:?}"
    );
    assert!(
        after.1 > before.1,
        "c did not apply it by catch-up: {before:?} -> {after:?}"
    );
    assert_eq!(
        (after.2, after.3),
        (before.2, before.3),
        "a peer frame got through the cut"
    );

    // The log row says what was evicted.
    let row = sql
        .query_one(
            "SELECT cache_group, tenant, key FROM openfhir_invalidation_log \
             WHERE operation = 'EVICT' ORDER BY position DESC LIMIT 1",
            &[],
        )
        .await
        .expect("the eviction's log row");
    assert_eq!(
        (
            row.get::<_, String>(0),
            row.get::<_, Option<String>>(1),
            row.get::<_, Option<String>>(2)
        ),
        (
            "opt".to_string(),
            Some("default".to_string()),
            Some("evicted".to_string())
        )
    );
    drop(cut);
    for n in [a, b, c] {
        n.stop().await;
    }
}

/// With the database gone the eviction still happens here, and the answer says it is not durable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_eviction_that_cannot_be_logged_says_so() {
    let db = TestDb::new().await;
    let app = spawn_url(&db.url, &[]).await;
    assert_eq!(app.put_opt("gone", &opt_xml("gone", "v1")).await, 200);
    app.get_text("/opt/gone").await;
    let sql = app.sql().await;
    sql.batch_execute("ALTER TABLE openfhir_invalidation_log RENAME TO log_away")
        .await
        .expect("hide the log");
    let r = app
        .req(reqwest::Method::POST, "/caches/evict")
        .json(&serde_json::json!({"group": "opt"}))
        .send()
        .await
        .expect("POST /caches/evict");
    let status = r.status().as_u16();
    let body: serde_json::Value = r.json().await.expect("JSON error body");
    sql.batch_execute("ALTER TABLE log_away RENAME TO openfhir_invalidation_log")
        .await
        .expect("restore the log");
    assert!(status >= 500, "{status} {body}");
    let details = body["details"].to_string();
    assert!(
        details.contains("not recorded in the invalidation log"),
        "the answer must say the eviction is not durable: {body}"
    );
    let opt = app.stats(openfhir_cache::cache::CacheName::Opt).await;
    assert_eq!(opt.stats.entries, 0, "the eviction was still applied here");
    app.stop().await;
}
