//! The catch-up bookkeeping, without IO.
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
//! [`super::Invalidation::step`] does the reading.

use std::collections::{BTreeMap, BTreeSet};

/// The catch-up bookkeeping, without IO.
#[derive(Debug, Default)]
pub struct Cursor {
    /// Every row with `xid < watermark` has been applied. `None` before the first step.
    watermark: Option<u64>,
    /// Positions applied at or above the watermark (by any channel), with their xid.
    pub(super) seen: BTreeMap<i64, u64>,
    /// Transactions at or above the watermark whose rows a step has read in full.
    complete: BTreeSet<u64>,
    /// Transactions this node wrote itself (their eviction already ran), at or above the watermark.
    pub(super) own: BTreeSet<u64>,
    /// Transactions a peer already announced over the cluster channel (statistics only: the
    /// database delivery is still applied, since an unauthenticated peer could name any xid).
    pub(super) peer: BTreeSet<u64>,
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
}
