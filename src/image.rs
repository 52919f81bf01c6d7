//! An image that reports a write-back error once and then stays failed.
//!
//! Linux reports a write-back error once per open file description
//! (errseq): when two calls that can report it (fdatasync, a durable write,
//! `sync_file_range`) overlap on one descriptor, one gets EIO and the other
//! gets 0, although the data of both may be lost. So every such call on an
//! image runs under one mutex with the failed flag inside it: the caller
//! that sees the error latches it before any other call can report success
//! for the same data, and every later call fails (invariant 4). The copy
//! engine's two images and the image `serve` exports after a job ended are
//! all this type, so the rule cannot diverge between them.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use crate::error::{Error, Result};
use crate::storage::Storage;

/// Which image this is, for error messages and E4's panic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// The copy job's source.
    Source,
    /// The copy job's destination.
    Destination,
    /// An image served on its own, after its job ended.
    Served,
}

impl Role {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Role::Source => "source",
            Role::Destination => "destination",
            Role::Served => "image",
        }
    }

    /// `Error::Io` wants a static operation name.
    fn op(self, what: Op) -> &'static str {
        match (self, what) {
            (Role::Source, Op::Read) => "source read",
            (Role::Source, Op::Write) => "source write",
            (Role::Source, Op::Discard) => "source discard",
            (Role::Source, Op::Sync) => "source fdatasync",
            (Role::Destination, Op::Read) => "destination read",
            (Role::Destination, Op::Write) => "destination write",
            (Role::Destination, Op::Discard) => "destination discard",
            (Role::Destination, Op::Sync) => "destination fdatasync",
            (Role::Served, Op::Read) => "image read",
            (Role::Served, Op::Write) => "image write",
            (Role::Served, Op::Discard) => "image discard",
            (Role::Served, Op::Sync) => "image fdatasync",
            (Role::Source, Op::SeekData) => "source SEEK_DATA",
            (Role::Destination, Op::SeekData) => "destination SEEK_DATA",
            (Role::Served, Op::SeekData) => "image SEEK_DATA",
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Op {
    Read,
    Write,
    Discard,
    Sync,
    SeekData,
}

/// An image with a latch that turns any write after its retirement into a
/// panic (E4) and a latch for a failed sync (E5).
#[derive(Debug)]
pub(crate) struct Image<S> {
    pub storage: S,
    pub role: Role,
    retired: AtomicBool,
    /// Held across every call that can report a write-back error, with the
    /// E5 latch inside (see the module comment).
    sync_failed: Mutex<bool>,
    /// A copy of the latch for readers that must not wait behind a sync.
    poisoned: AtomicBool,
    /// Writes finished (successfully or not) so far.
    written: AtomicU64,
    /// The `written` count the last completed sync covered. A sync with
    /// nothing new to cover is skipped: a flush with no writes behind it
    /// costs nothing, and the switch's second sync is free when the guest
    /// did not write after the first.
    synced: AtomicU64,
}

impl<S: Storage> Image<S> {
    pub fn new(storage: S, role: Role) -> Self {
        Image {
            storage,
            role,
            retired: AtomicBool::new(false),
            sync_failed: Mutex::new(false),
            poisoned: AtomicBool::new(false),
            // One write counted from the start: the image may hold cached
            // writes of a process that died (an engine restarted while the
            // host kept running), which a client that reconnects expects its
            // next flush to make durable. So the first sync always runs.
            written: AtomicU64::new(1),
            synced: AtomicU64::new(0),
        }
    }

    pub fn name(&self) -> &'static str {
        self.role.name()
    }

    fn latch(&self) -> MutexGuard<'_, bool> {
        self.sync_failed.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a call that reports write-back errors failed on this image.
    pub fn failed(&self) -> bool {
        self.poisoned.load(Ordering::Acquire)
    }

    fn check_not_retired(&self) {
        assert!(
            !self.retired.load(Ordering::Acquire),
            "write on the retired {} (E4)",
            self.name()
        );
    }

    /// Every change to the image goes through here: E4's check before it,
    /// and the write count after it, failed changes too (part of one may
    /// have landed), so that a sync that starts later covers it.
    fn change(&self, what: Op, apply: impl FnOnce(&S) -> std::io::Result<()>) -> Result<()> {
        self.check_not_retired();
        let result = apply(&self.storage);
        self.written.fetch_add(1, Ordering::AcqRel);
        result.map_err(|e| Error::io(self.role.op(what), e))
    }

    pub fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.change(Op::Write, |s| s.write_at(offset, data))
    }

    /// The bulk pass's write: around the page cache when the storage can
    /// and the write is aligned (see [`Storage::write_direct_at`]), through
    /// it otherwise. Returns whether it went around the cache (nothing to
    /// write back). Counted like any write: it still needs a sync.
    pub fn write_bulk(&self, offset: u64, data: &[u8]) -> Result<bool> {
        let mut direct = false;
        self.change(Op::Write, |s| {
            direct = s.write_direct_at(offset, data)?;
            if !direct {
                s.write_at(offset, data)?;
            }
            Ok(())
        })?;
        Ok(direct)
    }

    /// A force-unit-access write: durable when it returns, without a sync
    /// of the whole image. Its error may be a failed sync, so any error is
    /// treated as one (E5): the image takes no further sync.
    pub fn write_durable(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.check_not_retired();
        self.reporting_errors(Op::Write, |s| s.write_durable_at(offset, data))
            .inspect_err(|_| {
                // A durable write needs no later sync, so it only counts
                // when it failed: part of it may sit in the cache, unsynced.
                self.written.fetch_add(1, Ordering::AcqRel);
            })
    }

    /// Runs `call` under the latch; any error latches E5.
    fn reporting_errors(
        &self,
        what: Op,
        call: impl FnOnce(&S) -> std::io::Result<()>,
    ) -> Result<()> {
        let mut failed = self.latch();
        if *failed {
            return Err(Error::Poisoned { what: self.name() });
        }
        call(&self.storage).map_err(|e| {
            *failed = true;
            self.poisoned.store(true, Ordering::Release);
            Error::io(self.role.op(what), e)
        })
    }

    pub fn zero(&self, offset: u64, len: u64) -> Result<()> {
        self.change(Op::Write, |s| s.write_zeroes(offset, len))
    }

    pub fn punch(&self, offset: u64, len: u64) -> Result<()> {
        self.change(Op::Discard, |s| s.punch_hole(offset, len))
    }

    /// The first range at or after `offset` that may hold data (`None`:
    /// the rest is a hole that reads as zeros).
    pub fn next_data(&self, offset: u64) -> Result<Option<std::ops::Range<u64>>> {
        self.next_data_before(offset, u64::MAX)
    }

    /// [`next_data`](Image::next_data), looking no further than `end`.
    pub fn next_data_before(&self, offset: u64, end: u64) -> Result<Option<std::ops::Range<u64>>> {
        self.storage
            .next_data_before(offset, end)
            .map_err(|e| Error::io(self.role.op(Op::SeekData), e))
    }

    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.storage
            .read_at(offset, buf)
            .map_err(|e| Error::io(self.role.op(Op::Read), e))
    }

    /// Whether some finished write is not covered by a completed sync.
    pub fn needs_sync(&self) -> bool {
        self.synced.load(Ordering::Acquire) < self.written.load(Ordering::Acquire)
    }

    /// fdatasync; after one failure every later call fails too (E5).
    /// Skipped when a completed sync already covered every finished write.
    pub fn sync(&self) -> Result<()> {
        let target = self.written.load(Ordering::Acquire);
        if self.synced.load(Ordering::Acquire) >= target {
            // A completed sync covered every write that finished before
            // this call (after a failed sync, `synced` stays behind).
            return Ok(());
        }
        self.reporting_errors(Op::Sync, |s| {
            // A sync that finished while this one waited for the lock may
            // already cover every write this one must.
            if self.synced.load(Ordering::Acquire) >= target {
                return Ok(());
            }
            s.sync_data()
        })?;
        self.synced.fetch_max(target, Ordering::AcqRel);
        Ok(())
    }

    /// Starts (`wait` false) or finishes (`wait` true) the write-back of a
    /// range. Any error is a failed sync (E5): `sync_file_range` may have
    /// consumed the error a later fdatasync would have reported.
    pub fn write_back(&self, range: std::ops::Range<u64>, wait: bool) -> Result<()> {
        let len = range.end - range.start;
        self.reporting_errors(Op::Sync, |s| {
            if wait {
                s.wait_write_back(range.start, len)
            } else {
                s.start_write_back(range.start, len)
            }
        })
    }

    /// E4: from now on any write is a bug.
    pub fn retire(&self) {
        self.retired.store(true, Ordering::Release);
    }
}
