//! The dedicated LISTEN connection: the database's fallback invalidation channel.
//!
//! It is its own tokio-postgres connection, never a pooled one (the pool drives its connections
//! itself and notifications would be lost), read through `Connection::poll_message`. After every
//! (re)connect it LISTENs first and then runs catch-up, because notifications sent while it was
//! away are gone; only then are notifications trusted again.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_postgres::AsyncMessage;

use super::{Invalidation, ListenerState, CHANNEL};
use crate::error::Result;

/// How often the idle listener connection is probed.
const HEARTBEAT: Duration = Duration::from_secs(15);
/// How long a probe may take before the connection is considered dead.
const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest wait between reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The `application_name` of a node's listener connection: `openfhir-cache/<node id>/listener`.
pub fn listener_application_name(node_id: &str) -> String {
    format!("openfhir-cache/{node_id}/listener")
}

/// Runs the listener until the task is aborted: connect, LISTEN, catch up, apply
/// notifications; on any failure wait (exponential backoff) and start over.
///
/// Supervised and restarted if it panics: whatever it keeps across sessions is either local and
/// fine to lose (the backoff) or kept in `inv` (the session count, so a new run's first session
/// counts as a reconnect).
pub(super) async fn run(inv: Arc<Invalidation>) {
    const FIRST_BACKOFF: Duration = Duration::from_millis(100);
    // However the run ends (a panic, an abort), the gauge must not keep saying "listening".
    let _state = NotListening(&inv);
    let mut backoff = FIRST_BACKOFF;
    loop {
        inv.set_listener(ListenerState::Connecting);
        let mut listened = false;
        let sessions = inv.stats.listen_sessions.load(Ordering::Relaxed);
        match session(&inv, sessions, &mut listened).await {
            Ok(()) => tracing::warn!("invalidation listener connection closed; reconnecting"),
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "invalidation listener failed; reconnecting")
            }
        }
        if listened {
            // A session that got as far as listening restarts the backoff.
            backoff = FIRST_BACKOFF;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Sets the listener state back to connecting when dropped: the end of a listener run.
struct NotListening<'a>(&'a Invalidation);

impl Drop for NotListening<'_> {
    fn drop(&mut self) {
        self.0.set_listener(ListenerState::Connecting);
    }
}

/// The task that drives a listener connection, aborted when dropped: a session that ends by a
/// panic must not leave its connection open.
struct Driver(tokio::task::JoinHandle<std::result::Result<(), tokio_postgres::Error>>);

impl Drop for Driver {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn session(inv: &Invalidation, sessions_before: u64, listened: &mut bool) -> Result<()> {
    let mut cfg = inv.db.connection_config(&inv.listener_name);
    cfg.connect_timeout(Duration::from_secs(5));
    let (client, mut connection) = cfg.connect(inv.db.tls()).await?;
    let (tx, mut rx) = mpsc::unbounded_channel::<String>();
    let mut driver = Driver(tokio::spawn(async move {
        loop {
            match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(n))) => {
                    if tx.send(n.payload().to_string()).is_err() {
                        return Ok(());
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e),
                None => return Ok(()),
            }
        }
    }));
    let result = async {
        client.batch_execute(&format!("LISTEN {CHANNEL}")).await?;
        // LISTEN first, then read the log: a change committed in between arrives both ways,
        // which is harmless; the other order could lose it.
        inv.step().await?;
        if sessions_before > 0 {
            inv.stats.reconnects.fetch_add(1, Ordering::Relaxed);
        }
        inv.stats.listen_sessions.fetch_add(1, Ordering::Relaxed);
        *listened = true;
        inv.set_listener(ListenerState::Listening);
        tracing::info!("listening for invalidation notifications");
        // A half-open socket would look "listening" for hours: probe the connection.
        let mut heartbeat = tokio::time::interval(HEARTBEAT);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        heartbeat.tick().await;
        loop {
            tokio::select! {
                payload = rx.recv() => match payload {
                    Some(p) => inv.on_notification(&p).await,
                    None => return Ok(()),
                },
                _ = heartbeat.tick() => {
                    match tokio::time::timeout(HEARTBEAT_TIMEOUT, client.simple_query("SELECT 1")).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => return Err(e.into()),
                        Err(_) => {
                            tracing::warn!("invalidation listener did not answer its heartbeat; reconnecting");
                            return Ok(());
                        }
                    }
                }
            }
        }
    }
    .await;
    driver.0.abort();
    match (&mut driver.0).await {
        Ok(Err(e)) => Err(e.into()),
        _ => result,
    }
}
