//! Invalidation: the one rule that applies a change to this node's caches, and every way a change
//! arrives or leaves through the database.
//!
//! * [`Invalidation::apply`] is the single entry point: a node's own write (after COMMIT), a peer
//!   (the cluster channel), NOTIFY, catch-up and an operator's eviction all end there, and it asks
//!   [`crate::cache::targets`] what the change evicts.
//! * [`cursor`]: the xid watermark, without IO (why a watermark and not a position).
//! * [`catchup`]: the catch-up step over `openfhir_invalidation_log`, the startup watermark,
//!   pruning, consistency tokens.
//! * [`log`]: what a log row and a NOTIFY payload say.
//! * `listen`: the dedicated LISTEN connection ([`Invalidation::spawn`] starts it).
//! * [`deferred`]: this node's own writes announced after COMMIT.
//! * [`report`]: the counters and the report for `/cluster` and `/metrics`.
//!
//! It talks to the caches and the database only: the cluster channel and the node use it, never
//! the other way round.

pub mod catchup;
pub mod cursor;
pub mod deferred;
mod listen;
pub mod log;
pub mod report;

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, RwLock};

use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;

pub use cursor::Cursor;
pub use deferred::{DeferredNotify, DeferredNotifyReport};
pub use listen::listener_application_name;
pub use log::{parse_payload, LogRow, Notification, CHANNEL};
pub use report::{Channel, InvalidationReport, InvalidationStats, ListenerState, StepReport};

use crate::cache::{Caches, Change};
use crate::config::InvalidationConfig;
use crate::store::Db;
use crate::supervise::{Supervisor, Task};

/// The supervised task name of the LISTEN connection.
pub const TASK_LISTEN: &str = "listen";
/// The supervised task name of the catch-up and pruning loop.
pub const TASK_CATCHUP: &str = "catchup";
/// The supervised task name of the deferred NOTIFY sender.
pub const TASK_NOTIFIER: &str = "notifier";

/// Called when [`Invalidation::apply`] has made a change's entries unservable on this node (the
/// synchronous generation bump; their memory is freed just after): for changes delivered by the
/// peer channel, NOTIFY or catch-up, and operator evictions (not this node's own writes).
/// Benchmarks use it to time propagation; it must be cheap and must not block.
pub type ApplyHook = Arc<dyn Fn(&Change) + Send + Sync>;

/// Upper bounds, in seconds, of the invalidation delay histogram's buckets: the peer channel and
/// NOTIFY take milliseconds, catch-up up to its interval, an outage much longer.
pub const DELAY_BUCKETS: [f64; 16] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// The channel label of a delay series: `channel="peer"`, `"notify"` or `"catchup"`.
pub type ChannelLabel = [(&'static str, &'static str); 1];

/// Invalidation delays by the channel that applied the change on this node (see
/// [`Invalidation::record_delay`]).
pub type DelayHistograms = Family<ChannelLabel, Histogram, fn() -> Histogram>;

fn delay_histogram() -> Histogram {
    Histogram::new(DELAY_BUCKETS)
}

/// A node's invalidation machinery: its caches, its database, the cursor over the log and the
/// queue of its own notifications.
pub struct Invalidation {
    caches: Arc<Caches>,
    db: Db,
    hook: RwLock<Option<ApplyHook>>,
    cursor: Mutex<Cursor>,
    step_lock: tokio::sync::Mutex<()>,
    stats: InvalidationStats,
    delay: DelayHistograms,
    deferred: Arc<DeferredNotify>,
    /// `application_name` of the listener connection.
    listener_name: String,
}

impl std::fmt::Debug for Invalidation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Invalidation")
            .field("watermark", &self.cursor().watermark())
            .finish_non_exhaustive()
    }
}

/// The wall clock in milliseconds since the Unix epoch (0 if it is before it).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Invalidation {
    /// The machinery of node `node_id` over `caches` and `db`. Nothing runs until
    /// [`Invalidation::spawn`].
    pub fn new(caches: Arc<Caches>, db: Db, node_id: &str) -> Invalidation {
        let deferred = Arc::new(DeferredNotify::new(db.notify_mode().clone()));
        Invalidation {
            caches,
            db,
            hook: RwLock::new(None),
            cursor: Mutex::default(),
            step_lock: tokio::sync::Mutex::new(()),
            stats: InvalidationStats::default(),
            delay: DelayHistograms::new_with_constructor(delay_histogram),
            deferred,
            listener_name: listener_application_name(node_id),
        }
    }

    fn cursor(&self) -> std::sync::MutexGuard<'_, Cursor> {
        // A panic while holding the lock cannot leave the cursor half-updated in a way that
        // loses changes (every update is a single call), so a poisoned lock is still usable.
        self.cursor.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies a change to this node's caches through the one eviction rule
    /// ([`crate::cache::targets`]); returns how many (cache, scope) pairs it evicted. Every
    /// channel that learns of a change calls this.
    pub async fn apply(&self, change: &Change) -> usize {
        // The generation bump is the eviction: from here on no read serves an old entry (and a
        // caller cancelled later cannot undo it), so this is when the change counts as applied.
        self.caches.invalidate_now(change);
        if let Some(hook) = self.hook.read().ok().and_then(|h| h.clone()) {
            hook(change);
        }
        // Dropping the dead entries only frees memory.
        let n = self.caches.purge(change).await;
        tracing::debug!(?change, targets = n, "evicted");
        n
    }

    /// Installs (or with `None` removes) the [`ApplyHook`].
    pub fn set_apply_hook(&self, hook: Option<ApplyHook>) {
        if let Ok(mut h) = self.hook.write() {
            *h = hook;
        }
    }

    /// The caches it evicts.
    pub fn caches(&self) -> &Caches {
        &self.caches
    }

    /// The queue of this node's committed writes whose NOTIFY is still to be sent.
    pub fn deferred(&self) -> &Arc<DeferredNotify> {
        &self.deferred
    }

    /// True when every change of transaction `xid` has been applied here.
    pub fn covers(&self, xid: u64) -> bool {
        self.cursor().covers(xid)
    }

    /// Records a transaction this node wrote and evicted itself, and queues its NOTIFY when the
    /// node sends its own (see [`deferred`]).
    pub fn own_write(&self, xid: u64) {
        self.cursor().own_write(xid);
        // After the cursor knows it, so this node's own listener recognises the echo. If it is
        // never sent, nothing is lost: the peer broadcast and every node's catch-up deliver the
        // change too.
        if self.deferred.enabled() {
            self.deferred.push(xid);
        }
    }

    /// Records how long a change took from its write to being applied here by `channel`:
    /// `written_unix_ms` is the sender's clock when it announced the change after COMMIT (peer)
    /// or the database's when the log row was written (NOTIFY, catch-up). The clocks of two
    /// machines differ, so a negative delay is counted as 0.
    pub fn record_delay(&self, channel: Channel, written_unix_ms: u64) {
        let ms = now_ms().saturating_sub(written_unix_ms);
        self.delay
            .get_or_create(&[("channel", channel.as_str())])
            .observe(ms as f64 / 1000.0);
    }

    /// The invalidation delays, by channel (for `/metrics`).
    pub fn delay_histograms(&self) -> &DelayHistograms {
        &self.delay
    }

    /// Records a transaction a peer announced over the cluster channel.
    pub fn peer_delivered(&self, xid: u64) {
        self.cursor().peer_delivered(xid);
    }

    /// The channel's state, the deferred notifications included.
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
            log_resets: s.log_resets.load(Ordering::Relaxed),
            pruned_rows: s.pruned.load(Ordering::Relaxed),
            log_head: s.log_head.load(Ordering::Relaxed),
            watermark,
            last_step_repaired: s.last_step_repaired.load(Ordering::Relaxed),
            pending_positions: pending,
            ms_since_last_catchup: (last > 0).then(|| now_ms().saturating_sub(last)),
            last_step_lag_ms: s.last_step_lag_ms.load(Ordering::Relaxed),
            deferred_notify: self.deferred.report(),
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

    /// Starts, as tasks of `tasks`, the LISTEN connection (unless `OPENFHIR_PG_NOTIFY=false`),
    /// the catch-up and pruning loop, and, when the schema allows it (`deferred_notify`), the
    /// task that sends the NOTIFY of this node's own writes after COMMIT. All three are restarted
    /// when they end: what they keep across runs (the cursor, the statistics, the queue of
    /// pending notifications) lives here, not in the task.
    pub fn spawn(
        self: &Arc<Self>,
        tasks: &Supervisor,
        cfg: &InvalidationConfig,
        deferred_notify: bool,
    ) {
        if cfg.pg_notify {
            let inv = self.clone();
            tasks.spawn(Task::restart(TASK_LISTEN), move || listen::run(inv.clone()));
        } else {
            tracing::info!("OPENFHIR_PG_NOTIFY=false: not listening for database notifications");
        }
        let (inv, cfg) = (self.clone(), cfg.clone());
        tasks.spawn(Task::restart(TASK_CATCHUP), move || {
            catchup_loop(inv.clone(), cfg.clone())
        });
        if deferred_notify {
            self.deferred.set_enabled(true);
            let (deferred, db) = (self.deferred.clone(), self.db.clone());
            tasks.spawn(Task::restart(TASK_NOTIFIER), move || {
                let (deferred, db) = (deferred.clone(), db.clone());
                async move { deferred.run(db).await }
            });
        } else {
            tracing::warn!(
                "the schema predates deferred NOTIFY: this node's writes notify from the trigger \
                 (run `openfhir-cache migrate`)"
            );
        }
    }

    /// Stops deferring notifications (the triggers notify again): at shutdown.
    pub fn stop_deferring(&self) {
        self.deferred.set_enabled(false);
    }

    /// Sends the notifications still pending (at shutdown, bounded by `wait`).
    pub async fn flush_deferred(&self, wait: std::time::Duration) {
        self.deferred.flush(&self.db, wait).await;
    }
}

/// How often the log is pruned (by whichever node gets the advisory lock).
const PRUNE_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// Catch-up every `OPENFHIR_CATCHUP_INTERVAL_MS` (unless 0) and pruning every minute.
async fn catchup_loop(inv: Arc<Invalidation>, cfg: InvalidationConfig) {
    let every = match cfg.catchup_interval_ms {
        0 => PRUNE_EVERY,
        ms => std::time::Duration::from_millis(ms),
    };
    let retention = std::time::Duration::from_secs(cfg.retention_secs);
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_prune: Option<tokio::time::Instant> = None;
    let mut failing = false;
    loop {
        tick.tick().await;
        if cfg.catchup_interval_ms > 0 {
            match inv.step().await {
                Ok(_) if failing => {
                    failing = false;
                    tracing::info!("catch-up works again");
                }
                Ok(_) => {}
                // Logged once per outage, not once per interval.
                Err(e) if !failing => {
                    failing = true;
                    tracing::warn!(error = %e, "catch-up failed; retrying every interval");
                }
                Err(_) => {}
            }
        }
        if last_prune.is_none_or(|t| t.elapsed() >= PRUNE_EVERY) {
            last_prune = Some(tokio::time::Instant::now());
            if let Err(e) = inv.prune(retention).await {
                tracing::debug!(error = %e, "pruning the invalidation log failed");
            }
        }
    }
}
