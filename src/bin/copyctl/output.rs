//! Writing results: JSON or text on stdout, warnings on stderr.

use std::io::{self, Write};

use livecopy::journal::{BlockReport, ImageRef, Record, Refusal, Repair, recovery::hex};
use serde_json::{Value, json};

use crate::args::Output;

/// Stdout was closed by its reader (`copyctl inspect J | head -1`): not a
/// failure. Only errors writing stdout are wrapped in this.
#[derive(Debug)]
pub struct StdoutClosed;

impl std::fmt::Display for StdoutClosed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("stdout was closed")
    }
}

impl std::error::Error for StdoutClosed {}

fn to_stdout(text: &str) -> anyhow::Result<()> {
    let mut stdout = io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Err(StdoutClosed.into()),
        other => Ok(other?),
    }
}

/// Prints the result: `json` (pretty) in JSON mode, `human` otherwise.
pub fn emit(output: Output, json: Value, human: &str) -> anyhow::Result<()> {
    match output {
        Output::Json => to_stdout(&format!("{}\n", serde_json::to_string_pretty(&json)?)),
        Output::Human => to_stdout(human),
    }
}

/// Like [`emit`], but JSON on one line: for announcements a program reads
/// line by line while the command goes on running.
pub fn emit_line(output: Output, json: Value, human: &str) -> anyhow::Result<()> {
    match output {
        Output::Json => to_stdout(&format!("{json}\n")),
        Output::Human => to_stdout(human),
    }
}

/// A warning for the human at the terminal, whatever the output format.
pub fn warn(message: &str) {
    say(format_args!("copyctl: warning: {message}"));
}

/// A line on stderr, or nothing when nobody reads it any more: no command
/// may stop or change its exit code over its messages (`eprintln!` panics
/// when stderr's reader is gone).
pub fn say(line: std::fmt::Arguments) {
    let _ = writeln!(io::stderr(), "{line}");
}

/// Whether `error` is stdout closed by its reader: not a failure. A broken
/// pipe anywhere else (a socket) is a real error.
pub fn is_broken_pipe(error: &anyhow::Error) -> bool {
    error.chain().any(|e| e.is::<StdoutClosed>())
}

pub fn image_json(image: &ImageRef) -> Value {
    match image {
        ImageRef::File(f) => {
            json!({ "path": f.path, "size": f.size, "device": f.device, "inode": f.inode })
        }
        ImageRef::Export(e) => {
            json!({ "uri": e.uri, "export": e.export, "size": e.size, "tls": e.tls })
        }
    }
}

pub fn record_json(seq: u64, record: &Record) -> Value {
    json!({
        "seq": seq,
        "phase": record.phase.name(),
        "authoritative": record.authoritative.name(),
        "job_id": hex(&record.job_id),
        "writer_instance": hex(&record.writer_instance),
        "writer_epoch": record.writer_epoch,
        "bytes_copied": record.bytes_copied,
        "progress": record.progress().map(|p| json!({
            "cursor": p.cursor,
            "extent_size": p.extent_size,
            "extents_listed": p.runs.iter().map(|r| [r.start, r.end]).collect::<Vec<_>>(),
            "bytes_to_copy": p.bytes_to_copy(),
        })),
        "wall_clock_unix_ns": record.wall_clock_unix_ns,
        "source": image_json(record.source()),
        "destination": image_json(record.destination()),
        "pairs": record
            .pairs
            .iter()
            .map(|p| json!({
                "source": image_json(&p.source),
                "destination": image_json(&p.destination),
            }))
            .collect::<Vec<_>>(),
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
