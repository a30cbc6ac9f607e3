//! Who the peers are and how they are doing: a plain table, fed with events and the time they
//! happened, so every rule here is tested without sockets or sleeps.
//!
//! A peer is keyed by its node id (new at every start). It is **alive** while it is heard from
//! (any frame, heartbeats included), **suspect** once its connection to us closed or it has been
//! silent for [`Timing::suspect_after`], and **gone** after [`Timing::gone_after`] of silence;
//! **left** when it said goodbye ([`crate::cluster::Leave`]). A node that restarts on the same
//! address replaces its old entry, so `/cluster` shows one row per address.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;

/// Liveness of a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PeerState {
    /// Heard from within [`Timing::suspect_after`], connection up.
    Alive,
    /// Its connection closed, or it has been silent longer than [`Timing::suspect_after`].
    Suspect,
    /// Silent longer than [`Timing::gone_after`].
    Gone,
    /// Said it was shutting down.
    Left,
}

/// Heartbeat-derived time limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// How often heartbeats are sent.
    pub heartbeat: Duration,
    /// Silence after which an alive peer is suspect (3 heartbeats).
    pub suspect_after: Duration,
    /// Silence after which a peer is gone (10 heartbeats).
    pub gone_after: Duration,
    /// How long gone and left peers stay listed before they are forgotten.
    pub forget_after: Duration,
}

impl Timing {
    /// The limits for a heartbeat interval.
    pub fn new(heartbeat: Duration) -> Timing {
        Timing {
            heartbeat,
            suspect_after: heartbeat * 3,
            gone_after: heartbeat * 10,
            forget_after: (heartbeat * 300).max(Duration::from_secs(60)),
        }
    }
}

/// Most peers (and most rejected addresses) remembered; beyond it the oldest gone ones go first
/// and new rejected entries replace the oldest.
pub const MAX_PEERS: usize = 1024;
const MAX_REJECTED: usize = 64;

/// One peer, as `/cluster` shows it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerReport {
    /// The peer's node id.
    pub node_id: String,
    /// The peer's cluster address.
    pub addr: SocketAddr,
    /// The peer's release.
    pub version: String,
    /// Liveness.
    pub state: PeerState,
    /// Milliseconds since anything was heard from it.
    pub last_heard_ms_ago: u64,
    /// Its connection to this node is up (this node receives over it).
    pub inbound: bool,
    /// This node's connection to it is up (this node sends over it).
    pub outbound: bool,
    /// Messages this node sent it (invalidations, heartbeats, leave).
    pub sent: u64,
    /// Messages received from it.
    pub received: u64,
    /// Invalidations received from it.
    pub invalidations_received: u64,
    /// Messages dropped for it because its queue was full or its connection was down.
    pub dropped: u64,
    /// This node could not deliver everything to it (queue overflow or connection loss with
    /// messages pending); it repairs itself from the database on the gap.
    pub missed: bool,
    /// Gaps in its sequence numbers seen by this node (each triggered a catch-up).
    pub gaps: u64,
    /// The last broadcast sequence number received from it.
    pub last_seq: u64,
}

/// A peer this node refused, or that refused this node.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Rejected {
    /// The address involved (the peer's, as dialed or as seen).
    pub addr: String,
    /// The peer's node id, when it said.
    pub node_id: Option<String>,
    /// `cluster_name`, `version`, `auth`, `protocol`.
    pub reason: String,
    /// The full explanation.
    pub message: String,
    /// `refused` (this node refused it) or `refused_by_peer`.
    pub direction: &'static str,
    /// When it last happened (RFC 3339).
    #[serde(with = "time::serde::rfc3339")]
    pub at: time::OffsetDateTime,
    /// How many times.
    pub count: u64,
}

#[derive(Debug, Clone)]
struct Entry {
    addr: SocketAddr,
    version: String,
    state: PeerState,
    last_heard: Instant,
    inbound: u32,
    outbound: bool,
    sent: u64,
    received: u64,
    invalidations: u64,
    dropped: u64,
    missed: bool,
    gaps: u64,
    last_seq: u64,
}

/// What a sequence number told the receiver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeqCheck {
    /// In order (or a harmless repeat).
    InOrder,
    /// Messages from this origin were missed: catch up from the database.
    Gap,
}

/// The membership table.
#[derive(Debug)]
pub struct Membership {
    timing: Timing,
    peers: HashMap<String, Entry>,
    rejected: Vec<Rejected>,
}

impl Membership {
    /// An empty table.
    pub fn new(timing: Timing) -> Membership {
        Membership {
            timing,
            peers: HashMap::new(),
            rejected: Vec::new(),
        }
    }

    /// The limits in use.
    pub fn timing(&self) -> Timing {
        self.timing
    }

    fn entry(
        &mut self,
        node_id: &str,
        addr: SocketAddr,
        version: &str,
        now: Instant,
    ) -> &mut Entry {
        if !self.peers.contains_key(node_id) {
            // A restart on the same address: the new node id takes over the old row.
            self.peers.retain(|_, e| e.addr != addr);
            if self.peers.len() >= MAX_PEERS {
                self.evict_oldest_gone();
            }
        }
        let e = self
            .peers
            .entry(node_id.to_string())
            .or_insert_with(|| Entry {
                addr,
                version: version.to_string(),
                state: PeerState::Alive,
                last_heard: now,
                inbound: 0,
                outbound: false,
                sent: 0,
                received: 0,
                invalidations: 0,
                dropped: 0,
                missed: false,
                gaps: 0,
                last_seq: 0,
            });
        e.addr = addr;
        e
    }

    fn evict_oldest_gone(&mut self) {
        let oldest = self
            .peers
            .iter()
            .filter(|(_, e)| matches!(e.state, PeerState::Gone | PeerState::Left))
            .min_by_key(|(_, e)| e.last_heard)
            .or_else(|| self.peers.iter().min_by_key(|(_, e)| e.last_heard))
            .map(|(k, _)| k.clone());
        if let Some(k) = oldest {
            self.peers.remove(&k);
        }
    }

    /// A peer's connection to this node completed its handshake.
    pub fn inbound_up(&mut self, node_id: &str, addr: SocketAddr, version: &str, now: Instant) {
        let e = self.entry(node_id, addr, version, now);
        e.inbound += 1;
        e.state = PeerState::Alive;
        e.last_heard = now;
    }

    /// A peer's connection to this node closed.
    pub fn inbound_down(&mut self, node_id: &str) {
        if let Some(e) = self.peers.get_mut(node_id) {
            e.inbound = e.inbound.saturating_sub(1);
            if e.inbound == 0 && e.state == PeerState::Alive {
                e.state = PeerState::Suspect;
            }
        }
    }

    /// This node's connection to a peer completed its handshake.
    pub fn outbound_up(&mut self, node_id: &str, addr: SocketAddr, version: &str, now: Instant) {
        let e = self.entry(node_id, addr, version, now);
        e.outbound = true;
        if e.state != PeerState::Alive && e.inbound > 0 {
            e.state = PeerState::Alive;
        }
    }

    /// This node's connection to a peer closed; `missed` when messages were still queued.
    pub fn outbound_down(&mut self, node_id: &str, missed: bool) {
        if let Some(e) = self.peers.get_mut(node_id) {
            e.outbound = false;
            e.missed |= missed;
        }
    }

    /// Anything arrived from the peer.
    pub fn heard(&mut self, node_id: &str, now: Instant) {
        if let Some(e) = self.peers.get_mut(node_id) {
            e.received += 1;
            e.last_heard = now;
            if e.state != PeerState::Left {
                e.state = PeerState::Alive;
            }
        }
    }

    /// An invalidation with sequence number `seq` arrived from `node_id`.
    pub fn invalidation_seq(&mut self, node_id: &str, seq: u64) -> SeqCheck {
        let Some(e) = self.peers.get_mut(node_id) else {
            return SeqCheck::InOrder;
        };
        e.invalidations += 1;
        let check = if seq > e.last_seq.saturating_add(1) {
            e.gaps += 1;
            SeqCheck::Gap
        } else {
            SeqCheck::InOrder
        };
        e.last_seq = e.last_seq.max(seq);
        check
    }

    /// A heartbeat said the peer's last broadcast was `seq`: anything above what arrived was
    /// lost on the way.
    pub fn heartbeat_seq(&mut self, node_id: &str, seq: u64) -> SeqCheck {
        let Some(e) = self.peers.get_mut(node_id) else {
            return SeqCheck::InOrder;
        };
        if seq > e.last_seq {
            e.gaps += 1;
            e.last_seq = seq;
            SeqCheck::Gap
        } else {
            SeqCheck::InOrder
        }
    }

    /// The peer said it is leaving.
    pub fn left(&mut self, node_id: &str) {
        if let Some(e) = self.peers.get_mut(node_id) {
            e.state = PeerState::Left;
        }
    }

    /// Counts messages written to the peer.
    pub fn sent(&mut self, node_id: &str, n: u64) {
        if let Some(e) = self.peers.get_mut(node_id) {
            e.sent += n;
        }
    }

    /// Counts a message dropped for the peer (its queue was full).
    pub fn dropped(&mut self, node_id: &str) {
        if let Some(e) = self.peers.get_mut(node_id) {
            e.dropped += 1;
            e.missed = true;
        }
    }

    /// Counts a broadcast against every known peer, except those that left, that has no sending
    /// connection right now (`linked` says which do): it will never get this message.
    pub fn missed_unless(&mut self, linked: impl Fn(&str) -> bool) {
        for (id, e) in &mut self.peers {
            if e.state != PeerState::Left && !linked(id) {
                e.dropped += 1;
                e.missed = true;
            }
        }
    }

    /// Applies the silence limits; returns the node ids that just became gone.
    pub fn tick(&mut self, now: Instant) -> Vec<String> {
        let t = self.timing;
        let mut gone = Vec::new();
        self.peers.retain(|id, e| {
            let silent = now.saturating_duration_since(e.last_heard);
            match e.state {
                PeerState::Alive if silent > t.suspect_after => e.state = PeerState::Suspect,
                PeerState::Suspect if silent > t.gone_after => {
                    e.state = PeerState::Gone;
                    gone.push(id.clone());
                }
                PeerState::Gone | PeerState::Left if silent > t.forget_after => return false,
                _ => {}
            }
            true
        });
        gone
    }

    /// The peer's state, if known.
    pub fn state(&self, node_id: &str) -> Option<PeerState> {
        self.peers.get(node_id).map(|e| e.state)
    }

    /// The cluster addresses of the peers alive now (what a heartbeat tells the others in TCP
    /// discovery), in no particular order.
    pub fn alive_addrs(&self) -> Vec<SocketAddr> {
        self.peers
            .values()
            .filter(|e| e.state == PeerState::Alive)
            .map(|e| e.addr)
            .collect()
    }

    /// The peer's address, if known.
    pub fn addr(&self, node_id: &str) -> Option<SocketAddr> {
        self.peers.get(node_id).map(|e| e.addr)
    }

    /// Records a refusal (either way), keeping one row per address and reason.
    pub fn rejected(
        &mut self,
        addr: String,
        node_id: Option<String>,
        reason: &str,
        message: String,
        direction: &'static str,
    ) {
        let at = time::OffsetDateTime::from(SystemTime::now());
        if let Some(r) = self
            .rejected
            .iter_mut()
            .find(|r| r.addr == addr && r.reason == reason && r.direction == direction)
        {
            r.count += 1;
            r.at = at;
            r.message = message;
            r.node_id = node_id.or(r.node_id.take());
            return;
        }
        if self.rejected.len() >= MAX_REJECTED {
            self.rejected.remove(0);
        }
        self.rejected.push(Rejected {
            addr,
            node_id,
            reason: reason.to_string(),
            message,
            direction,
            at,
            count: 1,
        });
    }

    /// Every peer, sorted by address.
    pub fn report(&self, now: Instant) -> Vec<PeerReport> {
        let mut v: Vec<PeerReport> = self
            .peers
            .iter()
            .map(|(id, e)| PeerReport {
                node_id: id.clone(),
                addr: e.addr,
                version: e.version.clone(),
                state: e.state,
                last_heard_ms_ago: now.saturating_duration_since(e.last_heard).as_millis() as u64,
                inbound: e.inbound > 0,
                outbound: e.outbound,
                sent: e.sent,
                received: e.received,
                invalidations_received: e.invalidations,
                dropped: e.dropped,
                missed: e.missed,
                gaps: e.gaps,
                last_seq: e.last_seq,
            })
            .collect();
        v.sort_by(|a, b| a.addr.cmp(&b.addr).then(a.node_id.cmp(&b.node_id)));
        v
    }

    /// The refusals, oldest first.
    pub fn rejected_report(&self) -> Vec<Rejected> {
        self.rejected.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HB: Duration = Duration::from_millis(100);

    fn addr(n: u8) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, n], 7800))
    }

    fn table() -> Membership {
        Membership::new(Timing::new(HB))
    }

    #[test]
    fn silence_makes_a_peer_suspect_then_gone_and_a_frame_revives_it() {
        let mut m = table();
        let t0 = Instant::now();
        m.inbound_up("b", addr(2), "0.1.0", t0);
        assert_eq!(m.state("b"), Some(PeerState::Alive));
        assert!(m.tick(t0 + HB * 2).is_empty());
        assert_eq!(m.state("b"), Some(PeerState::Alive));
        m.tick(t0 + HB * 4);
        assert_eq!(m.state("b"), Some(PeerState::Suspect));
        assert_eq!(m.tick(t0 + HB * 11), vec!["b".to_string()]);
        assert_eq!(m.state("b"), Some(PeerState::Gone));
        m.heard("b", t0 + HB * 12);
        assert_eq!(m.state("b"), Some(PeerState::Alive));
    }

    #[test]
    fn a_closed_connection_makes_it_suspect_at_once() {
        let mut m = table();
        let t0 = Instant::now();
        m.inbound_up("b", addr(2), "0.1.0", t0);
        m.inbound_down("b");
        assert_eq!(m.state("b"), Some(PeerState::Suspect));
    }

    #[test]
    fn leave_is_final_until_it_comes_back_and_gone_peers_are_forgotten() {
        let mut m = table();
        let t0 = Instant::now();
        m.inbound_up("b", addr(2), "0.1.0", t0);
        m.left("b");
        m.inbound_down("b");
        m.heard("b", t0);
        assert_eq!(m.state("b"), Some(PeerState::Left));
        m.tick(t0 + Duration::from_secs(61));
        assert_eq!(m.state("b"), None);
    }

    #[test]
    fn a_restart_on_the_same_address_replaces_the_row() {
        let mut m = table();
        let t0 = Instant::now();
        m.inbound_up("b-1", addr(2), "0.1.0", t0);
        m.inbound_down("b-1");
        m.inbound_up("b-2", addr(2), "0.1.0", t0);
        let r = m.report(t0);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].node_id, "b-2");
        assert_eq!(r[0].state, PeerState::Alive);
    }

    #[test]
    fn sequence_gaps_are_detected_by_invalidations_and_heartbeats() {
        let mut m = table();
        let t0 = Instant::now();
        m.inbound_up("b", addr(2), "0.1.0", t0);
        // A fresh origin starting at 0: a heartbeat at 0 is no gap.
        assert_eq!(m.heartbeat_seq("b", 0), SeqCheck::InOrder);
        assert_eq!(m.invalidation_seq("b", 1), SeqCheck::InOrder);
        assert_eq!(m.invalidation_seq("b", 2), SeqCheck::InOrder);
        assert_eq!(m.invalidation_seq("b", 4), SeqCheck::Gap);
        assert_eq!(m.heartbeat_seq("b", 4), SeqCheck::InOrder);
        // The last message before a heartbeat was lost.
        assert_eq!(m.heartbeat_seq("b", 5), SeqCheck::Gap);
        assert_eq!(m.invalidation_seq("b", 6), SeqCheck::InOrder);
        let r = &m.report(t0)[0];
        assert_eq!((r.gaps, r.last_seq, r.invalidations_received), (2, 6, 4));
        // A node that joined late learns of messages it never got from the first heartbeat.
        m.inbound_up("c", addr(3), "0.1.0", t0);
        assert_eq!(m.heartbeat_seq("c", 17), SeqCheck::Gap);
    }

    #[test]
    fn drops_mark_the_peer_as_missed() {
        let mut m = table();
        let t0 = Instant::now();
        m.outbound_up("b", addr(2), "0.1.0", t0);
        m.sent("b", 3);
        m.dropped("b");
        let r = &m.report(t0)[0];
        assert!(r.missed && r.dropped == 1 && r.sent == 3 && r.outbound);
        m.outbound_down("b", false);
        assert!(!m.report(t0)[0].outbound);
    }

    #[test]
    fn a_broadcast_while_a_peer_is_unlinked_marks_it_missed() {
        let mut m = table();
        let t0 = Instant::now();
        m.outbound_up("b", addr(2), "0.1.0", t0);
        m.inbound_up("c", addr(3), "0.1.0", t0);
        m.inbound_up("d", addr(4), "0.1.0", t0);
        m.left("d");
        m.missed_unless(|id| id == "b");
        let r = m.report(t0);
        let get = |id: &str| r.iter().find(|p| p.node_id == id).unwrap().clone();
        assert!(!get("b").missed);
        assert!(get("c").missed && get("c").dropped == 1);
        assert!(!get("d").missed, "a node that left is not owed anything");
    }

    #[test]
    fn rejections_are_merged_and_bounded() {
        let mut m = table();
        for i in 0..(MAX_REJECTED + 10) {
            m.rejected(
                format!("10.0.0.{i}:7800"),
                None,
                "version",
                "v".into(),
                "refused",
            );
        }
        // The newest entry is kept and merged; the oldest were dropped.
        let newest = format!("10.0.0.{}:7800", MAX_REJECTED + 9);
        m.rejected(newest.clone(), None, "version", "again".into(), "refused");
        let r = m.rejected_report();
        assert_eq!(r.len(), MAX_REJECTED);
        assert!(!r.iter().any(|r| r.addr == "10.0.0.0:7800"));
        let last = r.iter().find(|r| r.addr == newest).unwrap();
        assert_eq!((last.count, last.message.as_str()), (2, "again"));
    }

    #[test]
    fn the_table_is_bounded() {
        let mut m = table();
        let t0 = Instant::now();
        for i in 0..(MAX_PEERS + 5) {
            let a = SocketAddr::from(([10, 0, (i / 250) as u8, (i % 250) as u8], 7800));
            m.inbound_up(&format!("n{i}"), a, "0.1.0", t0);
        }
        assert_eq!(m.report(t0).len(), MAX_PEERS);
    }
}
