//! The copy engine's behaviour, one property per test: the overlap race
//! between a copy step and a guest write, a threaded run on real files, the
//! error paths (each fault injected on a simulated disk), the refusals, the
//! bandwidth limit and the switch report.
//!
//! The jobs over simulated disks are built as in `engine_crash::drive`:
//! `Journal::format` on a `SimDisk`, then `Job::new`, and driven with
//! `copy_step` so that every test is deterministic.

use std::io::ErrorKind as IoKind;
use std::ops::Range;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use livecopy::ErrorKind;
use livecopy::engine::{Config, Event, Job, JobPhase, StepOutcome, files};
use livecopy::journal::format::JOURNAL_LEN;
use livecopy::journal::{self, Journal, Phase, Recovered, Side};
use livecopy::storage::{SimDisk, Storage, WriteFate};

use crate::support::{UUID, first_record};

/// Granule of the simulated jobs.
const G: u64 = 4096;
/// Size of the simulated disks: 16 granules.
const SIZE: u64 = 16 * G;

/// splitmix64: a small deterministic generator for data and workloads.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `range` (not empty).
    fn below(&mut self, range: Range<u64>) -> u64 {
        range.start + self.next() % (range.end - range.start)
    }

    fn fill(&mut self, bytes: &mut [u8]) {
        for chunk in bytes.chunks_mut(8) {
            let word = self.next().to_le_bytes();
            chunk.copy_from_slice(&word[..chunk.len()]);
        }
    }
}

/// `len` pseudo-random bytes derived from `seed`.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; len];
    Rng(seed).fill(&mut bytes);
    bytes
}

/// Panics with the first differing offset rather than two huge buffers.
fn assert_same(actual: &[u8], expected: &[u8], what: &str) {
    assert_eq!(actual.len(), expected.len(), "{what}: lengths differ");
    if let Some(at) = actual.iter().zip(expected).position(|(a, e)| a != e) {
        let differing = actual[at..]
            .iter()
            .zip(&expected[at..])
            .filter(|(a, e)| a != e)
            .count();
        panic!(
            "{what}: first difference at byte {at} (got {:#04x}, expected {:#04x}); \
             {differing} bytes differ from there on",
            actual[at], expected[at]
        );
    }
}

fn sim_config() -> Config {
    Config {
        granularity: G,
        chunk_size: 2 * G,
        copy_workers: 1,
        ..Config::default()
    }
}

/// A job over three simulated disks, with an event subscription taken
/// before anything happened, and the guest-visible contents as a model.
struct SimJob {
    source: SimDisk,
    destination: SimDisk,
    journal: SimDisk,
    job: Job<SimDisk, SimDisk>,
    events: Receiver<Event>,
    model: Vec<u8>,
}

fn sim_job() -> SimJob {
    let initial = pattern(1, SIZE as usize);
    let source = SimDisk::from_bytes(initial.clone());
    let destination = SimDisk::new(SIZE);
    let journal_disk = SimDisk::new(JOURNAL_LEN);
    let journal = Journal::format(journal_disk.clone(), UUID, first_record()).expect("format");
    let job =
        Job::new(journal, source.clone(), destination.clone(), sim_config()).expect("Job::new");
    let events = job.subscribe();
    SimJob {
        source,
        destination,
        journal: journal_disk,
        job,
        events,
        model: initial,
    }
}

impl SimJob {
    /// A guest write that must succeed; updates the model.
    fn write(&mut self, offset: u64, data: &[u8], fua: bool) {
        self.job
            .guest()
            .write(offset, data, fua)
            .unwrap_or_else(|e| panic!("guest write at {offset}: {}", e.describe()));
        self.model[offset as usize..offset as usize + data.len()].copy_from_slice(data);
    }

    /// Reads the whole disk through the guest and compares it with the model.
    fn check_guest_view(&self, what: &str) {
        let mut buf = vec![0u8; SIZE as usize];
        self.job
            .guest()
            .read(0, &mut buf)
            .unwrap_or_else(|e| panic!("{what}: guest read: {}", e.describe()));
        assert_same(&buf, &self.model, what);
    }

    /// Copy steps until the pass reports Done.
    fn copy_all(&self) {
        for _ in 0..=SIZE / G {
            match self.job.copy_step().expect("copy step") {
                StepOutcome::Copied(_) => {}
                StepOutcome::Done => return,
            }
        }
        panic!("the copy pass did not end");
    }

    fn to_ready(&self) {
        self.copy_all();
        assert_eq!(self.job.status().phase, JobPhase::Ready);
    }

    fn events(&self) -> Vec<Event> {
        self.events.try_iter().collect()
    }

    /// The journal's verdict as recovery would give it now.
    fn recovered(&self) -> Recovered {
        journal::analyse(&self.journal)
            .expect("journal readable")
            .outcome
            .expect("recovery names an image")
    }

    /// Counters of every storage call on the three disks.
    fn ops(&self) -> [u64; 3] {
        [
            self.source.ops(),
            self.destination.ops(),
            self.journal.ops(),
        ]
    }
}

/// Where a job stands when a fault hits.
#[derive(Debug, Clone, Copy)]
enum Stage {
    /// After one copy step: the first chunk is clean, the rest dirty.
    Copying,
    /// After the whole pass.
    Ready,
}

fn sim_job_at(stage: Stage) -> SimJob {
    let mut s = sim_job();
    match stage {
        Stage::Copying => {
            assert_eq!(
                s.job.copy_step().expect("first step"),
                StepOutcome::Copied(2 * G)
            );
            assert_eq!(s.job.status().phase, JobPhase::Copying);
        }
        Stage::Ready => s.to_ready(),
    }
    // A mirrored write to the clean first chunk reaches both images.
    s.write(100, &pattern(2, 3000), false);
    assert_eq!(
        &s.destination.live_bytes()[100..3100],
        &s.model[100..3100],
        "a write to a clean granule is mirrored"
    );
    s.events();
    s
}

/// After the destination failed while mirroring: the job is Aborted in
/// memory, in the journal and in the events; the guest carries on with the
/// source only, and the destination sees no call at all.
fn check_aborted_and_source_only(s: &mut SimJob, why: &str) {
    let status = s.job.status();
    assert_eq!(status.phase, JobPhase::Aborted, "{why}: phase");
    let recovered = s.recovered();
    assert_eq!(recovered.record.phase, Phase::Aborted, "{why}: journal");
    assert_eq!(recovered.record.authoritative, Side::Source, "{why}: side");
    let events = s.events();
    assert!(
        matches!(events.as_slice(), [Event::Aborted { reason }] if reason.contains("destination")),
        "{why}: events {events:?}"
    );
    assert!(status.reason.is_some(), "{why}: status gives a reason");

    let destination_ops = s.destination.ops();
    let destination_writes = s.destination.writes_seen();
    let source_syncs = s.source.syncs_seen();
    s.write(0, &pattern(10, 5000), false);
    s.write(SIZE - 9000, &pattern(11, 9000), true);
    s.write(7 * G + 1, &pattern(12, 3 * G as usize), false);
    let guest = s.job.guest();
    guest.write_zeroes(4 * G, G, false).expect("write_zeroes");
    guest.discard(9 * G, 2 * G).expect("discard");
    s.model[4 * G as usize..5 * G as usize].fill(0);
    s.model[9 * G as usize..11 * G as usize].fill(0);
    guest.flush().expect("flush after the abort");
    s.check_guest_view(why);
    assert_same(&s.source.live_bytes(), &s.model, why);
    // Flushed, so durable on the source.
    assert_same(&s.source.durable_bytes(), &s.model, why);
    // The FUA write synced itself; the flush synced the rest.
    assert!(s.source.syncs_seen() > source_syncs, "{why}: source synced");
    assert_eq!(
        s.destination.writes_seen(),
        destination_writes,
        "{why}: the destination was written after the abort"
    );
    assert_eq!(
        s.destination.ops(),
        destination_ops,
        "{why}: the destination was touched after the abort"
    );
    // The job stays aborted; the copy does not resume.
    assert_eq!(s.job.copy_step().expect("step"), StepOutcome::Done);
    assert_eq!(s.job.status().phase, JobPhase::Aborted);
    let refused = s.job.switch().expect_err("switch after an abort");
    assert_eq!(refused.kind(), ErrorKind::InvalidInput);
}

// ---------------------------------------------------------------------------
// The overlap race.

/// A storage whose `read_at` stops, once armed, after reading (so the
/// reader holds the old bytes) and before returning, until released. The
/// underlying disk's lock is not held while stopped: a concurrent write can
/// only be held up by the engine itself.
struct Gate {
    disk: SimDisk,
    ctl: Arc<GateCtl>,
}

#[derive(Default)]
struct GateCtl {
    armed: AtomicBool,
    state: Mutex<GateState>,
    changed: Condvar,
}

#[derive(Default)]
struct GateState {
    paused: bool,
    released: bool,
}

impl GateCtl {
    fn lock(&self) -> MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a reader stopped at the gate within `timeout`.
    fn wait_paused(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut state = self.lock();
        while !state.paused {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            state = self
                .changed
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        true
    }

    fn release(&self) {
        self.lock().released = true;
        self.changed.notify_all();
    }
}

impl Storage for Gate {
    fn len(&self) -> std::io::Result<u64> {
        self.disk.len()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.disk.read_at(offset, buf)?;
        if self.ctl.armed.swap(false, Ordering::AcqRel) {
            let mut state = self.ctl.lock();
            state.paused = true;
            self.ctl.changed.notify_all();
            // Bounded, so that a broken engine fails the test instead of
            // hanging it.
            let deadline = Instant::now() + Duration::from_secs(30);
            while !state.released && Instant::now() < deadline {
                state = self
                    .ctl
                    .changed
                    .wait_timeout(state, Duration::from_millis(50))
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
        }
        Ok(())
    }
    fn write_at(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.disk.write_at(offset, data)
    }
    fn sync_data(&self) -> std::io::Result<()> {
        self.disk.sync_data()
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.disk.set_len(len)
    }
    fn punch_hole(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.disk.punch_hole(offset, len)
    }
}

/// Polls `condition` every millisecond for up to `timeout`.
fn wait_for(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while !condition() {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    true
}

/// The copier is paused between reading its chunk (old bytes) and writing
/// it to the destination; a guest write to `write` (overlapping the chunk)
/// must wait for it, and the destination must end up with the new bytes.
fn overlap_race(write: Range<u64>) {
    const CHUNK: u64 = 4 * G;
    let initial = pattern(20, SIZE as usize);
    let source = SimDisk::from_bytes(initial.clone());
    let destination = SimDisk::new(SIZE);
    let journal_disk = SimDisk::new(JOURNAL_LEN);
    let journal = Journal::format(journal_disk, UUID, first_record()).expect("format");
    let ctl = Arc::new(GateCtl::default());
    let config = Config {
        granularity: G,
        chunk_size: CHUNK,
        copy_workers: 1,
        ..Config::default()
    };
    let job = Job::new(
        journal,
        Gate {
            disk: source.clone(),
            ctl: Arc::clone(&ctl),
        },
        Gate {
            disk: destination.clone(),
            ctl: Arc::default(),
        },
        config,
    )
    .expect("Job::new");
    let guest = job.guest();
    let new = pattern(21, (write.end - write.start) as usize);
    let mut model = initial;
    model[write.start as usize..write.end as usize].copy_from_slice(&new);

    let done = AtomicBool::new(false);
    ctl.armed.store(true, Ordering::Release);
    std::thread::scope(|scope| {
        let copier = scope.spawn(|| job.copy_step());
        assert!(
            ctl.wait_paused(Duration::from_secs(10)),
            "the copy step never read the source"
        );
        let writer = scope.spawn(|| {
            let result = guest.write(write.start, &new, false);
            done.store(true, Ordering::Release);
            result
        });
        // The guest request is in (counted in flight), or already over.
        assert!(
            wait_for(Duration::from_secs(10), || job.status().guest_in_flight
                == 1
                || done.load(Ordering::Acquire)),
            "the guest write never started"
        );
        std::thread::sleep(Duration::from_millis(100));
        let overtook = done.load(Ordering::Acquire);
        // Release before asserting, so that a failure does not leave the
        // copier stopped at the gate.
        ctl.release();
        let step = copier.join().expect("copier thread");
        let written = writer.join().expect("guest thread");
        assert!(
            !overtook,
            "the guest write {write:?} completed while the copier held the chunk it overlaps \
             (read, not yet written): overlapping ranges are not serialised"
        );
        assert_eq!(step.expect("copy step"), StepOutcome::Copied(CHUNK));
        written.expect("the guest write");
    });
    assert!(done.load(Ordering::Acquire));

    // The chunk the copier copied holds the newer bytes on both images.
    let chunk = 0..CHUNK as usize;
    assert_same(
        &source.live_bytes()[chunk.clone()],
        &model[chunk.clone()],
        "source chunk",
    );
    assert_same(
        &destination.live_bytes()[chunk.clone()],
        &model[chunk],
        "destination chunk after the race: the copier wrote stale bytes over newer ones",
    );

    for _ in 0..SIZE / G {
        if job.copy_step().expect("copy step") == StepOutcome::Done {
            break;
        }
    }
    assert_eq!(job.status().phase, JobPhase::Ready);
    assert_same(&destination.live_bytes(), &model, "destination at Ready");
    job.switch().expect("switch");
    let mut buf = vec![0u8; SIZE as usize];
    guest.read(0, &mut buf).expect("read after the switch");
    assert_same(&buf, &model, "guest view after the switch");
    assert_same(
        &destination.durable_bytes(),
        &model,
        "destination durable after the switch",
    );
}

#[test]
fn overlap_race_guest_write_inside_the_chunk_being_copied_waits_and_wins() {
    overlap_race(G + 100..2 * G + 1000);
}

#[test]
fn overlap_race_guest_write_straddling_the_chunk_being_copied_waits_and_wins() {
    // Granule 3 is in the chunk, granules 4 and 5 are dirty and not claimed.
    overlap_race(3 * G + 17..5 * G + 17);
}

#[test]
fn a_write_straddling_copied_and_uncopied_granules_is_mirrored_where_copied() {
    // After one step granules 0 and 1 are copied, 2.. are not.
    let mut s = sim_job_at(Stage::Copying);
    let write = G + 100..3 * G;
    s.write(
        write.start,
        &pattern(35, (write.end - write.start) as usize),
        false,
    );
    let copied = write.start as usize..2 * G as usize;
    assert_same(
        &s.destination.live_bytes()[copied.clone()],
        &s.model[copied],
        "the copied part of a straddling write on the destination",
    );
    s.to_ready();
    assert_same(
        &s.destination.live_bytes(),
        &s.model,
        "destination at Ready",
    );
}

#[test]
fn a_sparse_source_over_a_non_zero_destination_copies_holes_as_zeros() {
    const LEN: u64 = 4 << 20;
    let dir = tempfile::tempdir().expect("tempdir");
    let source_path = dir.path().join("source.img");
    let destination_path = dir.path().join("destination.img");
    // Data in a few places, not granule-aligned; holes elsewhere.
    let mut expected = vec![0u8; LEN as usize];
    {
        use std::os::unix::fs::FileExt;
        let file = std::fs::File::create(&source_path).expect("create the source");
        file.set_len(LEN).expect("set_len");
        for (i, at) in [(1u64, 100 << 10), (2, (1 << 20) + 4096), (3, LEN - 10_000)] {
            let data = pattern(40 + i, 10_000);
            file.write_all_at(&data, at).expect("write");
            expected[at as usize..at as usize + data.len()].copy_from_slice(&data);
        }
    }
    std::fs::write(&destination_path, vec![0xABu8; LEN as usize]).expect("destination");
    let config = Config {
        granularity: 64 << 10,
        chunk_size: 256 << 10,
        ..Config::default()
    };
    let job = files::start(
        &dir.path().join("job.journal"),
        &source_path,
        &destination_path,
        config,
    )
    .expect("start");
    // A write into a hole granule while copying.
    let data = pattern(50, 5000);
    job.guest().write(3 << 20, &data, false).expect("write");
    expected[3 << 20..(3 << 20) + 5000].copy_from_slice(&data);
    while job.copy_step().expect("copy step") != StepOutcome::Done {}
    assert_eq!(job.status().phase, JobPhase::Ready);
    job.switch().expect("switch");
    drop(job);
    let destination = std::fs::read(&destination_path).expect("read");
    assert_same(&destination, &expected, "destination of a sparse source");
    // Only the source's extents are written, not the whole granules around
    // them: four pieces of 10 KB or less (each at most four 4 KiB blocks,
    // or five when unaligned) and the guest's 5000 bytes.
    use std::os::unix::fs::MetadataExt;
    let allocated = std::fs::metadata(&destination_path).expect("stat").blocks() * 512;
    let source_allocated = std::fs::metadata(&source_path).expect("stat").blocks() * 512;
    assert!(
        allocated <= source_allocated + 8192,
        "the destination allocates {allocated} bytes, the source {source_allocated}"
    );
}

// ---------------------------------------------------------------------------
// Threaded stress on real files.

const STRESS_SIZE: u64 = 32 << 20;
const STRESS_THREADS: u64 = 4;
const REGION: u64 = STRESS_SIZE / STRESS_THREADS;

/// One guest thread: random writes (some FUA), write-zeroes, discards and
/// flushes inside its own region until told to stop. Returns its model of
/// the region.
fn stress_guest(
    guest: livecopy::engine::Guest<livecopy::storage::AnyImage, livecopy::storage::FileStorage>,
    index: u64,
    mut region: Vec<u8>,
    stop: &AtomicBool,
    ops: &AtomicU64,
) -> Vec<u8> {
    let base = index * REGION;
    let mut rng = Rng(0x5EED_0000 + index);
    while !stop.load(Ordering::Acquire) {
        let len = rng.below(4096..65537);
        let at = rng.below(0..REGION - len + 1);
        let offset = base + at;
        let span = at as usize..(at + len) as usize;
        match rng.below(0..20) {
            0 | 1 => guest.flush().expect("flush"),
            2 => {
                guest.discard(offset, len).expect("discard");
                region[span].fill(0);
            }
            3 => {
                let fua = rng.below(0..2) == 0;
                guest.write_zeroes(offset, len, fua).expect("write_zeroes");
                region[span].fill(0);
            }
            kind => {
                let fua = kind < 7;
                rng.fill(&mut region[span.clone()]);
                guest
                    .write(offset, &region[span], fua)
                    .unwrap_or_else(|e| panic!("write at {offset}+{len}: {}", e.describe()));
            }
        }
        ops.fetch_add(1, Ordering::AcqRel);
    }
    region
}

#[test]
fn threaded_guests_on_real_files_end_with_a_destination_equal_to_the_model() {
    let dir = tempfile::tempdir().expect("tempdir");
    let source_path = dir.path().join("source.img");
    let destination_path = dir.path().join("destination.img");
    let journal_path = dir.path().join("job.journal");
    let initial = pattern(30, STRESS_SIZE as usize);
    std::fs::write(&source_path, &initial).expect("write the source");
    std::fs::File::create(&destination_path)
        .and_then(|f| f.set_len(STRESS_SIZE))
        .expect("create the destination");
    let config = Config {
        granularity: 64 << 10,
        chunk_size: 1 << 20,
        copy_workers: 2,
        // About a quarter of a second for the pass: the guests write
        // throughout it.
        bandwidth: Some(128 << 20),
        ..Config::default()
    };
    let mut job =
        files::start(&journal_path, &source_path, &destination_path, config).expect("start");
    let events = job.subscribe();
    let stop = AtomicBool::new(false);
    let ops = AtomicU64::new(0);
    let timeout = Duration::from_secs(30);
    let started = Instant::now();

    let (model, source_after_switch) = std::thread::scope(|scope| {
        let threads: Vec<_> = (0..STRESS_THREADS)
            .map(|i| {
                let guest = job.guest();
                let region = initial[(i * REGION) as usize..((i + 1) * REGION) as usize].to_vec();
                let (stop, ops) = (&stop, &ops);
                scope.spawn(move || stress_guest(guest, i, region, stop, ops))
            })
            .collect();
        let at_least = |n: u64| {
            assert!(
                wait_for(timeout, || ops.load(Ordering::Acquire) >= n),
                "the guests stalled at {} requests",
                ops.load(Ordering::Acquire)
            );
            ops.load(Ordering::Acquire)
        };
        let before_copy = at_least(40);
        job.start_workers().expect("workers");
        assert_eq!(job.wait_ready(timeout), JobPhase::Ready);
        let at_ready = ops.load(Ordering::Acquire);
        let at_ready = at_least(at_ready + 40);
        let report = job.switch().expect("switch under load");
        let source_after_switch = std::fs::read(&source_path).expect("read the source");
        let at_switch = ops.load(Ordering::Acquire);
        let at_end = at_least(at_switch + 40);
        stop.store(true, Ordering::Release);
        let mut model = Vec::with_capacity(STRESS_SIZE as usize);
        for thread in threads {
            model.extend(thread.join().expect("guest thread"));
        }
        println!(
            "stress: {before_copy} requests before the copy, {at_ready} by Ready + 40, \
             {at_switch} by the switch (pause {:?}), {at_end}+ at the end",
            report.pause
        );
        (model, source_after_switch)
    });
    job.complete().expect("complete");
    let events: Vec<_> = events.try_iter().collect();
    assert!(
        matches!(
            events.as_slice(),
            [Event::Ready, Event::Switched { .. }, Event::Completed]
        ),
        "events {events:?}"
    );
    drop(job);

    let destination = std::fs::read(&destination_path).expect("read the destination");
    assert_same(&destination, &model, "destination file after the run");
    let source = std::fs::read(&source_path).expect("read the source");
    assert_same(
        &source,
        &source_after_switch,
        "source file: written after the switch",
    );

    let authority = livecopy::restart::authoritative_image(&journal_path).expect("recovery");
    assert_eq!(authority.side, Side::Destination);
    assert_eq!(authority.phase, Phase::Completed);
    assert_eq!(
        authority.image,
        std::fs::canonicalize(&destination_path).expect("canonicalize")
    );
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "sanity: the stress run should take seconds"
    );
}

// ---------------------------------------------------------------------------
// Error paths.

/// The destination's write fails (`kind`) in the copier's step.
fn destination_write_fails_in_the_copy_step(kind: IoKind, errno: &str) {
    let mut s = sim_job_at(Stage::Copying);
    s.destination.fail_next_write(kind, 0);
    let error = s.job.copy_step().expect_err("the step hits the fault");
    assert_eq!(error.kind(), ErrorKind::Io);
    let reason = s.job.status().reason.expect("a reason");
    assert!(reason.contains(errno), "reason {reason:?} names {errno}");
    check_aborted_and_source_only(&mut s, "destination write error in a copy step");
}

/// The destination's write fails (`kind`) under a mirrored guest write.
fn destination_write_fails_under_a_guest_write(stage: Stage, kind: IoKind, errno: &str) {
    let mut s = sim_job_at(stage);
    s.destination.fail_next_write(kind, 0);
    let writes = s.destination.writes_seen();
    // The first chunk is clean: the write is mirrored and hits the fault,
    // and the guest never sees it.
    s.write(G / 2, &pattern(40, G as usize), false);
    assert_eq!(s.destination.writes_seen(), writes);
    let reason = s.job.status().reason.expect("a reason");
    assert!(reason.contains(errno), "reason {reason:?} names {errno}");
    check_aborted_and_source_only(&mut s, &format!("destination write error ({stage:?})"));
}

#[test]
fn eio_on_a_destination_write_in_the_copy_step_aborts_and_the_guest_carries_on() {
    destination_write_fails_in_the_copy_step(IoKind::Other, "os error 5");
}

#[test]
fn eio_on_a_mirrored_destination_write_aborts_and_the_guest_write_succeeds() {
    for stage in [Stage::Copying, Stage::Ready] {
        destination_write_fails_under_a_guest_write(stage, IoKind::Other, "os error 5");
    }
}

#[test]
fn enospc_on_the_destination_in_the_copy_step_aborts_and_the_guest_carries_on() {
    destination_write_fails_in_the_copy_step(IoKind::StorageFull, "os error 28");
}

#[test]
fn enospc_on_a_mirrored_destination_write_aborts_and_the_guest_write_succeeds() {
    for stage in [Stage::Copying, Stage::Ready] {
        destination_write_fails_under_a_guest_write(stage, IoKind::StorageFull, "os error 28");
    }
}

#[test]
fn eio_on_a_destination_sync_in_a_guest_flush_aborts_and_the_flush_succeeds() {
    for stage in [Stage::Copying, Stage::Ready] {
        for persisted in [false, true] {
            let mut s = sim_job_at(stage);
            s.write(SIZE - 5000, &pattern(50, 5000), false);
            let source_syncs = s.source.syncs_seen();
            s.destination.fail_next_sync(persisted);
            s.job
                .guest()
                .flush()
                .expect("the flush is acknowledged: the source is durable");
            assert_eq!(s.source.syncs_seen(), source_syncs + 1);
            assert_same(
                &s.source.durable_bytes(),
                &s.model,
                "source durable after the flush",
            );
            check_aborted_and_source_only(
                &mut s,
                &format!("destination sync error in a flush ({stage:?}, {persisted})"),
            );
        }
    }
}

#[test]
fn eio_on_a_source_write_goes_to_the_guest_and_changes_nothing_else() {
    for stage in [Stage::Copying, Stage::Ready] {
        let mut s = sim_job_at(stage);
        let before = s.ops();
        let destination_writes = s.destination.writes_seen();
        let journal_before = s.journal.live_bytes();
        s.source.fail_next_write(IoKind::Other, 0);
        let error = s
            .job
            .guest()
            .write(G, &pattern(60, 100), false)
            .expect_err("the source write fails");
        assert_eq!(error.kind(), ErrorKind::Io, "{stage:?}");
        assert!(error.describe().contains("source write"), "{error:?}");
        let status = s.job.status();
        let expected = match stage {
            Stage::Copying => JobPhase::Copying,
            Stage::Ready => JobPhase::Ready,
        };
        assert_eq!(status.phase, expected, "{stage:?}: phase changed");
        assert_eq!(status.reason, None);
        assert_eq!(s.events(), vec![], "{stage:?}: events");
        // The destination gets at most the resync of copied granules (the
        // write stopped at the source); the journal nothing.
        assert!(
            s.destination.writes_seen() <= destination_writes + 2,
            "{stage:?}"
        );
        assert_eq!(s.ops()[2], before[2], "{stage:?}: journal calls");
        assert_eq!(s.journal.live_bytes(), journal_before);
        // The job goes on: more writes, the pass, the switch.
        s.write(G, &pattern(61, 100), true);
        s.to_ready();
        s.job.switch().expect("switch");
        s.check_guest_view("after a failed source write and a switch");
        assert_same(&s.destination.live_bytes(), &s.model, "destination");
    }
}

#[test]
fn eio_on_a_source_sync_fails_the_engine_and_is_never_retried() {
    // A FUA write syncs itself (RWF_DSYNC), and its error cannot tell the
    // write from the sync, so a failed FUA write counts as a failed sync.
    for stage in [Stage::Copying, Stage::Ready] {
        for case in [
            "flush",
            "FUA write, its sync fails",
            "FUA write, its write fails",
        ] {
            let s = sim_job_at(stage);
            let guest = s.job.guest();
            let source_syncs = s.source.syncs_seen();
            let error = match case {
                "flush" => {
                    s.source.fail_next_sync(false);
                    guest.flush().expect_err("a flush whose source sync fails")
                }
                "FUA write, its sync fails" => {
                    s.source.fail_next_sync(false);
                    guest
                        .write(0, &pattern(70, 512), true)
                        .expect_err("a FUA write whose source sync fails")
                }
                _ => {
                    s.source.fail_next_write(IoKind::Other, 0);
                    guest
                        .write(0, &pattern(70, 512), true)
                        .expect_err("a FUA write whose source write fails")
                }
            };
            assert_eq!(error.kind(), ErrorKind::Io, "{stage:?} {case}");
            assert_eq!(s.job.status().phase, JobPhase::Failed);
            assert!(
                matches!(s.events().as_slice(), [Event::Failed { reason }] if reason.contains("source")),
                "{stage:?} {case}: a Failed event"
            );
            let after_failure = s.ops();
            // Every later request fails without touching a disk: in
            // particular the source sync is not attempted again.
            let second = guest.flush().expect_err("a second flush");
            assert_eq!(second.kind(), ErrorKind::Poisoned);
            let mut buf = [0u8; 512];
            assert!(guest.read(0, &mut buf).is_err(), "read");
            assert!(guest.write(0, &[1; 512], false).is_err(), "write");
            assert!(guest.write(0, &[1; 512], true).is_err(), "FUA write");
            assert!(guest.write_zeroes(0, 512, false).is_err(), "write_zeroes");
            assert!(guest.discard(0, 512).is_err(), "discard");
            assert!(guest.flush().is_err(), "third flush");
            assert_eq!(
                s.ops(),
                after_failure,
                "{stage:?} {case}: a disk was touched"
            );
            assert_eq!(s.source.syncs_seen(), source_syncs);
            // No way forward: no switch, no copy.
            assert!(s.job.switch().is_err());
            assert_eq!(s.job.copy_step().expect("step"), StepOutcome::Done);
            assert_eq!(s.job.status().phase, JobPhase::Failed);
            assert_eq!(s.ops(), after_failure);
        }
    }
}

#[test]
fn eio_on_the_journal_sync_in_switch_fails_the_engine_and_recovery_names_a_complete_image() {
    for later in [0, 1] {
        for persisted in [false, true] {
            let case = format!("journal sync {later} fails, persisted {persisted}");
            let mut s = sim_job();
            s.write(3 * G, &pattern(80, 2 * G as usize), false);
            s.job.copy_step().expect("step");
            s.write(G / 3, &pattern(81, 1000), true);
            s.to_ready();
            s.write(9 * G + 5, &pattern(82, 5000), false);
            s.events();
            s.journal.fail_sync(later, persisted);
            let error = s.job.switch().expect_err(&case);
            assert_eq!(error.kind(), ErrorKind::Io, "{case}");
            assert_eq!(s.job.status().phase, JobPhase::Failed, "{case}");
            assert!(
                matches!(s.events().as_slice(), [Event::Failed { reason }] if reason.contains("journal")),
                "{case}: a Failed event"
            );
            let guest = s.job.guest();
            let mut buf = [0u8; 16];
            assert!(guest.read(0, &mut buf).is_err(), "{case}: read");
            assert!(guest.write(0, &[1; 16], false).is_err(), "{case}: write");
            assert!(guest.flush().is_err(), "{case}: flush");
            assert!(s.job.complete().is_err(), "{case}: complete");

            // Both images were synced before the commit: both hold every
            // acknowledged write, durably.
            for (name, disk) in [("source", &s.source), ("destination", &s.destination)] {
                assert_same(&disk.durable_bytes(), &s.model, &format!("{case}: {name}"));
            }
            let fates: [(&str, SimDisk); 3] = [
                (
                    "power loss, drop all",
                    s.journal.after_power_loss(|_, _| WriteFate::Drop),
                ),
                (
                    "power loss, apply all",
                    s.journal.after_power_loss(|_, _| WriteFate::Apply),
                ),
                ("process crash", s.journal.after_process_crash()),
            ];
            for (fate, journal_disk) in fates {
                let analysis = journal::analyse(&journal_disk).expect("journal readable");
                let recovered = analysis
                    .outcome
                    .unwrap_or_else(|r| panic!("{case}, {fate}: recovery refused: {r}"));
                let record = &recovered.record;
                let image = match (record.phase, record.authoritative) {
                    (Phase::Ready, Side::Source) => &s.source,
                    (Phase::Switched, Side::Destination) => &s.destination,
                    other => panic!("{case}, {fate}: recovery named {other:?}"),
                };
                println!("{case}, {fate}: recovery names {:?}", record.phase);
                let after = image.after_power_loss(|_, _| WriteFate::Drop);
                assert_same(
                    &after.live_bytes(),
                    &s.model,
                    &format!(
                        "{case}, {fate}: the image recovery names ({:?})",
                        record.phase
                    ),
                );
            }
        }
    }
}

#[test]
fn a_source_read_error_in_the_copy_step_aborts_and_the_guest_carries_on() {
    let mut s = sim_job_at(Stage::Copying);
    // The next chunk to copy is granules 2 and 3.
    s.source.fail_reads(2 * G + 10..2 * G + 11);
    let error = s.job.copy_step().expect_err("the step cannot read");
    assert_eq!(error.kind(), ErrorKind::Io);
    assert!(error.describe().contains("source read"), "{error:?}");
    // The guest's own read of the bad range reports the disk's error.
    let mut buf = [0u8; 64];
    assert!(s.job.guest().read(2 * G, &mut buf).is_err());
    // Everything else works, on the source only (reads stay away from the
    // bad sector, which a write does not cure on the simulated disk).
    s.write(2 * G, &pattern(90, G as usize), false);
    let destination_writes = s.destination.writes_seen();
    let guest = s.job.guest();
    guest.read(0, &mut buf).expect("read elsewhere");
    assert_eq!(&buf[..], &s.model[..64]);
    guest.flush().expect("flush");
    assert_eq!(s.destination.writes_seen(), destination_writes);
    assert_eq!(s.job.status().phase, JobPhase::Aborted);
    let recovered = s.recovered();
    assert_eq!(recovered.record.phase, Phase::Aborted);
    assert_eq!(recovered.record.authoritative, Side::Source);
    let events = s.events();
    assert!(
        matches!(events.as_slice(), [Event::Aborted { .. }]),
        "events {events:?}"
    );
    let destination_ops = s.destination.ops();
    s.write(12 * G, &pattern(91, 100), true);
    guest.discard(14 * G, G).expect("discard");
    s.model[14 * G as usize..15 * G as usize].fill(0);
    let mut head = vec![0u8; 2 * G as usize];
    guest.read(0, &mut head).expect("read");
    assert_eq!(&head[..], &s.model[..2 * G as usize]);
    assert_eq!(s.destination.ops(), destination_ops);
    assert_same(&s.source.live_bytes(), &s.model, "source");
}

#[test]
fn after_the_switch_the_source_is_never_written_or_synced_again() {
    let mut s = sim_job();
    s.write(5 * G, &pattern(100, 1234), false);
    s.to_ready();
    s.write(6 * G, &pattern(101, 4321), true);
    let source_before = s.source.live_bytes();
    let report = s.job.switch().expect("switch");
    assert!(report.seq > 0);
    let (writes, syncs) = (s.source.writes_seen(), s.source.syncs_seen());
    let pending = s.source.pending().len();
    let guest = s.job.guest();
    s.write(0, &pattern(102, 777), false);
    s.write(7 * G + 3, &pattern(103, 3 * G as usize), true);
    guest.flush().expect("flush");
    guest.discard(2 * G, 2 * G).expect("discard");
    guest
        .write_zeroes(10 * G, G + 7, true)
        .expect("write_zeroes");
    s.model[2 * G as usize..4 * G as usize].fill(0);
    s.model[10 * G as usize..(11 * G + 7) as usize].fill(0);
    s.check_guest_view("after the switch");
    s.job.complete().expect("complete");
    s.write(SIZE - 100, &pattern(104, 100), false);
    guest.flush().expect("flush after complete");
    s.check_guest_view("after complete");
    assert_eq!(
        s.source.writes_seen(),
        writes,
        "source written after the switch"
    );
    assert_eq!(
        s.source.syncs_seen(),
        syncs,
        "source synced after the switch"
    );
    assert_eq!(s.source.pending().len(), pending);
    assert_eq!(s.source.live_bytes(), source_before);
    assert_same(&s.destination.durable_bytes(), &s.model, "destination");
    let recovered = s.recovered();
    assert_eq!(recovered.record.phase, Phase::Completed);
    assert_eq!(recovered.record.authoritative, Side::Destination);
}

// ---------------------------------------------------------------------------
// Refusals.

#[test]
fn requests_out_of_order_are_refused_and_change_nothing() {
    let s = sim_job();
    let before = s.ops();
    let journal_before = s.journal.live_bytes();
    let error = s.job.switch().expect_err("switch while copying");
    assert_eq!(error.kind(), ErrorKind::InvalidInput);
    let error = s.job.complete().expect_err("complete while copying");
    assert_eq!(error.kind(), ErrorKind::InvalidInput);
    assert_eq!(s.ops(), before, "a refused request touched a disk");
    assert_eq!(s.journal.live_bytes(), journal_before);
    assert_eq!(s.job.status().phase, JobPhase::Copying);
    assert_eq!(s.job.status().switch_pause, None);
    assert_eq!(s.events(), vec![]);

    s.to_ready();
    s.events();
    let before = s.ops();
    let error = s.job.complete().expect_err("complete while ready");
    assert_eq!(error.kind(), ErrorKind::InvalidInput);
    assert_eq!(s.ops(), before);
    assert_eq!(s.job.status().phase, JobPhase::Ready);

    s.job.switch().expect("switch");
    s.events();
    let before = s.ops();
    let error = s.job.abort().expect_err("abort after the switch");
    assert_eq!(error.kind(), ErrorKind::InvalidInput);
    let error = s.job.switch().expect_err("a second switch");
    assert_eq!(error.kind(), ErrorKind::InvalidInput);
    assert_eq!(s.ops(), before);
    assert_eq!(s.job.status().phase, JobPhase::Switched);
    assert_eq!(s.recovered().record.phase, Phase::Switched);
    assert_eq!(s.events(), vec![]);

    s.job.complete().expect("complete");
    let before = s.ops();
    assert_eq!(
        s.job.abort().expect_err("abort after complete").kind(),
        ErrorKind::InvalidInput
    );
    // A second complete is idempotent: the same record, nothing written.
    let seq = s.job.complete().expect("a second complete");
    assert_eq!(s.ops(), before);
    assert_eq!(seq, s.recovered().seq);
    assert_eq!(s.recovered().record.phase, Phase::Completed);
}

#[test]
fn requests_beyond_the_end_are_refused_without_touching_a_disk() {
    let s = sim_job();
    let guest = s.job.guest();
    assert_eq!(guest.size(), SIZE);
    let before = s.ops();
    let mut buf = vec![0u8; 2 * G as usize];
    let refusals = [
        ("write", guest.write(SIZE - G, &buf, false)),
        ("FUA write", guest.write(SIZE, &[1], true)),
        ("write at u64::MAX", guest.write(u64::MAX, &[1], false)),
        ("write_zeroes", guest.write_zeroes(SIZE - 1, 2, false)),
        (
            "write_zeroes overflow",
            guest.write_zeroes(1, u64::MAX, false),
        ),
        ("discard", guest.discard(SIZE - G, 2 * G)),
        ("read", guest.read(SIZE - G, &mut buf)),
    ];
    for (what, result) in refusals {
        let error = result.expect_err(what);
        assert_eq!(error.kind(), ErrorKind::InvalidInput, "{what}");
    }
    assert_eq!(s.ops(), before);
    assert_eq!(s.job.status().phase, JobPhase::Copying);
    // The last byte is fine.
    guest.write(SIZE - 1, &[7], false).expect("last byte");
}

#[test]
fn a_destination_smaller_than_the_source_is_refused() {
    let journal = Journal::format(SimDisk::new(JOURNAL_LEN), UUID, first_record()).expect("format");
    let destination = SimDisk::new(SIZE - 512);
    let refused = Job::new(
        journal,
        SimDisk::new(SIZE),
        destination.clone(),
        sim_config(),
    )
    .err()
    .expect("a smaller destination");
    assert_eq!(refused.kind(), ErrorKind::InvalidInput);
    assert_eq!(destination.writes_seen(), 0);
    // Larger is fine; the guest sees the source's size.
    let journal = Journal::format(SimDisk::new(JOURNAL_LEN), UUID, first_record()).expect("format");
    let job = Job::new(
        journal,
        SimDisk::new(SIZE),
        SimDisk::new(SIZE + G),
        sim_config(),
    )
    .expect("a larger destination");
    assert_eq!(job.guest().size(), SIZE);
}

fn make_image(path: &Path, len: u64) {
    std::fs::write(path, pattern(len, len as usize)).expect("write an image");
}

#[test]
fn files_start_refuses_the_same_file_twice_and_an_existing_journal() {
    let dir = tempfile::tempdir().expect("tempdir");
    let source = dir.path().join("source.img");
    let destination = dir.path().join("destination.img");
    let journal_path = dir.path().join("job.journal");
    make_image(&source, 1 << 20);
    make_image(&destination, 1 << 20);
    let symlink = dir.path().join("link.img");
    std::os::unix::fs::symlink(&source, &symlink).expect("symlink");
    let hard_link = dir.path().join("hard.img");
    std::fs::hard_link(&source, &hard_link).expect("hard link");
    let source_bytes = std::fs::read(&source).expect("read");

    for same in [&source, &symlink, &hard_link] {
        let refused = files::start(&journal_path, &source, same, Config::default())
            .err()
            .unwrap_or_else(|| panic!("{} accepted as the destination", same.display()));
        assert_eq!(
            refused.kind(),
            ErrorKind::InvalidInput,
            "{}",
            same.display()
        );
        assert!(
            !journal_path.exists(),
            "a refused start created the journal"
        );
        // And the other way round.
        let refused = files::start(&journal_path, same, &source, Config::default())
            .err()
            .unwrap_or_else(|| panic!("{} accepted as the source", same.display()));
        assert_eq!(refused.kind(), ErrorKind::InvalidInput);
    }
    assert_eq!(std::fs::read(&source).expect("read"), source_bytes);

    let smaller = dir.path().join("small.img");
    make_image(&smaller, 1 << 19);
    let refused = files::start(&journal_path, &source, &smaller, Config::default())
        .err()
        .expect("a smaller destination");
    assert_eq!(refused.kind(), ErrorKind::InvalidInput);
    assert!(!journal_path.exists());

    std::fs::write(&journal_path, b"not a journal, and not to be replaced").expect("write");
    let destination_bytes = std::fs::read(&destination).expect("read");
    let refused = files::start(&journal_path, &source, &destination, Config::default())
        .err()
        .expect("an existing journal path");
    assert_eq!(refused.kind(), ErrorKind::InvalidInput, "{refused:?}");
    assert_eq!(
        std::fs::read(&journal_path).expect("read"),
        b"not a journal, and not to be replaced"
    );
    assert_eq!(
        std::fs::read(&destination).expect("read"),
        destination_bytes
    );
    let mut names: Vec<_> = std::fs::read_dir(dir.path())
        .expect("list")
        .map(|e| e.expect("entry").file_name())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "destination.img",
            "hard.img",
            "job.journal",
            "link.img",
            "small.img",
            "source.img"
        ],
        "a refused start left files behind"
    );
    // A sane start in the same directory works.
    let other_journal = dir.path().join("other.journal");
    let job = files::start(&other_journal, &source, &destination, Config::default())
        .expect("a valid start");
    assert_eq!(job.status().phase, JobPhase::Copying);
}

// ---------------------------------------------------------------------------
// Bandwidth and the switch report.

#[test]
fn the_bandwidth_limit_slows_the_copy() {
    const N: u64 = 8 << 20;
    const LIMIT: u64 = 16 << 20;
    const CHUNK: u64 = 256 << 10;
    const WORKERS: usize = 2;
    let dir = tempfile::tempdir().expect("tempdir");
    let source = dir.path().join("source.img");
    let destination = dir.path().join("destination.img");
    make_image(&source, N);
    std::fs::File::create(&destination)
        .and_then(|f| f.set_len(N))
        .expect("create the destination");
    let config = Config {
        granularity: 64 << 10,
        chunk_size: CHUNK,
        copy_workers: WORKERS,
        bandwidth: Some(LIMIT),
        ..Config::default()
    };
    let mut job = files::start(
        &dir.path().join("job.journal"),
        &source,
        &destination,
        config,
    )
    .expect("start");
    // Each worker copies its first chunk before it first waits, so by time
    // t at most LIMIT * t + WORKERS * CHUNK bytes are copied. Only lower
    // bounds on time are checked: elapsed is read after the counter.
    let burst = WORKERS as f64 * CHUNK as f64;
    let started = Instant::now();
    job.start_workers().expect("workers");
    let mut samples = 0;
    loop {
        let status = job.status();
        let elapsed = started.elapsed().as_secs_f64();
        let allowed = LIMIT as f64 * elapsed + burst;
        assert!(
            status.bytes_copied as f64 <= allowed,
            "{} bytes copied after {elapsed:.3} s, over the limit ({allowed:.0})",
            status.bytes_copied
        );
        samples += 1;
        if status.phase != JobPhase::Copying {
            assert_eq!(status.phase, JobPhase::Ready);
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the copy hangs"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let elapsed = started.elapsed();
    let floor = (N as f64 - burst) / LIMIT as f64;
    assert!(
        elapsed.as_secs_f64() >= floor,
        "{N} bytes at {LIMIT} B/s took {elapsed:?}, less than {floor:.3} s"
    );
    println!(
        "bandwidth: {N} bytes at {LIMIT} B/s took {elapsed:?} (N/limit = {:.3} s, floor with \
         burst {floor:.3} s), {samples} samples",
        N as f64 / LIMIT as f64
    );
    assert_eq!(job.status().bytes_copied, N);
    drop(job);
    assert_eq!(
        std::fs::read(&destination).expect("read"),
        std::fs::read(&source).expect("read")
    );
}

#[test]
fn the_switch_reports_its_pause() {
    let s = sim_job();
    s.to_ready();
    assert_eq!(s.events(), vec![Event::Ready]);
    assert_eq!(s.job.status().switch_pause, None);
    let report = s.job.switch().expect("switch");
    assert!(report.pause > Duration::ZERO);
    assert_eq!(report.seq, s.recovered().seq);
    assert_eq!(s.recovered().record.phase, Phase::Switched);
    let status = s.job.status();
    assert_eq!(status.phase, JobPhase::Switched);
    assert_eq!(status.switch_pause, Some(report.pause));
    assert!(!status.ready);
    assert_eq!(
        s.events(),
        vec![Event::Switched {
            pause: report.pause,
            // No guest request ran during the switch.
            longest_request: Duration::ZERO,
        }]
    );
    s.job.complete().expect("complete");
    assert_eq!(s.events(), vec![Event::Completed]);
    assert_eq!(s.job.status().switch_pause, Some(report.pause));
}

/// A source write that fails after part of it landed must not leave the
/// images different where the destination was already copied: the guest
/// would see bytes change at the switch without writing them.
#[test]
fn a_partly_landed_failed_source_write_is_resynced_to_the_destination() {
    let s = sim_job_at(Stage::Ready);
    let guest = s.job.guest();
    s.source.fail_next_write(IoKind::Other, 1024);
    guest
        .write(G, &pattern(80, 4096), false)
        .expect_err("the source write fails");
    let mut before_switch = vec![0u8; 4096];
    guest.read(G, &mut before_switch).unwrap();
    assert_eq!(
        &before_switch[..1024],
        &pattern(80, 4096)[..1024],
        "the landed part"
    );
    s.job.switch().expect("switch");
    let mut after_switch = vec![0u8; 4096];
    guest.read(G, &mut after_switch).unwrap();
    assert_eq!(
        before_switch, after_switch,
        "the guest saw bytes change at the switch"
    );
}

/// An image replaced since the job started (another inode at the recorded
/// path) must not be resumed: the journal's facts would not describe it.
#[test]
fn resume_refuses_an_image_replaced_since_the_job_started() {
    let dir = tempfile::tempdir().unwrap();
    let (source, destination, journal) = (
        dir.path().join("src.img"),
        dir.path().join("dst.img"),
        dir.path().join("j"),
    );
    for path in [&source, &destination] {
        std::fs::File::create(path)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
    }
    let job = {
        let _no_fork = crate::support::exclusive();
        livecopy::engine::files::start(&journal, &source, &destination, Config::default()).unwrap()
    };
    {
        let _no_fork = crate::support::exclusive();
        drop(job);
    }
    // Replace the source: same path, new inode (the old file is kept, or
    // the file system would hand its inode number straight back).
    std::fs::rename(&source, dir.path().join("src.old")).unwrap();
    std::fs::File::create(&source)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let _no_fork = crate::support::exclusive();
    let error = livecopy::engine::files::resume(&journal, Config::default())
        .err()
        .expect("a replaced source is refused");
    assert_eq!(error.kind(), ErrorKind::InvalidInput, "{error}");
    assert!(
        error
            .to_string()
            .contains("not the file the job started with"),
        "{error}"
    );
    // Nothing was written: recovery still says Copying, source authoritative.
    let recovered = livecopy::restart::authoritative_image(&journal).unwrap();
    assert_eq!(recovered.phase, livecopy::journal::Phase::Copying);
    assert_eq!(recovered.recovered.seq, 0);
}

/// A simulated disk that runs a hook after each of its successful syncs.
#[derive(Clone)]
struct SyncHook {
    disk: SimDisk,
    hook: Arc<Mutex<Option<HookFn>>>,
    syncs: Arc<AtomicU64>,
}

type HookFn = Box<dyn FnMut(u64) + Send>;

impl SyncHook {
    fn new(disk: SimDisk) -> Self {
        SyncHook {
            disk,
            hook: Arc::default(),
            syncs: Arc::default(),
        }
    }
}

impl Storage for SyncHook {
    fn len(&self) -> std::io::Result<u64> {
        self.disk.len()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.disk.read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.disk.write_at(offset, data)
    }
    fn write_durable_at(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.disk.write_durable_at(offset, data)
    }
    fn sync_data(&self) -> std::io::Result<()> {
        self.disk.sync_data()?;
        let n = self.syncs.fetch_add(1, Ordering::AcqRel) + 1;
        // Taken out while it runs: the hook's own writes may sync.
        let hook = self.hook.lock().unwrap().take();
        if let Some(mut hook) = hook {
            hook(n);
            *self.hook.lock().unwrap() = Some(hook);
        }
        Ok(())
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.disk.set_len(len)
    }
    fn punch_hole(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.disk.punch_hole(offset, len)
    }
}

/// The guest writes while the switch's first sync runs, as a busy guest
/// does. Every write acknowledged before `switch` returned survives a power
/// loss that drops every pending write, and the hold needs no sync of its
/// own: the write-through round synced what the guest wrote before it.
/// (The hook runs inside the destination's sync, under that image's sync
/// lock, so it writes plainly: a durable write would wait for the lock.)
#[test]
fn guest_writes_during_the_switch_syncs_are_durable_without_a_sync_in_the_hold() {
    let initial = pattern(1, SIZE as usize);
    let source = SyncHook::new(SimDisk::from_bytes(initial.clone()));
    let destination = SyncHook::new(SimDisk::new(SIZE));
    let journal_disk = SimDisk::new(JOURNAL_LEN);
    let journal = Journal::format(journal_disk.clone(), UUID, first_record()).expect("format");
    let job =
        Job::new(journal, source.clone(), destination.clone(), sim_config()).expect("Job::new");
    while job.copy_step().expect("step") != StepOutcome::Done {}
    assert_eq!(job.status().phase, JobPhase::Ready);
    let model = Arc::new(Mutex::new(initial));
    let guest = job.guest();
    let during = Arc::clone(&model);
    let syncs_before = destination.syncs.load(Ordering::Acquire);
    *destination.hook.lock().unwrap() = Some(Box::new(move |n| {
        if n - syncs_before != 1 {
            return;
        }
        for k in 0..5 {
            let offset = k * 3 * G + 100;
            let data = pattern(40 + k, 1000);
            guest.write(offset, &data, false).expect("guest write");
            during.lock().unwrap()[offset as usize..offset as usize + data.len()]
                .copy_from_slice(&data);
        }
    }));
    job.switch().expect("switch");
    *destination.hook.lock().unwrap() = None;
    assert_eq!(
        destination.syncs.load(Ordering::Acquire) - syncs_before,
        2,
        "syncs of the destination during the switch: the first round and the \
         write-through round, none in the hold"
    );
    let model = model.lock().unwrap().clone();
    let survived = destination
        .disk
        .after_power_loss(|_, _| WriteFate::Drop)
        .durable_bytes();
    assert_same(&survived, &model, "destination after power loss");
    let recovered = journal::analyse(&journal_disk)
        .expect("journal")
        .outcome
        .expect("decided");
    assert_eq!(recovered.record.authoritative, Side::Destination);
}

#[test]
fn bad_configs_are_refused_before_anything_is_written() {
    let bad = [
        (
            "granularity",
            Config {
                granularity: 3000,
                ..sim_config()
            },
        ),
        (
            "chunk",
            Config {
                chunk_size: G + 1,
                ..sim_config()
            },
        ),
        (
            "worker",
            Config {
                copy_workers: 0,
                ..sim_config()
            },
        ),
        (
            "nice",
            Config {
                worker_nice: 20,
                ..sim_config()
            },
        ),
        (
            "nice",
            Config {
                worker_nice: -1,
                ..sim_config()
            },
        ),
    ];
    for (what, config) in bad {
        let source = SimDisk::from_bytes(pattern(1, SIZE as usize));
        let destination = SimDisk::new(SIZE);
        let journal_disk = SimDisk::new(JOURNAL_LEN);
        let journal = Journal::format(journal_disk.clone(), UUID, first_record()).expect("format");
        let journal_before = journal_disk.live_bytes();
        let error = Job::new(journal, source, destination.clone(), config)
            .err()
            .unwrap_or_else(|| panic!("{what}: accepted"));
        assert_eq!(error.kind(), ErrorKind::InvalidInput, "{what}");
        assert!(error.to_string().contains(what), "{what}: {error}");
        assert_eq!(destination.writes_seen(), 0, "{what}");
        assert_eq!(journal_disk.live_bytes(), journal_before, "{what}");
    }
}

/// The copy's paced write-back fails: that is a failed destination sync
/// (its error may never reach a later fdatasync), so the switch refuses,
/// the job is Aborted on the journal, and the guest carries on with the
/// source.
#[test]
fn a_failed_write_back_of_the_destination_aborts_the_job_before_the_switch() {
    let initial = pattern(5, SIZE as usize);
    let source = RecordingWriteBack::new(SimDisk::from_bytes(initial.clone()));
    let destination = RecordingWriteBack::new(SimDisk::new(SIZE));
    destination.fail_wait.store(true, Ordering::Release);
    let journal_disk = SimDisk::new(JOURNAL_LEN);
    let journal = Journal::format(journal_disk.clone(), UUID, first_record()).expect("format");
    let mut job =
        Job::new(journal, source.clone(), destination.clone(), sim_config()).expect("Job::new");
    let events = job.subscribe();
    job.start_workers().expect("workers");
    // The write-back thread meets the error as the pass goes (the job may
    // abort before it is Ready), or the switch does when it drains what is
    // left: either way no switch.
    let phase = job.wait_ready(Duration::from_secs(30));
    assert!(
        matches!(phase, JobPhase::Ready | JobPhase::Aborted),
        "{phase:?}"
    );
    let error = job.switch().expect_err("the switch must not go on");
    assert!(
        error.describe().contains("destination") || error.kind() == ErrorKind::InvalidInput,
        "{error:?}"
    );
    assert!(
        !destination.started.lock().unwrap().is_empty(),
        "write-back was started"
    );
    assert!(
        source.started.lock().unwrap().is_empty(),
        "never on the source"
    );
    assert_eq!(job.status().phase, JobPhase::Aborted);
    let recovered = journal::analyse(&journal_disk)
        .expect("journal")
        .outcome
        .expect("decided");
    assert_eq!(recovered.record.phase, Phase::Aborted);
    assert_eq!(recovered.record.authoritative, Side::Source);
    let seen: Vec<Event> = events.try_iter().collect();
    assert!(
        seen.iter()
            .any(|e| matches!(e, Event::Aborted { reason } if reason.contains("destination"))),
        "{seen:?}"
    );
    // The guest goes on with the source.
    let guest = job.guest();
    guest
        .write(0, &[9; 512], true)
        .expect("write after the abort");
    let mut buf = vec![0u8; 512];
    guest.read(0, &mut buf).expect("read");
    assert_eq!(buf, vec![9; 512]);
}

/// A simulated disk that records the ranges whose write-back was
/// started, and can fail the wait for it.
#[derive(Clone)]
struct RecordingWriteBack {
    disk: SimDisk,
    started: Arc<Mutex<Vec<Range<u64>>>>,
    fail_wait: Arc<AtomicBool>,
    /// Microseconds each wait for write-back takes: a disk slower than
    /// the guest's cache.
    wait_micros: Arc<AtomicU64>,
    /// Takes aligned writes around the (simulated) cache, as O_DIRECT.
    direct: bool,
    direct_writes: Arc<AtomicU64>,
}

impl RecordingWriteBack {
    fn new(disk: SimDisk) -> Self {
        RecordingWriteBack {
            disk,
            started: Arc::default(),
            fail_wait: Arc::default(),
            wait_micros: Arc::default(),
            direct: false,
            direct_writes: Arc::default(),
        }
    }

    fn direct(disk: SimDisk) -> Self {
        RecordingWriteBack {
            direct: true,
            ..Self::new(disk)
        }
    }

    /// Whether started write-back covered every byte of `range`.
    fn covered(&self, range: Range<u64>) -> bool {
        let started = self.started.lock().unwrap();
        (range.start..range.end)
            .step_by(512)
            .all(|at| started.iter().any(|r| r.contains(&at)))
    }
}

impl Storage for RecordingWriteBack {
    fn len(&self) -> std::io::Result<u64> {
        self.disk.len()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.disk.read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.disk.write_at(offset, data)
    }
    fn sync_data(&self) -> std::io::Result<()> {
        self.disk.sync_data()
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.disk.set_len(len)
    }
    fn punch_hole(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.disk.punch_hole(offset, len)
    }
    fn write_direct_at(&self, offset: u64, data: &[u8]) -> std::io::Result<bool> {
        if !self.direct || !offset.is_multiple_of(4096) || !data.len().is_multiple_of(4096) {
            return Ok(false);
        }
        self.direct_writes.fetch_add(1, Ordering::AcqRel);
        self.disk.write_at(offset, data)?;
        Ok(true)
    }
    fn start_write_back(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.started.lock().unwrap().push(offset..offset + len);
        Ok(())
    }
    fn wait_write_back(&self, _offset: u64, _len: u64) -> std::io::Result<()> {
        let micros = self.wait_micros.load(Ordering::Acquire);
        if micros > 0 {
            std::thread::sleep(Duration::from_micros(micros));
        }
        if self.fail_wait.load(Ordering::Acquire) {
            return Err(std::io::Error::from_raw_os_error(5));
        }
        Ok(())
    }
}

/// The guest's cached writes while the job mirrors leave dirty pages on
/// both images; they are written back as they come (paced), like the
/// pass's, so the switch never finds them all at once and the guest never
/// waits behind one large sync (the cause of 200-290 ms stalls). Every
/// byte the guest wrote, on both images, had its write-back started by the
/// time the switch is answered.
#[test]
fn the_guests_cached_writes_are_written_back_on_both_images_before_the_switch() {
    let source = RecordingWriteBack::new(SimDisk::from_bytes(pattern(3, SIZE as usize)));
    let destination = RecordingWriteBack::new(SimDisk::new(SIZE));
    let journal_disk = SimDisk::new(JOURNAL_LEN);
    let journal = Journal::format(journal_disk.clone(), UUID, first_record()).expect("format");
    let mut job =
        Job::new(journal, source.clone(), destination.clone(), sim_config()).expect("Job::new");
    job.start_workers().expect("workers");
    assert_eq!(job.wait_ready(Duration::from_secs(30)), JobPhase::Ready);
    let guest = job.guest();
    let written = [G..3 * G, 7 * G + 512..9 * G, SIZE - G..SIZE];
    for range in &written {
        let data = vec![0x5a; (range.end - range.start) as usize];
        guest
            .write(range.start, &data, false)
            .expect("cached write");
    }
    job.switch().expect("switch");
    for range in written {
        assert!(
            source.covered(range.clone()),
            "source write-back of {range:?} was never started"
        );
        assert!(
            destination.covered(range.clone()),
            "destination write-back of {range:?} was never started"
        );
    }
}

/// A guest whose cached writes come faster than the disk writes them back
/// never pauses while the switch drains the write-back queue: the drain
/// takes what was queued when it started and leaves the rest to the
/// thread, so the switch ends in bounded time. (A drain that waited for
/// an empty queue took 30 s and more on ext4 under a 4 KiB random writer.)
#[test]
fn the_switch_ends_under_a_guest_writing_faster_than_the_write_back() {
    let size = 16 << 20;
    let initial = pattern(6, size as usize);
    let source = RecordingWriteBack::new(SimDisk::from_bytes(initial.clone()));
    let destination = RecordingWriteBack::new(SimDisk::new(size));
    for image in [&source, &destination] {
        image.wait_micros.store(200, Ordering::Release);
    }
    let journal = Journal::format(SimDisk::new(JOURNAL_LEN), UUID, first_record()).expect("format");
    let mut job =
        Job::new(journal, source.clone(), destination.clone(), sim_config()).expect("Job::new");
    job.start_workers().expect("workers");
    assert_eq!(job.wait_ready(Duration::from_secs(30)), JobPhase::Ready);
    let guest = job.guest();
    let stop = AtomicBool::new(false);
    let mut model = initial;
    let mut writes = 0u64;
    let (switched, took) = std::thread::scope(|scope| {
        let writer = scope.spawn(|| {
            let mut rng = Rng(15);
            let mut buf = vec![0u8; 4096];
            let give_up = Instant::now() + Duration::from_secs(20);
            // Random 4 KiB blocks: nothing merges in the queue.
            while !stop.load(Ordering::Acquire) && Instant::now() < give_up {
                let offset = rng.below(0..size / 4096) * 4096;
                rng.fill(&mut buf);
                guest.write(offset, &buf, false).expect("guest write");
                model[offset as usize..offset as usize + 4096].copy_from_slice(&buf);
                writes += 1;
            }
        });
        // Let the queue fill well past the window first.
        std::thread::sleep(Duration::from_millis(200));
        let started = Instant::now();
        let switched = job.switch();
        let took = started.elapsed();
        stop.store(true, Ordering::Release);
        writer.join().expect("writer");
        (switched, took)
    });
    println!("switch under a 4 KiB writer ({writes} writes) took {took:?}");
    switched.expect("switch");
    assert!(
        took < Duration::from_secs(5),
        "the switch took {took:?} under the writer"
    );
    assert_same(
        &destination.disk.live_bytes(),
        &model,
        "destination after the switch",
    );
}

/// Where the destination takes the pass's writes around its cache
/// (O_DIRECT), the pass queues nothing for write-back: nothing it wrote is
/// left dirty for the switch. Where it cannot, every copied range is
/// queued. Either way the destination ends equal to the source.
#[test]
fn the_pass_writes_around_the_cache_where_it_can_and_queues_the_rest() {
    for direct in [true, false] {
        let data = pattern(8, SIZE as usize);
        let source = RecordingWriteBack::new(SimDisk::from_bytes(data.clone()));
        let destination = if direct {
            RecordingWriteBack::direct(SimDisk::new(SIZE))
        } else {
            RecordingWriteBack::new(SimDisk::new(SIZE))
        };
        let journal_disk = SimDisk::new(JOURNAL_LEN);
        let journal = Journal::format(journal_disk.clone(), UUID, first_record()).expect("format");
        let mut job =
            Job::new(journal, source.clone(), destination.clone(), sim_config()).expect("Job::new");
        job.start_workers().expect("workers");
        assert_eq!(job.wait_ready(Duration::from_secs(30)), JobPhase::Ready);
        job.switch().expect("switch");
        let queued = destination.started.lock().unwrap().clone();
        if direct {
            assert!(destination.direct_writes.load(Ordering::Acquire) > 0);
            assert!(queued.is_empty(), "direct writes queued: {queued:?}");
        } else {
            assert!(destination.covered(0..SIZE), "queued only {queued:?}");
        }
        let mut copy = vec![0u8; SIZE as usize];
        destination.disk.read_at(0, &mut copy).expect("read");
        assert!(copy == data, "direct {direct}: the destination differs");
    }
}

/// A failed write-back of the source is a failed sync of the guest's only
/// durable copy (E5): the engine stops, and no flush is acknowledged after.
#[test]
fn a_failed_write_back_of_the_source_stops_the_engine() {
    let source = RecordingWriteBack::new(SimDisk::from_bytes(pattern(4, SIZE as usize)));
    let destination = RecordingWriteBack::new(SimDisk::new(SIZE));
    let journal_disk = SimDisk::new(JOURNAL_LEN);
    let journal = Journal::format(journal_disk.clone(), UUID, first_record()).expect("format");
    let mut job =
        Job::new(journal, source.clone(), destination.clone(), sim_config()).expect("Job::new");
    job.start_workers().expect("workers");
    assert_eq!(job.wait_ready(Duration::from_secs(30)), JobPhase::Ready);
    source.fail_wait.store(true, Ordering::Release);
    let guest = job.guest();
    guest.write(0, &[7; 4096], false).expect("cached write");
    // The write-back thread or the switch's drain meets the error.
    let _ = job.switch();
    let deadline = Instant::now() + Duration::from_secs(10);
    while job.status().phase != JobPhase::Failed && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(job.status().phase, JobPhase::Failed);
    assert!(guest.flush().is_err(), "a flush after a failed write-back");
}

// ---------------------------------------------------------------------------
// Liveness: Ready comes whichever worker clears the last bit.

/// Two copy steps at once, as two copy workers run them: one claims the
/// last run and stops inside its source read; the other finds nothing to
/// claim and leaves. The first one's step must make the job Ready: no
/// other step may ever come (a worker beyond `busy_workers` stands aside
/// for as long as the guest stays busy).
#[test]
fn the_step_that_clears_the_last_bit_makes_the_job_ready() {
    let source_gate = Arc::new(GateCtl::default());
    let source = Gate {
        disk: SimDisk::from_bytes(pattern(1, SIZE as usize)),
        ctl: Arc::clone(&source_gate),
    };
    let destination = Gate {
        disk: SimDisk::new(SIZE),
        ctl: Arc::default(),
    };
    let journal_disk = SimDisk::new(JOURNAL_LEN);
    let journal = Journal::format(journal_disk.clone(), UUID, first_record()).expect("format");
    let job = Job::new(journal, source, destination, sim_config()).expect("Job::new");
    let runs = SIZE / (2 * G);
    for _ in 1..runs {
        assert!(matches!(job.copy_step(), Ok(StepOutcome::Copied(_))));
    }
    assert_eq!(job.status().phase, JobPhase::Copying);
    source_gate.armed.store(true, Ordering::Release);
    std::thread::scope(|scope| {
        let last = scope.spawn(|| job.copy_step().expect("the last step"));
        assert!(
            source_gate.wait_paused(Duration::from_secs(10)),
            "the last step reached its source read"
        );
        assert_eq!(job.copy_step().expect("an idle step"), StepOutcome::Done);
        assert_eq!(
            job.status().phase,
            JobPhase::Copying,
            "one run is in flight"
        );
        source_gate.release();
        assert_eq!(last.join().expect("no panic"), StepOutcome::Copied(2 * G));
    });
    let status = job.status();
    assert_eq!(
        (status.phase, status.dirty_bytes),
        (JobPhase::Ready, 0),
        "the step that cleared the last dirty bit made the job Ready"
    );
    let recovered = journal::analyse(&journal_disk)
        .expect("journal")
        .outcome
        .expect("decided");
    assert_eq!(recovered.record.phase, Phase::Ready);
}

/// The copy workers run on their own while a guest writes without a pause
/// from before the pass starts until the job is Ready: the pass keeps
/// making progress (the busy worker never stands aside), Ready comes, and
/// the switch then hands over a destination equal to what the guest wrote.
/// (The race in which the worker that cleared the last bit stood aside is
/// pinned down deterministically by the test above; a busy guest from the
/// start keeps the extra workers out, so this one guards progress.)
#[test]
fn ready_comes_under_a_guest_that_never_pauses() {
    const GRANULES: u64 = 512;
    let size = GRANULES * G;
    let initial = pattern(7, size as usize);
    let source = SimDisk::from_bytes(initial.clone());
    let destination = SimDisk::new(size);
    let journal = Journal::format(SimDisk::new(JOURNAL_LEN), UUID, first_record()).expect("format");
    let config = Config {
        copy_workers: 3,
        busy_workers: 1,
        ..sim_config()
    };
    let mut job = Job::new(journal, source, destination.clone(), config).expect("Job::new");
    let guest = job.guest();
    let stop = AtomicBool::new(false);
    let mut model = initial;
    let mut writes = 0u64;
    let phase = std::thread::scope(|scope| {
        let writer = scope.spawn(|| {
            let mut rng = Rng(99);
            let mut buf = vec![0u8; 2 * G as usize];
            while !stop.load(Ordering::Acquire) {
                let offset = rng.below(0..size - buf.len() as u64);
                rng.fill(&mut buf);
                guest.write(offset, &buf, false).expect("guest write");
                model[offset as usize..offset as usize + buf.len()].copy_from_slice(&buf);
                writes += 1;
            }
        });
        // Let the guest be busy before the pass starts.
        std::thread::sleep(Duration::from_millis(30));
        job.start_workers().expect("workers");
        let phase = job.wait_ready(Duration::from_secs(60));
        stop.store(true, Ordering::Release);
        writer.join().expect("writer");
        phase
    });
    println!("ready under a busy guest after {writes} guest writes");
    assert_eq!(phase, JobPhase::Ready, "{:?}", job.status());
    assert!(writes > 0);
    job.switch().expect("switch");
    assert_same(
        &destination.live_bytes(),
        &model,
        "destination after the switch",
    );
}

// ---------------------------------------------------------------------------
// The switch's write-through window.

/// A plain guest write that fails with ENOSPC on the source while the
/// switch mirrors write-through: the guest gets the error, as it would
/// outside the window, and the job goes on to switch with equal images.
#[test]
fn a_write_error_in_the_write_through_window_goes_to_the_guest_and_the_switch_goes_on() {
    // Whether the failing write ran with write-through on depends on the
    // switch's first sync round being quick (under `SETTLED`); on a loaded
    // machine it may not be, and that attempt proves nothing: try again.
    for attempt in 1..=5 {
        if write_error_during_a_switch() {
            println!("write-through window reached at attempt {attempt}");
            return;
        }
    }
    panic!("in 5 switches the failing write never ran with write-through on");
}

/// One switch with a source write failing (ENOSPC) during it; checks the
/// outcome and returns whether the write ran in the write-through window.
fn write_error_during_a_switch() -> bool {
    let initial = pattern(1, SIZE as usize);
    let source = SyncHook::new(SimDisk::from_bytes(initial.clone()));
    let destination = SyncHook::new(SimDisk::new(SIZE));
    let journal_disk = SimDisk::new(JOURNAL_LEN);
    let journal = Journal::format(journal_disk.clone(), UUID, first_record()).expect("format");
    let job =
        Job::new(journal, source.clone(), destination.clone(), sim_config()).expect("Job::new");
    while job.copy_step().expect("step") != StepOutcome::Done {}
    assert_eq!(job.status().phase, JobPhase::Ready);
    let guest = job.guest();
    let outcome: Arc<Mutex<Option<livecopy::Result<()>>>> = Arc::default();
    let writer_outcome = Arc::clone(&outcome);
    let source_disk = source.disk.clone();
    let syncs_before = destination.syncs.load(Ordering::Acquire);
    let in_window = Arc::new(AtomicBool::new(false));
    let seen_in_window = Arc::clone(&in_window);
    let outcome_then = Arc::clone(&outcome);
    // A plain write in the switch's first sync round gives the
    // write-through round something to sync: the destination's second sync
    // runs with write-through on. The failing write runs on its own thread
    // (the hook holds the destination's sync lock, which the write's own
    // sync needs); the hook only waits for it to reach the source.
    *destination.hook.lock().unwrap() = Some(Box::new(move |n| {
        if n - syncs_before == 1 {
            guest
                .write(3 * G, &pattern(3, 100), false)
                .expect("a plain write in the first round");
            return;
        }
        if n - syncs_before == 3 {
            // In the window, the failing write's own destination sync is
            // the third, run while that write is still in flight; after
            // the window the third is the hold's, after it returned.
            let running = outcome_then.lock().unwrap().is_none();
            seen_in_window.store(running, Ordering::Release);
        }
        if n - syncs_before != 2 {
            return;
        }
        let ops = source_disk.ops();
        source_disk.fail_next_write(IoKind::StorageFull, 0);
        let guest = guest.clone();
        let writer_outcome = Arc::clone(&writer_outcome);
        std::thread::spawn(move || {
            let result = guest.write(5 * G, &pattern(5, G as usize), false);
            *writer_outcome.lock().unwrap() = Some(result);
        });
        assert!(
            wait_for(Duration::from_secs(10), || source_disk.ops() > ops),
            "the write reached the source"
        );
    }));
    let switched = job.switch();
    *destination.hook.lock().unwrap() = None;
    assert!(
        wait_for(Duration::from_secs(10), || outcome
            .lock()
            .unwrap()
            .is_some()),
        "the guest write returned"
    );
    let result = outcome.lock().unwrap().take().expect("outcome");
    let error = result.expect_err("the source write failed");
    assert!(
        error.describe().contains("os error 28"),
        "the guest gets ENOSPC: {}",
        error.describe()
    );
    let status = job.status();
    assert!(
        switched.is_ok(),
        "the switch goes on after a write error: {status:?}"
    );
    assert_eq!(status.phase, JobPhase::Switched, "{status:?}");
    // What the guest reads now is what it read before the switch: the
    // failed write left both images alike.
    assert_same(
        &destination.disk.live_bytes(),
        &source.disk.live_bytes(),
        "destination and source after the switch",
    );
    in_window.load(Ordering::Acquire)
}

// ---------------------------------------------------------------------------
// Panics never freeze the guest.

/// A storage that panics on a write (or its next sync) once armed, as a
/// failed thread spawn or a bug in a lower layer would: `skip` writes go
/// through first.
#[derive(Clone)]
struct Panicky {
    disk: SimDisk,
    write: Arc<AtomicBool>,
    skip: Arc<AtomicU64>,
    sync: Arc<AtomicBool>,
}

impl Panicky {
    fn new(disk: SimDisk) -> Self {
        Panicky {
            disk,
            write: Arc::default(),
            skip: Arc::default(),
            sync: Arc::default(),
        }
    }
}

impl Storage for Panicky {
    fn len(&self) -> std::io::Result<u64> {
        self.disk.len()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.disk.read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        if self.write.load(Ordering::Acquire)
            && self
                .skip
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
                .is_err()
        {
            self.write.store(false, Ordering::Release);
            panic!("injected write panic");
        }
        self.disk.write_at(offset, data)
    }
    fn sync_data(&self) -> std::io::Result<()> {
        assert!(
            !self.sync.swap(false, Ordering::AcqRel),
            "injected sync panic"
        );
        self.disk.sync_data()
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.disk.set_len(len)
    }
    fn punch_hole(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.disk.punch_hole(offset, len)
    }
}

/// Runs `f` on its own thread; `None` if it did not return in 20 s (the
/// thread is left behind: the test fails anyway).
fn within<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = sender.send(f());
    });
    receiver.recv_timeout(Duration::from_secs(20)).ok()
}

fn quietly<T>(f: impl FnOnce() -> T) -> std::thread::Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
}

/// A guest request that panics half-way is counted out of flight: the
/// next switch does not wait for it forever. Its write may be on one image
/// only, so the copy is abandoned (source authoritative), and the guest
/// carries on.
#[test]
fn a_panicking_guest_request_never_freezes_the_next_switch() {
    let source = Panicky::new(SimDisk::from_bytes(pattern(1, SIZE as usize)));
    let destination = Panicky::new(SimDisk::new(SIZE));
    let journal_disk = SimDisk::new(JOURNAL_LEN);
    let journal = Journal::format(journal_disk.clone(), UUID, first_record()).expect("format");
    let job = Arc::new(
        Job::new(journal, source.clone(), destination.clone(), sim_config()).expect("Job::new"),
    );
    while job.copy_step().expect("step") != StepOutcome::Done {}
    destination.write.store(true, Ordering::Release);
    let guest = job.guest();
    let panicked = quietly(|| guest.write(G, &pattern(3, 100), false));
    assert!(panicked.is_err(), "the injected panic surfaced");
    let status = job.status();
    assert_eq!(status.guest_in_flight, 0, "{status:?}");
    assert_eq!(status.phase, JobPhase::Aborted, "{status:?}");
    let switching = Arc::clone(&job);
    let switched = within(move || switching.switch().map(|r| r.seq));
    let switched = switched.expect("switch returned instead of waiting forever");
    assert!(switched.is_err(), "an aborted job does not switch");
    let guest = job.guest();
    let wrote = within(move || guest.write(2 * G, &pattern(4, 100), false).is_ok());
    assert_eq!(wrote, Some(true), "the guest carries on with the source");
    let recovered = journal::analyse(&journal_disk)
        .expect("journal")
        .outcome
        .expect("decided");
    assert_eq!(recovered.record.authoritative, Side::Source);
}

/// A panic inside the switch's hold (here in the journal's commit, before
/// its first copy and between its two copies) never leaves the guest held:
/// the engine stops and guest requests fail at once. Going on as Ready
/// would be wrong when the Switched record is already durable.
#[test]
fn a_panic_inside_the_switchs_hold_fails_the_engine_and_never_holds_the_guest() {
    for (skip, durable) in [(0, None), (1, Some(Side::Destination))] {
        let source = SimDisk::from_bytes(pattern(1, SIZE as usize));
        let destination = SimDisk::new(SIZE);
        let journal_disk = Panicky::new(SimDisk::new(JOURNAL_LEN));
        let journal = Journal::format(journal_disk.clone(), UUID, first_record()).expect("format");
        let job = Arc::new(Job::new(journal, source, destination, sim_config()).expect("Job::new"));
        while job.copy_step().expect("step") != StepOutcome::Done {}
        journal_disk.skip.store(skip, Ordering::Release);
        journal_disk.write.store(true, Ordering::Release);
        let panicked = quietly(|| job.switch().map(|r| r.seq));
        assert!(
            panicked.is_err(),
            "skip {skip}: the injected panic surfaced"
        );
        assert_eq!(job.status().phase, JobPhase::Failed, "skip {skip}");
        let guest = job.guest();
        let read = within(move || {
            let mut buf = vec![0u8; 100];
            guest.read(0, &mut buf).map(|()| buf)
        });
        let read = read.expect("a guest read returned instead of waiting at the door");
        let error = read.expect_err("a stopped engine answers nothing");
        assert_eq!(error.kind(), ErrorKind::Poisoned, "skip {skip}");
        let verdict = journal::analyse(&journal_disk.disk)
            .expect("journal")
            .outcome
            .expect("decided");
        if let Some(side) = durable {
            assert_eq!(verdict.record.authoritative, side, "skip {skip}");
        }
    }
}

// ---------------------------------------------------------------------------
// Durable progress and write intent (resume after a crash).

/// A guest write that lands while a checkpoint syncs (after its boundary)
/// is not covered by that sync: the checkpoint's record must still list
/// its extent (R2), or a crash right after would leave a resumed job
/// trusting a destination that may lack the write. An extent not written
/// for a whole interval leaves the list.
#[test]
fn a_write_during_a_checkpoint_stays_listed_in_its_record() {
    let size = 8 * G;
    let source = SyncHook::new(SimDisk::from_bytes(pattern(2, size as usize)));
    let destination = SyncHook::new(SimDisk::new(size));
    let journal_disk = SimDisk::new(JOURNAL_LEN);
    let journal = Journal::format(journal_disk.clone(), UUID, first_record()).expect("format");
    // Four extents of two granules.
    let config = Config {
        extent_size: 2 * G,
        ..sim_config()
    };
    let job = Job::new(journal, source.clone(), destination.clone(), config).expect("Job::new");
    while job.copy_step().expect("step") != StepOutcome::Done {}
    job.checkpoint().expect("checkpoint");
    let progress = job.durable_progress();
    assert_eq!(progress.cursor, size, "{progress:?}");
    assert!(progress.runs.is_empty(), "{progress:?}");
    let guest = job.guest();
    guest.write(0, &[1; 512], false).expect("write");
    assert!(
        job.durable_progress().lists(0),
        "an extent below the cursor is listed before its first write"
    );
    let hook_guest = guest.clone();
    *destination.hook.lock().unwrap() = Some(Box::new(move |_| {
        hook_guest
            .write(6 * G, &[2; 512], false)
            .expect("write during the checkpoint");
    }));
    job.checkpoint().expect("checkpoint");
    *destination.hook.lock().unwrap() = None;
    let progress = job.durable_progress();
    assert!(
        progress.lists(3),
        "the write during the checkpoint: {progress:?}"
    );
    assert!(
        progress.lists(0),
        "written in the interval before: {progress:?}"
    );
    // One more checkpoint with no writes: extent 0 was synced two
    // boundaries ago and leaves; 3 stays one interval more; then none.
    job.checkpoint().expect("checkpoint");
    let progress = job.durable_progress();
    assert!(progress.lists(3) && !progress.lists(0), "{progress:?}");
    job.checkpoint().expect("checkpoint");
    let progress = job.durable_progress();
    assert!(progress.runs.is_empty(), "{progress:?}");
    let recorded = journal::analyse(&journal_disk)
        .expect("journal")
        .outcome
        .expect("decided")
        .record
        .progress();
    assert_eq!(
        recorded,
        Some(progress),
        "the journal says what the job says"
    );
}

/// A job that does not keep progress (checkpoints off), taking over a
/// journal whose record carries an earlier run's progress, plans from it
/// but clears it at once: a crash of this job must not resume from a list
/// it never kept up. A job that does keep progress keeps it.
#[test]
fn a_job_without_checkpoints_clears_an_earlier_runs_progress() {
    let size = 8 * G;
    for checkpoints in [false, true] {
        let source = SimDisk::from_bytes(pattern(4, size as usize));
        let destination = SimDisk::new(size);
        let journal_disk = SimDisk::new(JOURNAL_LEN);
        let mut journal =
            Journal::format(journal_disk.clone(), UUID, first_record()).expect("format");
        let earlier = journal::Progress::with_extents(2 * G, size, 4 * G, [1]);
        journal
            .commit_progress(Phase::Copying, 0, Some(&earlier))
            .expect("commit");
        let config = Config {
            extent_size: 2 * G,
            checkpoints,
            ..sim_config()
        };
        let job = Job::new(journal, source, destination, config).expect("Job::new");
        assert_eq!(
            job.status().to_copy,
            earlier.bytes_to_copy(),
            "the plan follows the recorded progress"
        );
        let recorded = journal::analyse(&journal_disk)
            .expect("journal")
            .outcome
            .expect("decided")
            .record
            .progress();
        if checkpoints {
            assert_eq!(recorded, Some(earlier), "kept");
        } else {
            assert_eq!(recorded, None, "cleared before any guest write");
        }
    }
}
