//! The cluster channel's tasks: listening, dialing, sending, receiving.
//!
//! Each pair of nodes uses two TCP connections, one per direction: a node sends only on the
//! connections it dialed and receives only on the ones it accepted. A broadcast writes an idle
//! connection itself; otherwise the connection's writer task sends it from the queue (see
//! `super::pipe` for how the two keep order). A peer that connects to us is dialed back at the IP
//! it connects from and the port it advertised, so discovery only has to work one way.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::auth::{self, HandshakeError, Identity, Opener, Peer};
use super::broadcast::{Cluster, Link, Shared};
use super::discovery::{self, Addrs};
use super::membership::SeqCheck;
use super::pipe::{Job, Pipe};
use super::wire::{
    Envelope, FrameReader, Heartbeat, Leave, Message, RejectReason, WireError, MAX_FRAME,
};
use crate::config::Discovery;
use crate::error::{Error, Result};
use crate::invalidation::Invalidation;

/// What the transport's tasks share: the channel's state and the node's invalidation
/// machinery, which applies what peers announce (the transport knows nothing else of the node).
#[derive(Clone)]
struct Ctx {
    s: Arc<Shared>,
    inv: Arc<Invalidation>,
}

/// Limit on the TCP connect to a peer.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Limit on a whole handshake, either side.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);
/// Handshakes running at once; more connections are closed at once, so a flood of connection
/// attempts costs a file descriptor briefly and never starves established peers.
const MAX_HANDSHAKES: usize = 64;
/// Further handshake slots that only connections from a known peer's IP (a discovered or learned
/// address) may take. Without them a flood that keeps the shared slots full locks out a peer that
/// joins or reconnects during it (found by tests/cluster_flood.rs).
const RESERVED_PEER_HANDSHAKES: usize = 16;
/// Handshakes from one source IP at once: a single flooding host cannot take every shared slot.
const MAX_HANDSHAKES_PER_IP: usize = 8;
/// Redial delays.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Redial delay after the peer refused us (other version, cluster or secret) or turned out to
/// be a second address of a node we already send to.
const BACKOFF_REFUSED: Duration = Duration::from_secs(30);

/// Binds the cluster port and starts discovery, the listener, the dialers, failure detection and
/// gap repair. Fails if the port cannot be bound.
pub async fn start(cluster: Cluster, inv: Arc<Invalidation>) -> Result<Vec<JoinHandle<()>>> {
    let s = cluster.shared.clone();
    let ctx = Ctx { s: s.clone(), inv };
    let bind = SocketAddr::new(s.config.bind_addr, s.config.port);
    let listener = TcpListener::bind(bind)
        .await
        .map_err(|io| Error::ClusterBind { addr: bind, io })?;
    let local = listener
        .local_addr()
        .map_err(|io| Error::ClusterBind { addr: bind, io })?;
    let _ = s.local_addr.set(local);
    if s.secret.is_none() {
        tracing::warn!(
            "CLUSTER_SECRET is not set: the cluster channel is unauthenticated; anyone who can \
             reach port {} can join and evict caches",
            local.port()
        );
    }
    tracing::info!(
        listen = %local,
        cluster = %s.config.name,
        discovery = ?s.config.discovery,
        "cluster channel listening"
    );
    let mut tasks = vec![
        tokio::spawn(accept_loop(listener, ctx.clone())),
        tokio::spawn(reconcile(ctx.clone())),
        tokio::spawn(failure_detector(s.clone())),
        tokio::spawn(gap_repair(ctx)),
    ];
    tasks.push(spawn_discovery(&s, local));
    Ok(tasks)
}

fn spawn_discovery(s: &Arc<Shared>, local: SocketAddr) -> JoinHandle<()> {
    let cfg = &s.config;
    let tx = s.discovered.clone();
    let status = s.discovery.clone();
    let cancel = s.cancel.clone();
    match cfg.discovery {
        Discovery::Tcp => tokio::spawn(discovery::tcp::run(
            cfg.initial_hosts.clone(),
            Duration::from_secs(cfg.dns_interval),
            tx,
            status,
            cancel,
        )),
        Discovery::Dns => tokio::spawn(discovery::dns::run(
            discovery::dns::DnsSettings {
                query: cfg.dns_query.clone().unwrap_or_default(),
                port: if cfg.port == 0 {
                    local.port()
                } else {
                    cfg.port
                },
                interval: Duration::from_secs(cfg.dns_interval),
                server: cfg.dns_server,
            },
            tx,
            status,
            cancel,
        )),
        Discovery::Multicast => tokio::spawn(discovery::multicast::run(
            discovery::multicast::MulticastSettings {
                group: cfg.multicast_addr,
                bind_addr: cfg.bind_addr,
                cluster: cfg.name.clone(),
                node_id: s.node_id.clone(),
                version: s.version.clone(),
                advertised: local,
                secret: s.secret.clone(),
                interval: Duration::from_millis(cfg.heartbeat_ms),
            },
            tx,
            status,
            cancel,
        )),
    }
}

fn identity(s: &Shared) -> Identity {
    Identity {
        cluster: s.config.name.clone(),
        node_id: s.node_id.clone(),
        version: s.version.clone(),
        advertised_addr: s
            .local_addr
            .get()
            .map(|a| a.to_string())
            .unwrap_or_default(),
    }
}

/// The peer's cluster address: the IP its connection came from, with the port it advertised.
///
/// The advertised IP is never taken: anyone may claim any address in a Hello, and taking it
/// let a host replace a real peer's membership row (its address) or make this node dial an
/// arbitrary host again and again. A peer's source IP is what it listens on (nodes send from
/// `CLUSTER_BIND_ADDR`), and only a host that really has that IP can connect from it.
fn peer_addr(peer: &Peer, seen: IpAddr) -> Option<SocketAddr> {
    let advertised: SocketAddr = peer.advertised_addr.parse().ok()?;
    if advertised.port() == 0 {
        return None;
    }
    let ip = seen.to_canonical();
    if !advertised.ip().is_unspecified() && advertised.ip().to_canonical() != ip {
        tracing::debug!(
            peer = %peer.node_id,
            advertised = %advertised,
            source = %ip,
            "peer advertised another IP than it connects from; using the source IP"
        );
    }
    Some(SocketAddr::new(ip, advertised.port()))
}

fn reason_name(r: &RejectReason) -> &'static str {
    match r {
        RejectReason::ClusterName { .. } => "cluster_name",
        RejectReason::Version { .. } => "version",
        RejectReason::Auth => "auth",
        RejectReason::SameNodeId { .. } => "same_node_id",
        _ => "protocol",
    }
}

/// Logs a refusal (an error for a version mismatch, which needs an operator) and lists it;
/// only the first of a series is logged above debug.
fn record_refusal(s: &Shared, addr: String, e: &HandshakeError) {
    let (reject, direction) = match e {
        HandshakeError::Refused(r) => (r, "refused"),
        HandshakeError::RejectedByPeer(r) => (r, "refused_by_peer"),
        _ => return,
    };
    let reason = reason_name(&reject.reason);
    let first = {
        let mut st = s.lock();
        let before = st
            .members
            .rejected_report()
            .iter()
            .any(|r| r.addr == addr && r.reason == reason && r.direction == direction);
        st.members.rejected(
            addr.clone(),
            None,
            reason,
            reject.message.clone(),
            direction,
        );
        !before
    };
    match (&reject.reason, first) {
        (RejectReason::Version { ours, theirs }, true) => tracing::error!(
            peer = %addr,
            our_version = %ours,
            their_version = %theirs,
            "cluster peer runs another release ({theirs}, this node {ours}); every node of a \
             cluster must run the same version: {direction}"
        ),
        (_, true) => {
            tracing::warn!(peer = %addr, %direction, "cluster peer refused: {}", reject.message)
        }
        (_, false) => {
            tracing::debug!(peer = %addr, %direction, "cluster peer refused again: {}", reject.message)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Receiving

/// Admission to the handshake stage. Every accepted connection needs a slot until its handshake
/// ends (at most [`HANDSHAKE_TIMEOUT`]); one that gets none is closed at once, so a flood costs a
/// file descriptor only briefly.
struct HandshakeGate {
    /// Slots anyone may take.
    shared: Arc<Semaphore>,
    /// Slots only known peers' IPs may take, tried before the shared ones.
    reserved: Arc<Semaphore>,
    /// Slots held per source IP; an IP is removed when its count drops to zero, so the map never
    /// holds more entries than there are slots.
    per_ip: Arc<std::sync::Mutex<std::collections::HashMap<IpAddr, usize>>>,
}

/// A held handshake slot, given back when dropped.
struct HandshakeSlot {
    _permit: tokio::sync::OwnedSemaphorePermit,
    ip: IpAddr,
    per_ip: Arc<std::sync::Mutex<std::collections::HashMap<IpAddr, usize>>>,
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        if let Ok(mut m) = self.per_ip.lock() {
            if let Some(n) = m.get_mut(&self.ip) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    m.remove(&self.ip);
                }
            }
        }
    }
}

impl HandshakeGate {
    fn new() -> HandshakeGate {
        HandshakeGate {
            shared: Arc::new(Semaphore::new(MAX_HANDSHAKES)),
            reserved: Arc::new(Semaphore::new(RESERVED_PEER_HANDSHAKES)),
            per_ip: Default::default(),
        }
    }

    /// A slot for a connection from `ip`, or `None` to shed it.
    fn admit(&self, ip: IpAddr, known_peer: bool) -> Option<HandshakeSlot> {
        let mut m = self.per_ip.lock().ok()?;
        if m.get(&ip).copied().unwrap_or(0) >= MAX_HANDSHAKES_PER_IP {
            return None;
        }
        let reserved = known_peer
            .then(|| self.reserved.clone().try_acquire_owned().ok())
            .flatten();
        let permit = reserved.or_else(|| self.shared.clone().try_acquire_owned().ok())?;
        *m.entry(ip).or_insert(0) += 1;
        Some(HandshakeSlot {
            _permit: permit,
            ip,
            per_ip: self.per_ip.clone(),
        })
    }
}

/// Whether `ip` is the IP of an address discovery published or a peer advertised. Only a
/// host that is really at that IP can connect from it over TCP, so the reserved slots cannot be
/// claimed from elsewhere.
fn known_peer_ip(s: &Shared, ip: IpAddr) -> bool {
    let ip = ip.to_canonical();
    let is = |a: &SocketAddr| a.ip().to_canonical() == ip;
    s.discovered.borrow().iter().any(is) || s.learned.borrow().iter().any(is)
}

async fn accept_loop(listener: TcpListener, ctx: Ctx) {
    let s = ctx.s.clone();
    let gate = HandshakeGate::new();
    loop {
        let accepted = tokio::select! {
            _ = s.cancel.cancelled() => return,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, from)) => {
                let known = known_peer_ip(&s, from.ip());
                let Some(permit) = gate.admit(from.ip(), known) else {
                    s.counters.connections_shed.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(%from, known, "too many cluster handshakes at once; connection closed");
                    continue;
                };
                let ctx = ctx.clone();
                tokio::spawn(async move {
                    let s = ctx.s.clone();
                    tokio::select! {
                        _ = s.cancel.cancelled() => {}
                        _ = inbound(stream, from, permit, ctx.clone()) => {}
                    }
                });
            }
            Err(e) => {
                // Out of file descriptors and the like: do not spin.
                tracing::warn!(error = %e, "accepting a cluster connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn inbound(mut stream: TcpStream, from: SocketAddr, permit: HandshakeSlot, ctx: Ctx) {
    let s = ctx.s.clone();
    let _ = stream.set_nodelay(true);
    let id = identity(&s);
    let hs = tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        auth::accept(&mut stream, &id, s.secret.as_ref()),
    )
    .await;
    drop(permit);
    let session = match hs {
        Ok(Ok(session)) => session,
        Ok(Err(e)) => {
            s.counters.handshakes_failed.fetch_add(1, Ordering::Relaxed);
            if matches!(e.reason(), Some(RejectReason::Auth)) {
                s.counters
                    .frames_unauthenticated
                    .fetch_add(1, Ordering::Relaxed);
            }
            record_refusal(&s, from.to_string(), &e);
            tracing::debug!(%from, error = %e, "inbound cluster handshake failed");
            return;
        }
        Err(_) => {
            s.counters.handshakes_failed.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%from, "inbound cluster handshake timed out");
            return;
        }
    };
    let (peer, _sealer, opener) = session.into_parts();
    let Some(addr) = peer_addr(&peer, from.ip()) else {
        s.counters.frames_protocol.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(%from, advertised = %peer.advertised_addr, "peer advertised an unusable address");
        return;
    };
    s.lock()
        .members
        .inbound_up(&peer.node_id, addr, &peer.version, Instant::now());
    s.learned.send_if_modified(|l| l.insert(addr));
    tracing::info!(peer = %peer.node_id, %addr, "cluster peer connected");
    let end = receive(&mut stream, opener, &peer, &ctx).await;
    s.lock().members.inbound_down(&peer.node_id);
    match end {
        Ok(()) => tracing::debug!(peer = %peer.node_id, "cluster peer closed its connection"),
        Err(e) => {
            let counter = match &e {
                WireError::TooLarge { .. } => Some(&s.counters.frames_oversized),
                e if e.is_security() => Some(&s.counters.frames_unauthenticated),
                e if e.is_closed() => None,
                WireError::Io(_) => None,
                _ => Some(&s.counters.frames_malformed),
            };
            if let Some(c) = counter {
                c.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(peer = %peer.node_id, %addr, error = %e, "bad frame from cluster peer; connection closed");
            } else {
                tracing::info!(peer = %peer.node_id, %addr, error = %e, "cluster peer connection lost");
            }
        }
    }
}

/// Reads frames until the peer leaves or breaks the protocol. `Ok` on a clean end.
async fn receive(
    stream: &mut TcpStream,
    mut opener: Opener,
    peer: &Peer,
    ctx: &Ctx,
) -> std::result::Result<(), WireError> {
    let s = ctx.s.clone();
    let silence = s.timing.gone_after;
    let mut frames = FrameReader::new(MAX_FRAME);
    // One timer for the silence limit, re-armed only when it fires (at most once per `silence`)
    // rather than a fresh timer per frame: a frame only records when it arrived.
    let mut last = tokio::time::Instant::now();
    let idle = tokio::time::sleep(silence);
    tokio::pin!(idle);
    loop {
        let frame = tokio::select! {
            biased;
            r = frames.next(stream) => match r {
                Ok(f) => f,
                Err(WireError::Closed) => return Ok(()),
                Err(e) => return Err(e),
            },
            () = &mut idle => {
                let deadline = last + silence;
                if tokio::time::Instant::now() >= deadline {
                    return Err(WireError::Io(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("nothing heard for {} ms", silence.as_millis()),
                    )));
                }
                idle.as_mut().reset(deadline);
                continue;
            }
        };
        last = tokio::time::Instant::now();
        let now = last.into_std();
        let env = Envelope::decode(opener.open(&frame)?, &s.config.name)?;
        match env.body {
            Message::Invalidate(inv) if inv.origin == peer.node_id => {
                let check = {
                    let mut st = s.lock();
                    st.members.heard(&peer.node_id, now);
                    st.members.invalidation_seq(&peer.node_id, inv.seq)
                };
                ctx.inv.apply(&inv.change).await;
                if let Some(xid) = inv.log_position.and_then(|p| u64::try_from(p).ok()) {
                    ctx.inv.peer_delivered(xid);
                }
                s.counters.applied.fetch_add(1, Ordering::Relaxed);
                if check == SeqCheck::Gap {
                    tracing::info!(peer = %peer.node_id, seq = inv.seq, "invalidations from a peer were missed; catching up from the database");
                    s.gap.notify_one();
                }
            }
            Message::Heartbeat(hb) if hb.origin == peer.node_id => {
                let check = {
                    let mut st = s.lock();
                    st.members.heard(&peer.node_id, now);
                    st.members.heartbeat_seq(&peer.node_id, hb.seq)
                };
                if check == SeqCheck::Gap {
                    tracing::info!(peer = %peer.node_id, seq = hb.seq, "a peer's heartbeat shows missed invalidations; catching up from the database");
                    s.gap.notify_one();
                }
            }
            Message::Leave(l) if l.origin == peer.node_id => {
                let addr = {
                    let mut st = s.lock();
                    st.members.left(&peer.node_id);
                    st.members.addr(&peer.node_id)
                };
                if let Some(a) = addr {
                    s.learned.send_if_modified(|l| l.remove(&a));
                }
                tracing::info!(peer = %peer.node_id, "cluster peer left");
                return Ok(());
            }
            other => {
                s.counters.frames_protocol.fetch_add(1, Ordering::Relaxed);
                return Err(WireError::Malformed(format!(
                    "unexpected {} message from {} after the handshake",
                    other.kind(),
                    peer.node_id
                )));
            }
        }
    }
}

/// Runs a catch-up step whenever a gap was seen; gaps seen during a step cause one more step.
async fn gap_repair(ctx: Ctx) {
    let s = ctx.s.clone();
    loop {
        tokio::select! {
            _ = s.cancel.cancelled() => return,
            _ = s.gap.notified() => {}
        }
        s.counters.gap_catchups.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = ctx.inv.step().await {
            tracing::warn!(error = %e, "catch-up after a peer gap failed; the periodic catch-up will retry");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Sending

/// Dials every address discovery or inbound peers gave, and stops dialing those that vanished.
async fn reconcile(ctx: Ctx) {
    let s = ctx.s.clone();
    let mut discovered = s.discovered.subscribe();
    let mut learned = s.learned.subscribe();
    let mut dialers: std::collections::HashMap<SocketAddr, CancellationToken> = Default::default();
    let own = s.local_addr.get().copied();
    loop {
        let mut targets: Addrs = discovered
            .borrow_and_update()
            .iter()
            .chain(learned.borrow_and_update().iter())
            .copied()
            .collect();
        if let Some(own) = own.filter(|o| targets.remove(o)) {
            if let Ok(mut a) = s.own_addrs.lock() {
                a.insert(own);
            }
        }
        dialers.retain(|addr, cancel| {
            let keep = targets.contains(addr);
            if !keep {
                cancel.cancel();
            }
            keep
        });
        for addr in targets {
            dialers.entry(addr).or_insert_with(|| {
                let cancel = s.cancel.child_token();
                tokio::spawn(dial(addr, ctx.clone(), cancel.clone()));
                cancel
            });
        }
        tokio::select! {
            _ = s.cancel.cancelled() => return,
            r = discovered.changed() => if r.is_err() { return },
            r = learned.changed() => if r.is_err() { return },
        }
    }
}

async fn connect_to(s: &Shared, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    // Send from the configured address, so the peer sees (and dials back) the right one.
    let bind = s.config.bind_addr;
    if !bind.is_unspecified() && bind.is_ipv4() == addr.is_ipv4() {
        socket.bind(SocketAddr::new(bind, 0))?;
    }
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(addr))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Keeps one sending connection to `addr` up until cancelled.
async fn dial(addr: SocketAddr, ctx: Ctx, cancel: CancellationToken) {
    let s = ctx.s.clone();
    let mut backoff = BACKOFF_MIN;
    let mut failing_since: Option<Instant> = None;
    loop {
        if cancel.is_cancelled() {
            return;
        }
        let delay = match connect_once(&s, addr, &cancel).await {
            Dialed::Ran => {
                backoff = BACKOFF_MIN;
                failing_since = None;
                BACKOFF_MIN
            }
            Dialed::Myself => {
                if let Ok(mut own) = s.own_addrs.lock() {
                    own.insert(addr);
                }
                tracing::debug!(%addr, "cluster address is this node itself; not dialing it");
                return;
            }
            Dialed::Refused => BACKOFF_REFUSED,
            Dialed::Failed(e) => {
                if failing_since.is_none() {
                    failing_since = Some(Instant::now());
                    tracing::debug!(%addr, error = %e, "cluster peer unreachable; retrying with backoff");
                }
                let d = backoff;
                backoff = (backoff * 2).min(BACKOFF_MAX);
                d
            }
        };
        // Up to 25% jitter, so nodes that lost a peer together do not redial in lockstep.
        let jitter = delay.mul_f64(rand_fraction() * 0.25);
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(delay + jitter) => {}
        }
    }
}

fn rand_fraction() -> f64 {
    let mut b = [0u8; 4];
    let _ = getrandom::fill(&mut b);
    f64::from(u32::from_le_bytes(b)) / f64::from(u32::MAX)
}

enum Dialed {
    /// A connection was established and has now ended.
    Ran,
    /// The address is this node's own.
    Myself,
    /// The peer refused us, or we already send to that node over another address.
    Refused,
    /// Could not connect or the handshake broke.
    Failed(String),
}

async fn connect_once(s: &Arc<Shared>, addr: SocketAddr, cancel: &CancellationToken) -> Dialed {
    let mut stream = match connect_to(s, addr).await {
        Ok(st) => st,
        Err(e) => return Dialed::Failed(e.to_string()),
    };
    let id = identity(s);
    let session = match tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        auth::connect(&mut stream, &id, s.secret.as_ref()),
    )
    .await
    {
        Ok(Ok(session)) => session,
        Ok(Err(e)) => {
            if matches!(e.reason(), Some(RejectReason::SameNodeId { .. })) {
                return Dialed::Myself;
            }
            s.counters.handshakes_failed.fetch_add(1, Ordering::Relaxed);
            if e.reason().is_some() {
                record_refusal(s, addr.to_string(), &e);
                return Dialed::Refused;
            }
            return Dialed::Failed(e.to_string());
        }
        Err(_) => {
            s.counters.handshakes_failed.fetch_add(1, Ordering::Relaxed);
            return Dialed::Failed("handshake timed out".into());
        }
    };
    let (peer, sealer, _opener) = session.into_parts();
    // The broadcaster writes to the write half directly; the read half is only kept open (a
    // sending connection never reads after the handshake). Dropping the write half, when the
    // link is gone, shuts the connection down.
    let (read_half, write_half) = stream.into_split();
    let registered = {
        let mut st = s.lock();
        if st.links.contains_key(&peer.node_id) {
            None
        } else {
            let link_id = st.next_link_id();
            let pipe = Arc::new(Pipe::new(write_half, sealer, s.config.send_queue, st.seq));
            st.links.insert(
                peer.node_id.clone(),
                Link {
                    id: link_id,
                    pipe: pipe.clone(),
                },
            );
            // The address this node really reached, not what the peer claims.
            st.members
                .outbound_up(&peer.node_id, addr, &peer.version, Instant::now());
            Some((link_id, pipe))
        }
    };
    let Some((link_id, pipe)) = registered else {
        tracing::debug!(%addr, peer = %peer.node_id, "already sending to this node over another address");
        return Dialed::Refused;
    };
    tracing::debug!(%addr, peer = %peer.node_id, "sending to cluster peer");
    let writer = Writer {
        s: s.clone(),
        peer: peer.node_id.clone(),
        pipe,
    };
    let end = writer.run(cancel).await;
    let pending = writer.pipe.close();
    {
        let mut st = s.lock();
        if st.links.get(&peer.node_id).is_some_and(|l| l.id == link_id) {
            st.links.remove(&peer.node_id);
        }
        st.members.outbound_down(&peer.node_id, pending);
    }
    drop(writer);
    drop(read_half);
    match end {
        Ok(()) => {}
        Err(e) => {
            tracing::info!(peer = %peer.node_id, %addr, error = %e, "sending to cluster peer failed; reconnecting")
        }
    }
    Dialed::Ran
}

struct Writer {
    s: Arc<Shared>,
    peer: String,
    pipe: Arc<Pipe>,
}

impl Writer {
    /// Writes what the broadcaster queued or left unsent, and heartbeats, until a Leave was sent,
    /// the task is cancelled, or a write fails.
    async fn run(&self, cancel: &CancellationToken) -> std::result::Result<(), WireError> {
        // The first heartbeat tells the peer our sequence at connect time: a peer that was
        // unreachable while we broadcast sees the gap at once. The pipe starts reserved for this
        // task, so it goes out before any broadcast.
        self.heartbeat().await?;
        let mut tick = tokio::time::interval(self.s.timing.heartbeat);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.reset();
        loop {
            // Checked between frames too: a link kept busy must still stop when told.
            if cancel.is_cancelled() {
                return Ok(());
            }
            match self.pipe.next_job()? {
                Some(Job::Frame(frame)) => self.write(&frame).await?,
                Some(Job::Leave) => return self.leave().await,
                None => {
                    tokio::select! {
                        biased;
                        _ = cancel.cancelled() => return Ok(()),
                        _ = self.pipe.woken() => {}
                        _ = tick.tick() => self.heartbeat().await?,
                    }
                }
            }
        }
    }

    async fn write(&self, frame: &[u8]) -> std::result::Result<(), WireError> {
        self.pipe.write_all(frame, self.s.timing.gone_after).await?;
        self.s.lock().members.sent(&self.peer, 1);
        Ok(())
    }

    /// Seals a message built with the sequence heartbeats report, behind everything sealed so
    /// far, and writes it.
    async fn send(&self, body: impl FnOnce(u64) -> Message) -> std::result::Result<(), WireError> {
        let name = &self.s.config.name;
        let frame = self
            .pipe
            .seal_with_seq(|seq| Envelope::new(name.clone(), body(seq)).encode())?;
        self.write(&frame).await
    }

    async fn heartbeat(&self) -> std::result::Result<(), WireError> {
        let origin = self.s.node_id.clone();
        self.send(|seq| {
            let at_unix_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0);
            Message::Heartbeat(Heartbeat {
                origin,
                seq,
                at_unix_ms,
            })
        })
        .await
    }

    async fn leave(&self) -> std::result::Result<(), WireError> {
        // A final heartbeat first, so the peer knows whether it missed anything.
        self.heartbeat().await?;
        let origin = self.s.node_id.clone();
        self.send(|_| Message::Leave(Leave { origin })).await
        // The write half shuts down when the pipe is dropped, after the link is removed.
    }
}

// ---------------------------------------------------------------------------------------------
// Failure detection

async fn failure_detector(s: Arc<Shared>) {
    let mut tick = tokio::time::interval(s.timing.heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = s.cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let gone: Vec<(String, Option<SocketAddr>)> = {
            let mut st = s.lock();
            let gone = st.members.tick(Instant::now());
            gone.into_iter()
                .map(|id| {
                    let a = st.members.addr(&id);
                    (id, a)
                })
                .collect()
        };
        for (id, addr) in gone {
            tracing::warn!(peer = %id, addr = ?addr, "cluster peer gone (silent)");
            if let Some(a) = addr {
                s.learned.send_if_modified(|l| l.remove(&a));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_is_where_it_connects_from_whatever_it_advertises() {
        let peer = |advertised: &str| Peer {
            node_id: "n".into(),
            version: "v".into(),
            advertised_addr: advertised.into(),
        };
        let from: IpAddr = "10.0.0.9".parse().unwrap();
        // Another host's address: only its port is taken.
        assert_eq!(
            peer_addr(&peer("10.0.0.1:7800"), from),
            Some("10.0.0.9:7800".parse().unwrap())
        );
        assert_eq!(
            peer_addr(&peer("0.0.0.0:7801"), from),
            Some("10.0.0.9:7801".parse().unwrap())
        );
        assert_eq!(
            peer_addr(&peer("[::]:7802"), "::ffff:10.0.0.9".parse().unwrap()),
            Some("10.0.0.9:7802".parse().unwrap())
        );
        for bad in ["10.0.0.1:0", "nonsense", ""] {
            assert_eq!(peer_addr(&peer(bad), from), None, "{bad}");
        }
    }

    #[test]
    fn the_handshake_gate_limits_each_ip_and_keeps_slots_for_known_peers() {
        let gate = HandshakeGate::new();
        let ip = |n: u8| IpAddr::from([10, 0, 0, n]);
        // One host gets at most MAX_HANDSHAKES_PER_IP slots.
        let one: Vec<_> = (0..MAX_HANDSHAKES_PER_IP)
            .map(|_| gate.admit(ip(1), false).expect("a slot"))
            .collect();
        assert!(gate.admit(ip(1), false).is_none());
        // Many hosts fill the shared slots...
        let mut flood = Vec::new();
        for n in 2..=255 {
            while let Some(slot) = gate.admit(ip(n), false) {
                flood.push(slot);
            }
        }
        assert_eq!(one.len() + flood.len(), MAX_HANDSHAKES);
        assert!(gate.admit(ip(2), false).is_none());
        // ...but a known peer still gets a reserved one.
        let peer = gate.admit(IpAddr::from([10, 0, 1, 1]), true);
        assert!(peer.is_some());
        // Slots come back when dropped, and the per-IP table empties.
        drop((one, flood, peer));
        assert!(gate.per_ip.lock().unwrap().is_empty());
        assert!(gate.admit(ip(1), false).is_some());
    }
}
