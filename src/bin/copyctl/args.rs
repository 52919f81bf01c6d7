//! Command-line arguments. Parsing only: no I/O happens here.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Live copy of disk images with a crash-safe switch-state journal.
#[derive(Debug, Parser)]
#[command(name = "copyctl", version, about, max_term_width = 100)]
pub struct Cli {
    /// Output format of results on stdout.
    #[arg(long, global = true, value_enum, default_value_t = Output::Human)]
    pub output: Output,
    #[command(subcommand)]
    pub command: Command,
}

/// Result format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Aligned text for people.
    Human,
    /// One JSON object, for programs.
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Name the authoritative image after a crash (or refuse, with a reason).
    ///
    /// Opens the journal without following symlinks, takes its lock, syncs
    /// it, classifies every block and decides. Damaged copies that have an
    /// intact twin are rewritten, after a backup beside the journal.
    Recover(RecoverArgs),
    /// Show every block of a journal: position, class, sequence, phase, checksum.
    ///
    /// Read-only; goes on with a warning when a running engine holds the lock.
    Inspect(InspectArgs),
    /// Name the authoritative image yourself, when recover refuses with
    /// needs-operator.
    ///
    /// Writes a "resolved" record numbered above every record seen, after
    /// backing the journal up beside it. Check both images before choosing.
    Resolve(ResolveArgs),
    /// Copy SRC to DST, switch over and complete, in one go.
    ///
    /// Creates the journal first (it must not exist) and the destination
    /// when it does not exist (sized like the source). A progress bar shows
    /// on stderr when it is a terminal.
    Copy(CopyArgs),
    /// The main job, end to end, in a temporary directory: a live copy under
    /// a writing guest, a switch, a kill -9, recovery, and a check of every
    /// acknowledged write.
    Demo(DemoArgs),
    /// (internal) The engine process `demo` starts and kills.
    #[command(hide = true)]
    DemoEngine(DemoEngineArgs),
}

/// Engine tuning shared by the commands that run a copy.
#[derive(Debug, Args)]
pub struct TuningArgs {
    /// Bytes tracked by one dirty bit (K, M, G are powers of 1024).
    #[arg(long, default_value = "64K", value_parser = crate::size::parse_size)]
    pub granularity: u64,
    /// Largest bulk-copy request.
    #[arg(long = "chunk", default_value = "1M", value_parser = crate::size::parse_size)]
    pub chunk_size: u64,
    /// Bulk-copy requests in flight.
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// Bulk-copy bandwidth limit per second (e.g. 100M); none by default.
    #[arg(long, value_parser = crate::size::parse_size)]
    pub bandwidth: Option<u64>,
}

#[derive(Debug, Args)]
pub struct CopyArgs {
    /// The journal to create.
    #[arg(long)]
    pub journal: PathBuf,
    /// The image to copy.
    pub source: PathBuf,
    /// The copy (created when missing).
    pub destination: PathBuf,
    #[command(flatten)]
    pub tuning: TuningArgs,
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Size of the source image.
    #[arg(long, default_value = "256M", value_parser = crate::size::parse_size)]
    pub size: u64,
    /// Work in this (existing, empty) directory and keep it, instead of a
    /// temporary one.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Seed for the guest's writes and the moment of the kill.
    #[arg(long)]
    pub seed: Option<u64>,
}

#[derive(Debug, Args)]
pub struct DemoEngineArgs {
    #[arg(long)]
    pub dir: PathBuf,
    #[arg(long)]
    pub seed: u64,
}

#[derive(Debug, Args)]
pub struct RecoverArgs {
    /// The journal file.
    pub journal: PathBuf,
    /// Report what would be repaired, but write nothing.
    #[arg(long)]
    pub no_repair: bool,
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// The journal file.
    pub journal: PathBuf,
}

#[derive(Debug, Args)]
pub struct ResolveArgs {
    /// The journal file.
    pub journal: PathBuf,
    /// The image that holds every acknowledged write.
    #[arg(long, value_enum)]
    pub authority: Authority,
}

/// A side, as typed on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Authority {
    /// The image the guest started on.
    Source,
    /// The copy.
    Destination,
}
