//! Starting a job over image files (or block devices) and a journal path.

use std::path::Path;

use super::{Config, Job};
use crate::error::{Error, Result};
use crate::journal::{self, ImageRecord, ImageRef, Phase, Record};
use crate::storage::{FileStorage, ImageIdentity};

/// A job over real files.
pub type FileJob = Job<FileStorage, FileStorage>;

fn image_record(identity: &ImageIdentity) -> Result<ImageRecord> {
    let path = identity.path.to_str().ok_or_else(|| {
        Error::InvalidInput(format!(
            "{} is not valid UTF-8; the journal stores UTF-8 paths",
            identity.path.display()
        ))
    })?;
    Ok(ImageRecord {
        path: path.to_string(),
        size: identity.size,
        device: identity.device,
        inode: identity.inode,
    })
}

/// Creates the journal at `journal_path` (it must not exist), recording
/// Copying with the source authoritative, then sets up the job. The
/// destination must exist and be at least as large as the source; it must
/// not be the source itself (same device and inode, whatever the path).
/// Copy workers are not started; call [`Job::start_workers`].
pub fn start(
    journal_path: &Path,
    source: &Path,
    destination: &Path,
    config: Config,
) -> Result<FileJob> {
    config.validate()?;
    let source = FileStorage::open_image(source, true)?;
    let destination = FileStorage::open_image(destination, true)?;
    let (source_id, destination_id) = (source.identity()?, destination.identity()?);
    if (source_id.device, source_id.inode) == (destination_id.device, destination_id.inode) {
        return Err(Error::InvalidInput(format!(
            "{} and {} are the same file",
            source.path().display(),
            destination.path().display()
        )));
    }
    // A second job on the same images would mirror into a copy that another
    // engine also writes.
    source.lock_exclusive()?;
    destination.lock_exclusive()?;
    if destination_id.size < source_id.size {
        return Err(Error::InvalidInput(format!(
            "the destination ({} bytes) is smaller than the source ({} bytes)",
            destination_id.size, source_id.size
        )));
    }
    // The journal will name both images by path: their directory entries
    // must survive a power cut as surely as the record that names them (a
    // destination created just before the job, by copyctl or by hand).
    for image in [&source_id, &destination_id] {
        crate::storage::sync_parent(&image.path)?;
    }
    let mut job_id = [0u8; 16];
    let mut writer = [0u8; 16];
    crate::random_bytes(&mut job_id);
    crate::random_bytes(&mut writer);
    let first = Record::single(
        job_id,
        Phase::Copying,
        ImageRef::File(image_record(&source_id)?),
        ImageRef::File(image_record(&destination_id)?),
        writer,
        1,
        0,
        0,
    );
    let journal = journal::create_file(journal_path, first)?;
    Job::new(journal, source, destination, config)
}

/// Takes over an unfinished job after a crash: opens the journal as
/// recovery must, repairs damaged copies (after a backup), and, if the job
/// was Copying or Ready, starts its copy over from the beginning under a new
/// writer epoch (the destination may have missed writes that were in flight
/// when the engine died). The images must still be the files the journal
/// recorded (same device and inode). Copy workers are not started.
pub fn resume(journal_path: &Path, config: Config) -> Result<FileJob> {
    config.validate()?;
    let opened = journal::open_file(journal_path, crate::storage::JournalAccess::Exclusive)?;
    let recovered = opened.analysis.outcome.map_err(Error::Refused)?;
    // Take over with the verdict on the repaired journal: the one repaired
    // from still lists the repairs just done, and `resume` refuses those.
    let recovered = journal::repair(&opened.storage, &recovered, |image| {
        crate::storage::write_backup_copy(journal_path, image).map(drop)
    })?
    .recovered;
    let record = &recovered.record;
    if !matches!(record.phase, Phase::Copying | Phase::Ready) {
        return Err(Error::InvalidInput(format!(
            "the job is {}; only a copying or ready job can be resumed",
            record.phase.name()
        )));
    }
    let source = open_recorded(record.source())?;
    let destination = open_recorded(record.destination())?;
    let mut journal = journal::Journal::resume(opened.storage, &recovered)?;
    journal.commit(Phase::Copying, 0)?;
    Job::new(journal, source, destination, config)
}

/// Opens the image a record names, refusing if the path now names another
/// file than the one the job started with, or the file changed size (a
/// grown image would expose bytes the copy never wrote; a shrunk one lost
/// some).
pub fn open_recorded(image: &ImageRef) -> Result<FileStorage> {
    let ImageRef::File(image) = image else {
        return Err(Error::InvalidInput(format!(
            "{} is an NBD export; this engine takes over jobs over files only",
            image.name()
        )));
    };
    let storage = FileStorage::open_image(Path::new(&image.path), true)?;
    storage.lock_exclusive()?;
    let now = storage.identity()?;
    if (now.device, now.inode) != (image.device, image.inode) {
        return Err(Error::InvalidInput(format!(
            "{} is not the file the job started with (device {} inode {} then, device {} inode {} now)",
            image.path, image.device, image.inode, now.device, now.inode
        )));
    }
    if now.size != image.size {
        return Err(Error::InvalidInput(format!(
            "{} was resized since the job started ({} bytes then, {} now)",
            image.path, image.size, now.size
        )));
    }
    Ok(storage)
}
