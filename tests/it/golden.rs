//! Golden vectors: every byte of journal format v1, pinned.
//!
//! The hex below was produced once by this crate's encoder and checked by hand
//! against journal-format.md (offsets in the comments). If a test here fails,
//! the on-disk format changed: either the change is a bug, or it is a new
//! format version, and then journal-format.md, these vectors and the hash in
//! journal-format.md all change in the same commit (tests/it/tidy.rs).
//!
//! Hex strings may contain whitespace, which is ignored; each line is 16 bytes.
//! A block constant holds the block's first `64 + payload_len` bytes; every
//! byte after it must be zero (checked), so it pins all 4096 bytes.
//!
//! The fixtures form one plausible journal history: record 0 Copying, 1 Ready,
//! 2 Switched, 3 Completed (written by a restarted engine, epoch 2), an
//! alternative record 1 Aborted, and an operator's Resolved record 4 naming
//! the destination. `hand` decodes them again without bincode and without the
//! crate's frame decoder, from the spec alone.

use livecopy::journal::format::{self, BLOCK_SIZE, Defect, Frame, Kind, Position};
use livecopy::journal::payload;
use livecopy::journal::recovery;
use livecopy::journal::{HeaderV1, Phase, RecordV1, Side};

use crate::support::{JOB_ID, UUID, first_record};

/// `created_unix_ns` of the golden header; the records' clocks count from it.
const CREATED_NS: u64 = 1_700_000_000_000_000_000;

/// Length of every golden record payload: 128 fixed bytes plus the two paths
/// ("/images/source.raw", 18 bytes; "/images/destination.raw", 23 bytes).
const RECORD_PAYLOAD_LEN: usize = 169;
/// Length of the golden header payload (fixed size).
const HEADER_PAYLOAD_LEN: usize = 52;

// ---------------------------------------------------------------------------
// The vectors.
//
// Frame prefix, bytes 0..64 (journal-format.md, "Block frame"):
//   line 1: block_crc | "LCPJ" | format_version u16, kind u16 | slot, copy, flags u16
//   line 2: journal_uuid
//   line 3: seq u64 | content_crc | parent_content_crc
//   line 4: payload_len | payload_format | reserved (8 zero bytes)
// Record payload (journal-format.md, "RecordV1"), from block offset 64:
//   0 job_id, 16 phase u32, 20 authoritative u32, 24 source.path length u64,
//   32 path bytes (18), 50 size, 58 device, 66 inode, 74 destination.path
//   length, 82 path bytes (23), 105 size, 113 device, 121 inode,
//   129 writer_instance, 145 writer_epoch, 153 bytes_copied, 161 wall clock.
// ---------------------------------------------------------------------------

const HEADER_BLOCK: &str = "
    4a41b936 4c43504a 01000100 ff000000
    74657374 2d6a6f75 726e616c 2d696431
    00000000 00000000 95fed31e 00000000
    34000000 01000000 00000000 00000000
    00100000 04000000 02000000 01000000
    00000000 00000000 00000000 74657374
    2d6a6f62 2d303030 30303031 00002a36
    fe9c9717
";

const HEADER_PAYLOAD: &str = "
    00100000 04000000 02000000 01000000
    00000000 00000000 00000000 74657374
    2d6a6f62 2d303030 30303031 00002a36
    fe9c9717
";

const COPYING_BLOCK: &str = "
    312ea2da 4c43504a 01000200 00000000
    74657374 2d6a6f75 726e616c 2d696431
    00000000 00000000 1180b6bb 00000000
    a9000000 02000000 00000000 00000000
    74657374 2d6a6f62 2d303030 30303031
    00000000 00000000 12000000 00000000
    2f696d61 6765732f 736f7572 63652e72
    61770000 10000000 00000108 00000000
    00000b00 00000000 00001700 00000000
    00002f69 6d616765 732f6465 7374696e
    6174696f 6e2e7261 77000010 00000000
    00010800 00000000 000c0000 00000000
    00777269 7465722d 696e7374 616e6365
    31010000 00000000 00000000 00000000
    0000002a 36fe9c97 17
";

const COPYING_PAYLOAD: &str = "
    74657374 2d6a6f62 2d303030 30303031
    00000000 00000000 12000000 00000000
    2f696d61 6765732f 736f7572 63652e72
    61770000 10000000 00000108 00000000
    00000b00 00000000 00001700 00000000
    00002f69 6d616765 732f6465 7374696e
    6174696f 6e2e7261 77000010 00000000
    00010800 00000000 000c0000 00000000
    00777269 7465722d 696e7374 616e6365
    31010000 00000000 00000000 00000000
    0000002a 36fe9c97 17
";

const READY_BLOCK: &str = "
    ff0d5bdd 4c43504a 01000200 01010000
    74657374 2d6a6f75 726e616c 2d696431
    01000000 00000000 251182da 1180b6bb
    a9000000 02000000 00000000 00000000
    74657374 2d6a6f62 2d303030 30303031
    01000000 00000000 12000000 00000000
    2f696d61 6765732f 736f7572 63652e72
    61770000 10000000 00000108 00000000
    00000b00 00000000 00001700 00000000
    00002f69 6d616765 732f6465 7374696e
    6174696f 6e2e7261 77000010 00000000
    00010800 00000000 000c0000 00000000
    00777269 7465722d 696e7374 616e6365
    31010000 00000000 00000010 00000000
    0000cac4 71fe9c97 17
";

const READY_PAYLOAD: &str = "
    74657374 2d6a6f62 2d303030 30303031
    01000000 00000000 12000000 00000000
    2f696d61 6765732f 736f7572 63652e72
    61770000 10000000 00000108 00000000
    00000b00 00000000 00001700 00000000
    00002f69 6d616765 732f6465 7374696e
    6174696f 6e2e7261 77000010 00000000
    00010800 00000000 000c0000 00000000
    00777269 7465722d 696e7374 616e6365
    31010000 00000000 00000010 00000000
    0000cac4 71fe9c97 17
";

const SWITCHED_BLOCK: &str = "
    40d986df 4c43504a 01000200 02000000
    74657374 2d6a6f75 726e616c 2d696431
    02000000 00000000 32ec8ea2 251182da
    a9000000 02000000 00000000 00000000
    74657374 2d6a6f62 2d303030 30303031
    02000000 01000000 12000000 00000000
    2f696d61 6765732f 736f7572 63652e72
    61770000 10000000 00000108 00000000
    00000b00 00000000 00001700 00000000
    00002f69 6d616765 732f6465 7374696e
    6174696f 6e2e7261 77000010 00000000
    00010800 00000000 000c0000 00000000
    00777269 7465722d 696e7374 616e6365
    31010000 00000000 00000010 00000000
    0000945f adfe9c97 17
";

const SWITCHED_PAYLOAD: &str = "
    74657374 2d6a6f62 2d303030 30303031
    02000000 01000000 12000000 00000000
    2f696d61 6765732f 736f7572 63652e72
    61770000 10000000 00000108 00000000
    00000b00 00000000 00001700 00000000
    00002f69 6d616765 732f6465 7374696e
    6174696f 6e2e7261 77000010 00000000
    00010800 00000000 000c0000 00000000
    00777269 7465722d 696e7374 616e6365
    31010000 00000000 00000010 00000000
    0000945f adfe9c97 17
";

const COMPLETED_BLOCK: &str = "
    9411254a 4c43504a 01000200 03010000
    74657374 2d6a6f75 726e616c 2d696431
    03000000 00000000 def7a4d7 32ec8ea2
    a9000000 02000000 00000000 00000000
    74657374 2d6a6f62 2d303030 30303031
    03000000 01000000 12000000 00000000
    2f696d61 6765732f 736f7572 63652e72
    61770000 10000000 00000108 00000000
    00000b00 00000000 00001700 00000000
    00002f69 6d616765 732f6465 7374696e
    6174696f 6e2e7261 77000010 00000000
    00010800 00000000 000c0000 00000000
    00777269 7465722d 696e7374 616e6365
    32020000 00000000 00000010 00000000
    00005efa e8fe9c97 17
";

const COMPLETED_PAYLOAD: &str = "
    74657374 2d6a6f62 2d303030 30303031
    03000000 01000000 12000000 00000000
    2f696d61 6765732f 736f7572 63652e72
    61770000 10000000 00000108 00000000
    00000b00 00000000 00001700 00000000
    00002f69 6d616765 732f6465 7374696e
    6174696f 6e2e7261 77000010 00000000
    00010800 00000000 000c0000 00000000
    00777269 7465722d 696e7374 616e6365
    32020000 00000000 00000010 00000000
    00005efa e8fe9c97 17
";

const ABORTED_BLOCK: &str = "
    adb855f3 4c43504a 01000200 01000000
    74657374 2d6a6f75 726e616c 2d696431
    01000000 00000000 84c14fc1 1180b6bb
    a9000000 02000000 00000000 00000000
    74657374 2d6a6f62 2d303030 30303031
    04000000 00000000 12000000 00000000
    2f696d61 6765732f 736f7572 63652e72
    61770000 10000000 00000108 00000000
    00000b00 00000000 00001700 00000000
    00002f69 6d616765 732f6465 7374696e
    6174696f 6e2e7261 77000010 00000000
    00010800 00000000 000c0000 00000000
    00777269 7465722d 696e7374 616e6365
    31010000 00000000 00001000 00000000
    00002895 24ff9c97 17
";

const ABORTED_PAYLOAD: &str = "
    74657374 2d6a6f62 2d303030 30303031
    04000000 00000000 12000000 00000000
    2f696d61 6765732f 736f7572 63652e72
    61770000 10000000 00000108 00000000
    00000b00 00000000 00001700 00000000
    00002f69 6d616765 732f6465 7374696e
    6174696f 6e2e7261 77000010 00000000
    00010800 00000000 000c0000 00000000
    00777269 7465722d 696e7374 616e6365
    31010000 00000000 00001000 00000000
    00002895 24ff9c97 17
";

const RESOLVED_BLOCK: &str = "
    10e4d9bc 4c43504a 01000200 00010000
    74657374 2d6a6f75 726e616c 2d696431
    04000000 00000000 9173aaad 00000000
    a9000000 02000000 00000000 00000000
    74657374 2d6a6f62 2d303030 30303031
    05000000 01000000 12000000 00000000
    2f696d61 6765732f 736f7572 63652e72
    61770000 10000000 00000108 00000000
    00000b00 00000000 00001700 00000000
    00002f69 6d616765 732f6465 7374696e
    6174696f 6e2e7261 77000010 00000000
    00010800 00000000 000c0000 00000000
    006f7065 7261746f 722d7265 736f6c76
    65030000 00000000 00000010 00000000
    0000f22f 60ff9c97 17
";

const RESOLVED_PAYLOAD: &str = "
    74657374 2d6a6f62 2d303030 30303031
    05000000 01000000 12000000 00000000
    2f696d61 6765732f 736f7572 63652e72
    61770000 10000000 00000108 00000000
    00000b00 00000000 00001700 00000000
    00002f69 6d616765 732f6465 7374696e
    6174696f 6e2e7261 77000010 00000000
    00010800 00000000 000c0000 00000000
    006f7065 7261746f 722d7265 736f6c76
    65030000 00000000 00000010 00000000
    0000f22f 60ff9c97 17
";

const EMPTY_SLOT_BLOCK: &str = "
    ca80252c 4c43504a 01000300 02010000
    74657374 2d6a6f75 726e616c 2d696431
    00000000 00000000 69df2265 00000000
    00000000 00000000 00000000 00000000
";

/// One golden vector: the frame and payload the code builds, and the bytes
/// they must encode to.
struct Golden {
    name: &'static str,
    frame: Frame,
    /// The decoded payload, for records.
    record: Option<RecordV1>,
    /// The decoded payload, for headers.
    header: Option<HeaderV1>,
    block_hex: &'static str,
    payload_hex: Option<&'static str>,
    payload_len: usize,
}

/// Parses hex, ignoring whitespace. Panics on anything else.
fn unhex(text: &str) -> Vec<u8> {
    let digits: Vec<u8> = text
        .bytes()
        .filter(|b| !b.is_ascii_whitespace())
        .map(|b| match b {
            b'0'..=b'9' => b - b'0',
            b'a'..=b'f' => b - b'a' + 10,
            _ => panic!("not lower-case hex: {:?}", b as char),
        })
        .collect();
    assert!(digits.len().is_multiple_of(2), "odd number of hex digits");
    digits.chunks(2).map(|p| p[0] << 4 | p[1]).collect()
}

/// The golden header payload.
fn header() -> HeaderV1 {
    HeaderV1::new(JOB_ID, CREATED_NS)
}

/// The golden record of `phase` (see the module comment for the history).
fn record(phase: Phase) -> RecordV1 {
    let (epoch, instance, bytes_copied, seconds): (u64, &[u8; 16], u64, u64) = match phase {
        Phase::Copying => (1, b"writer-instance1", 0, 0),
        Phase::Ready => (1, b"writer-instance1", 1 << 20, 1),
        Phase::Switched => (1, b"writer-instance1", 1 << 20, 2),
        Phase::Completed => (2, b"writer-instance2", 1 << 20, 3),
        Phase::Aborted => (1, b"writer-instance1", 4096, 4),
        Phase::Resolved => (3, b"operator-resolve", 1 << 20, 5),
    };
    RecordV1 {
        phase,
        // Resolved implies no side; the golden resolution names the destination.
        authoritative: phase.implied_authority().unwrap_or(Side::Destination),
        writer_instance: *instance,
        writer_epoch: epoch,
        bytes_copied,
        wall_clock_unix_ns: CREATED_NS + seconds * 1_000_000_000,
        ..first_record().to_v1().expect("one pair of files")
    }
}

/// (seq, copy, parent phase) of the golden record of `phase`.
fn placement(phase: Phase) -> (u64, u8, Option<(u64, Phase)>) {
    match phase {
        Phase::Copying => (0, 0, None),
        Phase::Ready => (1, 1, Some((0, Phase::Copying))),
        Phase::Switched => (2, 0, Some((1, Phase::Ready))),
        Phase::Completed => (3, 1, Some((2, Phase::Switched))),
        Phase::Aborted => (1, 0, Some((0, Phase::Copying))),
        Phase::Resolved => (4, 1, None),
    }
}

fn record_frame(phase: Phase) -> Frame {
    let (seq, copy, parent) = placement(phase);
    let parent_crc = parent.map_or(0, |(parent_seq, parent_phase)| {
        let bytes = payload::encode(&record(parent_phase)).expect("encodes");
        format::content_crc(parent_seq, &bytes)
    });
    Frame::of_version(
        1,
        Kind::Record,
        Position::Slot {
            slot: (seq % 4) as u8,
            copy,
        },
        UUID,
        seq,
        parent_crc,
        payload::encode(&record(phase)).expect("encodes"),
    )
}

fn goldens() -> Vec<Golden> {
    let mut all = vec![Golden {
        name: "header",
        frame: Frame::of_version(
            1,
            Kind::Header,
            Position::Header { copy: 0 },
            UUID,
            0,
            0,
            payload::encode(&header()).expect("encodes"),
        ),
        record: None,
        header: Some(header()),
        block_hex: HEADER_BLOCK,
        payload_hex: Some(HEADER_PAYLOAD),
        payload_len: HEADER_PAYLOAD_LEN,
    }];
    let records = [
        (Phase::Copying, COPYING_BLOCK, COPYING_PAYLOAD),
        (Phase::Ready, READY_BLOCK, READY_PAYLOAD),
        (Phase::Switched, SWITCHED_BLOCK, SWITCHED_PAYLOAD),
        (Phase::Completed, COMPLETED_BLOCK, COMPLETED_PAYLOAD),
        (Phase::Aborted, ABORTED_BLOCK, ABORTED_PAYLOAD),
        (Phase::Resolved, RESOLVED_BLOCK, RESOLVED_PAYLOAD),
    ];
    for (phase, block_hex, payload_hex) in records {
        all.push(Golden {
            name: phase.name(),
            frame: record_frame(phase),
            record: Some(record(phase)),
            header: None,
            block_hex,
            payload_hex: Some(payload_hex),
            payload_len: RECORD_PAYLOAD_LEN,
        });
    }
    all.push(Golden {
        name: "empty slot",
        frame: Frame::of_version(
            1,
            Kind::EmptySlot,
            Position::Slot { slot: 2, copy: 1 },
            UUID,
            0,
            0,
            Vec::new(),
        ),
        record: None,
        header: None,
        block_hex: EMPTY_SLOT_BLOCK,
        payload_hex: None,
        payload_len: 0,
    });
    all
}

/// The whole 4096-byte block a golden vector stands for.
fn golden_block(g: &Golden) -> Vec<u8> {
    let prefix = unhex(g.block_hex);
    assert_eq!(
        prefix.len(),
        format::PAYLOAD_OFFSET + g.payload_len,
        "{}: the block hex must be the 64-byte frame plus the payload",
        g.name
    );
    let mut block = prefix;
    block.resize(BLOCK_SIZE, 0);
    block
}

#[test]
fn crc_check_value() {
    assert_eq!(format::crc32(b"123456789"), 0xCBF4_3926);
    assert_eq!(hand::crc32(b"123456789"), 0xCBF4_3926);
    assert_eq!(format::crc32(b""), 0);
    assert_eq!(format::content_crc(0, &[]), hand::crc32(&[0; 8]));
}

#[test]
fn every_phase_and_kind_has_a_vector() {
    let all = goldens();
    for phase in Phase::ALL {
        assert!(
            all.iter()
                .any(|g| g.record.as_ref().map(|r| r.phase) == Some(phase))
        );
    }
    for kind in [Kind::Header, Kind::Record, Kind::EmptySlot] {
        assert!(all.iter().any(|g| g.frame.kind == kind));
    }
    assert_eq!(Phase::ALL.len(), 6, "a new phase needs a golden vector");
}

#[test]
fn encoder_produces_the_golden_blocks() {
    for g in goldens() {
        let encoded = format::encode(&g.frame);
        let golden = golden_block(&g);
        if let Some(at) = (0..BLOCK_SIZE).find(|&i| encoded[i] != golden[i]) {
            panic!(
                "{}: byte {at} is {:#04x}, golden {:#04x}\n  encoded prefix: {}",
                g.name,
                encoded[at],
                golden[at],
                recovery::hex(&encoded[..format::PAYLOAD_OFFSET + g.payload_len])
            );
        }
        assert!(
            encoded[format::PAYLOAD_OFFSET + g.payload_len..]
                .iter()
                .all(|&b| b == 0),
            "{}: padding is zero",
            g.name
        );
    }
}

#[test]
fn payload_encoder_produces_the_golden_payloads() {
    for g in goldens() {
        let encoded = match (&g.header, &g.record) {
            (Some(h), None) => payload::encode(h).expect("encodes"),
            (None, Some(r)) => payload::encode(r).expect("encodes"),
            _ => {
                assert!(g.frame.payload.is_empty());
                continue;
            }
        };
        let golden = unhex(g.payload_hex.expect("a payload vector"));
        assert_eq!(golden.len(), g.payload_len, "{}", g.name);
        assert_eq!(
            recovery::hex(&encoded),
            recovery::hex(&golden),
            "{}: payload bytes",
            g.name
        );
        assert_eq!(
            golden[..],
            golden_block(&g)[format::PAYLOAD_OFFSET..format::PAYLOAD_OFFSET + g.payload_len],
            "{}: the block carries the payload at offset 64",
            g.name
        );
    }
}

#[test]
fn golden_blocks_decode_to_the_fixtures() {
    for g in goldens() {
        let block = golden_block(&g);
        let frame = format::decode(&block).unwrap_or_else(|d| panic!("{}: {d}", g.name));
        assert_eq!(frame, g.frame, "{}", g.name);
        if let Some(h) = &g.header {
            let decoded: HeaderV1 = payload::decode(&frame.payload).expect("header decodes");
            assert_eq!(&decoded, h);
            assert_eq!(decoded.check(), Ok(()));
        }
        if let Some(r) = &g.record {
            let decoded: RecordV1 = payload::decode(&frame.payload).expect("record decodes");
            assert_eq!(&decoded, r);
            assert_eq!(decoded.check(), Ok(()), "{}", g.name);
        }
    }
}

#[test]
fn golden_history_is_a_legal_chain() {
    for phase in Phase::ALL {
        let (_, _, parent) = placement(phase);
        let child = livecopy::journal::Record::from(record(phase));
        assert_eq!(
            child.starts_chain(placement(phase).0),
            parent.is_none(),
            "{phase:?}"
        );
        if let Some((_, parent_phase)) = parent {
            assert!(
                recovery::links(
                    &record_frame(parent_phase),
                    &record(parent_phase).into(),
                    &record_frame(phase),
                    &child
                ),
                "{parent_phase:?} -> {phase:?}"
            );
        }
    }
}

#[test]
fn every_single_bit_flip_is_detected() {
    for g in goldens() {
        let block = golden_block(&g);
        for at in 0..BLOCK_SIZE {
            for bit in [0, 7] {
                let mut bad = block.clone();
                bad[at] ^= 1 << bit;
                assert_eq!(
                    format::decode(&bad),
                    Err(Defect::Checksum),
                    "{}: flip of bit {bit} at byte {at} went unnoticed",
                    g.name
                );
            }
        }
    }
}

#[test]
fn hand_reader_agrees_with_the_crate() {
    for g in goldens() {
        let block = golden_block(&g);
        let frame = hand::frame(&block).unwrap_or_else(|e| panic!("{}: {e}", g.name));
        assert_eq!(frame, g.frame, "{}: hand-parsed frame", g.name);
        if let Some(r) = &g.record {
            let hand = hand::record(&frame.payload).expect("hand-parsed record");
            let bincode: RecordV1 = payload::decode(&frame.payload).expect("decodes");
            assert_eq!(&hand, r, "{}", g.name);
            assert_eq!(hand, bincode, "{}", g.name);
        }
        if let Some(h) = &g.header {
            let hand = hand::header(&frame.payload).expect("hand-parsed header");
            let bincode: HeaderV1 = payload::decode(&frame.payload).expect("decodes");
            assert_eq!(&hand, h);
            assert_eq!(hand, bincode);
        }
    }
}

#[test]
fn documented_record_offsets_hold() {
    // journal-format.md, "RecordV1": the fixed prefix, and how the source path
    // length shifts what follows.
    let r = record(Phase::Switched);
    let p = unhex(SWITCHED_PAYLOAD);
    let u32_at = |at: usize| u32::from_le_bytes(p[at..at + 4].try_into().unwrap());
    let u64_at = |at: usize| u64::from_le_bytes(p[at..at + 8].try_into().unwrap());
    assert_eq!(p[0..16], r.job_id);
    assert_eq!(u32_at(16), 2, "phase Switched = 2 at offset 16");
    assert_eq!(u32_at(20), 1, "authoritative Destination = 1 at offset 20");
    let ls = u64_at(24) as usize;
    assert_eq!(ls, r.source.path.len());
    assert_eq!(&p[32..32 + ls], r.source.path.as_bytes());
    let s = 32 + ls;
    assert_eq!(
        (u64_at(s), u64_at(s + 8), u64_at(s + 16)),
        (r.source.size, r.source.device, r.source.inode)
    );
    let ld = u64_at(s + 24) as usize;
    let d = s + 32;
    assert_eq!(&p[d..d + ld], r.destination.path.as_bytes());
    let t = d + ld;
    assert_eq!(
        (u64_at(t), u64_at(t + 8), u64_at(t + 16)),
        (
            r.destination.size,
            r.destination.device,
            r.destination.inode
        )
    );
    assert_eq!(p[t + 24..t + 40], r.writer_instance);
    assert_eq!(u64_at(t + 40), r.writer_epoch);
    assert_eq!(u64_at(t + 48), r.bytes_copied);
    assert_eq!(u64_at(t + 56), r.wall_clock_unix_ns);
    assert_eq!(p.len(), t + 64);
    assert_eq!(p.len(), 128 + ls + ld, "128 fixed bytes plus the paths");
}

#[test]
fn documented_enum_values_hold() {
    // journal-format.md, "Enumerations": the u32 each variant encodes to.
    let phases = [
        (Phase::Copying, 0u32),
        (Phase::Ready, 1),
        (Phase::Switched, 2),
        (Phase::Completed, 3),
        (Phase::Aborted, 4),
        (Phase::Resolved, 5),
    ];
    for (phase, value) in phases {
        assert_eq!(
            payload::encode(&phase).unwrap(),
            value.to_le_bytes(),
            "{phase:?}"
        );
        assert_eq!(hand::phase(value), Some(phase));
    }
    assert_eq!(hand::phase(6), None);
    assert!(payload::decode::<Phase>(&6u32.to_le_bytes()).is_err());
    for (side, value) in [(Side::Source, 0u32), (Side::Destination, 1)] {
        assert_eq!(
            payload::encode(&side).unwrap(),
            value.to_le_bytes(),
            "{side:?}"
        );
        assert_eq!(hand::side(value), Some(side));
    }
    assert!(payload::decode::<Side>(&2u32.to_le_bytes()).is_err());
}

/// A reader written from journal-format.md alone: no bincode, no
/// `format::decode`. Only what the spec says, in the order it says it.
mod hand {
    use livecopy::journal::format::{Frame, Kind, Position};
    use livecopy::journal::{HeaderV1, ImageRecord, Phase, RecordV1, Side};

    /// CRC-32/ISO-HDLC, bit by bit from its parameters: poly 0x04C11DB7
    /// (reflected: 0xEDB88320), init 0xFFFFFFFF, reflected in and out,
    /// xorout 0xFFFFFFFF.
    pub fn crc32(bytes: &[u8]) -> u32 {
        let mut crc = 0xFFFF_FFFFu32;
        for &byte in bytes {
            crc ^= u32::from(byte);
            for _ in 0..8 {
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ 0xEDB8_8320
                } else {
                    crc >> 1
                };
            }
        }
        crc ^ 0xFFFF_FFFF
    }

    /// Little-endian reads at a position that moves forward.
    struct Cursor<'a> {
        bytes: &'a [u8],
        at: usize,
    }

    impl Cursor<'_> {
        fn take(&mut self, n: usize) -> Result<&[u8], String> {
            let end = self
                .at
                .checked_add(n)
                .filter(|&end| end <= self.bytes.len())
                .ok_or_else(|| format!("{n} bytes needed at offset {}", self.at))?;
            let out = &self.bytes[self.at..end];
            self.at = end;
            Ok(out)
        }
        fn u32(&mut self) -> Result<u32, String> {
            Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
        }
        fn u64(&mut self) -> Result<u64, String> {
            Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
        }
        fn id(&mut self) -> Result<[u8; 16], String> {
            Ok(self.take(16)?.try_into().unwrap())
        }
        /// u64 byte length, then that many UTF-8 bytes.
        fn string(&mut self) -> Result<String, String> {
            let len = self.u64()?;
            let len = usize::try_from(len).map_err(|_| "string length".to_string())?;
            let bytes = self.take(len)?;
            String::from_utf8(bytes.to_vec()).map_err(|_| "string is not UTF-8".into())
        }
        fn end(&self) -> Result<(), String> {
            if self.at == self.bytes.len() {
                Ok(())
            } else {
                Err(format!("{} trailing bytes", self.bytes.len() - self.at))
            }
        }
    }

    pub fn phase(value: u32) -> Option<Phase> {
        Some(match value {
            0 => Phase::Copying,
            1 => Phase::Ready,
            2 => Phase::Switched,
            3 => Phase::Completed,
            4 => Phase::Aborted,
            5 => Phase::Resolved,
            _ => return None,
        })
    }

    pub fn side(value: u32) -> Option<Side> {
        match value {
            0 => Some(Side::Source),
            1 => Some(Side::Destination),
            _ => None,
        }
    }

    fn image(c: &mut Cursor<'_>) -> Result<ImageRecord, String> {
        Ok(ImageRecord {
            path: c.string()?,
            size: c.u64()?,
            device: c.u64()?,
            inode: c.u64()?,
        })
    }

    /// RecordV1 (payload_format 2).
    pub fn record(payload: &[u8]) -> Result<RecordV1, String> {
        let mut c = Cursor {
            bytes: payload,
            at: 0,
        };
        let record = RecordV1 {
            job_id: c.id()?,
            phase: phase(c.u32()?).ok_or("unknown phase")?,
            authoritative: side(c.u32()?).ok_or("unknown side")?,
            source: image(&mut c)?,
            destination: image(&mut c)?,
            writer_instance: c.id()?,
            writer_epoch: c.u64()?,
            bytes_copied: c.u64()?,
            wall_clock_unix_ns: c.u64()?,
        };
        c.end()?;
        Ok(record)
    }

    /// HeaderV1 (payload_format 1): 52 bytes.
    pub fn header(payload: &[u8]) -> Result<HeaderV1, String> {
        let mut c = Cursor {
            bytes: payload,
            at: 0,
        };
        let header = HeaderV1 {
            block_size: c.u32()?,
            slots_per_ring: c.u32()?,
            copies: c.u32()?,
            checksum_type: c.u32()?,
            compat: c.u32()?,
            incompat: c.u32()?,
            ro_compat: c.u32()?,
            job_id: c.id()?,
            created_unix_ns: c.u64()?,
        };
        c.end()?;
        Ok(header)
    }

    /// The block frame, checked in the order the spec gives.
    pub fn frame(block: &[u8]) -> Result<Frame, String> {
        let u16_at = |at: usize| u16::from_le_bytes([block[at], block[at + 1]]);
        let u32_at = |at: usize| u32::from_le_bytes(block[at..at + 4].try_into().unwrap());
        let u64_at = |at: usize| u64::from_le_bytes(block[at..at + 8].try_into().unwrap());
        if block.len() != 4096 {
            return Err("block length".into());
        }
        if crc32(&block[4..]) != u32_at(0) {
            return Err("checksum".into());
        }
        if &block[4..8] != b"LCPJ" {
            return Err("magic".into());
        }
        if u16_at(8) != 1 {
            return Err("unsupported version".into());
        }
        let (kind, payload_format) = match u16_at(10) {
            1 => (Kind::Header, 1),
            2 => (Kind::Record, 2),
            3 => (Kind::EmptySlot, 0),
            _ => return Err("kind".into()),
        };
        let (slot, copy) = (block[12], block[13]);
        if u16_at(14) != 0 || copy > 1 {
            return Err("flags or copy".into());
        }
        let position = match kind {
            Kind::Header if slot == 0xFF => Position::Header { copy },
            Kind::Record | Kind::EmptySlot if slot < 4 => Position::Slot { slot, copy },
            _ => return Err("slot".into()),
        };
        if block[56..64].iter().any(|&b| b != 0) || u32_at(52) != payload_format {
            return Err("reserved or payload format".into());
        }
        let len = u32_at(48) as usize;
        if len > 4032 || block[64 + len..].iter().any(|&b| b != 0) {
            return Err("payload length or padding".into());
        }
        let seq = u64_at(32);
        let payload = block[64..64 + len].to_vec();
        let mut content = seq.to_le_bytes().to_vec();
        content.extend_from_slice(&payload);
        if crc32(&content) != u32_at(40) {
            return Err("content checksum".into());
        }
        let parent = u32_at(44);
        match kind {
            Kind::Record if seq % 4 != u64::from(slot) => return Err("seq vs slot".into()),
            Kind::Header | Kind::EmptySlot if seq != 0 || parent != 0 => {
                return Err("seq of a non-record".into());
            }
            _ => {}
        }
        Ok(Frame {
            version: 1,
            kind,
            position,
            uuid: block[16..32].try_into().unwrap(),
            seq,
            content_crc: u32_at(40),
            parent_content_crc: parent,
            payload,
        })
    }
}
