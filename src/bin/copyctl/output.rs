//! Writing results: JSON or text on stdout, warnings on stderr.

use std::io::{self, Write};

use livecopy::journal::{BlockReport, ImageRecord, RecordV1, Refusal, Repair, recovery::hex};
use serde_json::{Value, json};

use crate::args::Output;

/// Prints the result: `json` in JSON mode, `human` otherwise.
pub fn emit(output: Output, json: Value, human: &str) -> anyhow::Result<()> {
    let mut stdout = io::stdout().lock();
    match output {
        Output::Json => writeln!(stdout, "{}", serde_json::to_string_pretty(&json)?)?,
        Output::Human => write!(stdout, "{human}")?,
    }
    stdout.flush()?;
    Ok(())
}

/// A warning for the human at the terminal, whatever the output format.
pub fn warn(message: &str) {
    // If stderr is gone there is nobody to tell.
    let _ = writeln!(io::stderr(), "copyctl: warning: {message}");
}

/// Whether `error` is a write to a closed pipe: the reader left, not a failure.
pub fn is_broken_pipe(error: &anyhow::Error) -> bool {
    error.chain().any(|e| {
        e.downcast_ref::<io::Error>()
            .is_some_and(|e| e.kind() == io::ErrorKind::BrokenPipe)
    })
}

pub fn image_json(image: &ImageRecord) -> Value {
    json!({ "path": image.path, "size": image.size, "device": image.device, "inode": image.inode })
}

pub fn record_json(seq: u64, record: &RecordV1) -> Value {
    json!({
        "seq": seq,
        "phase": record.phase.name(),
        "authoritative": record.authoritative.name(),
        "job_id": hex(&record.job_id),
        "writer_instance": hex(&record.writer_instance),
        "writer_epoch": record.writer_epoch,
        "bytes_copied": record.bytes_copied,
        "wall_clock_unix_ns": record.wall_clock_unix_ns,
        "source": image_json(&record.source),
        "destination": image_json(&record.destination),
    })
}

pub fn refusal_json(refusal: &Refusal) -> Value {
    json!({ "reason": refusal.reason.name(), "detail": refusal.detail })
}

pub fn repairs_json(repairs: &[Repair]) -> Value {
    repairs
        .iter()
        .map(|r| json!({ "target": r.target.to_string(), "from": r.source.to_string() }))
        .collect()
}

pub fn block_json(block: &BlockReport) -> Value {
    json!({
        "position": block.position.to_string(),
        "offset": block.position.offset(),
        "class": block.class.name(),
        "kind": block.kind.map(|k| format!("{k:?}").to_lowercase()),
        "seq": block.seq,
        "phase": block.phase.map(|p| p.name()),
        "content_crc": block.content_crc.map(|c| format!("{c:08x}")),
        "detail": block.detail,
    })
}
