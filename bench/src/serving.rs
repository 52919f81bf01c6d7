//! Scenario 4: NBD serving with no copy running: `qemu-img bench` against
//! `copyctl serve` (restarted on a completed journal, so it serves the
//! image itself) and against `qemu-nbd` on the same file.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::report::Better;
use crate::util::run as run_cmd;
use crate::util::{Context, Guard, MIB, Res, line_reader, remove, remove_journal, wait_for_path};
use crate::{Ctx, human};

/// A running `copyctl serve`.
pub struct Serve {
    pub guard: Guard,
    pub nbd: PathBuf,
    pub control: PathBuf,
    /// When it was spawned.
    pub spawned: Instant,
    /// Its "serving" line.
    pub serving: Value,
    _stdout: Receiver<(Instant, String)>,
}

impl Serve {
    pub fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.nbd.display())
    }
}

/// Starts `copyctl serve` and waits for its "serving" line.
pub fn start_serve(ctx: &Ctx, journal: &Path, src: &Path, dst: &Path, tag: &str) -> Res<Serve> {
    start_serve_in(ctx, None, journal, src, dst, tag)
}

/// The same, in a network namespace (`ip netns exec NS`) when one is
/// given; `src` and `dst` may be NBD URIs.
pub fn start_serve_in(
    ctx: &Ctx,
    netns: Option<&str>,
    journal: &Path,
    src: &Path,
    dst: &Path,
    tag: &str,
) -> Res<Serve> {
    start_serve_with(ctx, netns, journal, src, dst, tag, &[])
}

/// The same, with `extra` options for `copyctl serve` (e.g. `--tcp`).
pub fn start_serve_with(
    ctx: &Ctx,
    netns: Option<&str>,
    journal: &Path,
    src: &Path,
    dst: &Path,
    tag: &str,
    extra: &[String],
) -> Res<Serve> {
    let nbd = ctx.path(&format!("{tag}.nbd"));
    let control = ctx.path(&format!("{tag}.ctl"));
    remove(&nbd)?;
    remove(&control)?;
    let log = std::fs::File::create(ctx.path(&format!("{tag}-serve.log"))).ctx(|| "log".into())?;
    let mut cmd = crate::util::command_in(netns, &ctx.copyctl);
    cmd.args(["--output", "json", "serve"])
        .args(&ctx.tuning)
        .arg("--journal")
        .arg(journal)
        .arg("--source")
        .arg(src)
        .arg("--dest")
        .arg(dst)
        .arg("--socket")
        .arg(&nbd)
        .arg("--control")
        .arg(&control)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log);
    let spawned = Instant::now();
    let mut guard = Guard::spawn(&mut cmd, "copyctl serve")?;
    let stdout = line_reader(guard.child().stdout.take().expect("piped"));
    // The JSON may span several lines: read until it parses.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut text = String::new();
    let serving = loop {
        match stdout.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok((_, line)) => {
                text.push_str(&line);
                text.push('\n');
                if let Ok(v) = serde_json::from_str::<Value>(&text) {
                    break v;
                }
            }
            Err(_) => {
                guard.kill();
                let log = std::fs::read_to_string(ctx.path(&format!("{tag}-serve.log")))
                    .unwrap_or_default();
                fail!("copyctl serve did not start (it printed {text:?}): {log}");
            }
        }
    };
    Ok(Serve {
        guard,
        nbd,
        control,
        spawned,
        serving,
        _stdout: stdout,
    })
}

/// Starts qemu-nbd on `image`.
fn start_qemu_nbd(ctx: &Ctx, image: &Path) -> Res<(Guard, String)> {
    let sock = ctx.path("qemu-nbd.sock");
    remove(&sock)?;
    let log = std::fs::File::create(ctx.path("qemu-nbd.log")).ctx(|| "log".into())?;
    let mut cmd = Command::new("qemu-nbd");
    cmd.args([
        "-f",
        "raw",
        "--persistent",
        "--cache=writeback",
        "--aio=threads",
        "-k",
    ])
    .arg(&sock)
    .arg(image)
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(log);
    let guard = Guard::spawn(&mut cmd, "qemu-nbd")?;
    wait_for_path(&sock, Duration::from_secs(10))?;
    Ok((guard, format!("nbd+unix:///?socket={}", sock.display())))
}

/// One `qemu-img bench`; returns MiB/s by qemu-img's own clock.
fn bench(uri: &str, write: bool, size: u64, count: u64) -> Res<f64> {
    bench_on(&["-f".into(), "raw".into()], uri, write, size, count)
}

/// One `qemu-img bench` with `how` (the format, or `--object ...
/// --image-opts`) before the image `name`; MiB/s by qemu-img's own clock.
pub fn bench_on(how: &[String], name: &str, write: bool, size: u64, count: u64) -> Res<f64> {
    let mut cmd = Command::new("qemu-img");
    cmd.arg("bench")
        .args(how)
        .args(["-d", "16"])
        .arg("-c")
        .arg(count.to_string())
        .arg("-s")
        .arg(size.to_string());
    if write {
        cmd.args(["-w", "--pattern=90"]);
    }
    cmd.arg(name);
    let out = run_cmd(&mut cmd)?;
    let text = String::from_utf8_lossy(&out.stdout);
    let seconds: f64 = text
        .split("Run completed in ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("no time in qemu-img bench output {text:?}"))?;
    Ok((count * size) as f64 / MIB as f64 / seconds)
}

/// A copy of the full image whose journal is completed, so `copyctl serve`
/// on it serves the image itself: (source, image, journal).
pub fn completed_copy(ctx: &Ctx, tag: &str) -> Res<(PathBuf, PathBuf, PathBuf)> {
    let src = ctx.full_image();
    let image = ctx.path(&format!("{tag}.raw"));
    let journal = ctx.path(&format!("{tag}.journal"));
    remove(&image)?;
    remove_journal(&journal)?;
    run_cmd(
        Command::new(&ctx.copyctl)
            .args(["--output", "json", "copy", "--journal"])
            .arg(&journal)
            .arg(&src)
            .arg(&image),
    )?;
    crate::util::sync_everything()?;
    Ok((src, image, journal))
}

/// The four `qemu-img bench` cases of scenarios 4 and 9: (key suffix, what,
/// write, request size, count).
pub fn cases(ctx: &Ctx) -> [(&'static str, &'static str, bool, u64, u64); 4] {
    let s = &ctx.sizes;
    [
        ("read4k", "4 KiB reads", false, 4096, s.nbd_4k_reads),
        ("write4k", "4 KiB writes", true, 4096, s.nbd_4k_writes),
        ("read64k", "64 KiB reads", false, 65536, s.nbd_64k),
        ("write64k", "64 KiB writes", true, 65536, s.nbd_64k),
    ]
}

pub fn run(ctx: &mut Ctx) -> Res<()> {
    let (src, image, journal) = completed_copy(ctx, "nbd")?;
    let size = std::fs::metadata(&image).ctx(|| "stat".into())?.len();
    let s = &ctx.sizes;
    let cases: [(&str, &str, bool, u64, u64); 4] = [
        ("nbd.read4k", "4 KiB reads", false, 4096, s.nbd_4k_reads),
        ("nbd.write4k", "4 KiB writes", true, 4096, s.nbd_4k_writes),
        ("nbd.read64k", "64 KiB reads", false, 65536, s.nbd_64k),
        ("nbd.write64k", "64 KiB writes", true, 65536, s.nbd_64k),
    ];
    let mut ours: Vec<Vec<f64>> = vec![vec![]; cases.len()];
    let mut peer: Vec<Vec<f64>> = vec![vec![]; cases.len()];
    for rep in 0..ctx.reps {
        // Alternate who goes first.
        for turn in 0..2 {
            let serve_ours = (rep + turn) % 2 == 0;
            let (mut guard, uri, into) = if serve_ours {
                let serve = start_serve(ctx, &journal, &src, &image, "nbd")?;
                if serve.serving["phase"] != "completed" {
                    fail!("serve on a completed journal says {}", serve.serving);
                }
                let uri = serve.uri();
                (serve.guard, uri, &mut ours)
            } else {
                let (g, uri) = start_qemu_nbd(ctx, &image)?;
                (g, uri, &mut peer)
            };
            for (i, (_, what, write, bs, count)) in cases.iter().enumerate() {
                let mib_s = bench(&uri, *write, *bs, *count)?;
                eprintln!(
                    "   rep {rep}: {} {what}: {mib_s:.1} MiB/s",
                    if serve_ours {
                        "copyctl serve"
                    } else {
                        "qemu-nbd"
                    }
                );
                into[i].push(mib_s);
            }
            guard.kill();
        }
    }
    let section = format!("4 NBD, {} image", human(size));
    for (i, (key, what, _, _, count)) in cases.iter().enumerate() {
        ctx.report.row(
            key,
            &section,
            &format!("`qemu-img bench` {what} ({count} requests, depth 16)"),
            "MiB/s",
            Better::Higher,
            ("copyctl serve", &ours[i]),
            ("qemu-nbd", &peer[i]),
        );
    }
    ctx.report.note(
        "4: qemu-img bench's default cache mode (writeback: no FUA on writes, no flush until the \
         final one on close); its own clock (\"Run completed in\"), which leaves out the connection",
    );
    Ok(())
}
