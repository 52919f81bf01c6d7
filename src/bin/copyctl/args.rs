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
    /// Format of the event log on stderr (`serve` logs at info by default,
    /// other commands only warnings; COPYCTL_LOG sets the level, e.g.
    /// `debug` or `livecopy=info`).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

/// Event log format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// One line per event: time, level, message, fields.
    Human,
    /// One JSON object per line.
    Json,
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
    /// Export the live disk over NBD while it is copied; take management
    /// commands on a control socket.
    ///
    /// With a new journal path the copy starts at once. With an existing
    /// journal, recovery runs first: a switched or ended job serves its
    /// authoritative image; an unfinished one needs --resume; a refusal
    /// stops with recover's exit code. Runs until killed.
    Serve(ServeArgs),
    /// Show a serving engine's state.
    Status(StatusArgs),
    /// Hand the guest over to the destination (the copy must be ready).
    Switch(SwitchArgs),
    /// Record that the switch is acknowledged; the source may be released.
    Complete(ControlArgs),
    /// Abandon the copy before the switch; the source stays authoritative.
    Abort(ControlArgs),
    /// Print a shell completion script (bash, zsh or fish) to stdout.
    ///
    /// bash: `copyctl completions bash > /etc/bash_completion.d/copyctl`;
    /// zsh: into a directory on $fpath as `_copyctl`; fish: into
    /// ~/.config/fish/completions/copyctl.fish.
    Completions(CompletionsArgs),
    /// Write man pages: copyctl.1 and one per command (copyctl-copy.1, ...).
    ///
    /// Into --dir, or copyctl.1 alone to stdout.
    Man(ManArgs),
    /// (internal) The engine process `demo` starts and kills.
    #[command(hide = true)]
    DemoEngine(DemoEngineArgs),
}

/// A worker count: 1 to `MAX_WORKERS` (a usage error otherwise, before
/// anything is created).
fn workers(text: &str) -> Result<usize, String> {
    let max = livecopy::engine::MAX_WORKERS;
    match text.parse::<usize>() {
        Ok(n) if (1..=max).contains(&n) => Ok(n),
        _ => Err(format!(
            "{text:?} is not a number of workers from 1 to {max}"
        )),
    }
}

/// The demo's disk: a size of at least 4 MiB (a usage error otherwise).
fn demo_size(text: &str) -> Result<u64, String> {
    let size = crate::size::parse_size(text)?;
    if size < 4 << 20 {
        return Err(format!("{text:?} is too small: the demo needs at least 4M"));
    }
    Ok(size)
}

/// A TCP address to listen on: HOST:PORT that resolves (a usage error
/// otherwise, before anything is created).
fn tcp_address(text: &str) -> Result<String, String> {
    use std::net::ToSocketAddrs;
    match text.to_socket_addrs().map(|mut addrs| addrs.next()) {
        Ok(Some(_)) => Ok(text.to_string()),
        Ok(None) => Err(format!("{text:?} resolves to no address")),
        Err(e) => Err(format!(
            "{text:?} is not an address to listen on (HOST:PORT): {e}"
        )),
    }
}

/// Engine tuning shared by the commands that run a copy.
#[derive(Debug, Args)]
pub struct TuningArgs {
    /// Bytes tracked by one dirty bit (K, M, G, T, P are powers of 1024).
    #[arg(long, default_value = "64K", value_parser = crate::size::parse_size)]
    pub granularity: u64,
    /// Largest bulk-copy request.
    #[arg(long = "chunk", default_value = "1M", value_parser = crate::size::parse_size)]
    pub chunk_size: u64,
    /// Bulk-copy requests in flight (1 to 64).
    #[arg(long, default_value_t = 2, value_parser = workers)]
    pub workers: usize,
    /// Bulk-copy bandwidth limit per second (e.g. 100M); none by default.
    #[arg(long, value_parser = crate::size::parse_size)]
    pub bandwidth: Option<u64>,
    /// Bulk-copy requests in flight while the guest is busy (a request in
    /// the last 20 ms); by default 1 into a file or device, 2 (at most
    /// --workers) into an NBD export.
    #[arg(long, value_parser = workers)]
    pub busy_workers: Option<usize>,
    /// Largest bulk-copy request while the guest is busy.
    #[arg(long = "busy-chunk", default_value = "128K", value_parser = crate::size::parse_size)]
    pub busy_chunk_size: u64,
    /// Write-intent extent: where a guest write may have reached one image
    /// only, a resume copies this much again.
    #[arg(long = "extent", default_value = "16M", value_parser = crate::size::parse_size)]
    pub extent_size: u64,
    /// Do not record the copy's progress (no checkpoints, no write
    /// intent): a resume after a crash then copies everything again.
    #[arg(long)]
    pub no_checkpoints: bool,
    /// Seconds to wait for an NBD export that dropped once it holds the
    /// guest's only copy (the destination after the switch, the source
    /// after an abort), reconnecting and re-sending unanswered requests;
    /// guest requests then fail with EIO. No reconnect by default.
    #[arg(long, value_name = "SECS", value_parser = parse_seconds)]
    pub reconnect_delay: Option<f64>,
    /// TLS credentials in QEMU's layout. For nbds:// images (the client
    /// side): ca-cert.pem verifies the server; client-cert.pem and
    /// client-key.pem are presented when present. For `serve --tcp` (the
    /// server side): server-cert.pem and server-key.pem, and ca-cert.pem
    /// verifies client certificates, which are then required. Keys must
    /// not be readable by group or others.
    #[arg(long, value_name = "DIR")]
    pub tls_creds: Option<PathBuf>,
}

fn parse_seconds(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(s) if s.is_finite() && (0.0..=86_400.0).contains(&s) => Ok(s),
        _ => Err(format!(
            "{text:?} is not a number of seconds from 0 to 86400"
        )),
    }
}

#[derive(Debug, Args)]
pub struct CopyArgs {
    /// The journal to create (with --resume: the interrupted job's).
    #[arg(long)]
    pub journal: PathBuf,
    /// The image to copy: a path, or an NBD URI (nbd://HOST[:PORT]/EXPORT,
    /// nbd+unix:///EXPORT?socket=PATH).
    pub source: PathBuf,
    /// The copy: a path (created when missing, sized like the source) or an
    /// NBD URI.
    pub destination: PathBuf,
    /// Copy over an existing destination that already holds data (a block
    /// device always counts as holding data). Without it such a destination
    /// is refused: it may be another job's only up-to-date image.
    #[arg(long, conflicts_with = "resume")]
    pub overwrite_destination: bool,
    /// Resume the interrupted job the journal records (copying or ready):
    /// copy again only what its last checkpoint says may differ. SOURCE and
    /// DESTINATION must be the journal's images.
    #[arg(long)]
    pub resume: bool,
    /// With --resume: copy everything again instead.
    #[arg(long, requires = "resume")]
    pub restart_copy: bool,
    #[command(flatten)]
    pub tuning: TuningArgs,
}

#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell.
    #[arg(value_enum)]
    pub shell: Shell,
}

/// Shells `completions` writes for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Shell {
    /// GNU bash.
    Bash,
    /// Z shell.
    Zsh,
    /// fish.
    Fish,
}

#[derive(Debug, Args)]
pub struct ManArgs {
    /// Write every page into this (existing) directory.
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Size of the source image (at least 4M).
    #[arg(long, default_value = "256M", value_parser = demo_size)]
    pub size: u64,
    /// Work in this (existing, empty) directory and keep it, instead of a
    /// temporary one.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Seed for the guest's writes and the moment of the kill.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Copy into an NBD export served by a local qemu-storage-daemon (what
    /// a storage migration to another host does), instead of a file.
    #[arg(long)]
    pub remote: bool,
    /// Also kill the engine once during the copy (at 30-70%, from the
    /// seed), check the source, and resume the copy from its last
    /// checkpoint before going on to the switch and the second kill.
    #[arg(long)]
    pub crash_during_copy: bool,
}

#[derive(Debug, Args)]
pub struct DemoEngineArgs {
    #[arg(long)]
    pub dir: PathBuf,
    #[arg(long)]
    pub seed: u64,
    /// The destination's NBD URI, when it is an export.
    #[arg(long)]
    pub dest_uri: Option<String>,
    /// Copy slowly and report progress: the parent kills this run during
    /// the copy.
    #[arg(long)]
    pub crash_during_copy: bool,
    /// Resume the job the journal records instead of starting one.
    #[arg(long)]
    pub resume: bool,
}

#[derive(Debug, Args)]
pub struct RecoverArgs {
    /// The journal file.
    pub journal: PathBuf,
    /// The source image you expect the journal's job to be about (a path
    /// or an NBD URI): another job's journal is refused (wrong-journal,
    /// exit 4). Management software should always pass both.
    #[arg(long)]
    pub source: Option<PathBuf>,
    /// The destination image you expect (see --source).
    #[arg(long = "dest", alias = "destination")]
    pub destination: Option<PathBuf>,
    /// Report what would be repaired, but write nothing.
    #[arg(long)]
    pub no_repair: bool,
    /// TLS credentials (QEMU's layout, as for `copy`) to reach an
    /// authoritative nbds:// image that names none in its address, so that
    /// recover can check it still answers with the recorded size. The
    /// verdict does not depend on it.
    #[arg(long, value_name = "DIR")]
    pub tls_creds: Option<PathBuf>,
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

#[derive(Debug, Args)]
// --tcp needs TLS, or the loud opt-out; never both.
#[command(group(
    clap::ArgGroup::new("tcp_security")
        .args(["tls_creds", "tcp_plaintext_insecure"])
        .multiple(false)
))]
pub struct ServeArgs {
    /// The journal: created for a new job, recovered if it exists.
    #[arg(long)]
    pub journal: PathBuf,
    /// The source image: a path or an NBD URI.
    #[arg(long)]
    pub source: PathBuf,
    /// The destination image: a path (created when missing) or an NBD URI.
    #[arg(long = "dest", alias = "destination")]
    pub destination: PathBuf,
    /// Start a new job over an existing destination that already holds
    /// data (see `copy --overwrite-destination`).
    #[arg(long, conflicts_with = "resume")]
    pub overwrite_destination: bool,
    /// The NBD Unix socket to create (mode 0600).
    #[arg(long)]
    pub socket: PathBuf,
    /// The control socket to create (mode 0600).
    #[arg(long)]
    pub control: PathBuf,
    /// Also serve NBD on this TCP address (e.g. 127.0.0.1:10809), TLS
    /// required (NBD_OPT_STARTTLS with --tls-creds; clients that do not
    /// start TLS are refused). Needs --tls-creds or
    /// --tcp-plaintext-insecure.
    #[arg(long, requires = "tcp_security", value_parser = tcp_address)]
    pub tcp: Option<String>,
    /// Serve --tcp in plain text: no encryption and no authentication, so
    /// anyone who reaches the port reads and writes the guest's disk. Only
    /// for a network where every peer may.
    #[arg(long, requires = "tcp")]
    pub tcp_plaintext_insecure: bool,
    /// Only clients whose certificate names NAME (a DNS name or IP address
    /// in its subjectAltName) may connect over TCP; repeat for more names.
    /// Needs ca-cert.pem in --tls-creds.
    #[arg(long, value_name = "NAME", requires = "tcp")]
    pub tls_authz: Vec<String>,
    /// The export name clients ask for.
    #[arg(long, default_value = "")]
    pub export: String,
    /// Resume an unfinished job (the journal says copying or ready): copy
    /// again only what its last checkpoint says may differ. --source and
    /// --dest must be the journal's images.
    #[arg(long)]
    pub resume: bool,
    /// With --resume: copy everything again instead.
    #[arg(long, requires = "resume")]
    pub restart_copy: bool,
    #[command(flatten)]
    pub tuning: TuningArgs,
}

#[derive(Debug, Args)]
pub struct ControlArgs {
    /// The control socket of `copyctl serve`.
    #[arg(long)]
    pub control: PathBuf,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The control socket of `copyctl serve`.
    #[arg(long)]
    pub control: PathBuf,
    /// Keep showing the status (a line redrawn on a terminal, one line or
    /// one JSON object per interval otherwise) until the job completes,
    /// aborts or fails.
    #[arg(long)]
    pub watch: bool,
    /// Seconds between two looks with --watch.
    #[arg(long, default_value_t = 1.0, requires = "watch", value_parser = parse_interval)]
    pub interval: f64,
}

fn parse_interval(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(v) if (0.05..=3600.0).contains(&v) => Ok(v),
        _ => Err(format!(
            "{text:?} is not a number of seconds from 0.05 to 3600"
        )),
    }
}

#[derive(Debug, Args)]
pub struct SwitchArgs {
    /// The control socket of `copyctl serve`.
    #[arg(long)]
    pub control: PathBuf,
    /// Wait up to this many seconds for the copy to be ready (showing its
    /// progress on a terminal).
    #[arg(long, default_value_t = 0)]
    pub wait: u64,
}

/// The control commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlCommand {
    Status,
    Switch,
    Complete,
    Abort,
}
