//! `copyctl demo`: the main job, end to end, on real files.
//!
//! The parent makes a source image (three quarters data, one quarter holes)
//! and an empty destination, then starts `copyctl demo-engine` as a child
//! process. The child runs the live copy while a synthetic guest writes
//! random 4 KiB blocks, some with force-unit-access, and flushes; it logs
//! every write before submitting it and every acknowledgement after it
//! returns, to a file (unbuffered: a killed process's writes stay in the
//! page cache). Once the copy is Ready it switches over and the guest goes
//! on writing to the destination. The parent kills the child with SIGKILL at
//! a moment drawn from the seed, runs recovery on the journal, opens the
//! image recovery names, and checks every block against the log: each holds
//! its last acknowledged value or the one in flight, never an older one.
//!
//! With `--remote`, the destination is an NBD export of a file in the same
//! directory, served by a qemu-storage-daemon the parent starts (as a
//! storage migration to another host would use), and the check reads the
//! image recovery names through that export.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use livecopy::engine::{self, Config, JobPhase};
use livecopy::journal::Side;
use livecopy::storage::{AnyImage, FileStorage, Location, NbdOptions, Storage};
use serde_json::{Value, json};

use crate::args::{DemoArgs, DemoEngineArgs, Output};
use crate::exit::Exit;
use crate::output::emit;
use crate::size::human;

const BLOCK: u64 = 4096;
/// One source chunk in four is left as a hole.
const CHUNK: u64 = 1 << 20;

/// The bytes of value `id`: the id, then a fill derived from it; 0 is zeros.
fn block_bytes(id: u64) -> Vec<u8> {
    if id == 0 {
        return vec![0; BLOCK as usize];
    }
    let mut bytes = vec![(id % 251) as u8 + 1; BLOCK as usize];
    bytes[..8].copy_from_slice(&id.to_le_bytes());
    bytes
}

fn value_of(bytes: &[u8]) -> Option<u64> {
    let id = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
    (bytes == block_bytes(id).as_slice()).then_some(id)
}

fn initial_value(block: u64) -> u64 {
    if (block * BLOCK / CHUNK) % 4 == 3 {
        0
    } else {
        (1 << 40) + block
    }
}

/// xorshift64*: small, deterministic, good enough to scatter writes.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

fn paths(dir: &Path) -> (PathBuf, PathBuf, PathBuf, PathBuf) {
    (
        dir.join("source.img"),
        dir.join("destination.img"),
        dir.join("copy.journal"),
        dir.join("guest.log"),
    )
}

fn make_source(path: &Path, size: u64) -> anyhow::Result<u64> {
    let image = FileStorage::create_image(path, size)?;
    let mut data = 0;
    let mut chunk = Vec::with_capacity(CHUNK as usize);
    for start in (0..size).step_by(CHUNK as usize) {
        let end = (start + CHUNK).min(size);
        if initial_value(start / BLOCK) == 0 {
            continue;
        }
        chunk.clear();
        for block in start / BLOCK..end / BLOCK {
            chunk.extend(block_bytes(initial_value(block)));
        }
        image
            .write_at(start, &chunk)
            .with_context(|| format!("writing {}", path.display()))?;
        data += end - start;
    }
    image.sync_data().context("syncing the source")?;
    Ok(data)
}

/// Processes the demo started and has not reaped: a signal kills them.
static CHILDREN: Mutex<Vec<u32>> = Mutex::new(Vec::new());
/// The directory the demo made (never one given with --dir): a signal
/// removes it.
static MADE: Mutex<Option<PathBuf>> = Mutex::new(None);
/// Set once a signal arrived: the demo's own errors from then on (its
/// files vanish) are not its result.
static STOPPING: AtomicBool = AtomicBool::new(false);

fn track(child: &Child) {
    CHILDREN
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(child.id());
}

fn untrack(child: &Child) {
    CHILDREN
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .retain(|&pid| pid != child.id());
}

/// On SIGINT or SIGTERM: kill the processes the demo started, remove the
/// directory it made (`MADE`), and exit 128 + the signal, as a shell
/// reports it.
fn stop_on_signals() -> anyhow::Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])?;
    std::thread::Builder::new()
        .name("demo-signals".into())
        .spawn(move || {
            let Some(signal) = signals.forever().next() else {
                return;
            };
            STOPPING.store(true, Ordering::SeqCst);
            for &pid in CHILDREN.lock().unwrap_or_else(|p| p.into_inner()).iter() {
                if let Some(pid) = rustix::process::Pid::from_raw(pid as i32) {
                    let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
                }
            }
            if let Some(dir) = &*MADE.lock().unwrap_or_else(|p| p.into_inner()) {
                let _ = std::fs::remove_dir_all(dir);
            }
            eprintln!("copyctl: demo stopped by signal {signal}; its processes and files are gone");
            std::process::exit(128 + signal);
        })?;
    Ok(())
}

/// Free bytes in `dir` for an unprivileged writer.
fn free_space(dir: &Path) -> anyhow::Result<u64> {
    let fs = rustix::fs::statvfs(dir).map_err(|e| {
        livecopy::Error::io_at(
            "statvfs",
            dir,
            std::io::Error::from_raw_os_error(e.raw_os_error()),
        )
    })?;
    Ok(fs.f_bavail.saturating_mul(fs.f_frsize))
}

/// `--dir` must be an existing, empty directory.
fn check_dir(dir: &Path) -> anyhow::Result<()> {
    let mut entries =
        std::fs::read_dir(dir).map_err(|e| livecopy::Error::io_at("open --dir", dir, e))?;
    if entries.next().is_some() {
        anyhow::bail!(livecopy::Error::InvalidInput(format!(
            "--dir {} is not empty: the demo works in an empty directory",
            dir.display()
        )));
    }
    Ok(())
}

pub fn run(args: &DemoArgs, out: Output) -> anyhow::Result<Exit> {
    let result = demo(args, out);
    if STOPPING.load(Ordering::SeqCst) {
        // The signal thread ends the process once it has cleaned up.
        loop {
            std::thread::park();
        }
    }
    result
}

fn demo(args: &DemoArgs, out: Output) -> anyhow::Result<Exit> {
    // Before anything is made, so that no signal finds it unguarded.
    stop_on_signals()?;
    let size = args.size / BLOCK * BLOCK;
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    }) | 1;
    if let Some(dir) = &args.dir {
        check_dir(dir)?;
    }
    let temp;
    let dir = match &args.dir {
        Some(d) => d.clone(),
        None => {
            let mut made = MADE.lock().unwrap_or_else(|p| p.into_inner());
            temp = tempfile::tempdir().context("creating a temporary directory")?;
            *made = Some(temp.path().to_path_buf());
            temp.path().to_path_buf()
        }
    };
    // The source (three quarters data), the copy of it, and room to spare.
    let needed = size / 4 * 3 * 2 + (64 << 20);
    let free = free_space(&dir)?;
    if free < needed {
        anyhow::bail!(livecopy::Error::InvalidInput(format!(
            "the demo needs about {} free in {}; {} is free (try a smaller --size)",
            human(needed),
            dir.display(),
            human(free)
        )));
    }
    let (source, destination, journal, log) = paths(&dir);
    let data = make_source(&source, size)?;
    FileStorage::create_image(&destination, size)?;
    let remote = if args.remote {
        Some(RemoteDestination::start(&dir, &destination)?)
    } else {
        None
    };

    let exe = std::env::current_exe().context("finding copyctl itself")?;
    let spawn_engine = |extra: &[&str]| -> anyhow::Result<std::process::Child> {
        let mut engine = Command::new(&exe);
        engine
            .args(["demo-engine", "--dir"])
            .arg(&dir)
            .args(["--seed", &seed.to_string()])
            .args(extra);
        if let Some(remote) = &remote {
            engine.args(["--dest-uri", &remote.uri]);
        }
        let child = engine
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting the engine process")?;
        track(&child);
        Ok(child)
    };
    let crash_during_copy = if args.crash_during_copy {
        Some(crash_during_copy(
            &spawn_engine,
            seed,
            data,
            &journal,
            &source,
            &log,
            size,
        )?)
    } else {
        None
    };
    let mut child = spawn_engine(if crash_during_copy.is_some() {
        &["--resume"]
    } else {
        &[]
    })?;
    let events = BufReader::new(child.stdout.take().expect("piped stdout"));
    let kill_after = 3 + seed % 17;
    let mut ready = Value::Null;
    let mut resumed = Value::Null;
    let mut switched = Value::Null;
    let mut flushes_after_switch = 0;
    for line in events.lines() {
        let event: Value = serde_json::from_str(&line?).context("an engine event")?;
        match event["event"].as_str() {
            Some("ready") => ready = event,
            Some("resumed") => resumed = event,
            Some("switched") => switched = event,
            Some("flush") if !switched.is_null() => {
                flushes_after_switch += 1;
                if flushes_after_switch >= kill_after {
                    break;
                }
            }
            Some("failed") => anyhow::bail!("the engine failed: {}", event["reason"]),
            _ => {}
        }
    }
    child.kill().context("killing the engine")?;
    let status = child.wait()?;
    untrack(&child);
    anyhow::ensure!(
        !status.success(),
        "the engine exited before it was killed: {status}"
    );

    let authority = livecopy::restart::authoritative_image(&journal)?;
    let image = authority
        .image
        .to_str()
        .map(Location::parse)
        .transpose()?
        .unwrap_or_else(|| Location::Path(authority.image.clone()));
    let image = AnyImage::open(&image, false, &NbdOptions::default())
        .context("opening the image recovery named")?;
    let checked = verify(&log, &image, size)?;
    drop(image);
    if let Some(remote) = remote {
        remote.stop()?;
    }
    let ok = checked.wrong.is_empty();
    let side = authority.side.name();
    let first_crash = crash_during_copy.as_ref().map_or(Value::Null, |c| {
        json!({
            "killed_at_bytes_copied": c.killed_at,
            "recovery": {"authoritative": "source", "phase": c.phase},
            "writes_acknowledged": c.checked.acknowledged,
            "wrong_blocks": c.checked.wrong.iter().take(20).collect::<Vec<_>>(),
            "resumed_bytes_to_copy": resumed["bytes_to_copy"],
        })
    });
    let first_crash_text = match &crash_during_copy {
        Some(c) => format!(
            "crash:     kill -9 of the engine during the copy, at {} of {}\n\
             recovery:  source authoritative (phase {}); {} acknowledged writes checked, {} wrong\n\
             resume:    copied again {} (the rest was durable at the last checkpoint; the guest wrote the first eighth)\n",
            human(c.killed_at),
            human(data),
            c.phase,
            c.checked.acknowledged,
            c.checked.wrong.len(),
            human(resumed["bytes_to_copy"].as_u64().unwrap_or(0)),
        ),
        None => String::new(),
    };
    let ok = ok
        && crash_during_copy
            .as_ref()
            .is_none_or(|c| c.checked.wrong.is_empty());
    let json = json!({
        "seed": seed,
        "crash_during_copy": first_crash,
        "dir": dir,
        "size": size,
        "data_bytes": data,
        "ready": ready,
        "switched": switched,
        "killed_after_flushes_on_destination": flushes_after_switch,
        "recovery": {
            "authoritative": side,
            "image": authority.image,
            "phase": authority.phase.name(),
            "seq": authority.recovered.seq,
        },
        "writes_acknowledged": checked.acknowledged,
        "writes_flushed": checked.flushed,
        "blocks_checked": checked.blocks,
        "wrong_blocks": checked.wrong.iter().take(20).collect::<Vec<_>>(),
        "verdict": if ok { "verified" } else { "LOST WRITES" },
    });
    let copy_seconds = ready["seconds"].as_f64().unwrap_or(0.0);
    let human_text = format!(
        "livecopy demo: seed {seed}, {} source ({} of data), in {}\n\
         {first_crash_text}\
         copy:      {} in {:.2} s ({}/s), the guest writing and flushing all along\n\
         switch:    guest paused {:.3} ms\n\
         crash:     kill -9 of the engine after {} guest flushes on the destination\n\
         recovery:  {side} authoritative (phase {}, seq {}): {}\n\
         verified:  {} blocks; {} acknowledged writes ({} before a completed flush), {} wrong\n\
         verdict:   {}\n",
        human(size),
        human(data),
        dir.display(),
        human(ready["bytes_copied"].as_u64().unwrap_or(0)),
        copy_seconds,
        human((ready["bytes_copied"].as_f64().unwrap_or(0.0) / copy_seconds.max(1e-9)) as u64),
        switched["pause_ms"].as_f64().unwrap_or(f64::NAN),
        flushes_after_switch,
        authority.phase.name(),
        authority.recovered.seq,
        authority.image.display(),
        checked.blocks,
        checked.acknowledged,
        checked.flushed,
        checked.wrong.len(),
        if ok {
            "OK: every acknowledged write is on the image recovery named"
        } else {
            "LOST WRITES"
        },
    );
    emit(out, json, &human_text)?;
    anyhow::ensure!(
        authority.side == Side::Destination,
        "recovery named the source after the switch"
    );
    Ok(if ok { Exit::Ok } else { Exit::Failure })
}

/// What the kill during the copy left.
struct FirstCrash {
    killed_at: u64,
    phase: &'static str,
    checked: Checked,
}

/// Runs the engine slowly, kills it at 30-70% of the copy (from the seed),
/// and checks that recovery names the source and that the source holds
/// every acknowledged write.
fn crash_during_copy(
    spawn_engine: &dyn Fn(&[&str]) -> anyhow::Result<std::process::Child>,
    seed: u64,
    data: u64,
    journal: &Path,
    source: &Path,
    log: &Path,
    size: u64,
) -> anyhow::Result<FirstCrash> {
    let mut child = spawn_engine(&["--crash-during-copy"])?;
    let events = BufReader::new(child.stdout.take().expect("piped stdout"));
    let target = data / 100 * (30 + seed % 41);
    let mut killed_at = 0;
    for line in events.lines() {
        let event: Value = serde_json::from_str(&line?).context("an engine event")?;
        match event["event"].as_str() {
            Some("copying") => {
                killed_at = event["bytes_copied"].as_u64().unwrap_or(0);
                if killed_at >= target {
                    break;
                }
            }
            Some("failed") => anyhow::bail!("the engine failed: {}", event["reason"]),
            Some(other) => anyhow::bail!("the engine reported {other} before the kill"),
            None => {}
        }
    }
    child.kill().context("killing the engine")?;
    let status = child.wait()?;
    untrack(&child);
    anyhow::ensure!(
        !status.success(),
        "the engine exited before it was killed: {status}"
    );
    let authority = livecopy::restart::authoritative_image(journal)?;
    anyhow::ensure!(
        authority.side == Side::Source,
        "recovery named the destination during the copy"
    );
    let image = AnyImage::open(
        &Location::Path(source.to_path_buf()),
        false,
        &NbdOptions::default(),
    )?;
    let checked = verify(log, &image, size)?;
    Ok(FirstCrash {
        killed_at,
        phase: authority.phase.name(),
        checked,
    })
}

struct Checked {
    blocks: u64,
    acknowledged: u64,
    flushed: u64,
    wrong: Vec<String>,
}

/// Replays the guest log into a model and compares the image with it.
fn verify(log: &Path, image: &AnyImage, size: u64) -> anyhow::Result<Checked> {
    // Per block: values in submission order, and how many were acknowledged.
    let mut history: HashMap<u64, (Vec<u64>, usize)> = HashMap::new();
    let mut pending: Option<(u64, u64)> = None;
    let (mut acknowledged, mut flushed, mut since_flush) = (0, 0, 0);
    for line in BufReader::new(File::open(log)?).lines() {
        let line = line?;
        let mut words = line.split_whitespace();
        match words.next() {
            Some("w") => {
                let block: u64 = words.next().context("block")?.parse()?;
                let id: u64 = words.next().context("id")?.parse()?;
                history
                    .entry(block)
                    .or_insert_with(|| (vec![initial_value(block)], 1))
                    .0
                    .push(id);
                pending = Some((block, id));
            }
            Some("k") | Some("u") => {
                let (block, _) = pending
                    .take()
                    .context("an acknowledgement without a write")?;
                let entry = history.get_mut(&block).expect("logged");
                entry.1 = entry.0.len();
                acknowledged += 1;
                since_flush += 1;
            }
            Some("f") => {
                flushed += since_flush;
                since_flush = 0;
            }
            _ => pending = None,
        }
    }
    let mut wrong = Vec::new();
    let mut buf = vec![0u8; BLOCK as usize];
    for block in 0..size / BLOCK {
        image
            .read_at(block * BLOCK, &mut buf)
            .context("reading the image recovery named")?;
        let found = value_of(&buf);
        let ok = match history.get(&block) {
            // Never written: the source's initial contents.
            None => found == Some(initial_value(block)),
            // The last acknowledged value, or one submitted after it.
            Some((values, acked)) => found.is_some_and(|v| values[acked - 1..].contains(&v)),
        };
        if !ok {
            wrong.push(format!(
                "block {block}: found {found:?}, history {:?}",
                history.get(&block)
            ));
        }
    }
    Ok(Checked {
        blocks: size / BLOCK,
        acknowledged,
        flushed,
        wrong,
    })
}

/// The child: runs the copy under a writing guest and reports events as
/// JSON lines on stdout until it is killed.
pub fn engine(args: &DemoEngineArgs) -> anyhow::Result<Exit> {
    // Never outlive the demo, however it ends.
    rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL))?;
    let (source, destination, journal, log_path) = paths(&args.dir);
    let destination = match &args.dest_uri {
        Some(uri) => Location::parse(uri)?,
        None => Location::Path(destination),
    };
    // Slow enough for the parent to kill it part-way (about 2 s).
    let bandwidth = match args.crash_during_copy {
        true => Some((std::fs::metadata(&source)?.len() / 2).max(1 << 20)),
        false => None,
    };
    let config = Config {
        granularity: 64 << 10,
        chunk_size: 1 << 20,
        copy_workers: 2,
        bandwidth,
        ..Config::default()
    };
    let source = Location::Path(source);
    let mut job = if args.resume {
        engine::files::resume_at(
            &journal,
            config,
            &NbdOptions::default(),
            engine::files::ResumeCopy::Remaining,
            Some((&source, &destination)),
        )?
    } else {
        engine::files::start_at(
            &journal,
            &source,
            &destination,
            config,
            &NbdOptions::default(),
        )?
    };
    let guest = job.guest();
    let blocks = guest.size() / BLOCK;
    let stop = Arc::new(AtomicBool::new(false));
    let (flushed_tx, flushed_rx) = mpsc::channel::<JobPhase>();
    // A resumed run appends to the log of the run it resumes.
    let mut log = OpenOptions::new()
        .create_new(!args.resume)
        .append(true)
        .mode(0o600)
        .open(&log_path)?;
    let seed = args.seed ^ u64::from(args.resume);
    // The run killed during the copy writes the first eighth of the disk,
    // as a guest with a working set does: the extents it keeps writing are
    // listed and copied again, the rest of what was copied is not. (A
    // guest writing all over the disk keeps every extent listed, and a
    // resume then copies everything again.)
    let band = if args.crash_during_copy {
        (blocks / 8).max(1)
    } else {
        blocks
    };
    let resume = args.resume;
    let guest_stop = Arc::clone(&stop);
    let writer = std::thread::spawn(move || -> anyhow::Result<()> {
        let mut rng = Rng(seed);
        // A resumed run's values never repeat the killed run's.
        let mut id = if resume { 1 << 40 } else { 1u64 };
        while !guest_stop.load(Ordering::Acquire) {
            for _ in 0..16 {
                let block = rng.next() % band;
                let fua = rng.next().is_multiple_of(8);
                id += 1;
                // Logged before the write and after its acknowledgement, one
                // write(2) each, so a kill leaves an exact account.
                log.write_all(format!("w {block} {id}\n").as_bytes())?;
                let mark = match guest.write(block * BLOCK, &block_bytes(id), fua) {
                    Ok(()) if fua => "u\n",
                    Ok(()) => "k\n",
                    Err(_) => "e\n",
                };
                log.write_all(mark.as_bytes())?;
            }
            match guest.flush() {
                Ok(()) => log.write_all(b"f\n")?,
                Err(_) => log.write_all(b"x\n")?,
            }
            if flushed_tx.send(JobPhase::Copying).is_err() {
                break;
            }
        }
        Ok(())
    });

    let mut stdout = std::io::stdout().lock();
    let started = Instant::now();
    let status = job.status();
    if status.resumed {
        writeln!(
            stdout,
            "{}",
            json!({"event": "resumed", "bytes_to_copy": status.to_copy, "size": status.size})
        )?;
    }
    job.start_workers()?;
    loop {
        let phase = job.wait_ready(Duration::from_millis(50));
        if args.crash_during_copy {
            let copied = job.status().bytes_copied;
            writeln!(
                stdout,
                "{}",
                json!({"event": "copying", "bytes_copied": copied})
            )?;
        }
        if phase == JobPhase::Ready {
            break;
        }
        if phase != JobPhase::Copying {
            let reason = job.status().reason.unwrap_or_default();
            writeln!(stdout, "{}", json!({"event": "failed", "reason": reason}))?;
            return Ok(Exit::Failure);
        }
        while flushed_rx.try_recv().is_ok() {}
    }
    let status = job.status();
    writeln!(
        stdout,
        "{}",
        json!({"event": "ready", "bytes_copied": status.bytes_copied, "seconds": started.elapsed().as_secs_f64()})
    )?;
    // Mirrored writes go on for a moment while the job waits to be switched.
    std::thread::sleep(Duration::from_millis(100));
    let report = job.switch()?;
    writeln!(
        stdout,
        "{}",
        json!({"event": "switched", "pause_ms": report.pause.as_secs_f64() * 1e3})
    )?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        match flushed_rx.recv_timeout(Duration::from_secs(1)) {
            Ok(_) => writeln!(stdout, "{}", json!({"event": "flush"}))?,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    // Not killed in time: stop cleanly so the parent notices.
    stop.store(true, Ordering::Release);
    drop(flushed_rx);
    let _ = writer.join();
    Ok(Exit::Failure)
}

/// The `--remote` destination: qemu-storage-daemon exporting the
/// destination file over a Unix socket in the demo directory. Killed when
/// dropped; `stop` ends it cleanly.
struct RemoteDestination {
    daemon: std::process::Child,
    uri: String,
}

impl RemoteDestination {
    fn start(dir: &Path, image: &Path) -> anyhow::Result<Self> {
        let socket = dir.join("export.sock");
        let daemon = Command::new("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=file0,filename={},cache.direct=on",
                image.display()
            ))
            .args(["--blockdev", "driver=raw,node-name=disk0,file=file0"])
            .arg("--nbd-server")
            .arg(format!("addr.type=unix,addr.path={}", socket.display()))
            .args([
                "--export",
                "type=nbd,id=export0,node-name=disk0,name=disk0,writable=on",
            ])
            // Its notes (a client gone when the engine is killed) are noise
            // here; a failure to start shows as its exit status below.
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting qemu-storage-daemon (Debian: apt-get install qemu-utils)")?;
        track(&daemon);
        let mut remote = RemoteDestination {
            daemon,
            uri: format!("nbd+unix:///disk0?socket={}", socket.display()),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            if let Some(status) = remote.daemon.try_wait()? {
                anyhow::bail!("qemu-storage-daemon exited: {status}");
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "qemu-storage-daemon did not listen"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(remote)
    }

    /// SIGTERM, then wait: the daemon flushes and exits.
    fn stop(mut self) -> anyhow::Result<()> {
        rustix::process::kill_process(
            rustix::process::Pid::from_raw(self.daemon.id() as i32).context("a pid")?,
            rustix::process::Signal::TERM,
        )?;
        self.daemon.wait()?;
        untrack(&self.daemon);
        Ok(())
    }
}

impl Drop for RemoteDestination {
    fn drop(&mut self) {
        let _ = self.daemon.kill();
        let _ = self.daemon.wait();
        untrack(&self.daemon);
    }
}
