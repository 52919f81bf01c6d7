//! Scenarios 1, 2, 6 and 7: the ones that time whole commands.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use serde_json::{Value, json};

use crate::report::Better;
use crate::util::{
    Context, MIB, Res, allocated, create_sparse, remove, remove_journal, run, run_timed,
    same_contents, secs, sync_everything, write_sparse_image,
};
use crate::{Ctx, human};

fn copyctl(ctx: &Ctx) -> Command {
    let mut c = Command::new(&ctx.copyctl);
    c.arg("--output").arg("json");
    c
}

/// Times `copyctl copy` (the journal and destination made fresh first).
/// Returns the wall time and copyctl's JSON summary.
fn ours_copy(ctx: &Ctx, src: &Path, dst: &Path, journal: &Path) -> Res<(f64, Value)> {
    remove(dst)?;
    remove_journal(journal)?;
    sync_everything()?;
    let (t, out) = run_timed(
        copyctl(ctx)
            .arg("copy")
            .args(&ctx.tuning)
            .arg("--journal")
            .arg(journal)
            .arg(src)
            .arg(dst),
    )?;
    let summary: Value =
        serde_json::from_slice(&out.stdout).ctx(|| "copyctl copy's JSON".into())?;
    Ok((secs(t), summary))
}

/// Times the commands one after the other, as one job.
fn timed_chain(cmds: &mut [&mut Command]) -> Res<f64> {
    let started = Instant::now();
    for c in cmds.iter_mut() {
        run(c)?;
    }
    Ok(started.elapsed().as_secs_f64())
}

fn fresh(dst: &Path) -> Res<()> {
    remove(dst)?;
    sync_everything()
}

fn qemu_convert(src: &Path, dst: &Path, preallocated_target: bool) -> Command {
    let mut c = Command::new("qemu-img");
    c.arg("convert");
    if preallocated_target {
        c.args(["-n", "-t", "none"]);
    }
    c.args(["-f", "raw", "-O", "raw"]).arg(src).arg(dst);
    c
}

fn sync_file(path: &Path) -> Command {
    let mut c = Command::new("sync");
    c.arg(path);
    c
}

/// 1. A fully written image copied, its data durable at the end.
pub fn bulk(ctx: &mut Ctx) -> Res<()> {
    let src = ctx.full_image();
    let size = ctx.sizes.full;
    // The image may be larger than `full` (it serves the live copy too).
    let src_bulk = if std::fs::metadata(&src).map(|m| m.len()).unwrap_or(0) == size {
        src.clone()
    } else {
        let p = ctx.path("bulk-src.raw");
        crate::util::write_full_image(&p, size, 11)?;
        p
    };
    let dst = ctx.path("bulk-dst.raw");
    let journal = ctx.path("bulk.journal");
    let (mut ours, mut cp, mut none, mut raw) = (vec![], vec![], vec![], vec![]);
    let mut summaries = vec![];
    for rep in 0..ctx.reps {
        // Each repetition starts with a different tool.
        for k in 0..4 {
            match (rep + k) % 4 {
                0 => {
                    let (t, summary) = ours_copy(ctx, &src_bulk, &dst, &journal)?;
                    if rep == 0 && !same_contents(&src_bulk, &dst)? {
                        fail!("copyctl copy made a destination that differs from its source");
                    }
                    eprintln!(
                        "   rep {rep}: copyctl copy {t:.3} s (copy {:.3} s, pause {:.2} ms)",
                        summary["copy_seconds"].as_f64().unwrap_or(f64::NAN),
                        summary["switch_pause_seconds"].as_f64().unwrap_or(f64::NAN) * 1e3
                    );
                    ours.push(t);
                    summaries.push(summary);
                }
                1 => {
                    fresh(&dst)?;
                    let mut c = Command::new("cp");
                    c.arg(&src_bulk).arg(&dst);
                    let t = timed_chain(&mut [&mut c, &mut sync_file(&dst)])?;
                    eprintln!("   rep {rep}: cp + sync {t:.3} s");
                    cp.push(t);
                }
                2 => {
                    fresh(&dst)?;
                    create_sparse(&dst, size)?;
                    let t = timed_chain(&mut [&mut qemu_convert(&src_bulk, &dst, true)])?;
                    eprintln!("   rep {rep}: qemu-img convert -n -t none {t:.3} s");
                    none.push(t);
                }
                _ => {
                    fresh(&dst)?;
                    let t = timed_chain(&mut [
                        &mut qemu_convert(&src_bulk, &dst, false),
                        &mut sync_file(&dst),
                    ])?;
                    eprintln!("   rep {rep}: qemu-img convert -O raw + sync {t:.3} s");
                    raw.push(t);
                }
            }
        }
    }
    remove(&dst)?;
    remove_journal(&journal)?;
    let section = format!("1 bulk copy, {}", human(size));
    let r = &mut ctx.report;
    r.row(
        "bulk.cp",
        &section,
        "wall time, durable",
        "s",
        Better::Lower,
        ("copyctl copy", &ours),
        ("`cp` + `sync FILE`", &cp),
    );
    r.row(
        "bulk.qemu_none",
        &section,
        "wall time, durable",
        "s",
        Better::Lower,
        ("copyctl copy", &ours),
        ("`qemu-img convert -n -t none`", &none),
    );
    r.row(
        "bulk.qemu_raw",
        &section,
        "wall time, durable",
        "s",
        Better::Lower,
        ("copyctl copy", &ours),
        ("`qemu-img convert -O raw` + `sync FILE`", &raw),
    );
    let copy_only: Vec<f64> = summaries
        .iter()
        .filter_map(|s| s["copy_seconds"].as_f64())
        .collect();
    let pauses: Vec<f64> = summaries
        .iter()
        .filter_map(|s| s["switch_pause_seconds"].as_f64())
        .collect();
    r.raw.insert(
        "bulk.ours_breakdown".into(),
        json!({"copy_seconds": copy_only, "switch_pause_seconds": pauses, "summaries": summaries}),
    );
    r.note(format!(
        "1: copyctl copy's own split (medians): bulk pass {:.3} s of {:.3} s (the destination \
         is written back during the pass, at most 8 MiB in flight); the rest is process start, \
         journal creation, the switch's syncs of what is left and two journal commits",
        crate::util::median(&copy_only),
        crate::util::median(&ours)
    ));
    Ok(())
}

/// 2. A sparse image with scattered data: time and allocated bytes.
pub fn sparse(ctx: &mut Ctx) -> Res<()> {
    let src = ctx.path("sparse.raw");
    let (extents, data) = write_sparse_image(&src, ctx.sizes.sparse, ctx.sizes.sparse_data, 2)?;
    let src_alloc = allocated(&src)? as f64 / MIB as f64;
    eprintln!(
        "   {}: {extents} extents of 4 KiB to 1 MiB, {} written, {src_alloc:.1} MiB allocated",
        human(ctx.sizes.sparse),
        human(data)
    );
    let dst = ctx.path("sparse-dst.raw");
    let journal = ctx.path("sparse.journal");
    let mut t_ours = vec![];
    let mut a_ours = vec![];
    let mut t_raw = vec![];
    let mut a_raw = vec![];
    let mut t_none = vec![];
    let mut a_none = vec![];
    let mut t_cp = vec![];
    let mut a_cp = vec![];
    let mib = |p: &Path| -> Res<f64> { Ok(allocated(p)? as f64 / MIB as f64) };
    for rep in 0..ctx.reps {
        // Each repetition starts with a different tool.
        for k in 0..4 {
            match (rep + k) % 4 {
                0 => {
                    let (t, _) = ours_copy(ctx, &src, &dst, &journal)?;
                    if rep == 0 && !same_contents(&src, &dst)? {
                        fail!(
                            "copyctl copy made a sparse destination that differs from its source"
                        );
                    }
                    t_ours.push(t);
                    a_ours.push(mib(&dst)?);
                }
                1 => {
                    fresh(&dst)?;
                    let t = timed_chain(&mut [
                        &mut qemu_convert(&src, &dst, false),
                        &mut sync_file(&dst),
                    ])?;
                    t_raw.push(t);
                    a_raw.push(mib(&dst)?);
                }
                2 => {
                    fresh(&dst)?;
                    create_sparse(&dst, ctx.sizes.sparse)?;
                    let t = timed_chain(&mut [&mut qemu_convert(&src, &dst, true)])?;
                    t_none.push(t);
                    a_none.push(mib(&dst)?);
                }
                _ => {
                    fresh(&dst)?;
                    let mut c = Command::new("cp");
                    c.arg("--sparse=auto").arg(&src).arg(&dst);
                    let t = timed_chain(&mut [&mut c, &mut sync_file(&dst)])?;
                    t_cp.push(t);
                    a_cp.push(mib(&dst)?);
                }
            }
        }
        eprintln!(
            "   rep {rep}: copyctl {:.3} s {:.1} MiB; qemu-img -O raw {:.3} s {:.1} MiB; \
             -n -t none {:.3} s {:.1} MiB; cp {:.3} s {:.1} MiB",
            t_ours[rep],
            a_ours[rep],
            t_raw[rep],
            a_raw[rep],
            t_none[rep],
            a_none[rep],
            t_cp[rep],
            a_cp[rep]
        );
    }
    remove(&dst)?;
    remove_journal(&journal)?;
    let section = format!(
        "2 sparse copy, {} with {} of data",
        human(ctx.sizes.sparse),
        human(data)
    );
    let r = &mut ctx.report;
    let ours = "copyctl copy";
    r.row(
        "sparse.time_raw",
        &section,
        "wall time, durable",
        "s",
        Better::Lower,
        (ours, &t_ours),
        ("`qemu-img convert -O raw` + `sync FILE`", &t_raw),
    );
    r.row(
        "sparse.alloc_raw",
        &section,
        "destination allocated",
        "MiB",
        Better::Lower,
        (ours, &a_ours),
        ("`qemu-img convert -O raw`", &a_raw),
    );
    r.row(
        "sparse.time_none",
        &section,
        "wall time, durable",
        "s",
        Better::Lower,
        (ours, &t_ours),
        ("`qemu-img convert -n -t none`", &t_none),
    );
    r.row(
        "sparse.alloc_none",
        &section,
        "destination allocated",
        "MiB",
        Better::Lower,
        (ours, &a_ours),
        ("`qemu-img convert -n -t none`", &a_none),
    );
    r.row(
        "sparse.time_cp",
        &section,
        "wall time, durable",
        "s",
        Better::Lower,
        (ours, &t_ours),
        ("`cp --sparse=auto` + `sync FILE`", &t_cp),
    );
    r.row(
        "sparse.alloc_cp",
        &section,
        "destination allocated",
        "MiB",
        Better::Lower,
        (ours, &a_ours),
        ("`cp --sparse=auto`", &a_cp),
    );
    r.raw.insert(
        "sparse.source".into(),
        json!({"size": ctx.sizes.sparse, "extents": extents, "data_bytes": data, "allocated_mib": src_alloc}),
    );
    r.note(format!(
        "2: the sparse source has {src_alloc:.1} MiB allocated ({extents} extents of 4 KiB to 1 MiB)"
    ));
    Ok(())
}

/// Bytes of the dirty bitmap for `size` at the default 64 KiB granularity.
fn bitmap_bytes(size: u64) -> u64 {
    size.div_ceil(64 << 10).div_ceil(64) * 8
}

/// Peak RSS in KiB and wall seconds of a command, by /usr/bin/time.
fn max_rss(cmd: &mut Command, ctx: &Ctx) -> Res<(f64, f64)> {
    let out = ctx.path("time.out");
    let mut timed = Command::new("/usr/bin/time");
    timed
        .arg("-f")
        .arg("%M %e")
        .arg("-o")
        .arg(&out)
        .arg(cmd.get_program())
        .args(cmd.get_args());
    run(&mut timed)?;
    let text = std::fs::read_to_string(&out).ctx(|| "read /usr/bin/time's output".into())?;
    let last = text.lines().last().unwrap_or("");
    let mut it = last.split_whitespace();
    let kib: f64 = it
        .next()
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("bad /usr/bin/time output {text:?}"))?;
    let secs: f64 = it.next().and_then(|v| v.parse().ok()).unwrap_or(f64::NAN);
    Ok((kib, secs))
}

/// The huge sparse image of scenarios 6 and 7.
fn huge_image(ctx: &Ctx) -> Res<std::path::PathBuf> {
    let p = ctx.path("huge.raw");
    write_sparse_image(&p, ctx.sizes.huge, ctx.sizes.huge_data, 3)?;
    Ok(p)
}

/// 7. Peak memory of `copyctl copy`, 1 GiB vs 1 TiB (sparse).
pub fn memory(ctx: &mut Ctx) -> Res<()> {
    let small = ctx.full_image();
    let small_size = std::fs::metadata(&small).ctx(|| "stat".into())?.len();
    let huge = huge_image(ctx)?;
    let (mut rss_small, mut rss_huge, mut rss_qemu) = (vec![], vec![], vec![]);
    for rep in 0..ctx.reps {
        for (img, tag, into) in [
            (&small, "small", &mut rss_small),
            (&huge, "huge", &mut rss_huge),
        ] {
            let dst = ctx.path(&format!("mem-{tag}.raw"));
            let journal = ctx.path(&format!("mem-{tag}.journal"));
            remove(&dst)?;
            remove_journal(&journal)?;
            sync_everything()?;
            let (kib, s) = max_rss(
                copyctl(ctx)
                    .arg("copy")
                    .args(&ctx.tuning)
                    .arg("--journal")
                    .arg(&journal)
                    .arg(img)
                    .arg(&dst),
                ctx,
            )?;
            eprintln!("   rep {rep}: copyctl copy of {tag}: max RSS {kib} KiB, {s} s");
            into.push(kib / 1024.0);
        }
        let dst = ctx.path("mem-qemu.raw");
        fresh(&dst)?;
        create_sparse(&dst, small_size)?;
        let (kib, _) = max_rss(&mut qemu_convert(&small, &dst, true), ctx)?;
        rss_qemu.push(kib / 1024.0);
        remove(&dst)?;
    }
    // The journals and their images stay for scenario 6: `recover` checks
    // that the image it names exists (exit 10 when it does not).
    let small_name = format!("copyctl copy, {}", human(small_size));
    let growth = (bitmap_bytes(ctx.sizes.huge) - bitmap_bytes(small_size)) as f64 / MIB as f64;
    let r = &mut ctx.report;
    r.row(
        "memory.size",
        "7 peak memory",
        &format!(
            "max RSS, {} sparse image ({} data)",
            human(ctx.sizes.huge),
            human(ctx.sizes.huge_data)
        ),
        "MiB",
        Better::Lower,
        ("copyctl copy", &rss_huge),
        (&small_name, &rss_small),
    );
    r.row(
        "memory.qemu",
        "7 peak memory",
        &format!("max RSS, {} image", human(small_size)),
        "MiB",
        Better::Lower,
        ("copyctl copy", &rss_small),
        ("`qemu-img convert -n -t none`", &rss_qemu),
    );
    r.facts.insert("memory.bitmap_growth_mib".into(), growth);
    r.facts.insert("size.small".into(), small_size as f64);
    r.facts.insert("size.huge".into(), ctx.sizes.huge as f64);
    Ok(())
}

/// 6. `copyctl recover` on the two completed jobs of scenario 7.
pub fn recover(ctx: &mut Ctx) -> Res<()> {
    let small = ctx.path("mem-small.journal");
    let huge = ctx.path("mem-huge.journal");
    let images = [ctx.path("mem-small.raw"), ctx.path("mem-huge.raw")];
    if !small.exists() || !huge.exists() || images.iter().any(|i| !i.exists()) {
        // Scenario 7 did not run: make the two jobs.
        let huge_img = huge_image(ctx)?;
        for (img, j, d) in [
            (ctx.full_image(), &small, ctx.path("mem-small.raw")),
            (huge_img, &huge, ctx.path("mem-huge.raw")),
        ] {
            ours_copy(ctx, &img, &d, j)?;
        }
    }
    sync_everything()?;
    let (mut t_small, mut t_huge, mut t_version) = (vec![], vec![], vec![]);
    let once = |ctx: &Ctx, j: &Path| -> Res<f64> {
        let (t, out) = run_timed(copyctl(ctx).arg("recover").arg(j))?;
        let v: Value = serde_json::from_slice(&out.stdout).ctx(|| "recover's JSON".into())?;
        if v["authoritative"] != "destination" {
            fail!("recover said {v}");
        }
        Ok(secs(t) * 1e3)
    };
    // One untimed run each: the binary's pages come into the cache.
    once(ctx, &small)?;
    once(ctx, &huge)?;
    for _ in 0..ctx.sizes.recovers {
        t_small.push(once(ctx, &small)?);
        t_huge.push(once(ctx, &huge)?);
        let (t, _) = run_timed(Command::new(&ctx.copyctl).arg("--version"))?;
        t_version.push(secs(t) * 1e3);
    }
    let small_size = std::fs::metadata(ctx.full_image())
        .map(|m| m.len())
        .unwrap_or(0);
    let r = &mut ctx.report;
    r.facts.insert("size.small".into(), small_size as f64);
    r.facts.insert("size.huge".into(), ctx.sizes.huge as f64);
    r.row(
        "recover.size",
        "6 recover",
        &format!(
            "`copyctl recover` wall time, {} job vs {} job",
            human(ctx.sizes.huge),
            human(ctx.sizes.full)
        ),
        "ms",
        Better::Lower,
        ("copyctl recover (huge)", &t_huge),
        ("copyctl recover (small)", &t_small),
    );
    r.row(
        "recover.start",
        "6 recover",
        &format!(
            "`copyctl recover` wall time, {} job, vs bare process start",
            human(ctx.sizes.full)
        ),
        "ms",
        Better::Lower,
        ("copyctl recover", &t_small),
        ("`copyctl --version`", &t_version),
    );
    remove(&ctx.path("mem-small.raw"))?;
    Ok(())
}
