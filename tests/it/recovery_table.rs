//! The recovery decision table, checked against every possible input.
//!
//! TigerBeetle's `recovery_cases` test, adapted: enumerate every evidence
//! value, require that some row decides it, that every row decides at least
//! one value (no dead rows), and that the decision is the one the safety
//! argument demands, stated here independently of the table.

use livecopy::journal::recovery::{
    Decision, Evidence, Headers, Newest, Parent, RefusalReason, Successor, TABLE, decide,
};

fn every_evidence() -> Vec<Evidence> {
    let bools = [false, true];
    let headers = [
        Headers::Both,
        Headers::One,
        Headers::Neither,
        Headers::Disagree,
    ];
    let newest = [Newest::TwoCopies, Newest::OneCopy, Newest::NoRecord];
    let successor = [
        Successor::Intact,
        Successor::OneDamaged,
        Successor::BothDamaged,
    ];
    let parent = [
        Parent::ChainStart,
        Parent::Linked,
        Parent::Unreadable,
        Parent::Broken,
    ];
    let mut all = Vec::new();
    for unsupported in bools {
        for foreign in bools {
            for ours in bools {
                for headers in headers {
                    for newest in newest {
                        for fork in bools {
                            for successor in successor {
                                for parent in parent {
                                    all.push(Evidence {
                                        unsupported,
                                        foreign,
                                        ours,
                                        headers,
                                        newest,
                                        fork,
                                        successor,
                                        parent,
                                    });
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    all
}

/// The decision the safety argument requires, written without the table.
fn required(e: &Evidence) -> Decision {
    use RefusalReason::*;
    if e.unsupported {
        return Decision::Refuse(Unsupported);
    }
    if e.foreign {
        return Decision::Refuse(WrongJournal);
    }
    if !e.ours {
        return Decision::Refuse(Corrupt);
    }
    // Return only when the newest record exists, nobody else wrote, nothing
    // newer can hide behind damage, and the chain does not show lost writes.
    let returnable = e.newest != Newest::NoRecord
        && e.headers != Headers::Disagree
        && !e.fork
        && e.successor != Successor::BothDamaged
        && e.parent != Parent::Broken;
    if returnable {
        Decision::Return
    } else {
        Decision::Refuse(NeedsOperator)
    }
}

#[test]
fn every_evidence_value_is_decided_safely_and_no_row_is_dead() {
    let all = every_evidence();
    let mut first_matches = vec![0usize; TABLE.len()];
    let mut returned = 0;
    for evidence in &all {
        let row = decide(evidence);
        let index = TABLE
            .iter()
            .position(|r| r.label == row.label)
            .expect("row from TABLE");
        first_matches[index] += 1;
        assert_eq!(
            row.decision,
            required(evidence),
            "row {} decides {evidence:?} wrongly",
            row.label
        );
        if row.decision == Decision::Return {
            returned += 1;
        }
    }
    for (row, count) in TABLE.iter().zip(&first_matches) {
        assert!(
            *count > 0,
            "row {} never decides anything: dead row",
            row.label
        );
    }
    println!(
        "recovery table: {} evidence values, {} rows, {} return a record, {} refuse",
        all.len(),
        TABLE.len(),
        returned,
        all.len() - returned
    );
}

#[test]
fn row_labels_are_unique_and_every_row_explains_itself() {
    for (i, row) in TABLE.iter().enumerate() {
        assert!(!row.why.is_empty(), "row {} has no explanation", row.label);
        assert!(
            TABLE[i + 1..].iter().all(|other| other.label != row.label),
            "duplicate label {}",
            row.label
        );
    }
}
