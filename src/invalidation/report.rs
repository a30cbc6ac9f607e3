//! What the invalidation channels report: their counters, the LISTEN connection's state, what one
//! catch-up step did, and the whole picture for `GET /cluster` and `/metrics`.

use std::sync::atomic::{AtomicU64, AtomicU8};

use serde::Serialize;

/// A channel that delivers invalidations to this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Channel {
    /// PostgreSQL LISTEN/NOTIFY.
    Notify,
    /// Replaying the log.
    Catchup,
    /// A peer's message over the cluster channel.
    Peer,
}

impl Channel {
    /// Its name in `/metrics` labels: `notify`, `catchup`, `peer`.
    pub fn as_str(self) -> &'static str {
        match self {
            Channel::Notify => "notify",
            Channel::Catchup => "catchup",
            Channel::Peer => "peer",
        }
    }
}

/// State of the LISTEN connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ListenerState {
    /// `OPENFHIR_PG_NOTIFY=false`.
    Disabled,
    /// Connecting, or waiting to reconnect.
    Connecting,
    /// Listening.
    Listening,
}

impl ListenerState {
    pub(super) fn from_u8(v: u8) -> Self {
        match v {
            1 => ListenerState::Connecting,
            2 => ListenerState::Listening,
            _ => ListenerState::Disabled,
        }
    }
}

/// Counters of the database invalidation channel.
#[derive(Debug, Default)]
pub struct InvalidationStats {
    pub(crate) notifications: AtomicU64,
    pub(crate) bad_notifications: AtomicU64,
    pub(crate) bad_rows: AtomicU64,
    pub(crate) first_by_notify: AtomicU64,
    pub(crate) first_by_catchup: AtomicU64,
    pub(crate) first_by_peer: AtomicU64,
    pub(crate) duplicates: AtomicU64,
    pub(crate) own_writes: AtomicU64,
    pub(crate) steps: AtomicU64,
    pub(crate) step_failures: AtomicU64,
    pub(crate) flushes: AtomicU64,
    pub(crate) xid_rewinds: AtomicU64,
    pub(crate) log_resets: AtomicU64,
    pub(crate) pruned: AtomicU64,
    pub(crate) reconnects: AtomicU64,
    /// Listener sessions that got as far as listening, over every run of the listener task (a
    /// run started again after a panic counts its first session as a reconnect).
    pub(crate) listen_sessions: AtomicU64,
    pub(crate) listener: AtomicU8,
    pub(crate) log_head: AtomicU64,
    pub(crate) last_step_repaired: AtomicU64,
    pub(crate) last_step_unix_ms: AtomicU64,
    pub(crate) last_step_lag_ms: AtomicU64,
}

/// What one catch-up step did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct StepReport {
    /// Rows read.
    pub read: u64,
    /// Rows applied for the first time.
    pub applied: u64,
    /// The watermark after the step.
    pub watermark: u64,
    /// True if the node was behind the pruned horizon and flushed every cache.
    pub flushed: bool,
}

/// A snapshot of the channel's state, for `/cluster` and `/metrics`.
#[derive(Debug, Clone, Serialize)]
pub struct InvalidationReport {
    /// LISTEN connection state.
    pub listener: ListenerState,
    /// Times the listener (re)connected after its first connection.
    pub listener_reconnects: u64,
    /// Notifications received.
    pub notifications: u64,
    /// Notifications that could not be parsed.
    pub bad_notifications: u64,
    /// Log rows that could not be read.
    pub bad_rows: u64,
    /// Invalidations applied first by NOTIFY.
    pub first_by_notify: u64,
    /// Invalidations applied first by catch-up.
    pub first_by_catchup: u64,
    /// Invalidations that the peer channel delivered before NOTIFY or catch-up did.
    pub first_by_peer: u64,
    /// Deliveries of an invalidation already applied.
    pub duplicates: u64,
    /// Invalidations of this node's own writes (already applied by the write path).
    pub own_writes: u64,
    /// Catch-up steps run / failed.
    pub catchup_steps: u64,
    /// Catch-up steps that failed (database unreachable).
    pub catchup_failures: u64,
    /// Flushes because the cursor fell behind the retention horizon (also counts the first
    /// step without a watermark and every [`xid_rewinds`](Self::xid_rewinds) flush).
    pub horizon_flushes: u64,
    /// Flushes because the database handed out transaction ids below this node's watermark
    /// (commits lost in a crash, a failover to an async standby, a restore of a backup).
    pub xid_rewinds: u64,
    /// Times this node found the log emptied (its horizon row missing: the database recovered
    /// from a crash, or a standby or a base backup took over) and recreated the horizon; every
    /// node behind the new horizon then flushes (counted in
    /// [`horizon_flushes`](Self::horizon_flushes)).
    pub log_resets: u64,
    /// Log rows this node pruned.
    pub pruned_rows: u64,
    /// Highest log position seen at the last step.
    pub log_head: u64,
    /// This node's watermark (every transaction below it is applied).
    pub watermark: Option<u64>,
    /// Rows the last catch-up step had to apply itself: changes the other channels had not
    /// delivered (0 when NOTIFY keeps up).
    pub last_step_repaired: u64,
    /// Positions applied above the watermark (transactions still open at the last step).
    pub pending_positions: usize,
    /// Milliseconds since the last successful step.
    pub ms_since_last_catchup: Option<u64>,
    /// How far behind the log the last successful step found this node: the age, in
    /// milliseconds, of the oldest row it had to apply itself (0 when it repaired nothing).
    pub last_step_lag_ms: u64,
    /// NOTIFY of this node's own writes, sent after COMMIT (see [`super::deferred`]).
    pub deferred_notify: super::deferred::DeferredNotifyReport,
}
