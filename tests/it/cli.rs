//! End-to-end tests of the `copyctl` binary: each test runs the real
//! executable in a fresh temporary directory and checks its exit code, what
//! it prints on stdout (results) and on stderr (warnings, errors), and what
//! it leaves on disk.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use livecopy::journal::format::{BLOCK_SIZE, JOURNAL_LEN, Position, crc32};
use livecopy::journal::{self, ImagePair, ImageRecord, ImageRef, Journal, Phase, Record};
use livecopy::storage::FileStorage;
use rustix::fs::FlockOperation;
use serde_json::Value;
use tempfile::TempDir;

use crate::support::{exclusive, first_record_for, path_to, spawning};

/// A journal kept open, and so locked, by this process.
struct Held(Option<Journal<FileStorage>>);

impl Drop for Held {
    fn drop(&mut self) {
        let _no_fork = exclusive();
        let Some(journal) = self.0.take() else {
            return;
        };
        let path = journal.storage().path().to_path_buf();
        drop(journal);
        // A child forked by another test while the journal was open may hold
        // its descriptor for an instant after its spawn returned (the kernel
        // wakes the parent before it closes close-on-exec descriptors), and
        // children spawned elsewhere in this binary (support::run_copyctl)
        // do not take FORK at all. Wait until the lock is really free. The
        // probe unlocks explicitly, so a copy of its descriptor that a
        // concurrent fork might take holds no lock.
        for _ in 0..5000 {
            let Ok(probe) = fs::File::open(&path) else {
                return;
            };
            match rustix::fs::flock(&probe, FlockOperation::NonBlockingLockExclusive) {
                Ok(()) => {
                    let _ = rustix::fs::flock(&probe, FlockOperation::Unlock);
                    return;
                }
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(1)),
            }
        }
    }
}

/// Exit codes, as src/bin/copyctl/exit.rs defines them.
pub(crate) const OK: i32 = 0;
pub(crate) const USAGE: i32 = 2;
pub(crate) const NEEDS_OPERATOR: i32 = 3;
pub(crate) const CORRUPT: i32 = 4;
pub(crate) const MISSING: i32 = 5;
pub(crate) const LOCKED: i32 = 6;
pub(crate) const UNSUPPORTED: i32 = 7;
pub(crate) const BAD_INPUT: i32 = 9;
/// What a Rust program exits with when it panics.
pub(crate) const PANIC: i32 = 101;

const SOURCE_LEN: u64 = 3 * 4096;
const DESTINATION_LEN: u64 = 5 * 4096;

/// A fresh temporary directory to run `copyctl` in.
pub(crate) struct Dir {
    pub(crate) root: PathBuf,
    _tmp: TempDir,
}

pub(crate) fn setup() -> Dir {
    let tmp = tempfile::tempdir().expect("create temporary directory");
    let root = fs::canonicalize(tmp.path()).expect("canonicalize temporary directory");
    Dir { root, _tmp: tmp }
}

impl Dir {
    /// An absolute path in the directory.
    pub(crate) fn path(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// Writes `bytes` to `name`, returning its path.
    pub(crate) fn write(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let path = self.path(name);
        fs::write(&path, bytes).expect("write test file");
        path
    }

    /// Creates the image `name` of `len` bytes unless it exists, and returns
    /// what `stat` says about it, as a job records it at start.
    fn image(&self, name: &str, len: u64) -> ImageRecord {
        let path = self.path(name);
        if !path.exists() {
            fs::write(&path, vec![0x5a; len as usize]).expect("write image");
        }
        let meta = fs::metadata(&path).expect("stat image");
        ImageRecord {
            path: s(&path).to_string(),
            size: meta.size(),
            device: meta.dev(),
            inode: meta.ino(),
        }
    }

    /// Record 0 of a job copying `source.raw` to `destination.raw`, both of
    /// which exist, with their real identities.
    fn first_record(&self) -> Record {
        Record {
            pairs: vec![ImagePair {
                source: ImageRef::File(self.image("source.raw", SOURCE_LEN)),
                destination: ImageRef::File(self.image("destination.raw", DESTINATION_LEN)),
            }],
            ..first_record_for("/unused/source", "/unused/destination")
        }
    }

    /// A journal file advanced to `phase`, still open and locked.
    fn open_journal(&self, name: &str, phase: Phase) -> Held {
        let record = self.first_record();
        let _no_fork = exclusive();
        let mut journal = journal::create_file(&self.path(name), record).expect("create journal");
        for (i, next) in path_to(phase).into_iter().enumerate() {
            journal.commit(next, (i as u64 + 1) * 4096).expect("commit");
        }
        Held(Some(journal))
    }

    /// A journal file advanced to `phase`, closed (unlocked).
    pub(crate) fn journal(&self, name: &str, phase: Phase) -> PathBuf {
        drop(self.open_journal(name, phase));
        self.path(name)
    }

    /// Every `<name>.broken.<n>` backup beside the journal `name`.
    fn backups(&self, name: &str) -> Vec<PathBuf> {
        let prefix = format!("{name}.broken.");
        let mut found: Vec<PathBuf> = fs::read_dir(&self.root)
            .expect("list temporary directory")
            .map(|e| e.expect("directory entry").path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&prefix))
            })
            .collect();
        found.sort();
        found
    }

    /// Every file name in the directory, sorted.
    pub(crate) fn listing(&self) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(&self.root)
            .expect("list temporary directory")
            .map(|e| {
                e.expect("directory entry")
                    .file_name()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        names.sort();
        names
    }
}

pub(crate) fn s(path: &Path) -> &str {
    path.to_str().expect("temporary paths are UTF-8")
}

/// What one run of `copyctl` printed.
#[derive(Debug)]
pub(crate) struct Run {
    pub(crate) code: i32,
    pub(crate) stdout: String,
    pub(crate) stderr: String,
}

/// Starts `copyctl args` in `dir` with the given stdout and stderr.
fn spawn(dir: &Dir, args: &[&str], out: Stdio, err: Stdio) -> Child {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_copyctl"));
    cmd.args(args)
        .current_dir(&dir.root)
        .env_remove("RUST_BACKTRACE")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    let _forking = spawning();
    cmd.spawn().expect("spawn copyctl")
}

/// Runs `copyctl args` in `dir`; asserts only that it exited rather than
/// died of a signal, and did not panic.
#[track_caller]
pub(crate) fn run(dir: &Dir, args: &[&str]) -> Run {
    let output = spawn(dir, args, Stdio::piped(), Stdio::piped())
        .wait_with_output()
        .expect("run copyctl");
    let run = Run {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    };
    assert!(
        output.status.code().is_some(),
        "copyctl {args:?} was killed by a signal: {:?}\n{run:#?}",
        output.status
    );
    assert_ne!(run.code, PANIC, "copyctl {args:?} panicked\n{}", run.stderr);
    run
}

/// Runs `copyctl args` in `dir` and asserts it exits with `code`.
#[track_caller]
pub(crate) fn check(dir: &Dir, args: &[&str], code: i32) -> Run {
    let run = run(dir, args);
    assert_eq!(
        run.code, code,
        "copyctl {args:?} exited with {} instead of {code}\n--- stdout\n{}--- stderr\n{}",
        run.code, run.stdout, run.stderr
    );
    run
}

#[track_caller]
pub(crate) fn assert_stdout_contains(run: &Run, needle: &str) {
    assert!(
        run.stdout.contains(needle),
        "stdout lacks {needle:?}:\n{}\n--- stderr\n{}",
        run.stdout,
        run.stderr
    );
}

#[track_caller]
pub(crate) fn assert_stderr_contains(run: &Run, needle: &str) {
    assert!(
        run.stderr.contains(needle),
        "stderr lacks {needle:?}:\n{}\n--- stdout\n{}",
        run.stderr,
        run.stdout
    );
}

#[track_caller]
pub(crate) fn assert_stdout_empty(run: &Run) {
    assert_eq!(
        run.stdout, "",
        "stdout should be empty; stderr:\n{}",
        run.stderr
    );
}

#[track_caller]
pub(crate) fn assert_stderr_empty(run: &Run) {
    assert_eq!(
        run.stderr, "",
        "stderr should be empty; stdout:\n{}",
        run.stdout
    );
}

/// stdout parsed as the one JSON value `--output json` promises.
#[track_caller]
pub(crate) fn json(run: &Run) -> Value {
    serde_json::from_str(&run.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}):\n{}\n--- stderr\n{}",
            run.stdout, run.stderr
        )
    })
}

/// Deterministic bytes that look random: xorshift64.
fn noise(len: usize, mut state: u64) -> Vec<u8> {
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// The byte range of the block at `position`.
fn block_range(position: Position) -> std::ops::Range<usize> {
    let start = position.offset() as usize;
    start..start + BLOCK_SIZE
}

/// Overwrites bytes of the block at `position` in the file at `path`.
fn damage(path: &Path, position: Position, bytes: &[u8]) {
    let mut data = fs::read(path).expect("read journal");
    assert_eq!(data.len() as u64, JOURNAL_LEN);
    let start = block_range(position).start + 100;
    data[start..start + bytes.len()].copy_from_slice(bytes);
    fs::write(path, data).expect("write journal");
}

// ---- recover: files that are not journals ----

#[test]
fn recover_missing_file() {
    let dir = setup();
    let j = dir.path("missing.journal");
    let run = check(&dir, &["recover", s(&j)], MISSING);
    assert_stdout_empty(&run);
    assert_stderr_contains(&run, "copyctl: ");
    assert_stderr_contains(&run, s(&j));
    assert!(!j.exists(), "recover must not create the journal");
}

/// Regression: `Error::Io` used to print its source in its own message and
/// also return it from `source()`, so `copyctl: {error:#}` named every I/O
/// cause twice ("No such file or directory (os error 2): No such file or
/// directory (os error 2)").
#[test]
fn missing_file_error_names_the_cause_once() {
    let dir = setup();
    let j = dir.path("missing.journal");
    let run = check(&dir, &["recover", s(&j)], MISSING);
    assert_eq!(
        run.stderr.matches("(os error 2)").count(),
        1,
        "the cause is repeated: {}",
        run.stderr
    );
}

#[test]
fn recover_garbage_of_journal_size() {
    let dir = setup();
    let j = dir.write(
        "garbage.journal",
        &noise(JOURNAL_LEN as usize, 0x9e37_79b9_7f4a_7c15),
    );
    let run = check(&dir, &["recover", s(&j)], CORRUPT);
    assert_stdout_contains(&run, "refused: corrupt");

    let run = check(&dir, &["--output", "json", "recover", s(&j)], CORRUPT);
    let v = json(&run);
    assert_eq!(v["verdict"], "refused");
    assert_eq!(v["refusal"]["reason"], "corrupt");
    assert_eq!(v["decision"], "not-a-journal");
}

#[test]
fn recover_all_zero_file_of_journal_size() {
    let dir = setup();
    let j = dir.write("zero.journal", &vec![0; JOURNAL_LEN as usize]);
    let run = check(&dir, &["recover", s(&j)], CORRUPT);
    assert_stdout_contains(&run, "refused: corrupt");
    let run = check(&dir, &["--output", "json", "recover", s(&j)], CORRUPT);
    assert_eq!(json(&run)["refusal"]["reason"], "corrupt");
}

#[test]
fn recover_truncated_file() {
    let dir = setup();
    let healthy = dir.journal("healthy.journal", Phase::Ready);
    let first_block = fs::read(&healthy).expect("read journal")[..4096].to_vec();
    let j = dir.write("short.journal", &first_block);
    let run = check(&dir, &["recover", s(&j)], CORRUPT);
    assert_stdout_contains(&run, "refused: truncated");
    assert_stdout_contains(&run, "4096 bytes");

    let run = check(&dir, &["--output", "json", "recover", s(&j)], CORRUPT);
    let v = json(&run);
    assert_eq!(v["verdict"], "refused");
    assert_eq!(v["refusal"]["reason"], "truncated");
    assert_eq!(
        fs::read(&j).expect("read"),
        first_block,
        "recover must not extend the file"
    );
}

#[test]
fn recover_empty_file() {
    let dir = setup();
    let j = dir.write("empty.journal", b"");
    let run = check(&dir, &["recover", s(&j)], CORRUPT);
    assert_stdout_contains(&run, "refused: truncated");
    let run = check(&dir, &["--output", "json", "recover", s(&j)], CORRUPT);
    assert_eq!(json(&run)["refusal"]["reason"], "truncated");
    assert_eq!(fs::metadata(&j).expect("stat").len(), 0);
}

#[test]
fn recover_directory_is_an_error() {
    let dir = setup();
    let d = dir.path("journal.d");
    fs::create_dir(&d).expect("mkdir");
    let run = run(&dir, &["recover", s(&d)]);
    assert_ne!(
        run.code, OK,
        "recover accepted a directory:\n{}",
        run.stdout
    );
    assert_stdout_empty(&run);
    assert_stderr_contains(&run, "copyctl: ");
    assert_stderr_contains(&run, s(&d));
}

/// Regression: recover opens the journal O_RDWR, which a directory refuses
/// with EISDIR before the "not a regular file" check; that used to end as an
/// I/O error (exit 8), not the 9 that exit.rs documents and `inspect` gives.
#[test]
fn recover_directory_exit_code_is_bad_input() {
    let dir = setup();
    let d = dir.path("journal.d");
    fs::create_dir(&d).expect("mkdir");
    // exit.rs: BadInput covers "a symlink or directory as journal path".
    let run = check(&dir, &["recover", s(&d)], BAD_INPUT);
    assert_stdout_empty(&run);
    assert_stderr_contains(&run, s(&d));
}

#[test]
fn inspect_directory_is_refused() {
    let dir = setup();
    let d = dir.path("journal.d");
    fs::create_dir(&d).expect("mkdir");
    let run = check(&dir, &["inspect", s(&d)], BAD_INPUT);
    assert_stdout_empty(&run);
    assert_stderr_contains(&run, "not a regular file");
}

/// Fails today: `inspect` opens the journal `O_RDONLY` without `O_NONBLOCK`,
/// which on a FIFO blocks until a writer appears, so `copyctl inspect FIFO`
/// hangs before its "is not a regular file" check; `recover` and `resolve`
/// (`O_RDWR`, which does not block) refuse it with exit 9.
#[test]
fn inspect_fifo_is_refused_without_hanging() {
    let dir = setup();
    let fifo = dir.path("journal.fifo");
    rustix::fs::mkfifoat(
        rustix::fs::CWD,
        &fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
    )
    .expect("mkfifo");
    check(&dir, &["recover", s(&fifo)], BAD_INPUT);

    let mut child = spawn(&dir, &["inspect", s(&fifo)], Stdio::piped(), Stdio::piped());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while child.try_wait().expect("poll copyctl").is_none() {
        if std::time::Instant::now() > deadline {
            child.kill().expect("kill copyctl");
            child.wait().expect("reap copyctl");
            panic!("copyctl inspect on a FIFO still runs after 10 s: it blocks in open");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let output = child.wait_with_output().expect("collect copyctl");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(BAD_INPUT), "{stderr}");
    assert!(stderr.contains("not a regular file"), "{stderr}");
}

#[test]
fn recover_refuses_symlink_to_journal() {
    let dir = setup();
    let target = dir.journal("real.journal", Phase::Ready);
    // Damage one copy, so that a recover that followed the link would repair it.
    damage(&target, Position::Slot { slot: 1, copy: 1 }, b"rot");
    let before = fs::read(&target).expect("read journal");
    let link = dir.path("link.journal");
    std::os::unix::fs::symlink(&target, &link).expect("symlink");

    let run = check(&dir, &["recover", s(&link)], BAD_INPUT);
    assert_stdout_empty(&run);
    assert_stderr_contains(&run, "symbolic link");
    assert_stderr_contains(&run, s(&link));
    assert_eq!(
        fs::read(&target).expect("read journal"),
        before,
        "target was written"
    );
    assert!(dir.backups("real.journal").is_empty());
    assert!(dir.backups("link.journal").is_empty());
}

// ---- recover: journals of every phase ----

#[track_caller]
fn recover_phase(phase: Phase, side: &str, seq: u64) {
    let dir = setup();
    let j = dir.journal("switch.journal", phase);
    let image = dir.path(if side == "source" {
        "source.raw"
    } else {
        "destination.raw"
    });
    let size = fs::metadata(&image).expect("stat image").len();
    let name = phase.name();

    let run = check(&dir, &["recover", s(&j)], OK);
    assert_stderr_empty(&run);
    assert_stdout_contains(&run, &format!("authoritative: {side}\n"));
    assert_stdout_contains(
        &run,
        &format!("image:         {} ({size} bytes)\n", s(&image)),
    );
    assert_stdout_contains(
        &run,
        &format!("phase:         {name} (seq {seq}, writer epoch 1)\n"),
    );
    assert!(!run.stdout.contains("repaired"), "{}", run.stdout);

    let run = check(&dir, &["--output", "json", "recover", s(&j)], OK);
    assert_stderr_empty(&run);
    let v = json(&run);
    assert_eq!(v["verdict"], "authoritative");
    assert_eq!(v["authoritative"], side);
    assert_eq!(v["phase"], name);
    assert_eq!(v["seq"], seq);
    assert_eq!(v["image"]["path"], s(&image));
    assert_eq!(v["image"]["size"], size);
    assert_eq!(v["journal"], s(&j));
    assert_eq!(v["decision"], "intact");
    assert_eq!(v["repaired"], serde_json::json!([]));
    assert_eq!(v["warnings"], serde_json::json!([]));
    assert_eq!(v["backup"], Value::Null);
    assert!(dir.backups("switch.journal").is_empty());
}

#[test]
fn recover_copying() {
    recover_phase(Phase::Copying, "source", 0);
}

#[test]
fn recover_ready() {
    recover_phase(Phase::Ready, "source", 1);
}

#[test]
fn recover_switched() {
    recover_phase(Phase::Switched, "destination", 2);
}

#[test]
fn recover_completed() {
    recover_phase(Phase::Completed, "destination", 3);
}

#[test]
fn recover_aborted() {
    recover_phase(Phase::Aborted, "source", 1);
}

// ---- recover: locks, repairs, refusals ----

#[test]
fn recover_locked_journal() {
    let dir = setup();
    let held = dir.open_journal("busy.journal", Phase::Ready);
    let j = dir.path("busy.journal");
    let before = fs::read(&j).expect("read journal");
    let run = check(&dir, &["recover", s(&j)], LOCKED);
    assert_stdout_empty(&run);
    assert_stderr_contains(&run, "locked by another process");
    assert_stderr_contains(&run, s(&j));
    drop(held);
    assert_eq!(fs::read(&j).expect("read journal"), before);
    // Once the holder is gone, recovery goes through.
    check(&dir, &["recover", s(&j)], OK);
}

#[test]
fn recover_repairs_damaged_copy_of_newest_record() {
    let dir = setup();
    let j = dir.journal("switch.journal", Phase::Switched);
    // Seq 2 lives in slot 2; damage copy A.
    damage(&j, Position::Slot { slot: 2, copy: 0 }, &noise(64, 7));
    let damaged = fs::read(&j).expect("read journal");

    let run = check(&dir, &["recover", s(&j)], OK);
    assert_stdout_contains(&run, "authoritative: destination\n");
    assert_stdout_contains(&run, "phase:         switched (seq 2, writer epoch 1)\n");
    assert_stdout_contains(&run, "repaired:      slot2/A from slot2/B\n");
    assert_stdout_contains(&run, "backup:        ");
    // Copy B and the seal are two intact copies: the warning says so.
    assert_stderr_contains(
        &run,
        "a ring copy of the newest record (seq 2) is damaged; the seal holds another",
    );

    let backups = dir.backups("switch.journal");
    assert_eq!(backups.len(), 1, "{backups:?}");
    let backup = &backups[0];
    let suffix = backup.to_str().unwrap().rsplit('.').next().unwrap();
    assert!(
        !suffix.is_empty() && suffix.bytes().all(|b| b.is_ascii_digit()),
        "backup name {backup:?}"
    );
    assert_stdout_contains(&run, &format!("backup:        {}\n", s(backup)));
    assert_eq!(fs::read(backup).expect("read backup"), damaged);
    let repaired = fs::read(&j).expect("read journal");
    let (a, b) = (
        block_range(Position::Slot { slot: 2, copy: 0 }),
        block_range(Position::Slot { slot: 2, copy: 1 }),
    );
    assert_ne!(
        repaired[a.clone()],
        damaged[a.clone()],
        "copy A was not rewritten"
    );
    // The copies differ only in the copy byte (offset 13) and the block CRC.
    assert_eq!(repaired[a.start + 14..a.end], repaired[b.start + 14..b.end]);

    let run = check(&dir, &["recover", s(&j)], OK);
    assert_stdout_contains(&run, "phase:         switched (seq 2, writer epoch 1)\n");
    assert!(
        !run.stdout.contains("repaired"),
        "second recover repaired:\n{}",
        run.stdout
    );
    assert!(!run.stdout.contains("backup"), "{}", run.stdout);
    assert_stderr_empty(&run);
    let run = check(&dir, &["--output", "json", "recover", s(&j)], OK);
    let v = json(&run);
    assert_eq!(v["repaired"], serde_json::json!([]));
    assert_eq!(v["decision"], "intact");
    assert_eq!(dir.backups("switch.journal").len(), 1);
}

#[test]
fn recover_repair_in_json() {
    let dir = setup();
    let j = dir.journal("switch.journal", Phase::Ready);
    damage(&j, Position::Slot { slot: 1, copy: 1 }, b"bit rot");
    let run = check(&dir, &["--output", "json", "recover", s(&j)], OK);
    let v = json(&run);
    assert_eq!(v["seq"], 1);
    assert_eq!(v["phase"], "ready");
    assert_eq!(v["decision"], "repairable");
    assert_eq!(
        v["repaired"],
        serde_json::json!([{ "target": "slot1/B", "from": "slot1/A" }])
    );
    let backups = dir.backups("switch.journal");
    assert_eq!(backups.len(), 1);
    assert_eq!(v["backup"], s(&backups[0]));
    assert_eq!(v["warnings"].as_array().map(Vec::len), Some(1), "{v}");
}

#[test]
fn recover_no_repair_writes_nothing() {
    let dir = setup();
    let j = dir.journal("switch.journal", Phase::Switched);
    damage(&j, Position::Slot { slot: 2, copy: 0 }, &noise(64, 11));
    let before = fs::read(&j).expect("read journal");
    let listing = dir.listing();

    let run = check(&dir, &["recover", "--no-repair", s(&j)], OK);
    assert_stdout_contains(&run, "authoritative: destination\n");
    assert_stdout_contains(&run, "repairable:    slot2/A from slot2/B\n");
    assert!(!run.stdout.contains("repaired:"), "{}", run.stdout);
    assert!(!run.stdout.contains("backup:"), "{}", run.stdout);

    let run = check(
        &dir,
        &["--output", "json", "recover", "--no-repair", s(&j)],
        OK,
    );
    let v = json(&run);
    assert_eq!(
        v["repairable"],
        serde_json::json!([{ "target": "slot2/A", "from": "slot2/B" }])
    );
    assert_eq!(v["repaired"], serde_json::json!([]));
    assert_eq!(v["backup"], Value::Null);

    assert_eq!(
        fs::read(&j).expect("read journal"),
        before,
        "--no-repair wrote the journal"
    );
    assert_eq!(dir.listing(), listing, "--no-repair created files");
}

#[test]
fn recover_lost_successor_needs_operator_then_resolve() {
    let dir = setup();
    let j = dir.journal("switch.journal", Phase::Ready);
    // Seq 1 is newest; both copies of slot 2 (where seq 2 would go) destroyed.
    damage(&j, Position::Slot { slot: 2, copy: 0 }, &noise(200, 3));
    damage(&j, Position::Slot { slot: 2, copy: 1 }, &noise(200, 5));
    let destroyed = fs::read(&j).expect("read journal");

    let run = check(&dir, &["recover", s(&j)], NEEDS_OPERATOR);
    assert_stdout_contains(&run, "refused: needs-operator");
    let run = check(
        &dir,
        &["--output", "json", "recover", s(&j)],
        NEEDS_OPERATOR,
    );
    let v = json(&run);
    assert_eq!(v["verdict"], "refused");
    assert_eq!(v["refusal"]["reason"], "needs-operator");
    assert_eq!(v["decision"], "successor-lost");
    assert_eq!(
        fs::read(&j).expect("read journal"),
        destroyed,
        "a refusal wrote the journal"
    );

    let run = check(
        &dir,
        &[
            "--output",
            "json",
            "resolve",
            s(&j),
            "--authority",
            "destination",
        ],
        OK,
    );
    let v = json(&run);
    assert_eq!(v["resolved"], "destination");
    assert_eq!(v["seq"], 2);
    let backups = dir.backups("switch.journal");
    assert_eq!(backups.len(), 1);
    assert_eq!(v["backup"], s(&backups[0]));
    assert_eq!(fs::read(&backups[0]).expect("read backup"), destroyed);

    let destination = dir.path("destination.raw");
    let run = check(&dir, &["recover", s(&j)], OK);
    assert_stderr_empty(&run);
    assert_stdout_contains(&run, "authoritative: destination\n");
    assert_stdout_contains(&run, &format!("image:         {} ", s(&destination)));
    assert_stdout_contains(&run, "phase:         resolved (seq 2, writer epoch 2)\n");
    let run = check(&dir, &["--output", "json", "recover", s(&j)], OK);
    let v = json(&run);
    assert_eq!(v["authoritative"], "destination");
    assert_eq!(v["phase"], "resolved");
    assert_eq!(v["seq"], 2);
    assert_eq!(v["image"]["path"], s(&destination));
}

#[test]
fn resolve_healthy_journal_is_refused() {
    let dir = setup();
    let j = dir.journal("switch.journal", Phase::Ready);
    let before = fs::read(&j).expect("read journal");
    let listing = dir.listing();
    let run = check(
        &dir,
        &["resolve", s(&j), "--authority", "destination"],
        BAD_INPUT,
    );
    assert_stdout_empty(&run);
    assert_stderr_contains(&run, "needs no resolution");
    assert_eq!(
        fs::read(&j).expect("read journal"),
        before,
        "resolve wrote the journal"
    );
    assert_eq!(dir.listing(), listing, "resolve created files");
    let run = check(&dir, &["recover", s(&j)], OK);
    assert_stdout_contains(&run, "authoritative: source\n");
}

#[test]
fn recover_warns_when_image_changed() {
    let dir = setup();
    let j = dir.journal("switch.journal", Phase::Copying);
    let source = dir.path("source.raw");
    let old = fs::metadata(&source).expect("stat source");
    // A new file renamed over the old one: a different inode and size.
    let replacement = dir.write("source.new", &[1; 7 * 512]);
    fs::rename(&replacement, &source).expect("rename");
    let new = fs::metadata(&source).expect("stat source");
    assert_ne!(old.ino(), new.ino());

    let run = check(&dir, &["recover", s(&j)], OK);
    assert_stdout_contains(&run, "authoritative: source\n");
    assert_stderr_contains(&run, "copyctl: warning: ");
    assert_stderr_contains(&run, "changed since the job started");
    assert_stderr_contains(&run, &format!("inode {} size {}", old.ino(), old.size()));
    assert_stderr_contains(&run, &format!("inode {} size {}", new.ino(), new.size()));
    assert!(
        !run.stdout.contains("warning"),
        "warning on stdout:\n{}",
        run.stdout
    );
}

#[test]
fn recover_newer_format_version() {
    let dir = setup();
    let j = dir.journal("switch.journal", Phase::Ready);
    let mut data = fs::read(&j).expect("read journal");
    let block = &mut data[block_range(Position::Slot { slot: 1, copy: 1 })];
    block[8..10].copy_from_slice(&3u16.to_le_bytes());
    let crc = crc32(&block[4..BLOCK_SIZE]);
    block[0..4].copy_from_slice(&crc.to_le_bytes());
    fs::write(&j, &data).expect("write journal");

    let run = check(&dir, &["recover", s(&j)], UNSUPPORTED);
    assert_stdout_contains(&run, "refused: unsupported-version");
    assert_stdout_contains(&run, "format version 3");
    let run = check(&dir, &["--output", "json", "recover", s(&j)], UNSUPPORTED);
    let v = json(&run);
    assert_eq!(v["refusal"]["reason"], "unsupported-version");
    assert_eq!(v["decision"], "newer-format");
    assert_eq!(
        fs::read(&j).expect("read journal"),
        data,
        "a refusal wrote the journal"
    );
    assert!(dir.backups("switch.journal").is_empty());
}

#[test]
fn recover_block_of_another_journal() {
    let dir = setup();
    let a = dir.journal("a.journal", Phase::Ready);
    let b = dir.journal("b.journal", Phase::Ready);
    let mut data = fs::read(&a).expect("read journal a");
    let other = fs::read(&b).expect("read journal b");
    let range = block_range(Position::Slot { slot: 0, copy: 1 });
    data[range.clone()].copy_from_slice(&other[range]);
    fs::write(&a, &data).expect("write journal a");

    let run = check(&dir, &["recover", s(&a)], CORRUPT);
    assert_stdout_contains(&run, "refused: wrong-journal");
    let run = check(&dir, &["--output", "json", "recover", s(&a)], CORRUPT);
    let v = json(&run);
    assert_eq!(v["refusal"]["reason"], "wrong-journal");
    assert_eq!(v["decision"], "foreign-block");
    assert_eq!(fs::read(&a).expect("read journal a"), data);
}

/// Another journal's header over header/0: ours still carries the
/// journal's UUID in the nine other blocks, so it is elected, the one block
/// is foreign, recovery refuses (wrong-journal) and `resolve` settles it.
#[test]
fn resolve_settles_a_header_of_another_journal() {
    let dir = setup();
    let a = dir.journal("a.journal", Phase::Completed);
    let b = dir.journal("b.journal", Phase::Ready);
    let mut data = fs::read(&a).expect("read journal a");
    let other = fs::read(&b).expect("read journal b");
    let range = block_range(Position::Header { copy: 0 });
    data[range.clone()].copy_from_slice(&other[range]);
    fs::write(&a, &data).expect("write journal a");

    let run = check(&dir, &["--output", "json", "recover", s(&a)], CORRUPT);
    assert_eq!(json(&run)["refusal"]["reason"], "wrong-journal");
    let run = check(&dir, &["--output", "json", "inspect", s(&a)], OK);
    let v = json(&run);
    let classes: Vec<&str> = v["blocks"]
        .as_array()
        .expect("blocks")
        .iter()
        .map(|b| b["class"].as_str().expect("class"))
        .collect();
    assert_eq!(classes[0], "foreign", "{v:#}");
    assert!(classes[1..].iter().all(|&c| c == "valid"), "{v:#}");

    let run = check(
        &dir,
        &[
            "--output",
            "json",
            "resolve",
            s(&a),
            "--authority",
            "source",
        ],
        OK,
    );
    assert_eq!(json(&run)["seq"], 4);
    let run = check(&dir, &["--output", "json", "recover", s(&a)], OK);
    let v = json(&run);
    assert_eq!(v["phase"], "resolved", "{v:#}");
    assert_eq!(v["authoritative"], "source");
    assert_eq!(v["decision"], "intact");
}

// ---- inspect ----

#[test]
fn inspect_healthy_journal() {
    let dir = setup();
    let j = dir.journal("switch.journal", Phase::Ready);
    let run = check(&dir, &["inspect", s(&j)], OK);
    assert_stderr_empty(&run);
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert!(lines[0].starts_with("position"), "{}", run.stdout);
    let blocks: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|l| l.starts_with("header/") || l.starts_with("slot") || l.starts_with("seal"))
        .collect();
    assert_eq!(blocks.len(), 11, "{}", run.stdout);
    for line in &blocks {
        assert_eq!(line.split_whitespace().nth(2), Some("valid"), "{line}");
    }
    assert_stdout_contains(
        &run,
        "recovery: source authoritative (seq 1, ready) [intact]\n",
    );
    assert_eq!(lines.len(), 13, "{}", run.stdout);
}

#[test]
fn inspect_healthy_journal_json() {
    let dir = setup();
    let j = dir.journal("switch.journal", Phase::Switched);
    let run = check(&dir, &["--output", "json", "inspect", s(&j)], OK);
    assert_stderr_empty(&run);
    let v = json(&run);
    let blocks = v["blocks"].as_array().expect("blocks is an array");
    assert_eq!(blocks.len(), 11);
    assert!(blocks.iter().all(|b| b["class"] == "valid"), "{v:#}");
    assert_eq!(blocks[0]["position"], "header/0");
    assert_eq!(blocks[9]["position"], "header/1");
    assert_eq!(blocks[10]["position"], "seal");
    assert_eq!(blocks[10]["seq"], 2, "the seal holds the Switched record");
    assert_eq!(blocks[10]["phase"], "switched");
    assert_eq!(v["locked_elsewhere"], false);
    assert_eq!(v["recovery"]["verdict"], "authoritative");
    assert_eq!(v["recovery"]["authoritative"], "destination");
    assert_eq!(v["recovery"]["seq"], 2);
}

#[test]
fn inspect_while_locked_warns() {
    let dir = setup();
    let held = dir.open_journal("busy.journal", Phase::Ready);
    let j = dir.path("busy.journal");
    let run = check(&dir, &["inspect", s(&j)], OK);
    assert_stderr_contains(
        &run,
        "copyctl: warning: another process holds the journal lock",
    );
    assert_stdout_contains(&run, "recovery: source authoritative (seq 1, ready)");
    assert!(
        !run.stdout.contains("warning"),
        "warning on stdout:\n{}",
        run.stdout
    );
    drop(held);
}

/// Inspection takes no lock: a `recover` while an inspection has the
/// journal open goes through (it used to find it locked, exit 6).
#[test]
fn recover_while_inspected_is_not_locked_out() {
    let dir = setup();
    let j = dir.journal("switch.journal", Phase::Ready);
    let inspecting = {
        let _no_fork = exclusive();
        journal::open_file(&j, livecopy::storage::JournalAccess::Inspect).expect("inspect")
    };
    assert_eq!(inspecting.lock, livecopy::storage::LockState::Free);
    let run = check(&dir, &["recover", s(&j)], OK);
    assert_stdout_contains(&run, "authoritative: source\n");
    let _no_fork = exclusive();
    drop(inspecting);
}

// ---- stdout for results, stderr for the rest ----

#[test]
fn json_stdout_stays_json_with_warnings() {
    let dir = setup();
    let held = dir.open_journal("busy.journal", Phase::Ready);
    let j = dir.path("busy.journal");
    let run = check(&dir, &["--output", "json", "inspect", s(&j)], OK);
    assert_stderr_contains(&run, "warning: another process holds the journal lock");
    assert_eq!(json(&run)["locked_elsewhere"], true);
    drop(held);

    // The same for recover, whose warnings also go into the JSON.
    let k = dir.journal("moved.journal", Phase::Aborted);
    fs::rename(dir.write("source.new", b"x"), dir.path("source.raw")).expect("rename");
    let run = check(&dir, &["--output", "json", "recover", s(&k)], OK);
    assert_stderr_contains(&run, "changed since the job started");
    let v = json(&run);
    assert_eq!(v["authoritative"], "source");
    let warnings = v["warnings"].as_array().expect("warnings is an array");
    assert_eq!(warnings.len(), 1, "{v:#}");
    assert!(
        warnings[0]
            .as_str()
            .unwrap()
            .contains("changed since the job started")
    );
}

#[test]
fn errors_go_to_stderr_in_json_mode() {
    let dir = setup();
    let j = dir.path("missing.journal");
    let run = check(&dir, &["--output", "json", "recover", s(&j)], MISSING);
    assert_stdout_empty(&run);
    assert_stderr_contains(&run, s(&j));
}

#[test]
fn closed_stdout_is_not_a_crash() {
    let dir = setup();
    let j = dir.journal("switch.journal", Phase::Ready);
    let child = {
        // No other child may be forked while the pipe's read end is open:
        // it would keep the pipe open and the write would succeed.
        let _no_fork = exclusive();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_copyctl"));
        cmd.args(["inspect", s(&j)])
            .current_dir(&dir.root)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn copyctl");
        // Close the read end before the child gets to write.
        drop(child.stdout.take());
        child
    };
    let output = child.wait_with_output().expect("wait for copyctl");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        output.status.code(),
        Some(OK),
        "{:?}\n{stderr}",
        output.status
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

// ---- usage ----

#[test]
fn help_lists_commands() {
    let dir = setup();
    let run = check(&dir, &["--help"], OK);
    for word in ["recover", "inspect", "resolve", "--output", "Usage"] {
        assert_stdout_contains(&run, word);
    }
}

#[test]
fn recover_help_lists_options() {
    let dir = setup();
    let run = check(&dir, &["recover", "--help"], OK);
    for word in ["--no-repair", "<JOURNAL>", "--output", "authoritative"] {
        assert_stdout_contains(&run, word);
    }
}

#[test]
fn unknown_subcommand_is_a_usage_error() {
    let dir = setup();
    let run = check(&dir, &["frobnicate"], USAGE);
    assert_stdout_empty(&run);
    assert_stderr_contains(&run, "frobnicate");
}

/// The commands `copyctl --help` lists.
fn listed_commands() -> Vec<String> {
    let help = crate::support::run_copyctl(&["--help"]);
    assert_eq!(help.code, 0);
    help.stdout
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| !l.is_empty() && !l.starts_with("Options:"))
        .filter(|l| l.starts_with("  ") && !l.starts_with("   "))
        .filter_map(|l| l.split_whitespace().next().map(String::from))
        .filter(|c| c != "help")
        .collect()
}

/// The long options `copyctl COMMAND --help` lists.
fn long_options(command: &str) -> Vec<String> {
    let help = crate::support::run_copyctl(&[command, "--help"]);
    assert_eq!(help.code, 0, "{command}: {}", help.stderr);
    let mut options: Vec<String> = help
        .stdout
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
        .filter(|w| w.starts_with("--") && w.len() > 2)
        .map(String::from)
        .collect();
    options.sort();
    options.dedup();
    options
}

/// Completions for every shell and a man page per command, generated from
/// the parser's definitions: every command and every long option of each
/// appears (so they cannot drift from the CLI); `man` refuses a directory
/// that is not one.
#[test]
fn completions_and_man_pages_cover_every_command_and_option() {
    let commands = listed_commands();
    assert!(commands.len() >= 12, "{commands:?}");
    for shell in ["bash", "zsh", "fish"] {
        let script = crate::support::run_copyctl(&["completions", shell]);
        assert_eq!(script.code, 0, "{shell}: {}", script.stderr);
        for command in &commands {
            assert!(
                script.stdout.contains(command.as_str()),
                "{shell} lacks {command}"
            );
            for option in long_options(command) {
                let bare = option.trim_start_matches('-');
                assert!(
                    script.stdout.contains(bare),
                    "{shell} completion lacks {command} {option}"
                );
            }
        }
    }
    let dir = TempDir::new().unwrap();
    let man = crate::support::run_copyctl(&["man", "--dir", dir.path().to_str().unwrap()]);
    assert_eq!(man.code, 0, "{}", man.stderr);
    let mut checked = 0;
    for command in &commands {
        let page = dir.path().join(format!("copyctl-{command}.1"));
        let text = fs::read_to_string(&page)
            .unwrap_or_else(|e| panic!("{}: {e}", page.display()))
            .replace("\\-", "-");
        assert!(
            text.starts_with(".ie") || text.contains(".TH"),
            "{command}: not roff"
        );
        for option in long_options(command) {
            assert!(
                text.contains(&option),
                "man page of {command} lacks {option}"
            );
            checked += 1;
        }
    }
    println!(
        "completions and man pages: {} commands, {checked} options",
        commands.len()
    );
    let top = crate::support::run_copyctl(&["man"]);
    assert_eq!(top.code, 0);
    assert!(
        top.stdout.contains(".TH copyctl"),
        "{}",
        &top.stdout[..200.min(top.stdout.len())]
    );
    let missing = crate::support::run_copyctl(&["man", "--dir", "/nonexistent/man"]);
    assert_eq!(missing.code, 9, "{}", missing.stderr);
    assert!(
        missing.stderr.contains("not a directory"),
        "{}",
        missing.stderr
    );
}
