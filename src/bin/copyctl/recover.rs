//! `copyctl recover`: the restart path.

use std::path::PathBuf;

use livecopy::journal::{self, Side, recovery::hex};
use livecopy::storage::{self, JournalAccess};
use serde_json::json;

use crate::args::{Output, RecoverArgs};
use crate::exit::Exit;
use crate::output::{self, emit, warn};

pub fn run(args: &RecoverArgs, out: Output) -> anyhow::Result<Exit> {
    let opened = journal::open_file(&args.journal, JournalAccess::Exclusive)?;
    let analysis = &opened.analysis;
    let recovered = match &analysis.outcome {
        Err(refusal) => {
            let json = json!({
                "journal": args.journal,
                "verdict": "refused",
                "refusal": output::refusal_json(refusal),
                "decision": analysis.row,
            });
            let human = format!("refused: {}\n  {}\n", refusal.reason.name(), refusal.detail);
            emit(out, json, &human)?;
            return Ok(Exit::of_refusal(refusal.reason));
        }
        Ok(recovered) => recovered,
    };

    let mut backup: Option<PathBuf> = None;
    let repaired = if args.no_repair {
        Vec::new()
    } else {
        journal::repair(&opened.storage, recovered, |image| {
            backup = Some(storage::write_backup_copy(&args.journal, image)?);
            Ok(())
        })?
        .done
    };
    let mut warnings = recovered.warnings.clone();
    let record = &recovered.record;
    let image = match record.authoritative {
        Side::Source => &record.source,
        Side::Destination => &record.destination,
    };
    match storage::stat_identity(std::path::Path::new(&image.path)) {
        Ok(None) => warnings.push(format!("the authoritative image {} does not exist", image.path)),
        Ok(Some(now)) if (now.device, now.inode, now.size) != (image.device, image.inode, image.size) => {
            warnings.push(format!(
                "{} changed since the job started: recorded device {} inode {} size {}, now device {} inode {} size {}",
                image.path, image.device, image.inode, image.size, now.device, now.inode, now.size
            ))
        }
        Ok(Some(_)) => {}
        Err(e) => warnings.push(format!("cannot check {}: {}", image.path, e.describe())),
    }
    for warning in &warnings {
        warn(warning);
    }

    let json = json!({
        "journal": args.journal,
        "journal_uuid": hex(&recovered.uuid),
        "verdict": "authoritative",
        "authoritative": record.authoritative.name(),
        "image": output::image_json(image),
        "phase": record.phase.name(),
        "seq": recovered.seq,
        "record": output::record_json(recovered.seq, record),
        "decision": analysis.row,
        "repaired": output::repairs_json(&repaired),
        "repairable": output::repairs_json(if args.no_repair { &recovered.repairs } else { &[] }),
        "backup": backup,
        "warnings": warnings,
    });
    let mut human = format!(
        "authoritative: {}\nimage:         {} ({} bytes)\nphase:         {} (seq {}, writer epoch {})\n",
        record.authoritative.name(),
        image.path,
        image.size,
        record.phase.name(),
        recovered.seq,
        record.writer_epoch
    );
    for r in &repaired {
        human.push_str(&format!("repaired:      {} from {}\n", r.target, r.source));
    }
    if let Some(path) = &backup {
        human.push_str(&format!("backup:        {}\n", path.display()));
    }
    if args.no_repair {
        for r in &recovered.repairs {
            human.push_str(&format!("repairable:    {} from {}\n", r.target, r.source));
        }
    }
    emit(out, json, &human)?;
    Ok(Exit::Ok)
}
