//! `copyctl copy` and `copyctl demo`, run as a user would.

use std::fs;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;

use serde_json::Value;

use crate::support::run_copyctl;

const MIB: u64 = 1 << 20;

/// A sparse source: data in every other MiB, holes between.
fn sparse_source(path: &Path, size: u64) -> Vec<u8> {
    let file = fs::File::create(path).unwrap();
    file.set_len(size).unwrap();
    let mut expected = vec![0u8; size as usize];
    for mib in (0..size / MIB).step_by(2) {
        let chunk: Vec<u8> = (0..MIB)
            .map(|i| ((mib * 7 + i / 4096) % 251) as u8 + 1)
            .collect();
        file.write_all_at(&chunk, mib * MIB).unwrap();
        expected[(mib * MIB) as usize..((mib + 1) * MIB) as usize].copy_from_slice(&chunk);
    }
    file.sync_all().unwrap();
    expected
}

#[test]
fn copy_copies_switches_completes_and_keeps_holes() {
    let dir = tempfile::tempdir().unwrap();
    let (source, destination, journal) = (
        dir.path().join("src.img"),
        dir.path().join("dst.img"),
        dir.path().join("j"),
    );
    let expected = sparse_source(&source, 16 * MIB);
    let run = run_copyctl(&[
        "--output",
        "json",
        "copy",
        "--journal",
        journal.to_str().unwrap(),
        source.to_str().unwrap(),
        destination.to_str().unwrap(),
    ]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let summary: Value = serde_json::from_str(&run.stdout).expect("JSON summary");
    assert_eq!(summary["phase"], "completed");
    assert_eq!(summary["destination_created"], true);
    assert_eq!(summary["size"], 16 * MIB);
    assert_eq!(summary["bytes_copied"], 8 * MIB, "only the data is copied");
    assert!(summary["switch_pause_seconds"].as_f64().unwrap() >= 0.0);
    assert!(
        run.stderr.is_empty(),
        "no progress bar when stderr is not a terminal: {}",
        run.stderr
    );

    assert_eq!(fs::read(&destination).unwrap(), expected);
    let allocated = fs::metadata(&destination).unwrap().blocks() * 512;
    assert!(
        allocated <= 9 * MIB,
        "holes stay holes: {allocated} bytes allocated for 8 MiB of data"
    );
    assert_eq!(fs::metadata(&destination).unwrap().mode() & 0o777, 0o600);

    let recover = run_copyctl(&["--output", "json", "recover", journal.to_str().unwrap()]);
    assert_eq!(recover.code, 0, "{}", recover.stderr);
    let verdict: Value = serde_json::from_str(&recover.stdout).unwrap();
    assert_eq!(verdict["authoritative"], "destination");
    assert_eq!(verdict["phase"], "completed");
}

#[test]
fn copy_human_summary_names_the_destination() {
    let dir = tempfile::tempdir().unwrap();
    let (source, destination, journal) = (
        dir.path().join("src.img"),
        dir.path().join("dst.img"),
        dir.path().join("j"),
    );
    sparse_source(&source, 4 * MIB);
    fs::File::create(&destination)
        .unwrap()
        .set_len(4 * MIB)
        .unwrap();
    let run = run_copyctl(&[
        "copy",
        "--journal",
        journal.to_str().unwrap(),
        "--granularity",
        "256K",
        "--bandwidth",
        "1G",
        source.to_str().unwrap(),
        destination.to_str().unwrap(),
    ]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(run.stdout.contains("completed:"), "{}", run.stdout);
    assert!(
        run.stdout.contains(destination.to_str().unwrap()),
        "{}",
        run.stdout
    );
    assert_eq!(fs::read(&destination).unwrap(), fs::read(&source).unwrap());
}

#[test]
fn copy_refuses_bad_input_without_touching_anything() {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    sparse_source(&dir.path().join("src.img"), 2 * MIB);
    fs::File::create(dir.path().join("small.img"))
        .unwrap()
        .set_len(MIB)
        .unwrap();
    fs::write(dir.path().join("existing.journal"), b"not mine").unwrap();
    std::os::unix::fs::symlink(dir.path().join("src.img"), dir.path().join("link.img")).unwrap();

    // Missing source.
    let run = run_copyctl(&["copy", "--journal", &p("j1"), &p("nope.img"), &p("d1.img")]);
    assert_eq!(run.code, 5, "{}", run.stderr);
    assert!(!dir.path().join("j1").exists());
    // Destination smaller than the source.
    let run = run_copyctl(&[
        "copy",
        "--journal",
        &p("j2"),
        &p("src.img"),
        &p("small.img"),
    ]);
    assert_eq!(run.code, 9, "{}", run.stderr);
    assert!(run.stderr.contains("smaller"), "{}", run.stderr);
    assert!(!dir.path().join("j2").exists());
    // The same file, through a symlink.
    let run = run_copyctl(&["copy", "--journal", &p("j3"), &p("src.img"), &p("link.img")]);
    assert_eq!(run.code, 9, "{}", run.stderr);
    assert!(run.stderr.contains("same file"), "{}", run.stderr);
    // An existing journal is never replaced.
    let run = run_copyctl(&[
        "copy",
        "--journal",
        &p("existing.journal"),
        &p("src.img"),
        &p("d4.img"),
    ]);
    assert_ne!(run.code, 0);
    assert_eq!(
        fs::read(dir.path().join("existing.journal")).unwrap(),
        b"not mine"
    );
    // A bad size.
    let run = run_copyctl(&[
        "copy",
        "--journal",
        &p("j5"),
        "--granularity",
        "12Q",
        &p("src.img"),
        &p("d5.img"),
    ]);
    assert_eq!(run.code, 2, "{}", run.stderr);
    // A tuning the engine refuses: no journal, no destination.
    let run = run_copyctl(&[
        "copy",
        "--journal",
        &p("j6"),
        "--busy-workers",
        "0",
        &p("src.img"),
        &p("d6.img"),
    ]);
    assert_eq!(run.code, 2, "a usage error: {}", run.stderr);
    assert!(run.stderr.contains("busy"), "{}", run.stderr);
    assert!(!dir.path().join("j6").exists());
    assert!(!dir.path().join("d6.img").exists());
}

#[test]
fn copy_with_busy_tuning_copies() {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("src.img");
    let destination = dir.path().join("dst.img");
    let expected = sparse_source(&source, 4 * MIB);
    let run = run_copyctl(&[
        "copy",
        "--journal",
        dir.path().join("j").to_str().unwrap(),
        "--busy-workers",
        "2",
        "--busy-chunk",
        "64K",
        source.to_str().unwrap(),
        destination.to_str().unwrap(),
    ]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(fs::read(&destination).unwrap(), expected);
}

#[test]
fn demo_kills_the_engine_and_verifies_every_acknowledged_write() {
    let run = run_copyctl(&["--output", "json", "demo", "--size", "16M", "--seed", "7"]);
    assert_eq!(run.code, 0, "stdout {}\nstderr {}", run.stdout, run.stderr);
    let report: Value = serde_json::from_str(&run.stdout).expect("JSON report");
    assert_eq!(report["verdict"], "verified");
    assert_eq!(report["recovery"]["authoritative"], "destination");
    assert!(report["writes_acknowledged"].as_u64().unwrap() > 0);
    assert_eq!(report["wrong_blocks"].as_array().unwrap().len(), 0);
    assert_eq!(report["blocks_checked"], 16 * MIB / 4096);
}

/// `demo --crash-during-copy`: killed during the copy, the source holds
/// every acknowledged write; the resumed copy copies only part of the
/// image again, and after the switch and the second kill the destination
/// holds every acknowledged write of both runs.
#[test]
fn demo_crash_during_copy_resumes_and_verifies_both_crashes() {
    let run = run_copyctl(&[
        "--output",
        "json",
        "demo",
        "--crash-during-copy",
        "--size",
        "64M",
        "--seed",
        "9",
    ]);
    assert_eq!(run.code, 0, "stdout {}\nstderr {}", run.stdout, run.stderr);
    let report: Value = serde_json::from_str(&run.stdout).expect("JSON report");
    assert_eq!(report["verdict"], "verified");
    let first = &report["crash_during_copy"];
    assert_eq!(first["recovery"]["authoritative"], "source", "{first}");
    assert_eq!(
        first["wrong_blocks"].as_array().unwrap().len(),
        0,
        "{first}"
    );
    assert!(
        first["writes_acknowledged"].as_u64().unwrap() > 0,
        "{first}"
    );
    let killed_at = first["killed_at_bytes_copied"].as_u64().unwrap();
    let resumed = first["resumed_bytes_to_copy"].as_u64().unwrap();
    assert!(killed_at > 0 && resumed > 0, "{first}");
    assert!(resumed < 64 * MIB, "the resume copied everything: {first}");
    assert_eq!(report["recovery"]["authoritative"], "destination");
    assert_eq!(report["wrong_blocks"].as_array().unwrap().len(), 0);
}

/// The demo into an NBD export (qemu-storage-daemon): recovery names the
/// export by its URI and every acknowledged write is read back through it.
#[test]
fn demo_remote_copies_into_an_export_and_verifies_through_it() {
    let run = run_copyctl(&[
        "--output", "json", "demo", "--remote", "--size", "16M", "--seed", "11",
    ]);
    assert_eq!(run.code, 0, "stdout {}\nstderr {}", run.stdout, run.stderr);
    let report: Value = serde_json::from_str(&run.stdout).expect("JSON report");
    assert_eq!(report["verdict"], "verified");
    assert_eq!(report["recovery"]["authoritative"], "destination");
    let image = report["recovery"]["image"].as_str().expect("image");
    assert!(image.starts_with("nbd+unix:///disk0?socket="), "{image}");
    assert!(report["writes_acknowledged"].as_u64().unwrap() > 0);
    assert_eq!(report["wrong_blocks"].as_array().unwrap().len(), 0);
}

#[test]
fn a_second_job_on_the_same_images_is_refused_while_the_first_runs() {
    let dir = tempfile::tempdir().unwrap();
    let (source, destination) = (dir.path().join("src.img"), dir.path().join("dst.img"));
    sparse_source(&source, 2 * MIB);
    fs::File::create(&destination)
        .unwrap()
        .set_len(2 * MIB)
        .unwrap();
    let config = livecopy::engine::Config::default();
    let first = {
        let _no_fork = crate::support::exclusive();
        livecopy::engine::files::start(
            &dir.path().join("j1"),
            &source,
            &destination,
            config.clone(),
        )
        .expect("the first job starts")
    };
    let second =
        livecopy::engine::files::start(&dir.path().join("j2"), &source, &destination, config);
    let error = second
        .err()
        .expect("a second job on the same images is refused");
    assert_eq!(error.kind(), livecopy::ErrorKind::Locked, "{error}");
    // And through the CLI: exit 6, and nothing of the second job is left.
    let run = run_copyctl(&[
        "copy",
        "--journal",
        dir.path().join("j3").to_str().unwrap(),
        source.to_str().unwrap(),
        destination.to_str().unwrap(),
    ]);
    assert_eq!(run.code, 6, "{}", run.stderr);
    assert!(!dir.path().join("j2").exists() && !dir.path().join("j3").exists());
    let _no_fork = crate::support::exclusive();
    drop(first);
}

/// A tmpfs of `size` bytes mounted for one test, unmounted on drop.
struct SmallFs(std::path::PathBuf);

impl SmallFs {
    fn mount(at: &Path, size: u64) -> SmallFs {
        fs::create_dir_all(at).unwrap();
        let status = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size}"),
                "tmpfs",
                at.to_str().unwrap(),
            ])
            .status()
            .expect("run mount");
        assert!(
            status.success(),
            "mounting a small tmpfs failed (this test needs root, as CI has)"
        );
        SmallFs(at.to_path_buf())
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

/// ENOSPC on a real destination file: the copy stops, the journal records
/// Aborted with the source authoritative, and `copy` reports the cause.
#[test]
fn a_full_destination_file_system_aborts_the_copy_and_keeps_the_source() {
    let dir = tempfile::tempdir().unwrap();
    let small = SmallFs::mount(&dir.path().join("small"), 2 * MIB);
    let (source, journal) = (dir.path().join("src.img"), dir.path().join("j"));
    let destination = small.0.join("dst.img");
    sparse_source(&source, 8 * MIB); // 4 MiB of data: more than fits
    fs::File::create(&destination)
        .unwrap()
        .set_len(8 * MIB)
        .unwrap();
    let run = run_copyctl(&[
        "copy",
        "--journal",
        journal.to_str().unwrap(),
        source.to_str().unwrap(),
        destination.to_str().unwrap(),
    ]);
    assert_eq!(run.code, 8, "{}", run.stderr);
    assert!(
        run.stderr.contains("aborted") && run.stderr.contains("os error 28"),
        "{}",
        run.stderr
    );
    let recover = run_copyctl(&["--output", "json", "recover", journal.to_str().unwrap()]);
    assert_eq!(recover.code, 0, "{}", recover.stderr);
    let verdict: Value = serde_json::from_str(&recover.stdout).unwrap();
    assert_eq!(verdict["authoritative"], "source");
    assert_eq!(verdict["phase"], "aborted");
    drop(small);
}

/// A new job over an existing destination that holds data is refused
/// unless asked for: a mistyped journal path must not start a copy over
/// what may be another job's only up-to-date image. A destination that is
/// all holes, or whose allocated blocks are zeros, is taken as it is.
#[test]
fn a_destination_holding_data_needs_overwrite_destination() {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    let source = sparse_source(&dir.path().join("src.img"), 2 * MIB);
    let mut used = vec![0u8; 2 * MIB as usize];
    used[MIB as usize + 7] = 0x42;
    fs::write(dir.path().join("used.img"), &used).unwrap();
    fs::write(dir.path().join("zeros.img"), vec![0u8; 2 * MIB as usize]).unwrap();
    fs::File::create(dir.path().join("sparse.img"))
        .unwrap()
        .set_len(2 * MIB)
        .unwrap();

    let refused = run_copyctl(&["copy", "--journal", &p("j1"), &p("src.img"), &p("used.img")]);
    assert_eq!(refused.code, 9, "{}", refused.stderr);
    assert!(
        refused.stderr.contains("already holds data")
            && refused.stderr.contains("--overwrite-destination"),
        "{}",
        refused.stderr
    );
    assert!(!dir.path().join("j1").exists(), "a journal was left");
    assert_eq!(fs::read(dir.path().join("used.img")).unwrap(), used);
    let serve = run_copyctl(&[
        "serve",
        "--journal",
        &p("j2"),
        "--source",
        &p("src.img"),
        "--dest",
        &p("used.img"),
        "--socket",
        &p("nbd.sock"),
        "--control",
        &p("ctl.sock"),
    ]);
    assert_eq!(serve.code, 9, "{}", serve.stderr);
    assert!(!dir.path().join("j2").exists() && !dir.path().join("nbd.sock").exists());

    for (dest, extra) in [
        ("zeros.img", None),
        ("sparse.img", None),
        ("used.img", Some("--overwrite-destination")),
    ] {
        let journal = p(&format!("{dest}.journal"));
        let mut args = vec!["copy", "--journal", &journal];
        args.extend(extra);
        let (src, dst) = (p("src.img"), p(dest));
        args.extend([src.as_str(), dst.as_str()]);
        let run = run_copyctl(&args);
        assert_eq!(run.code, 0, "{dest}: {}", run.stderr);
        assert_eq!(fs::read(dir.path().join(dest)).unwrap(), source, "{dest}");
    }
}
