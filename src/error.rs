//! The crate's one error type.
//!
//! Callers need to tell three things apart, because each calls for a
//! different reaction: the medium failed (`Io`: retrying the same journal is
//! pointless, a failed sync is never retried), the bytes are not what we wrote
//! (`Corrupt`, `Refused`: a human must look), and the caller asked for
//! something impossible (`InvalidInput`). `Poisoned` is the latch that keeps
//! an object that saw an I/O failure from ever reporting success again.

use std::io;
use std::path::PathBuf;

use crate::journal::Refusal;

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the library.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A storage call failed. `op` names the call, `path` the file when known.
    // The cause is the source, not part of this message, so that a chain
    // printer (anyhow's `{:#}`) does not repeat it.
    #[error("{op} failed{}", path_suffix(path))]
    Io {
        /// The storage operation that failed (e.g. "fdatasync").
        op: &'static str,
        /// The file, when the failure is tied to one.
        path: Option<PathBuf>,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// An earlier write or sync failed; this object refuses all further work.
    #[error("an earlier I/O error poisoned this {what}; restart through recovery")]
    Poisoned {
        /// What was poisoned ("journal", "engine", ...).
        what: &'static str,
    },
    /// Bytes read back do not match what the format allows.
    #[error("corrupt: {0}")]
    Corrupt(String),
    /// Recovery could not name an authoritative image.
    #[error("recovery refused: {0}")]
    Refused(Refusal),
    /// Another process holds the lock on this journal.
    #[error("{} is locked by another process (a running engine?)", .0.display())]
    Locked(PathBuf),
    /// The caller's request cannot be carried out as asked.
    #[error("invalid input: {0}")]
    InvalidInput(String),
}

fn path_suffix(path: &Option<PathBuf>) -> String {
    match path {
        Some(p) => format!(" on {}", p.display()),
        None => String::new(),
    }
}

/// A coarse classification of [`Error`], stable for matching and exit codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The medium or the operating system failed.
    Io,
    /// The file named does not exist.
    NotFound,
    /// An earlier I/O error latched.
    Poisoned,
    /// Stored bytes are damaged or not ours.
    Corrupt,
    /// Recovery refused; see the [`Refusal`].
    Refused,
    /// The journal is locked by another process.
    Locked,
    /// Bad arguments.
    InvalidInput,
}

impl Error {
    /// Wraps an `io::Error` from the storage operation `op`.
    pub fn io(op: &'static str, source: io::Error) -> Self {
        Error::Io {
            op,
            path: None,
            source,
        }
    }

    /// Wraps an `io::Error` from operation `op` on `path`.
    pub fn io_at(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        Error::Io {
            op,
            path: Some(path.into()),
            source,
        }
    }

    /// The message with every cause appended, for logs and event reasons.
    pub fn describe(&self) -> String {
        let mut text = self.to_string();
        let mut cause = std::error::Error::source(self);
        while let Some(c) = cause {
            text.push_str(": ");
            text.push_str(&c.to_string());
            cause = c.source();
        }
        text
    }

    /// The coarse kind of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Io { source, .. } if source.kind() == io::ErrorKind::NotFound => {
                ErrorKind::NotFound
            }
            Error::Io { .. } => ErrorKind::Io,
            Error::Poisoned { .. } => ErrorKind::Poisoned,
            Error::Corrupt(_) => ErrorKind::Corrupt,
            Error::Refused(_) => ErrorKind::Refused,
            Error::Locked(_) => ErrorKind::Locked,
            Error::InvalidInput(_) => ErrorKind::InvalidInput,
        }
    }
}
