//! Journal payloads and their encoding. The only module that uses bincode.
//!
//! bincode 1.3.3 with fixed-width little-endian integers: a `u32` is 4 bytes,
//! a `u64` 8, an enum is its variant index as a `u32`, a `String` is a `u64`
//! byte length then UTF-8 bytes, a `[u8; 16]` is 16 bytes with no length.
//! journal-format.md lists every byte, so a reader needs no bincode; golden
//! vectors in the tests pin the bytes. Enum variants are append-only: their
//! index is the on-disk value.

use bincode::Options;
use serde::{Deserialize, Serialize};

use super::format::MAX_PAYLOAD;

/// Longest image path the journal stores, in bytes.
pub const MAX_PATH_LEN: usize = 1024;

/// Where the copy job stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub enum Phase {
    /// The bulk copy is running; guest writes go to both images.
    Copying,
    /// Source and destination are equal; still mirroring, waiting to switch.
    Ready,
    /// The destination is authoritative; the source is never written again.
    Switched,
    /// The management side acknowledged the switch; the source may be released.
    Completed,
    /// The job was abandoned before the switch; the source stays authoritative.
    Aborted,
    /// An operator named the authoritative image after recovery refused.
    Resolved,
}

impl Phase {
    /// Every phase, in on-disk order.
    pub const ALL: [Phase; 6] = [
        Phase::Copying,
        Phase::Ready,
        Phase::Switched,
        Phase::Completed,
        Phase::Aborted,
        Phase::Resolved,
    ];

    /// The side a record of this phase must name, if the phase fixes it.
    pub fn implied_authority(self) -> Option<Side> {
        match self {
            Phase::Copying | Phase::Ready | Phase::Aborted => Some(Side::Source),
            Phase::Switched | Phase::Completed => Some(Side::Destination),
            Phase::Resolved => None,
        }
    }

    /// Whether a record of phase `next` may follow one of phase `self`.
    /// `restart` says the next record comes from a new writer (an engine
    /// restarted after a crash), which must also carry a higher epoch.
    /// A restarted writer may re-enter Copying (the copy starts over) or
    /// re-assert Switched; `Resolved` follows anything but is written only
    /// by an operator and starts a new chain.
    pub fn may_precede(self, next: Phase, restart: bool) -> bool {
        use Phase::*;
        match (self, next) {
            (_, Resolved) => true,
            (Copying, Ready | Aborted) | (Ready, Switched | Aborted) | (Switched, Completed) => {
                true
            }
            (Copying | Ready, Copying) | (Switched, Switched) => restart,
            _ => false,
        }
    }

    /// Lower-case name used in CLI output.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Copying => "copying",
            Phase::Ready => "ready",
            Phase::Switched => "switched",
            Phase::Completed => "completed",
            Phase::Aborted => "aborted",
            Phase::Resolved => "resolved",
        }
    }
}

/// One of the two images.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub enum Side {
    /// The image the guest started on.
    Source,
    /// The copy.
    Destination,
}

impl Side {
    /// Lower-case name used in CLI output.
    pub fn name(self) -> &'static str {
        match self {
            Side::Source => "source",
            Side::Destination => "destination",
        }
    }
}

/// An image as `stat` saw it when the job started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct ImageRecord {
    /// Absolute path, UTF-8, at most [`MAX_PATH_LEN`] bytes.
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// `st_dev`.
    pub device: u64,
    /// `st_ino`.
    pub inode: u64,
}

/// The payload of the header blocks. Written once, at creation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeaderV1 {
    /// Always 4096 in v1.
    pub block_size: u32,
    /// Always 4 in v1.
    pub slots_per_ring: u32,
    /// Always 2 in v1.
    pub copies: u32,
    /// 1 = CRC-32/ISO-HDLC. The only value in v1.
    pub checksum_type: u32,
    /// Features an older reader may ignore.
    pub compat: u32,
    /// Features an older reader must refuse to read or write (none in v1).
    pub incompat: u32,
    /// Features an older reader may read but must not write (none in v1).
    pub ro_compat: u32,
    /// The copy job this journal belongs to.
    pub job_id: [u8; 16],
    /// Creation time, nanoseconds since the Unix epoch. Informational only.
    pub created_unix_ns: u64,
}

/// The payload of a record block: the switch state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct RecordV1 {
    /// Equal to the header's job id.
    pub job_id: [u8; 16],
    /// Where the job stands.
    pub phase: Phase,
    /// The image that holds every acknowledged write.
    pub authoritative: Side,
    /// The source image at job start.
    pub source: ImageRecord,
    /// The destination image at job start.
    pub destination: ImageRecord,
    /// Random per engine start: tells writers apart after the fact.
    pub writer_instance: [u8; 16],
    /// Incremented by each engine start on this journal.
    pub writer_epoch: u64,
    /// Bytes of the bulk pass done when the record was written. Informational.
    pub bytes_copied: u64,
    /// Nanoseconds since the Unix epoch. Informational only: never used for
    /// ordering.
    pub wall_clock_unix_ns: u64,
}

fn options() -> impl Options {
    bincode::DefaultOptions::new()
        .with_fixint_encoding()
        .with_little_endian()
        .with_limit(MAX_PAYLOAD as u64)
        .reject_trailing_bytes()
}

/// Encodes a payload. Fails only if it would not fit in a block.
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, String> {
    options()
        .serialize(value)
        .map_err(|e| format!("payload does not fit a block: {e}"))
}

/// Decodes a payload; the limit bounds allocation whatever the bytes say.
pub fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, String> {
    options().deserialize(bytes).map_err(|e| e.to_string())
}

impl HeaderV1 {
    /// The v1 header of job `job_id`.
    pub fn new(job_id: [u8; 16], created_unix_ns: u64) -> Self {
        HeaderV1 {
            block_size: super::format::BLOCK_SIZE as u32,
            slots_per_ring: u32::from(super::format::SLOTS),
            copies: u32::from(super::format::COPIES),
            checksum_type: 1,
            compat: 0,
            incompat: 0,
            ro_compat: 0,
            job_id,
            created_unix_ns,
        }
    }

    /// Rejects geometry or features this code does not know. `Err(true)`
    /// means an unsupported feature (a newer writer), `Err(false)` a bad value.
    pub fn check(&self) -> Result<(), (bool, &'static str)> {
        if self.incompat != 0 || self.ro_compat != 0 || self.checksum_type != 1 {
            return Err((true, "unknown incompatible feature or checksum type"));
        }
        let expected = HeaderV1::new(self.job_id, self.created_unix_ns);
        if self.block_size != expected.block_size
            || self.slots_per_ring != expected.slots_per_ring
            || self.copies != expected.copies
        {
            return Err((false, "geometry differs from v1"));
        }
        Ok(())
    }
}

impl RecordV1 {
    /// The invariants every record satisfies, checked before writing and
    /// after reading.
    pub fn check(&self) -> Result<(), &'static str> {
        if let Some(side) = self.phase.implied_authority()
            && side != self.authoritative
        {
            return Err("authoritative side contradicts the phase");
        }
        for image in [&self.source, &self.destination] {
            if !image.path.starts_with('/') {
                return Err("image path is not absolute");
            }
            if image.path.len() > MAX_PATH_LEN {
                return Err("image path too long");
            }
        }
        if self.source.path == self.destination.path
            || (self.source.device == self.destination.device
                && self.source.inode == self.destination.inode)
        {
            return Err("source and destination are the same image");
        }
        if self.writer_epoch == 0 || self.writer_epoch == u64::MAX {
            return Err("writer epoch 0 or u64::MAX");
        }
        Ok(())
    }

    /// Whether this record begins a chain (no parent to verify): the first
    /// record of a journal, or an operator's resolution.
    pub fn starts_chain(&self, seq: u64) -> bool {
        seq == 0 || self.phase == Phase::Resolved
    }
}
