//! The storage boundary: the only door between this crate and the disk.
//!
//! Everything above this module (the journal, recovery, the copy engine) sees
//! a [`Storage`]: positioned reads and writes, a data sync, a length, and the
//! two sparse-file operations the copy needs. [`FileStorage`] implements it
//! over regular files and block devices, [`NbdStorage`] over an NBD export
//! (the client), [`AnyImage`] over either; [`SimDisk`] implements it in memory
//! with a durable image, the writes pending since the last sync, and every
//! crash and media fault the journal must survive. Architecture invariant:
//! no other module opens, reads, writes or syncs a file.

mod any;
mod file;
pub mod location;
pub(crate) mod nbd;
mod sim;

use std::io;
use std::ops::Range;

pub use any::AnyImage;
pub use file::{
    CreatedFile, FileStorage, ImageIdentity, JournalAccess, LockState, create_new_file_atomically,
    file_id, stat_identity, sync_parent, write_backup_copy,
};
pub use location::{Endpoint, Location, NbdAddress};
pub use nbd::{ExportInfo, NbdOptions, NbdStorage};
pub use sim::{CrashClock, PendingWrite, SECTOR_SIZE, SectorFate, SimDisk, WriteFate};

/// The alignment of address, offset and length that
/// [`Storage::write_direct_at`] needs: a page, which covers every logical
/// block size up to 4 KiB (a device with larger blocks falls back).
pub const DIRECT_ALIGN: usize = 4096;

/// A block of bytes addressed by offset.
///
/// Contracts, each of which the simulated disk enforces:
/// - `read_at` fills the whole buffer or fails (`UnexpectedEof` past the end).
/// - `write_at` writes the whole buffer or fails; after a failure the bytes in
///   the range are unspecified. The write is durable only after `sync_data`.
/// - `write_durable_at` is `write_at` plus durability of that write alone.
/// - `sync_data` makes every write that returned before it durable. If it
///   fails, the caller must assume any of those writes may or may not be
///   durable, and must not call it again expecting a different answer.
/// - `punch_hole` makes the range read as zeros, deallocating it where the
///   medium can.
/// - `only_copy` changes what a lost medium means, never what a returned
///   call promised: after it, a medium that went away may be waited for
///   (within a bound the storage was configured with) instead of failing
///   the call at once, and every contract above still holds.
// A disk is never "empty" in the collection sense; is_empty would mislead.
#[allow(clippy::len_without_is_empty)]
pub trait Storage: Send + Sync {
    /// Size in bytes.
    fn len(&self) -> io::Result<u64>;
    /// Reads exactly `buf.len()` bytes at `offset`.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Reads exactly `buf.len()` bytes at `offset` as the medium holds them,
    /// past any cached copy. After a failed sync (A5 in journal-format.md)
    /// the cache may hold clean pages that never reached the medium, and a
    /// misdirected write sits in the cache at the offset asked for but on
    /// the medium elsewhere; recovery and the repair read-back must see the
    /// medium. Writes still pending (no sync since) are the caller's to sync
    /// first. The default reads through `read_at`.
    fn read_medium_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.read_at(offset, buf)
    }
    /// Writes all of `data` at `offset`.
    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()>;
    /// fdatasync: makes every completed write durable.
    fn sync_data(&self) -> io::Result<()>;
    /// Writes all of `data` at `offset` and makes that write durable before
    /// returning, without waiting for other writes (a force-unit-access
    /// write: `RWF_DSYNC` on a file). An error may come from the write or
    /// from its sync; either way it is a failed sync for the caller. The
    /// default writes, then syncs everything.
    fn write_durable_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.write_at(offset, data)?;
        self.sync_data()
    }
    /// Writes all of `data` at `offset` around the page cache (`O_DIRECT`
    /// on a file or block device), when `data`'s address, `offset` and the
    /// length are multiples of [`DIRECT_ALIGN`] and the storage can;
    /// returns `false`, having written nothing, when it cannot. The data
    /// then needs a sync like any write (the device may cache it, and a
    /// file's new blocks are metadata), but leaves nothing in the page
    /// cache to write back. The default cannot.
    fn write_direct_at(&self, offset: u64, data: &[u8]) -> io::Result<bool> {
        let _ = (offset, data);
        Ok(false)
    }
    /// Starts write-back of `len` bytes at `offset` without waiting
    /// (`sync_file_range(SYNC_FILE_RANGE_WRITE)` on a file). No durability
    /// promise: it only lets a later sync find less to do. The default does
    /// nothing.
    fn start_write_back(&self, offset: u64, len: u64) -> io::Result<()> {
        let _ = (offset, len);
        Ok(())
    }
    /// Waits until `len` bytes at `offset` were written back (not durable:
    /// no device flush, no metadata). An error here is a write-back error
    /// that a later `sync_data` on the same file may no longer report, so
    /// the caller must treat it as a failed sync. The default does nothing.
    fn wait_write_back(&self, offset: u64, len: u64) -> io::Result<()> {
        let _ = (offset, len);
        Ok(())
    }
    /// Changes the size; new bytes read as zeros.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Makes `len` bytes at `offset` read as zeros, freeing them if possible.
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Writes `len` zero bytes at `offset` (allocated, unlike a hole), in
    /// pieces of at most 1 MiB.
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        let zeros = vec![0u8; len.min(1 << 20) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(zeros.len() as u64);
            self.write_at(offset + done, &zeros[..n as usize])?;
            done += n;
        }
        Ok(())
    }
    /// The first range at or after `offset` that may hold data, or `None` when
    /// the rest is a hole. A storage without sparse knowledge reports
    /// everything as data.
    fn next_data(&self, offset: u64) -> io::Result<Option<Range<u64>>> {
        let len = self.len()?;
        Ok((offset < len).then_some(offset..len))
    }
    /// [`next_data`](Storage::next_data) for a caller that looks no further
    /// than `end`: the first range at or after `offset` that starts before
    /// `end` and may hold data, cut at `end`. A storage whose answer costs
    /// per byte scanned (a remote export's block status) stops at `end`.
    fn next_data_before(&self, offset: u64, end: u64) -> io::Result<Option<Range<u64>>> {
        Ok(self
            .next_data(offset)?
            .filter(|r| r.start < end)
            .map(|r| r.start..r.end.min(end)))
    }
    /// The unit requests should be aligned to, a power of two: a block
    /// device's logical block size, a remote export's minimum block size;
    /// 1 where any offset and length work as well as any other.
    fn block_size(&self) -> u64 {
        1
    }
    /// From now on this image is the only one holding the guest's writes:
    /// prefer waiting for the medium over failing. Before this call a
    /// storage that loses its medium fails at once, because the caller
    /// still has another copy and a medium that came back may have lost
    /// writes it had acknowledged; after it, failing would fail the guest.
    /// The default does nothing (a local file does not come back).
    fn only_copy(&self) {}
}

impl<S: Storage + ?Sized> Storage for &S {
    fn len(&self) -> io::Result<u64> {
        (**self).len()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        (**self).read_at(offset, buf)
    }
    fn read_medium_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        (**self).read_medium_at(offset, buf)
    }
    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        (**self).write_at(offset, data)
    }
    fn sync_data(&self) -> io::Result<()> {
        (**self).sync_data()
    }
    fn write_durable_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        (**self).write_durable_at(offset, data)
    }
    fn write_direct_at(&self, offset: u64, data: &[u8]) -> io::Result<bool> {
        (**self).write_direct_at(offset, data)
    }
    fn start_write_back(&self, offset: u64, len: u64) -> io::Result<()> {
        (**self).start_write_back(offset, len)
    }
    fn wait_write_back(&self, offset: u64, len: u64) -> io::Result<()> {
        (**self).wait_write_back(offset, len)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        (**self).set_len(len)
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        (**self).punch_hole(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        (**self).write_zeroes(offset, len)
    }
    fn next_data(&self, offset: u64) -> io::Result<Option<Range<u64>>> {
        (**self).next_data(offset)
    }
    fn next_data_before(&self, offset: u64, end: u64) -> io::Result<Option<Range<u64>>> {
        (**self).next_data_before(offset, end)
    }
    fn block_size(&self) -> u64 {
        (**self).block_size()
    }
    fn only_copy(&self) {
        (**self).only_copy()
    }
}
