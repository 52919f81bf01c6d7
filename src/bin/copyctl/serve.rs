//! `copyctl serve`: export the live disk over NBD while the copy runs, and
//! take management commands on a control socket.
//!
//! A new journal path starts a new job at once. An existing journal is
//! recovered first: a job that switched or ended serves its authoritative
//! image; an unfinished one (copying or ready) is refused unless `--resume`
//! says to start its copy over; a refusal of recovery stops here with
//! recover's exit code.

use std::path::Path;

use anyhow::Context;
use std::sync::Arc;

use livecopy::control::{self, Controller, JobController, JournalController};
use livecopy::engine::files;
use livecopy::export::ImageDevice;
use livecopy::journal::{self, Journal, Phase, Side};
use livecopy::nbd::{self, ExportDevice};
use livecopy::storage::{self, CreatedFile, JournalAccess, Storage};
use serde_json::json;

use crate::args::{Output, ServeArgs};
use crate::exit::Exit;
use crate::output::{emit_line, say, warn};

/// What to serve and who drives it.
struct Plan {
    device: Arc<dyn ExportDevice>,
    controller: Arc<dyn Controller>,
    phase: String,
    authoritative: Side,
    /// The authoritative image's path or URI, for the serving line.
    image: String,
    /// Keeps the job (and its workers) alive while serving.
    _job: Option<Arc<files::FileJob>>,
    /// What a new job created (journal, destination): removed if serving
    /// fails to start, after the job is gone (fields drop in order).
    created: Vec<CreatedFile>,
}

fn new_job(args: &ServeArgs) -> anyhow::Result<Plan> {
    // Before the destination is created: a refused tuning leaves nothing.
    let source = crate::copy::location(&args.source)?;
    let destination = crate::copy::location(&args.destination)?;
    let config = crate::copy::config(&args.tuning, &destination);
    config.validate()?;
    crate::copy::warn_settings(&config);
    let options = crate::copy::nbd_options(&args.tuning);
    crate::copy::check_new_journal(&args.journal)?;
    let mut created = Vec::new();
    created.extend(crate::copy::ensure_destination(
        &source,
        &destination,
        &options,
        args.overwrite_destination,
    )?);
    let job = files::start_at(&args.journal, &source, &destination, config, &options)?;
    created.push(CreatedFile::claim(&args.journal)?);
    let mut plan = running(job, source.to_string())?;
    plan.created = created;
    Ok(plan)
}

fn running(mut job: files::FileJob, source: String) -> anyhow::Result<Plan> {
    job.start_workers()?;
    let job = Arc::new(job);
    Ok(Plan {
        device: Arc::new(job.guest()),
        controller: Arc::new(JobController::new(Arc::clone(&job))),
        phase: job.status().phase.name().into(),
        authoritative: Side::Source,
        image: source,
        _job: Some(job),
        created: Vec::new(),
    })
}

fn existing_job(args: &ServeArgs) -> anyhow::Result<Result<Plan, Exit>> {
    let opened = journal::open_file(&args.journal, JournalAccess::Exclusive)?;
    let recovered = match opened.analysis.outcome {
        Ok(r) => r,
        Err(refusal) => {
            say(format_args!("copyctl: recovery refused: {refusal}"));
            return Ok(Err(Exit::of_refusal(refusal.reason)));
        }
    };
    // --source and --dest must name the journal's images, whatever its
    // phase (checked before any repair: another job's journal is not ours
    // to write). A finished job used to be served whatever they said.
    let expected = livecopy::restart::Expected {
        source: Some(crate::copy::location(&args.source)?),
        destination: Some(crate::copy::location(&args.destination)?),
    };
    if let Err(e) = expected.check(&recovered.record) {
        anyhow::bail!(e);
    }
    // Go on with the verdict on the repaired journal: the one repaired from
    // still lists the repairs just done, and `Journal::resume` refuses those.
    let recovered = journal::repair(&opened.storage, &recovered, |image| {
        storage::write_backup_copy(&args.journal, image).map(drop)
    })?
    .recovered;
    let record = &recovered.record;
    if matches!(record.phase, Phase::Copying | Phase::Ready) {
        let source = record.source().name().to_string();
        if !args.resume {
            anyhow::bail!(livecopy::Error::InvalidInput(format!(
                "{} holds an unfinished job ({}, the source is authoritative); \
                 pass --resume to resume its copy",
                args.journal.display(),
                record.phase.name()
            )));
        }
        // Release the lock: resume takes it again.
        drop(opened.storage);
        let copy = if args.restart_copy {
            files::ResumeCopy::All
        } else {
            files::ResumeCopy::Remaining
        };
        let (source_location, destination) = (
            crate::copy::location(&args.source)?,
            crate::copy::location(&args.destination)?,
        );
        let job = files::resume_at(
            &args.journal,
            crate::copy::config(&args.tuning, &destination),
            &crate::copy::nbd_options(&args.tuning),
            copy,
            Some((&source_location, &destination)),
        )?;
        return Ok(Ok(running(job, source)?));
    }
    let image = record.image(record.authoritative);
    let storage = files::open_recorded(image, &crate::copy::nbd_options(&args.tuning))?;
    // The job ended: this image is the guest's only copy (an export may
    // then be waited for, within --reconnect-delay).
    storage.only_copy();
    let authoritative = record.authoritative;
    let phase = record.phase.name().to_string();
    // Holding the journal keeps its lock: no second engine while we serve.
    let journal = Journal::resume(opened.storage, &recovered)?;
    Ok(Ok(Plan {
        device: Arc::new(ImageDevice::new(storage, record.source().size())?),
        controller: Arc::new(JournalController::new(journal)),
        phase,
        authoritative,
        image: image.name().to_string(),
        _job: None,
        created: Vec::new(),
    }))
}

/// The TCP listener's TLS, or `None` when --tcp-plaintext-insecure said
/// so (with a warning that cannot be missed).
fn server_tls(args: &ServeArgs) -> anyhow::Result<Option<nbd::tls::ServerTls>> {
    if !args.tls_authz.is_empty() && args.tuning.tls_creds.is_none() {
        anyhow::bail!(livecopy::Error::InvalidInput(
            "--tls-authz needs --tls-creds (client certificates are checked against its \
             ca-cert.pem)"
                .into()
        ));
    }
    if args.tcp.is_none() {
        return Ok(None);
    }
    let Some(dir) = &args.tuning.tls_creds else {
        say(format_args!(
            "copyctl: WARNING: --tcp-plaintext-insecure: NBD on {} is neither encrypted \
             nor authenticated; anyone who reaches it reads and writes the guest's disk",
            args.tcp.as_deref().unwrap_or_default()
        ));
        return Ok(None);
    };
    let tls = nbd::tls::server_config(dir, &args.tls_authz)?;
    if !tls.authenticates_clients() {
        warn(&format!(
            "{} has no {}: TCP clients are not authenticated \
             (the connection is encrypted, but any client may use the export)",
            dir.display(),
            nbd::tls::CA_CERT
        ));
    }
    Ok(Some(tls))
}

/// Set once start-up has nothing left that may wait long, before the first
/// socket is made: a socket on disk is then always serve's to remove. A
/// lock, not a flag: the signal thread decides and exits while holding it,
/// so start-up cannot make a socket between the decision and the exit.
static SERVING: std::sync::Mutex<bool> = std::sync::Mutex::new(false);

fn serving() -> std::sync::MutexGuard<'static, bool> {
    SERVING.lock().unwrap_or_else(|e| e.into_inner())
}

/// SIGINT and SIGTERM: before serving, the process ends at once with
/// 128 + the signal, as a kill would (start-up may wait long on an NBD
/// server; a new job's journal then stays, and `--resume` continues it);
/// once serving, the returned channel says which signal came, and `run`
/// stops cleanly, even when the signal came while the sockets were being
/// made.
fn stop_on_signals() -> anyhow::Result<std::sync::mpsc::Receiver<i32>> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("serve-signals".into())
        .spawn(move || {
            for signal in signals.forever() {
                let serving = serving();
                if !*serving {
                    say(format_args!(
                        "copyctl: stopped by signal {signal} while starting"
                    ));
                    std::process::exit(128 + signal);
                }
                drop(serving);
                let _ = tx.send(signal);
            }
        })?;
    Ok(rx)
}

pub fn run(args: &ServeArgs, out: Output) -> anyhow::Result<Exit> {
    // Check the socket paths before anything is created, so that a typo in
    // them does not leave a new job behind.
    let stop = stop_on_signals()?;
    livecopy::socket::check_bindable(&args.socket)?;
    livecopy::socket::check_bindable(&args.control)?;
    if crate::copy::same_place(&args.socket, &args.control) {
        anyhow::bail!(livecopy::Error::InvalidInput(format!(
            "--socket and --control are both {}: give each its own path",
            args.socket.display()
        )));
    }
    // Credentials too: a bad key file must not leave a new job behind.
    let tls = server_tls(args)?;
    let mut plan = if storage::stat_identity(&args.journal)?.is_some()
        || Path::new(&args.journal).is_symlink()
    {
        match existing_job(args)? {
            Ok(plan) => plan,
            Err(exit) => return Ok(exit),
        }
    } else if args.resume {
        // A mistyped journal path must not start a whole new copy.
        anyhow::bail!(livecopy::Error::io(
            "resume",
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("no journal at {} to resume", args.journal.display()),
            )
        ));
    } else {
        new_job(args)?
    };
    tracing::info!(
        journal = %args.journal.display(),
        phase = %plan.phase,
        authoritative = %plan.image,
        "started"
    );
    // TCP first: naming its address may wait on a resolver, and it leaves
    // nothing on disk.
    let tcp = match &args.tcp {
        Some(addr) => {
            let server = nbd::bind_tcp(addr.as_str(), Arc::clone(&plan.device), &args.export)
                .with_context(|| format!("listen on --tcp {addr}"))?;
            let server = match &tls {
                Some(tls) => server.tls(tls.clone()),
                None => server,
            };
            Some(server.spawn())
        }
        None => None,
    };
    // From here a signal waits in `stop` until the sockets exist, and the
    // drops below remove them: exiting at once would leave them behind.
    *serving() = true;
    let unix = nbd::bind_unix(&args.socket, Arc::clone(&plan.device), &args.export)?.spawn();
    let control = control::serve(&args.control, Arc::clone(&plan.controller))?;
    // Serving: a switch may come now, and with it writes on the
    // destination alone. What this command made is the job's from here on.
    plan.created.drain(..).for_each(CreatedFile::keep);
    let json = json!({
        "event": "serving",
        "socket": args.socket,
        "tcp": tcp.as_ref().and_then(|t| t.local_addr()).map(|a| a.to_string()),
        "tcp_tls": tcp.as_ref().map(|_| tls.is_some()),
        "control": args.control,
        "export": args.export,
        "phase": plan.phase,
        "authoritative": plan.authoritative.name(),
        "image": plan.image,
        "pid": std::process::id(),
    });
    let tcp_human = match tcp.as_ref().and_then(|t| t.local_addr()) {
        Some(addr) if tls.is_some() => format!(" and TCP {addr} (TLS required)"),
        Some(addr) => format!(" and TCP {addr} (PLAIN TEXT)"),
        None => String::new(),
    };
    let human = format!(
        "serving {} export {:?} on {}{tcp_human} ({}; {} {} authoritative); control on {}\n",
        if plan._job.is_some() {
            "the live copy as"
        } else {
            "the image as"
        },
        args.export,
        args.socket.display(),
        plan.phase,
        plan.authoritative.name(),
        plan.image,
        args.control.display()
    );
    // The announcement is for whoever watches; serving never depends on it
    // (a supervisor that stopped reading must not stop the guest's disk).
    if let Err(e) = emit_line(out, json, &human) {
        tracing::warn!("could not announce on stdout: {e:#}; serving anyway");
    }
    // Serve until a signal. Every acknowledged flush is already durable and
    // the journal says which image holds it, so any way of stopping is
    // safe; SIGINT and SIGTERM also take the sockets away.
    let signal = stop.recv().unwrap_or_default();
    tracing::info!(
        signal,
        "stopping: every acknowledged flush is durable; the journal names the image"
    );
    drop(control);
    drop(tcp);
    drop(unix);
    Ok(Exit::Ok)
}
