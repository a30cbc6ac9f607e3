//! `MULTICAST` discovery: nodes announce their cluster address on an IPv4 multicast group
//! (`CLUSTER_MULTICAST_ADDR`, default `239.255.78.0:45588`) and learn each other's.
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
//! groups' datagrams out; if that bind fails it falls back to `0.0.0.0:port` with
//! `IP_MULTICAST_ALL` off), joined to the group on the interface chosen from
//! `CLUSTER_BIND_ADDR`:
//!
//! * a loopback IPv4 address (`127.x.y.z`): the loopback interface (`127.0.0.1`). Nodes on one
//!   machine find each other without any system change;
//! * another specific IPv4 address: the interface holding it;
//! * `0.0.0.0` or an IPv6 address: `INADDR_ANY`, the interface of the route to the group (normally
//!   the default route).
//!
//! Nodes only hear each other when they use the same interface: a node bound to `127.0.0.2` does
//! not hear one bound to `0.0.0.0` on the same host.
//!
//! Sending uses a second socket bound to the node's IPv4 bind address (or `0.0.0.0`) so the
//! datagram's source is the node's address, with `IP_MULTICAST_IF` set to the same interface,
//! `IP_MULTICAST_LOOP` on (nodes on the same host hear each other) and `IP_MULTICAST_TTL`
//! [`MULTICAST_TTL`] (`1`: announcements stay on the local network segment and are never routed).
//!
//! # Failures
//! Where multicast is blocked (no route to the group, no such interface, a firewall refusing the
//! send...) the node logs one warning naming the group, the interface and the OS error, records it
//! in the discovery [`Status`], serves as a cluster of one (peers may still connect to it) and
//! retries quietly every interval. Recovery is logged at info level.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::UdpSocket;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use super::{Addrs, Publisher, Status};
use crate::cluster::wire::{Tag, MAGIC, PROTOCOL};
use crate::cluster::ClusterSecret;

/// Largest announcement accepted, in bytes; larger datagrams are dropped unread.
pub const MAX_ANNOUNCEMENT: usize = 2048;

/// An address not heard for this many intervals expires.
pub const EXPIRY_INTERVALS: u32 = 5;

/// Most addresses tracked at once; announcements of new addresses beyond that are ignored.
pub const MAX_PEERS: usize = 1024;

/// `IP_MULTICAST_TTL` of announcements: `1` keeps them on the local network segment.
pub const MULTICAST_TTL: u32 = 1;

/// Shortest interval used, whatever the settings say, so a zero interval cannot spin.
const MIN_INTERVAL: Duration = Duration::from_millis(20);

/// How many announcements go out at start, a quarter interval apart.
const STARTUP_ANNOUNCEMENTS: u64 = 3;

/// Settings of multicast discovery.
#[derive(Debug, Clone)]
pub struct MulticastSettings {
    /// `CLUSTER_MULTICAST_ADDR`.
    pub group: SocketAddrV4,
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

impl MulticastSettings {
    /// The interface (by its IPv4 address) used to join the group and send announcements:
    /// `127.0.0.1` for a loopback bind address, the bind address itself for another specific
    /// IPv4 address, and `0.0.0.0` (the OS's choice, by route) for `0.0.0.0` or IPv6.
    pub fn interface(&self) -> Ipv4Addr {
        match self.bind_addr {
            IpAddr::V4(ip) if ip.is_loopback() => Ipv4Addr::LOCALHOST,
            IpAddr::V4(ip) if !ip.is_unspecified() && !ip.is_multicast() => ip,
            _ => Ipv4Addr::UNSPECIFIED,
        }
    }

    /// The address the sending socket binds to (port 0), so announcements come from this node's
    /// address: the IPv4 bind address when it is specific, else `0.0.0.0`.
    fn send_source(&self) -> Ipv4Addr {
        match self.bind_addr {
            IpAddr::V4(ip) if !ip.is_unspecified() && !ip.is_multicast() => ip,
            _ => Ipv4Addr::UNSPECIFIED,
        }
    }

    fn effective_interval(&self) -> Duration {
        self.interval.max(MIN_INTERVAL)
    }
}

// ---------------------------------------------------------------------------------------------
// Announcements

/// Why an announcement was not used (or could not be made).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AnnounceError {
    /// The datagram (or the announcement to send) exceeds [`MAX_ANNOUNCEMENT`].
    #[error("announcement of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Not JSON of the announcement's shape (unknown fields included), or an empty field.
    #[error("malformed announcement: {0}")]
    Malformed(String),
    /// Not an openfhir-cache announcement.
    #[error("bad magic number {got:#010x} (expected {MAGIC:#010x})")]
    BadMagic {
        /// The magic number received.
        got: u32,
    },
    /// Another cluster protocol version.
    #[error("unsupported cluster protocol version {got} (this node speaks {PROTOCOL})")]
    UnsupportedProtocol {
        /// The version received.
        got: u16,
    },
    /// This node's own announcement, looped back.
    #[error("own announcement")]
    Own,
    /// An announcement of another cluster.
    #[error("announcement for cluster {theirs:?}, but this node is in cluster {ours:?}")]
    WrongCluster {
        /// This node's cluster name.
        ours: String,
        /// The cluster name announced.
        theirs: String,
    },
    /// This node has a secret and the announcement carries no MAC.
    #[error("unsigned announcement, but this node has a CLUSTER_SECRET")]
    MissingMac,
    /// The MAC does not match: forged, tampered, or signed with another secret.
    #[error("announcement authentication failed (bad MAC)")]
    BadMac,
    /// The announced address is not a usable `ip:port`.
    #[error("bad announced address {addr:?}: {reason}")]
    BadAddr {
        /// The address as announced.
        addr: String,
        /// What is wrong with it.
        reason: &'static str,
    },
}

/// A peer learnt from a valid announcement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Announced {
    /// Its node id.
    pub node_id: String,
    /// Its release (not checked here; the handshake refuses a mismatch).
    pub version: String,
    /// Its cluster address, the unspecified IP already replaced by the datagram's source IP.
    pub addr: SocketAddr,
}

/// The JSON datagram.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Announcement {
    magic: u32,
    protocol: u16,
    cluster: String,
    node_id: String,
    version: String,
    addr: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    mac: Option<Tag>,
}

impl Announcement {
    /// The canonical MAC input after the label: magic and protocol big-endian, then each string
    /// field prefixed with its length as a big-endian `u64`.
    fn mac_input(&self) -> Vec<u8> {
        let strings = [&self.cluster, &self.node_id, &self.version, &self.addr];
        let mut out = Vec::with_capacity(6 + strings.iter().map(|s| 8 + s.len()).sum::<usize>());
        out.extend_from_slice(&self.magic.to_be_bytes());
        out.extend_from_slice(&self.protocol.to_be_bytes());
        for s in strings {
            out.extend_from_slice(&(s.len() as u64).to_be_bytes());
            out.extend_from_slice(s.as_bytes());
        }
        out
    }

    fn sign(&mut self, secret: &ClusterSecret) {
        self.mac = Some(Tag(secret.mac(&[b"announce", &self.mac_input()])));
    }

    fn verify(&self, secret: &ClusterSecret) -> Result<(), AnnounceError> {
        let mac = self.mac.as_ref().ok_or(AnnounceError::MissingMac)?;
        if secret.verify(&[b"announce", &self.mac_input()], &mac.0) {
            Ok(())
        } else {
            Err(AnnounceError::BadMac)
        }
    }
}

/// The announcement datagram of this node: its cluster, node id, release and advertised address,
/// signed when `settings.secret` is set.
///
/// Fails with [`AnnounceError::TooLarge`] when the names are so long that the datagram would
/// exceed [`MAX_ANNOUNCEMENT`] (every receiver would drop it).
pub fn encode_announcement(settings: &MulticastSettings) -> Result<Vec<u8>, AnnounceError> {
    let mut a = Announcement {
        magic: MAGIC,
        protocol: PROTOCOL,
        cluster: settings.cluster.clone(),
        node_id: settings.node_id.clone(),
        version: settings.version.clone(),
        addr: settings.advertised.to_string(),
        mac: None,
    };
    if let Some(secret) = &settings.secret {
        a.sign(secret);
    }
    let bytes = serde_json::to_vec(&a).map_err(|e| AnnounceError::Malformed(e.to_string()))?;
    if bytes.len() > MAX_ANNOUNCEMENT {
        return Err(AnnounceError::TooLarge {
            len: bytes.len(),
            max: MAX_ANNOUNCEMENT,
        });
    }
    Ok(bytes)
}

/// Checks a received datagram against this node's `settings` and returns the peer it announces.
///
/// Checks, in order: size, JSON shape, magic, protocol, own node id, cluster name, MAC (only when
/// this node has a secret), then the address (an `ip:port` with a non-zero port and a unicast IP;
/// an unspecified IP is replaced by `src`'s). Total: any bytes give a peer or an
/// [`AnnounceError`], never a panic.
pub fn decode_announcement(
    bytes: &[u8],
    settings: &MulticastSettings,
    src: SocketAddr,
) -> Result<Announced, AnnounceError> {
    if bytes.len() > MAX_ANNOUNCEMENT {
        return Err(AnnounceError::TooLarge {
            len: bytes.len(),
            max: MAX_ANNOUNCEMENT,
        });
    }
    let a: Announcement =
        serde_json::from_slice(bytes).map_err(|e| AnnounceError::Malformed(e.to_string()))?;
    if a.magic != MAGIC {
        return Err(AnnounceError::BadMagic { got: a.magic });
    }
    if a.protocol != PROTOCOL {
        return Err(AnnounceError::UnsupportedProtocol { got: a.protocol });
    }
    if a.node_id.is_empty() {
        return Err(AnnounceError::Malformed("empty node_id".into()));
    }
    if a.node_id == settings.node_id {
        return Err(AnnounceError::Own);
    }
    if a.cluster != settings.cluster {
        return Err(AnnounceError::WrongCluster {
            ours: settings.cluster.clone(),
            theirs: a.cluster,
        });
    }
    if let Some(secret) = &settings.secret {
        a.verify(secret)?;
    }
    let bad = |reason| AnnounceError::BadAddr {
        addr: a.addr.clone(),
        reason,
    };
    let mut addr: SocketAddr = a.addr.parse().map_err(|_| bad("not an ip:port"))?;
    if addr.port() == 0 {
        return Err(bad("port 0"));
    }
    let ip = addr.ip();
    if ip.is_multicast() || ip == IpAddr::V4(Ipv4Addr::BROADCAST) {
        return Err(bad("not a unicast address"));
    }
    if ip.is_unspecified() {
        if src.ip().is_unspecified() || src.ip().is_multicast() {
            return Err(bad("unspecified, and so is the source address"));
        }
        addr.set_ip(src.ip());
    }
    Ok(Announced {
        node_id: a.node_id,
        version: a.version,
        addr,
    })
}

// ---------------------------------------------------------------------------------------------
// The table of addresses heard

/// What [`Peers::hear`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Heard {
    /// A new address: the set changed.
    New,
    /// A known address, heard again.
    Refreshed,
    /// A new address, ignored because the table is full; `first` on the first one since the
    /// table filled up.
    Full { first: bool },
}

/// Cluster addresses and when each was last heard.
#[derive(Debug)]
struct Peers {
    last_heard: HashMap<SocketAddr, Instant>,
    ttl: Duration,
    cap: usize,
    full_reported: bool,
}

impl Peers {
    fn new(ttl: Duration, cap: usize) -> Peers {
        Peers {
            last_heard: HashMap::new(),
            ttl,
            cap,
            full_reported: false,
        }
    }

    fn hear(&mut self, addr: SocketAddr, now: Instant) -> Heard {
        if let Some(t) = self.last_heard.get_mut(&addr) {
            *t = now;
            return Heard::Refreshed;
        }
        if self.last_heard.len() >= self.cap {
            let first = !std::mem::replace(&mut self.full_reported, true);
            return Heard::Full { first };
        }
        self.last_heard.insert(addr, now);
        Heard::New
    }

    /// Forgets the addresses not heard for the TTL; returns them.
    fn expire(&mut self, now: Instant) -> Vec<SocketAddr> {
        let ttl = self.ttl;
        let mut gone = Vec::new();
        self.last_heard.retain(|addr, t| {
            let keep = now.saturating_duration_since(*t) < ttl;
            if !keep {
                gone.push(*addr);
            }
            keep
        });
        if self.last_heard.len() < self.cap {
            self.full_reported = false;
        }
        gone.sort_unstable();
        gone
    }

    fn addrs(&self) -> Addrs {
        self.last_heard.keys().copied().collect()
    }
}

// ---------------------------------------------------------------------------------------------
// Sockets

/// Why the multicast sockets could not be set up or used.
#[derive(Debug, thiserror::Error)]
enum SocketError {
    #[error("{0} is not an IPv4 multicast address")]
    NotMulticast(Ipv4Addr),
    #[error("cannot create a UDP socket: {0}")]
    Create(#[source] io::Error),
    #[error("cannot set {option}: {source}")]
    Option {
        option: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("cannot bind {addr}: {source}")]
    Bind {
        addr: SocketAddrV4,
        #[source]
        source: io::Error,
    },
    #[error("cannot join the group: {0}")]
    Join(#[source] io::Error),
    #[error("cannot send an announcement: {0}")]
    Send(#[source] io::Error),
    #[error("cannot receive announcements: {0}")]
    Receive(#[source] io::Error),
}

struct Sockets {
    recv: UdpSocket,
    send: UdpSocket,
}

fn udp_socket() -> Result<Socket, SocketError> {
    Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).map_err(SocketError::Create)
}

fn opt(option: &'static str, r: io::Result<()>) -> Result<(), SocketError> {
    r.map_err(|source| SocketError::Option { option, source })
}

fn bind(socket: &Socket, addr: SocketAddrV4) -> Result<(), SocketError> {
    socket
        .bind(&addr.into())
        .map_err(|source| SocketError::Bind { addr, source })
}

fn into_tokio(socket: Socket) -> Result<UdpSocket, SocketError> {
    opt("O_NONBLOCK", socket.set_nonblocking(true))?;
    UdpSocket::from_std(socket.into()).map_err(|source| SocketError::Option {
        option: "the tokio registration",
        source,
    })
}

/// Opens the receiving socket (joined to the group on `iface`) and the sending socket.
fn open(group: SocketAddrV4, iface: Ipv4Addr, source: Ipv4Addr) -> Result<Sockets, SocketError> {
    if !group.ip().is_multicast() {
        return Err(SocketError::NotMulticast(*group.ip()));
    }

    let recv = udp_socket()?;
    opt("SO_REUSEADDR", recv.set_reuse_address(true))?;
    #[cfg(unix)]
    opt("SO_REUSEPORT", recv.set_reuse_port(true))?;
    if let Err(e) = bind(&recv, group) {
        let any = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, group.port());
        tracing::debug!(error = %e, "binding the group address failed; binding {any} instead");
        bind(&recv, any)?;
        // Only the groups this socket joined, not every group joined on the host.
        #[cfg(target_os = "linux")]
        opt("IP_MULTICAST_ALL", recv.set_multicast_all_v4(false))?;
    }
    recv.join_multicast_v4(group.ip(), &iface)
        .map_err(SocketError::Join)?;

    let send = udp_socket()?;
    bind(&send, SocketAddrV4::new(source, 0))?;
    opt("IP_MULTICAST_IF", send.set_multicast_if_v4(&iface))?;
    opt("IP_MULTICAST_LOOP", send.set_multicast_loop_v4(true))?;
    opt("IP_MULTICAST_TTL", send.set_multicast_ttl_v4(MULTICAST_TTL))?;

    Ok(Sockets {
        recv: into_tokio(recv)?,
        send: into_tokio(send)?,
    })
}

async fn recv_from(sockets: Option<&Sockets>, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
    match sockets {
        Some(s) => s.recv.recv_from(buf).await,
        None => std::future::pending().await,
    }
}

// ---------------------------------------------------------------------------------------------
// The task

/// The running task's state.
struct Discovery {
    settings: MulticastSettings,
    iface: Ipv4Addr,
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
    use proptest::prelude::*;

    fn settings(node_id: &str, secret: Option<&str>) -> MulticastSettings {
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

    fn src() -> SocketAddr {
        "192.0.2.9:40000".parse().unwrap()
    }

    fn json(bytes: &[u8]) -> serde_json::Value {
        serde_json::from_slice(bytes).unwrap()
    }

    fn bytes(v: &serde_json::Value) -> Vec<u8> {
        serde_json::to_vec(v).unwrap()
    }

    #[test]
    fn round_trip_without_secret() {
        let a = encode_announcement(&settings("a", None)).unwrap();
        assert!(a.len() < 1024);
        let v = json(&a);
        assert_eq!(v["magic"], MAGIC);
        assert_eq!(v["protocol"], PROTOCOL);
        assert_eq!(v["addr"], "127.0.0.2:7800");
        assert!(v.get("mac").is_none());
        let got = decode_announcement(&a, &settings("b", None), src()).unwrap();
        assert_eq!(
            got,
            Announced {
                node_id: "a".into(),
                version: "0.1.0".into(),
                addr: "127.0.0.2:7800".parse().unwrap(),
            }
        );
    }

    #[test]
    fn own_announcement_and_other_clusters_are_ignored() {
        let a = encode_announcement(&settings("a", None)).unwrap();
        assert_eq!(
            decode_announcement(&a, &settings("a", None), src()),
            Err(AnnounceError::Own)
        );
        let mut other = settings("b", None);
        other.cluster = "test".into();
        assert_eq!(
            decode_announcement(&a, &other, src()),
            Err(AnnounceError::WrongCluster {
                ours: "test".into(),
                theirs: "prod".into()
            })
        );
    }

    #[test]
    fn a_receiver_with_a_secret_requires_a_valid_mac() {
        let signed = encode_announcement(&settings("a", Some("s3cret"))).unwrap();
        let v = json(&signed);
        assert_eq!(v["mac"].as_str().unwrap().len(), 64);
        let me = settings("b", Some("s3cret"));
        assert!(decode_announcement(&signed, &me, src()).is_ok());

        let unsigned = encode_announcement(&settings("a", None)).unwrap();
        assert_eq!(
            decode_announcement(&unsigned, &me, src()),
            Err(AnnounceError::MissingMac)
        );
        let other_key = encode_announcement(&settings("a", Some("other"))).unwrap();
        assert_eq!(
            decode_announcement(&other_key, &me, src()),
            Err(AnnounceError::BadMac)
        );
        // Every signed field is covered.
        for (field, value) in [
            ("addr", serde_json::json!("10.0.0.1:7800")),
            ("node_id", serde_json::json!("c")),
            ("version", serde_json::json!("9.9.9")),
        ] {
            let mut t = v.clone();
            t[field] = value;
            assert_eq!(
                decode_announcement(&bytes(&t), &me, src()),
                Err(AnnounceError::BadMac),
                "{field}"
            );
        }
        let mut t = v.clone();
        let mut mac = t["mac"].as_str().unwrap().to_string();
        let last = if mac.ends_with('0') { "1" } else { "0" };
        mac.replace_range(63.., last);
        t["mac"] = mac.into();
        assert_eq!(
            decode_announcement(&bytes(&t), &me, src()),
            Err(AnnounceError::BadMac)
        );
    }

    #[test]
    fn a_receiver_without_a_secret_accepts_signed_announcements() {
        let signed = encode_announcement(&settings("a", Some("s3cret"))).unwrap();
        assert!(decode_announcement(&signed, &settings("b", None), src()).is_ok());
    }

    #[test]
    fn length_prefixes_keep_field_boundaries_in_the_mac() {
        let k = ClusterSecret::new("k").unwrap();
        let mut s1 = settings("ab", None);
        s1.cluster = "c".into();
        let mut s2 = settings("b", None);
        s2.cluster = "ca".into();
        s1.secret = Some(k.clone());
        s2.secret = Some(k);
        let v1 = json(&encode_announcement(&s1).unwrap());
        let v2 = json(&encode_announcement(&s2).unwrap());
        assert_ne!(v1["mac"], v2["mac"]);
    }

    #[test]
    fn unspecified_ip_is_replaced_by_the_source() {
        let mut s = settings("a", None);
        s.advertised = "0.0.0.0:7800".parse().unwrap();
        let a = encode_announcement(&s).unwrap();
        let got = decode_announcement(&a, &settings("b", None), src()).unwrap();
        assert_eq!(got.addr, "192.0.2.9:7800".parse::<SocketAddr>().unwrap());

        s.advertised = "[::]:7801".parse().unwrap();
        let a = encode_announcement(&s).unwrap();
        let v6src: SocketAddr = "[fd00::5]:1234".parse().unwrap();
        let got = decode_announcement(&a, &settings("b", None), v6src).unwrap();
        assert_eq!(got.addr, "[fd00::5]:7801".parse::<SocketAddr>().unwrap());

        s.advertised = "[fd00::7]:7802".parse().unwrap();
        let a = encode_announcement(&s).unwrap();
        let got = decode_announcement(&a, &settings("b", None), src()).unwrap();
        assert_eq!(got.addr, "[fd00::7]:7802".parse::<SocketAddr>().unwrap());
    }

    #[test]
    fn wrong_magic_protocol_shape_and_addresses_are_refused() {
        let me = settings("b", None);
        let v = json(&encode_announcement(&settings("a", None)).unwrap());
        let with = |field: &str, value: serde_json::Value| {
            let mut t = v.clone();
            t[field] = value;
            decode_announcement(&bytes(&t), &me, src())
        };
        assert_eq!(
            with("magic", 0.into()),
            Err(AnnounceError::BadMagic { got: 0 })
        );
        assert_eq!(
            with("protocol", 2.into()),
            Err(AnnounceError::UnsupportedProtocol { got: 2 })
        );
        assert!(matches!(
            with("extra", 1.into()),
            Err(AnnounceError::Malformed(_))
        ));
        assert!(matches!(
            with("node_id", "".into()),
            Err(AnnounceError::Malformed(_))
        ));
        assert!(matches!(
            with("mac", "zz".into()),
            Err(AnnounceError::Malformed(_))
        ));
        for addr in [
            "node-a:7800",
            "127.0.0.1",
            "127.0.0.1:0",
            "239.255.78.0:7800",
            "255.255.255.255:7800",
            "",
        ] {
            assert!(
                matches!(
                    with("addr", addr.into()),
                    Err(AnnounceError::BadAddr { .. })
                ),
                "{addr}"
            );
        }
        let mut t = v.clone();
        t.as_object_mut().unwrap().remove("addr");
        assert!(matches!(
            decode_announcement(&bytes(&t), &me, src()),
            Err(AnnounceError::Malformed(_))
        ));
        // A release mismatch is left to the handshake.
        assert!(with("version", "9.9.9".into()).is_ok());
    }

    #[test]
    fn oversized_datagrams_and_announcements_are_refused() {
        let big = vec![b' '; MAX_ANNOUNCEMENT + 1];
        assert!(matches!(
            decode_announcement(&big, &settings("b", None), src()),
            Err(AnnounceError::TooLarge { .. })
        ));
        let mut s = settings("a", None);
        s.cluster = "x".repeat(MAX_ANNOUNCEMENT);
        assert!(matches!(
            encode_announcement(&s),
            Err(AnnounceError::TooLarge { .. })
        ));
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
            assert_eq!(s.interface(), iface, "{bind}");
            assert_eq!(
                s.send_source(),
                source.parse::<Ipv4Addr>().unwrap(),
                "{bind}"
            );
        }
    }

    #[test]
    fn peers_expire_and_are_bounded() {
        let t0 = Instant::now();
        let ttl = Duration::from_secs(5);
        let mut p = Peers::new(ttl, 2);
        let a: SocketAddr = "10.0.0.1:1".parse().unwrap();
        let b: SocketAddr = "10.0.0.2:1".parse().unwrap();
        let c: SocketAddr = "10.0.0.3:1".parse().unwrap();
        assert_eq!(p.hear(a, t0), Heard::New);
        assert_eq!(p.hear(a, t0), Heard::Refreshed);
        assert_eq!(p.hear(b, t0 + Duration::from_secs(3)), Heard::New);
        assert_eq!(p.hear(c, t0), Heard::Full { first: true });
        assert_eq!(p.hear(c, t0), Heard::Full { first: false });
        assert_eq!(p.addrs(), Addrs::from([a, b]));
        assert!(p.expire(t0 + Duration::from_secs(4)).is_empty());
        assert_eq!(p.expire(t0 + ttl), vec![a]);
        assert_eq!(p.addrs(), Addrs::from([b]));
        // Room again: a later flood is reported again.
        assert_eq!(p.hear(c, t0 + ttl), Heard::New);
        assert_eq!(p.hear(a, t0 + ttl), Heard::Full { first: true });
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..3000)) {
            let _ = decode_announcement(&data, &settings("b", Some("k")), src());
            let _ = decode_announcement(&data, &settings("b", None), src());
        }

        #[test]
        fn arbitrary_json_shapes_never_panic(
            magic in prop_oneof![Just(MAGIC), any::<u32>()],
            protocol in prop_oneof![Just(PROTOCOL), any::<u16>()],
            cluster in prop_oneof![Just("prod".to_string()), ".{0,8}"],
            node_id in ".{0,8}",
            addr in prop_oneof![".{0,24}", "[0-9.]{1,15}:[0-9]{1,6}", "\\[[0-9a-f:]{0,20}\\]:[0-9]{1,6}"],
            mac in proptest::option::of("[0-9a-fA-F]{64}|.{0,70}"),
        ) {
            let mut v = serde_json::json!({
                "magic": magic, "protocol": protocol, "cluster": cluster,
                "node_id": node_id, "version": "0.1.0", "addr": addr,
            });
            if let Some(m) = mac {
                v["mac"] = m.into();
            }
            let data = bytes(&v);
            for me in [settings("b", Some("k")), settings("b", None)] {
                if let Ok(a) = decode_announcement(&data, &me, src()) {
                    prop_assert!(a.addr.port() != 0);
                    prop_assert!(!a.addr.ip().is_unspecified());
                    prop_assert!(a.node_id != "b");
                }
            }
        }

        #[test]
        fn any_single_byte_change_of_a_signed_announcement_is_refused_or_equal(
            pos in any::<prop::sample::Index>(),
            byte in any::<u8>(),
        ) {
            let a = encode_announcement(&settings("a", Some("k"))).unwrap();
            let me = settings("b", Some("k"));
            let original = decode_announcement(&a, &me, src()).unwrap();
            let mut t = a.clone();
            let i = pos.index(t.len());
            t[i] = byte;
            // Either refused, or it decodes to the very same peer (e.g. a hex digit's case, or
            // JSON whitespace).
            if let Ok(got) = decode_announcement(&t, &me, src()) {
                prop_assert_eq!(got, original);
            }
        }
    }
}
