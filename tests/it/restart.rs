//! The restart path after a repair, and the library's verdicts: a journal
//! that recovery repairs must be taken over at the first attempt, by
//! `engine::files::resume` and `restart::authoritative_image` alike.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use livecopy::engine::{Config, files};
use livecopy::journal::format::{BLOCK_SIZE, JOURNAL_LEN, Position};
use livecopy::journal::{self, ImagePair, ImageRecord, ImageRef, Phase, Record};
use livecopy::storage::JournalAccess;

use crate::support::{exclusive, first_record_for, path_to};

/// A job's images (real files) and a journal advanced to a phase.
pub struct Files {
    pub dir: tempfile::TempDir,
    pub journal: PathBuf,
}

fn image(path: &Path, len: usize) -> ImageRecord {
    if !path.exists() {
        fs::write(path, vec![0x5a; len]).expect("write image");
    }
    let meta = fs::metadata(path).expect("stat image");
    ImageRecord {
        path: fs::canonicalize(path)
            .expect("canonical path")
            .to_str()
            .expect("UTF-8 path")
            .to_string(),
        size: meta.size(),
        device: meta.dev(),
        inode: meta.ino(),
    }
}

impl Files {
    /// Images of 64 KiB and a journal whose newest record is `phase`.
    pub fn new(phase: Phase) -> Files {
        let dir = tempfile::tempdir().expect("tempdir");
        let record = Record {
            pairs: vec![ImagePair {
                source: ImageRef::File(image(&dir.path().join("source.raw"), 64 << 10)),
                destination: ImageRef::File(image(&dir.path().join("destination.raw"), 64 << 10)),
            }],
            ..first_record_for("/unused/source", "/unused/destination")
        };
        let journal = dir.path().join("copy.journal");
        let _no_fork = exclusive();
        let mut j = journal::create_file(&journal, record).expect("create journal");
        for (i, next) in path_to(phase).into_iter().enumerate() {
            j.commit(next, (i as u64 + 1) * 4096).expect("commit");
        }
        drop(j);
        Files { dir, journal }
    }

    pub fn bytes(&self) -> Vec<u8> {
        fs::read(&self.journal).expect("read journal")
    }

    pub fn put(&self, bytes: &[u8]) {
        assert_eq!(bytes.len() as u64, JOURNAL_LEN);
        fs::write(&self.journal, bytes).expect("write journal");
    }

    /// The journal's verdict, read without writing (as `inspect` does).
    pub fn verdict(&self) -> journal::Analysis {
        let _no_fork = exclusive();
        journal::open_file(&self.journal, JournalAccess::Inspect)
            .expect("open journal")
            .analysis
    }
}

fn range(position: Position) -> std::ops::Range<usize> {
    position.offset() as usize..position.offset() as usize + BLOCK_SIZE
}

/// Every kind of damage a repair mends on a journal: one flipped byte in
/// each of the ten blocks (a header, a copy of the newest record, of its
/// parent, of an older record or of an empty slot), and a misdirected copy
/// of the newest record over each other position.
fn damaged_variants(pristine: &[u8], newest: u64) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for position in Position::all(livecopy::journal::format::FORMAT_VERSION) {
        let mut bytes = pristine.to_vec();
        bytes[range(position).start + 200] ^= 0x01;
        out.push((format!("flipped byte in {position}"), bytes));
    }
    let slot = (newest % 4) as u8;
    let newest_a = Position::Slot { slot, copy: 0 };
    for position in Position::all(livecopy::journal::format::FORMAT_VERSION)
        .filter(|p| *p != newest_a && *p != newest_a.twin())
    {
        let mut bytes = pristine.to_vec();
        let block = pristine[range(newest_a)].to_vec();
        bytes[range(position)].copy_from_slice(&block);
        out.push((
            format!("copy of {newest_a} misdirected to {position}"),
            bytes,
        ));
    }
    out
}

/// `files::resume` after every kind of repair, on a copying and on a ready
/// job: the first attempt repairs and takes over.
#[test]
fn files_resume_takes_over_at_the_first_attempt_after_every_kind_of_repair() {
    let mut cases = 0;
    for (phase, newest) in [(Phase::Copying, 0), (Phase::Ready, 1)] {
        let files = Files::new(phase);
        let pristine = files.bytes();
        for (what, bytes) in damaged_variants(&pristine, newest) {
            files.put(&bytes);
            let analysis = files.verdict();
            let Ok(recovered) = &analysis.outcome else {
                // Not a repair case (e.g. the misdirected copy replaced the
                // parent of the newest record): out of scope here.
                continue;
            };
            if recovered.repairs.is_empty() {
                continue;
            }
            cases += 1;
            let job = {
                let _no_fork = exclusive();
                files::resume(&files.journal, Config::default())
            };
            let job = job
                .unwrap_or_else(|e| panic!("{phase:?}, {what}: resume after repair failed: {e}"));
            assert_eq!(job.status().phase.name(), "copying", "{what}");
            {
                let _no_fork = exclusive();
                drop(job);
            }
            let after = files.verdict().outcome.expect("recovers after resume");
            assert_eq!(after.record.phase, Phase::Copying, "{what}");
            assert_eq!(after.seq, newest + 1, "{what}");
            assert!(after.repairs.is_empty(), "{what}: {:?}", after.repairs);
            for backup in fs::read_dir(files.dir.path()).expect("list") {
                let backup = backup.expect("entry").path();
                if backup.to_string_lossy().contains(".broken.") {
                    fs::remove_file(backup).expect("remove backup");
                }
            }
        }
    }
    println!("files::resume after repair: {cases} damaged journals taken over at once");
    assert!(cases >= 30, "only {cases} repair cases");
}

/// `restart::authoritative_image` repairs and returns the verdict on the
/// repaired journal, which a writer can take over as it is.
#[test]
fn authoritative_image_returns_the_verdict_on_the_repaired_journal() {
    let files = Files::new(Phase::Switched);
    let mut bytes = files.bytes();
    bytes[range(Position::Slot { slot: 2, copy: 1 }).start + 300] ^= 0x10;
    files.put(&bytes);
    let authority = {
        let _no_fork = exclusive();
        livecopy::restart::authoritative_image(&files.journal).expect("recovers")
    };
    assert_eq!(authority.phase, Phase::Switched);
    assert!(
        authority.recovered.repairs.is_empty(),
        "stale repairs: {:?}",
        authority.recovered.repairs
    );
    let storage = livecopy::storage::SimDisk::from_bytes(files.bytes());
    journal::Journal::resume(storage, &authority.recovered).expect("a writer takes over");
}

/// The library warns, as `copyctl recover` does, when the image it names
/// is no longer the file the job recorded.
#[test]
fn authoritative_image_warns_when_the_image_changed() {
    let files = Files::new(Phase::Copying);
    let source = files.dir.path().join("source.raw");
    let replacement = files.dir.path().join("source.new");
    fs::write(&replacement, [1u8; 512]).expect("write");
    fs::rename(&replacement, &source).expect("rename");
    let authority = {
        let _no_fork = exclusive();
        livecopy::restart::authoritative_image(&files.journal).expect("recovers")
    };
    assert!(
        authority
            .warnings
            .iter()
            .any(|w| w.contains("changed since the job started") && w.contains("size 512")),
        "{:?}",
        authority.warnings
    );
}

/// A verdict without repair: the same side, the repairs listed, nothing
/// written.
#[test]
fn verdict_without_repair_writes_nothing() {
    let files = Files::new(Phase::Switched);
    let mut bytes = files.bytes();
    bytes[range(Position::Slot { slot: 2, copy: 0 }).start + 300] ^= 0x10;
    files.put(&bytes);
    let authority = {
        let _no_fork = exclusive();
        livecopy::restart::verdict_without_repair(&files.journal).expect("recovers")
    };
    assert_eq!(authority.phase, Phase::Switched);
    assert_eq!(authority.side, journal::Side::Destination);
    assert_eq!(authority.recovered.repairs.len(), 1);
    assert_eq!(files.bytes(), bytes, "the journal was written");
    let listing = fs::read_dir(files.dir.path()).expect("list").count();
    assert_eq!(listing, 3, "a backup was made");
}
