//! Receiving: the handshake gate, the accept loop, and the inbound connections, which
//! authenticate a peer and read what it announces.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use super::{identity, record_refusal, Ctx, HANDSHAKE_TIMEOUT};
use crate::cluster::broadcast::Shared;
use crate::cluster::membership::SeqCheck;
use crate::cluster::session::{self, Opener, Peer};
use crate::cluster::wire::{decode_body, FrameReader, Message, RejectReason, WireError, MAX_FRAME};

/// Handshakes running at once; more connections are closed at once, so a flood of connection
/// attempts costs a file descriptor briefly and never starves established peers.
const MAX_HANDSHAKES: usize = 64;
/// Further handshake slots that only connections from a known peer's IP (a discovered or learned
/// address) may take. Without them a flood that keeps the shared slots full locks out a peer that
/// joins or reconnects during it (found by tests/cluster_flood.rs).
const RESERVED_PEER_HANDSHAKES: usize = 16;
/// Handshakes from one source IP at once: a single flooding host cannot take every shared slot.
const MAX_HANDSHAKES_PER_IP: usize = 8;

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

/// Accepts peers' connections until the channel is left. The listener is shared, so a run
/// started again after a panic accepts on the same socket; connections accepted by an ended run
/// go on in their own tasks.
pub(super) async fn accept_loop(listener: Arc<TcpListener>, ctx: Ctx) {
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
        session::accept(&mut stream, &id, s.secret.as_ref()),
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
        match decode_body(opener.open(&frame)?)? {
            Message::Invalidate(inv) if inv.origin == peer.node_id => {
                let check = {
                    let mut st = s.lock();
                    st.members.heard(&peer.node_id, now);
                    st.members.invalidation_seq(&peer.node_id, inv.seq)
                };
                ctx.inv.apply(&inv.change).await;
                if let Some(at) = inv.at_unix_ms {
                    ctx.inv.record_delay(crate::invalidation::Channel::Peer, at);
                }
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
                super::gossip::heard(&s, &hb.peers, now);
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
