//! Scenario 10: resuming a copy after a crash.
//!
//! - What a resume copies again: `copyctl copy --bandwidth` of the live
//!   image is killed (SIGKILL) once its destination holds X% of the image
//!   (X = 30, 60, 90 in turn: the pass writes around the page cache, so
//!   allocation follows it), then `copy --resume` runs; the bytes its
//!   summary says it copies again, against (100 - X + 2)% of the image
//!   (no guest here, so no extent is listed). The result is compared with
//!   the source.
//! - What checkpoints and write intent cost: `copyctl copy` with and
//!   without `--no-checkpoints` (the pass's time), and scenario 3's copy
//!   under the 64 KiB writer with and without (the writer's throughput
//!   during the copy), in alternating order.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::live::ours_live;
use crate::report::Better;
use crate::util::{
    Context, Res, allocated, remove, remove_journal, run_timed, same_contents, sync_everything,
};
use crate::{Ctx, human};

fn copyctl(ctx: &Ctx) -> Command {
    let mut c = Command::new(&ctx.copyctl);
    c.arg("--output").arg("json");
    c
}

/// One kill at `fraction` of the pass and a resume: (the fraction the
/// destination held at the kill, bytes the resume copied again).
fn kill_and_resume(ctx: &Ctx, fraction: f64) -> Res<(f64, u64)> {
    let src = ctx.full_image();
    let size = ctx.sizes.live;
    let dst = ctx.path("resume-dst.raw");
    let journal = ctx.path("resume.journal");
    remove(&dst)?;
    remove_journal(&journal)?;
    sync_everything()?;
    // About 4 s for the whole pass: the kill lands within a few MiB.
    let bandwidth = (size / 4).max(1 << 20).to_string();
    let mut child = copyctl(ctx)
        .arg("copy")
        .args(&ctx.tuning)
        .args(["--bandwidth", &bandwidth, "--journal"])
        .arg(&journal)
        .arg(&src)
        .arg(&dst)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ctx(|| "spawn copyctl copy".into())?;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let held = if dst.exists() { allocated(&dst)? } else { 0 };
        if held as f64 >= fraction * size as f64 {
            break;
        }
        if child.try_wait().ctx(|| "poll".into())?.is_some() {
            return Err("the copy ended before the kill".into());
        }
        if Instant::now() > deadline {
            return Err("the copy made no progress".into());
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let _ = child.kill();
    let _ = child.wait();
    let at_kill = allocated(&dst)?.min(size) as f64 / size as f64;
    let out = crate::util::run(
        copyctl(ctx)
            .arg("copy")
            .args(&ctx.tuning)
            .arg("--resume")
            .arg("--journal")
            .arg(&journal)
            .arg(&src)
            .arg(&dst),
    )?;
    let summary: Value =
        serde_json::from_slice(&out.stdout).ctx(|| "copy --resume's JSON".into())?;
    if summary["resumed"] != true {
        return Err(format!("copy --resume did not resume: {summary}"));
    }
    let again = summary["bytes_to_copy"]
        .as_u64()
        .ok_or_else(|| format!("no bytes_to_copy in {summary}"))?;
    if !same_contents(&src, &dst)? {
        return Err("after the resume the destination differs from the source".into());
    }
    Ok((at_kill, again))
}

/// `copyctl copy` of the live image, with `extra` options; its copy time.
fn copy_seconds(ctx: &Ctx, extra: &[&str]) -> Res<f64> {
    let dst = ctx.path("resume-cost-dst.raw");
    let journal = ctx.path("resume-cost.journal");
    remove(&dst)?;
    remove_journal(&journal)?;
    sync_everything()?;
    let (_, out) = run_timed(
        copyctl(ctx)
            .arg("copy")
            .args(&ctx.tuning)
            .args(extra)
            .arg("--journal")
            .arg(&journal)
            .arg(ctx.full_image())
            .arg(&dst),
    )?;
    let summary: Value = serde_json::from_slice(&out.stdout).ctx(|| "copy's JSON".into())?;
    summary["copy_seconds"]
        .as_f64()
        .ok_or_else(|| format!("no copy_seconds in {summary}"))
}

pub fn run(ctx: &mut Ctx) -> Res<()> {
    let size = ctx.sizes.live;
    let (mut again, mut bound) = (Vec::new(), Vec::new());
    for rep in 0..ctx.reps {
        let fraction = [0.3, 0.6, 0.9][rep % 3];
        let (at_kill, bytes) = kill_and_resume(ctx, fraction)?;
        let allowed = ((1.0 - at_kill + 0.02) * size as f64).round();
        eprintln!(
            "   rep {rep}: killed at {:.1}%, the resume copied {} again (bound {})",
            100.0 * at_kill,
            human(bytes),
            human(allowed as u64)
        );
        again.push(bytes as f64);
        bound.push(allowed);
    }
    let section = format!("10 resume, {}", human(size));
    ctx.report.row(
        "resume.again",
        &section,
        "bytes copied again after a kill at 30/60/90% of the pass (in turn)",
        "B",
        Better::Lower,
        ("copyctl copy --resume", &again),
        ("(100 - X + 2)% of the image", &bound),
    );

    let (mut on, mut off) = (Vec::new(), Vec::new());
    let (mut w_on, mut w_off) = (Vec::new(), Vec::new());
    let base = ctx.tuning.clone();
    for rep in 0..ctx.reps {
        for k in 0..2 {
            let checkpoints = (rep + k) % 2 == 0;
            let extra: &[&str] = if checkpoints {
                &[]
            } else {
                &["--no-checkpoints"]
            };
            let t = copy_seconds(ctx, extra)?;
            ctx.tuning = base.clone();
            ctx.tuning.extend(extra.iter().map(|s| s.to_string()));
            let live = ours_live(ctx, true, 300 + rep as u64);
            ctx.tuning = base.clone();
            let live = live?;
            let tput = live.window.as_ref().map_or(f64::NAN, |w| w.mib_s);
            eprintln!(
                "   rep {rep}: checkpoints {}: copy {:.3} s; writer during the copy {:.1} MiB/s",
                if checkpoints { "on " } else { "off" },
                t,
                tput
            );
            if checkpoints {
                on.push(t);
                w_on.push(tput);
            } else {
                off.push(t);
                w_off.push(tput);
            }
        }
    }
    ctx.report.row(
        "resume.pass",
        &section,
        "copy time (`copyctl copy`): checkpoints on vs off",
        "s",
        Better::Lower,
        ("copyctl copy", &on),
        ("copyctl copy --no-checkpoints", &off),
    );
    ctx.report.row(
        "resume.writer",
        &section,
        "64 KiB writer throughput during the copy (scenario 3): checkpoints on vs off",
        "MiB/s",
        Better::Higher,
        ("copyctl serve", &w_on),
        ("copyctl serve --no-checkpoints", &w_off),
    );
    Ok(())
}
