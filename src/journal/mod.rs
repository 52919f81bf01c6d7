//! The switch-state journal: a 40 KiB file that says, durably, which image
//! holds every acknowledged write.
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
pub mod recovery;

use std::path::Path;

use crate::error::{Error, Result};
use crate::storage::{FileStorage, JournalAccess, LockState, Storage};
use format::{BLOCK_SIZE, Frame, JOURNAL_LEN, Kind, Position, SLOTS};
pub use payload::{HeaderV1, ImageRecord, Phase, RecordV1, Side};
pub use recovery::{Analysis, BlockReport, Class, Recovered, Refusal, RefusalReason, Repair};

/// An open journal that this process may write.
#[derive(Debug)]
pub struct Journal<S: Storage> {
    storage: S,
    uuid: [u8; 16],
    seq: u64,
    content_crc: u32,
    record: RecordV1,
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

/// Reads the ten blocks of a journal, each as bytes or the read error.
pub fn read_blocks<S: Storage>(storage: &S) -> Result<Option<Vec<BlockRead>>> {
    let len = storage.len().map_err(|e| Error::io("journal size", e))?;
    if len != JOURNAL_LEN {
        return Ok(None);
    }
    Ok(Some(
        Position::all()
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
    pub fn format(storage: S, uuid: [u8; 16], first: RecordV1) -> Result<Self> {
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
        let record_bytes = payload::encode(&first).map_err(Error::InvalidInput)?;
        for position in Position::all() {
            let frame = match position {
                Position::Header { .. } => {
                    Frame::new(Kind::Header, position, uuid, 0, 0, header_bytes.clone())
                }
                Position::Slot { slot: 0, .. } => {
                    Frame::new(Kind::Record, position, uuid, 0, 0, record_bytes.clone())
                }
                Position::Slot { .. } => {
                    Frame::new(Kind::EmptySlot, position, uuid, 0, 0, Vec::new())
                }
            };
            write_block(&storage, &frame)?;
        }
        sync(&storage)?;
        let content_crc = format::content_crc(0, &record_bytes);
        Ok(Journal {
            storage,
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
            uuid: recovered.uuid,
            seq: recovered.seq,
            content_crc: recovered.content_crc,
            record: recovered.record.clone(),
            writer_instance: instance,
            writer_epoch: recovered.record.writer_epoch + 1,
            poisoned: false,
        })
    }

    /// The newest durable record.
    pub fn record(&self) -> &RecordV1 {
        &self.record
    }

    /// The newest durable record's sequence number.
    pub fn seq(&self) -> u64 {
        self.seq
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
    pub fn commit(&mut self, phase: Phase, bytes_copied: u64) -> Result<u64> {
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
        let record = RecordV1 {
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
        self.append(record)
    }

    fn append(&mut self, record: RecordV1) -> Result<u64> {
        record
            .check()
            .map_err(|why| Error::InvalidInput(why.into()))?;
        let seq = self.seq + 1;
        let bytes = payload::encode(&record).map_err(Error::InvalidInput)?;
        let parent = if record.starts_chain(seq) {
            0
        } else {
            self.content_crc
        };
        let slot = (seq % u64::from(SLOTS)) as u8;
        let frame = Frame::new(
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
    let mut image = vec![0u8; JOURNAL_LEN as usize];
    for position in Position::all() {
        let range = position.offset() as usize..position.offset() as usize + BLOCK_SIZE;
        let _ = storage.read_medium_at(position.offset(), &mut image[range]);
    }
    image
}

/// The operator's way out of a refusal: writes a `Resolved` record naming
/// `authority`, numbered above every sequence number seen, then turns every
/// other slot into an empty slot, so the next recovery returns it. Job and
/// image facts come from the newest readable record.
/// `backup` receives the journal image first.
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
    // Decoding refuses u64::MAX, so neither of these overflows.
    let seq = analysis.max_seq_seen.map_or(1, |s| s + 1);
    let image = read_image(storage);
    backup(&image)?;
    let mut instance = [0u8; 16];
    crate::random_bytes(&mut instance);
    let record = RecordV1 {
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
    let bytes = payload::encode(&record).map_err(Error::InvalidInput)?;
    let slot = (seq % u64::from(SLOTS)) as u8;
    // The resolution first, both copies. Then the slot after it, so that a
    // crash from here on finds an intact successor and returns the
    // resolution; then the rest. The headers keep their old contents where
    // one is readable, so a crash between the two never leaves them
    // disagreeing.
    let frame = Frame::new(
        Kind::Record,
        Position::Slot { slot, copy: 0 },
        uuid,
        seq,
        0,
        bytes,
    );
    for copy in 0..2 {
        write_block(storage, &frame.at(Position::Slot { slot, copy }))?;
        sync(storage)?;
    }
    let header = analysis
        .header
        .clone()
        .unwrap_or_else(|| HeaderV1::new(record.job_id, now_unix_ns()));
    let header_bytes = payload::encode(&header).map_err(Error::InvalidInput)?;
    let successor = (slot + 1) % SLOTS;
    let order = [successor, (slot + 2) % SLOTS, (slot + 3) % SLOTS]
        .into_iter()
        .flat_map(|s| {
            [
                Position::Slot { slot: s, copy: 0 },
                Position::Slot { slot: s, copy: 1 },
            ]
        })
        .chain([Position::Header { copy: 0 }, Position::Header { copy: 1 }]);
    for position in order {
        let frame = match position {
            Position::Header { .. } => {
                Frame::new(Kind::Header, position, uuid, 0, 0, header_bytes.clone())
            }
            Position::Slot { .. } => Frame::new(Kind::EmptySlot, position, uuid, 0, 0, Vec::new()),
        };
        write_block(storage, &frame)?;
        sync(storage)?;
    }
    Ok(seq)
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
pub fn create_file(path: &Path, first: RecordV1) -> Result<Journal<FileStorage>> {
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
        uuid,
        seq,
        content_crc,
        writer_instance: record.writer_instance,
        writer_epoch: record.writer_epoch,
        record,
        poisoned: false,
    })
}
