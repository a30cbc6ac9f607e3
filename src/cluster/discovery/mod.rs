//! Finding peers. Each mode runs as one task that publishes, through a
//! [`tokio::sync::watch`] channel, the full set of cluster addresses (`ip:port`) it currently
//! believes peers listen on. The transport dials every published address (skipping this node's
//! own) and stops dialing an address that is no longer published.
//!
//! * [`multicast`]: announcements on an IPv4 multicast group (`CLUSTER_MULTICAST_ADDR`).
//! * [`dns`]: A and AAAA lookups of `CLUSTER_DNS_QUERY` every `CLUSTER_DNS_INTERVAL`.
//! * [`tcp`]: the static `CLUSTER_INITIAL_HOSTS`, names resolved again on a timer.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Mutex;

use serde::Serialize;

pub mod dns;
pub mod multicast;
pub mod tcp;

/// A set of peer cluster addresses.
pub type Addrs = BTreeSet<SocketAddr>;

/// Where a discovery task publishes the addresses it knows now (the whole set each time).
pub type Publisher = tokio::sync::watch::Sender<Addrs>;

/// What a discovery task last reported, for `GET /cluster`.
#[derive(Debug, Default)]
pub struct Status {
    inner: Mutex<StatusReport>,
}

/// A snapshot of [`Status`].
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusReport {
    /// Completed discovery rounds (lookups, announcements received, ...).
    pub rounds: u64,
    /// The last error, until a later round succeeds.
    pub last_error: Option<String>,
}

impl Status {
    /// Records a successful round (clears the last error).
    pub fn ok(&self) {
        if let Ok(mut s) = self.inner.lock() {
            s.rounds += 1;
            s.last_error = None;
        }
    }

    /// Records a failed round. Returns `true` when this starts a new outage (the previous round
    /// succeeded), so callers can log once per outage instead of once per round.
    pub fn failed(&self, error: impl Into<String>) -> bool {
        match self.inner.lock() {
            Ok(mut s) => {
                s.rounds += 1;
                s.last_error.replace(error.into()).is_none()
            }
            Err(_) => true,
        }
    }

    /// A snapshot.
    pub fn report(&self) -> StatusReport {
        self.inner.lock().map(|s| s.clone()).unwrap_or_default()
    }
}
