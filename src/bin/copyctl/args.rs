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
