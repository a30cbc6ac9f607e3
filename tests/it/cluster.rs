//! The peer cluster channel between real nodes: real sockets on loopback addresses, one shared
//! PostgreSQL database, and NOTIFY and periodic catch-up switched off wherever a test must prove
//! the peer channel alone did the work.
//!
//! Each test uses its own 127.0.N.x addresses and cluster name, so tests run in parallel.

use crate::common;

use std::net::SocketAddr;
use std::time::Duration;

use common::pg::TestDb;
use common::{opt_xml, spawn_url, unique_tag, wait_for, TestApp};
use openfhir_cache::cache::Change;
use openfhir_cache::cluster::{
    self, ClusterSecret, Envelope, Heartbeat, Identity, Invalidate, Message, RejectReason,
};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

/// Settings of a cluster test node at `ip:7800`. Heartbeats every 100 ms: suspect after 300 ms,
/// gone after 1 s.
fn node_env(name: &str, ip: &str, hosts: &str, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = vec![
        ("CLUSTER_NAME".into(), name.into()),
        ("CLUSTER_BIND_ADDR".into(), ip.into()),
        ("CLUSTER_PORT".into(), "7800".into()),
        ("CLUSTER_DISCOVERY".into(), "TCP".into()),
        ("CLUSTER_INITIAL_HOSTS".into(), hosts.into()),
        ("CLUSTER_HEARTBEAT_MS".into(), "100".into()),
        // The database channels off: only the peer channel can invalidate.
        ("OPENFHIR_PG_NOTIFY".into(), "false".into()),
        ("OPENFHIR_CATCHUP_INTERVAL_MS".into(), "0".into()),
    ];
    for (k, v) in extra {
        env.retain(|(ek, _)| ek != k);
        env.push((k.to_string(), v.to_string()));
    }
    env
}

async fn start(db_url: &str, env: &[(String, String)]) -> TestApp {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    spawn_url(db_url, &env).await
}

fn cluster_name() -> String {
    format!("t{:x}", unique_tag())
}

/// True when `app` has `n` alive peers with both connections up.
fn connected(app: &TestApp, n: usize) -> bool {
    let peers = app.node.cluster().peers();
    peers
        .iter()
        .filter(|p| p.state == cluster::PeerState::Alive && p.inbound && p.outbound)
        .count()
        == n
}

async fn all_connected(apps: &[&TestApp]) {
    let n = apps.len() - 1;
    for a in apps {
        assert!(
            wait_for(10, || connected(a, n)).await,
            "{} never saw {n} connected peers: {:#}",
            a.base,
            a.cluster_json().await["cluster"]
        );
    }
}

/// GETs `path` on `app` until the body contains `want` (bounded); returns how many reads it took.
async fn reads_until(app: &TestApp, path: &str, want: &str) -> Option<usize> {
    for i in 1..=500 {
        let body = app.get_text(path).await;
        if body.contains(want) {
            return Some(i);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tcp_three_nodes_update_reaches_peers_over_the_peer_channel_alone() {
    let db = TestDb::new().await;
    let name = cluster_name();
    let hosts = "127.0.0.2[7800],127.0.0.3[7800],127.0.0.4[7800]";
    let n1 = start(&db.url, &node_env(&name, "127.0.0.2", hosts, &[])).await;
    let n2 = start(&db.url, &node_env(&name, "127.0.0.3", hosts, &[])).await;
    let n3 = start(&db.url, &node_env(&name, "127.0.0.4", hosts, &[])).await;
    all_connected(&[&n1, &n2, &n3]).await;
    // Each node recognised its own address in the list and does not dial it.
    for n in [&n1, &n2, &n3] {
        let own = n.node.cluster().local_addr().unwrap();
        assert!(
            wait_for(5, || n.node.cluster().report().own_addrs.contains(&own)).await,
            "{own} not recognised as itself"
        );
    }

    assert_eq!(
        n1.put_opt("growth", &opt_xml("growth", "version-one"))
            .await,
        200
    );
    for n in [&n1, &n2, &n3] {
        assert!(n.get_text("/opt/growth").await.contains("version-one"));
        // Cached now: a second read is a hit.
        assert!(n.get_text("/opt/growth").await.contains("version-one"));
    }
    let applied_before = n2.node.cluster().counters().applied;

    assert_eq!(
        n1.put_opt("growth", &opt_xml("growth", "version-two"))
            .await,
        200
    );
    for n in [&n2, &n3] {
        let reads = reads_until(n, "/opt/growth", "version-two").await;
        assert!(reads.is_some(), "{} kept serving the old OPT", n.base);
        eprintln!("{}: fresh after {} read(s)", n.base, reads.unwrap());
    }
    assert!(n2.node.cluster().counters().applied > applied_before);
    // The database channels were off: nothing but the peer channel evicted.
    let inv = n2.cluster_json().await["invalidation"].clone();
    assert_eq!(inv["listener"], "disabled", "{inv:#}");

    // The cluster report shows every peer and the traffic.
    let c = n1.cluster_json().await["cluster"].clone();
    assert_eq!(c["name"], name);
    assert_eq!(c["discovery"], "TCP");
    assert_eq!(c["seq"], 2, "two writes broadcast: {c:#}");
    let peers = c["peers"].as_array().unwrap();
    assert_eq!(peers.len(), 2, "{c:#}");
    for p in peers {
        assert_eq!(p["state"], "alive");
        assert!(p["sent"].as_u64().unwrap() >= 2, "{p:#}");
        assert_eq!(p["missed"], false);
    }
    n3.stop().await;
    n2.stop().await;
    n1.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_node_is_detected_and_rejoins_when_restarted() {
    let db = TestDb::new().await;
    let name = cluster_name();
    let hosts = "127.0.5.2[7800],127.0.5.3[7800],127.0.5.4[7800]";
    let a = start(&db.url, &node_env(&name, "127.0.5.2", hosts, &[])).await;
    let b = start(&db.url, &node_env(&name, "127.0.5.3", hosts, &[])).await;
    let c = start(&db.url, &node_env(&name, "127.0.5.4", hosts, &[])).await;
    all_connected(&[&a, &b, &c]).await;
    let c_id = c.node.id().to_string();
    c.abort();

    for n in [&a, &b] {
        let state = |n: &TestApp| {
            n.node
                .cluster()
                .peers()
                .into_iter()
                .find(|p| p.node_id == c_id)
                .map(|p| p.state)
        };
        assert!(
            wait_for(10, || state(n) == Some(cluster::PeerState::Gone)).await,
            "{}: the killed node is {:?}, not gone",
            n.base,
            state(n)
        );
    }

    // Restarted on the same address (with a new node id), it rejoins without operator action.
    let c = start(&db.url, &node_env(&name, "127.0.5.4", hosts, &[])).await;
    all_connected(&[&a, &b, &c]).await;
    assert_eq!(a.put_opt("weight", &opt_xml("weight", "w-one")).await, 200);
    assert!(c.get_text("/opt/weight").await.contains("w-one"));
    assert_eq!(a.put_opt("weight", &opt_xml("weight", "w-two")).await, 200);
    assert!(
        reads_until(&c, "/opt/weight", "w-two").await.is_some(),
        "the restarted node missed a later invalidation"
    );
    // One row per address: the old node id was replaced.
    let rows = a.node.cluster().peers();
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert!(rows.iter().all(|p| p.node_id != c_id));
    c.stop().await;
    b.stop().await;
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_that_shuts_down_is_seen_leaving_at_once() {
    let db = TestDb::new().await;
    let name = cluster_name();
    let hosts = "127.0.6.2[7800],127.0.6.3[7800]";
    // Default 1 s heartbeats: gone only after 10 s of silence, so "left" can only come from Leave.
    let slow = [("CLUSTER_HEARTBEAT_MS", "1000")];
    let a = start(&db.url, &node_env(&name, "127.0.6.2", hosts, &slow)).await;
    let b = start(&db.url, &node_env(&name, "127.0.6.3", hosts, &slow)).await;
    all_connected(&[&a, &b]).await;
    let b_id = b.node.id().to_string();
    let stopped = std::time::Instant::now();
    b.stop().await;
    let left = || {
        a.node
            .cluster()
            .peers()
            .iter()
            .any(|p| p.node_id == b_id && p.state == cluster::PeerState::Left)
    };
    assert!(wait_for(5, left).await, "{:?}", a.node.cluster().peers());
    eprintln!("left seen {:?} after shutdown began", stopped.elapsed());
    a.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Refusals and hostile peers

fn fake_identity(cluster: &str, version: &str, node_id: &str, addr: &str) -> Identity {
    Identity {
        cluster: cluster.into(),
        node_id: node_id.into(),
        version: version.into(),
        advertised_addr: addr.into(),
    }
}

async fn dial(addr: SocketAddr) -> TcpStream {
    TcpStream::connect(addr).await.unwrap()
}

fn rejected(app: &TestApp, reason: &str) -> bool {
    app.node
        .cluster()
        .report()
        .rejected
        .iter()
        .any(|r| r.reason == reason)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn other_versions_clusters_and_secrets_are_refused_and_listed() {
    let db = TestDb::new().await;
    let name = cluster_name();
    let secret = "s3cret-s3cret-s3cret";
    // A fake node of another release listens in the node's host list: the node dials it and
    // refuses it.
    let fake_server = TcpListener::bind("127.0.7.9:7800").await.unwrap();
    let hosts = "127.0.7.2[7800],127.0.7.9[7800]";
    let a = start(
        &db.url,
        &node_env(&name, "127.0.7.2", hosts, &[("CLUSTER_SECRET", secret)]),
    )
    .await;
    let a_addr = a.node.cluster().local_addr().unwrap();
    let server_secret = ClusterSecret::new(secret);
    let server_name = name.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = fake_server.accept().await else {
                return;
            };
            let id = fake_identity(&server_name, "9.9.9", "fake-server", "127.0.7.9:7800");
            let _ = cluster::accept(&mut s, &id, server_secret.as_ref()).await;
        }
    });
    assert!(wait_for(10, || rejected(&a, "version")).await);
    let r = a.node.cluster().report();
    let v = r.rejected.iter().find(|r| r.reason == "version").unwrap();
    assert!(
        v.message.contains("9.9.9") && v.message.contains(env!("CARGO_PKG_VERSION")),
        "the refusal names both versions: {v:?}"
    );
    assert_eq!(v.addr, "127.0.7.9:7800");

    // Clients of another version, another cluster, without the secret and with a wrong one.
    let good = ClusterSecret::new(secret);
    let wrong = ClusterSecret::new("another-secret-entirely");
    let cases: Vec<(Identity, Option<ClusterSecret>, &str)> = vec![
        (
            fake_identity(&name, "0.0.1", "old", "127.0.7.3:7800"),
            good.clone(),
            "version",
        ),
        (
            fake_identity(
                "other-cluster",
                env!("CARGO_PKG_VERSION"),
                "x",
                "127.0.7.4:7800",
            ),
            good.clone(),
            "cluster_name",
        ),
        (
            fake_identity(
                &name,
                env!("CARGO_PKG_VERSION"),
                "nosecret",
                "127.0.7.5:7800",
            ),
            None,
            "auth",
        ),
        (
            fake_identity(
                &name,
                env!("CARGO_PKG_VERSION"),
                "badsecret",
                "127.0.7.6:7800",
            ),
            wrong,
            "auth",
        ),
    ];
    for (id, secret, reason) in cases {
        let mut s = dial(a_addr).await;
        let r = cluster::connect(&mut s, &id, secret.as_ref()).await;
        let e = r.expect_err("the node must refuse");
        match (e.reason(), reason) {
            (Some(RejectReason::Version { .. }), "version")
            | (Some(RejectReason::ClusterName { .. }), "cluster_name")
            | (Some(RejectReason::Auth), "auth") => {}
            other => panic!("{reason}: got {other:?} ({e})"),
        }
        assert!(
            wait_for(5, || rejected(&a, reason)).await,
            "{reason} not listed"
        );
    }
    // The two secret failures are counted as unauthenticated.
    assert!(
        a.node.cluster().counters().frames_unauthenticated >= 2,
        "{:?}",
        a.node.cluster().counters()
    );
    // None of them became a peer.
    assert!(
        a.node.cluster().peers().is_empty(),
        "{:?}",
        a.node.cluster().peers()
    );
    let json = a.cluster_json().await;
    assert_eq!(json["cluster"]["authenticated"], true);
    assert!(
        json["cluster"]["rejected"].as_array().unwrap().len() >= 4,
        "{json:#}"
    );
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn garbage_oversized_and_forged_frames_do_not_disturb_the_cluster() {
    let db = TestDb::new().await;
    let name = cluster_name();
    let secret = "0123456789abcdef0123";
    let hosts = "127.0.8.2[7800],127.0.8.3[7800]";
    let extra = [("CLUSTER_SECRET", secret)];
    let a = start(&db.url, &node_env(&name, "127.0.8.2", hosts, &extra)).await;
    let b = start(&db.url, &node_env(&name, "127.0.8.3", hosts, &extra)).await;
    all_connected(&[&a, &b]).await;
    let a_addr = a.node.cluster().local_addr().unwrap();

    // Garbage instead of a handshake.
    let mut s = dial(a_addr).await;
    s.write_all(b"\x00\x00\x00\x10this is not json")
        .await
        .unwrap();
    // A frame header claiming 100 MB.
    let mut s2 = dial(a_addr).await;
    s2.write_all(&(100u32 << 20).to_be_bytes()).await.unwrap();
    // A peer that holds the secret, then sends a frame with a broken MAC.
    let id = fake_identity(&name, env!("CARGO_PKG_VERSION"), "forger", "127.0.8.9:7800");
    let mut s3 = dial(a_addr).await;
    let session = cluster::connect(&mut s3, &id, ClusterSecret::new(secret).as_ref())
        .await
        .unwrap();
    let (_, mut sealer, _) = session.into_parts();
    let env = Envelope::new(
        name.clone(),
        Message::Heartbeat(Heartbeat {
            origin: "forger".into(),
            seq: 0,
            at_unix_ms: 0,
            peers: Vec::new(),
        }),
    );
    let mut sealed = sealer
        .seal(&cluster::encode_body(&env.body).unwrap())
        .unwrap();
    // Replayed: the same sealed frame twice.
    cluster::write_frame(&mut s3, &sealed).await.unwrap();
    cluster::write_frame(&mut s3, &sealed).await.unwrap();
    // And a tampered one on a fresh session.
    let mut s4 = dial(a_addr).await;
    let session = cluster::connect(&mut s4, &id, ClusterSecret::new(secret).as_ref())
        .await
        .unwrap();
    let (_, mut sealer, _) = session.into_parts();
    sealed = sealer
        .seal(&cluster::encode_body(&env.body).unwrap())
        .unwrap();
    let last = sealed.len() - 2;
    sealed[last] ^= 1;
    cluster::write_frame(&mut s4, &sealed).await.unwrap();

    let counters_ok = || {
        let c = a.node.cluster().counters();
        c.handshakes_failed >= 2 && c.frames_unauthenticated >= 2
    };
    assert!(
        wait_for(5, counters_ok).await,
        "{:?}",
        a.node.cluster().counters()
    );
    // Nothing disturbed the real peers: a write on b still reaches a.
    assert_eq!(b.put_opt("bp", &opt_xml("bp", "bp-one")).await, 200);
    assert!(a.get_text("/opt/bp").await.contains("bp-one"));
    assert_eq!(b.put_opt("bp", &opt_xml("bp", "bp-two")).await, 200);
    assert!(reads_until(&a, "/opt/bp", "bp-two").await.is_some());
    assert!(connected(&a, 1), "{:?}", a.node.cluster().peers());
    b.stop().await;
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unauthenticated_peer_cannot_inject_an_invalidation() {
    let db = TestDb::new().await;
    let name = cluster_name();
    let secret = "a-long-enough-cluster-secret";
    let hosts = "127.0.9.2[7800]";
    let a = start(
        &db.url,
        &node_env(&name, "127.0.9.2", hosts, &[("CLUSTER_SECRET", secret)]),
    )
    .await;
    assert_eq!(a.put_opt("inj", &opt_xml("inj", "inj-one")).await, 200);
    assert!(a.get_text("/opt/inj").await.contains("inj-one"));
    let a_addr = a.node.cluster().local_addr().unwrap();
    // An Invalidate sent as the first frame, without any handshake.
    let inv = Envelope::new(
        name.clone(),
        Message::Invalidate(Invalidate {
            origin: "intruder".into(),
            seq: 1,
            log_position: None,
            change: Change::Evict {
                group: None,
                tenant: None,
                key: None,
            },
            at_unix_ms: None,
        }),
    );
    let mut s = dial(a_addr).await;
    cluster::write_frame(&mut s, &inv.encode().unwrap())
        .await
        .unwrap();
    assert!(wait_for(5, || a.node.cluster().counters().handshakes_failed >= 1).await);
    // Still cached: the flush was not applied.
    let before = a.stats(openfhir_cache::cache::CacheName::Opt).await;
    assert!(a.get_text("/opt/inj").await.contains("inj-one"));
    let after = a.stats(openfhir_cache::cache::CacheName::Opt).await;
    assert_eq!(
        after.stats.hits,
        before.stats.hits + 1,
        "the entry was evicted by an intruder"
    );
    assert_eq!(a.node.cluster().counters().applied, 0);
    a.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Gaps and overflow

/// A fake peer that completes the handshake with `a` and sends invalidations with chosen
/// sequence numbers: the node notices the gap and catches up from the database.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sequence_gap_makes_the_receiver_catch_up_from_the_database() {
    let db = TestDb::new().await;
    let name = cluster_name();
    let a = start(
        &db.url,
        &node_env(&name, "127.0.10.2", "127.0.10.2[7800]", &[]),
    )
    .await;
    let a_addr = a.node.cluster().local_addr().unwrap();
    let id = fake_identity(&name, env!("CARGO_PKG_VERSION"), "gappy", "127.0.10.9:7800");
    let mut s = dial(a_addr).await;
    let session = cluster::connect(&mut s, &id, None).await.unwrap();
    let (_, mut sealer, _) = session.into_parts();
    let steps_before = a.node.invalidation_report().catchup_steps;
    for seq in [1u64, 2, 5] {
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
    let gap_seen = || {
        a.node
            .cluster()
            .peers()
            .iter()
            .any(|p| p.node_id == "gappy" && p.gaps == 1 && p.last_seq == 5)
    };
    assert!(
        wait_for(5, gap_seen).await,
        "{:?}",
        a.node.cluster().peers()
    );
    assert!(
        wait_for(5, || a.node.invalidation_report().catchup_steps
            > steps_before)
        .await,
        "no catch-up after the gap"
    );
    assert!(a.node.cluster().counters().gap_catchups >= 1);
    a.stop().await;
}

/// A peer that does not read while the node broadcasts faster than it can send: the queue
/// overflows, the peer is marked as having missed messages, and the heartbeat after the drop
/// carries the highest dropped sequence number, so the peer can see the gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_overflowing_queue_marks_the_peer_and_never_blocks_the_writer() {
    let db = TestDb::new().await;
    let name = cluster_name();
    let slow = TcpListener::bind("127.0.11.9:7800").await.unwrap();
    let a = start(
        &db.url,
        &node_env(
            &name,
            "127.0.11.2",
            "127.0.11.2[7800],127.0.11.9[7800]",
            &[("CLUSTER_SEND_QUEUE", "4")],
        ),
    )
    .await;
    let (mut s, _) = slow.accept().await.unwrap();
    let id = fake_identity(&name, env!("CARGO_PKG_VERSION"), "slow", "127.0.11.9:7800");
    let session = cluster::accept(&mut s, &id, None).await.unwrap();
    let (_, _, mut opener) = session.into_parts();
    assert!(wait_for(5, || a.node.cluster().peers().iter().any(|p| p.outbound)).await);

    // Far more than the queue holds, in a burst: broadcast never waits.
    let change = Change::Opt {
        tenant: "default".into(),
        template_id: "x".repeat(2000),
    };
    for _ in 0..5000 {
        a.node.cluster().broadcast(&change, None);
    }
    let last = a.node.cluster().seq();
    let peer = a.node.cluster().peers().pop().unwrap();
    assert!(peer.dropped > 0 && peer.missed, "{peer:?}");

    // Read what arrives: invalidations with holes, then heartbeats that report `last`.
    let mut invalidations = 0u64;
    let mut hb_seq = 0;
    let read = async {
        loop {
            let env = opener.recv(&mut s, &name).await.unwrap();
            match env.body {
                Message::Invalidate(i) => {
                    assert!(i.seq <= last);
                    invalidations += 1;
                }
                Message::Heartbeat(h) => {
                    hb_seq = h.seq;
                    if h.seq == last {
                        break;
                    }
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("a heartbeat reporting the last sequence number");
    assert_eq!(hb_seq, last);
    // Some never arrived: the peer can only know from the heartbeat's sequence number.
    assert!(invalidations < last, "{invalidations} of {last} arrived");
    a.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Discovery modes other than TCP

/// MULTICAST is the default: three nodes on one machine find each other with no discovery
/// settings at all. (The test gives them their own addresses, cluster name and multicast port
/// only so that parallel tests stay apart.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn multicast_three_nodes_find_each_other_with_no_configuration() {
    let db = TestDb::new().await;
    let name = cluster_name();
    let group = format!("239.255.78.2:{}", 20000 + unique_tag() % 40000);
    let env = |ip: &str| -> Vec<(String, String)> {
        vec![
            ("CLUSTER_NAME".into(), name.clone()),
            ("CLUSTER_BIND_ADDR".into(), ip.into()),
            ("CLUSTER_PORT".into(), "7800".into()),
            ("CLUSTER_MULTICAST_ADDR".into(), group.clone()),
            ("CLUSTER_HEARTBEAT_MS".into(), "100".into()),
            ("OPENFHIR_PG_NOTIFY".into(), "false".into()),
            ("OPENFHIR_CATCHUP_INTERVAL_MS".into(), "0".into()),
        ]
    };
    let n1 = start(&db.url, &env("127.0.12.2")).await;
    let n2 = start(&db.url, &env("127.0.12.3")).await;
    let n3 = start(&db.url, &env("127.0.12.4")).await;
    all_connected(&[&n1, &n2, &n3]).await;
    let c = n1.cluster_json().await["cluster"].clone();
    assert_eq!(c["discovery"], "MULTICAST");
    assert!(c["discovered"].as_array().unwrap().len() >= 2, "{c:#}");

    assert_eq!(n2.put_opt("mc", &opt_xml("mc", "mc-one")).await, 200);
    assert!(n3.get_text("/opt/mc").await.contains("mc-one"));
    assert_eq!(n2.put_opt("mc", &opt_xml("mc", "mc-two")).await, 200);
    assert!(reads_until(&n3, "/opt/mc", "mc-two").await.is_some());
    n3.stop().await;
    n2.stop().await;
    n1.stop().await;
}

/// DNS mode: the test's own DNS server answers the headless-service name with the nodes'
/// addresses; a fourth node added to the zone later is picked up by every node's lookups, and a
/// node removed from the zone is dropped from discovery.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dns_nodes_find_each_other_and_a_pod_added_later_joins() {
    use common::dns::TestDns;
    use std::net::IpAddr;
    let db = TestDb::new().await;
    let name = cluster_name();
    let query = "openfhir-cluster.default.svc.cluster.local";
    let ip = |n: u8| IpAddr::from([127, 0, 13, n]);
    let dns = TestDns::start(query, vec![ip(2), ip(3), ip(4)]).await;
    let server = dns.addr.to_string();
    let env = |n: u8| -> Vec<(String, String)> {
        node_env(
            &name,
            &ip(n).to_string(),
            "",
            &[
                ("CLUSTER_DISCOVERY", "DNS"),
                ("CLUSTER_DNS_QUERY", query),
                ("CLUSTER_DNS_SERVER", &server),
                ("CLUSTER_DNS_INTERVAL", "1"),
                ("CLUSTER_INITIAL_HOSTS", ""),
            ],
        )
    };
    let n1 = start(&db.url, &env(2)).await;
    let n2 = start(&db.url, &env(3)).await;
    let n3 = start(&db.url, &env(4)).await;
    all_connected(&[&n1, &n2, &n3]).await;
    assert_eq!(n1.cluster_json().await["cluster"]["discovery"], "DNS");

    // A new pod: in the zone first (as a headless service with publishNotReadyAddresses does),
    // then started.
    dns.set(vec![ip(2), ip(3), ip(4), ip(5)]);
    let n4 = start(&db.url, &env(5)).await;
    all_connected(&[&n1, &n2, &n3, &n4]).await;
    let fourth: SocketAddr = (ip(5), 7800).into();
    for n in [&n1, &n2, &n3] {
        assert!(
            wait_for(5, || n.node.cluster().report().discovered.contains(&fourth)).await,
            "{} never resolved the new pod",
            n.base
        );
    }
    assert_eq!(n4.put_opt("dn", &opt_xml("dn", "dn-one")).await, 200);
    assert!(n1.get_text("/opt/dn").await.contains("dn-one"));
    assert_eq!(n4.put_opt("dn", &opt_xml("dn", "dn-two")).await, 200);
    assert!(reads_until(&n1, "/opt/dn", "dn-two").await.is_some());

    // The pod goes away: out of the zone, and out of discovery on the next lookup.
    dns.set(vec![ip(2), ip(3), ip(4)]);
    n4.stop().await;
    for n in [&n1, &n2, &n3] {
        assert!(
            wait_for(5, || !n
                .node
                .cluster()
                .report()
                .discovered
                .contains(&fourth))
            .await,
            "{} still dials the removed pod",
            n.base
        );
    }
    n3.stop().await;
    n2.stop().await;
    n1.stop().await;
}

/// A write whose request is cancelled mid-way (a timeout, a client gone) may still commit: the
/// node announces its changes to the peers anyway, here while the database channels are off.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cancelled_write_is_still_announced_to_the_peers() {
    use openfhir_cache::node::Put;
    let db = TestDb::new().await;
    let name = cluster_name();
    let hosts = "127.0.73.1[7800],127.0.73.2[7800]";
    let a = start(&db.url, &node_env(&name, "127.0.73.1", hosts, &[])).await;
    let b = start(&db.url, &node_env(&name, "127.0.73.2", hosts, &[])).await;
    all_connected(&[&a, &b]).await;
    assert_eq!(a.put_opt("held", &opt_xml("held", "one")).await, 200);
    assert!(b.get_text("/opt/held").await.contains("one"));
    assert!(b.node.caches().opt.contains("default", Some("held")).await);

    // The row is locked elsewhere, so A's write waits; its caller gives up.
    let mut sql = a.sql().await;
    let lock = sql.transaction().await.unwrap();
    lock.execute(
        "SELECT 1 FROM opt WHERE template_id = 'held' FOR UPDATE",
        &[],
    )
    .await
    .unwrap();
    let xml = opt_xml("held", "two");
    let cancelled = tokio::time::timeout(
        Duration::from_millis(300),
        a.node.put_opt("default", &xml, Put::At("held")),
    )
    .await;
    assert!(
        cancelled.is_err(),
        "the write was expected to wait on the lock"
    );
    assert!(
        wait_for(5, || {
            futures_util::FutureExt::now_or_never(
                b.node.caches().opt.contains("default", Some("held")),
            ) == Some(false)
        })
        .await,
        "B was never told of the cancelled write"
    );
    lock.rollback().await.unwrap();
}

/// A packet capture on the loopback interface (an `AF_PACKET` socket, as tcpdump uses; needs
/// root or `CAP_NET_RAW`, which CI has): every TCP segment with a payload, as the kernel sent it.
mod capture {
    use std::net::{Ipv4Addr, SocketAddrV4};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::thread::JoinHandle;

    /// One TCP segment seen on `lo`.
    pub struct Segment {
        pub src: SocketAddrV4,
        pub dst: SocketAddrV4,
        pub payload: Vec<u8>,
    }

    pub struct Capture {
        stop: Arc<AtomicBool>,
        thread: JoinHandle<Vec<Segment>>,
    }

    /// Starts capturing; panics (failing the test loudly) when the socket cannot be opened.
    pub fn start() -> Capture {
        // SAFETY: plain socket calls on a descriptor this function owns; every result is checked.
        let fd = unsafe {
            let proto = (libc::ETH_P_ALL as u16).to_be() as libc::c_int;
            let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, proto);
            assert!(
                fd >= 0,
                "cannot open a packet capture socket (needs root or CAP_NET_RAW): {}",
                std::io::Error::last_os_error()
            );
            let lo = libc::if_nametoindex(c"lo".as_ptr());
            assert!(lo > 0, "no loopback interface");
            let mut sll: libc::sockaddr_ll = std::mem::zeroed();
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
            sll.sll_ifindex = lo as i32;
            let r = libc::bind(
                fd,
                &sll as *const libc::sockaddr_ll as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            );
            assert_eq!(r, 0, "bind: {}", std::io::Error::last_os_error());
            let timeout = libc::timeval {
                tv_sec: 0,
                tv_usec: 50_000,
            };
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &timeout as *const libc::timeval as *const libc::c_void,
                std::mem::size_of::<libc::timeval>() as u32,
            );
            let size: libc::c_int = 16 << 20;
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                &size as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as u32,
            );
            fd
        };
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut out = Vec::new();
            let mut buf = vec![0u8; 1 << 17];
            while !flag.load(Ordering::Relaxed) {
                // SAFETY: `buf` is valid for its length; the result is checked.
                let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
                if n > 0 {
                    out.extend(parse(&buf[..n as usize]));
                }
            }
            // SAFETY: the descriptor is this thread's and closed once.
            unsafe { libc::close(fd) };
            out
        });
        Capture { stop, thread }
    }

    impl Capture {
        /// Stops and returns what was captured.
        pub fn stop(self) -> Vec<Segment> {
            self.stop.store(true, Ordering::Relaxed);
            self.thread.join().expect("capture thread")
        }
    }

    /// A loopback frame: a 14-byte Ethernet header, IPv4, TCP.
    fn parse(frame: &[u8]) -> Option<Segment> {
        let ip = frame.get(14..)?;
        if frame.get(12..14)? != [0x08, 0x00] || ip.first()? >> 4 != 4 || *ip.get(9)? != 6 {
            return None;
        }
        let ihl = usize::from(ip[0] & 0x0f) * 4;
        let total = usize::from(u16::from_be_bytes([ip[2], ip[3]])).min(ip.len());
        let tcp = ip.get(ihl..total)?;
        let doff = usize::from(tcp.get(12)? >> 4) * 4;
        let payload = tcp.get(doff..)?.to_vec();
        let addr = |a: &[u8], p: &[u8]| {
            SocketAddrV4::new(
                Ipv4Addr::new(a[0], a[1], a[2], a[3]),
                u16::from_be_bytes([p[0], p[1]]),
            )
        };
        (!payload.is_empty()).then(|| Segment {
            src: addr(&ip[12..16], &tcp[0..2]),
            dst: addr(&ip[16..20], &tcp[2..4]),
            payload,
        })
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Two nodes propagate a write while the loopback interface is captured: without a secret the
/// template id is on the wire (which shows the capture sees the cluster traffic); with one, no
/// segment of the cluster channel carries the template id, the tenant or a node id in clear.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_a_secret_no_invalidation_crosses_the_wire_in_clear() {
    let db = TestDb::new().await;
    for (secret, a_ip, b_ip) in [
        (None, "127.0.74.1", "127.0.74.2"),
        (
            Some("wiretap-secret-0123456789"),
            "127.0.74.3",
            "127.0.74.4",
        ),
    ] {
        let name = cluster_name();
        let hosts = format!("{a_ip}[7800],{b_ip}[7800]");
        let extra: Vec<(&str, &str)> = secret.map(|s| ("CLUSTER_SECRET", s)).into_iter().collect();
        let a = start(&db.url, &node_env(&name, a_ip, &hosts, &extra)).await;
        let b = start(&db.url, &node_env(&name, b_ip, &hosts, &extra)).await;
        all_connected(&[&a, &b]).await;
        let template = format!("wiretap_probe_{:x}", unique_tag());
        let path = format!("/opt/{template}");
        assert_eq!(
            a.put_opt(&template, &opt_xml(&template, "before")).await,
            200
        );
        assert!(b.get_text(&path).await.contains("before"));

        let cap = capture::start();
        assert_eq!(
            a.put_opt(&template, &opt_xml(&template, "after")).await,
            200
        );
        // NOTIFY and catch-up are off: only the peer channel can have told b.
        assert!(reads_until(&b, &path, "after").await.is_some());
        // A heartbeat or two more, so the capture surely holds the whole exchange.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let segments = cap.stop();

        let ours = |a: &std::net::SocketAddrV4| {
            let ip = a.ip().to_string();
            ip == a_ip || ip == b_ip
        };
        let cluster: Vec<_> = segments
            .iter()
            .filter(|s| ours(&s.src) && ours(&s.dst))
            .filter(|s| s.src.port() == 7800 || s.dst.port() == 7800)
            .collect();
        let bytes: usize = cluster.iter().map(|s| s.payload.len()).sum();
        assert!(bytes > 0, "the capture saw no cluster traffic");
        let clear = |needle: &str| {
            cluster
                .iter()
                .any(|s| contains(&s.payload, needle.as_bytes()))
        };
        let a_id = a.node.id().to_string();
        match secret {
            None => {
                assert!(
                    clear(&template),
                    "without a secret the template id is in clear"
                );
            }
            Some(_) => {
                for needle in [
                    template.as_str(),
                    "default",
                    "invalidate",
                    "heartbeat",
                    &a_id,
                ] {
                    assert!(
                        !clear(needle),
                        "{needle:?} crossed the wire in clear ({bytes} bytes captured)"
                    );
                }
                assert!(b.node.cluster().report().encrypted);
            }
        }
        a.stop().await;
        b.stop().await;
    }
}

/// A peer whose node id could break `/metrics` or the logs (quotes, a newline, a forged series)
/// is refused at the handshake, the refusal is listed, and the scrape stays well-formed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_peer_with_a_hostile_node_id_is_refused() {
    let db = TestDb::new().await;
    let name = cluster_name();
    let a = start(
        &db.url,
        &node_env(&name, "127.0.74.10", "127.0.74.10[7800]", &[]),
    )
    .await;
    let a_addr = a.node.cluster().local_addr().unwrap();
    let hostile = "evil\"} 1\nopenfhir_forged_series 1\n#";
    let id = fake_identity(
        &name,
        env!("CARGO_PKG_VERSION"),
        hostile,
        "127.0.74.11:7800",
    );
    let mut s = dial(a_addr).await;
    let e = cluster::connect(&mut s, &id, None)
        .await
        .expect_err("the node must refuse a hostile node id");
    assert_eq!(e.reason(), Some(&RejectReason::Protocol), "{e}");
    assert!(e.to_string().contains("node id"), "{e}");
    assert!(wait_for(5, || rejected(&a, "protocol")).await);
    assert!(a.node.cluster().peers().is_empty());
    let metrics = a.get_text("/metrics").await;
    assert!(!metrics.contains("openfhir_forged_series"), "{metrics}");
    assert!(!metrics.contains("evil"), "{metrics}");
    a.stop().await;
}
