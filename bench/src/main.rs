//! livecopy-bench: copyctl against cp and QEMU, in one rerunnable command.
//!
//! Run it through `bench/run` (which builds both in release mode first):
//!
//! ```text
//! bench/run            # full: 1 GiB images, 5 repetitions; writes BENCHMARKS.md
//! bench/run --quick    # smoke: small images, 1 repetition; writes target/bench-work/BENCHMARKS.quick.md
//! ```
//!
//! Options: `--reps N`, `--only 1,3,5` (scenario numbers, 1-10), `--work DIR`,
//! `--out FILE`, `--copyctl PATH`, `--tuning '--workers 4'` (extra options
//! for `copyctl copy` and `copyctl serve`). Timing never asserts anything: the
//! harness reports figures and says which targets they meet.

#[macro_use]
mod util;
mod journal;
mod live;
mod qmp;
mod remote;
mod report;
mod resume;
mod serving;
mod simple;
mod tls;
mod writer;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Instant;

use report::Report;
use util::{Context, GIB, MIB, Res, TIB, median};

/// Sizes and counts of one mode.
#[derive(Debug, Clone)]
pub struct Sizes {
    /// The fully written image of the bulk copy, the live copy and NBD.
    pub full: u64,
    /// The sparse image of scenario 2 and its data.
    pub sparse: u64,
    pub sparse_data: u64,
    /// The live copy's image.
    pub live: u64,
    /// The huge sparse image of scenarios 6 and 7, and its data.
    pub huge: u64,
    pub huge_data: u64,
    /// qemu-img bench request counts: 4 KiB reads, 4 KiB writes, 64 KiB each way.
    pub nbd_4k_reads: u64,
    pub nbd_4k_writes: u64,
    pub nbd_64k: u64,
    /// Seconds of the unloaded writer.
    pub writer_seconds: f64,
    /// Journals created for scenario 5 (three commits each).
    pub journals: usize,
    /// Runs of `copyctl recover` per image.
    pub recovers: usize,
}

impl Sizes {
    fn full() -> Sizes {
        Sizes {
            full: GIB,
            sparse: 4 * GIB,
            sparse_data: 256 * MIB,
            live: GIB,
            huge: TIB,
            huge_data: 16 * MIB,
            nbd_4k_reads: 200_000,
            nbd_4k_writes: 100_000,
            nbd_64k: 16_384,
            writer_seconds: 4.0,
            journals: 40,
            recovers: 20,
        }
    }
    fn quick() -> Sizes {
        Sizes {
            full: 256 * MIB,
            sparse: GIB,
            sparse_data: 64 * MIB,
            live: 256 * MIB,
            huge: TIB,
            huge_data: 4 * MIB,
            nbd_4k_reads: 20_000,
            nbd_4k_writes: 10_000,
            nbd_64k: 2_048,
            writer_seconds: 1.5,
            journals: 8,
            recovers: 5,
        }
    }
}

/// What every scenario gets.
pub struct Ctx {
    pub copyctl: PathBuf,
    pub work: PathBuf,
    pub reps: usize,
    pub quick: bool,
    pub sizes: Sizes,
    pub report: Report,
    /// Extra options for `copyctl copy` and `copyctl serve` (e.g. `--workers 4`).
    pub tuning: Vec<String>,
}

impl Ctx {
    pub fn path(&self, name: &str) -> PathBuf {
        self.work.join(name)
    }
    /// The fully written source image, made once per run.
    pub fn full_image(&self) -> PathBuf {
        self.path("full.raw")
    }
}

struct Args {
    quick: bool,
    reps: Option<usize>,
    only: Option<BTreeSet<u32>>,
    work: Option<PathBuf>,
    out: Option<PathBuf>,
    copyctl: PathBuf,
    command: String,
    tuning: Vec<String>,
}

fn usage() -> ! {
    eprintln!(
        "usage: livecopy-bench [--quick] [--reps N] [--only 1,2,...] [--work DIR] \
         [--out FILE] [--copyctl PATH] [--tuning 'COPYCTL OPTIONS'] [--command TEXT]\n\
         (normally run through bench/run)"
    );
    std::process::exit(2)
}

fn parse_args() -> Args {
    let mut args = Args {
        quick: false,
        reps: None,
        only: None,
        work: None,
        out: None,
        copyctl: PathBuf::from("target/release/copyctl"),
        command: "bench/run".into(),
        tuning: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| usage());
        match a.as_str() {
            "--quick" => args.quick = true,
            "--reps" => args.reps = Some(value().parse().unwrap_or_else(|_| usage())),
            "--only" => {
                args.only = Some(
                    value()
                        .split(',')
                        .map(|n| n.trim().parse().unwrap_or_else(|_| usage()))
                        .collect(),
                )
            }
            "--work" => args.work = Some(value().into()),
            "--out" => args.out = Some(value().into()),
            "--copyctl" => args.copyctl = value().into(),
            "--command" => args.command = value(),
            "--tuning" => args.tuning = value().split_whitespace().map(String::from).collect(),
            "-h" | "--help" => usage(),
            _ => usage(),
        }
    }
    args
}

fn main() {
    if let Err(e) = real_main() {
        eprintln!("livecopy-bench: {e}");
        std::process::exit(1);
    }
}

fn real_main() -> Res<()> {
    let args = parse_args();
    let root = std::env::current_dir().ctx(|| "current directory".into())?;
    let work = args
        .work
        .clone()
        .unwrap_or_else(|| root.join("target/bench-work"));
    std::fs::create_dir_all(&work).ctx(|| format!("create {}", work.display()))?;
    let work = work.canonicalize().ctx(|| "canonicalize".into())?;
    let copyctl = args.copyctl.canonicalize().ctx(|| {
        format!(
            "{} (build it first: bench/run does)",
            args.copyctl.display()
        )
    })?;
    let machine = util::machine(&work, &root);
    let out = args.out.clone().unwrap_or_else(|| {
        if args.quick {
            work.join("BENCHMARKS.quick.md")
        } else {
            root.join("BENCHMARKS.md")
        }
    });
    let reps = args.reps.unwrap_or(if args.quick { 1 } else { 5 });
    let sizes = if args.quick {
        Sizes::quick()
    } else {
        Sizes::full()
    };
    let mut ctx = Ctx {
        copyctl,
        work: work.clone(),
        reps,
        quick: args.quick,
        sizes,
        report: Report::default(),
        tuning: args.tuning.clone(),
    };
    if !ctx.tuning.is_empty() {
        ctx.report.note(format!(
            "copyctl copy and serve ran with `{}`",
            ctx.tuning.join(" ")
        ));
    }
    eprintln!(
        "livecopy-bench: {} mode, {reps} repetition(s), work directory {} ({} on {})",
        if args.quick { "quick" } else { "full" },
        work.display(),
        machine.fs_type,
        machine.fs_device
    );
    if matches!(machine.fs_type.as_str(), "tmpfs" | "ramfs" | "overlay") {
        ctx.report.note(format!(
            "the work directory is on {}: fdatasync figures do not mean what they mean on a disk",
            machine.fs_type
        ));
    }
    let started = Instant::now();
    let wanted = |n: u32| args.only.as_ref().is_none_or(|s| s.contains(&n));

    let needs_full = [1, 3, 4, 6, 7, 8, 9, 10].iter().any(|&n| wanted(n));
    if needs_full {
        let t = Instant::now();
        util::write_full_image(&ctx.full_image(), ctx.sizes.full.max(ctx.sizes.live), 1)?;
        eprintln!(
            "images: {} of random data in {:.1} s",
            human(ctx.sizes.full.max(ctx.sizes.live)),
            t.elapsed().as_secs_f64()
        );
    }
    type Scenario = fn(&mut Ctx) -> Res<()>;
    let scenarios: [(u32, &str, Scenario); 10] = [
        (5, "journal commit vs pwrite + fdatasync", journal::run),
        (1, "bulk copy", simple::bulk),
        (2, "sparse copy", simple::sparse),
        (7, "peak memory", simple::memory),
        (6, "recover", simple::recover),
        (4, "NBD serving", serving::run),
        (3, "live copy under a writer", live::run),
        (
            8,
            "remote: live copy into an export in another network namespace",
            remote::run,
        ),
        (9, "NBD over TLS", tls::run),
        (10, "resume after a crash", resume::run),
    ];
    for (n, name, f) in scenarios {
        if !wanted(n) {
            continue;
        }
        let t = Instant::now();
        eprintln!("== {n}. {name}");
        f(&mut ctx).map_err(|e| format!("scenario {n} ({name}): {e}"))?;
        eprintln!("   {n}. done in {:.1} s", t.elapsed().as_secs_f64());
    }
    targets(&mut ctx.report);

    let elapsed = started.elapsed().as_secs_f64();
    let sizes_text = format!(
        "bulk copy and NBD {}; sparse {} with {} of data; live copy {}; huge sparse {} with {} of data",
        human(ctx.sizes.full),
        human(ctx.sizes.sparse),
        human(ctx.sizes.sparse_data),
        human(ctx.sizes.live),
        human(ctx.sizes.huge),
        human(ctx.sizes.huge_data)
    );
    let command = if args.quick {
        format!("{} --quick", args.command)
    } else {
        args.command.clone()
    };
    let section = report::markdown(
        &ctx.report,
        &machine,
        &report::RunInfo {
            command: &command,
            mode: if args.quick { "quick" } else { "full" },
            reps,
            elapsed_s: elapsed,
            work: &work.display().to_string(),
            sizes: &sizes_text,
        },
    );
    let existing = std::fs::read_to_string(&out).unwrap_or_default();
    util::write_file(&out, &report::splice(&existing, &section))?;
    let raw = serde_json::json!({
        "machine": format!("{machine:?}"),
        "mode": if args.quick { "quick" } else { "full" },
        "reps": reps,
        "elapsed_seconds": elapsed,
        "results": ctx.report.raw,
        "notes": ctx.report.notes,
    });
    let json_path = work.join(if args.quick {
        "results.quick.json"
    } else {
        "results.json"
    });
    util::write_file(
        &json_path,
        &serde_json::to_string_pretty(&raw).unwrap_or_default(),
    )?;
    println!("{section}");
    eprintln!(
        "livecopy-bench: done in {:.1} min; wrote {} and {}",
        elapsed / 60.0,
        out.display(),
        json_path.display()
    );
    Ok(())
}

pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if v.fract() == 0.0 {
        format!("{v:.0} {}", UNITS[u])
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// A size recorded as a fact, for the target texts.
fn size_of(r: &Report, key: &str) -> String {
    r.fact(key)
        .map(|b| human(b as u64))
        .unwrap_or_else(|| "?".into())
}

/// Each target of the issue, judged from the medians.
fn targets(r: &mut Report) {
    let f = |r: &Report, k: &str| r.fact(k);
    let fmt = report::num;

    // 1. Bulk copy: medians of the ratios of alternating pairs.
    for (key, peer) in [
        ("bulk.qemu_none", "`qemu-img convert -n -t none`"),
        ("bulk.cp", "`cp` + `sync`"),
    ] {
        let ratios = r.pair_ratios(key);
        if !ratios.is_empty() {
            let m = median(&ratios);
            r.target(
                &format!("1. bulk copy at most 1.0x {peer} (median of per-repetition ratios)"),
                format!(
                    "ratio {:.2} (repetitions {})",
                    m,
                    ratios
                        .iter()
                        .map(|x| format!("{x:.2}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                Some(m <= 1.0),
            );
        }
    }
    // 3. Live copy.
    if let (Some(ours), Some(q)) = (f(r, "live.ready.wb.ours"), f(r, "live.ready.wb.peer")) {
        r.target(
            "3. time to Ready no slower than QEMU write-blocking",
            format!("{} s vs {} s: ratio {:.2}", fmt(ours), fmt(q), ours / q),
            Some(ours <= q),
        );
    }
    if let (Some(ours), Some(q)) = (
        f(r, "live.ready_noload.wb.ours"),
        f(r, "live.ready_noload.wb.peer"),
    ) {
        r.target(
            "3. time to Ready with no writer no slower than QEMU write-blocking",
            format!("{} s vs {} s: ratio {:.2}", fmt(ours), fmt(q), ours / q),
            Some(ours <= q),
        );
    }
    if let (Some(ours), Some(q)) = (f(r, "live.felt.wb.ours"), f(r, "live.felt.wb.peer")) {
        r.target(
            "3. longest guest request during the switch command at most QEMU write-blocking's and at most 20 ms",
            format!(
                "{} ms vs {} ms: ratio {:.2}",
                fmt(ours),
                fmt(q),
                ours / q
            ),
            Some(ours <= q && ours <= 20.0),
        );
    }
    if let Some(ours) = f(r, "live.command.wb.ours") {
        r.target(
            "3. switch command, sent to answered, writer running, at most 100 ms",
            format!("{} ms", fmt(ours)),
            Some(ours <= 100.0),
        );
    }
    if let (Some(ours), Some(q)) = (f(r, "live.tput.wb.ours"), f(r, "live.tput.wb.peer")) {
        r.target(
            "3. writer throughput during the copy at least QEMU write-blocking's",
            format!(
                "{} MiB/s vs {} MiB/s: ratio {:.2}",
                fmt(ours),
                fmt(q),
                ours / q
            ),
            Some(ours >= q),
        );
    }
    if let (Some(ours), Some(q)) = (f(r, "live.pause.wb.ours"), f(r, "live.pause.wb.peer")) {
        r.target(
            "3. switch pause under load at most a tenth of QEMU write-blocking's",
            format!(
                "{} ms vs {} ms: ratio {:.2} (needs <= 0.10)",
                fmt(ours),
                fmt(q),
                ours / q
            ),
            Some(ours <= q / 10.0),
        );
    }
    if let (Some(ours), Some(q)) = (f(r, "live.pause.bg.ours"), f(r, "live.pause.bg.peer")) {
        r.target(
            "3. (same, against QEMU background mode)",
            format!(
                "{} ms vs {} ms: ratio {:.2} (needs <= 0.10)",
                fmt(ours),
                fmt(q),
                ours / q
            ),
            Some(ours <= q / 10.0),
        );
    }
    if let (Some(ours), Some(sync)) = (
        f(r, "live.pause_noload.sync.ours"),
        f(r, "journal.commit.peer"),
    ) {
        r.target(
            "3. switch pause with no load within 3x of one 4 KiB pwrite + fdatasync",
            format!(
                "{} ms vs {} ms: ratio {:.2} (needs <= 3)",
                fmt(ours),
                fmt(sync),
                ours / sync
            ),
            Some(ours <= 3.0 * sync),
        );
    }
    let every = |ratios: &[f64]| {
        ratios
            .iter()
            .map(|x| format!("{x:.2}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let ratios = r.pair_ratios("live.self.tput");
    if !ratios.is_empty() {
        let worst = ratios.iter().copied().fold(f64::INFINITY, f64::min);
        r.target(
            "3. the writer keeps at least 0.6 of its unloaded throughput during the copy, in every repetition",
            format!("ratios {} (needs >= 0.6 each)", every(&ratios)),
            Some(worst >= 0.6),
        );
    }
    let ratios = r.pair_ratios("live.self.p99");
    if !ratios.is_empty() {
        let worst = ratios.iter().copied().fold(0.0, f64::max);
        r.target(
            "3. the writer's p99 latency during the copy within 4x of unloaded, in every repetition",
            format!("ratios {} (needs <= 4 each)", every(&ratios)),
            Some(worst <= 4.0),
        );
    }
    // 10. Resume.
    let ratios = r.pair_ratios("resume.again");
    if !ratios.is_empty() {
        let worst = ratios.iter().copied().fold(0.0, f64::max);
        r.target(
            "10. after a kill at X% of the pass, the resume copies at most (100 - X + 2)% of the image, in every repetition",
            format!("ratios to the bound {} (needs <= 1 each)", every(&ratios)),
            Some(worst <= 1.0),
        );
    }
    let ratios = r.pair_ratios("resume.writer");
    if !ratios.is_empty() {
        let m = median(&ratios);
        r.target(
            "10. checkpoints and write intent cost the 64 KiB writer at most 5% of its throughput during the copy (median of pair ratios)",
            format!("ratio {m:.3} (repetitions {})", every(&ratios)),
            Some(m >= 0.95),
        );
    }
    let ratios = r.pair_ratios("resume.pass");
    if !ratios.is_empty() {
        let m = median(&ratios);
        r.target(
            "10. checkpoints cost the pass at most 3% of its time (median of pair ratios)",
            format!("ratio {m:.3} (repetitions {})", every(&ratios)),
            Some(m <= 1.03),
        );
    }
    // 8. Remote.
    for (key, what) in [
        ("lan", "no added latency".to_string()),
        ("delay", format!("+{} ms per request", remote::DELAY_MS)),
    ] {
        if let (Some(ours), Some(q)) = (
            f(r, &format!("remote.ready.{key}.ours")),
            f(r, &format!("remote.ready.{key}.peer")),
        ) {
            r.target(
                &format!("8. remote ({what}): time to Ready no slower than QEMU write-blocking"),
                format!("{} s vs {} s: ratio {:.2}", fmt(ours), fmt(q), ours / q),
                Some(ours <= q),
            );
        }
        if let (Some(ours), Some(q)) = (
            f(r, &format!("remote.tput.{key}.ours")),
            f(r, &format!("remote.tput.{key}.peer")),
        ) {
            r.target(
                &format!(
                    "8. remote ({what}): writer throughput during the copy at least 10x QEMU write-blocking's"
                ),
                format!(
                    "{} MiB/s vs {} MiB/s: ratio {:.2} (needs >= 10)",
                    fmt(ours),
                    fmt(q),
                    ours / q
                ),
                Some(ours >= 10.0 * q),
            );
        }
        if let (Some(ours), Some(q)) = (
            f(r, &format!("remote.pause.{key}.ours")),
            f(r, &format!("remote.pause.{key}.peer")),
        ) {
            r.target(
                &format!(
                    "8. remote ({what}): switch pause under load at most a tenth of QEMU write-blocking's"
                ),
                format!(
                    "{} ms vs {} ms: ratio {:.2} (needs <= 0.10)",
                    fmt(ours),
                    fmt(q),
                    ours / q
                ),
                Some(ours <= q / 10.0),
            );
        }
        for (peer, name) in [
            ("convert", "`qemu-img convert -n -t none`"),
            ("nbdcopy", "`nbdcopy --flush`"),
        ] {
            if let (Some(ours), Some(p)) = (
                f(r, &format!("remote.copy.{peer}.{key}.ours")),
                f(r, &format!("remote.copy.{peer}.{key}.peer")),
            ) {
                r.target(
                    &format!(
                        "8. remote ({what}): a plain copy into the export at most 1.0x {name}"
                    ),
                    format!("{} s vs {} s: ratio {:.2}", fmt(ours), fmt(p), ours / p),
                    Some(ours <= p),
                );
            }
        }
    }
    // 4. NBD.
    for (key, what) in [
        ("nbd.read4k", "4 KiB reads"),
        ("nbd.write4k", "4 KiB writes"),
        ("nbd.read64k", "64 KiB reads"),
        ("nbd.write64k", "64 KiB writes"),
    ] {
        if let (Some(ours), Some(q)) = (f(r, &format!("{key}.ours")), f(r, &format!("{key}.peer")))
        {
            r.target(
                &format!("4. NBD {what} within 10% of qemu-nbd"),
                format!(
                    "{} MiB/s vs {} MiB/s: ratio {:.2} (needs >= 0.90)",
                    fmt(ours),
                    fmt(q),
                    ours / q
                ),
                Some(ours >= 0.9 * q),
            );
        }
    }
    // 9. NBD over TLS.
    for (key, what) in [
        ("tls.read4k", "4 KiB reads"),
        ("tls.write4k", "4 KiB writes"),
        ("tls.read64k", "64 KiB reads"),
        ("tls.write64k", "64 KiB writes"),
    ] {
        if let (Some(ours), Some(q)) = (f(r, &format!("{key}.ours")), f(r, &format!("{key}.peer")))
        {
            r.target(
                &format!("9. NBD {what} through TLS at least 0.9x qemu-nbd's (same credentials)"),
                format!(
                    "{} MiB/s vs {} MiB/s: ratio {:.2} (needs >= 0.90)",
                    fmt(ours),
                    fmt(q),
                    ours / q
                ),
                Some(ours >= 0.9 * q),
            );
        }
    }
    for (key, what) in [
        (
            "tls.live.ready",
            "time to Ready of a live copy into a remote export",
        ),
        ("tls.copy", "copyctl copy into a remote export"),
    ] {
        if let (Some(ours), Some(clear)) =
            (f(r, &format!("{key}.ours")), f(r, &format!("{key}.peer")))
        {
            // What the same export costs libnbd's client, for reading the
            // ratio: the server decrypts on one thread.
            let mut theirs = match r.pair_ratios("tls.nbdcopy") {
                t if key == "tls.copy" && !t.is_empty() => {
                    format!("; `nbdcopy` into the same export: {:.2}", median(&t))
                }
                _ => String::new(),
            };
            // The export's one thread decrypts: its CPU time against the
            // copy's wall time says who bounds the copy.
            if let (true, Some(tls), Some(clear)) = (
                key == "tls.copy",
                f(r, "tls.copy.export.ours"),
                f(r, "tls.copy.export.peer"),
            ) {
                theirs.push_str(&format!(
                    "; the export's CPU during it: {} s vs {} s",
                    fmt(tls),
                    fmt(clear)
                ));
            }
            // TLS and clear alternate, so each pair shares the machine's
            // moment: the same copy moved 4.6-12.5 s within one run.
            let ratios = r.pair_ratios(key);
            let m = median(&ratios);
            r.target(
                &format!(
                    "9. {what} over TLS at most 1.2x the same in clear (median of pair ratios)"
                ),
                format!(
                    "ratio {m:.2} (repetitions {}; medians {} s vs {} s){theirs}",
                    every(&ratios),
                    fmt(ours),
                    fmt(clear),
                ),
                Some(m <= 1.2),
            );
        }
    }
    // 5. Journal.
    if let (Some(ours), Some(bare)) = (f(r, "journal.commit.ours"), f(r, "journal.commit.peer")) {
        r.target(
            "5. journal commit (Ready, Completed) within 2.2x of one bare 4 KiB pwrite + fdatasync",
            format!(
                "{} ms vs {} ms: ratio {:.2} (needs <= 2.2)",
                fmt(ours),
                fmt(bare),
                ours / bare
            ),
            Some(ours <= 2.2 * bare),
        );
    }
    if let (Some(ours), Some(bare)) = (f(r, "journal.switched.ours"), f(r, "journal.switched.peer"))
    {
        r.target(
            "5. the Switched commit (with the seal) within 3.3x of one bare 4 KiB pwrite + fdatasync",
            format!(
                "{} ms vs {} ms: ratio {:.2} (needs <= 3.3)",
                fmt(ours),
                fmt(bare),
                ours / bare
            ),
            Some(ours <= 3.3 * bare),
        );
    }
    // 6. Recover.
    if let (Some(big), Some(small)) = (f(r, "recover.size.ours"), f(r, "recover.size.peer")) {
        let worst = big.max(small);
        r.target(
            "6. `copyctl recover` under 10 ms including process start",
            format!(
                "{} ms ({} job), {} ms ({} job)",
                fmt(small),
                size_of(r, "size.small"),
                fmt(big),
                size_of(r, "size.huge")
            ),
            Some(worst < 10.0),
        );
        // Flat: the huge image costs at most 20% or 0.5 ms more.
        r.target(
            "6. recover flat in image size (1 TiB within 20% or 0.5 ms of 1 GiB)",
            format!(
                "ratio {:.2}, difference {:+.2} ms",
                big / small,
                big - small
            ),
            Some(big <= (small * 1.2).max(small + 0.5)),
        );
    }
    // 7. Memory.
    if let (Some(big), Some(small), Some(bitmap)) = (
        f(r, "memory.size.ours"),
        f(r, "memory.size.peer"),
        f(r, "memory.bitmap_growth_mib"),
    ) {
        let growth = big - small;
        r.target(
            "7. peak memory flat in image size apart from the bitmap (growth <= bitmap growth + 0.5 MiB)",
            format!(
                "{} MiB ({}) -> {} MiB ({}): {:+.2} MiB; the bitmap grows {:.2} MiB",
                fmt(small),
                size_of(r, "size.small"),
                fmt(big),
                size_of(r, "size.huge"),
                growth,
                bitmap
            ),
            Some(growth <= bitmap + 0.5),
        );
    }
}
