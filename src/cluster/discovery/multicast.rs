//! `MULTICAST` discovery (placeholder being written; see the signatures).

use std::net::{IpAddr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{Publisher, Status};
use crate::cluster::ClusterSecret;

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

/// Announces this node and listens for others until cancelled, publishing the addresses heard.
pub async fn run(
    settings: MulticastSettings,
    tx: Publisher,
    status: Arc<Status>,
    cancel: CancellationToken,
) {
    let _ = (settings, tx, status);
    cancel.cancelled().await;
}
