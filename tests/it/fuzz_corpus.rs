//! Replays the fuzz corpora (and any saved crash artifacts) through the
//! harness bodies in `livecopy::fuzz`, on stable, in every `cargo test`: what
//! the fuzzer found once stays tested without a nightly toolchain.
//!
//! `fuzz/corpus/<target>/` holds the minimised corpus (`cargo +nightly fuzz
//! cmin <target>`); `fuzz/artifacts/<target>/` holds inputs that once failed.
//! A failing input panics with the harness's message; the file name is
//! printed first so that it can be rerun with
//! `cargo +nightly fuzz run <target> fuzz/artifacts/<target>/<file>`.
//! Artifacts of bugs not fixed yet are listed in `OPEN_FINDINGS` and must
//! still fail, with the message recorded there.

use std::path::{Path, PathBuf};

/// Inputs of `target` in `fuzz/<kind>/<target>/`, sorted; none if the
/// folder does not exist. Hidden files and libFuzzer's temporary files are
/// skipped.
fn inputs(kind: &str, target: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz")
        .join(kind)
        .join(target);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|entry| entry.expect("read a corpus directory entry").path())
        .filter(|path| path.is_file())
        .filter(|path| {
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            !name.starts_with('.') && !name.ends_with(".tmp")
        })
        .collect();
    files.sort();
    files
}

/// Saved inputs that still fail because of an open library bug, each with a
/// piece of the panic message it must still fail with. When a fix makes one
/// pass, the replay fails until its entry is removed here: from then on the
/// input guards the fix like every other.
const OPEN_FINDINGS: &[(&str, &str)] = &[];

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default()
}

/// Runs every input of `target` through `harness`; fails if the corpus has
/// fewer than `min_corpus` files (it went missing or was emptied).
fn replay(target: &str, harness: fn(&[u8]), min_corpus: usize) {
    let corpus = inputs("corpus", target);
    let artifacts = inputs("artifacts", target);
    assert!(
        corpus.len() >= min_corpus,
        "fuzz/corpus/{target} has {} inputs, expected at least {min_corpus}",
        corpus.len()
    );
    let mut open = 0;
    for path in corpus.iter().chain(&artifacts) {
        let data = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        let name = format!(
            "{target}/{}",
            path.file_name().and_then(|n| n.to_str()).unwrap_or("")
        );
        let expected = OPEN_FINDINGS
            .iter()
            .find(|(file, _)| *file == name && path.starts_with(artifacts_dir()))
            .map(|(_, message)| *message);
        if expected.is_some() {
            eprintln!("fuzz input {name} is an open finding: its panic is expected");
        }
        let result = std::panic::catch_unwind(|| harness(&data));
        match (result, expected) {
            (Ok(()), None) => {}
            (Ok(()), Some(_)) => panic!(
                "fuzz input {} passes now: the bug is fixed, remove it from OPEN_FINDINGS",
                path.display()
            ),
            (Err(panic), Some(message)) => {
                let got = panic_message(&*panic);
                assert!(
                    got.contains(message),
                    "fuzz input {} (open finding) fails differently now: {got}",
                    path.display()
                );
                open += 1;
            }
            (Err(panic), None) => {
                eprintln!("fuzz input {} failed", path.display());
                std::panic::resume_unwind(panic);
            }
        }
    }
    for (file, _) in OPEN_FINDINGS.iter().filter(|(f, _)| f.starts_with(target)) {
        assert!(
            artifacts_dir().join(file).is_file(),
            "OPEN_FINDINGS names {file}, which is not in fuzz/artifacts"
        );
    }
    eprintln!(
        "fuzz_corpus {target}: replayed {} corpus inputs and {} artifacts \
         ({open} of them open findings that still fail as recorded)",
        corpus.len(),
        artifacts.len()
    );
}

fn artifacts_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz")
        .join("artifacts")
}

#[test]
fn decode_block_corpus() {
    replay("decode_block", livecopy::fuzz::decode_block, 32);
}

#[test]
fn recover_image_corpus() {
    replay("recover_image", livecopy::fuzz::recover_image, 64);
}

#[test]
fn nbd_messages_corpus() {
    replay("nbd_messages", livecopy::fuzz::nbd_messages, 12);
}

#[test]
fn nbd_replies_corpus() {
    replay("nbd_replies", livecopy::fuzz::nbd_replies, 8);
}

#[test]
fn control_request_corpus() {
    replay("control_request", livecopy::fuzz::control_request, 12);
}
