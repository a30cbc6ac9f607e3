//! Deferred NOTIFY: a running node announces its own writes after COMMIT instead of from the
//! trigger.
//!
//! PostgreSQL serialises the commits of transactions that sent a notification: at commit such a
//! transaction takes a database-wide lock and holds it until its commit record is flushed, to keep
//! the notification queue in commit order. With NOTIFY in the trigger, concurrent writers
//! therefore commit one at a time. A node's write instead sets `openfhir.notify = 'deferred'`
//! (transaction-local, in the write statement itself): the trigger still writes the log row in the
//! same transaction, but sends no notification. After COMMIT the write path hands the transaction
//! id to [`DeferredNotify::push`], and a background task ([`DeferredNotify::run`]) sends the
//! notifications of every pending transaction in one statement
//! (`openfhir_notify_transactions`, `sql/0009_packed_notify.sql`), built from the log rows
//! themselves, so listeners get exactly the payloads the trigger would have sent (position, xid,
//! origin), packed as many to one notification as fit. That statement writes no WAL before its
//! commit record, so PostgreSQL commits it without waiting for a flush and it holds the
//! notification lock only briefly.
//!
//! Nothing is lost if a deferred notification is never sent (the node dies between COMMIT and the
//! send, the database is unreachable for that moment, the queue is full): the log row is committed
//! with the change, the peer channel has already broadcast the change to every peer, and every
//! node's catch-up replays the log within one interval. NOTIFY was always the fast path, never the
//! guarantee. Writes made by anything else than a node (psql, migration scripts, other programs)
//! do not set the setting and are still announced by the trigger.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use serde::Serialize;

use crate::error::Result;
use crate::store::{Db, NotifyMode};

pub use crate::store::DEFERRED;

/// Transactions waiting to be announced; beyond this, new ones are dropped (and counted), since
/// catch-up and the peer channel cover them anyway.
const MAX_PENDING: usize = 65_536;

/// Transactions announced by one statement at most.
const MAX_BATCH: usize = 1024;

/// How long the task waits, once woken, for more commits to announce in the same statement.
/// Each statement is a transaction that takes PostgreSQL's notification lock and wakes every
/// listener, whatever its size; under load, gathering a couple of milliseconds of commits turns
/// hundreds of small statements a second into a few large ones. The delay costs nothing that
/// matters: these notifications only back up the peer channel, which announced the change at
/// COMMIT already.
const GATHER: Duration = Duration::from_millis(2);

/// The statement that announces a batch of committed transactions.
const NOTIFY_SQL: &str = "SELECT openfhir_notify_transactions($1::text[]::xid8[])";

/// The queue of committed transactions whose notifications this node still has to send, and its
/// counters. It switches the [`NotifyMode`] every clone of the node's [`Db`] writes with.
#[derive(Debug, Default)]
pub struct DeferredNotify {
    mode: NotifyMode,
    pending: Mutex<Vec<u64>>,
    wake: tokio::sync::Notify,
    sent: AtomicU64,
    batches: AtomicU64,
    failed: AtomicU64,
    dropped: AtomicU64,
}

/// Counters of the deferred notifications, for `/cluster` and `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct DeferredNotifyReport {
    /// True while this node's writes defer their notification to the node.
    pub enabled: bool,
    /// Log rows announced (several to one notification).
    pub sent: u64,
    /// Statements that sent them (each announces every transaction pending at that moment).
    pub batches: u64,
    /// Transactions whose notification could not be sent (the database failed); catch-up and the
    /// peer channel cover them.
    pub failed: u64,
    /// Transactions dropped because too many were pending; covered the same way.
    pub dropped: u64,
    /// Transactions waiting to be announced now.
    pub pending: usize,
}

impl DeferredNotify {
    /// The queue of a node whose writes go through a [`Db`] with `mode`.
    pub fn new(mode: NotifyMode) -> DeferredNotify {
        DeferredNotify {
            mode,
            ..DeferredNotify::default()
        }
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, Vec<u64>> {
        // Every update is a single push or drain: a poisoned lock holds a consistent queue.
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// True while writes through the [`Db`] defer their notification to this node.
    pub fn enabled(&self) -> bool {
        self.mode.deferred()
    }

    /// Turns deferral on (a task runs [`DeferredNotify::run`]) or off (the triggers notify).
    pub fn set_enabled(&self, on: bool) {
        self.mode.set_deferred(on);
    }

    /// Queues committed transaction `xid` for announcement. Never blocks.
    pub fn push(&self, xid: u64) {
        {
            let mut q = self.queue();
            if q.len() >= MAX_PENDING {
                drop(q);
                self.dropped.fetch_add(1, Ordering::Relaxed);
                return;
            }
            q.push(xid);
        }
        self.wake.notify_one();
    }

    /// Transactions waiting to be announced.
    pub fn pending(&self) -> usize {
        self.queue().len()
    }

    /// Sends the notifications of every pending transaction (one statement per `MAX_BATCH`
    /// transactions); returns how many notifications were sent. A batch that fails is dropped
    /// and counted.
    pub async fn send_pending(&self, db: &Db) -> Result<u64> {
        let mut total = 0;
        loop {
            let batch: Vec<u64> = {
                let mut q = self.queue();
                let n = q.len().min(MAX_BATCH);
                q.drain(..n).collect()
            };
            if batch.is_empty() {
                return Ok(total);
            }
            match send(db, &batch).await {
                Ok(n) => {
                    self.sent.fetch_add(n, Ordering::Relaxed);
                    self.batches.fetch_add(1, Ordering::Relaxed);
                    total += n;
                }
                Err(e) => {
                    self.failed.fetch_add(batch.len() as u64, Ordering::Relaxed);
                    return Err(e);
                }
            }
        }
    }

    /// Sends pending notifications as they come, until the task is aborted.
    pub async fn run(&self, db: Db) {
        let mut failing = false;
        loop {
            // What is pending already goes at once: a run started again after a panic may find
            // transactions whose wake-up the ended run had taken. A push after this look stores
            // its wake-up for `notified`, so none is missed.
            if self.pending() == 0 {
                self.wake.notified().await;
            }
            if self.pending() < MAX_BATCH {
                tokio::time::sleep(GATHER).await;
            }
            match self.send_pending(&db).await {
                Ok(_) if failing => {
                    failing = false;
                    tracing::info!("deferred notifications are sent again");
                }
                Ok(_) => {}
                // Logged once per outage. Nothing is retried: catch-up and the peer channel
                // deliver what these notifications would have.
                Err(e) if !failing => {
                    failing = true;
                    tracing::warn!(error = %e, "cannot send deferred invalidation notifications; \
                        other nodes get these changes from the peer channel and catch-up");
                }
                Err(_) => {}
            }
        }
    }

    /// Sends what is pending now, waiting at most `wait` (at shutdown).
    pub async fn flush(&self, db: &Db, wait: Duration) {
        match tokio::time::timeout(wait, self.send_pending(db)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "deferred notifications not sent at shutdown")
            }
            Err(_) => tracing::debug!("deferred notifications not sent in time at shutdown"),
        }
    }

    /// The counters.
    pub fn report(&self) -> DeferredNotifyReport {
        DeferredNotifyReport {
            enabled: self.enabled(),
            sent: self.sent.load(Ordering::Relaxed),
            batches: self.batches.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
            pending: self.pending(),
        }
    }
}

/// One statement, in its own transaction (autocommit), for `xids`.
async fn send(db: &Db, xids: &[u64]) -> Result<u64> {
    let conn = db.conn().await?;
    let stmt = conn.prepare_cached(NOTIFY_SQL).await?;
    let xids: Vec<String> = xids.iter().map(u64::to_string).collect();
    let n: i64 = conn.query_one(&stmt, &[&xids]).await?.get(0);
    Ok(n.max(0) as u64)
}
