//! [`Storage`] over real files and block devices, and the few file-system
//! operations the journal needs around it (exclusive creation, locking,
//! directory syncs, backups).
//!
//! Rules kept here, each from a known durability bug:
//! - a failed `fdatasync` is returned once and never retried by this layer
//!   (PostgreSQL "fsyncgate": the kernel may have dropped the dirty pages);
//! - the journal is opened with `O_NOFOLLOW` and locked with `flock`, which is
//!   tied to the open file description and released when the process dies;
//! - a created file becomes visible only through `renameat2(NOREPLACE)` after
//!   its data is synced, and the directory is synced after the rename.

use std::ffi::OsString;
use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::ops::Range;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use rustix::fs::{self as rfs, FallocateFlags, FlockOperation, Mode, OFlags, RenameFlags};
use rustix::io::ReadWriteFlags;

use super::Storage;
use crate::error::{Error, Result};

/// A regular file or block device behind the [`Storage`] trait.
#[derive(Debug)]
pub struct FileStorage {
    file: File,
    path: PathBuf,
    is_block_device: bool,
    /// The unit a discard must be aligned to: a block device's logical
    /// block size (fallocate refuses anything else with EINVAL), 1 for a
    /// file, where the file system zeroes partial blocks itself.
    discard_unit: u64,
    /// A second descriptor on the same file with `O_DIRECT`, opened on
    /// first use; `None` when the file system refuses it (tmpfs) or the
    /// device's blocks are larger than [`super::DIRECT_ALIGN`].
    direct: std::sync::OnceLock<Option<File>>,
}

/// What `stat` said about an image when a job started. Recorded in the journal
/// so that recovery can tell when a path now names a different file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageIdentity {
    /// Absolute path, symlinks resolved.
    pub path: PathBuf,
    /// Size in bytes.
    pub size: u64,
    /// `st_dev` of the file.
    pub device: u64,
    /// `st_ino` of the file.
    pub inode: u64,
}

/// How the journal file is to be opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JournalAccess {
    /// Read-write with an exclusive lock: refuses when another process holds it.
    Exclusive,
    /// Read-only for a verdict without repair: the exclusive lock is taken
    /// (refused while another process holds it), nothing is written, and a
    /// read-only file system will do.
    ReadOnly,
    /// Read-only for inspection: takes no lock at all, so that inspecting
    /// never makes a concurrent `recover` or engine find the journal
    /// locked; whether another process holds the lock is read from
    /// /proc/locks.
    Inspect,
}

/// Whether the journal lock was obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockState {
    /// We hold the exclusive lock.
    Held,
    /// Another process holds it; what we read may change under us.
    HeldElsewhere,
    /// Nobody held it when we looked, and we did not take it (inspection).
    Free,
}

/// Whether /proc/locks lists an flock on the file `meta` describes. Only
/// inspection asks, and it holds no lock itself, so any such lock is
/// another process's. Unreadable /proc/locks: not known to be held.
fn flock_listed(meta: &std::fs::Metadata) -> bool {
    let Ok(locks) = std::fs::read_to_string("/proc/locks") else {
        return false;
    };
    let (major, minor) = (rfs::major(meta.dev()), rfs::minor(meta.dev()));
    let wanted = format!("{major:02x}:{minor:02x}:{}", meta.ino());
    locks.lines().any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // "1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF"; a blocked
        // waiter's line has "->" after the number.
        fields.get(1) == Some(&"FLOCK") && fields.get(5) == Some(&wanted.as_str())
    })
}

/// sync_file_range(2), which neither std nor rustix wraps.
// The crate's one unsafe block: the call takes a descriptor that `file`
// keeps open for its duration and three integers; it touches no memory of
// ours.
#[allow(unsafe_code)]
fn sync_file_range(file: &File, offset: u64, len: u64, flags: libc::c_uint) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    };
    loop {
        // SAFETY: see above; no pointers cross the call.
        let result = unsafe { libc::sync_file_range(file.as_raw_fd(), offset, len, flags) };
        if result == 0 {
            return Ok(());
        }
        let error = io::Error::last_os_error();
        if error.kind() != io::ErrorKind::Interrupted {
            return Err(error);
        }
    }
}

/// With the OS's own message ("No such file or directory"), which says
/// more than the error kind's ("entity not found").
fn to_io(e: rustix::io::Errno) -> io::Error {
    io::Error::from_raw_os_error(e.raw_os_error())
}

impl FileStorage {
    /// Opens an image (following symlinks: images often live behind
    /// `/dev/disk/by-id` links) for reading, or reading and writing.
    pub fn open_image(path: &Path, writable: bool) -> Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        // O_NONBLOCK: opening a FIFO (or a tty) would otherwise wait for a
        // peer for ever before the type check below could refuse it.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(writable)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
            .map_err(|e| match e.raw_os_error() {
                // A FIFO opened for writing with no reader.
                Some(libc::ENXIO) => not_an_image(path),
                _ => Error::io_at("open", path, e),
            })?;
        let meta = file.metadata().map_err(|e| Error::io_at("stat", path, e))?;
        let is_block_device = meta.file_type().is_block_device();
        if !meta.is_file() && !is_block_device {
            return Err(not_an_image(path));
        }
        let flags = rfs::fcntl_getfl(&file).map_err(|e| Error::io_at("fcntl", path, to_io(e)))?;
        rfs::fcntl_setfl(&file, flags - OFlags::NONBLOCK)
            .map_err(|e| Error::io_at("fcntl", path, to_io(e)))?;
        let discard_unit = if is_block_device {
            u64::from(
                rfs::ioctl_blksszget(&file)
                    .map_err(|e| Error::io_at("BLKSSZGET", path, to_io(e)))?,
            )
            .max(1)
        } else {
            1
        };
        Ok(FileStorage {
            file,
            path: path.to_path_buf(),
            is_block_device,
            discard_unit,
            direct: std::sync::OnceLock::new(),
        })
    }

    /// Creates a new image file of `len` bytes (sparse), mode 0600, failing
    /// if anything exists at `path`, and syncs its directory.
    pub fn create_image(path: &Path, len: u64) -> Result<Self> {
        let fd = rfs::openat(
            rfs::CWD,
            path,
            OFlags::RDWR | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
        .map_err(|e| Error::io_at("create", path, to_io(e)))?;
        let file = File::from(fd);
        file.set_len(len)
            .map_err(|e| Error::io_at("set_len", path, e))?;
        rfs::fsync(&file).map_err(|e| Error::io_at("fsync", path, to_io(e)))?;
        sync_parent(path)?;
        Ok(FileStorage {
            file,
            path: path.to_path_buf(),
            is_block_device: false,
            discard_unit: 1,
            direct: std::sync::OnceLock::new(),
        })
    }

    /// Opens a journal without following symlinks, checks it is a regular
    /// file, takes the exclusive lock (inspection takes none), and syncs
    /// the file and its directory so that nothing read afterwards can be a
    /// page-cache leftover of a crashed writer that a power cut would undo.
    pub fn open_journal(path: &Path, access: JournalAccess) -> Result<(Self, LockState)> {
        let flags = match access {
            JournalAccess::Exclusive => OFlags::RDWR,
            JournalAccess::ReadOnly | JournalAccess::Inspect => OFlags::RDONLY,
        } | OFlags::CLOEXEC
            | OFlags::NOFOLLOW
            // A FIFO at the path would block a read-only open forever; with
            // NONBLOCK the open returns and the regular-file check refuses it.
            | OFlags::NONBLOCK;
        let fd = rfs::openat(rfs::CWD, path, flags, Mode::empty()).map_err(|e| {
            if e == rustix::io::Errno::LOOP {
                Error::InvalidInput(format!(
                    "{} is a symbolic link; a journal path must name the file itself",
                    path.display()
                ))
            } else if e == rustix::io::Errno::ISDIR {
                Error::InvalidInput(format!("{} is a directory, not a journal", path.display()))
            } else {
                Error::io_at("open", path, to_io(e))
            }
        })?;
        let file = File::from(fd);
        let meta = file.metadata().map_err(|e| Error::io_at("stat", path, e))?;
        if !meta.is_file() {
            return Err(Error::InvalidInput(format!(
                "{} is not a regular file",
                path.display()
            )));
        }
        let lock = match access {
            JournalAccess::Inspect if flock_listed(&meta) => LockState::HeldElsewhere,
            JournalAccess::Inspect => LockState::Free,
            JournalAccess::Exclusive | JournalAccess::ReadOnly => {
                match rfs::flock(&file, FlockOperation::NonBlockingLockExclusive) {
                    Ok(()) => LockState::Held,
                    Err(rustix::io::Errno::WOULDBLOCK) => {
                        return Err(Error::Locked(path.to_path_buf()));
                    }
                    Err(e) => return Err(Error::io_at("flock", path, to_io(e))),
                }
            }
        };
        // fsync works on a read-only descriptor too.
        rfs::fsync(&file).map_err(|e| Error::io_at("fsync", path, to_io(e)))?;
        sync_parent(path)?;
        Ok((
            FileStorage {
                file,
                path: path.to_path_buf(),
                is_block_device: false,
                discard_unit: 1,
                direct: std::sync::OnceLock::new(),
            },
            lock,
        ))
    }

    /// Takes the exclusive advisory lock on the image for as long as this
    /// storage lives, refusing if another process (another copy job) holds
    /// it. flock on the open file description: released when the process
    /// dies.
    pub fn lock_exclusive(&self) -> Result<()> {
        match rfs::flock(&self.file, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(rustix::io::Errno::WOULDBLOCK) => return Err(Error::Locked(self.path.clone())),
            Err(e) => return Err(Error::io_at("flock", &self.path, to_io(e))),
        }
        // The lock is on what was opened; the job will name the path. A
        // file removed or replaced between the open and the lock (a
        // refused command cleaning up what it made: `CreatedFile`) is not
        // the image the path names any more.
        let held = self
            .file
            .metadata()
            .map_err(|e| Error::io_at("stat", &self.path, e))?;
        match std::fs::metadata(&self.path) {
            Ok(now) if (now.dev(), now.ino()) == (held.dev(), held.ino()) => Ok(()),
            _ => Err(Error::InvalidInput(format!(
                "{} was removed or replaced while it was being opened",
                self.path.display()
            ))),
        }
    }

    /// The path this storage was opened with.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads `stat` facts for the journal's record of the image.
    pub fn identity(&self) -> Result<ImageIdentity> {
        let meta = self
            .file
            .metadata()
            .map_err(|e| Error::io_at("stat", &self.path, e))?;
        let path = std::fs::canonicalize(&self.path)
            .map_err(|e| Error::io_at("realpath", &self.path, e))?;
        let size = self
            .len()
            .map_err(|e| Error::io_at("size", &self.path, e))?;
        Ok(ImageIdentity {
            path,
            size,
            device: meta.dev(),
            inode: meta.ino(),
        })
    }
}

/// The (device, inode) a path names, following symlinks, without opening
/// it (a FIFO would block an open); `None` if nothing is there.
pub fn file_id(path: &Path) -> Result<Option<(u64, u64)>> {
    use std::os::unix::fs::MetadataExt;
    match std::fs::metadata(path) {
        Ok(m) => Ok(Some((m.dev(), m.ino()))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io_at("stat", path, e)),
    }
}

/// Reads `stat` facts about the file at `path` without opening it for I/O.
/// `None` when the path does not exist.
pub fn stat_identity(path: &Path) -> Result<Option<ImageIdentity>> {
    match std::fs::metadata(path) {
        Ok(_) => Ok(Some(FileStorage::open_image(path, false)?.identity()?)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io_at("stat", path, e)),
    }
}

impl Storage for FileStorage {
    fn len(&self) -> io::Result<u64> {
        if self.is_block_device {
            // st_size is 0 for block devices; seeking to the end asks the driver.
            // The position is shared but unused: all I/O is positioned.
            (&self.file).seek(SeekFrom::End(0))
        } else {
            Ok(self.file.metadata()?.len())
        }
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    // O_DIRECT when the range is block-aligned and the file system has it:
    // the read goes to the device whatever the cache holds. Otherwise the
    // clean cached pages of the range are dropped first
    // (POSIX_FADV_DONTNEED), so the read refills them from the medium; dirty
    // pages stay, which is why recovery syncs before it reads.
    fn read_medium_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        const ALIGN: usize = 4096;
        // Drop the clean cached pages first, whatever the path below: some
        // file systems (ext4 with data=journal, ZFS before 2.3) accept
        // O_DIRECT and still answer from the page cache.
        let len = std::num::NonZeroU64::new(buf.len() as u64);
        rfs::fadvise(&self.file, offset, len, rfs::Advice::DontNeed).map_err(to_io)?;
        if offset.is_multiple_of(ALIGN as u64) && buf.len().is_multiple_of(ALIGN) && !buf.is_empty()
        {
            let proc_path = format!(
                "/proc/self/fd/{}",
                std::os::fd::AsRawFd::as_raw_fd(&self.file)
            );
            if let Ok(fd) = rfs::open(
                proc_path.as_str(),
                OFlags::RDONLY | OFlags::DIRECT | OFlags::CLOEXEC,
                Mode::empty(),
            ) {
                let direct = File::from(fd);
                let mut raw = vec![0u8; buf.len() + ALIGN];
                let skip = raw.as_ptr().align_offset(ALIGN);
                let aligned = &mut raw[skip..skip + buf.len()];
                match direct.read_exact_at(aligned, offset) {
                    Ok(()) => {
                        buf.copy_from_slice(aligned);
                        return Ok(());
                    }
                    // Some file systems accept O_DIRECT at open and refuse
                    // the read; fall back to the page cache, emptied first.
                    Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        self.read_at(offset, buf)
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.file.write_all_at(data, offset)
    }

    fn sync_data(&self) -> io::Result<()> {
        rfs::fdatasync(&self.file).map_err(to_io)
    }

    // RWF_DSYNC syncs only this range (plus the metadata needed to read it
    // back and a device cache flush), so a FUA write does not wait for the
    // write-back of everything else dirty in the file, such as the bulk
    // copy's pages on the destination.
    fn write_durable_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut done = 0;
        while done < data.len() {
            let slice = [io::IoSlice::new(&data[done..])];
            let at = offset + done as u64;
            match rustix::io::pwritev2(&self.file, &slice, at, ReadWriteFlags::DSYNC) {
                Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero)),
                Ok(n) => done += n,
                Err(rustix::io::Errno::INTR) => {}
                // Kernels before 4.7 have no RWF_DSYNC: sync the whole file.
                Err(rustix::io::Errno::OPNOTSUPP) | Err(rustix::io::Errno::NOSYS) if done == 0 => {
                    self.write_at(offset, data)?;
                    return self.sync_data();
                }
                Err(e) => return Err(to_io(e)),
            }
        }
        Ok(())
    }

    // The same open file reached again through /proc, so that it is the
    // same inode whatever happened to the path since. Linux keeps the page
    // cache coherent: an O_DIRECT write first writes back and waits for
    // cached pages of its range, and drops them after. Its errors are the
    // write's own; a write-back error it meets stays reported to the next
    // fdatasync of every descriptor (errseq), so it needs no latch.
    fn write_direct_at(&self, offset: u64, data: &[u8]) -> io::Result<bool> {
        let align = super::DIRECT_ALIGN;
        if data.is_empty()
            || !offset.is_multiple_of(align as u64)
            || !data.len().is_multiple_of(align)
            || data.as_ptr().align_offset(align) != 0
        {
            return Ok(false);
        }
        let direct = self.direct.get_or_init(|| {
            if self.discard_unit > align as u64 {
                return None;
            }
            let proc_path = format!(
                "/proc/self/fd/{}",
                std::os::fd::AsRawFd::as_raw_fd(&self.file)
            );
            rfs::open(
                proc_path.as_str(),
                OFlags::WRONLY | OFlags::DIRECT | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .ok()
            .map(File::from)
        });
        let Some(direct) = direct else {
            return Ok(false);
        };
        let mut done = 0;
        while done < data.len() {
            match direct.write_at(&data[done..], offset + done as u64) {
                Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero)),
                Ok(n) if done + n < data.len() && !n.is_multiple_of(align) => {
                    // A short direct write that left the rest unaligned:
                    // finish through the page cache.
                    self.write_at(offset + (done + n) as u64, &data[done + n..])?;
                    return Ok(true);
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // Accepted at open, refused at write (some file systems):
                // nothing was written; the caller goes through the cache.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) && done == 0 => {
                    return Ok(false);
                }
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    fn start_write_back(&self, offset: u64, len: u64) -> io::Result<()> {
        sync_file_range(&self.file, offset, len, libc::SYNC_FILE_RANGE_WRITE)
    }

    fn wait_write_back(&self, offset: u64, len: u64) -> io::Result<()> {
        let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE
            | libc::SYNC_FILE_RANGE_WRITE
            | libc::SYNC_FILE_RANGE_WAIT_AFTER;
        sync_file_range(&self.file, offset, len, flags)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        let end = offset
            .checked_add(len)
            .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        // A block device discards whole logical blocks only: zero the
        // partial ones at either end, punch what lies between.
        let unit = self.discard_unit;
        let aligned = offset.div_ceil(unit) * unit..end / unit * unit;
        if aligned.start >= aligned.end {
            return self.write_zeroes(offset, len);
        }
        self.write_zeroes(offset, aligned.start - offset)?;
        let flags = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
        match rfs::fallocate(
            &self.file,
            flags,
            aligned.start,
            aligned.end - aligned.start,
        ) {
            Ok(()) => {}
            // Old kernels' block devices and some file systems cannot
            // punch: write zeros.
            Err(rustix::io::Errno::OPNOTSUPP) | Err(rustix::io::Errno::NODEV) => {
                self.write_zeroes(aligned.start, aligned.end - aligned.start)?
            }
            Err(e) => return Err(to_io(e)),
        }
        self.write_zeroes(aligned.end, end - aligned.end)
    }

    fn block_size(&self) -> u64 {
        self.discard_unit
    }

    fn next_data(&self, offset: u64) -> io::Result<Option<Range<u64>>> {
        let len = self.len()?;
        if offset >= len {
            return Ok(None);
        }
        if self.is_block_device {
            return Ok(Some(offset..len));
        }
        let start = match rfs::seek(&self.file, rfs::SeekFrom::Data(offset)) {
            Ok(start) => start,
            Err(rustix::io::Errno::NXIO) => return Ok(None),
            // No SEEK_DATA support: everything is data.
            Err(rustix::io::Errno::INVAL) => return Ok(Some(offset..len)),
            Err(e) => return Err(to_io(e)),
        };
        let end = match rfs::seek(&self.file, rfs::SeekFrom::Hole(start)) {
            Ok(end) => end,
            Err(rustix::io::Errno::NXIO) => len,
            Err(e) => return Err(to_io(e)),
        };
        Ok(Some(start..end.min(len)))
    }
}

fn random_suffix() -> String {
    let mut bytes = [0u8; 8];
    crate::random_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn split_path(path: &Path) -> Result<(PathBuf, OsString)> {
    let name = path
        .file_name()
        .ok_or_else(|| Error::InvalidInput(format!("{} names no file", path.display())))?;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    Ok((parent, name.to_os_string()))
}

/// fsyncs the directory holding `path`, so that a create or rename in it
/// survives power loss.
pub fn sync_parent(path: &Path) -> Result<()> {
    let (dir, _) = split_path(path)?;
    let fd = rfs::openat(
        rfs::CWD,
        &dir,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| Error::io_at("open directory", &dir, to_io(e)))?;
    rfs::fsync(&fd).map_err(|e| Error::io_at("fsync directory", &dir, to_io(e)))
}

/// Creates `path` so that it appears complete or not at all: a temporary file
/// in the same directory (exclusive, mode 0600, no symlink followed) is
/// filled by `fill`, fsynced, locked, renamed to `path` without replacing
/// anything that is there, and the directory is fsynced. Returns the storage,
/// still locked.
pub fn create_new_file_atomically(
    path: &Path,
    fill: impl FnOnce(&FileStorage) -> Result<()>,
) -> Result<FileStorage> {
    let (dir, name) = split_path(path)?;
    let mut temp_name = OsString::from(".");
    temp_name.push(&name);
    temp_name.push(format!(".tmp.{}", random_suffix()));
    let temp_path = dir.join(&temp_name);
    let fd = rfs::openat(
        rfs::CWD,
        &temp_path,
        OFlags::RDWR | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    )
    .map_err(|e| match e {
        // Name what is missing, not the temporary file.
        rustix::io::Errno::NOENT | rustix::io::Errno::NOTDIR => {
            Error::io_at("open the directory (it does not exist)", &dir, to_io(e))
        }
        _ => Error::io_at("create", path, to_io(e)),
    })?;
    let storage = FileStorage {
        file: File::from(fd),
        path: temp_path.clone(),
        is_block_device: false,
        discard_unit: 1,
        direct: std::sync::OnceLock::new(),
    };
    let result = (|| {
        rfs::flock(&storage.file, FlockOperation::NonBlockingLockExclusive)
            .map_err(|e| Error::io_at("flock", &temp_path, to_io(e)))?;
        fill(&storage)?;
        rfs::fsync(&storage.file).map_err(|e| Error::io_at("fsync", &temp_path, to_io(e)))?;
        match rfs::renameat_with(rfs::CWD, &temp_path, rfs::CWD, path, RenameFlags::NOREPLACE) {
            Ok(()) => Ok(()),
            Err(rustix::io::Errno::EXIST) => Err(already_exists(path)),
            // NFS, some FUSE file systems: no RENAME_NOREPLACE.
            Err(
                rustix::io::Errno::INVAL | rustix::io::Errno::NOSYS | rustix::io::Errno::OPNOTSUPP,
            ) => link_into_place(&temp_path, path),
            Err(e) => Err(Error::io_at("rename", path, to_io(e))),
        }
    })();
    if let Err(e) = result {
        // Best effort: a leftover temporary file is harmless but untidy.
        let _ = std::fs::remove_file(&temp_path);
        return Err(e);
    }
    sync_parent(path)?;
    Ok(FileStorage {
        path: path.to_path_buf(),
        ..storage
    })
}

/// A file a command created, removed again when the command fails before
/// the file is in use (dropped without [`keep`](CreatedFile::keep)):
/// refusals leave nothing behind. Only the very file created goes: if the
/// path names another file by then, it stays.
#[derive(Debug)]
pub struct CreatedFile {
    path: PathBuf,
    identity: Option<(u64, u64)>,
}

impl CreatedFile {
    /// Takes charge of `path`, just created by this process.
    pub fn claim(path: &Path) -> Result<CreatedFile> {
        let meta = std::fs::symlink_metadata(path).map_err(|e| Error::io_at("stat", path, e))?;
        Ok(CreatedFile {
            path: path.to_path_buf(),
            identity: Some((meta.dev(), meta.ino())),
        })
    }

    /// The file stays.
    pub fn keep(mut self) {
        self.identity = None;
    }
}

impl Drop for CreatedFile {
    fn drop(&mut self) {
        let Some(identity) = self.identity else {
            return;
        };
        // Only while holding the file's lock: a job of another process
        // that took the file meanwhile holds it, and the file stays. One
        // that opened it but locks only after the removal finds its path
        // gone (`FileStorage::lock_exclusive` checks) and refuses.
        let Ok(fd) = rfs::openat(
            rfs::CWD,
            &self.path,
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
            Mode::empty(),
        ) else {
            return;
        };
        let same = rfs::fstat(&fd).is_ok_and(|st| (st.st_dev, st.st_ino) == identity);
        if same && rfs::flock(&fd, FlockOperation::NonBlockingLockExclusive).is_ok() {
            let _ = rfs::unlinkat(rfs::CWD, &self.path, rfs::AtFlags::empty());
        }
    }
}

fn not_an_image(path: &Path) -> Error {
    Error::InvalidInput(format!(
        "{} is neither a regular file nor a block device",
        path.display()
    ))
}

/// "already exists", saying what is there when it is not a regular file.
fn already_exists(path: &Path) -> Error {
    let what = match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => " (a directory)",
        Ok(m) if m.file_type().is_fifo() => " (a FIFO)",
        Ok(m) if m.file_type().is_socket() => " (a socket)",
        Ok(m) if m.is_symlink() && std::fs::metadata(path).is_err() => " (a symlink to nothing)",
        Ok(m) if m.is_symlink() => " (a symlink)",
        _ => "",
    };
    Error::InvalidInput(format!("{} already exists{what}", path.display()))
}

/// The other atomic "create, never replace": link(2) fails with EEXIST
/// when anything is at `path`, then the temporary name goes. A crash
/// between the two leaves the temporary name behind as a second link to a
/// complete file: untidy, never wrong.
fn link_into_place(temp_path: &Path, path: &Path) -> Result<()> {
    match rfs::linkat(rfs::CWD, temp_path, rfs::CWD, path, rfs::AtFlags::empty()) {
        Ok(()) => {}
        Err(rustix::io::Errno::EXIST) => return Err(already_exists(path)),
        Err(e @ (rustix::io::Errno::PERM | rustix::io::Errno::OPNOTSUPP)) => {
            return Err(Error::io_at(
                "create without replacing (the file system supports neither \
                 renameat2(RENAME_NOREPLACE) nor hard links)",
                path,
                to_io(e),
            ));
        }
        Err(e) => return Err(Error::io_at("link", path, to_io(e))),
    }
    // The file is in place whatever happens now; a temporary name left
    // behind is the harmless case above.
    let _ = rfs::unlinkat(rfs::CWD, temp_path, rfs::AtFlags::empty());
    Ok(())
}

/// Writes `bytes` to a new file beside `path` named `<name>.broken.<ns>`,
/// durably, before a repair touches the original. Returns the backup's path.
pub fn write_backup_copy(path: &Path, bytes: &[u8]) -> Result<PathBuf> {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let mut name = path.as_os_str().to_os_string();
    name.push(format!(".broken.{stamp}"));
    let backup = PathBuf::from(name);
    let created = create_new_file_atomically(&backup, |s| {
        s.write_at(0, bytes)
            .map_err(|e| Error::io_at("write", s.path(), e))
    })?;
    drop(created);
    Ok(backup)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bulk pass writes around the page cache: what it wrote must be
    /// what reads see, even over dirty cached pages of the same range, and
    /// anything unaligned is left to the cached path untouched.
    #[test]
    fn a_direct_write_is_coherent_with_the_cache_and_refuses_unaligned() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("image");
        let storage = FileStorage::create_image(&path, 1 << 20).expect("create");
        let align = super::super::DIRECT_ALIGN;
        storage.write_at(8192, &[1u8; 4096]).expect("cached write");
        let raw = vec![2u8; 4 * align];
        let skip = raw.as_ptr().align_offset(align);
        let data = &raw[skip..skip + 2 * align];
        assert!(
            storage.write_direct_at(4096, data).expect("direct write"),
            "O_DIRECT refused on the test's file system"
        );
        let mut back = vec![0u8; 3 * 4096];
        storage.read_at(4096, &mut back).expect("read");
        assert!(
            back[..8192].iter().all(|&b| b == 2),
            "direct data read back"
        );
        assert!(back[8192..].iter().all(|&b| b == 0), "beyond it, untouched");
        for (offset, slice) in [
            (100, data),
            (4096, &raw[skip..skip + 100]),
            (4096, &raw[skip + 1..skip + 1 + align]),
        ] {
            assert!(
                !storage.write_direct_at(offset, slice).expect("no error"),
                "unaligned {offset} {} must not be written directly",
                slice.len()
            );
        }
        storage.read_at(4096, &mut back).expect("read");
        assert!(back[..8192].iter().all(|&b| b == 2), "nothing written");
    }

    #[test]
    fn the_link_fallback_creates_once_and_never_replaces() {
        let dir = tempfile::tempdir().expect("tempdir");
        let temp = dir.path().join(".journal.tmp");
        let path = dir.path().join("journal");
        std::fs::write(&temp, b"new").expect("temp");
        link_into_place(&temp, &path).expect("link into place");
        assert_eq!(std::fs::read(&path).expect("read"), b"new");
        assert!(!temp.exists(), "the temporary name is gone");

        std::fs::write(&temp, b"other").expect("temp");
        let refused = link_into_place(&temp, &path).expect_err("an existing file");
        assert!(refused.to_string().contains("already exists"), "{refused}");
        assert_eq!(std::fs::read(&path).expect("read"), b"new", "not replaced");
    }

    #[test]
    fn a_medium_read_returns_what_was_synced_at_any_alignment() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("journal");
        let file = FileStorage::create_image(&path, 4 * 4096).expect("create");
        let data: Vec<u8> = (0..4 * 4096u32).map(|i| (i % 253) as u8).collect();
        file.write_at(0, &data).expect("write");
        file.sync_data().expect("sync");
        for (offset, len) in [(0, 4096), (4096, 2 * 4096), (0, 4 * 4096), (100, 5000)] {
            let mut back = vec![0u8; len];
            file.read_medium_at(offset as u64, &mut back)
                .expect("read the medium");
            assert_eq!(back, data[offset..offset + len], "at {offset}, {len} bytes");
        }
        let mut past = vec![0u8; 4096];
        assert!(file.read_medium_at(4 * 4096, &mut past).is_err());
    }

    #[test]
    fn a_durable_write_lands_whole_at_any_alignment() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("image");
        let image = FileStorage::create_image(&path, 3 * 4096).expect("create");
        let data: Vec<u8> = (0..6000u32).map(|i| (i % 251) as u8).collect();
        image.write_durable_at(1000, &data).expect("durable write");
        let mut back = vec![0u8; 3 * 4096];
        image.read_at(0, &mut back).expect("read");
        assert!(back[..1000].iter().all(|&b| b == 0));
        assert_eq!(&back[1000..7000], &data[..]);
        assert!(back[7000..].iter().all(|&b| b == 0));
        let past_the_end = image.write_durable_at(3 * 4096 - 10, &[1; 20]);
        assert!(past_the_end.is_ok(), "a regular file grows, as with pwrite");
        assert_eq!(image.len().expect("len"), 3 * 4096 + 10);
    }
}
