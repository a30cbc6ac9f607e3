//! Failure detection (peers gone silent) and gap repair (catch-up when a peer's sequence shows
//! missed invalidations).

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use super::Ctx;
use crate::cluster::broadcast::Shared;

/// Runs a catch-up step whenever a gap was seen; gaps seen during a step cause one more step.
///
/// `restarted`: an earlier run ended (it panicked), maybe after it took a gap's wake-up and before
/// its step ran; this run then steps once at once, since that gap would otherwise wait for the
/// next one (with periodic catch-up off, for ever).
pub(super) async fn gap_repair(ctx: Ctx, restarted: bool) {
    let s = ctx.s.clone();
    if restarted {
        if let Err(e) = ctx.inv.step().await {
            tracing::warn!(error = %e, "catch-up after gap repair restarted failed; the periodic catch-up will retry");
        }
    }
    loop {
        tokio::select! {
            _ = s.cancel.cancelled() => return,
            _ = s.gap.notified() => {}
        }
        s.counters.gap_catchups.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = ctx.inv.step().await {
            tracing::warn!(error = %e, "catch-up after a peer gap failed; the periodic catch-up will retry");
        }
    }
}

pub(super) async fn failure_detector(s: Arc<Shared>) {
    let mut tick = tokio::time::interval(s.timing.heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = s.cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let gone: Vec<(String, Option<SocketAddr>)> = {
            let mut st = s.lock();
            let gone = st.members.tick(Instant::now());
            gone.into_iter()
                .map(|id| {
                    let a = st.members.addr(&id);
                    (id, a)
                })
                .collect()
        };
        for (id, addr) in gone {
            tracing::warn!(peer = %id, addr = ?addr, "cluster peer gone (silent)");
            if let Some(a) = addr {
                s.learned.send_if_modified(|l| l.remove(&a));
            }
        }
        super::gossip::expire(&s, Instant::now());
    }
}
