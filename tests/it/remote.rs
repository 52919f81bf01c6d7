//! Jobs whose images are NBD exports: `copyctl copy` and `serve` with a
//! destination (or a source) served by qemu-storage-daemon, raw and qcow2,
//! checked with `qemu-img compare` after the daemon stopped; `recover`
//! names the export by its URI.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use crate::nbd_client::Server;
use crate::support::run_copyctl;

const MIB: u64 = 1 << 20;
pub(crate) const SIZE: u64 = 16 * MIB;

/// A patterned file of `SIZE` bytes with a hole in its middle.
pub(crate) fn patterned(path: &Path) {
    let mut bytes: Vec<u8> = (0..SIZE).map(|i| (i / 4096 % 251) as u8 + 1).collect();
    bytes[(4 * MIB) as usize..(8 * MIB) as usize].fill(0);
    std::fs::write(path, bytes).expect("write the source");
}

pub(crate) fn qemu_img(args: &[&str]) {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img");
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// qemu-storage-daemon exporting `image` (of `format`) as `disk0`,
/// writable, on a Unix socket; returns the server and the export's URI.
pub(crate) fn export(dir: &Path, image: &Path, format: &str, tag: &str) -> (Server, String) {
    let socket = dir.join(format!("qsd-{tag}.sock"));
    let server = Server::start(
        "qemu-storage-daemon",
        &[
            "--blockdev".into(),
            format!(
                "driver=file,node-name=file0,filename={},cache.direct=on",
                image.display()
            ),
            "--blockdev".into(),
            format!("driver={format},node-name=disk0,file=file0"),
            "--nbd-server".into(),
            format!("addr.type=unix,addr.path={}", socket.display()),
            "--export".into(),
            "type=nbd,id=export0,node-name=disk0,name=disk0,writable=on".into(),
        ],
        &socket,
    );
    let uri = format!("nbd+unix:///disk0?socket={}", socket.display());
    (server, uri)
}

pub(crate) fn path(p: &Path) -> &str {
    p.to_str().expect("UTF-8 test path")
}

pub(crate) fn recover_json(journal: &Path) -> Value {
    let run = run_copyctl(&["--output", "json", "recover", path(journal)]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    serde_json::from_str(&run.stdout).expect("recover JSON")
}

/// `copy` from a file into an export of a raw and of a qcow2 file: the
/// copy equals the source as qemu-img compares it, and the journal names
/// the export by its URI.
#[test]
fn copy_into_an_export_of_a_raw_and_a_qcow2_image() {
    let dir = tempfile::tempdir().expect("tempdir");
    let source = dir.path().join("source.raw");
    patterned(&source);
    for format in ["raw", "qcow2"] {
        let image = dir.path().join(format!("dest.{format}"));
        qemu_img(&[
            "create",
            "-q",
            "-f",
            format,
            path(&image),
            &SIZE.to_string(),
        ]);
        let (server, uri) = export(dir.path(), &image, format, format);
        let journal = dir.path().join(format!("{format}.journal"));
        let run = run_copyctl(&["copy", "--journal", path(&journal), path(&source), &uri]);
        assert_eq!(run.code, 0, "{format}: {}\n{}", run.stdout, run.stderr);
        let recovered = recover_json(&journal);
        assert_eq!(recovered["authoritative"], "destination", "{recovered}");
        assert_eq!(recovered["image"]["uri"], uri.as_str(), "{recovered}");
        assert_eq!(recovered["image"]["size"], SIZE, "{recovered}");
        let human = run_copyctl(&["recover", path(&journal)]);
        assert!(
            human.stdout.contains(&format!("image:         {uri}")),
            "{}",
            human.stdout
        );
        server.stop();
        qemu_img(&[
            "compare",
            "-q",
            "-f",
            "raw",
            "-F",
            format,
            path(&source),
            path(&image),
        ]);
    }
}

/// `copy` from an export to a new local file, and from an export to
/// another export: any mix of local and remote works.
#[test]
fn copy_from_an_export_to_a_file_and_to_another_export() {
    let dir = tempfile::tempdir().expect("tempdir");
    let source = dir.path().join("source.raw");
    patterned(&source);
    let (source_server, source_uri) = export(dir.path(), &source, "raw", "source");
    let local = dir.path().join("local.raw");
    let journal = dir.path().join("to-local.journal");
    let run = run_copyctl(&[
        "copy",
        "--journal",
        path(&journal),
        &source_uri,
        path(&local),
    ]);
    assert_eq!(run.code, 0, "{}\n{}", run.stdout, run.stderr);
    assert_eq!(std::fs::metadata(&local).expect("created").len(), SIZE);
    qemu_img(&[
        "compare",
        "-q",
        "-f",
        "raw",
        "-F",
        "raw",
        path(&source),
        path(&local),
    ]);
    let recovered = recover_json(&journal);
    assert_eq!(recovered["record"]["source"]["uri"], source_uri.as_str());
    assert_eq!(
        recovered["image"]["path"],
        path(&local.canonicalize().unwrap())
    );

    let remote: PathBuf = dir.path().join("remote.raw");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "raw",
        path(&remote),
        &SIZE.to_string(),
    ]);
    let (remote_server, remote_uri) = export(dir.path(), &remote, "raw", "remote");
    let journal = dir.path().join("to-remote.journal");
    let run = run_copyctl(&[
        "copy",
        "--journal",
        path(&journal),
        &source_uri,
        &remote_uri,
    ]);
    assert_eq!(run.code, 0, "{}\n{}", run.stdout, run.stderr);
    source_server.stop();
    remote_server.stop();
    qemu_img(&[
        "compare",
        "-q",
        "-f",
        "raw",
        "-F",
        "raw",
        path(&source),
        path(&remote),
    ]);
}

/// Refusals: the same export twice, an export smaller than the source, a
/// URI of an unknown scheme. Nothing is left behind.
#[test]
fn remote_refusals_leave_nothing_behind() {
    let dir = tempfile::tempdir().expect("tempdir");
    let source = dir.path().join("source.raw");
    patterned(&source);
    let small = dir.path().join("small.raw");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "raw",
        path(&small),
        &(SIZE / 2).to_string(),
    ]);
    let (_server, uri) = export(dir.path(), &small, "raw", "small");
    let journal = dir.path().join("j.journal");
    for (args, code, words) in [
        (
            vec![path(&source), uri.as_str()],
            9,
            "smaller than the source",
        ),
        (vec![uri.as_str(), uri.as_str()], 9, "the same export"),
        (
            vec![path(&source), "http://host/disk"],
            9,
            "not a usable NBD URI",
        ),
    ] {
        let mut all = vec!["copy", "--journal", path(&journal)];
        all.extend(args);
        let run = run_copyctl(&all);
        assert_eq!(run.code, code, "{all:?}: {}", run.stderr);
        assert!(run.stderr.contains(words), "{all:?}: {}", run.stderr);
        assert!(!journal.exists(), "{all:?} left a journal");
    }
}

/// `recover` on a job whose authoritative image is an export checks the
/// export: a resized one, or a server that is down, gives a warning on
/// stderr, and the verdict still stands (exit 0).
#[test]
fn recover_warns_when_the_export_changed_or_cannot_be_reached() {
    let dir = tempfile::tempdir().expect("tempdir");
    let source = dir.path().join("source.raw");
    patterned(&source);
    let image = dir.path().join("dest.raw");
    qemu_img(&["create", "-q", "-f", "raw", path(&image), &SIZE.to_string()]);
    let (server, uri) = export(dir.path(), &image, "raw", "first");
    let journal = dir.path().join("j.journal");
    let run = run_copyctl(&["copy", "--journal", path(&journal), path(&source), &uri]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let quiet = run_copyctl(&["recover", path(&journal)]);
    assert_eq!(quiet.code, 0, "{}", quiet.stderr);
    assert!(!quiet.stderr.contains(&uri), "no warning: {}", quiet.stderr);
    server.stop();

    let down = run_copyctl(&["recover", "--no-repair", path(&journal)]);
    assert_eq!(down.code, 0, "{}", down.stderr);
    assert!(down.stderr.contains("cannot reach"), "{}", down.stderr);

    std::fs::OpenOptions::new()
        .write(true)
        .open(&image)
        .and_then(|f| f.set_len(2 * SIZE))
        .expect("resize");
    // Served again on the same socket as the URI recorded.
    let (_server, again) = export(dir.path(), &image, "raw", "first");
    assert_eq!(again, uri);
    let resized = run_copyctl(&["recover", path(&journal)]);
    assert_eq!(resized.code, 0, "{}", resized.stderr);
    assert!(
        resized.stderr.contains("changed since the job started"),
        "{}",
        resized.stderr
    );
}
