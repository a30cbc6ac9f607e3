//! The cluster channel's tasks: listening, dialing, sending, receiving.
//!
//! Each pair of nodes uses two TCP connections, one per direction: a node sends only on the
//! connections it dialed and receives only on the ones it accepted. A broadcast writes an idle
//! connection itself; otherwise the connection's writer task sends it from the queue (see
//! `super::pipe` for how the two keep order). A peer that connects to us is dialed back at the IP
//! it connects from and the port it advertised, so discovery only has to work one way.

mod gossip;
mod health;
mod inbound;
mod outbound;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use super::broadcast::{Cluster, Shared};
use super::discovery;
use super::session::{HandshakeError, Identity};
use super::wire::RejectReason;
use crate::config::Discovery;
use crate::error::{Error, Result};
use crate::invalidation::Invalidation;
use crate::supervise::{Supervisor, Task};

/// What the transport's tasks share: the channel's state and the node's invalidation
/// machinery, which applies what peers announce (the transport knows nothing else of the node).
#[derive(Clone)]
struct Ctx {
    s: Arc<Shared>,
    inv: Arc<Invalidation>,
}

/// Limit on a whole handshake, either side.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);

/// Supervised task name: accepts peers' connections (the shared listener).
pub const TASK_ACCEPT: &str = "cluster.accept";
/// Supervised task name: dials every known address (one dialer task per address, owned by this task).
pub const TASK_RECONCILE: &str = "cluster.reconcile";
/// Supervised task name: moves silent peers to suspect and gone.
pub const TASK_FAILURE_DETECTOR: &str = "cluster.failure_detector";
/// Supervised task name: runs a catch-up step when a peer's sequence shows a gap.
pub const TASK_GAP_REPAIR: &str = "cluster.gap_repair";
/// Supervised task name: the discovery mode's task (`MULTICAST`, `DNS` or `TCP`).
pub const TASK_DISCOVERY: &str = "cluster.discovery";

/// Binds the cluster port and starts discovery, the listener, the dialers, failure detection and
/// gap repair as tasks of `tasks`, each restarted if it ends before the channel is left. Fails
/// if the port cannot be bound.
///
/// What a restart keeps: the bound listener (shared, so the port stays ours and no connection
/// attempt is refused meanwhile), the membership table, links, counters and the discovery status
/// (all in the shared channel state), and the last set discovery published. What it resets: the
/// handshake gate (its slots are held by the running handshakes, which go on), the dialers (a
/// reconcile run cancels its own when it ends, and the next one dials every address again, so
/// outbound links reconnect once), gap repair's wake-up (a restarted run steps once at once, in
/// case the ended run took a gap's wake-up without stepping), and discovery's own state. `TCP`
/// and `DNS` publish their whole set again at the first round; `MULTICAST` starts from an empty
/// table, so an address not announced since the restart leaves the discovered set until its next
/// announcement (one interval); a peer linked to this node stays dialed meanwhile, as its address
/// is also learned.
pub async fn start(cluster: Cluster, inv: Arc<Invalidation>, tasks: &Supervisor) -> Result<()> {
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
    let listener = Arc::new(listener);
    let task = |name| Task::restart(name).until(s.cancel.clone());
    let c = ctx.clone();
    tasks.spawn(task(TASK_ACCEPT), move || {
        inbound::accept_loop(listener.clone(), c.clone())
    });
    let c = ctx.clone();
    tasks.spawn(task(TASK_RECONCILE), move || outbound::reconcile(c.clone()));
    let sh = s.clone();
    tasks.spawn(task(TASK_FAILURE_DETECTOR), move || {
        health::failure_detector(sh.clone())
    });
    let (c, started) = (ctx, AtomicBool::new(false));
    tasks.spawn(task(TASK_GAP_REPAIR), move || {
        health::gap_repair(c.clone(), started.swap(true, Ordering::Relaxed))
    });
    let sh = s.clone();
    tasks.spawn(task(TASK_DISCOVERY), move || discovery_run(&sh, local));
    Ok(())
}

/// One run of the configured discovery mode's task.
fn discovery_run(s: &Arc<Shared>, local: SocketAddr) -> Pin<Box<dyn Future<Output = ()> + Send>> {
    let cfg = &s.config;
    let tx = s.discovered.clone();
    let status = s.discovery.clone();
    let cancel = s.cancel.clone();
    match cfg.discovery {
        Discovery::Tcp => Box::pin(discovery::tcp::run(
            cfg.initial_hosts.clone(),
            Duration::from_secs(cfg.dns_interval),
            tx,
            status,
            cancel,
        )),
        Discovery::Dns => Box::pin(discovery::dns::run(
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
        Discovery::Multicast => Box::pin(discovery::multicast::run(
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
