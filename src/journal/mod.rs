//! The switch-state journal: a 44 KiB file (40 KiB in format 1) that says,
//! durably, which image holds every acknowledged write.
//!
//! Invariants (numbered; tests and comments refer to them):
//!
//! - J1. A record is reported durable only after copy A was written and
//!   synced, and then copy B was written and synced.
//! - J2. Any failed write or sync poisons the journal: every later call
//!   fails; a failed sync is never retried and never reported as success.
//! - J3. A commit never writes a block that holds the newest acknowledged
//!   record: record `seq` goes to slot `seq % 4`, and the newest is in
//!   slot `(seq - 1) % 4`.
//! - J4. Recovery returns the newest record that may have been acknowledged,
//!   or refuses; never an older one, never one that was not written
//!   (see `recovery`).
//! - J5. Repair rewrites only copies whose twin is intact, after a backup.
//! - J6. Format 2: a record that changes the authoritative side (Switched,
//!   Resolved) is also written to the seal block, with copy B and before
//!   the second sync, so that it is acknowledged with three copies.
//!
//! ```text
//!          format (rename)          commit            commit
//!   (none) ---------------> Copying ------> Ready ---------> Switched --> Completed
//!                              |  ^          | |                | ^
//!                              |  `----------' `--> Aborted     `-' (restart, new epoch)
//!                              `------------------> Aborted
//!   restart (new writer, higher epoch): Copying|Ready --> Copying, Switched --> Switched
//!   any -- copyctl resolve --> Resolved (terminal; starts a new chain: no parent)
//! ```

pub mod format;
pub mod payload;
pub mod progress;
pub mod recovery;

use std::path::Path;

use crate::error::{Error, Result};
use crate::storage::{FileStorage, JournalAccess, LockState, Storage};
use format::{BLOCK_SIZE, FORMAT_VERSION, Frame, JOURNAL_LEN, Kind, Position, SLOTS};
pub use payload::{
    ExportRecord, Extension, HeaderV1, ImagePair, ImageRecord, ImageRef, Phase, Record, RecordV1,
    Side,
};
pub use progress::Progress;
pub use recovery::{Analysis, BlockReport, Class, Recovered, Refusal, RefusalReason, Repair};

/// An open journal that this process may write.
#[derive(Debug)]
pub struct Journal<S: Storage> {
    storage: S,
    /// The file's format: new journals are format 2; a format 1 journal is
    /// continued in format 1.
    version: u16,
    uuid: [u8; 16],
    seq: u64,
    content_crc: u32,
    record: Record,
    writer_instance: [u8; 16],
    writer_epoch: u64,
    poisoned: bool,
}

fn now_unix_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

fn write_block<S: Storage>(storage: &S, frame: &Frame) -> Result<()> {
    let block = format::encode(frame);
    storage
        .write_at(frame.position.offset(), &block)
        .map_err(|e| Error::io("journal write", e))
}

fn sync<S: Storage>(storage: &S) -> Result<()> {
    storage
        .sync_data()
        .map_err(|e| Error::io("journal fdatasync", e))
}

/// One block as read: its bytes, or the read error's text.
pub type BlockRead = std::result::Result<Vec<u8>, String>;

/// Reads every block of a journal (ten in format 1, eleven in format 2),
/// each as bytes or the read error; `None` when the size is no journal's.
pub fn read_blocks<S: Storage>(storage: &S) -> Result<Option<Vec<BlockRead>>> {
    let len = storage.len().map_err(|e| Error::io("journal size", e))?;
    let Some(version) = format::version_of_len(len) else {
        return Ok(None);
    };
    Ok(Some(
        Position::all(version)
            .map(|position| {
                let mut block = vec![0u8; BLOCK_SIZE];
                storage
                    .read_medium_at(position.offset(), &mut block)
                    .map(|()| block)
                    .map_err(|e| e.to_string())
            })
            .collect(),
    ))
}

/// Reads and analyses a journal without writing anything. Read errors on
/// single blocks are evidence (the block is unreadable), not failures.
pub fn analyse<S: Storage>(storage: &S) -> Result<Analysis> {
    let len = storage.len().map_err(|e| Error::io("journal size", e))?;
    Ok(match read_blocks(storage)? {
        Some(blocks) => {
            // One unreadable block is evidence; all of them is a failed device.
            if let Some(Err(first)) = blocks
                .iter()
                .find(|b| b.is_err())
                .filter(|_| blocks.iter().all(|b| b.is_err()))
            {
                return Err(Error::io(
                    "journal read",
                    std::io::Error::other(first.clone()),
                ));
            }
            recovery::analyse(&blocks)
        }
        None => recovery::truncated(len),
    })
}

impl<S: Storage> Journal<S> {
    /// Lays out a new journal on `storage` (which must be exactly
    /// [`JOURNAL_LEN`] bytes) with `first` as record 0, and syncs it.
    /// For files, use [`create_file`], which adds exclusive creation and the
    /// rename that makes the journal appear only when complete.
    pub fn format(storage: S, uuid: [u8; 16], first: Record) -> Result<Self> {
        let len = storage.len().map_err(|e| Error::io("journal size", e))?;
        if len != JOURNAL_LEN {
            return Err(Error::InvalidInput(format!(
                "journal storage is {len} bytes, not {JOURNAL_LEN}"
            )));
        }
        if first.phase != Phase::Copying || first.writer_epoch != 1 {
            return Err(Error::InvalidInput(
                "the first record must be Copying, epoch 1".into(),
            ));
        }
        first
            .check()
            .map_err(|why| Error::InvalidInput(why.into()))?;
        let header = HeaderV1::new(first.job_id, now_unix_ns());
        let header_bytes = payload::encode(&header).map_err(Error::InvalidInput)?;
        let record_bytes =
            payload::encode_record(FORMAT_VERSION, &first).map_err(Error::InvalidInput)?;
        for position in Position::all(FORMAT_VERSION) {
            let frame = match position {
                Position::Header { .. } => {
                    Frame::new(Kind::Header, position, uuid, 0, 0, header_bytes.clone())
                }
                Position::Slot { slot: 0, .. } => {
                    Frame::new(Kind::Record, position, uuid, 0, 0, record_bytes.clone())
                }
                Position::Slot { .. } | Position::Seal => {
                    Frame::new(Kind::EmptySlot, position, uuid, 0, 0, Vec::new())
                }
            };
            write_block(&storage, &frame)?;
        }
        sync(&storage)?;
        let content_crc = format::content_crc(0, &record_bytes);
        Ok(Journal {
            storage,
            version: FORMAT_VERSION,
            uuid,
            seq: 0,
            content_crc,
            writer_instance: first.writer_instance,
            writer_epoch: first.writer_epoch,
            record: first,
            poisoned: false,
        })
    }

    /// Takes over a recovered journal as a new writer: the next record will
    /// carry a fresh writer instance and the next epoch. Refuses while
    /// repairs are pending, so that every later commit starts from a journal
    /// in which the newest record has both copies.
    pub fn resume(storage: S, recovered: &Recovered) -> Result<Self> {
        if !recovered.repairs.is_empty() {
            return Err(Error::InvalidInput(
                "the journal has damaged copies; repair it before writing".into(),
            ));
        }
        let mut instance = [0u8; 16];
        crate::random_bytes(&mut instance);
        Ok(Journal {
            storage,
            version: recovered.version,
            uuid: recovered.uuid,
            seq: recovered.seq,
            content_crc: recovered.content_crc,
            record: recovered.record.clone(),
            writer_instance: instance,
            writer_epoch: recovered.record.writer_epoch + 1,
            poisoned: false,
        })
    }

    /// The progress the newest durable record carries (after any
    /// coarsening `commit_progress` did to fit it).
    pub fn progress(&self) -> Option<Progress> {
        self.record.progress()
    }

    /// The newest durable record.
    pub fn record(&self) -> &Record {
        &self.record
    }

    /// The newest durable record's sequence number.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// The file's format version.
    pub fn version(&self) -> u16 {
        self.version
    }

    /// The journal's UUID.
    pub fn uuid(&self) -> [u8; 16] {
        self.uuid
    }

    /// Whether an I/O failure has latched.
    pub fn is_poisoned(&self) -> bool {
        self.poisoned
    }

    /// The storage underneath.
    pub fn storage(&self) -> &S {
        &self.storage
    }

    /// Durably records that the job entered `phase` (J1). Returns the new
    /// sequence number once both copies are synced. The authoritative side
    /// follows from the phase.
    /// The copy's progress (journal format 2) is kept while the job copies
    /// or is ready, and dropped with any other phase.
    pub fn commit(&mut self, phase: Phase, bytes_copied: u64) -> Result<u64> {
        let progress = self.record.progress();
        self.commit_progress(phase, bytes_copied, progress.as_ref())
    }

    /// [`Journal::commit`] recording `progress` with a Copying or Ready
    /// record. A format 1 journal has no room for it: the record goes
    /// without (a resume then copies everything again).
    pub fn commit_progress(
        &mut self,
        phase: Phase,
        bytes_copied: u64,
        progress: Option<&Progress>,
    ) -> Result<u64> {
        if self.poisoned {
            return Err(Error::Poisoned { what: "journal" });
        }
        let previous = self.record.phase;
        let restart = self.record.writer_instance != self.writer_instance;
        if !previous.may_precede(phase, restart) || phase == Phase::Resolved {
            return Err(Error::InvalidInput(format!(
                "no transition from {} to {}",
                previous.name(),
                phase.name()
            )));
        }
        let mut record = Record {
            phase,
            authoritative: phase
                .implied_authority()
                .expect("Resolved is refused above"),
            writer_instance: self.writer_instance,
            writer_epoch: self.writer_epoch,
            bytes_copied,
            wall_clock_unix_ns: now_unix_ns(),
            ..self.record.clone()
        };
        let keep = self.version >= FORMAT_VERSION && matches!(phase, Phase::Copying | Phase::Ready);
        let mut progress = progress.filter(|_| keep).cloned();
        if let Some(p) = &progress {
            p.check().map_err(|why| Error::InvalidInput(why.into()))?;
        }
        // Long image names leave less room: fewer, wider runs, and at
        // worst no progress (a resume then copies everything). Never a
        // failed commit for want of room.
        loop {
            record.set_progress(progress.as_ref());
            if progress.is_none() || payload::encode_record(self.version, &record).is_ok() {
                break;
            }
            progress = progress.and_then(|p| p.coarser());
        }
        self.append(record)
    }

    fn append(&mut self, record: Record) -> Result<u64> {
        record
            .check()
            .map_err(|why| Error::InvalidInput(why.into()))?;
        let seq = self.seq + 1;
        let bytes = payload::encode_record(self.version, &record).map_err(Error::InvalidInput)?;
        let parent = if record.starts_chain(seq) {
            0
        } else {
            self.content_crc
        };
        let slot = (seq % u64::from(SLOTS)) as u8;
        let frame = Frame::of_version(
            self.version,
            Kind::Record,
            Position::Slot { slot, copy: 0 },
            self.uuid,
            seq,
            parent,
            bytes,
        );
        // J3: the slot we overwrite never holds the newest record.
        assert_ne!(slot, (self.seq % u64::from(SLOTS)) as u8);
        // J2: the first failure latches; nothing below runs twice.
        self.poisoned = true;
        write_block(&self.storage, &frame)?;
        sync(&self.storage)?;
        write_block(&self.storage, &frame.at(Position::Slot { slot, copy: 1 }))?;
        // J6: the third copy costs a write, not a sync: it is acknowledged
        // with copy B. A crash before this sync leaves copy A valid, and
        // copy A alone already decides (recovery rule 1).
        if self.version >= FORMAT_VERSION && record.phase.sealed() {
            write_block(&self.storage, &frame.at(Position::Seal))?;
        }
        sync(&self.storage)?;
        self.poisoned = false;
        self.seq = seq;
        self.content_crc = frame.content_crc;
        self.record = record;
        Ok(seq)
    }
}

/// What [`repair`] did, and recovery's verdict on the journal it left.
#[derive(Debug, Clone)]
pub struct Repaired {
    /// The rewrites carried out, in order.
    pub done: Vec<Repair>,
    /// The journal analysed again after the rewrites: the same record, and
    /// the repairs still pending (none, unless the planner had to leave some
    /// out). Callers take over the journal with this, never with the
    /// verdict they repaired from, whose repair list is now stale.
    pub recovered: Recovered,
}

/// Rewrites damaged copies from their intact twins (J5). `backup` receives
/// the whole journal image first and must store it durably; if it fails,
/// nothing is written. Each rewrite is followed by a sync and a read-back
/// from the medium. Then the journal is analysed again; if that does not
/// return the record repaired from, repairing fails (`Corrupt`).
pub fn repair<S: Storage>(
    storage: &S,
    recovered: &Recovered,
    backup: impl FnOnce(&[u8]) -> Result<()>,
) -> Result<Repaired> {
    if recovered.repairs.is_empty() {
        return Ok(Repaired {
            done: Vec::new(),
            recovered: recovered.clone(),
        });
    }
    let image = read_image(storage);
    backup(&image)?;
    for repair in &recovered.repairs {
        let offset = repair.source.offset() as usize;
        let frame = format::decode(&image[offset..offset + BLOCK_SIZE])
            .map_err(|d| Error::Corrupt(format!("repair source {} changed: {d}", repair.source)))?;
        let rewritten = frame.at(repair.target);
        write_block(storage, &rewritten)?;
        sync(storage)?;
        // The plan assumed this copy now exists; if the medium does not give
        // it back, stop before a later step overwrites another copy of it.
        let mut back = vec![0u8; BLOCK_SIZE];
        let read = storage.read_medium_at(repair.target.offset(), &mut back);
        if read.is_err() || back[..] != format::encode(&rewritten)[..] {
            return Err(Error::Corrupt(format!(
                "the repaired copy at {} does not read back; stopped repairing",
                repair.target
            )));
        }
    }
    let again = analyse(storage)?.outcome.map_err(|refusal| {
        Error::Corrupt(format!("after repairing, recovery refuses: {refusal}"))
    })?;
    if (again.seq, again.content_crc) != (recovered.seq, recovered.content_crc) {
        return Err(Error::Corrupt(format!(
            "after repairing, recovery returns seq {} instead of seq {}",
            again.seq, recovered.seq
        )));
    }
    Ok(Repaired {
        done: recovered.repairs.clone(),
        recovered: again,
    })
}

/// The whole journal as the medium holds it, unreadable blocks as zeros
/// (a backup keeps what can be read; those blocks are being replaced).
fn read_image<S: Storage>(storage: &S) -> Vec<u8> {
    let len = storage.len().unwrap_or(JOURNAL_LEN);
    let version = format::version_of_len(len).unwrap_or(FORMAT_VERSION);
    let mut image = vec![0u8; format::journal_len(version) as usize];
    for position in Position::all(version) {
        let range = position.offset() as usize..position.offset() as usize + BLOCK_SIZE;
        let _ = storage.read_medium_at(position.offset(), &mut image[range]);
    }
    image
}

/// Whether `resolve` may act on this verdict: a refusal that only an
/// operator can settle, with an elected journal UUID and a readable record
/// to take the job's identity from. That is `needs-operator`, or
/// `wrong-journal` caused by exactly one block of another journal (a
/// misdirected write from another file, outvoted by ours). More foreign
/// blocks may outvote ours: the file may then be mostly another journal,
/// whose job must never be written into this one.
pub fn resolvable(analysis: &Analysis) -> bool {
    let settles = match &analysis.outcome {
        Err(r) if r.reason == RefusalReason::NeedsOperator => true,
        Err(r) if r.reason == RefusalReason::WrongJournal => {
            analysis
                .blocks
                .iter()
                .filter(|b| b.class == Class::Foreign)
                .count()
                == 1
        }
        _ => false,
    };
    settles && analysis.uuid.is_some() && analysis.newest_readable.is_some()
}

/// The operator's way out of a refusal: writes a `Resolved` record naming
/// `authority`, numbered above every sequence number seen, then turns every
/// other slot into an empty slot, so the next recovery returns it. Job and
/// image facts come from the newest readable record.
/// `backup` receives the journal image first.
///
/// Every crash point of the writes leaves a journal that recovery either
/// refuses in a way [`resolvable`] accepts (run resolve again), or resolves
/// to the resolution (or, when the journal needed no resolution, to the
/// record it returned before). Before writing, resolve checks its plan
/// against that promise with the pure recovery code, for each write landing
/// whole, not at all, or torn; a plan that cannot keep it is not started.
pub fn resolve<S: Storage>(
    storage: &S,
    analysis: &Analysis,
    authority: Side,
    backup: impl FnOnce(&[u8]) -> Result<()>,
) -> Result<u64> {
    let uuid = analysis
        .uuid
        .ok_or_else(|| Error::Corrupt("no valid block names the journal".into()))?;
    let identity = analysis.newest_readable.as_ref().ok_or_else(|| {
        Error::Corrupt("no readable record says which images the job used".into())
    })?;
    // Decoding refuses a record numbered u64::MAX: a resolution there would
    // be written, reported and then never read back.
    let seq = match analysis.max_seq_seen {
        None => 1,
        Some(max) => max
            .checked_add(1)
            .filter(|&s| s < u64::MAX)
            .ok_or_else(|| {
                Error::Corrupt(format!(
                    "the journal holds record seq {max}: no resolution can be numbered above it"
                ))
            })?,
    };
    let mut instance = [0u8; 16];
    crate::random_bytes(&mut instance);
    let record = Record {
        phase: Phase::Resolved,
        authoritative: authority,
        writer_instance: instance,
        writer_epoch: identity.writer_epoch + 1,
        wall_clock_unix_ns: now_unix_ns(),
        ..identity.clone()
    };
    record
        .check()
        .map_err(|why| Error::InvalidInput(why.into()))?;
    let header = analysis
        .header
        .clone()
        .unwrap_or_else(|| HeaderV1::new(record.job_id, now_unix_ns()));
    let blocks = read_blocks(storage)?
        .ok_or_else(|| Error::Corrupt("the journal does not have a journal's size".into()))?;
    let plan = Resolution {
        version: analysis.version,
        uuid,
        seq,
        record: &record,
        header: &header,
    };
    // Without a fence first (fewer writes), else behind one.
    let steps = [false, true]
        .into_iter()
        .map(|fence| plan.steps(analysis, fence))
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .find(|steps| plan.crash_safe(&blocks, steps))
        .ok_or_else(|| {
            Error::Corrupt(
                "no order of resolve's writes keeps every crash point refused or resolved \
                 with this damage; the journal is left as it is"
                    .into(),
            )
        })?;
    backup(&read_image(storage))?;
    for frame in &steps {
        write_block(storage, frame)?;
        sync(storage)?;
    }
    Ok(seq)
}

/// What a resolve writes, and the check of its crash points.
struct Resolution<'a> {
    version: u16,
    uuid: [u8; 16],
    seq: u64,
    record: &'a Record,
    header: &'a HeaderV1,
}

impl Resolution<'_> {
    /// The writes, each followed by a sync, in order:
    ///
    /// 1. With `fence` (and unless the headers disagree already, which is
    ///    a fence): header/1 as the kept header, then header/0 as a header
    ///    that differs from it only in `created_unix_ns`. Two valid headers
    ///    that differ make recovery refuse (`headers-disagree`) whatever the
    ///    slots hold, so no torn write of the resolution's slot can lift the
    ///    refusal and let an older record through.
    /// 2. The resolution, copy A, then copy B.
    /// 3. The header that differs from the kept one, rewritten as it: from
    ///    here on the headers agree. Then (format 2) the resolution to the
    ///    seal: it changes sides, so it gets its third copy.
    /// 4. Both copies of the slot after the resolution, then the two other
    ///    slots, as empty slots; then any header not yet the kept one.
    fn steps(&self, analysis: &Analysis, fence: bool) -> Result<Vec<Frame>> {
        let header_bytes = payload::encode(self.header).map_err(Error::InvalidInput)?;
        let kept_crc = format::content_crc(0, &header_bytes);
        let kept = |position| {
            Frame::of_version(
                self.version,
                Kind::Header,
                position,
                self.uuid,
                0,
                0,
                header_bytes.clone(),
            )
        };
        let holds_kept = |position: Position| {
            analysis.blocks.get(position.block()).is_some_and(|b| {
                b.class == Class::Valid
                    && b.kind == Some(Kind::Header)
                    && b.content_crc == Some(kept_crc)
            })
        };
        let (h0, h1) = (Position::Header { copy: 0 }, Position::Header { copy: 1 });
        let disagree = analysis
            .evidence
            .is_some_and(|e| e.headers == recovery::Headers::Disagree);
        let mut steps = Vec::new();
        let mut unfence = None;
        if disagree {
            unfence = [h0, h1].into_iter().find(|&p| !holds_kept(p));
        } else if fence {
            if !holds_kept(h1) {
                steps.push(kept(h1));
            }
            let other = HeaderV1 {
                created_unix_ns: self.header.created_unix_ns.wrapping_add(1),
                ..self.header.clone()
            };
            let other_bytes = payload::encode(&other).map_err(Error::InvalidInput)?;
            steps.push(Frame::of_version(
                self.version,
                Kind::Header,
                h0,
                self.uuid,
                0,
                0,
                other_bytes,
            ));
            unfence = Some(h0);
        }
        let bytes =
            payload::encode_record(self.version, self.record).map_err(Error::InvalidInput)?;
        let slot = (self.seq % u64::from(SLOTS)) as u8;
        let resolution = Frame::of_version(
            self.version,
            Kind::Record,
            Position::Slot { slot, copy: 0 },
            self.uuid,
            self.seq,
            0,
            bytes,
        );
        steps.push(resolution.clone());
        steps.push(resolution.at(Position::Slot { slot, copy: 1 }));
        if let Some(position) = unfence {
            steps.push(kept(position));
        }
        if self.version >= FORMAT_VERSION {
            steps.push(resolution.at(Position::Seal));
        }
        for s in [1, 2, 3].map(|n| (slot + n) % SLOTS) {
            for copy in 0..2 {
                let position = Position::Slot { slot: s, copy };
                steps.push(Frame::of_version(
                    self.version,
                    Kind::EmptySlot,
                    position,
                    self.uuid,
                    0,
                    0,
                    Vec::new(),
                ));
            }
        }
        for position in [h0, h1] {
            let written = steps.iter().any(|f| f.position == position);
            if !written && !holds_kept(position) {
                steps.push(kept(position));
            }
        }
        Ok(steps)
    }

    /// Whether every crash point of `steps`, applied to `blocks`, leaves a
    /// journal that keeps resolve's promise, and the last leaves the
    /// resolution. A crash during a write leaves the block as it was,
    /// written, or torn (invalid: its checksum fails); the writes before it
    /// are synced.
    fn crash_safe(&self, blocks: &[BlockRead], steps: &[Frame]) -> bool {
        let before = recovery::analyse(blocks).outcome.ok();
        let resolved = |a: &Analysis| {
            a.outcome
                .as_ref()
                .is_ok_and(|r| r.seq == self.seq && r.record == *self.record)
        };
        let keeps_promise = |a: &Analysis| {
            resolved(a)
                || resolvable(a)
                || match (&a.outcome, &before) {
                    (Ok(now), Some(then)) => {
                        (now.seq, now.content_crc) == (then.seq, then.content_crc)
                    }
                    _ => false,
                }
        };
        let mut state = blocks.to_vec();
        for frame in steps {
            let block = frame.position.block();
            let mut torn = state.clone();
            torn[block] = Ok(vec![0u8; BLOCK_SIZE]);
            state[block] = Ok(format::encode(frame).to_vec());
            if !keeps_promise(&recovery::analyse(&torn))
                || !keeps_promise(&recovery::analyse(&state))
            {
                return false;
            }
        }
        resolved(&recovery::analyse(&state))
    }
}

/// A journal file opened for recovery: its storage, the lock state, and the
/// analysis of its contents.
#[derive(Debug)]
pub struct OpenedFile {
    /// The file.
    pub storage: FileStorage,
    /// Whether we hold the lock.
    pub lock: LockState,
    /// What recovery found.
    pub analysis: Analysis,
}

/// Opens the journal at `path` as recovery must (no symlinks, lock, sync the
/// file and directory before reading) and analyses it.
pub fn open_file(path: &Path, access: JournalAccess) -> Result<OpenedFile> {
    let (storage, lock) = FileStorage::open_journal(path, access)?;
    let analysis = analyse(&storage)?;
    Ok(OpenedFile {
        storage,
        lock,
        analysis,
    })
}

/// Creates the journal file at `path` with `first` as record 0. The file
/// appears complete or not at all; an existing file is never replaced.
pub fn create_file(path: &Path, first: Record) -> Result<Journal<FileStorage>> {
    let mut uuid = [0u8; 16];
    crate::random_bytes(&mut uuid);
    let mut journal = None;
    let storage = crate::storage::create_new_file_atomically(path, |s| {
        s.set_len(JOURNAL_LEN)
            .map_err(|e| Error::io_at("set_len", s.path(), e))?;
        // Format through a borrowed view; the storage moves out below.
        let formatted = Journal::format(s, uuid, first.clone())?;
        journal = Some((
            formatted.seq,
            formatted.content_crc,
            formatted.record.clone(),
        ));
        Ok(())
    })?;
    let (seq, content_crc, record) = journal.expect("fill ran");
    Ok(Journal {
        storage,
        version: FORMAT_VERSION,
        uuid,
        seq,
        content_crc,
        writer_instance: record.writer_instance,
        writer_epoch: record.writer_epoch,
        record,
        poisoned: false,
    })
}
