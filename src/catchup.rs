//! The invalidation-log cursor and the catch-up step: how a node repairs whatever the other
//! channels (peers, NOTIFY) failed to deliver.
//!
//! # Why an xid watermark and not a position cursor
//! Log positions are assigned at INSERT, not at COMMIT: a transaction holding position 100 can
//! commit after position 101 is visible, and a reader that remembers "everything up to 101" has
//! lost 100 forever. The cursor is therefore a transaction-id *watermark* `W`: every row whose
//! `xid < W` has been applied. A step reads, in one snapshot, every visible row with
//! `xid >= W`, applies the ones not yet seen, and moves `W` to that snapshot's `xmin`: all
//! transactions below `xmin` have ended, so none of their rows can still appear. Rows of
//! transactions still running are read again by the next step, which skips those it has seen.
//!
//! [`Cursor`] is that bookkeeping without IO, so it can be tested step by step;
//! [`Invalidator::step`] does the reading.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use futures_util::TryStreamExt;
use serde::{Deserialize, Serialize};
use tokio_postgres::IsolationLevel;

use crate::cache::Change;
use crate::error::{Error, Result};
use crate::node::Node;

/// The NOTIFY channel the triggers use.
pub const CHANNEL: &str = "openfhir_invalidation";

/// A row of `openfhir_invalidation_log`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogRow {
    /// Log position (assigned at insert).
    pub position: i64,
    /// Writing transaction.
    pub xid: u64,
    /// Cache group (`opt`, `context`, `model`, `tenant`, or an application's group).
    pub group: String,
    /// Tenant, `None` for a TRUNCATE.
    pub tenant: Option<String>,
    /// Key, `None` for a TRUNCATE or a tenant row.
    pub key: Option<String>,
    /// INSERT, UPDATE, DELETE or TRUNCATE.
    pub operation: String,
    /// The node that wrote it, if a node did.
    pub origin: Option<String>,
}

impl LogRow {
    /// What this row invalidates.
    pub fn change(&self) -> Change {
        Change::from_log(
            &self.group,
            self.tenant.as_deref(),
            self.key.as_deref(),
            &self.operation,
        )
    }
}

/// A NOTIFY payload as the triggers send it (short field names keep it far below 8000 bytes).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Payload {
    p: i64,
    x: String,
    g: String,
    #[serde(default)]
    t: Option<String>,
    #[serde(default)]
    k: Option<String>,
    o: String,
    #[serde(default)]
    n: Option<String>,
    #[serde(default)]
    truncated: bool,
}

/// What a NOTIFY payload said, or that it must be read from the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notification {
    /// A complete row.
    Row(LogRow),
    /// The key was too long for the payload: read position `.0` from the log (catch-up).
    ReadLog(i64),
}

/// Parses a NOTIFY payload; the error names what is wrong with it.
pub fn parse_payload(payload: &str) -> std::result::Result<Notification, String> {
    if payload.len() > 8000 {
        return Err(format!(
            "payload of {} bytes exceeds NOTIFY's 8000-byte limit",
            payload.len()
        ));
    }
    let p: Payload =
        serde_json::from_str(payload).map_err(|e| format!("not an invalidation payload: {e}"))?;
    let xid =
        p.x.parse::<u64>()
            .map_err(|_| format!("xid {:?} is not a transaction id", p.x))?;
    if !matches!(p.o.as_str(), "INSERT" | "UPDATE" | "DELETE" | "TRUNCATE") {
        return Err(format!("unknown operation {:?}", p.o));
    }
    if p.truncated {
        return Ok(Notification::ReadLog(p.p));
    }
    Ok(Notification::Row(LogRow {
        position: p.p,
        xid,
        group: p.g,
        tenant: p.t,
        key: p.k,
        operation: p.o,
        origin: p.n,
    }))
}

/// The catch-up bookkeeping, without IO.
#[derive(Debug, Default)]
pub struct Cursor {
    /// Every row with `xid < watermark` has been applied. `None` before the first step.
    watermark: Option<u64>,
    /// Positions applied at or above the watermark (by any channel), with their xid.
    seen: BTreeMap<i64, u64>,
    /// Transactions at or above the watermark whose rows a step has read in full.
    complete: BTreeSet<u64>,
    /// Transactions this node wrote itself (their eviction already ran), at or above the watermark.
    own: BTreeSet<u64>,
    /// Transactions a peer already announced over the cluster channel (statistics only: the
    /// database delivery is still applied, since an unauthenticated peer could name any xid).
    peer: BTreeSet<u64>,
}

/// Bound of the bookkeeping above the watermark. Forgetting an entry is safe: at worst a later
/// delivery of that row evicts once more.
const MAX_TRACKED: usize = 100_000;

impl Cursor {
    /// The watermark, once the first step ran.
    pub fn watermark(&self) -> Option<u64> {
        self.watermark
    }

    /// Records that a channel delivered `position`; true if this is its first delivery (apply
    /// it), false if it was applied already.
    pub fn first_delivery(&mut self, position: i64, xid: u64) -> bool {
        if self.watermark.is_some_and(|w| xid < w) {
            return false;
        }
        let first = self.seen.insert(position, xid).is_none();
        while self.seen.len() > MAX_TRACKED {
            self.seen.pop_first();
        }
        first
    }

    /// Records a transaction this node wrote (and already evicted after its COMMIT).
    pub fn own_write(&mut self, xid: u64) {
        if self.watermark.is_none_or(|w| xid >= w) {
            self.own.insert(xid);
            while self.own.len() > MAX_TRACKED {
                self.own.pop_first();
            }
        }
    }

    /// Records a transaction a peer announced (and this node evicted) over the cluster channel.
    pub fn peer_delivered(&mut self, xid: u64) {
        if self.watermark.is_none_or(|w| xid >= w) {
            self.peer.insert(xid);
            while self.peer.len() > MAX_TRACKED {
                self.peer.pop_first();
            }
        }
    }

    /// Ends a step that read, in one snapshot with `xmin`, every visible row at or above the
    /// old watermark; `xids` are the transactions of the rows it read.
    pub fn finish_step(&mut self, xmin: u64, xids: impl IntoIterator<Item = u64>) {
        let w = self.watermark.map_or(xmin, |w| w.max(xmin));
        self.complete.extend(xids.into_iter().filter(|x| *x >= w));
        self.watermark = Some(w);
        self.seen.retain(|_, x| *x >= w);
        self.complete.retain(|x| *x >= w);
        self.own.retain(|x| *x >= w);
        self.peer.retain(|x| *x >= w);
    }

    /// True when every change of transaction `xid` has been applied here.
    pub fn covers(&self, xid: u64) -> bool {
        self.watermark.is_some_and(|w| xid < w) || self.complete.contains(&xid)
    }

    /// Forgets everything and restarts at `watermark` (after a flush).
    pub fn reset(&mut self, watermark: u64) {
        *self = Cursor {
            watermark: Some(watermark),
            ..Cursor::default()
        };
    }
}

/// Which channel delivered an invalidation first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Channel {
    /// PostgreSQL LISTEN/NOTIFY.
    Notify,
    /// Replaying the log.
    Catchup,
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
    fn from_u8(v: u8) -> Self {
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
    pub(crate) pruned: AtomicU64,
    pub(crate) reconnects: AtomicU64,
    pub(crate) listener: AtomicU8,
    pub(crate) log_head: AtomicU64,
    pub(crate) last_step_repaired: AtomicU64,
    pub(crate) last_step_unix_ms: AtomicU64,
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

/// What the database says of a consistency token's transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TokenStatus {
    /// Committed or in progress: its invalidations are to be waited for.
    Wait,
    /// Aborted, or so old its status is gone: nothing to wait for.
    Nothing,
    /// Never started (in the future): not a token of this database.
    Unknown,
}

/// The status of transaction `xid` (`pg_xact_status`).
async fn token_status(node: &Node, xid: u64) -> Result<TokenStatus> {
    let conn = node.db().conn().await?;
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&xid.to_string()];
    match conn
        .query_one("SELECT pg_xact_status($1::text::xid8)", &params)
        .await
    {
        Ok(row) => Ok(match row.get::<_, Option<String>>(0).as_deref() {
            Some("committed" | "in progress") => TokenStatus::Wait,
            _ => TokenStatus::Nothing,
        }),
        // "transaction ID ... is in the future".
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::INVALID_PARAMETER_VALUE) => {
            Ok(TokenStatus::Unknown)
        }
        Err(e) => Err(e.into()),
    }
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
    /// NOTIFY of this node's own writes, sent after COMMIT (see [`crate::store::deferred`]);
    /// filled by [`Node::invalidation_report`].
    pub deferred_notify: crate::store::deferred::DeferredNotifyReport,
}

/// The database invalidation channel's state inside a node.
#[derive(Debug, Default)]
pub struct Invalidator {
    cursor: Mutex<Cursor>,
    step_lock: tokio::sync::Mutex<()>,
    pub(crate) stats: InvalidationStats,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Invalidator {
    fn cursor(&self) -> std::sync::MutexGuard<'_, Cursor> {
        // A panic while holding the lock cannot leave the cursor half-updated in a way that
        // loses changes (every update is a single call), so a poisoned lock is still usable.
        self.cursor.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Delivers one row from a channel: applies it unless it was applied already.
    pub(crate) async fn deliver(&self, node: &Node, row: &LogRow, channel: Channel) -> bool {
        let (first, own, by_peer) = {
            let mut c = self.cursor();
            (
                c.first_delivery(row.position, row.xid),
                c.own.contains(&row.xid),
                c.peer.contains(&row.xid),
            )
        };
        if first && own {
            // This node's write path evicted it after COMMIT (the transaction id came back from
            // the write itself, so no other session can fake it): applying the echo again would
            // only throw away fresh entries.
            self.stats.own_writes.fetch_add(1, Ordering::Relaxed);
            return true;
        }
        if first {
            node.apply(&row.change()).await;
            match channel {
                _ if by_peer => &self.stats.first_by_peer,
                Channel::Notify => &self.stats.first_by_notify,
                Channel::Catchup => &self.stats.first_by_catchup,
            }
            .fetch_add(1, Ordering::Relaxed);
        } else {
            self.stats.duplicates.fetch_add(1, Ordering::Relaxed);
        }
        first
    }

    /// Handles a NOTIFY payload.
    pub(crate) async fn on_notification(&self, node: &Node, payload: &str) {
        self.stats.notifications.fetch_add(1, Ordering::Relaxed);
        match parse_payload(payload) {
            Ok(Notification::Row(row)) => {
                self.deliver(node, &row, Channel::Notify).await;
            }
            Ok(Notification::ReadLog(position)) => {
                tracing::debug!(position, "notification without key: catching up");
                if let Err(e) = self.step(node).await {
                    tracing::warn!(error = %e, "catch-up after a truncated notification failed");
                }
            }
            Err(reason) => {
                self.stats.bad_notifications.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%reason, "ignoring a malformed invalidation notification; catching up instead");
                if let Err(e) = self.step(node).await {
                    tracing::warn!(error = %e, "catch-up after a malformed notification failed");
                }
            }
        }
    }

    /// True when every change of transaction `xid` has been applied here.
    pub fn covers(&self, xid: u64) -> bool {
        self.cursor().covers(xid)
    }

    /// Records a transaction this node wrote and evicted itself.
    pub(crate) fn own_write(&self, xid: u64) {
        self.cursor().own_write(xid);
    }

    /// Records a transaction a peer announced over the cluster channel.
    pub(crate) fn peer_delivered(&self, xid: u64) {
        self.cursor().peer_delivered(xid);
    }

    /// Sets the watermark to "now" without replaying anything: right for a node whose caches
    /// are empty (at startup, before it serves).
    pub(crate) async fn init(&self, node: &Node) -> Result<()> {
        let conn = node.db().conn().await?;
        let xmin = xid_of(
            &conn
                .query_one("SELECT pg_snapshot_xmin(pg_current_snapshot())::text", &[])
                .await?,
            0,
        )?;
        let mut c = self.cursor();
        if c.watermark().is_none() {
            c.reset(xmin);
        }
        Ok(())
    }

    /// One catch-up step: reads, in one snapshot, every row at or above the watermark and
    /// applies those not seen yet. Steps never overlap.
    pub async fn step(&self, node: &Node) -> Result<StepReport> {
        let _one_at_a_time = self.step_lock.lock().await;
        let r = self.step_inner(node).await;
        self.stats.steps.fetch_add(1, Ordering::Relaxed);
        match &r {
            Ok(_) => self
                .stats
                .last_step_unix_ms
                .store(now_ms(), Ordering::Relaxed),
            Err(_) => {
                self.stats.step_failures.fetch_add(1, Ordering::Relaxed);
            }
        }
        r
    }

    async fn step_inner(&self, node: &Node) -> Result<StepReport> {
        let mut conn = node.db().conn().await?;
        let tx = conn
            .build_transaction()
            .isolation_level(IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await?;
        // A locked log table must not hang catch-up (or a reader waiting on a token).
        tx.batch_execute("SET LOCAL lock_timeout = '5s'; SET LOCAL statement_timeout = '60s'")
            .await?;
        let head = tx
            .query_one(
                "SELECT pg_snapshot_xmin(pg_current_snapshot())::text, \
                        (SELECT xid::text FROM openfhir_invalidation_horizon), \
                        (SELECT coalesce(max(position), 0) FROM openfhir_invalidation_log), \
                        pg_snapshot_xmax(pg_current_snapshot())::text",
                &[],
            )
            .await?;
        let xmin = xid_of(&head, 0)?;
        let xmax = xid_of(&head, 3)?;
        let horizon: Option<String> = head.get(1);
        let horizon = horizon.and_then(|h| h.parse::<u64>().ok()).unwrap_or(0);
        self.stats
            .log_head
            .store(head.get::<_, i64>(2).max(0) as u64, Ordering::Relaxed);

        let mut report = StepReport::default();
        let mut rewound = None;
        let from = {
            let mut c = self.cursor();
            match c.watermark() {
                // The server hands out transaction ids below ones this node has seen: it lost
                // commits (a crash with synchronous_commit=off, a failover to an async standby, a
                // restore). Changes under reused ids would sit below the watermark and never be
                // applied, so nothing cached can be trusted.
                Some(w) if xmax < w => {
                    rewound = Some(w);
                    self.stats.xid_rewinds.fetch_add(1, Ordering::Relaxed);
                    c.reset(xmin);
                    report.flushed = true;
                    xmin
                }
                None => {
                    // First step without `init`: entries may have been loaded before any
                    // watermark existed, so they cannot be trusted. Start from the snapshot, flush.
                    c.reset(xmin);
                    report.flushed = true;
                    xmin
                }
                Some(w) if w < horizon => {
                    c.reset(horizon);
                    report.flushed = true;
                    horizon
                }
                Some(w) => w,
            }
        };
        if report.flushed {
            self.stats.flushes.fetch_add(1, Ordering::Relaxed);
            match rewound {
                Some(watermark) => tracing::warn!(
                    watermark,
                    next_xid = xmax,
                    "the database's transaction ids went backwards (lost commits, failover or \
                     restore): flushing every cache rather than trusting them"
                ),
                None => tracing::warn!(
                    horizon,
                    "this node's invalidation cursor is older than the log's retention horizon: \
                     flushing every cache rather than trusting them"
                ),
            }
            node.apply(&Change::Evict {
                group: None,
                tenant: None,
                key: None,
            })
            .await;
        }

        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&from.to_string()];
        let rows = tx
            .query_raw(
                "SELECT position, xid::text, cache_group, tenant, key, operation, origin \
                 FROM openfhir_invalidation_log WHERE xid >= $1::text::xid8 ORDER BY position",
                params,
            )
            .await?;
        let mut rows = std::pin::pin!(rows);
        let mut xids = BTreeSet::new();
        while let Some(row) = rows.try_next().await? {
            report.read += 1;
            match log_row(&row) {
                Ok(r) => {
                    xids.insert(r.xid);
                    if self.deliver(node, &r, Channel::Catchup).await {
                        report.applied += 1;
                    }
                }
                Err(reason) => {
                    self.stats.bad_rows.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%reason, "skipping an unreadable invalidation log row; flushing its group is not possible, so everything is flushed");
                    node.apply(&Change::Evict {
                        group: None,
                        tenant: None,
                        key: None,
                    })
                    .await;
                }
            }
        }
        tx.commit().await?;
        let mut c = self.cursor();
        c.finish_step(xmin, xids);
        report.watermark = c.watermark().unwrap_or(xmin);
        self.stats
            .last_step_repaired
            .store(report.applied, Ordering::Relaxed);
        Ok(report)
    }

    /// Deletes log rows older than `retention` (one node at a time: advisory lock) and moves
    /// the horizon past them. Returns the rows deleted, or `None` if another node is pruning.
    pub async fn prune(&self, node: &Node, retention: Duration) -> Result<Option<u64>> {
        let mut conn = node.db().conn().await?;
        let tx = conn.transaction().await?;
        let locked: bool = tx
            .query_one("SELECT pg_try_advisory_xact_lock(7227036254003340289)", &[])
            .await?
            .get(0);
        if !locked {
            return Ok(None);
        }
        let secs = retention.as_secs_f64();
        let row = tx
            .query_one(
                "WITH d AS ( \
                     DELETE FROM openfhir_invalidation_log \
                     WHERE created < now() - make_interval(secs => $1) \
                       AND xid < pg_snapshot_xmin(pg_current_snapshot()) \
                     RETURNING xid::text::numeric AS x), \
                 m AS (SELECT count(*) AS n, max(x) AS top FROM d), \
                 u AS (UPDATE openfhir_invalidation_horizon \
                       SET xid = greatest(xid, ((SELECT top FROM m) + 1)::text::xid8) \
                       WHERE (SELECT top FROM m) IS NOT NULL RETURNING 1) \
                 SELECT n FROM m",
                &[&secs],
            )
            .await?;
        tx.commit().await?;
        let n = row.get::<_, i64>(0).max(0) as u64;
        self.stats.pruned.fetch_add(n, Ordering::Relaxed);
        if n > 0 {
            tracing::info!(rows = n, "pruned the invalidation log");
        }
        Ok(Some(n))
    }

    /// Waits until transaction `xid` is covered, catching up at once if needed; `false` if
    /// `wait` ran out first.
    pub async fn await_xid(&self, node: &Node, xid: u64, wait: Duration) -> Result<bool> {
        if self.covers(xid) {
            return Ok(true);
        }
        // One look at the transaction first: a token the database never handed out is refused
        // at once, and an aborted transaction wrote nothing to wait for.
        match tokio::time::timeout(wait, token_status(node, xid)).await {
            Err(_) => return Ok(self.covers(xid)),
            Ok(Err(e)) => return Err(e),
            Ok(Ok(TokenStatus::Unknown)) => {
                return Err(Error::invalid(
                    "invalid X-Consistency-Token",
                    format!(
                        "transaction {xid} is unknown to the database (it was never started): \
                         send back the X-Consistency-Token of a write response; a write lost in a \
                         failover or a restore is not there to wait for"
                    ),
                ))
            }
            Ok(Ok(TokenStatus::Nothing)) => return Ok(true),
            Ok(Ok(TokenStatus::Wait)) => {}
        }
        // The whole wait is bounded, a step stuck on a lock included.
        let wait_for = async {
            // Steps back off (10 ms doubling to 250 ms): a write the database has committed is
            // found by the first step after its commit, and a token that is still ahead (a
            // transaction in progress) must not turn one request into hundreds of transactions.
            let mut pause = Duration::from_millis(10);
            loop {
                if self.covers(xid) {
                    return Ok(());
                }
                self.step(node).await?;
                if self.covers(xid) {
                    return Ok(());
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(250));
            }
        };
        match tokio::time::timeout(wait, wait_for).await {
            Ok(Ok(())) => Ok(true),
            Ok(Err(e)) => Err(e),
            Err(_) => Ok(self.covers(xid)),
        }
    }

    /// The channel's state.
    pub fn report(&self) -> InvalidationReport {
        let s = &self.stats;
        let (watermark, pending) = {
            let c = self.cursor();
            (c.watermark(), c.seen.len())
        };
        let last = s.last_step_unix_ms.load(Ordering::Relaxed);
        InvalidationReport {
            listener: ListenerState::from_u8(s.listener.load(Ordering::Relaxed)),
            listener_reconnects: s.reconnects.load(Ordering::Relaxed),
            notifications: s.notifications.load(Ordering::Relaxed),
            bad_notifications: s.bad_notifications.load(Ordering::Relaxed),
            bad_rows: s.bad_rows.load(Ordering::Relaxed),
            first_by_notify: s.first_by_notify.load(Ordering::Relaxed),
            first_by_catchup: s.first_by_catchup.load(Ordering::Relaxed),
            first_by_peer: s.first_by_peer.load(Ordering::Relaxed),
            duplicates: s.duplicates.load(Ordering::Relaxed),
            own_writes: s.own_writes.load(Ordering::Relaxed),
            catchup_steps: s.steps.load(Ordering::Relaxed),
            catchup_failures: s.step_failures.load(Ordering::Relaxed),
            horizon_flushes: s.flushes.load(Ordering::Relaxed),
            xid_rewinds: s.xid_rewinds.load(Ordering::Relaxed),
            pruned_rows: s.pruned.load(Ordering::Relaxed),
            log_head: s.log_head.load(Ordering::Relaxed),
            watermark,
            last_step_repaired: s.last_step_repaired.load(Ordering::Relaxed),
            pending_positions: pending,
            ms_since_last_catchup: (last > 0).then(|| now_ms().saturating_sub(last)),
            deferred_notify: Default::default(),
        }
    }

    pub(crate) fn set_listener(&self, state: ListenerState) {
        let v = match state {
            ListenerState::Disabled => 0,
            ListenerState::Connecting => 1,
            ListenerState::Listening => 2,
        };
        self.stats.listener.store(v, Ordering::Relaxed);
    }
}

fn xid_of(row: &tokio_postgres::Row, idx: usize) -> Result<u64> {
    let text: String = row.try_get(idx)?;
    text.parse::<u64>().map_err(|_| Error::CorruptRow {
        what: "snapshot",
        id: "xmin".into(),
        reason: format!("{text:?} is not a transaction id"),
    })
}

fn log_row(row: &tokio_postgres::Row) -> std::result::Result<LogRow, String> {
    let position: i64 = row.try_get(0).map_err(|e| e.to_string())?;
    let bad = |what: String| format!("log row {position}: {what}");
    let xid: String = row.try_get(1).map_err(|e| bad(e.to_string()))?;
    Ok(LogRow {
        position,
        xid: xid
            .parse()
            .map_err(|_| bad(format!("xid {xid:?} is not a transaction id")))?,
        group: row.try_get(2).map_err(|e| bad(e.to_string()))?,
        tenant: row.try_get(3).map_err(|e| bad(e.to_string()))?,
        key: row.try_get(4).map_err(|e| bad(e.to_string()))?,
        operation: row.try_get(5).map_err(|e| bad(e.to_string()))?,
        origin: row.try_get(6).map_err(|e| bad(e.to_string()))?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_late_commit_is_not_skipped() {
        let mut c = Cursor::default();
        c.finish_step(100, []);
        // Step 2: transaction 100 (position 1) is still open; 101 (position 2) committed.
        // The snapshot's xmin is 100, so the watermark stays at 100.
        assert!(c.first_delivery(2, 101));
        c.finish_step(100, [101]);
        assert_eq!(c.watermark(), Some(100));
        assert!(c.covers(101) && !c.covers(100));
        // Step 3: 100 committed; xmin moved past both. Position 1 is new, position 2 is not.
        assert!(c.first_delivery(1, 100));
        assert!(!c.first_delivery(2, 101));
        c.finish_step(102, [100, 101]);
        assert!(c.covers(100) && c.covers(101) && !c.covers(102));
        // Below the watermark nothing is applied twice.
        assert!(!c.first_delivery(1, 100));
    }

    #[test]
    fn the_watermark_never_goes_back() {
        let mut c = Cursor::default();
        c.finish_step(50, []);
        c.finish_step(40, []);
        assert_eq!(c.watermark(), Some(50));
    }

    #[test]
    fn payloads() {
        let ok =
            r#"{"p":7,"x":"812","g":"opt","t":"default","k":"growth_chart","o":"UPDATE","n":null}"#;
        let Notification::Row(r) = parse_payload(ok).unwrap() else {
            panic!()
        };
        assert_eq!(
            (r.position, r.xid, r.key.as_deref()),
            (7, 812, Some("growth_chart"))
        );
        let cut = r#"{"p":8,"x":"813","g":"opt","o":"UPDATE","truncated":true}"#;
        assert_eq!(parse_payload(cut).unwrap(), Notification::ReadLog(8));
        for bad in [
            "",
            "{",
            "[]",
            r#"{"p":1}"#,
            r#"{"p":1,"x":"abc","g":"opt","o":"UPDATE"}"#,
            r#"{"p":1,"x":"1","g":"opt","o":"MERGE"}"#,
            r#"{"p":1,"x":"1","g":"opt","o":"UPDATE","zz":1}"#,
        ] {
            assert!(parse_payload(bad).is_err(), "{bad}");
        }
        assert!(parse_payload(&"x".repeat(9000)).is_err());
    }
}
