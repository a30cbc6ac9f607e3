//! How a node repairs whatever the other channels (peers, NOTIFY) failed to deliver: the
//! catch-up step over the invalidation log (see [`super::cursor`] for the watermark argument),
//! the startup watermark, pruning, consistency tokens, and NOTIFY payloads as they arrive.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::TryStreamExt;
use tokio_postgres::IsolationLevel;

use super::log::{log_row, parse_payload, LogRow, Notification};
use super::report::{Channel, StepReport};
use super::{now_ms, Invalidation};
use crate::cache::Change;
use crate::error::{Error, Result};
use crate::store::Db;

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
async fn token_status(db: &Db, xid: u64) -> Result<TokenStatus> {
    let conn = db.conn().await?;
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

impl Invalidation {
    /// Delivers one row from a channel: applies it unless it was applied already.
    pub(crate) async fn deliver(&self, row: &LogRow, channel: Channel) -> bool {
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
            self.apply(&row.change()).await;
            // The peer channel timed its own delivery of this change.
            if let (false, Some(at)) = (by_peer, row.created_unix_ms) {
                self.record_delay(channel, at);
            }
            match channel {
                _ if by_peer => &self.stats.first_by_peer,
                Channel::Notify => &self.stats.first_by_notify,
                Channel::Catchup => &self.stats.first_by_catchup,
                Channel::Peer => &self.stats.first_by_peer,
            }
            .fetch_add(1, Ordering::Relaxed);
        } else {
            self.stats.duplicates.fetch_add(1, Ordering::Relaxed);
        }
        first
    }

    /// Handles a NOTIFY payload.
    pub(crate) async fn on_notification(&self, payload: &str) {
        self.stats.notifications.fetch_add(1, Ordering::Relaxed);
        match parse_payload(payload) {
            Ok(rows) => {
                // A truncated row cannot be applied from the payload: one catch-up step reads
                // it (and anything else new) from the log, after the complete rows are applied.
                let mut read_log = None;
                for n in rows {
                    match n {
                        Notification::Row(row) => {
                            self.deliver(&row, Channel::Notify).await;
                        }
                        Notification::ReadLog(position) => read_log = Some(position),
                    }
                }
                if let Some(position) = read_log {
                    tracing::debug!(position, "notification without key: catching up");
                    if let Err(e) = self.step().await {
                        tracing::warn!(error = %e, "catch-up after a truncated notification failed");
                    }
                }
            }
            Err(reason) => {
                self.stats.bad_notifications.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%reason, "ignoring a malformed invalidation notification; catching up instead");
                if let Err(e) = self.step().await {
                    tracing::warn!(error = %e, "catch-up after a malformed notification failed");
                }
            }
        }
    }

    /// Sets the watermark to "now" without replaying anything: right for a node whose caches
    /// are empty (at startup, before it serves).
    pub(crate) async fn init(&self) -> Result<()> {
        let conn = self.db.conn().await?;
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
    pub async fn step(&self) -> Result<StepReport> {
        let _one_at_a_time = self.step_lock.lock().await;
        let r = self.step_inner().await;
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

    async fn step_inner(&self) -> Result<StepReport> {
        // Once more after recreating a horizon the database lost; a horizon still missing
        // then is an error (the step fails and the next one tries again).
        for restore in [true, false] {
            if let Some(report) = self.step_once(restore).await? {
                return Ok(report);
            }
        }
        Err(Error::CorruptRow {
            what: "invalidation horizon",
            id: "openfhir_invalidation_horizon".into(),
            reason: "the row is missing right after it was recreated".into(),
        })
    }

    /// Recreates the horizon row after the log was emptied (see [`Invalidation::step_once`]):
    /// every transaction below the current snapshot's `xmin` has ended, so every row the
    /// database lost lies below it. The first node to get here sets it; the others find it set.
    async fn restore_horizon(&self) -> Result<()> {
        let conn = self.db.conn().await?;
        let n = conn
            .execute(
                "INSERT INTO openfhir_invalidation_horizon (xid) \
                 SELECT pg_snapshot_xmin(pg_current_snapshot()) \
                 ON CONFLICT (singleton) DO NOTHING",
                &[],
            )
            .await?;
        self.stats.log_resets.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            recreated = n == 1,
            "the invalidation log was emptied (the database recovered from a crash, or a standby \
             or a base backup took over): rows written before may be lost, so every node behind \
             the new horizon flushes its caches"
        );
        Ok(())
    }

    /// One step; `None` if the horizon row was missing (the log is UNLOGGED, so PostgreSQL
    /// empties both after a crash) and `restore` recreated it: the caller steps again.
    async fn step_once(&self, restore: bool) -> Result<Option<StepReport>> {
        let mut conn = self.db.conn().await?;
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
        let Some(horizon) = horizon else {
            if !restore {
                return Ok(None);
            }
            drop(tx);
            drop(conn);
            self.restore_horizon().await?;
            return Ok(None);
        };
        let horizon = horizon.parse::<u64>().unwrap_or(0);
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
                    "this node's invalidation cursor is older than the log's horizon (rows were \
                     pruned, or the log was emptied by a crash): flushing every cache rather than \
                     trusting them"
                ),
            }
            self.apply(&Change::Evict {
                group: None,
                tenant: None,
                key: None,
            })
            .await;
        }

        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&from.to_string()];
        let rows = tx
            .query_raw(
                "SELECT position, xid::text, cache_group, tenant, key, operation, origin, \
                        (extract(epoch FROM created) * 1000)::bigint \
                 FROM openfhir_invalidation_log WHERE xid >= $1::text::xid8 ORDER BY position",
                params,
            )
            .await?;
        let mut rows = std::pin::pin!(rows);
        let mut xids = BTreeSet::new();
        let mut lag_ms = 0;
        while let Some(row) = rows.try_next().await? {
            report.read += 1;
            match log_row(&row) {
                Ok(r) => {
                    xids.insert(r.xid);
                    let applied_before = self.stats.first_by_catchup.load(Ordering::Relaxed);
                    if self.deliver(&r, Channel::Catchup).await {
                        report.applied += 1;
                    }
                    // Only a row this step applied itself shows how far behind the node was.
                    let repaired =
                        self.stats.first_by_catchup.load(Ordering::Relaxed) != applied_before;
                    if let (true, Some(at)) = (repaired, r.created_unix_ms) {
                        lag_ms = lag_ms.max(now_ms().saturating_sub(at));
                    }
                }
                Err(reason) => {
                    self.stats.bad_rows.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%reason, "skipping an unreadable invalidation log row; flushing its group is not possible, so everything is flushed");
                    self.apply(&Change::Evict {
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
        self.stats.last_step_lag_ms.store(lag_ms, Ordering::Relaxed);
        Ok(Some(report))
    }

    /// Deletes log rows older than `retention` (one node at a time: advisory lock) and moves
    /// the horizon past them. Returns the rows deleted, or `None` if another node is pruning.
    pub async fn prune(&self, retention: Duration) -> Result<Option<u64>> {
        let mut conn = self.db.conn().await?;
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
    pub async fn await_xid(&self, xid: u64, wait: Duration) -> Result<bool> {
        if self.covers(xid) {
            return Ok(true);
        }
        // One look at the transaction first: a token the database never handed out is refused
        // at once, and an aborted transaction wrote nothing to wait for.
        match tokio::time::timeout(wait, token_status(&self.db, xid)).await {
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
                self.step().await?;
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
}

fn xid_of(row: &tokio_postgres::Row, idx: usize) -> Result<u64> {
    let text: String = row.try_get(idx)?;
    text.parse::<u64>().map_err(|_| Error::CorruptRow {
        what: "snapshot",
        id: "xmin".into(),
        reason: format!("{text:?} is not a transaction id"),
    })
}
