//! Taking over an interrupted job's journal to resume its copy: the one
//! sequence `files::resume_at` and embedders over their own storage run.
//!
//! ```text
//!   recovery's verdict -> repair damaged copies (after a backup)
//!     -> refuse unless Copying or Ready -> new writer epoch (nothing
//!        written yet) -> [caller checks the record, opens the images]
//!     -> record Copying with the progress to honour -> Job::new
//! ```

use super::{Config, Job};
use crate::error::{Error, Result};
use crate::journal::{self, Journal, Phase, Record, Recovered};
use crate::storage::Storage;

/// What a resumed job copies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResumeCopy {
    /// Only what the journal's progress says may differ: the part of the
    /// pass after its last checkpoint, and every extent a guest write may
    /// have reached on one image only. A journal without progress (format
    /// 1, or written before the first checkpoint) means everything.
    Remaining,
    /// Everything, as a new job would.
    All,
}

/// A journal taken over for a resume: repaired, its job copying or ready,
/// under a new writer epoch. Nothing is written until [`start`].
///
/// [`start`]: Resumable::start
pub struct Resumable<J: Storage> {
    journal: Journal<J>,
}

impl<J: Storage> Resumable<J> {
    /// Takes over `storage`, whose analysis gave `recovered`: repairs its
    /// damaged copies (`backup` gets the journal's bytes first), and
    /// refuses a job that is not copying or ready.
    pub fn take_over(
        storage: J,
        recovered: &Recovered,
        backup: impl FnOnce(&[u8]) -> Result<()>,
    ) -> Result<Self> {
        // Take over with the verdict on the repaired journal: the one
        // repaired from still lists the repairs just done, and
        // `Journal::resume` refuses those.
        let recovered = journal::repair(&storage, recovered, backup)?.recovered;
        let phase = recovered.record.phase;
        if !matches!(phase, Phase::Copying | Phase::Ready) {
            return Err(Error::InvalidInput(format!(
                "the job is {}; only a copying or ready job can be resumed",
                phase.name()
            )));
        }
        Ok(Resumable {
            journal: Journal::resume(storage, &recovered)?,
        })
    }

    /// The job's newest record: its images, phase and progress.
    pub fn record(&self) -> &Record {
        self.journal.record()
    }

    /// Records the job as copying again, with the progress `copy` honours,
    /// and builds it over `source` and `destination` (the images the record
    /// names: the caller opened and checked them). Copy workers are not
    /// started.
    pub fn start<S: Storage>(
        mut self,
        source: S,
        destination: S,
        config: Config,
        copy: ResumeCopy,
    ) -> Result<Job<S, J>> {
        let progress = match copy {
            ResumeCopy::Remaining => self.journal.progress(),
            ResumeCopy::All => None,
        };
        self.journal
            .commit_progress(Phase::Copying, 0, progress.as_ref())?;
        Job::new(self.journal, source, destination, config)
    }
}
