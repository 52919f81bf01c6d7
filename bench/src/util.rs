//! Small helpers: errors, statistics, processes, images, machine facts.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Every error is a message; the harness stops on the first one.
pub type Res<T> = Result<T, String>;

/// `format!` into an `Err`.
#[macro_export]
macro_rules! fail {
    ($($arg:tt)*) => { return Err(format!($($arg)*)) };
}

/// Adds context to any displayable error.
pub trait Context<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Res<T>;
}

impl<T, E: std::fmt::Display> Context<T> for Result<T, E> {
    fn ctx(self, what: impl FnOnce() -> String) -> Res<T> {
        self.map_err(|e| format!("{}: {e}", what()))
    }
}

pub const KIB: u64 = 1 << 10;
pub const MIB: u64 = 1 << 20;
pub const GIB: u64 = 1 << 30;
pub const TIB: u64 = 1 << 40;

/// xorshift64*: deterministic and fast; the data only has to be
/// incompressible-looking and non-zero.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in `0..n` (n > 0; the bias is irrelevant here).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

pub fn median(values: &[f64]) -> f64 {
    percentile(values, 50.0)
}

/// Linear interpolation between closest ranks; NaN for no values.
pub fn percentile(values: &[f64], p: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    let rank = (p / 100.0) * (v.len() - 1) as f64;
    let lo = rank.floor() as usize;
    let hi = rank.ceil() as usize;
    v[lo] + (v[hi] - v[lo]) * (rank - lo as f64)
}

pub fn max(values: &[f64]) -> f64 {
    values.iter().copied().fold(f64::NAN, f64::max)
}

/// Runs a command to completion, failing on a non-zero exit; returns the
/// wall time from spawn to exit and the output.
pub fn run_timed(cmd: &mut Command) -> Res<(Duration, Output)> {
    let shown = format!("{cmd:?}");
    let started = Instant::now();
    let output = cmd
        .stdin(Stdio::null())
        .output()
        .ctx(|| format!("run {shown}"))?;
    let elapsed = started.elapsed();
    if !output.status.success() {
        fail!(
            "{shown} failed ({}): {}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok((elapsed, output))
}

/// `program`, run in network namespace `netns` through `ip netns exec`
/// when one is given (ip execs it: the child's pid is the program's).
pub fn command_in(netns: Option<&str>, program: impl AsRef<std::ffi::OsStr>) -> Command {
    match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(program);
            c
        }
        None => Command::new(program),
    }
}

pub fn run(cmd: &mut Command) -> Res<Output> {
    run_timed(cmd).map(|(_, o)| o)
}

/// `sync(1)` with no argument: every dirty page of every file system goes
/// to the disk, so one measurement does not pay for the previous one's
/// write-back. Page caches cannot be dropped here (no root over
/// /proc/sys/vm/drop_caches in a container), so reads are warm.
pub fn sync_everything() -> Res<()> {
    run(&mut Command::new("sync")).map(drop)
}

/// Bytes allocated to a file (st_blocks * 512).
pub fn allocated(path: &Path) -> Res<u64> {
    Ok(std::fs::metadata(path)
        .ctx(|| format!("stat {}", path.display()))?
        .blocks()
        * 512)
}

pub fn remove(path: &Path) -> Res<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!("remove {}: {e}", path.display())),
    }
}

/// Removes a journal and the backups `copyctl` may have left beside it.
pub fn remove_journal(path: &Path) -> Res<()> {
    remove(path)?;
    if let (Some(dir), Some(name)) = (path.parent(), path.file_name()) {
        let prefix = format!("{}.", name.to_string_lossy());
        for entry in std::fs::read_dir(dir).ctx(|| format!("list {}", dir.display()))? {
            let entry = entry.ctx(|| "directory entry".into())?;
            if entry.file_name().to_string_lossy().starts_with(&prefix) {
                remove(&entry.path())?;
            }
        }
    }
    Ok(())
}

pub fn create_sparse(path: &Path, size: u64) -> Res<()> {
    remove(path)?;
    let file = File::create(path).ctx(|| format!("create {}", path.display()))?;
    file.set_len(size)
        .ctx(|| format!("size {}", path.display()))
}

/// A fully written image of pseudo-random bytes, synced.
pub fn write_full_image(path: &Path, size: u64, seed: u64) -> Res<()> {
    remove(path)?;
    let file = File::create(path).ctx(|| format!("create {}", path.display()))?;
    let mut rng = Rng::new(seed);
    let mut block = vec![0u8; (8 * MIB) as usize];
    rng.fill(&mut block);
    let mut offset = 0u64;
    while offset < size {
        // Vary each block a little so no two are identical.
        block[..8].copy_from_slice(&rng.next().to_le_bytes());
        let n = (size - offset).min(block.len() as u64) as usize;
        file.write_all_at(&block[..n], offset)
            .ctx(|| format!("write {}", path.display()))?;
        offset += n as u64;
    }
    file.sync_all().ctx(|| format!("fsync {}", path.display()))
}

/// A sparse image of `size` bytes with about `data` bytes written in
/// extents of 4 KiB to 1 MiB (powers of two), one per 1 MiB slot at a
/// random 4 KiB-aligned place inside a random slot: scattered the way a
/// file system's blocks are. Returns (extents, bytes written).
pub fn write_sparse_image(path: &Path, size: u64, data: u64, seed: u64) -> Res<(u64, u64)> {
    create_sparse(path, size)?;
    let file = OpenOptions::new()
        .write(true)
        .open(path)
        .ctx(|| format!("open {}", path.display()))?;
    let mut rng = Rng::new(seed);
    let slots = size / MIB;
    let mut used = vec![false; slots as usize];
    let mut buf = vec![0u8; MIB as usize];
    let (mut written, mut extents) = (0u64, 0u64);
    while written < data && extents < slots {
        let slot = rng.below(slots);
        if used[slot as usize] {
            continue;
        }
        used[slot as usize] = true;
        let len = (4 * KIB) << rng.below(9);
        let at = slot * MIB + rng.below((MIB - len) / (4 * KIB) + 1) * 4 * KIB;
        rng.fill(&mut buf[..len as usize]);
        file.write_all_at(&buf[..len as usize], at)
            .ctx(|| format!("write {}", path.display()))?;
        written += len;
        extents += 1;
    }
    file.sync_all()
        .ctx(|| format!("fsync {}", path.display()))?;
    Ok((extents, written))
}

/// Whether two files hold the same bytes (holes read as zeros).
pub fn same_contents(a: &Path, b: &Path) -> Res<bool> {
    let (fa, fb) = (
        File::open(a).ctx(|| format!("open {}", a.display()))?,
        File::open(b).ctx(|| format!("open {}", b.display()))?,
    );
    let (la, lb) = (
        fa.metadata().map(|m| m.len()).unwrap_or(0),
        fb.metadata().map(|m| m.len()).unwrap_or(1),
    );
    if la != lb {
        return Ok(false);
    }
    let (mut ra, mut rb) = (
        BufReader::with_capacity(4 << 20, fa),
        BufReader::with_capacity(4 << 20, fb),
    );
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let n = ra.read(&mut ba).ctx(|| format!("read {}", a.display()))?;
        if n == 0 {
            return Ok(true);
        }
        rb.read_exact(&mut bb[..n])
            .ctx(|| format!("read {}", b.display()))?;
        if ba[..n] != bb[..n] {
            return Ok(false);
        }
    }
}

/// Waits until `path` exists.
pub fn wait_for_path(path: &Path, timeout: Duration) -> Res<()> {
    let deadline = Instant::now() + timeout;
    while !path.exists() {
        if Instant::now() >= deadline {
            fail!("{} did not appear within {timeout:?}", path.display());
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(())
}

/// A child process killed (by its own pid) and reaped when dropped.
pub struct Guard {
    pub child: Option<Child>,
}

impl Guard {
    pub fn spawn(cmd: &mut Command, name: &str) -> Res<Guard> {
        let child = cmd.spawn().ctx(|| format!("start {name}: {cmd:?}"))?;
        Ok(Guard { child: Some(child) })
    }
    pub fn child(&mut self) -> &mut Child {
        self.child.as_mut().expect("child present")
    }
    /// Waits up to `timeout` for it to exit by itself, then kills it.
    pub fn finish(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        if let Some(child) = self.child.as_mut() {
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    self.child = None;
                    return;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        self.kill();
    }
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Reads lines from a child's stdout in a thread, each stamped on arrival.
pub fn line_reader<R: Read + Send + 'static>(
    input: R,
) -> std::sync::mpsc::Receiver<(Instant, String)> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(input);
        let mut line = String::new();
        loop {
            line.clear();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {
                    if tx
                        .send((Instant::now(), line.trim_end().to_string()))
                        .is_err()
                    {
                        return;
                    }
                }
            }
        }
    });
    rx
}

pub fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// Seconds between two instants, `b` after `a` (0 otherwise).
pub fn between(a: Instant, b: Instant) -> f64 {
    b.saturating_duration_since(a).as_secs_f64()
}

/// What the report says about the machine.
#[derive(Debug, Clone)]
pub struct Machine {
    pub fs_type: String,
    pub fs_device: String,
    pub mount_point: String,
    pub mount_options: String,
    pub kernel: String,
    pub cores: usize,
    pub cpu: String,
    pub memory: String,
    pub disk: String,
    pub qemu: String,
    pub rustc: String,
    pub commit: String,
    pub date: String,
}

/// The mount that holds `dir`, from /proc/self/mounts (longest prefix).
fn mount_of(dir: &Path) -> (String, String, String, String) {
    let canonical = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let mut best: Option<(usize, Vec<String>)> = None;
    for line in mounts.lines() {
        let fields: Vec<String> = line.split_whitespace().map(|s| s.to_string()).collect();
        if fields.len() < 4 {
            continue;
        }
        let point = Path::new(&fields[1]);
        if canonical.starts_with(point) {
            let len = fields[1].len();
            if best.as_ref().is_none_or(|(l, _)| len >= *l) {
                best = Some((len, fields));
            }
        }
    }
    match best {
        Some((_, f)) => (f[2].clone(), f[0].clone(), f[1].clone(), f[3].clone()),
        None => ("unknown".into(), "?".into(), "?".into(), "?".into()),
    }
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or("").trim().to_string()
}

pub fn machine(work: &Path, root: &Path) -> Machine {
    let (fs_type, fs_device, mount_point, mount_options) = mount_of(work);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| "?".into());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let memory = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<u64>().ok())
        .map(|kb| format!("{:.1} GiB", kb as f64 / (1u64 << 20) as f64))
        .unwrap_or_else(|| "?".into());
    // The block device under the file system: its name and whether it spins.
    let dev_name = fs_device.trim_start_matches("/dev/").to_string();
    let base: String = dev_name
        .trim_end_matches(|c: char| c.is_ascii_digit())
        .to_string();
    let disk = ["queue/rotational", "device/model"]
        .iter()
        .map(|f| {
            let mut p = PathBuf::from("/sys/block").join(&dev_name).join(f);
            if !p.exists() {
                p = PathBuf::from("/sys/block").join(&base).join(f);
            }
            std::fs::read_to_string(p)
                .map(|s| s.trim().to_string())
                .unwrap_or_default()
        })
        .collect::<Vec<_>>();
    let disk = format!(
        "{} ({}{})",
        fs_device,
        match disk[0].as_str() {
            "0" => "sysfs: rotational=0",
            "1" => "sysfs: rotational=1",
            _ => "sysfs: rotational unknown",
        },
        if disk[1].is_empty() {
            String::new()
        } else {
            format!(", {}", disk[1])
        }
    );
    let qemu = Command::new("qemu-img")
        .arg("--version")
        .output()
        .map(|o| first_line(&String::from_utf8_lossy(&o.stdout)))
        .unwrap_or_else(|_| "?".into());
    let rustc = Command::new("rustc")
        .arg("--version")
        .output()
        .map(|o| first_line(&String::from_utf8_lossy(&o.stdout)))
        .unwrap_or_else(|_| "?".into());
    let commit = Command::new("git")
        .args(["-C"])
        .arg(root)
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .map(|o| first_line(&String::from_utf8_lossy(&o.stdout)))
        .unwrap_or_else(|_| "?".into());
    let dirty = Command::new("git")
        .args(["-C"])
        .arg(root)
        .args([
            "status",
            "--porcelain",
            "--untracked-files=no",
            "--",
            "src",
            "Cargo.toml",
        ])
        .output()
        .map(|o| !o.stdout.is_empty())
        .unwrap_or(false);
    let commit = if dirty {
        format!("{commit} + uncommitted changes under src/")
    } else {
        commit
    };
    let date = Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| first_line(&String::from_utf8_lossy(&o.stdout)))
        .unwrap_or_else(|_| "?".into());
    Machine {
        fs_type,
        fs_device,
        mount_point,
        mount_options,
        kernel,
        cores,
        cpu,
        memory,
        disk,
        qemu,
        rustc,
        commit,
        date,
    }
}

/// Writes `text` to `path` through a temporary file and a rename.
pub fn write_file(path: &Path, text: &str) -> Res<()> {
    let tmp = path.with_extension("tmp-bench");
    let mut f = File::create(&tmp).ctx(|| format!("create {}", tmp.display()))?;
    f.write_all(text.as_bytes())
        .ctx(|| format!("write {}", tmp.display()))?;
    f.sync_all().ctx(|| format!("fsync {}", tmp.display()))?;
    std::fs::rename(&tmp, path).ctx(|| format!("rename to {}", path.display()))
}
