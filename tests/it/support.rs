//! Helpers shared by the tests: records, journals in a given phase.

use livecopy::journal::{ImageRecord, ImageRef, Journal, Phase, Record};
use std::sync::{PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use livecopy::storage::{Endpoint, NbdAddress, SimDisk};

/// The job id every test record uses.
pub const JOB_ID: [u8; 16] = *b"test-job-0000001";
/// The journal UUID every simulated test journal uses.
pub const UUID: [u8; 16] = *b"test-journal-id1";

/// Record 0 of a job copying `source` to `destination`.
pub fn first_record_for(source: &str, destination: &str) -> Record {
    Record::single(
        JOB_ID,
        Phase::Copying,
        ImageRef::File(ImageRecord {
            path: source.into(),
            size: 1 << 20,
            device: 2049,
            inode: 11,
        }),
        ImageRef::File(ImageRecord {
            path: destination.into(),
            size: 1 << 20,
            device: 2049,
            inode: 12,
        }),
        *b"writer-instance1",
        1,
        0,
        1_700_000_000_000_000_000,
    )
}

/// Record 0 with fixed example paths.
pub fn first_record() -> Record {
    first_record_for("/images/source.raw", "/images/destination.raw")
}

/// The phases a job passes through to reach `phase`, in order, excluding
/// the initial Copying.
pub fn path_to(phase: Phase) -> Vec<Phase> {
    match phase {
        Phase::Copying => vec![],
        Phase::Ready => vec![Phase::Ready],
        Phase::Switched => vec![Phase::Ready, Phase::Switched],
        Phase::Completed => vec![Phase::Ready, Phase::Switched, Phase::Completed],
        Phase::Aborted => vec![Phase::Aborted],
        Phase::Resolved => panic!("Resolved is reached through resolve, not commit"),
    }
}

/// A simulated journal advanced to `phase`.
pub fn sim_journal(phase: Phase) -> (SimDisk, Journal<SimDisk>) {
    let disk = SimDisk::new(livecopy::journal::format::JOURNAL_LEN);
    let mut journal = Journal::format(disk.clone(), UUID, first_record()).expect("format");
    for (i, next) in path_to(phase).into_iter().enumerate() {
        journal.commit(next, (i as u64 + 1) * 4096).expect("commit");
    }
    (disk, journal)
}

/// What a `copyctl` run left behind.
pub struct Run {
    /// The exit code (a signal counts as -1).
    pub code: i32,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

/// Tests run on parallel threads of one process, and a forked child holds a
/// copy of every descriptor of the process until its exec closes them. If one
/// of them is another test's journal, the flock on it outlives that test's
/// `Journal`, and its next `copyctl recover` finds the journal locked. So
/// children are spawned under the read side of this lock, and journal
/// descriptors that tests open themselves are opened and closed under the
/// write side.
static FORK: RwLock<()> = RwLock::new(());

/// Held while spawning a child process.
pub fn spawning() -> RwLockReadGuard<'static, ()> {
    FORK.read().unwrap_or_else(PoisonError::into_inner)
}

/// Held while opening or closing a journal in the test process.
pub fn exclusive() -> RwLockWriteGuard<'static, ()> {
    FORK.write().unwrap_or_else(PoisonError::into_inner)
}

/// Runs the `copyctl` binary with `args` and waits for it.
pub fn run_copyctl(args: &[&str]) -> Run {
    let child = {
        let _no_journal_changes = spawning();
        std::process::Command::new(env!("CARGO_BIN_EXE_copyctl"))
            .args(args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run copyctl")
    };
    let output = child.wait_with_output().expect("wait for copyctl");
    Run {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// A plain (no TLS) NBD address of export `export` on a Unix socket.
pub fn unix_address(socket: &std::path::Path, export: &str) -> NbdAddress {
    NbdAddress {
        endpoint: Endpoint::Unix {
            socket: socket.to_path_buf(),
        },
        export: export.into(),
        tls: false,
        tls_certificates: None,
        tls_hostname: None,
    }
}
