//! What `copyctl serve` exports over NBD: the live disk of a running copy
//! job (its [`Guest`] handle), or, after a job ended, the authoritative
//! image itself.

use std::sync::atomic::{AtomicBool, Ordering};

use crate::engine::Guest;
use crate::error::{Error, Result};
use crate::nbd::ExportDevice;
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
}

/// One image served as it is, with the same fail-stop rule as the engine:
/// after a failed sync every request fails (a failed fdatasync is never
/// retried nor reported as success).
pub struct ImageDevice<S: Storage> {
    storage: S,
    size: u64,
    failed: AtomicBool,
}

impl<S: Storage> ImageDevice<S> {
    /// Serves `storage`.
    pub fn new(storage: S) -> Result<Self> {
        let size = storage.len().map_err(|e| Error::io("image size", e))?;
        Ok(ImageDevice {
            storage,
            size,
            failed: AtomicBool::new(false),
        })
    }

    fn check(&self) -> Result<()> {
        if self.failed.load(Ordering::Acquire) {
            return Err(Error::Poisoned { what: "image" });
        }
        Ok(())
    }

    fn sync(&self) -> Result<()> {
        self.check()?;
        self.storage.sync_data().map_err(|e| {
            self.failed.store(true, Ordering::Release);
            Error::io("image fdatasync", e)
        })
    }
}

impl<S: Storage + 'static> ExportDevice for ImageDevice<S> {
    fn size(&self) -> u64 {
        self.size
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.check()?;
        self.storage
            .read_at(offset, buf)
            .map_err(|e| Error::io("image read", e))
    }
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        self.check()?;
        if fua {
            // The error of a durable write may be its sync's: fatal (E5).
            return self.storage.write_durable_at(offset, data).map_err(|e| {
                self.failed.store(true, Ordering::Release);
                Error::io("image write", e)
            });
        }
        self.storage
            .write_at(offset, data)
            .map_err(|e| Error::io("image write", e))
    }
    fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        self.check()?;
        self.storage
            .write_zeroes(offset, len)
            .map_err(|e| Error::io("image write", e))?;
        if fua { self.sync() } else { Ok(()) }
    }
    fn trim(&self, offset: u64, len: u64) -> Result<()> {
        self.check()?;
        self.storage
            .punch_hole(offset, len)
            .map_err(|e| Error::io("image discard", e))
    }
    fn flush(&self) -> Result<()> {
        self.sync()
    }
}
