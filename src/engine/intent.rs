//! Durable progress and write intent, so that a job resumed after a crash
//! copies only what may differ (see `journal::progress` for the record).
//!
//! Invariants:
//!
//! - R1. Below the durable cursor, an extent where the images may differ
//!   is listed in the newest record. A mirrored guest write to an extent
//!   that starts below the cursor and is not listed waits until a record
//!   listing it is durable, before it touches either image (md's bit
//!   "durable before the data write").
//! - R2. A checkpoint drops an extent from the list, or moves the cursor
//!   past it, only if nothing changed it after the checkpoint's boundary:
//!   every write and copy into it finished before the boundary, and both
//!   images were synced after it.
//!   An extent written in the interval before the boundary stays listed
//!   one more checkpoint (it is likely written again), so a guest that
//!   keeps writing an extent pays one commit for it, not one per
//!   checkpoint.
//! - R3. Listing too much is always safe (a recopy); the record's list is
//!   coarsened to fit, never truncated.
//!
//! ```text
//!   checkpoint:  boundary (previous := touched; touched := extents with
//!                writes in flight;
//!                cursor := first dirty granule; kept := listed extents
//!                still dirty)  ->  sync destination, sync source  ->
//!                commit (cursor, touched + previous + kept)
//!   guest write: in_flight += extents, touched += extents; an extent below
//!                the cursor and unlisted -> commit it first (R1)
//! ```
//!
//! Commits run outside the intent lock: while one is in flight, a write
//! goes on only if its extents are covered both by the newest record and by
//! the one being written (either may be the newest after a crash); others
//! wait for the commit. A write to an extent both records list goes straight
//! on. One the newest record lists but an in-flight checkpoint drops (it
//! was clean at the boundary) waits for that commit and then for its own:
//! after a crash either record may be the newest.
//!
//! A commit that fails leaves its record doubtful: it may be on the
//! journal, so it counts as one of the records a crash may leave, and no
//! later commit can supersede it (the journal is poisoned). A write to an
//! extent it does not cover fails instead of going on (R1).
//!
//! Lock order: intent, then journal, then state (the intent lock is never
//! held across a commit, only taken before the journal's where both are).

use std::collections::{BTreeSet, HashMap};
use std::ops::Range;
use std::sync::atomic::Ordering;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::Shared;
use crate::error::{Error, Result};
use crate::journal::{Phase, Progress};
use crate::storage::Storage;

#[derive(Debug)]
pub(crate) struct Intent {
    state: Mutex<State>,
    /// One checkpoint at a time (the thread, or an embedder's call).
    checkpointing: Mutex<()>,
    /// Wakes the checkpoint thread early (the job stops).
    pub wake: Condvar,
    /// Signalled when a commit ends.
    committed: Condvar,
}

#[derive(Debug)]
struct State {
    /// False when the journal cannot carry progress (format 1).
    enabled: bool,
    extent: u64,
    /// What the newest record says.
    durable: Progress,
    /// The record being committed, if any: until it is durable, either
    /// record may be the one a crash leaves.
    incoming: Option<Progress>,
    /// A record whose commit failed: it may be on the journal, so writes
    /// it does not cover cannot go on.
    doubtful: Option<Progress>,
    /// Extents writers wait to see listed: the next commit lists them all.
    wanted: BTreeSet<u64>,
    /// Extents a resumed job still copies again: listed until copied.
    carried: BTreeSet<u64>,
    /// Extents with a mirrored write in flight, and how many.
    in_flight: HashMap<u64, u32>,
    /// Extents written since the last boundary (or in flight at it).
    touched: BTreeSet<u64>,
    /// Extents written between the two boundaries before: still listed
    /// by the next checkpoint, so that an extent the guest keeps writing
    /// stays listed instead of costing a commit after every checkpoint
    /// (DRBD's activity log keeps hot extents the same way; md clears a
    /// bit two to three daemon periods after its last write).
    previous: BTreeSet<u64>,
    /// `copied` and time at the last checkpoint.
    last_copied: u64,
    last_at: Instant,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

impl Intent {
    /// `durable` is the newest record's progress (for a new job: nothing
    /// copied); `carried` the extents a resumed job copies again (every
    /// extent its plan touches below the cursor, granule-rounded), listed
    /// until copied.
    pub fn new(enabled: bool, durable: Progress, carried: BTreeSet<u64>) -> Intent {
        Intent {
            state: Mutex::new(State {
                enabled,
                extent: durable.extent_size,
                carried,
                durable,
                incoming: None,
                doubtful: None,
                wanted: BTreeSet::new(),
                in_flight: HashMap::new(),
                touched: BTreeSet::new(),
                previous: BTreeSet::new(),
                last_copied: 0,
                last_at: Instant::now(),
            }),
            checkpointing: Mutex::new(()),
            wake: Condvar::new(),
            committed: Condvar::new(),
        }
    }

    /// The newest record's progress.
    pub fn durable(&self) -> Progress {
        lock(&self.state).durable.clone()
    }
}

/// A mirrored write's extents, counted in flight until dropped.
pub(crate) struct Marked<'a, S: Storage, J: Storage> {
    shared: &'a Shared<S, J>,
    extents: Range<u64>,
}

impl<S: Storage, J: Storage> Drop for Marked<'_, S, J> {
    fn drop(&mut self) {
        if self.extents.is_empty() {
            return;
        }
        let mut state = lock(&self.shared.intent.state);
        for e in self.extents.clone() {
            if let Some(n) = state.in_flight.get_mut(&e) {
                *n -= 1;
                if *n == 0 {
                    state.in_flight.remove(&e);
                }
            }
        }
    }
}

/// Whether a write into extent `e` may go on under `progress`: the extent
/// starts at or past the cursor (a resume copies it anyway) or is listed.
fn covered(progress: &Progress, e: u64) -> bool {
    e.saturating_mul(progress.extent_size) >= progress.cursor || progress.lists(e)
}

impl State {
    /// Covered by the newest record and by the one being committed.
    fn covers(&self, e: u64) -> bool {
        covered(&self.durable, e)
            && self.incoming.as_ref().is_none_or(|n| covered(n, e))
            && self.doubtful.as_ref().is_none_or(|n| covered(n, e))
    }
}

/// Marks `range` as written by a mirrored guest write, before the write
/// touches either image (R1). An error means the record could not be
/// written: the write must not go on.
pub(crate) fn mark<'a, S: Storage, J: Storage>(
    shared: &'a Shared<S, J>,
    range: &Range<u64>,
) -> Result<Marked<'a, S, J>> {
    let intent = &shared.intent;
    let mut state = lock(&intent.state);
    if !state.enabled || range.is_empty() {
        return Ok(Marked {
            shared,
            extents: 0..0,
        });
    }
    let extents = range.start / state.extent..range.end.div_ceil(state.extent);
    for e in extents.clone() {
        *state.in_flight.entry(e).or_default() += 1;
        state.touched.insert(e);
    }
    let outcome = loop {
        let missing: Vec<u64> = extents.clone().filter(|&e| !state.covers(e)).collect();
        if missing.is_empty() {
            break Ok(());
        }
        if state.doubtful.is_some() {
            break Err(Error::Poisoned { what: "journal" });
        }
        state.wanted.extend(missing);
        if state.incoming.is_some() {
            state = intent
                .committed
                .wait(state)
                .unwrap_or_else(|p| p.into_inner());
            continue;
        }
        // This writer commits for every writer waiting.
        let wanted = std::mem::take(&mut state.wanted);
        let next = Progress::with_extents(
            state.extent,
            state.durable.size,
            state.durable.cursor,
            state.durable.extents().chain(wanted),
        );
        let (committed, back) = commit_unlocked(shared, state, next);
        state = back;
        if let Err(e) = committed {
            break Err(e);
        }
    };
    drop(state);
    // Created after the lock is let go: its drop takes the lock.
    let marked = Marked { shared, extents };
    outcome.map(|()| marked)
}

/// Commits `next` with the intent lock let go (`incoming` set meanwhile,
/// see `State::covers`), and takes the lock back. The newest record's
/// progress becomes what the journal recorded.
fn commit_unlocked<'a, S: Storage, J: Storage>(
    shared: &'a Shared<S, J>,
    mut state: MutexGuard<'a, State>,
    next: Progress,
) -> (Result<()>, MutexGuard<'a, State>) {
    if state.doubtful.is_some() {
        // Nothing may supersede a record that may be on the journal.
        return (Err(Error::Poisoned { what: "journal" }), state);
    }
    state.incoming = Some(next.clone());
    drop(state);
    // A commit that panics must not leave `incoming` set: writers waiting
    // for it would wait forever (a panic must never freeze the guest:
    // ARCHITECTURE.md, mod.rs). It ends as a failed one.
    let unwinding = InFlight(shared);
    let committed = commit(shared, &next);
    std::mem::forget(unwinding);
    let mut state = lock(&shared.intent.state);
    end_commit(&mut state, committed.is_ok());
    let result = committed.map(|recorded| state.durable = recorded);
    shared.intent.committed.notify_all();
    (result, state)
}

/// Ends the commit in flight; a failed one may be on the journal, so its
/// record stays doubtful (see `State::covers`).
fn end_commit(state: &mut State, ok: bool) {
    let ended = state.incoming.take();
    if !ok {
        state.doubtful = ended;
    }
}

/// Armed while a commit runs with the intent lock let go; dropped only by
/// an unwinding commit, which fails the job like a failed commit.
struct InFlight<'a, S: Storage, J: Storage>(&'a Shared<S, J>);

impl<S: Storage, J: Storage> Drop for InFlight<'_, S, J> {
    fn drop(&mut self) {
        let intent = &self.0.intent;
        end_commit(&mut lock(&intent.state), false);
        intent.committed.notify_all();
        self.0
            .fail_engine("journal: a progress commit panicked".to_string());
    }
}

/// Commits `progress` with the job's current phase and returns what the
/// record holds (coarsened to fit, or none: see
/// `Journal::commit_progress`); a job no longer copying or ready (aborted,
/// switched) needs none and writes nothing.
fn commit<S: Storage, J: Storage>(shared: &Shared<S, J>, progress: &Progress) -> Result<Progress> {
    let mut journal = lock(&shared.journal);
    if journal.is_poisoned() {
        return Err(Error::Poisoned { what: "journal" });
    }
    let phase = journal.record().phase;
    if !matches!(phase, Phase::Copying | Phase::Ready) {
        return Ok(progress.clone());
    }
    let copied = shared.copied.load(Ordering::Acquire);
    if let Err(e) = journal.commit_progress(phase, copied, Some(progress)) {
        drop(journal);
        shared.fail_engine(format!("journal: {}", e.describe()));
        return Err(e);
    }
    // No room for any progress: the record says "copy everything", which
    // a cursor at 0 with nothing listed says too.
    Ok(journal
        .progress()
        .unwrap_or_else(|| Progress::start(progress.extent_size, progress.size)))
}

/// Makes the copy's progress durable (R2): what was copied and written
/// before now is synced on both images, then recorded. Returns whether a
/// record was written.
pub(crate) fn checkpoint<S: Storage, J: Storage>(shared: &Shared<S, J>) -> Result<bool> {
    let _one = lock(&shared.intent.checkpointing);
    let g = shared.config.granularity;
    let (extent, cursor, kept, copied) = {
        let mut state = lock(&shared.intent.state);
        if !state.enabled || !shared.phase().mirroring() {
            return Ok(false);
        }
        let in_flight = state.in_flight.keys().copied().collect();
        state.previous = std::mem::replace(&mut state.touched, in_flight);
        let copied = shared.copied.load(Ordering::Acquire);
        let from = state.durable.cursor / g;
        let cursor = shared
            .dirty
            .next_set(from)
            .map_or(shared.size, |i| (i * g).min(shared.size));
        let extent = state.extent;
        let kept: BTreeSet<u64> = state
            .carried
            .iter()
            .copied()
            .filter(|&e| {
                let first = e * extent / g;
                let end = ((e + 1) * extent).div_ceil(g);
                // This extent's own granules only, a word at a time: the
                // scan runs under the lock guest writes take.
                shared.dirty.next_set_before(first, end).is_some()
            })
            .collect();
        (extent, cursor, kept, copied)
    };
    // Everything copied or written before the boundary, durable on both.
    if let Err(e) = shared.destination.sync() {
        shared.fail_destination(&e);
        return Err(e);
    }
    if let Err(e) = shared.source.sync() {
        shared.fail_engine(format!("source: {}", e.describe()));
        return Err(e);
    }
    // A writer's commit in flight: its extents are touched, so they are
    // in the list below, but its record must be the newest before ours.
    let mut state = no_commit_in_flight(shared, lock(&shared.intent.state));
    let listed: Vec<u64> = state
        .touched
        .iter()
        .chain(state.previous.iter())
        .chain(kept.iter())
        .copied()
        .filter(|&e| e * extent < cursor)
        .collect();
    let next = Progress::with_extents(extent, shared.size, cursor, listed);
    state.last_copied = copied;
    state.last_at = Instant::now();
    if next == state.durable {
        return Ok(false);
    }
    let (committed, mut state) = commit_unlocked(shared, state, next);
    committed?;
    state.carried = kept;
    Ok(true)
}

/// Waits (letting the lock go meanwhile) until no commit is in flight.
fn no_commit_in_flight<'a, S: Storage, J: Storage>(
    shared: &'a Shared<S, J>,
    mut state: MutexGuard<'a, State>,
) -> MutexGuard<'a, State> {
    while state.incoming.is_some() {
        state = shared
            .intent
            .committed
            .wait(state)
            .unwrap_or_else(|p| p.into_inner());
    }
    state
}

/// Before the switch holds the guest: no checkpoint until the switch ends
/// (the guard), and a record that lists nothing and has its cursor at 0
/// (a resume would copy everything), so that no guest write needs a
/// commit while the switch waits for requests in flight, and no
/// checkpoint commit delays the Switched one. If the switch fails, the
/// next checkpoint records the real progress again.
pub(crate) fn quiesce<'a, S: Storage, J: Storage>(
    shared: &'a Shared<S, J>,
) -> Result<MutexGuard<'a, ()>> {
    let no_checkpoints = lock(&shared.intent.checkpointing);
    let state = lock(&shared.intent.state);
    if !state.enabled {
        return Ok(no_checkpoints);
    }
    let state = no_commit_in_flight(shared, state);
    let everything = Progress::start(state.extent, shared.size);
    if state.durable != everything {
        let (committed, _state) = commit_unlocked(shared, state, everything);
        committed?;
    }
    Ok(no_checkpoints)
}

/// How far the pass goes between checkpoints: 1% of the image, at least
/// 1 MiB (a resume then copies at most about 1% more than was left).
pub(super) fn step(size: u64) -> u64 {
    (size / 100).max(1 << 20)
}

/// The checkpoint thread: a checkpoint whenever the pass went a step
/// further, and every `checkpoint_every` while anything is listed or left
/// to copy, until the job stops mirroring.
pub(super) fn run<S: Storage, J: Storage>(shared: &Shared<S, J>) {
    let every = shared.config.checkpoint_every;
    loop {
        {
            let state = lock(&shared.intent.state);
            if !state.enabled {
                return;
            }
            let _ = shared
                .intent
                .wake
                .wait_timeout(state, Duration::from_millis(20))
                .unwrap_or_else(|p| p.into_inner());
        }
        if shared.stop.load(Ordering::Acquire) || !shared.phase().mirroring() {
            return;
        }
        let due = {
            let state = lock(&shared.intent.state);
            let copied = shared.copied.load(Ordering::Acquire);
            let work_left = state.durable.cursor < shared.size || !state.durable.runs.is_empty();
            copied.saturating_sub(state.last_copied) >= step(shared.size)
                || (work_left && state.last_at.elapsed() >= every)
        };
        if due && checkpoint(shared).is_err() {
            return;
        }
    }
}
