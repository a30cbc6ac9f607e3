//! Clusters across real network interfaces: Linux network namespaces on a bridge.
//!
//! Each test builds its own network ([`net::Net`]): a bridge in the root namespace and one
//! namespace per node, joined by veth pairs, as Docker's bridge network does (the bridge is the
//! namespaces' default gateway). Nodes are the real binary, `ip netns exec <ns> openfhir-cache
//! serve`, each on `0.0.0.0:8080` and cluster port 7800 in its namespace; the test reaches them
//! over the bridge. Each test has its own private PostgreSQL listening on the bridge address, so
//! the nodes reach it over their veth like any other host. Names carry the test process's pid
//! (modulo 1000) and the scenario number, and everything is removed when the test ends, also on
//! panic.
//!
//! - `multicast_default`: nodes with no cluster settings at all (MULTICAST on
//!   `239.255.78.0:45588`, the default) find each other across the bridge and propagate writes.
//! - `multicast_ipv6`: the same with `CLUSTER_BIND_ADDR=::` only (one node: its own IPv6
//!   address): announcements go to the IPv6 default group `[ff15::78]:45588` and peers link over
//!   IPv6.
//! - `dns_server_in_its_own_namespace`: DNS discovery asking a DNS server that runs in a fourth
//!   namespace.
//! - `tcp_one_sided_hosts`: TCP discovery where only node 0 lists the others: node 0 links
//!   with both and propagates both ways. `tcp_one_sided_hosts_full_mesh`: nodes 1 and 2 link
//!   too, from the peer lists in node 0's heartbeats.
//! - `partition_under_load`: one node's veth goes down under a read/write load, then up: no
//!   stale read once it is back and settled, and every key on every node equals the database.
//! - `rolling_restart_under_load`: every node in turn gets SIGTERM and is started again while a
//!   load writes through the others and reads everywhere: no failed write outside the restarting
//!   node and no stale read.
//!
//! In the discovery tests NOTIFY and catch-up are off (`OPENFHIR_PG_NOTIFY=false`,
//! `OPENFHIR_CATCHUP_INTERVAL_MS=0`), so a write reaches the other nodes only over the peer
//! channel: a cluster that did not link fails the propagation check. The load tests keep the
//! database channels on, as in production.
//!
//! These tests need root (network namespaces, veth, bridges) and `ip` (iproute2). Without them
//! they fail with the command and its error; they never skip. `NETNS_NODE_ENV=K=V,K=V` adds
//! settings to every node (to see the checks fail, e.g. with a build whose peer channel does not
//! broadcast). Node logs are under `<target>/netns/<test>-<pid>/`, kept when a test fails or with
//! `NETNS_KEEP_LOGS=1`.

mod common;

#[path = "netns/load.rs"]
mod load;
#[path = "netns/net.rs"]
mod net;
#[path = "netns/nodes.rs"]
mod nodes;

use std::net::IpAddr;
use std::time::Duration;

use load::{converge, read, write, Load, Role};
use nodes::{Scenario, CLUSTER_PORT};

/// Settings that leave the peer channel as the only way a change reaches another node.
const PEER_ONLY: [(&str, &str); 2] = [
    ("OPENFHIR_PG_NOTIFY", "false"),
    ("OPENFHIR_CATCHUP_INTERVAL_MS", "0"),
];

/// How long the cluster may take to form.
const FORM: Duration = Duration::from_secs(30);

/// Runs a test's future on a current-thread runtime on the test's own thread (the nodes' parent
/// death signal is tied to the thread that spawned them).
fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

/// Writes each key through each node in turn, after reading it on every node (so caches hold the
/// old value), and requires every other node to serve the new value within 5 s.
async fn propagate(s: &Scenario) {
    let n = s.nodes.len();
    let routes: Vec<(usize, Vec<usize>)> = (0..n)
        .map(|w| (w, (0..n).filter(|&r| r != w).collect()))
        .collect();
    propagate_along(s, &routes).await;
}

/// For each `(writer, readers)`: writes three keys through `writer`, after reading them on every
/// node (so caches hold the old value), and requires each of `readers` to serve the new value
/// within 5 s. Three rounds.
async fn propagate_along(s: &Scenario, routes: &[(usize, Vec<usize>)]) {
    let mut failures = Vec::new();
    let mut seq = 1;
    for _round in 0..3 {
        for (k, (node, readers)) in routes.iter().enumerate() {
            let key = format!("netns_k{k}");
            for i in 0..s.nodes.len() {
                let _ = read(&s.http, &s.nodes[i].base, &key).await;
            }
            write(&s.http, &s.nodes[*node].base, &key, seq)
                .await
                .unwrap_or_else(|e| panic!("{}: write through node {node}: {e}", s.name));
            for &j in readers {
                if let Err(e) = converge(
                    &s.http,
                    &s.nodes[j].base,
                    &key,
                    seq,
                    Duration::from_secs(5),
                    || true,
                )
                .await
                {
                    failures.push(format!(
                        "m{seq} of {key} written through node {node}, on node {j}: {e}"
                    ));
                }
            }
            seq += 1;
        }
    }
    assert!(
        failures.is_empty(),
        "{}: writes did not propagate over the peer channel:\n  {}\nlogs in {}",
        s.name,
        failures.join("\n  "),
        s.dir.display()
    );
}

#[test]
fn multicast_default() {
    block_on(async {
        // No CLUSTER_* setting at all.
        let s = Scenario::new(1, "multicast_default", 3, 0, &PEER_ONLY);
        s.start_all().await;
        s.wait_links(&Scenario::all_pairs(&[0, 1, 2]), FORM).await;
        propagate(&s).await;
        s.assert_healthy();
    });
}

#[test]
fn multicast_ipv6() {
    block_on(async {
        let mut env = PEER_ONLY.to_vec();
        env.push(("CLUSTER_BIND_ADDR", "::"));
        let mut s = Scenario::new(6, "multicast_ipv6", 3, 0, &env);
        s.v6_cluster = true;
        // One node binds its own address instead: the group is joined on the interface that
        // holds it, and announcements come from it.
        let own = s.nodes[2].ip6.clone();
        s.nodes[2].env = vec![("CLUSTER_BIND_ADDR".into(), own)];
        s.start_all().await;
        s.wait_links(&Scenario::all_pairs(&[0, 1, 2]), FORM).await;
        for i in 0..3 {
            let stderr = s.stderr(i);
            assert!(
                stderr.contains("[ff15::78]:45588"),
                "node {i} does not announce on the IPv6 default group:\n{stderr}"
            );
            // Every node hears every other node's announcements (an early node's start-up
            // announcements may predate a later node: wait for the periodic ones).
            let started = std::time::Instant::now();
            loop {
                let v = s.cluster_json(i).await.expect("GET /cluster");
                let discovered = v["cluster"]["discovered"].to_string();
                let missing: Vec<String> = (0..3)
                    .filter(|&j| j != i)
                    .map(|j| format!("[{}]:{CLUSTER_PORT}", s.nodes[j].ip6))
                    .filter(|want| !discovered.contains(want))
                    .collect();
                if missing.is_empty() {
                    break;
                }
                assert!(
                    started.elapsed() < Duration::from_secs(10),
                    "node {i} did not hear {missing:?} by multicast: {discovered}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        propagate(&s).await;
        s.assert_healthy();
    });
}

#[test]
fn dns_server_in_its_own_namespace() {
    block_on(async {
        const NAME: &str = "openfhir-cluster.netns.test";
        // Nodes in namespaces 0-2, the DNS server in namespace 3.
        let mut s = Scenario::new(2, "dns", 3, 1, &PEER_ONLY);
        let dns_ip = s.net.ip(3);
        let bind_ip = dns_ip.clone();
        let (udp, tcp) = net::in_netns(&s.net.ns[3], move || {
            let udp = std::net::UdpSocket::bind((bind_ip.as_str(), 53))
                .unwrap_or_else(|e| panic!("bind UDP {bind_ip}:53 in the DNS namespace: {e}"));
            let tcp = std::net::TcpListener::bind((bind_ip.as_str(), 53))
                .unwrap_or_else(|e| panic!("bind TCP {bind_ip}:53 in the DNS namespace: {e}"));
            (udp, tcp)
        });
        let ips: Vec<IpAddr> = (0..3).map(|i| s.nodes[i].ip.parse().unwrap()).collect();
        let dns = common::dns::TestDns::start_on(NAME, ips, udp, tcp);
        let server = format!("{dns_ip}:53");
        s.env.extend(
            [
                ("CLUSTER_DISCOVERY", "DNS"),
                ("CLUSTER_DNS_QUERY", NAME),
                ("CLUSTER_DNS_SERVER", server.as_str()),
                ("CLUSTER_DNS_INTERVAL", "1"),
            ]
            .map(|(k, v)| (k.to_string(), v.to_string())),
        );
        s.start_all().await;
        s.wait_links(&Scenario::all_pairs(&[0, 1, 2]), FORM).await;
        assert!(dns.queries() >= 3, "the nodes never asked the DNS server");
        propagate(&s).await;
        s.assert_healthy();
    });
}

/// TCP discovery where only node 0 lists the others (nodes 1 and 2 list only themselves).
fn one_sided(id: u8, name: &'static str) -> Scenario {
    let mut s = Scenario::new(id, name, 3, 0, &PEER_ONLY);
    s.env.push(("CLUSTER_DISCOVERY".into(), "TCP".into()));
    let hosts = |ids: &[usize]| {
        ids.iter()
            .map(|&i| format!("{}[{CLUSTER_PORT}]", s.net.ip(i)))
            .collect::<Vec<_>>()
            .join(",")
    };
    let lists = [hosts(&[1, 2]), hosts(&[1]), hosts(&[2])];
    for (i, list) in lists.into_iter().enumerate() {
        s.nodes[i].env = vec![("CLUSTER_INITIAL_HOSTS".into(), list)];
    }
    s
}

/// What one-sided TCP hosts give today: node 0 dials 1 and 2, and each dials node 0 back, so
/// writes through node 0 reach 1 and 2 and writes through 1 or 2 reach node 0 over the peer
/// channel (between 1 and 2, only NOTIFY and catch-up carry them).
#[test]
fn tcp_one_sided_hosts() {
    block_on(async {
        let s = one_sided(3, "tcp_one_sided");
        s.start_all().await;
        s.wait_links(&[(0, 1), (1, 0), (0, 2), (2, 0)], FORM).await;
        propagate_along(&s, &[(0, vec![1, 2]), (1, vec![0]), (2, vec![0])]).await;
        s.assert_healthy();
    });
}

/// What issue 16 asks of one-sided TCP hosts: all three link. Nodes 1 and 2 list only
/// themselves; they learn of each other from node 0's heartbeats, which list its peers in TCP
/// discovery (`src/cluster/transport/gossip.rs`).
#[test]
fn tcp_one_sided_hosts_full_mesh() {
    block_on(async {
        let s = one_sided(7, "tcp_one_sided_mesh");
        s.start_all().await;
        s.wait_links(&Scenario::all_pairs(&[0, 1, 2]), FORM).await;
        propagate(&s).await;
        s.assert_healthy();
    });
}

/// The load tests' node settings: faster heartbeats and catch-up than the defaults, so a
/// returning node is noticed within a second.
const LOAD_ENV: [(&str, &str); 2] = [
    ("CLUSTER_HEARTBEAT_MS", "200"),
    ("OPENFHIR_CATCHUP_INTERVAL_MS", "500"),
];

/// Settle time after the load stops, before the final check.
const SETTLE: Duration = Duration::from_secs(2);

/// After a load test: settle, then every key on every node equals the database, no failed write
/// or stale read was counted, the load did real work, and no node died.
async fn settle_and_check(s: &Scenario, load: &Load, what: &str) {
    tokio::time::sleep(SETTLE).await;
    let diffs = load.final_check(s, &[0, 1, 2]).await;
    assert!(
        diffs.is_empty(),
        "{what}: nodes differ from the database:\n  {}\nlogs in {}",
        diffs.join("\n  "),
        s.dir.display()
    );
    load.assert_clean(what);
    assert!(load.writes.load(std::sync::atomic::Ordering::Relaxed) > 20);
    println!(
        "{what}: {} writes, {} reads, slowest convergence {:?}",
        load.writes.load(std::sync::atomic::Ordering::Relaxed),
        load.reads.load(std::sync::atomic::Ordering::Relaxed),
        load.max_converge.lock().unwrap()
    );
    s.assert_healthy();
}

#[test]
fn partition_under_load() {
    block_on(async {
        let s = Scenario::new(4, "partition", 3, 0, &LOAD_ENV);
        s.start_all().await;
        let all = Scenario::all_pairs(&[0, 1, 2]);
        s.wait_links(&all, FORM).await;
        let load = Load::new(3, 6, Duration::from_secs(10));
        let control = async {
            tokio::time::sleep(Duration::from_secs(2)).await;
            load.set_role(2, Role::Away);
            s.net.link_down(2);
            // Long enough for the peers to declare it gone (10 heartbeats = 2 s).
            tokio::time::sleep(Duration::from_secs(4)).await;
            let cut = s.missing_links(&[(0, 2), (1, 2)]).await;
            assert_eq!(cut.len(), 2, "the veth going down did not cut node 2 off");
            s.net.link_up(2);
            s.wait_ready(2, Duration::from_secs(30)).await;
            s.wait_links(&all, FORM).await;
            tokio::time::sleep(SETTLE).await;
            // From here on, node 2 is read and checked like the others.
            load.set_role(2, Role::Up);
            tokio::time::sleep(Duration::from_secs(3)).await;
            load.stop();
        };
        tokio::join!(
            load.writer(&s),
            load.reader(&s, 1),
            load.reader(&s, 2),
            control
        );
        settle_and_check(&s, &load, "partition").await;
    });
}

#[test]
fn rolling_restart_under_load() {
    block_on(async {
        let s = Scenario::new(5, "rolling_restart", 3, 0, &LOAD_ENV);
        s.start_all().await;
        let all = Scenario::all_pairs(&[0, 1, 2]);
        s.wait_links(&all, FORM).await;
        let load = Load::new(3, 6, Duration::from_secs(10));
        let control = async {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            for i in 0..3 {
                load.set_role(i, Role::Away);
                s.stop(i).await;
                s.spawn(i);
                s.wait_ready(i, Duration::from_secs(60)).await;
                s.wait_links(&all, FORM).await;
                load.set_role(i, Role::Up);
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            load.stop();
        };
        tokio::join!(
            load.writer(&s),
            load.reader(&s, 1),
            load.reader(&s, 2),
            control
        );
        settle_and_check(&s, &load, "rolling restart").await;
        for (i, n) in s.nodes.iter().enumerate() {
            assert_eq!(
                n.starts.load(std::sync::atomic::Ordering::SeqCst),
                2,
                "node {i} was not restarted"
            );
        }
    });
}
