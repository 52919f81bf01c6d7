//! Golden vectors of journal format 2: the seal block holding a Switched
//! record whose destination is an NBD export and which carries one
//! extension field, and the empty seal of a new journal. The bytes were
//! produced once by the encoder and checked field by field against
//! journal-format.md section 6.5; `hand` below decodes them again from the
//! spec alone, without bincode and without the crate's decoders.
//!
//! Format 1's vectors stay in `golden.rs`: format 1 journals are still read
//! and continued.

use livecopy::journal::format::{self, BLOCK_SIZE, Frame, Kind, Position};
use livecopy::journal::{
    ExportRecord, Extension, ImagePair, ImageRecord, ImageRef, Phase, Record, Side, payload,
};

/// The seal of a journal whose record 2 is Switched (journal-format.md
/// 11.4): 64 bytes of frame, then the 200-byte RecordV2 payload.
const SEAL_BLOCK: &str = "
    90ff7827 4c43504a 02000200 fe000000
    74657374 2d6a6f75 726e616c 2d696431
    02000000 00000000 7e5e3749 78563412
    c8000000 03000000 00000000 00000000
    74657374 2d6a6f62 2d303030 30303031
    02000000 01000000 01000000 00000000
    00000000 12000000 00000000 2f696d61
    6765732f 736f7572 63652e72 61770000
    10000000 00000108 00000000 00000b00
    00000000 00000100 00001400 00000000
    00006e62 643a2f2f 31302e30 2e302e32
    2f646973 6b300500 00000000 00006469
    736b3000 00100000 00000000 77726974
    65722d69 6e737461 6e636531 01000000
    00000000 00001000 00000000 00945fad
    fe9c9717 01000000 00000000 07000200
    00000000 0000abcd
";

/// The seal of a new journal: an empty slot at the seal's position.
const EMPTY_SEAL_BLOCK: &str = "
    b0c2cde9 4c43504a 02000300 fe000000
    74657374 2d6a6f75 726e616c 2d696431
    00000000 00000000 69df2265 00000000
    00000000 00000000 00000000 00000000
";

fn unhex(text: &str) -> Vec<u8> {
    let digits: Vec<u8> = text.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    digits
        .chunks(2)
        .map(|pair| u8::from_str_radix(std::str::from_utf8(pair).unwrap(), 16).unwrap())
        .collect()
}

fn block(prefix: &str) -> Vec<u8> {
    let mut block = unhex(prefix);
    block.resize(BLOCK_SIZE, 0);
    block
}

fn switched_record() -> Record {
    Record {
        job_id: *b"test-job-0000001",
        phase: Phase::Switched,
        authoritative: Side::Destination,
        pairs: vec![ImagePair {
            source: ImageRef::File(ImageRecord {
                path: "/images/source.raw".into(),
                size: 1 << 20,
                device: 2049,
                inode: 11,
            }),
            destination: ImageRef::Export(ExportRecord {
                uri: "nbd://10.0.0.2/disk0".into(),
                export: "disk0".into(),
                size: 1 << 20,
                tls: false,
            }),
        }],
        writer_instance: *b"writer-instance1",
        writer_epoch: 1,
        bytes_copied: 1 << 20,
        wall_clock_unix_ns: 1_700_000_002_000_000_000,
        extensions: vec![Extension {
            tag: 7,
            data: vec![0xab, 0xcd],
        }],
    }
}

fn seal_frame() -> Frame {
    let bytes = payload::encode_record(2, &switched_record()).expect("encodes");
    assert_eq!(bytes.len(), 200);
    Frame::new(
        Kind::Record,
        Position::Seal,
        *b"test-journal-id1",
        2,
        0x1234_5678,
        bytes,
    )
}

fn empty_seal_frame() -> Frame {
    Frame::new(
        Kind::EmptySlot,
        Position::Seal,
        *b"test-journal-id1",
        0,
        0,
        Vec::new(),
    )
}

#[test]
fn the_encoder_produces_the_format_2_golden_blocks() {
    for (name, frame, golden) in [
        ("seal", seal_frame(), SEAL_BLOCK),
        ("empty seal", empty_seal_frame(), EMPTY_SEAL_BLOCK),
    ] {
        let encoded = format::encode(&frame);
        assert!(encoded[..] == block(golden)[..], "{name}: bytes differ");
        assert_eq!(
            format::decode(&block(golden)).as_ref(),
            Ok(&frame),
            "{name}"
        );
    }
    let decoded = payload::decode_record(2, &seal_frame().payload).expect("decodes");
    assert_eq!(decoded, switched_record());
}

#[test]
fn every_single_bit_flip_of_a_format_2_block_is_detected() {
    for golden in [SEAL_BLOCK, EMPTY_SEAL_BLOCK] {
        let good = block(golden);
        for at in 0..BLOCK_SIZE {
            let mut bad = good.clone();
            bad[at] ^= 1;
            assert!(format::decode(&bad).is_err(), "flip at {at} went unnoticed");
        }
    }
}

#[test]
fn the_hand_reader_agrees_with_the_crate() {
    let bytes = block(SEAL_BLOCK);
    let (position, seq, payload) = hand::frame(&bytes).expect("hand frame");
    assert_eq!((position, seq), ("seal", 2));
    assert_eq!(
        hand::record(payload).expect("hand record"),
        switched_record()
    );
    let empty = block(EMPTY_SEAL_BLOCK);
    let (position, seq, payload) = hand::frame(&empty).expect("hand frame");
    assert_eq!((position, seq, payload.len()), ("seal", 0, 0));
}

/// A record whose extension must be understood and is not: the block is
/// from a newer writer, and recovery refuses it as such.
#[test]
fn a_required_extension_this_version_does_not_know_is_unsupported() {
    let mut record = switched_record();
    record.extensions[0].tag |= livecopy::journal::payload::EXTENSION_REQUIRED;
    let bytes = payload::encode_record(2, &record).expect("encodes");
    let (newer, why) = payload::decode_record(2, &bytes).expect_err("refused");
    assert!(newer, "{why}");
}

/// A reader of the spec only: section 4 for the frame (format 2), section
/// 6.5 for RecordV2.
mod hand {
    use livecopy::journal::{
        ExportRecord, Extension, ImagePair, ImageRecord, ImageRef, Phase, Record, Side,
    };

    fn crc32(bytes: &[u8]) -> u32 {
        let mut crc = 0xFFFF_FFFFu32;
        for &b in bytes {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = (crc >> 1) ^ if crc & 1 != 0 { 0xEDB8_8320 } else { 0 };
            }
        }
        crc ^ 0xFFFF_FFFF
    }

    fn le(bytes: &[u8]) -> u64 {
        bytes
            .iter()
            .rev()
            .fold(0u64, |acc, &b| (acc << 8) | u64::from(b))
    }

    /// (position name, seq, payload) of a format 2 block.
    pub fn frame(block: &[u8]) -> Result<(&'static str, u64, &[u8]), String> {
        if le(&block[0..4]) as u32 != crc32(&block[4..]) {
            return Err("block checksum".into());
        }
        if &block[4..8] != b"LCPJ" || le(&block[8..10]) != 2 {
            return Err("magic or version".into());
        }
        let position = match (le(&block[10..12]), block[12], block[13]) {
            (2 | 3, 0xFE, 0) => "seal",
            (1, 0xFF, _) => "header",
            (2 | 3, s, _) if s < 4 => "slot",
            _ => return Err("kind, slot or copy".into()),
        };
        let seq = le(&block[32..40]);
        let len = le(&block[48..52]) as usize;
        let payload = &block[64..64 + len];
        let mut content = seq.to_le_bytes().to_vec();
        content.extend_from_slice(payload);
        if le(&block[40..44]) as u32 != crc32(&content) {
            return Err("content checksum".into());
        }
        Ok((position, seq, payload))
    }

    struct Cursor<'a>(&'a [u8]);

    impl Cursor<'_> {
        fn take(&mut self, n: usize) -> Result<&[u8], String> {
            if self.0.len() < n {
                return Err("short".into());
            }
            let (head, rest) = self.0.split_at(n);
            self.0 = rest;
            Ok(head)
        }
        fn int(&mut self, n: usize) -> Result<u64, String> {
            self.take(n).map(le)
        }
        fn id(&mut self) -> Result<[u8; 16], String> {
            Ok(self.take(16)?.try_into().unwrap())
        }
        fn bytes(&mut self) -> Result<Vec<u8>, String> {
            let n = self.int(8)? as usize;
            Ok(self.take(n)?.to_vec())
        }
        fn string(&mut self) -> Result<String, String> {
            String::from_utf8(self.bytes()?).map_err(|e| e.to_string())
        }
        fn image(&mut self) -> Result<ImageRef, String> {
            match self.int(4)? {
                0 => Ok(ImageRef::File(ImageRecord {
                    path: self.string()?,
                    size: self.int(8)?,
                    device: self.int(8)?,
                    inode: self.int(8)?,
                })),
                1 => Ok(ImageRef::Export(ExportRecord {
                    uri: self.string()?,
                    export: self.string()?,
                    size: self.int(8)?,
                    tls: match self.int(1)? {
                        0 => false,
                        1 => true,
                        _ => return Err("tls".into()),
                    },
                })),
                _ => Err("image kind".into()),
            }
        }
    }

    pub fn record(payload: &[u8]) -> Result<Record, String> {
        let mut c = Cursor(payload);
        let job_id = c.id()?;
        let phase = [
            Phase::Copying,
            Phase::Ready,
            Phase::Switched,
            Phase::Completed,
            Phase::Aborted,
            Phase::Resolved,
        ]
        .get(c.int(4)? as usize)
        .copied()
        .ok_or("phase")?;
        let authoritative = match c.int(4)? {
            0 => Side::Source,
            1 => Side::Destination,
            _ => return Err("side".into()),
        };
        let pairs = (0..c.int(8)?)
            .map(|_| {
                Ok(ImagePair {
                    source: c.image()?,
                    destination: c.image()?,
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        let writer_instance = c.id()?;
        let writer_epoch = c.int(8)?;
        let bytes_copied = c.int(8)?;
        let wall_clock_unix_ns = c.int(8)?;
        let extensions = (0..c.int(8)?)
            .map(|_| {
                Ok(Extension {
                    tag: c.int(2)? as u16,
                    data: c.bytes()?,
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        if !c.0.is_empty() {
            return Err("trailing bytes".into());
        }
        Ok(Record {
            job_id,
            phase,
            authoritative,
            pairs,
            writer_instance,
            writer_epoch,
            bytes_copied,
            wall_clock_unix_ns,
            extensions,
        })
    }
}

/// A journal of format 1 (written by an earlier livecopy) is still read,
/// and an engine that takes it over continues it in format 1: same size,
/// format 1 blocks, no seal, the format 1 guarantee (one fault).
#[test]
fn a_format_1_journal_is_read_and_continued_in_format_1() {
    use livecopy::journal::format::{BLOCK_COUNT_V1, FORMAT_V1, JOURNAL_LEN_V1};
    use livecopy::journal::{HeaderV1, Journal, RecordV1};
    use livecopy::storage::SimDisk;
    let journal_analyse = |disk: &SimDisk| livecopy::journal::analyse(disk).expect("analyse");
    let v1: RecordV1 = crate::support::first_record()
        .to_v1()
        .expect("one pair of files");
    let uuid = *b"test-journal-id1";
    let header = payload::encode(&HeaderV1::new(v1.job_id, 1)).expect("header");
    let record = payload::encode(&v1).expect("record");
    let mut image = vec![0u8; JOURNAL_LEN_V1 as usize];
    for position in Position::all(FORMAT_V1) {
        let frame = match position {
            Position::Header { .. } => {
                Frame::of_version(1, Kind::Header, position, uuid, 0, 0, header.clone())
            }
            Position::Slot { slot: 0, .. } => {
                Frame::of_version(1, Kind::Record, position, uuid, 0, 0, record.clone())
            }
            _ => Frame::of_version(1, Kind::EmptySlot, position, uuid, 0, 0, Vec::new()),
        };
        let at = position.offset() as usize;
        image[at..at + BLOCK_SIZE].copy_from_slice(&format::encode(&frame));
    }
    let disk = SimDisk::from_bytes(image);
    let analysis = journal_analyse(&disk);
    assert_eq!(analysis.version, FORMAT_V1);
    assert_eq!(analysis.blocks.len(), BLOCK_COUNT_V1);
    let recovered = analysis.outcome.expect("a format 1 journal recovers");
    assert_eq!(recovered.record.phase, Phase::Copying);
    let mut journal = Journal::resume(disk.clone(), &recovered).expect("resume");
    assert_eq!(journal.version(), FORMAT_V1);
    journal.commit(Phase::Ready, 0).expect("ready");
    journal.commit(Phase::Switched, 0).expect("switched");
    let bytes = disk.live_bytes();
    assert_eq!(bytes.len() as u64, JOURNAL_LEN_V1, "the size never changes");
    for position in Position::all(FORMAT_V1) {
        let at = position.offset() as usize;
        let frame = format::decode(&bytes[at..at + BLOCK_SIZE]).expect("decodes");
        assert_eq!(frame.version, FORMAT_V1, "{position}");
    }
    let again = journal_analyse(&disk).outcome.expect("recovers");
    assert_eq!(
        (again.seq, again.record.authoritative),
        (2, Side::Destination)
    );
}

/// The progress extension (journal-format.md 6.6): extent 16 MiB, image
/// 1 GiB, cursor 512 MiB, extents 3-4 and 20 listed.
const PROGRESS_DATA: &str = "
    01000000 00000001 00000000 00000040
    00000000 00000020 00000000 02000000
    03000000 00000000 02000000 00000000
    14000000 00000000 01000000 00000000
";

#[test]
fn the_progress_extension_matches_its_golden_vector_and_the_spec() {
    use livecopy::journal::progress::{PROGRESS_TAG, Progress};
    let progress = Progress::with_extents(16 << 20, 1 << 30, 512 << 20, [20, 4, 3]);
    let extension = progress.to_extension();
    assert_eq!(extension.tag, PROGRESS_TAG);
    assert_eq!(extension.tag, 1, "optional: bit 15 clear");
    assert_eq!(extension.data, unhex(PROGRESS_DATA));
    assert_eq!(Progress::from_extension(&extension), Ok(progress.clone()));
    // From the spec alone: what a resumed job copies again.
    let data = unhex(PROGRESS_DATA);
    let le = |at: usize, n: usize| {
        data[at..at + n]
            .iter()
            .rev()
            .fold(0u64, |v, b| (v << 8) | u64::from(*b))
    };
    assert_eq!(le(0, 4), 1, "version");
    let (extent, size, cursor, n) = (le(4, 8), le(12, 8), le(20, 8), le(28, 4));
    let mut to_copy = size - cursor;
    for i in 0..n as usize {
        let (first, count) = (le(32 + 16 * i, 8), le(40 + 16 * i, 8));
        to_copy += count * extent;
        assert!(first * extent < cursor);
    }
    assert_eq!(to_copy, 560 << 20);
    assert_eq!(progress.bytes_to_copy(), to_copy);
    // Damaged fields are refused, never half-read.
    for (what, mut bad) in [
        ("version", data.clone()),
        ("run count", data.clone()),
        ("extent size", data.clone()),
        ("cursor", data.clone()),
    ] {
        match what {
            "version" => bad[0] = 2,
            "run count" => bad[28] = 3,
            "extent size" => bad[4] = 1,
            _ => bad[27] = 0x80,
        }
        let damaged = Extension {
            tag: PROGRESS_TAG,
            data: bad,
        };
        assert!(Progress::from_extension(&damaged).is_err(), "{what}");
    }
}

/// More runs than a record holds are joined, never dropped: every extent
/// listed stays listed.
#[test]
fn progress_with_too_many_runs_is_coarsened_not_truncated() {
    use livecopy::journal::progress::{MAX_RUNS, Progress};
    let extents: Vec<u64> = (0..200).map(|i| i * 3 + (i % 7)).collect();
    let progress = Progress::with_extents(4096, 4096 * 1000, 4096 * 1000, extents.clone());
    assert!(progress.runs.len() <= MAX_RUNS);
    assert!(progress.check().is_ok());
    for e in extents {
        assert!(progress.lists(e), "extent {e} dropped");
    }
    let decoded = Progress::from_extension(&progress.to_extension()).expect("decodes");
    assert_eq!(decoded, progress);
}

/// A record whose image names take most of the block still commits its
/// progress: with fewer, wider runs (every extent still listed), or, when
/// not even an empty list fits, with none (a resume copies everything).
/// Never a failed commit, which would stop the engine.
#[test]
fn progress_that_does_not_fit_beside_long_names_is_coarsened_then_dropped() {
    use livecopy::journal::Journal;
    use livecopy::journal::format::JOURNAL_LEN;
    use livecopy::journal::progress::{MAX_RUNS, Progress};
    use livecopy::storage::SimDisk;
    let path = |c: &str| {
        ImageRef::File(ImageRecord {
            path: format!("/{}", c.repeat(1000)),
            size: 1 << 20,
            device: 1,
            inode: if c == "s" { 11 } else { 12 },
        })
    };
    let export = |c: &str, name: usize| {
        ImageRef::Export(ExportRecord {
            uri: format!("nbd://h/{}", c.repeat(1010)),
            export: "e".repeat(name),
            size: 1 << 20,
            tls: false,
        })
    };
    let record = |source, destination| {
        Record::single(
            *b"test-job-0000001",
            Phase::Copying,
            source,
            destination,
            *b"writer-instance1",
            1,
            0,
            0,
        )
    };
    let format = |record| Journal::format(SimDisk::new(JOURNAL_LEN), *b"test-journal-id1", record);
    // The longest export names that still leave room for the record: not
    // a byte to spare for a progress field.
    let name = (0..1024)
        .rev()
        .find(|&n| format(record(export("s", n), export("d", n))).is_ok())
        .expect("some length fits");
    for (source, destination, fits) in [
        (path("s"), path("d"), true),
        (export("s", name), export("d", name), false),
    ] {
        let mut journal = format(record(source, destination)).expect("format");
        let extents: Vec<u64> = (0..MAX_RUNS as u64).map(|i| i * 2).collect();
        let progress = Progress::with_extents(4096, 1 << 20, 1 << 20, extents.clone());
        assert_eq!(progress.runs.len(), MAX_RUNS);
        journal
            .commit_progress(Phase::Copying, 0, Some(&progress))
            .expect("the commit goes through");
        match journal.progress() {
            Some(recorded) => {
                assert!(fits, "progress recorded where none fits?");
                assert!(recorded.runs.len() < MAX_RUNS, "coarsened");
                for e in &extents {
                    assert!(recorded.lists(*e), "extent {e} dropped");
                }
            }
            None => assert!(!fits, "progress dropped though it fits coarsened"),
        }
    }
}
