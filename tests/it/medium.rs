//! Recovery reads the medium, not the page cache. A failed fdatasync may
//! leave pages clean in the cache that never reached the medium (A5); a
//! misdirected write sits in the cache at the offset asked for and on the
//! medium elsewhere (A4). On the simulated disk, which keeps both views,
//! recovery must name what a later power loss will also name, and the
//! repair read-back must see a misdirected repair write. On real files,
//! `FileStorage::read_medium_at` (O_DIRECT, or the cached pages dropped
//! first) is tested to return what was synced (src/storage/file.rs); the
//! fault itself cannot be produced on a real file system in a test.

use livecopy::journal::format::Position;
use livecopy::journal::{self, Phase, Side};
use livecopy::storage::{Storage, WriteFate};

use crate::support::sim_journal;

/// The Switched commit's copy-A sync fails and its pages stay in the cache:
/// recovery without repair (what `recover --no-repair` and `inspect` run)
/// must name the source, as it will after any power loss, not the
/// destination the cache shows.
#[test]
fn a_failed_sync_left_in_the_cache_does_not_decide_recovery() {
    let (disk, mut j) = sim_journal(Phase::Ready);
    disk.fail_next_sync(false);
    j.commit(Phase::Switched, 0).expect_err("the sync fails");
    let mut cached = vec![0u8; 4096];
    disk.read_at(Position::Slot { slot: 2, copy: 0 }.offset(), &mut cached)
        .expect("read the cache");
    assert_eq!(
        livecopy::journal::format::decode(&cached).map(|f| f.seq),
        Ok(2),
        "the cache holds the Switched record"
    );

    let now = journal::analyse(&disk).unwrap().outcome.expect("recovers");
    let mut sides = vec![];
    for fate in [WriteFate::Apply, WriteFate::Drop] {
        let later = journal::analyse(&disk.after_power_loss(|_, _| fate.clone()))
            .unwrap()
            .outcome
            .expect("recovers after the power loss");
        sides.push((later.seq, later.record.authoritative));
    }
    assert_eq!(
        (now.seq, now.record.phase, now.record.authoritative),
        (1, Phase::Ready, Side::Source),
        "recovery named what only the cache holds"
    );
    assert!(sides.iter().all(|&s| s == (1, Side::Source)), "{sides:?}");
}

/// A repair write that the disk misdirects: the cache shows it in place,
/// the medium does not; the read-back of the medium stops the repair.
#[test]
fn the_repair_read_back_sees_a_misdirected_repair_write() {
    let (disk, _j) = sim_journal(Phase::Switched);
    // Seq 2 in slot 2; damage copy B, so the repair rewrites it from A.
    let target = Position::Slot { slot: 2, copy: 1 };
    disk.scribble(target.offset() + 100, &[0xEE; 64]);
    let recovered = journal::analyse(&disk).unwrap().outcome.expect("recovers");
    assert_eq!(recovered.repairs.len(), 1, "{:?}", recovered.repairs);
    assert_eq!(recovered.repairs[0].target, target);
    // The repair's write lands on slot 3/B instead (an older slot).
    disk.misdirect_next_write(Position::Slot { slot: 3, copy: 1 }.offset());
    let error = journal::repair(&disk, &recovered, |_| Ok(()))
        .expect_err("the read-back must see that the copy is not there");
    assert_eq!(error.kind(), livecopy::ErrorKind::Corrupt, "{error}");
    assert!(error.to_string().contains("does not read back"), "{error}");
    // And recovery, reading the medium, still returns seq 2.
    let after = journal::analyse(&disk).unwrap().outcome.expect("recovers");
    assert_eq!((after.seq, after.record.phase), (2, Phase::Switched));
}
