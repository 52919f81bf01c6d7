//! The guest's view of the disk: read, write (optionally force-unit-access),
//! write-zeroes, discard and flush, routed by the job's phase.
//!
//! | phase            | reads from  | writes go to                                  |
//! |------------------|-------------|-----------------------------------------------|
//! | Copying, Ready   | source      | source, then destination unless still dirty   |
//! | Aborted          | source      | source                                        |
//! | Switched, Completed | destination | destination                                |
//! | Failed           | error       | error                                         |
//!
//! A write to granules the bulk pass has not copied yet goes to the source
//! only: the pass will copy them, under the same range lock, after the
//! write. Errors on the source go back to the guest; errors on the
//! destination while mirroring abort the job and the guest never sees them.

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::{JobPhase, Shared};
use crate::error::{Error, Result};
use crate::image::Image;
use crate::storage::Storage;

/// A guest I/O handle. Cheap to clone; usable from any thread.
pub struct Guest<S: Storage, J: Storage> {
    shared: Arc<Shared<S, J>>,
}

impl<S: Storage, J: Storage> Clone for Guest<S, J> {
    fn clone(&self) -> Self {
        Guest {
            shared: Arc::clone(&self.shared),
        }
    }
}

enum Change<'a> {
    Data(&'a [u8]),
    Zeroes(u64),
    Discard(u64),
}

impl Change<'_> {
    fn len(&self) -> u64 {
        match self {
            Change::Data(d) => d.len() as u64,
            Change::Zeroes(n) | Change::Discard(n) => *n,
        }
    }
}

fn apply<S: Storage>(image: &Image<S>, offset: u64, change: &Change<'_>) -> Result<()> {
    match change {
        Change::Data(data) => image.write(offset, data),
        Change::Discard(len) => image.punch(offset, *len),
        Change::Zeroes(len) => image.zero(offset, *len),
    }
}

/// How durable a change must be when it returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Durability {
    /// Cached; a later flush makes it durable.
    Cached,
    /// The guest asked for force-unit-access: a data write syncs only
    /// itself, the rarer zeroes and discards sync the image.
    Fua,
    /// The switch's write-through window: written as usual, then the image
    /// synced, so that a write error stays a write error (the guest gets
    /// it, the job carries on) and only the sync's failure is fatal.
    WriteThrough,
}

/// How a change failed: a failed write leaves the image usable; a failed
/// sync is fatal for it (E5).
enum Failure {
    Write(Error),
    Sync(Error),
}

/// Applies `change` and makes it as durable as asked before returning.
fn apply_durably<S: Storage>(
    image: &Image<S>,
    offset: u64,
    change: &Change<'_>,
    durability: Durability,
) -> std::result::Result<(), Failure> {
    match (change, durability) {
        (_, Durability::Cached) => apply(image, offset, change).map_err(Failure::Write),
        (Change::Data(data), Durability::Fua) => {
            image.write_durable(offset, data).map_err(Failure::Sync)
        }
        (_, Durability::Fua | Durability::WriteThrough) => {
            apply(image, offset, change).map_err(Failure::Write)?;
            image.sync().map_err(Failure::Sync)
        }
    }
}

impl<S: Storage, J: Storage> Guest<S, J> {
    pub(super) fn new(shared: Arc<Shared<S, J>>) -> Self {
        Guest { shared }
    }

    /// The disk's size in bytes.
    pub fn size(&self) -> u64 {
        self.shared.size
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<Range<u64>> {
        match offset.checked_add(len) {
            Some(end) if end <= self.shared.size => Ok(offset..end),
            _ => Err(Error::InvalidInput(format!(
                "request {offset}+{len} is beyond the end of the disk ({} bytes)",
                self.shared.size
            ))),
        }
    }

    /// Runs `body` as one guest request: held at the door during a switch,
    /// counted while in flight.
    fn request<T>(&self, body: impl FnOnce(JobPhase) -> Result<T>) -> Result<T> {
        let (phase, _counted) = self.shared.enter()?;
        body(phase)
    }

    /// Reads `buf.len()` bytes at `offset` from the authoritative image.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        self.request(|phase| match phase {
            JobPhase::Switched | JobPhase::Completed => self.shared.destination.read(offset, buf),
            _ => self.shared.source.read(offset, buf),
        })
    }

    /// The first range at or after `offset` and before `end` that may hold
    /// data on the image that answers reads now (SEEK_DATA), within the
    /// disk; `None` when up to `end` all is a hole that reads as zeros.
    pub fn next_data(&self, offset: u64, end: u64) -> Result<Option<Range<u64>>> {
        let size = self.shared.size.min(end);
        let next = self.request(|phase| match phase {
            JobPhase::Switched | JobPhase::Completed => {
                self.shared.destination.next_data_before(offset, size)
            }
            _ => self.shared.source.next_data_before(offset, size),
        })?;
        Ok(next
            .map(|r| r.start.max(offset)..r.end.min(size))
            .filter(|r| r.start < r.end))
    }

    /// The logical block size requests should be aligned to: the larger of
    /// the two images' (after the switch the destination alone matters,
    /// but a client learns it once, when it connects).
    pub fn block_size(&self) -> u64 {
        let shared = &self.shared;
        shared
            .source
            .storage
            .block_size()
            .max(shared.destination.storage.block_size())
    }

    /// Writes `data` at `offset`. With `fua`, the data is durable on every
    /// image that may become authoritative before this returns.
    pub fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        self.change(offset, Change::Data(data), fua)
    }

    /// Makes `len` bytes at `offset` read as zeros, allocated.
    pub fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        self.change(offset, Change::Zeroes(len), fua)
    }

    /// Discards `len` bytes at `offset`: they read as zeros afterwards, and
    /// the images may free the space.
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.change(offset, Change::Discard(len), false)
    }

    /// Makes every write acknowledged so far durable on every image that may
    /// become authoritative (E6).
    pub fn flush(&self) -> Result<()> {
        let shared = &self.shared;
        self.request(|phase| match phase {
            JobPhase::Switched | JobPhase::Completed => {
                self.sync_authoritative(&shared.destination)
            }
            JobPhase::Aborted => self.sync_authoritative(&shared.source),
            JobPhase::Copying | JobPhase::Ready => {
                self.sync_authoritative(&shared.source)?;
                if let Err(e) = shared.destination.sync() {
                    shared.fail_destination(&e);
                }
                Ok(())
            }
            JobPhase::Failed => Err(Error::Poisoned { what: "engine" }),
        })
    }

    /// fdatasync of the one authoritative image; a failure stops the
    /// engine (E5).
    fn sync_authoritative(&self, image: &Image<S>) -> Result<()> {
        image
            .sync()
            .map_err(|e| self.authoritative_failed(image.name(), e))
    }

    fn change(&self, offset: u64, change: Change<'_>, fua: bool) -> Result<()> {
        let range = self.check_range(offset, change.len())?;
        let shared = &self.shared;
        self.request(|phase| match phase {
            _ if range.is_empty() && phase != JobPhase::Failed => Ok(()),
            JobPhase::Switched | JobPhase::Completed => {
                self.authoritative_change(&shared.destination, offset, &change, fua)
            }
            JobPhase::Aborted => self.authoritative_change(&shared.source, offset, &change, fua),
            JobPhase::Copying | JobPhase::Ready => self.mirrored(range, &change, fua),
            JobPhase::Failed => Err(Error::Poisoned { what: "engine" }),
        })
    }

    /// E1: the source, then the destination, under the range lock that
    /// keeps copy workers from interleaving. A durable data write goes to
    /// both at once: each waits for its own device flush, and a failure of
    /// either ends the mirroring (destination) or the engine (source), so
    /// the order cannot matter.
    fn mirrored(&self, range: Range<u64>, change: &Change<'_>, fua: bool) -> Result<()> {
        let shared = &self.shared;
        let g = shared.config.granularity;
        let granules = range.start / g..range.end.div_ceil(g);
        let _held = shared.ranges.lock(granules.start * g..granules.end * g);
        // Before either image changes: a crash between the two writes must
        // leave the extent listed for a resumed job to copy again.
        let _marked = super::intent::mark(shared, &range)?;
        // Granules still dirty will be copied by the pass after we let go;
        // only the copier clears bits, and the range lock keeps it out.
        let any_clean = granules.clone().any(|i| !shared.dirty.get(i));
        let to_destination = any_clean && shared.phase().mirroring();
        let durability = if fua {
            Durability::Fua
        } else if shared.write_through.load(Ordering::Acquire) {
            Durability::WriteThrough
        } else {
            Durability::Cached
        };
        let at = range.start;
        let (source, destination) = if to_destination
            && durability != Durability::Cached
            && matches!(change, Change::Data(_))
        {
            let (destination, source) = super::on_both(
                || apply_durably(&shared.destination, at, change, durability),
                || apply_durably(&shared.source, at, change, durability),
            );
            (source, Some(destination))
        } else {
            let source = apply_durably(&shared.source, at, change, durability);
            let destination = (source.is_ok() && to_destination)
                .then(|| apply_durably(&shared.destination, at, change, durability));
            (source, destination)
        };
        if durability == Durability::Cached {
            // Dirty pages the write-back thread keeps bounded (see
            // `write_back`): the switch must not find them all at once.
            use super::write_back::Which;
            if source.is_ok() {
                shared.write_back.push(Which::Source, range.clone());
            }
            if matches!(destination, Some(Ok(()))) {
                shared.write_back.push(Which::Destination, range.clone());
            }
        }
        if let Some(Err(Failure::Write(e) | Failure::Sync(e))) = destination {
            shared.fail_destination(&e);
        }
        match source {
            Ok(()) => Ok(()),
            Err(Failure::Write(e)) => {
                // Part of the write may have landed on the source (and all
                // of it on the destination, when both were written at
                // once). Where the destination holds copied granules, bring
                // them back in line, so the guest never sees bytes change
                // at the switch.
                self.resync(granules);
                Err(e)
            }
            Err(Failure::Sync(e)) => Err(self.authoritative_failed("source", e)),
        }
    }

    /// A change to the one image that is authoritative: a failed write
    /// goes back to the guest, a failed sync stops the engine (E5).
    fn authoritative_change(
        &self,
        image: &Image<S>,
        offset: u64,
        change: &Change<'_>,
        fua: bool,
    ) -> Result<()> {
        let durability = if fua {
            Durability::Fua
        } else {
            Durability::Cached
        };
        match apply_durably(image, offset, change, durability) {
            Ok(()) => Ok(()),
            Err(Failure::Write(e)) => Err(e),
            Err(Failure::Sync(e)) => Err(self.authoritative_failed(image.name(), e)),
        }
    }

    /// The authoritative image failed a sync: fail-stop (E5).
    fn authoritative_failed(&self, image: &str, e: Error) -> Error {
        self.shared
            .fail_engine(format!("{image}: {}", e.describe()));
        e
    }

    /// Copies `granules` from the source to the destination, under the
    /// caller's range lock, after a failed source write while mirroring.
    /// Granules still dirty are left to the bulk pass. Any failure here
    /// aborts the job: the destination can no longer be trusted to match.
    fn resync(&self, granules: Range<u64>) {
        let shared = &self.shared;
        if !shared.phase().mirroring() {
            return;
        }
        let g = shared.config.granularity;
        for granule in granules.filter(|&i| !shared.dirty.get(i)) {
            let start = granule * g;
            let end = (start + g).min(shared.size);
            let mut buf = vec![0u8; (end - start) as usize];
            let copied = shared
                .source
                .read(start, &mut buf)
                .and_then(|()| shared.destination.write(start, &buf));
            if let Err(e) = copied {
                shared.fail_destination(&e);
                return;
            }
        }
    }
}
