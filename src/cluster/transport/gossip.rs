//! TCP discovery's peer-list exchange: every heartbeat lists the addresses of the peers its
//! sender is linked with, and the receiver dials the ones it does not know. Nodes whose
//! `CLUSTER_INITIAL_HOSTS` name only some of the others (one-sided lists, a new node that names
//! one seed) thus still form a full mesh. MULTICAST and DNS discovery find every node by
//! themselves, so their heartbeats list nothing.

use std::net::SocketAddr;
use std::time::Instant;

use crate::cluster::broadcast::Shared;
use crate::cluster::wire::MAX_GOSSIP;
use crate::config::Discovery;

/// The addresses a heartbeat of this node lists: its alive peers' in TCP discovery, else none.
pub(super) fn to_send(s: &Shared) -> Vec<SocketAddr> {
    if s.config.discovery != Discovery::Tcp {
        return Vec::new();
    }
    let mut addrs = s.lock().members.alive_addrs();
    addrs.truncate(MAX_GOSSIP);
    addrs
}

/// Records the addresses a peer's heartbeat listed; new ones are dialed (through `learned`).
pub(super) fn heard(s: &Shared, peers: &[SocketAddr], now: Instant) {
    if s.config.discovery != Discovery::Tcp || peers.is_empty() {
        return;
    }
    let own: Vec<SocketAddr> = s
        .own_addrs
        .lock()
        .map(|o| o.iter().copied().collect())
        .unwrap_or_default();
    let local = s.local_addr.get().copied();
    let fresh: Vec<SocketAddr> = {
        let Ok(mut seen) = s.gossiped.lock() else {
            return;
        };
        peers
            .iter()
            .take(MAX_GOSSIP)
            .filter(|a| Some(**a) != local && !own.contains(a) && !a.ip().is_unspecified())
            .filter(|a| seen.insert(**a, now).is_none())
            .copied()
            .collect()
    };
    for addr in fresh {
        if s.learned.send_if_modified(|l| l.insert(addr)) {
            tracing::info!(%addr, "cluster address learned from a peer's heartbeat; dialing it");
        }
    }
}

/// Forgets addresses no heartbeat has listed for [`Timing::gone_after`] where no peer is alive
/// (a node that left for good): they are no longer dialed.
///
/// [`Timing::gone_after`]: crate::cluster::Timing::gone_after
pub(super) fn expire(s: &Shared, now: Instant) {
    let limit = s.timing.gone_after;
    let alive = s.lock().members.alive_addrs();
    let stale: Vec<SocketAddr> = {
        let Ok(mut seen) = s.gossiped.lock() else {
            return;
        };
        let stale: Vec<SocketAddr> = seen
            .iter()
            .filter(|(a, at)| now.duration_since(**at) > limit && !alive.contains(a))
            .map(|(a, _)| *a)
            .collect();
        for a in &stale {
            seen.remove(a);
        }
        stale
    };
    for a in stale {
        tracing::debug!(addr = %a, "no peer lists this cluster address any more; not dialing it");
        s.learned.send_if_modified(|l| l.remove(&a));
    }
}
