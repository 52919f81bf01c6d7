//! Starting a job over images (files, block devices or NBD exports) and a
//! journal path, and taking one over after a crash.

use std::path::Path;

use super::resume::Resumable;
use super::{Config, Job};
use crate::error::{Error, Result};
use crate::journal::{self, ExportRecord, ImageRecord, ImageRef, Phase, Record};
use crate::storage::{AnyImage, FileStorage, ImageIdentity, Location, NbdOptions, Storage};

/// A job whose images are files or exports, with its journal in a file.
pub type FileJob = Job<AnyImage, FileStorage>;

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

/// What the journal records of an image: a file's path and identity, or an
/// export's URI, name and size.
fn image_ref(image: &AnyImage) -> Result<ImageRef> {
    match image {
        AnyImage::File(f) => Ok(ImageRef::File(image_record(&f.identity()?)?)),
        AnyImage::Export(e) => Ok(ImageRef::Export(ExportRecord {
            uri: e.address().to_string(),
            export: e.address().export.clone(),
            size: e.len().map_err(|err| Error::io("export size", err))?,
            tls: e.address().tls,
        })),
    }
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
    start_at(
        journal_path,
        &Location::Path(source.to_path_buf()),
        &Location::Path(destination.to_path_buf()),
        config,
        &NbdOptions::default(),
    )
}

/// [`start`] for images named by location: files, block devices or NBD
/// exports, in any mix. Exports are connected with `options`.
pub fn start_at(
    journal_path: &Path,
    source: &Location,
    destination: &Location,
    config: Config,
    options: &NbdOptions,
) -> Result<FileJob> {
    config.validate()?;
    let source = AnyImage::open(source, true, options)?;
    let destination = AnyImage::open(destination, true, options)?;
    let (source_ref, destination_ref) = (image_ref(&source)?, image_ref(&destination)?);
    if source_ref.same_image(&destination_ref) {
        let what = if source.file().is_some() {
            "file"
        } else {
            "export"
        };
        return Err(Error::InvalidInput(format!(
            "{} and {} are the same {what}",
            source.name(),
            destination.name()
        )));
    }
    // A second job on the same images would mirror into a copy that another
    // engine also writes. An export cannot be locked from here: its server
    // must keep other writers off (README, "Remote images").
    for image in [&source, &destination] {
        if let Some(file) = image.file() {
            file.lock_exclusive()?;
        }
    }
    if destination_ref.size() < source_ref.size() {
        return Err(Error::InvalidInput(format!(
            "the destination ({} bytes) is smaller than the source ({} bytes)",
            destination_ref.size(),
            source_ref.size()
        )));
    }
    // The journal will name the files by path: their directory entries
    // must survive a power cut as surely as the record that names them (a
    // destination created just before the job, by copyctl or by hand).
    for image in [&source_ref, &destination_ref] {
        if let Some(file) = image.file() {
            crate::storage::sync_parent(Path::new(&file.path))?;
        }
    }
    let mut job_id = [0u8; 16];
    let mut writer = [0u8; 16];
    crate::random_bytes(&mut job_id);
    crate::random_bytes(&mut writer);
    let first = Record::single(
        job_id,
        Phase::Copying,
        source_ref,
        destination_ref,
        writer,
        1,
        0,
        0,
    );
    let journal = journal::create_file(journal_path, first)?;
    // A job that cannot start leaves no journal naming its images.
    let created = crate::storage::CreatedFile::claim(journal_path)?;
    let job = Job::new(journal, source, destination, config)?;
    created.keep();
    Ok(job)
}

pub use super::resume::ResumeCopy;

/// Takes over an unfinished job after a crash: opens the journal as
/// recovery must, repairs damaged copies (after a backup), and, if the job
/// was Copying or Ready, resumes its copy under a new writer epoch, copying
/// again what the journal's progress says may differ (the destination may
/// have missed writes that were in flight when the engine died). The images
/// must still be the ones the journal recorded (same device, inode and
/// size; for an export, the same size). Copy workers are not started.
pub fn resume(journal_path: &Path, config: Config) -> Result<FileJob> {
    resume_with(journal_path, config, &NbdOptions::default())
}

/// [`resume`], connecting exports with `options`.
pub fn resume_with(journal_path: &Path, config: Config, options: &NbdOptions) -> Result<FileJob> {
    resume_at(journal_path, config, options, ResumeCopy::Remaining, None)
}

/// [`resume`], connecting exports with `options`, copying what `copy` says,
/// and, when `expected` names the images (source, destination) the caller
/// means, refusing a journal whose job has other images (`wrong-journal`:
/// another job's journal at this path).
pub fn resume_at(
    journal_path: &Path,
    config: Config,
    options: &NbdOptions,
    copy: ResumeCopy,
    expected: Option<(&Location, &Location)>,
) -> Result<FileJob> {
    config.validate()?;
    let opened = journal::open_file(journal_path, crate::storage::JournalAccess::Exclusive)?;
    let recovered = opened.analysis.outcome.map_err(Error::Refused)?;
    if let Some((source, destination)) = expected {
        // Before any repair: another job's journal is not ours to write.
        crate::restart::Expected {
            source: Some(source.clone()),
            destination: Some(destination.clone()),
        }
        .check(&recovered.record)?;
    }
    let resumable = Resumable::take_over(opened.storage, &recovered, |image| {
        crate::storage::write_backup_copy(journal_path, image).map(drop)
    })?;
    let record = resumable.record();
    let source = open_recorded(record.source(), options)?;
    let destination = open_recorded(record.destination(), options)?;
    resumable.start(source, destination, config, copy)
}

/// Opens the image a record names, refusing if it is not the image the job
/// started with: for a file, the path now names another file, or the file
/// changed size (a grown image would expose bytes the copy never wrote; a
/// shrunk one lost some); for an export, its size changed.
pub fn open_recorded(image: &ImageRef, options: &NbdOptions) -> Result<AnyImage> {
    let image = match image {
        ImageRef::File(image) => image,
        ImageRef::Export(export) => {
            let location = Location::parse(&export.uri)?;
            let opened = AnyImage::open(&location, true, options)?;
            let now = opened.len().map_err(|e| Error::io("export size", e))?;
            if now != export.size {
                return Err(Error::InvalidInput(format!(
                    "{} was resized since the job started ({} bytes then, {now} now)",
                    export.uri, export.size
                )));
            }
            return Ok(opened);
        }
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
    Ok(AnyImage::File(storage))
}
