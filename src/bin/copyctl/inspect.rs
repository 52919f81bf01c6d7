//! `copyctl inspect`: every block, for people debugging a journal.

use livecopy::journal;
use livecopy::storage::{JournalAccess, LockState};
use serde_json::{Value, json};

use crate::args::{InspectArgs, Output};
use crate::exit::Exit;
use crate::output::{self, emit, warn};

pub fn run(args: &InspectArgs, out: Output) -> anyhow::Result<Exit> {
    let opened = journal::open_file(&args.journal, JournalAccess::Inspect)?;
    if opened.lock == LockState::HeldElsewhere {
        warn("another process holds the journal lock; what is shown may change while you read it");
    }
    let analysis = &opened.analysis;
    let verdict = match &analysis.outcome {
        Ok(r) => json!({
            "verdict": "authoritative",
            "authoritative": r.record.authoritative.name(),
            "seq": r.seq,
            "phase": r.record.phase.name(),
            "repairable": output::repairs_json(&r.repairs),
            "warnings": r.warnings,
        }),
        Err(refusal) => json!({ "verdict": "refused", "refusal": output::refusal_json(refusal) }),
    };
    let json = json!({
        "journal": args.journal,
        "locked_elsewhere": opened.lock == LockState::HeldElsewhere,
        "blocks": analysis.blocks.iter().map(output::block_json).collect::<Value>(),
        "decision": analysis.row,
        "recovery": verdict,
    });
    let mut human = format!(
        "{:<9} {:>6}  {:<11} {:<9} {:>5}  {:<10} {:<8}  {}\n",
        "position", "offset", "class", "kind", "seq", "phase", "crc", "detail"
    );
    for b in &analysis.blocks {
        human.push_str(&format!(
            "{:<9} {:>6}  {:<11} {:<9} {:>5}  {:<10} {:<8}  {}\n",
            b.position.to_string(),
            b.position.offset(),
            b.class.name(),
            b.kind
                .map(|k| format!("{k:?}").to_lowercase())
                .unwrap_or_else(|| "-".into()),
            b.seq.map(|s| s.to_string()).unwrap_or_else(|| "-".into()),
            b.phase.map(|p| p.name()).unwrap_or("-"),
            b.content_crc
                .map(|c| format!("{c:08x}"))
                .unwrap_or_else(|| "-".into()),
            b.detail
        ));
    }
    match &analysis.outcome {
        Ok(r) => human.push_str(&format!(
            "recovery: {} authoritative (seq {}, {}) [{}]\n",
            r.record.authoritative.name(),
            r.seq,
            r.record.phase.name(),
            analysis.row.unwrap_or("-")
        )),
        Err(refusal) => human.push_str(&format!("recovery: refused: {refusal}\n")),
    }
    emit(out, json, &human)?;
    Ok(Exit::Ok)
}
