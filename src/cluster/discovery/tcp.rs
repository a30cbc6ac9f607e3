//! `TCP` discovery: the static `CLUSTER_INITIAL_HOSTS` list.
//!
//! Names are resolved again every interval, so a host whose name does not resolve yet (a Compose
//! service that has not started) joins once it does.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{Addrs, Publisher, Status};
use crate::config::HostPort;

/// Resolves every host of the list now and then every `interval`, publishing the union, until
/// cancelled. A host that does not resolve is left out of that round (logged once per outage).
pub async fn run(
    hosts: Vec<HostPort>,
    interval: Duration,
    tx: Publisher,
    status: Arc<Status>,
    cancel: CancellationToken,
) {
    loop {
        let mut addrs = Addrs::new();
        let mut errors = Vec::new();
        for h in &hosts {
            match tokio::net::lookup_host((h.host.as_str(), h.port)).await {
                Ok(found) => addrs.extend(found),
                Err(e) => errors.push(format!("{h}: {e}")),
            }
        }
        if errors.is_empty() {
            status.ok();
        } else if status.failed(errors.join("; ")) {
            tracing::warn!(
                unresolved = %errors.join("; "),
                "CLUSTER_INITIAL_HOSTS: some hosts do not resolve yet; retrying"
            );
        }
        tx.send_if_modified(|cur| {
            let changed = *cur != addrs;
            *cur = addrs;
            changed
        });
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}
