//! The NBD client storage backend against real servers (qemu-nbd on raw
//! and qcow2 files, qemu-storage-daemon, nbdkit, and our own server) and
//! against a fake server that breaks the protocol in every way a reply
//! can: clear errors, never a panic, never an acknowledgement the server
//! did not give.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use livecopy::nbd::proto::{self, Command as Cmd};
use livecopy::nbd::structured as st;
use livecopy::storage::{NbdOptions, NbdStorage, Storage};

use crate::support::spawning;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 48 * MIB;

use crate::support::unix_address;

/// A server process, killed and reaped when dropped.
pub(crate) struct Server {
    child: Child,
    socket: PathBuf,
}

impl Server {
    pub(crate) fn start(program: &str, args: &[String], socket: &Path) -> Server {
        let child = {
            let _no_journal_changes = spawning();
            Command::new(program)
                .args(args)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap_or_else(|e| panic!("start {program}: {e}"))
        };
        let mut server = Server {
            child,
            socket: socket.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while UnixStream::connect(socket).is_err() {
            if let Some(status) = server.child.try_wait().expect("wait") {
                let mut err = String::new();
                if let Some(mut e) = server.child.stderr.take() {
                    let _ = e.read_to_string(&mut err);
                }
                panic!("{program} exited ({status}): {err}");
            }
            assert!(
                Instant::now() < deadline,
                "{program} did not listen in 30 s"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        server
    }

    /// Stops the server and waits for it, so its image is complete.
    pub(crate) fn stop(mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.child.try_wait().expect("wait").is_none() {
            assert!(Instant::now() < deadline, "the server did not stop");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}

fn s(text: impl AsRef<str>) -> String {
    text.as_ref().to_string()
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Writes, reads, zeroes and flushes through `storage` against a model,
/// at aligned and unaligned offsets; returns the model.
fn exercise(storage: &NbdStorage, what: &str) -> Vec<u8> {
    assert_eq!(storage.len().unwrap(), SIZE, "{what}: size");
    let mut model = vec![0u8; SIZE as usize];
    let mut apply = |offset: u64, data: &[u8]| {
        model[offset as usize..offset as usize + data.len()].copy_from_slice(data);
    };
    let writes: [(u64, usize, bool); 6] = [
        (0, 64 << 10, false),
        (MIB + 512, 3000, false),
        (2 * MIB - 7, 100, true),
        (3 * MIB, (1 << 20) + 4096, false),
        (SIZE - 4096, 4096, true),
        (10 * MIB, 33 << 20, false),
    ];
    for (n, (offset, len, fua)) in writes.into_iter().enumerate() {
        let data = pattern(n as u8 + 1, len);
        if fua {
            storage.write_durable_at(offset, &data)
        } else {
            storage.write_at(offset, &data)
        }
        .unwrap_or_else(|e| panic!("{what}: write {offset}+{len}: {e}"));
        apply(offset, &data);
    }
    storage
        .write_zeroes(MIB, 4096)
        .unwrap_or_else(|e| panic!("{what}: write_zeroes: {e}"));
    apply(MIB, &[0; 4096]);
    storage
        .punch_hole(3 * MIB, 64 << 10)
        .unwrap_or_else(|e| panic!("{what}: punch_hole: {e}"));
    apply(3 * MIB, &[0; 64 << 10]);
    storage
        .punch_hole(2 * MIB - 10, 5)
        .unwrap_or_else(|e| panic!("{what}: unaligned punch: {e}"));
    apply(2 * MIB - 10, &[0; 5]);
    storage
        .sync_data()
        .unwrap_or_else(|e| panic!("{what}: flush: {e}"));
    let mut back = vec![0u8; SIZE as usize];
    storage
        .read_at(0, &mut back)
        .unwrap_or_else(|e| panic!("{what}: read: {e}"));
    assert!(back == model, "{what}: what was read is what was written");
    let mut small = [0u8; 13];
    storage
        .read_at(MIB + 511, &mut small)
        .expect("unaligned read");
    assert_eq!(
        &small[..],
        &model[(MIB + 511) as usize..(MIB + 524) as usize]
    );
    let past = storage.read_at(SIZE - 1, &mut [0u8; 2]);
    assert!(past.is_err(), "{what}: a read past the end");
    model
}

/// The data ranges `next_data` reports over the whole export.
fn data_ranges(storage: &NbdStorage) -> Vec<(u64, u64)> {
    let mut ranges = Vec::new();
    let mut at = 0;
    while let Some(r) = storage.next_data(at).expect("next_data") {
        assert!(
            r.start >= at && r.end > r.start,
            "progress: {r:?} from {at}"
        );
        ranges.push((r.start, r.end));
        at = r.end;
    }
    ranges
}

fn check_file(path: &Path, model: &[u8], what: &str) {
    let on_disk = std::fs::read(path).expect("read the image");
    assert!(on_disk == model, "{what}: the served file holds the writes");
}

#[test]
fn the_client_reads_and_writes_through_qemu_nbd_on_raw_and_qcow2() {
    let dir = tempfile::tempdir().expect("tempdir");
    for format in ["raw", "qcow2"] {
        let image = dir.path().join(format!("disk.{format}"));
        let made = Command::new("qemu-img")
            .args(["create", "-q", "-f", format])
            .arg(&image)
            .arg(SIZE.to_string())
            .status()
            .expect("qemu-img");
        assert!(made.success());
        let socket = dir.path().join(format!("{format}.sock"));
        let server = Server::start(
            "qemu-nbd",
            &[
                s("--socket"),
                s(socket.to_str().unwrap()),
                s("--format"),
                s(format),
                s("--cache=none"),
                s("--aio=threads"),
                s("--export-name=disk0"),
                s(image.to_str().unwrap()),
            ],
            &socket,
        );
        let storage = NbdStorage::connect(&unix_address(&socket, "disk0"), true).expect("connect");
        let info = storage.info();
        assert!(info.structured, "{format}: structured replies");
        assert!(info.allocation.is_some(), "{format}: base:allocation");
        let what = format!("qemu-nbd {format}");
        let model = exercise(&storage, &what);
        let ranges = data_ranges(&storage);
        assert!(
            ranges.iter().any(|&(a, _)| a == 0) && ranges.len() >= 2,
            "{what}: holes between the writes: {ranges:?}"
        );
        for (n, byte) in model.iter().enumerate() {
            if *byte != 0 {
                let n = n as u64;
                assert!(
                    ranges.iter().any(|&(a, b)| a <= n && n < b),
                    "{what}: byte {n} holds data outside every data range {ranges:?}"
                );
            }
        }
        drop(storage);
        server.stop();
        if format == "raw" {
            check_file(&image, &model, &what);
        } else {
            let raw = dir.path().join("converted.raw");
            let converted = Command::new("qemu-img")
                .args(["convert", "-f", "qcow2", "-O", "raw"])
                .arg(&image)
                .arg(&raw)
                .status()
                .expect("qemu-img convert");
            assert!(converted.success());
            check_file(&raw, &model, &what);
        }
    }
}

#[test]
fn the_client_reads_and_writes_through_qemu_storage_daemon() {
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("disk.raw");
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(SIZE))
        .expect("image");
    let socket = dir.path().join("qsd.sock");
    let server = Server::start(
        "qemu-storage-daemon",
        &[
            s("--blockdev"),
            format!(
                "driver=file,node-name=file0,filename={},cache.direct=on",
                image.display()
            ),
            s("--blockdev"),
            s("driver=raw,node-name=disk0,file=file0"),
            s("--nbd-server"),
            format!("addr.type=unix,addr.path={}", socket.display()),
            s("--export"),
            s("type=nbd,id=export0,node-name=disk0,name=disk0,writable=on"),
        ],
        &socket,
    );
    let storage = NbdStorage::connect(&unix_address(&socket, "disk0"), true).expect("connect");
    let info = storage.info();
    assert!(info.flags & proto::TFLAG_CAN_MULTI_CONN != 0, "{info:?}");
    let model = exercise(&storage, "qemu-storage-daemon");
    drop(storage);
    server.stop();
    check_file(&image, &model, "qemu-storage-daemon");
}

#[test]
fn the_client_reads_and_writes_through_nbdkit_and_our_own_server() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("nbdkit.sock");
    let server = Server::start(
        "nbdkit",
        &[
            s("--foreground"),
            s("--exit-with-parent"),
            s("--unix"),
            s(socket.to_str().unwrap()),
            s("memory"),
            SIZE.to_string(),
        ],
        &socket,
    );
    let storage = NbdStorage::connect(&unix_address(&socket, ""), true).expect("connect");
    exercise(&storage, "nbdkit memory");
    drop(storage);
    drop(server);

    // Our own server: structured replies and block status, both ends
    // sharing the codec.
    let image = dir.path().join("ours.img");
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(SIZE))
        .expect("image");
    let ours = dir.path().join("ours.sock");
    let device = livecopy::export::ImageDevice::new(
        livecopy::storage::FileStorage::open_image(&image, true).expect("open"),
        SIZE,
    )
    .expect("device");
    let handle = livecopy::nbd::bind_unix(&ours, std::sync::Arc::new(device), "")
        .expect("bind")
        .spawn();
    let storage = NbdStorage::connect(&unix_address(&ours, ""), true).expect("connect");
    let info = storage.info();
    assert!(info.structured && info.allocation.is_some(), "{info:?}");
    assert!(info.flags & proto::TFLAG_CAN_MULTI_CONN != 0, "{info:?}");
    let model = exercise(&storage, "copyctl's server");
    // The export's data ranges are the image's, as SEEK_DATA sees them.
    let file = livecopy::storage::FileStorage::open_image(&image, false).expect("open");
    let mut seek = Vec::new();
    let mut at = 0;
    while let Some(r) = file.next_data(at).expect("SEEK_DATA") {
        seek.push((r.start, r.end));
        at = r.end;
    }
    assert!(seek.len() >= 2, "holes between the writes: {seek:?}");
    assert_eq!(
        data_ranges(&storage),
        seek,
        "block status against SEEK_DATA"
    );
    drop(storage);
    handle.shutdown().expect("shutdown");
    check_file(&image, &model, "copyctl's server");
}

/// nbdkit's error filter fails every write with EIO: the client reports
/// each failure as an error, never as success, and the connection stays
/// usable for the next request. (nbdkit 1.32's filter cannot fail a
/// flush; the fake server below does.)
#[test]
fn server_errors_are_errors_and_never_acknowledgements() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("nbdkit.sock");
    let _server = Server::start(
        "nbdkit",
        &[
            s("--foreground"),
            s("--exit-with-parent"),
            s("--unix"),
            s(socket.to_str().unwrap()),
            s("--filter=error"),
            s("memory"),
            SIZE.to_string(),
            s("error-pwrite=EIO"),
            s("error-pwrite-rate=1"),
        ],
        &socket,
    );
    let storage = NbdStorage::connect(&unix_address(&socket, ""), true).expect("connect");
    let write = storage.write_at(0, &[1; 4096]).expect_err("a failed write");
    assert_eq!(write.raw_os_error(), Some(5), "{write}");
    let durable = storage
        .write_durable_at(4096, &[1; 4096])
        .expect_err("a failed FUA write");
    assert_eq!(durable.raw_os_error(), Some(5), "{durable}");
    let mut back = [9u8; 4096];
    storage.read_at(0, &mut back).expect("reads still work");
    assert_eq!(back, [0u8; 4096], "the failed write changed nothing");
}

#[test]
fn refusals_at_connect_name_the_cause() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("nbdkit.sock");
    let _server = Server::start(
        "nbdkit",
        &[
            s("--foreground"),
            s("--exit-with-parent"),
            s("--readonly"),
            s("--unix"),
            s(socket.to_str().unwrap()),
            s("memory"),
            SIZE.to_string(),
        ],
        &socket,
    );
    let read_only = NbdStorage::connect(&unix_address(&socket, ""), true)
        .expect_err("a read-only export for writing");
    assert!(read_only.to_string().contains("read-only"), "{read_only}");
    NbdStorage::connect(&unix_address(&socket, ""), false).expect("for reading");
    let missing = NbdStorage::connect(&unix_address(&dir.path().join("none.sock"), ""), true)
        .expect_err("no server");
    assert!(
        missing.describe().contains("none.sock"),
        "{}",
        missing.describe()
    );
}

// ---------------------------------------------------------------- a fake server

/// What the fake server does after the handshake.
type Script = fn(&mut UnixStream, proto::Request);

/// A one-connection server that negotiates (structured replies only if
/// `structured`), then runs `script` on the first request.
fn fake(dir: &Path, name: &str, structured: bool, script: Script) -> PathBuf {
    let socket = dir.join(format!("{name}.sock"));
    let listener = UnixListener::bind(&socket).expect("bind");
    std::thread::spawn(move || {
        let Ok((mut c, _)) = listener.accept() else {
            return;
        };
        let _ = negotiate(&mut c, structured);
        let mut header = [0u8; proto::REQUEST_LEN];
        if c.read_exact(&mut header).is_err() {
            return;
        }
        let request = proto::parse_request(&header).expect("request");
        if request.command == Cmd::Write {
            let mut payload = vec![0u8; request.length as usize];
            let _ = c.read_exact(&mut payload);
        }
        script(&mut c, request);
        // Keep the socket open a while: the client must not wait for EOF
        // to decide.
        std::thread::sleep(Duration::from_millis(300));
    });
    socket
}

fn negotiate(c: &mut UnixStream, structured: bool) -> std::io::Result<()> {
    c.write_all(&proto::encode_greeting())?;
    let mut flags = [0u8; 4];
    c.read_exact(&mut flags)?;
    loop {
        let header = proto::parse_option_header(&proto::read_array(c)?).expect("option");
        let mut data = vec![0u8; header.length as usize];
        c.read_exact(&mut data)?;
        match header.option {
            proto::OPT_STRUCTURED_REPLY if structured => {
                c.write_all(&proto::encode_option_reply(
                    header.option,
                    proto::REP_ACK,
                    &[],
                ))?;
            }
            proto::OPT_GO => {
                let flags = proto::TFLAG_HAS_FLAGS
                    | proto::TFLAG_SEND_FLUSH
                    | proto::TFLAG_SEND_FUA
                    | proto::TFLAG_SEND_WRITE_ZEROES;
                let info = proto::encode_info_export(SIZE, flags);
                c.write_all(&proto::encode_option_reply(
                    header.option,
                    proto::REP_INFO,
                    &info,
                ))?;
                c.write_all(&proto::encode_option_reply(
                    header.option,
                    proto::REP_ACK,
                    &[],
                ))?;
                return Ok(());
            }
            other => {
                c.write_all(&proto::encode_option_reply(
                    other,
                    proto::REP_ERR_UNSUP,
                    &[],
                ))?;
            }
        }
    }
}

fn chunk(c: &mut UnixStream, handle: u64, flags: u16, kind: u16, payload: &[u8]) {
    let header = st::encode_chunk_header(&st::ChunkHeader {
        flags,
        kind,
        handle,
        length: payload.len() as u32,
    });
    let _ = c.write_all(&header);
    let _ = c.write_all(payload);
}

// NBD is big-endian on the wire.
#[allow(clippy::big_endian_bytes)]
fn data_chunk(offset: u64, data: &[u8]) -> Vec<u8> {
    let mut out = offset.to_be_bytes().to_vec();
    out.extend_from_slice(data);
    out
}

#[derive(Clone, Copy)]
enum Op {
    Read,
    Write,
    Flush,
}

/// Every way a reply can be wrong, and what the client must say.
#[test]
fn a_fake_server_breaking_the_protocol_gets_errors_never_success() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cases: [(&str, bool, Op, Script); 11] = [
        ("unknown-handle", false, Op::Write, |c, r| {
            let _ = c.write_all(&proto::encode_simple_reply(0, r.handle + 1));
        }),
        ("bad-magic", false, Op::Write, |c, _| {
            let _ = c.write_all(&[0xde, 0xad, 0xbe, 0xef, 0, 0, 0, 0]);
        }),
        ("short-simple-read", false, Op::Read, |c, r| {
            let _ = c.write_all(&proto::encode_simple_reply(0, r.handle));
            let _ = c.write_all(&[1u8; 100]);
        }),
        ("unnegotiated-structured", false, Op::Read, |c, r| {
            chunk(c, r.handle, st::REPLY_FLAG_DONE, st::REPLY_TYPE_NONE, &[]);
        }),
        ("read-covered-in-part", true, Op::Read, |c, r| {
            let payload = data_chunk(r.offset, &[7u8; 512]);
            chunk(
                c,
                r.handle,
                st::REPLY_FLAG_DONE,
                st::REPLY_TYPE_OFFSET_DATA,
                &payload,
            );
        }),
        ("read-chunk-outside", true, Op::Read, |c, r| {
            let payload = data_chunk(r.offset + 4096, &[7u8; 4096]);
            chunk(
                c,
                r.handle,
                st::REPLY_FLAG_DONE,
                st::REPLY_TYPE_OFFSET_DATA,
                &payload,
            );
        }),
        ("overlapping-chunks", true, Op::Read, |c, r| {
            let payload = data_chunk(r.offset, &[7u8; 4096]);
            chunk(c, r.handle, 0, st::REPLY_TYPE_OFFSET_DATA, &payload);
            chunk(
                c,
                r.handle,
                st::REPLY_FLAG_DONE,
                st::REPLY_TYPE_OFFSET_DATA,
                &payload,
            );
        }),
        ("oversized-chunk", true, Op::Read, |c, r| {
            let header = st::encode_chunk_header(&st::ChunkHeader {
                flags: st::REPLY_FLAG_DONE,
                kind: st::REPLY_TYPE_OFFSET_DATA,
                handle: r.handle,
                length: u32::MAX,
            });
            let _ = c.write_all(&header);
        }),
        ("unknown-chunk-type", true, Op::Write, |c, r| {
            chunk(c, r.handle, st::REPLY_FLAG_DONE, 77, &[1, 2, 3]);
        }),
        ("error-chunk", true, Op::Write, |c, r| {
            let error = st::encode_error_chunk(proto::ENOSPC, "full");
            chunk(
                c,
                r.handle,
                st::REPLY_FLAG_DONE,
                st::REPLY_TYPE_ERROR,
                &error,
            );
        }),
        ("flush-eio", false, Op::Flush, |c, r| {
            assert_eq!(r.command, Cmd::Flush);
            let _ = c.write_all(&proto::encode_simple_reply(proto::EIO, r.handle));
        }),
    ];
    for (name, structured, op, script) in cases {
        let socket = fake(dir.path(), name, structured, script);
        let storage = NbdStorage::connect(&unix_address(&socket, ""), true)
            .unwrap_or_else(|e| panic!("{name}: connect: {e}"));
        let started = Instant::now();
        let outcome = match op {
            Op::Read => storage.read_at(0, &mut [0u8; 4096]),
            Op::Write => storage.write_at(0, &[5u8; 4096]),
            Op::Flush => storage.sync_data(),
        };
        let error = outcome.expect_err(name);
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{name}: the client waited for the server to hang up"
        );
        if name == "error-chunk" {
            assert_eq!(
                error.kind(),
                std::io::ErrorKind::StorageFull,
                "{name}: {error}"
            );
            assert!(
                error.to_string().contains("full"),
                "the server's message: {error}"
            );
        } else if name == "flush-eio" {
            assert_eq!(error.raw_os_error(), Some(5), "{name}: {error}");
        } else {
            let again = storage.sync_data().expect_err("the connection is gone");
            assert!(
                again.to_string().contains("lost"),
                "{name}: a later request fails at once: {again}"
            );
        }
    }
}

// ------------------------------------------------- reconnect after the switch

const SMALL: u64 = 8 * MIB;
/// Long enough for a server restart on a loaded machine; the tests that
/// restart finish as soon as the server is back, not after it.
const BUDGET: Duration = Duration::from_secs(20);

fn with_reconnect(delay: Option<Duration>, connections: usize) -> NbdOptions {
    NbdOptions {
        reconnect_delay: delay,
        connections,
        tls_creds: None,
    }
}

fn image_file(dir: &Path, name: &str, size: u64) -> PathBuf {
    let image = dir.join(name);
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(size))
        .expect("image");
    image
}

/// qemu-nbd serving `image` as "disk0"; `--persistent` so that it outlives
/// our connections.
fn qemu_nbd(image: &Path, socket: &Path) -> Server {
    let _ = std::fs::remove_file(socket);
    Server::start(
        "qemu-nbd",
        &[
            s("--socket"),
            s(socket.to_str().unwrap()),
            s("--format=raw"),
            s("--persistent"),
            s("--export-name=disk0"),
            s(image.to_str().unwrap()),
        ],
        socket,
    )
}

/// Polls `done` until it holds or `limit` passes.
fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "{what} within {limit:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Joins a request thread, failing the test instead of hanging.
fn join<T>(what: &str, handle: std::thread::ScopedJoinHandle<'_, T>) -> T {
    wait_for(what, Duration::from_secs(60), || handle.is_finished());
    handle.join().expect("the request thread panicked")
}

fn holds(image: &Path, offset: u64, data: &[u8]) -> bool {
    let bytes = std::fs::read(image).expect("read the image");
    &bytes[offset as usize..offset as usize + data.len()] == data
}

/// SIGKILL, and the socket file gone: what a crashed server leaves.
fn kill(server: Server) {
    drop(server);
}

#[test]
fn after_only_copy_requests_wait_for_a_restarted_server_and_succeed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let image = image_file(dir.path(), "disk.raw", SMALL);
    let socket = dir.path().join("nbd.sock");
    let address = unix_address(&socket, "disk0");
    let server = qemu_nbd(&image, &socket);
    let storage =
        NbdStorage::connect_with(&address, true, with_reconnect(Some(BUDGET), 4)).expect("connect");
    let a = pattern(1, 64 << 10);
    storage.write_at(0, &a).expect("write A");
    storage.sync_data().expect("flush A");
    storage.only_copy();

    // A write arriving while the server is down waits for it.
    kill(server);
    let b = pattern(2, 64 << 10);
    let server = std::thread::scope(|scope| {
        let write = scope.spawn(|| storage.write_at(MIB, &b));
        wait_for("the write is waiting", Duration::from_secs(10), || {
            storage.in_flight() == 1
        });
        assert!(!write.is_finished(), "the write waits for the server");
        let server = qemu_nbd(&image, &socket);
        join("the write", write).expect("the write, after the restart");
        server
    });
    storage.sync_data().expect("flush B");

    // So does a flush; with nothing unflushed on the lost connection (C
    // went with FUA) it vouches for every write before it.
    let c = pattern(3, 4096);
    storage.write_durable_at(2 * MIB, &c).expect("FUA write C");
    kill(server);
    let server = std::thread::scope(|scope| {
        let flush = scope.spawn(|| storage.sync_data());
        wait_for("the flush is waiting", Duration::from_secs(10), || {
            storage.in_flight() == 1
        });
        assert!(!flush.is_finished(), "the flush waits for the server");
        let server = qemu_nbd(&image, &socket);
        join("the flush", flush).expect("the flush, after the restart");
        server
    });

    // A write acknowledged by the lost connection and never flushed may be
    // gone with its server: the next flush says so once, then flushes
    // vouch again for what follows.
    let d = pattern(4, 4096);
    storage.write_at(3 * MIB, &d).expect("write D");
    kill(server);
    let server = qemu_nbd(&image, &socket);
    let doubt = storage.sync_data().expect_err("a flush cannot vouch for D");
    assert!(
        doubt.to_string().contains("os error 5") && doubt.to_string().contains("lost"),
        "{doubt}"
    );
    storage.write_at(3 * MIB, &d).expect("write D again");
    storage.sync_data().expect("the next flush vouches again");

    drop(storage);
    server.stop();
    for (offset, data, name) in [
        (0, &a, "A"),
        (MIB, &b, "B"),
        (2 * MIB, &c, "C"),
        (3 * MIB, &d, "D"),
    ] {
        assert!(holds(&image, offset, data), "{name} is in the file");
    }
}

#[test]
fn a_request_in_flight_when_the_server_dies_is_sent_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let image = image_file(dir.path(), "disk.raw", SMALL);
    let socket = dir.path().join("nbdkit.sock");
    let control = dir.path().join("pause.sock");
    let nbdkit = |image: &Path| {
        let _ = std::fs::remove_file(&socket);
        let _ = std::fs::remove_file(&control);
        Server::start(
            "nbdkit",
            &[
                s("--foreground"),
                s("--exit-with-parent"),
                s("--unix"),
                s(socket.to_str().unwrap()),
                s("--filter=pause"),
                s("file"),
                s(image.to_str().unwrap()),
                format!("pause-control={}", control.display()),
            ],
            &socket,
        )
    };
    let server = nbdkit(&image);
    let storage = NbdStorage::connect_with(
        &unix_address(&socket, ""),
        true,
        with_reconnect(Some(BUDGET), 1),
    )
    .expect("connect");
    storage.only_copy();
    // From here on nbdkit takes requests and never answers them.
    let mut pause = UnixStream::connect(&control).expect("pause control");
    pause.write_all(b"p").expect("pause");
    let mut ack = [0u8; 1];
    pause.read_exact(&mut ack).expect("paused");
    assert_eq!(&ack, b"P");

    // (The pause filter holds reads and writes, not flushes: a flush
    // waiting for a server is tested with qemu-nbd above.)
    let e = pattern(5, 64 << 10);
    let server = std::thread::scope(|scope| {
        let write = scope.spawn(|| storage.write_at(MIB, &e));
        wait_for("the write is sent", Duration::from_secs(10), || {
            storage.in_flight() == 1
        });
        assert!(!write.is_finished(), "the paused server does not answer");
        kill(server);
        let server = nbdkit(&image);
        join("the write", write).expect("the write, re-sent");
        server
    });
    storage.sync_data().expect("flush");
    drop(storage);
    server.stop();
    assert!(holds(&image, MIB, &e), "the re-sent write is in the file");
}

#[test]
fn before_only_copy_or_without_a_budget_a_dropped_server_fails_requests_at_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let image = image_file(dir.path(), "disk.raw", SMALL);
    let socket = dir.path().join("nbd.sock");
    let address = unix_address(&socket, "disk0");
    for (delay, only_copy) in [(Some(BUDGET), false), (None, true)] {
        let what = format!("reconnect delay {delay:?}, only_copy {only_copy}");
        let server = qemu_nbd(&image, &socket);
        let storage =
            NbdStorage::connect_with(&address, true, with_reconnect(delay, 1)).expect("connect");
        storage.write_at(0, &[1; 4096]).expect("write");
        if only_copy {
            storage.only_copy();
        }
        kill(server);
        let _back = qemu_nbd(&image, &socket);
        for attempt in ["first", "later"] {
            let started = Instant::now();
            let error = storage
                .write_at(4096, &[2; 4096])
                .expect_err("the connection is gone");
            assert!(
                started.elapsed() < Duration::from_secs(2),
                "{what}: the {attempt} request failed at once, not after {:?}",
                started.elapsed()
            );
            assert!(error.to_string().contains("lost"), "{what}: {error}");
        }
    }
}

#[test]
fn when_the_budget_runs_out_requests_fail_with_eio_and_later_ones_fail_fast() {
    let dir = tempfile::tempdir().expect("tempdir");
    let image = image_file(dir.path(), "disk.raw", SMALL);
    let socket = dir.path().join("nbd.sock");
    let budget = Duration::from_millis(1500);
    let server = qemu_nbd(&image, &socket);
    let storage = NbdStorage::connect_with(
        &unix_address(&socket, "disk0"),
        true,
        with_reconnect(Some(budget), 1),
    )
    .expect("connect");
    storage.write_at(0, &[1; 4096]).expect("write");
    storage.sync_data().expect("flush");
    storage.only_copy();
    kill(server);
    // Each waiting request fails after about the budget, not before: one
    // of them reconnects, the others wait for it.
    let outcomes: Vec<(std::io::Error, Duration)> = std::thread::scope(|scope| {
        let storage = &storage;
        let waiting: Vec<_> = (0..3u64)
            .map(|n| {
                scope.spawn(move || {
                    let started = Instant::now();
                    let error = storage
                        .write_at(n * 4096, &[3; 4096])
                        .expect_err("no server");
                    (error, started.elapsed())
                })
            })
            .collect();
        waiting
            .into_iter()
            .map(|w| join("a waiting write", w))
            .collect()
    });
    for (error, waited) in outcomes {
        assert!(
            waited >= budget - Duration::from_millis(300)
                && waited < budget + Duration::from_secs(3),
            "a waiting request failed after {waited:?}, the budget being {budget:?}"
        );
        let text = error.to_string();
        assert!(
            text.contains("os error 5") && text.contains("reconnect delay"),
            "{text}"
        );
    }
    for _ in 0..3 {
        let started = Instant::now();
        let error = storage.read_at(0, &mut [0; 4096]).expect_err("no server");
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "a request after the budget failed at once, not after {:?}",
            started.elapsed()
        );
        assert!(error.to_string().contains("os error 5"), "{error}");
    }
    // A server back late is still picked up by a later request.
    let _server = qemu_nbd(&image, &socket);
    wait_for("a request reconnects", Duration::from_secs(10), || {
        storage.write_at(8192, &[4; 4096]).is_ok()
    });
    storage.sync_data().expect("flush after the late reconnect");
}

#[test]
fn a_server_back_with_another_export_size_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let image = image_file(dir.path(), "disk.raw", SMALL);
    let other = image_file(dir.path(), "other.raw", 2 * SMALL);
    let socket = dir.path().join("nbd.sock");
    let budget = Duration::from_secs(2);
    let server = qemu_nbd(&image, &socket);
    let storage = NbdStorage::connect_with(
        &unix_address(&socket, "disk0"),
        true,
        with_reconnect(Some(budget), 1),
    )
    .expect("connect");
    storage.only_copy();
    kill(server);
    let _impostor = qemu_nbd(&other, &socket);
    let error = storage.write_at(0, &[7; 4096]).expect_err("another export");
    let text = error.to_string();
    assert!(text.contains("export changed"), "{text}");
    assert!(
        std::fs::read(&other).expect("read").iter().all(|&b| b == 0),
        "nothing reached the other export"
    );
}

/// A server that breaks the protocol is not reconnected to, budget or not.
#[test]
fn a_protocol_violation_is_never_reconnected() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = fake(dir.path(), "violation", false, |c, r| {
        let _ = c.write_all(&proto::encode_simple_reply(0, r.handle + 1));
    });
    let storage = NbdStorage::connect_with(
        &unix_address(&socket, ""),
        true,
        with_reconnect(Some(BUDGET), 1),
    )
    .expect("connect");
    storage.only_copy();
    for attempt in ["the request", "a later request"] {
        let started = Instant::now();
        let error = storage.write_at(0, &[5; 4096]).expect_err(attempt);
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{attempt} failed at once, not after {:?}",
            started.elapsed()
        );
        assert!(
            error.to_string().contains("unknown handle"),
            "{attempt}: {error}"
        );
    }
}

// ----------------------------------------------------------- multi-conn pool

/// qemu-storage-daemon's writable export advertises multi-conn: several
/// connections carry the writes of several threads, and one FLUSH on one
/// of them covers them all.
#[test]
fn a_pool_over_qemu_storage_daemon_spreads_requests_and_one_flush_covers_all() {
    let dir = tempfile::tempdir().expect("tempdir");
    let image = image_file(dir.path(), "disk.raw", SIZE);
    let socket = dir.path().join("qsd.sock");
    let server = Server::start(
        "qemu-storage-daemon",
        &[
            s("--blockdev"),
            format!("driver=file,node-name=file0,filename={}", image.display()),
            s("--blockdev"),
            s("driver=raw,node-name=disk0,file=file0"),
            s("--nbd-server"),
            format!("addr.type=unix,addr.path={}", socket.display()),
            s("--export"),
            s("type=nbd,id=export0,node-name=disk0,name=disk0,writable=on"),
        ],
        &socket,
    );
    let storage = NbdStorage::connect_with(
        &unix_address(&socket, "disk0"),
        true,
        with_reconnect(None, 4),
    )
    .expect("connect");
    assert_eq!(storage.connections(), 4, "the server allows multi-conn");
    const THREADS: u64 = 6;
    const BLOCKS: u64 = 32;
    const BLOCK: u64 = 64 << 10;
    let mut model = vec![0u8; SIZE as usize];
    std::thread::scope(|scope| {
        for t in 0..THREADS {
            let storage = &storage;
            scope.spawn(move || {
                for b in 0..BLOCKS {
                    let offset = (b * THREADS + t) * BLOCK;
                    let data = pattern((t * BLOCKS + b) as u8, BLOCK as usize);
                    storage.write_at(offset, &data).expect("write");
                }
            });
        }
    });
    for t in 0..THREADS {
        for b in 0..BLOCKS {
            let offset = ((b * THREADS + t) * BLOCK) as usize;
            model[offset..offset + BLOCK as usize]
                .copy_from_slice(&pattern((t * BLOCKS + b) as u8, BLOCK as usize));
        }
    }
    storage.sync_data().expect("one flush");
    let used = storage.requests_per_connection();
    assert!(
        used.iter().filter(|&&n| n > 0).count() > 1,
        "more than one connection carried requests: {used:?}"
    );
    drop(storage);
    server.stop();
    check_file(&image, &model, "the pool's writes");
}
