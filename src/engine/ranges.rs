//! Byte-range locks that serialise overlapping I/O between guest writes and
//! copy workers.
//!
//! Why: a copy worker reads a chunk from the source and writes it to the
//! destination. If a guest write to that chunk lands on both images between
//! the worker's read and its write, the worker would put stale bytes over
//! newer ones on the destination, and nothing would ever copy them again.
//! Holding the range for the whole read-then-write makes that impossible.
//! Non-overlapping requests never wait for each other.

use std::ops::Range;
use std::sync::{Condvar, Mutex};

/// A set of held ranges.
#[derive(Debug, Default)]
pub struct RangeLocks {
    held: Mutex<Vec<Range<u64>>>,
    released: Condvar,
}

/// A held range; released on drop.
#[derive(Debug)]
pub struct RangeGuard<'a> {
    locks: &'a RangeLocks,
    range: Range<u64>,
}

fn overlaps(a: &Range<u64>, b: &Range<u64>) -> bool {
    a.start < b.end && b.start < a.end
}

impl RangeLocks {
    /// Waits until no held range overlaps `range`, then holds it.
    pub fn lock(&self, range: Range<u64>) -> RangeGuard<'_> {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        while held.iter().any(|r| overlaps(r, &range)) {
            held = self.released.wait(held).unwrap_or_else(|p| p.into_inner());
        }
        held.push(range.clone());
        RangeGuard { locks: self, range }
    }

    /// Holds `range` if nothing overlapping is held, without waiting.
    pub fn try_lock(&self, range: Range<u64>) -> Option<RangeGuard<'_>> {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        if held.iter().any(|r| overlaps(r, &range)) {
            return None;
        }
        held.push(range.clone());
        Some(RangeGuard { locks: self, range })
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        let mut held = self.locks.held.lock().unwrap_or_else(|p| p.into_inner());
        let at = held
            .iter()
            .position(|r| *r == self.range)
            .expect("a held range is in the set");
        held.swap_remove(at);
        drop(held);
        self.locks.released.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlapping_ranges_exclude_each_other() {
        let locks = RangeLocks::default();
        let a = locks.lock(0..100);
        assert!(locks.try_lock(50..150).is_none());
        assert!(locks.try_lock(100..200).is_some());
        drop(a);
        assert!(locks.try_lock(50..150).is_some());
    }
}
