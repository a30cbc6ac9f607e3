//! Issue 8: a flood of connection attempts or garbage frames on one node's cluster port does not
//! starve its real peers.
//!
//! The victim is the real binary as a child process on 127.0.40.1:7800 (so its file descriptors
//! can be counted in `/proc/PID/fd` apart from the attacker's), two in-process nodes are its
//! peers on 127.0.40.2 and 127.0.40.3, all with a `CLUSTER_SECRET` and with NOTIFY and the
//! periodic catch-up off, so only the peer channel can deliver an invalidation. The attacker
//! connects from 127.0.40.100 and up (several source addresses, so a per-address limit alone
//! cannot be what saves the peers) and runs, all at once:
//!
//! * idle: 1,500 connections opened and held, sending nothing, reopened as soon as the node
//!   closes them;
//! * garbage: junk bytes, 4 GiB and just-over-`MAX_FRAME` length headers, and non-JSON frames,
//!   in a loop;
//! * slowloris: a frame header promising a Hello, then one byte every 200 ms;
//! * wrong secret: well-formed Hellos from a node with another `CLUSTER_SECRET`, reconnecting at
//!   once.
//!
//! Meanwhile the established peer stays alive, a peer that *joins during the flood* gets in, and
//! every write on any node is served fresh by the other two. The attack shows in the victim's
//! counters, its descriptor count stays bounded, a connection that sends nothing is closed by the
//! handshake timeout, a Hello with a huge cluster name still gets its Reject, and the victim keeps
//! running. No assertion is on
//! wall-clock time: every wait is a generous bounded poll.
//!
//! No other test uses 127.0.40.x.

mod common;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::pg::TestDb;
use common::proc::{free_port_on, http, start_serve, ChildGuard};
use common::{opt_xml, spawn_url, unique_tag, wait_for, TestApp};
use openfhir_cache::cluster::MAX_FRAME;
use openfhir_cache::cluster::{self, ClusterSecret, HandshakeError, Identity, RejectReason};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_util::sync::CancellationToken;

const VICTIM: &str = "127.0.40.1";
const PEER_A: &str = "127.0.40.2";
const PEER_B: &str = "127.0.40.3";
const HOSTS: &str = "127.0.40.1[7800],127.0.40.2[7800],127.0.40.3[7800]";
const SECRET: &str = "flood-test-secret";
/// Connections the idle attack keeps open at once.
const IDLE_CONNECTIONS: usize = 1500;

/// Cluster settings shared by the three nodes. Heartbeats every 200 ms: a peer is gone after 2 s
/// of silence, short enough that a starved connection shows, long enough for a busy debug build.
fn cluster_env(name: &str, ip: &str) -> Vec<(String, String)> {
    [
        ("CLUSTER_NAME", name),
        ("CLUSTER_BIND_ADDR", ip),
        ("CLUSTER_PORT", "7800"),
        ("CLUSTER_DISCOVERY", "TCP"),
        ("CLUSTER_INITIAL_HOSTS", HOSTS),
        ("CLUSTER_HEARTBEAT_MS", "200"),
        ("CLUSTER_SECRET", SECRET),
        // The database channels off: only the peer channel can invalidate.
        ("OPENFHIR_PG_NOTIFY", "false"),
        ("OPENFHIR_CATCHUP_INTERVAL_MS", "0"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

async fn start_peer(db_url: &str, name: &str, ip: &str) -> TestApp {
    let env = cluster_env(name, ip);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    spawn_url(db_url, &env).await
}

async fn get_json(base: &str, path: &str) -> Value {
    let r = http().get(format!("{base}{path}")).send().await.unwrap();
    assert_eq!(r.status(), 200, "GET {base}{path}");
    r.json().await.unwrap()
}

/// `GET /opt/{id}` on `base`: the body if 200.
async fn get_opt(base: &str, id: &str) -> Option<String> {
    let r = http().get(format!("{base}/opt/{id}")).send().await.ok()?;
    if r.status() != 200 {
        return None;
    }
    r.text().await.ok()
}

async fn put_opt(base: &str, id: &str, marker: &str) -> u16 {
    http()
        .put(format!("{base}/opt/{id}"))
        .header("content-type", "application/xml")
        .body(opt_xml(id, marker))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// Polls `GET /opt/{id}` on `base` (up to 15 s) until it serves `marker`.
async fn serves(base: &str, id: &str, marker: &str) -> bool {
    for _ in 0..300 {
        if get_opt(base, id).await.is_some_and(|b| b.contains(marker)) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// The peer row `base` reports for the node listening at `ip:7800`.
async fn peer_row(base: &str, ip: &str) -> Option<Value> {
    let c = get_json(base, "/cluster").await;
    let want = format!("{ip}:7800");
    c["cluster"]["peers"]
        .as_array()?
        .iter()
        .find(|p| p["addr"] == want.as_str())
        .cloned()
}

/// True when `base` has the node at `ip` alive with both connections up.
async fn linked(base: &str, ip: &str) -> bool {
    peer_row(base, ip)
        .await
        .is_some_and(|p| p["state"] == "alive" && p["inbound"] == true && p["outbound"] == true)
}

/// Polls (up to `secs`) until `base` sees the node at `ip` linked both ways.
async fn wait_linked(base: &str, ip: &str, secs: u64) -> bool {
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    while std::time::Instant::now() < deadline {
        if linked(base, ip).await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// A connection to the victim's cluster port from attacker address `127.0.40.{100 + n % 16}`.
async fn attacker_connect(n: usize) -> Option<TcpStream> {
    connect_from(&format!("127.0.40.{}", 100 + n % 16)).await
}

/// A connection to the victim's cluster port from `src`.
async fn connect_from(src: &str) -> Option<TcpStream> {
    let src: std::net::IpAddr = src.parse().ok()?;
    let socket = TcpSocket::new_v4().ok()?;
    socket.bind((src, 0).into()).ok()?;
    let dst = format!("{VICTIM}:7800").parse().ok()?;
    tokio::time::timeout(Duration::from_secs(2), socket.connect(dst))
        .await
        .ok()?
        .ok()
}

/// Reads until the node closes the connection (or `limit` passes).
async fn until_closed(s: &mut TcpStream, limit: Duration) {
    let mut buf = [0u8; 1024];
    let _ = tokio::time::timeout(limit, async {
        while let Ok(n) = s.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}

/// What the attacker did, to prove the flood was real.
#[derive(Default)]
struct AttackStats {
    idle: AtomicU64,
    garbage: AtomicU64,
    slow: AtomicU64,
    wrong_secret: AtomicU64,
}

fn spawn_attack(
    name: &str,
    stats: &Arc<AttackStats>,
    stop: &CancellationToken,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = Vec::new();
    // (a) Held idle: each task keeps one connection open, sending nothing, until the node
    // closes it, then opens another.
    for i in 0..IDLE_CONNECTIONS {
        let (stats, stop) = (stats.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.is_cancelled() {
                if let Some(mut s) = attacker_connect(i).await {
                    stats.idle.fetch_add(1, Ordering::Relaxed);
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = until_closed(&mut s, Duration::from_secs(60)) => {}
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }));
    }
    // (b) Garbage bytes and oversized frame headers, in a loop.
    let over = u32::try_from(MAX_FRAME + 1)
        .unwrap_or(u32::MAX)
        .to_be_bytes();
    let mut not_json = 1024u32.to_be_bytes().to_vec();
    not_json.extend_from_slice(&[b'x'; 1024]);
    let payloads: Vec<Vec<u8>> = vec![
        [0xff_u8; 4].iter().chain(&[0xab; 4096]).copied().collect(),
        over.iter().chain(&[0; 512]).copied().collect(),
        not_json,
        vec![0x5a; 16 * 1024],
    ];
    for i in 0..16 {
        let (stats, stop, payloads) = (stats.clone(), stop.clone(), payloads.clone());
        tasks.push(tokio::spawn(async move {
            let mut k = i;
            while !stop.is_cancelled() {
                if let Some(mut s) = attacker_connect(i).await {
                    stats.garbage.fetch_add(1, Ordering::Relaxed);
                    let _ = s.write_all(&payloads[k % payloads.len()]).await;
                    until_closed(&mut s, Duration::from_secs(5)).await;
                }
                k += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }));
    }
    // (c) Slowloris: a header promising a 300-byte Hello, then one byte every 200 ms.
    for i in 0..200 {
        let (stats, stop) = (stats.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.is_cancelled() {
                if let Some(mut s) = attacker_connect(i).await {
                    stats.slow.fetch_add(1, Ordering::Relaxed);
                    let mut ok = s.write_all(&300u32.to_be_bytes()).await.is_ok();
                    for b in br#"{"magic":1,"protocol":1,"cluster":"#.iter().cycle().take(299) {
                        if !ok || stop.is_cancelled() {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        ok = s.write_all(&[*b]).await.is_ok();
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }));
    }
    // (d) Well-formed Hellos from a node with the wrong secret, reconnecting at once.
    for i in 0..16 {
        let (stats, stop) = (stats.clone(), stop.clone());
        let id = Identity::new(name, format!("intruder-{i}"), "127.0.40.100:7800");
        tasks.push(tokio::spawn(async move {
            let wrong = ClusterSecret::new("not-the-secret");
            while !stop.is_cancelled() {
                if let Some(mut s) = attacker_connect(i).await {
                    stats.wrong_secret.fetch_add(1, Ordering::Relaxed);
                    let _ = tokio::time::timeout(
                        Duration::from_secs(5),
                        cluster::connect(&mut s, &id, wrong.as_ref()),
                    )
                    .await;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }));
    }
    tasks
}

/// One write on `origin` must be served fresh by every base in `others`.
async fn propagates(origin: &str, others: &[&str], id: &str, round: usize) {
    let v1 = format!("{id}-r{round}-one");
    let v2 = format!("{id}-r{round}-two");
    let first = put_opt(origin, id, &v1).await;
    assert_eq!(first, 200, "PUT on {origin}: {first}");
    // Warm every cache with the first version (read through from the shared database).
    for b in others {
        assert!(serves(b, id, &v1).await, "{b} never served {v1}");
    }
    assert_eq!(put_opt(origin, id, &v2).await, 200, "PUT on {origin}");
    for b in others {
        assert!(
            serves(b, id, &v2).await,
            "{b} kept serving {v1} after {origin} wrote {v2}: the invalidation never arrived"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flood_on_the_cluster_port_does_not_starve_real_peers() {
    let db = TestDb::new().await;
    let name = format!("flood-{:x}", unique_tag());
    let dir = tempfile::tempdir().expect("temp dir");

    // The victim: the real binary, so its descriptors are its own.
    let http_addr = format!("{VICTIM}:{}", free_port_on(VICTIM));
    let mut env = cluster_env(&name, VICTIM);
    env.push(("DATABASE_URL".into(), db.url.clone()));
    env.push(("OPENFHIR_HTTP_ADDR".into(), http_addr.clone()));
    env.push(("OPENFHIR_DB_POOL_SIZE".into(), "4".into()));
    let (mut victim, v): (ChildGuard, String) =
        start_serve(dir.path(), "victim", &http_addr, &env).await;
    let a = start_peer(&db.url, &name, PEER_A).await;
    assert!(
        wait_linked(&v, PEER_A, 20).await,
        "A never linked to the victim: {:#}",
        get_json(&v, "/cluster").await["cluster"]
    );

    let fds_before = fd_count(victim.pid());
    let stop = CancellationToken::new();
    let stats = Arc::new(AttackStats::default());
    let attack = spawn_attack(&name, &stats, &stop);

    // Sample the victim's descriptors and A's liveness for as long as the flood runs.
    let max_fds = Arc::new(AtomicUsize::new(0));
    let sampler = {
        let (stop, v, pid, max_fds) = (stop.clone(), v.clone(), victim.pid(), max_fds.clone());
        tokio::spawn(async move {
            let mut a_gone = 0usize;
            while !stop.is_cancelled() {
                max_fds.fetch_max(fd_count(pid), Ordering::Relaxed);
                // Tolerant of a failed request: only the state of a row that was read counts.
                let url = format!("{v}/cluster");
                let c: Option<Value> = match http().get(url).send().await {
                    Ok(r) => r.json().await.ok(),
                    Err(_) => None,
                };
                let want = format!("{PEER_A}:7800");
                let state = c.as_ref().and_then(|c| {
                    c["cluster"]["peers"]
                        .as_array()?
                        .iter()
                        .find(|p| p["addr"] == want.as_str())
                        .map(|p| p["state"].clone())
                });
                if state.is_some_and(|s| s == "gone" || s == "left") {
                    a_gone += 1;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            a_gone
        })
    };

    // The flood is real before anything is checked: every idle connection opened at least once.
    assert!(
        wait_for(20, || stats.idle.load(Ordering::Relaxed)
            >= IDLE_CONNECTIONS as u64)
        .await,
        "the attacker opened only {} idle connections",
        stats.idle.load(Ordering::Relaxed)
    );

    // A peer that joins during the flood gets in, both ways, on every node.
    let b = start_peer(&db.url, &name, PEER_B).await;
    for (base, ip) in [
        (&v, PEER_A),
        (&v, PEER_B),
        (&a.base, PEER_B),
        (&b.base, PEER_A),
    ] {
        assert!(
            wait_linked(base, ip, 20).await,
            "{base} never linked {ip} during the flood: {:#}",
            get_json(base, "/cluster").await["cluster"]
        );
    }
    assert!(
        wait_linked(&b.base, VICTIM, 20).await,
        "the joining peer never linked the victim: {:#}",
        get_json(&b.base, "/cluster").await["cluster"]
    );

    // Every write is served fresh by the others, whichever node it was made on.
    propagates(&v, &[&a.base, &b.base], "flood-v", 1).await;
    propagates(&a.base, &[&v, &b.base], "flood-a", 1).await;
    propagates(&b.base, &[&v, &a.base], "flood-b", 1).await;
    // The descriptors the victim holds are bounded by its handshake limits, not by the
    // attacker's 1,500+ open connections.
    let fds_now = max_fds.load(Ordering::Relaxed);
    assert!(
        fds_now < fds_before + 250,
        "the victim's descriptors grew from {fds_before} to {fds_now} under the flood"
    );

    // Keep the flood on until the victim's counters show every kind of attack (refused and
    // timed-out handshakes, wrong secrets, shed connections), then check again.
    let mut c = Value::Null;
    for _ in 0..250 {
        c = get_json(&v, "/cluster").await["cluster"]["counters"].clone();
        let n = |k: &str| c[k].as_u64().unwrap_or(0);
        if n("connectionsShed") > 1000
            && n("handshakesFailed") > 150
            && n("framesUnauthenticated") >= 3
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    propagates(&b.base, &[&v, &a.base], "flood-b", 2).await;
    propagates(&v, &[&a.base, &b.base], "flood-v", 2).await;
    for (base, ip) in [(&v, PEER_A), (&v, PEER_B)] {
        assert!(wait_linked(base, ip, 10).await, "{base} lost {ip}");
    }

    // The attack shows in the victim's counters.
    let n = |k: &str| c[k].as_u64().unwrap_or(0);
    assert!(n("connectionsShed") > 1000, "{c:#}");
    assert!(n("handshakesFailed") > 150, "{c:#}");
    assert!(n("framesUnauthenticated") >= 3, "{c:#}");
    let metrics = http()
        .get(format!("{v}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let shed: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("openfhir_cluster_connections_shed_total "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    assert!(shed > 0, "no shed connections in /metrics");

    stop.cancel();
    let a_gone = sampler.await.unwrap();
    let max_fds = max_fds.load(Ordering::Relaxed);
    for t in attack {
        t.abort();
    }
    eprintln!(
        "attack: {} idle, {} garbage, {} slowloris, {} wrong-secret connections; victim fds {} \
         before, {} at most during the flood; counters {c}",
        stats.idle.load(Ordering::Relaxed),
        stats.garbage.load(Ordering::Relaxed),
        stats.slow.load(Ordering::Relaxed),
        stats.wrong_secret.load(Ordering::Relaxed),
        fds_before,
        max_fds
    );
    assert!(stats.wrong_secret.load(Ordering::Relaxed) > 100);
    assert_eq!(
        a_gone, 0,
        "the victim lost the established peer during the flood"
    );
    // The descriptors the victim holds are bounded by its handshake limits, not by the
    // attacker's 1,500+ open connections.
    assert!(
        max_fds < fds_before + 250,
        "the victim's descriptors grew from {fds_before} to {max_fds} under the flood"
    );

    // A Hello with a ~44 KB cluster name (quotes, which JSON escaping doubles on the wire and
    // the Reject's message quadruples) gets an answer, a Reject that fits in a frame, not
    // silence. From an address the attacker did not use; retried while connections the flood
    // left in the accept queue may still get it shed.
    let big = Identity::new("\"".repeat(11_000), "big-name", "127.0.40.99:7800");
    let mut answer = None;
    for _ in 0..100 {
        let Some(mut s) = connect_from("127.0.40.99").await else {
            continue;
        };
        let r = tokio::time::timeout(
            Duration::from_secs(5),
            cluster::connect(&mut s, &big, ClusterSecret::new(SECRET).as_ref()),
        )
        .await;
        match r {
            Ok(Err(HandshakeError::Wire(_))) | Err(_) => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            other => {
                answer = Some(other);
                break;
            }
        }
    }
    match answer {
        Some(Ok(Err(HandshakeError::RejectedByPeer(rej)))) => assert!(
            matches!(rej.reason, RejectReason::ClusterName { .. }),
            "{rej:?}"
        ),
        other => panic!("expected a cluster name Reject, got {other:?}"),
    }

    // A connection that gets a handshake slot and then sends nothing is closed by the node
    // (counted as a failed handshake), not held: retried while one is shed instead.
    let mut timed_out = false;
    for _ in 0..20 {
        let before = get_json(&v, "/cluster").await["cluster"]["counters"].clone();
        let Some(mut s) = connect_from("127.0.40.98").await else {
            continue;
        };
        until_closed(&mut s, Duration::from_secs(15)).await;
        let after = get_json(&v, "/cluster").await["cluster"]["counters"].clone();
        if after["handshakesFailed"].as_u64() > before["handshakesFailed"].as_u64() {
            timed_out = true;
            break;
        }
    }
    assert!(
        timed_out,
        "an idle connection was never closed by the handshake limit"
    );

    // Still running and serving.
    victim.assert_running();
    assert_eq!(
        http()
            .get(format!("{v}/health/live"))
            .send()
            .await
            .map(|r| r.status().as_u16())
            .unwrap_or(0),
        200
    );
    b.stop().await;
    a.stop().await;
}
