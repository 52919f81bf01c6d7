//! `copyctl recover`: the restart path.

use std::path::PathBuf;

use anyhow::Context;

use livecopy::journal::{self, recovery::hex};
use livecopy::storage::{self, JournalAccess};
use serde_json::json;

use crate::args::{Output, RecoverArgs};
use crate::exit::Exit;
use crate::output::{self, emit, warn};

pub fn run(args: &RecoverArgs, out: Output) -> anyhow::Result<Exit> {
    // --no-repair writes nothing, so it opens read-only: it gives the
    // verdict on a read-only or full file system too.
    let access = if args.no_repair {
        JournalAccess::ReadOnly
    } else {
        JournalAccess::Exclusive
    };
    let opened = journal::open_file(&args.journal, access)?;
    let analysis = &opened.analysis;
    let recovered = match &analysis.outcome {
        Err(refusal) => {
            let json = json!({
                "journal": args.journal,
                "verdict": "refused",
                "refusal": output::refusal_json(refusal),
                "decision": analysis.row,
            });
            let mut human = format!("refused: {}\n  {}\n", refusal.reason.name(), refusal.detail);
            if refusal.reason == journal::RefusalReason::NeedsOperator {
                human.push_str(&format!(
                    "  an operator who knows which image the guest last wrote decides with\n  \
                     `copyctl resolve {} --authority source|destination`\n",
                    args.journal.display()
                ));
            }
            emit(out, json, &human)?;
            return Ok(Exit::of_refusal(refusal.reason));
        }
        Ok(recovered) => recovered,
    };
    // Before any repair: another job's journal is not ours to write.
    let expected = livecopy::restart::Expected {
        source: args
            .source
            .as_deref()
            .map(crate::copy::location)
            .transpose()?,
        destination: args
            .destination
            .as_deref()
            .map(crate::copy::location)
            .transpose()?,
    };
    if let Err(livecopy::Error::Refused(refusal)) = expected.check(&recovered.record) {
        let json = json!({
            "journal": args.journal,
            "verdict": "refused",
            "refusal": output::refusal_json(&refusal),
            "decision": "expected-images",
        });
        let human = format!("refused: {}\n  {}\n", refusal.reason.name(), refusal.detail);
        emit(out, json, &human)?;
        return Ok(Exit::of_refusal(refusal.reason));
    }

    let mut backup: Option<PathBuf> = None;
    let repaired = if args.no_repair {
        Vec::new()
    } else {
        journal::repair(&opened.storage, recovered, |image| {
            backup = Some(storage::write_backup_copy(&args.journal, image)?);
            Ok(())
        })
        // The exit code stays the error's own (8 for I/O): no verdict was
        // printed. The hint says how to get one without writing.
        .context("repairing the journal failed; `copyctl recover --no-repair` gives the verdict without writing")?
        .done
    };
    let mut warnings = recovered.warnings.clone();
    let record = &recovered.record;
    let image = record.image(record.authoritative);
    let nbd = storage::NbdOptions {
        tls_creds: args.tls_creds.clone(),
        ..Default::default()
    };
    warnings.extend(livecopy::restart::image_warning(image, &nbd));
    for warning in &warnings {
        warn(warning);
    }
    // The verdict stands, but a guest cannot boot from an image that is
    // gone: a manager acting on exit 0 would try.
    let missing = match image {
        journal::ImageRef::File(file) => storage::stat_identity(std::path::Path::new(&file.path))
            .is_ok_and(|found| found.is_none()),
        journal::ImageRef::Export(_) => false,
    };

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
        "image_missing": missing,
    });
    let mut human = format!(
        "authoritative: {}\nimage:         {} ({} bytes)\nphase:         {} (seq {}, writer epoch {})\n",
        record.authoritative.name(),
        image.name(),
        image.size(),
        record.phase.name(),
        recovered.seq,
        record.writer_epoch
    );
    if let journal::ImageRef::Export(export) = image {
        human.push_str(if export.tls {
            "transport:     NBD over TLS (nbds)\n"
        } else {
            "transport:     NBD in plain text (no TLS)\n"
        });
    }
    if let Some(p) = record.progress() {
        human.push_str(&format!(
            "resume:        copy --resume / serve --resume copies again {} bytes \
             (checkpoint at {} bytes, {} extents of {} bytes listed)\n",
            p.bytes_to_copy(),
            p.cursor,
            p.extents().count(),
            p.extent_size
        ));
    }
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
    if missing {
        human.push_str(
            "missing:       the image does not exist (exit 5): restore it before booting\n",
        );
    }
    emit(out, json, &human)?;
    Ok(if missing {
        Exit::ImageMissing
    } else {
        Exit::Ok
    })
}
