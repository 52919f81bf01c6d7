//! `copyctl copy`: copy, switch and complete in one go.

use std::path::Path;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use livecopy::engine::{self, Config, JobPhase};
use livecopy::storage::{self, FileStorage};
use serde_json::json;

use crate::args::{CopyArgs, Output};
use crate::exit::Exit;
use crate::output::emit;
use crate::size::human;

/// The engine configuration the copy options describe.
pub fn config(args: &crate::args::TuningArgs) -> Config {
    Config {
        granularity: args.granularity,
        chunk_size: args.chunk_size,
        copy_workers: args.workers,
        bandwidth: args.bandwidth,
        busy_workers: args.busy_workers,
        busy_chunk_size: args.busy_chunk_size,
        ..Config::default()
    }
}

/// Creates the destination when it does not exist yet, sized like the source.
pub fn ensure_destination(source: &Path, destination: &Path) -> anyhow::Result<bool> {
    if storage::stat_identity(destination)?.is_some() {
        return Ok(false);
    }
    let size = storage::stat_identity(source)?
        .ok_or_else(|| livecopy::Error::io_at("open", source, std::io::ErrorKind::NotFound.into()))?
        .size;
    FileStorage::create_image(destination, size)?;
    Ok(true)
}

pub fn run(args: &CopyArgs, out: Output) -> anyhow::Result<Exit> {
    // Before the destination is created: a refused tuning leaves nothing.
    let config = config(&args.tuning);
    config.validate()?;
    let created = ensure_destination(&args.source, &args.destination)?;
    let started = Instant::now();
    let mut job = engine::files::start(&args.journal, &args.source, &args.destination, config)?;
    let size = job.status().size;
    job.start_workers();

    let bar = ProgressBar::with_draw_target(Some(size), indicatif::ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template(
            "{msg:8} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .expect("a valid template")
        .progress_chars("=> "),
    );
    bar.set_message("copying");
    let phase = loop {
        let phase = job.wait_ready(Duration::from_millis(100));
        let status = job.status();
        bar.set_position(status.bytes_copied.min(size));
        if phase != JobPhase::Copying {
            break phase;
        }
    };
    let copy_time = started.elapsed();
    if phase != JobPhase::Ready {
        bar.abandon_with_message("failed");
        let reason = job.status().reason.unwrap_or_default();
        anyhow::bail!(livecopy::Error::io(
            "copy",
            std::io::Error::other(format!("the copy was {}: {reason}", phase.name()))
        ));
    }
    bar.set_message("switch");
    let switched = job.switch()?;
    let completed_seq = job.complete()?;
    bar.finish_and_clear();
    let status = job.status();
    let total = started.elapsed();
    let rate = status.bytes_copied as f64 / copy_time.as_secs_f64().max(1e-9);
    let json = json!({
        "source": args.source,
        "destination": args.destination,
        "destination_created": created,
        "journal": args.journal,
        "size": size,
        "bytes_copied": status.bytes_copied,
        "copy_seconds": copy_time.as_secs_f64(),
        "copy_bytes_per_second": rate,
        "switch_pause_seconds": switched.pause.as_secs_f64(),
        "total_seconds": total.as_secs_f64(),
        "phase": status.phase.name(),
        "authoritative": "destination",
        "journal_seq": completed_seq,
    });
    let human_text = format!(
        "copied:        {} of {} in {:.2} s ({}/s; holes skipped)\n\
         switched:      guest paused {:.3} ms\n\
         completed:     {} is authoritative (journal seq {})\n",
        human(status.bytes_copied),
        human(size),
        copy_time.as_secs_f64(),
        human(rate as u64),
        switched.pause.as_secs_f64() * 1e3,
        args.destination.display(),
        completed_seq
    );
    emit(out, json, &human_text)?;
    Ok(Exit::Ok)
}
