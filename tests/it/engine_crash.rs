//! The crash property of the whole engine, on simulated disks.
//!
//! A deterministic driver (no threads) interleaves guest writes, force-unit-
//! access writes, write-zeroes, discards, flushes and reads with copy steps,
//! switch, complete and abort. The source, the destination and the journal
//! are simulated disks on one crash clock, so a crash stops all three at the
//! same storage call. A probe run counts the calls; then the process dies at
//! each call in turn, the disks lose power (or only the process dies), and:
//!
//! 1. recovery reads the journal and names an image (never refuses: one
//!    crash is not ambiguous);
//! 2. in that image, every block holds the value of the last write made
//!    durable by a completed flush or FUA write, or a later submitted one;
//!    after a process crash, the last acknowledged value or a later one;
//!    never an older value, never garbage;
//! 3. so no acknowledged write went to the destination alone before the
//!    Switched record was durable (it would be missing from the source,
//!    which recovery names until then).
//!
//! A second run treats the destination as an NBD export: `RemoteDrop`
//! crashes the remote side (its unflushed writes are lost; every later call
//! fails, as a connection that is gone) while the engine runs on. The same
//! property must hold at every later crash point: before the switch the job
//! aborts with the source complete; after it, nothing the remote side lost
//! was acknowledged as durable.

use std::sync::{Arc, Mutex};

use std::sync::atomic::{AtomicU64, Ordering};

use livecopy::engine::StepOutcome;
use livecopy::engine::resume::{Resumable, ResumeCopy};
use livecopy::engine::{Config, Job, JobPhase};
use livecopy::journal::format::JOURNAL_LEN;
use livecopy::journal::{self, Journal, Phase, Side};
use livecopy::storage::{CrashClock, SectorFate, SimDisk, Storage, WriteFate};
use proptest::prelude::*;
use proptest::test_runner::{Config as RunnerConfig, TestRunner};

use crate::support::{UUID, first_record};

const BLOCK: usize = 4096;
const BLOCKS: usize = 12;

#[derive(Debug, Clone, Copy)]
pub enum Op {
    Write {
        block: u8,
        fua: bool,
    },
    Zeroes {
        block: u8,
    },
    Discard {
        block: u8,
    },
    Flush,
    Read {
        block: u8,
    },
    Step,
    Switch,
    Complete,
    Abort,
    /// A checkpoint of the copy's progress (resume after a crash).
    Checkpoint,
    /// The remote side of the destination crashes (export runs only).
    RemoteDrop,
}

fn op() -> impl Strategy<Value = Op> {
    op_with(0)
}

fn op_with(remote_drop: u32) -> impl Strategy<Value = Op> {
    let block = 0..BLOCKS as u8;
    prop_oneof![
        remote_drop => Just(Op::RemoteDrop),
        6 => (block.clone(), any::<bool>()).prop_map(|(block, fua)| Op::Write { block, fua }),
        1 => block.clone().prop_map(|block| Op::Zeroes { block }),
        1 => block.clone().prop_map(|block| Op::Discard { block }),
        2 => Just(Op::Flush),
        1 => block.prop_map(|block| Op::Read { block }),
        4 => Just(Op::Step),
        2 => Just(Op::Switch),
        1 => Just(Op::Complete),
        // prop_oneof! takes at most ten arms with a zero weight among them.
        3 => prop_oneof![1 => Just(Op::Abort), 2 => Just(Op::Checkpoint)],
    ]
}

/// The bytes of value `id`: the id, then a fill derived from it; 0 is zeros.
fn block_bytes(id: u64) -> Vec<u8> {
    if id == 0 {
        return vec![0; BLOCK];
    }
    let mut bytes = vec![(id % 251) as u8 + 1; BLOCK];
    bytes[..8].copy_from_slice(&id.to_le_bytes());
    bytes
}

/// The value a block holds, or `None` for garbage.
fn value_of(bytes: &[u8]) -> Option<u64> {
    let id = u64::from_le_bytes(bytes[..8].try_into().unwrap());
    (bytes == block_bytes(id).as_slice()).then_some(id)
}

/// Per block: every value submitted, in order, and the indexes of the last
/// acknowledged one and of the last one made durable.
#[derive(Clone)]
struct BlockModel {
    values: Vec<u64>,
    acked: usize,
    durable: usize,
}

/// A disk that behaves as an NBD export can: once dropped, its unflushed
/// writes are gone and every call fails (the connection is lost; reconnects
/// come only after the switch, and are not modelled: the failure is the
/// harder case). The source is one too, never dropped, so that both images
/// have one type.
#[derive(Clone)]
struct Remote {
    disk: SimDisk,
    /// The remote side's contents after its crash, once it crashed.
    dropped: Arc<Mutex<Option<SimDisk>>>,
}

impl Remote {
    fn new(disk: SimDisk) -> Self {
        Remote {
            disk,
            dropped: Arc::default(),
        }
    }

    fn drop_remote(&self) {
        let mut dropped = self.dropped.lock().unwrap();
        if dropped.is_none() {
            *dropped = Some(self.disk.after_power_loss(|_, _| WriteFate::Drop));
        }
    }

    /// What the image holds now: the remote side's contents if it crashed.
    fn image(&self) -> SimDisk {
        self.dropped
            .lock()
            .unwrap()
            .clone()
            .unwrap_or_else(|| self.disk.clone())
    }

    fn up(&self) -> std::io::Result<()> {
        if self.dropped.lock().unwrap().is_some() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionAborted,
                "the export's server is gone",
            ));
        }
        Ok(())
    }
}

impl Storage for Remote {
    fn len(&self) -> std::io::Result<u64> {
        self.up()?;
        self.disk.len()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.up()?;
        self.disk.read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.up()?;
        self.disk.write_at(offset, data)
    }
    fn write_durable_at(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.up()?;
        self.disk.write_durable_at(offset, data)
    }
    fn sync_data(&self) -> std::io::Result<()> {
        self.up()?;
        self.disk.sync_data()
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.up()?;
        self.disk.set_len(len)
    }
    fn punch_hole(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.up()?;
        self.disk.punch_hole(offset, len)
    }
    fn next_data(&self, offset: u64) -> std::io::Result<Option<std::ops::Range<u64>>> {
        self.up()?;
        self.disk.next_data(offset)
    }
}

struct Outcome {
    source: SimDisk,
    destination: SimDisk,
    journal: SimDisk,
    model: Vec<BlockModel>,
    /// The cursor of the last checkpoint that returned.
    checkpointed: u64,
}

fn initial(block: usize) -> u64 {
    // A third of the disk starts as zeros, the rest with data.
    if block % 3 == 2 {
        0
    } else {
        1_000 + block as u64
    }
}

fn config() -> Config {
    Config {
        granularity: 4096,
        chunk_size: 8192,
        copy_workers: 1,
        // Two blocks per extent: writes, checkpoints and resumes meet
        // extents listed, unlisted, below and above the cursor.
        extent_size: 8192,
        ..Config::default()
    }
}

/// Runs `ops`, crashing at storage call `crash_at` if given.
fn drive(ops: &[Op], crash_at: Option<u64>) -> Outcome {
    let clock = CrashClock::new();
    let mut image = Vec::with_capacity(BLOCK * BLOCKS);
    for b in 0..BLOCKS {
        image.extend(block_bytes(initial(b)));
    }
    let source = Remote::new(SimDisk::from_bytes(image).with_clock(&clock));
    let destination = Remote::new(SimDisk::on_clock(&clock, (BLOCK * BLOCKS) as u64));
    let journal_disk = SimDisk::on_clock(&clock, JOURNAL_LEN);
    let journal = Journal::format(journal_disk.clone(), UUID, first_record()).expect("format");
    let mut model: Vec<BlockModel> = (0..BLOCKS)
        .map(|b| BlockModel {
            values: vec![initial(b)],
            acked: 0,
            durable: 0,
        })
        .collect();
    if let Some(n) = crash_at {
        clock.crash_at(clock.ops() + n);
    }
    let mut checkpointed = 0;
    let outcome = |model, checkpointed| Outcome {
        source: source.image(),
        destination: destination.image(),
        journal: journal_disk.clone(),
        model,
        checkpointed,
    };
    let job = match Job::new(journal, source.clone(), destination.clone(), config()) {
        Ok(job) => job,
        Err(_) => return outcome(model, 0),
    };
    let guest = job.guest();
    let mut next_id = 1u64;
    for op in ops {
        if clock.is_crashed() {
            break;
        }
        match *op {
            Op::Write { block, fua } => {
                let b = block as usize;
                next_id += 1;
                model[b].values.push(next_id);
                if guest
                    .write((b * BLOCK) as u64, &block_bytes(next_id), fua)
                    .is_ok()
                {
                    let m = &mut model[b];
                    m.acked = m.values.len() - 1;
                    if fua {
                        m.durable = m.acked;
                    }
                }
            }
            Op::Zeroes { block } | Op::Discard { block } => {
                let b = block as usize;
                model[b].values.push(0);
                let done = match *op {
                    Op::Zeroes { .. } => {
                        guest.write_zeroes((b * BLOCK) as u64, BLOCK as u64, false)
                    }
                    _ => guest.discard((b * BLOCK) as u64, BLOCK as u64),
                };
                if done.is_ok() {
                    let m = &mut model[b];
                    m.acked = m.values.len() - 1;
                }
            }
            Op::Flush => {
                if guest.flush().is_ok() {
                    for m in &mut model {
                        m.durable = m.acked;
                    }
                }
            }
            Op::Read { block } => {
                let b = block as usize;
                let mut buf = vec![0; BLOCK];
                if guest.read((b * BLOCK) as u64, &mut buf).is_ok() && !clock.is_crashed() {
                    let m = &model[b];
                    assert_eq!(value_of(&buf), Some(m.values[m.acked]), "read of block {b}");
                }
            }
            Op::Step => {
                let _ = job.copy_step();
            }
            Op::Switch => {
                let _ = job.switch();
            }
            Op::Complete => {
                let _ = job.complete();
            }
            Op::Abort => {
                let _ = job.abort();
            }
            Op::Checkpoint => {
                if job.checkpoint().is_ok() {
                    checkpointed = job.durable_progress().cursor;
                }
            }
            Op::RemoteDrop => {
                destination.drop_remote();
                // Once the destination is the guest's disk, its remote side
                // may lose what it acknowledged but no flush covered (as a
                // power loss there would): those values are no longer owed.
                if matches!(job.status().phase, JobPhase::Switched | JobPhase::Completed) {
                    for m in &mut model {
                        m.acked = m.durable;
                    }
                }
            }
        }
        let remote_dropped = destination.dropped.lock().unwrap().is_some();
        if crash_at.is_none() && !remote_dropped {
            // Without a crash, nothing may fail the engine.
            assert_ne!(
                job.status().phase,
                JobPhase::Failed,
                "engine failed without a fault"
            );
        }
    }
    drop(guest);
    drop(job);
    outcome(model, checkpointed)
}

/// The ways the three disks come back after the crash.
#[derive(Debug, Clone, Copy)]
enum Fate {
    ProcessCrash,
    PowerLossDropAll,
    PowerLossKeepAll,
    PowerLossAlternate,
    PowerLossTearLast,
}

const FATES: [Fate; 5] = [
    Fate::ProcessCrash,
    Fate::PowerLossDropAll,
    Fate::PowerLossKeepAll,
    Fate::PowerLossAlternate,
    Fate::PowerLossTearLast,
];

fn after(disk: &SimDisk, fate: Fate) -> SimDisk {
    let pending = disk.pending().len();
    match fate {
        Fate::ProcessCrash => disk.after_process_crash(),
        Fate::PowerLossDropAll => disk.after_power_loss(|_, _| WriteFate::Drop),
        Fate::PowerLossKeepAll => disk.after_power_loss(|_, _| WriteFate::Apply),
        Fate::PowerLossAlternate => disk.after_power_loss(|i, _| {
            if i % 2 == 0 {
                WriteFate::Apply
            } else {
                WriteFate::Drop
            }
        }),
        Fate::PowerLossTearLast => disk.after_power_loss(|i, _| {
            if i + 1 == pending {
                WriteFate::Tear(
                    [
                        SectorFate::New,
                        SectorFate::Old,
                        SectorFate::Garbage(1),
                        SectorFate::New,
                    ]
                    .into_iter()
                    .cycle()
                    .take(8)
                    .collect(),
                )
            } else {
                WriteFate::Apply
            }
        }),
    }
}

/// Crash points and crash cases one test checked (each test counts its
/// own: tests run in parallel).
#[derive(Default)]
struct Counts {
    points: AtomicU64,
    cases: AtomicU64,
}

/// Crashes `ops` at every storage call and checks every fate.
fn check_every_crash_point(ops: &[Op], counts: &Counts) {
    let probe = drive(ops, None);
    let total = probe.source.ops() + probe.destination.ops() + probe.journal.ops();
    for n in 0..=total {
        counts.points.fetch_add(1, Ordering::Relaxed);
        let crashed = drive(ops, Some(n));
        for fate in FATES {
            counts.cases.fetch_add(1, Ordering::Relaxed);
            check_recovered(&crashed, fate, n, ops);
        }
    }
}

fn check_recovered(crashed: &Outcome, fate: Fate, n: u64, ops: &[Op]) {
    let journal_disk = after(&crashed.journal, fate);
    // Tears are for the journal: a torn data block can only hold a write
    // that was never flushed, which a disk is free to tear; the property
    // below is about whole values.
    let fate_for_images = match fate {
        Fate::PowerLossTearLast => Fate::PowerLossAlternate,
        other => other,
    };
    let analysis = journal::analyse(&journal_disk).expect("journal readable");
    let recovered = analysis.outcome.unwrap_or_else(|r| {
        panic!("crash at call {n} ({fate:?}) needs an operator: {r}; ops {ops:?}")
    });
    let image = match recovered.record.authoritative {
        Side::Source => after(&crashed.source, fate_for_images),
        Side::Destination => after(&crashed.destination, fate_for_images),
    };
    let bytes = image.live_bytes();
    for (b, m) in crashed.model.iter().enumerate() {
        let found = value_of(&bytes[b * BLOCK..(b + 1) * BLOCK]);
        let oldest_allowed = match fate {
            Fate::ProcessCrash => m.acked,
            _ => m.durable,
        };
        let allowed = &m.values[oldest_allowed..];
        assert!(
            found.is_some_and(|v| allowed.contains(&v)),
            "crash at call {n} ({fate:?}), {} authoritative ({:?}): block {b} holds {found:?}, \
             allowed {allowed:?} (history {:?}); ops {ops:?}",
            recovered.record.authoritative.name(),
            recovered.record.phase,
            m.values
        );
    }
}

/// Small workloads, crashed at every call: the main paths.
const WORKLOADS: &[&[Op]] = &[
    &[
        Op::Write {
            block: 0,
            fua: false,
        },
        Op::Step,
        Op::Write {
            block: 1,
            fua: true,
        },
        Op::Step,
        Op::Write {
            block: 5,
            fua: false,
        },
        Op::Flush,
        Op::Step,
        Op::Step,
        Op::Step,
        Op::Step,
        Op::Step,
        Op::Step,
        Op::Write {
            block: 0,
            fua: false,
        },
        Op::Switch,
        Op::Write {
            block: 2,
            fua: false,
        },
        Op::Flush,
        Op::Write {
            block: 3,
            fua: true,
        },
        Op::Complete,
        Op::Write {
            block: 4,
            fua: true,
        },
    ],
    &[
        Op::Step,
        Op::Write {
            block: 11,
            fua: true,
        },
        Op::Discard { block: 1 },
        Op::Zeroes { block: 4 },
        Op::Flush,
        Op::Abort,
        Op::Write {
            block: 11,
            fua: true,
        },
        Op::Flush,
    ],
    &[
        Op::Step,
        Op::Step,
        Op::Step,
        Op::Step,
        Op::Step,
        Op::Step,
        Op::Step,
        Op::Write {
            block: 7,
            fua: false,
        },
        Op::Switch,
        Op::Write {
            block: 7,
            fua: false,
        },
        Op::Write {
            block: 8,
            fua: false,
        },
        Op::Flush,
        Op::Complete,
    ],
];

#[test]
fn every_crash_point_keeps_every_durable_write_on_the_image_recovery_names() {
    let counts = Counts::default();
    for ops in WORKLOADS {
        check_every_crash_point(ops, &counts);
    }
    let fixed_points = counts.points.load(Ordering::Relaxed);

    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    let mut runner = TestRunner::new(RunnerConfig {
        cases,
        failure_persistence: None,
        ..RunnerConfig::default()
    });
    let result = runner.run(&proptest::collection::vec(op(), 1..64), |ops| {
        check_every_crash_point(&ops, &counts);
        Ok(())
    });
    println!(
        "engine crash property: {} crash points in fixed workloads, {} in {} random workloads, \
         {} crash cases (points x fates) checked",
        fixed_points,
        counts.points.load(Ordering::Relaxed) - fixed_points,
        cases,
        counts.cases.load(Ordering::Relaxed)
    );
    if let Err(e) = result {
        panic!("{e}");
    }
    assert!(counts.points.load(Ordering::Relaxed) > 10_000);
}

#[test]
fn the_fixed_workloads_reach_every_phase() {
    // Guards the crash test against silently testing less: without crashes,
    // the first workload switches and completes, the second aborts.
    let first = drive(WORKLOADS[0], None);
    // And the export run: a drop before the switch aborts the job.
    let dropped = drive(
        &[
            Op::Step,
            Op::RemoteDrop,
            Op::Write {
                block: 0,
                fua: false,
            },
        ],
        None,
    );
    let verdict = journal::analyse(&dropped.journal).unwrap().outcome.unwrap();
    assert_eq!(verdict.record.phase, livecopy::journal::Phase::Aborted);
    let verdict = journal::analyse(&first.journal).unwrap().outcome.unwrap();
    assert_eq!(verdict.record.phase, livecopy::journal::Phase::Completed);
    let second = drive(WORKLOADS[1], None);
    let verdict = journal::analyse(&second.journal).unwrap().outcome.unwrap();
    assert_eq!(verdict.record.phase, livecopy::journal::Phase::Aborted);
    let _ = first.source.len();
}

/// The same property with the destination as an export whose remote side
/// may crash at any point of a random workload, and in fixed workloads
/// before and after the switch.
#[test]
fn every_crash_point_keeps_every_durable_write_when_the_export_crashes_too() {
    let fixed: &[&[Op]] = &[
        &[
            Op::Step,
            Op::Write {
                block: 0,
                fua: false,
            },
            Op::RemoteDrop,
            Op::Flush,
            Op::Step,
            Op::Switch,
            Op::Write {
                block: 1,
                fua: true,
            },
            Op::Flush,
        ],
        &[
            Op::Step,
            Op::Step,
            Op::Step,
            Op::Step,
            Op::Step,
            Op::Step,
            Op::Step,
            Op::Switch,
            Op::Write {
                block: 2,
                fua: false,
            },
            Op::RemoteDrop,
            Op::Flush,
            Op::Write {
                block: 3,
                fua: true,
            },
            Op::Complete,
        ],
    ];
    let counts = Counts::default();
    for ops in fixed {
        check_every_crash_point(ops, &counts);
    }
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(128);
    let mut runner = TestRunner::new(RunnerConfig {
        cases,
        failure_persistence: None,
        ..RunnerConfig::default()
    });
    let result = runner.run(&proptest::collection::vec(op_with(1), 1..64), |ops| {
        check_every_crash_point(&ops, &counts);
        Ok(())
    });
    println!(
        "engine crash property with an export destination: {} crash points, {} crash cases \
         ({} random workloads with remote crashes)",
        counts.points.load(Ordering::Relaxed),
        counts.cases.load(Ordering::Relaxed),
        cases
    );
    if let Err(e) = result {
        panic!("{e}");
    }
    assert!(counts.points.load(Ordering::Relaxed) > 2_000);
}

/// What the resume half of the property counted.
#[derive(Default)]
struct ResumeCounts {
    resumes: AtomicU64,
    with_progress: AtomicU64,
    recopied: AtomicU64,
    image_bytes: AtomicU64,
}

/// Takes the crashed job over as `copy --resume` does (repair, new writer,
/// Copying with the recorded progress), copies what it planned, crashes
/// the process once part-way when `crash_after_steps` says so and resumes
/// again, then switches. At the switch the destination must equal the
/// source byte for byte, and the resume must have planned no more than the
/// recorded progress lists (which the last returned checkpoint bounds).
fn check_resume(crashed: &Outcome, fate: Fate, n: u64, ops: &[Op], counts: &ResumeCounts) {
    let journal_disk = after(&crashed.journal, fate);
    let fate_for_images = match fate {
        Fate::PowerLossTearLast => Fate::PowerLossAlternate,
        other => other,
    };
    let Ok(recovered) = journal::analyse(&journal_disk).expect("readable").outcome else {
        return; // check_recovered reports it
    };
    if !matches!(recovered.record.phase, Phase::Copying | Phase::Ready) {
        return;
    }
    let size = (BLOCK * BLOCKS) as u64;
    let progress = recovered.record.progress();
    if let Some(p) = &progress {
        assert!(
            p.cursor >= crashed.checkpointed,
            "crash at call {n} ({fate:?}): the recorded cursor {} is behind the last \
             checkpoint's {}; ops {ops:?}",
            p.cursor,
            crashed.checkpointed
        );
        counts.with_progress.fetch_add(1, Ordering::Relaxed);
    } else {
        assert_eq!(
            crashed.checkpointed, 0,
            "crash at call {n} ({fate:?}): progress lost"
        );
    }
    let mut source = after(&crashed.source, fate_for_images);
    let mut destination = after(&crashed.destination, fate_for_images);
    let mut journal_disk = journal_disk;
    let mut crash_after_steps = Some(n as usize % 3);
    let mut first_plan = None;
    loop {
        let analysis = journal::analyse(&journal_disk).expect("readable");
        let recovered = analysis.outcome.expect("decided");
        let resumable =
            Resumable::take_over(journal_disk.clone(), &recovered, |_| Ok(())).expect("take over");
        let recorded = resumable.record().progress();
        let job = resumable
            .start(
                source.clone(),
                destination.clone(),
                config(),
                ResumeCopy::Remaining,
            )
            .expect("resume");
        let status = job.status();
        assert!(status.resumed == recorded.is_some());
        let bound = recorded.as_ref().map_or(size, |p| p.bytes_to_copy());
        assert!(
            status.to_copy <= bound,
            "crash at call {n} ({fate:?}): the resume plans {} bytes, the progress lists {bound}",
            status.to_copy
        );
        first_plan.get_or_insert(status.to_copy);
        let guest = job.guest();
        let mut steps = 0;
        loop {
            if crash_after_steps == Some(steps) {
                break;
            }
            match job.copy_step().expect("step") {
                StepOutcome::Done => break,
                StepOutcome::Copied(_) => {
                    steps += 1;
                    // A guest write and a checkpoint between steps.
                    let b = (n as usize + steps) % BLOCKS;
                    guest
                        .write(
                            (b * BLOCK) as u64,
                            &block_bytes(9_000 + steps as u64),
                            false,
                        )
                        .expect("guest write");
                    job.checkpoint().expect("checkpoint");
                }
            }
        }
        if crash_after_steps.take().is_some() && job.status().phase == JobPhase::Copying {
            // The resumed engine dies too: the next one takes over.
            drop(guest);
            drop(job);
            source = source.after_process_crash();
            destination = destination.after_process_crash();
            journal_disk = journal_disk.after_process_crash();
            continue;
        }
        assert_eq!(
            job.status().phase,
            JobPhase::Ready,
            "crash at call {n} ({fate:?})"
        );
        job.switch().expect("switch");
        assert!(
            destination.live_bytes()[..size as usize] == source.live_bytes()[..],
            "crash at call {n} ({fate:?}): after the resume the destination differs from the \
             source at the switch; ops {ops:?}"
        );
        break;
    }
    counts.resumes.fetch_add(1, Ordering::Relaxed);
    counts
        .recopied
        .fetch_add(first_plan.unwrap_or(0), Ordering::Relaxed);
    counts.image_bytes.fetch_add(size, Ordering::Relaxed);
}

/// Every crash point of the workloads, every fate: resumed, the copy ends
/// with a destination equal to the source, planning only what the
/// journal's progress lists.
#[test]
fn every_crash_point_resumes_to_a_destination_equal_to_the_source() {
    let counts = ResumeCounts::default();
    let mut workloads: Vec<Vec<Op>> = WORKLOADS.iter().map(|w| w.to_vec()).collect();
    // The pass checkpointed part-way, then guest writes below and above
    // the cursor, then more pass.
    let w = |block| Op::Write { block, fua: false };
    workloads.push(vec![
        Op::Step,
        Op::Step,
        Op::Checkpoint,
        w(0),
        w(9),
        Op::Step,
        Op::Checkpoint,
        w(1),
        Op::Step,
        w(3),
        Op::Checkpoint,
        Op::Step,
        Op::Step,
        Op::Checkpoint,
        w(0),
        Op::Flush,
        Op::Step,
        Op::Step,
        w(10),
    ]);
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64u32);
    let mut rng = 0x5eed_u64;
    for _ in 0..cases {
        let len = 8 + (rng % 40) as usize;
        let mut ops = Vec::with_capacity(len);
        for _ in 0..len {
            rng = rng
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let r = (rng >> 33) as u8;
            ops.push(match r % 8 {
                0..=2 => Op::Step,
                3 | 4 => w(r / 8 % BLOCKS as u8),
                5 => Op::Checkpoint,
                6 => Op::Write {
                    block: r / 8 % BLOCKS as u8,
                    fua: true,
                },
                _ => Op::Flush,
            });
        }
        workloads.push(ops);
    }
    let mut points = 0u64;
    for ops in &workloads {
        let probe = drive(ops, None);
        let total = probe.source.ops() + probe.destination.ops() + probe.journal.ops();
        for n in 0..=total {
            points += 1;
            let crashed = drive(ops, Some(n));
            for fate in FATES {
                check_resume(&crashed, fate, n, ops, &counts);
            }
        }
    }
    let resumes = counts.resumes.load(Ordering::Relaxed);
    let recopied = counts.recopied.load(Ordering::Relaxed);
    let image = counts.image_bytes.load(Ordering::Relaxed);
    println!(
        "resume crash property: {} workloads, {points} crash points, {resumes} resumes ({} with \
         recorded progress), each crashed once more part-way; planned {recopied} of {image} \
         bytes ({:.1}%)",
        workloads.len(),
        counts.with_progress.load(Ordering::Relaxed),
        100.0 * recopied as f64 / image.max(1) as f64
    );
    assert!(resumes > 1_000, "the enumeration shrank: {resumes} resumes");
    assert!(counts.with_progress.load(Ordering::Relaxed) > 100);
    assert!(recopied < image, "resumes never saved a byte");
}
