//! The live copy engine: mirrored guest writes, one bulk pass, and the
//! switch-over through the journal.
//!
//! ```text
//!              copy pass done,            switch: hold, drain, sync both,
//!              nothing dirty              commit Switched, release
//!   Copying -------------------> Ready -----------------------------> Switched --> Completed
//!      |                           |                                    complete: sync
//!      | abort, or a destination   | abort, or a destination              destination,
//!      | write/sync error          | write/sync error                     commit Completed
//!      v                           v
//!   Aborted (source stays authoritative, guest carries on)
//!
//!   any --> Failed   (journal poisoned, or the authoritative image failed
//!                     a sync: fail-stop, every guest request errors)
//! ```
//!
//! Invariants (the crate's, restated for this module):
//!
//! - E1. While Copying or Ready, a guest write is acknowledged only after it
//!   reached the source and, unless its granules are still to be copied,
//!   the destination.
//! - E2. The Switched record is committed only when nothing is dirty, no
//!   guest request is in flight, new ones are held, and both images were
//!   synced after the last write.
//! - E3. No write reaches the destination alone before the Switched record
//!   is durable: the phase becomes Switched only after `commit` returns.
//! - E4. After Switched, the source is never written again (`Image::retire`
//!   turns any write into a panic).
//! - E5. A failed sync is fatal for its file: the destination's aborts the
//!   job, the source's (while authoritative) or the journal's fails the
//!   engine. Nothing is retried.
//! - E6. An acknowledged flush or force-unit-access write is durable on the
//!   source and, while mirroring, on the destination. A FUA data write
//!   makes itself durable (`Storage::write_durable_at`, RWF_DSYNC on a
//!   file) rather than syncing the whole image: on the destination that
//!   would mean waiting for the write-back of the bulk copy's pages.
//!
//! Each transition is a method of [`Job`]: `start` (Copying), `copy_step`
//! (reaches Ready), `switch`, `complete`, `abort`; failures go through
//! `Shared::fail_destination` and `Shared::fail_engine`.

mod bitmap;
mod copier;
pub mod files;
mod guest;
mod intent;
mod ranges;
pub mod resume;
mod write_back;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub use bitmap::DirtyBitmap;
pub use copier::StepOutcome;
pub use guest::Guest;
pub use ranges::{RangeGuard, RangeLocks};

use crate::error::{Error, Result};
use crate::image::{Image, Role};
use crate::journal::{self, Journal, Phase};
use crate::storage::Storage;

/// The switch syncs both images at most this many times while the guest
/// runs; the guest's own writes keep adding work, so it stops when a round
/// took less than `SETTLED`.
const SETTLE_ROUNDS: usize = 8;
const SETTLED: Duration = Duration::from_millis(2);
/// How long the switch waits for a moment with no guest request in flight
/// before holding anyway (then it waits for them to drain, as it must).
const IDLE_WAIT: Duration = Duration::from_millis(50);

/// Write-through mode for the life of a switch attempt: on however the
/// attempt ends, mirroring goes back to cached writes.
struct WriteThrough<'a>(&'a AtomicBool);

impl<'a> WriteThrough<'a> {
    fn start(flag: &'a AtomicBool) -> Self {
        flag.store(true, Ordering::Release);
        WriteThrough(flag)
    }
}

impl Drop for WriteThrough<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// Copy or busy workers a job may have: each is a thread with a chunk
/// buffer, and past a few the disk, not the count, sets the pace.
pub const MAX_WORKERS: usize = 64;

/// Tunables of a copy job.
#[derive(Debug, Clone)]
pub struct Config {
    /// Bytes tracked by one dirty bit. Power of two, at least 4096.
    pub granularity: u64,
    /// Largest bulk-copy request, in bytes. A multiple of `granularity`.
    pub chunk_size: u64,
    /// Copy worker threads (requests in flight on the bulk path).
    pub copy_workers: usize,
    /// Bulk-copy bandwidth limit in bytes per second; `None` for no limit.
    pub bandwidth: Option<u64>,
    /// How long a copy worker waits for in-flight guest requests to finish
    /// before issuing its next request anyway: guest I/O goes first, but the
    /// pass still ends.
    pub guest_grace: Duration,
    /// The copy workers' nice value (0 to 19). Guest requests run on the
    /// embedder's threads at its own priority; a copy worker that holds a
    /// core makes a waking guest request wait for the scheduler's time
    /// slice (milliseconds). A positive value lets guest threads preempt
    /// the copy at once, while the copy still gets every idle cycle.
    pub worker_nice: i32,
    /// While the guest is busy (a request within the last `busy_window`),
    /// the copy shrinks to this many workers...
    pub busy_workers: usize,
    /// ...and requests of at most this many bytes (rounded up to the
    /// granularity). A long bulk write holds the destination's inode lock,
    /// which the guest's mirrored write then waits for; measured on a
    /// 2-core machine, 1 worker and 128 KiB requests keep a 64 KiB writer
    /// at more than half its unloaded throughput where 2 x 1 MiB left it
    /// a third. With no guest, the copy runs at full width.
    pub busy_chunk_size: u64,
    /// How recent a guest request must be for the guest to count as busy.
    pub busy_window: Duration,
    /// Bytes per write-intent extent: the unit a resumed job copies again
    /// where a guest write may have reached one image only. A power of two,
    /// at least the granularity. Larger extents mean fewer journal
    /// commits before first writes, and more to recopy after a crash.
    pub extent_size: u64,
    /// A checkpoint of the copy's progress at least this often while there
    /// is progress to record (and whenever the pass went 1% further).
    pub checkpoint_every: Duration,
    /// Whether to record the copy's progress at all (checkpoints and write
    /// intent). Without, a job resumed after a crash copies everything.
    pub checkpoints: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            granularity: 64 << 10,
            chunk_size: 1 << 20,
            copy_workers: 2,
            bandwidth: None,
            guest_grace: Duration::from_millis(2),
            worker_nice: 10,
            busy_workers: 1,
            busy_chunk_size: 128 << 10,
            busy_window: Duration::from_millis(20),
            extent_size: 16 << 20,
            checkpoint_every: Duration::from_secs(5),
            checkpoints: true,
        }
    }
}

impl Config {
    /// Refuses impossible settings; `Job::new` and `files::start` call it
    /// before anything is created or written.
    pub fn validate(&self) -> Result<()> {
        let g = self.granularity;
        if !g.is_power_of_two() || g < 4096 {
            return Err(Error::InvalidInput(format!(
                "granularity {g} is not a power of two >= 4096"
            )));
        }
        if self.chunk_size < g || !self.chunk_size.is_multiple_of(g) {
            return Err(Error::InvalidInput(
                "chunk size must be a multiple of the granularity".into(),
            ));
        }
        if !(0..=19).contains(&self.worker_nice) {
            return Err(Error::InvalidInput(format!(
                "worker nice value {} is not in 0..=19",
                self.worker_nice
            )));
        }
        if self.busy_workers == 0 || self.busy_chunk_size == 0 {
            return Err(Error::InvalidInput(
                "at least one busy worker and a busy chunk size above 0 are needed".into(),
            ));
        }
        if !self.extent_size.is_power_of_two() || self.extent_size < g {
            return Err(Error::InvalidInput(format!(
                "extent size {} is not a power of two >= the granularity",
                self.extent_size
            )));
        }
        if self.copy_workers == 0 || self.copy_workers > MAX_WORKERS {
            return Err(Error::InvalidInput(format!(
                "{} copy workers: from 1 to {MAX_WORKERS}",
                self.copy_workers
            )));
        }
        if self.busy_workers > MAX_WORKERS {
            return Err(Error::InvalidInput(format!(
                "{} busy workers: at most {MAX_WORKERS}",
                self.busy_workers
            )));
        }
        if self.bandwidth == Some(0) {
            return Err(Error::InvalidInput(
                "a bandwidth of 0 would never copy anything".into(),
            ));
        }
        Ok(())
    }
}

/// Where the job stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobPhase {
    /// The bulk pass runs; guest writes are mirrored.
    Copying,
    /// The images are equal; still mirroring, waiting for `switch`.
    Ready,
    /// The destination is authoritative; the source is retired.
    Switched,
    /// The switch was acknowledged; the source may be released.
    Completed,
    /// The copy was abandoned; the source stays authoritative.
    Aborted,
    /// Fail-stop: an error left no safe way to go on.
    Failed,
}

impl JobPhase {
    /// Lower-case name for output.
    pub fn name(self) -> &'static str {
        match self {
            JobPhase::Copying => "copying",
            JobPhase::Ready => "ready",
            JobPhase::Switched => "switched",
            JobPhase::Completed => "completed",
            JobPhase::Aborted => "aborted",
            JobPhase::Failed => "failed",
        }
    }

    /// Whether guest writes go to both images.
    pub fn mirroring(self) -> bool {
        matches!(self, JobPhase::Copying | JobPhase::Ready)
    }
}

/// Something the embedding program should know about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The bulk pass is done and the images are equal.
    Ready,
    /// The destination is now authoritative.
    Switched {
        /// How long new guest requests were held.
        pause: Duration,
        /// The longest guest request that ended while the switch ran: the
        /// stall as the guest felt it.
        longest_request: Duration,
    },
    /// The switch was acknowledged and recorded.
    Completed,
    /// The job was abandoned; the guest carries on with the source.
    Aborted {
        /// Why.
        reason: String,
    },
    /// The engine stopped; every guest request now fails.
    Failed {
        /// Why.
        reason: String,
    },
}

/// A snapshot of the job.
#[derive(Debug, Clone)]
pub struct Status {
    /// Where the job stands.
    pub phase: JobPhase,
    /// Guest-visible size in bytes.
    pub size: u64,
    /// Bytes the bulk pass copied so far.
    pub bytes_copied: u64,
    /// Bytes still to copy.
    pub dirty_bytes: u64,
    /// Bulk-copy rate since the start, bytes per second.
    pub rate: f64,
    /// Whether `switch` may be called.
    pub ready: bool,
    /// Guest requests in flight.
    pub guest_in_flight: u32,
    /// The last switch's guest-visible pause.
    pub switch_pause: Option<Duration>,
    /// Why the job was aborted or failed.
    pub reason: Option<String>,
    /// Bytes the pass had to copy when this job started: the source's data,
    /// or, for a job resumed after a crash, what may differ.
    pub to_copy: u64,
    /// Whether the job resumed from the progress its journal recorded.
    pub resumed: bool,
}

/// A guest request counted in flight; counts it out when dropped.
pub(crate) struct InFlight<'a, S: Storage, J: Storage>(&'a Shared<S, J>, u64);

impl<S: Storage, J: Storage> Drop for InFlight<'_, S, J> {
    fn drop(&mut self) {
        let shared = self.0;
        if std::thread::panicking() && shared.phase().mirroring() {
            // The request stopped half-way: its write may be on one image
            // and not the other, and nothing can tell which granules. The
            // images can no longer be trusted to be equal at a switch (E2).
            shared.fail_destination(&Error::InvalidInput(
                "a guest request panicked while mirroring".into(),
            ));
        }
        let switch_started = shared.switch_started.load(Ordering::Acquire);
        if switch_started != 0 {
            let ended = shared.now_ns();
            if ended >= switch_started {
                shared
                    .switch_longest
                    .fetch_max(ended.saturating_sub(self.1), Ordering::AcqRel);
            }
        }
        shared.leave();
    }
}

/// Marks a switch as running (for the longest guest request it saw) until
/// dropped, however the switch ends.
struct SwitchWindow<'a>(&'a AtomicU64);

impl Drop for SwitchWindow<'_> {
    fn drop(&mut self) {
        self.0.store(0, Ordering::Release);
    }
}

/// Milliseconds to the microsecond, for log lines.
fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// One event-log line per engine event (the embedder installs a
/// `tracing` subscriber to see them; copyctl does).
fn log(event: &Event) {
    match event {
        Event::Ready => tracing::info!("ready: the images are equal; the switch may come"),
        Event::Switched {
            pause,
            longest_request,
        } => tracing::info!(
            pause_ms = ms(*pause),
            longest_request_ms = ms(*longest_request),
            "switched: the destination is authoritative"
        ),
        Event::Completed => tracing::info!("completed: the source may be released"),
        Event::Aborted { reason } => {
            tracing::warn!(reason = %reason, "aborted: the source stays authoritative")
        }
        Event::Failed { reason } => {
            tracing::error!(reason = %reason, "failed: every guest request now fails")
        }
    }
}

/// A switch's hold on the door: new guest requests wait until it is let
/// go, with or without a new phase. Dropped on an early return, it lets
/// them go under the phase as it stands; dropped by a panic, it stops the
/// engine (the journal's state is then unknown) and they fail.
struct Hold<'a, S: Storage, J: Storage> {
    shared: &'a Shared<S, J>,
    released: bool,
}

impl<S: Storage, J: Storage> Hold<'_, S, J> {
    /// The new phase is set before the held requests are let go, so that
    /// none of them runs under the old one.
    fn release(mut self, phase: Option<(JobPhase, Event)>) {
        self.let_go(phase);
    }

    fn let_go(&mut self, phase: Option<(JobPhase, Event)>) {
        if std::mem::replace(&mut self.released, true) {
            return;
        }
        let mut state = self.shared.state();
        state.hold = false;
        match phase {
            Some((p, event)) => {
                state.phase = p;
                self.shared.publish(state, event);
            }
            None => {
                drop(state);
                self.shared.changed.notify_all();
            }
        }
    }
}

impl<S: Storage, J: Storage> Drop for Hold<'_, S, J> {
    fn drop(&mut self) {
        if std::thread::panicking() && !self.released {
            // The panic may have come after the Switched record became
            // durable (between its two copies, say): going on as Ready
            // would mirror under a journal that names the destination, and
            // acknowledge flushes the destination may not keep. Fail-stop:
            // the held requests get errors, never a wait.
            self.shared
                .fail_engine("the switch panicked while the guest was held".into());
            self.released = true;
            return;
        }
        self.let_go(None);
    }
}

#[derive(Debug)]
struct State {
    phase: JobPhase,
    /// A switch holds new guest requests at the door.
    hold: bool,
    guest_in_flight: u32,
    switch_pause: Option<Duration>,
    reason: Option<String>,
}

/// Everything the job's threads share.
pub(crate) struct Shared<S: Storage, J: Storage> {
    pub source: Image<S>,
    pub destination: Image<S>,
    pub size: u64,
    pub config: Config,
    journal: Mutex<Journal<J>>,
    state: Mutex<State>,
    changed: Condvar,
    pub dirty: DirtyBitmap,
    pub ranges: RangeLocks,
    /// Next granule a copy worker may claim.
    pub cursor: Mutex<u64>,
    pub copied: AtomicU64,
    /// False once the plan found the source to be one extent: the copy
    /// then skips asking SEEK_DATA per run (each ask takes the source's
    /// inode lock, which guest writes contend for).
    pub source_has_holes: AtomicBool,
    started: Instant,
    /// When the last guest request entered, in nanoseconds since `started`.
    last_guest_request: AtomicU64,
    subscribers: Mutex<Vec<Sender<Event>>>,
    pub stop: AtomicBool,
    /// Set by `switch` once the images are nearly in sync: mirrored guest
    /// writes are then made durable one by one, so that by the time the
    /// guest is held nothing is left to sync.
    pub write_through: AtomicBool,
    /// Ranges the pass wrote, for the write-back thread.
    pub write_back: write_back::WriteBack,
    /// Durable progress and write intent (resume after a crash).
    pub intent: intent::Intent,
    /// When the running switch started (`now_ns`), 0 when none runs; and
    /// the longest guest request that ended since.
    switch_started: AtomicU64,
    switch_longest: AtomicU64,
    /// Bytes the pass had to copy when the job started.
    pub to_copy: u64,
    /// Whether the job resumed from a recorded progress.
    pub resumed: bool,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs `helper` on a scoped thread while `here` runs on this one, and
/// returns both results. When no thread can be spawned (pids.max,
/// RLIMIT_NPROC), runs both here, one after the other: slower, never a
/// panic in the middle of a guest request or a switch.
pub(crate) fn on_both<H, RH, T, RT>(helper: H, here: T) -> (RH, RT)
where
    H: FnOnce() -> RH + Send,
    RH: Send,
    T: FnOnce() -> RT,
{
    on_both_with(std::thread::Builder::new(), helper, here)
}

fn on_both_with<H, RH, T, RT>(builder: std::thread::Builder, helper: H, here: T) -> (RH, RT)
where
    H: FnOnce() -> RH + Send,
    RH: Send,
    T: FnOnce() -> RT,
{
    // The closure handed to the thread only borrows `helper`, so a failed
    // spawn leaves it here to run.
    let slot = Mutex::new(Some(helper));
    let take = || lock(&slot).take().map(|f| f());
    std::thread::scope(|scope| match builder.spawn_scoped(scope, take) {
        Ok(handle) => {
            let theirs = here();
            let helped = handle
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            (helped.expect("the helper ran"), theirs)
        }
        Err(_) => {
            let helped = take().expect("the helper did not run");
            (helped, here())
        }
    })
}

impl<S: Storage, J: Storage> Shared<S, J> {
    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    pub fn phase(&self) -> JobPhase {
        self.state().phase
    }

    fn emit(&self, event: Event) {
        log(&event);
        lock(&self.subscribers).retain(|s| s.send(event.clone()).is_ok());
    }

    /// Nanoseconds since the job started (never 0 once it runs).
    fn now_ns(&self) -> u64 {
        (self.started.elapsed().as_nanos() as u64).max(1)
    }

    /// Sends a phase's event before the state lock that made the phase
    /// visible is let go: whoever sees the new phase (a waiter, `status`,
    /// a refused command) finds its event already queued, and no event
    /// arrives ahead of its phase. Lock order: state, then subscribers.
    fn publish(&self, state: MutexGuard<'_, State>, event: Event) {
        self.emit(event);
        drop(state);
        self.changed.notify_all();
    }

    /// Waits at the door while a switch holds guest I/O, then counts the
    /// request in. Returns the phase the request runs under, and a guard
    /// that counts it out however the request ends, a panic included: a
    /// request counted forever would freeze the guest at the next switch.
    pub fn enter(&self) -> Result<(JobPhase, InFlight<'_, S, J>)> {
        let mut state = self.state();
        while state.hold {
            state = self.changed.wait(state).unwrap_or_else(|p| p.into_inner());
        }
        if state.phase == JobPhase::Failed {
            return Err(Error::Poisoned { what: "engine" });
        }
        state.guest_in_flight += 1;
        let now = self.started.elapsed().as_nanos() as u64;
        self.last_guest_request.store(now, Ordering::Release);
        Ok((state.phase, InFlight(self, now)))
    }

    fn leave(&self) {
        let mut state = self.state();
        state.guest_in_flight -= 1;
        if state.guest_in_flight == 0 {
            self.changed.notify_all();
        }
    }

    /// Whether a guest request entered within the busy window. Before the
    /// first request the guest counts as idle.
    pub fn guest_busy(&self) -> bool {
        let last = self.last_guest_request.load(Ordering::Acquire);
        let now = self.started.elapsed().as_nanos() as u64;
        last != 0 && now.saturating_sub(last) < self.config.busy_window.as_nanos() as u64
    }

    /// The largest request the copy may issue now.
    pub fn chunk_size(&self) -> u64 {
        let g = self.config.granularity;
        if self.guest_busy() {
            self.config
                .busy_chunk_size
                .div_ceil(g)
                .saturating_mul(g)
                .min(self.config.chunk_size)
        } else {
            self.config.chunk_size
        }
    }

    pub fn guest_in_flight(&self) -> u32 {
        self.state().guest_in_flight
    }

    /// Waits up to `grace` for in-flight guest requests to drain.
    pub fn yield_to_guest(&self, grace: Duration) {
        let deadline = Instant::now() + grace;
        let mut state = self.state();
        while state.guest_in_flight > 0 && !state.hold {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            state = self
                .changed
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// The destination failed while mirroring: record Aborted and carry on
    /// with the source (E5). Harmless if the job already left mirroring.
    pub fn fail_destination(&self, error: &Error) {
        let reason = format!("destination failed: {}", error.describe());
        let mut journal = lock(&self.journal);
        if !self.phase().mirroring() {
            return;
        }
        match journal.commit(Phase::Aborted, self.copied.load(Ordering::Acquire)) {
            Ok(_) => {
                // The source is the guest's only copy from here on.
                self.source.storage.only_copy();
                let mut state = self.state();
                state.phase = JobPhase::Aborted;
                state.reason = Some(reason.clone());
                self.publish(state, Event::Aborted { reason });
            }
            Err(e) => {
                drop(journal);
                self.fail_engine(format!(
                    "{reason}; recording the abort failed: {}",
                    e.describe()
                ));
            }
        }
    }

    /// Fail-stop: no request succeeds from now on.
    pub fn fail_engine(&self, reason: String) {
        let mut state = self.state();
        if state.phase == JobPhase::Failed {
            return;
        }
        state.phase = JobPhase::Failed;
        state.reason = Some(reason.clone());
        state.hold = false;
        self.publish(state, Event::Failed { reason });
    }

    /// fdatasyncs both images at once: the switch waits for the slower of
    /// the two, not their sum. Returns (destination, source).
    fn sync_images_concurrently(&self) -> (Result<()>, Result<()>) {
        // A thread only when both have something to sync.
        if !self.destination.needs_sync() || !self.source.needs_sync() {
            return (self.destination.sync(), self.source.sync());
        }
        on_both(|| self.destination.sync(), || self.source.sync())
    }

    /// Called by copy workers once nothing is dirty.
    pub fn reach_ready(&self) -> Result<()> {
        let mut journal = lock(&self.journal);
        if self.phase() != JobPhase::Copying || self.dirty.count() != 0 {
            return Ok(());
        }
        if let Err(e) = journal.commit(Phase::Ready, self.copied.load(Ordering::Acquire)) {
            drop(journal);
            self.fail_engine(format!("journal: {}", e.describe()));
            return Err(e);
        }
        let mut state = self.state();
        state.phase = JobPhase::Ready;
        self.publish(state, Event::Ready);
        Ok(())
    }
}

/// A running copy job. Dropping it stops the copy workers.
pub struct Job<S: Storage + 'static, J: Storage + 'static> {
    shared: Arc<Shared<S, J>>,
    workers: Vec<JoinHandle<()>>,
}

/// What `switch` reports.
#[derive(Debug, Clone, Copy)]
pub struct SwitchReport {
    /// How long new guest requests were held.
    pub pause: Duration,
    /// The Switched record's sequence number.
    pub seq: u64,
}

impl<S: Storage + 'static, J: Storage + 'static> Job<S, J> {
    /// Sets up a job over `journal` (whose newest record must be Copying:
    /// the source is authoritative and nothing has touched the destination
    /// yet). Marks every granule of the source that may hold data dirty and
    /// punches the destination where the source is a hole. Does not start
    /// copy workers; see [`Job::start_workers`] and [`Job::copy_step`].
    pub fn new(mut journal: Journal<J>, source: S, destination: S, config: Config) -> Result<Self> {
        config.validate()?;
        if journal.record().phase != Phase::Copying || journal.is_poisoned() {
            return Err(Error::InvalidInput(
                "a job starts from a journal in the Copying phase".into(),
            ));
        }
        let size = source.len().map_err(|e| Error::io("source size", e))?;
        let destination_size = destination
            .len()
            .map_err(|e| Error::io("destination size", e))?;
        if destination_size < size {
            return Err(Error::InvalidInput(format!(
                "the destination ({destination_size} bytes) is smaller than the source ({size} bytes)"
            )));
        }
        let granules = size.div_ceil(config.granularity);
        // A resumed job copies what its journal's progress says may differ;
        // a new one (or one whose progress is for another size) everything.
        let recorded = journal.record().progress().filter(|p| p.size == size);
        let resumed = recorded.is_some();
        let progress =
            recorded.unwrap_or_else(|| journal::Progress::start(config.extent_size, size));
        let plan = progress.to_copy();
        // Every extent the plan touches below the cursor, granule-rounded:
        // a granule may span extents the record does not list (a resume
        // with a larger granularity), and a write into one while its
        // granule is still dirty reaches the source only.
        let carried: std::collections::BTreeSet<u64> = plan
            .iter()
            .filter(|r| r.start < progress.cursor)
            .flat_map(|r| {
                let g = config.granularity;
                let start = r.start / g * g;
                let end = r.end.min(progress.cursor).div_ceil(g) * g;
                start / progress.extent_size..end.div_ceil(progress.extent_size)
            })
            .collect();
        let enabled =
            config.checkpoints && journal.version() >= crate::journal::format::FORMAT_VERSION;
        // The newest record must say what this job keeps true: a job that
        // tracks nothing (or found progress for another size) must not
        // leave an earlier run's progress standing, or a crash now would
        // resume from a list this job never kept up.
        let keeps = (enabled && resumed).then(|| progress.clone());
        if journal.record().progress() != keeps {
            journal.commit_progress(Phase::Copying, 0, keeps.as_ref())?;
        }
        let mut shared = Shared {
            source: Image::new(source, Role::Source),
            destination: Image::new(destination, Role::Destination),
            size,
            dirty: DirtyBitmap::new(granules),
            config,
            journal: Mutex::new(journal),
            state: Mutex::new(State {
                phase: JobPhase::Copying,
                hold: false,
                guest_in_flight: 0,
                switch_pause: None,
                reason: None,
            }),
            changed: Condvar::new(),
            ranges: RangeLocks::default(),
            cursor: Mutex::new(0),
            copied: AtomicU64::new(0),
            started: Instant::now(),
            last_guest_request: AtomicU64::new(0),
            subscribers: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
            write_through: AtomicBool::new(false),
            source_has_holes: AtomicBool::new(true),
            write_back: write_back::WriteBack::default(),
            intent: intent::Intent::new(enabled, progress, carried),
            switch_started: AtomicU64::new(0),
            switch_longest: AtomicU64::new(0),
            to_copy: 0,
            resumed,
        };
        copier::plan(&shared, &plan)?;
        shared.to_copy = (shared.dirty.count() * shared.config.granularity).min(size);
        Ok(Job {
            shared: Arc::new(shared),
            workers: Vec::new(),
        })
    }

    /// Starts the copy worker threads; they run the bulk pass, honour the
    /// bandwidth limit, and make way for guest requests. When the system
    /// refuses a thread, the job fails (the threads already started end)
    /// and the error says so: the copy cannot go on without them.
    pub fn start_workers(&mut self) -> Result<()> {
        // Before the workers, which queue every range they copy.
        self.shared.write_back.enable();
        #[derive(Clone, Copy)]
        enum Thread {
            Copy(usize),
            WriteBack,
            Checkpoint,
        }
        let threads = (0..self.shared.config.copy_workers)
            .map(Thread::Copy)
            .chain([Thread::WriteBack, Thread::Checkpoint]);
        for thread in threads {
            let name = match thread {
                Thread::Copy(n) => format!("livecopy-copy-{n}"),
                Thread::WriteBack => "livecopy-write-back".into(),
                Thread::Checkpoint => "livecopy-checkpoint".into(),
            };
            let shared = Arc::clone(&self.shared);
            let spawned =
                std::thread::Builder::new()
                    .name(name.clone())
                    .spawn(move || match thread {
                        Thread::Copy(n) => copier::run(&shared, n),
                        Thread::WriteBack => write_back::run(&shared),
                        Thread::Checkpoint => intent::run(&shared),
                    });
            match spawned {
                Ok(handle) => self.workers.push(handle),
                Err(e) => {
                    let error = Error::io("spawn a worker thread", e);
                    self.shared
                        .fail_engine(format!("could not start {name}: {}", error.describe()));
                    return Err(error);
                }
            }
        }
        Ok(())
    }

    /// Makes the copy's progress durable now: syncs both images and
    /// records how far the pass got and which extents may differ, so that
    /// a job resumed after a crash copies only those. The checkpoint
    /// thread does this on a schedule; embedders driving `copy_step` call
    /// it themselves. Returns whether a record was written.
    pub fn checkpoint(&self) -> Result<bool> {
        intent::checkpoint(&self.shared)
    }

    /// The progress the journal's newest record carries.
    pub fn durable_progress(&self) -> journal::Progress {
        self.shared.intent.durable()
    }

    /// One bulk-copy step, for embedders that drive the copy themselves and
    /// for deterministic tests: copies the next run of dirty granules.
    pub fn copy_step(&self) -> Result<StepOutcome> {
        copier::step(&self.shared)
    }

    /// A handle for guest I/O; clone it freely across threads.
    pub fn guest(&self) -> Guest<S, J> {
        Guest::new(Arc::clone(&self.shared))
    }

    /// Events from now on.
    pub fn subscribe(&self) -> Receiver<Event> {
        let (sender, receiver) = channel();
        lock(&self.shared.subscribers).push(sender);
        receiver
    }

    /// A snapshot of the job.
    pub fn status(&self) -> Status {
        let shared = &self.shared;
        let state = shared.state();
        let copied = shared.copied.load(Ordering::Acquire);
        let elapsed = shared.started.elapsed().as_secs_f64();
        Status {
            phase: state.phase,
            size: shared.size,
            bytes_copied: copied,
            dirty_bytes: (shared.dirty.count() * shared.config.granularity).min(shared.size),
            rate: if elapsed > 0.0 {
                copied as f64 / elapsed
            } else {
                0.0
            },
            ready: state.phase == JobPhase::Ready,
            guest_in_flight: state.guest_in_flight,
            switch_pause: state.switch_pause,
            reason: state.reason.clone(),
            to_copy: shared.to_copy,
            resumed: shared.resumed,
        }
    }

    /// Waits until the job leaves Copying or `timeout` passes; returns the phase.
    pub fn wait_ready(&self, timeout: Duration) -> JobPhase {
        let deadline = Instant::now() + timeout;
        let mut state = self.shared.state();
        while state.phase == JobPhase::Copying {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            state = self
                .shared
                .changed
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        state.phase
    }

    /// Hands the guest over to the destination (E2, E3).
    ///
    /// The guest-visible pause must not grow with the page cache, so the
    /// work is done while the guest runs: write back what the pass left
    /// dirty (paced, see `write_back`), sync both images in rounds until
    /// a round finds almost nothing to write; then mirror in write-through
    /// mode (each guest write durable on both images) and sync once more;
    /// then wait for a moment with no guest request in flight and hold new
    /// ones. Inside the hold the syncs find nothing to do, so the pause is
    /// the Switched commit. Then retire the source and release the guest.
    pub fn switch(&self) -> Result<SwitchReport> {
        let shared = &self.shared;
        if shared.phase() != JobPhase::Ready {
            return Err(Error::InvalidInput(format!(
                "switch needs a ready job; it is {}",
                shared.phase().name()
            )));
        }
        tracing::info!("switch started");
        shared.switch_longest.store(0, Ordering::Release);
        shared
            .switch_started
            .store(shared.now_ns(), Ordering::Release);
        let _window = SwitchWindow(&shared.switch_started);
        // A failure fails the job as a failed sync of that image would.
        write_back::drain(shared)?;
        for _ in 0..SETTLE_ROUNDS {
            let round = Instant::now();
            self.sync_both()?;
            if round.elapsed() < SETTLED {
                break;
            }
        }
        // From here to the end of the switch, no guest write waits for a
        // listing commit and no checkpoint commit delays the Switched one.
        let _no_checkpoints = intent::quiesce(shared)?;
        let _write_through = WriteThrough::start(&shared.write_through);
        self.sync_both()?;
        let mut state = shared.state();
        let idle_by = Instant::now() + IDLE_WAIT;
        while state.guest_in_flight > 0 && !state.hold && state.phase == JobPhase::Ready {
            let now = Instant::now();
            if now >= idle_by {
                break;
            }
            state = shared
                .changed
                .wait_timeout(state, idle_by - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        if state.phase != JobPhase::Ready || state.hold {
            return Err(Error::InvalidInput(format!(
                "the job is {}",
                state.phase.name()
            )));
        }
        state.hold = true;
        drop(state);
        let hold = Hold {
            shared,
            released: false,
        };
        let held = Instant::now();
        // In-flight requests may need the journal (a destination failure
        // records Aborted), so the journal is taken only once they drained.
        let mut state = shared.state();
        while state.guest_in_flight > 0 {
            state = shared
                .changed
                .wait(state)
                .unwrap_or_else(|p| p.into_inner());
        }
        drop(state);
        let mut journal = lock(&shared.journal);
        if shared.phase() != JobPhase::Ready {
            hold.release(None);
            return Err(Error::InvalidInput(format!(
                "the job became {}",
                shared.phase().name()
            )));
        }
        // E2: nothing dirty, nothing in flight, new requests held.
        assert_eq!(shared.dirty.count(), 0, "switching with dirty granules");
        assert_eq!(
            shared.guest_in_flight(),
            0,
            "switching with guest requests in flight"
        );
        // Usually free: write-through left nothing unsynced. Still needed
        // for writes that finished between the last sync and the hold.
        let (destination_synced, source_synced) = shared.sync_images_concurrently();
        // On failure the new phase is set before held requests are let go
        // (`Hold::release`), so none of them runs under the old one.
        if let Err(e) = destination_synced {
            drop(journal);
            shared.fail_destination(&e);
            hold.release(None);
            return Err(e);
        }
        if let Err(e) = source_synced {
            drop(journal);
            shared.fail_engine(format!("source: {}", e.describe()));
            hold.release(None);
            return Err(e);
        }
        let seq = match journal.commit(Phase::Switched, shared.copied.load(Ordering::Acquire)) {
            Ok(seq) => seq,
            Err(e) => {
                drop(journal);
                shared.fail_engine(format!("journal: {}", e.describe()));
                hold.release(None);
                return Err(e);
            }
        };
        // E3, E4: the record is durable; only now may the destination be
        // written alone, and the source never again. The destination is
        // now the guest's only copy: a storage that can lose its medium
        // (an NBD export) may wait for it rather than fail the guest.
        shared.source.retire();
        shared.destination.storage.only_copy();
        let pause = held.elapsed();
        {
            let mut state = shared.state();
            state.switch_pause = Some(pause);
        }
        let longest_request = Duration::from_nanos(shared.switch_longest.load(Ordering::Acquire));
        hold.release(Some((
            JobPhase::Switched,
            Event::Switched {
                pause,
                longest_request,
            },
        )));
        drop(journal);
        Ok(SwitchReport { pause, seq })
    }

    fn sync_both(&self) -> Result<()> {
        let shared = &self.shared;
        let (destination_synced, source_synced) = shared.sync_images_concurrently();
        if let Err(e) = destination_synced {
            shared.fail_destination(&e);
            return Err(e);
        }
        if let Err(e) = source_synced {
            shared.fail_engine(format!("source: {}", e.describe()));
            return Err(e);
        }
        Ok(())
    }

    /// Records that the management side acknowledged the switch: syncs the
    /// destination and commits Completed. The source may then be released.
    pub fn complete(&self) -> Result<u64> {
        let shared = &self.shared;
        let mut journal = lock(&shared.journal);
        if shared.phase() == JobPhase::Completed {
            // Idempotent, for a manager that retries: nothing left to do.
            return Ok(journal.seq());
        }
        if shared.phase() != JobPhase::Switched {
            return Err(Error::InvalidInput(format!(
                "complete needs a switched job; it is {}",
                shared.phase().name()
            )));
        }
        if let Err(e) = shared.destination.sync() {
            drop(journal);
            shared.fail_engine(format!("destination: {}", e.describe()));
            return Err(e);
        }
        match journal.commit(Phase::Completed, shared.copied.load(Ordering::Acquire)) {
            Ok(seq) => {
                let mut state = shared.state();
                state.phase = JobPhase::Completed;
                shared.publish(state, Event::Completed);
                drop(journal);
                Ok(seq)
            }
            Err(e) => {
                drop(journal);
                shared.fail_engine(format!("journal: {}", e.describe()));
                Err(e)
            }
        }
    }

    /// Abandons the copy before the switch: commits Aborted; the source
    /// stays authoritative and the guest carries on with it.
    pub fn abort(&self) -> Result<u64> {
        let shared = &self.shared;
        let mut journal = lock(&shared.journal);
        if !shared.phase().mirroring() {
            return Err(Error::InvalidInput(format!(
                "abort needs a job before its switch; it is {}",
                shared.phase().name()
            )));
        }
        match journal.commit(Phase::Aborted, shared.copied.load(Ordering::Acquire)) {
            Ok(seq) => {
                // The source is the guest's only copy from here on.
                shared.source.storage.only_copy();
                let mut state = shared.state();
                state.phase = JobPhase::Aborted;
                state.reason = Some("aborted on request".into());
                shared.publish(
                    state,
                    Event::Aborted {
                        reason: "aborted on request".into(),
                    },
                );
                drop(journal);
                Ok(seq)
            }
            Err(e) => {
                drop(journal);
                shared.fail_engine(format!("journal: {}", e.describe()));
                Err(e)
            }
        }
    }

    /// The source storage (for inspection in tests and tools).
    pub fn source(&self) -> &S {
        &self.shared.source.storage
    }

    /// The destination storage.
    pub fn destination(&self) -> &S {
        &self.shared.destination.storage
    }

    /// Bytes the dirty bitmap takes.
    pub fn bitmap_bytes(&self) -> usize {
        self.shared.dirty.memory_bytes()
    }
}

impl<S: Storage + 'static, J: Storage + 'static> Drop for Job<S, J> {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        self.shared.changed.notify_all();
        self.shared.intent.wake.notify_all();
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn on_both_runs_both_on_this_thread_when_no_thread_can_be_spawned() {
        let here = std::thread::current().id();
        // A stack size no system can give makes the spawn fail.
        let builder = std::thread::Builder::new().stack_size(usize::MAX);
        let (helped, ran) = on_both_with(
            builder,
            || (std::thread::current().id(), 1),
            || (std::thread::current().id(), 2),
        );
        assert_eq!((helped, ran), ((here, 1), (here, 2)));
        let (helped, ran) = on_both(|| std::thread::current().id(), || 3);
        assert_ne!(helped, here, "a helper thread when one can be had");
        assert_eq!(ran, 3);
    }
}
