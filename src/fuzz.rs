//! Fuzz harness bodies, shared by the cargo-fuzz targets in `fuzz/` and by
//! the corpus replay test (`tests/it/fuzz_corpus.rs`), so that a stable
//! `cargo test` runs exactly the code the fuzzer ran.
//!
//! Not part of the API. Each function takes arbitrary bytes, never panics on
//! its own account, and panics on purpose (an assertion) when the library
//! breaks an invariant: that is how a fuzzer learns about it.
//!
//! [`recover_image`] reads its input as a small program:
//!
//! ```text
//! byte 0        ctrl: low 4 bits = number of steps; 0x10 = end with an
//!               operator's resolve; 0x20 = that resolve names the
//!               destination; 0x40 = a resolve after a refusal of the
//!               damaged image names the destination
//! next N bytes  one per step: 0x80 set = restart (recover, resume with the
//!               next epoch), else commit the (byte % n)-th legal next phase
//! the rest      mutations of the journal image, one after the other:
//!   op % 9 = 0  overwrite: block, u16 offset, u8 len-1, then len bytes
//!            1  flip a bit: block, u16 offset, bit
//!            2  copy block a over block b: a, b
//!            3  zero a block: block
//!            4  swap two blocks: a, b
//!            5  fix a block's checksums (content, then block): block
//!            6  make a block unreadable (EIO on read): block
//!            7  tear: copy the 512-byte sectors of a selected by mask to b
//!            8  fill: block, u16 offset, u16 len, byte
//! ```
//!
//! Missing bytes read as zero; a block number is taken modulo 10 and an
//! offset modulo 4096; ctrl bit 0x80 is unused. Clocks and
//! writer instances are replaced by fixed values after the steps, so one
//! input always builds the same image.

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::journal::format::{
    self, BLOCK_COUNT, BLOCK_SIZE, COPIES, Defect, Frame, JOURNAL_LEN, Kind, MAX_PAYLOAD,
    PAYLOAD_OFFSET, Position, SLOTS,
};
use crate::journal::payload::{
    self, HeaderV1, ImageRecord, ImageRef, Phase, Record, RecordV1, Side,
};
use crate::journal::{self, Analysis, Journal, Recovered, RefusalReason};
use crate::storage::{SECTOR_SIZE, SimDisk};

/// Offsets of the frame fields [`recover_image`] rewrites; format.rs keeps
/// its own private, and its module documentation shows the layout.
const CONTENT_CRC_OFFSET: usize = 40;
const PAYLOAD_LEN_OFFSET: usize = 48;
const SEQ_OFFSET: usize = 32;

/// Decodes one block: `data` padded with zeros or truncated to 4096 bytes.
///
/// Checks that decoding never panics, that a block that decodes satisfies
/// every rule `format::encode` asserts and re-encodes to the identical bytes,
/// and that payloads (the frame's, per its kind, and the raw input itself)
/// decode without panicking and re-encode to the bytes they came from.
pub fn decode_block(data: &[u8]) {
    let direct = format::decode(data);
    if data.len() != BLOCK_SIZE {
        assert!(
            direct.is_err(),
            "decode accepted a block of {} bytes",
            data.len()
        );
    }
    let mut block = [0u8; BLOCK_SIZE];
    let n = data.len().min(BLOCK_SIZE);
    block[..n].copy_from_slice(&data[..n]);
    let decoded = format::decode(&block);
    if data.len() == BLOCK_SIZE {
        assert_eq!(direct, decoded, "decode of the same bytes differs");
    }
    if let Ok(frame) = &decoded {
        assert_encodable(frame);
        let again = format::encode(frame);
        assert!(
            again == block,
            "a decoded block does not re-encode to the same bytes: {frame:?}"
        );
        match frame.kind {
            Kind::Header => {
                if let Some(header) = payload_round_trip::<HeaderV1>(&frame.payload) {
                    let _ = header.check();
                }
            }
            Kind::Record if frame.version == format::FORMAT_V1 => {
                if let Some(record) = payload_round_trip::<RecordV1>(&frame.payload) {
                    let _ = record.check();
                    let record = Record::from(record);
                    let _ = record.check();
                    let _ = record.starts_chain(frame.seq);
                }
            }
            Kind::Record => {
                if let Some(record) = payload_round_trip::<Record>(&frame.payload) {
                    let _ = record.check();
                    let _ = record.starts_chain(frame.seq);
                    let _ = record.phase.implied_authority();
                    let _ = record.needs_newer_reader();
                }
            }
            Kind::EmptySlot => {}
        }
    }
    // Whatever the frame says, the payload decoders must survive any bytes.
    let _ = payload_round_trip::<HeaderV1>(data);
    let _ = payload_round_trip::<RecordV1>(data);
    let _ = payload_round_trip::<Record>(data);
    for version in [format::FORMAT_V1, format::FORMAT_VERSION] {
        if let Ok(record) = payload::decode_record(version, data) {
            let again = payload::encode_record(version, &record).expect("a decoded record encodes");
            assert_eq!(again, data, "a checked record re-encodes to its own bytes");
        }
    }
}

/// The rules `format::encode` asserts (and those its pair assertion implies),
/// as assertions on a frame `format::decode` returned: decode must accept
/// only what encode can write.
fn assert_encodable(frame: &Frame) {
    assert!(
        frame.payload.len() <= MAX_PAYLOAD,
        "decoded payload too large"
    );
    assert_eq!(
        frame.content_crc,
        format::content_crc(frame.seq, &frame.payload),
        "decoded frame with a wrong content checksum"
    );
    match frame.position {
        Position::Header { copy } => {
            assert_eq!(frame.kind, Kind::Header, "non-header at a header position");
            assert!(copy < COPIES, "decoded header copy {copy}");
        }
        Position::Slot { slot, copy } => {
            assert_ne!(frame.kind, Kind::Header, "header at a slot position");
            assert!(slot < SLOTS && copy < COPIES, "decoded slot {slot}/{copy}");
            if frame.kind == Kind::Record {
                assert_eq!(
                    frame.seq % u64::from(SLOTS),
                    u64::from(slot),
                    "decoded record in the wrong slot"
                );
            }
        }
        Position::Seal => {
            assert_ne!(frame.kind, Kind::Header, "header at the seal");
            assert_ne!(frame.version, format::FORMAT_V1, "a seal in format 1");
        }
    }
    if frame.kind != Kind::Record {
        assert!(
            frame.seq == 0 && frame.parent_content_crc == 0,
            "decoded non-record with sequence fields"
        );
    }
    if frame.kind == Kind::EmptySlot {
        assert!(
            frame.payload.is_empty(),
            "decoded empty slot with a payload"
        );
    }
}

/// Decodes a payload; when that works, its encoding must be the same bytes
/// (the content checksum covers the bytes, so the encoding must be canonical).
fn payload_round_trip<T: Serialize + DeserializeOwned + std::fmt::Debug>(
    bytes: &[u8],
) -> Option<T> {
    let value = payload::decode::<T>(bytes).ok()?;
    let encoded = payload::encode(&value);
    assert!(
        encoded.as_deref() == Ok(bytes),
        "payload does not re-encode to its own bytes: {value:?}"
    );
    Some(value)
}

const FIXED_NS: u64 = 1_700_000_000_000_000_000;
const UUID: [u8; 16] = *b"fuzz-journal-id1";
const JOB_ID: [u8; 16] = *b"fuzz-job-0000001";

/// Reads the input front to back; past the end, every byte is zero.
struct Cursor<'a> {
    data: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn next(&mut self) -> Option<u8> {
        let (&first, rest) = self.data.split_first()?;
        self.data = rest;
        Some(first)
    }
    fn byte(&mut self) -> u8 {
        self.next().unwrap_or(0)
    }
    fn block(&mut self) -> usize {
        usize::from(self.byte()) % BLOCK_COUNT
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.byte(), self.byte()])
    }
    fn take(&mut self, n: usize) -> &'a [u8] {
        let (taken, rest) = self.data.split_at(n.min(self.data.len()));
        self.data = rest;
        taken
    }
}

/// The writer instance of epoch `epoch`: the harness makes instances a
/// function of the epoch, so that the image does not depend on randomness.
fn writer_instance(epoch: u64) -> [u8; 16] {
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(b"fuzzwrtr");
    id[8..].copy_from_slice(&epoch.to_le_bytes());
    id
}

fn first_record() -> Record {
    let image = |path: &str, inode| {
        ImageRef::File(ImageRecord {
            path: path.into(),
            size: 1 << 20,
            device: 2049,
            inode,
        })
    };
    Record::single(
        JOB_ID,
        Phase::Copying,
        image("/images/source.raw", 11),
        image("/images/destination.raw", 12),
        writer_instance(1),
        1,
        0,
        FIXED_NS,
    )
}

/// `record` (of sequence number `seq`) with its clock and random fields
/// replaced by functions of the sequence number and epoch.
fn canonical_record(mut record: Record, seq: u64) -> Record {
    record.wall_clock_unix_ns = FIXED_NS.wrapping_add(seq);
    record.writer_instance = writer_instance(record.writer_epoch);
    record
}

fn canonical_crc(seq: u64, record: &Record) -> u32 {
    let bytes = payload::encode_record(
        format::FORMAT_VERSION,
        &canonical_record(record.clone(), seq),
    )
    .expect("a record fits");
    format::content_crc(seq, &bytes)
}

fn block_range(block: usize) -> std::ops::Range<usize> {
    block * BLOCK_SIZE..(block + 1) * BLOCK_SIZE
}

/// The valid journal the mutations start from.
struct Base {
    image: Vec<u8>,
    seq: u64,
    record: Record,
    /// The side an operator names if recovery of the damaged image refuses.
    operator_side: Side,
}

/// Formats a journal on a `SimDisk` and runs the steps the input asks for,
/// then rewrites timestamps and random ids to fixed values (recomputing the
/// checksums and parent links), so that the same input gives the same image.
fn build_base(input: &mut Cursor<'_>) -> Base {
    let disk = SimDisk::new(JOURNAL_LEN);
    let mut journal = Journal::format(disk.clone(), UUID, first_record()).expect("format");
    // Canonical content checksum of every committed sequence number.
    let mut crcs = vec![canonical_crc(0, journal.record())];
    let ctrl = input.byte();
    let mut fresh_writer = false;
    for _ in 0..ctrl & 0x0F {
        let step = input.byte();
        if step & 0x80 != 0 {
            let analysis = journal::analyse(&disk).expect("analyse a SimDisk");
            let recovered = analysis.outcome.expect("a healthy journal recovers");
            journal = Journal::resume(disk.clone(), &recovered).expect("resume");
            fresh_writer = true;
            continue;
        }
        let current = journal.record().phase;
        let legal: Vec<Phase> = Phase::ALL
            .into_iter()
            .filter(|&p| p != Phase::Resolved && current.may_precede(p, fresh_writer))
            .collect();
        if legal.is_empty() {
            continue;
        }
        let next = legal[usize::from(step) % legal.len()];
        let seq = journal
            .commit(next, u64::from(step) * 4096)
            .expect("a legal commit on a healthy disk");
        fresh_writer = false;
        assert_eq!(seq as usize, crcs.len(), "commit numbers records in order");
        crcs.push(canonical_crc(seq, journal.record()));
    }
    let expected = if ctrl & 0x10 != 0 {
        let side = if ctrl & 0x20 != 0 {
            Side::Destination
        } else {
            Side::Source
        };
        let analysis = journal::analyse(&disk).expect("analyse a SimDisk");
        let seq = journal::resolve(&disk, &analysis, side, |_| Ok(())).expect("resolve");
        (seq, None, side)
    } else {
        let record = canonical_record(journal.record().clone(), journal.seq());
        let side = record.authoritative;
        (journal.seq(), Some(record), side)
    };
    let image = canonicalize(disk.live_bytes(), &crcs);

    // The starting point must itself be what recovery returns, untouched.
    let analysis = journal::analyse(&SimDisk::from_bytes(image.clone())).expect("analyse");
    let recovered = match &analysis.outcome {
        Ok(r) => r,
        Err(refusal) => panic!("a freshly written journal is refused: {refusal}"),
    };
    assert_eq!(analysis.row, Some("intact"), "fresh journal not intact");
    assert_eq!(
        recovered.seq, expected.0,
        "fresh journal recovers another seq"
    );
    assert_eq!(recovered.record.authoritative, expected.2);
    if let Some(record) = &expected.1 {
        assert_eq!(
            &recovered.record, record,
            "fresh journal recovers another record"
        );
    } else {
        assert_eq!(recovered.record.phase, Phase::Resolved);
    }
    Base {
        image,
        seq: recovered.seq,
        record: recovered.record.clone(),
        operator_side: if ctrl & 0x40 != 0 {
            Side::Destination
        } else {
            Side::Source
        },
    }
}

/// Rewrites every header and record block with fixed clocks and writer
/// instances; `crcs[s]` is the canonical content checksum of record `s`.
fn canonicalize(mut image: Vec<u8>, crcs: &[u32]) -> Vec<u8> {
    for position in Position::all(format::FORMAT_VERSION) {
        let range = block_range(position.block());
        let Ok(frame) = format::decode(&image[range.clone()]) else {
            continue;
        };
        let bytes = match frame.kind {
            Kind::Header => {
                let Ok(mut header) = payload::decode::<HeaderV1>(&frame.payload) else {
                    continue;
                };
                header.created_unix_ns = FIXED_NS;
                payload::encode(&header)
            }
            Kind::Record => {
                let Ok(record) = payload::decode_record(frame.version, &frame.payload) else {
                    continue;
                };
                payload::encode_record(frame.version, &canonical_record(record, frame.seq))
            }
            Kind::EmptySlot => continue,
        }
        .expect("a canonical payload fits");
        let parent = match frame.seq.checked_sub(1) {
            Some(previous) if frame.parent_content_crc != 0 => crcs
                .get(previous as usize)
                .copied()
                .unwrap_or(frame.parent_content_crc),
            _ => frame.parent_content_crc,
        };
        let canonical = Frame::of_version(
            frame.version,
            frame.kind,
            frame.position,
            frame.uuid,
            frame.seq,
            parent,
            bytes,
        );
        image[range].copy_from_slice(&format::encode(&canonical));
    }
    image
}

/// Applies the mutations the rest of the input describes. Returns which
/// blocks were made unreadable.
fn mutate(image: &mut [u8], input: &mut Cursor<'_>) -> [bool; BLOCK_COUNT] {
    let mut unreadable = [false; BLOCK_COUNT];
    while let Some(op) = input.next() {
        match op % 9 {
            0 => {
                let block = input.block();
                let offset = usize::from(input.u16()) % BLOCK_SIZE;
                let len = usize::from(input.byte()) + 1;
                let bytes = input.take(len.min(BLOCK_SIZE - offset));
                let at = block * BLOCK_SIZE + offset;
                image[at..at + bytes.len()].copy_from_slice(bytes);
            }
            1 => {
                let block = input.block();
                let offset = usize::from(input.u16()) % BLOCK_SIZE;
                let bit = input.byte() % 8;
                image[block * BLOCK_SIZE + offset] ^= 1 << bit;
            }
            2 => {
                let (from, to) = (input.block(), input.block());
                image.copy_within(block_range(from), to * BLOCK_SIZE);
            }
            3 => image[block_range(input.block())].fill(0),
            4 => {
                let (a, b) = (input.block(), input.block());
                let saved = image[block_range(a)].to_vec();
                image.copy_within(block_range(b), a * BLOCK_SIZE);
                image[block_range(b)].copy_from_slice(&saved);
            }
            5 => fix_checksums(&mut image[block_range(input.block())]),
            6 => unreadable[input.block()] = true,
            7 => {
                let (from, to, mask) = (input.block(), input.block(), input.byte());
                for sector in 0..BLOCK_SIZE / SECTOR_SIZE {
                    if mask & (1 << sector) != 0 {
                        let at = sector * SECTOR_SIZE;
                        image.copy_within(
                            from * BLOCK_SIZE + at..from * BLOCK_SIZE + at + SECTOR_SIZE,
                            to * BLOCK_SIZE + at,
                        );
                    }
                }
            }
            _ => {
                let block = input.block();
                let offset = usize::from(input.u16()) % BLOCK_SIZE;
                let len = usize::from(input.u16()).min(BLOCK_SIZE - offset);
                let value = input.byte();
                let at = block * BLOCK_SIZE + offset;
                image[at..at + len].fill(value);
            }
        }
    }
    unreadable
}

/// Recomputes a block's content checksum (when its payload length is
/// plausible) and then its block checksum: what a forger, or a buggy
/// writer, would produce.
fn fix_checksums(block: &mut [u8]) {
    let len_bytes: [u8; 4] = block[PAYLOAD_LEN_OFFSET..PAYLOAD_LEN_OFFSET + 4]
        .try_into()
        .expect("4 bytes");
    let payload_len = u32::from_le_bytes(len_bytes) as usize;
    if payload_len <= MAX_PAYLOAD {
        let seq_bytes: [u8; 8] = block[SEQ_OFFSET..SEQ_OFFSET + 8]
            .try_into()
            .expect("8 bytes");
        let seq = u64::from_le_bytes(seq_bytes);
        let crc = format::content_crc(seq, &block[PAYLOAD_OFFSET..PAYLOAD_OFFSET + payload_len]);
        block[CONTENT_CRC_OFFSET..CONTENT_CRC_OFFSET + 4].copy_from_slice(&crc.to_le_bytes());
    }
    let crc = format::crc32(&block[4..]);
    block[..4].copy_from_slice(&crc.to_le_bytes());
}

/// Builds a valid journal from the first input bytes, damages it as the rest
/// describes, and checks what recovery makes of it.
///
/// Invariants, whatever the bytes:
/// - no panic; `analyse` fails only when every block is unreadable, and
///   gives the same analysis twice;
/// - a returned record is on disk (some readable block decodes to it), passes
///   `RecordV1::check`, and is not newer than the newest sequence seen;
/// - when every changed block is plain damage (unreadable, or failing to
///   decode for a reason other than a newer version), recovery returns the
///   last committed record or refuses: never an older or another one, and it
///   always returns it when at most one block is damaged;
/// - when at most one block changed in any way (forged, copied, swapped in),
///   recovery returns a sequence number at least the last committed one (the
///   last committed record itself if it returns that number), or refuses as
///   one foreign, newer-format or contradicting block calls for
///   (needs-operator, wrong-journal or unsupported-version; never corrupt);
/// - after a return, `repair` (with a backup that succeeds) does the planned
///   repairs, recovery then returns the same record, and nothing is left to
///   repair unless reads fail; after at most one changed block, a resumed
///   writer can commit the next phase and recovery returns that commit;
/// - after a needs-operator refusal (all blocks readable), `resolve` either
///   declines or leaves a journal that recovers to the resolution, numbered
///   above every sequence number seen, naming the side the operator chose.
pub fn recover_image(data: &[u8]) {
    let mut input = Cursor { data };
    let base = build_base(&mut input);
    let mut image = base.image.clone();
    let unreadable = mutate(&mut image, &mut input);
    let disk = SimDisk::from_bytes(image.clone());
    for block in (0..BLOCK_COUNT).filter(|&b| unreadable[b]) {
        let range = block_range(block);
        disk.fail_reads(range.start as u64..range.end as u64);
    }
    let touched: Vec<usize> = (0..BLOCK_COUNT)
        .filter(|&b| unreadable[b] || image[block_range(b)] != base.image[block_range(b)])
        .collect();
    let plain_damage = touched.iter().all(|&b| {
        unreadable[b]
            || matches!(format::decode(&image[block_range(b)]),
                        Err(defect) if !matches!(defect, Defect::Version(_)))
    });

    let analysis = match journal::analyse(&disk) {
        Ok(analysis) => analysis,
        Err(e) => {
            // A device that fails every read is an I/O error, not evidence.
            assert!(
                unreadable.iter().all(|&u| u),
                "analyse failed with readable blocks: {e}"
            );
            return;
        }
    };
    let again = journal::analyse(&disk).expect("analyse succeeded once");
    assert_eq!(
        format!("{analysis:?}"),
        format!("{again:?}"),
        "analyse is not deterministic"
    );

    match &analysis.outcome {
        Ok(recovered) => {
            check_recovered(&analysis, recovered, &image, &unreadable);
            if plain_damage {
                assert_eq!(
                    (recovered.seq, &recovered.record),
                    (base.seq, &base.record),
                    "plain damage to {touched:?} changed the recovered record (last committed seq {})",
                    base.seq
                );
            }
            if touched.len() <= 1 {
                assert!(
                    recovered.seq >= base.seq,
                    "recovery went back from seq {} to {} after one changed block {touched:?}",
                    base.seq,
                    recovered.seq
                );
                if recovered.seq == base.seq {
                    assert_eq!(
                        recovered.record, base.record,
                        "one changed block {touched:?} replaced the last committed record"
                    );
                }
            }
            if touched.is_empty() {
                assert_eq!(analysis.row, Some("intact"));
                assert!(recovered.repairs.is_empty());
            }
            let repaired = check_repair(&disk, recovered, unreadable.contains(&true));
            if touched.len() <= 1 && repaired.repairs.is_empty() {
                check_resume(&disk, &repaired);
            }
        }
        Err(refusal) => {
            if touched.len() <= 1 {
                assert!(
                    !plain_damage,
                    "recovery refused ({refusal}) after plain damage to {touched:?} alone"
                );
                assert!(
                    matches!(
                        refusal.reason,
                        RefusalReason::NeedsOperator
                            | RefusalReason::WrongJournal
                            | RefusalReason::Unsupported
                    ),
                    "one changed block {touched:?} cannot justify refusal {refusal}"
                );
            }
            if refusal.reason == RefusalReason::NeedsOperator && !unreadable.contains(&true) {
                check_resolve(&disk, &analysis, base.operator_side);
            }
        }
    }
}

/// A returned record must be one that is on disk, valid and not newer than
/// anything seen.
fn check_recovered(analysis: &Analysis, recovered: &Recovered, image: &[u8], unreadable: &[bool]) {
    if let Err(why) = recovered.record.check() {
        panic!("recovered record fails check: {why}");
    }
    assert_eq!(
        Some(recovered.uuid),
        analysis.uuid,
        "recovered uuid differs"
    );
    assert!(
        analysis
            .max_seq_seen
            .is_some_and(|max| max >= recovered.seq),
        "recovered seq {} above the newest seen {:?}",
        recovered.seq,
        analysis.max_seq_seen
    );
    let bytes = payload::encode(&recovered.record).expect("a record fits");
    assert_eq!(
        format::content_crc(recovered.seq, &bytes),
        recovered.content_crc,
        "recovered content checksum does not match the record"
    );
    // At its own slot or, misdirected, anywhere else: some readable block
    // must hold exactly this record. (The reports narrow the search: decoding
    // is the expensive part of a run.)
    let on_disk = analysis
        .blocks
        .iter()
        .filter(|b| b.kind == Some(Kind::Record) && b.seq == Some(recovered.seq))
        .map(|b| b.position.block())
        .any(|block| {
            !unreadable[block]
                && format::decode(&image[block_range(block)]).is_ok_and(|frame| {
                    frame.kind == Kind::Record
                        && frame.uuid == recovered.uuid
                        && frame.seq == recovered.seq
                        && frame.content_crc == recovered.content_crc
                        && payload::decode_record(frame.version, &frame.payload).as_ref()
                            == Ok(&recovered.record)
                })
        });
    assert!(
        on_disk,
        "recovered seq {} is in no readable block",
        recovered.seq
    );
}

/// Repair (with a backup that always succeeds) must keep the verdict.
/// Returns what recovery says after the repair.
fn check_repair(disk: &SimDisk, recovered: &Recovered, reads_fail: bool) -> Recovered {
    match journal::repair(disk, recovered, |_| Ok(())) {
        Ok(done) => assert_eq!(
            done.done, recovered.repairs,
            "repair did other repairs than planned"
        ),
        // A block that cannot be read back stops the repair; only
        // unreadable blocks may cause that.
        Err(e) if reads_fail && e.kind() == crate::ErrorKind::Corrupt => {}
        Err(e) => panic!("repair failed on a healthy disk: {e}"),
    }
    let after = journal::analyse(disk).expect("analyse a SimDisk of journal size");
    match after.outcome {
        Ok(again) => {
            assert_eq!(
                (again.seq, &again.record),
                (recovered.seq, &recovered.record),
                "repair changed the recovered record"
            );
            if !reads_fail {
                assert!(
                    again.repairs.is_empty(),
                    "repair left repairs to do: {:?}",
                    again.repairs
                );
            }
            again
        }
        Err(refusal) => panic!(
            "recovery returned seq {} but refuses after repair: {refusal}",
            recovered.seq
        ),
    }
}

/// After one fault, recovery and repair, a new writer must be able to go on:
/// resume, commit the next phase, and have recovery return that commit.
fn check_resume(disk: &SimDisk, recovered: &Recovered) {
    let current = recovered.record.phase;
    let Some(next) = Phase::ALL
        .into_iter()
        .find(|&p| p != Phase::Resolved && current.may_precede(p, true))
    else {
        return;
    };
    let mut journal = match Journal::resume(disk.clone(), recovered) {
        Ok(journal) => journal,
        Err(e) => panic!("resume after recovery and repair failed: {e}"),
    };
    let seq = match journal.commit(next, 0) {
        Ok(seq) => seq,
        Err(e) => panic!("commit of {} after recovery failed: {e}", next.name()),
    };
    let after = journal::analyse(disk).expect("analyse a SimDisk of journal size");
    match after.outcome {
        Ok(again) => assert_eq!(
            (again.seq, &again.record),
            (seq, journal.record()),
            "recovery does not return the commit made after recovery"
        ),
        Err(refusal) => panic!("recovery refuses a commit made after recovery: {refusal}"),
    }
}

/// The operator's way out: on a refusal, `resolve` (on a copy of the disk)
/// must either decline or leave a journal that recovers to the resolution,
/// numbered above every sequence number seen.
fn check_resolve(disk: &SimDisk, analysis: &Analysis, side: Side) {
    let copy = SimDisk::from_bytes(disk.live_bytes());
    let Ok(seq) = journal::resolve(&copy, analysis, side, |_| Ok(())) else {
        return;
    };
    assert!(
        analysis.max_seq_seen.is_none_or(|max| seq > max),
        "resolution seq {seq} is not above the newest seen {:?}",
        analysis.max_seq_seen
    );
    let after = journal::analyse(&copy).expect("analyse a SimDisk of journal size");
    match after.outcome {
        Ok(again) => {
            assert_eq!(again.seq, seq, "recovery does not return the resolution");
            assert_eq!(again.record.phase, Phase::Resolved);
            assert_eq!(again.record.authoritative, side);
        }
        Err(refusal) => panic!("recovery refuses the operator's resolution: {refusal}"),
    }
}

/// NBD wire decoding: the input read as a run of 28-byte requests, as one
/// option header, and as one whole option message. Decoding never panics,
/// and a request that decodes encodes back to the same 28 bytes (nothing
/// the server reads is lost or invented).
// NBD is big-endian on the wire.
#[allow(clippy::big_endian_bytes)]
pub fn nbd_messages(data: &[u8]) {
    use crate::nbd::proto;
    for chunk in data.chunks_exact(proto::REQUEST_LEN) {
        let bytes: &[u8; proto::REQUEST_LEN] = chunk.try_into().expect("exact chunk");
        if let Ok(request) = proto::parse_request(bytes) {
            assert_eq!(
                &proto::encode_request(&request),
                bytes,
                "request round trip"
            );
        }
    }
    if let Some(header) = data.first_chunk::<{ proto::OPTION_HEADER_LEN }>() {
        let _ = proto::parse_option_header(header);
    }
    let _ = proto::parse_option(data);
    if let Some((code, rest)) = data.split_first_chunk::<4>() {
        let _ = proto::parse_option_data(u32::from_be_bytes(*code), rest);
    }
    if let Ok(request) = crate::nbd::structured::parse_meta_context_request(data) {
        let queries: Vec<&str> = request.queries.iter().map(String::as_str).collect();
        assert_eq!(
            crate::nbd::structured::encode_meta_context_request(&request.export, &queries),
            data,
            "meta context request round trip"
        );
    }
}

/// What an NBD server sends the client, after three requests: the reply
/// reader never panics and completes no request with less than it asked
/// for (see `storage::nbd::fuzz_replies`).
pub fn nbd_replies(data: &[u8]) {
    crate::storage::nbd::fuzz_replies(data);
}

/// A control-socket request line: parsing never panics, and every reply
/// built for it is exactly one line of JSON.
pub fn control_request(data: &[u8]) {
    use crate::control::proto;
    let reply = match proto::parse_request(data) {
        Ok(request) => proto::ok(&request.id, serde_json::Value::from(request.command.name())),
        Err(message) => proto::error(&None, "bad-request", &message),
    };
    assert!(!reply.contains('\n'), "a reply spans lines");
    serde_json::from_str::<serde_json::Value>(&reply).expect("a reply is JSON");
}
