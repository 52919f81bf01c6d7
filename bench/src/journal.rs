//! Scenario 5: one journal commit against a bare 4 KiB pwrite + fdatasync on the
//! same file system: the physical limit of a durable record.
//!
//! Journals are made with `livecopy::journal::create_file` (not timed);
//! each then takes the three legal commits Ready, Switched, Completed, each
//! timed around the `commit` call alone. Each commit is preceded by one
//! bare operation (4 KiB `pwrite` at an alternating offset of a synced
//! 40 KiB file, then `fdatasync`), so both see the same device state.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Instant;

use livecopy::journal::{self, ImageRecord, Phase, RecordV1, Side};

use crate::Ctx;
use crate::report::Better;
use crate::util::{Context, Res, Rng, median, remove};

fn image_record(path: &Path) -> Res<ImageRecord> {
    let id = livecopy::storage::stat_identity(path)
        .map_err(|e| format!("stat {}: {e}", path.display()))?
        .ok_or_else(|| format!("{} vanished", path.display()))?;
    Ok(ImageRecord {
        path: id.path.to_string_lossy().into_owned(),
        size: id.size,
        device: id.device,
        inode: id.inode,
    })
}

fn id16(rng: &mut Rng) -> [u8; 16] {
    let mut b = [0u8; 16];
    rng.fill(&mut b);
    b
}

pub fn run(ctx: &mut Ctx) -> Res<()> {
    let dir = ctx.path("journal");
    std::fs::create_dir_all(&dir).ctx(|| format!("create {}", dir.display()))?;
    let (a, b) = (dir.join("a.img"), dir.join("b.img"));
    for p in [&a, &b] {
        crate::util::create_sparse(p, 1 << 20)?;
    }
    let (source, destination) = (image_record(&a)?, image_record(&b)?);

    let bare_path = dir.join("bare.bin");
    remove(&bare_path)?;
    let bare = File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&bare_path)
        .ctx(|| format!("create {}", bare_path.display()))?;
    let mut rng = Rng::new(5);
    let mut block = vec![0u8; 4096];
    rng.fill(&mut block);
    for i in 0..10 {
        bare.write_all_at(&block, i * 4096).ctx(|| "write".into())?;
    }
    bare.sync_all().ctx(|| "fsync".into())?;
    crate::util::sync_everything()?;

    let (mut commits, mut bares) = (vec![], vec![]);
    let mut n = 0u64;
    for k in 0..ctx.sizes.journals {
        let path = dir.join(format!("j{k}.journal"));
        crate::util::remove_journal(&path)?;
        let first = RecordV1 {
            job_id: id16(&mut rng),
            phase: Phase::Copying,
            authoritative: Side::Source,
            source: source.clone(),
            destination: destination.clone(),
            writer_instance: id16(&mut rng),
            writer_epoch: 1,
            bytes_copied: 0,
            wall_clock_unix_ns: 0,
        };
        let mut j = journal::create_file(&path, first)
            .map_err(|e| format!("create {}: {e}", path.display()))?;
        for phase in [Phase::Ready, Phase::Switched, Phase::Completed] {
            block[0] = n as u8;
            let offset = (n % 2) * 4096 * 5;
            n += 1;
            let t = Instant::now();
            bare.write_all_at(&block, offset).ctx(|| "pwrite".into())?;
            bare.sync_data().ctx(|| "fdatasync".into())?;
            bares.push(t.elapsed().as_secs_f64() * 1e3);

            let t = Instant::now();
            j.commit(phase, 0)
                .map_err(|e| format!("commit {phase:?}: {e}"))?;
            commits.push(t.elapsed().as_secs_f64() * 1e3);
        }
        drop(j);
        crate::util::remove_journal(&path)?;
    }
    drop(bare);
    remove(&bare_path)?;
    eprintln!(
        "   {} commits: median {:.3} ms; bare pwrite + fdatasync median {:.3} ms",
        commits.len(),
        median(&commits),
        median(&bares)
    );
    let pairs: Vec<f64> = bares.chunks(1).map(|c| 2.0 * c[0]).collect();
    let r = &mut ctx.report;
    r.row(
        "journal.commit",
        "5 journal",
        "one commit (Ready, Switched, Completed)",
        "ms",
        Better::Lower,
        ("`Journal::commit`", &commits),
        ("4 KiB pwrite + fdatasync", &bares),
    );
    r.raw.insert(
        "journal.bare_times_two".into(),
        serde_json::json!({"samples": pairs, "median": median(&pairs)}),
    );
    r.raw.insert(
        "journal.p90".into(),
        serde_json::json!({
            "commit_ms": crate::util::percentile(&commits, 90.0),
            "bare_ms": crate::util::percentile(&bares, 90.0),
        }),
    );
    Ok(())
}
