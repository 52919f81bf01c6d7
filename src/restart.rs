//! The restart path: after any crash, which image does the guest boot from?

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::journal::{self, ImageRef, Phase, Recovered, Side};
use crate::storage::{JournalAccess, Location};

/// Recovery's answer for an embedding program.
#[derive(Debug, Clone)]
pub struct Authority {
    /// The side that holds every acknowledged write.
    pub side: Side,
    /// Its path, as recorded at job start.
    pub image: PathBuf,
    /// The job's phase in the newest record.
    pub phase: Phase,
    /// Everything recovery found out (after the repair, when one was made).
    pub recovered: Recovered,
    /// What a human should know: recovery's warnings, then whether the
    /// image at that path is still the one recorded (`copyctl recover`
    /// prints the same).
    pub warnings: Vec<String>,
}

/// The images a caller expects a journal's job to be about. Management
/// software that knows its images should always say so: a journal swapped
/// in from another job (a copied file, a mistyped path) is then refused as
/// `wrong-journal` instead of naming that job's image.
#[derive(Debug, Clone, Default)]
pub struct Expected {
    /// The source, if the caller knows it.
    pub source: Option<Location>,
    /// The destination, if the caller knows it.
    pub destination: Option<Location>,
}

impl Expected {
    /// Refuses (`wrong-journal`) when a given image is not the one the
    /// record names: a file by its path or its device and inode (so a
    /// relative path or a link to it matches), an export by its URI.
    pub fn check(&self, record: &journal::Record) -> Result<()> {
        for (side, given) in [
            (Side::Source, &self.source),
            (Side::Destination, &self.destination),
        ] {
            let Some(given) = given else { continue };
            let recorded = record.image(side);
            if !names(recorded, given)? {
                return Err(Error::Refused(journal::Refusal {
                    reason: journal::RefusalReason::WrongJournal,
                    detail: format!(
                        "the journal's job has {} as its {}, not {given}",
                        recorded.name(),
                        side.name()
                    ),
                }));
            }
        }
        Ok(())
    }
}

fn names(recorded: &ImageRef, given: &Location) -> Result<bool> {
    Ok(match (recorded, given) {
        (ImageRef::File(file), Location::Path(path)) => {
            Path::new(&file.path) == path.as_path()
                || crate::storage::file_id(path)? == Some((file.device, file.inode))
        }
        (ImageRef::Export(export), given @ Location::Nbd(_)) => given.to_string() == export.uri,
        _ => false,
    })
}

/// [`authoritative_image`], refusing (`wrong-journal`, before anything is
/// written) a journal whose job is not over the `expected` images.
pub fn authoritative_image_of(path: &Path, expected: &Expected) -> Result<Authority> {
    let opened = journal::open_file(path, JournalAccess::Exclusive)?;
    let recovered = opened.analysis.outcome.map_err(Error::Refused)?;
    expected.check(&recovered.record)?;
    let recovered = journal::repair(&opened.storage, &recovered, |image| {
        crate::storage::write_backup_copy(path, image).map(drop)
    })?
    .recovered;
    Ok(authority(recovered))
}

/// Opens the journal at `path` as recovery must (no symlinks, exclusive
/// lock, sync before reading the medium), and names the authoritative
/// image. Damaged copies are repaired after a backup beside the journal; if
/// the backup or a repair cannot be written (a full or read-only file
/// system), this fails with that error and [`verdict_without_repair`] still
/// gives the verdict. Refusals come back as [`Error::Refused`]: start
/// nothing then, and ask an operator.
pub fn authoritative_image(path: &Path) -> Result<Authority> {
    authoritative_image_of(path, &Expected::default())
}

/// The same verdict as [`authoritative_image`], read without writing
/// anything: the journal is opened read-only (under the exclusive lock) and
/// damaged copies are left as they are (`recovered.repairs` lists them).
/// An engine refuses to take over until they are repaired.
pub fn verdict_without_repair(path: &Path) -> Result<Authority> {
    let opened = journal::open_file(path, JournalAccess::ReadOnly)?;
    let recovered = opened.analysis.outcome.map_err(Error::Refused)?;
    Ok(authority(recovered))
}

fn authority(recovered: Recovered) -> Authority {
    let record = &recovered.record;
    let image = record.image(record.authoritative);
    let mut warnings = recovered.warnings.clone();
    warnings.extend(image_warning(image, &crate::storage::NbdOptions::default()));
    Authority {
        side: record.authoritative,
        image: PathBuf::from(image.name()),
        phase: record.phase,
        warnings,
        recovered,
    }
}

/// Whether the image is still the one the job recorded; `None` when it
/// is. A file: the same device, inode and size at its path. An export: it
/// answers (read-only) with the same size; a server that is down or
/// unreachable is a warning too (the verdict stands; the guest cannot boot
/// from it until it is back). `nbd` holds what an export needs to be
/// reached (TLS credentials for an `nbds` address that names none).
pub fn image_warning(image: &ImageRef, nbd: &crate::storage::NbdOptions) -> Option<String> {
    let image = match image {
        ImageRef::File(image) => image,
        ImageRef::Export(export) => return export_warning(export, nbd),
    };
    match crate::storage::stat_identity(Path::new(&image.path)) {
        Ok(None) => Some(format!(
            "the authoritative image {} does not exist",
            image.path
        )),
        Ok(Some(now))
            if (now.device, now.inode, now.size) != (image.device, image.inode, image.size) =>
        {
            Some(format!(
                "{} changed since the job started: recorded device {} inode {} size {}, now device {} inode {} size {}",
                image.path, image.device, image.inode, image.size, now.device, now.inode, now.size
            ))
        }
        Ok(Some(_)) => None,
        Err(e) => Some(format!("cannot check {}: {}", image.path, e.describe())),
    }
}

fn export_warning(
    export: &crate::journal::ExportRecord,
    nbd: &crate::storage::NbdOptions,
) -> Option<String> {
    use crate::storage::{AnyImage, Location, Storage};
    let opened =
        Location::parse(&export.uri).and_then(|location| AnyImage::open(&location, false, nbd));
    match opened.map(|image| image.len()) {
        Ok(Ok(size)) if size == export.size => None,
        Ok(Ok(size)) => Some(format!(
            "{} changed since the job started: recorded size {}, now {size}",
            export.uri, export.size
        )),
        Ok(Err(e)) => Some(format!("cannot check {}: {e}", export.uri)),
        Err(e) => Some(format!("cannot reach {}: {}", export.uri, e.describe())),
    }
}
