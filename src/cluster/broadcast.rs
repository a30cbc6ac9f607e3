//! The cluster handle a node holds: per-peer send queues, the broadcast
//! sequence, membership, and the counters `/cluster` and `/metrics` show.
//!
//! Everything here is synchronous and never waits on a peer: [`Cluster::broadcast`] writes one
//! encoded message to every idle peer's socket without blocking, or puts it into the peer's
//! bounded queue (see `cluster::pipe`), and returns. A full queue drops the message for that peer
//! only and marks it as having missed messages; the peer then sees a gap in the sequence numbers
//! and catches up from the database.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

use super::discovery::{self, Addrs};
use super::membership::{Membership, PeerReport, Rejected, Timing};
use super::pipe::{Offered, Pipe};
use super::wire::encode_invalidate;
use super::ClusterSecret;
use crate::cache::Change;
use crate::config::{ClusterConfig, Discovery};

/// One established outgoing connection, as the broadcaster sees it.
#[derive(Debug)]
pub(crate) struct Link {
    /// Distinguishes this connection from a later one to the same node.
    pub id: u64,
    /// The connection, its queue and its writer task's state.
    pub pipe: Arc<Pipe>,
}

/// Membership, links and the broadcast sequence, under one lock so that a link registered at
/// sequence `s` receives exactly the messages after `s`.
#[derive(Debug)]
pub(crate) struct State {
    pub members: Membership,
    pub links: HashMap<String, Link>,
    pub seq: u64,
    next_link: u64,
}

impl State {
    pub fn next_link_id(&mut self) -> u64 {
        self.next_link += 1;
        self.next_link
    }
}

/// Counters of the cluster channel, for `/cluster` and `/metrics`.
#[derive(Debug, Default)]
pub struct Counters {
    /// Invalidations this node originated.
    pub broadcasts: AtomicU64,
    /// Invalidations received from peers and applied.
    pub applied: AtomicU64,
    /// Catch-up steps run because a peer's sequence numbers had a gap.
    pub gap_catchups: AtomicU64,
    /// Inbound connections closed for a malformed frame (bad JSON, wrong magic, wrong cluster).
    pub frames_malformed: AtomicU64,
    /// Inbound connections closed for a frame over the size limit.
    pub frames_oversized: AtomicU64,
    /// Inbound connections closed for a frame with a bad MAC, a replay or a skipped sequence.
    pub frames_unauthenticated: AtomicU64,
    /// Inbound connections closed for a message that breaks the protocol (wrong type, wrong origin).
    pub frames_protocol: AtomicU64,
    /// Handshakes that failed (refused, timed out, broken).
    pub handshakes_failed: AtomicU64,
    /// Connections refused because too many handshakes were already running.
    pub connections_shed: AtomicU64,
}

/// A snapshot of [`Counters`].
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
#[allow(missing_docs)]
pub struct CountersReport {
    pub broadcasts: u64,
    pub applied: u64,
    pub gap_catchups: u64,
    pub frames_malformed: u64,
    pub frames_oversized: u64,
    pub frames_unauthenticated: u64,
    pub frames_protocol: u64,
    pub handshakes_failed: u64,
    pub connections_shed: u64,
}

impl Counters {
    fn report(&self) -> CountersReport {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        CountersReport {
            broadcasts: g(&self.broadcasts),
            applied: g(&self.applied),
            gap_catchups: g(&self.gap_catchups),
            frames_malformed: g(&self.frames_malformed),
            frames_oversized: g(&self.frames_oversized),
            frames_unauthenticated: g(&self.frames_unauthenticated),
            frames_protocol: g(&self.frames_protocol),
            handshakes_failed: g(&self.handshakes_failed),
            connections_shed: g(&self.connections_shed),
        }
    }
}

pub(crate) struct Shared {
    pub config: ClusterConfig,
    pub node_id: String,
    pub version: String,
    pub secret: Option<ClusterSecret>,
    pub timing: Timing,
    /// The address the listener is bound to (known after start).
    pub local_addr: OnceLock<SocketAddr>,
    pub state: Mutex<State>,
    pub counters: Counters,
    pub discovery: Arc<discovery::Status>,
    /// What discovery last published (for `/cluster`).
    pub discovered: watch::Sender<Addrs>,
    /// Advertised addresses of peers that connected to this node: dialed back.
    pub learned: watch::Sender<Addrs>,
    /// Addresses that peers' heartbeats listed (TCP discovery), with when they were last listed:
    /// also in `learned` (so they are dialed) until nobody lists them for
    /// [`Timing::gone_after`] and no peer is alive there.
    pub gossiped: Mutex<HashMap<SocketAddr, Instant>>,
    /// Addresses that turned out to be this node itself.
    pub own_addrs: Mutex<BTreeSet<SocketAddr>>,
    /// Wakes the gap catch-up task.
    pub gap: Notify,
    /// Stops every cluster task.
    pub cancel: CancellationToken,
}

impl Shared {
    pub fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the table inconsistent in a way that
        // matters more than stopping the channel would; keep going with the data.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The peer cluster channel of one node. Cheap to clone.
#[derive(Clone)]
pub struct Cluster {
    pub(crate) shared: Arc<Shared>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("node_id", &self.shared.node_id)
            .field("cluster", &self.shared.config.name)
            .finish_non_exhaustive()
    }
}

impl Cluster {
    /// A cluster handle for node `node_id`; nothing runs until
    /// [`start`](crate::cluster::start) is called.
    pub fn new(config: &ClusterConfig, node_id: &str) -> Cluster {
        let timing = Timing::new(Duration::from_millis(config.heartbeat_ms));
        Cluster {
            shared: Arc::new(Shared {
                config: config.clone(),
                node_id: node_id.to_string(),
                version: env!("CARGO_PKG_VERSION").to_string(),
                secret: config
                    .secret
                    .as_ref()
                    .and_then(|s| ClusterSecret::new(s.expose())),
                timing,
                local_addr: OnceLock::new(),
                state: Mutex::new(State {
                    members: Membership::new(timing),
                    links: HashMap::new(),
                    seq: 0,
                    next_link: 0,
                }),
                counters: Counters::default(),
                discovery: Arc::new(discovery::Status::default()),
                discovered: watch::Sender::new(Addrs::new()),
                learned: watch::Sender::new(Addrs::new()),
                gossiped: Mutex::new(HashMap::new()),
                own_addrs: Mutex::new(BTreeSet::new()),
                gap: Notify::new(),
                cancel: CancellationToken::new(),
            }),
        }
    }

    /// Sends `change` to every connected peer without waiting for any of them; returns its
    /// sequence number. `log_position` is the writing transaction's id when known.
    pub fn broadcast(&self, change: &Change, log_position: Option<u64>) -> u64 {
        let s = &self.shared;
        let mut st = s.lock();
        st.seq += 1;
        let seq = st.seq;
        s.counters.broadcasts.fetch_add(1, Ordering::Relaxed);
        let State { members, links, .. } = &mut *st;
        members.missed_unless(|id| links.contains_key(id));
        if st.links.is_empty() {
            return seq;
        }
        // Encoded once, in the session's binary form, for every peer; each pipe seals it.
        let mut body = Vec::with_capacity(64);
        if let Err(e) = encode_invalidate(
            &mut body,
            &s.node_id,
            seq,
            log_position.and_then(|p| i64::try_from(p).ok()),
            change,
            Some(crate::invalidation::now_ms()),
        ) {
            // Only a change over 64 KiB could fail here; peers repair from the database.
            tracing::warn!(error = %e, ?change, "invalidation too large for the peer channel");
            return seq;
        }
        let body: Arc<[u8]> = body.into();
        // Still under the lock: broadcasts reach each peer in sequence order.
        let State { members, links, .. } = &mut *st;
        for (id, link) in links.iter() {
            match link.pipe.offer(seq, &body) {
                Offered::Written => members.sent(id, 1),
                Offered::Handed => {}
                Offered::Dropped => {
                    members.dropped(id);
                    tracing::debug!(peer = %id, seq, "peer queue full; invalidation dropped for it");
                }
            }
        }
        seq
    }

    /// Asks every connected peer to drop this node at once, waiting at most `wait` for the
    /// goodbyes to be written, then stops every cluster task.
    pub async fn leave(&self, wait: Duration) {
        let links: Vec<Arc<Pipe>> = self
            .shared
            .lock()
            .links
            .values()
            .map(|l| l.pipe.clone())
            .collect();
        for pipe in &links {
            // A peer whose queue is full will see the connection close instead.
            let _ = pipe.leave();
        }
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline && links.iter().any(|p| !p.is_closed()) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        self.shared.cancel.cancel();
    }

    /// Stops every cluster task without saying goodbye (peers notice by the closed connections
    /// and the silence, as after a crash).
    pub fn abort(&self) {
        self.shared.cancel.cancel();
    }

    /// The node's broadcast sequence number: how many invalidations it has originated.
    pub fn seq(&self) -> u64 {
        self.shared.lock().seq
    }

    /// The address the cluster channel listens on, once started.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.shared.local_addr.get().copied()
    }

    /// Every known peer.
    pub fn peers(&self) -> Vec<PeerReport> {
        self.shared.lock().members.report(Instant::now())
    }

    /// The counters.
    pub fn counters(&self) -> CountersReport {
        self.shared.counters.report()
    }

    /// Everything `GET /cluster` shows about the peer channel.
    pub fn report(&self) -> ClusterReport {
        let s = &self.shared;
        let (peers, rejected) = {
            let st = s.lock();
            (
                st.members.report(Instant::now()),
                st.members.rejected_report(),
            )
        };
        let own: Vec<SocketAddr> = s
            .own_addrs
            .lock()
            .map(|a| a.iter().copied().collect())
            .unwrap_or_default();
        ClusterReport {
            name: s.config.name.clone(),
            discovery: s.config.discovery,
            bind_addr: s.config.bind_addr.to_string(),
            listen_addr: self.local_addr(),
            authenticated: s.secret.is_some(),
            encrypted: s.secret.is_some(),
            heartbeat_ms: s.config.heartbeat_ms,
            seq: self.seq(),
            discovered: s.discovered.borrow().iter().copied().collect(),
            learned: s.learned.borrow().iter().copied().collect(),
            own_addrs: own,
            discovery_status: s.discovery.report(),
            peers,
            rejected,
            counters: s.counters.report(),
        }
    }
}

/// The peer channel part of `GET /cluster`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterReport {
    /// `CLUSTER_NAME`.
    pub name: String,
    /// `CLUSTER_DISCOVERY`.
    pub discovery: Discovery,
    /// `CLUSTER_BIND_ADDR`.
    pub bind_addr: String,
    /// Where the cluster channel listens (`None` before start).
    pub listen_addr: Option<SocketAddr>,
    /// A `CLUSTER_SECRET` is set: peers must hold it to join (Noise handshake).
    pub authenticated: bool,
    /// Frames are encrypted (with a `CLUSTER_SECRET`, always).
    pub encrypted: bool,
    /// `CLUSTER_HEARTBEAT_MS`.
    pub heartbeat_ms: u64,
    /// Invalidations this node has originated (its last sequence number).
    pub seq: u64,
    /// Addresses discovery currently publishes.
    pub discovered: Vec<SocketAddr>,
    /// Addresses learned from peers that connected to this node.
    pub learned: Vec<SocketAddr>,
    /// Discovered addresses that turned out to be this node.
    pub own_addrs: Vec<SocketAddr>,
    /// The discovery task's last round.
    pub discovery_status: discovery::StatusReport,
    /// Every known peer.
    pub peers: Vec<PeerReport>,
    /// Refused peers, with the reason.
    pub rejected: Vec<Rejected>,
    /// Counters.
    pub counters: CountersReport,
}
