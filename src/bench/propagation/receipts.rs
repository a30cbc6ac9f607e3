//! Receipts: the apply hooks that record when each peer applied an eviction, and waiting
//! for every peer to have applied one.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::bench::harness::Fleet;
use crate::cache::Change;

/// How long one write may take to reach every peer before it counts as lost.
const LOST_AFTER: Duration = Duration::from_secs(3);

/// A receipt: which node applied which key when.
pub(super) type Receipt = (usize, Instant, String);

/// The key a change is about (template id for OPT and context changes).
fn key_of(c: &Change) -> String {
    match c {
        Change::Opt { template_id, .. } | Change::Context { template_id, .. } => {
            template_id.clone()
        }
        _ => String::new(),
    }
}

/// Installs apply hooks on `peers` of `fleet`; receipts arrive on the returned channel.
pub fn hook(fleet: &Fleet, peers: &[usize]) -> mpsc::UnboundedReceiver<Receipt> {
    let (tx, rx) = mpsc::unbounded_channel();
    for &i in peers {
        let tx = tx.clone();
        fleet
            .node(i)
            .set_apply_hook(Some(Arc::new(move |c: &Change| {
                let at = Instant::now();
                let _ = tx.send((i, at, key_of(c)));
            })));
    }
    rx
}

/// Removes the hooks again.
pub fn unhook(fleet: &Fleet) {
    for r in &fleet.nodes {
        r.node.set_apply_hook(None);
    }
}

/// Drops receipts still queued (late duplicates of earlier writes, seeding).
pub(super) async fn drain(rx: &mut mpsc::UnboundedReceiver<Receipt>) {
    tokio::time::sleep(Duration::from_millis(100)).await;
    while rx.try_recv().is_ok() {}
}

/// Waits until every one of `peers` applied `key`; the latency of each, in `peers` order, or
/// `None` when one did not within [`LOST_AFTER`].
pub async fn await_all(
    rx: &mut mpsc::UnboundedReceiver<Receipt>,
    key: &str,
    peers: &[usize],
    t0: Instant,
) -> Option<Vec<Duration>> {
    let mut got: Vec<Option<Duration>> = vec![None; peers.len()];
    let deadline = tokio::time::Instant::from_std(t0 + LOST_AFTER);
    while got.iter().any(Option::is_none) {
        let (i, at, k) = match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(r)) => r,
            _ => return None,
        };
        if k != key {
            continue;
        }
        if let Some(pos) = peers.iter().position(|&p| p == i) {
            got[pos].get_or_insert(at.saturating_duration_since(t0));
        }
    }
    Some(got.into_iter().flatten().collect())
}
