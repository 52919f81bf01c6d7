//! Two faults on a journal whose newest durable record is Switched or
//! later: recovery never names the source (journal format 2's seal).
//!
//! For each workload, the journal image is captured before and after each
//! of its last two commits. Every block those commits wrote can suffer one
//! fault: its write lost (the block keeps what it held before the commit),
//! zeroed, filled with 0xFF, garbage, a bit flipped (in the frame, in the
//! payload, in the padding), torn (half new and half old, or half new and
//! half garbage), or misdirected (the block keeps its old bytes and the new
//! ones land on another block of the file). Every pair of such faults is
//! applied (a pair on one block too: the second wins), and recovery must
//! name the destination or refuse; never the source. Each fault alone must
//! not name the source either.

use livecopy::journal::format::{BLOCK_COUNT, BLOCK_SIZE, JOURNAL_LEN, Position};
use livecopy::journal::{self, Journal, Phase, Side};
use livecopy::storage::SimDisk;

use crate::support::{UUID, first_record};

#[derive(Clone, Copy)]
enum Step {
    Commit(Phase),
    Restart,
}

use Phase::*;
use Step::{Commit, Restart};

/// Workloads whose last two commits end at Switched or later.
const WORKLOADS: &[(&str, &[Step])] = &[
    ("ready-switched", &[Commit(Ready), Commit(Switched)]),
    (
        "switched-completed",
        &[Commit(Ready), Commit(Switched), Commit(Completed)],
    ),
    (
        "switched-restart-switched",
        &[Commit(Ready), Commit(Switched), Restart, Commit(Switched)],
    ),
    (
        "wrapped-ring-switched",
        &[
            Commit(Ready),
            Restart,
            Commit(Copying),
            Commit(Ready),
            Commit(Switched),
            Commit(Completed),
        ],
    ),
];

/// The image after every commit of a workload (index 0: after format).
fn images(steps: &[Step]) -> Vec<Vec<u8>> {
    let disk = SimDisk::new(JOURNAL_LEN);
    let mut j = Journal::format(disk.clone(), UUID, first_record()).expect("format");
    let mut out = vec![disk.live_bytes()];
    for step in steps {
        match *step {
            Commit(phase) => {
                j.commit(phase, 0).expect("commit");
                out.push(disk.live_bytes());
            }
            Restart => {
                let recovered = journal::analyse(&disk)
                    .expect("analyse")
                    .outcome
                    .expect("a healthy journal recovers");
                j = Journal::resume(disk.clone(), &recovered).expect("resume");
            }
        }
    }
    out
}

fn block(image: &[u8], b: usize) -> &[u8] {
    &image[b * BLOCK_SIZE..(b + 1) * BLOCK_SIZE]
}

/// One fault: the blocks it changes, with their new bytes.
#[derive(Clone)]
struct Fault {
    name: String,
    writes: Vec<(usize, Vec<u8>)>,
}

fn garbage(seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..BLOCK_SIZE)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Every fault of a block that a commit rewrote from `old` to `new`.
fn faults_of(b: usize, old: &[u8], new: &[u8]) -> Vec<Fault> {
    let at = |name: &str, bytes: Vec<u8>| Fault {
        name: format!("{name} of block {b}"),
        writes: vec![(b, bytes)],
    };
    let mut out = vec![
        at("lost write", old.to_vec()),
        at("zeroed", vec![0; BLOCK_SIZE]),
        at("0xff", vec![0xff; BLOCK_SIZE]),
        at("garbage", garbage(b as u64 + 1)),
    ];
    for offset in [0usize, 9, 40, 70, 200, 4095] {
        let mut flipped = new.to_vec();
        flipped[offset] ^= 0x10;
        out.push(at(&format!("bit flip at {offset}"), flipped));
    }
    let half = BLOCK_SIZE / 2;
    let mut torn_old = new[..half].to_vec();
    torn_old.extend_from_slice(&old[half..]);
    out.push(at("torn with old", torn_old));
    let mut torn_garbage = new[..half].to_vec();
    torn_garbage.extend_from_slice(&garbage(99)[half..]);
    out.push(at("torn with garbage", torn_garbage));
    for target in (0..BLOCK_COUNT).filter(|&t| t != b) {
        out.push(Fault {
            name: format!("block {b} misdirected to block {target}"),
            writes: vec![(b, old.to_vec()), (target, new.to_vec())],
        });
    }
    out
}

/// Faults of every block the last two commits of `images` wrote.
fn faults(images: &[Vec<u8>]) -> Vec<Fault> {
    let n = images.len();
    let mut out = Vec::new();
    for commit in [n - 2, n - 1] {
        let (before, after) = (&images[commit - 1], &images[commit]);
        for b in 0..BLOCK_COUNT {
            let (old, new) = (block(before, b), block(after, b));
            if old != new {
                out.extend(faults_of(b, old, new));
            }
        }
    }
    out
}

fn apply(image: &mut [u8], fault: &Fault) {
    for (b, bytes) in &fault.writes {
        image[b * BLOCK_SIZE..(b + 1) * BLOCK_SIZE].copy_from_slice(bytes);
    }
}

/// Recovery's side for `image`, or `None` for a refusal.
fn verdict(image: &[u8]) -> Option<Side> {
    let analysis = journal::analyse(&SimDisk::from_bytes(image.to_vec())).expect("analyse");
    analysis.outcome.ok().map(|r| r.record.authoritative)
}

#[test]
fn two_faults_never_roll_a_switched_journal_back_to_the_source() {
    let (mut singles, mut pairs, mut refused) = (0u64, 0u64, 0u64);
    for (name, steps) in WORKLOADS {
        let images = images(steps);
        let last = images.last().expect("images");
        assert_eq!(verdict(last), Some(Side::Destination), "{name}: healthy");
        let faults = faults(&images);
        for (i, first) in faults.iter().enumerate() {
            let mut once = last.clone();
            apply(&mut once, first);
            singles += 1;
            assert_ne!(
                verdict(&once),
                Some(Side::Source),
                "{name}: {} alone names the source",
                first.name
            );
            for second in &faults[i..] {
                let mut twice = once.clone();
                apply(&mut twice, second);
                pairs += 1;
                match verdict(&twice) {
                    Some(Side::Source) => panic!(
                        "{name}: {} and {} name the source after a switch",
                        first.name, second.name
                    ),
                    Some(Side::Destination) => {}
                    None => refused += 1,
                }
            }
        }
    }
    println!(
        "double faults: {} workloads, {singles} single faults, {pairs} fault pairs \
         ({refused} refused, the rest named the destination), none named the source",
        WORKLOADS.len()
    );
    assert!(pairs > 20_000, "the enumeration shrank: {pairs} pairs");
}

/// The seal is where the third copy lives: a journal whose Switched commit
/// lost copy A and had copy B zeroed still names the destination, and
/// recover puts both ring copies back from the seal.
#[test]
fn the_seal_keeps_a_switch_whose_ring_copies_are_both_gone() {
    let images = images(&[Commit(Ready), Commit(Switched)]);
    let (before, after) = (&images[1], &images[2]);
    let mut image = after.clone();
    let a = Position::Slot { slot: 2, copy: 0 }.block();
    let b = Position::Slot { slot: 2, copy: 1 }.block();
    image[a * BLOCK_SIZE..(a + 1) * BLOCK_SIZE].copy_from_slice(block(before, a));
    image[b * BLOCK_SIZE..(b + 1) * BLOCK_SIZE].fill(0);
    let disk = SimDisk::from_bytes(image);
    let recovered = journal::analyse(&disk)
        .expect("analyse")
        .outcome
        .expect("the seal decides");
    assert_eq!(
        (recovered.seq, recovered.record.phase),
        (2, Phase::Switched)
    );
    let targets: Vec<Position> = recovered.repairs.iter().map(|r| r.target).collect();
    assert!(
        targets.contains(&Position::Slot { slot: 2, copy: 0 })
            && targets.contains(&Position::Slot { slot: 2, copy: 1 }),
        "both ring copies are rewritten from the seal: {:?}",
        recovered.repairs
    );
    let repaired = journal::repair(&disk, &recovered, |_| Ok(())).expect("repair");
    assert!(repaired.recovered.repairs.is_empty());
    assert_eq!(repaired.recovered.seq, 2);
    let again = journal::analyse(&disk)
        .expect("analyse")
        .outcome
        .expect("ok");
    assert!(again.warnings.is_empty(), "{:?}", again.warnings);
    // And the seal itself is repaired when it is the damaged copy.
    let mut image = after.clone();
    let seal = Position::Seal.block();
    image[seal * BLOCK_SIZE..(seal + 1) * BLOCK_SIZE].fill(0xAA);
    let disk = SimDisk::from_bytes(image);
    let recovered = journal::analyse(&disk)
        .expect("analyse")
        .outcome
        .expect("ok");
    assert!(
        recovered.repairs.iter().any(|r| r.target == Position::Seal),
        "{:?}",
        recovered.repairs
    );
    journal::repair(&disk, &recovered, |_| Ok(())).expect("repair");
    assert_eq!(
        block(&disk.live_bytes(), seal),
        block(after, seal),
        "the seal holds the Switched record again"
    );
}

/// A block of another journal in a format 1 journal is foreign whatever
/// its format (another job's format 2 journal next to old ones is the
/// common case): refused as `wrong-journal` and settled by resolve, not
/// taken for a block of a newer writer.
#[test]
fn a_format_2_block_of_another_journal_in_a_format_1_journal_is_foreign() {
    use livecopy::journal::format::{
        FORMAT_V1, Frame, JOURNAL_LEN_V1, Kind, Position as P, encode,
    };
    use livecopy::journal::{HeaderV1, RefusalReason, payload};
    let v1 = first_record().to_v1().expect("one pair of files");
    let uuid = *b"test-journal-id1";
    let header = payload::encode(&HeaderV1::new(v1.job_id, 1)).expect("header");
    let record = payload::encode(&v1).expect("record");
    let mut image = vec![0u8; JOURNAL_LEN_V1 as usize];
    for position in P::all(FORMAT_V1) {
        let frame = match position {
            P::Header { .. } => {
                Frame::of_version(1, Kind::Header, position, uuid, 0, 0, header.clone())
            }
            P::Slot { slot: 0, .. } => {
                Frame::of_version(1, Kind::Record, position, uuid, 0, 0, record.clone())
            }
            _ => Frame::of_version(1, Kind::EmptySlot, position, uuid, 0, 0, Vec::new()),
        };
        let at = position.offset() as usize;
        image[at..at + BLOCK_SIZE].copy_from_slice(&encode(&frame));
    }
    // Slot 3 of ring A gets a block of another journal, written in format 2.
    let other = SimDisk::new(JOURNAL_LEN);
    let mut theirs = crate::support::first_record_for("/other/a", "/other/b");
    theirs.job_id = *b"other-job-000002";
    Journal::format(other.clone(), *b"other-journal-id", theirs).expect("format");
    let at = P::Slot { slot: 3, copy: 0 }.offset() as usize;
    image[at..at + BLOCK_SIZE].copy_from_slice(&other.live_bytes()[at..at + BLOCK_SIZE]);
    let analysis = journal::analyse(&SimDisk::from_bytes(image)).expect("analyse");
    let reason = analysis.outcome.as_ref().err().map(|r| r.reason);
    assert_eq!(
        reason,
        Some(RefusalReason::WrongJournal),
        "{:?}",
        analysis.row
    );
    assert!(journal::resolvable(&analysis), "resolve settles it");
}

/// A misdirected write that lands on the seal after the switch (here copy B
/// of the Completed record) is repaired away: the seal gets the Switched
/// record back, so the switch has three copies again.
#[test]
fn a_block_misdirected_onto_the_seal_after_the_switch_is_repaired() {
    let images = images(&[Commit(Ready), Commit(Switched), Commit(Completed)]);
    let (before, after) = (&images[2], &images[3]);
    let b = Position::Slot { slot: 3, copy: 1 }.block();
    let seal = Position::Seal.block();
    let mut image = after.clone();
    image[b * BLOCK_SIZE..(b + 1) * BLOCK_SIZE].copy_from_slice(block(before, b));
    image[seal * BLOCK_SIZE..(seal + 1) * BLOCK_SIZE].copy_from_slice(block(after, b));
    let disk = SimDisk::from_bytes(image);
    let recovered = journal::analyse(&disk)
        .expect("analyse")
        .outcome
        .expect("ok");
    assert_eq!(recovered.seq, 3);
    assert!(
        recovered.repairs.iter().any(|r| r.target == Position::Seal),
        "{:?}",
        recovered.repairs
    );
    let repaired = journal::repair(&disk, &recovered, |_| Ok(())).expect("repair");
    assert!(
        repaired.recovered.warnings.is_empty(),
        "{:?}",
        repaired.recovered.warnings
    );
    assert_eq!(
        block(&disk.live_bytes(), seal),
        block(before, seal),
        "the seal holds the Switched record again"
    );
}
