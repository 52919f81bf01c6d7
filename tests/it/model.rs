//! Random operations and faults against a reference model of the journal.
//!
//! Each case is a sequence of commits, crashes (process kill or power loss
//! with a random subset of pending writes, possibly torn), media faults (bit
//! rot, misdirected writes, lost writes, failed syncs, unreadable blocks)
//! and recoveries. The model knows which records were acknowledged and which
//! were submitted, and how many faults hit the journal since it was last
//! recovered clean. After every recovery:
//!
//! - never invented: the record returned is one that was submitted, with
//!   the phase, authority and epoch it was submitted with;
//! - never backwards: its sequence number is at least the acknowledged one;
//! - with at most one fault since the last clean recovery, it never refuses;
//! - once a record naming the destination was acknowledged, with at most two
//!   faults since the last clean recovery, it names the destination (or
//!   refuses): the seal's guarantee (journal-format.md 2.1).
//!
//! Fault budget (stated in journal-format.md, media assumption A4): faults
//! never destroy both copies of one position. Two lost writes of the two
//! copies of one record are indistinguishable from a record never written,
//! by any design that does not read its writes back from the medium, so
//! cases where both copies of a position were hit only check "never
//! invented".

use std::sync::atomic::{AtomicU64, Ordering};

use livecopy::journal::format::{BLOCK_COUNT, BLOCK_SIZE, JOURNAL_LEN, Position, SLOTS};
use livecopy::journal::{self, Journal, Phase, Record, Side};
use livecopy::storage::{SectorFate, SimDisk, Storage, WriteFate};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

use crate::support::{UUID, first_record};

#[derive(Debug, Clone)]
enum Op {
    /// Move the job forward: 0 = the next phase on the happy path,
    /// 1 = abort (or complete), 2 = restart-style re-entry.
    Commit(u8),
    ProcessCrash,
    /// Power loss; bit i of `keep` keeps pending write i; `tear` tears the
    /// last pending write with this per-sector pattern (2 bits a sector).
    PowerLoss {
        keep: u8,
        tear: Option<u16>,
    },
    Rot {
        block: u8,
        byte: u16,
        bit: u8,
    },
    /// Arm a fault for the write `later` journal writes from now.
    LoseWrite {
        later: u8,
    },
    Misdirect {
        later: u8,
        to_block: u8,
    },
    /// Arm a failure of the sync `later` syncs from now.
    SyncFails {
        later: u8,
        persisted: bool,
    },
    /// The next recovery cannot read this block.
    ReadFails {
        block: u8,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (0u8..3).prop_map(Op::Commit),
        2 => Just(Op::ProcessCrash),
        2 => (any::<u8>(), proptest::option::of(any::<u16>()))
            .prop_map(|(keep, tear)| Op::PowerLoss { keep, tear }),
        1 => (0..BLOCK_COUNT as u8, 0..BLOCK_SIZE as u16, 0u8..8)
            .prop_map(|(block, byte, bit)| Op::Rot { block, byte, bit }),
        1 => (0u8..4).prop_map(|later| Op::LoseWrite { later }),
        1 => (0u8..4, 0..BLOCK_COUNT as u8).prop_map(|(later, to_block)| Op::Misdirect { later, to_block }),
        1 => (0u8..4, any::<bool>()).prop_map(|(later, persisted)| Op::SyncFails { later, persisted }),
        1 => (0..BLOCK_COUNT as u8).prop_map(|block| Op::ReadFails { block }),
    ]
}

/// The reference model.
struct Model {
    acked_seq: u64,
    acked: Record,
    /// (seq, phase, epoch) of a commit that failed or was cut off: recovery
    /// may return it.
    in_flight: Option<(u64, Phase, u64)>,
    faults: u32,
    /// Positions (block numbers) a fault may have damaged since the last
    /// clean recovery.
    damaged: [bool; BLOCK_COUNT],
}

impl Model {
    fn both_copies_hit(&self) -> bool {
        let pair = |a: Position| self.damaged[a.block()] && self.damaged[a.twin().block()];
        pair(Position::Header { copy: 0 })
            || (0..SLOTS).any(|slot| pair(Position::Slot { slot, copy: 0 }))
    }
}

fn next_phase(current: Phase, choice: u8) -> Option<Phase> {
    use Phase::*;
    match (current, choice) {
        (Copying, 0) => Some(Ready),
        (Copying, 1) | (Ready, 1) => Some(Aborted),
        (Ready, 0) => Some(Switched),
        (Switched, _) => Some(Completed),
        (Ready, _) => Some(Copying),
        (Copying, _) => Some(Copying),
        _ => None,
    }
}

static CASES: AtomicU64 = AtomicU64::new(0);
static RECOVERIES: AtomicU64 = AtomicU64::new(0);
static REFUSALS: AtomicU64 = AtomicU64::new(0);
static DOUBLE_FAULT_CHECKS: AtomicU64 = AtomicU64::new(0);

fn execute(ops: &[Op]) -> Result<(), TestCaseError> {
    CASES.fetch_add(1, Ordering::Relaxed);
    let mut disk = SimDisk::new(JOURNAL_LEN);
    let mut journal = Some(Journal::format(disk.clone(), UUID, first_record()).expect("format"));
    let mut model = Model {
        acked_seq: 0,
        acked: first_record(),
        in_flight: None,
        faults: 0,
        damaged: [false; BLOCK_COUNT],
    };
    let mut restarted = false;
    for op in ops {
        match *op {
            Op::Commit(choice) => {
                let Some(j) = journal.as_mut() else { continue };
                let current = model.acked.phase;
                let Some(mut phase) = next_phase(current, choice) else {
                    continue;
                };
                if !restarted && phase == current {
                    phase = match next_phase(current, 0) {
                        Some(p) => p,
                        None => continue,
                    };
                }
                if !restarted && current == Phase::Ready && phase == Phase::Copying {
                    phase = Phase::Switched;
                }
                let seq = model.acked_seq + 1;
                let epoch = model.acked.writer_epoch + u64::from(restarted);
                match j.commit(phase, 0) {
                    Ok(s) => {
                        prop_assert_eq!(s, seq);
                        model.acked_seq = seq;
                        model.acked = j.record().clone();
                        model.in_flight = None;
                        restarted = false;
                    }
                    Err(_) => {
                        // J2: poisoned for good.
                        prop_assert!(j.is_poisoned());
                        prop_assert!(j.commit(phase, 0).is_err());
                        model.in_flight = Some((seq, phase, epoch));
                        journal = None;
                    }
                }
            }
            Op::Rot { block, byte, bit } => {
                disk.rot((block as usize * BLOCK_SIZE + byte as usize) as u64, bit);
                model.faults += 1;
                model.damaged[block as usize] = true;
            }
            Op::LoseWrite { later } => {
                // Journal writes come in pairs per commit; map `later` onto
                // the positions of the next commit or the one after.
                disk.lose_write(u64::from(later));
                model.faults += 1;
                mark_upcoming(&mut model, later);
            }
            Op::Misdirect { later, to_block } => {
                disk.misdirect_write(u64::from(later), (to_block as usize * BLOCK_SIZE) as u64);
                model.faults += 1;
                mark_upcoming(&mut model, later);
                model.damaged[to_block as usize] = true;
            }
            Op::SyncFails { later, persisted } => {
                disk.fail_sync(u64::from(later), persisted);
                model.faults += 1;
                if !persisted {
                    mark_upcoming(&mut model, later);
                }
            }
            Op::ReadFails { block } => {
                disk.fail_reads(
                    (block as usize * BLOCK_SIZE) as u64
                        ..((block as usize + 1) * BLOCK_SIZE) as u64,
                );
                model.faults += 1;
                model.damaged[block as usize] = true;
            }
            Op::ProcessCrash | Op::PowerLoss { .. } => {
                disk = match *op {
                    Op::PowerLoss { keep, tear } => {
                        let pending = disk.pending().len();
                        if tear.is_some() && pending > 0 {
                            model.faults += 1;
                            let last = disk.pending()[pending - 1].offset as usize / BLOCK_SIZE;
                            model.damaged[last] = true;
                        }
                        disk.after_power_loss(|i, _| match tear {
                            Some(pattern) if i + 1 == pending => WriteFate::Tear(
                                (0..8)
                                    .map(|s| match (pattern >> (2 * s)) & 3 {
                                        0 => SectorFate::Old,
                                        1 => SectorFate::New,
                                        _ => SectorFate::Garbage(s as u8),
                                    })
                                    .collect(),
                            ),
                            _ if keep & (1 << (i % 8)) != 0 => WriteFate::Apply,
                            _ => WriteFate::Drop,
                        })
                    }
                    _ => disk.after_process_crash(),
                };
                match recover(&disk, &mut model)? {
                    Some(j) => {
                        journal = Some(j);
                        restarted = true;
                    }
                    None => return Ok(()),
                }
            }
        }
    }
    Ok(())
}

fn mark_upcoming(model: &mut Model, later: u8) {
    // Until the next crash, journal writes go copy A, copy B (and, for a
    // record that changes sides, the seal) of consecutive records, starting
    // with the record after the acknowledged one. Which records will be
    // sealed is not known yet, so every block the write `later` from now
    // can land on counts as damaged: each commit writes 2 or 3 blocks.
    let later = usize::from(later);
    for sealed in 0u32..1 << (later + 1) {
        let mut index = 0;
        for commit in 0..=later {
            let writes = if sealed & (1 << commit) != 0 { 3 } else { 2 };
            if later < index + writes {
                let seq = model.acked_seq + 1 + commit as u64;
                let position = match later - index {
                    2 => Position::Seal,
                    copy => Position::Slot {
                        slot: (seq % u64::from(SLOTS)) as u8,
                        copy: copy as u8,
                    },
                };
                model.damaged[position.block()] = true;
                break;
            }
            index += writes;
        }
    }
}

/// Recovers like a restarting engine: analyse, repair, resume. Returns the
/// new writer, or `None` when recovery (legitimately) refused.
fn recover(disk: &SimDisk, model: &mut Model) -> Result<Option<Journal<SimDisk>>, TestCaseError> {
    RECOVERIES.fetch_add(1, Ordering::Relaxed);
    // The engine's open syncs before reading; a failure there is an I/O
    // error the engine reports, not a verdict.
    if disk.sync_data().is_err() {
        return Ok(None);
    }
    let analysis = match journal::analyse(disk) {
        Ok(a) => a,
        Err(_) => return Ok(None),
    };
    let recovered = match analysis.outcome {
        Ok(r) => r,
        Err(refusal) => {
            REFUSALS.fetch_add(1, Ordering::Relaxed);
            prop_assert!(
                model.faults >= 2,
                "refused after {} fault(s): {} (blocks: {:?})",
                model.faults,
                refusal,
                analysis
                    .blocks
                    .iter()
                    .map(|b| (b.class, b.seq))
                    .collect::<Vec<_>>()
            );
            return Ok(None);
        }
    };
    // Never a switch rolled back (format 2's seal): once a record naming
    // the destination was acknowledged, two faults at most never bring
    // back the source.
    if model.acked.authoritative == Side::Destination && model.faults <= 2 {
        prop_assert_eq!(
            recovered.record.authoritative,
            Side::Destination,
            "{} fault(s) rolled a switch back to seq {} (acknowledged {}; damaged {:?})",
            model.faults,
            recovered.seq,
            model.acked_seq,
            model.damaged
        );
        DOUBLE_FAULT_CHECKS.fetch_add(u64::from(model.faults == 2), Ordering::Relaxed);
    }
    // Never invented.
    let max_submitted = model.in_flight.map_or(model.acked_seq, |(s, _, _)| s);
    prop_assert!(
        recovered.seq <= max_submitted,
        "seq {} was never submitted",
        recovered.seq
    );
    if recovered.seq == model.acked_seq {
        prop_assert_eq!(&recovered.record, &model.acked);
    } else if Some(recovered.seq) == model.in_flight.map(|f| f.0) {
        let (_, phase, epoch) = model.in_flight.expect("checked");
        prop_assert_eq!(recovered.record.phase, phase);
        prop_assert_eq!(recovered.record.writer_epoch, epoch);
    } else if !model.both_copies_hit() {
        // Never backwards, within the fault budget.
        return Err(TestCaseError::fail(format!(
            "went back to seq {} though seq {} was acknowledged (faults {}, damaged {:?}, blocks {:?})",
            recovered.seq,
            model.acked_seq,
            model.faults,
            model.damaged,
            analysis
                .blocks
                .iter()
                .map(|b| (b.position.to_string(), b.class, b.seq))
                .collect::<Vec<_>>()
        )));
    } else {
        return Ok(None);
    }
    // Repair, as the engine does before writing again, then the journal is clean.
    if journal::repair(disk, &recovered, |_| Ok(())).is_err() {
        return Ok(None);
    }
    let Ok(after_repair) = journal::analyse(disk) else {
        return Ok(None);
    };
    let clean = match after_repair.outcome {
        Ok(r) if r.repairs.is_empty() => r,
        _ => return Ok(None),
    };
    prop_assert_eq!(clean.seq, recovered.seq);
    model.acked_seq = clean.seq;
    model.acked = clean.record.clone();
    model.in_flight = None;
    // Damage repair could not mend (both copies of an old position, a bad
    // sector) and lost writes the page cache still hides stay in the fault
    // budget until the block is rewritten.
    let (live, durable) = (disk.live_bytes(), disk.durable_bytes());
    let mut remaining = 0;
    for (block, damaged) in model.damaged.iter_mut().enumerate() {
        let range = block * BLOCK_SIZE..(block + 1) * BLOCK_SIZE;
        *damaged = live[range.clone()] != durable[range]
            || after_repair.blocks[block].class != livecopy::journal::Class::Valid;
        remaining += u32::from(*damaged);
    }
    model.faults = remaining;
    Ok(Some(Journal::resume(disk.clone(), &clean).expect("resume")))
}

#[test]
fn random_faults_never_make_recovery_invent_or_go_backwards() {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(512);
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&proptest::collection::vec(op(), 1..60), |ops| execute(&ops));
    println!(
        "journal model: {} cases, {} recoveries, {} refusals (all with two or more faults), \
         {} recoveries after two faults on a switched journal (none went back to the source)",
        CASES.load(Ordering::Relaxed),
        RECOVERIES.load(Ordering::Relaxed),
        REFUSALS.load(Ordering::Relaxed),
        DOUBLE_FAULT_CHECKS.load(Ordering::Relaxed)
    );
    if let Err(e) = result {
        panic!("{e}");
    }
    assert!(RECOVERIES.load(Ordering::Relaxed) > 100);
}
