//! The guest writer: one long-running `qemu-io` on an NBD export, fed
//! commands on stdin a few at a time, its per-request timings read back.
//!
//! qemu-io runs one command at a time (queue depth 1) and prints, for each
//! write, `64 KiB, 1 ops; 00.00 sec (X MiB/sec and Y ops/sec)`, where Y is
//! computed from its own clock around that request: the request's latency
//! is 1/Y. Each result line is stamped when it arrives (stdout is line
//! buffered through `stdbuf -oL`), which places the request in time for
//! the throughput windows. The workload: 64 KiB writes at random 64 KiB
//! aligned offsets, every 16th with FUA (`write -f`), the rest plain
//! (the export is opened with `-t writeback`, so plain writes carry no FUA):
//! a guest that writes and now and then needs its data durable.

use std::io::Write;
use std::process::{ChildStdin, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::util::{Guard, Res, Rng, between, percentile};

/// Request size.
pub const BLOCK: u64 = 64 << 10;
/// One write in this many carries FUA.
pub const FUA_EVERY: u64 = 16;
/// Commands queued in qemu-io's stdin ahead of the one running.
const LOOKAHEAD: u64 = 4;

/// One finished request.
#[derive(Debug, Clone, Copy)]
pub struct Op {
    /// When its result line arrived.
    pub at: Instant,
    /// Its latency, by qemu-io's own clock, in seconds.
    pub latency: f64,
    pub fua: bool,
}

#[derive(Default)]
struct Progress {
    sent: u64,
    done: u64,
    ops: Vec<Op>,
    errors: Vec<String>,
    ended: bool,
}

type Shared = Arc<(Mutex<Progress>, Condvar)>;

pub struct Writer {
    guard: Guard,
    stop: Arc<AtomicBool>,
    shared: Shared,
    feeder: Option<JoinHandle<()>>,
    reader: Option<JoinHandle<()>>,
    stderr: Option<JoinHandle<String>>,
}

/// What a writer did in a window of time.
#[derive(Debug, Clone, Copy, Default)]
pub struct Window {
    pub ops: usize,
    /// MiB/s of completed writes.
    pub mib_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Writer {
    /// Starts qemu-io on `uri` writing at random over `size` bytes.
    pub fn start(uri: &str, size: u64, seed: u64) -> Res<Writer> {
        Writer::start_in(None, uri, size, seed)
    }

    /// The same, run in a network namespace (`ip netns exec NS`) when one
    /// is given.
    pub fn start_in(netns: Option<&str>, uri: &str, size: u64, seed: u64) -> Res<Writer> {
        let mut cmd = crate::util::command_in(netns, "stdbuf");
        cmd.args(["-oL", "qemu-io", "-f", "raw", "-t", "writeback", uri])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut guard = Guard::spawn(&mut cmd, "qemu-io writer")?;
        let stdin = guard.child().stdin.take().expect("piped stdin");
        let stdout = guard.child().stdout.take().expect("piped stdout");
        let mut stderr = guard.child().stderr.take().expect("piped stderr");
        let shared: Shared = Arc::new((Mutex::new(Progress::default()), Condvar::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let feeder = {
            let (shared, stop) = (Arc::clone(&shared), Arc::clone(&stop));
            std::thread::spawn(move || feed(stdin, size, seed, &shared, &stop))
        };
        let reader = {
            let shared = Arc::clone(&shared);
            let lines = crate::util::line_reader(stdout);
            std::thread::spawn(move || {
                for (at, line) in lines {
                    let (lock, changed) = &*shared;
                    let mut p = lock.lock().unwrap();
                    if let Some(latency) = parse_latency(&line) {
                        let fua = (p.done + 1) % FUA_EVERY == 0;
                        p.ops.push(Op { at, latency, fua });
                        p.done += 1;
                        changed.notify_all();
                    } else if line.contains("failed") || line.contains("rror") {
                        p.errors.push(line);
                        p.done += 1;
                        changed.notify_all();
                    }
                }
                let (lock, changed) = &*shared;
                lock.lock().unwrap().ended = true;
                changed.notify_all();
            })
        };
        let stderr = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = std::io::Read::read_to_string(&mut stderr, &mut text);
            text
        });
        Ok(Writer {
            guard,
            stop,
            shared,
            feeder: Some(feeder),
            reader: Some(reader),
            stderr: Some(stderr),
        })
    }

    /// Waits until `n` requests finished (the writer is connected and going).
    pub fn wait_ops(&mut self, n: u64, timeout: Duration) -> Res<()> {
        let deadline = Instant::now() + timeout;
        let shared = Arc::clone(&self.shared);
        let (lock, changed) = &*shared;
        let mut p = lock.lock().unwrap();
        while p.done < n {
            if p.ended || Instant::now() >= deadline {
                let (errors, done) = (p.errors.join("; "), p.done);
                drop(p);
                let stderr = self.finish_stderr();
                fail!(
                    "the qemu-io writer did not get going ({done} requests done): {errors} {stderr}"
                );
            }
            p = changed
                .wait_timeout(p, Duration::from_millis(50))
                .unwrap()
                .0;
        }
        Ok(())
    }

    fn finish_stderr(&mut self) -> String {
        self.stop.store(true, Ordering::Release);
        self.guard.finish(Duration::from_secs(2));
        self.stderr
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default()
    }

    /// Stops feeding, lets qemu-io finish what it has, and returns every
    /// request and any error lines.
    pub fn stop(mut self) -> Res<(Vec<Op>, Vec<String>)> {
        self.stop.store(true, Ordering::Release);
        self.shared.1.notify_all();
        if let Some(f) = self.feeder.take() {
            let _ = f.join();
        }
        self.guard.finish(Duration::from_secs(10));
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        let stderr = self
            .stderr
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default();
        let p = self.shared.0.lock().unwrap();
        let mut errors = p.errors.clone();
        let stderr = stderr.trim();
        if !stderr.is_empty() {
            errors.push(stderr.to_string());
        }
        Ok((p.ops.clone(), errors))
    }
}

fn feed(mut stdin: ChildStdin, size: u64, seed: u64, shared: &Shared, stop: &AtomicBool) {
    let mut rng = Rng::new(seed);
    let blocks = size / BLOCK;
    let (lock, changed) = &**shared;
    loop {
        {
            let mut p = lock.lock().unwrap();
            while p.sent >= p.done + LOOKAHEAD && !stop.load(Ordering::Acquire) && !p.ended {
                p = changed
                    .wait_timeout(p, Duration::from_millis(20))
                    .unwrap()
                    .0;
            }
            if stop.load(Ordering::Acquire) || p.ended {
                return; // dropping stdin ends qemu-io after its queue
            }
            p.sent += 1;
        }
        let n = {
            let p = lock.lock().unwrap();
            p.sent
        };
        let offset = rng.below(blocks) * BLOCK;
        let flag = if n % FUA_EVERY == 0 { "-f " } else { "" };
        let pattern = n % 251 + 1;
        if writeln!(stdin, "write {flag}-P {pattern} {offset} 64k").is_err() {
            return;
        }
    }
}

/// `64 KiB, 1 ops; 00.00 sec (814.831 MiB/sec and 13037.2997 ops/sec)`
fn parse_latency(line: &str) -> Option<f64> {
    let end = line.find(" ops/sec)")?;
    let start = line[..end].rfind(" and ")? + 5;
    let rate: f64 = line[start..end].trim().parse().ok()?;
    (rate > 0.0).then(|| 1.0 / rate)
}

/// The requests whose result arrived within `from..to`.
pub fn window(ops: &[Op], from: Instant, to: Instant) -> Window {
    let inside: Vec<&Op> = ops.iter().filter(|o| o.at >= from && o.at <= to).collect();
    let seconds = between(from, to);
    let lat: Vec<f64> = inside.iter().map(|o| o.latency * 1e3).collect();
    Window {
        ops: inside.len(),
        mib_s: if seconds > 0.0 {
            inside.len() as f64 * BLOCK as f64 / (1 << 20) as f64 / seconds
        } else {
            f64::NAN
        },
        p50_ms: percentile(&lat, 50.0),
        p99_ms: percentile(&lat, 99.0),
        max_ms: crate::util::max(&lat),
    }
}

/// The longest request that was running at any moment in `from..to`:
/// what the guest felt of a pause in that interval.
pub fn longest_across(ops: &[Op], from: Instant, to: Instant) -> f64 {
    ops.iter()
        .filter(|o| {
            let started =
                o.at.checked_sub(Duration::from_secs_f64(o.latency.min(1e6)))
                    .unwrap_or(o.at);
            o.at >= from && started <= to
        })
        .map(|o| o.latency * 1e3)
        .fold(0.0, f64::max)
}
