//! What a new user trips on: every refusal says why and leaves the
//! directory exactly as it was; settings that would hang or crash are
//! refused before anything is made; signals end `serve` and `demo` cleanly.

use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::cli::{
    BAD_INPUT, Dir, LOCKED, MISSING, OK, USAGE, assert_stderr_contains, assert_stdout_empty, check,
    json, run, s, setup,
};

const IMAGE: usize = 1 << 20;
/// `recover`: the authoritative image is gone.
const IMAGE_MISSING: i32 = 10;

fn mkfifo(path: &std::path::Path) {
    rustix::fs::mkfifoat(
        rustix::fs::CWD,
        path,
        rustix::fs::Mode::from_raw_mode(0o600),
    )
    .expect("mkfifo");
}

/// A directory holding `src.img` (1 MiB of data).
fn with_source() -> Dir {
    let dir = setup();
    dir.write("src.img", &vec![0x5a; IMAGE]);
    dir
}

/// Runs `args`, checks the exit code and the message, and that the
/// directory lists exactly what it listed before.
#[track_caller]
fn refused(dir: &Dir, args: &[&str], code: i32, message: &str) {
    let before = dir.listing();
    let run = check(dir, args, code);
    assert_stderr_contains(&run, message);
    assert_eq!(dir.listing(), before, "copyctl {args:?} left files behind");
}

#[test]
fn refusals_of_copy_leave_nothing_behind() {
    let dir = with_source();
    let (src, dst, j) = (dir.path("src.img"), dir.path("dst.img"), dir.path("J"));
    let copy = |journal: &str| {
        vec![
            "copy".to_string(),
            "--journal".into(),
            journal.into(),
            s(&src).into(),
            s(&dst).into(),
        ]
    };
    let refuse = |args: Vec<String>, code: i32, message: &str| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        refused(&dir, &args, code, message);
    };
    dir.write("J", b"");
    refuse(copy(s(&j)), BAD_INPUT, "J already exists: it holds a job");
    std::fs::remove_file(&j).unwrap();
    refuse(copy(s(&dir.path("none/J"))), MISSING, "none");
    mkfifo(&dir.path("fifo"));
    refuse(
        copy(s(&dir.path("fifo"))),
        BAD_INPUT,
        "already exists (a FIFO)",
    );
    std::os::unix::fs::symlink("/nonexistent/x", dir.path("dangling")).unwrap();
    refuse(
        copy(s(&dir.path("dangling"))),
        BAD_INPUT,
        "already exists (a symlink to nothing)",
    );
    let mut args = copy(s(&j));
    args[4] = s(&dir.path("dangling")).into();
    refuse(args, BAD_INPUT, "is a symlink to nothing");
    std::fs::create_dir(dir.path("sub")).unwrap();
    refuse(
        copy(s(&dir.path("sub"))),
        BAD_INPUT,
        "already exists (a directory)",
    );
    // Another engine holds the source: found once the job starts.
    let mut serve = Killed(start_serve(&dir, "J1", "d1.img", Stdio::null()));
    refuse(copy(s(&j)), LOCKED, "locked");
    let _ = serve.0.kill();
    let _ = serve.0.wait();
}

/// `copyctl serve` of `src.img` onto `dst.img` in `dir` with journal
/// `journal`, its stdout as given; returns once its control socket exists.
fn start_serve(dir: &Dir, journal: &str, dest: &str, stdout: Stdio) -> std::process::Child {
    let mut child = spawn_serve(dir, journal, dest, stdout);
    wait_for_control(dir, &mut child, || {
        std::thread::sleep(Duration::from_millis(5))
    });
    child
}

/// Returns once serve's control socket exists, calling `pause` between
/// looks; fails if serve ends first.
fn wait_for_control(dir: &Dir, child: &mut std::process::Child, pause: impl Fn()) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !dir.path("c.sock").exists() {
        assert!(child.try_wait().expect("wait").is_none(), "serve ended");
        assert!(Instant::now() < deadline, "serve did not start");
        pause();
    }
}

fn spawn_serve(dir: &Dir, journal: &str, dest: &str, stdout: Stdio) -> std::process::Child {
    serve_command(dir, journal, dest)
        .stdout(stdout)
        .stderr(Stdio::null())
        .spawn()
        .expect("serve")
}

/// `copyctl serve` of `src.img` onto `dest` in `dir`, its sockets `n.sock`
/// and `c.sock`; its standard streams are the caller's to set.
fn serve_command(dir: &Dir, journal: &str, dest: &str) -> std::process::Command {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_copyctl"));
    command
        .current_dir(&dir.root)
        .args(["serve", "--journal", journal, "--source", "src.img"])
        .args(["--dest", dest, "--socket", "n.sock", "--control", "c.sock"]);
    command
}

fn send(child: &std::process::Child, signal: rustix::process::Signal) {
    let pid = rustix::process::Pid::from_raw(child.id() as i32).expect("a pid");
    rustix::process::kill_process(pid, signal).expect("signal");
}

/// Kills the child when dropped.
struct Killed(std::process::Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn serve_refusals_leave_nothing_behind() {
    let dir = with_source();
    let serve = |extra: &[&str]| -> Vec<String> {
        let mut args: Vec<String> = [
            "serve",
            "--journal",
            "J",
            "--source",
            "src.img",
            "--dest",
            "dst.img",
            "--socket",
            "n.sock",
            "--control",
            "c.sock",
        ]
        .map(String::from)
        .to_vec();
        args.extend(extra.iter().map(|a| a.to_string()));
        args
    };
    let refuse = |args: Vec<String>, code: i32, message: &str| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        refused(&dir, &args, code, message);
    };
    refuse(
        serve(&["--tcp", "no such address", "--tcp-plaintext-insecure"]),
        USAGE,
        "\"no such address\" is not an address to listen on",
    );
    let mut same = serve(&[]);
    same[10] = "n.sock".into();
    refuse(same, BAD_INPUT, "--socket and --control are both");
    let mut same = serve(&[]);
    same[10] = "./n.sock".into();
    refuse(same, BAD_INPUT, "--socket and --control are both");
    // A busy port: found after the job started, which is then undone.
    let busy = std::net::TcpListener::bind("127.0.0.1:0").expect("a port");
    let port = busy.local_addr().unwrap().to_string();
    refuse(
        serve(&["--tcp", &port, "--tcp-plaintext-insecure"]),
        8,
        &format!("listen on --tcp {port}"),
    );
    refuse(serve(&["--workers", "100000"]), USAGE, "from 1 to 64");
    refuse(serve(&["--bandwidth", "0"]), BAD_INPUT, "bandwidth of 0");
}

#[test]
fn settings_that_would_hang_or_crash_are_refused() {
    let dir = with_source();
    let copy = |extra: &[&str], src: &str, dst: &str| -> Vec<String> {
        let mut args: Vec<String> = vec!["copy".into(), "--journal".into(), "J".into()];
        args.extend(extra.iter().map(|a| a.to_string()));
        args.push(src.into());
        args.push(dst.into());
        args
    };
    let refuse = |args: Vec<String>, code: i32, message: &str| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        refused(&dir, &args, code, message);
    };
    refuse(
        copy(&["--bandwidth", "0"], "src.img", "dst.img"),
        BAD_INPUT,
        "bandwidth of 0",
    );
    refuse(
        copy(&["--workers", "100000"], "src.img", "dst.img"),
        USAGE,
        "from 1 to 64",
    );
    refuse(
        copy(&["--workers", "0"], "src.img", "dst.img"),
        USAGE,
        "from 1 to 64",
    );
    refuse(
        copy(
            &["--bandwidth", "18446744073709551616"],
            "src.img",
            "dst.img",
        ),
        USAGE,
        "too large",
    );
    // FIFOs as images: refused at once, never waited on.
    mkfifo(&dir.path("fifo"));
    let started = Instant::now();
    refuse(
        copy(&[], "fifo", "dst.img"),
        BAD_INPUT,
        "neither a regular file",
    );
    refuse(
        copy(&[], "src.img", "fifo"),
        BAD_INPUT,
        "neither a regular file",
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "a FIFO was waited on"
    );
    // A low limit works, with a warning.
    let run = check(
        &dir,
        &[
            "copy",
            "--bandwidth",
            "512K",
            "--journal",
            "J",
            "src.img",
            "dst.img",
        ],
        OK,
    );
    assert_stderr_contains(&run, "--bandwidth 512.0 KiB/s");
}

#[test]
fn demo_refuses_bad_sizes_and_directories() {
    let dir = setup();
    refused(&dir, &["demo", "--size", "1"], USAGE, "needs at least 4M");
    refused(
        &dir,
        &["demo", "--dir", s(&dir.path("missing"))],
        MISSING,
        "missing",
    );
    std::fs::create_dir(dir.path("full")).unwrap();
    dir.write("full/x", b"x");
    refused(
        &dir,
        &["demo", "--dir", s(&dir.path("full"))],
        BAD_INPUT,
        "is not empty",
    );
    std::fs::create_dir(dir.path("empty")).unwrap();
    let run = check(
        &dir,
        &["demo", "--size", "1P", "--dir", s(&dir.path("empty"))],
        BAD_INPUT,
    );
    assert_stderr_contains(&run, "free in");
    assert_eq!(std::fs::read_dir(dir.path("empty")).unwrap().count(), 0);
}

/// SIGTERM to `demo` part-way: its engine is gone, its directory too, and
/// it exits 143 (128 + SIGTERM).
#[test]
fn a_signal_stops_the_demo_and_removes_what_it_made() {
    let dir = setup();
    std::fs::create_dir(dir.path("tmp")).unwrap();
    let mut cases = 0;
    for delay_ms in [50u64, 600, 2500] {
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_copyctl"))
            .args(["demo", "--size", "512M", "--seed", "7"])
            .env("TMPDIR", dir.path("tmp"))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("demo");
        std::thread::sleep(Duration::from_millis(delay_ms));
        send(&child, rustix::process::Signal::TERM);
        let out = child.wait_with_output().expect("wait");
        assert_eq!(out.status.code(), Some(143), "after {delay_ms} ms: {out:?}");
        let left: Vec<_> = std::fs::read_dir(dir.path("tmp")).unwrap().collect();
        assert!(
            left.is_empty(),
            "after {delay_ms} ms the demo left {left:?}"
        );
        // No engine of this demo outlives it (it had `--dir` in tmp).
        let engines = std::fs::read_dir("/proc")
            .unwrap()
            .filter_map(|e| std::fs::read(e.ok()?.path().join("cmdline")).ok())
            .filter(|c| {
                let c = String::from_utf8_lossy(c);
                c.contains("demo-engine") && c.contains(s(&dir.path("tmp")))
            })
            .count();
        assert_eq!(
            engines, 0,
            "after {delay_ms} ms an engine outlived the demo"
        );
        cases += 1;
    }
    println!("{cases} demos stopped by SIGTERM");
}

/// SIGTERM and SIGINT end `serve` with exit 0 and take its sockets away;
/// the journal stays (it is the job's record).
#[test]
fn a_signal_stops_serve_and_removes_its_sockets() {
    // The signal comes the moment the control socket appears, the first
    // moment a supervisor could think serve is up: from then on, the
    // sockets are serve's to remove.
    let mut cases = 0;
    for round in 0..10 {
        for signal in [rustix::process::Signal::TERM, rustix::process::Signal::INT] {
            let dir = with_source();
            let mut child = spawn_serve(&dir, "J", "dst.img", Stdio::null());
            wait_for_control(&dir, &mut child, std::thread::yield_now);
            send(&child, signal);
            let status = child.wait().expect("wait");
            assert_eq!(status.code(), Some(0), "round {round}, {signal:?}");
            assert_eq!(
                dir.listing(),
                ["J", "dst.img", "src.img"],
                "round {round}, {signal:?}"
            );
            cases += 1;
        }
    }
    println!("{cases} serves stopped by a signal");
}

#[test]
fn control_refusals_go_to_stderr_and_complete_is_idempotent() {
    let dir = with_source();
    let mut serve = Killed(start_serve(&dir, "J", "dst.img", Stdio::null()));
    let ctl = ["--control", "c.sock"];
    let refused = check(&dir, &["complete", ctl[0], ctl[1]], BAD_INPUT);
    assert_stdout_empty(&refused);
    assert_stderr_contains(
        &refused,
        "complete refused: invalid input: complete needs a switched job",
    );
    let refused = check(
        &dir,
        &["--output", "json", "complete", ctl[0], ctl[1]],
        BAD_INPUT,
    );
    assert_eq!(json(&refused)["ok"], false);
    check(&dir, &["switch", ctl[0], ctl[1], "--wait", "60"], OK);
    let done = check(&dir, &["--output", "json", "complete", ctl[0], ctl[1]], OK);
    let done = json(&done);
    assert_eq!(
        (done["ok"].clone(), done["already_completed"].clone()),
        (true.into(), false.into())
    );
    let again = check(&dir, &["complete", ctl[0], ctl[1]], OK);
    assert!(
        again.stdout.starts_with("already completed (journal seq"),
        "{}",
        again.stdout
    );
    let status = check(&dir, &["--output", "json", "status", ctl[0], ctl[1]], OK);
    assert_eq!(json(&status)["ok"], true);
    let _ = serve.0.kill();
    let _ = serve.0.wait();
}

/// `recover` names the authoritative image, but exits 10 when that image
/// is gone: a guest cannot boot from it (not 5, "no such journal").
#[test]
fn recover_of_a_missing_image_exits_missing() {
    let dir = with_source();
    check(&dir, &["copy", "--journal", "J", "src.img", "dst.img"], OK);
    std::fs::remove_file(dir.path("dst.img")).unwrap();
    let run = check(&dir, &["--output", "json", "recover", "J"], IMAGE_MISSING);
    let verdict = json(&run);
    assert_eq!(verdict["authoritative"], "destination");
    assert_eq!(verdict["image_missing"], true);
    let run = run_human_recover(&dir);
    assert!(run.contains("does not exist"), "{run}");
}

fn run_human_recover(dir: &Dir) -> String {
    let out = run(dir, &["recover", "J"]);
    assert_eq!(out.code, IMAGE_MISSING);
    format!("{}{}", out.stdout, out.stderr)
}

/// `inspect`'s columns line up whatever a block holds (an empty slot's
/// kind is the longest word).
#[test]
fn inspect_columns_line_up_for_empty_slots() {
    let dir = setup();
    let journal = dir.journal("J", livecopy::journal::Phase::Ready);
    let run = check(&dir, &["inspect", s(&journal)], OK);
    let lines: Vec<&str> = run
        .stdout
        .lines()
        .filter(|l| !l.starts_with("recovery"))
        .collect();
    assert!(
        lines.iter().any(|l| l.contains("emptyslot")),
        "{}",
        run.stdout
    );
    // The right edge of the fifth column (seq, right-aligned) is one place
    // on every line.
    let edge = |line: &str| {
        let mut tokens = 0;
        let mut in_token = false;
        for (i, c) in line.char_indices() {
            match (c == ' ', in_token) {
                (false, false) => in_token = true,
                (true, true) => {
                    in_token = false;
                    tokens += 1;
                    if tokens == 5 {
                        return i;
                    }
                }
                _ => {}
            }
        }
        line.len()
    };
    let want = edge(lines[0]);
    for line in &lines[1..] {
        assert_eq!(edge(line), want, "misaligned: {line:?}\n{}", run.stdout);
    }
}

/// A destination a refused command made is removed only under its lock:
/// a job of another process that took it keeps it, and one that opened it
/// but locks only after the removal is refused.
#[test]
fn a_made_file_is_removed_only_when_no_job_holds_it() {
    use livecopy::storage::{CreatedFile, FileStorage};
    let dir = setup();
    let path = dir.path("dst.img");
    // Another process's job holds it: it stays.
    FileStorage::create_image(&path, 1 << 20).expect("create");
    let made = CreatedFile::claim(&path).expect("claim");
    let other = FileStorage::open_image(&path, true).expect("open");
    other.lock_exclusive().expect("the other job locks it");
    drop(made);
    assert!(path.exists(), "removed under another job's lock");
    drop(other);
    std::fs::remove_file(&path).unwrap();
    // Opened before the removal, locked after: refused.
    FileStorage::create_image(&path, 1 << 20).expect("create");
    let made = CreatedFile::claim(&path).expect("claim");
    let late = FileStorage::open_image(&path, true).expect("open");
    drop(made);
    assert!(!path.exists(), "not removed");
    let refused = late.lock_exclusive().expect_err("a removed file");
    assert!(
        refused.to_string().contains("removed or replaced"),
        "{refused}"
    );
}

/// Once serving, what serve made is the job's: a reader of stdout that
/// went away does not stop serving nor remove anything; SIGTERM then
/// ends it with exit 0 even when its control socket was removed.
#[test]
fn serve_outlives_its_stdout_reader_and_stops_without_its_control_socket() {
    let dir = with_source();
    let mut child = start_serve(&dir, "J", "dst.img", Stdio::piped());
    drop(child.stdout.take()); // nobody reads the announcement
    std::thread::sleep(Duration::from_millis(300));
    assert!(child.try_wait().expect("wait").is_none(), "serve stopped");
    let status = check(&dir, &["status", "--control", "c.sock"], OK);
    assert!(status.stdout.contains("phase"), "{}", status.stdout);
    std::fs::remove_file(dir.path("c.sock")).unwrap();
    send(&child, rustix::process::Signal::TERM);
    let deadline = Instant::now() + Duration::from_secs(10);
    let code = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status.code();
        }
        assert!(Instant::now() < deadline, "serve ignored SIGTERM");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(code, Some(0));
    assert_eq!(dir.listing(), ["J", "dst.img", "src.img"]);
}

/// Serve's event log goes to stderr; a stderr nobody reads any more (the
/// reader of its pipe is gone) neither stops serve nor any of its threads:
/// the job still switches, completes and stops cleanly.
#[test]
fn serve_outlives_its_stderr_reader() {
    let dir = with_source();
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    let mut child = serve_command(&dir, "J", "dst.img")
        .env("COPYCTL_LOG", "debug")
        .stdout(Stdio::null())
        .stderr(writer)
        .spawn()
        .expect("serve");
    wait_for_control(&dir, &mut child, || {
        std::thread::sleep(Duration::from_millis(5))
    });
    let ctl = ["--control", "c.sock"];
    check(&dir, &["switch", ctl[0], ctl[1], "--wait", "60"], OK);
    check(&dir, &["complete", ctl[0], ctl[1]], OK);
    send(&child, rustix::process::Signal::TERM);
    let status = child.wait().expect("wait");
    assert_eq!(status.code(), Some(0), "{status:?}");
    assert_eq!(dir.listing(), ["J", "dst.img", "src.img"]);
    assert_eq!(
        std::fs::read(dir.path("dst.img")).unwrap(),
        std::fs::read(dir.path("src.img")).unwrap()
    );
}

/// A signal that comes while serve starts never leaves a socket behind,
/// even when the "stopped" message waits on a stderr nobody reads: serve
/// either ends before making its sockets or serves and removes them.
#[test]
fn a_signal_at_any_moment_of_start_up_leaves_no_socket() {
    use std::io::{Read, Write};
    let mut outcomes = std::collections::BTreeMap::new();
    for round in 0..40u64 {
        let dir = with_source();
        // A full pipe: the first write to stderr blocks until drained.
        let (mut reader, mut writer) = std::io::pipe().expect("pipe");
        writer.write_all(&[b'.'; 65536]).expect("fill the pipe");
        let mut child = serve_command(&dir, "J", "dst.img")
            .env("COPYCTL_LOG", "error")
            .stdout(Stdio::null())
            .stderr(writer)
            .spawn()
            .expect("serve");
        // Spread over start-up: before the handler, while the job is
        // made, while the sockets are made, once serving.
        let until = Instant::now() + Duration::from_micros(500 + round * 400);
        while Instant::now() < until {
            std::hint::spin_loop();
        }
        send(&child, rustix::process::Signal::TERM);
        // Let a blocked "stopped" message race the rest of start-up.
        std::thread::sleep(Duration::from_millis(50));
        let mut drained = Vec::new();
        let drain = std::thread::spawn(move || {
            reader.read_to_end(&mut drained).expect("drain");
        });
        let status = child.wait().expect("wait");
        drain.join().expect("drain");
        let left: Vec<String> = dir
            .listing()
            .into_iter()
            .filter(|n| n.ends_with(".sock") || n.starts_with(".copyctl-"))
            .collect();
        assert!(
            left.is_empty(),
            "round {round}: {status:?} left {left:?} behind"
        );
        let outcome = match status.code() {
            Some(0) => "served, then stopped",
            Some(143) => "stopped while starting",
            None => "killed before its handler",
            Some(_) => panic!("round {round}: {status:?}"),
        };
        *outcomes.entry(outcome).or_insert(0) += 1;
    }
    println!("40 signals during start-up: {outcomes:?}");
}

/// A signal while serve starts (here waiting on an NBD destination that
/// never answers) ends it at once, as a kill would.
#[test]
fn a_signal_while_serve_starts_ends_it_at_once() {
    let dir = with_source();
    let silent = std::os::unix::net::UnixListener::bind(dir.path("silent.sock")).expect("bind");
    let holder = std::thread::spawn(move || {
        let held: Vec<_> = silent.incoming().take(4).collect();
        std::thread::sleep(Duration::from_secs(20));
        drop(held);
    });
    let dest = format!("nbd+unix:///?socket={}", s(&dir.path("silent.sock")));
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_copyctl"))
        .current_dir(&dir.root)
        .args([
            "serve",
            "--journal",
            "J",
            "--source",
            "src.img",
            "--dest",
            &dest,
        ])
        .args(["--socket", "n.sock", "--control", "c.sock"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("serve");
    std::thread::sleep(Duration::from_millis(500));
    let sent = Instant::now();
    send(&child, rustix::process::Signal::TERM);
    let status = child.wait().expect("wait");
    assert_eq!(status.code(), Some(143), "{status:?}");
    assert!(
        sent.elapsed() < Duration::from_secs(5),
        "took {:?}",
        sent.elapsed()
    );
    assert!(!dir.path("n.sock").exists() && !dir.path("c.sock").exists());
    drop(holder);
}
