//! Journal payloads and their encoding. The only module that uses bincode.
//!
//! Two record formats: [`RecordV1`] (journal format 1: one pair of files)
//! and [`Record`] (journal format 2: pairs of images, each a file or an NBD
//! export, and extension fields). In memory every record is a [`Record`];
//! a version-1 record converts both ways.
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
    /// A writer may repeat Copying or Ready to record its progress (the
    /// authoritative side stays); a restarted writer may re-enter Copying
    /// (the copy resumes or starts over) or re-assert Switched; `Resolved`
    /// follows anything but is written only by an operator and starts a
    /// new chain.
    pub fn may_precede(self, next: Phase, restart: bool) -> bool {
        use Phase::*;
        match (self, next) {
            (_, Resolved) => true,
            (Copying, Ready | Aborted) | (Ready, Switched | Aborted) | (Switched, Completed) => {
                true
            }
            (Copying, Copying) | (Ready, Ready) => true,
            (Ready, Copying) | (Switched, Switched) => restart,
            _ => false,
        }
    }

    /// Whether a record of this phase is also written to the seal (journal
    /// format 2): the phases that change the authoritative side.
    pub fn sealed(self) -> bool {
        matches!(self, Phase::Switched | Phase::Resolved)
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

/// Most image pairs one record holds (one per disk a job moves at once).
pub const MAX_PAIRS: usize = 16;
/// Longest NBD URI or export name the journal stores, in bytes.
pub const MAX_URI_LEN: usize = 1024;
/// Most extension fields one record holds.
pub const MAX_EXTENSIONS: usize = 16;
/// Extension tags with this bit must be understood: a reader that does not
/// know the tag treats the block as written by a newer version.
pub const EXTENSION_REQUIRED: u16 = 1 << 15;

/// A file image as `stat` saw it when the job started.
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

/// An NBD export as the job found it when it started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct ExportRecord {
    /// The URI the job was given (`nbd://...`, `nbd+unix://...`), UTF-8,
    /// at most [`MAX_URI_LEN`] bytes.
    pub uri: String,
    /// The export's name, as negotiated.
    pub export: String,
    /// The export's size in bytes.
    pub size: u64,
    /// Whether the connection is made over TLS.
    pub tls: bool,
}

/// Where one image of a job lives. Variants are append-only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub enum ImageRef {
    /// A regular file or a block device on the engine's host.
    File(ImageRecord),
    /// An NBD export.
    Export(ExportRecord),
}

impl ImageRef {
    /// The image's size when the job started.
    pub fn size(&self) -> u64 {
        match self {
            ImageRef::File(f) => f.size,
            ImageRef::Export(e) => e.size,
        }
    }

    /// How a human names the image: its path or its URI.
    pub fn name(&self) -> &str {
        match self {
            ImageRef::File(f) => &f.path,
            ImageRef::Export(e) => &e.uri,
        }
    }

    /// The file, if the image is one.
    pub fn file(&self) -> Option<&ImageRecord> {
        match self {
            ImageRef::File(f) => Some(f),
            ImageRef::Export(_) => None,
        }
    }

    fn check(&self) -> Result<(), &'static str> {
        match self {
            ImageRef::File(f) => {
                if !f.path.starts_with('/') {
                    return Err("image path is not absolute");
                }
                if f.path.len() > MAX_PATH_LEN {
                    return Err("image path too long");
                }
            }
            ImageRef::Export(e) => {
                if e.uri.len() > MAX_URI_LEN || e.export.len() > MAX_URI_LEN {
                    return Err("export URI or name too long");
                }
                if !(e.uri.starts_with("nbd://")
                    || e.uri.starts_with("nbds://")
                    || e.uri.starts_with("nbd+unix://")
                    || e.uri.starts_with("nbds+unix://"))
                {
                    return Err("export URI is not an NBD URI");
                }
                if e.tls != e.uri.starts_with("nbds") {
                    return Err("export TLS flag contradicts its URI");
                }
            }
        }
        Ok(())
    }

    /// Whether two image references name the same image.
    pub fn same_image(&self, other: &ImageRef) -> bool {
        match (self, other) {
            (ImageRef::File(a), ImageRef::File(b)) => {
                a.path == b.path || (a.device == b.device && a.inode == b.inode)
            }
            (ImageRef::Export(a), ImageRef::Export(b)) => a.uri == b.uri,
            _ => false,
        }
    }
}

/// One disk of a job: the image the guest runs on and its copy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct ImagePair {
    /// The image the guest started on.
    pub source: ImageRef,
    /// The copy.
    pub destination: ImageRef,
}

/// A field later versions may add to a record without a new format.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct Extension {
    /// What the field is; with [`EXTENSION_REQUIRED`] set, a reader that
    /// does not know it must not use the record.
    pub tag: u16,
    /// The field's bytes.
    pub data: Vec<u8>,
}

/// The payload of a record block in journal format 2, and every record in
/// memory: the switch state of a job over one or more pairs of images.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct Record {
    /// Equal to the header's job id.
    pub job_id: [u8; 16],
    /// Where the job stands.
    pub phase: Phase,
    /// The side that holds every acknowledged write, for every pair at once.
    pub authoritative: Side,
    /// The images, one pair per disk; 1 to [`MAX_PAIRS`].
    pub pairs: Vec<ImagePair>,
    /// Random per engine start: tells writers apart after the fact.
    pub writer_instance: [u8; 16],
    /// Incremented by each engine start on this journal.
    pub writer_epoch: u64,
    /// Bytes of the bulk pass done when the record was written. Informational.
    pub bytes_copied: u64,
    /// Nanoseconds since the Unix epoch. Informational only.
    pub wall_clock_unix_ns: u64,
    /// Fields of later versions; none are defined yet.
    pub extensions: Vec<Extension>,
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

/// The payload of a record block in journal format 1: the switch state of
/// one pair of files. Read from old journals, and written to them when an
/// engine takes one over; new journals use [`Record`].
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
}

impl From<RecordV1> for Record {
    fn from(r: RecordV1) -> Record {
        Record {
            job_id: r.job_id,
            phase: r.phase,
            authoritative: r.authoritative,
            pairs: vec![ImagePair {
                source: ImageRef::File(r.source),
                destination: ImageRef::File(r.destination),
            }],
            writer_instance: r.writer_instance,
            writer_epoch: r.writer_epoch,
            bytes_copied: r.bytes_copied,
            wall_clock_unix_ns: r.wall_clock_unix_ns,
            extensions: Vec::new(),
        }
    }
}

impl Record {
    /// A record of one pair of images, with no extensions.
    #[allow(clippy::too_many_arguments)]
    pub fn single(
        job_id: [u8; 16],
        phase: Phase,
        source: ImageRef,
        destination: ImageRef,
        writer_instance: [u8; 16],
        writer_epoch: u64,
        bytes_copied: u64,
        wall_clock_unix_ns: u64,
    ) -> Record {
        Record {
            job_id,
            phase,
            authoritative: phase.implied_authority().unwrap_or(Side::Source),
            pairs: vec![ImagePair {
                source,
                destination,
            }],
            writer_instance,
            writer_epoch,
            bytes_copied,
            wall_clock_unix_ns,
            extensions: Vec::new(),
        }
    }

    /// The first pair's source (every record has at least one pair).
    pub fn source(&self) -> &ImageRef {
        &self.pairs[0].source
    }

    /// The first pair's destination.
    pub fn destination(&self) -> &ImageRef {
        &self.pairs[0].destination
    }

    /// The image on `side` of the first pair.
    pub fn image(&self, side: Side) -> &ImageRef {
        match side {
            Side::Source => self.source(),
            Side::Destination => self.destination(),
        }
    }

    /// The invariants every record satisfies, checked before writing and
    /// after reading.
    pub fn check(&self) -> Result<(), &'static str> {
        if let Some(side) = self.phase.implied_authority()
            && side != self.authoritative
        {
            return Err("authoritative side contradicts the phase");
        }
        if self.pairs.is_empty() || self.pairs.len() > MAX_PAIRS {
            return Err("a record holds 1 to 16 image pairs");
        }
        let images: Vec<&ImageRef> = self
            .pairs
            .iter()
            .flat_map(|p| [&p.source, &p.destination])
            .collect();
        for (i, image) in images.iter().enumerate() {
            image.check()?;
            if images[..i].iter().any(|other| other.same_image(image)) {
                return Err("one image appears twice (source and destination the same?)");
            }
        }
        if self.writer_epoch == 0 || self.writer_epoch == u64::MAX {
            return Err("writer epoch 0 or u64::MAX");
        }
        if self.extensions.len() > MAX_EXTENSIONS {
            return Err("too many extension fields");
        }
        Ok(())
    }

    /// The copy's durable progress, if the record carries it (journal
    /// format 2, Copying or Ready). A malformed field counts as absent: the
    /// job then copies everything again, which is always safe.
    pub fn progress(&self) -> Option<super::progress::Progress> {
        self.extensions
            .iter()
            .find(|e| e.tag == super::progress::PROGRESS_TAG)
            .and_then(|e| super::progress::Progress::from_extension(e).ok())
    }

    /// Replaces (or, with `None`, removes) the progress field.
    pub fn set_progress(&mut self, progress: Option<&super::progress::Progress>) {
        self.extensions
            .retain(|e| e.tag != super::progress::PROGRESS_TAG);
        if let Some(p) = progress {
            self.extensions.push(p.to_extension());
        }
    }

    /// Whether an extension field this code does not know must be
    /// understood: the record then comes from a newer writer.
    pub fn needs_newer_reader(&self) -> bool {
        self.extensions
            .iter()
            .any(|e| e.tag & EXTENSION_REQUIRED != 0)
    }

    /// Whether this record begins a chain (no parent to verify): the first
    /// record of a journal, or an operator's resolution.
    pub fn starts_chain(&self, seq: u64) -> bool {
        seq == 0 || self.phase == Phase::Resolved
    }

    /// The version-1 payload of this record, when it has that shape (one
    /// pair of files, no extensions): what an engine writes to a journal of
    /// format 1.
    pub fn to_v1(&self) -> Option<RecordV1> {
        let [pair] = self.pairs.as_slice() else {
            return None;
        };
        match (&pair.source, &pair.destination, self.extensions.is_empty()) {
            (ImageRef::File(source), ImageRef::File(destination), true) => Some(RecordV1 {
                job_id: self.job_id,
                phase: self.phase,
                authoritative: self.authoritative,
                source: source.clone(),
                destination: destination.clone(),
                writer_instance: self.writer_instance,
                writer_epoch: self.writer_epoch,
                bytes_copied: self.bytes_copied,
                wall_clock_unix_ns: self.wall_clock_unix_ns,
            }),
            _ => None,
        }
    }
}

/// Decodes a record payload of journal format `version` and checks it.
/// `Err(true, ..)`: written by a newer version (an extension this code must
/// understand and does not).
pub fn decode_record(version: u16, bytes: &[u8]) -> Result<Record, (bool, String)> {
    let record: Record = match version {
        1 => decode::<RecordV1>(bytes)
            .map_err(|e| (false, format!("record payload: {e}")))?
            .into(),
        _ => decode::<Record>(bytes).map_err(|e| (false, format!("record payload: {e}")))?,
    };
    if record.needs_newer_reader() {
        return Err((true, "a record extension this version does not know".into()));
    }
    record.check().map_err(|why| (false, why.to_string()))?;
    Ok(record)
}

/// Encodes `record` as a payload of journal format `version`.
pub fn encode_record(version: u16, record: &Record) -> Result<Vec<u8>, String> {
    match version {
        1 => encode(
            &record
                .to_v1()
                .ok_or("a journal of format 1 holds one pair of files and no extensions")?,
        ),
        _ => encode(record),
    }
}
