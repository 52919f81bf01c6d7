//! An image wherever it lives: a local file or block device, or an NBD
//! export. Everything above storage holds an [`AnyImage`] and never asks
//! which; one enum rather than `Box<dyn Storage>` keeps the guest path free
//! of an indirect call per request and the job a single type.

use std::io;
use std::ops::Range;
use std::path::Path;

use super::location::{Location, NbdAddress};
use super::nbd::{NbdOptions, NbdStorage};
use super::{FileStorage, Storage};
use crate::error::Result;

/// A file or an export behind the [`Storage`] trait.
#[derive(Debug)]
pub enum AnyImage {
    /// A regular file or a block device on this host.
    File(FileStorage),
    /// An NBD export (boxed: its connection state is much larger than a
    /// file's, and one pointer hop is nothing next to a network request).
    Export(Box<NbdStorage>),
}

impl AnyImage {
    /// Opens the image at `location`: a file (which must exist) or an
    /// export (connected with `options`).
    pub fn open(location: &Location, writable: bool, options: &NbdOptions) -> Result<Self> {
        match location {
            Location::Path(path) => Ok(AnyImage::File(FileStorage::open_image(path, writable)?)),
            Location::Nbd(address) => {
                let export = NbdStorage::connect_with(address, writable, options.clone())?;
                Ok(AnyImage::Export(Box::new(export)))
            }
        }
    }

    /// The file, if the image is one.
    pub fn file(&self) -> Option<&FileStorage> {
        match self {
            AnyImage::File(f) => Some(f),
            AnyImage::Export(_) => None,
        }
    }

    /// The export's address, if the image is one.
    pub fn export(&self) -> Option<&NbdAddress> {
        match self {
            AnyImage::File(_) => None,
            AnyImage::Export(e) => Some(e.address()),
        }
    }

    /// How a human names the image.
    pub fn name(&self) -> String {
        match self {
            AnyImage::File(f) => f.path().display().to_string(),
            AnyImage::Export(e) => e.address().to_string(),
        }
    }

    /// Opens a file image by path (the common case).
    pub fn open_file(path: &Path, writable: bool) -> Result<Self> {
        Ok(AnyImage::File(FileStorage::open_image(path, writable)?))
    }
}

macro_rules! each {
    ($self:ident, $s:ident => $e:expr) => {
        match $self {
            AnyImage::File($s) => $e,
            AnyImage::Export($s) => $e,
        }
    };
}

impl Storage for AnyImage {
    fn len(&self) -> io::Result<u64> {
        each!(self, s => s.len())
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        each!(self, s => s.read_at(offset, buf))
    }
    fn read_medium_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        each!(self, s => s.read_medium_at(offset, buf))
    }
    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        each!(self, s => s.write_at(offset, data))
    }
    fn sync_data(&self) -> io::Result<()> {
        each!(self, s => s.sync_data())
    }
    fn write_durable_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        each!(self, s => s.write_durable_at(offset, data))
    }
    fn write_direct_at(&self, offset: u64, data: &[u8]) -> io::Result<bool> {
        each!(self, s => s.write_direct_at(offset, data))
    }
    fn start_write_back(&self, offset: u64, len: u64) -> io::Result<()> {
        each!(self, s => s.start_write_back(offset, len))
    }
    fn wait_write_back(&self, offset: u64, len: u64) -> io::Result<()> {
        each!(self, s => s.wait_write_back(offset, len))
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        each!(self, s => s.set_len(len))
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        each!(self, s => s.punch_hole(offset, len))
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        each!(self, s => s.write_zeroes(offset, len))
    }
    fn next_data(&self, offset: u64) -> io::Result<Option<Range<u64>>> {
        each!(self, s => s.next_data(offset))
    }
    fn next_data_before(&self, offset: u64, end: u64) -> io::Result<Option<Range<u64>>> {
        each!(self, s => s.next_data_before(offset, end))
    }
    fn block_size(&self) -> u64 {
        each!(self, s => s.block_size())
    }
    fn only_copy(&self) {
        each!(self, s => s.only_copy())
    }
}
