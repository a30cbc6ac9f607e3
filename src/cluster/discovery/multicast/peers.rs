//! The table of cluster addresses heard, when each was last heard, bounded in size.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::time::Instant;

use super::super::Addrs;

/// What [`Peers::hear`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Heard {
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
pub(super) struct Peers {
    last_heard: HashMap<SocketAddr, Instant>,
    ttl: Duration,
    cap: usize,
    full_reported: bool,
}

impl Peers {
    pub(super) fn new(ttl: Duration, cap: usize) -> Peers {
        Peers {
            last_heard: HashMap::new(),
            ttl,
            cap,
            full_reported: false,
        }
    }

    pub(super) fn hear(&mut self, addr: SocketAddr, now: Instant) -> Heard {
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
    pub(super) fn expire(&mut self, now: Instant) -> Vec<SocketAddr> {
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

    pub(super) fn addrs(&self) -> Addrs {
        self.last_heard.keys().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
