//! Supervised background tasks against real nodes: a fault injected into each task (the
//! `fault-injection` feature, on for this package's tests) is noticed, logged and counted, the
//! task is started again, and then does its work again; a fault that repeats at every start keeps
//! `/health/ready` at 503 naming the task until it is cleared; a bootstrap run that panics is
//! dead, not "loading" forever.
//!
//! Each test runs on the current-thread runtime with a thread-local log subscriber: every task of
//! its nodes runs on the test's thread, so the capture holds exactly their lines (no global
//! subscriber, see `main.rs`). The cluster test owns 127.0.93.x.

use crate::common;

use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::pg::TestDb;
use common::{opt_xml, spawn_url, spawn_with, unique_tag, wait_for, TestApp};
use openfhir_cache::cache::Change;
use openfhir_cache::cluster::{self, Envelope, Identity, Invalidate, Message, PeerState};
use openfhir_cache::supervise::{Fault, TaskReport, TaskState};

// ---------------------------------------------------------------------------------------------
// Helpers

/// Log lines captured from the nodes of one test.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Logs {
    /// Captures what is logged on this thread (INFO and above) until the guard is dropped.
    fn capture() -> (Logs, tracing::subscriber::DefaultGuard) {
        let logs = Logs::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(logs.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .finish();
        (logs, tracing::subscriber::set_default(subscriber))
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }

    /// Asserts that a line contains every one of `parts`.
    fn assert_line(&self, parts: &[&str]) {
        let text = self.text();
        assert!(
            text.lines().any(|l| parts.iter().all(|p| l.contains(p))),
            "no log line with {parts:?}:\n{text}"
        );
    }
}

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Logs {
    type Writer = Logs;
    fn make_writer(&'a self) -> Logs {
        self.clone()
    }
}

fn task(app: &TestApp, name: &str) -> TaskReport {
    app.node
        .tasks()
        .task(name)
        .unwrap_or_else(|| panic!("no task {name}: {:?}", app.node.tasks().report()))
}

/// Injects a one-shot `fault` into `name` and waits until the task was started again.
async fn fail_once(app: &TestApp, logs: &Logs, name: &str, fault: Fault) {
    let before = task(app, name).restarts;
    assert!(app.node.tasks().inject_fault(name, fault), "no task {name}");
    let restarted =
        || task(app, name).restarts == before + 1 && task(app, name).state == TaskState::Running;
    assert!(
        wait_for(10, restarted).await,
        "{name} was not started again: {:?}\n{}",
        task(app, name),
        logs.text()
    );
    let how = match fault {
        Fault::Panic => format!("panicked: fault injected into background task {name}"),
        Fault::Return => "returned".to_string(),
    };
    assert_eq!(task(app, name).last_end.as_deref(), Some(how.as_str()));
    logs.assert_line(&[
        &format!("background task {name} {how}; restarting it in"),
        &format!("restart={}", before + 1),
    ]);
    logs.assert_line(&[&format!("background task {name} started again")]);
}

/// The value of the series `line_start` (name and labels) in `/metrics`.
async fn metric(app: &TestApp, line_start: &str) -> Option<String> {
    let text = app.get_text("/metrics").await;
    text.lines()
        .find_map(|l| l.strip_prefix(line_start))
        .map(|v| v.trim().to_string())
}

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

async fn serves(app: &TestApp, id: &str, marker: &str) -> bool {
    app.eventually(&format!("/opt/{id}"), |s, b| s == 200 && b.contains(marker))
        .await
        .0
}

async fn ready(app: &TestApp) -> (u16, serde_json::Value) {
    let r = app
        .client
        .get(app.url("/health/ready"))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

// ---------------------------------------------------------------------------------------------
// The database invalidation channel's tasks

#[tokio::test]
async fn every_background_task_is_supervised_and_reported() {
    let (_logs, _guard) = Logs::capture();
    let app = spawn_with(&[]).await;
    let names: Vec<String> = app.cluster_json().await["tasks"]
        .as_array()
        .expect("tasks in /cluster")
        .iter()
        .map(|t| t["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        names,
        [
            "listen",
            "catchup",
            "notifier",
            "cluster.accept",
            "cluster.reconcile",
            "cluster.failure_detector",
            "cluster.gap_repair",
            "cluster.discovery",
            "bootstrap",
        ]
    );
    assert!(wait_for(5, || task(&app, "bootstrap").state == TaskState::Done).await);
    for t in app.node.tasks().report() {
        assert!(t.up(), "{t:?}");
        assert_eq!(t.restarts, 0, "{t:?}");
        assert_eq!(
            metric(&app, &format!("openfhir_task_up{{task=\"{}\"}}", t.name))
                .await
                .as_deref(),
            Some("1"),
            "{}",
            t.name
        );
    }
    app.stop().await;
}

#[tokio::test]
async fn catch_up_is_restarted_after_a_panic_and_replays_plain_sql_writes_again() {
    let (logs, _guard) = Logs::capture();
    // Catch-up is the only channel: NOTIFY is off and the node has no peer.
    let app = spawn_with(&[
        ("OPENFHIR_PG_NOTIFY", "false"),
        ("OPENFHIR_CATCHUP_INTERVAL_MS", "100"),
    ])
    .await;
    assert_eq!(app.put_opt("c1", &opt_xml("c1", "v1")).await, 200);
    assert!(app.get_text("/opt/c1").await.contains("v1"));

    fail_once(&app, &logs, "catchup", Fault::Panic).await;
    sql_update(&app, "c1", "v2").await;
    assert!(
        serves(&app, "c1", "v2").await,
        "catch-up does not run again"
    );
    assert_eq!(
        metric(&app, "openfhir_task_restarts_total{task=\"catchup\"}")
            .await
            .as_deref(),
        Some("1")
    );
    app.stop().await;
}

#[tokio::test]
async fn the_listener_is_restarted_after_it_returns_and_applies_notifications_again() {
    let (logs, _guard) = Logs::capture();
    // NOTIFY is the only channel: periodic catch-up is off.
    let app = spawn_with(&[
        ("OPENFHIR_PG_NOTIFY", "true"),
        ("OPENFHIR_CATCHUP_INTERVAL_MS", "0"),
    ])
    .await;
    let listening = |app: &TestApp| {
        app.node.invalidation_report().listener
            == openfhir_cache::invalidation::ListenerState::Listening
    };
    assert!(wait_for(10, || listening(&app)).await);
    assert_eq!(app.put_opt("l1", &opt_xml("l1", "v1")).await, 200);
    assert!(app.get_text("/opt/l1").await.contains("v1"));

    fail_once(&app, &logs, "listen", Fault::Return).await;
    assert!(wait_for(10, || listening(&app)).await, "{}", logs.text());
    let report = app.node.invalidation_report();
    assert_eq!(
        report.listener_reconnects, 1,
        "the restarted listener's session is a reconnect"
    );
    // The ended run's connection is closed: one listener connection, not two.
    let sql = app.sql().await;
    let name = openfhir_cache::invalidation::listener_application_name(app.node.id());
    let mut connections = 0;
    for _ in 0..100 {
        connections = sql
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1",
                &[&name],
            )
            .await
            .unwrap()
            .get::<_, i64>(0);
        if connections == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(connections, 1, "listener connections after the restart");
    let by_notify = report.first_by_notify;
    sql_update(&app, "l1", "v2").await;
    assert!(serves(&app, "l1", "v2").await, "no notification applied");
    assert!(app.node.invalidation_report().first_by_notify > by_notify);
    app.stop().await;
}

#[tokio::test]
async fn the_notifier_is_restarted_after_a_panic_and_own_writes_notify_again() {
    let (logs, _guard) = Logs::capture();
    // Two nodes of different clusters (no peer channel) with NOTIFY as the only channel: b
    // learns of a's writes only from the notifications a's notifier sends after COMMIT.
    let notify_only = [
        ("OPENFHIR_PG_NOTIFY", "true"),
        ("OPENFHIR_CATCHUP_INTERVAL_MS", "0"),
    ];
    let a = spawn_with(&notify_only).await;
    let b = spawn_url(&a.db_url, &notify_only).await;
    assert!(a.node.invalidation_report().deferred_notify.enabled);
    for n in [&a, &b] {
        assert!(
            wait_for(10, || n.node.invalidation_report().listener
                == openfhir_cache::invalidation::ListenerState::Listening)
            .await
        );
    }
    assert_eq!(a.put_opt("n1", &opt_xml("n1", "v1")).await, 200);
    assert!(b.get_text("/opt/n1").await.contains("v1"));

    fail_once(&a, &logs, "notifier", Fault::Panic).await;
    let sent = a.node.invalidation_report().deferred_notify.sent;
    assert_eq!(a.put_opt("n1", &opt_xml("n1", "v2")).await, 200);
    assert!(serves(&b, "n1", "v2").await, "a's write was not announced");
    // The notifier counts a batch after its statement returns, which can be after b was told.
    assert!(
        wait_for(5, || a.node.invalidation_report().deferred_notify.sent
            > sent)
        .await,
        "the restarted notifier did not count what it sent"
    );
    a.stop().await;
    b.stop().await;
}

// ---------------------------------------------------------------------------------------------
// The cluster channel's tasks

/// A cluster node at `ip:7800`, peer channel only (NOTIFY and periodic catch-up off), 100 ms
/// heartbeats (gone after 1 s), TCP discovery rounds every second.
async fn cluster_node(db_url: &str, name: &str, ip: &str, hosts: &str) -> TestApp {
    spawn_url(
        db_url,
        &[
            ("CLUSTER_NAME", name),
            ("CLUSTER_BIND_ADDR", ip),
            ("CLUSTER_PORT", "7800"),
            ("CLUSTER_DISCOVERY", "TCP"),
            ("CLUSTER_INITIAL_HOSTS", hosts),
            ("CLUSTER_DNS_INTERVAL", "1"),
            ("CLUSTER_HEARTBEAT_MS", "100"),
            ("OPENFHIR_PG_NOTIFY", "false"),
            ("OPENFHIR_CATCHUP_INTERVAL_MS", "0"),
        ],
    )
    .await
}

fn linked(a: &TestApp, b: &TestApp) -> bool {
    let id = b.node.id();
    a.node
        .cluster()
        .peers()
        .iter()
        .any(|p| p.node_id == id && p.state == PeerState::Alive && p.inbound && p.outbound)
}

#[tokio::test]
async fn every_cluster_task_is_restarted_after_a_panic_and_works_again() {
    let (logs, _guard) = Logs::capture();
    let db = TestDb::new().await;
    let name = format!("sup{:x}", unique_tag());
    // Only a lists c: c, which lists nobody, can join only through a's discovery and dialer.
    let a = cluster_node(
        &db.url,
        &name,
        "127.0.93.1",
        "127.0.93.1[7800],127.0.93.2[7800],127.0.93.3[7800]",
    )
    .await;
    let b = cluster_node(
        &db.url,
        &name,
        "127.0.93.2",
        "127.0.93.1[7800],127.0.93.2[7800]",
    )
    .await;
    assert!(wait_for(10, || linked(&a, &b) && linked(&b, &a)).await);
    assert_eq!(b.put_opt("k1", &opt_xml("k1", "v1")).await, 200);
    assert!(a.get_text("/opt/k1").await.contains("v1"));

    // Periodic catch-up and NOTIFY are off: a step now can only come from gap repair, which
    // steps once when it starts again (the ended run may have taken a gap's wake-up).
    let steps = a.node.invalidation_report().catchup_steps;
    for t in [
        "cluster.accept",
        "cluster.reconcile",
        "cluster.failure_detector",
        "cluster.gap_repair",
        "cluster.discovery",
    ] {
        fail_once(&a, &logs, t, Fault::Panic).await;
    }
    assert!(
        wait_for(5, || a.node.invalidation_report().catchup_steps > steps).await,
        "no catch-up step when gap repair started again"
    );

    // Discovery runs its rounds again.
    let rounds = a.node.cluster().report().discovery_status.rounds;
    assert!(
        wait_for(5, || a.node.cluster().report().discovery_status.rounds
            > rounds + 1)
        .await,
        "discovery does not run again"
    );
    // Both directions carry invalidations again (the restarted reconcile dialed b anew).
    assert!(wait_for(10, || linked(&a, &b) && linked(&b, &a)).await);
    assert_eq!(b.put_opt("k1", &opt_xml("k1", "v2")).await, 200);
    assert!(serves(&a, "k1", "v2").await, "b's write did not reach a");
    assert!(a.get_text("/opt/k1").await.contains("v2"));
    assert_eq!(a.put_opt("k1", &opt_xml("k1", "v3")).await, 200);
    assert!(serves(&b, "k1", "v3").await, "a's write did not reach b");

    // A new peer links: a dials c (discovery, reconcile), c dials back (a's accept loop).
    let c = cluster_node(&db.url, &name, "127.0.93.3", "127.0.93.3[7800]").await;
    assert!(
        wait_for(15, || linked(&a, &c) && linked(&c, &a)).await,
        "c never linked with a: {:#}",
        a.cluster_json().await["cluster"]
    );
    assert_eq!(c.put_opt("k1", &opt_xml("k1", "v4")).await, 200);
    assert!(serves(&a, "k1", "v4").await, "c's write did not reach a");

    // Gap repair: a peer whose sequence skips makes a catch up from the database.
    let gaps = a.node.cluster().counters().gap_catchups;
    let a_addr: SocketAddr = a.node.cluster().local_addr().unwrap();
    let id = Identity {
        cluster: name.clone(),
        node_id: "gappy".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        advertised_addr: "127.0.93.9:7800".into(),
    };
    let mut s = tokio::net::TcpStream::connect(a_addr).await.unwrap();
    let session = cluster::connect(&mut s, &id, None).await.unwrap();
    let (_, mut sealer, _) = session.into_parts();
    for seq in [1u64, 5] {
        let env = Envelope::new(
            name.clone(),
            Message::Invalidate(Invalidate {
                origin: "gappy".into(),
                seq,
                log_position: None,
                change: Change::Opt {
                    tenant: "default".into(),
                    template_id: "nothing".into(),
                },
                at_unix_ms: None,
            }),
        );
        sealer.send(&mut s, &env).await.unwrap();
    }
    assert!(
        wait_for(5, || a.node.cluster().counters().gap_catchups > gaps).await,
        "no catch-up after the gap"
    );
    drop(s);

    // The failure detector: a peer that dies silently goes from suspect to gone.
    let c_id = c.node.id().to_string();
    c.abort();
    let gone = || {
        a.node
            .cluster()
            .peers()
            .iter()
            .any(|p| p.node_id == c_id && p.state == PeerState::Gone)
    };
    assert!(
        wait_for(5, gone).await,
        "c is not gone: {:?}",
        a.node.cluster().peers()
    );

    // None of it was a stop on purpose: a graceful stop restarts nothing.
    a.stop().await;
    b.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Readiness

#[tokio::test]
async fn a_task_failing_at_every_start_keeps_readiness_at_503_naming_it_until_cleared() {
    let (logs, _guard) = Logs::capture();
    let app = spawn_with(&[("OPENFHIR_CATCHUP_INTERVAL_MS", "100")]).await;
    assert!(
        wait_for(10, || app.node.tasks().readiness().is_ok()).await,
        "{:?}",
        app.node.tasks().report()
    );
    let (status, _) = ready(&app).await;
    assert_eq!(status, 200);

    assert!(app
        .node
        .tasks()
        .inject_sticky_fault("catchup", Fault::Panic));
    assert!(
        wait_for(10, || task(&app, "catchup").restarts >= 3).await,
        "{:?}",
        task(&app, "catchup")
    );
    // Polled: between a start and the fault that ends it, the task is briefly running.
    let (ok, body) = app.eventually("/health/ready", |s, _| s == 503).await;
    assert!(ok, "{body}");
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["status"], "not ready");
    let error = body["error"].as_str().unwrap();
    assert!(
        error.starts_with(
            "background task catchup is down: panicked: fault injected into background task catchup; restart "
        ),
        "{error}"
    );
    assert!(error.ends_with(" ms"), "{error}");
    assert_eq!(app.live_status().await, 200, "liveness is not readiness");
    let (ok, body) = app
        .eventually("/cluster", |_, b| {
            let v: serde_json::Value = serde_json::from_str(b).unwrap_or_default();
            let t = &v["tasks"][1];
            t["name"] == "catchup"
                && t["state"] == "restarting"
                && t["restarts"].as_u64() >= Some(3)
        })
        .await;
    assert!(ok, "{body}");
    let (ok, body) = app
        .eventually("/metrics", |_, b| {
            b.lines()
                .any(|l| l == "openfhir_task_up{task=\"catchup\"} 0")
        })
        .await;
    assert!(ok, "{body}");
    // The delays grow: the third restart waited 400 ms.
    logs.assert_line(&[
        "background task catchup panicked",
        "restarting it in 400 ms",
    ]);

    app.node.tasks().clear_fault("catchup");
    let (ok, body) = app.eventually("/health/ready", |s, _| s == 200).await;
    assert!(ok, "still not ready after the fault was cleared: {body}");
    assert_eq!(task(&app, "catchup").state, TaskState::Running);
    assert_eq!(
        metric(&app, "openfhir_task_up{task=\"catchup\"}")
            .await
            .as_deref(),
        Some("1")
    );
    app.stop().await;
}

#[tokio::test]
async fn a_bootstrap_run_that_panics_is_dead_and_named_instead_of_loading_forever() {
    let (logs, _guard) = Logs::capture();
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("b1.opt"),
        opt_xml("b1", "from-the-directory"),
    )
    .unwrap();
    // Holding the bootstrap's advisory lock (`LOCK_KEY` in src/bootstrap.rs) keeps the run
    // waiting, so the fault lands while it runs.
    let (holder, conn) = tokio_postgres::connect(&db.url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    holder
        .execute("SELECT pg_advisory_lock($1)", &[&0x6f66_626f_6f74_i64])
        .await
        .unwrap();
    let app = spawn_url(
        &db.url,
        &[("OPENFHIR_BOOTSTRAP_DIR", dir.path().to_str().unwrap())],
    )
    .await;
    let (status, body) = ready(&app).await;
    assert_eq!(status, 503);
    assert_eq!(body["error"], "loading the bootstrap directory");

    assert!(app.node.tasks().inject_fault("bootstrap", Fault::Panic));
    let finished = tokio::time::timeout(Duration::from_secs(10), app.bootstrap().finished())
        .await
        .expect("the run's end is recorded");
    assert_eq!(
        finished,
        Err("the bootstrap run panicked; the files are tried again at the next start".into())
    );
    let (ok, body) = app
        .eventually("/health/ready", |s, b| {
            s == 503 && b.contains("background task bootstrap is dead")
        })
        .await;
    assert!(ok, "{body}");
    let (_, body) = ready(&app).await;
    assert_eq!(
        body["error"],
        "background task bootstrap is dead: panicked: fault injected into background task \
         bootstrap; it is not restarted"
    );
    logs.assert_line(&["background task bootstrap died", "it is not run again"]);
    holder
        .execute("SELECT pg_advisory_unlock($1)", &[&0x6f66_626f_6f74_i64])
        .await
        .unwrap();
    // Not run again: the directory's OPT is not loaded.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let t = task(&app, "bootstrap");
    assert_eq!((t.state, t.restarts), (TaskState::Dead, 0));
    let r = app.client.get(app.url("/opt/b1")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(
        metric(&app, "openfhir_task_up{task=\"bootstrap\"}")
            .await
            .as_deref(),
        Some("0")
    );
    assert_eq!(app.live_status().await, 200);
    app.stop().await;
}
