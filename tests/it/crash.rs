//! Exhaustive crash enumeration over the journal's commit protocol.
//!
//! For each workload (a sequence of phase transitions and writer restarts),
//! a probe run counts the storage calls. Then, for every call in turn, the
//! simulated process dies there, and the disk is handed to a fresh recovery:
//!
//! - after a process crash (the page cache survives), and
//! - after a power loss, with every pending write applied, dropped, or torn
//!   in every per-512-byte mix of old, new and garbage (3^8 patterns).
//!
//! After each crash, recovery must return the last acknowledged record or
//! the one being written, nothing else (J4), twice in a row; its repairs,
//! themselves crashed at every call, must not change the verdict (J5); and a
//! new writer must be able to resume and commit on top of it.

use std::collections::HashSet;

use livecopy::journal::format::{JOURNAL_LEN, Position};
use livecopy::journal::{self, Journal, Phase, Record};
use livecopy::storage::{SectorFate, SimDisk, WriteFate};

use crate::support::{UUID, first_record};

#[derive(Debug, Clone, Copy)]
enum Step {
    Commit(Phase),
    /// The engine restarts cleanly: recovery, then a new writer resumes.
    Restart,
}

use Phase::*;
use Step::{Commit, Restart};

const WORKLOADS: &[(&str, &[Step])] = &[
    (
        "switch-complete",
        &[Commit(Ready), Commit(Switched), Commit(Completed)],
    ),
    ("abort-copying", &[Commit(Aborted)]),
    ("abort-ready", &[Commit(Ready), Commit(Aborted)]),
    (
        "restarts-wrap-ring",
        &[
            Commit(Ready),
            Restart,
            Commit(Copying),
            Commit(Ready),
            Commit(Switched),
            Restart,
            Commit(Switched),
            Commit(Completed),
        ],
    ),
    ("restart-abort", &[Restart, Commit(Aborted)]),
];

/// What the workload had achieved when the process died.
struct Run {
    disk: SimDisk,
    /// The newest acknowledged record.
    acked_seq: u64,
    acked: Record,
    /// The commit in progress, if the crash hit one: (seq, phase, epoch).
    in_flight: Option<(u64, Phase, u64)>,
}

fn run(steps: &[Step], crash_after_ops: Option<u64>) -> Run {
    let disk = SimDisk::new(JOURNAL_LEN);
    let mut journal = Journal::format(disk.clone(), UUID, first_record()).expect("format");
    if let Some(n) = crash_after_ops {
        disk.crash_at(disk.ops() + n);
    }
    let mut acked_seq = 0;
    let mut acked = journal.record().clone();
    let mut restarted = false;
    for step in steps {
        match *step {
            Commit(phase) => {
                let epoch = acked.writer_epoch + u64::from(restarted);
                match journal.commit(phase, 0) {
                    Ok(seq) => {
                        assert_eq!(seq, acked_seq + 1);
                        acked_seq = seq;
                        acked = journal.record().clone();
                        restarted = false;
                    }
                    Err(_) => {
                        assert!(
                            disk.is_crashed(),
                            "only the injected crash may fail a commit"
                        );
                        let in_flight = Some((acked_seq + 1, phase, epoch));
                        return Run {
                            disk,
                            acked_seq,
                            acked,
                            in_flight,
                        };
                    }
                }
            }
            Restart => {
                let analysis = match journal::analyse(&disk) {
                    Ok(a) if !disk.is_crashed() => a,
                    _ => {
                        return Run {
                            disk,
                            acked_seq,
                            acked,
                            in_flight: None,
                        };
                    }
                };
                let recovered = analysis.outcome.expect("a clean restart recovers");
                assert_eq!(recovered.seq, acked_seq);
                journal = Journal::resume(disk.clone(), &recovered).expect("resume");
                restarted = true;
            }
        }
    }
    Run {
        disk,
        acked_seq,
        acked,
        in_flight: None,
    }
}

#[derive(Default)]
struct Counts {
    crash_points: u64,
    crash_cases: u64,
    recoveries: u64,
    repair_crashes: u64,
    resumed: u64,
}

/// Every way the single pending journal write can land at a power cut.
fn fates() -> Vec<WriteFate> {
    let mut out = vec![WriteFate::Apply, WriteFate::Drop];
    for pattern in 0..3u32.pow(8) {
        let mut p = pattern;
        let sectors = (0..8)
            .map(|i| {
                let fate = match p % 3 {
                    0 => SectorFate::Old,
                    1 => SectorFate::New,
                    _ => SectorFate::Garbage(i),
                };
                p /= 3;
                fate
            })
            .collect();
        out.push(WriteFate::Tear(sectors));
    }
    out
}

fn check_recovery(disk: &SimDisk, run: &Run, counts: &mut Counts, seen: &mut Seen) {
    counts.crash_cases += 1;
    let image = disk.live_bytes();
    if !seen.images.insert(image.clone()) {
        return;
    }
    counts.recoveries += 1;
    let analysis = journal::analyse(disk).expect("reads succeed");
    let recovered = match &analysis.outcome {
        Ok(r) => r.clone(),
        Err(refusal) => panic!("a single crash must never need an operator: {refusal}"),
    };
    // J4: the acknowledged record or the one in flight; never older, never invented.
    if recovered.seq == run.acked_seq {
        assert_eq!(
            recovered.record, run.acked,
            "recovered a record that differs from the acked one"
        );
    } else {
        let (seq, phase, epoch) = run
            .in_flight
            .expect("a newer record with nothing in flight");
        assert_eq!(
            recovered.seq, seq,
            "recovered seq {} beyond the in-flight one",
            recovered.seq
        );
        assert_eq!(recovered.record.phase, phase);
        assert_eq!(recovered.record.writer_epoch, epoch);
        assert_eq!(
            Some(recovered.record.authoritative),
            phase.implied_authority()
        );
    }
    // Idempotent.
    let again = journal::analyse(disk)
        .expect("reads succeed")
        .outcome
        .expect("same verdict");
    assert_eq!(
        (again.seq, again.record.phase),
        (recovered.seq, recovered.record.phase)
    );

    // J5: repairs, crashed at every call, never change the verdict. Images
    // whose blocks classify alike repair alike; crash one of each.
    let shape: Vec<_> = analysis.blocks.iter().map(|b| (b.class, b.seq)).collect();
    if !recovered.repairs.is_empty() && seen.repair_shapes.insert(shape) {
        let probe = SimDisk::from_bytes(image.clone());
        journal::repair(&probe, &recovered, |_| Ok(())).expect("repair");
        let repair_ops = probe.ops();
        for n in 0..repair_ops {
            let crashing = SimDisk::from_bytes(image.clone());
            crashing.crash_at(n);
            let _ = journal::repair(&crashing, &recovered, |_| Ok(()));
            for fate in [WriteFate::Apply, WriteFate::Drop, torn_half()] {
                counts.repair_crashes += 1;
                let after = crashing.after_power_loss(|_, _| fate.clone());
                let verdict = journal::analyse(&after)
                    .expect("reads")
                    .outcome
                    .expect("still decides");
                assert_eq!(
                    (verdict.seq, verdict.record.phase),
                    (recovered.seq, recovered.record.phase)
                );
            }
        }
        let repaired = journal::analyse(&probe)
            .expect("reads")
            .outcome
            .expect("decides");
        assert!(
            repaired.repairs.is_empty(),
            "repair left work: {:?}",
            repaired.repairs
        );
        assert_eq!(repaired.seq, recovered.seq);
    }

    // A new writer resumes on the repaired journal and moves on.
    let disk = SimDisk::from_bytes(image);
    journal::repair(&disk, &recovered, |_| Ok(())).expect("repair");
    let recovered = journal::analyse(&disk)
        .expect("reads")
        .outcome
        .expect("decides");
    let next = match recovered.record.phase {
        Copying | Ready => Some(Copying),
        Switched => Some(Completed),
        Completed | Aborted | Resolved => None,
    };
    if let Some(next) = next {
        let mut resumed = Journal::resume(disk.clone(), &recovered).expect("resume");
        let seq = resumed.commit(next, 0).expect("commit after recovery");
        let after = journal::analyse(&disk)
            .expect("reads")
            .outcome
            .expect("decides");
        assert_eq!((after.seq, after.record.phase), (seq, next));
        assert_eq!(after.record.writer_epoch, recovered.record.writer_epoch + 1);
        counts.resumed += 1;
    }
}

#[derive(Default)]
struct Seen {
    images: HashSet<Vec<u8>>,
    repair_shapes: HashSet<Vec<(livecopy::journal::Class, Option<u64>)>>,
}

fn torn_half() -> WriteFate {
    let mut sectors = vec![SectorFate::New; 4];
    sectors.extend([SectorFate::Garbage(9); 4]);
    WriteFate::Tear(sectors)
}

#[test]
fn every_crash_point_of_every_transition_recovers_to_an_acknowledged_or_in_flight_record() {
    let fates = fates();
    let mut counts = Counts::default();
    for (name, steps) in WORKLOADS {
        let probe = run(steps, None);
        let total_ops = probe.disk.ops();
        let mut seen = Seen::default();
        for n in 0..=total_ops {
            let crashed = run(steps, Some(n));
            counts.crash_points += 1;
            let pending = crashed.disk.pending();
            // One write between syncs, but copy B and the seal (format 2)
            // share the second sync of a commit that changes sides.
            let seal = Position::Seal.offset();
            assert!(
                pending.len() <= 1 || (pending.len() == 2 && pending[1].offset == seal),
                "{name}: more unsynced journal writes than the protocol leaves at op {n}"
            );
            check_recovery(
                &crashed.disk.after_process_crash(),
                &crashed,
                &mut counts,
                &mut seen,
            );
            if pending.is_empty() {
                check_recovery(
                    &crashed.disk.after_power_loss(|_, _| WriteFate::Apply),
                    &crashed,
                    &mut counts,
                    &mut seen,
                );
            }
            if pending.len() == 1 {
                for fate in &fates {
                    let after = crashed.disk.after_power_loss(|_, _| fate.clone());
                    check_recovery(&after, &crashed, &mut counts, &mut seen);
                }
            }
            if pending.len() == 2 {
                // Every fate of one write with the other applied, dropped
                // or torn in half, both ways round.
                for (every, other) in [(0, 1), (1, 0)] {
                    for fate in &fates {
                        for coarse in [WriteFate::Apply, WriteFate::Drop, torn_half()] {
                            let after = crashed.disk.after_power_loss(|index, _| {
                                if index == every {
                                    fate.clone()
                                } else {
                                    debug_assert_eq!(index, other);
                                    coarse.clone()
                                }
                            });
                            check_recovery(&after, &crashed, &mut counts, &mut seen);
                        }
                    }
                }
            }
        }
    }
    println!(
        "journal crash enumeration: {} workloads, {} crash points, {} crash cases, {} distinct \
         crashed images recovered, {} crashes during repair, {} resumed writers",
        WORKLOADS.len(),
        counts.crash_points,
        counts.crash_cases,
        counts.recoveries,
        counts.repair_crashes,
        counts.resumed
    );
    assert!(
        counts.crash_cases > 100_000,
        "the enumeration shrank: {} cases",
        counts.crash_cases
    );
    assert!(
        counts.recoveries > 5_000,
        "the enumeration shrank: {} recoveries",
        counts.recoveries
    );
}

/// `resolve`, crashed at every call: recovery afterwards either still asks
/// for the operator or returns the resolution; never an older record.
#[test]
fn resolve_crashed_at_every_call_never_returns_an_older_record() {
    let (disk, _journal) = crate::support::sim_journal(Completed);
    // Destroy both copies of the slot after the newest record (seq 3).
    for copy in 0..2 {
        let at = livecopy::journal::format::Position::Slot { slot: 0, copy };
        disk.scribble(at.offset(), &[0xEE; 4096]);
    }
    let image = disk.live_bytes();
    let analysis = journal::analyse(&disk).unwrap();
    assert!(analysis.outcome.is_err(), "the setup must need an operator");

    let probe = SimDisk::from_bytes(image.clone());
    let seq = journal::resolve(&probe, &analysis, livecopy::journal::Side::Source, |_| {
        Ok(())
    })
    .expect("resolve");
    let total = probe.ops();
    let mut cases = 0;
    for n in 0..=total {
        let crashing = SimDisk::from_bytes(image.clone());
        crashing.crash_at(n);
        let _ = journal::resolve(
            &crashing,
            &analysis,
            livecopy::journal::Side::Source,
            |_| Ok(()),
        );
        for fate in [WriteFate::Apply, WriteFate::Drop, torn_half()] {
            cases += 1;
            let after = crashing.after_power_loss(|_, _| fate.clone());
            match journal::analyse(&after).unwrap().outcome {
                Ok(r) => {
                    assert_eq!(
                        (r.seq, r.record.phase),
                        (seq, Resolved),
                        "crash at call {n}"
                    );
                    assert_eq!(r.record.authoritative, livecopy::journal::Side::Source);
                }
                Err(refusal) => assert_eq!(
                    refusal.reason,
                    livecopy::journal::RefusalReason::NeedsOperator,
                    "crash at call {n}"
                ),
            }
        }
    }
    let done = journal::analyse(&probe).unwrap().outcome.expect("resolved");
    assert_eq!((done.seq, done.record.phase), (seq, Resolved));
    assert!(
        done.repairs.is_empty() && done.warnings.is_empty(),
        "{:?}",
        done.warnings
    );
    println!(
        "resolve crash enumeration: {} crash points, {cases} cases",
        total + 1
    );
}

/// A short write (part of the block lands, then an error) poisons the
/// journal like any other failure: the commit is not acknowledged, every
/// later call fails without touching the disk, and recovery returns the
/// last acknowledged record.
#[test]
fn a_short_journal_write_poisons_the_journal() {
    let (disk, mut journal) = crate::support::sim_journal(Ready);
    // Only the frame header lands: the block's checksum cannot match.
    disk.fail_next_write(std::io::ErrorKind::Other, 64);
    assert!(journal.commit(Switched, 0).is_err());
    assert!(journal.is_poisoned());
    let ops = disk.ops();
    let again = journal.commit(Switched, 0).expect_err("poisoned");
    assert_eq!(again.kind(), livecopy::ErrorKind::Poisoned);
    assert_eq!(
        disk.ops(),
        ops,
        "a poisoned journal must not touch the disk"
    );
    for after in [
        disk.after_process_crash(),
        disk.after_power_loss(|_, _| WriteFate::Apply),
    ] {
        let recovered = journal::analyse(&after).unwrap().outcome.expect("recovers");
        assert_eq!((recovered.seq, recovered.record.phase), (1, Ready));
    }
}
