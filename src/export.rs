//! What `copyctl serve` exports over NBD: the live disk of a running copy
//! job (its [`Guest`] handle), or, after a job ended, the authoritative
//! image itself.

use crate::engine::Guest;
use crate::error::{Error, Result};
use crate::image::{Image, Role};
use crate::nbd::{Allocation, ExportDevice, allocation_from};
use crate::storage::Storage;

impl<S: Storage + 'static, J: Storage + 'static> ExportDevice for Guest<S, J> {
    fn size(&self) -> u64 {
        Guest::size(self)
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        Guest::read(self, offset, buf)
    }
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        Guest::write(self, offset, data, fua)
    }
    fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        Guest::write_zeroes(self, offset, len, fua)
    }
    fn trim(&self, offset: u64, len: u64) -> Result<()> {
        Guest::discard(self, offset, len)
    }
    fn flush(&self) -> Result<()> {
        Guest::flush(self)
    }
    fn block_size(&self) -> u32 {
        export_block_size(Guest::block_size(self))
    }
    // Holes and data of the image answering reads when each range is
    // asked: around the switch both images hold the same bytes.
    fn allocation(&self, offset: u64, len: u32, max: usize) -> Result<Vec<Allocation>> {
        let end = offset + u64::from(len);
        allocation_from(offset, len, max, |at| self.next_data(at, end))
    }
}

/// A storage's block size as the export's: a power of two of at most
/// 64 KiB (the NBD limit for a minimum block size), 1 when it is not one.
fn export_block_size(size: u64) -> u32 {
    if size.is_power_of_two() && size <= 64 << 10 {
        size as u32
    } else {
        1
    }
}

/// One image served as it is, with the same fail-stop rule as the engine:
/// after a failed sync every request fails (a failed fdatasync is never
/// retried nor reported as success). Every call that can report a
/// write-back error goes through the image's latch (`crate::image`), as
/// the engine's do.
pub struct ImageDevice<S: Storage> {
    image: Image<S>,
    size: u64,
}

impl<S: Storage> ImageDevice<S> {
    /// Serves the first `size` bytes of `storage`: the guest's disk as the
    /// job recorded it (the source's size), so that a destination larger
    /// than the source never exposes a tail the copy did not write.
    pub fn new(storage: S, size: u64) -> Result<Self> {
        let now = storage.len().map_err(|e| Error::io("image size", e))?;
        if now < size {
            return Err(Error::InvalidInput(format!(
                "the image holds {now} bytes, less than the disk's {size}"
            )));
        }
        Ok(ImageDevice {
            image: Image::new(storage, Role::Served),
            size,
        })
    }

    fn check(&self) -> Result<()> {
        if self.image.failed() {
            return Err(Error::Poisoned { what: "image" });
        }
        Ok(())
    }
}

impl<S: Storage + 'static> ExportDevice for ImageDevice<S> {
    fn size(&self) -> u64 {
        self.size
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.check()?;
        self.image.read(offset, buf)
    }
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        self.check()?;
        if fua {
            // The error of a durable write may be its sync's: fatal (E5).
            self.image.write_durable(offset, data)
        } else {
            self.image.write(offset, data)
        }
    }
    fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        self.check()?;
        self.image.zero(offset, len)?;
        if fua { self.image.sync() } else { Ok(()) }
    }
    fn trim(&self, offset: u64, len: u64) -> Result<()> {
        self.check()?;
        self.image.punch(offset, len)
    }
    fn flush(&self) -> Result<()> {
        self.image.sync()
    }
    fn block_size(&self) -> u32 {
        export_block_size(self.image.storage.block_size())
    }
    fn allocation(&self, offset: u64, len: u32, max: usize) -> Result<Vec<Allocation>> {
        self.check()?;
        let end = (offset + u64::from(len)).min(self.size);
        allocation_from(offset, len, max, |at| {
            Ok(self
                .image
                .next_data_before(at, end)?
                .map(|r| r.start.max(at)..r.end.min(end))
                .filter(|r| r.start < r.end))
        })
    }
}
