//! The bulk pass: one sweep over the dirty bitmap, copying runs of dirty
//! granules from the source to the destination.
//!
//! Guest writes never dirty a granule (they mirror instead), so the pass
//! only moves forward and ends after one sweep whatever the guest's write
//! rate. A run is claimed under the cursor mutex, copied under its range
//! lock, and its bits are cleared only after the destination write
//! succeeded, so "nothing dirty" means "every copy finished".

use std::ops::Range;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::{JobPhase, Shared};
use crate::error::{Error, Result};
use crate::storage::{DIRECT_ALIGN, Storage};

/// What one call to `copy_step` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepOutcome {
    /// Copied this many bytes.
    Copied(u64),
    /// Nothing left to copy; the job is Ready (or left Copying).
    Done,
}

/// Marks the granules of `ranges` (sorted, disjoint) where the source may
/// hold data dirty, and makes the destination read zeros where the source
/// is a hole, so holes stay holes. A new job plans the whole image; a
/// resumed one what its progress says may differ.
pub(super) fn plan<S: Storage, J: Storage>(
    shared: &Shared<S, J>,
    ranges: &[Range<u64>],
) -> Result<()> {
    let g = shared.config.granularity;
    for planned in ranges {
        let (first_g, end_g) = (planned.start / g, planned.end.div_ceil(g));
        let mut offset = first_g * g;
        // Granules below `decided` are already marked dirty or punched.
        let mut decided = first_g;
        while offset < (end_g * g).min(shared.size) {
            let Some(range) = shared.source.next_data(offset)? else {
                break;
            };
            if range.end <= offset || range.start >= end_g * g {
                break;
            }
            if offset == 0 && range.start == 0 && range.end >= shared.size {
                // One extent over the whole source: the runs need no splitting.
                shared.source_has_holes.store(false, Ordering::Release);
            }
            let first = (range.start / g).max(first_g);
            let last = range.end.min(shared.size).div_ceil(g).min(end_g);
            punch_holes(shared, decided, first)?;
            for granule in first.max(decided)..last {
                shared.dirty.set(granule);
            }
            decided = decided.max(last);
            offset = range.end;
        }
        punch_holes(shared, decided, end_g.min(shared.dirty.len()))?;
    }
    Ok(())
}

fn punch_holes<S: Storage, J: Storage>(shared: &Shared<S, J>, from: u64, to: u64) -> Result<()> {
    if from >= to {
        return Ok(());
    }
    let g = shared.config.granularity;
    let start = from * g;
    let end = (to * g).min(shared.size);
    shared.destination.punch(start, end - start)
}

/// Splits `run` into the source's data and holes, in order: `(range,
/// true)` for data. A storage without sparse knowledge reports one data
/// range.
fn source_extents<S: Storage, J: Storage>(
    shared: &Shared<S, J>,
    run: Range<u64>,
) -> Result<Vec<(Range<u64>, bool)>> {
    if !shared.source_has_holes.load(Ordering::Acquire) {
        // A guest discard may have made a hole since; copying it as
        // zeros costs allocation, not correctness.
        return Ok(vec![(run, true)]);
    }
    let mut pieces = Vec::new();
    let mut at = run.start;
    while at < run.end {
        let data = shared.source.next_data(at)?;
        let (data_start, data_end) = match data {
            Some(r) if r.start < run.end => (r.start.max(at), r.end.min(run.end)),
            _ => (run.end, run.end),
        };
        if data_start > at {
            pieces.push((at..data_start, false));
        }
        if data_end > data_start {
            pieces.push((data_start..data_end, true));
        }
        if data_end <= at {
            // No progress: the storage answered a range that ends before
            // `at`; treat the rest as data rather than loop or lose bytes.
            pieces.push((at..run.end, true));
            break;
        }
        at = data_end.max(data_start);
    }
    Ok(pieces)
}

/// Claims the next run of dirty granules: at most a chunk's worth.
fn claim<S: Storage, J: Storage>(shared: &Shared<S, J>) -> Option<Range<u64>> {
    let mut cursor = shared.cursor.lock().unwrap_or_else(|p| p.into_inner());
    let first = shared.dirty.next_set(*cursor)?;
    let most = shared.chunk_size() / shared.config.granularity;
    let mut end = first + 1;
    while end < shared.dirty.len() && end - first < most && shared.dirty.get(end) {
        end += 1;
    }
    *cursor = end;
    Some(first..end)
}

/// Copies one run. See [`super::Job::copy_step`].
pub(super) fn step<S: Storage, J: Storage>(shared: &Shared<S, J>) -> Result<StepOutcome> {
    step_with(shared, &mut Vec::new())
}

/// [`step`] with a buffer the caller keeps between steps: a fresh one per
/// run (a megabyte, above malloc's mmap threshold) was a map, a page fault
/// per page, zeroing and an unmap every time.
/// The source's read fills every byte of the part used (the `Storage`
/// contract), so what an earlier run left there never reaches a write.
fn step_with<S: Storage, J: Storage>(
    shared: &Shared<S, J>,
    scratch: &mut Vec<u8>,
) -> Result<StepOutcome> {
    if shared.phase() != JobPhase::Copying {
        return Ok(StepOutcome::Done);
    }
    let Some(granules) = claim(shared) else {
        shared.reach_ready()?;
        return Ok(StepOutcome::Done);
    };
    let g = shared.config.granularity;
    let start = granules.start * g;
    let end = (granules.end * g).min(shared.size);
    let held = shared.ranges.lock(start..end);
    // Aligned for a direct write of the destination (see below).
    let len = (end - start) as usize;
    if scratch.len() < len + DIRECT_ALIGN {
        scratch.resize(len + DIRECT_ALIGN, 0);
    }
    let skip = scratch.as_ptr().align_offset(DIRECT_ALIGN);
    let buf = &mut scratch[skip..skip + len];
    if let Err(e) = shared.source.read(start, buf) {
        // The pass cannot finish; the guest keeps the source, and its own
        // requests report their own errors.
        shared.fail_destination(&Error::InvalidInput(format!(
            "bulk copy stopped: {}",
            e.describe()
        )));
        return Err(e);
    }
    if !shared.phase().mirroring() {
        return Ok(StepOutcome::Done);
    }
    // The run is granule-aligned, the source's extents need not be: write
    // only what the source holds as data and punch the rest, so that the
    // destination allocates what the source does. Under the range lock,
    // no guest write changes the run meanwhile.
    //
    // Data goes around the destination's page cache where it can (O_DIRECT,
    // aligned): the pass then leaves nothing dirty for the switch to write
    // back, and never entangles the guest's FUA writes with write-back of
    // gigabytes it did not write. What went through the cache is queued
    // for paced write-back.
    let written = source_extents(shared, start..end).and_then(|pieces| {
        pieces.into_iter().try_for_each(|(piece, data)| {
            let len = piece.end - piece.start;
            if data {
                let at = (piece.start - start) as usize;
                let direct = shared
                    .destination
                    .write_bulk(piece.start, &buf[at..at + len as usize])?;
                if !direct {
                    shared
                        .write_back
                        .push(super::write_back::Which::Destination, piece);
                }
                Ok(())
            } else {
                shared.destination.punch(piece.start, len)
            }
        })
    });
    if let Err(e) = written {
        shared.fail_destination(&e);
        return Err(e);
    }
    for granule in granules {
        shared.dirty.clear(granule);
    }
    let before = shared.copied.fetch_add(end - start, Ordering::AcqRel);
    let step = super::intent::step(shared.size);
    if before / step != (before + end - start) / step {
        // A checkpoint is due: the thread need not wait for its next look.
        shared.intent.wake.notify_one();
    }
    drop(held);
    if shared.dirty.count() == 0 {
        // Whoever clears the last bit makes the job Ready: the other
        // workers may have found nothing to claim and left already, and
        // this one may stand aside for as long as the guest stays busy.
        shared.reach_ready()?;
    }
    Ok(StepOutcome::Copied(end - start))
}

/// Gives the calling thread the workers' nice value. Linux applies a nice
/// value to the thread whose id is given. Best effort: a failure only costs
/// guest latency, never correctness.
pub(super) fn lower_priority<S: Storage, J: Storage>(shared: &Shared<S, J>) {
    if shared.config.worker_nice > 0 {
        let thread = rustix::thread::gettid();
        let _ = rustix::process::setpriority_process(Some(thread), shared.config.worker_nice);
    }
}

/// How long a worker beyond `busy_workers` sleeps before it looks again.
const BUSY_NAP: Duration = Duration::from_millis(5);

/// A copy worker's loop: steps until the pass is done or the job stops,
/// making way for guest requests (only `busy_workers` workers, with short
/// requests, while the guest is busy) and honouring the bandwidth limit.
pub(super) fn run<S: Storage, J: Storage>(shared: &Shared<S, J>, worker: usize) {
    lower_priority(shared);
    let started = Instant::now();
    let mut copied_here = 0u64;
    let mut scratch = Vec::new();
    while !shared.stop.load(Ordering::Acquire) {
        if worker >= shared.config.busy_workers && shared.guest_busy() {
            // Stand aside while the guest is busy; check again soon.
            std::thread::sleep(BUSY_NAP);
            continue;
        }
        if shared.guest_in_flight() > 0 {
            shared.yield_to_guest(shared.config.guest_grace);
        }
        match step_with(shared, &mut scratch) {
            Ok(StepOutcome::Copied(n)) => {
                copied_here += n;
                if let Some(limit) = shared.config.bandwidth {
                    // Each worker takes its share of the limit.
                    let share = (limit / shared.config.copy_workers as u64).max(1);
                    let due = started + Duration::from_secs_f64(copied_here as f64 / share as f64);
                    // In short naps, so that dropping the job never waits long.
                    while !shared.stop.load(Ordering::Acquire) {
                        let now = Instant::now();
                        if now >= due {
                            break;
                        }
                        std::thread::sleep((due - now).min(Duration::from_millis(20)));
                    }
                }
            }
            Ok(StepOutcome::Done) | Err(_) => break,
        }
    }
}
