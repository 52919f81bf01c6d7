//! Paced write-back of the destination during the bulk pass.
//!
//! The bulk pass copies into the page cache far faster than the disk takes
//! it, so without help the whole destination is still dirty at Ready: the
//! switch's first sync must write it all back in one go, and the device
//! answers slowly for a while after (the Switched commit then takes twice
//! its usual time). A separate thread starts write-back of each copied
//! range as the pass goes (`sync_file_range`), and waits for the oldest
//! once more than `WINDOW` bytes are in flight, so the disk works alongside
//! the copy and never has more than the window queued.
//!
//! It stands aside while the guest is busy: on ext4 a guest FUA write on
//! the destination may have to wait for write-back in flight (measured:
//! 20-90 ms stalls when the write-back ran unbounded), and the guest comes
//! first. When the guest arrives, at most the window is still queued.
//! Nothing here is a durability promise; the syncs still make the copy
//! durable. Its own thread, because starting write-back blocks on the
//! device queue, which must not slow the copy workers or hold range locks.

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::atomic::Ordering;
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use super::{JobPhase, Shared};
use crate::error::Result;
use crate::storage::Storage;

/// Adjacent copied ranges are merged up to this size.
const MERGE_UP_TO: u64 = 2 << 20;
/// The guest must have been quiet this long (from the job's start, too: a
/// guest that is about to connect is not idle) before write-back runs:
/// write-back already queued when the guest comes back is what it waits
/// behind.
const QUIET: Duration = Duration::from_millis(100);
/// Write-back in flight at most: about 10 ms of this disk's bandwidth.
const WINDOW: u64 = 8 << 20;

#[derive(Debug, Default)]
pub(crate) struct WriteBack {
    queue: Mutex<Queue>,
    changed: Condvar,
    /// The ranges in flight, shared by the thread and the switch's drain,
    /// so that the drain also waits for what the thread started.
    pacer: Mutex<Pacer>,
}

#[derive(Debug, Default)]
struct Queue {
    ranges: VecDeque<Range<u64>>,
    /// Only a job with worker threads has a write-back thread; a job driven
    /// by `copy_step` alone queues nothing.
    enabled: bool,
}

impl WriteBack {
    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn enable(&self) {
        self.lock().enabled = true;
    }

    /// Queues a range the pass just wrote to the destination.
    pub fn push(&self, range: Range<u64>) {
        let mut queue = self.lock();
        if !queue.enabled {
            return;
        }
        match queue.ranges.back_mut() {
            Some(last) if last.end == range.start && last.end - last.start < MERGE_UP_TO => {
                last.end = range.end;
            }
            _ => queue.ranges.push_back(range),
        }
        drop(queue);
        self.changed.notify_one();
    }

    /// The next queued range, if any.
    fn next(&self) -> Option<Range<u64>> {
        self.lock().ranges.pop_front()
    }

    /// Waits up to `wait` for a range to be queued.
    fn wait_for_work(&self, wait: Duration) {
        let queue = self.lock();
        if queue.ranges.is_empty() {
            let _ = self
                .changed
                .wait_timeout(queue, wait)
                .unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// Write-back with at most `WINDOW` bytes in flight.
#[derive(Debug, Default)]
struct Pacer {
    in_flight: VecDeque<Range<u64>>,
    bytes: u64,
}

impl Pacer {
    fn submit<S: Storage, J: Storage>(
        &mut self,
        shared: &Shared<S, J>,
        range: Range<u64>,
    ) -> Result<()> {
        shared.destination.write_back(range.clone(), false)?;
        self.bytes += range.end - range.start;
        self.in_flight.push_back(range);
        while self.bytes > WINDOW {
            self.wait_oldest(shared)?;
        }
        Ok(())
    }

    fn finish<S: Storage, J: Storage>(&mut self, shared: &Shared<S, J>) -> Result<()> {
        while !self.in_flight.is_empty() {
            self.wait_oldest(shared)?;
        }
        Ok(())
    }

    fn wait_oldest<S: Storage, J: Storage>(&mut self, shared: &Shared<S, J>) -> Result<()> {
        let Some(oldest) = self.in_flight.pop_front() else {
            return Ok(());
        };
        self.bytes -= oldest.end - oldest.start;
        shared.destination.write_back(oldest, true)
    }
}

/// The write-back thread: starts write-back of every queued range, keeping
/// at most `WINDOW` bytes in flight, until the pass is over and the queue
/// is empty, or the job stops. A write-back error aborts the job like a
/// failed destination sync.
pub(super) fn run<S: Storage, J: Storage>(shared: &Shared<S, J>) {
    super::copier::lower_priority(shared);
    while !shared.stop.load(Ordering::Acquire) && shared.phase().mirroring() {
        if !shared.guest_quiet_for(QUIET) {
            std::thread::sleep(Duration::from_millis(5));
            continue;
        }
        // The range is taken under the pacer's lock, so that a drain never
        // misses one that is between the queue and the window.
        let mut pacer = lock(&shared.write_back.pacer);
        let next = shared.write_back.next();
        let pass_over = next.is_none() && shared.phase() != JobPhase::Copying;
        let done = match next {
            Some(range) => pacer.submit(shared, range),
            // The pass is over: see the last ranges through, so that a
            // write-back error aborts the job now rather than at the switch.
            None if pass_over => pacer.finish(shared),
            None => {
                drop(pacer);
                shared.write_back.wait_for_work(Duration::from_millis(50));
                continue;
            }
        };
        if let Err(e) = done {
            drop(pacer);
            shared.fail_destination(&e);
            return;
        }
        if pass_over {
            return;
        }
    }
}

/// Writes back everything still queued or in flight, paced, whether or not
/// the guest is busy: the switch calls it before its first sync, so that
/// the guest's writes meanwhile queue behind at most the window, not behind
/// the whole destination in one fdatasync.
pub(super) fn drain<S: Storage, J: Storage>(shared: &Shared<S, J>) -> Result<()> {
    let mut pacer = lock(&shared.write_back.pacer);
    while let Some(range) = shared.write_back.next() {
        pacer.submit(shared, range)?;
    }
    pacer.finish(shared)
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}
