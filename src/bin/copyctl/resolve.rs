//! `copyctl resolve`: the operator's explicit way out of needs-operator.

use livecopy::journal::{self, RefusalReason, Side};
use livecopy::storage::{self, JournalAccess};
use serde_json::json;

use crate::args::{Authority, Output, ResolveArgs};
use crate::exit::Exit;
use crate::output::emit;

pub fn run(args: &ResolveArgs, out: Output) -> anyhow::Result<Exit> {
    let opened = journal::open_file(&args.journal, JournalAccess::Exclusive)?;
    let analysis = &opened.analysis;
    match &analysis.outcome {
        Ok(r) => {
            anyhow::bail!(livecopy::Error::InvalidInput(format!(
                "the journal needs no resolution: recovery names the {} (seq {}, {})",
                r.record.authoritative.name(),
                r.seq,
                r.record.phase.name()
            )))
        }
        // A block of another journal among a majority of ours is damage an
        // operator may settle; a file that is mostly another journal's is
        // not this journal to resolve.
        Err(refusal)
            if !(refusal.reason == RefusalReason::NeedsOperator
                || refusal.reason == RefusalReason::WrongJournal && analysis.uuid.is_some()) =>
        {
            anyhow::bail!(livecopy::Error::Refused(refusal.clone()))
        }
        Err(_) => {}
    }
    let authority = match args.authority {
        Authority::Source => Side::Source,
        Authority::Destination => Side::Destination,
    };
    let mut backup = None;
    let seq = journal::resolve(&opened.storage, analysis, authority, |image| {
        backup = Some(storage::write_backup_copy(&args.journal, image)?);
        Ok(())
    })?;
    let json = json!({
        "journal": args.journal,
        "resolved": authority.name(),
        "seq": seq,
        "backup": backup,
    });
    let human = format!(
        "resolved: {} is authoritative (seq {seq})\nbackup:   {}\n",
        authority.name(),
        backup
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default()
    );
    emit(out, json, &human)?;
    Ok(Exit::Ok)
}
