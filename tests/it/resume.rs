//! Resuming a copy after the engine was killed, on real files, as a user
//! would: `copyctl copy`, kill -9, `copyctl copy --resume`.

use std::fs;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::{run_copyctl, spawning};

const MIB: u64 = 1 << 20;

/// A source of `size` bytes, every MiB different.
fn source_image(path: &Path, size: u64) {
    let mut file = std::io::BufWriter::with_capacity(8 << 20, fs::File::create(path).unwrap());
    let mut chunk = vec![0u8; MIB as usize];
    for mib in 0..size / MIB {
        for (i, byte) in chunk.iter_mut().enumerate() {
            *byte = ((mib * 31 + i as u64 / 512) % 253) as u8 + 1;
        }
        file.write_all(&chunk).unwrap();
    }
    file.into_inner().unwrap().sync_all().unwrap();
}

fn spawn_copy(args: &[&str]) -> Child {
    let _guard = spawning();
    Command::new(env!("CARGO_BIN_EXE_copyctl"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run copyctl")
}

/// Kills `child` once the destination holds `fraction` of `size` (the pass
/// writes around the cache, so allocation follows it); returns the
/// fraction it held at the kill.
fn kill_at(child: &mut Child, destination: &Path, size: u64, fraction: f64) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let allocated = fs::metadata(destination).map_or(0, |m| m.blocks() * 512);
        if allocated as f64 >= fraction * size as f64 {
            child.kill().expect("kill -9");
            child.wait().expect("reap");
            let allocated = fs::metadata(destination).unwrap().blocks() * 512;
            return allocated.min(size) as f64 / size as f64;
        }
        assert!(
            child.try_wait().expect("poll").is_none(),
            "the copy ended before the kill"
        );
        assert!(Instant::now() < deadline, "the copy made no progress");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A 2 GiB copy killed at about 60% and resumed, killed again at about
/// 80% and resumed again: the result is identical to the source, and each
/// resume copies at most what was left at its kill plus 2% of the image
/// (no guest writes here, so no extent is listed).
#[test]
fn a_copy_killed_twice_resumes_and_copies_only_what_was_left() {
    let dir = tempfile::tempdir().unwrap();
    let (source, destination, journal) = (
        dir.path().join("src.img"),
        dir.path().join("dst.img"),
        dir.path().join("j"),
    );
    let size = 2048 * MIB;
    source_image(&source, size);
    let (s, d, j) = (
        source.to_str().unwrap(),
        destination.to_str().unwrap(),
        journal.to_str().unwrap(),
    );
    let copy = ["copy", "--bandwidth", "256M", "--journal", j, s, d];
    let mut first = spawn_copy(&copy);
    let at_first_kill = kill_at(&mut first, &destination, size, 0.6);

    let recover = run_copyctl(&["--output", "json", "recover", j]);
    assert_eq!(recover.code, 0, "{}", recover.stderr);
    let verdict: Value = serde_json::from_str(&recover.stdout).unwrap();
    assert_eq!(verdict["phase"], "copying");
    assert_eq!(verdict["authoritative"], "source");

    // Human summary; killed again part-way through its own copy.
    let resume = [
        "copy",
        "--resume",
        "--bandwidth",
        "256M",
        "--journal",
        j,
        s,
        d,
    ];
    let mut second = spawn_copy(&resume);
    let at_second_kill = kill_at(&mut second, &destination, size, 0.8);
    assert!(at_second_kill > at_first_kill);

    let done = run_copyctl(&["--output", "json", "copy", "--resume", "--journal", j, s, d]);
    assert_eq!(done.code, 0, "{}", done.stderr);
    let summary: Value = serde_json::from_str(&done.stdout).expect("JSON summary");
    assert_eq!(summary["phase"], "completed");
    assert_eq!(summary["resumed"], true);
    let to_copy = summary["bytes_to_copy"].as_u64().unwrap();
    let bound = ((1.0 - at_second_kill + 0.02) * size as f64) as u64;
    println!(
        "resume on files: killed at {:.1}% and {:.1}%; the last resume copied {} MiB of {} \
         (bound {} MiB)",
        100.0 * at_first_kill,
        100.0 * at_second_kill,
        to_copy / MIB,
        size / MIB,
        bound / MIB
    );
    assert!(
        to_copy <= bound,
        "copied again {to_copy} bytes, bound {bound}"
    );
    assert!(to_copy > 0);
    assert!(
        files_equal(&source, &destination),
        "the destination differs from the source"
    );
    let recover = run_copyctl(&["--output", "json", "recover", j]);
    let verdict: Value = serde_json::from_str(&recover.stdout).unwrap();
    assert_eq!(verdict["authoritative"], "destination");
}

/// The human summary of a resume says what it copied again.
#[test]
fn the_human_summary_of_a_resume_says_what_was_copied_again() {
    let dir = tempfile::tempdir().unwrap();
    let (source, destination, journal) = (
        dir.path().join("src.img"),
        dir.path().join("dst.img"),
        dir.path().join("j"),
    );
    let size = 256 * MIB;
    source_image(&source, size);
    let (s, d, j) = (
        source.to_str().unwrap(),
        destination.to_str().unwrap(),
        journal.to_str().unwrap(),
    );
    let mut first = spawn_copy(&["copy", "--bandwidth", "64M", "--journal", j, s, d]);
    kill_at(&mut first, &destination, size, 0.5);
    let done = run_copyctl(&["copy", "--resume", "--journal", j, s, d]);
    assert_eq!(done.code, 0, "{}", done.stderr);
    assert!(
        done.stdout.contains("resumed:       copied again ")
            && done.stdout.contains(" of 256.0 MiB"),
        "{}",
        done.stdout
    );
    assert!(files_equal(&source, &destination));
}

fn files_equal(a: &Path, b: &Path) -> bool {
    use std::io::Read;
    let (mut a, mut b) = (fs::File::open(a).unwrap(), fs::File::open(b).unwrap());
    let (mut x, mut y) = (vec![0u8; 8 << 20], vec![0u8; 8 << 20]);
    loop {
        let n = a.read(&mut x).unwrap();
        let m = b.read(&mut y).unwrap();
        if n != m || x[..n] != y[..m] {
            return false;
        }
        if n == 0 {
            return true;
        }
    }
}
