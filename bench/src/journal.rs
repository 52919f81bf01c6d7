//! Scenario 5: one journal commit against a bare 4 KiB pwrite + fdatasync on the
//! same file system: the physical limit of a durable record.
//!
//! Journals are made with `livecopy::journal::create_file` (not timed);
//! each then takes the three legal commits Ready, Switched, Completed, each
//! timed around the `commit` call alone. The Switched commit also writes
//! the seal (a third copy, with copy B, before the second sync), so it is
//! reported on its own row. Each commit is preceded by one
//! bare operation (4 KiB `pwrite` at an alternating offset of a synced
//! 40 KiB file, then `fdatasync`), so both see the same device state.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Instant;

use livecopy::journal::{self, ImageRecord, ImageRef, Phase, Record};

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
    let (mut switched, mut switched_bares) = (vec![], vec![]);
    let mut n = 0u64;
    for k in 0..ctx.sizes.journals {
        let path = dir.join(format!("j{k}.journal"));
        crate::util::remove_journal(&path)?;
        let first = Record::single(
            id16(&mut rng),
            Phase::Copying,
            ImageRef::File(source.clone()),
            ImageRef::File(destination.clone()),
            id16(&mut rng),
            1,
            0,
            0,
        );
        let mut j = journal::create_file(&path, first)
            .map_err(|e| format!("create {}: {e}", path.display()))?;
        for phase in [Phase::Ready, Phase::Switched, Phase::Completed] {
            block[0] = n as u8;
            let offset = (n % 2) * 4096 * 5;
            n += 1;
            let t = Instant::now();
            bare.write_all_at(&block, offset).ctx(|| "pwrite".into())?;
            bare.sync_data().ctx(|| "fdatasync".into())?;

            let bare_ms = t.elapsed().as_secs_f64() * 1e3;

            let t = Instant::now();
            j.commit(phase, 0)
                .map_err(|e| format!("commit {phase:?}: {e}"))?;
            let commit_ms = t.elapsed().as_secs_f64() * 1e3;
            if phase == Phase::Switched {
                switched.push(commit_ms);
                switched_bares.push(bare_ms);
            } else {
                commits.push(commit_ms);
                bares.push(bare_ms);
            }
        }
        drop(j);
        crate::util::remove_journal(&path)?;
    }
    drop(bare);
    remove(&bare_path)?;
    eprintln!(
        "   {} commits: median {:.3} ms; Switched (with the seal) median {:.3} ms; \
         bare pwrite + fdatasync median {:.3} ms",
        commits.len() + switched.len(),
        median(&commits),
        median(&switched),
        median(&bares)
    );
    let pairs: Vec<f64> = bares.chunks(1).map(|c| 2.0 * c[0]).collect();
    let r = &mut ctx.report;
    r.row(
        "journal.commit",
        "5 journal",
        "one commit (Ready, Completed)",
        "ms",
        Better::Lower,
        ("`Journal::commit`", &commits),
        ("4 KiB pwrite + fdatasync", &bares),
    );
    r.row(
        "journal.switched",
        "5 journal",
        "the Switched commit (two copies and the seal)",
        "ms",
        Better::Lower,
        ("`Journal::commit`", &switched),
        ("4 KiB pwrite + fdatasync", &switched_bares),
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
