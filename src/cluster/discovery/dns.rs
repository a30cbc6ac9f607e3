//! `DNS` discovery (placeholder being written; see the signatures).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{Publisher, Status};

/// Settings of DNS discovery.
#[derive(Debug, Clone)]
pub struct DnsSettings {
    /// `CLUSTER_DNS_QUERY`.
    pub query: String,
    /// `CLUSTER_PORT`: every resolved address is dialed at this port.
    pub port: u16,
    /// `CLUSTER_DNS_INTERVAL`.
    pub interval: Duration,
    /// `CLUSTER_DNS_SERVER`: ask this server instead of the system resolver.
    pub server: Option<SocketAddr>,
}

/// Resolves the query at once and then every interval, publishing the addresses, until cancelled.
pub async fn run(
    settings: DnsSettings,
    tx: Publisher,
    status: Arc<Status>,
    cancel: CancellationToken,
) {
    let _ = (settings, tx, status);
    cancel.cancelled().await;
}
