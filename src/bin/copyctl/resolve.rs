//! `copyctl resolve`: the operator's explicit way out of needs-operator.

use livecopy::journal::{self, Side, recovery::hex};
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
        // `resolvable` says which refusals an operator may settle: one block
        // of another journal among ours is damage; more may be a file that
        // is mostly another journal's, never this journal to resolve.
        Err(refusal) if !journal::resolvable(analysis) => {
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
    // The operator sees which job and image the resolution names, so that a
    // journal of another job is noticed before anything boots from it.
    let identity = analysis
        .newest_readable
        .as_ref()
        .expect("resolve succeeded with a readable record");
    let image = identity.image(authority).name().to_string();
    let json = json!({
        "journal": args.journal,
        "resolved": authority.name(),
        "image": image,
        "job_id": hex(&identity.job_id),
        "seq": seq,
        "backup": backup,
    });
    let human = format!(
        "resolved: {} is authoritative (seq {seq})\nimage:    {image}\njob:      {}\nbackup:   {}\n",
        authority.name(),
        hex(&identity.job_id),
        backup
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default()
    );
    emit(out, json, &human)?;
    Ok(Exit::Ok)
}
