//! Resume under concurrency and at the edges: many guest threads, copy
//! workers and checkpoints racing a crash; writes waiting (or not) for
//! another extent's journal commit; the switch's pause with checkpoints
//! running; progress beside long export names; a resume with a larger
//! granularity than the recorded extents.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use livecopy::engine::resume::{Resumable, ResumeCopy};
use livecopy::engine::{Config, Job, JobPhase, StepOutcome};
use livecopy::journal::format::JOURNAL_LEN;
use livecopy::journal::{self, Journal, Phase};
use livecopy::storage::{CrashClock, SimDisk, Storage, WriteFate};

use crate::support::{UUID, first_record};

const BLOCK: usize = 4096;
const BLOCKS: usize = 256;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 17
    }
}

fn config() -> Config {
    Config {
        granularity: 4096,
        chunk_size: 8192,
        copy_workers: 2,
        busy_workers: 2,
        extent_size: 8192,
        checkpoint_every: Duration::from_micros(200),
        guest_grace: Duration::from_micros(50),
        ..Config::default()
    }
}

fn resume_and_check(
    source: SimDisk,
    destination: SimDisk,
    journal_disk: SimDisk,
    what: &str,
) -> bool {
    let Ok(recovered) = journal::analyse(&journal_disk).expect("readable").outcome else {
        return false;
    };
    if !matches!(recovered.record.phase, Phase::Copying | Phase::Ready) {
        return false;
    }
    let resumable =
        Resumable::take_over(journal_disk.clone(), &recovered, |_| Ok(())).expect("take over");
    let recorded = resumable.record().progress();
    let cfg = Config {
        copy_workers: 1,
        ..config()
    };
    let job = resumable
        .start(
            source.clone(),
            destination.clone(),
            cfg,
            ResumeCopy::Remaining,
        )
        .expect("resume");
    while job.copy_step().expect("step") != StepOutcome::Done {}
    assert_eq!(job.status().phase, JobPhase::Ready);
    job.switch().expect("switch");
    let (s, d) = (source.live_bytes(), destination.live_bytes());
    if s[..] != d[..s.len()] {
        let first = (0..s.len()).find(|&i| s[i] != d[i]).unwrap();
        panic!(
            "{what}: destination differs from source at byte {first} (block {}); progress {recorded:?}",
            first / BLOCK
        );
    }
    recorded.is_some()
}

/// Concurrent guest writers (cached, FUA, zeroes, discards, flushes), two
/// copy workers, the checkpoint thread and back-to-back checkpoints, the
/// odd switch; a crash at a random storage call; under every fate the
/// resumed job ends with a destination equal to the source.
#[test]
fn concurrent_crash_resume_stress() {
    let iterations: u64 = std::env::var("LIVECOPY_RESUME_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let mut with_progress = 0;
    let mut rng = Rng(0xfeed);
    for it in 0..iterations {
        let clock = CrashClock::new();
        let mut image = vec![0u8; BLOCK * BLOCKS];
        for (i, b) in image.iter_mut().enumerate() {
            *b = (i / BLOCK) as u8 ^ 0x5a;
        }
        let source = SimDisk::from_bytes(image).with_clock(&clock);
        let destination = SimDisk::on_clock(&clock, (BLOCK * BLOCKS) as u64);
        let journal_disk = SimDisk::on_clock(&clock, JOURNAL_LEN);
        let journal = Journal::format(journal_disk.clone(), UUID, first_record()).expect("format");
        let crash = 50 + rng.next() % 1500;
        clock.crash_at(clock.ops() + crash);
        let mut job =
            Job::new(journal, source.clone(), destination.clone(), config()).expect("new");
        job.start_workers().expect("workers");
        let stop = AtomicBool::new(false);
        std::thread::scope(|scope| {
            for w in 0..3u64 {
                let guest = job.guest();
                let stop = &stop;
                let seed = it * 7 + w;
                scope.spawn(move || {
                    let mut r = Rng(seed);
                    let mut buf = vec![0u8; 2 * BLOCK];
                    while !stop.load(Ordering::Acquire) {
                        let b = (r.next() % (BLOCKS as u64 - 2)) * BLOCK as u64;
                        let len = if r.next().is_multiple_of(3) {
                            2 * BLOCK
                        } else {
                            BLOCK
                        } as u64;
                        let off = b + (r.next() % 2) * 512;
                        buf.iter_mut().for_each(|x| *x = r.next() as u8);
                        let _ = match r.next() % 10 {
                            0 => guest.write_zeroes(off, len, false),
                            1 => guest.discard(b, len),
                            2 => guest.write(off, &buf[..len as usize], true),
                            3 => guest.flush(),
                            _ => guest.write(off, &buf[..len as usize], false),
                        };
                    }
                });
            }
            let job_ref = &job;
            let stop2 = &stop;
            scope.spawn(move || {
                while !stop2.load(Ordering::Acquire) {
                    let _ = job_ref.checkpoint();
                    std::thread::yield_now();
                }
            });
            let deadline = Instant::now() + Duration::from_secs(5);
            while !clock.is_crashed() && Instant::now() < deadline {
                if job.status().phase == JobPhase::Ready && rng.next().is_multiple_of(50) {
                    let _ = job.switch();
                }
                std::thread::sleep(Duration::from_micros(200));
            }
            stop.store(true, Ordering::Release);
        });
        drop(job);
        type Fate = (&'static str, fn(&SimDisk) -> SimDisk);
        let fates: [Fate; 4] = [
            ("process", |d| d.after_process_crash()),
            ("drop-all", |d| d.after_power_loss(|_, _| WriteFate::Drop)),
            ("keep-all", |d| d.after_power_loss(|_, _| WriteFate::Apply)),
            ("alternate", |d| {
                d.after_power_loss(|i, _| {
                    if i % 2 == 0 {
                        WriteFate::Apply
                    } else {
                        WriteFate::Drop
                    }
                })
            }),
        ];
        for (name, fate) in fates {
            let what = format!("iteration {it}, crash at {crash}, fate {name}");
            if resume_and_check(
                fate(&source),
                fate(&destination),
                fate(&journal_disk),
                &what,
            ) {
                with_progress += 1;
            }
        }
    }
    println!(
        "resume races: {iterations} crashed runs x 4 fates resumed, {with_progress} from \
         recorded progress"
    );
    assert!(with_progress > iterations, "progress was rarely recorded");
}

use livecopy::journal::{ExportRecord, ImageRef, Record};

fn export(uri_len: usize, name_len: usize, c: char) -> ImageRef {
    let name = c.to_string().repeat(name_len);
    let mut uri = format!("nbd+unix:///{name}?socket=/run/");
    while uri.len() < uri_len {
        uri.push('s');
    }
    ImageRef::Export(ExportRecord {
        uri,
        export: name,
        size: (BLOCK * BLOCKS) as u64,
        tls: false,
    })
}

/// A job over two exports with long (allowed) URIs: its checkpoints and
/// listings carry fewer, wider runs, or none, but never fail the engine.
#[test]
fn long_export_names_never_fail_a_checkpoint() {
    let first = Record::single(
        crate::support::JOB_ID,
        Phase::Copying,
        export(1000, 700, 'a'),
        export(1000, 700, 'b'),
        *b"writer-instance1",
        1,
        0,
        1_700_000_000_000_000_000,
    );
    let journal = Journal::format(SimDisk::new(JOURNAL_LEN), UUID, first)
        .expect("a job over these exports starts");
    let source = SimDisk::from_bytes(vec![7u8; BLOCK * BLOCKS]);
    let destination = SimDisk::new((BLOCK * BLOCKS) as u64);
    let cfg = Config {
        copy_workers: 1,
        ..config()
    };
    let job = Job::new(journal, source, destination, cfg).expect("new");
    // Scatter 40 guest writes below the cursor so the list is coarsened to 32 runs.
    for _ in 0..3 {
        job.copy_step().expect("step");
    }
    let r1 = job.checkpoint();
    r1.expect("first checkpoint");
    while job.copy_step().expect("step") != StepOutcome::Done {}
    let guest = job.guest();
    let mut results = Vec::new();
    for i in 0..40u64 {
        results.push(
            guest
                .write(i * 3 * 8192, &[1u8; 512], false)
                .map_err(|e| e.to_string()),
        );
    }
    let r = job.checkpoint();
    println!(
        "checkpoint: {r:?}; writes: {:?}",
        results
            .iter()
            .filter(|r| r.is_err())
            .take(2)
            .collect::<Vec<_>>()
    );
    println!("runs {}", job.durable_progress().runs.len());
    let status = job.status();
    println!("phase {:?} reason {:?}", status.phase, status.reason);
    assert_ne!(
        status.phase,
        JobPhase::Failed,
        "the engine failed: {:?}",
        status.reason
    );
}

/// A journal whose syncs can be slowed (30 ms each), held at a gate
/// (saying when one waits there), or made to panic.
#[derive(Clone, Default)]
struct SlowJournal {
    disk: SimDisk,
    slow: Arc<AtomicBool>,
    gate: Arc<AtomicBool>,
    waiting: Arc<AtomicBool>,
    panic: Arc<AtomicBool>,
}
impl Storage for SlowJournal {
    fn len(&self) -> std::io::Result<u64> {
        self.disk.len()
    }
    fn read_at(&self, o: u64, b: &mut [u8]) -> std::io::Result<()> {
        self.disk.read_at(o, b)
    }
    fn write_at(&self, o: u64, d: &[u8]) -> std::io::Result<()> {
        self.disk.write_at(o, d)
    }
    fn sync_data(&self) -> std::io::Result<()> {
        if self.gate.load(Ordering::Acquire) {
            self.waiting.store(true, Ordering::Release);
            while self.gate.load(Ordering::Acquire) {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        assert!(
            !self.panic.load(Ordering::Acquire),
            "the journal's sync panics"
        );
        if self.slow.load(Ordering::Acquire) {
            std::thread::sleep(Duration::from_millis(30));
        }
        self.disk.sync_data()
    }
    fn set_len(&self, l: u64) -> std::io::Result<()> {
        self.disk.set_len(l)
    }
    fn punch_hole(&self, o: u64, l: u64) -> std::io::Result<()> {
        self.disk.punch_hole(o, l)
    }
}

/// A job with `extent_size` extents whose pass is done and checkpointed,
/// over a journal the test controls; the source holds `image()`.
fn copied_over_a_slow_journal(extent_size: u64) -> (Job<SimDisk, SlowJournal>, SlowJournal) {
    let jd = SlowJournal {
        disk: SimDisk::new(JOURNAL_LEN),
        ..SlowJournal::default()
    };
    let journal = Journal::format(jd.clone(), UUID, first_record()).expect("format");
    let source = SimDisk::from_bytes(image());
    let destination = SimDisk::new((BLOCK * BLOCKS) as u64);
    let cfg = Config {
        copy_workers: 1,
        extent_size,
        checkpoint_every: Duration::from_secs(3600),
        ..config()
    };
    let job = Job::new(journal, source, destination, cfg).expect("new");
    while job.copy_step().expect("step") != StepOutcome::Done {}
    job.checkpoint().expect("checkpoint");
    (job, jd)
}

fn image() -> Vec<u8> {
    (0..BLOCK * BLOCKS)
        .map(|i| (i / 512) as u8 ^ 0x5a)
        .collect()
}

/// Extent 0 listed by the newest record, then clean: the next checkpoint
/// drops it.
fn listed_then_clean(job: &Job<SimDisk, SlowJournal>) {
    job.guest().write(0, &[1u8; 512], false).expect("write");
    job.checkpoint().expect("checkpoint");
    assert!(
        job.durable_progress().lists(0),
        "{:?}",
        job.durable_progress()
    );
}

/// What a guest write to extent 0 meets while a checkpoint's journal sync
/// is held at the gate.
struct HeldCheckpoint {
    /// The write had not returned when the gate opened.
    waited: bool,
    /// The checkpoint's outcome (`Err` when it panicked).
    checkpoint: std::thread::Result<livecopy::Result<bool>>,
    /// The write's outcome.
    write: livecopy::Result<()>,
}

/// Holds the next journal sync at the gate, runs a checkpoint into it,
/// writes to extent 0 meanwhile, then opens the gate. A write still
/// waiting 30 s later fails the test rather than hanging it.
fn write_while_a_checkpoint_is_held(
    job: &Job<SimDisk, SlowJournal>,
    jd: &SlowJournal,
) -> HeldCheckpoint {
    jd.gate.store(true, Ordering::Release);
    std::thread::scope(|s| {
        let checkpoint = s.spawn(|| job.checkpoint());
        while !jd.waiting.load(Ordering::Acquire) {
            std::thread::sleep(Duration::from_millis(1));
        }
        let guest = job.guest();
        let (sent, written) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = sent.send(guest.write(0, &[9u8; 512], false));
        });
        std::thread::sleep(Duration::from_millis(50));
        let waited = written.try_recv().is_err();
        jd.gate.store(false, Ordering::Release);
        let write = written
            .recv_timeout(Duration::from_secs(30))
            .expect("the write waiting for the checkpoint never returned");
        HeldCheckpoint {
            waited,
            checkpoint: checkpoint.join(),
            write,
        }
    })
}

/// A checkpoint drops extent 0 and its commit fails after the record's
/// first copy is durable, while a guest write to extent 0 waits for it.
/// The write must fail: going on, it would reach the images covered only
/// by the older record, and a crash may leave the failed one, which does
/// not list extent 0.
#[test]
fn a_failed_checkpoint_commit_fails_the_write_waiting_for_it() {
    let (job, jd) = copied_over_a_slow_journal(8192);
    listed_then_clean(&job);
    jd.disk.fail_next_sync(true);
    let held = write_while_a_checkpoint_is_held(&job, &jd);
    println!(
        "checkpoint: {:?}; the write that waited: {:?}",
        held.checkpoint, held.write
    );
    assert!(held.waited, "the write waits for the commit");
    assert!(held.checkpoint.expect("no panic").is_err());
    assert!(held.write.is_err(), "a write went on past a failed commit");
    assert_eq!(job.status().phase, JobPhase::Failed);
    // Whichever record the crash leaves, the resume makes the images equal.
    let (source, destination) = (job.source().clone(), job.destination().clone());
    drop(job);
    resume_and_check(
        source.after_process_crash(),
        destination.after_process_crash(),
        jd.disk.after_process_crash(),
        "after the failed commit",
    );
}

/// A commit that panics ends like a failed one: the writer waiting for
/// it gets an error instead of waiting forever (a panic never freezes
/// the guest). A write still waiting after 30 s fails the test.
#[test]
fn a_panicking_commit_never_leaves_a_writer_waiting() {
    let (job, jd) = copied_over_a_slow_journal(8192);
    listed_then_clean(&job);
    jd.panic.store(true, Ordering::Release);
    let held = write_while_a_checkpoint_is_held(&job, &jd);
    println!(
        "the write that waited for a panicking commit: {:?}",
        held.write
    );
    assert!(held.checkpoint.is_err(), "the commit panicked");
    assert!(held.write.is_err());
    assert_eq!(job.status().phase, JobPhase::Failed);
    // Nothing may supersede the record that may be on the journal.
    jd.panic.store(false, Ordering::Release);
    assert!(job.guest().write(16384, &[3u8; 512], false).is_err());
}

/// A write to an extent the newest record lists, which a checkpoint in
/// flight drops, waits for that commit and then commits it again: either
/// record may be the newest after a crash.
#[test]
fn a_listed_write_waits_for_a_checkpoint_that_drops_its_extent() {
    let (job, jd) = copied_over_a_slow_journal(8192);
    listed_then_clean(&job);
    let held = write_while_a_checkpoint_is_held(&job, &jd);
    assert!(held.waited, "went on while the commit dropping it ran");
    held.checkpoint.expect("no panic").expect("checkpoint");
    held.write.expect("write");
    assert!(
        job.durable_progress().lists(0),
        "{:?}",
        job.durable_progress()
    );
}

/// The first checkpoint of a resumed 1 TiB sparse job whose record lists
/// 90% of the image: it checks each listed extent's own granules under the
/// intent lock, never the bitmap's tail (which held guest writes for 7 s).
/// A liveness bound, far above the milliseconds it takes.
#[test]
fn a_resumed_terabyte_checkpoint_never_stalls_guest_writes() {
    use livecopy::journal::Progress;
    use livecopy::storage::FileStorage;
    let dir = tempfile::tempdir().expect("tempdir");
    let size = 1u64 << 40;
    let s = FileStorage::create_image(&dir.path().join("s"), size).expect("source");
    let d = FileStorage::create_image(&dir.path().join("d"), size).expect("destination");
    // The smallest granularity: the most granules per listed extent.
    let cfg = Config {
        granularity: 4096,
        ..Config::default()
    };
    let e = cfg.extent_size;
    let cursor = size / 10 * 9 / e * e;
    let progress = Progress::with_extents(e, size, cursor, 0..cursor / e);
    let mut j = Journal::format(SimDisk::new(JOURNAL_LEN), UUID, first_record()).expect("format");
    j.commit_progress(Phase::Copying, 0, Some(&progress))
        .expect("progress");
    let job = Job::new(j, s, d, cfg).expect("new");
    let guest = job.guest();
    let stop = AtomicBool::new(false);
    let worst = AtomicU64::new(0);
    std::thread::scope(|sc| {
        sc.spawn(|| {
            while !stop.load(Ordering::Acquire) {
                let t = Instant::now();
                guest.write(4096, &[1u8; 512], false).expect("write");
                worst.fetch_max(t.elapsed().as_micros() as u64, Ordering::AcqRel);
            }
        });
        std::thread::sleep(Duration::from_millis(50));
        let t = Instant::now();
        job.checkpoint().expect("checkpoint");
        println!("checkpoint of a resumed 1 TiB job took {:?}", t.elapsed());
        stop.store(true, Ordering::Release);
    });
    let worst = worst.load(Ordering::Acquire);
    println!("longest write to a listed extent meanwhile: {worst} us");
    assert!(
        worst < 1_000_000,
        "a guest write waited {worst} us on the boundary"
    );
}

/// A guest write to an extent already listed never waits for the journal
/// commit that lists another extent (with 30 ms syncs, a commit takes 60).
#[test]
fn a_listed_write_never_waits_for_another_extents_commit() {
    let (job, jd) = copied_over_a_slow_journal(65536);
    let guest = job.guest();
    guest.write(0, &[1u8; 512], false).expect("listed now");
    jd.slow.store(true, Ordering::Release);
    let max = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(Ordering::Acquire) {
                let t = Instant::now();
                guest.write(4096, &[2u8; 512], false).expect("write");
                max.fetch_max(t.elapsed().as_micros() as u64, Ordering::AcqRel);
            }
        });
        std::thread::sleep(Duration::from_millis(20));
        let t = Instant::now();
        guest
            .write(5 * 65536, &[3u8; 512], false)
            .expect("unlisted");
        println!("write to an unlisted extent took {:?}", t.elapsed());
        std::thread::sleep(Duration::from_millis(20));
        stop.store(true, Ordering::Release);
    });
    let m = max.load(Ordering::Acquire);
    println!("longest write to the listed extent 0 meanwhile: {m} us");
    assert!(
        m < 20_000,
        "a write to a listed extent waited {m} us for another extent's journal commit"
    );
}

/// Checkpoints running back to back and guest writes listing new extents
/// add no journal commit to the switch's hold beyond its own.
#[test]
fn the_switch_pause_holds_no_commit_but_its_own() {
    let (job, jd) = copied_over_a_slow_journal(8192);
    let guest = job.guest();
    jd.slow.store(true, Ordering::Release);
    let stop = AtomicBool::new(false);
    let pause = std::thread::scope(|s| {
        s.spawn(|| {
            let mut i = 0u64;
            while !stop.load(Ordering::Acquire) {
                // A write to another extent each time: every checkpoint has
                // something new to record.
                let _ = guest.write((i % 100) * 8192, &[1u8; 512], false);
                i += 1;
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        s.spawn(|| {
            while !stop.load(Ordering::Acquire) {
                let _ = job.checkpoint();
            }
        });
        std::thread::sleep(Duration::from_millis(200));
        let report = job.switch().expect("switch");
        stop.store(true, Ordering::Release);
        report.pause
    });
    println!("switch pause with a 60 ms journal commit: {pause:?}");
    assert!(
        pause < Duration::from_millis(90),
        "pause {pause:?}: more than the Switched commit"
    );
}

/// A resumed job whose granularity is larger than the recorded extent
/// size: a guest write to an unlisted extent that shares a dirty granule
/// with a listed one reaches the source only; it stays listed while the
/// granule is dirty, so a crash and a second resume still copy it.
#[test]
fn a_source_only_write_stays_listed_while_its_granule_is_dirty() {
    use livecopy::journal::Progress;
    let size = (BLOCK * BLOCKS) as u64;
    let image: Vec<u8> = (0..size as usize).map(|i| (i / 512) as u8).collect();
    let source = SimDisk::from_bytes(image.clone());
    let mut dimg = image.clone();
    dimg[3 * 8192..4 * 8192].fill(0xee); // extent 3 may differ
    let destination = SimDisk::from_bytes(dimg);
    let journal_disk = SimDisk::new(JOURNAL_LEN);
    let mut journal = Journal::format(journal_disk.clone(), UUID, first_record()).expect("format");
    let progress = Progress::with_extents(8192, size, size, [3]);
    journal
        .commit_progress(Phase::Copying, 0, Some(&progress))
        .expect("progress");
    drop(journal);
    // The resume, with a 64 KiB granularity (the library allows it).
    let resume = |g: u64, journal_disk: &SimDisk, s: &SimDisk, d: &SimDisk| {
        let recovered = journal::analyse(journal_disk).unwrap().outcome.unwrap();
        let recorded = recovered.record.progress();
        let mut j = Journal::resume(journal_disk.clone(), &recovered).unwrap();
        j.commit_progress(Phase::Copying, 0, recorded.as_ref())
            .unwrap();
        let cfg = Config {
            granularity: g,
            chunk_size: g,
            extent_size: g.max(8192),
            copy_workers: 1,
            ..config()
        };
        Job::new(j, s.clone(), d.clone(), cfg).unwrap()
    };
    let job = resume(65536, &journal_disk, &source, &destination);
    let guest = job.guest();
    guest
        .write(0, &[0x77; 512], false)
        .expect("write to extent 0");
    println!("after the write: {:?}", job.durable_progress());
    for _ in 0..3 {
        job.checkpoint().expect("checkpoint");
        println!("checkpoint: {:?}", job.durable_progress());
    }
    drop(guest);
    drop(job);
    // Process crash; resume again (any granularity) and finish.
    let (s, d, jd) = (
        source.after_process_crash(),
        destination.after_process_crash(),
        journal_disk.after_process_crash(),
    );
    let job = resume(4096, &jd, &s, &d);
    while job.copy_step().unwrap() != StepOutcome::Done {}
    job.switch().unwrap();
    let (sb, db) = (s.live_bytes(), d.live_bytes());
    assert!(
        sb == db,
        "destination differs at byte {:?}",
        (0..sb.len()).find(|&i| sb[i] != db[i])
    );
}
