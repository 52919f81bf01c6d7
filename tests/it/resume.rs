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

/// What `copy --resume` refuses, each with its exit code, a message naming
/// the cause, and the destination left as it was: a completed job, an
/// aborted one, a replaced or resized image, another job's journal,
/// --restart-copy without --resume.
#[test]
fn resume_refusals_name_the_cause_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    let (s, d, j) = (path("src.img"), path("dst.img"), path("j"));
    source_image(Path::new(&s), 8 * MIB);

    // A completed job.
    let done = run_copyctl(&["copy", "--journal", &j, &s, &d]);
    assert_eq!(done.code, 0, "{}", done.stderr);
    let check = |args: &[&str], code: i32, words: &str| {
        let before = fs::read(&d).ok();
        let run = run_copyctl(args);
        assert_eq!(run.code, code, "{args:?}: {}", run.stderr);
        assert!(run.stderr.contains(words), "{args:?}: {}", run.stderr);
        assert_eq!(
            fs::read(&d).ok(),
            before,
            "{args:?} changed the destination"
        );
    };
    check(
        &["copy", "--resume", "--journal", &j, &s, &d],
        9,
        "completed",
    );

    // Another job's journal: its images are not these.
    let (s2, d2, j2) = (path("src2.img"), path("dst2.img"), path("j2"));
    source_image(Path::new(&s2), 8 * MIB);
    let mut other = spawn_copy(&["copy", "--bandwidth", "1M", "--journal", &j2, &s2, &d2]);
    std::thread::sleep(Duration::from_millis(1500));
    other.kill().unwrap();
    other.wait().unwrap();
    check(
        &["copy", "--resume", "--journal", &j2, &s, &d],
        4,
        "wrong-journal",
    );
    check(
        &["copy", "--resume", "--journal", &j2, &s2, &d],
        4,
        "wrong-journal",
    );

    // A replaced source (same path, another file): identity differs.
    let saved = path("src2.saved");
    fs::rename(&s2, &saved).unwrap();
    fs::copy(&saved, &s2).unwrap();
    check(
        &["copy", "--resume", "--journal", &j2, &s2, &d2],
        9,
        "not the file the job started with",
    );
    fs::remove_file(&s2).unwrap();
    fs::rename(&saved, &s2).unwrap();

    // A resized destination.
    let file = fs::OpenOptions::new().write(true).open(&d2).unwrap();
    let size = file.metadata().unwrap().len();
    file.set_len(size + MIB).unwrap();
    check(
        &["copy", "--resume", "--journal", &j2, &s2, &d2],
        9,
        "resized",
    );
    file.set_len(size).unwrap();

    // With its images back, the job resumes.
    let resumed = run_copyctl(&["copy", "--resume", "--journal", &j2, &s2, &d2]);
    assert_eq!(
        resumed.code, 0,
        "the job resumes once its images are back: {}",
        resumed.stderr
    );

    let (s3, d3, j3) = (path("src3.img"), path("dst3.img"), path("j3"));
    source_image(Path::new(&s3), 8 * MIB);
    let (nbd, ctl) = (path("nbd.sock"), path("ctl.sock"));
    let mut serve = spawn_copy(&[
        "serve",
        "--bandwidth",
        "1M",
        "--journal",
        &j3,
        "--source",
        &s3,
        "--dest",
        &d3,
        "--socket",
        &nbd,
        "--control",
        &ctl,
    ]);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !Path::new(&ctl).exists() {
        assert!(std::time::Instant::now() < deadline, "serve never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    let abort = run_copyctl(&["abort", "--control", &ctl]);
    assert_eq!(abort.code, 0, "{}", abort.stderr);
    serve.kill().unwrap();
    serve.wait().unwrap();
    check(
        &["copy", "--resume", "--journal", &j3, &s3, &d3],
        9,
        "aborted",
    );

    // `serve --resume` with no journal at the path: no new copy, nothing
    // created.
    let (missing, dst4) = (path("missing.journal"), path("dst4.img"));
    let (nbd4, ctl4) = (path("nbd4.sock"), path("ctl4.sock"));
    let serve = run_copyctl(&[
        "serve",
        "--resume",
        "--journal",
        &missing,
        "--source",
        &s3,
        "--dest",
        &dst4,
        "--socket",
        &nbd4,
        "--control",
        &ctl4,
    ]);
    assert_eq!(serve.code, 5, "{}", serve.stderr);
    assert!(serve.stderr.contains("no journal at"), "{}", serve.stderr);
    for left in [&missing, &dst4, &nbd4, &ctl4] {
        assert!(!Path::new(left).exists(), "{left} was created");
    }

    // Usage: --restart-copy needs --resume.
    let usage = run_copyctl(&["copy", "--restart-copy", "--journal", &j3, &s3, &d3]);
    assert_eq!(usage.code, 2, "{}", usage.stderr);
}

/// `recover --source/--dest` (and `restart::authoritative_image_of`)
/// refuse a journal swapped in from another job, each image checked on its
/// own, before anything is written; the right images (also by a relative
/// path) give the verdict. `serve` on a finished job checks the same.
#[test]
fn recover_and_serve_refuse_another_jobs_journal() {
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    let (sa, da, ja) = (path("a.img"), path("a-copy.img"), path("a.journal"));
    let (sb, db, jb) = (path("b.img"), path("b-copy.img"), path("b.journal"));
    for (s, d, j) in [(&sa, &da, &ja), (&sb, &db, &jb)] {
        source_image(Path::new(s), 4 * MIB);
        let run = run_copyctl(&["copy", "--journal", j, s, d]);
        assert_eq!(run.code, 0, "{}", run.stderr);
    }
    let recover = |extra: &[&str]| {
        let mut args = vec!["--output", "json", "recover", &ja];
        args.extend_from_slice(extra);
        run_copyctl(&args)
    };
    let ok = recover(&["--source", &sa, "--dest", &da]);
    assert_eq!(ok.code, 0, "{}", ok.stderr);
    // Another name for the same file (a symlink) matches too.
    let link = path("a-link.img");
    std::os::unix::fs::symlink(&sa, &link).unwrap();
    let ok = recover(&["--source", &link]);
    assert_eq!(ok.code, 0, "{}", ok.stderr);

    // Job B's journal copied over job A's.
    let before = fs::read(&jb).unwrap();
    fs::copy(&jb, &ja).unwrap();
    let plain = recover(&[]);
    assert_eq!(
        plain.code, 0,
        "without expectations recover names B's image"
    );
    for extra in [
        vec!["--source", sa.as_str(), "--dest", da.as_str()],
        vec!["--source", sa.as_str()],
        vec!["--dest", da.as_str()],
    ] {
        let refused = recover(&extra);
        assert_eq!(refused.code, 4, "{extra:?}: {}", refused.stdout);
        let verdict: Value = serde_json::from_str(&refused.stdout).unwrap();
        assert_eq!(verdict["refusal"]["reason"], "wrong-journal", "{verdict}");
    }
    assert_eq!(fs::read(&ja).unwrap(), before, "nothing written");

    // The library's restart path.
    let expected = livecopy::restart::Expected {
        source: Some(livecopy::storage::Location::Path(sa.clone().into())),
        destination: None,
    };
    let refused = {
        let _guard = crate::support::exclusive();
        livecopy::restart::authoritative_image_of(Path::new(&ja), &expected)
    };
    match refused {
        Err(livecopy::Error::Refused(r)) => {
            assert_eq!(r.reason, livecopy::journal::RefusalReason::WrongJournal)
        }
        other => panic!("expected wrong-journal, got {other:?}"),
    }

    // serve on the finished job with images that are not its own.
    let (nbd, ctl) = (path("nbd.sock"), path("ctl.sock"));
    let serve = run_copyctl(&[
        "serve",
        "--journal",
        &ja,
        "--source",
        &sa,
        "--dest",
        &da,
        "--socket",
        &nbd,
        "--control",
        &ctl,
    ]);
    assert_eq!(serve.code, 4, "{}", serve.stderr);
    assert!(serve.stderr.contains("wrong-journal"), "{}", serve.stderr);
    assert!(!Path::new(&nbd).exists() && !Path::new(&ctl).exists());
}
