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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::Cluster;

    fn cluster(discovery: Discovery) -> Cluster {
        let mut cfg = crate::config::Config::default().cluster;
        cfg.discovery = discovery;
        Cluster::new(&cfg, "self")
    }

    #[test]
    fn listed_addresses_are_dialed_until_nobody_lists_them() {
        let c = cluster(Discovery::Tcp);
        let s = &c.shared;
        let me: SocketAddr = "10.0.0.1:7800".parse().unwrap();
        let _ = s.local_addr.set(me);
        let peer: SocketAddr = "10.0.0.3:7800".parse().unwrap();
        let t0 = Instant::now();
        heard(s, &[me, peer, "0.0.0.0:7800".parse().unwrap()], t0);
        assert_eq!(
            s.learned.borrow().iter().copied().collect::<Vec<_>>(),
            vec![peer],
            "its own and unspecified addresses are not dialed"
        );
        // Listed again later: kept past the first listing's limit.
        let later = t0 + s.timing.gone_after;
        heard(s, &[peer], later);
        expire(s, later + s.timing.gone_after / 2);
        assert!(s.learned.borrow().contains(&peer));
        expire(s, later + s.timing.gone_after * 2);
        assert!(
            s.learned.borrow().is_empty(),
            "forgotten once nobody lists it"
        );
    }

    #[test]
    fn other_discovery_modes_neither_send_nor_take_lists() {
        let c = cluster(Discovery::Multicast);
        let s = &c.shared;
        heard(s, &["10.0.0.3:7800".parse().unwrap()], Instant::now());
        assert!(s.learned.borrow().is_empty());
        assert!(to_send(s).is_empty());
        let many: Vec<SocketAddr> = (0..1000u32)
            .map(|i| SocketAddr::from(([10, 1, (i / 250) as u8, (i % 250) as u8 + 1], 7800)))
            .collect();
        let tcp = cluster(Discovery::Tcp);
        heard(&tcp.shared, &many, Instant::now());
        assert_eq!(
            tcp.shared.learned.borrow().len(),
            MAX_GOSSIP,
            "at most MAX_GOSSIP taken"
        );
    }
}
