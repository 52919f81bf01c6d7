//! Journal formats 1 and 2: the block frame. Pure code, no I/O.
//!
//! ```text
//! file (never resized): format 1 is 40960 bytes (blocks 0..=9),
//! format 2 is 45056 bytes (blocks 0..=10):
//!   block 0      header, copy 0
//!   blocks 1..=4 ring slots 0..=3, copy 0   (record seq lives in slot seq % 4)
//!   blocks 5..=8 ring slots 0..=3, copy 1
//!   block 9      header, copy 1
//!   block 10     seal (format 2): a third copy of the newest record that
//!                changed the authoritative side (Switched, Resolved)
//!
//! block (4096 bytes, all integers little-endian):
//!   0   u32  block_crc          CRC-32/ISO-HDLC of bytes 4..4096
//!   4   [4]  magic              "LCPJ"
//!   8   u16  format_version     1 or 2, the file's format
//!   10  u16  kind               1 header, 2 record, 3 empty slot
//!   12  u8   slot               0..=3, 0xFF for a header, 0xFE for the seal
//!   13  u8   copy               0 or 1 (0 for the seal)
//!   14  u16  flags              0 (no flags are defined)
//!   16  [16] journal_uuid
//!   32  u64  seq
//!   40  u32  content_crc        CRC-32 of seq (8 bytes LE) ++ payload
//!   44  u32  parent_content_crc content_crc of record seq-1; 0 for a chain start
//!   48  u32  payload_len        <= 4032
//!   52  u32  payload_format     1 header, 2 record v1, 3 record v2, 0 none
//!   56  [8]  reserved           zero
//!   64  ..   payload, then zero padding to 4096
//! ```
//!
//! Every change here must change journal-format.md and the golden vectors in
//! the same commit; a test hashes this file and compares with the spec.

/// Size of every block, and its alignment in the file.
pub const BLOCK_SIZE: usize = 4096;
/// Ring slots per copy.
pub const SLOTS: u8 = 4;
/// Copies of every ring slot and header.
pub const COPIES: u8 = 2;
/// Blocks in a file of the current format: two headers, two rings, the seal.
pub const BLOCK_COUNT: usize = 3 + SLOTS as usize * COPIES as usize;
/// Blocks in a file of format 1: two headers and two rings.
pub const BLOCK_COUNT_V1: usize = BLOCK_COUNT - 1;
/// A journal file's exact size in the current format.
pub const JOURNAL_LEN: u64 = (BLOCK_COUNT * BLOCK_SIZE) as u64;
/// A journal file's exact size in format 1.
pub const JOURNAL_LEN_V1: u64 = (BLOCK_COUNT_V1 * BLOCK_SIZE) as u64;

/// The four bytes at offset 4 of every block.
pub const MAGIC: [u8; 4] = *b"LCPJ";
/// The format new journals are written in.
pub const FORMAT_VERSION: u16 = 2;
/// The first format, still read and continued.
pub const FORMAT_V1: u16 = 1;
/// `slot` value of a header block.
pub const HEADER_SLOT: u8 = 0xFF;
/// `slot` value of the seal block (format 2).
pub const SEAL_SLOT: u8 = 0xFE;

/// Blocks in a file of format `version`.
pub fn block_count(version: u16) -> usize {
    if version == FORMAT_V1 {
        BLOCK_COUNT_V1
    } else {
        BLOCK_COUNT
    }
}

/// The file size of a journal of format `version`.
pub fn journal_len(version: u16) -> u64 {
    (block_count(version) * BLOCK_SIZE) as u64
}

/// The format a journal file of `len` bytes is in, if any: the size tells,
/// since no format ever changes a file's size.
pub fn version_of_len(len: u64) -> Option<u16> {
    match len {
        JOURNAL_LEN_V1 => Some(FORMAT_V1),
        JOURNAL_LEN => Some(FORMAT_VERSION),
        _ => None,
    }
}

const CRC_OFFSET: usize = 0;
const MAGIC_OFFSET: usize = CRC_OFFSET + 4;
const VERSION_OFFSET: usize = MAGIC_OFFSET + MAGIC.len();
const KIND_OFFSET: usize = VERSION_OFFSET + 2;
const SLOT_OFFSET: usize = KIND_OFFSET + 2;
const COPY_OFFSET: usize = SLOT_OFFSET + 1;
const FLAGS_OFFSET: usize = COPY_OFFSET + 1;
const UUID_OFFSET: usize = FLAGS_OFFSET + 2;
const SEQ_OFFSET: usize = UUID_OFFSET + 16;
const CONTENT_CRC_OFFSET: usize = SEQ_OFFSET + 8;
const PARENT_CRC_OFFSET: usize = CONTENT_CRC_OFFSET + 4;
const PAYLOAD_LEN_OFFSET: usize = PARENT_CRC_OFFSET + 4;
const PAYLOAD_FORMAT_OFFSET: usize = PAYLOAD_LEN_OFFSET + 4;
const RESERVED_OFFSET: usize = PAYLOAD_FORMAT_OFFSET + 4;
/// Where the payload starts.
pub const PAYLOAD_OFFSET: usize = RESERVED_OFFSET + 8;
/// The largest payload a block can carry.
pub const MAX_PAYLOAD: usize = BLOCK_SIZE - PAYLOAD_OFFSET;

const _: () = assert!(PAYLOAD_OFFSET == 64);
const _: () = assert!(MAX_PAYLOAD == 4032);
const _: () = assert!(JOURNAL_LEN_V1 == 40960);
const _: () = assert!(JOURNAL_LEN == 45056);

/// What a block holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// The journal header (blocks 0 and 9).
    Header,
    /// A switch-state record.
    Record,
    /// A ring slot no record has used yet.
    EmptySlot,
}

impl Kind {
    fn code(self) -> u16 {
        match self {
            Kind::Header => 1,
            Kind::Record => 2,
            Kind::EmptySlot => 3,
        }
    }
    fn from_code(code: u16) -> Option<Self> {
        match code {
            1 => Some(Kind::Header),
            2 => Some(Kind::Record),
            3 => Some(Kind::EmptySlot),
            _ => None,
        }
    }
    /// The payload format a block of this kind must carry in a file of
    /// format `version`.
    pub fn payload_format(self, version: u16) -> u32 {
        match self {
            Kind::Header => 1,
            Kind::Record if version == FORMAT_V1 => 2,
            Kind::Record => 3,
            Kind::EmptySlot => 0,
        }
    }
}

/// Where a block lives in the file. The block states its own position, so a
/// write that lands elsewhere is caught.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Position {
    /// A header copy.
    Header {
        /// 0 (block 0) or 1 (block 9).
        copy: u8,
    },
    /// A ring slot copy.
    Slot {
        /// 0..=3.
        slot: u8,
        /// 0 (ring A) or 1 (ring B).
        copy: u8,
    },
    /// The seal (block 10, format 2 only).
    Seal,
}

impl Position {
    /// The position of block number `index` (0..11).
    pub fn of_block(index: usize) -> Position {
        assert!(index < BLOCK_COUNT);
        let slots = SLOTS as usize;
        match index {
            0 => Position::Header { copy: 0 },
            9 => Position::Header { copy: 1 },
            10 => Position::Seal,
            i => Position::Slot {
                slot: ((i - 1) % slots) as u8,
                copy: ((i - 1) / slots) as u8,
            },
        }
    }

    /// The block number of this position.
    pub fn block(self) -> usize {
        match self {
            Position::Header { copy } => {
                assert!(copy < COPIES);
                if copy == 0 { 0 } else { 9 }
            }
            Position::Slot { slot, copy } => {
                assert!(slot < SLOTS && copy < COPIES);
                1 + copy as usize * SLOTS as usize + slot as usize
            }
            Position::Seal => 10,
        }
    }

    /// Byte offset of this position in the file.
    pub fn offset(self) -> u64 {
        (self.block() * BLOCK_SIZE) as u64
    }

    /// The same place in the other copy (the seal has none: itself).
    pub fn twin(self) -> Position {
        match self {
            Position::Header { copy } => Position::Header { copy: 1 - copy },
            Position::Slot { slot, copy } => Position::Slot {
                slot,
                copy: 1 - copy,
            },
            Position::Seal => Position::Seal,
        }
    }

    /// The copy number (0 for the seal).
    pub fn copy(self) -> u8 {
        match self {
            Position::Header { copy } | Position::Slot { copy, .. } => copy,
            Position::Seal => 0,
        }
    }

    /// Every position of a file of format `version`, in file order.
    pub fn all(version: u16) -> impl Iterator<Item = Position> {
        (0..block_count(version)).map(Position::of_block)
    }
}

impl std::fmt::Display for Position {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Position::Header { copy } => write!(f, "header/{copy}"),
            Position::Slot { slot, copy } => write!(f, "slot{slot}/{}", ["A", "B"][*copy as usize]),
            Position::Seal => f.write_str("seal"),
        }
    }
}

/// A decoded block frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// The format version the block is written in (the file's).
    pub version: u16,
    /// What the block holds.
    pub kind: Kind,
    /// The position the block claims.
    pub position: Position,
    /// The journal this block belongs to.
    pub uuid: [u8; 16],
    /// Record sequence number (0 for headers and empty slots, and for the
    /// first record).
    pub seq: u64,
    /// CRC-32 of the sequence number and payload: the record's identity,
    /// equal in both copies.
    pub content_crc: u32,
    /// `content_crc` of the previous record; 0 for a chain start.
    pub parent_content_crc: u32,
    /// The payload bytes.
    pub payload: Vec<u8>,
}

/// Why a block is not a valid frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Defect {
    /// The block checksum does not match: torn, rotted or never written.
    Checksum,
    /// The checksum matches but the magic is not ours.
    Magic,
    /// A valid block of a newer (or unknown) format version.
    Version(u16),
    /// Checksum fine, but a field holds a value v1 never writes.
    Field(&'static str),
}

impl std::fmt::Display for Defect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Defect::Checksum => f.write_str("checksum mismatch"),
            Defect::Magic => f.write_str("bad magic"),
            Defect::Version(v) => write!(f, "format version {v}"),
            Defect::Field(what) => write!(f, "bad field: {what}"),
        }
    }
}

/// CRC-32/ISO-HDLC (the zlib CRC): poly 0x04C11DB7 reflected, init and
/// xorout 0xFFFFFFFF; check value of "123456789" is 0xCBF43926.
pub fn crc32(bytes: &[u8]) -> u32 {
    crc32fast::hash(bytes)
}

/// The content checksum: binds the sequence number to the payload.
pub fn content_crc(seq: u64, payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&seq.to_le_bytes());
    hasher.update(payload);
    hasher.finalize()
}

fn put_u16(block: &mut [u8], at: usize, value: u16) {
    block[at..at + 2].copy_from_slice(&value.to_le_bytes());
}
fn put_u32(block: &mut [u8], at: usize, value: u32) {
    block[at..at + 4].copy_from_slice(&value.to_le_bytes());
}
fn get_u16(block: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([block[at], block[at + 1]])
}
fn get_u32(block: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(block[at..at + 4].try_into().expect("4 bytes"))
}
fn get_u64(block: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(block[at..at + 8].try_into().expect("8 bytes"))
}

/// Encodes a frame into a block. Panics if the frame breaks a format rule:
/// that is a bug in the caller, and writing it would corrupt the journal.
pub fn encode(frame: &Frame) -> [u8; BLOCK_SIZE] {
    assert!(frame.payload.len() <= MAX_PAYLOAD, "payload too large");
    assert_eq!(frame.content_crc, content_crc(frame.seq, &frame.payload));
    assert!(
        frame.version == FORMAT_V1 || frame.version == FORMAT_VERSION,
        "unknown format version"
    );
    let (slot, copy) = match frame.position {
        Position::Header { copy } => {
            assert_eq!(frame.kind, Kind::Header);
            (HEADER_SLOT, copy)
        }
        Position::Slot { slot, copy } => {
            assert_ne!(frame.kind, Kind::Header);
            (slot, copy)
        }
        Position::Seal => {
            assert_ne!(frame.kind, Kind::Header);
            assert_ne!(frame.version, FORMAT_V1, "format 1 has no seal");
            (SEAL_SLOT, 0)
        }
    };
    assert!(copy < COPIES);
    if frame.kind == Kind::Record && frame.position != Position::Seal {
        assert_eq!(
            frame.seq % u64::from(SLOTS),
            u64::from(slot),
            "record in the wrong slot"
        );
    }
    let mut block = [0u8; BLOCK_SIZE];
    block[MAGIC_OFFSET..MAGIC_OFFSET + 4].copy_from_slice(&MAGIC);
    put_u16(&mut block, VERSION_OFFSET, frame.version);
    put_u16(&mut block, KIND_OFFSET, frame.kind.code());
    block[SLOT_OFFSET] = slot;
    block[COPY_OFFSET] = copy;
    put_u16(&mut block, FLAGS_OFFSET, 0);
    block[UUID_OFFSET..UUID_OFFSET + 16].copy_from_slice(&frame.uuid);
    block[SEQ_OFFSET..SEQ_OFFSET + 8].copy_from_slice(&frame.seq.to_le_bytes());
    put_u32(&mut block, CONTENT_CRC_OFFSET, frame.content_crc);
    put_u32(&mut block, PARENT_CRC_OFFSET, frame.parent_content_crc);
    put_u32(&mut block, PAYLOAD_LEN_OFFSET, frame.payload.len() as u32);
    put_u32(
        &mut block,
        PAYLOAD_FORMAT_OFFSET,
        frame.kind.payload_format(frame.version),
    );
    block[PAYLOAD_OFFSET..PAYLOAD_OFFSET + frame.payload.len()].copy_from_slice(&frame.payload);
    let crc = crc32(&block[MAGIC_OFFSET..]);
    put_u32(&mut block, CRC_OFFSET, crc);
    // Pair assertion: what we are about to write must read back as itself.
    debug_assert_eq!(decode(&block).as_ref(), Ok(frame));
    block
}

/// Decodes a block. Never panics, whatever the bytes.
///
/// The checksum is verified first, and nothing is read from a block whose
/// checksum fails, not even its version: a torn block's fields are noise.
/// Future versions keep the checksum, magic and version where v1 has them.
pub fn decode(block: &[u8]) -> Result<Frame, Defect> {
    if block.len() != BLOCK_SIZE {
        return Err(Defect::Field("block length"));
    }
    if crc32(&block[MAGIC_OFFSET..]) != get_u32(block, CRC_OFFSET) {
        return Err(Defect::Checksum);
    }
    if block[MAGIC_OFFSET..MAGIC_OFFSET + 4] != MAGIC {
        return Err(Defect::Magic);
    }
    let version = get_u16(block, VERSION_OFFSET);
    if version != FORMAT_V1 && version != FORMAT_VERSION {
        return Err(Defect::Version(version));
    }
    let kind = Kind::from_code(get_u16(block, KIND_OFFSET)).ok_or(Defect::Field("kind"))?;
    if get_u16(block, FLAGS_OFFSET) != 0 {
        return Err(Defect::Field("flags"));
    }
    let copy = block[COPY_OFFSET];
    if copy >= COPIES {
        return Err(Defect::Field("copy"));
    }
    let slot = block[SLOT_OFFSET];
    let position = match (kind, slot) {
        (Kind::Header, HEADER_SLOT) => Position::Header { copy },
        (Kind::Header, _) => return Err(Defect::Field("slot of a header")),
        (_, SEAL_SLOT) if version != FORMAT_V1 && copy == 0 => Position::Seal,
        (_, slot) if slot < SLOTS => Position::Slot { slot, copy },
        _ => return Err(Defect::Field("slot")),
    };
    if block[RESERVED_OFFSET..PAYLOAD_OFFSET]
        .iter()
        .any(|&b| b != 0)
    {
        return Err(Defect::Field("reserved bytes"));
    }
    if get_u32(block, PAYLOAD_FORMAT_OFFSET) != kind.payload_format(version) {
        return Err(Defect::Field("payload format"));
    }
    let payload_len = get_u32(block, PAYLOAD_LEN_OFFSET) as usize;
    if payload_len > MAX_PAYLOAD {
        return Err(Defect::Field("payload length"));
    }
    let payload_end = PAYLOAD_OFFSET + payload_len;
    if block[payload_end..].iter().any(|&b| b != 0) {
        return Err(Defect::Field("padding"));
    }
    let seq = get_u64(block, SEQ_OFFSET);
    let payload = block[PAYLOAD_OFFSET..payload_end].to_vec();
    let content = get_u32(block, CONTENT_CRC_OFFSET);
    if content != content_crc(seq, &payload) {
        return Err(Defect::Field("content checksum"));
    }
    if kind == Kind::Record && seq == u64::MAX {
        // Reserved: the next record's number must exist.
        return Err(Defect::Field("sequence number u64::MAX"));
    }
    if kind == Kind::Record
        && position != Position::Seal
        && seq % u64::from(SLOTS) != u64::from(slot)
    {
        return Err(Defect::Field("sequence number does not belong in its slot"));
    }
    if kind == Kind::EmptySlot && payload_len != 0 {
        return Err(Defect::Field("payload of an empty slot"));
    }
    if kind != Kind::Record && (seq != 0 || get_u32(block, PARENT_CRC_OFFSET) != 0) {
        return Err(Defect::Field("sequence fields of a non-record block"));
    }
    let mut uuid = [0u8; 16];
    uuid.copy_from_slice(&block[UUID_OFFSET..UUID_OFFSET + 16]);
    Ok(Frame {
        version,
        kind,
        position,
        uuid,
        seq,
        content_crc: content,
        parent_content_crc: get_u32(block, PARENT_CRC_OFFSET),
        payload,
    })
}

impl Frame {
    /// A frame of the current format for `payload`, with its content
    /// checksum filled in.
    pub fn new(
        kind: Kind,
        position: Position,
        uuid: [u8; 16],
        seq: u64,
        parent_content_crc: u32,
        payload: Vec<u8>,
    ) -> Frame {
        Frame::of_version(
            FORMAT_VERSION,
            kind,
            position,
            uuid,
            seq,
            parent_content_crc,
            payload,
        )
    }

    /// A frame of format `version`.
    pub fn of_version(
        version: u16,
        kind: Kind,
        position: Position,
        uuid: [u8; 16],
        seq: u64,
        parent_content_crc: u32,
        payload: Vec<u8>,
    ) -> Frame {
        let content_crc = content_crc(seq, &payload);
        Frame {
            version,
            kind,
            position,
            uuid,
            seq,
            content_crc,
            parent_content_crc,
            payload,
        }
    }

    /// The same frame, stated for another position (used to write the twin).
    pub fn at(&self, position: Position) -> Frame {
        Frame {
            position,
            ..self.clone()
        }
    }
}
