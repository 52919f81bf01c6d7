//! Recovery decisions. Pure code: bytes in, verdict out.
//!
//! Recovery reads every block (eleven; ten in format 1), classifies each, condenses what it saw into
//! an [`Evidence`] value, and looks the evidence up in [`TABLE`]. The table is
//! data; a test enumerates every possible evidence value and checks that one
//! row decides it and that no row is dead.
//!
//! The rules behind the table, given the write protocol (copy A, sync,
//! copy B, sync, and a record is acknowledged only after the second sync):
//!
//! 1. One crash or one media fault damages at most one copy of one record,
//!    so the newest acknowledged record always keeps at least one valid copy.
//! 2. The slot after the newest record (`(S+1) % 4`) is where the next record
//!    would have gone. One damaged copy there is a crash while writing copy A
//!    (never acknowledged) or a single fault on an old record: harmless. Both
//!    copies damaged cannot come from one fault and may hide an acknowledged
//!    record S+1: refuse, never fall back to S.
//! 3. Two valid copies of one sequence number with different contents means
//!    two writers or a bug: refuse.
//! 4. Each record names its parent's checksum; a parent that is present but
//!    does not match, or was never written where it must be, means lost
//!    writes: refuse. A parent both of whose copies are unreadable is lost
//!    history only; the newest record stands on its own checksum.
//! 5. A block of another journal, or of a newer format, stops everything.
//! 6. Format 2: the seal block holds a third copy of the newest record that
//!    changed the authoritative side (Switched, Resolved), written with copy
//!    B. It counts as one more copy of its record, so two faults on that
//!    record's blocks still leave one, and recovery never falls back past
//!    a switch that two faults hid in the ring.

use super::format::{self, Defect, FORMAT_V1, Frame, Kind, Position, SLOTS};
use super::payload::{self, HeaderV1, Phase, Record};

/// How a block was classified.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Class {
    /// A well-formed block of this journal, at the position it names.
    Valid,
    /// A well-formed block of this journal found at another position than
    /// the one it names: a misdirected write. A misplaced record still
    /// counts as a copy of that record; its location counts as damaged.
    Misplaced,
    /// A well-formed block of another journal.
    Foreign,
    /// A block of a newer format version or with an unknown required feature.
    Unsupported,
    /// Anything else: torn, rotted, zeroed, never written.
    Invalid,
    /// The read failed.
    Unreadable,
}

impl Class {
    /// Lower-case name for output.
    pub fn name(self) -> &'static str {
        match self {
            Class::Valid => "valid",
            Class::Misplaced => "misplaced",
            Class::Foreign => "foreign",
            Class::Unsupported => "unsupported",
            Class::Invalid => "invalid",
            Class::Unreadable => "unreadable",
        }
    }
}

/// What recovery saw at one position.
#[derive(Debug, Clone)]
pub struct BlockReport {
    /// The physical position.
    pub position: Position,
    /// The classification.
    pub class: Class,
    /// The block's kind, when its frame decoded.
    pub kind: Option<Kind>,
    /// The block's sequence number, when its frame decoded.
    pub seq: Option<u64>,
    /// The record's phase, when it is a decodable record.
    pub phase: Option<Phase>,
    /// The content checksum, when its frame decoded.
    pub content_crc: Option<u32>,
    /// Why the block has its class, for humans.
    pub detail: String,
}

/// Why recovery refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalReason {
    /// The evidence cannot be explained by one crash or one fault; a human
    /// must choose the authoritative image (`copyctl resolve`).
    NeedsOperator,
    /// The file is another job's journal, or mixes blocks of several.
    WrongJournal,
    /// Written by a newer version of this software.
    Unsupported,
    /// Nothing in the file is a readable journal block.
    Corrupt,
    /// The file does not have the size of a journal.
    Truncated,
}

impl RefusalReason {
    /// Kebab-case name for output.
    pub fn name(self) -> &'static str {
        match self {
            RefusalReason::NeedsOperator => "needs-operator",
            RefusalReason::WrongJournal => "wrong-journal",
            RefusalReason::Unsupported => "unsupported-version",
            RefusalReason::Corrupt => "corrupt",
            RefusalReason::Truncated => "truncated",
        }
    }
}

/// Recovery's refusal, with a reason a program can act on and words for a human.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The category.
    pub reason: RefusalReason,
    /// What was seen.
    pub detail: String,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.reason.name(), self.detail)
    }
}

/// The header copies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Headers {
    /// Both valid and equal.
    Both,
    /// One valid.
    One,
    /// Neither valid.
    Neither,
    /// Both valid, contents differ.
    Disagree,
}

/// The newest record S.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Newest {
    /// Both copies of S valid.
    TwoCopies,
    /// One copy of S valid.
    OneCopy,
    /// No valid record at all.
    NoRecord,
}

/// The slot after the newest record, `(S+1) % 4`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Successor {
    /// Both copies hold valid older records or empty-slot blocks.
    Intact,
    /// One copy damaged.
    OneDamaged,
    /// Both copies damaged.
    BothDamaged,
}

/// The link from S to S-1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parent {
    /// S starts a chain (the first record, or an operator's resolution).
    ChainStart,
    /// S-1 is present and S names it, with a legal transition.
    Linked,
    /// Both copies of S-1's slot are unreadable or invalid.
    Unreadable,
    /// S-1 is present but does not match, or its slot holds something else.
    Broken,
}

/// Everything the decision depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Evidence {
    /// A block of a newer format or with an unknown required feature.
    pub unsupported: bool,
    /// A block of another journal.
    pub foreign: bool,
    /// At least one valid block of this journal.
    pub ours: bool,
    /// The header copies.
    pub headers: Headers,
    /// The newest record.
    pub newest: Newest,
    /// Two valid blocks with one sequence number and different contents.
    pub fork: bool,
    /// The slot after the newest record.
    pub successor: Successor,
    /// The link to the parent.
    pub parent: Parent,
}

/// What to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Return the newest record.
    Return,
    /// Refuse.
    Refuse(RefusalReason),
}

/// A field pattern: an empty slice matches anything.
type Pat<T> = &'static [T];

fn hit<T: PartialEq>(pattern: Pat<T>, value: T) -> bool {
    pattern.is_empty() || pattern.contains(&value)
}

/// One row of the decision table.
#[derive(Debug)]
pub struct Row {
    /// Short name, shown in reports.
    pub label: &'static str,
    /// Pattern on [`Evidence::unsupported`].
    pub unsupported: Pat<bool>,
    /// Pattern on [`Evidence::foreign`].
    pub foreign: Pat<bool>,
    /// Pattern on [`Evidence::ours`].
    pub ours: Pat<bool>,
    /// Pattern on [`Evidence::headers`].
    pub headers: Pat<Headers>,
    /// Pattern on [`Evidence::newest`].
    pub newest: Pat<Newest>,
    /// Pattern on [`Evidence::fork`].
    pub fork: Pat<bool>,
    /// Pattern on [`Evidence::successor`].
    pub successor: Pat<Successor>,
    /// Pattern on [`Evidence::parent`].
    pub parent: Pat<Parent>,
    /// The decision.
    pub decision: Decision,
    /// Why, for humans.
    pub why: &'static str,
}

impl Row {
    /// Whether this row's patterns all match.
    pub fn matches(&self, e: &Evidence) -> bool {
        hit(self.unsupported, e.unsupported)
            && hit(self.foreign, e.foreign)
            && hit(self.ours, e.ours)
            && hit(self.headers, e.headers)
            && hit(self.newest, e.newest)
            && hit(self.fork, e.fork)
            && hit(self.successor, e.successor)
            && hit(self.parent, e.parent)
    }
}

const ANY: Row = Row {
    label: "",
    unsupported: &[false],
    foreign: &[false],
    ours: &[true],
    headers: &[],
    newest: &[],
    fork: &[false],
    successor: &[],
    parent: &[],
    decision: Decision::Refuse(RefusalReason::NeedsOperator),
    why: "",
};

use Decision::{Refuse, Return};
use RefusalReason::{Corrupt, NeedsOperator, Unsupported, WrongJournal};

/// The decision table. Rows are tried in order; the first match decides.
pub static TABLE: &[Row] = &[
    Row {
        label: "newer-format",
        unsupported: &[true],
        foreign: &[],
        ours: &[],
        fork: &[],
        decision: Refuse(Unsupported),
        why: "a block was written by a newer format version or needs an unknown feature",
        ..ANY
    },
    Row {
        label: "foreign-block",
        foreign: &[true],
        ours: &[],
        fork: &[],
        decision: Refuse(WrongJournal),
        why: "a block belongs to another journal: wrong or mixed file",
        ..ANY
    },
    Row {
        label: "not-a-journal",
        ours: &[false],
        fork: &[],
        decision: Refuse(Corrupt),
        why: "no block of the file is a valid journal block",
        ..ANY
    },
    Row {
        label: "headers-disagree",
        headers: &[Headers::Disagree],
        fork: &[],
        decision: Refuse(NeedsOperator),
        why: "both header copies are valid and differ (an interrupted resolve leaves them so: \
              run `copyctl resolve` again)",
        ..ANY
    },
    Row {
        label: "no-record",
        headers: &[Headers::Both, Headers::One, Headers::Neither],
        newest: &[Newest::NoRecord],
        fork: &[],
        decision: Refuse(NeedsOperator),
        why: "the header is there but every copy of every record is damaged",
        ..ANY
    },
    Row {
        label: "fork",
        headers: &[Headers::Both, Headers::One, Headers::Neither],
        newest: &[Newest::TwoCopies, Newest::OneCopy],
        fork: &[true],
        decision: Refuse(NeedsOperator),
        why: "two valid blocks carry one sequence number with different contents: two writers",
        ..ANY
    },
    Row {
        label: "successor-lost",
        headers: &[Headers::Both, Headers::One, Headers::Neither],
        newest: &[Newest::TwoCopies, Newest::OneCopy],
        successor: &[Successor::BothDamaged],
        decision: Refuse(NeedsOperator),
        why: "both copies of the slot after the newest record are damaged: \
              a newer record may have been acknowledged and destroyed",
        ..ANY
    },
    Row {
        label: "chain-broken",
        headers: &[Headers::Both, Headers::One, Headers::Neither],
        newest: &[Newest::TwoCopies, Newest::OneCopy],
        successor: &[Successor::Intact, Successor::OneDamaged],
        parent: &[Parent::Broken],
        decision: Refuse(NeedsOperator),
        why: "the newest record's parent is missing or does not match: lost writes",
        ..ANY
    },
    Row {
        label: "intact",
        headers: &[Headers::Both],
        newest: &[Newest::TwoCopies],
        successor: &[Successor::Intact],
        parent: &[Parent::ChainStart, Parent::Linked],
        decision: Return,
        why: "every block is as the protocol leaves it",
        ..ANY
    },
    Row {
        label: "repairable",
        headers: &[Headers::Both, Headers::One, Headers::Neither],
        newest: &[Newest::TwoCopies, Newest::OneCopy],
        successor: &[Successor::Intact, Successor::OneDamaged],
        parent: &[Parent::ChainStart, Parent::Linked, Parent::Unreadable],
        decision: Return,
        why: "at most one copy of any block is damaged, as one crash or one fault leaves it; \
              the newest record stands",
        ..ANY
    },
];

/// The first row that matches `evidence`.
pub fn decide(evidence: &Evidence) -> &'static Row {
    TABLE
        .iter()
        .find(|row| row.matches(evidence))
        .expect("the decision table covers every evidence value (tested)")
}

/// A rewrite that restores a damaged copy from its intact twin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Repair {
    /// The copy to rewrite.
    pub target: Position,
    /// The intact copy to rewrite it from.
    pub source: Position,
}

/// The record recovery settled on.
#[derive(Debug, Clone)]
pub struct Recovered {
    /// The file's format version.
    pub version: u16,
    /// The journal's UUID.
    pub uuid: [u8; 16],
    /// The header, if a copy was valid.
    pub header: Option<HeaderV1>,
    /// The newest record's sequence number.
    pub seq: u64,
    /// Its content checksum (the parent of the next record).
    pub content_crc: u32,
    /// The record.
    pub record: Record,
    /// Damaged copies that can be rewritten from intact twins.
    pub repairs: Vec<Repair>,
    /// Things a human should know.
    pub warnings: Vec<String>,
}

/// Everything recovery found.
#[derive(Debug, Clone)]
pub struct Analysis {
    /// The file's format version (by its size).
    pub version: u16,
    /// One report per block, in file order.
    pub blocks: Vec<BlockReport>,
    /// The evidence (absent when the file could not be read as blocks).
    pub evidence: Option<Evidence>,
    /// The table row that decided, if any.
    pub row: Option<&'static str>,
    /// The verdict.
    pub outcome: Result<Recovered, Refusal>,
    /// The highest sequence number seen in any well-formed block of this
    /// journal, misplaced ones included.
    pub max_seq_seen: Option<u64>,
    /// The journal's UUID, as the headers (or, failing them, the records) give it.
    pub uuid: Option<[u8; 16]>,
    /// The newest record that decoded at its own position, whatever the verdict.
    pub newest_readable: Option<Record>,
    /// A valid header's payload, whatever the verdict.
    pub header: Option<HeaderV1>,
}

#[derive(Clone)]
struct Seen {
    report: BlockReport,
    frame: Option<Frame>,
    record: Option<Record>,
    header: Option<HeaderV1>,
}

fn read_frames(blocks: &[Result<Vec<u8>, String>]) -> Vec<(Position, Result<Frame, String>, bool)> {
    blocks
        .iter()
        .enumerate()
        .map(|(index, read)| {
            let position = Position::of_block(index);
            match read {
                Err(e) => (position, Err(e.clone()), true),
                Ok(bytes) => (
                    position,
                    format::decode(bytes).map_err(|d| defect_text(&d)),
                    false,
                ),
            }
        })
        .collect()
}

fn defect_text(d: &Defect) -> String {
    match d {
        Defect::Version(v) => format!("unsupported format version {v}"),
        other => other.to_string(),
    }
}

/// Analyses the blocks of a journal (each the bytes read, or the read
/// error). Pure: performs no I/O, never panics on any bytes.
pub fn analyse(blocks: &[Result<Vec<u8>, String>]) -> Analysis {
    let version = match blocks.len() {
        n if n == format::BLOCK_COUNT_V1 => FORMAT_V1,
        n => {
            assert_eq!(n, format::BLOCK_COUNT, "blocks of a journal");
            format::FORMAT_VERSION
        }
    };
    let mut frames = read_frames(blocks);
    let uuid = elect_uuid(&frames);
    // Every block of this journal is in the file's format: a block of a
    // newer one comes from a newer writer, one of an older one is damage.
    // A block of another journal is foreign whatever its format (checked
    // after the election, so that it is outvoted and settled like any
    // other foreign block).
    for (_, frame, _) in frames.iter_mut() {
        if let Ok(f) = frame
            && f.version != version
            && Some(f.uuid) == uuid
        {
            *frame = Err(if f.version > version {
                defect_text(&Defect::Version(f.version))
            } else {
                format!(
                    "a block of format {} in a journal of format {version}",
                    f.version
                )
            });
        }
    }

    let mut seen: Vec<Seen> = frames
        .into_iter()
        .map(|(position, frame, unreadable)| classify(position, frame, unreadable, uuid))
        .collect();

    // Records must carry the header's job id.
    let header = seen.iter().find_map(|s| s.header.clone());
    if let Some(h) = &header {
        for s in seen.iter_mut() {
            if s.record.as_ref().is_some_and(|r| r.job_id != h.job_id) {
                s.report.class = Class::Invalid;
                s.report.detail = "job id differs from the header's".into();
                s.record = None;
            }
        }
    }

    let max_seq_seen = seen
        .iter()
        .filter(|s| matches!(s.report.class, Class::Valid | Class::Misplaced))
        .filter(|s| s.report.kind == Some(Kind::Record))
        .filter_map(|s| s.report.seq)
        .max();
    let newest_readable = seen
        .iter()
        .filter_map(valid_record)
        .max_by_key(|(f, _)| f.seq)
        .map(|(_, r)| r.clone());
    let evidence = gather(&seen);
    let row = decide(&evidence);
    let header_for_analysis = header.clone();
    let outcome = match row.decision {
        Refuse(reason) => Err(Refusal {
            reason,
            detail: refusal_detail(row, &seen),
        }),
        Return => Ok(recovered(
            version,
            &seen,
            &evidence,
            uuid.expect("ours implies a uuid"),
            header,
        )),
    };
    Analysis {
        version,
        blocks: seen.into_iter().map(|s| s.report).collect(),
        evidence: Some(evidence),
        row: Some(row.label),
        outcome,
        max_seq_seen,
        uuid,
        newest_readable,
        header: header_for_analysis,
    }
}

/// The journal's identity: the UUID carried by more blocks that decode at
/// their own position than any other UUID (a tie elects none). One block of
/// another journal, wherever it lands (a header included), is then outvoted
/// by ours and classified `foreign`, instead of making ours foreign.
fn elect_uuid(frames: &[(Position, Result<Frame, String>, bool)]) -> Option<[u8; 16]> {
    let mut votes: Vec<([u8; 16], usize)> = Vec::new();
    for (position, frame, _) in frames {
        let Ok(frame) = frame else { continue };
        if frame.position != *position {
            continue;
        }
        match votes.iter_mut().find(|(uuid, _)| *uuid == frame.uuid) {
            Some((_, count)) => *count += 1,
            None => votes.push((frame.uuid, 1)),
        }
    }
    let most = votes.iter().map(|(_, count)| *count).max()?;
    let mut winners = votes.iter().filter(|(_, count)| *count == most);
    let winner = winners.next()?;
    winners.next().is_none().then_some(winner.0)
}

fn refusal_detail(row: &Row, seen: &[Seen]) -> String {
    let mut detail = row.why.to_string();
    if row.decision == Refuse(Unsupported)
        && let Some(s) = seen.iter().find(|s| s.report.class == Class::Unsupported)
    {
        detail = format!("{detail} ({} at {})", s.report.detail, s.report.position);
    }
    detail
}

fn classify(
    position: Position,
    frame: Result<Frame, String>,
    unreadable: bool,
    uuid: Option<[u8; 16]>,
) -> Seen {
    let mut report = BlockReport {
        position,
        class: Class::Invalid,
        kind: None,
        seq: None,
        phase: None,
        content_crc: None,
        detail: String::new(),
    };
    let frame = match frame {
        Err(detail) => {
            report.class = if unreadable {
                Class::Unreadable
            } else if detail.starts_with("unsupported") {
                Class::Unsupported
            } else {
                Class::Invalid
            };
            report.detail = detail;
            return Seen {
                report,
                frame: None,
                record: None,
                header: None,
            };
        }
        Ok(frame) => frame,
    };
    report.kind = Some(frame.kind);
    report.seq = Some(frame.seq);
    report.content_crc = Some(frame.content_crc);
    let mut seen = Seen {
        report,
        frame: None,
        record: None,
        header: None,
    };
    if Some(frame.uuid) != uuid {
        seen.report.class = Class::Foreign;
        seen.report.detail = format!("journal uuid {}", hex(&frame.uuid));
        return seen;
    }
    match frame.kind {
        Kind::Header => match payload::decode::<HeaderV1>(&frame.payload) {
            Err(e) => seen.report.detail = format!("header payload: {e}"),
            Ok(h) => match h.check() {
                Err((true, why)) => {
                    seen.report.class = Class::Unsupported;
                    seen.report.detail = why.into();
                }
                Err((false, why)) => seen.report.detail = why.into(),
                Ok(()) => seen.header = Some(h),
            },
        },
        Kind::Record => match payload::decode_record(frame.version, &frame.payload) {
            Err((newer, why)) => {
                if newer {
                    seen.report.class = Class::Unsupported;
                }
                seen.report.detail = why;
            }
            Ok(r) if r.starts_chain(frame.seq) && frame.parent_content_crc != 0 => {
                seen.report.detail = "a chain start names a parent".into()
            }
            Ok(r) => {
                seen.report.phase = Some(r.phase);
                seen.record = Some(r);
            }
        },
        Kind::EmptySlot => {}
    }
    if seen.report.class == Class::Unsupported || !seen.report.detail.is_empty() {
        seen.header = None;
        seen.record = None;
        return seen;
    }
    if frame.position != position {
        seen.report.class = Class::Misplaced;
        seen.report.detail = format!("names position {}", frame.position);
        // A misdirected record is still that record, written by this
        // journal's writer: it counts as a copy of it (its position does not).
        seen.header = None;
        seen.frame = Some(frame);
        return seen;
    }
    seen.report.class = Class::Valid;
    seen.frame = Some(frame);
    seen
}

fn slot_of(seq: u64) -> u8 {
    (seq % u64::from(SLOTS)) as u8
}

fn at(seen: &[Seen], position: Position) -> &Seen {
    &seen[position.block()]
}

fn valid_record(s: &Seen) -> Option<(&Frame, &Record)> {
    any_record(s).filter(|_| s.report.class == Class::Valid)
}

/// A record block of this journal, at its own position or misdirected.
fn any_record(s: &Seen) -> Option<(&Frame, &Record)> {
    match (&s.frame, &s.record) {
        (Some(f), Some(r)) if matches!(s.report.class, Class::Valid | Class::Misplaced) => {
            Some((f, r))
        }
        _ => None,
    }
}

fn gather(seen: &[Seen]) -> Evidence {
    let class_any = |c: Class| seen.iter().any(|s| s.report.class == c);
    let records: Vec<(&Frame, &Record)> = seen.iter().filter_map(any_record).collect();
    let newest_seq = records.iter().map(|(f, _)| f.seq).max();

    let headers: Vec<&Seen> = seen.iter().filter(|s| s.header.is_some()).collect();
    let headers = match headers.as_slice() {
        [] => Headers::Neither,
        [_] => Headers::One,
        [a, b]
            if a.frame.as_ref().map(|f| f.content_crc)
                == b.frame.as_ref().map(|f| f.content_crc) =>
        {
            Headers::Both
        }
        _ => Headers::Disagree,
    };

    // Same sequence number, different contents, among all well-formed records.
    let framed: Vec<&Frame> = seen
        .iter()
        .filter(|s| matches!(s.report.class, Class::Valid | Class::Misplaced))
        .filter_map(|s| s.frame.as_ref())
        .filter(|f| f.kind == Kind::Record)
        .collect();
    let fork = framed.iter().any(|a| {
        framed
            .iter()
            .any(|b| a.seq == b.seq && a.content_crc != b.content_crc)
    });

    let Some(s) = newest_seq else {
        return Evidence {
            unsupported: class_any(Class::Unsupported),
            foreign: class_any(Class::Foreign),
            ours: class_any(Class::Valid),
            headers,
            newest: Newest::NoRecord,
            fork,
            successor: Successor::Intact,
            parent: Parent::ChainStart,
        };
    };
    // The seal is a third copy for deciding, not one of the two the ring
    // should hold: a lost ring copy still shows as damage (and a warning).
    let copies_of_newest = records
        .iter()
        .filter(|(f, _)| f.seq == s && f.position != Position::Seal)
        .count();
    let newest = if copies_of_newest >= 2 {
        Newest::TwoCopies
    } else {
        Newest::OneCopy
    };

    let successor_slot = slot_of(s + 1);
    let damaged = (0..2)
        .filter(|&copy| {
            let b = at(
                seen,
                Position::Slot {
                    slot: successor_slot,
                    copy,
                },
            );
            b.report.class != Class::Valid
        })
        .count();
    let successor = match damaged {
        0 => Successor::Intact,
        1 => Successor::OneDamaged,
        _ => Successor::BothDamaged,
    };

    let (newest_frame, newest_record) = *records
        .iter()
        .find(|(f, _)| f.seq == s)
        .expect("newest exists");
    let parent = if newest_record.starts_chain(s) {
        Parent::ChainStart
    } else {
        let parent_slot = slot_of(s - 1);
        let blocks = [0, 1].map(|copy| {
            at(
                seen,
                Position::Slot {
                    slot: parent_slot,
                    copy,
                },
            )
        });
        match records.iter().find(|(f, _)| f.seq == s - 1) {
            Some((pf, pr)) if links(pf, pr, newest_frame, newest_record) => Parent::Linked,
            Some(_) => Parent::Broken,
            None if blocks
                .iter()
                .all(|b| matches!(b.report.class, Class::Invalid | Class::Unreadable)) =>
            {
                Parent::Unreadable
            }
            None => Parent::Broken,
        }
    };

    Evidence {
        unsupported: class_any(Class::Unsupported),
        foreign: class_any(Class::Foreign),
        ours: class_any(Class::Valid),
        headers,
        newest,
        fork,
        successor,
        parent,
    }
}

/// Whether `child` legitimately follows `parent`.
pub fn links(parent_frame: &Frame, parent: &Record, child_frame: &Frame, child: &Record) -> bool {
    let restart = child.writer_instance != parent.writer_instance;
    child_frame.seq == parent_frame.seq + 1
        && child_frame.parent_content_crc == parent_frame.content_crc
        && child.job_id == parent.job_id
        && child.pairs == parent.pairs
        && parent.phase.may_precede(child.phase, restart)
        && if restart {
            child.writer_epoch > parent.writer_epoch
        } else {
            child.writer_epoch == parent.writer_epoch
        }
}

fn recovered(
    version: u16,
    seen: &[Seen],
    evidence: &Evidence,
    uuid: [u8; 16],
    header: Option<HeaderV1>,
) -> Recovered {
    let (frame, record) = seen
        .iter()
        .filter_map(any_record)
        .max_by_key(|(f, _)| f.seq)
        .expect("a returnable verdict has a record");
    let mut warnings = Vec::new();
    match evidence.headers {
        Headers::One => warnings.push("one header copy is damaged".to_string()),
        Headers::Neither => {
            warnings.push("both header copies are damaged; records carry the identity".to_string())
        }
        _ => {}
    }
    if evidence.newest == Newest::OneCopy {
        let copies = seen
            .iter()
            .filter_map(any_record)
            .filter(|(f, _)| f.seq == frame.seq)
            .count();
        warnings.push(if copies > 1 {
            format!(
                "a ring copy of the newest record (seq {}) is damaged; the seal holds another",
                frame.seq
            )
        } else {
            format!(
                "only one copy of the newest record (seq {}) is valid",
                frame.seq
            )
        });
    }
    if evidence.parent == Parent::Unreadable {
        warnings
            .push("both copies of the previous record are unreadable: history lost".to_string());
    }
    for s in seen.iter().filter(|s| s.report.class == Class::Misplaced) {
        warnings.push(format!(
            "misdirected block at {}: {}",
            s.report.position, s.report.detail
        ));
    }
    Recovered {
        version,
        uuid,
        header,
        seq: frame.seq,
        content_crc: frame.content_crc,
        record: record.clone(),
        repairs: repairs(seen, frame.seq),
        warnings,
    }
}

/// Rank of a valid block for choosing the copy to repair from: any record
/// beats an empty slot, a newer record beats an older one.
fn rank(s: &Seen) -> Option<(u8, u64)> {
    match (&s.frame, s.report.class) {
        (Some(f), Class::Valid) => match f.kind {
            Kind::Record if s.record.is_some() => Some((2, f.seq)),
            Kind::Header if s.header.is_some() => Some((1, 0)),
            Kind::EmptySlot => Some((0, 0)),
            _ => None,
        },
        _ => None,
    }
}

/// What a block holds, for planning repairs: kind, sequence, content.
type Content = (Kind, u64, u32);

fn content(s: &Seen) -> Option<Content> {
    let f = s.frame.as_ref()?;
    matches!(s.report.class, Class::Valid | Class::Misplaced).then_some((
        f.kind,
        f.seq,
        f.content_crc,
    ))
}

/// Plans the rewrites that put every damaged copy back from an intact one.
///
/// Wanted: both copies of the newest record S in S's slot, both copies of
/// S-1 in its slot (when a copy of S-1 exists anywhere: misdirected copies
/// count), and for every other pair, both copies equal to the better one.
///
/// Safety: a rewrite never destroys the last copy of S, of S-1 or of the
/// header. Rewrites are ordered so that a block holding the only copy of one
/// of them is overwritten only after that content was written elsewhere;
/// whatever cannot be ordered that way is left undone (recovery still
/// returns S; the rest waits for the next repair or an operator).
fn repairs(seen: &[Seen], newest: u64) -> Vec<Repair> {
    let copies_of = |seq: u64| -> Vec<Position> {
        let mut found: Vec<&Seen> = seen
            .iter()
            .filter(|s| any_record(s).is_some_and(|(f, _)| f.seq == seq))
            .collect();
        // In-place copies first: the preferred source.
        found.sort_by_key(|s| s.report.class != Class::Valid);
        found.iter().map(|s| s.report.position).collect()
    };
    // (target, source) for every position that should change.
    let mut wanted: Vec<Repair> = Vec::new();
    let mut placed_slots = Vec::new();
    for seq in [Some(newest), newest.checked_sub(1)].into_iter().flatten() {
        let Some(&source) = copies_of(seq).first() else {
            continue;
        };
        let slot = slot_of(seq);
        placed_slots.push(slot);
        for copy in 0..2 {
            let target = Position::Slot { slot, copy };
            let holds = valid_record(at(seen, target)).is_some_and(|(f, _)| f.seq == seq);
            if !holds {
                wanted.push(Repair { target, source });
            }
        }
    }
    // The seal keeps a third copy of the newest record that changed sides:
    // S if it is one, else S-1 (a Completed after its Switched). Anything
    // else found there (a misdirected block, damage) is replaced by it.
    let sealed = [Some(newest), newest.checked_sub(1)]
        .into_iter()
        .flatten()
        .find(|&seq| {
            seen.iter()
                .filter_map(any_record)
                .any(|(f, r)| f.seq == seq && r.phase.sealed())
        });
    if let Some(sealed) = sealed.filter(|_| seen.len() > Position::Seal.block()) {
        let holds = valid_record(at(seen, Position::Seal)).is_some_and(|(f, _)| f.seq == sealed);
        if let (false, Some(&source)) = (holds, copies_of(sealed).first()) {
            wanted.push(Repair {
                target: Position::Seal,
                source,
            });
        }
    }
    let firsts = std::iter::once(Position::Header { copy: 0 }).chain(
        (0..SLOTS)
            .filter(|slot| !placed_slots.contains(slot))
            .map(|slot| Position::Slot { slot, copy: 0 }),
    );
    for first in firsts {
        let (a, b) = (at(seen, first), at(seen, first.twin()));
        let (best, other) = match (rank(a), rank(b)) {
            (Some(ra), Some(rb)) if ra >= rb => (a, b),
            (Some(_), Some(_)) | (None, Some(_)) => (b, a),
            (Some(_), None) => (a, b),
            (None, None) => continue,
        };
        let same = other.report.class == Class::Valid && content(best) == content(other);
        if !same {
            wanted.push(Repair {
                target: other.report.position,
                source: best.report.position,
            });
        }
    }

    // Order them so that no write destroys the last copy of what matters.
    let mut holds: Vec<Option<Content>> = seen.iter().map(content).collect();
    let precious: Vec<Content> = seen
        .iter()
        .filter_map(content)
        .filter(|c| {
            c.0 == Kind::Header || (c.0 == Kind::Record && (c.1 == newest || c.1 + 1 == newest))
        })
        .collect();
    let copies =
        |holds: &[Option<Content>], c: Content| holds.iter().filter(|h| **h == Some(c)).count();
    let mut ordered = Vec::new();
    let mut pending = wanted;
    loop {
        let safe = pending.iter().position(|r| match holds[r.target.block()] {
            Some(c) if precious.contains(&c) => copies(&holds, c) >= 2,
            _ => true,
        });
        let Some(index) = safe else { break };
        let repair = pending.remove(index);
        holds[repair.target.block()] = content(&seen[repair.source.block()]);
        ordered.push(repair);
    }
    ordered
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Analysis of a file of the wrong size.
pub fn truncated(len: u64) -> Analysis {
    Analysis {
        version: format::FORMAT_VERSION,
        blocks: Vec::new(),
        evidence: None,
        row: None,
        outcome: Err(Refusal {
            reason: RefusalReason::Truncated,
            detail: format!(
                "the file is {len} bytes; a journal is exactly {} bytes (format 2) or {} (format 1)",
                format::JOURNAL_LEN,
                format::JOURNAL_LEN_V1
            ),
        }),
        max_seq_seen: None,
        uuid: None,
        newest_readable: None,
        header: None,
    }
}
