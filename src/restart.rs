//! The restart path: after any crash, which image does the guest boot from?

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::journal::{self, Phase, Recovered, Side};
use crate::storage::JournalAccess;

/// Recovery's answer for an embedding program.
#[derive(Debug, Clone)]
pub struct Authority {
    /// The side that holds every acknowledged write.
    pub side: Side,
    /// Its path, as recorded at job start.
    pub image: PathBuf,
    /// The job's phase in the newest record.
    pub phase: Phase,
    /// Everything recovery found out.
    pub recovered: Recovered,
}

/// Opens the journal at `path` as recovery must (no symlinks, exclusive
/// lock, sync before reading), and names the authoritative image. Damaged
/// copies are repaired after a backup beside the journal. Refusals come back
/// as [`Error::Refused`]: start nothing then, and ask an operator.
pub fn authoritative_image(path: &Path) -> Result<Authority> {
    let opened = journal::open_file(path, JournalAccess::Exclusive)?;
    let recovered = opened.analysis.outcome.map_err(Error::Refused)?;
    let recovered = journal::repair(&opened.storage, &recovered, |image| {
        crate::storage::write_backup_copy(path, image).map(drop)
    })?
    .recovered;
    let record = &recovered.record;
    let image = match record.authoritative {
        Side::Source => &record.source.path,
        Side::Destination => &record.destination.path,
    };
    Ok(Authority {
        side: record.authoritative,
        image: PathBuf::from(image),
        phase: record.phase,
        recovered: recovered.clone(),
    })
}
