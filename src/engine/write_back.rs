//! Paced write-back of both images while the job mirrors.
//!
//! The bulk pass copies into the page cache far faster than the disk takes
//! it, and the guest's mirrored writes leave dirty pages on both images. If
//! nothing writes them back, the switch's first sync has to write all of it
//! in one go, and every guest FUA write or flush meanwhile waits behind
//! that device-wide flush (measured: the longest guest request across the
//! switch command 200-290 ms, the command itself 0.6-1.8 s). So the dirty
//! footprint is kept bounded all the time: every range the pass copied and
//! every range a cached guest write changed is queued, and a separate
//! thread starts its write-back (`sync_file_range`), waiting for the
//! oldest once more than the window is in flight.
//!
//! The window is small while the guest is busy: on ext4 a guest FUA write
//! waits for write-back in flight on the same file (20-90 ms stalls when
//! the write-back ran unbounded), so while the guest is busy at most
//! `BUSY_WINDOW` is queued ahead of it. Nothing here is a durability
//! promise; the syncs still make the images durable. Its own thread,
//! because starting write-back blocks on the device queue, which must not
//! slow the copy workers, hold range locks or delay a guest request.

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::atomic::Ordering;
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use super::Shared;
use crate::error::Result;
use crate::image::Image;
use crate::storage::Storage;

/// Adjacent queued ranges are merged up to this size.
const MERGE_UP_TO: u64 = 2 << 20;
/// Write-back in flight at most while the guest is quiet: about 10 ms of
/// this disk's bandwidth.
const WINDOW: u64 = 8 << 20;
/// Write-back in flight at most while the guest is busy: what a guest FUA
/// write may find queued ahead of it.
const BUSY_WINDOW: u64 = 256 << 10;
/// Queued ranges at most (about 1.5 MiB of memory). Beyond it an image is
/// marked for a sweep of the whole image at the switch.
const MAX_QUEUED: usize = 1 << 16;
/// The step of a whole-image sweep, and the most one drained range covers.
const SWEEP_STEP: u64 = 8 << 20;
/// Queued ranges of one image closer than this are drained as one.
const DRAIN_GAP: u64 = 1 << 20;

/// Which image a queued range belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Which {
    Destination = 0,
    Source = 1,
}

#[derive(Debug, Default)]
pub(crate) struct WriteBack {
    queue: Mutex<Queue>,
    changed: Condvar,
    /// The ranges in flight, per image, shared by the thread and the
    /// switch's drain, so that the drain also waits for what the thread
    /// started.
    pacers: Mutex<[Pacer; 2]>,
}

#[derive(Debug, Default)]
struct Queue {
    ranges: VecDeque<(Which, Range<u64>)>,
    /// Images with ranges dropped because the queue was full.
    overflowed: [bool; 2],
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

    /// Queues a range just written, through the page cache, to `which`.
    pub fn push(&self, which: Which, range: Range<u64>) {
        let mut queue = self.lock();
        if !queue.enabled || range.is_empty() {
            return;
        }
        let full = queue.ranges.len() >= MAX_QUEUED;
        // A mirrored write queues the source's range, then the
        // destination's: the image's own tail is one of the last two.
        let tail = queue
            .ranges
            .iter_mut()
            .rev()
            .take(2)
            .find(|(side, _)| *side == which);
        match tail {
            Some((_, last)) if last.end == range.start && last.end - last.start < MERGE_UP_TO => {
                last.end = range.end;
            }
            _ if full => queue.overflowed[which as usize] = true,
            _ => queue.ranges.push_back((which, range)),
        }
        drop(queue);
        self.changed.notify_one();
    }

    /// The next queued range, if any.
    fn next(&self) -> Option<(Which, Range<u64>)> {
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

/// Write-back of one image with a bounded amount in flight.
#[derive(Debug, Default)]
struct Pacer {
    in_flight: VecDeque<Range<u64>>,
    bytes: u64,
}

impl Pacer {
    fn submit<S: Storage>(
        &mut self,
        image: &Image<S>,
        range: Range<u64>,
        window: u64,
    ) -> Result<()> {
        image.write_back(range.clone(), false)?;
        self.bytes += range.end - range.start;
        self.in_flight.push_back(range);
        while self.bytes > window {
            self.wait_oldest(image)?;
        }
        Ok(())
    }

    fn finish<S: Storage>(&mut self, image: &Image<S>) -> Result<()> {
        while !self.in_flight.is_empty() {
            self.wait_oldest(image)?;
        }
        Ok(())
    }

    fn wait_oldest<S: Storage>(&mut self, image: &Image<S>) -> Result<()> {
        let Some(oldest) = self.in_flight.pop_front() else {
            return Ok(());
        };
        self.bytes -= oldest.end - oldest.start;
        image.write_back(oldest, true)
    }
}

fn image<S: Storage, J: Storage>(shared: &Shared<S, J>, which: Which) -> &Image<S> {
    match which {
        Which::Destination => &shared.destination,
        Which::Source => &shared.source,
    }
}

/// A write-back error is a failed sync of that image (E5): on the
/// destination it aborts the job, on the source it stops the engine.
fn fail<S: Storage, J: Storage>(shared: &Shared<S, J>, which: Which, e: &crate::error::Error) {
    match which {
        Which::Destination => shared.fail_destination(e),
        Which::Source => shared.fail_engine(format!("source: {}", e.describe())),
    }
}

/// The write-back thread: starts write-back of every queued range, keeping
/// at most the window in flight per image, while the job mirrors.
pub(super) fn run<S: Storage, J: Storage>(shared: &Shared<S, J>) {
    super::copier::lower_priority(shared);
    while !shared.stop.load(Ordering::Acquire) && shared.phase().mirroring() {
        let window = if shared.guest_busy() {
            BUSY_WINDOW
        } else {
            WINDOW
        };
        // The range is taken under the pacers' lock, so that a drain never
        // misses one that is between the queue and the window.
        let mut pacers = lock(&shared.write_back.pacers);
        let (which, done) = match shared.write_back.next() {
            Some((which, range)) => (
                which,
                pacers[which as usize].submit(image(shared, which), range, window),
            ),
            None => {
                // Nothing queued: see what is in flight through, so that a
                // write-back error is noticed now rather than at the switch.
                let mut outcome = (Which::Destination, Ok(()));
                for which in [Which::Destination, Which::Source] {
                    if let Err(e) = pacers[which as usize].finish(image(shared, which)) {
                        outcome = (which, Err(e));
                        break;
                    }
                }
                if outcome.1.is_ok() {
                    drop(pacers);
                    shared.write_back.wait_for_work(Duration::from_millis(50));
                    continue;
                }
                outcome
            }
        };
        if let Err(e) = done {
            drop(pacers);
            fail(shared, which, &e);
            return;
        }
    }
}

/// Writes back everything still queued or in flight on both images, and
/// sweeps an image whose ranges overflowed the queue, paced, whether or
/// not the guest is busy: the switch calls it before its first sync, so
/// that the guest's writes meanwhile queue behind at most the window, not
/// behind a whole image in one fdatasync.
pub(super) fn drain<S: Storage, J: Storage>(shared: &Shared<S, J>) -> Result<()> {
    let mut pacers = lock(&shared.write_back.pacers);
    let run = |pacers: &mut [Pacer; 2]| -> std::result::Result<(), (Which, crate::error::Error)> {
        // Only what is queued now: the guest keeps queueing while the drain
        // runs, and a drain that waited for an empty queue would never end
        // under a writer faster than the disk. Later ranges are the
        // thread's; the settle rounds and write-through cover them.
        let snapshot = std::mem::take(&mut shared.write_back.lock().ranges);
        let mut per_image: [Vec<Range<u64>>; 2] = Default::default();
        for (which, range) in snapshot {
            per_image[which as usize].push(range);
        }
        for which in [Which::Destination, Which::Source] {
            let ranges = std::mem::take(&mut per_image[which as usize]);
            for range in coalesce(ranges) {
                pacers[which as usize]
                    .submit(image(shared, which), range, WINDOW)
                    .map_err(|e| (which, e))?;
            }
        }
        let overflowed = std::mem::take(&mut shared.write_back.lock().overflowed);
        for which in [Which::Destination, Which::Source] {
            let image = image(shared, which);
            if overflowed[which as usize] {
                let size = shared.size;
                let mut at = 0;
                while at < size {
                    let end = size.min(at + SWEEP_STEP);
                    pacers[which as usize]
                        .submit(image, at..end, WINDOW)
                        .map_err(|e| (which, e))?;
                    at = end;
                }
            }
            pacers[which as usize]
                .finish(image)
                .map_err(|e| (which, e))?;
        }
        Ok(())
    };
    match run(&mut pacers) {
        Ok(()) => Ok(()),
        Err((which, e)) => {
            drop(pacers);
            fail(shared, which, &e);
            Err(e)
        }
    }
}

/// One image's queued ranges in offset order, neighbours closer than
/// `DRAIN_GAP` joined (up to `SWEEP_STEP` each). Write-back costs a wait
/// per range whatever the clean pages between, so a queue of scattered
/// 4 KiB guest writes drains in a few calls rather than one per write (a
/// drain paying a wait per write ran for as long as the guest kept
/// writing faster than the disk).
fn coalesce(mut ranges: Vec<Range<u64>>) -> Vec<Range<u64>> {
    ranges.sort_unstable_by_key(|r| r.start);
    let mut out: Vec<Range<u64>> = Vec::with_capacity(ranges.len().min(1024));
    for range in ranges {
        match out.last_mut() {
            Some(last)
                if range.start <= last.end.saturating_add(DRAIN_GAP)
                    && range.end.max(last.end) - last.start <= SWEEP_STEP =>
            {
                last.end = last.end.max(range.end);
            }
            _ => out.push(range),
        }
    }
    out
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether the union of `out` (sorted by start) holds all of `range`.
    fn covers(out: &[Range<u64>], range: &Range<u64>) -> bool {
        let mut union: Vec<Range<u64>> = Vec::new();
        for r in out {
            match union.last_mut() {
                Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
                _ => union.push(r.clone()),
            }
        }
        union
            .iter()
            .any(|u| u.start <= range.start && range.end <= u.end)
    }

    /// Every queued byte stays covered, ranges come out sorted and
    /// disjoint, none is longer than the sweep step unless it was queued
    /// so, and scattered small ranges collapse.
    #[test]
    fn coalesce_covers_every_range_in_few_bounded_calls() {
        let mut seed = 7u64;
        let mut cases = 0;
        for _ in 0..200 {
            let mut ranges = Vec::new();
            for _ in 0..(seed % 300) {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let start = (seed >> 20) % (64 << 20);
                let len = 1 + (seed >> 8) % (3 << 20);
                ranges.push(start..start + len);
            }
            let out = coalesce(ranges.clone());
            for range in &ranges {
                assert!(covers(&out, range), "{range:?} lost in {out:?}");
            }
            for pair in out.windows(2) {
                assert!(pair[0].start <= pair[1].start, "{out:?}");
            }
            for r in &out {
                let queued_longest = ranges.iter().map(|q| q.end - q.start).max().unwrap_or(0);
                assert!(r.end - r.start <= SWEEP_STEP.max(queued_longest), "{r:?}");
            }
            cases += 1;
        }
        println!("coalesce: {cases} random queues");
        // 4 KiB blocks all over 64 MiB: a handful of calls, not 16384.
        let blocks: Vec<_> = (0..16384u64)
            .rev()
            .map(|b| b * 4096..(b + 1) * 4096)
            .collect();
        assert_eq!(coalesce(blocks).len(), 8);
    }
}
