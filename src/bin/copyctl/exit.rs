//! Exit codes. Stable: scripts depend on them; README.md lists them.

use std::process::ExitCode;

use livecopy::ErrorKind;
use livecopy::journal::RefusalReason;

/// Every exit code copyctl uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Exit {
    /// Done; for `recover`, the authoritative image is named.
    Ok = 0,
    /// An unexpected failure (a bug, or an error not listed below).
    Failure = 1,
    // 2 is clap's usage error.
    /// The journal cannot decide; an operator must (`copyctl resolve`).
    NeedsOperator = 3,
    /// Not a journal, damaged beyond reading, truncated, or another job's.
    Corrupt = 4,
    /// A file named on the command line does not exist.
    Missing = 5,
    /// A running engine holds the journal's lock.
    Locked = 6,
    /// Written by a newer version of livecopy.
    Unsupported = 7,
    /// An I/O error (the file could not be read, synced or written).
    Io = 8,
    /// The request makes no sense for this journal (e.g. resolving a journal
    /// that needs no resolution, a symlink or directory as journal path).
    BadInput = 9,
    /// `recover`: the authoritative image the journal names is gone. Not 5:
    /// a script reading 5 as "no job here" would boot the other image.
    ImageMissing = 10,
}

impl From<Exit> for ExitCode {
    fn from(exit: Exit) -> ExitCode {
        ExitCode::from(exit as u8)
    }
}

impl Exit {
    /// The code for a recovery refusal.
    pub fn of_refusal(reason: RefusalReason) -> Exit {
        match reason {
            RefusalReason::NeedsOperator => Exit::NeedsOperator,
            RefusalReason::WrongJournal | RefusalReason::Corrupt | RefusalReason::Truncated => {
                Exit::Corrupt
            }
            RefusalReason::Unsupported => Exit::Unsupported,
        }
    }

    /// The code for an error that ended a command.
    pub fn of_error(error: &anyhow::Error) -> Exit {
        match error.downcast_ref::<livecopy::Error>() {
            Some(livecopy::Error::Refused(refusal)) => Exit::of_refusal(refusal.reason),
            Some(e) => match e.kind() {
                ErrorKind::NotFound => Exit::Missing,
                ErrorKind::Locked => Exit::Locked,
                ErrorKind::Io | ErrorKind::Poisoned => Exit::Io,
                ErrorKind::Corrupt => Exit::Corrupt,
                ErrorKind::InvalidInput => Exit::BadInput,
                _ => Exit::Failure,
            },
            None => Exit::Failure,
        }
    }
}
