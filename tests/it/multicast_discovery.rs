//! `MULTICAST` discovery end to end: several [`run`] tasks in one process, each bound to its own
//! loopback address (`127.0.0.2`, `127.0.0.3`, ...), announcing on the loopback interface.
//!
//! Every test uses its own group port and cluster name, so tests running in parallel never hear
//! each other. Waits are bounded ([`WAIT`]) but nothing asserts on elapsed time.

use std::net::{IpAddr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;

use openfhir_cache::cluster::discovery::multicast::{run, MulticastSettings};
use openfhir_cache::cluster::discovery::{Addrs, Status};
use openfhir_cache::cluster::ClusterSecret;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Announcement interval of the test nodes.
const INTERVAL: Duration = Duration::from_millis(100);

/// Longest wait for the sets to reach the expected state.
const WAIT: Duration = Duration::from_secs(5);

/// A fresh group (random port in 40000..60000) and cluster name for one test.
fn fresh_group(test: &str) -> (SocketAddrV4, String) {
    let r = getrandom::u32().expect("random source");
    let port = 40_000 + (r % 20_000) as u16;
    (
        SocketAddrV4::new("239.255.78.0".parse().unwrap(), port),
        format!("{test}-{r:08x}"),
    )
}

struct Node {
    addr: SocketAddr,
    rx: watch::Receiver<Addrs>,
    status: Arc<Status>,
    cancel: CancellationToken,
    task: JoinHandle<()>,
}

impl Node {
    /// Starts a node bound to `ip`, advertising `ip:7800`.
    fn start(group: SocketAddrV4, cluster: &str, ip: &str, secret: Option<&str>) -> Node {
        let ip: IpAddr = ip.parse().unwrap();
        Node::start_advertising(group, cluster, ip, SocketAddr::new(ip, 7800), secret)
    }

    fn start_advertising(
        group: SocketAddrV4,
        cluster: &str,
        bind_addr: IpAddr,
        advertised: SocketAddr,
        secret: Option<&str>,
    ) -> Node {
        let settings = MulticastSettings {
            group: group.into(),
            bind_addr,
            cluster: cluster.to_string(),
            node_id: format!("node-{bind_addr}"),
            version: env!("CARGO_PKG_VERSION").to_string(),
            advertised,
            secret: secret.and_then(ClusterSecret::new),
            interval: INTERVAL,
        };
        let (tx, rx) = watch::channel(Addrs::new());
        let status = Arc::new(Status::default());
        let cancel = CancellationToken::new();
        let task = tokio::spawn(run(settings, tx, status.clone(), cancel.clone()));
        Node {
            addr: SocketAddr::new(bind_addr, 7800),
            rx,
            status,
            cancel,
            task,
        }
    }

    /// Waits (at most [`WAIT`]) until this node's set satisfies `pred`; returns that set.
    async fn wait_for(&mut self, what: &str, pred: impl Fn(&Addrs) -> bool) -> Addrs {
        let found = tokio::time::timeout(WAIT, self.rx.wait_for(|a| pred(a)))
            .await
            .map(|r| r.map(|set| set.clone()));
        match found {
            Ok(Ok(set)) => set,
            Ok(Err(_)) => panic!("{what}: the discovery task of {} ended", self.addr),
            Err(_) => panic!(
                "{what}: node {} still has {:?} after {WAIT:?} (status {:?})",
                self.addr,
                self.set(),
                self.status.report()
            ),
        }
    }

    fn set(&self) -> Addrs {
        self.rx.borrow().clone()
    }

    /// Cancels the node and checks that its task returns promptly.
    async fn stop(self) {
        self.cancel.cancel();
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("run returns promptly when cancelled")
            .expect("run does not panic");
    }
}

/// Several announcement rounds: long enough for anything that was going to be heard to be heard.
async fn a_few_rounds() {
    tokio::time::sleep(INTERVAL * 5).await;
}

#[tokio::test]
async fn three_nodes_on_loopback_find_each_other_and_a_cancelled_one_expires() {
    let (group, cluster) = fresh_group("three");
    let mut nodes: Vec<Node> = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
        .into_iter()
        .map(|ip| Node::start(group, &cluster, ip, None))
        .collect();
    let addrs: Vec<SocketAddr> = nodes.iter().map(|n| n.addr).collect();

    for (i, node) in nodes.iter_mut().enumerate() {
        let others: Addrs = addrs
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, a)| *a)
            .collect();
        let set = node
            .wait_for("each node hears the other two", |s| s.is_superset(&others))
            .await;
        assert!(
            !set.contains(&node.addr),
            "{} lists itself: {set:?}",
            node.addr
        );
        assert!(node.status.report().last_error.is_none());
        assert!(node.status.report().rounds > 0);
    }

    let gone = nodes.pop().unwrap();
    let gone_addr = gone.addr;
    gone.stop().await;
    for node in &mut nodes {
        let set = node
            .wait_for("the cancelled node expires", |s| !s.contains(&gone_addr))
            .await;
        assert_eq!(set.len(), 1, "the other live node stays: {set:?}");
    }
    for node in nodes {
        node.stop().await;
    }
}

#[tokio::test]
async fn a_node_of_another_cluster_is_not_seen() {
    let (group, cluster) = fresh_group("cluster");
    let mut a = Node::start(group, &cluster, "127.0.0.2", None);
    let mut c = Node::start(group, &cluster, "127.0.0.3", None);
    let b = Node::start(group, &format!("{cluster}-other"), "127.0.0.4", None);
    let (a_addr, c_addr) = (a.addr, c.addr);

    // Positive control: the same cluster hears itself on this group.
    a.wait_for("a hears c", |s| s.contains(&c_addr)).await;
    c.wait_for("c hears a", |s| s.contains(&a_addr)).await;
    a_few_rounds().await;
    assert_eq!(a.set(), Addrs::from([c_addr]));
    assert_eq!(c.set(), Addrs::from([a_addr]));
    assert!(b.set().is_empty(), "{:?}", b.set());
    // The other cluster's node is up and announcing, it just hears nobody of its cluster.
    assert!(b.status.report().last_error.is_none());
    assert!(b.status.report().rounds > 0);

    for n in [a, b, c] {
        n.stop().await;
    }
}

#[tokio::test]
async fn with_a_secret_unsigned_and_differently_signed_nodes_are_not_seen() {
    let (group, cluster) = fresh_group("secret");
    let mut a = Node::start(group, &cluster, "127.0.0.2", Some("s3cret"));
    let mut c = Node::start(group, &cluster, "127.0.0.3", Some("s3cret"));
    let mut none = Node::start(group, &cluster, "127.0.0.4", None);
    let other = Node::start(group, &cluster, "127.0.0.5", Some("another"));
    let (a_addr, c_addr) = (a.addr, c.addr);

    a.wait_for("a hears c", |s| s.contains(&c_addr)).await;
    c.wait_for("c hears a", |s| s.contains(&a_addr)).await;
    // The node without a secret accepts signed announcements (the handshake refuses it later);
    // seeing it hear everyone proves all four are announcing.
    let all_but_none: Addrs = [a_addr, c_addr, other.addr].into();
    none.wait_for("the unsigned node hears the signed ones", |s| {
        s.is_superset(&all_but_none)
    })
    .await;
    a_few_rounds().await;
    assert_eq!(a.set(), Addrs::from([c_addr]));
    assert_eq!(c.set(), Addrs::from([a_addr]));
    assert!(other.set().is_empty(), "{:?}", other.set());

    for n in [a, c, none, other] {
        n.stop().await;
    }
}

#[tokio::test]
async fn an_unspecified_advertised_ip_is_replaced_by_the_source_address() {
    let (group, cluster) = fresh_group("unspecified");
    let ip: IpAddr = "127.0.0.6".parse().unwrap();
    let quiet = Node::start_advertising(group, &cluster, ip, "0.0.0.0:7801".parse().unwrap(), None);
    let mut listener = Node::start(group, &cluster, "127.0.0.7", None);
    let expected: SocketAddr = "127.0.0.6:7801".parse().unwrap();
    let set = listener
        .wait_for("the source IP replaces 0.0.0.0", |s| !s.is_empty())
        .await;
    assert_eq!(set, Addrs::from([expected]));
    quiet.stop().await;
    listener.stop().await;
}

#[tokio::test]
async fn an_unusable_interface_is_reported_and_cancel_still_returns() {
    let (group, cluster) = fresh_group("unusable");
    // TEST-NET-3: no interface of this machine holds it, so joining and binding fail.
    let node = Node::start(group, &cluster, "203.0.113.77", None);
    let deadline = tokio::time::Instant::now() + WAIT;
    let error = loop {
        if let Some(e) = node.status.report().last_error {
            break e;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no failure recorded after {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(error.contains(&group.to_string()), "{error}");
    assert!(error.contains("203.0.113.77"), "{error}");
    assert!(node.set().is_empty());
    node.stop().await;
}
