//! `copyctl copy`: copy, switch and complete in one go.

use std::path::Path;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use livecopy::engine::{self, Config, JobPhase};
use livecopy::storage::{self, AnyImage, CreatedFile, FileStorage, Location, NbdOptions, Storage};
use serde_json::json;

use crate::args::{CopyArgs, Output};
use crate::exit::Exit;
use crate::output::emit;
use crate::size::human;

/// The engine configuration the copy options describe, for a copy into
/// `destination`.
pub fn config(args: &crate::args::TuningArgs, destination: &Location) -> Config {
    Config {
        granularity: args.granularity,
        chunk_size: args.chunk_size,
        copy_workers: args.workers,
        bandwidth: args.bandwidth,
        busy_workers: args.busy_workers.unwrap_or(match destination {
            // One request in flight keeps a local destination's inode
            // lock free for the guest's mirrored writes. Into an export
            // one request a round trip left the pass paced by latency:
            // two brought Ready under a writer about twice as fast (bench/run
            // scenario 8), for a tenth of the writer's throughput with no
            // added latency and a third with 1 ms per request.
            // Never more than the workers there are.
            Location::Nbd(_) => args.workers.min(2),
            Location::Path(_) => 1,
        }),
        busy_chunk_size: args.busy_chunk_size,
        // An extent is never smaller than a granule.
        extent_size: args.extent_size.max(args.granularity),
        checkpoints: !args.no_checkpoints,
        ..Config::default()
    }
}

/// Whether both locations are one file (the job refuses that itself, with
/// the better message).
fn same_file(a: &Location, b: &Location) -> anyhow::Result<bool> {
    let (Location::Path(a), Location::Path(b)) = (a, b) else {
        return Ok(false);
    };
    Ok(
        match (storage::stat_identity(a)?, storage::stat_identity(b)?) {
            (Some(a), Some(b)) => (a.device, a.inode) == (b.device, b.inode),
            _ => false,
        },
    )
}

/// Whether any byte the image's allocation map calls data is not zero,
/// reading at most 64 MiB of it: an image with more data than that (a block
/// device or an export without block status reports all of itself as
/// data) counts as holding data. A freshly created image often has its
/// first block allocated and zero (qemu-img, for O_DIRECT probing).
fn holds_data(image: &AnyImage) -> anyhow::Result<bool> {
    const BUDGET: u64 = 64 << 20;
    let mut read = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0;
    while let Some(data) = image
        .next_data(at)
        .map_err(|e| livecopy::Error::io("destination SEEK_DATA", e))?
    {
        let mut pos = data.start;
        while pos < data.end {
            if read >= BUDGET {
                return Ok(true);
            }
            let n = (data.end - pos).min(buf.len() as u64).min(BUDGET - read) as usize;
            image
                .read_at(pos, &mut buf[..n])
                .map_err(|e| livecopy::Error::io("destination read", e))?;
            if buf[..n].iter().any(|&b| b != 0) {
                return Ok(true);
            }
            pos += n as u64;
            read += n as u64;
        }
        if data.end <= at {
            break;
        }
        at = data.end;
    }
    Ok(false)
}

/// An image argument: an NBD URI, or a path (any path that is not UTF-8
/// is a path).
pub fn location(argument: &Path) -> anyhow::Result<Location> {
    Ok(match argument.to_str() {
        Some(text) => Location::parse(text)?,
        None => Location::Path(argument.to_path_buf()),
    })
}

/// How NBD exports are connected, from the options.
pub fn nbd_options(args: &crate::args::TuningArgs) -> NbdOptions {
    NbdOptions {
        reconnect_delay: args.reconnect_delay.map(Duration::from_secs_f64),
        tls_creds: args.tls_creds.clone(),
        ..NbdOptions::default()
    }
}

/// Refuses a new job's journal path before anything is created: a path
/// that exists (saying when it holds a job, and what to do), or whose
/// directory does not.
pub fn check_new_journal(journal: &Path) -> anyhow::Result<()> {
    if let Ok(meta) = std::fs::symlink_metadata(journal) {
        if meta.is_file() {
            anyhow::bail!(livecopy::Error::InvalidInput(format!(
                "{} already exists: it holds a job. `copyctl recover {0}` says where it \
                 stands; `--resume` continues an unfinished one; remove it only once \
                 its job is over",
                journal.display()
            )));
        }
        // Anything else: the library names what it is.
        return Ok(());
    }
    let dir = match journal.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        anyhow::bail!(livecopy::Error::io_at(
            "open the journal's directory",
            dir,
            std::io::Error::new(std::io::ErrorKind::NotFound, "no such directory"),
        ));
    }
    Ok(())
}

/// Whether two paths name one place, though spelled differently
/// (`s.sock`, `./s.sock`): their directories resolve to one, and the names
/// match. Neither need exist.
pub fn same_place(a: &Path, b: &Path) -> bool {
    let split = |p: &Path| {
        let dir = match p.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        (
            std::fs::canonicalize(dir).ok(),
            p.file_name().map(|n| n.to_owned()),
        )
    };
    a == b || {
        let (a, b) = (split(a), split(b));
        a.0.is_some() && a == b
    }
}

/// Warns about settings that work but are likely mistakes.
pub fn warn_settings(config: &Config) {
    if let Some(rate) = config.bandwidth
        && rate < 1 << 20
    {
        tracing::warn!(
            "--bandwidth {}/s: a 10 GiB disk would take {:.0} hours to copy",
            human(rate),
            (10u64 << 30) as f64 / rate as f64 / 3600.0
        );
    }
}

/// Creates a destination file when it does not exist yet, sized like the
/// source, and returns it in charge of the caller (removed unless kept).
/// An existing destination (an export always exists) must hold no data
/// unless `overwrite` says so: a mistyped journal path would otherwise
/// start a new copy over what may be another job's only up-to-date image.
pub fn ensure_destination(
    source: &Location,
    destination: &Location,
    options: &NbdOptions,
    overwrite: bool,
) -> anyhow::Result<Option<CreatedFile>> {
    let exists = match destination {
        Location::Path(path) => {
            if path.is_symlink() && !path.exists() {
                anyhow::bail!(livecopy::Error::InvalidInput(format!(
                    "{} is a symlink to nothing: give the image's own path, or create it",
                    path.display()
                )));
            }
            storage::stat_identity(path)?.is_some()
        }
        Location::Nbd(_) => true,
    };
    if exists {
        if !overwrite && !same_file(source, destination)? {
            let image = AnyImage::open(destination, false, options)?;
            if holds_data(&image)? {
                anyhow::bail!(livecopy::Error::InvalidInput(format!(
                    "{} already holds data; it may be another job's only up-to-date image. \
                     Pass --overwrite-destination to copy over it",
                    image.name()
                )));
            }
        }
        return Ok(None);
    }
    let Location::Path(destination) = destination else {
        return Ok(None);
    };
    let size = match source {
        Location::Path(source) => {
            storage::stat_identity(source)?
                .ok_or_else(|| {
                    // ENOENT: the OS's words, "No such file or directory".
                    livecopy::Error::io_at("open", source, std::io::Error::from_raw_os_error(2))
                })?
                .size
        }
        Location::Nbd(_) => AnyImage::open(source, false, options)?
            .len()
            .map_err(|e| livecopy::Error::io("source size", e))?,
    };
    FileStorage::create_image(destination, size)?;
    Ok(Some(CreatedFile::claim(destination)?))
}

pub fn run(args: &CopyArgs, out: Output) -> anyhow::Result<Exit> {
    // Before the destination is created: a refused tuning leaves nothing.
    let (source, destination) = (location(&args.source)?, location(&args.destination)?);
    let config = config(&args.tuning, &destination);
    config.validate()?;
    warn_settings(&config);
    let options = nbd_options(&args.tuning);
    if !args.resume {
        check_new_journal(&args.journal)?;
    }
    // Removed if the job does not start (locks, names, the journal).
    let created = if args.resume {
        None
    } else {
        ensure_destination(&source, &destination, &options, args.overwrite_destination)?
    };
    let destination_created = created.is_some();
    let started = Instant::now();
    let mut job = if args.resume {
        let copy = if args.restart_copy {
            engine::files::ResumeCopy::All
        } else {
            engine::files::ResumeCopy::Remaining
        };
        engine::files::resume_at(
            &args.journal,
            config,
            &options,
            copy,
            Some((&source, &destination)),
        )?
    } else {
        engine::files::start_at(&args.journal, &source, &destination, config, &options)?
    };
    if let Some(created) = created {
        created.keep();
    }
    let to_copy = job.status().to_copy;
    let size = job.status().size;
    job.start_workers()?;

    // The data to copy, not the disk: holes are skipped, so a bar over the
    // whole size would stop part-way on a sparse source.
    let bar = ProgressBar::with_draw_target(Some(to_copy), indicatif::ProgressDrawTarget::stderr());
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
        bar.set_position(status.bytes_copied.min(to_copy));
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
        "destination_created": destination_created,
        "journal": args.journal,
        "size": size,
        "bytes_copied": status.bytes_copied,
        "resumed": status.resumed,
        "bytes_to_copy": to_copy,
        "copy_seconds": copy_time.as_secs_f64(),
        "copy_bytes_per_second": rate,
        "switch_pause_seconds": switched.pause.as_secs_f64(),
        "total_seconds": total.as_secs_f64(),
        "phase": status.phase.name(),
        "authoritative": "destination",
        "journal_seq": completed_seq,
    });
    let resumed = if status.resumed {
        format!(
            "resumed:       copied again {} of {} (the rest was durable at the last checkpoint)\n",
            human(to_copy),
            human(size)
        )
    } else {
        String::new()
    };
    let human_text = format!(
        "{resumed}copied:        {} of {} in {:.2} s ({}/s; holes skipped)\n\
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Tuning {
        #[command(flatten)]
        tuning: crate::args::TuningArgs,
    }

    fn busy_workers(args: &[&str], destination: &str) -> usize {
        let parsed = Tuning::try_parse_from(std::iter::once("copyctl").chain(args.iter().copied()))
            .expect("options");
        config(&parsed.tuning, &Location::parse(destination).unwrap()).busy_workers
    }

    #[test]
    fn busy_workers_default_by_destination_and_yield_to_the_option() {
        let cases = [
            (&[][..], "/var/lib/images/disk.raw", 1),
            (&[], "nbd://10.0.0.2/disk", 2),
            (&[], "nbds+unix:///disk?socket=/run/d.sock", 2),
            (&["--busy-workers", "1"], "nbd://10.0.0.2/disk", 1),
            (&["--busy-workers", "3"], "/var/lib/images/disk.raw", 3),
            (&["--workers", "1"], "nbd://10.0.0.2/disk", 1),
        ];
        for (args, destination, want) in cases {
            assert_eq!(
                busy_workers(args, destination),
                want,
                "{args:?} {destination}"
            );
        }
    }
}
