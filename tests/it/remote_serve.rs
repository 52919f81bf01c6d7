//! `copyctl serve` with its destination an NBD export (qemu-storage-daemon
//! serving a raw file), under a qemu-io guest writing through serve's own
//! export: SIGKILL of serve in every phase, and the remote server killed
//! before the switch (the job aborts, the guest carries on with the source)
//! and after it (restarted within `--reconnect-delay`, or not at all).
//!
//! Every acknowledged batch (its writes and the flush after them all
//! succeeded) is checked on the image `recover` names, read from the raw
//! file after the daemon stopped. Every child is killed when its guard
//! drops; every wait has a deadline.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

use livecopy::storage::{Endpoint, NbdAddress, NbdStorage, Storage};

use crate::nbd_client::Server;
use crate::remote::export;
use crate::serve::{
    Batch, Layout, MIB, REGION, Rng, Serve, StopOnDrop, assert_io_ok, count_done, guest_byte,
    guest_writer, path_str, qemu_io, source_byte, source_contents, wait_acked,
};
use crate::support::run_copyctl;

const SIZE: u64 = 32 * MIB;
const REGIONS: u64 = SIZE / REGION;
/// The daemon's socket tag: a restart binds the same socket again.
const TAG: &str = "dest";

/// A serve layout whose destination is an export of `image`.
struct Remote {
    layout: Layout,
    image: PathBuf,
    uri: String,
    server: Option<Server>,
}

impl Remote {
    fn new() -> Remote {
        let mut layout = Layout::with_source(&source_contents(SIZE));
        let image = layout.path("export.raw");
        std::fs::File::create(&image)
            .and_then(|f| f.set_len(SIZE))
            .expect("the export's file");
        let (server, uri) = export(layout.dir.path(), &image, "raw", TAG);
        layout.dest_arg = Some(uri.clone());
        Remote {
            layout,
            image,
            uri,
            server: Some(server),
        }
    }

    /// SIGKILL of the daemon (its socket goes too).
    fn kill_server(&mut self) {
        drop(self.server.take().expect("the daemon runs"));
    }

    /// The daemon again, on the same socket, exporting the same file.
    fn restart_server(&mut self) {
        assert!(self.server.is_none(), "the daemon still runs");
        let (server, uri) = export(self.layout.dir.path(), &self.image, "raw", TAG);
        assert_eq!(uri, self.uri);
        self.server = Some(server);
    }

    /// Stops the daemon cleanly, so its file can be read directly.
    fn stop_server(&mut self) {
        if let Some(server) = self.server.take() {
            server.stop();
        }
    }

    fn ctl(&self) -> String {
        path_str(&self.layout.ctl("")).to_string()
    }
}

/// `copyctl recover` of the layout's journal: phase, authoritative side
/// and the image's name (an export's URI, a file's path).
fn recover(remote: &Remote, context: &str) -> (String, String, String) {
    let run = run_copyctl(&[
        "--output",
        "json",
        "recover",
        path_str(&remote.layout.journal),
    ]);
    assert_eq!(
        run.code, 0,
        "{context}: recover failed\n{}\n{}",
        run.stdout, run.stderr
    );
    let value: Value = serde_json::from_str(&run.stdout).expect("recover JSON");
    let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
    let image = &value["image"];
    let name = if image["uri"].is_string() {
        text(&image["uri"])
    } else {
        text(&image["path"])
    };
    (text(&value["phase"]), text(&value["authoritative"]), name)
}

/// The file holding the image `recover` named: the export's file for its
/// URI, or the source.
fn file_of(remote: &Remote, named: &str) -> PathBuf {
    if named == remote.uri {
        remote.image.clone()
    } else {
        let named = std::fs::canonicalize(named).expect("the named file");
        assert_eq!(
            named,
            std::fs::canonicalize(&remote.layout.source).expect("source"),
            "recover named neither the export nor the source"
        );
        remote.layout.source.clone()
    }
}

/// Reads back, from `file`, every region of every acknowledged batch (the
/// guest's byte) and up to 8 regions no batch touched (the source's
/// byte); returns how many acknowledged regions were checked.
fn check_acknowledged(file: &Path, batches: &[Batch], rng: &mut Rng, context: &str) -> usize {
    let mut commands = Vec::new();
    for batch in batches.iter().filter(|b| b.acked) {
        for &r in &batch.regions {
            commands.push(format!("read -P {} {} 64k", guest_byte(r), r * REGION));
        }
    }
    let acked = commands.len();
    let touched: BTreeSet<u64> = batches
        .iter()
        .flat_map(|b| b.regions.iter().copied())
        .collect();
    let mut untouched: Vec<u64> = (0..REGIONS).filter(|r| !touched.contains(r)).collect();
    rng.shuffle(&mut untouched);
    untouched.truncate(8);
    for &r in &untouched {
        commands.push(format!("read -P {} {} 64k", source_byte(r), r * REGION));
    }
    if commands.is_empty() {
        return 0;
    }
    let out = qemu_io(path_str(file), &["-r"], &commands);
    assert!(
        out.code == 0 && !out.all().contains("Pattern verification failed"),
        "{context}: {} lost acknowledged writes or source data:\n{}",
        file.display(),
        out.text()
    );
    assert_eq!(
        count_done(&out.stdout, "read"),
        commands.len(),
        "{context}: {}",
        out.text()
    );
    acked
}

/// The guest's batches so far, with a writer thread and its stop flag.
struct Guest {
    stop: AtomicBool,
    log: Mutex<Vec<Batch>>,
    acked: AtomicUsize,
    order: Vec<u64>,
}

impl Guest {
    fn new(rng: &mut Rng, skip: &[u64]) -> Guest {
        let mut order: Vec<u64> = (0..REGIONS).filter(|r| !skip.contains(r)).collect();
        rng.shuffle(&mut order);
        Guest {
            stop: AtomicBool::new(false),
            log: Mutex::new(Vec::new()),
            acked: AtomicUsize::new(0),
            order,
        }
    }

    fn acked(&self) -> usize {
        self.acked.load(Ordering::Acquire)
    }

    /// The batches logged so far (the writer has stopped).
    fn batches(&self) -> Vec<Batch> {
        std::mem::take(&mut *self.log.lock().expect("log"))
    }
}

/// `copyctl status` through the control CLI; panics unless it answers.
fn status(ctl: &str) -> Value {
    let run = run_copyctl(&["--output", "json", "status", "--control", ctl]);
    assert_eq!(run.code, 0, "status: {}\n{}", run.stdout, run.stderr);
    serde_json::from_str(&run.stdout).expect("status JSON")
}

// ------------------------------------------------------- 1. kills of serve

#[derive(Debug, Clone, Copy)]
enum Target {
    Copying,
    Ready,
    Switched,
}

fn kill_serve_once(iteration: usize, seed: u64, target: Target) -> (String, usize) {
    let mut rng = Rng(seed);
    let mut remote = Remote::new();
    // 32 MiB at 32 MiB/s: about a second of copying.
    let mut serve = remote.layout.serve("", &["--bandwidth", "32M"]);
    let url = serve.url();
    let guest = Guest::new(&mut rng, &[]);
    let writer_seed = rng.next();
    let context = format!("kill {iteration} (seed {seed:#x}, aimed at {target:?})");
    std::thread::scope(|scope| {
        let _stop_writer = StopOnDrop(&guest.stop);
        scope.spawn(|| {
            guest_writer(
                &url,
                &guest.order,
                writer_seed,
                &guest.stop,
                &guest.log,
                &guest.acked,
            )
        });
        let mut ctl = serve.control();
        match target {
            Target::Copying => {
                std::thread::sleep(Duration::from_micros(rng.below(800_000)));
            }
            Target::Ready => {
                ctl.wait_phase("ready", Duration::from_secs(30));
                let more = guest.acked() + 1 + rng.below(3) as usize;
                wait_acked(&guest.acked, more, &context);
                std::thread::sleep(Duration::from_micros(rng.below(10_000)));
            }
            Target::Switched => {
                ctl.wait_phase("ready", Duration::from_secs(30));
                // The management CLI, as an operator would.
                let run = run_copyctl(&["switch", "--control", &remote.ctl()]);
                assert_eq!(run.code, 0, "{context}: switch\n{}", run.stderr);
                let more = guest.acked() + 1 + rng.below(3) as usize;
                wait_acked(&guest.acked, more, &context);
                std::thread::sleep(Duration::from_micros(rng.below(10_000)));
            }
        }
        serve.kill();
        guest.stop.store(true, Ordering::Release);
    });
    let batches = guest.batches();

    let (phase, authoritative, named) = recover(&remote, &context);
    let allowed: &[&str] = match target {
        Target::Copying => &["copying", "ready"],
        Target::Ready => &["ready"],
        Target::Switched => &["switched"],
    };
    assert!(allowed.contains(&phase.as_str()), "{context}: {phase}");
    if phase == "switched" {
        assert_eq!(authoritative, "destination", "{context}");
        assert_eq!(named, remote.uri, "{context}: recover names the export");
        // serve again over the switched journal: it serves the export.
        let mut again = remote.layout.serve("again", &["--reconnect-delay", "5"]);
        assert_eq!(again.announced["phase"], "switched", "{}", again.announced);
        assert_eq!(again.announced["authoritative"], "destination");
        let acked = batches.iter().find(|b| b.acked).expect("an acked batch");
        let r = acked.regions[0];
        let fresh = guest.order_free(&batches).expect("a region no batch wrote");
        let out = qemu_io(
            &again.url(),
            &["-t", "writeback"],
            &[
                format!("read -P {} {} 64k", guest_byte(r), r * REGION),
                format!("write -P {} {} 64k", guest_byte(fresh), fresh * REGION),
                "flush".to_string(),
            ],
        );
        assert_io_ok(&out, 1, 1);
        again.kill();
        remote.stop_server();
        // The write through the restarted serve is on the export's file,
        // not on the source.
        let on = |file: &Path, byte: u8| {
            let out = qemu_io(
                path_str(file),
                &["-r"],
                &[format!("read -P {byte} {} 64k", fresh * REGION)],
            );
            out.code == 0 && !out.all().contains("Pattern verification failed")
        };
        assert!(on(&remote.image, guest_byte(fresh)), "{context}");
        assert!(on(&remote.layout.source, source_byte(fresh)), "{context}");
        let mut with_fresh = batches;
        with_fresh.push(Batch {
            regions: vec![fresh],
            acked: true,
        });
        let n = check_acknowledged(&remote.image, &with_fresh, &mut rng, &context);
        return (phase, n);
    }
    assert_eq!(authoritative, "source", "{context}");
    remote.stop_server();
    let file = file_of(&remote, &named);
    assert_eq!(file, remote.layout.source, "{context}");
    let n = check_acknowledged(&file, &batches, &mut rng, &context);
    if matches!(target, Target::Ready | Target::Switched) {
        assert!(n > 0, "{context}: no acknowledged batch");
    }
    (phase, n)
}

impl Guest {
    /// A region the writer never got to.
    fn order_free(&self, batches: &[Batch]) -> Option<u64> {
        let touched: BTreeSet<u64> = batches
            .iter()
            .flat_map(|b| b.regions.iter().copied())
            .collect();
        self.order
            .iter()
            .rev()
            .copied()
            .find(|r| !touched.contains(r))
    }
}

/// SIGKILL of `copyctl serve` copying into an export, in every phase,
/// under a writing guest: `recover` names the export after the switch and
/// the source before, and every acknowledged write is on that image; a
/// serve restarted over a switched journal serves the export.
#[test]
fn kill_serve_with_a_remote_destination_in_every_phase() {
    let rounds: usize = std::env::var("LIVECOPY_REMOTE_KILLS")
        .ok()
        .map(|v| v.parse().expect("LIVECOPY_REMOTE_KILLS is a number"))
        .unwrap_or(2);
    let seed: u64 = match std::env::var("LIVECOPY_SEED") {
        Ok(v) => v.parse().expect("LIVECOPY_SEED is a number"),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_nanos() as u64,
    };
    println!("remote serve kill test: seed {seed} (replay with LIVECOPY_SEED={seed})");
    let mut rng = Rng(seed);
    let mut landed = Vec::new();
    let mut regions = 0;
    for round in 0..rounds {
        for (i, target) in [Target::Copying, Target::Ready, Target::Switched]
            .into_iter()
            .enumerate()
        {
            let (phase, n) = kill_serve_once(round * 3 + i, rng.next(), target);
            landed.push(format!("{target:?}->{phase}"));
            regions += n;
        }
    }
    assert!(regions > 0, "no acknowledged region checked");
    println!("remote serve kill test: {landed:?}; {regions} acknowledged regions intact");
}

// ------------------------------------- 2. the remote server dies mid-copy

/// qemu-storage-daemon killed while the copy runs: the job aborts with a
/// reason naming the destination, the guest carries on with the source and
/// never sees an error, and `recover` names the source, which holds every
/// acknowledged write.
#[test]
fn remote_destination_killed_before_the_switch_aborts_the_job() {
    let mut rng = Rng(0x5eed_0002);
    let mut remote = Remote::new();
    // 32 MiB at 8 MiB/s: four seconds of copying.
    let mut serve = remote.layout.serve("", &["--bandwidth", "8M"]);
    let url = serve.url();
    let guest = Guest::new(&mut rng, &[]);
    let writer_seed = rng.next();
    let ctl_path = remote.ctl();
    std::thread::scope(|scope| {
        let _stop_writer = StopOnDrop(&guest.stop);
        scope.spawn(|| {
            guest_writer(
                &url,
                &guest.order,
                writer_seed,
                &guest.stop,
                &guest.log,
                &guest.acked,
            )
        });
        wait_acked(&guest.acked, 2, "before the kill");
        let mut ctl = serve.control();
        assert_eq!(ctl.phase(), "copying", "the copy ended too soon");
        remote.kill_server();
        ctl.wait_phase("aborted", Duration::from_secs(30));
        let status = status(&ctl_path);
        let reason = status["reason"].as_str().unwrap_or_default();
        assert!(reason.contains("destination"), "{status}");
        // The guest carries on with the source.
        let more = guest.acked() + 3;
        wait_acked(&guest.acked, more, "after the abort");
        guest.stop.store(true, Ordering::Release);
    });
    let batches = guest.batches();
    let failed: Vec<&Vec<u64>> = batches
        .iter()
        .filter(|b| !b.acked)
        .map(|b| &b.regions)
        .collect();
    assert!(
        failed.is_empty(),
        "the guest saw the destination's loss: batches {failed:?} failed; serve: {}",
        serve.stderr()
    );
    let r = guest.order_free(&batches).expect("a free region");
    let out = qemu_io(
        &url,
        &["-t", "writeback"],
        &[
            format!("write -P {} {} 64k", guest_byte(r), r * REGION),
            "flush".into(),
        ],
    );
    assert_io_ok(&out, 1, 0);
    serve.kill();
    let (phase, authoritative, named) = recover(&remote, "after the abort");
    assert_eq!(
        (phase.as_str(), authoritative.as_str()),
        ("aborted", "source")
    );
    let file = file_of(&remote, &named);
    assert_eq!(file, remote.layout.source);
    let mut all = batches;
    all.push(Batch {
        regions: vec![r],
        acked: true,
    });
    let n = check_acknowledged(&file, &all, &mut rng, "after the abort");
    println!("{n} acknowledged regions intact on the source");
}

// -------------------------------------- 3. the remote server dies after it

/// Serve copying into the export, switched, with `delay` seconds of
/// reconnect budget; the guest wrote and flushed one batch since.
fn switched(delay: &str) -> (Remote, Serve) {
    let remote = Remote::new();
    let serve = remote.layout.serve("", &["--reconnect-delay", delay]);
    let mut ctl = serve.control();
    ctl.wait_phase("ready", Duration::from_secs(60));
    let reply = ctl.request("switch");
    assert_eq!(reply["ok"], true, "{reply}");
    let out = qemu_io(
        &serve.url(),
        &["-t", "writeback"],
        &[
            format!("write -P {} 0 64k", guest_byte(0)),
            format!("write -P {} 64k 64k", guest_byte(1)),
            "flush".to_string(),
        ],
    );
    assert_io_ok(&out, 2, 0);
    (remote, serve)
}

/// The daemon killed (SIGKILL) after the switch and started again on the
/// same socket within `--reconnect-delay 20`:
///
/// - killed while the guest is idle (its last flush covered every write),
///   a guest batch sent during the outage waits, then succeeds on the new
///   connection, and the job stays switched;
/// - killed under a writing guest, every acknowledged batch is on the
///   export. A batch may fail only in the documented way: the lost
///   connection held writes the server acknowledged but no FLUSH covered,
///   the next FLUSH fails with EIO rather than vouch for them, and a failed
///   sync of the authoritative image stops the engine (E5): the status says
///   failed, naming the doubt, and no later batch is acknowledged. The
///   daemon's SIGKILL loses nothing the kernel has, so this cannot show a
///   loss the doubt would have hidden: the client tests do that with a fake
///   server.
#[test]
fn remote_destination_killed_after_the_switch_and_restarted_within_the_delay() {
    let (mut remote, mut serve) = switched("20");
    let url = serve.url();
    let ctl_path = remote.ctl();

    // Idle guest: nothing in doubt.
    remote.kill_server();
    let during = std::thread::spawn({
        let url = url.clone();
        move || {
            qemu_io(
                &url,
                &["-t", "writeback"],
                &[
                    format!("write -P {} 128k 64k", guest_byte(2)),
                    format!("write -P {} 192k 64k", guest_byte(3)),
                    "flush".to_string(),
                ],
            )
        }
    });
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        !during.is_finished(),
        "the guest's batch ended while the server was down"
    );
    remote.restart_server();
    let out = during.join().expect("the batch sent during the outage");
    assert_io_ok(&out, 2, 0);
    assert_eq!(status(&ctl_path)["phase"], "switched");
    let mut batches = vec![Batch {
        regions: vec![0, 1, 2, 3],
        acked: true,
    }];

    // A writing guest.
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_nanos() as u64;
    println!("seed {seed:#x}");
    let mut rng = Rng(seed);
    let guest = Guest::new(&mut rng, &[0, 1, 2, 3]);
    let writer_seed = rng.next();
    std::thread::scope(|scope| {
        let _stop_writer = StopOnDrop(&guest.stop);
        scope.spawn(|| {
            guest_writer(
                &url,
                &guest.order,
                writer_seed,
                &guest.stop,
                &guest.log,
                &guest.acked,
            )
        });
        wait_acked(&guest.acked, 2, "before the kill");
        // Anywhere in the next batch: before its writes, among them, or
        // before its flush.
        std::thread::sleep(Duration::from_micros(rng.below(40_000)));
        remote.kill_server();
        std::thread::sleep(Duration::from_millis(200 + rng.below(800)));
        remote.restart_server();
        let before = guest.acked();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if guest.acked() >= before + 3 || status(&ctl_path)["phase"] == "failed" {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "no progress and no failure 30 s after the restart"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        guest.stop.store(true, Ordering::Release);
    });
    let writer = guest.batches();
    let status = status(&ctl_path);
    let first_failed = writer.iter().position(|b| !b.acked);
    if let Some(first) = first_failed {
        assert_eq!(status["phase"], "failed", "batch {first} failed: {status}");
        let reason = status["reason"].as_str().unwrap_or_default();
        assert!(
            reason.contains("may be lost"),
            "a batch failed for another reason than the flush's doubt: {status}"
        );
        assert!(
            writer[first..].iter().all(|b| !b.acked),
            "a batch was acknowledged after the engine failed"
        );
    } else {
        assert_eq!(status["phase"], "switched", "{status}");
    }
    println!(
        "after the kill under a writing guest: {} batches acknowledged, {}",
        writer.iter().filter(|b| b.acked).count(),
        match first_failed {
            Some(_) => "then the flush's doubt stopped the engine (E5)",
            None => "none failed",
        }
    );
    batches.extend(writer);
    serve.kill();
    let (phase, authoritative, named) = recover(&remote, "after the restart");
    assert_eq!(
        (phase.as_str(), authoritative.as_str(), named.as_str()),
        ("switched", "destination", remote.uri.as_str())
    );
    remote.stop_server();
    check_acknowledged(&remote.image, &batches, &mut rng, "after the restart");
}

/// The daemon killed after the switch and not started again within
/// `--reconnect-delay 2`: a guest write waits for the budget, then fails
/// with EIO; the engine stays up and answers `status`; a guest flush then
/// fails too and stops the engine (E5), which still answers; `recover`
/// names the export, which holds every acknowledged write.
#[test]
fn remote_destination_killed_after_the_switch_and_not_restarted() {
    let (mut remote, mut serve) = switched("2");
    let url = serve.url();
    let ctl_path = remote.ctl();
    // A guest that writes and never flushes: qemu-io flushes whenever it
    // closes a disk (qemu's NBD client flushes to the OS even with
    // cache=unsafe), so the write alone goes through the crate's client.
    let guest = NbdStorage::connect(
        &NbdAddress {
            endpoint: Endpoint::Unix {
                socket: remote.layout.nbd(""),
            },
            export: String::new(),
            tls: false,
            tls_certificates: None,
            tls_hostname: None,
        },
        true,
    )
    .expect("connect to serve");
    remote.kill_server();
    let started = Instant::now();
    let written = guest.write_at(2 * REGION, &[guest_byte(2); REGION as usize]);
    let waited = started.elapsed();
    let error = written.expect_err("a write to a lost export succeeded");
    assert!(
        error.raw_os_error() == Some(5) || error.to_string().contains("os error 5"),
        "not EIO: {error}"
    );
    assert!(
        waited >= Duration::from_millis(1500) && waited < Duration::from_secs(15),
        "the write failed after {waited:?}, not after the 2 s reconnect delay"
    );
    drop(guest);
    let status_now = status(&ctl_path);
    assert_eq!(status_now["phase"], "switched", "{status_now}");

    // qemu-io reports a failed flush by its exit code alone.
    let out = qemu_io(&url, &[], &["flush"]);
    assert_ne!(out.code, 0, "{}", out.text());
    let status_now = status(&ctl_path);
    assert_eq!(status_now["phase"], "failed", "{status_now}");
    let out = qemu_io(&url, &["-r"], &["read 0 64k"]);
    assert!(out.all().contains("failed"), "{}", out.text());
    assert_eq!(status(&ctl_path)["phase"], "failed");
    serve.kill();

    let (phase, authoritative, named) = recover(&remote, "export gone");
    assert_eq!(
        (phase.as_str(), authoritative.as_str(), named.as_str()),
        ("switched", "destination", remote.uri.as_str())
    );
    let mut rng = Rng(0x5eed_0004);
    let batches = [
        Batch {
            regions: vec![0, 1],
            acked: true,
        },
        Batch {
            regions: vec![2],
            acked: false,
        },
    ];
    check_acknowledged(&remote.image, &batches, &mut rng, "export gone");
}

/// The documented case of the restart: the lost connection carried a
/// write the daemon acknowledged and no FLUSH covered. The client cannot
/// tell whether the restarted daemon still has it, so the guest's next
/// flush fails (EIO) rather than vouch for it, and since a failed sync of
/// the authoritative image is fatal (E5) the engine stops, still answering
/// `status`. The way on is a restart of serve: it serves the export, whose
/// flushed writes are all there, and takes new ones.
#[test]
fn remote_destination_restarted_with_unflushed_writes_fails_the_next_flush() {
    let (mut remote, mut serve) = switched("20");
    let ctl_path = remote.ctl();
    // A write without a flush (qemu-io would flush when it closes).
    let guest = NbdStorage::connect(
        &NbdAddress {
            endpoint: Endpoint::Unix {
                socket: remote.layout.nbd(""),
            },
            export: String::new(),
            tls: false,
            tls_certificates: None,
            tls_hostname: None,
        },
        true,
    )
    .expect("connect to serve");
    guest
        .write_at(2 * REGION, &[guest_byte(2); REGION as usize])
        .expect("the unflushed write");
    remote.kill_server();
    std::thread::sleep(Duration::from_millis(500));
    remote.restart_server();
    let flushed = guest.sync_data();
    let error = flushed.expect_err("a flush vouched for a write the server may have lost");
    assert!(error.to_string().contains("os error 5"), "not EIO: {error}");
    drop(guest);
    let status_now = status(&ctl_path);
    assert_eq!(status_now["phase"], "failed", "{status_now}");
    let reason = status_now["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("may be lost"), "{status_now}");
    serve.kill();

    let (phase, authoritative, named) = recover(&remote, "after the failed flush");
    assert_eq!(
        (phase.as_str(), authoritative.as_str(), named.as_str()),
        ("switched", "destination", remote.uri.as_str())
    );
    let mut again = remote.layout.serve("again", &["--reconnect-delay", "20"]);
    assert_eq!(again.announced["phase"], "switched", "{}", again.announced);
    let out = qemu_io(
        &again.url(),
        &["-t", "writeback"],
        &[
            format!("read -P {} 0 64k", guest_byte(0)),
            format!("read -P {} 64k 64k", guest_byte(1)),
            format!("write -P {} 192k 64k", guest_byte(3)),
            "flush".to_string(),
        ],
    );
    assert_io_ok(&out, 1, 2);
    again.kill();
    remote.stop_server();
    let batches = [
        Batch {
            regions: vec![0, 1, 3],
            acked: true,
        },
        // In doubt: not checked either way.
        Batch {
            regions: vec![2],
            acked: false,
        },
    ];
    let mut rng = Rng(0x5eed_0005);
    check_acknowledged(&remote.image, &batches, &mut rng, "after serve's restart");
}
