//! `DNS` discovery against a real DNS server on a loopback port (see `common::dns`): one lookup
//! round, the publishing loop following a changing zone, negative answers, and outages.

use crate::common;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use common::dns::TestDns;
use openfhir_cache::cluster::discovery::dns::{self, DnsError, DnsSettings};
use openfhir_cache::cluster::discovery::{Addrs, Status, StatusReport};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const NAME: &str = "openfhir-cache.pods.test";
const PORT: u16 = 7800;
/// Generous bound for anything that should happen within a few rounds.
const PATIENCE: Duration = Duration::from_secs(20);

fn v4(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
}

fn at_port(ips: &[IpAddr]) -> Addrs {
    ips.iter().map(|ip| SocketAddr::new(*ip, PORT)).collect()
}

fn settings(query: &str, server: SocketAddr) -> DnsSettings {
    DnsSettings {
        query: query.into(),
        port: PORT,
        interval: Duration::from_millis(100),
        server: Some(server),
    }
}

/// A running discovery task.
struct Running {
    rx: watch::Receiver<Addrs>,
    status: Arc<Status>,
    cancel: CancellationToken,
    task: JoinHandle<()>,
}

fn start(settings: DnsSettings, initial: Addrs) -> Running {
    let (tx, rx) = watch::channel(initial);
    let status = Arc::new(Status::default());
    let cancel = CancellationToken::new();
    let task = tokio::spawn(dns::run(settings, tx, status.clone(), cancel.clone()));
    Running {
        rx,
        status,
        cancel,
        task,
    }
}

impl Running {
    /// Waits (bounded) until the published set is `expected`.
    async fn wait_for_set(&mut self, expected: &Addrs) {
        let reached = matches!(
            tokio::time::timeout(PATIENCE, self.rx.wait_for(|s| s == expected)).await,
            Ok(Ok(_))
        );
        assert!(
            reached,
            "published set never became {expected:?}; it is {:?} (status {:?})",
            *self.rx.borrow(),
            self.status.report()
        );
    }

    /// Waits (bounded) until the status satisfies `ok`.
    async fn wait_for_status(&self, what: &str, ok: impl Fn(&StatusReport) -> bool) {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while !ok(&self.status.report()) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "status never {what}: {:?}",
                self.status.report()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Cancels and asserts that `run` returns (bounded) without panicking.
    async fn stop_within(self, bound: Duration) {
        self.cancel.cancel();
        let joined = tokio::time::timeout(bound, self.task).await;
        match joined {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("discovery task failed: {e}"),
            Err(_) => panic!("discovery task still running {bound:?} after cancel"),
        }
    }
}

/// A loopback port with nothing listening on it (UDP nor TCP).
async fn closed_port() -> SocketAddr {
    let sock = tokio::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .unwrap();
    let addr = sock.local_addr().unwrap();
    drop(sock);
    addr
}

#[tokio::test]
async fn one_round_returns_every_a_and_aaaa_record_at_the_cluster_port() {
    let ips = vec![v4(2), v4(3), IpAddr::V6(Ipv6Addr::LOCALHOST)];
    let server = TestDns::start(NAME, ips.clone()).await;

    let got = dns::resolve_once(&settings(NAME, server.addr))
        .await
        .expect("lookup");
    assert_eq!(got, at_port(&ips));

    // A fully qualified query (trailing dot) and another case are the same name.
    let got = dns::resolve_once(&settings("OpenFHIR-Cache.Pods.Test.", server.addr))
        .await
        .expect("lookup");
    assert_eq!(got, at_port(&ips));
}

#[tokio::test]
async fn run_follows_the_zone_as_pods_come_and_go() {
    let (a, b, c) = (v4(10), v4(11), IpAddr::V6("fd00::11".parse().unwrap()));
    let server = TestDns::start(NAME, vec![a]).await;
    let mut run = start(settings(NAME, server.addr), Addrs::new());

    run.wait_for_set(&at_port(&[a])).await;

    server.set(vec![a, b, c]);
    run.wait_for_set(&at_port(&[a, b, c])).await;

    server.set(vec![b, c]);
    run.wait_for_set(&at_port(&[b, c])).await;

    // While the zone stays the same, watchers are not woken: let several more rounds pass.
    run.rx.mark_unchanged();
    let seen = server.queries();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while server.queries() < seen + 6 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "discovery stopped asking"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        !run.rx.has_changed().unwrap(),
        "an unchanged set woke the watchers"
    );

    let report = run.status.report();
    assert!(report.rounds >= 3, "{report:?}");
    assert_eq!(report.last_error, None);
    run.stop_within(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn nxdomain_and_no_records_mean_no_peers() {
    let server = TestDns::start(NAME, vec![v4(20)]).await;

    // NXDOMAIN: another name.
    let got = dns::resolve_once(&settings("gone.pods.test", server.addr)).await;
    assert_eq!(got.expect("NXDOMAIN is an answer"), Addrs::new());

    // The name exists but has no A/AAAA records (every pod gone).
    server.set(vec![]);
    let got = dns::resolve_once(&settings(NAME, server.addr)).await;
    assert_eq!(got.expect("no records is an answer"), Addrs::new());

    // The loop publishes the empty set in place of the peers it had, and that is no error.
    server.set(vec![v4(20)]);
    let mut run = start(settings(NAME, server.addr), Addrs::new());
    run.wait_for_set(&at_port(&[v4(20)])).await;
    server.set(vec![]);
    run.wait_for_set(&Addrs::new()).await;
    assert_eq!(run.status.report().last_error, None);
    run.stop_within(Duration::from_secs(5)).await;

    let mut run = start(settings("gone.pods.test", server.addr), at_port(&[v4(21)]));
    run.wait_for_set(&Addrs::new()).await;
    assert_eq!(run.status.report().last_error, None);
    run.stop_within(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn an_unreachable_server_is_an_error_and_keeps_the_previous_peers() {
    let server = closed_port().await;

    let got = dns::resolve_once(&settings(NAME, server)).await;
    assert!(
        matches!(got, Err(DnsError::Lookup { .. } | DnsError::Timeout { .. })),
        "an unreachable server must not read as 'no peers': {got:?}"
    );

    let previous = at_port(&[v4(30), v4(31)]);
    let run = start(settings(NAME, server), previous.clone());
    run.wait_for_status("failed", |r| r.last_error.is_some())
        .await;
    assert_eq!(*run.rx.borrow(), previous);
    let msg = run.status.report().last_error.unwrap_or_default();
    assert!(msg.contains(NAME), "{msg}");
    run.stop_within(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_silent_server_is_an_outage_survived_and_cancel_interrupts_a_lookup() {
    let (a, b) = (v4(40), v4(41));
    let server = TestDns::start(NAME, vec![a]).await;
    let mut run = start(settings(NAME, server.addr), Addrs::new());
    run.wait_for_set(&at_port(&[a])).await;

    // Outage: queries time out. The peers are kept, the error is reported.
    server.set_silent(true);
    server.set(vec![b]);
    run.wait_for_status("failed", |r| r.last_error.is_some())
        .await;
    assert_eq!(*run.rx.borrow(), at_port(&[a]));

    // The server answers again: the error clears and the new zone is published.
    server.set_silent(false);
    run.wait_for_set(&at_port(&[b])).await;
    run.wait_for_status("ok again", |r| r.last_error.is_none())
        .await;

    // Cancel while a lookup is waiting on a silent server: `run` must not wait for the resolver's
    // timeout (2 s per attempt).
    server.set_silent(true);
    let seen = server.queries();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while server.queries() == seen {
        assert!(tokio::time::Instant::now() < deadline, "no lookup started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    run.stop_within(Duration::from_millis(1500)).await;
}
