//! What NBD clients see of the export beyond reads and writes: holes and
//! data through structured replies and `base:allocation` (real clients:
//! nbdinfo, qemu-img map and convert, nbdcopy), a flush on one connection
//! covering another's writes (multi-conn), block sizes from the images.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use livecopy::engine::{Config, Job, StepOutcome};
use livecopy::journal::Journal;
use livecopy::journal::format::JOURNAL_LEN;
use livecopy::nbd::bind_unix;
use livecopy::storage::NbdStorage;
use livecopy::storage::{FileStorage, SimDisk, Storage};

use crate::serve::{KIB, Layout, MIB, TOOL_TIMEOUT, path_str, tool};
use crate::support::{UUID, first_record, unix_address};

const SIZE: u64 = 64 * MIB;

/// Data ranges `(start, end)` of a storage, by `next_data`.
fn data_ranges(storage: &impl Storage) -> Vec<(u64, u64)> {
    let mut ranges = Vec::new();
    let mut at = 0;
    while let Some(r) = storage.next_data(at).expect("next_data") {
        assert!(r.start >= at && r.end > r.start, "{r:?} from {at}");
        ranges.push((r.start, r.end));
        at = r.end;
    }
    ranges
}

fn file_ranges(path: &Path) -> Vec<(u64, u64)> {
    data_ranges(&FileStorage::open_image(path, false).expect("open"))
}

/// The data ranges in `nbdinfo --map --json`'s answer, checking that every
/// other extent is a hole that reads as zeros and that they tile the disk.
fn nbdinfo_map(url: &str) -> Vec<(u64, u64)> {
    let out = tool("nbdinfo", ["--map", "--json", url], TOOL_TIMEOUT);
    assert_eq!(out.code, 0, "{}", out.text());
    let map: Value = serde_json::from_str(&out.stdout).expect("nbdinfo's JSON");
    let mut at = 0;
    let mut data: Vec<(u64, u64)> = Vec::new();
    for e in map.as_array().expect("an array") {
        let (offset, length) = (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap());
        assert_eq!(offset, at, "extents tile the disk: {map}");
        match e["type"].as_u64().unwrap() {
            0 => match data.last_mut() {
                Some(last) if last.1 == offset => last.1 += length,
                _ => data.push((offset, offset + length)),
            },
            3 => {}
            other => panic!("extent type {other} (not data, not hole+zero): {map}"),
        }
        at += length;
    }
    assert_eq!(at, SIZE, "{map}");
    data
}

/// The data ranges in `qemu-img map`'s answer.
fn qemu_img_map(url: &str) -> Vec<(u64, u64)> {
    let out = tool(
        "qemu-img",
        ["map", "--output=json", "-f", "raw", url],
        TOOL_TIMEOUT,
    );
    assert_eq!(out.code, 0, "{}", out.text());
    let map: Value = serde_json::from_str(&out.stdout).expect("qemu-img's JSON");
    let mut data: Vec<(u64, u64)> = Vec::new();
    for e in map.as_array().expect("an array") {
        let (start, length) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
        assert_eq!(e["zero"] == true, e["data"] == false, "{e}");
        if e["data"] == true {
            match data.last_mut() {
                Some(last) if last.1 == start => last.1 += length,
                _ => data.push((start, start + length)),
            }
        }
    }
    data
}

/// Bytes a file holds on disk.
fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).expect("stat").blocks() * 512
}

/// A source of `SIZE` bytes with data at a few places and holes elsewhere.
fn sparse_layout() -> Layout {
    let layout = Layout::with_source(&[]);
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&layout.source)
        .expect("source");
    file.set_len(SIZE).expect("size");
    use std::os::unix::fs::FileExt;
    for (offset, len, byte) in [
        (0, 64 * KIB, 1u8),
        (8 * MIB, 4 * KIB, 2),
        (33 * MIB, 3 * MIB, 3),
    ] {
        file.write_all_at(&vec![byte; len as usize], offset)
            .expect("data");
    }
    file.sync_all().expect("sync");
    layout
}

/// `copyctl serve` of a sparse image: nbdinfo and qemu-img map the export
/// as SEEK_DATA maps the image answering reads (the source, then the
/// destination after the switch), and nbdcopy and qemu-img convert copy
/// it allocating only the data.
#[test]
fn nbd_clients_see_the_images_holes_through_the_export() {
    let layout = sparse_layout();
    let source = file_ranges(&layout.source);
    assert_eq!(source.len(), 3, "{source:?}");
    let data: u64 = source.iter().map(|(a, b)| b - a).sum();
    let mut serve = layout.serve("", &[]);
    let url = serve.url();
    serve.control().wait_phase("ready", Duration::from_secs(60));
    assert_eq!(nbdinfo_map(&url), source, "nbdinfo --map against SEEK_DATA");
    assert_eq!(qemu_img_map(&url), source, "qemu-img map against SEEK_DATA");

    let copied = layout.path("nbdcopy.img");
    let out = tool("nbdcopy", [url.as_str(), path_str(&copied)], TOOL_TIMEOUT);
    assert_eq!(out.code, 0, "{}", out.text());
    let converted = layout.path("convert.img");
    let out = tool(
        "qemu-img",
        [
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            url.as_str(),
            path_str(&converted),
        ],
        TOOL_TIMEOUT,
    );
    assert_eq!(out.code, 0, "{}", out.text());
    let want = std::fs::read(&layout.source).expect("source");
    for copy in [&copied, &converted] {
        assert!(
            std::fs::read(copy).expect("copy") == want,
            "{copy:?} differs"
        );
        let held = allocated(copy);
        println!(
            "{}: {held} bytes allocated for {data} of data",
            copy.display()
        );
        assert!(held <= data + 64 * KIB, "{copy:?} holds {held} bytes");
    }

    let reply = serve.control().request("switch");
    assert_eq!(reply["ok"], true, "{reply}");
    let dest = file_ranges(&layout.dest);
    assert_eq!(
        nbdinfo_map(&url),
        dest,
        "after the switch: the destination's"
    );
    serve.kill();
}

/// The export advertises multi-conn: a write acknowledged on one
/// connection and a flush on another leave the write durable on both
/// images (a power loss right after the flush keeps it).
#[test]
fn a_flush_on_one_connection_covers_another_connections_writes() {
    let size = 4 * MIB;
    let image: Vec<u8> = (0..size).map(|i| (i / 4096) as u8).collect();
    let source = SimDisk::from_bytes(image);
    let destination = SimDisk::new(size);
    let journal = Journal::format(SimDisk::new(JOURNAL_LEN), UUID, first_record()).expect("format");
    let config = Config {
        granularity: 64 * KIB,
        chunk_size: 64 * KIB,
        ..Config::default()
    };
    let job = Job::new(journal, source.clone(), destination.clone(), config).expect("job");
    while job.copy_step().expect("copy") != StepOutcome::Done {}
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("nbd.sock");
    let server = bind_unix(&socket, Arc::new(job.guest()), "")
        .expect("bind")
        .spawn();
    let writer = NbdStorage::connect(&unix_address(&socket, ""), true).expect("first connection");
    let flusher = NbdStorage::connect(&unix_address(&socket, ""), true).expect("second connection");
    assert!(writer.info().flags & livecopy::nbd::proto::TFLAG_CAN_MULTI_CONN != 0);
    let mut cases = 0;
    for (n, offset) in [0u64, 5 * 4096 + 17, size - 4096].into_iter().enumerate() {
        let data = vec![0xa0 + n as u8; 4096.min((size - offset) as usize)];
        writer.write_at(offset, &data).expect("write");
        flusher.sync_data().expect("flush on the other connection");
        for (name, disk) in [("source", &source), ("destination", &destination)] {
            let durable = disk.durable_bytes();
            let at = offset as usize;
            assert!(
                durable[at..at + data.len()] == data[..],
                "{name}: the write at {offset} is not durable after the other connection's flush"
            );
        }
        cases += 1;
    }
    println!("{cases} writes made durable by another connection's flush");
    drop((writer, flusher));
    server.shutdown().expect("shutdown");
}
