//! `MULTICAST` discovery: nodes announce their cluster address on a multicast group
//! (`CLUSTER_MULTICAST_ADDR`; when unset `239.255.78.0:45588`, or `[ff15::78]:45588` when
//! `CLUSTER_BIND_ADDR` is IPv6, see [`crate::config::multicast_group`]) and learn each other's.
//!
//! # Announcements
//! One small JSON datagram (well under 1 KiB; anything over [`MAX_ANNOUNCEMENT`] bytes is dropped
//! unread):
//! ```json
//! {"magic":1330004785,"protocol":1,"cluster":"prod","node_id":"n1","version":"0.1.0",
//!  "addr":"10.0.0.5:7800","mac":"<64 hex digits, only with a CLUSTER_SECRET>"}
//! ```
//! `magic` and `protocol` are the cluster channel's [`MAGIC`] and [`PROTOCOL`]. With a
//! `CLUSTER_SECRET`, `mac` is [`ClusterSecret::mac`] over the label `"announce"`, the magic and
//! protocol (big-endian) and each string field prefixed with its length (so no two different
//! announcements share the MAC input); receivers that have a secret ignore announcements without a
//! valid one. A receiver without a secret accepts signed announcements too: the TCP handshake
//! refuses the mismatch and reports it. A signed announcement can be replayed by anyone on the
//! LAN, which at most keeps an address alive longer; the handshake still authenticates the peer.
//!
//! Receivers ignore (logged at debug level) their own announcements, other clusters, another
//! magic or protocol, malformed JSON and bad MACs. Release mismatches are *not* filtered here: the
//! handshake refuses them and says so. An announced address with an unspecified IP (`0.0.0.0`,
//! `::`) means "my source address" and is replaced by the datagram's source IP.
//!
//! # Timing and expiry
//! A node announces at start three times a quarter interval apart (to beat start-up races), then
//! every `interval`. An address not heard for [`EXPIRY_INTERVALS`] intervals expires, so all nodes
//! of a cluster should use the same interval. At most [`MAX_PEERS`] addresses are tracked; a flood
//! of forged announcements cannot grow memory without bound (new addresses beyond that are
//! ignored, with one warning each time the table fills up).
//!
//! # Sockets and interfaces
//! Receiving uses a UDP socket with `SO_REUSEADDR` and `SO_REUSEPORT` (so several nodes on one
//! host share the group port), bound to the group address and port (on Linux that keeps other
//! groups' datagrams out; if that bind fails it falls back to the unspecified address and the
//! port with `IP_MULTICAST_ALL` / `IPV6_MULTICAST_ALL` off), joined to the group on the
//! interface chosen from `CLUSTER_BIND_ADDR` ([`MulticastSettings::interface`]).
//!
//! An IPv4 group (the default for IPv4 bind addresses):
//!
//! * a loopback IPv4 address (`127.x.y.z`): the loopback interface (`127.0.0.1`). Nodes on one
//!   machine find each other without any system change;
//! * another specific IPv4 address: the interface holding it;
//! * `0.0.0.0` or an IPv6 address: `INADDR_ANY`, the interface of the route to the group (normally
//!   the default route).
//!
//! An IPv6 group (the default for IPv6 bind addresses, e.g. `::`), by interface index:
//!
//! * a specific IPv6 address: the interface holding it (Linux: `/proc/net/if_inet6`);
//! * `::`, an IPv4 address, or an address no interface holds: index 0, the interface of the
//!   route to the group (on Linux every multicast-capable interface has an `ff00::/8` route; the
//!   first one, normally the one with the default route, wins). The loopback interface has no
//!   multicast, so IPv6 announcements need a real interface.
//!
//! Nodes only hear each other when they use the same interface: a node bound to `127.0.0.2` does
//! not hear one bound to `0.0.0.0` on the same host, and a node on the IPv4 group does not hear
//! one on the IPv6 group.
//!
//! Sending uses a second socket bound to the node's bind address when it is specific and of the
//! group's family (else the unspecified address), so the datagram's source is the node's address,
//! with the multicast interface (`IP_MULTICAST_IF` / `IPV6_MULTICAST_IF`) set to the same
//! interface, loopback on (`IP_MULTICAST_LOOP` / `IPV6_MULTICAST_LOOP`: nodes on the same host
//! hear each other) and a TTL / hop limit of [`MULTICAST_TTL`] (`1`: announcements stay on the
//! local network segment and are never routed). With `::`, the kernel picks the source address;
//! for the site-local default group it prefers a unique-local or global address over `fe80::`,
//! and that is the address peers dial (an `fe80::` source keeps its zone index, so it works too
//! on the interface it came from).
//!
//! # Failures
//! Where multicast is blocked (no route to the group, no such interface, a firewall refusing the
//! send...) the node logs one warning naming the group, the interface and the OS error, records it
//! in the discovery [`Status`], serves as a cluster of one (peers may still connect to it) and
//! retries quietly every interval. Recovery is logged at info level.
//!
//! # Layout
//! * `announcement`: the datagram, [`encode_announcement`] and [`decode_announcement`].
//! * `peers`: the table of addresses heard, with expiry and a size bound.
//! * `socket`: opening the receiving and sending sockets.
//! * this module: the settings and the task, [`run`].
//!
//! [`MAGIC`]: crate::cluster::wire::MAGIC
//! [`PROTOCOL`]: crate::cluster::wire::PROTOCOL

mod announcement;
mod peers;
mod socket;

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use super::{Publisher, Status};
use crate::cluster::ClusterSecret;

pub use announcement::{decode_announcement, encode_announcement, AnnounceError, Announced};

use peers::{Heard, Peers};
use socket::{open, recv_from, SocketError, Sockets};

/// Largest announcement accepted, in bytes; larger datagrams are dropped unread.
pub const MAX_ANNOUNCEMENT: usize = 2048;

/// An address not heard for this many intervals expires.
pub const EXPIRY_INTERVALS: u32 = 5;

/// Most addresses tracked at once; announcements of new addresses beyond that are ignored.
pub const MAX_PEERS: usize = 1024;

/// `IP_MULTICAST_TTL` (IPv4) and `IPV6_MULTICAST_HOPS` (IPv6) of announcements: `1` keeps them
/// on the local network segment.
pub const MULTICAST_TTL: u32 = 1;

/// Shortest interval used, whatever the settings say, so a zero interval cannot spin.
const MIN_INTERVAL: Duration = Duration::from_millis(20);

/// How many announcements go out at start, a quarter interval apart.
const STARTUP_ANNOUNCEMENTS: u64 = 3;

/// Settings of multicast discovery.
#[derive(Debug, Clone)]
pub struct MulticastSettings {
    /// `CLUSTER_MULTICAST_ADDR` (IPv4 or IPv6), or its default for the bind address's family.
    pub group: SocketAddr,
    /// `CLUSTER_BIND_ADDR`: picks the interface announcements go out on.
    pub bind_addr: IpAddr,
    /// `CLUSTER_NAME`: announcements of other clusters are ignored.
    pub cluster: String,
    /// This node's id: its own announcements are ignored.
    pub node_id: String,
    /// This node's release.
    pub version: String,
    /// Where this node's cluster channel listens (an unspecified IP means "my source address").
    pub advertised: SocketAddr,
    /// `CLUSTER_SECRET`: when set, announcements carry an HMAC and unsigned ones are ignored.
    pub secret: Option<ClusterSecret>,
    /// How often to announce.
    pub interval: Duration,
}

/// The interface announcements are received and sent on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interface {
    /// IPv4 group: the interface by one of its IPv4 addresses; `0.0.0.0` = by route.
    V4(Ipv4Addr),
    /// IPv6 group: the interface by index; `0` = by route.
    V6(u32),
}

impl fmt::Display for Interface {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Interface::V4(ip) => write!(f, "{ip}"),
            Interface::V6(0) => write!(f, "the route's (IPv6 index 0)"),
            Interface::V6(i) => write!(f, "IPv6 index {i}"),
        }
    }
}

impl MulticastSettings {
    /// The interface used to join the group and send announcements: [`Interface::V4`] for an IPv4
    /// group ([`Self::interface_v4`]), [`Interface::V6`] for an IPv6 group (the index of the
    /// interface holding a specific IPv6 bind address, else 0).
    pub fn interface(&self) -> Interface {
        match self.group {
            SocketAddr::V4(_) => Interface::V4(self.interface_v4()),
            SocketAddr::V6(_) => Interface::V6(self.interface_v6(interface_index_of)),
        }
    }

    /// The IPv4 interface (by its address): `127.0.0.1` for a loopback bind address, the bind
    /// address itself for another specific IPv4 address, and `0.0.0.0` (the OS's choice, by
    /// route) for `0.0.0.0` or IPv6.
    pub fn interface_v4(&self) -> Ipv4Addr {
        match self.bind_addr {
            IpAddr::V4(ip) if ip.is_loopback() => Ipv4Addr::LOCALHOST,
            IpAddr::V4(ip) if !ip.is_unspecified() && !ip.is_multicast() => ip,
            _ => Ipv4Addr::UNSPECIFIED,
        }
    }

    /// The IPv6 interface index: `index_of(bind address)` for a specific IPv6 bind address, and
    /// 0 (the OS's choice, by route) for `::`, an IPv4 bind address or an address `index_of`
    /// does not find.
    fn interface_v6(&self, index_of: impl Fn(Ipv6Addr) -> Option<u32>) -> u32 {
        match self.bind_addr {
            IpAddr::V6(ip) if !ip.is_unspecified() && !ip.is_multicast() => {
                index_of(ip).unwrap_or(0)
            }
            _ => 0,
        }
    }

    /// The address the sending socket binds to (port 0), so announcements come from this node's
    /// address: the bind address when it is specific and of the group's family, else the
    /// unspecified address of the group's family.
    fn send_source(&self) -> IpAddr {
        match (self.group, self.bind_addr) {
            (SocketAddr::V4(_), IpAddr::V4(ip)) if !ip.is_unspecified() && !ip.is_multicast() => {
                IpAddr::V4(ip)
            }
            (SocketAddr::V6(_), IpAddr::V6(ip)) if !ip.is_unspecified() && !ip.is_multicast() => {
                IpAddr::V6(ip)
            }
            (SocketAddr::V4(_), _) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            (SocketAddr::V6(_), _) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        }
    }

    fn effective_interval(&self) -> Duration {
        self.interval.max(MIN_INTERVAL)
    }
}

/// The index of the interface that holds `ip`, from Linux's `/proc/net/if_inet6` (one line per
/// address: 32 hex digits, the index in hex, prefix length, scope, flags, name). `None` elsewhere
/// or when no interface holds it.
fn interface_index_of(ip: Ipv6Addr) -> Option<u32> {
    let table = std::fs::read_to_string("/proc/net/if_inet6").ok()?;
    index_in_if_inet6(&table, ip)
}

fn index_in_if_inet6(table: &str, ip: Ipv6Addr) -> Option<u32> {
    let want = ip
        .octets()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>();
    table.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let addr = fields.next()?;
        let index = fields.next()?;
        (addr.eq_ignore_ascii_case(&want))
            .then(|| u32::from_str_radix(index, 16).ok())
            .flatten()
    })
}

// ---------------------------------------------------------------------------------------------
// The task

/// The running task's state.
struct Discovery {
    settings: MulticastSettings,
    iface: Interface,
    interval: Duration,
    announcement: Vec<u8>,
    peers: Peers,
    sockets: Option<Sockets>,
    /// True after a failure until an announcement goes out again.
    failing: bool,
    /// True once the sockets have been opened (the first success is logged at info level).
    opened_once: bool,
    tx: Publisher,
    status: Arc<Status>,
}

impl Discovery {
    fn publish(&self) {
        let addrs = self.peers.addrs();
        self.tx.send_if_modified(|cur| {
            let changed = *cur != addrs;
            if changed {
                *cur = addrs;
            }
            changed
        });
    }

    fn expire(&mut self) {
        let gone = self.peers.expire(Instant::now());
        if !gone.is_empty() {
            for addr in &gone {
                tracing::info!(
                    %addr,
                    "multicast discovery: not heard for {:?}; forgetting it",
                    self.interval * EXPIRY_INTERVALS
                );
            }
            self.publish();
        }
    }

    fn failed(&mut self, e: SocketError) {
        self.sockets = None;
        self.failing = true;
        let group = self.settings.group;
        let iface = self.iface;
        if self
            .status
            .failed(format!("multicast group {group} on interface {iface}: {e}"))
        {
            tracing::warn!(
                %group,
                interface = %iface,
                error = %e,
                "multicast discovery does not work on group {group} via interface {iface}: {e}. \
                 This node serves as a cluster of one unless peers connect to it. If multicast \
                 is blocked here, use CLUSTER_DISCOVERY=TCP (CLUSTER_INITIAL_HOSTS) or DNS \
                 (CLUSTER_DNS_QUERY). Retrying every {:?}",
                self.interval
            );
        } else {
            tracing::debug!(%group, interface = %iface, error = %e, "multicast discovery still failing");
        }
    }

    async fn announce(&mut self) {
        let group = self.settings.group;
        if self.sockets.is_none() {
            match open(group, self.iface, self.settings.send_source()) {
                Ok(s) => {
                    if !self.opened_once {
                        tracing::info!(
                            %group,
                            interface = %self.iface,
                            advertised = %self.settings.advertised,
                            "multicast discovery: announcing every {:?}",
                            self.interval
                        );
                    }
                    self.opened_once = true;
                    self.sockets = Some(s);
                }
                Err(e) => return self.failed(e),
            }
        }
        let Some(sockets) = &self.sockets else { return };
        match sockets.send.send_to(&self.announcement, group).await {
            Ok(_) => {
                self.status.ok();
                if std::mem::take(&mut self.failing) {
                    tracing::info!(
                        %group,
                        interface = %self.iface,
                        "multicast discovery works again"
                    );
                }
            }
            Err(e) => self.failed(SocketError::Send(e)),
        }
    }

    fn on_datagram(&mut self, bytes: &[u8], src: SocketAddr) {
        let a = match decode_announcement(bytes, &self.settings, src) {
            Ok(a) => a,
            Err(AnnounceError::Own) => return,
            Err(e) => {
                tracing::debug!(%src, error = %e, "multicast discovery: ignored a datagram");
                return;
            }
        };
        match self.peers.hear(a.addr, Instant::now()) {
            Heard::New => {
                tracing::info!(
                    node_id = %a.node_id,
                    version = %a.version,
                    addr = %a.addr,
                    "multicast discovery: heard a peer"
                );
                self.publish();
            }
            Heard::Refreshed => {}
            Heard::Full { first } => {
                if first {
                    tracing::warn!(
                        max = MAX_PEERS,
                        addr = %a.addr,
                        "multicast discovery: {MAX_PEERS} addresses known already; ignoring new \
                         ones until some expire (forged announcements? set CLUSTER_SECRET)"
                    );
                } else {
                    tracing::debug!(addr = %a.addr, "multicast discovery: table full; ignored");
                }
            }
        }
    }
}

/// Announces this node and listens for others until cancelled, publishing the addresses heard.
///
/// Never panics and never gives up: when multicast does not work it warns once, records the error
/// in `status` and retries every interval. Returns promptly when `cancel` fires.
pub async fn run(
    settings: MulticastSettings,
    tx: Publisher,
    status: Arc<Status>,
    cancel: CancellationToken,
) {
    let interval = settings.effective_interval();
    let iface = settings.interface();
    let announcement = match encode_announcement(&settings) {
        Ok(a) => a,
        Err(e) => {
            status.failed(format!("cannot announce this node: {e}"));
            tracing::warn!(
                error = %e,
                "multicast discovery cannot announce this node (CLUSTER_NAME or node id too \
                 long?); this node serves as a cluster of one unless peers connect to it"
            );
            cancel.cancelled().await;
            return;
        }
    };
    let mut d = Discovery {
        settings,
        iface,
        interval,
        announcement,
        peers: Peers::new(interval * EXPIRY_INTERVALS, MAX_PEERS),
        sockets: None,
        failing: false,
        opened_once: false,
        tx,
        status,
    };

    // One tick per quarter interval: expiry is checked on every tick; announcements (and, while
    // failing, attempts to open the sockets) go out on ticks 0, 1, 2, then every fourth.
    let mut ticker = tokio::time::interval(interval / 4);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut tick: u64 = 0;
    // One byte more than the limit, so an oversized datagram shows as such.
    let mut buf = vec![0u8; MAX_ANNOUNCEMENT + 1];

    loop {
        // Ticks before datagrams, so a flood cannot starve announcements and expiry.
        let received = tokio::select! {
            biased;
            () = cancel.cancelled() => return,
            _ = ticker.tick() => None,
            r = recv_from(d.sockets.as_ref(), &mut buf) => Some(r),
        };
        match received {
            None => {
                let n = tick;
                tick = tick.wrapping_add(1);
                d.expire();
                if n < STARTUP_ANNOUNCEMENTS || n % 4 == (STARTUP_ANNOUNCEMENTS - 1) % 4 {
                    tokio::select! {
                        biased;
                        () = cancel.cancelled() => return,
                        () = d.announce() => {}
                    }
                }
            }
            Some(Ok((len, src))) => match buf.get(..len) {
                Some(bytes) if len <= MAX_ANNOUNCEMENT => d.on_datagram(bytes, src),
                _ => tracing::debug!(%src, "multicast discovery: dropped an oversized datagram"),
            },
            Some(Err(e)) => d.failed(SocketError::Receive(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn settings(node_id: &str, secret: Option<&str>) -> MulticastSettings {
        MulticastSettings {
            group: "239.255.78.0:45588".parse().unwrap(),
            bind_addr: "127.0.0.2".parse().unwrap(),
            cluster: "prod".into(),
            node_id: node_id.into(),
            version: "0.1.0".into(),
            advertised: "127.0.0.2:7800".parse().unwrap(),
            secret: secret.and_then(ClusterSecret::new),
            interval: Duration::from_secs(1),
        }
    }

    #[test]
    fn interface_choice() {
        let mut s = settings("a", None);
        let cases = [
            ("127.0.0.3", Ipv4Addr::LOCALHOST, "127.0.0.3"),
            ("192.0.2.2", Ipv4Addr::new(192, 0, 2, 2), "192.0.2.2"),
            ("0.0.0.0", Ipv4Addr::UNSPECIFIED, "0.0.0.0"),
            ("::", Ipv4Addr::UNSPECIFIED, "0.0.0.0"),
            ("fd00::2", Ipv4Addr::UNSPECIFIED, "0.0.0.0"),
        ];
        for (bind, iface, source) in cases {
            s.bind_addr = bind.parse().unwrap();
            assert_eq!(s.interface(), Interface::V4(iface), "{bind}");
            assert_eq!(s.send_source(), source.parse::<IpAddr>().unwrap(), "{bind}");
        }
    }

    #[test]
    fn ipv6_interface_choice() {
        let mut s = settings("a", None);
        s.group = "[ff15::78]:45588".parse().unwrap();
        // A stand-in for /proc/net/if_inet6: fd00::2 on index 3, ::1 on index 1.
        let table = "fd000000000000000000000000000002 03 40 00 80     eth0\n\
                     00000000000000000000000000000001 01 80 10 80       lo\n";
        let index_of = |ip| index_in_if_inet6(table, ip);
        let cases = [
            ("fd00::2", 3, "fd00::2"),
            ("::1", 1, "::1"),
            ("fd00::9", 0, "fd00::9"),
            ("::", 0, "::"),
            ("0.0.0.0", 0, "::"),
            ("10.0.0.2", 0, "::"),
        ];
        for (bind, index, source) in cases {
            s.bind_addr = bind.parse().unwrap();
            assert_eq!(s.interface_v6(index_of), index, "{bind}");
            assert_eq!(s.send_source(), source.parse::<IpAddr>().unwrap(), "{bind}");
        }
        s.bind_addr = "::".parse().unwrap();
        assert_eq!(s.interface(), Interface::V6(0));
        assert_eq!(
            index_in_if_inet6("garbage\n\nzz 1 2\n", "::1".parse().unwrap()),
            None
        );
    }
}
