//! The cluster channel's tasks: listening, dialing, sending, receiving.
//!
//! Each pair of nodes uses two TCP connections, one per direction: a node sends only on the
//! connections it dialed and receives only on the ones it accepted. A broadcast writes an idle
//! connection itself; otherwise the connection's writer task sends it from the queue (see
//! `super::pipe` for how the two keep order). A peer that connects to us is dialed back at the IP
//! it connects from and the port it advertised, so discovery only has to work one way.

mod health;
mod inbound;
mod outbound;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use super::broadcast::{Cluster, Shared};
use super::discovery;
use super::session::{HandshakeError, Identity};
use super::wire::RejectReason;
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

/// Limit on a whole handshake, either side.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);

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
            "CLUSTER_SECRET is not set: the cluster channel is unauthenticated and unencrypted; \
             anyone who can reach port {} can join, read invalidations and evict caches",
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
        tokio::spawn(inbound::accept_loop(listener, ctx.clone())),
        tokio::spawn(outbound::reconcile(ctx.clone())),
        tokio::spawn(health::failure_detector(s.clone())),
        tokio::spawn(health::gap_repair(ctx)),
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
