//! `copyctl serve` end to end, as a management tool and a guest see it: the
//! QEMU tools (qemu-io, qemu-img) on the NBD export while the copy runs, the
//! control socket and its CLI clients, restarts over an existing journal,
//! and the kill test: SIGKILL of the engine at random moments of every
//! phase, under a writing guest, then recovery and a check of every
//! acknowledged write on the image recovery names.
//!
//! Every child process is owned by a guard that kills and reaps it when
//! dropped, panics included; every wait has a deadline.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::{run_copyctl, spawning};

const COPYCTL: &str = env!("CARGO_BIN_EXE_copyctl");
pub(crate) const KIB: u64 = 1 << 10;
pub(crate) const MIB: u64 = 1 << 20;
/// The unit the guest writes in the kill test, and the patterned unit of
/// every source image here.
pub(crate) const REGION: u64 = 64 * KIB;
/// How long one QEMU tool or short copyctl run may take.
pub(crate) const TOOL_TIMEOUT: Duration = Duration::from_secs(60);

// ------------------------------------------------------------ processes

/// A child process, killed (SIGKILL) and reaped when dropped.
pub(crate) struct Proc {
    pub(crate) child: Child,
}

impl Proc {
    pub(crate) fn spawn<I, S>(program: &str, args: I, stdout: Stdio, stderr: Stdio) -> Proc
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let child = {
            let _no_journal_changes = spawning();
            Command::new(program)
                .args(args)
                .stdin(Stdio::null())
                .stdout(stdout)
                .stderr(stderr)
                .spawn()
                .unwrap_or_else(|e| panic!("spawn {program}: {e}"))
        };
        Proc { child }
    }

    /// SIGKILL, then reap. Harmless on a process that already ended.
    pub(crate) fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// What a finished tool run left behind.
pub(crate) struct Tool {
    pub(crate) code: i32,
    pub(crate) stdout: String,
    pub(crate) stderr: String,
}

impl Tool {
    pub(crate) fn text(&self) -> String {
        format!(
            "exit {}\n--- stdout:\n{}\n--- stderr:\n{}",
            self.code, self.stdout, self.stderr
        )
    }

    /// Both streams.
    pub(crate) fn all(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr)
    }
}

/// Runs `program` to its end, killing it (and failing the test) if it takes
/// longer than `timeout`. Both streams are drained while it runs, so a
/// chatty tool never blocks on a full pipe.
pub(crate) fn tool<I, S>(program: &str, args: I, timeout: Duration) -> Tool
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<std::ffi::OsString> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
    let mut proc = Proc::spawn(program, &args, Stdio::piped(), Stdio::piped());
    let drain = |stream: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            if let Some(mut s) = stream {
                let _ = s.read_to_end(&mut bytes);
            }
            String::from_utf8_lossy(&bytes).into_owned()
        })
    };
    let out = drain(
        proc.child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );
    let err = drain(
        proc.child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = proc.child.try_wait().expect("wait") {
            break Some(status);
        }
        if Instant::now() > deadline {
            proc.kill();
            break None;
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let result = Tool {
        code: status.and_then(|s| s.code()).unwrap_or(-1),
        stdout: out.join().expect("stdout reader"),
        stderr: err.join().expect("stderr reader"),
    };
    assert!(
        status.is_some(),
        "{program} {args:?} ran longer than {timeout:?}; killed\n{}",
        result.text()
    );
    result
}

/// qemu-io over `target` (an NBD URL or an image file) in raw format.
pub(crate) fn qemu_io<S: AsRef<str>>(target: &str, options: &[&str], commands: &[S]) -> Tool {
    let mut args: Vec<String> = vec!["-f".into(), "raw".into()];
    args.extend(options.iter().map(|s| s.to_string()));
    args.push(target.into());
    for c in commands {
        args.push("-c".into());
        args.push(c.as_ref().into());
    }
    tool("qemu-io", &args, TOOL_TIMEOUT)
}

/// Asserts that a qemu-io run did every write and read it was given and
/// that nothing failed (pattern checks included).
pub(crate) fn assert_io_ok(out: &Tool, writes: usize, reads: usize) {
    let all = out.all();
    assert!(
        out.code == 0 && !all.contains("failed") && !all.contains("Pattern verification"),
        "qemu-io failed:\n{}",
        out.text()
    );
    assert_eq!(count_done(&out.stdout, "wrote"), writes, "{}", out.text());
    assert_eq!(count_done(&out.stdout, "read"), reads, "{}", out.text());
}

/// qemu-io's "wrote N/N bytes at offset X" (or "read ...") lines: complete
/// transfers only.
pub(crate) fn count_done(stdout: &str, verb: &str) -> usize {
    stdout
        .lines()
        .filter(|line| {
            let mut words = line.split_whitespace();
            words.next() == Some(verb)
                && words
                    .next()
                    .and_then(|n| n.split_once('/'))
                    .is_some_and(|(a, b)| a == b && a.parse::<u64>().is_ok())
        })
        .count()
}

fn nbd_url(socket: &Path) -> String {
    format!("nbd+unix:///?socket={}", socket.display())
}

// ------------------------------------------------------------ images

/// The byte region `region` of every source image here is filled with.
pub(crate) fn source_byte(region: u64) -> u8 {
    ((region + 128) % 255 + 1) as u8
}

/// The byte the kill test's guest writes into `region`: unique per region
/// modulo 255, never zero, never the source's byte there.
pub(crate) fn guest_byte(region: u64) -> u8 {
    (region % 255 + 1) as u8
}

pub(crate) fn source_contents(size: u64) -> Vec<u8> {
    let mut data = vec![0u8; size as usize];
    for (region, chunk) in data.chunks_mut(REGION as usize).enumerate() {
        chunk.fill(source_byte(region as u64));
    }
    data
}

/// A job's files in a fresh temporary directory.
pub(crate) struct Layout {
    pub(crate) dir: tempfile::TempDir,
    pub(crate) source: PathBuf,
    pub(crate) dest: PathBuf,
    pub(crate) journal: PathBuf,
    /// The destination as `serve` is given it when it is not the path
    /// `dest` (an NBD URI).
    pub(crate) dest_arg: Option<String>,
}

impl Layout {
    /// A directory with a patterned source of `size` bytes (all data, no
    /// holes, so the bulk pass copies every byte).
    fn new(size: u64) -> Layout {
        Layout::with_source(&source_contents(size))
    }

    pub(crate) fn with_source(contents: &[u8]) -> Layout {
        let dir = tempfile::tempdir().expect("tempdir");
        let source = dir.path().join("source.img");
        std::fs::write(&source, contents).expect("write source");
        Layout {
            source,
            dest: dir.path().join("dest.img"),
            journal: dir.path().join("copy.journal"),
            dest_arg: None,
            dir,
        }
    }

    pub(crate) fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `copyctl serve` arguments over this layout, with sockets named after
    /// `tag` (a restart needs new names: see the stale-socket test).
    fn serve_args(&self, tag: &str, extra: &[&str]) -> Vec<String> {
        let mut args: Vec<String> = vec!["--output".into(), "json".into(), "serve".into()];
        for (flag, path) in [
            ("--journal", self.journal.clone()),
            ("--source", self.source.clone()),
            (
                "--dest",
                self.dest_arg
                    .as_ref()
                    .map_or_else(|| self.dest.clone(), PathBuf::from),
            ),
            ("--socket", self.nbd(tag)),
            ("--control", self.ctl(tag)),
        ] {
            args.push(flag.into());
            args.push(path.display().to_string());
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    }

    pub(crate) fn nbd(&self, tag: &str) -> PathBuf {
        self.path(&format!("nbd{tag}.sock"))
    }

    pub(crate) fn ctl(&self, tag: &str) -> PathBuf {
        self.path(&format!("ctl{tag}.sock"))
    }

    /// Starts serve; panics (with its stderr) if it does not serve.
    pub(crate) fn serve(&self, tag: &str, extra: &[&str]) -> Serve {
        match Serve::try_start(self, tag, extra) {
            Ok(serve) => serve,
            Err(run) => panic!("serve did not start:\n{}", run.text()),
        }
    }
}

// ------------------------------------------------------------ serve

/// A running `copyctl serve`.
pub(crate) struct Serve {
    proc: Proc,
    /// The "serving" announcement.
    pub(crate) announced: Value,
    /// What it printed on stdout so far.
    stdout_path: PathBuf,
    stderr_path: PathBuf,
    nbd: PathBuf,
    ctl: PathBuf,
}

impl Serve {
    /// Starts serve and waits for its announcement; `Err` with its output if
    /// it exited instead.
    pub(crate) fn try_start(layout: &Layout, tag: &str, extra: &[&str]) -> Result<Serve, Tool> {
        let stdout_path = layout.path(&format!("serve{tag}.out"));
        let stderr_path = layout.path(&format!("serve{tag}.err"));
        let stdout = std::fs::File::create(&stdout_path).expect("serve stdout");
        let stderr = std::fs::File::create(&stderr_path).expect("serve stderr");
        let mut proc = Proc::spawn(
            COPYCTL,
            layout.serve_args(tag, extra),
            Stdio::from(stdout),
            Stdio::from(stderr),
        );
        let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let text = read(&stdout_path);
            if let Ok(value) = serde_json::from_str::<Value>(text.trim())
                && value["event"] == "serving"
            {
                return Ok(Serve {
                    proc,
                    announced: value,
                    stdout_path,
                    stderr_path,
                    nbd: layout.nbd(tag),
                    ctl: layout.ctl(tag),
                });
            }
            if let Some(status) = proc.child.try_wait().expect("wait") {
                return Err(Tool {
                    code: status.code().unwrap_or(-1),
                    stdout: read(&stdout_path),
                    stderr: read(&stderr_path),
                });
            }
            assert!(
                Instant::now() < deadline,
                "serve did not announce itself in 30 s; stdout {:?}, stderr {:?}",
                read(&stdout_path),
                read(&stderr_path)
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    pub(crate) fn url(&self) -> String {
        nbd_url(&self.nbd)
    }

    pub(crate) fn control(&self) -> Control {
        Control::connect(&self.ctl)
    }

    pub(crate) fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// SIGKILL and reap; asserts it was still running (it must never exit
    /// on its own).
    pub(crate) fn kill(&mut self) {
        let before = self.proc.child.try_wait().expect("wait");
        assert!(
            before.is_none(),
            "serve exited on its own ({before:?}); stderr: {}",
            self.stderr()
        );
        self.proc.kill();
        let stderr = self.stderr();
        assert!(!stderr.contains("panicked"), "serve panicked: {stderr}");
    }
}

/// One control-socket connection.
pub(crate) struct Control {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Control {
    fn connect(path: &Path) -> Control {
        let stream =
            UnixStream::connect(path).unwrap_or_else(|e| panic!("connect {}: {e}", path.display()));
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .expect("read timeout");
        Control {
            writer: stream.try_clone().expect("clone"),
            reader: BufReader::new(stream),
        }
    }

    pub(crate) fn send(&mut self, bytes: &[u8]) {
        self.writer
            .write_all(bytes)
            .expect("send to control socket");
    }

    /// The next line; `None` at end of stream.
    fn line(&mut self) -> Option<String> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => None,
            Ok(_) => Some(line),
            Err(e) => panic!("read from control socket: {e}"),
        }
    }

    fn reply(&mut self) -> Value {
        let line = self.line().expect("a reply, not the end of the stream");
        assert!(line.ends_with('\n'), "{line:?}");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("reply {line:?}: {e}"))
    }

    pub(crate) fn request(&mut self, command: &str) -> Value {
        self.send(format!("{}\n", json!({ "command": command })).as_bytes());
        self.reply()
    }

    pub(crate) fn phase(&mut self) -> String {
        let reply = self.request("status");
        assert_eq!(reply["ok"], true, "{reply}");
        reply["result"]["phase"]
            .as_str()
            .unwrap_or_else(|| panic!("no phase in {reply}"))
            .to_string()
    }

    pub(crate) fn wait_phase(&mut self, want: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let phase = self.phase();
            if phase == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "still {phase} after {timeout:?}, waiting for {want}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

fn assert_refused(reply: &Value, kind: &str) {
    assert_eq!(reply["ok"], false, "{reply}");
    assert_eq!(reply["error"]["kind"], kind, "{reply}");
    assert!(
        reply["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{reply}"
    );
}

fn run(args: &[&str]) -> crate::support::Run {
    run_copyctl(args)
}

pub(crate) fn path_str(path: &Path) -> &str {
    path.to_str().expect("UTF-8 path")
}

fn qemu_img_compare(a: &Path, b: &str) -> Tool {
    tool(
        "qemu-img",
        ["compare", "-f", "raw", "-F", "raw", path_str(a), b],
        TOOL_TIMEOUT,
    )
}

// ------------------------------------------------------------ 1. interop

/// The guest-side model of an image: every change applied in memory.
struct Model(Vec<u8>);

impl Model {
    fn write(&mut self, offset: u64, len: u64, byte: u8) {
        self.0[offset as usize..(offset + len) as usize].fill(byte);
    }
}

#[test]
fn qemu_tools_through_serve_while_the_copy_runs() {
    let size = 8 * MIB;
    let layout = Layout::new(size);
    // 8 MiB at 2 MiB/s: four seconds of copying.
    let mut serve = layout.serve("", &["--bandwidth", "2M"]);
    assert_eq!(serve.announced["phase"], "copying", "{}", serve.announced);
    assert_eq!(serve.announced["authoritative"], "source");
    let url = serve.url();
    let mut ctl = serve.control();
    assert_eq!(ctl.phase(), "copying");

    // qemu-img info: the size.
    let info = tool(
        "qemu-img",
        ["info", "--output", "json", "-f", "raw", &url],
        TOOL_TIMEOUT,
    );
    assert_eq!(info.code, 0, "{}", info.text());
    let info: Value = serde_json::from_str(&info.stdout).expect("qemu-img info JSON");
    assert_eq!(info["virtual-size"], size, "{info}");

    // qemu-img convert a local image (data, and a 1 MiB hole that must
    // become zeros over the source's data) into the export.
    let local = layout.path("local.img");
    let mut model = Model(vec![0u8; size as usize]);
    for (block, chunk) in model.0.chunks_mut(4096).enumerate() {
        chunk.fill((block * 7 + 3) as u8);
    }
    model.write(4 * MIB, MIB, 0);
    {
        let mut file = std::fs::File::create(&local).expect("local image");
        file.write_all(&model.0[..(4 * MIB) as usize])
            .expect("write");
        file.set_len(5 * MIB).expect("hole");
        use std::io::Seek;
        file.seek(std::io::SeekFrom::Start(5 * MIB)).expect("seek");
        file.write_all(&model.0[(5 * MIB) as usize..])
            .expect("write");
    }
    let convert = tool(
        "qemu-img",
        [
            "convert",
            "-n",
            "-f",
            "raw",
            "-O",
            "raw",
            path_str(&local),
            &url,
        ],
        TOOL_TIMEOUT,
    );
    assert_eq!(convert.code, 0, "{}", convert.text());

    // Writes with and without FUA (writeback cache: only `-f` carries it),
    // a flush, write-zeroes and a discard, then reads of every pattern.
    let writes = [
        ("write -P 0x11 0 64k", 0, 64 * KIB, 0x11),
        ("write -f -P 0x22 1048576 64k", MIB, 64 * KIB, 0x22),
        ("write -P 0x33 3149824 4k", 3 * MIB + 4 * KIB, 4 * KIB, 0x33),
        (
            "write -f -P 0x44 6356992 8k",
            6 * MIB + 64 * KIB,
            8 * KIB,
            0x44,
        ),
    ];
    let mut commands: Vec<&str> = writes.iter().map(|w| w.0).collect();
    commands.extend([
        "flush",
        "write -z 2097152 128k",
        "discard 5242880 64k",
        "flush",
    ]);
    for &(_, offset, len, byte) in &writes {
        model.write(offset, len, byte);
    }
    model.write(2 * MIB, 128 * KIB, 0);
    model.write(5 * MIB, 64 * KIB, 0);
    let out = qemu_io(&url, &["-t", "writeback"], &commands);
    assert_io_ok(&out, writes.len() + 1, 0);
    assert_eq!(count_done(&out.stdout, "discard"), 1, "{}", out.text());
    let checks = [
        "read -P 0x11 0 64k",
        "read -P 0x22 1048576 64k",
        "read -P 0x33 3149824 4k",
        "read -P 0x44 6356992 8k",
        "read -P 0 2097152 128k",
        "read -P 0 5242880 64k",
        "read -P 0 4194304 1m",
        // Block 300 of the local image: 300 * 7 + 3 = 2103 = 0x37 mod 256.
        "read -P 0x37 1228800 4k",
    ];
    let checks: Vec<String> = checks.iter().map(|c| c.to_string()).collect();
    let out = qemu_io(&url, &[], &checks);
    assert_io_ok(&out, 0, checks.len());
    // A wrong pattern is detected: the checks above can fail.
    let wrong = qemu_io(&url, &[], &["read -P 0x12 0 64k"]);
    assert_ne!(wrong.code, 0, "{}", wrong.text());
    assert!(
        wrong.all().contains("Pattern verification failed"),
        "{}",
        wrong.text()
    );
    // All of that happened while the bulk pass was still running.
    let status = ctl.request("status");
    assert_eq!(status["result"]["phase"], "copying", "{status}");
    assert!(
        status["result"]["offset"].as_u64().expect("offset") < size,
        "{status}"
    );

    // Switch (waiting for the copy), write to the destination alone, complete.
    let ctl_path = path_str(&serve.ctl).to_string();
    let switched = run(&[
        "--output",
        "json",
        "switch",
        "--wait",
        "60",
        "--control",
        &ctl_path,
    ]);
    assert_eq!(switched.code, 0, "{}\n{}", switched.stdout, switched.stderr);
    let switched: Value = serde_json::from_str(&switched.stdout).expect("switch JSON");
    assert!(switched["pause_ms"].as_f64().is_some(), "{switched}");
    let out = qemu_io(
        &url,
        &["-t", "writeback"],
        &["write -P 0x55 7340032 64k", "flush"],
    );
    assert_io_ok(&out, 1, 0);
    model.write(7 * MIB, 64 * KIB, 0x55);
    let completed = run(&["complete", "--control", &ctl_path]);
    assert_eq!(
        completed.code, 0,
        "{}\n{}",
        completed.stdout, completed.stderr
    );
    assert_eq!(ctl.phase(), "completed");

    // The export now reads the destination: the same data.
    let mut after = checks.clone();
    after.push("read -P 0x55 7340032 64k".into());
    let out = qemu_io(&url, &[], &after);
    assert_io_ok(&out, 0, after.len());
    let model_path = layout.path("model.img");
    std::fs::write(&model_path, &model.0).expect("model image");
    let live = qemu_img_compare(&model_path, &url);
    assert_eq!(live.code, 0, "export vs model: {}", live.text());

    drop(ctl);
    serve.kill();
    let dest = qemu_img_compare(&model_path, path_str(&layout.dest));
    assert_eq!(dest.code, 0, "destination vs model: {}", dest.text());
    assert!(
        dest.stdout.contains("Images are identical"),
        "{}",
        dest.text()
    );
    // The source was retired at the switch: it missed the last write.
    let source = qemu_img_compare(&model_path, path_str(&layout.source));
    assert_eq!(source.code, 1, "source vs model: {}", source.text());
}

// ------------------------------------------------------------ 2. control

#[test]
fn control_socket_commands_events_garbage_and_permissions() {
    let size = 8 * MIB;
    let layout = Layout::new(size);
    // 8 MiB at 2 MiB/s: four seconds before Ready.
    let mut serve = layout.serve("", &["--bandwidth", "2M"]);
    let ctl_path = path_str(&serve.ctl).to_string();

    // Both sockets are sockets of mode 0600.
    for socket in [&serve.nbd, &serve.ctl] {
        let meta = std::fs::symlink_metadata(socket).expect("stat socket");
        assert!(meta.file_type().is_socket(), "{}", socket.display());
        assert_eq!(
            meta.permissions().mode() & 0o7777,
            0o600,
            "{}",
            socket.display()
        );
    }

    let mut events = serve.control();
    let subscribed = events.request("subscribe");
    assert_eq!(subscribed, json!({"ok": true, "result": "subscribed"}));

    let mut ctl = serve.control();
    let status = ctl.request("status");
    assert_eq!(status["ok"], true, "{status}");
    assert_eq!(status["result"]["phase"], "copying", "{status}");
    assert_eq!(status["result"]["ready"], false, "{status}");
    assert_eq!(status["result"]["len"], size, "{status}");
    // An id is echoed.
    ctl.send(b"{\"command\":\"status\",\"id\":\"abc\"}\n");
    let reply = ctl.reply();
    assert_eq!(
        (&reply["ok"], &reply["id"]),
        (&json!(true), &json!("abc")),
        "{reply}"
    );

    // Switch before Ready is refused, on the socket and through the CLI.
    assert_refused(&ctl.request("switch"), "invalid-input");
    let cli = run(&["switch", "--control", &ctl_path]);
    assert_eq!(cli.code, 9, "{}\n{}", cli.stdout, cli.stderr);
    // An error for people: on stderr, nothing on stdout.
    assert!(cli.stderr.contains("switch refused"), "{}", cli.stderr);
    assert!(cli.stdout.is_empty(), "{}", cli.stdout);
    let cli = run(&["--output", "json", "switch", "--control", &ctl_path]);
    assert_eq!(cli.code, 9, "{}\n{}", cli.stdout, cli.stderr);
    let cli: Value = serde_json::from_str(&cli.stdout).expect("switch JSON");
    assert_refused(&cli, "invalid-input");
    assert_refused(&ctl.request("complete"), "invalid-input");
    let cli = run(&["--output", "json", "status", "--control", &ctl_path]);
    assert_eq!(cli.code, 0, "{}", cli.stderr);
    let cli: Value = serde_json::from_str(&cli.stdout).expect("status JSON");
    assert_eq!(cli["phase"], "copying", "{cli}");

    // Garbage gets bad-request replies and the connection keeps working.
    let garbage: [&[u8]; 7] = [
        b"hello\n",
        b"{}\n",
        b"\xff\xfe\xfd\n",
        b"[1,2]\n",
        b"{\"command\":\"format-disk\"}\n",
        b"{\"command\":\"status\",\"force\":true}\n",
        b"{\"command\":3}\n",
    ];
    for line in garbage {
        ctl.send(line);
        let reply = ctl.reply();
        assert_refused(&reply, "bad-request");
        assert_eq!(
            ctl.phase(),
            "copying",
            "after {:?}",
            String::from_utf8_lossy(line)
        );
    }
    // A 10 KiB line: refused; this connection may end, a new one works.
    let mut long = vec![b'x'; 10 * KIB as usize];
    long.push(b'\n');
    ctl.send(&long);
    assert_refused(&ctl.reply(), "bad-request");
    let mut ctl = serve.control();
    assert_eq!(ctl.phase(), "copying");

    // Another user: refused by the socket's mode, and by the server's peer
    // check when the mode lets it through. Becoming another user needs root,
    // which the project's machines and CI have; elsewhere this fails rather
    // than skip.
    assert_eq!(
        livecopy::socket::own_uid(),
        0,
        "this test must run as root to act as another user"
    );
    other_user_is_refused(&layout, &serve);

    // Ready, switch (the CLI waits), complete; the events arrive in order.
    let cli = run(&[
        "--output",
        "json",
        "switch",
        "--wait",
        "60",
        "--control",
        &ctl_path,
    ]);
    assert_eq!(cli.code, 0, "{}\n{}", cli.stdout, cli.stderr);
    let switched: Value = serde_json::from_str(&cli.stdout).expect("switch JSON");
    assert!(switched["pause_ms"].as_f64().is_some(), "{switched}");
    assert_refused(&ctl.request("switch"), "invalid-input");
    assert_refused(&ctl.request("abort"), "invalid-input");
    let cli = run(&["--output", "json", "complete", "--control", &ctl_path]);
    assert_eq!(cli.code, 0, "{}\n{}", cli.stdout, cli.stderr);
    let status = ctl.request("status");
    assert_eq!(status["result"]["phase"], "completed", "{status}");
    assert!(
        status["result"]["switch_pause_ms"].as_f64().is_some(),
        "{status}"
    );

    let mut seen = Vec::new();
    while seen.len() < 3 {
        let line = events.line().expect("event stream ended early");
        let event: Value = serde_json::from_str(&line).expect("event JSON");
        seen.push(event);
    }
    let names: Vec<&str> = seen
        .iter()
        .map(|e| e["event"].as_str().unwrap_or("?"))
        .collect();
    assert_eq!(names, ["ready", "switched", "completed"], "{seen:?}");
    let pause = seen[1]["pause_ms"].as_f64().expect("pause_ms");
    assert!((0.0..60_000.0).contains(&pause), "{seen:?}");
    drop((events, ctl));
    serve.kill();
}

/// Runs `program` as uid and gid 65534 (nobody), without supplementary
/// groups.
fn as_nobody(program: &str, args: &[&str]) -> Tool {
    let mut all = vec![
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--",
        program,
    ];
    all.extend_from_slice(args);
    tool("setpriv", &all, TOOL_TIMEOUT)
}

/// `copyctl --output json status` on `serve`'s control socket, as nobody.
fn status_as_nobody(serve: &Serve) -> Tool {
    as_nobody(
        COPYCTL,
        &[
            "--output",
            "json",
            "status",
            "--control",
            path_str(&serve.ctl),
        ],
    )
}

/// Asserts that a control client of another user got no status: no
/// result on stdout, and if a reply came, a permission-denied one.
fn assert_no_status(out: &Tool) {
    assert!(!out.stdout.contains("phase"), "{}", out.text());
    if !out.stdout.trim().is_empty() {
        let reply: Value = serde_json::from_str(&out.stdout)
            .unwrap_or_else(|e| panic!("a refusal reply: {e}\n{}", out.text()));
        assert_refused(&reply, "permission-denied");
    }
}

/// Makes `serve`'s directory traversable and its control socket
/// world-writable, so that another user reaches the server's peer check;
/// restores both when dropped.
struct OpenToOthers<'a> {
    dir: &'a Path,
    ctl: &'a Path,
}

impl<'a> OpenToOthers<'a> {
    fn new(layout: &'a Layout, serve: &'a Serve) -> OpenToOthers<'a> {
        let open = OpenToOthers {
            dir: layout.dir.path(),
            ctl: &serve.ctl,
        };
        std::fs::set_permissions(open.dir, std::fs::Permissions::from_mode(0o711))
            .expect("chmod dir");
        std::fs::set_permissions(open.ctl, std::fs::Permissions::from_mode(0o666))
            .expect("chmod socket");
        open
    }
}

impl Drop for OpenToOthers<'_> {
    fn drop(&mut self) {
        let _ = std::fs::set_permissions(self.ctl, std::fs::Permissions::from_mode(0o600));
        let _ = std::fs::set_permissions(self.dir, std::fs::Permissions::from_mode(0o700));
    }
}

/// As uid/gid 65534: connecting to the 0600 sockets fails even where the
/// directory lets the user reach them, and once the control socket is made
/// world-writable the server's own peer check refuses.
fn other_user_is_refused(layout: &Layout, serve: &Serve) {
    // The temporary directory is 0700: not even the path resolves.
    let out = status_as_nobody(serve);
    assert_ne!(out.code, 0, "{}", out.text());
    assert_no_status(&out);
    // Let nobody through the directory: the sockets' own mode refuses.
    let dir = layout.dir.path();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711)).expect("chmod dir");
    let out = status_as_nobody(serve);
    let url = serve.url();
    let nbd = as_nobody("qemu-io", &["-f", "raw", "-r", &url, "-c", "read 0 4k"]);
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).expect("chmod dir");
    assert_ne!(out.code, 0, "{}", out.text());
    assert_no_status(&out);
    assert!(out.stderr.contains("ermission denied"), "{}", out.text());
    assert_ne!(nbd.code, 0, "{}", nbd.text());
    assert_eq!(count_done(&nbd.stdout, "read"), 0, "{}", nbd.text());
    assert!(nbd.stderr.contains("ermission denied"), "{}", nbd.text());
    // A world-writable control socket: the server checks the peer's uid.
    let open = OpenToOthers::new(layout, serve);
    for _ in 0..5 {
        assert_no_status(&status_as_nobody(serve));
    }
    drop(open);
}

/// A control command the engine refuses at once (as its peer check does
/// for another user: reply permission-denied, close, without reading the
/// request) must make the CLI exit non-zero (README: exit 1), never 0 with
/// nothing printed, however the refusal races the request's write. A stand-in
/// server answers here, so no second user is needed.
#[test]
fn a_control_command_refused_before_it_is_read_never_exits_zero() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("ctl.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).expect("bind");
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let server = {
        let stop = std::sync::Arc::clone(&stop);
        std::thread::spawn(move || {
            let reply = b"{\"ok\":false,\"error\":{\"kind\":\"permission-denied\",\
                          \"message\":\"only the engine's own user may control it\"}}\n";
            // Blocking accepts: the refusal goes out as fast as it can.
            for stream in listener.incoming() {
                if stop.load(Ordering::Acquire) {
                    break;
                }
                if let Ok(mut stream) = stream {
                    let _ = stream.write_all(reply);
                }
            }
        })
    };
    let _stop_server = StopOnDrop(&stop);
    let socket = path_str(&path).to_string();
    let runs: Vec<crate::support::Run> = (0..40)
        .map(|_| run(&["--output", "json", "status", "--control", &socket]))
        .collect();
    stop.store(true, Ordering::Release);
    // Wake the accept call.
    let _ = UnixStream::connect(&path);
    server.join().expect("stand-in server");
    let zero: Vec<String> = runs
        .iter()
        .filter(|out| out.code == 0)
        .map(|out| format!("stdout {:?}, stderr {:?}", out.stdout, out.stderr))
        .collect();
    assert!(
        zero.is_empty(),
        "{} of {} refused status commands exited 0; the first: {}",
        zero.len(),
        runs.len(),
        zero[0]
    );
    for out in &runs {
        assert!(!out.stdout.contains("phase"), "{}", out.stdout);
    }
}

// ------------------------------------------------------------ 3. restart

#[test]
fn serve_restarts_over_a_finished_job_and_refuses_a_locked_journal() {
    let size = 4 * MIB;
    let layout = Layout::new(size);
    let mut first = layout.serve("1", &[]);
    let url = first.url();
    let ctl = path_str(&first.ctl).to_string();
    let out = qemu_io(
        &url,
        &["-t", "writeback"],
        &["write -P 0x5a 0 64k", "flush"],
    );
    assert_io_ok(&out, 1, 0);
    let cli = run(&["switch", "--wait", "60", "--control", &ctl]);
    assert_eq!(cli.code, 0, "{}\n{}", cli.stdout, cli.stderr);
    let out = qemu_io(
        &url,
        &["-t", "writeback"],
        &["write -P 0x5b 1048576 64k", "flush"],
    );
    assert_io_ok(&out, 1, 0);
    first.kill();

    // Switched, not completed: the restart serves the destination and can
    // record the completion.
    let mut second = layout.serve("2", &[]);
    assert_eq!(
        second.announced["phase"], "switched",
        "{}",
        second.announced
    );
    assert_eq!(second.announced["authoritative"], "destination");
    let mut ctl2 = second.control();
    let status = ctl2.request("status");
    assert_eq!(status["result"]["phase"], "switched", "{status}");
    assert_eq!(status["result"]["authoritative"], "destination", "{status}");
    assert_refused(&ctl2.request("switch"), "invalid-input");
    assert_refused(&ctl2.request("abort"), "invalid-input");
    assert_refused(&ctl2.request("subscribe"), "invalid-input");
    let ctl2_path = path_str(&second.ctl).to_string();
    let cli = run(&["complete", "--control", &ctl2_path]);
    assert_eq!(cli.code, 0, "{}\n{}", cli.stdout, cli.stderr);
    assert_eq!(ctl2.phase(), "completed");
    // Idempotent: a retrying manager is told it is done.
    let again = ctl2.request("complete");
    assert_eq!(
        (&again["ok"], &again["result"]["already_completed"]),
        (&json!(true), &json!(true)),
        "{again}"
    );

    // A second engine on the same journal: locked, exit 6; the first goes on.
    let locked = tool(
        COPYCTL,
        layout.serve_args("3", &[]),
        Duration::from_secs(30),
    );
    assert_eq!(locked.code, 6, "{}", locked.text());
    assert!(locked.stderr.contains("locked"), "{}", locked.text());
    assert!(!layout.nbd("3").exists() && !layout.ctl("3").exists());
    assert_eq!(ctl2.phase(), "completed");
    drop(ctl2);
    second.kill();

    // Completed: the restart serves the destination, with every write.
    let mut third = layout.serve("4", &[]);
    assert_eq!(third.announced["phase"], "completed", "{}", third.announced);
    assert_eq!(third.announced["authoritative"], "destination");
    let mut checks = vec![
        "read -P 0x5a 0 64k".to_string(),
        "read -P 0x5b 1048576 64k".to_string(),
    ];
    checks.extend([2u64, 40, 63].map(|r| format!("read -P {} {} 64k", source_byte(r), r * REGION)));
    let out = qemu_io(&third.url(), &[], &checks);
    assert_io_ok(&out, 0, checks.len());
    // Writes there go to the destination file.
    let out = qemu_io(
        &third.url(),
        &["-t", "writeback"],
        &["write -P 0x5c 2097152 64k", "flush"],
    );
    assert_io_ok(&out, 1, 0);
    third.kill();
    let out = qemu_io(
        path_str(&layout.dest),
        &["-r"],
        &["read -P 0x5c 2097152 64k", "read -P 0x5b 1048576 64k"],
    );
    assert_io_ok(&out, 0, 2);
    let recovered = run(&["--output", "json", "recover", path_str(&layout.journal)]);
    assert_eq!(recovered.code, 0, "{}", recovered.stderr);
    let recovered: Value = serde_json::from_str(&recovered.stdout).expect("recover JSON");
    assert_eq!(recovered["phase"], "completed", "{recovered}");
    assert_eq!(recovered["authoritative"], "destination", "{recovered}");
}

#[test]
fn serve_refuses_an_unfinished_job_without_resume_and_starts_it_over_with_it() {
    let size = 8 * MIB;
    let layout = Layout::new(size);
    let mut model = Model(source_contents(size));
    // 8 MiB at 2 MiB/s: far from Ready when killed.
    let mut first = layout.serve("1", &["--bandwidth", "2M"]);
    let out = qemu_io(
        &first.url(),
        &["-t", "writeback"],
        &[
            "write -P 0x61 65536 64k",
            "write -P 0x62 7340032 64k",
            "flush",
        ],
    );
    assert_io_ok(&out, 2, 0);
    model.write(64 * KIB, 64 * KIB, 0x61);
    model.write(7 * MIB, 64 * KIB, 0x62);
    assert_eq!(first.control().phase(), "copying");
    first.kill();

    let refused = tool(
        COPYCTL,
        layout.serve_args("2", &[]),
        Duration::from_secs(30),
    );
    assert_ne!(refused.code, 0, "{}", refused.text());
    assert_eq!(refused.code, 9, "{}", refused.text());
    assert!(refused.stderr.contains("--resume"), "{}", refused.text());
    assert!(!layout.nbd("2").exists() && !layout.ctl("2").exists());
    // Nothing changed: recovery still says copying, the source.
    let recovered = run(&["--output", "json", "recover", path_str(&layout.journal)]);
    assert_eq!(recovered.code, 0, "{}", recovered.stderr);
    let recovered: Value = serde_json::from_str(&recovered.stdout).expect("recover JSON");
    assert_eq!(recovered["phase"], "copying", "{recovered}");
    assert_eq!(recovered["authoritative"], "source", "{recovered}");

    let mut resumed = layout.serve("3", &["--resume", "--bandwidth", "16M"]);
    assert_eq!(
        resumed.announced["phase"], "copying",
        "{}",
        resumed.announced
    );
    assert_eq!(resumed.announced["authoritative"], "source");
    let mut ctl = resumed.control();
    let status = ctl.request("status");
    assert_eq!(status["result"]["phase"], "copying", "{status}");

    // While it runs, a second engine is locked out.
    let locked = tool(
        COPYCTL,
        layout.serve_args("4", &["--resume"]),
        Duration::from_secs(30),
    );
    assert_eq!(locked.code, 6, "{}", locked.text());

    let out = qemu_io(
        &resumed.url(),
        &["-t", "writeback"],
        &[
            "read -P 0x61 65536 64k",
            "write -P 0x63 131072 64k",
            "flush",
        ],
    );
    assert_io_ok(&out, 1, 1);
    model.write(128 * KIB, 64 * KIB, 0x63);
    let ctl_path = path_str(&resumed.ctl).to_string();
    let cli = run(&["switch", "--wait", "60", "--control", &ctl_path]);
    assert_eq!(cli.code, 0, "{}\n{}", cli.stdout, cli.stderr);
    let cli = run(&["complete", "--control", &ctl_path]);
    assert_eq!(cli.code, 0, "{}\n{}", cli.stdout, cli.stderr);
    assert_eq!(ctl.phase(), "completed");
    drop(ctl);
    resumed.kill();
    let model_path = layout.path("model.img");
    std::fs::write(&model_path, &model.0).expect("model image");
    let compare = qemu_img_compare(&model_path, path_str(&layout.dest));
    assert_eq!(compare.code, 0, "destination vs model: {}", compare.text());
}

/// A journal with one flipped byte in a copy of its newest record: `serve`
/// repairs it and serves at the first attempt (it used to exit 9 after the
/// repair, and serve only at the second).
#[test]
fn serve_after_a_repair_serves_at_the_first_attempt() {
    let layout = Layout::new(MIB);
    let copied = run(&[
        "copy",
        "--journal",
        path_str(&layout.journal),
        path_str(&layout.source),
        path_str(&layout.dest),
    ]);
    assert_eq!(copied.code, 0, "{}", copied.stderr);
    // Completed is seq 3, in slot 3; copy B is block 8.
    let mut bytes = std::fs::read(&layout.journal).expect("read journal");
    bytes[8 * 4096 + 150] ^= 0x04;
    std::fs::write(&layout.journal, &bytes).expect("write journal");

    let mut serve = match Serve::try_start(&layout, "1", &[]) {
        Ok(serve) => serve,
        Err(run) => panic!("serve refused at the first attempt:\n{}", run.text()),
    };
    assert_eq!(serve.announced["phase"], "completed", "{}", serve.announced);
    assert_eq!(serve.announced["authoritative"], "destination");
    serve.kill();
    let backups = std::fs::read_dir(layout.dir.path())
        .expect("list")
        .filter(|e| {
            e.as_ref()
                .expect("entry")
                .file_name()
                .to_string_lossy()
                .contains(".broken.")
        })
        .count();
    assert_eq!(backups, 1, "one backup before the one repair");
    let recovered = run(&["--output", "json", "recover", path_str(&layout.journal)]);
    assert_eq!(recovered.code, 0, "{}", recovered.stderr);
    let recovered: Value = serde_json::from_str(&recovered.stdout).expect("recover JSON");
    assert_eq!(recovered["decision"], "intact", "{recovered}");
}

/// After a kill, `serve` with the very same arguments must start again: the
/// sockets the dead engine left are stale (nobody answers), as the control
/// socket already handles.
#[test]
fn serve_restarts_over_the_stale_sockets_of_a_killed_engine() {
    let layout = Layout::new(MIB);
    let mut first = layout.serve("", &[]);
    let ctl = path_str(&first.ctl).to_string();
    let cli = run(&["switch", "--wait", "60", "--control", &ctl]);
    assert_eq!(cli.code, 0, "{}\n{}", cli.stdout, cli.stderr);
    let cli = run(&["complete", "--control", &ctl]);
    assert_eq!(cli.code, 0, "{}\n{}", cli.stdout, cli.stderr);
    first.kill();
    assert!(layout.nbd("").exists(), "the killed engine left its socket");
    let mut second = layout.serve("", &[]);
    assert_eq!(
        second.announced["phase"], "completed",
        "{}",
        second.announced
    );
    let out = qemu_io(
        &second.url(),
        &[],
        &[format!("read -P {} 0 64k", source_byte(0))],
    );
    assert_io_ok(&out, 0, 1);
    second.kill();
}

/// A long-running command's announcement is read line by line by whoever
/// started it: under `--output json` it is one line of JSON.
#[test]
fn serve_announces_itself_in_one_json_line() {
    let layout = Layout::new(MIB);
    let mut serve = layout.serve("", &[]);
    let stdout = std::fs::read_to_string(&serve.stdout_path).expect("stdout");
    serve.kill();
    let first = stdout.lines().next().unwrap_or_default();
    let parsed: Result<Value, _> = serde_json::from_str(first);
    assert!(
        parsed.is_ok_and(|v| v["event"] == "serving"),
        "the first line of serve's stdout is not the JSON announcement: {first:?} (all: {stdout:?})"
    );
}

// ------------------------------------------------------------ 4. kills

/// splitmix64: small, seedable, good enough to spread kills.
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    pub(crate) fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            items.swap(i, j);
        }
    }
}

/// Where the kill is aimed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Target {
    /// During the bulk pass.
    Copying,
    /// After Ready (the status said so), a few batches later.
    Ready,
    /// 0 to 5 ms after the switch request was sent.
    Switching,
    /// After the switch reply, a few batches later.
    Switched,
}

impl Target {
    const ALL: [Target; 4] = [
        Target::Copying,
        Target::Ready,
        Target::Switching,
        Target::Switched,
    ];

    fn name(self) -> &'static str {
        match self {
            Target::Copying => "copying",
            Target::Ready => "ready",
            Target::Switching => "switching",
            Target::Switched => "switched",
        }
    }
}

/// One qemu-io invocation of the guest.
pub(crate) struct Batch {
    pub(crate) regions: Vec<u64>,
    /// Every write and the flush succeeded.
    pub(crate) acked: bool,
}

/// The guest: batches of 64 KiB pattern writes on distinct regions, each
/// followed by a flush, until told to stop or out of regions.
pub(crate) fn guest_writer(
    url: &str,
    order: &[u64],
    seed: u64,
    stop: &AtomicBool,
    log: &Mutex<Vec<Batch>>,
    acked: &AtomicUsize,
) {
    guest_writer_over(url, &[], order, seed, stop, log, acked);
}

/// [`guest_writer`] through `target` with extra qemu-io `options` (a TLS
/// credentials object, say).
pub(crate) fn guest_writer_over(
    target: &str,
    options: &[String],
    order: &[u64],
    seed: u64,
    stop: &AtomicBool,
    log: &Mutex<Vec<Batch>>,
    acked: &AtomicUsize,
) {
    let mut options_args: Vec<&str> = vec!["-t", "writeback"];
    options_args.extend(options.iter().map(String::as_str));
    let mut rng = Rng(seed);
    let mut next = 0;
    while !stop.load(Ordering::Acquire) && next < order.len() {
        let n = (2 + rng.below(3) as usize).min(order.len() - next);
        let regions = order[next..next + n].to_vec();
        next += n;
        let mut commands: Vec<String> = regions
            .iter()
            .map(|&r| format!("write -P {} {} 64k", guest_byte(r), r * REGION))
            .collect();
        commands.push("flush".into());
        let out = qemu_io(target, &options_args, &commands);
        let ok = out.code == 0
            && !out.all().contains("failed")
            && regions.iter().all(|r| {
                let line = format!("wrote 65536/65536 bytes at offset {}", r * REGION);
                out.stdout.lines().any(|l| l == line)
            });
        log.lock().expect("log").push(Batch { regions, acked: ok });
        if ok {
            acked.fetch_add(1, Ordering::AcqRel);
        }
    }
}

/// Sets the flag when dropped, so a panicking test stops its writer before
/// the thread scope waits for it.
pub(crate) struct StopOnDrop<'a>(pub(crate) &'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

pub(crate) fn wait_acked(acked: &AtomicUsize, at_least: usize, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while acked.load(Ordering::Acquire) < at_least {
        assert!(
            Instant::now() < deadline,
            "{what}: the guest had {} acknowledged batches after 20 s, waiting for {at_least}",
            acked.load(Ordering::Acquire)
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// What one kill left to check.
struct KillReport {
    phase: String,
    authoritative: String,
    acked_batches: usize,
    acked_regions: usize,
    unwritten_checked: usize,
}

const KILL_SIZE: u64 = 32 * MIB;

/// How the guest reaches serve.
#[derive(Clone, Copy)]
enum GuestLink<'a> {
    /// The NBD Unix socket.
    Unix,
    /// TCP on 127.0.0.1 with TLS: serve's credentials and the guest's.
    Tls { server: &'a Path, client: &'a Path },
}

fn kill_once(
    iteration: usize,
    seed: u64,
    target: Target,
    source: &[u8],
    link: GuestLink,
) -> KillReport {
    let mut rng = Rng(seed);
    let layout = Layout::with_source(source);
    // 32 MiB at 32 MiB/s: about a second of copying.
    let mut extra = vec!["--bandwidth", "32M"];
    if let GuestLink::Tls { server, .. } = link {
        extra.extend(["--tcp", "127.0.0.1:0", "--tls-creds", path_str(server)]);
    }
    let mut serve = layout.serve("", &extra);
    let (url, options) = match link {
        GuestLink::Unix => (serve.url(), Vec::new()),
        GuestLink::Tls { client, .. } => {
            let announced = &serve.announced;
            assert_eq!(announced["tcp_tls"], true, "{announced}");
            let addr: std::net::SocketAddr = announced["tcp"]
                .as_str()
                .and_then(|a| a.parse().ok())
                .unwrap_or_else(|| panic!("no TCP address announced: {announced}"));
            // With -f raw, json: names the format node, NBD under it.
            let image = serde_json::json!({
                "driver": "raw",
                "file": {
                    "driver": "nbd",
                    "server": {"type": "inet", "host": "127.0.0.1", "port": addr.port().to_string()},
                    "export": announced["export"],
                    "tls-creds": "tls0",
                },
            });
            let object = format!(
                "tls-creds-x509,id=tls0,endpoint=client,dir={}",
                client.display()
            );
            (
                format!("json:{image}"),
                vec!["--object".to_string(), object],
            )
        }
    };
    let regions = KILL_SIZE / REGION;
    let mut order: Vec<u64> = (0..regions).collect();
    rng.shuffle(&mut order);
    let writer_seed = rng.next();
    let stop = AtomicBool::new(false);
    let log = Mutex::new(Vec::new());
    let acked = AtomicUsize::new(0);
    let context = format!(
        "kill {iteration} (seed {seed:#x}, aimed at {})",
        target.name()
    );
    std::thread::scope(|scope| {
        let _stop_writer = StopOnDrop(&stop);
        scope.spawn(|| guest_writer_over(&url, &options, &order, writer_seed, &stop, &log, &acked));
        let mut ctl = serve.control();
        match target {
            Target::Copying => {
                std::thread::sleep(Duration::from_micros(rng.below(800_000)));
            }
            Target::Ready => {
                ctl.wait_phase("ready", Duration::from_secs(30));
                let more = acked.load(Ordering::Acquire) + 1 + rng.below(3) as usize;
                wait_acked(&acked, more, &context);
                std::thread::sleep(Duration::from_micros(rng.below(10_000)));
            }
            Target::Switching => {
                ctl.wait_phase("ready", Duration::from_secs(30));
                let more = acked.load(Ordering::Acquire) + rng.below(2) as usize;
                wait_acked(&acked, more, &context);
                ctl.send(b"{\"command\":\"switch\"}\n");
                // 0 to 5 ms, skewed hard towards 0: a switch with little
                // to sync takes well under a millisecond, and the moments
                // inside it matter most.
                let r = rng.below(5_001);
                std::thread::sleep(Duration::from_micros(r * r * r / 25_000_000));
            }
            Target::Switched => {
                ctl.wait_phase("ready", Duration::from_secs(30));
                let reply = ctl.request("switch");
                assert_eq!(reply["ok"], true, "{context}: {reply}");
                let more = acked.load(Ordering::Acquire) + 1 + rng.below(3) as usize;
                wait_acked(&acked, more, &context);
                std::thread::sleep(Duration::from_micros(rng.below(10_000)));
            }
        }
        serve.kill();
        stop.store(true, Ordering::Release);
    });
    let batches = log.into_inner().expect("log");

    let recovered = run(&["--output", "json", "recover", path_str(&layout.journal)]);
    assert_eq!(
        recovered.code, 0,
        "{context}: recover failed\n{}\n{}",
        recovered.stdout, recovered.stderr
    );
    let recovered: Value = serde_json::from_str(&recovered.stdout).expect("recover JSON");
    let phase = recovered["phase"].as_str().expect("phase").to_string();
    let authoritative = recovered["authoritative"]
        .as_str()
        .expect("authoritative")
        .to_string();
    let image = recovered["image"]["path"]
        .as_str()
        .expect("image path")
        .to_string();
    let allowed: &[&str] = match target {
        Target::Copying => &["copying", "ready"],
        Target::Ready => &["ready"],
        Target::Switching => &["ready", "switched"],
        Target::Switched => &["switched"],
    };
    assert!(
        allowed.contains(&phase.as_str()),
        "{context}: recovered {recovered}"
    );
    let (want_side, want_image) = if phase == "switched" {
        ("destination", &layout.dest)
    } else {
        ("source", &layout.source)
    };
    assert_eq!(authoritative, want_side, "{context}: {recovered}");
    assert_eq!(
        std::fs::canonicalize(&image).expect("named image"),
        std::fs::canonicalize(want_image).expect("image"),
        "{context}: {recovered}"
    );

    // Every acknowledged region holds its pattern; regions never written
    // still hold the source's bytes.
    let mut commands = Vec::new();
    let mut acked_regions = 0;
    let acked_batches = batches.iter().filter(|b| b.acked).count();
    for batch in batches.iter().filter(|b| b.acked) {
        for &r in &batch.regions {
            commands.push(format!("read -P {} {} 64k", guest_byte(r), r * REGION));
            acked_regions += 1;
        }
    }
    let touched: BTreeSet<u64> = batches
        .iter()
        .flat_map(|b| b.regions.iter().copied())
        .collect();
    let mut untouched: Vec<u64> = (0..regions).filter(|r| !touched.contains(r)).collect();
    rng.shuffle(&mut untouched);
    untouched.truncate(8);
    for &r in &untouched {
        commands.push(format!("read -P {} {} 64k", source_byte(r), r * REGION));
    }
    if !commands.is_empty() {
        let out = qemu_io(&image, &["-r"], &commands);
        assert!(
            out.code == 0 && !out.all().contains("Pattern verification failed"),
            "{context}: recovery named {image} ({phase}), which lost acknowledged writes \
             or source data:\n{}\nserve stderr: {}",
            out.text(),
            serve.stderr()
        );
        assert_eq!(
            count_done(&out.stdout, "read"),
            commands.len(),
            "{context}: {}",
            out.text()
        );
    }
    if matches!(target, Target::Ready | Target::Switched) {
        assert!(acked_batches > 0, "{context}: no acknowledged batch");
    }
    KillReport {
        phase,
        authoritative,
        acked_batches,
        acked_regions,
        unwritten_checked: untouched.len(),
    }
}

/// LIVECOPY_SEED, or one from the clock; printed for a replay.
fn kill_seed(what: &str) -> u64 {
    let seed: u64 = match std::env::var("LIVECOPY_SEED") {
        Ok(v) => v.parse().expect("LIVECOPY_SEED is a number"),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_nanos() as u64,
    };
    println!("{what}: seed {seed} (replay with LIVECOPY_SEED={seed})");
    seed
}

#[test]
fn kill_serve_at_random_moments_and_recover_every_acknowledged_write() {
    let kills: usize = std::env::var("LIVECOPY_KILLS")
        .ok()
        .map(|v| v.parse().expect("LIVECOPY_KILLS is a number"))
        .unwrap_or(20);
    assert!(kills > 0, "LIVECOPY_KILLS must be at least 1");
    let seed = kill_seed("serve kill test");
    let started = Instant::now();
    let source = source_contents(KILL_SIZE);
    let mut rng = Rng(seed);
    // Every phase gets its share, in a seeded order.
    let mut targets: Vec<Target> = (0..kills).map(|i| Target::ALL[i % 4]).collect();
    rng.shuffle(&mut targets);

    let mut aimed: BTreeMap<&str, usize> = BTreeMap::new();
    let mut landed: BTreeMap<String, usize> = BTreeMap::new();
    let (mut batches, mut regions, mut unwritten) = (0, 0, 0);
    let mut slowest = Duration::ZERO;
    for (i, &target) in targets.iter().enumerate() {
        let one = Instant::now();
        let report = kill_once(i, rng.next(), target, &source, GuestLink::Unix);
        slowest = slowest.max(one.elapsed());
        *aimed.entry(target.name()).or_default() += 1;
        let place = match (target, report.phase.as_str()) {
            (Target::Switching, "ready") => "switching (before the record: source)".to_string(),
            (Target::Switching, _) => "switching (after the record: destination)".to_string(),
            (_, phase) => phase.to_string(),
        };
        *landed
            .entry(format!("{place} -> {}", report.authoritative))
            .or_default() += 1;
        batches += report.acked_batches;
        regions += report.acked_regions;
        unwritten += report.unwritten_checked;
    }
    assert!(batches > 0, "no acknowledged batch in {kills} kills");
    println!(
        "serve kill test: {kills} kills in {:.1} s (slowest {:.2} s); aimed {aimed:?}; \
         landed {landed:?}; {batches} acknowledged batches ({regions} regions) and \
         {unwritten} never-written regions checked, all intact",
        started.elapsed().as_secs_f64(),
        slowest.as_secs_f64()
    );
}

/// The kill test once per phase, with the guest writing over TCP and TLS
/// (`serve --tcp 127.0.0.1:0 --tls-creds`, a client certificate from the
/// same CA) instead of the Unix socket: acknowledged writes that crossed
/// TLS records survive every kill and the recovery.
#[test]
fn kill_serve_with_the_guest_on_tls_and_recover_every_acknowledged_write() {
    use crate::tls::{Ca, Role, creds};
    let seed = kill_seed("serve TLS kill test");
    let pki = tempfile::tempdir().expect("tempdir");
    let ca = Ca::new("kill test CA");
    let server = creds(
        &pki.path().join("server"),
        &ca,
        &ca,
        Role::Server,
        &["127.0.0.1"],
    );
    let client = creds(
        &pki.path().join("client"),
        &ca,
        &ca,
        Role::Client,
        &["guest.example"],
    );
    let link = GuestLink::Tls {
        server: &server,
        client: &client,
    };
    let started = Instant::now();
    let source = source_contents(KILL_SIZE);
    let mut rng = Rng(seed);
    let mut targets = Target::ALL.to_vec();
    rng.shuffle(&mut targets);
    let mut landed = Vec::new();
    let mut batches = 0;
    for (i, &target) in targets.iter().enumerate() {
        let report = kill_once(i, rng.next(), target, &source, link);
        landed.push(format!(
            "{} -> {} -> {}",
            target.name(),
            report.phase,
            report.authoritative
        ));
        batches += report.acked_batches;
    }
    assert!(batches > 0, "no acknowledged batch over TLS");
    println!(
        "serve TLS kill test: {} kills in {:.1} s; {landed:?}; {batches} acknowledged \
         batches, all intact",
        targets.len(),
        started.elapsed().as_secs_f64()
    );
}

/// A socket path that cannot be bound is found out before the journal and
/// the destination are created: a retry with the right path starts afresh.
#[test]
fn serve_checks_its_socket_paths_before_creating_anything() {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    std::fs::File::create(dir.path().join("src.img"))
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    std::fs::write(dir.path().join("taken"), b"a file").unwrap();
    for (socket, control, code) in [
        (p("missing/nbd.sock"), p("ctl.sock"), 5),
        (p("nbd.sock"), p("missing/ctl.sock"), 5),
        (p("taken"), p("ctl.sock"), 9),
    ] {
        let run = crate::support::run_copyctl(&[
            "serve",
            "--journal",
            &p("j"),
            "--source",
            &p("src.img"),
            "--dest",
            &p("dst.img"),
            "--socket",
            &socket,
            "--control",
            &control,
        ]);
        assert_eq!(run.code, code, "{socket} {control}: {}", run.stderr);
        assert!(!dir.path().join("j").exists(), "a journal was left behind");
        assert!(
            !dir.path().join("dst.img").exists(),
            "a destination was left behind"
        );
    }
}

/// After a restart, serve exports the disk's size as the job recorded it
/// (a larger destination never exposes the tail the copy did not write),
/// and refuses an image resized since the job started.
#[test]
fn serve_exports_the_recorded_size_and_refuses_a_resized_image() {
    let size = 4 * MIB;
    let layout = Layout::new(size);
    std::fs::File::create(&layout.dest)
        .and_then(|f| f.set_len(2 * size))
        .expect("an 8 MiB destination");
    let copied = run(&[
        "copy",
        "--journal",
        path_str(&layout.journal),
        path_str(&layout.source),
        path_str(&layout.dest),
    ]);
    assert_eq!(copied.code, 0, "{}\n{}", copied.stdout, copied.stderr);
    let mut serve = layout.serve("1", &[]);
    assert_eq!(serve.announced["phase"], "completed", "{}", serve.announced);
    let info = tool(
        "qemu-img",
        ["info", "--output", "json", "-f", "raw", &serve.url()],
        TOOL_TIMEOUT,
    );
    assert_eq!(info.code, 0, "{}", info.text());
    let info: Value = serde_json::from_str(&info.stdout).expect("qemu-img info JSON");
    assert_eq!(info["virtual-size"], size, "{info}");
    serve.kill();

    std::fs::OpenOptions::new()
        .write(true)
        .open(&layout.dest)
        .and_then(|f| f.set_len(3 * size))
        .expect("resize the destination");
    let refused = Serve::try_start(&layout, "2", &[])
        .err()
        .expect("serve refuses a resized image");
    assert_eq!(refused.code, 9, "{}", refused.text());
    assert!(refused.stderr.contains("resized"), "{}", refused.text());
    assert!(!layout.nbd("2").exists() && !layout.ctl("2").exists());
}

/// `serve` killed (-9) while a qemu-io guest writes, then `serve --resume`:
/// the resumed job copies only what its checkpoints left (the rest of the
/// pass, and the 16 MiB extent the guest kept writing below the cursor),
/// the guest goes on writing through the new engine, the switch
/// completes, and the destination holds every acknowledged write and the
/// source's bytes everywhere else.
#[test]
fn serve_killed_while_the_guest_writes_resumes_and_loses_nothing() {
    let size = 64 * MIB;
    let layout = Layout::new(size);
    let regions = size / REGION;
    let mut rng = Rng(kill_seed("serve resume"));
    // Before the kill the guest writes the first extent (below the
    // cursor: listed while written); after it, anywhere.
    let first_extent = 16 * MIB / REGION;
    let mut order: Vec<u64> = (0..first_extent).collect();
    rng.shuffle(&mut order);
    let mut rest: Vec<u64> = (first_extent..regions).collect();
    rng.shuffle(&mut rest);
    order.extend(rest);
    let stop = AtomicBool::new(false);
    let log = Mutex::new(Vec::new());
    let acked = AtomicUsize::new(0);
    // 64 MiB at 16 MiB/s: killed at about 40 MiB.
    let mut first = layout.serve("1", &["--bandwidth", "16M"]);
    let killed_at = 40 * MIB;
    let url = first.url();
    std::thread::scope(|scope| {
        let _stop_writer = StopOnDrop(&stop);
        scope.spawn(|| {
            guest_writer_over(
                &url,
                &[],
                &order[..first_extent as usize],
                1,
                &stop,
                &log,
                &acked,
            )
        });
        wait_acked(&acked, 3, "before the kill");
        // Past the first checkpoints (every 1 MiB of the pass here).
        let mut ctl = first.control();
        let deadline = Instant::now() + Duration::from_secs(20);
        while ctl.request("status")["result"]["offset"]
            .as_u64()
            .unwrap_or(0)
            < killed_at
        {
            assert!(Instant::now() < deadline, "the pass made no progress");
            std::thread::sleep(Duration::from_millis(20));
        }
        first.kill();
        stop.store(true, Ordering::Release);
    });
    let mut resumed = layout.serve("2", &["--resume"]);
    let mut ctl = resumed.control();
    let status = ctl.request("status");
    assert_eq!(status["result"]["resumed"], true, "{status}");
    let to_copy = status["result"]["bytes_to_copy"]
        .as_u64()
        .expect("bytes_to_copy");
    let bound = size - killed_at + 16 * MIB + size / 50;
    assert!(
        to_copy <= bound,
        "the resume copies more than it may (bound {bound}): {status}"
    );
    // The guest goes on through the resumed engine.
    let stop = AtomicBool::new(false);
    let url = resumed.url();
    let written: BTreeSet<u64> = log
        .lock()
        .expect("log")
        .iter()
        .flat_map(|b| b.regions.clone())
        .collect();
    let left: Vec<u64> = order
        .iter()
        .copied()
        .filter(|r| !written.contains(r))
        .step_by(4)
        .collect();
    guest_writer_over(&url, &[], &left, 2, &stop, &log, &acked);
    let ctl_path = path_str(&resumed.ctl).to_string();
    let cli = run(&["switch", "--wait", "60", "--control", &ctl_path]);
    assert_eq!(cli.code, 0, "{}\n{}", cli.stdout, cli.stderr);
    let cli = run(&["complete", "--control", &ctl_path]);
    assert_eq!(cli.code, 0, "{}\n{}", cli.stdout, cli.stderr);
    drop(ctl);
    resumed.kill();
    let batches = log.into_inner().expect("log");
    let acked_batches = batches.iter().filter(|b| b.acked).count();
    let mut expected = source_contents(size);
    // Regions of batches that were not acknowledged may hold either.
    let mut unsure = BTreeSet::new();
    for batch in &batches {
        for &r in &batch.regions {
            if batch.acked {
                let at = (r * REGION) as usize;
                expected[at..at + REGION as usize].fill(guest_byte(r));
            } else {
                unsure.insert(r);
            }
        }
    }
    let destination = std::fs::read(&layout.dest).expect("destination");
    let mut wrong = Vec::new();
    for r in (0..regions).filter(|r| !unsure.contains(r)) {
        let at = (r * REGION) as usize;
        if destination[at..at + REGION as usize] != expected[at..at + REGION as usize] {
            wrong.push(r);
        }
    }
    println!(
        "serve resume: {acked_batches} acknowledged batches, the resume copied {} of {} MiB",
        to_copy / MIB,
        size / MIB
    );
    assert!(acked_batches > 3);
    assert!(
        wrong.is_empty(),
        "regions that lost acknowledged writes or source data: {wrong:?}"
    );
}

/// The event log on stderr, in both formats: started, a client connected
/// and disconnected (with its peer), each control command (with the uid),
/// ready, switch started, switched (pause and longest request), completed,
/// in order; an abort's reason in its line; never an ANSI escape into a
/// file.
#[test]
fn serve_logs_every_event_in_order_in_both_formats() {
    let size = 4 * MIB;
    for format in ["human", "json"] {
        let layout = Layout::new(size);
        let mut serve = layout.serve("1", &["--log-format", format]);
        let out = qemu_io(
            &serve.url(),
            &["-t", "writeback"],
            &["write -P 0x61 0 64k", "flush"],
        );
        assert_io_ok(&out, 1, 0);
        let ctl_path = path_str(&serve.ctl).to_string();
        let cli = run(&["switch", "--wait", "60", "--control", &ctl_path]);
        assert_eq!(cli.code, 0, "{}", cli.stderr);
        let cli = run(&["complete", "--control", &ctl_path]);
        assert_eq!(cli.code, 0, "{}", cli.stderr);
        // The log is written as events happen; give the last line a moment.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !serve.stderr().contains("completed") && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        serve.kill();
        let log = serve.stderr();
        assert!(
            !log.contains('\u{1b}'),
            "{format}: ANSI escape in a file: {log}"
        );
        let lines: Vec<&str> = log.lines().collect();
        // The first line holding any of the needles (human and JSON spell
        // fields differently).
        let at_any = |needles: &[&str]| {
            lines
                .iter()
                .position(|l| needles.iter().any(|n| l.contains(n)))
                .unwrap_or_else(|| panic!("{format}: no line with {needles:?} in:\n{log}"))
        };
        let at = |needle: &str| at_any(&[needle]);
        let started = at("started");
        let connected = at("NBD client connected");
        let disconnected = at("NBD client disconnected");
        let ready = at("ready: the images are equal");
        let switch_command = at_any(&["command=switch", "\"command\":\"switch\""]);
        let switch_started = at("switch started");
        let switched = at("switched: the destination is authoritative");
        let complete_command = at_any(&["command=complete", "\"command\":\"complete\""]);
        let completed = at("completed: the source may be released");
        assert!(
            started < connected && connected < disconnected,
            "{format}:\n{log}"
        );
        assert!(
            started < ready && ready < switch_started,
            "{format}:\n{log}"
        );
        assert!(
            switch_command < switch_started
                && switch_started < switched
                && switched < complete_command
                && complete_command < completed,
            "{format}:\n{log}"
        );
        for needle in ["pause_ms", "longest_request_ms", "uid", "peer"] {
            assert!(log.contains(needle), "{format}: no {needle} in:\n{log}");
        }
        if format == "json" {
            for line in &lines {
                let value: Value = serde_json::from_str(line)
                    .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
                assert!(
                    value["level"].is_string() && value["message"].is_string(),
                    "{line}"
                );
            }
        }
    }
    // An abort: its reason is in its line.
    let layout = Layout::new(size);
    let mut serve = layout.serve("1", &["--bandwidth", "1M"]);
    let cli = run(&["abort", "--control", path_str(&serve.ctl)]);
    assert_eq!(cli.code, 0, "{}", cli.stderr);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !serve.stderr().contains("aborted") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    serve.kill();
    let log = serve.stderr();
    let line = log
        .lines()
        .find(|l| l.contains("aborted"))
        .unwrap_or_else(|| panic!("no aborted line in:\n{log}"));
    assert!(
        line.contains("reason") && line.contains("aborted on request"),
        "{line}"
    );
}

/// `status` for people (phase with percent, copied of total in IEC units,
/// rate in MiB/s, ETA, dirty bytes, requests in flight) and for programs
/// (the same with units in the names); `status --watch` follows the job
/// to its end, one JSON object per interval; the switch and complete
/// replies read as sentences; options of other commands are refused.
#[test]
fn status_shows_progress_and_watch_follows_the_job() {
    let size = 8 * MIB;
    let layout = Layout::new(size);
    let mut serve = layout.serve("1", &["--bandwidth", "4M"]);
    let ctl = path_str(&serve.ctl).to_string();
    let text = run(&["status", "--control", &ctl]);
    assert_eq!(text.code, 0, "{}", text.stderr);
    for needle in [
        "phase:",
        "copying (",
        "%)",
        "copied:",
        " of 8.0 MiB",
        "rate:",
        "MiB/s",
        "eta:",
        "dirty:",
        "in flight:",
    ] {
        assert!(
            text.stdout.contains(needle),
            "no {needle:?} in:\n{}",
            text.stdout
        );
    }
    let json = run(&["--output", "json", "status", "--control", &ctl]);
    let status: Value = serde_json::from_str(&json.stdout).expect("status JSON");
    let percent = status["percent"].as_f64().expect("percent");
    assert!((0.0..=100.0).contains(&percent), "{status}");
    for key in [
        "bytes_copied",
        "bytes_to_copy",
        "dirty_bytes",
        "rate_bytes_per_sec",
        "size_bytes",
    ] {
        assert!(status[key].is_u64(), "{key}: {status}");
    }
    assert!(
        status["eta_seconds"].is_f64() || status["eta_seconds"].is_null(),
        "{status}"
    );
    // Old names stay.
    for key in ["offset", "len", "dirty", "rate"] {
        assert!(status[key].is_u64(), "{key}: {status}");
    }

    let watcher = {
        let _guard = crate::support::spawning();
        Command::new(COPYCTL)
            .args([
                "--output",
                "json",
                "status",
                "--watch",
                "--interval",
                "0.2",
                "--control",
                &ctl,
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("status --watch")
    };
    let switched = run(&["switch", "--wait", "60", "--control", &ctl]);
    assert_eq!(switched.code, 0, "{}", switched.stderr);
    assert!(
        switched.stdout.starts_with("switched: guest paused ")
            && switched.stdout.contains("journal seq"),
        "{}",
        switched.stdout
    );
    let completed = run(&["complete", "--control", &ctl]);
    assert!(
        completed.stdout.starts_with("completed (journal seq"),
        "{}",
        completed.stdout
    );
    let output = watcher.wait_with_output().expect("watch ends with the job");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let objects: Vec<Value> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    assert!(objects.len() >= 2, "{objects:?}");
    assert_eq!(objects.last().unwrap()["phase"], "completed");
    let copying: Vec<f64> = objects
        .iter()
        .filter(|o| o["phase"] == "copying")
        .map(|o| o["percent"].as_f64().unwrap())
        .collect();
    assert!(copying.windows(2).all(|w| w[0] <= w[1]), "{copying:?}");
    serve.kill();

    for args in [
        vec!["status", "--interval", "1", "--control", &ctl],
        vec!["status", "--wait", "5", "--control", &ctl],
        vec!["complete", "--wait", "5", "--control", &ctl],
        vec!["status", "--watch", "--interval", "0", "--control", &ctl],
    ] {
        let refused = run(&args);
        assert_eq!(refused.code, 2, "{args:?}: {}", refused.stderr);
    }
}
