//! Scenario 3: a live copy under a guest write load: QEMU's blockdev-mirror
//! (write-blocking and background) on qemu-storage-daemon, driven over
//! QMP, against `copyctl serve`; the same qemu-io writer on each export.
//!
//! Per repetition: QEMU write-blocking, QEMU background and copyctl with
//! the writer running (each repetition starts with a different one); the
//! writer alone on copyctl's export
//! (restarted on the completed journal: the image itself, no copy) and on
//! qemu-storage-daemon's (no mirror job); then the three copies again with
//! no writer, for the no-load switch pause.
//!
//! - time to Ready: QEMU from sending `blockdev-mirror` to the
//!   BLOCK_JOB_READY event; copyctl from spawning `copyctl serve` (process
//!   start and journal creation included) to the `ready` event.
//! - writer throughput and latency during the copy: requests that finished
//!   between the copy's start (or the writer's first request, if later)
//!   and Ready.
//! - switch pause: QEMU from sending `job-complete` to BLOCK_JOB_COMPLETED;
//!   copyctl the `pause_ms` its `switch` reports (new guest requests held
//!   until released). Also, for both, the longest writer request that was
//!   running at any moment of the switch: the pause as the guest felt it.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::qmp::{Events, Qmp, control};
use crate::report::Better;
use crate::serving::start_serve;
use crate::util::{
    Context, Guard, Res, create_sparse, median, remove, remove_journal, sync_everything,
    wait_for_path,
};
use crate::writer::{self, Op, Window, Writer};
use crate::{Ctx, human};

/// Requests the writer completes before a QEMU copy starts.
pub(crate) const WARM_OPS: u64 = 50;
/// How long the writer goes on after a switch (so the switch is inside its run).
pub(crate) const AFTER_SWITCH: Duration = Duration::from_millis(300);

#[derive(Debug, Clone, Default)]
pub(crate) struct LiveRun {
    pub ready_s: f64,
    pub window: Option<Window>,
    pub plain: Option<Window>,
    pub fua: Option<Window>,
    /// Every request's latency in the window, ms.
    pub latencies: Vec<f64>,
    pub pause_ms: f64,
    /// From sending the switch (job-complete) to its answer (completion).
    pub command_ms: f64,
    pub felt_ms: f64,
    pub writer_errors: usize,
}

struct Qsd {
    guard: Guard,
    qmp: Qmp,
    nbd: PathBuf,
}

impl Qsd {
    fn uri(&self) -> String {
        format!("nbd+unix:///src?socket={}", self.nbd.display())
    }
    fn quit(mut self) {
        self.qmp.quit();
        self.guard.finish(Duration::from_secs(5));
    }
}

fn start_qsd(ctx: &Ctx, src: &Path, dst: Option<&Path>) -> Res<Qsd> {
    let nbd = ctx.path("qsd.nbd");
    let qmp_path = ctx.path("qsd.qmp");
    remove(&nbd)?;
    remove(&qmp_path)?;
    let log = std::fs::File::create(ctx.path("qsd.log")).ctx(|| "log".into())?;
    let mut cmd = Command::new("qemu-storage-daemon");
    cmd.arg("--blockdev").arg(format!(
        "driver=file,filename={},node-name=src",
        src.display()
    ));
    if let Some(dst) = dst {
        cmd.arg("--blockdev").arg(format!(
            "driver=file,filename={},node-name=dst",
            dst.display()
        ));
    }
    cmd.arg("--nbd-server")
        .arg(format!("addr.type=unix,addr.path={}", nbd.display()))
        .arg("--export")
        .arg("type=nbd,id=exp,node-name=src,writable=on")
        .arg("--chardev")
        .arg(format!(
            "socket,path={},server=on,wait=off,id=qmp",
            qmp_path.display()
        ))
        .arg("--monitor")
        .arg("chardev=qmp")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    let guard = Guard::spawn(&mut cmd, "qemu-storage-daemon")?;
    wait_for_path(&qmp_path, Duration::from_secs(10))?;
    let qmp = Qmp::connect(&qmp_path, Duration::from_secs(10))?;
    wait_for_path(&nbd, Duration::from_secs(10))?;
    Ok(Qsd { guard, qmp, nbd })
}

pub(crate) fn ready_timeout(ctx: &Ctx) -> Duration {
    Duration::from_secs(if ctx.quick { 30 } else { 90 })
}

/// The writer's figures over the copy: from `from` (or its first request,
/// if later) to `to`.
pub(crate) fn copy_windows(
    ops: &[Op],
    from: Instant,
    to: Instant,
) -> (Window, Window, Window, Vec<f64>) {
    let start = ops.first().map(|o| o.at.max(from)).unwrap_or(from);
    let latencies = ops
        .iter()
        .filter(|o| o.at >= start && o.at <= to)
        .map(|o| o.latency * 1e3)
        .collect();
    let plain: Vec<Op> = ops.iter().filter(|o| !o.fua).copied().collect();
    let fua: Vec<Op> = ops.iter().filter(|o| o.fua).copied().collect();
    (
        writer::window(ops, start, to),
        writer::window(&plain, start, to),
        writer::window(&fua, start, to),
        latencies,
    )
}

fn qemu_live(ctx: &mut Ctx, mode: &str, with_writer: bool, seed: u64) -> Res<LiveRun> {
    let src = ctx.full_image();
    let size = ctx.sizes.live;
    let dst = ctx.path("live-dst-qemu.raw");
    create_sparse(&dst, std::fs::metadata(&src).ctx(|| "stat".into())?.len())?;
    sync_everything()?;
    let mut q = start_qsd(ctx, &src, Some(&dst))?;
    let mut w = if with_writer {
        let mut w = Writer::start(&q.uri(), size, seed)?;
        w.wait_ops(WARM_OPS, Duration::from_secs(20))?;
        Some(w)
    } else {
        None
    };
    let t = Duration::from_secs(10);
    let (t0, _) = q.qmp.execute(
        json!({"execute": "blockdev-mirror", "arguments": {
            "job-id": "m", "device": "src", "target": "dst", "sync": "full", "copy-mode": mode}}),
        t,
    )?;
    let t_ready = match q.qmp.wait_event("BLOCK_JOB_READY", ready_timeout(ctx)) {
        Ok((at, _)) => at,
        Err(e) => {
            ctx.report.note(format!(
                "3: QEMU {mode}{} did not reach Ready: {e}; the run counts as missing",
                if with_writer { " under the writer" } else { "" }
            ));
            let _ = q.qmp.execute(
                json!({"execute": "block-job-cancel", "arguments": {"device": "m", "force": true}}),
                t,
            );
            if let Some(w) = w.take() {
                let _ = w.stop();
            }
            q.quit();
            return Ok(LiveRun {
                ready_s: f64::NAN,
                pause_ms: f64::NAN,
                command_ms: f64::NAN,
                felt_ms: f64::NAN,
                ..LiveRun::default()
            });
        }
    };
    let (t_sent, _) = q.qmp.execute(
        json!({"execute": "job-complete", "arguments": {"id": "m"}}),
        t,
    )?;
    let (t_done, done) = q
        .qmp
        .wait_event("BLOCK_JOB_COMPLETED", Duration::from_secs(120))?;
    if done["data"].get("error").is_some() {
        fail!("QEMU's mirror failed: {done}");
    }
    let mut run = LiveRun {
        ready_s: crate::util::between(t0, t_ready),
        pause_ms: crate::util::between(t_sent, t_done) * 1e3,
        command_ms: crate::util::between(t_sent, t_done) * 1e3,
        felt_ms: f64::NAN,
        ..LiveRun::default()
    };
    if let Some(w) = w.take() {
        std::thread::sleep(AFTER_SWITCH);
        let (ops, errors) = w.stop()?;
        let (all, plain, fua, latencies) = copy_windows(&ops, t0, t_ready);
        run.latencies = latencies;
        run.window = Some(all);
        run.plain = Some(plain);
        run.fua = Some(fua);
        run.felt_ms = writer::longest_across(&ops, t_sent, t_done);
        run.writer_errors = errors.len();
        if !errors.is_empty() {
            ctx.report.note(format!(
                "3: the writer on QEMU {mode} reported: {}",
                errors.join("; ")
            ));
        }
    }
    q.quit();
    Ok(run)
}

pub(crate) fn ours_live(ctx: &mut Ctx, with_writer: bool, seed: u64) -> Res<LiveRun> {
    let src = ctx.full_image();
    let size = ctx.sizes.live;
    let dst = ctx.path("live-dst.raw");
    let journal = ctx.path("live.journal");
    remove(&dst)?;
    remove_journal(&journal)?;
    sync_everything()?;
    let t = Duration::from_secs(10);
    let mut serve = start_serve(ctx, &journal, &src, &dst, "live")?;
    let t0 = serve.spawned;
    let mut events = Events::subscribe(&serve.control, t)?;
    let (status_at, status) = control(&serve.control, "status", t)?;
    let already = status["phase"] != "copying";
    let mut w = if with_writer {
        let mut w = Writer::start(&serve.uri(), size, seed)?;
        w.wait_ops(1, Duration::from_secs(20))?;
        Some(w)
    } else {
        None
    };
    let t_ready = if already {
        ctx.report.note(format!(
            "3: copyctl was {} before the bench could subscribe; its time to Ready is an upper bound",
            status["phase"]
        ));
        status_at
    } else {
        events.wait("ready", ready_timeout(ctx))?.0
    };
    let t_sent = Instant::now();
    let (t_done, switched) = control(&serve.control, "switch", Duration::from_secs(120))?;
    let pause_ms = switched["pause_ms"]
        .as_f64()
        .ok_or_else(|| format!("switch said {switched}"))?;
    control(&serve.control, "complete", Duration::from_secs(120))?;
    let mut run = LiveRun {
        ready_s: crate::util::between(t0, t_ready),
        pause_ms,
        command_ms: crate::util::between(t_sent, t_done) * 1e3,
        felt_ms: f64::NAN,
        ..LiveRun::default()
    };
    if let Some(w) = w.take() {
        std::thread::sleep(AFTER_SWITCH);
        let (ops, errors) = w.stop()?;
        let (all, plain, fua, latencies) = copy_windows(&ops, t0, t_ready);
        run.latencies = latencies;
        run.window = Some(all);
        run.plain = Some(plain);
        run.fua = Some(fua);
        run.felt_ms = writer::longest_across(&ops, t_sent, t_done);
        run.writer_errors = errors.len();
        if !errors.is_empty() {
            ctx.report.note(format!(
                "3: the writer on copyctl reported: {}",
                errors.join("; ")
            ));
        }
    }
    serve.guard.kill();
    Ok(run)
}

/// The writer alone for a few seconds on an export with no copy running.
type Windows = (Window, Window, Window, Vec<f64>);

fn unloaded(ctx: &Ctx, uri: &str, seed: u64) -> Res<Windows> {
    let mut w = Writer::start(uri, ctx.sizes.live, seed)?;
    w.wait_ops(20, Duration::from_secs(20))?;
    let from = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(ctx.sizes.writer_seconds));
    let to = Instant::now();
    let (ops, errors) = w.stop()?;
    if !errors.is_empty() {
        fail!("the unloaded writer reported: {}", errors.join("; "));
    }
    Ok(copy_windows(&ops, from, to))
}

fn ours_unloaded(ctx: &Ctx, seed: u64) -> Res<Windows> {
    let (src, dst, journal) = (
        ctx.full_image(),
        ctx.path("live-dst.raw"),
        ctx.path("live.journal"),
    );
    sync_everything()?;
    let mut serve = start_serve(ctx, &journal, &src, &dst, "live-idle")?;
    if serve.serving["phase"] != "completed" {
        fail!("serve on the completed live journal says {}", serve.serving);
    }
    let result = unloaded(ctx, &serve.uri(), seed);
    serve.guard.kill();
    result
}

fn qemu_unloaded(ctx: &Ctx, seed: u64) -> Res<Windows> {
    sync_everything()?;
    let q = start_qsd(ctx, &ctx.full_image(), None)?;
    let result = unloaded(ctx, &q.uri(), seed);
    q.quit();
    result
}

#[derive(Default)]
pub(crate) struct Series {
    pub ready: Vec<f64>,
    pub tput: Vec<f64>,
    pub p50: Vec<f64>,
    pub p99: Vec<f64>,
    pub plain_p99: Vec<f64>,
    /// Every request's latency, all runs together.
    pub pooled: Vec<f64>,
    pub fua_p50: Vec<f64>,
    pub pause: Vec<f64>,
    pub command: Vec<f64>,
    pub felt: Vec<f64>,
    pub raw: Vec<Value>,
}

pub(crate) fn push(v: &mut Vec<f64>, x: f64) {
    if x.is_finite() {
        v.push(x);
    }
}

impl Series {
    pub(crate) fn add(&mut self, r: &LiveRun) {
        push(&mut self.ready, r.ready_s);
        push(&mut self.pause, r.pause_ms);
        push(&mut self.felt, r.felt_ms);
        push(&mut self.command, r.command_ms);
        self.pooled.extend(&r.latencies);
        if let Some(w) = r.window {
            push(&mut self.tput, w.mib_s);
            push(&mut self.p50, w.p50_ms);
            push(&mut self.p99, w.p99_ms);
        }
        if let Some(w) = r.plain {
            push(&mut self.plain_p99, w.p99_ms);
        }
        if let Some(w) = r.fua {
            push(&mut self.fua_p50, w.p50_ms);
        }
        self.raw.push(json!({
            "ready_s": r.ready_s, "pause_ms": r.pause_ms, "command_ms": r.command_ms, "felt_ms": r.felt_ms,
            "writer": r.window.map(|w| format!("{w:?}")),
            "plain": r.plain.map(|w| format!("{w:?}")),
            "fua": r.fua.map(|w| format!("{w:?}")),
            "writer_errors": r.writer_errors,
        }));
    }
    fn add_window(&mut self, (all, plain, fua, latencies): (Window, Window, Window, Vec<f64>)) {
        self.pooled.extend(latencies);
        push(&mut self.tput, all.mib_s);
        push(&mut self.p50, all.p50_ms);
        push(&mut self.p99, all.p99_ms);
        push(&mut self.plain_p99, plain.p99_ms);
        push(&mut self.fua_p50, fua.p50_ms);
        self.raw.push(json!({"writer": format!("{all:?}"), "plain": format!("{plain:?}"), "fua": format!("{fua:?}")}));
    }
}

pub fn run(ctx: &mut Ctx) -> Res<()> {
    let src_size = std::fs::metadata(ctx.full_image())
        .ctx(|| "stat".into())?
        .len();
    if src_size != ctx.sizes.live {
        fail!(
            "the live image is {src_size} bytes, expected {}",
            ctx.sizes.live
        );
    }
    let (mut wb, mut bg, mut us) = (Series::default(), Series::default(), Series::default());
    let (mut idle_us, mut idle_q) = (Series::default(), Series::default());
    let (mut nwb, mut nbg, mut nus) = (Series::default(), Series::default(), Series::default());
    for rep in 0..ctx.reps {
        let seed = 100 + rep as u64;
        // Each repetition starts with a different engine.
        for k in 0..3 {
            match (rep + k) % 3 {
                0 => {
                    let r = qemu_live(ctx, "write-blocking", true, seed)?;
                    eprintln!("   rep {rep}: QEMU write-blocking: {}", show(&r));
                    wb.add(&r);
                }
                1 => {
                    let r = qemu_live(ctx, "background", true, seed)?;
                    eprintln!("   rep {rep}: QEMU background:     {}", show(&r));
                    bg.add(&r);
                }
                _ => {
                    let r = ours_live(ctx, true, seed)?;
                    eprintln!("   rep {rep}: copyctl serve:       {}", show(&r));
                    us.add(&r);
                }
            }
        }
        let w = ours_unloaded(ctx, seed)?;
        eprintln!(
            "   rep {rep}: writer alone on copyctl serve: {}",
            show_window(&w.0)
        );
        idle_us.add_window(w);
        let w = qemu_unloaded(ctx, seed)?;
        eprintln!(
            "   rep {rep}: writer alone on qemu-storage-daemon: {}",
            show_window(&w.0)
        );
        idle_q.add_window(w);
        for (name, series, run) in [
            ("QEMU write-blocking", &mut nwb, 0),
            ("QEMU background", &mut nbg, 1),
            ("copyctl serve", &mut nus, 2),
        ] {
            let r = match run {
                0 => qemu_live(ctx, "write-blocking", false, seed)?,
                1 => qemu_live(ctx, "background", false, seed)?,
                _ => ours_live(ctx, false, seed)?,
            };
            eprintln!(
                "   rep {rep}: {name}, no writer: ready {:.3} s, switch pause {:.2} ms",
                r.ready_s, r.pause_ms
            );
            series.add(&r);
        }
    }
    for p in [
        "live-dst.raw",
        "live-dst-qemu.raw",
        "qsd.nbd",
        "qsd.qmp",
        "live.nbd",
        "live.ctl",
        "live-idle.nbd",
        "live-idle.ctl",
    ] {
        remove(&ctx.path(p))?;
    }
    remove_journal(&ctx.path("live.journal"))?;

    let section = format!("3 live copy, {}", human(ctx.sizes.live));
    let ours = "copyctl serve";
    let (qwb, qbg) = ("QEMU write-blocking", "QEMU background");
    let r = &mut ctx.report;
    r.row(
        "live.ready.wb",
        &section,
        "time to Ready, writer running",
        "s",
        Better::Lower,
        (ours, &us.ready),
        (qwb, &wb.ready),
    );
    r.row(
        "live.ready.bg",
        &section,
        "time to Ready, writer running",
        "s",
        Better::Lower,
        (ours, &us.ready),
        (qbg, &bg.ready),
    );
    r.row(
        "live.tput.wb",
        &section,
        "writer throughput during the copy",
        "MiB/s",
        Better::Higher,
        (ours, &us.tput),
        (qwb, &wb.tput),
    );
    r.row(
        "live.tput.bg",
        &section,
        "writer throughput during the copy",
        "MiB/s",
        Better::Higher,
        (ours, &us.tput),
        (qbg, &bg.tput),
    );
    r.row(
        "live.p50.wb",
        &section,
        "writer p50 latency during the copy",
        "ms",
        Better::Lower,
        (ours, &us.p50),
        (qwb, &wb.p50),
    );
    r.row(
        "live.p99.wb",
        &section,
        "writer p99 latency during the copy",
        "ms",
        Better::Lower,
        (ours, &us.p99),
        (qwb, &wb.p99),
    );
    r.row(
        "live.p99.bg",
        &section,
        "writer p99 latency during the copy",
        "ms",
        Better::Lower,
        (ours, &us.p99),
        (qbg, &bg.p99),
    );
    let pooled = |s: &Series| vec![crate::util::percentile(&s.pooled, 99.0)];
    r.row(
        "live.pooledp99.wb",
        &section,
        "writer p99 latency during the copy, every request of every run pooled",
        "ms",
        Better::Lower,
        (ours, &pooled(&us)),
        (qwb, &pooled(&wb)),
    );
    r.row(
        "live.plainp99.wb",
        &section,
        "writer p99 latency during the copy, plain writes only",
        "ms",
        Better::Lower,
        (ours, &us.plain_p99),
        (qwb, &wb.plain_p99),
    );
    r.row(
        "live.fuap50.wb",
        &section,
        "writer p50 latency during the copy, FUA writes only",
        "ms",
        Better::Lower,
        (ours, &us.fua_p50),
        (qwb, &wb.fua_p50),
    );
    r.row(
        "live.pause.wb",
        &section,
        "switch pause, writer running",
        "ms",
        Better::Lower,
        (ours, &us.pause),
        (qwb, &wb.pause),
    );
    r.row(
        "live.pause.bg",
        &section,
        "switch pause, writer running",
        "ms",
        Better::Lower,
        (ours, &us.pause),
        (qbg, &bg.pause),
    );
    r.row(
        "live.command.wb",
        &section,
        "switch command, sent to answered, writer running (copyctl: its sync before the hold + the pause)",
        "ms",
        Better::Lower,
        (ours, &us.command),
        (qwb, &wb.command),
    );
    r.row(
        "live.felt.wb",
        &section,
        "longest writer request running at any moment of the switch command",
        "ms",
        Better::Lower,
        (ours, &us.felt),
        (qwb, &wb.felt),
    );
    r.row(
        "live.felt.bg",
        &section,
        "longest writer request running at any moment of the switch command",
        "ms",
        Better::Lower,
        (ours, &us.felt),
        (qbg, &bg.felt),
    );
    r.row(
        "live.pause_noload.wb",
        &section,
        "switch pause, no writer",
        "ms",
        Better::Lower,
        (ours, &nus.pause),
        (qwb, &nwb.pause),
    );
    r.row(
        "live.pause_noload.bg",
        &section,
        "switch pause, no writer",
        "ms",
        Better::Lower,
        (ours, &nus.pause),
        (qbg, &nbg.pause),
    );
    let bare: Vec<f64> = r
        .raw
        .get("journal.commit")
        .and_then(|v| v["peer"]["samples"].as_array().cloned())
        .unwrap_or_default()
        .iter()
        .filter_map(|v| v.as_f64())
        .collect();
    r.row(
        "live.pause_noload.sync",
        &section,
        "switch pause, no writer, vs one 4 KiB pwrite + fdatasync (scenario 5)",
        "ms",
        Better::Lower,
        (ours, &nus.pause),
        ("pwrite + fdatasync", &bare),
    );
    r.row(
        "live.ready_noload.wb",
        &section,
        "time to Ready, no writer",
        "s",
        Better::Lower,
        (ours, &nus.ready),
        (qwb, &nwb.ready),
    );
    r.row(
        "live.self.tput",
        &section,
        "writer throughput: during the copy vs alone on the same export",
        "MiB/s",
        Better::Higher,
        ("copyctl, during the copy", &us.tput),
        ("copyctl, no copy", &idle_us.tput),
    );
    r.row(
        "live.self.p99",
        &section,
        "writer p99 latency: during the copy vs alone on the same export",
        "ms",
        Better::Lower,
        ("copyctl, during the copy", &us.p99),
        ("copyctl, no copy", &idle_us.p99),
    );
    r.row(
        "live.self.pooledp99",
        &section,
        "writer p99 latency, every request pooled: during the copy vs alone on the same export",
        "ms",
        Better::Lower,
        ("copyctl, during the copy", &pooled(&us)),
        ("copyctl, no copy", &pooled(&idle_us)),
    );
    r.row(
        "live.qself.tput",
        &section,
        "writer throughput: QEMU write-blocking during the copy vs alone",
        "MiB/s",
        Better::Higher,
        ("QEMU, during the copy", &wb.tput),
        ("QEMU, no copy", &idle_q.tput),
    );
    r.row(
        "live.idle.tput",
        &section,
        "writer throughput alone, no copy",
        "MiB/s",
        Better::Higher,
        (ours, &idle_us.tput),
        ("qemu-storage-daemon", &idle_q.tput),
    );
    r.row(
        "live.idle.p99",
        &section,
        "writer p99 latency alone, no copy",
        "ms",
        Better::Lower,
        (ours, &idle_us.p99),
        ("qemu-storage-daemon", &idle_q.p99),
    );
    r.row(
        "live.idle.fuap50",
        &section,
        "writer p50 latency alone, FUA writes only",
        "ms",
        Better::Lower,
        (ours, &idle_us.fua_p50),
        ("qemu-storage-daemon", &idle_q.fua_p50),
    );
    for (k, s) in [
        ("wb", &wb),
        ("bg", &bg),
        ("ours", &us),
        ("idle_ours", &idle_us),
        ("idle_qemu", &idle_q),
        ("noload_wb", &nwb),
        ("noload_bg", &nbg),
        ("noload_ours", &nus),
    ] {
        r.raw
            .insert(format!("live.runs.{k}"), Value::from(s.raw.clone()));
    }
    r.note(format!(
        "3: the writer is one qemu-io (`-t writeback`) doing 64 KiB writes at random aligned offsets at queue depth 1, \
         every 16th with FUA; latency is qemu-io's own per-request figure. Medians of the per-run figures: \
         QEMU write-blocking copied in {:.2} s, background {:.2} s, copyctl {:.2} s",
        median(&wb.ready),
        median(&bg.ready),
        median(&us.ready)
    ));
    Ok(())
}

pub(crate) fn show(r: &LiveRun) -> String {
    format!(
        "ready {:.3} s, {}, switch pause {:.2} ms, longest request across it {:.1} ms",
        r.ready_s,
        r.window.as_ref().map(show_window).unwrap_or_default(),
        r.pause_ms,
        r.felt_ms
    )
}

pub(crate) fn show_window(w: &Window) -> String {
    format!(
        "writer {:.1} MiB/s ({} requests), p50 {:.2} ms, p99 {:.2} ms, max {:.1} ms",
        w.mib_s, w.ops, w.p50_ms, w.p99_ms, w.max_ms
    )
}
