//! The NBD server against the real QEMU 10 clients (qemu-io, qemu-img) and
//! against a raw client that breaks the protocol on purpose.

use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use livecopy::nbd::proto::{self, Request};
use livecopy::nbd::structured as st;
use livecopy::nbd::{ExportDevice, ServerHandle, bind_tcp, bind_unix};
use livecopy::storage::{FileStorage, Storage};

// ---------------------------------------------------------------- devices

/// One device call, as the test devices record it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Op {
    Read {
        offset: u64,
        len: u64,
    },
    Write {
        offset: u64,
        len: u64,
        fua: bool,
    },
    Zeroes {
        offset: u64,
        len: u64,
        fua: bool,
    },
    Trim {
        offset: u64,
        len: u64,
    },
    Flush,
    /// A write's device call returned (recorded after its delay).
    WriteDone {
        offset: u64,
    },
}

/// An in-memory export that records every call.
pub(crate) struct MemDevice {
    data: Mutex<Vec<u8>>,
    log: Mutex<Vec<Op>>,
    flushes: AtomicU64,
    fua_writes: AtomicU64,
    /// Milliseconds each write takes.
    write_delay_ms: AtomicU64,
    /// Milliseconds each read takes.
    read_delay_ms: AtomicU64,
    /// Device calls running now, and the most seen at once.
    running: AtomicUsize,
    max_running: AtomicUsize,
    /// When set, writes fail with this raw OS error.
    fail_writes: Mutex<Option<i32>>,
}

impl MemDevice {
    pub(crate) fn new(size: usize) -> Arc<MemDevice> {
        Arc::new(MemDevice {
            data: Mutex::new(vec![0; size]),
            log: Mutex::new(Vec::new()),
            flushes: AtomicU64::new(0),
            fua_writes: AtomicU64::new(0),
            write_delay_ms: AtomicU64::new(0),
            read_delay_ms: AtomicU64::new(0),
            running: AtomicUsize::new(0),
            max_running: AtomicUsize::new(0),
            fail_writes: Mutex::new(None),
        })
    }

    fn log(&self) -> Vec<Op> {
        self.log.lock().unwrap().clone()
    }

    fn record(&self, op: Op) {
        self.log.lock().unwrap().push(op);
    }

    pub(crate) fn bytes(&self, offset: usize, len: usize) -> Vec<u8> {
        self.data.lock().unwrap()[offset..offset + len].to_vec()
    }

    fn fill(&self, byte: u8) {
        self.data.lock().unwrap().fill(byte);
    }

    fn busy(&self, delay: &AtomicU64) -> impl Drop + '_ {
        struct Busy<'a>(&'a AtomicUsize);
        impl Drop for Busy<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::SeqCst);
            }
        }
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_running.fetch_max(now, Ordering::SeqCst);
        let ms = delay.load(Ordering::SeqCst);
        if ms > 0 {
            std::thread::sleep(Duration::from_millis(ms));
        }
        Busy(&self.running)
    }
}

fn range(offset: u64, len: u64) -> std::ops::Range<usize> {
    offset as usize..(offset + len) as usize
}

impl ExportDevice for MemDevice {
    fn size(&self) -> u64 {
        self.data.lock().unwrap().len() as u64
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> livecopy::Result<()> {
        self.record(Op::Read {
            offset,
            len: buf.len() as u64,
        });
        let _busy = self.busy(&self.read_delay_ms);
        buf.copy_from_slice(&self.data.lock().unwrap()[range(offset, buf.len() as u64)]);
        Ok(())
    }
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> livecopy::Result<()> {
        self.record(Op::Write {
            offset,
            len: data.len() as u64,
            fua,
        });
        if let Some(errno) = *self.fail_writes.lock().unwrap() {
            return Err(livecopy::Error::io(
                "pwrite",
                io::Error::from_raw_os_error(errno),
            ));
        }
        let busy = self.busy(&self.write_delay_ms);
        self.data.lock().unwrap()[range(offset, data.len() as u64)].copy_from_slice(data);
        if fua {
            self.fua_writes.fetch_add(1, Ordering::SeqCst);
        }
        drop(busy);
        self.record(Op::WriteDone { offset });
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> livecopy::Result<()> {
        self.record(Op::Zeroes { offset, len, fua });
        self.data.lock().unwrap()[range(offset, len)].fill(0);
        Ok(())
    }
    fn trim(&self, offset: u64, len: u64) -> livecopy::Result<()> {
        self.record(Op::Trim { offset, len });
        self.data.lock().unwrap()[range(offset, len)].fill(0);
        Ok(())
    }
    fn flush(&self) -> livecopy::Result<()> {
        self.record(Op::Flush);
        self.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// An export over a real file, through the crate's storage layer.
struct FileDevice {
    storage: FileStorage,
    size: u64,
}

impl FileDevice {
    fn open(path: &Path) -> Arc<FileDevice> {
        let storage = FileStorage::open_image(path, true).expect("open image");
        let size = storage.len().expect("len");
        Arc::new(FileDevice { storage, size })
    }
}

fn storage_error(op: &'static str) -> impl Fn(io::Error) -> livecopy::Error {
    move |e| livecopy::Error::io(op, e)
}

impl ExportDevice for FileDevice {
    fn size(&self) -> u64 {
        self.size
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> livecopy::Result<()> {
        self.storage
            .read_at(offset, buf)
            .map_err(storage_error("pread"))
    }
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> livecopy::Result<()> {
        self.storage
            .write_at(offset, data)
            .map_err(storage_error("pwrite"))?;
        if fua {
            self.storage
                .sync_data()
                .map_err(storage_error("fdatasync"))?;
        }
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> livecopy::Result<()> {
        let zeros = vec![0u8; len.min(1 << 20) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(zeros.len() as u64);
            self.storage
                .write_at(offset + done, &zeros[..n as usize])
                .map_err(storage_error("pwrite"))?;
            done += n;
        }
        if fua {
            self.storage
                .sync_data()
                .map_err(storage_error("fdatasync"))?;
        }
        Ok(())
    }
    fn trim(&self, offset: u64, len: u64) -> livecopy::Result<()> {
        self.storage
            .punch_hole(offset, len)
            .map_err(storage_error("fallocate"))
    }
    fn flush(&self) -> livecopy::Result<()> {
        self.storage.sync_data().map_err(storage_error("fdatasync"))
    }
}

// ---------------------------------------------------------------- helpers

const MIB: usize = 1 << 20;

struct Fixture {
    dir: tempfile::TempDir,
    socket: PathBuf,
    server: Option<ServerHandle>,
}

impl Fixture {
    fn url(&self) -> String {
        format!("nbd+unix:///?socket={}", self.socket.display())
    }

    fn url_named(&self, name: &str) -> String {
        format!("nbd+unix:///{name}?socket={}", self.socket.display())
    }

    fn handle(&self) -> &ServerHandle {
        self.server.as_ref().expect("server running")
    }

    fn connect(&self) -> RawClient {
        RawClient::connect(&self.socket)
    }
}

fn serve(device: Arc<dyn ExportDevice>, name: &str) -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("nbd.sock");
    let server = bind_unix(&socket, device, name).expect("bind").spawn();
    Fixture {
        dir,
        socket,
        server: Some(server),
    }
}

fn serve_mem(size: usize) -> (Fixture, Arc<MemDevice>) {
    let device = MemDevice::new(size);
    (serve(device.clone(), ""), device)
}

pub(crate) struct Output {
    pub(crate) code: i32,
    pub(crate) stdout: String,
    pub(crate) stderr: String,
}

impl Output {
    pub(crate) fn text(&self) -> String {
        format!(
            "exit {}\nstdout:\n{}\nstderr:\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// Runs a QEMU tool, killing it if it takes more than a minute.
pub(crate) fn tool(program: &str, args: &[&str]) -> Output {
    let mut child = {
        let _no_journal_changes = crate::support::spawning();
        Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("run {program}: {e}"))
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("wait");
            panic!(
                "{program} {args:?} hung; stdout: {}; stderr: {}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = child.wait_with_output().expect("output");
    Output {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// qemu-io on `url` with extra options, then the `-c` commands.
fn qemu_io(url: &str, options: &[&str], commands: &[&str]) -> Output {
    let mut args: Vec<&str> = vec!["-f", "raw"];
    args.extend_from_slice(options);
    args.push(url);
    for c in commands {
        args.push("-c");
        args.push(c);
    }
    tool("qemu-io", &args)
}

pub(crate) fn assert_ok(out: &Output) {
    assert!(
        out.code == 0 && !out.stdout.contains("failed") && !out.stderr.contains("failed"),
        "{}",
        out.text()
    );
}

/// A raw protocol client.
struct RawClient {
    stream: UnixStream,
}

impl RawClient {
    fn connect(path: &Path) -> RawClient {
        let stream = UnixStream::connect(path).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        RawClient { stream }
    }

    fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("send");
    }

    fn recv<const N: usize>(&mut self) -> [u8; N] {
        let mut buf = [0u8; N];
        self.stream.read_exact(&mut buf).expect("recv");
        buf
    }

    fn recv_vec(&mut self, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        self.stream.read_exact(&mut buf).expect("recv");
        buf
    }

    /// True if the server closed the connection (EOF or reset).
    fn closed(&mut self) -> bool {
        let mut byte = [0u8; 1];
        match self.stream.read(&mut byte) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => e.kind() != io::ErrorKind::WouldBlock && e.kind() != io::ErrorKind::TimedOut,
        }
    }

    /// Reads the greeting and sends the client flags.
    fn greet(&mut self, client_flags: u32) -> u16 {
        let greeting = self.recv::<{ proto::GREETING_LEN }>();
        let flags = proto::parse_greeting(&greeting).expect("greeting");
        self.send(&proto::encode_client_flags(client_flags));
        flags
    }

    fn option(&mut self, option: u32, data: &[u8]) {
        self.send(&proto::encode_option(option, data));
    }

    fn option_reply(&mut self) -> (proto::OptionReplyHeader, Vec<u8>) {
        let header = proto::parse_option_reply_header(&self.recv()).expect("option reply");
        let data = self.recv_vec(header.length as usize);
        (header, data)
    }

    /// NBD_OPT_GO; returns (size, transmission flags).
    fn go(&mut self, name: &str) -> (u64, u16) {
        let data = proto::encode_info_request(name, &[proto::INFO_BLOCK_SIZE]).unwrap();
        self.option(proto::OPT_GO, &data);
        let mut export = None;
        let mut block_size = None;
        loop {
            let (header, data) = self.option_reply();
            assert_eq!(header.option, proto::OPT_GO);
            match header.reply {
                proto::REP_INFO if data[..2] == [0, 0] => {
                    export = Some(proto::parse_info_export(&data).expect("export info"));
                }
                proto::REP_INFO if data[..2] == [0, 3] => block_size = Some(data),
                proto::REP_ACK => break,
                other => panic!("unexpected GO reply {other:#x}: {data:?}"),
            }
        }
        assert_eq!(
            block_size.expect("block size info"),
            proto::encode_info_block_size(1, 4096, 32 << 20)
        );
        export.expect("export info")
    }

    /// Connects through the handshake into transmission.
    fn transmission(path: &Path) -> (RawClient, u64, u16) {
        let mut client = RawClient::connect(path);
        client.greet(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES);
        let (size, flags) = client.go("");
        (client, size, flags)
    }

    fn request(
        &mut self,
        command: proto::Command,
        flags: u16,
        handle: u64,
        offset: u64,
        length: u32,
    ) {
        self.send(&proto::encode_request(&Request {
            flags,
            command,
            handle,
            offset,
            length,
        }));
    }

    fn reply(&mut self) -> proto::SimpleReply {
        proto::parse_simple_reply(&self.recv()).expect("simple reply")
    }

    fn read(&mut self, handle: u64, offset: u64, len: u32) -> Result<Vec<u8>, u32> {
        self.request(proto::Command::Read, 0, handle, offset, len);
        let reply = self.reply();
        assert_eq!(reply.handle, handle);
        if reply.error != 0 {
            return Err(reply.error);
        }
        Ok(self.recv_vec(len as usize))
    }

    fn write(&mut self, handle: u64, offset: u64, data: &[u8]) -> u32 {
        self.request(proto::Command::Write, 0, handle, offset, data.len() as u32);
        self.send(data);
        let reply = self.reply();
        assert_eq!(reply.handle, handle);
        reply.error
    }
}

fn wait_for(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

// ---------------------------------------------------------------- QEMU

#[test]
fn qemu_io_writes_and_verifies_patterns() {
    let (fx, device) = serve_mem(MIB);
    let out = qemu_io(
        &fx.url(),
        &[],
        &["write -P 0xab 0 64k", "read -P 0xab 0 64k"],
    );
    assert_ok(&out);
    assert!(
        out.stdout.contains("read 65536/65536 bytes at offset 0"),
        "{}",
        out.text()
    );
    assert_eq!(device.bytes(0, 64 << 10), vec![0xab; 64 << 10]);
    assert_eq!(device.bytes(64 << 10, 1), [0]);

    // A wrong pattern is noticed: the data really travels.
    let out = qemu_io(&fx.url(), &[], &["read -P 0xcd 0 64k"]);
    assert!(
        out.stdout.contains("Pattern verification failed") && out.code != 0,
        "{}",
        out.text()
    );
    assert!(
        device.log().contains(&Op::Read {
            offset: 0,
            len: 64 << 10
        }),
        "{:?}",
        device.log()
    );
}

#[test]
fn qemu_io_flush_reaches_the_device() {
    let (fx, device) = serve_mem(MIB);
    let out = qemu_io(
        &fx.url(),
        &["-t", "writeback"],
        &["write -P 1 0 4k", "flush", "write -P 2 4k 4k", "flush"],
    );
    assert_ok(&out);
    let log: Vec<Op> = device
        .log()
        .into_iter()
        .filter(|op| !matches!(op, Op::WriteDone { .. }))
        .collect();
    // Each write is followed by an explicit flush (QEMU may add one at close).
    let write = |offset| Op::Write {
        offset,
        len: 4096,
        fua: false,
    };
    assert_eq!(
        &log[..4],
        &[write(0), Op::Flush, write(4096), Op::Flush],
        "{log:?}"
    );
    assert!(device.flushes.load(Ordering::SeqCst) >= 2);
    assert_eq!(device.fua_writes.load(Ordering::SeqCst), 0);
}

#[test]
fn qemu_io_fua_writes_arrive_with_fua() {
    let (fx, device) = serve_mem(MIB);
    // Writeback: only `write -f` carries FUA.
    let out = qemu_io(
        &fx.url(),
        &["-t", "writeback"],
        &["write -f -P 2 0 4k", "write -P 3 4k 4k"],
    );
    assert_ok(&out);
    let log = device.log();
    assert!(
        log.contains(&Op::Write {
            offset: 0,
            len: 4096,
            fua: true
        }),
        "{log:?}"
    );
    assert!(
        log.contains(&Op::Write {
            offset: 4096,
            len: 4096,
            fua: false
        }),
        "{log:?}"
    );
    assert_eq!(device.fua_writes.load(Ordering::SeqCst), 1);
    // qemu-io's default (writethrough): every write carries FUA.
    let out = qemu_io(&fx.url(), &[], &["write -P 4 8k 4k"]);
    assert_ok(&out);
    assert!(
        device.log().contains(&Op::Write {
            offset: 8192,
            len: 4096,
            fua: true
        }),
        "{:?}",
        device.log()
    );
    assert_eq!(device.bytes(8192, 4096), vec![4; 4096]);
}

#[test]
fn qemu_io_write_zeroes_and_discard() {
    let (fx, device) = serve_mem(MIB);
    device.fill(0xff);
    let out = qemu_io(
        &fx.url(),
        &["-t", "writeback"],
        &[
            "write -z 128k 64k",
            "discard 256k 64k",
            "read -P 0 128k 64k",
        ],
    );
    assert_ok(&out);
    let log = device.log();
    assert!(
        log.iter().any(|op| matches!(
            op,
            Op::Zeroes {
                offset: 131072,
                len: 65536,
                ..
            }
        )),
        "{log:?}"
    );
    assert!(
        log.contains(&Op::Trim {
            offset: 262144,
            len: 65536
        }),
        "{log:?}"
    );
    assert_eq!(device.bytes(128 << 10, 64 << 10), vec![0; 64 << 10]);
    assert_eq!(device.bytes(0, 128 << 10), vec![0xff; 128 << 10]);
}

#[test]
fn qemu_img_info_reports_the_size() {
    let (fx, _device) = serve_mem(5 * MIB);
    let out = tool("qemu-img", &["info", "--output", "json", &fx.url()]);
    assert_eq!(out.code, 0, "{}", out.text());
    let info: serde_json::Value = serde_json::from_str(&out.stdout).expect("json");
    assert_eq!(info["virtual-size"], 5 * MIB as u64, "{}", out.text());
}

fn patterned_file(path: &Path, len: usize, seed: u8) {
    let mut bytes = vec![0u8; len];
    // Data in some 64 KiB chunks, holes (zeros) in others.
    for (i, chunk) in bytes.chunks_mut(64 << 10).enumerate() {
        if i % 3 != 1 {
            for (j, b) in chunk.iter_mut().enumerate() {
                *b = (i as u8).wrapping_mul(31) ^ (j as u8) ^ seed;
            }
        }
    }
    std::fs::write(path, bytes).expect("write source");
}

#[test]
fn qemu_img_convert_and_compare_against_a_file_export() {
    let dir = tempfile::tempdir().expect("tempdir");
    let source = dir.path().join("source.raw");
    let target = dir.path().join("target.raw");
    patterned_file(&source, 4 * MIB, 7);
    drop(FileStorage::create_image(&target, 4 * MIB as u64).expect("create target"));
    let fx = serve(FileDevice::open(&target), "");
    let (src, tgt) = (source.to_str().unwrap(), target.to_str().unwrap());

    // The client writes into us.
    let out = tool(
        "qemu-img",
        &["convert", "-n", "-f", "raw", "-O", "raw", src, &fx.url()],
    );
    assert_eq!(out.code, 0, "{}", out.text());
    let out = tool(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", src, &fx.url()],
    );
    assert_eq!(out.code, 0, "{}", out.text());
    let out = tool("qemu-img", &["compare", "-f", "raw", "-F", "raw", src, tgt]);
    assert_eq!(out.code, 0, "{}", out.text());
    assert_eq!(
        std::fs::read(&source).unwrap(),
        std::fs::read(&target).unwrap()
    );

    // The client reads from us.
    let copy = dir.path().join("copy.raw");
    let out = tool(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &fx.url(),
            copy.to_str().unwrap(),
        ],
    );
    assert_eq!(out.code, 0, "{}", out.text());
    assert_eq!(
        std::fs::read(&source).unwrap(),
        std::fs::read(&copy).unwrap()
    );

    // And a difference is seen through the export.
    patterned_file(&source, 4 * MIB, 8);
    let out = tool(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", src, &fx.url()],
    );
    assert_eq!(out.code, 1, "{}", out.text());
    assert!(fx.handle().stats().requests > 0);
}

#[test]
fn qemu_io_over_tcp() {
    let device = MemDevice::new(MIB);
    let server = bind_tcp("127.0.0.1:0", device.clone(), "")
        .expect("bind")
        .spawn();
    let addr = server.local_addr().expect("tcp address");
    let url = format!("nbd://{}:{}", addr.ip(), addr.port());
    let out = qemu_io(&url, &[], &["write -P 0x5a 4k 8k", "read -P 0x5a 4k 8k"]);
    assert_ok(&out);
    assert_eq!(device.bytes(4096, 8192), vec![0x5a; 8192]);
    let stats = server.shutdown().expect("shutdown");
    assert_eq!(stats.connections, 1);
    assert_eq!(stats.active, 0);
}

#[test]
fn named_export_and_list() {
    let device = MemDevice::new(MIB);
    let fx = serve(device.clone(), "vm1");
    let out = qemu_io(&fx.url_named("vm1"), &[], &["write -P 9 0 4k"]);
    assert_ok(&out);
    assert_eq!(device.bytes(0, 4096), vec![9; 4096]);
    // The default name reaches the only export too.
    let out = qemu_io(&fx.url(), &[], &["read -P 9 0 4k"]);
    assert_ok(&out);
    let out = qemu_io(&fx.url_named("other"), &[], &["read 0 4k"]);
    assert_ne!(out.code, 0, "{}", out.text());

    let mut client = fx.connect();
    client.greet(proto::FLAG_C_FIXED_NEWSTYLE);
    client.option(proto::OPT_LIST, &[]);
    let (header, data) = client.option_reply();
    assert_eq!(header.reply, proto::REP_SERVER);
    assert_eq!(proto::parse_rep_server(&data).unwrap(), "vm1");
    let (header, _) = client.option_reply();
    assert_eq!(header.reply, proto::REP_ACK);
    let info = proto::encode_info_request("other", &[]).unwrap();
    client.option(proto::OPT_INFO, &info);
    assert_eq!(client.option_reply().0.reply, proto::REP_ERR_UNKNOWN);
    let (size, _) = client.go("vm1");
    assert_eq!(size, MIB as u64);
    assert_eq!(client.read(1, 0, 4).unwrap(), [9; 4]);
}

// ---------------------------------------------------------------- raw protocol

#[test]
fn socket_is_private_and_removed_on_shutdown() {
    let (mut fx, _device) = serve_mem(MIB);
    let meta = std::fs::symlink_metadata(&fx.socket).expect("socket exists");
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert!(std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type()));
    // Nothing else (no temporary directory) is left next to it.
    let entries: Vec<_> = std::fs::read_dir(fx.dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(entries, ["nbd.sock"]);
    // A second server refuses to take over the path.
    assert!(bind_unix(&fx.socket, MemDevice::new(4096), "").is_err());
    fx.server.take().unwrap().shutdown().expect("shutdown");
    assert!(!fx.socket.exists());
}

#[test]
fn handshake_greeting_and_transmission_flags() {
    let (fx, _device) = serve_mem(MIB);
    let mut client = fx.connect();
    let flags = client.greet(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES);
    assert_eq!(flags, proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES);
    let (size, tflags) = client.go("");
    assert_eq!(size, MIB as u64);
    assert_eq!(
        tflags,
        proto::TFLAG_HAS_FLAGS
            | proto::TFLAG_SEND_FLUSH
            | proto::TFLAG_SEND_FUA
            | proto::TFLAG_SEND_TRIM
            | proto::TFLAG_SEND_WRITE_ZEROES
            | proto::TFLAG_SEND_FAST_ZERO
            | proto::TFLAG_CAN_MULTI_CONN
    );
}

#[test]
fn unknown_client_flags_close_the_connection() {
    let (fx, _device) = serve_mem(MIB);
    let mut client = fx.connect();
    client.greet(proto::FLAG_C_FIXED_NEWSTYLE | 0x8000);
    client.option(proto::OPT_LIST, &[]);
    assert!(client.closed());
    wait_for("the drop to be counted", || {
        fx.handle().stats().dropped == 1
    });
}

#[test]
fn bad_option_magic_closes_the_connection() {
    let (fx, _device) = serve_mem(MIB);
    let mut client = fx.connect();
    client.greet(proto::FLAG_C_FIXED_NEWSTYLE);
    let mut option = proto::encode_option(proto::OPT_LIST, &[]);
    option[0] ^= 0xff;
    client.send(&option);
    assert!(client.closed());
    // The server still serves others.
    let (mut other, _, _) = RawClient::transmission(&fx.socket);
    assert_eq!(other.read(1, 0, 16).unwrap(), [0; 16]);
}

#[test]
fn unsupported_and_malformed_options_keep_the_connection() {
    let (fx, device) = serve_mem(MIB);
    device.fill(0x42);
    let mut client = fx.connect();
    client.greet(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES);
    for option in [proto::OPT_EXTENDED_HEADERS, proto::OPT_STARTTLS, 0x7777] {
        client.option(option, b"some data");
        let (header, _) = client.option_reply();
        assert_eq!(
            (header.option, header.reply),
            (option, proto::REP_ERR_UNSUP)
        );
    }
    // Meta contexts before structured replies; structured replies with data.
    let query = livecopy::nbd::structured::encode_meta_context_request("", &[]);
    client.option(proto::OPT_LIST_META_CONTEXT, &query);
    assert_eq!(client.option_reply().0.reply, proto::REP_ERR_INVALID);
    client.option(proto::OPT_STRUCTURED_REPLY, b"x");
    assert_eq!(client.option_reply().0.reply, proto::REP_ERR_INVALID);
    // GO whose name runs past the data; LIST with data.
    client.option(proto::OPT_GO, &[0, 0, 0, 9, b'x']);
    assert_eq!(client.option_reply().0.reply, proto::REP_ERR_INVALID);
    client.option(proto::OPT_LIST, b"junk");
    assert_eq!(client.option_reply().0.reply, proto::REP_ERR_INVALID);
    // INFO does not enter transmission; GO does.
    let info = proto::encode_info_request("", &[]).unwrap();
    client.option(proto::OPT_INFO, &info);
    let mut replies = Vec::new();
    loop {
        let (header, _) = client.option_reply();
        replies.push(header.reply);
        if header.reply == proto::REP_ACK {
            break;
        }
    }
    assert_eq!(replies, [proto::REP_INFO, proto::REP_INFO, proto::REP_ACK]);
    client.go("");
    assert_eq!(client.read(7, 100, 8).unwrap(), [0x42; 8]);
}

#[test]
fn oversized_options_are_refused() {
    let (fx, _device) = serve_mem(MIB);
    let mut client = fx.connect();
    client.greet(proto::FLAG_C_FIXED_NEWSTYLE);
    // Too long to keep, short enough to skip: TOO_BIG, and still in step.
    client.option(proto::OPT_GO, &vec![0u8; 100 << 10]);
    assert_eq!(client.option_reply().0.reply, proto::REP_ERR_TOO_BIG);
    client.option(proto::OPT_EXTENDED_HEADERS, &[]);
    assert_eq!(client.option_reply().0.reply, proto::REP_ERR_UNSUP);
    let (size, _) = client.go("");
    assert_eq!(size, MIB as u64);

    // An absurd length ends the connection without reading it.
    let mut client = fx.connect();
    client.greet(proto::FLAG_C_FIXED_NEWSTYLE);
    let mut header = proto::encode_option(proto::OPT_GO, &[]);
    header[12..16].copy_from_slice(&[0xff; 4]);
    client.send(&header);
    assert!(client.closed());
}

#[test]
fn abort_is_acknowledged() {
    let (fx, _device) = serve_mem(MIB);
    let mut client = fx.connect();
    client.greet(proto::FLAG_C_FIXED_NEWSTYLE);
    client.option(proto::OPT_ABORT, &[]);
    let (header, _) = client.option_reply();
    assert_eq!(
        (header.option, header.reply),
        (proto::OPT_ABORT, proto::REP_ACK)
    );
    assert!(client.closed());
    wait_for("the connection to end", || fx.handle().stats().active == 0);
    assert_eq!(fx.handle().stats().dropped, 0);
}

#[test]
fn export_name_with_and_without_zeroes() {
    let (fx, device) = serve_mem(MIB);
    device.fill(0x11);
    for (flags, padding) in [
        (proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES, 0),
        (proto::FLAG_C_FIXED_NEWSTYLE, 124),
    ] {
        let mut client = fx.connect();
        client.greet(flags);
        client.option(proto::OPT_EXPORT_NAME, b"");
        let reply = client.recv_vec(10 + padding);
        // 1 MiB, big-endian.
        assert_eq!(reply[..8], [0, 0, 0, 0, 0, 0x10, 0, 0]);
        // Flush, FUA, trim, write zeroes, fast zero, multi-conn.
        assert_eq!(reply[8..10], [0x09, 0x6d]);
        assert!(reply[10..].iter().all(|&b| b == 0));
        assert_eq!(client.read(3, 0, 4).unwrap(), [0x11; 4]);
    }
    // An unknown name cannot be answered with an error: the server hangs up.
    let fx = serve(MemDevice::new(MIB), "vm1");
    let mut client = fx.connect();
    client.greet(proto::FLAG_C_FIXED_NEWSTYLE);
    client.option(proto::OPT_EXPORT_NAME, b"nope");
    assert!(client.closed());
}

#[test]
fn bad_requests_get_errors_and_the_connection_continues() {
    let (fx, device) = serve_mem(MIB);
    let (mut c, size, _) = RawClient::transmission(&fx.socket);
    let end = size;
    assert_eq!(c.read(1, end - 8, 16), Err(proto::EINVAL));
    assert_eq!(c.read(2, u64::MAX - 2, 8), Err(proto::EINVAL));
    assert_eq!(c.read(3, 0, (32 << 20) + 1), Err(proto::EINVAL));
    assert_eq!(c.write(4, end - 2, &[1, 2, 3, 4]), proto::ENOSPC);
    assert_eq!(c.read(5, end - 8, 8).unwrap(), [0; 8]);
    // Unknown command, unknown flag, zeroes and trim past the end.
    c.request(proto::Command::Other(42), 0, 6, 0, 0);
    assert_eq!(c.reply().error, proto::EINVAL);
    c.request(proto::Command::Read, 0x100, 7, 0, 8);
    assert_eq!(c.reply().error, proto::EINVAL);
    c.request(proto::Command::WriteZeroes, 0, 8, end, 1);
    assert_eq!(c.reply().error, proto::ENOSPC);
    c.request(proto::Command::Trim, 0, 9, end - 1, 2);
    assert_eq!(c.reply().error, proto::EINVAL);
    // Still in step.
    assert_eq!(c.write(10, 0, b"ok"), 0);
    assert_eq!(c.read(11, 0, 2).unwrap(), b"ok");
    assert_eq!(device.bytes(0, 2), b"ok");
    assert_eq!(fx.handle().stats().errors, 8);
}

#[test]
fn device_errors_become_nbd_errors() {
    let (fx, device) = serve_mem(MIB);
    let (mut c, _, _) = RawClient::transmission(&fx.socket);
    *device.fail_writes.lock().unwrap() = Some(28);
    assert_eq!(c.write(1, 0, &[1; 512]), proto::ENOSPC);
    *device.fail_writes.lock().unwrap() = Some(5);
    assert_eq!(c.write(2, 0, &[1; 512]), proto::EIO);
    *device.fail_writes.lock().unwrap() = None;
    assert_eq!(c.write(3, 0, &[1; 512]), 0);
}

#[test]
fn oversized_writes() {
    let (fx, device) = serve_mem(MIB);
    let (mut c, _, _) = RawClient::transmission(&fx.socket);
    // Over the 32 MiB maximum but sent in full: read, dropped, EINVAL.
    let big = vec![0xee; (32 << 20) + 1];
    assert_eq!(c.write(1, 0, &big), proto::EINVAL);
    assert_eq!(c.write(2, 0, &[7; 8]), 0);
    assert_eq!(c.read(3, 0, 8).unwrap(), [7; 8]);
    assert!(
        !device
            .log()
            .iter()
            .any(|op| matches!(op, Op::Write { len, .. } if *len > 8))
    );
    // An absurd length: the server will not read 4 GiB, it hangs up.
    c.request(proto::Command::Write, 0, 4, 0, u32::MAX);
    assert!(c.closed());
}

#[test]
fn read_only_export_refuses_writes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("ro.sock");
    let device = MemDevice::new(MIB);
    device.fill(3);
    let server = bind_unix(&socket, device.clone(), "")
        .expect("bind")
        .read_only(true)
        .spawn();
    let (mut c, _, flags) = RawClient::transmission(&socket);
    assert_ne!(flags & proto::TFLAG_READ_ONLY, 0);
    assert_eq!(c.write(1, 0, &[1; 8]), proto::EPERM);
    c.request(proto::Command::WriteZeroes, 0, 2, 0, 8);
    assert_eq!(c.reply().error, proto::EPERM);
    c.request(proto::Command::Trim, 0, 3, 0, 8);
    assert_eq!(c.reply().error, proto::EPERM);
    assert_eq!(c.read(4, 0, 8).unwrap(), [3; 8]);
    let url = format!("nbd+unix:///?socket={}", socket.display());
    let out = qemu_io(&url, &["-r"], &["read -P 3 0 4k"]);
    assert_ok(&out);
    assert!(device.log().iter().all(|op| matches!(op, Op::Read { .. })));
    drop(server);
}

#[test]
fn a_client_vanishing_mid_request_ends_only_its_connection() {
    let (fx, device) = serve_mem(MIB);
    let (mut good, _, _) = RawClient::transmission(&fx.socket);
    assert_eq!(good.write(1, 0, &[5; 16]), 0);

    let (mut bad, _, _) = RawClient::transmission(&fx.socket);
    // Half a request header, then gone.
    let header = proto::encode_request(&Request {
        flags: 0,
        command: proto::Command::Write,
        handle: 1,
        offset: 0,
        length: 4096,
    });
    bad.send(&header[..14]);
    drop(bad);
    // A write whose payload stops short, then gone.
    let (mut bad, _, _) = RawClient::transmission(&fx.socket);
    bad.send(&header);
    bad.send(&[0xbb; 100]);
    drop(bad);
    // Garbage instead of a request.
    let (mut bad, _, _) = RawClient::transmission(&fx.socket);
    bad.send(&[0x55; 28]);
    assert!(bad.closed());

    wait_for("three dropped connections", || {
        fx.handle().stats().dropped == 3
    });
    assert_eq!(good.write(2, 16, &[6; 16]), 0);
    assert_eq!(good.read(3, 0, 32).unwrap(), [[5; 16], [6; 16]].concat());
    assert!(!device.bytes(0, 4096).contains(&0xbb));
    assert_eq!(fx.handle().stats().active, 1);
}

#[test]
fn sixteen_pipelined_requests_are_all_answered() {
    let (fx, device) = serve_mem(MIB);
    device.write_delay_ms.store(50, Ordering::SeqCst);
    device.read_delay_ms.store(50, Ordering::SeqCst);
    let (mut c, _, _) = RawClient::transmission(&fx.socket);
    // Eight writes and eight reads of other blocks, sent before any reply.
    let mut batch = Vec::new();
    for i in 0..16u64 {
        let handle = 0x1000 + i * 7;
        let offset = i * 4096;
        if i % 2 == 0 {
            batch.extend(proto::encode_request(&Request {
                flags: 0,
                command: proto::Command::Write,
                handle,
                offset,
                length: 4096,
            }));
            batch.extend(vec![i as u8 + 1; 4096]);
        } else {
            batch.extend(proto::encode_request(&Request {
                flags: 0,
                command: proto::Command::Read,
                handle,
                offset,
                length: 4096,
            }));
        }
    }
    c.send(&batch);
    let mut answered = Vec::new();
    for _ in 0..16 {
        let reply = c.reply();
        assert_eq!(reply.error, 0);
        let i = (reply.handle - 0x1000) / 7;
        assert!(reply.handle >= 0x1000 && i < 16 && (reply.handle - 0x1000) % 7 == 0);
        if i % 2 == 1 {
            assert_eq!(c.recv_vec(4096), vec![0; 4096]);
        }
        answered.push(reply.handle);
    }
    answered.sort_unstable();
    let expected: Vec<u64> = (0..16).map(|i| 0x1000 + i * 7).collect();
    assert_eq!(answered, expected);
    for i in (0..16).step_by(2) {
        assert_eq!(device.bytes(i * 4096, 4096), vec![i as u8 + 1; 4096]);
    }
    // They ran side by side, not one after the other.
    assert!(device.max_running.load(Ordering::SeqCst) > 1);
    assert_eq!(fx.handle().stats().requests, 16);
}

#[test]
fn flush_waits_for_writes_received_before_it() {
    let (fx, device) = serve_mem(MIB);
    device.write_delay_ms.store(300, Ordering::SeqCst);
    let (mut c, _, _) = RawClient::transmission(&fx.socket);
    let mut batch = proto::encode_request(&Request {
        flags: 0,
        command: proto::Command::Write,
        handle: 1,
        offset: 0,
        length: 512,
    })
    .to_vec();
    batch.extend([9u8; 512]);
    batch.extend(proto::encode_request(&Request {
        flags: 0,
        command: proto::Command::Flush,
        handle: 2,
        offset: 0,
        length: 0,
    }));
    c.send(&batch);
    let first = c.reply();
    let second = c.reply();
    assert_eq!((first.handle, first.error), (1, 0));
    assert_eq!((second.handle, second.error), (2, 0));
    let log = device.log();
    let done = log.iter().position(|op| *op == Op::WriteDone { offset: 0 });
    let flush = log.iter().position(|op| *op == Op::Flush);
    assert!(done.is_some() && flush.is_some() && done < flush, "{log:?}");
}

#[test]
fn disc_finishes_in_flight_requests_then_closes() {
    let (fx, device) = serve_mem(MIB);
    device.write_delay_ms.store(200, Ordering::SeqCst);
    let (mut c, _, _) = RawClient::transmission(&fx.socket);
    let mut batch = proto::encode_request(&Request {
        flags: proto::CMD_FLAG_FUA,
        command: proto::Command::Write,
        handle: 77,
        offset: 4096,
        length: 4,
    })
    .to_vec();
    batch.extend(b"disc");
    batch.extend(proto::encode_request(&Request {
        flags: 0,
        command: proto::Command::Disc,
        handle: 78,
        offset: 0,
        length: 0,
    }));
    c.send(&batch);
    let reply = c.reply();
    assert_eq!((reply.handle, reply.error), (77, 0));
    assert!(c.closed());
    assert_eq!(device.bytes(4096, 4), b"disc");
    assert_eq!(device.fua_writes.load(Ordering::SeqCst), 1);
    wait_for("the connection to end", || fx.handle().stats().active == 0);
    assert_eq!(fx.handle().stats().dropped, 0);
}

#[test]
fn shutdown_closes_open_connections() {
    let (mut fx, _device) = serve_mem(MIB);
    let (mut c, _, _) = RawClient::transmission(&fx.socket);
    assert_eq!(c.read(1, 0, 8).unwrap(), [0; 8]);
    let mut waiting = fx.connect();
    waiting.greet(proto::FLAG_C_FIXED_NEWSTYLE);
    wait_for("two connections", || fx.handle().stats().active == 2);
    let stats = fx.server.take().unwrap().shutdown().expect("shutdown");
    assert_eq!(stats.active, 0);
    assert_eq!(stats.connections, 2);
    assert!(c.closed());
    assert!(waiting.closed());
    assert!(UnixStream::connect(&fx.socket).is_err());
}

#[test]
fn client_may_stop_between_messages() {
    // Closing without DISC is impolite but not a protocol error mid-message.
    let (fx, _device) = serve_mem(MIB);
    let (mut c, _, _) = RawClient::transmission(&fx.socket);
    assert_eq!(c.write(1, 0, &[1; 8]), 0);
    drop(c);
    wait_for("the connection to end", || fx.handle().stats().active == 0);
    let stats = fx.handle().stats();
    assert_eq!((stats.dropped, stats.requests, stats.errors), (0, 1, 0));
}

#[test]
fn fua_is_accepted_on_every_command_once_advertised() {
    // The spec: a server that advertised SEND_FUA MUST accept the flag on
    // all commands, even by ignoring it.
    let (fx, device) = serve_mem(MIB);
    let (mut c, _, flags) = RawClient::transmission(&fx.socket);
    assert_ne!(flags & proto::TFLAG_SEND_FUA, 0);
    assert_eq!(c.write(1, 4096, b"fua!"), 0);
    c.request(proto::Command::Read, proto::CMD_FLAG_FUA, 2, 4096, 4);
    let reply = c.reply();
    assert_eq!((reply.handle, reply.error), (2, 0), "a read with FUA");
    assert_eq!(c.recv_vec(4), b"fua!");
    let flushes = device.flushes.load(Ordering::SeqCst);
    c.request(proto::Command::Flush, proto::CMD_FLAG_FUA, 3, 0, 0);
    let reply = c.reply();
    assert_eq!((reply.handle, reply.error), (3, 0), "a flush with FUA");
    assert_eq!(device.flushes.load(Ordering::SeqCst), flushes + 1);
    c.request(proto::Command::Disc, proto::CMD_FLAG_FUA, 4, 0, 0);
    assert!(c.closed(), "a disconnect with FUA ends the connection");
    wait_for("the connection to end", || fx.handle().stats().active == 0);
    assert_eq!(fx.handle().stats().errors, 0);
}

// ------------------------------------------------- structured replies

impl RawClient {
    /// Negotiates structured replies and, with `allocation`, selects
    /// `base:allocation`, then GO; returns the context id (0 without).
    fn structured(path: &Path, allocation: bool) -> (RawClient, u32) {
        let mut c = RawClient::connect(path);
        c.greet(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES);
        c.option(proto::OPT_STRUCTURED_REPLY, &[]);
        assert_eq!(c.option_reply().0.reply, proto::REP_ACK);
        let mut id = 0;
        if allocation {
            let query = st::encode_meta_context_request("", &[st::BASE_ALLOCATION]);
            c.option(proto::OPT_SET_META_CONTEXT, &query);
            let (header, data) = c.option_reply();
            assert_eq!(header.reply, st::REP_META_CONTEXT);
            let (got, name) = st::parse_rep_meta_context(&data).expect("context");
            assert_eq!(name, st::BASE_ALLOCATION);
            id = got;
            assert_eq!(c.option_reply().0.reply, proto::REP_ACK);
        }
        let (_, flags) = c.go("");
        assert_ne!(flags & proto::TFLAG_SEND_DF, 0);
        (c, id)
    }

    /// One structured chunk: header and payload.
    fn chunk(&mut self) -> (st::ChunkHeader, Vec<u8>) {
        let header = st::parse_chunk_header(&self.recv()).expect("a structured chunk");
        let payload = self.recv_vec(header.length as usize);
        (header, payload)
    }
}

/// With structured replies: a read is one data chunk, a zero-length read a
/// NONE chunk, a failed read an error chunk with a message; BLOCK_STATUS
/// answers for the selected context, one extent with REQ_ONE, and EINVAL
/// without a context; other successes stay simple replies.
#[test]
fn structured_replies_for_reads_errors_and_block_status() {
    let (fx, device) = serve_mem(MIB);
    device.fill(0x5a);
    let (mut c, id) = RawClient::structured(&fx.socket, true);
    c.request(proto::Command::Read, 0, 1, 4096, 8);
    let (header, payload) = c.chunk();
    assert_eq!(
        (header.kind, header.done(), header.handle),
        (st::REPLY_TYPE_OFFSET_DATA, true, 1)
    );
    assert_eq!(st::parse_offset_data(&payload), Ok((4096, &[0x5a; 8][..])));
    c.request(proto::Command::Read, 0, 2, 0, 0);
    let (header, _) = c.chunk();
    assert_eq!((header.kind, header.done()), (st::REPLY_TYPE_NONE, true));
    c.request(proto::Command::Read, 0, 3, MIB as u64, 1);
    let (header, payload) = c.chunk();
    assert_eq!((header.kind, header.done()), (st::REPLY_TYPE_ERROR, true));
    let error = st::parse_error_chunk(header.kind, &payload).expect("error chunk");
    assert_eq!(error.error, proto::EINVAL);
    assert!(error.message.contains("beyond the end"), "{error:?}");

    c.request(proto::Command::BlockStatus, 0, 4, 0, 65536);
    let (header, payload) = c.chunk();
    assert_eq!(
        (header.kind, header.done()),
        (st::REPLY_TYPE_BLOCK_STATUS, true)
    );
    let (got, extents) = st::parse_block_status(&payload).expect("block status");
    assert_eq!(got, id);
    assert_eq!(
        extents,
        [st::Extent {
            length: 65536,
            flags: 0
        }]
    );
    c.request(
        proto::Command::BlockStatus,
        proto::CMD_FLAG_REQ_ONE,
        5,
        0,
        4096,
    );
    assert_eq!(
        st::parse_block_status(&c.chunk().1).expect("one").1.len(),
        1
    );
    c.request(proto::Command::BlockStatus, 0, 6, MIB as u64 - 1, 2);
    assert_eq!(c.chunk().0.kind, st::REPLY_TYPE_ERROR);

    assert_eq!(c.write(7, 0, b"ok"), 0, "a write's success: a simple reply");

    let (mut plain, _) = RawClient::structured(&fx.socket, false);
    plain.request(proto::Command::BlockStatus, 0, 8, 0, 4096);
    let (header, payload) = plain.chunk();
    assert_eq!(header.kind, st::REPLY_TYPE_ERROR);
    assert_eq!(
        st::parse_error_chunk(header.kind, &payload).unwrap().error,
        proto::EINVAL
    );
}

/// LIST_META_CONTEXT lists `base:allocation` for no query and for `base:`,
/// nothing for another namespace; a SET that matches nothing selects
/// nothing; meta contexts for another export are refused.
#[test]
fn meta_contexts_are_listed_and_selected() {
    let (fx, _device) = serve_mem(MIB);
    let mut c = RawClient::connect(&fx.socket);
    c.greet(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES);
    c.option(proto::OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(c.option_reply().0.reply, proto::REP_ACK);
    let mut ask = |option: u32, export: &str, queries: &[&str]| {
        c.option(option, &st::encode_meta_context_request(export, queries));
        let mut names = Vec::new();
        loop {
            let (header, data) = c.option_reply();
            match header.reply {
                st::REP_META_CONTEXT => names.push(st::parse_rep_meta_context(&data).unwrap().1),
                proto::REP_ACK => return Ok(names),
                other => return Err(other),
            }
        }
    };
    let allocation = vec![st::BASE_ALLOCATION.to_string()];
    assert_eq!(
        ask(proto::OPT_LIST_META_CONTEXT, "", &[]),
        Ok(allocation.clone())
    );
    assert_eq!(
        ask(proto::OPT_LIST_META_CONTEXT, "", &["base:"]),
        Ok(allocation.clone())
    );
    assert_eq!(
        ask(proto::OPT_LIST_META_CONTEXT, "", &["qemu:dirty-bitmap:x"]),
        Ok(vec![])
    );
    assert_eq!(ask(proto::OPT_SET_META_CONTEXT, "", &["base:"]), Ok(vec![]));
    assert_eq!(
        ask(proto::OPT_SET_META_CONTEXT, "other", &[st::BASE_ALLOCATION]),
        Err(proto::REP_ERR_UNKNOWN)
    );
    assert_eq!(
        ask(proto::OPT_SET_META_CONTEXT, "", &[st::BASE_ALLOCATION]),
        Ok(allocation)
    );
    // A SET that fails still replaces the selection: nothing is selected.
    let mut bad = st::encode_meta_context_request("", &[st::BASE_ALLOCATION]);
    bad.truncate(bad.len() - 3);
    c.option(proto::OPT_SET_META_CONTEXT, &bad);
    assert_eq!(c.option_reply().0.reply, proto::REP_ERR_INVALID);
    c.go("");
    c.request(proto::Command::BlockStatus, 0, 1, 0, 4096);
    let (header, payload) = c.chunk();
    assert_eq!(header.kind, st::REPLY_TYPE_ERROR);
    assert_eq!(
        st::parse_error_chunk(header.kind, &payload).unwrap().error,
        proto::EINVAL
    );
}

/// FAST_ZERO is advertised; a device whose zeroing may be slow refuses it
/// at once with ENOTSUP, touching nothing, and zeroes without the flag.
#[test]
fn fast_zero_is_refused_when_zeroing_may_be_slow() {
    let (fx, device) = serve_mem(MIB);
    device.fill(0x33);
    let (mut c, _, flags) = RawClient::transmission(&fx.socket);
    assert_ne!(flags & proto::TFLAG_SEND_FAST_ZERO, 0);
    c.request(
        proto::Command::WriteZeroes,
        proto::CMD_FLAG_FAST_ZERO,
        1,
        0,
        4096,
    );
    assert_eq!(c.reply().error, proto::ENOTSUP);
    assert_eq!(device.bytes(0, 4096), vec![0x33; 4096]);
    assert!(
        !device
            .log()
            .iter()
            .any(|op| matches!(op, Op::Zeroes { .. }))
    );
    c.request(proto::Command::WriteZeroes, 0, 2, 0, 4096);
    assert_eq!(c.reply().error, 0);
    assert_eq!(device.bytes(0, 4096), vec![0; 4096]);
}

/// A device with 4 KiB blocks whose size is a multiple of 512 only: the
/// advertised minimum is what divides the size, so the tail stays
/// reachable.
#[test]
fn the_minimum_block_size_divides_the_export_size() {
    struct Blocks(Arc<MemDevice>, u32);
    impl ExportDevice for Blocks {
        fn size(&self) -> u64 {
            self.0.size()
        }
        fn read(&self, offset: u64, buf: &mut [u8]) -> livecopy::Result<()> {
            self.0.read(offset, buf)
        }
        fn write(&self, offset: u64, data: &[u8], fua: bool) -> livecopy::Result<()> {
            self.0.write(offset, data, fua)
        }
        fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> livecopy::Result<()> {
            self.0.write_zeroes(offset, len, fua)
        }
        fn trim(&self, offset: u64, len: u64) -> livecopy::Result<()> {
            self.0.trim(offset, len)
        }
        fn flush(&self) -> livecopy::Result<()> {
            self.0.flush()
        }
        fn block_size(&self) -> u32 {
            self.1
        }
    }
    for (size, block, want) in [
        (3 * 4096 + 512, 4096, 512),
        (8 * 4096, 4096, 4096),
        (8 * 4096, 1 << 20, 32 << 10),
        (1 << 20, 1, 1),
    ] {
        let fx = serve(Arc::new(Blocks(MemDevice::new(size), block)), "");
        let mut c = fx.connect();
        c.greet(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES);
        let go = proto::encode_info_request("", &[proto::INFO_BLOCK_SIZE]).unwrap();
        c.option(proto::OPT_GO, &go);
        let sizes = loop {
            let (header, data) = c.option_reply();
            if header.reply == proto::REP_INFO && data[..2] == [0, 3] {
                break st::parse_info_block_size(&data).expect("block sizes");
            }
            assert_ne!(header.reply, proto::REP_ACK, "no block sizes");
        };
        assert_eq!(sizes.minimum, want, "size {size}, device blocks {block}");
        assert!(sizes.preferred >= sizes.minimum);
    }
}
