//! Scenario 8: the live copy into an export on another "host": two network
//! namespaces joined by a veth pair, made by the harness and removed when
//! it is done (or fails).
//!
//! - Namespace A (10.214.0.1/30): `qemu-storage-daemon` exports a fresh
//!   sparse raw destination file over TCP (default cache modes), made anew
//!   for every measurement. In the "added latency" variant, an nbdkit
//!   proxy in A (`nbdkit --filter=delay nbd`) stands between the clients
//!   and that export and answers each read, write, zero, trim and block
//!   status request [`DELAY_MS`] ms later (this kernel has no netem; the
//!   delay filter cannot delay a flush).
//! - Namespace B (10.214.0.2/30): everything else, through `ip netns exec`:
//!   - QEMU: a `qemu-storage-daemon` on the source (exported over a Unix
//!     socket for the writer), `blockdev-add` of an nbd node on the export
//!     and `blockdev-mirror` (`sync=full`, `copy-mode=write-blocking`) into
//!     it, driven over QMP: the libvirt recipe for storage migration.
//!   - copyctl: `copyctl serve --source SRC --dest nbd://10.214.0.1:PORT/dst`.
//!   - the scenario 3 writer (64 KiB, queue depth 1, every 16th with FUA)
//!     on whichever serves the guest.
//!   - the plain copies: `copyctl copy`, `qemu-img convert -n -t none` and
//!     `nbdcopy --flush` (every one ends with a flush of the export).
//!
//! Time to Ready, writer throughput and switch pause are measured as in
//! scenario 3 (see live.rs); a plain copy is timed from spawn to exit.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::live::{AFTER_SWITCH, LiveRun, Series, WARM_OPS, copy_windows, ready_timeout, show};
use crate::qmp::{Events, Qmp, control};
use crate::report::Better;
use crate::serving::start_serve_with;
use crate::tls::Creds;
use crate::util::{
    Context, Guard, Res, between, command_in, create_sparse, median, remove, remove_journal,
    run_timed, same_contents, secs, sync_everything, wait_for_path,
};
use crate::writer::{self, Writer};
use crate::{Ctx, human};

const ADDR_A: &str = "10.214.0.1";
const ADDR_B: &str = "10.214.0.2";
const QSD_PORT: u16 = 10809;
const PROXY_PORT: u16 = 10810;
const EXPORT: &str = "dst";
/// The added latency of the second variant: every read, write, zero, trim
/// and block status request is answered this much later.
pub const DELAY_MS: u32 = 1;

/// Two network namespaces joined by a veth pair. Dropping it removes what
/// it made (the veth pair goes with the namespaces it lives in).
struct Netns {
    a: String,
    b: String,
    made: Vec<String>,
    /// The veth pair while its first end is still in the root namespace.
    loose_veth: Option<String>,
}

fn ip(args: &[&str]) -> Res<()> {
    crate::util::run(Command::new("ip").args(args)).map(drop)
}

impl Netns {
    fn create() -> Res<Netns> {
        // Unique per run: names and interfaces carry the harness's pid
        // (at most 15 characters, the limit of an interface name).
        let tag = format!("lcb{}", std::process::id());
        let mut ns = Netns {
            a: format!("{tag}a"),
            b: format!("{tag}b"),
            made: Vec::new(),
            loose_veth: None,
        };
        for name in [ns.a.clone(), ns.b.clone()] {
            ip(&["netns", "add", &name])?;
            ns.made.push(name);
        }
        let (va, vb) = (ns.a.clone(), ns.b.clone());
        ip(&["link", "add", &va, "type", "veth", "peer", "name", &vb])?;
        ns.loose_veth = Some(va.clone());
        ip(&["link", "set", &va, "netns", &ns.a])?;
        ns.loose_veth = None;
        ip(&["link", "set", &vb, "netns", &ns.b])?;
        for (name, dev, addr) in [(&ns.a, &va, ADDR_A), (&ns.b, &vb, ADDR_B)] {
            ip(&["-n", name, "addr", "add", &format!("{addr}/30"), "dev", dev])?;
            ip(&["-n", name, "link", "set", dev, "up"])?;
            ip(&["-n", name, "link", "set", "lo", "up"])?;
        }
        Ok(ns)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Some(veth) = self.loose_veth.take() {
            let _ = ip(&["link", "del", &veth]);
        }
        for name in self.made.drain(..).rev() {
            if let Err(e) = ip(&["netns", "del", &name]) {
                eprintln!("  could not remove network namespace {name}: {e}");
            }
        }
    }
}

/// qemu-storage-daemon with a QMP monitor on a Unix socket, in `netns`.
/// The monitor answers once every option has been set up (the NBD server
/// included), so the export is listening when this returns.
fn start_qsd(ctx: &Ctx, netns: &str, tag: &str, options: &[String]) -> Res<(Guard, Qmp)> {
    let qmp_path = ctx.path(&format!("{tag}.qmp"));
    remove(&qmp_path)?;
    let log_path = ctx.path(&format!("{tag}.log"));
    let log = File::create(&log_path).ctx(|| "log".into())?;
    let mut cmd = command_in(Some(netns), "qemu-storage-daemon");
    cmd.args(options)
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
    let qmp = wait_for_path(&qmp_path, Duration::from_secs(10))
        .and_then(|()| Qmp::connect(&qmp_path, Duration::from_secs(10)))
        .map_err(|e| {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            format!("qemu-storage-daemon ({tag}): {e} {log}")
        })?;
    Ok((guard, qmp))
}

/// The destination export in namespace A, on a fresh sparse file.
struct Export {
    proxy: Option<Guard>,
    qmp: Qmp,
    qsd: Guard,
    uri: String,
    port: u16,
}

impl Export {
    fn stop(mut self) {
        if let Some(mut proxy) = self.proxy.take() {
            proxy.kill();
        }
        self.qmp.quit();
        self.qsd.finish(Duration::from_secs(5));
    }
}

/// With `tls`, the export requires TLS with the server credentials
/// (client certificates verified, QEMU's default) and the address is
/// `nbds://`.
fn start_export(
    ctx: &Ctx,
    ns: &Netns,
    size: u64,
    delay: Option<u32>,
    tls: Option<&Creds>,
) -> Res<Export> {
    let dst = dst_path(ctx);
    create_sparse(&dst, size)?;
    let mut options: Vec<String> = Vec::new();
    let mut server_tls = String::new();
    if let Some(creds) = tls {
        options.push("--object".into());
        options.push(format!(
            "tls-creds-x509,id=tls0,endpoint=server,dir={}",
            creds.server.display()
        ));
        server_tls.push_str(",tls-creds=tls0");
    }
    options.extend([
        "--blockdev".into(),
        format!("driver=file,filename={},node-name=dst", dst.display()),
        "--nbd-server".into(),
        format!("addr.type=inet,addr.host={ADDR_A},addr.port={QSD_PORT}{server_tls}"),
        "--export".into(),
        format!("type=nbd,id=exp,node-name=dst,name={EXPORT},writable=on"),
    ]);
    let (qsd, qmp) = start_qsd(ctx, &ns.a, "remote-a", &options)?;
    let (proxy, port) = match delay {
        None => (None, QSD_PORT),
        Some(ms) => {
            let pid = ctx.path("remote-proxy.pid");
            remove(&pid)?;
            let log = File::create(ctx.path("remote-proxy.log")).ctx(|| "log".into())?;
            let mut cmd = command_in(Some(&ns.a), "nbdkit");
            cmd.args(["-f", "--exit-with-parent", "-i", ADDR_A, "-p"])
                .arg(PROXY_PORT.to_string())
                .arg("-P")
                .arg(&pid)
                .args(["--filter=delay", "nbd"])
                .arg(format!("hostname={ADDR_A}"))
                .arg(format!("port={QSD_PORT}"))
                .arg(format!("export={EXPORT}"));
            for op in ["read", "write", "zero", "trim", "extents"] {
                cmd.arg(format!("delay-{op}={ms}ms"));
            }
            cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(log);
            let guard = Guard::spawn(&mut cmd, "nbdkit")?;
            // nbdkit writes its pid file once it listens.
            wait_for_path(&pid, Duration::from_secs(10))?;
            (Some(guard), PROXY_PORT)
        }
    };
    Ok(Export {
        proxy,
        qmp,
        qsd,
        uri: format!(
            "{}://{ADDR_A}:{port}/{EXPORT}",
            if tls.is_some() { "nbds" } else { "nbd" }
        ),
        port,
    })
}

fn dst_path(ctx: &Ctx) -> PathBuf {
    ctx.path("remote-dst.raw")
}

fn src_size(ctx: &Ctx) -> Res<u64> {
    Ok(std::fs::metadata(ctx.full_image())
        .ctx(|| "stat".into())?
        .len())
}

fn missing_run() -> LiveRun {
    LiveRun {
        ready_s: f64::NAN,
        pause_ms: f64::NAN,
        command_ms: f64::NAN,
        felt_ms: f64::NAN,
        ..LiveRun::default()
    }
}

fn finish_writer(
    ctx: &mut Ctx,
    run: &mut LiveRun,
    w: Writer,
    t: [Instant; 4],
    who: &str,
) -> Res<()> {
    let [t0, t_ready, t_sent, t_done] = t;
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
            "8: the writer on {who} reported: {}",
            errors.join("; ")
        ));
    }
    Ok(())
}

/// QEMU's mirror from a source daemon in B into the export in A.
fn qemu_live(ctx: &mut Ctx, ns: &Netns, delay: Option<u32>, seed: u64) -> Res<LiveRun> {
    let size = src_size(ctx)?;
    let export = start_export(ctx, ns, size, delay, None)?;
    sync_everything()?;
    let nbd = ctx.path("remote-b.nbd");
    remove(&nbd)?;
    let (mut guard, mut qmp) = start_qsd(
        ctx,
        &ns.b,
        "remote-b",
        &[
            "--blockdev".into(),
            format!(
                "driver=file,filename={},node-name=src",
                ctx.full_image().display()
            ),
            "--nbd-server".into(),
            format!("addr.type=unix,addr.path={}", nbd.display()),
            "--export".into(),
            "type=nbd,id=exp,node-name=src,writable=on".into(),
        ],
    )?;
    wait_for_path(&nbd, Duration::from_secs(10))?;
    let t = Duration::from_secs(10);
    qmp.execute(
        json!({"execute": "blockdev-add", "arguments": {
            "driver": "nbd", "node-name": "dst", "export": EXPORT,
            "server": {"type": "inet", "host": ADDR_A, "port": export.port.to_string()}}}),
        t,
    )?;
    let uri = format!("nbd+unix:///src?socket={}", nbd.display());
    let mut w = Writer::start_in(Some(&ns.b), &uri, size, seed)?;
    w.wait_ops(WARM_OPS, Duration::from_secs(20))?;
    let (t0, _) = qmp.execute(
        json!({"execute": "blockdev-mirror", "arguments": {
            "job-id": "m", "device": "src", "target": "dst", "sync": "full",
            "copy-mode": "write-blocking"}}),
        t,
    )?;
    let t_ready = match qmp.wait_event("BLOCK_JOB_READY", ready_timeout(ctx)) {
        Ok((at, _)) => at,
        Err(e) => {
            ctx.report.note(format!(
                "8: QEMU write-blocking ({}) did not reach Ready: {e}; the run counts as missing",
                variant_name(delay)
            ));
            let _ = qmp.execute(
                json!({"execute": "block-job-cancel", "arguments": {"device": "m", "force": true}}),
                t,
            );
            let _ = w.stop();
            qmp.quit();
            guard.finish(Duration::from_secs(5));
            export.stop();
            return Ok(missing_run());
        }
    };
    let (t_sent, _) = qmp.execute(
        json!({"execute": "job-complete", "arguments": {"id": "m"}}),
        t,
    )?;
    let (t_done, done) = qmp.wait_event("BLOCK_JOB_COMPLETED", Duration::from_secs(120))?;
    if done["data"].get("error").is_some() {
        fail!("QEMU's mirror failed: {done}");
    }
    let mut run = LiveRun {
        ready_s: between(t0, t_ready),
        pause_ms: between(t_sent, t_done) * 1e3,
        command_ms: between(t_sent, t_done) * 1e3,
        felt_ms: f64::NAN,
        ..LiveRun::default()
    };
    finish_writer(
        ctx,
        &mut run,
        w,
        [t0, t_ready, t_sent, t_done],
        "QEMU write-blocking",
    )?;
    qmp.quit();
    guard.finish(Duration::from_secs(5));
    export.stop();
    Ok(run)
}

/// `copyctl serve` in B, its destination the export in A.
/// copyctl's options for reaching the export (`--tls-creds` with TLS).
fn client_tls(tls: Option<&Creds>) -> Vec<String> {
    tls.map(|creds| vec!["--tls-creds".into(), creds.client.display().to_string()])
        .unwrap_or_default()
}

fn ours_live(
    ctx: &mut Ctx,
    ns: &Netns,
    delay: Option<u32>,
    tls: Option<&Creds>,
    seed: u64,
) -> Res<LiveRun> {
    let size = src_size(ctx)?;
    let export = start_export(ctx, ns, size, delay, tls)?;
    let journal = ctx.path("remote-live.journal");
    remove_journal(&journal)?;
    sync_everything()?;
    let t = Duration::from_secs(10);
    let mut serve = start_serve_with(
        ctx,
        Some(&ns.b),
        &journal,
        &ctx.full_image(),
        Path::new(&export.uri),
        "remote-live",
        &client_tls(tls),
    )?;
    let t0 = serve.spawned;
    let mut events = Events::subscribe(&serve.control, t)?;
    let (status_at, status) = control(&serve.control, "status", t)?;
    let already = status["phase"] != "copying";
    let mut w = Writer::start_in(Some(&ns.b), &serve.uri(), size, seed)?;
    w.wait_ops(1, Duration::from_secs(20))?;
    let t_ready = if already {
        ctx.report.note(format!(
            "8: copyctl was {} before the bench could subscribe; its time to Ready is an upper bound",
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
        ready_s: between(t0, t_ready),
        pause_ms,
        command_ms: between(t_sent, t_done) * 1e3,
        felt_ms: f64::NAN,
        ..LiveRun::default()
    };
    finish_writer(
        ctx,
        &mut run,
        w,
        [t0, t_ready, t_sent, t_done],
        "copyctl serve",
    )?;
    serve.guard.kill();
    export.stop();
    Ok(run)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Tool {
    Ours,
    Convert,
    Nbdcopy,
}

/// What one plain copy took: wall seconds from spawn to exit, and the CPU
/// seconds of the copying process and of the export's qemu-storage-daemon
/// meanwhile (user and system, every thread).
struct CopyRun {
    wall: f64,
    cpu: f64,
    export_cpu: f64,
}

/// CPU seconds (user and system, all threads) `pid` has used so far.
fn cpu_of(pid: u32) -> Res<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ctx(|| format!("read /proc/{pid}/stat"))?;
    // The fields after the command name, which is in parentheses and may
    // hold spaces: utime and stime are the 12th and 13th after it.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .ok_or_else(|| format!("bad /proc/{pid}/stat: {stat:?}"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> Res<f64> {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .map(|t| t as f64)
            .ok_or_else(|| format!("bad /proc/{pid}/stat: {stat:?}"))
    };
    // USER_HZ: /proc counts in hundredths of a second on Linux.
    Ok((ticks(11)? + ticks(12)?) / 100.0)
}

/// One plain copy of the source into a fresh export, from spawn to exit.
/// `check`: compare the destination with the source afterwards.
fn plain_copy(
    ctx: &Ctx,
    ns: &Netns,
    delay: Option<u32>,
    tls: Option<&Creds>,
    tool: Tool,
    check: bool,
) -> Res<CopyRun> {
    let src = ctx.full_image();
    let mut export = start_export(ctx, ns, src_size(ctx)?, delay, tls)?;
    let journal = ctx.path("remote-copy.journal");
    remove_journal(&journal)?;
    sync_everything()?;
    let times = ctx.path("remote-copy.time");
    remove(&times)?;
    // `ip netns exec` execs the program: /usr/bin/time's child is the tool.
    let mut timed = Command::new("/usr/bin/time");
    timed.arg("-o").arg(&times).args(["-f", "%U %S"]);
    let mut cmd = match tool {
        Tool::Ours => {
            let mut c = command_in(Some(&ns.b), &ctx.copyctl);
            c.args(["--output", "json", "copy"])
                .args(&ctx.tuning)
                .args(client_tls(tls))
                .arg("--journal")
                .arg(&journal);
            c
        }
        Tool::Convert => {
            let mut c = command_in(Some(&ns.b), "qemu-img");
            c.args(["convert", "-n", "-t", "none", "-f", "raw", "-O", "raw"]);
            c
        }
        Tool::Nbdcopy => {
            let mut c = command_in(Some(&ns.b), "nbdcopy");
            c.arg("--flush");
            c
        }
    };
    match (tool, tls) {
        // libnbd takes the credentials in the URI.
        (Tool::Nbdcopy, Some(creds)) => cmd.arg(&src).arg(format!(
            "{}?tls-certificates={}",
            export.uri,
            creds.client.display()
        )),
        _ => cmd.arg(&src).arg(&export.uri),
    };
    timed.arg(cmd.get_program()).args(cmd.get_args());
    let export_pid = export.qsd.child().id();
    let before = cpu_of(export_pid)?;
    let result = run_timed(&mut timed);
    let after = cpu_of(export_pid);
    export.stop();
    let (t, _) = result?;
    let export_cpu = after? - before;
    let text = std::fs::read_to_string(&times).ctx(|| "read /usr/bin/time's output".into())?;
    let cpu = text
        .lines()
        .last()
        .and_then(|l| {
            let mut f = l.split_whitespace().map(|x| x.parse::<f64>().ok());
            Some(f.next()?? + f.next()??)
        })
        .ok_or_else(|| format!("bad /usr/bin/time output {text:?}"))?;
    remove(&times)?;
    if check && !same_contents(&src, &dst_path(ctx))? {
        fail!(
            "{} made a destination that differs from its source",
            tool_name(tool)
        );
    }
    Ok(CopyRun {
        wall: secs(t),
        cpu,
        export_cpu,
    })
}

fn tool_name(tool: Tool) -> &'static str {
    match tool {
        Tool::Ours => "copyctl copy",
        Tool::Convert => "`qemu-img convert -n -t none`",
        Tool::Nbdcopy => "`nbdcopy --flush`",
    }
}

fn variant_name(delay: Option<u32>) -> String {
    match delay {
        None => "no added latency".into(),
        Some(ms) => format!("+{ms} ms per request"),
    }
}

fn variant_key(delay: Option<u32>) -> &'static str {
    if delay.is_none() { "lan" } else { "delay" }
}

/// Why the scenario cannot run here, if it cannot.
fn unmet() -> Option<String> {
    let uid = Command::new("id").arg("-u").output().ok();
    if uid.is_none_or(|o| String::from_utf8_lossy(&o.stdout).trim() != "0") {
        return Some("it needs root (network namespaces)".into());
    }
    let missing: Vec<&str> = ["ip", "nbdkit", "nbdcopy", "qemu-storage-daemon"]
        .into_iter()
        .filter(|t| {
            Command::new("sh")
                .args(["-c", &format!("command -v {t}")])
                .stdout(Stdio::null())
                .status()
                .map(|s| !s.success())
                .unwrap_or(true)
        })
        .collect();
    (!missing.is_empty()).then(|| {
        format!(
            "missing {} (Debian: iproute2, nbdkit, libnbd-bin, qemu-utils)",
            missing.join(", ")
        )
    })
}

/// Part of scenario 9: what TLS costs the live copy into a remote export.
/// The same export as 8 (no added latency), once with TLS required
/// (`creds`, client certificates verified) and once in clear, alternating:
/// copyctl serve's time to Ready under the writer, and copyctl copy.
pub fn tls_cost(ctx: &mut Ctx, creds: &Creds) -> Res<()> {
    if let Some(why) = unmet() {
        ctx.report
            .note(format!("9: the live copy over TLS was skipped: {why}"));
        return Ok(());
    }
    let ns = Netns::create()?;
    // [clear, tls]
    let mut live: [Series; 2] = Default::default();
    let mut copies: [Vec<f64>; 2] = Default::default();
    // CPU seconds of copyctl copy, and of the export during it and during
    // nbdcopy: where TLS's cost lands.
    let mut copy_cpu: [Vec<f64>; 2] = Default::default();
    let mut export_cpu: [Vec<f64>; 2] = Default::default();
    let mut nbdcopy_export_cpu: [Vec<f64>; 2] = Default::default();
    // The same copy by libnbd's client: what TLS costs when the client
    // is not ours, the server's share of the ratio.
    let mut nbdcopies: [Vec<f64>; 2] = Default::default();
    for rep in 0..ctx.reps {
        for k in 0..2 {
            let i = (rep + k) % 2;
            let tls = (i == 1).then_some(creds);
            let what = if tls.is_some() { "TLS" } else { "clear" };
            let r = ours_live(ctx, &ns, None, tls, 900 + rep as u64)?;
            eprintln!("   rep {rep}: live copy, {what}: {}", show(&r));
            live[i].add(&r);
            let r = plain_copy(ctx, &ns, None, tls, Tool::Ours, rep == 0)?;
            eprintln!(
                "   rep {rep}: copyctl copy, {what}: {:.3} s (CPU {:.2} s, the export's {:.2} s)",
                r.wall, r.cpu, r.export_cpu
            );
            copies[i].push(r.wall);
            copy_cpu[i].push(r.cpu);
            export_cpu[i].push(r.export_cpu);
            let r = plain_copy(ctx, &ns, None, tls, Tool::Nbdcopy, rep == 0)?;
            eprintln!(
                "   rep {rep}: nbdcopy, {what}: {:.3} s (CPU {:.2} s, the export's {:.2} s)",
                r.wall, r.cpu, r.export_cpu
            );
            nbdcopies[i].push(r.wall);
            nbdcopy_export_cpu[i].push(r.export_cpu);
        }
    }
    drop(ns);
    for p in [
        "remote-dst.raw",
        "remote-a.qmp",
        "remote-live.nbd",
        "remote-live.ctl",
    ] {
        remove(&ctx.path(p))?;
    }
    remove_journal(&ctx.path("remote-live.journal"))?;
    remove_journal(&ctx.path("remote-copy.journal"))?;
    let section = format!(
        "9 live copy into a remote export over TLS, {}",
        human(src_size(ctx)?)
    );
    let (clear, tls) = (&live[0], &live[1]);
    let r = &mut ctx.report;
    r.row(
        "tls.live.ready",
        &section,
        "time to Ready, writer running",
        "s",
        Better::Lower,
        ("copyctl serve, TLS", &tls.ready),
        ("copyctl serve, clear", &clear.ready),
    );
    r.row(
        "tls.live.tput",
        &section,
        "writer throughput during the copy",
        "MiB/s",
        Better::Higher,
        ("copyctl serve, TLS", &tls.tput),
        ("copyctl serve, clear", &clear.tput),
    );
    r.row(
        "tls.copy",
        &section,
        "copyctl copy, wall time, flushed",
        "s",
        Better::Lower,
        ("TLS", &copies[1]),
        ("clear", &copies[0]),
    );
    r.row(
        "tls.copy.cpu",
        &section,
        "copyctl copy's CPU time (user + system)",
        "s",
        Better::Lower,
        ("TLS", &copy_cpu[1]),
        ("clear", &copy_cpu[0]),
    );
    r.row(
        "tls.copy.export",
        &section,
        "the export's CPU time during copyctl copy (qemu-storage-daemon, every thread)",
        "s",
        Better::Lower,
        ("TLS", &export_cpu[1]),
        ("clear", &export_cpu[0]),
    );
    r.row(
        "tls.nbdcopy",
        &section,
        "`nbdcopy --flush`, wall time, flushed",
        "s",
        Better::Lower,
        ("TLS", &nbdcopies[1]),
        ("clear", &nbdcopies[0]),
    );
    r.row(
        "tls.nbdcopy.export",
        &section,
        "the export's CPU time during `nbdcopy --flush`",
        "s",
        Better::Lower,
        ("TLS", &nbdcopy_export_cpu[1]),
        ("clear", &nbdcopy_export_cpu[0]),
    );
    r.note(format!(
        "9: the live copy over TLS uses scenario 8's namespaces and export (no added latency); \
         qemu-storage-daemon requires TLS with the same credentials (server certificate for \
         {ADDR_A}, client certificates verified) and copyctl reaches it as nbds:// with --tls-creds"
    ));
    Ok(())
}

/// Key, metric, unit, better, copyctl's samples, QEMU's samples.
type RowSpec<'a> = (
    &'a str,
    &'a str,
    &'static str,
    Better,
    &'a Vec<f64>,
    &'a Vec<f64>,
);

pub fn run(ctx: &mut Ctx) -> Res<()> {
    if let Some(why) = unmet() {
        ctx.report
            .note(format!("8: the remote scenario was skipped: {why}"));
        return Ok(());
    }
    let ns = Netns::create()?;
    let variants = [None, Some(DELAY_MS)];
    let mut qemu: Vec<Series> = variants.iter().map(|_| Series::default()).collect();
    let mut ours: Vec<Series> = variants.iter().map(|_| Series::default()).collect();
    let tools = [Tool::Ours, Tool::Convert, Tool::Nbdcopy];
    // [variant][tool] -> seconds
    let mut copies: Vec<Vec<Vec<f64>>> = vec![vec![Vec::new(); tools.len()]; variants.len()];
    for rep in 0..ctx.reps {
        let seed = 800 + rep as u64;
        for (v, &delay) in variants.iter().enumerate() {
            let name = variant_name(delay);
            // Each repetition starts with a different engine.
            for k in 0..2 {
                if (rep + k) % 2 == 0 {
                    let r = qemu_live(ctx, &ns, delay, seed)?;
                    eprintln!("   rep {rep}, {name}: QEMU write-blocking: {}", show(&r));
                    qemu[v].add(&r);
                } else {
                    let r = ours_live(ctx, &ns, delay, None, seed)?;
                    eprintln!("   rep {rep}, {name}: copyctl serve:       {}", show(&r));
                    ours[v].add(&r);
                }
            }
            for k in 0..tools.len() {
                let i = (rep + k) % tools.len();
                let check = rep == 0 && tools[i] == Tool::Ours;
                let t = plain_copy(ctx, &ns, delay, None, tools[i], check)?.wall;
                eprintln!("   rep {rep}, {name}: {} {t:.3} s", tool_name(tools[i]));
                copies[v][i].push(t);
            }
        }
    }
    drop(ns);
    for p in [
        "remote-dst.raw",
        "remote-a.qmp",
        "remote-b.qmp",
        "remote-b.nbd",
        "remote-proxy.pid",
        "remote-live.nbd",
        "remote-live.ctl",
    ] {
        remove(&ctx.path(p))?;
    }
    remove_journal(&ctx.path("remote-live.journal"))?;
    remove_journal(&ctx.path("remote-copy.journal"))?;

    let size = human(src_size(ctx)?);
    let qwb = "QEMU write-blocking";
    let r = &mut ctx.report;
    for (v, &delay) in variants.iter().enumerate() {
        let key = variant_key(delay);
        let section = format!("8 remote live copy, {size}, {}", variant_name(delay));
        let (us, q) = (&ours[v], &qemu[v]);
        let rows: [RowSpec; 7] = [
            (
                "ready",
                "time to Ready, writer running",
                "s",
                Better::Lower,
                &us.ready,
                &q.ready,
            ),
            (
                "tput",
                "writer throughput during the copy",
                "MiB/s",
                Better::Higher,
                &us.tput,
                &q.tput,
            ),
            (
                "p50",
                "writer p50 latency during the copy",
                "ms",
                Better::Lower,
                &us.p50,
                &q.p50,
            ),
            (
                "p99",
                "writer p99 latency during the copy",
                "ms",
                Better::Lower,
                &us.p99,
                &q.p99,
            ),
            (
                "pause",
                "switch pause, writer running",
                "ms",
                Better::Lower,
                &us.pause,
                &q.pause,
            ),
            (
                "command",
                "switch command, sent to answered, writer running",
                "ms",
                Better::Lower,
                &us.command,
                &q.command,
            ),
            (
                "felt",
                "longest writer request running at any moment of the switch command",
                "ms",
                Better::Lower,
                &us.felt,
                &q.felt,
            ),
        ];
        for (name, metric, unit, better, a, b) in rows {
            r.row(
                &format!("remote.{name}.{key}"),
                &section,
                metric,
                unit,
                better,
                ("copyctl serve", a),
                (qwb, b),
            );
        }
        let section = format!(
            "8 copy into a remote export, {size}, {}",
            variant_name(delay)
        );
        for (i, tool) in tools.iter().enumerate().skip(1) {
            let k = if *tool == Tool::Convert {
                "convert"
            } else {
                "nbdcopy"
            };
            r.row(
                &format!("remote.copy.{k}.{key}"),
                &section,
                "wall time, flushed",
                "s",
                Better::Lower,
                ("copyctl copy", &copies[v][0]),
                (tool_name(*tool), &copies[v][i]),
            );
        }
        for (k, s) in [("qemu", &qemu[v]), ("ours", &ours[v])] {
            r.raw
                .insert(format!("remote.runs.{k}.{key}"), Value::from(s.raw.clone()));
        }
    }
    r.note(format!(
        "8: two network namespaces joined by a veth pair ({ADDR_A}/30 and {ADDR_B}/30); the export is \
         qemu-storage-daemon's (raw file, default cache modes) in one, everything else runs in the other; \
         \"+{DELAY_MS} ms per request\" puts an nbdkit delay-filter proxy in front of the export that \
         answers every read, write, zero, trim and block status request {DELAY_MS} ms later (flushes \
         are not delayed: the filter cannot). QEMU: blockdev-add of an nbd node, blockdev-mirror \
         sync=full copy-mode=write-blocking. Medians of time to Ready: QEMU {:.2} s / {:.2} s, \
         copyctl {:.2} s / {:.2} s (without / with added latency)",
        median(&qemu[0].ready),
        median(&qemu[1].ready),
        median(&ours[0].ready),
        median(&ours[1].ready),
    ));
    Ok(())
}
