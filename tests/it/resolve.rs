//! `resolve` under crashes: every storage call of a resolve crashed (the
//! process killed, or power lost with the pending write applied, dropped
//! or torn), on journals refused for each reason resolve settles. After each
//! crash, recovery must either refuse in a way resolve accepts (and a second
//! resolve must then finish the job), or return the resolution: never an
//! older record, never the other side.

use std::collections::HashSet;

use livecopy::journal::format::{self, BLOCK_SIZE, Frame, JOURNAL_LEN, Kind, Position};
use livecopy::journal::payload;
use livecopy::journal::{self, Analysis, HeaderV1, Journal, Phase, RefusalReason, Side};
use livecopy::storage::{SectorFate, SimDisk, WriteFate};

use crate::support::{JOB_ID, UUID, first_record, sim_journal};

/// Writes `frame` (encoded for `at`) into `disk` as if it had always been there.
fn put(disk: &SimDisk, at: Position, frame: &Frame) {
    disk.scribble(at.offset(), &format::encode(&frame.at(at)));
}

/// A record frame of this journal.
fn record_frame(seq: u64, parent: u32, record: &journal::Record) -> Frame {
    let bytes = payload::encode(record).expect("encode");
    Frame::new(
        Kind::Record,
        Position::Slot {
            slot: (seq % 4) as u8,
            copy: 0,
        },
        UUID,
        seq,
        parent,
        bytes,
    )
}

/// A block of another journal (another UUID), for `position`.
fn foreign_block(position: Position) -> Frame {
    let other = SimDisk::new(JOURNAL_LEN);
    Journal::format(other.clone(), *b"other-journal-id", first_record()).expect("format");
    let bytes = other.live_bytes();
    let start = position.offset() as usize;
    format::decode(&bytes[start..start + BLOCK_SIZE]).expect("a valid block")
}

/// seq 4 Switched (two writer restarts), slot 1 (where a resolution goes)
/// holding seq 1 in copy B and another seq 1 in copy A: a fork.
fn fork_in_the_resolution_slot() -> SimDisk {
    let (disk, mut j) = sim_journal(Phase::Switched);
    for _ in 0..2 {
        let recovered = journal::analyse(&disk).unwrap().outcome.expect("recovers");
        j = Journal::resume(disk.clone(), &recovered).expect("resume");
        j.commit(Phase::Switched, 0).expect("commit");
    }
    assert_eq!(j.seq(), 4);
    let forked = journal::Record {
        phase: Phase::Ready,
        bytes_copied: 777,
        ..first_record()
    };
    put(
        &disk,
        Position::Slot { slot: 1, copy: 0 },
        &record_frame(1, 0x1234_5678, &forked),
    );
    disk
}

/// Both copies of the slot after the newest record (seq 3) destroyed.
fn successor_lost() -> SimDisk {
    let (disk, _j) = sim_journal(Phase::Completed);
    for copy in 0..2 {
        disk.scribble(Position::Slot { slot: 0, copy }.offset(), &[0xEE; 4096]);
    }
    disk
}

/// Two valid headers that differ; every record intact.
fn headers_disagree() -> SimDisk {
    let (disk, _j) = sim_journal(Phase::Switched);
    let header = payload::encode(&HeaderV1::new(JOB_ID, 42)).expect("encode");
    let at = Position::Header { copy: 1 };
    put(&disk, at, &Frame::new(Kind::Header, at, UUID, 0, 0, header));
    disk
}

/// Another journal's header over header/0; everything else intact.
fn foreign_header() -> SimDisk {
    let (disk, _j) = sim_journal(Phase::Completed);
    let at = Position::Header { copy: 0 };
    put(&disk, at, &foreign_block(at));
    disk
}

/// Another journal's block in copy A of the slot a resolution goes to.
fn foreign_in_the_resolution_slot() -> SimDisk {
    let (disk, _j) = sim_journal(Phase::Ready);
    // Its own position says slot 0: a misdirected write from another file.
    let block = format::encode(&foreign_block(Position::Slot { slot: 0, copy: 0 }));
    disk.scribble(Position::Slot { slot: 2, copy: 0 }.offset(), &block);
    disk
}

/// The parent of the newest record (seq 2) replaced, in both copies, by a
/// record it does not link to.
fn chain_broken() -> SimDisk {
    let (disk, _j) = sim_journal(Phase::Switched);
    let other = journal::Record {
        phase: Phase::Ready,
        bytes_copied: 999,
        ..first_record()
    };
    let frame = record_frame(1, 0xABCD, &other);
    for copy in 0..2 {
        put(&disk, Position::Slot { slot: 1, copy }, &frame);
    }
    disk
}

/// The fork above with both headers destroyed too.
fn fork_without_headers() -> SimDisk {
    let disk = fork_in_the_resolution_slot();
    for copy in 0..2 {
        disk.scribble(Position::Header { copy }.offset(), &[0; 4096]);
    }
    disk
}

type Scenario = (&'static str, fn() -> SimDisk, RefusalReason);

const SCENARIOS: &[Scenario] = &[
    (
        "fork in the resolution's slot",
        fork_in_the_resolution_slot,
        RefusalReason::NeedsOperator,
    ),
    (
        "successor lost",
        successor_lost,
        RefusalReason::NeedsOperator,
    ),
    (
        "headers disagree",
        headers_disagree,
        RefusalReason::NeedsOperator,
    ),
    (
        "another journal's header",
        foreign_header,
        RefusalReason::WrongJournal,
    ),
    (
        "another journal's block in the resolution's slot",
        foreign_in_the_resolution_slot,
        RefusalReason::WrongJournal,
    ),
    ("chain broken", chain_broken, RefusalReason::NeedsOperator),
    (
        "fork, both headers destroyed",
        fork_without_headers,
        RefusalReason::NeedsOperator,
    ),
];

/// What resolve accepts: the refusals an operator settles, with a UUID and
/// a readable record to take the job from.
fn resolve_accepts(analysis: &Analysis) -> bool {
    matches!(
        &analysis.outcome,
        Err(r) if matches!(r.reason, RefusalReason::NeedsOperator | RefusalReason::WrongJournal)
    ) && analysis.uuid.is_some()
        && analysis.newest_readable.is_some()
}

/// Every way the single pending write can land: whole, not at all, each
/// mix of old and new sectors, and garbage in each sector or all of them.
fn fates() -> Vec<WriteFate> {
    let mut out = vec![WriteFate::Apply, WriteFate::Drop];
    for mask in 0..256u32 {
        out.push(WriteFate::Tear(
            (0..8)
                .map(|i| {
                    if mask & (1 << i) != 0 {
                        SectorFate::New
                    } else {
                        SectorFate::Old
                    }
                })
                .collect(),
        ));
    }
    for garbage in 0..9u8 {
        out.push(WriteFate::Tear(
            (0..8u8)
                .map(|i| {
                    if garbage == 8 || i == garbage {
                        SectorFate::Garbage(i)
                    } else {
                        SectorFate::New
                    }
                })
                .collect(),
        ));
    }
    out
}

#[derive(Default)]
struct Counts {
    crash_points: u64,
    cases: u64,
    resolved: u64,
    refused: u64,
    reruns: u64,
}

/// How a journal's blocks classify: position, class, seq, content checksum.
type Shape = Vec<(String, &'static str, Option<u64>, Option<u32>)>;

/// Checks one crashed journal; returns whether recovery refused it.
fn check(
    disk: &SimDisk,
    seq: u64,
    side: Side,
    what: &str,
    counts: &mut Counts,
    reruns: &mut HashSet<Shape>,
) -> bool {
    counts.cases += 1;
    let analysis = journal::analyse(disk).expect("reads");
    match &analysis.outcome {
        Ok(r) => {
            assert_eq!(
                (r.seq, r.record.phase, r.record.authoritative),
                (seq, Phase::Resolved, side),
                "{what}: recovery returned seq {} {} ({}) instead of the resolution",
                r.seq,
                r.record.phase.name(),
                r.record.authoritative.name()
            );
            counts.resolved += 1;
            false
        }
        Err(refusal) => {
            assert!(
                resolve_accepts(&analysis),
                "{what}: refused in a way resolve does not take: {refusal}"
            );
            counts.refused += 1;
            // Running resolve again finishes the job. Journals whose blocks
            // classify alike resolve alike: run one of each.
            let shape = analysis
                .blocks
                .iter()
                .map(|b| (b.position.to_string(), b.class.name(), b.seq, b.content_crc))
                .collect();
            if reruns.insert(shape) {
                counts.reruns += 1;
                let again = SimDisk::from_bytes(disk.live_bytes());
                let second = journal::resolve(&again, &analysis, side, |_| Ok(()))
                    .unwrap_or_else(|e| panic!("{what}: resolve again failed: {e}"));
                let r = journal::analyse(&again)
                    .unwrap()
                    .outcome
                    .unwrap_or_else(|e| panic!("{what}: refused after a second resolve: {e}"));
                assert_eq!(
                    (r.seq, r.record.phase, r.record.authoritative),
                    (second, Phase::Resolved, side),
                    "{what}: second resolve"
                );
            }
            true
        }
    }
}

#[test]
fn every_crash_point_of_resolve_leaves_a_refusal_resolve_takes_or_the_resolution() {
    let fates = fates();
    let mut counts = Counts::default();
    for &(name, build, reason) in SCENARIOS {
        let image = build().live_bytes();
        let analysis = journal::analyse(&SimDisk::from_bytes(image.clone())).unwrap();
        let refusal = analysis.outcome.as_ref().expect_err("the setup is refused");
        assert_eq!(refusal.reason, reason, "{name}: {refusal}");
        for side in [Side::Source, Side::Destination] {
            let probe = SimDisk::from_bytes(image.clone());
            let seq = journal::resolve(&probe, &analysis, side, |_| Ok(()))
                .unwrap_or_else(|e| panic!("{name}: resolve failed: {e}"));
            let done = journal::analyse(&probe).unwrap().outcome.expect("resolved");
            assert_eq!((done.seq, done.record.authoritative), (seq, side));
            assert!(done.repairs.is_empty(), "{name}: {:?}", done.repairs);
            let mut reruns = HashSet::new();
            // The largest number of writes done before a crash that still
            // left the journal refused.
            let mut refused_after_writes = 0;
            for n in 0..=probe.ops() {
                counts.crash_points += 1;
                let crashing = SimDisk::from_bytes(image.clone());
                crashing.crash_at(n);
                let _ = journal::resolve(&crashing, &analysis, side, |_| Ok(()));
                let writes = crashing.writes_seen();
                let what = format!("{name}, {}, crash at call {n}", side.name());
                let mut refused = check(
                    &crashing.after_process_crash(),
                    seq,
                    side,
                    &what,
                    &mut counts,
                    &mut reruns,
                );
                let pending = crashing.pending();
                assert!(pending.len() <= 1, "{what}: more than one unsynced write");
                let power = if pending.is_empty() {
                    &fates[..1]
                } else {
                    &fates[..]
                };
                for fate in power {
                    let after = crashing.after_power_loss(|_, _| fate.clone());
                    refused |= check(&after, seq, side, &what, &mut counts, &mut reruns);
                }
                if refused {
                    refused_after_writes = refused_after_writes.max(writes);
                }
            }
            if name == "headers disagree" {
                // The differing header is rewritten right after the
                // resolution's two copies: only those three writes may be
                // followed by a refused journal.
                assert!(
                    refused_after_writes <= 3,
                    "{name}: still refused after {refused_after_writes} writes"
                );
            }
        }
    }
    println!(
        "resolve crash enumeration: {} scenarios x 2 sides, {} crash points, {} crash cases \
         ({} resolved, {} refused in a way resolve takes), {} second resolves",
        SCENARIOS.len(),
        counts.crash_points,
        counts.cases,
        counts.resolved,
        counts.refused,
        counts.reruns
    );
    assert!(
        counts.cases > 20_000,
        "the enumeration shrank: {}",
        counts.cases
    );
}

/// With a record numbered u64::MAX - 1 in the journal, a resolution would
/// be numbered u64::MAX, which decoding rejects: resolve refuses before it
/// writes anything, the backup included.
#[test]
fn resolve_refuses_to_number_a_resolution_u64_max() {
    let (disk, _j) = sim_journal(Phase::Ready);
    let seq = u64::MAX - 1;
    let frame = record_frame(seq, 0x0BAD, &first_record());
    let slot = (seq % 4) as u8;
    for copy in 0..2 {
        put(&disk, Position::Slot { slot, copy }, &frame);
    }
    let analysis = journal::analyse(&disk).unwrap();
    assert_eq!(analysis.max_seq_seen, Some(seq));
    assert!(analysis.outcome.is_err(), "the setup must be refused");
    let before = disk.live_bytes();
    let writes = disk.writes_seen();
    let mut backed_up = false;
    let result = journal::resolve(&disk, &analysis, Side::Source, |_| {
        backed_up = true;
        Ok(())
    });
    let error = result.expect_err("resolve must refuse seq u64::MAX");
    assert_eq!(error.kind(), livecopy::ErrorKind::Corrupt, "{error}");
    assert!(!backed_up, "nothing, not even the backup, is written");
    assert_eq!(disk.writes_seen(), writes);
    assert_eq!(disk.live_bytes(), before);
}

/// Blocks of another journal that outvote ours (an interrupted copy of
/// another journal over this one) are not damage resolve may settle: the
/// other job's images must never be written into this journal. One block
/// of another journal among ours still is.
#[test]
fn resolve_never_adopts_another_journal_that_outvotes_ours() {
    let (ours, _j) = crate::support::sim_journal(Phase::Switched);
    let theirs = SimDisk::new(JOURNAL_LEN);
    let mut other = crate::support::first_record_for("/vm-b/disk.raw", "/vm-b/copy.raw");
    other.job_id = *b"other-job-000002";
    let mut j =
        journal::Journal::format(theirs.clone(), *b"other-journal-id", other).expect("format");
    j.commit(Phase::Ready, 0).expect("ready");
    let theirs = theirs.live_bytes();
    for foreign in [1usize, 5, 6, 7] {
        let mut image = ours.live_bytes();
        image[..foreign * BLOCK_SIZE].copy_from_slice(&theirs[..foreign * BLOCK_SIZE]);
        let analysis = journal::analyse(&SimDisk::from_bytes(image)).expect("analyse");
        let reason = analysis.outcome.as_ref().err().map(|r| r.reason);
        assert_eq!(
            reason,
            Some(RefusalReason::WrongJournal),
            "{foreign} foreign blocks"
        );
        assert_eq!(
            journal::resolvable(&analysis),
            foreign == 1,
            "{foreign} foreign blocks (elected {:?})",
            analysis
                .uuid
                .map(|u| String::from_utf8_lossy(&u).into_owned())
        );
    }
}
