//! A deterministic in-memory disk that can be crashed.
//!
//! Model (after SQLite's test6.c and redb's crash backend):
//!
//! ```text
//!   write_at --> live image (what read_at sees: the page cache)
//!            `-> pending list (in order, since the last sync)
//!   sync_data -> pending applied to the durable image, list cleared
//!   read_medium_at -> durable + pending writes that will land (the medium
//!                     as the next sync leaves it; never the cache)
//!   process crash -> live, durable and pending all survive (the kernel lives on)
//!   power loss    -> durable + each pending write applied, dropped or torn
//!                    (per 512-byte sector: old, new or garbage); live := that
//! ```
//!
//! Media faults, armed one at a time: a misdirected write (the data lands at
//! another offset on the medium; the cache has it where it was asked for), a
//! lost write (acknowledged and synced, never reaches the
//! durable image), bit rot in a durable block, EIO on reads of a range, EIO on
//! a write (optionally after part of it landed), and EIO on a sync, after
//! which, as on Linux, the pending pages are marked clean whether or not they
//! reached the medium.
//!
//! Every trait call counts as one operation; `crash_after(n)` kills the
//! simulated process at call `n`, after which every call fails without effect.
//! A `SimDisk` is a handle: clones share one disk.

use std::io;
use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard};

use super::Storage;

/// The sector size used for tearing writes.
pub const SECTOR_SIZE: usize = 512;

/// What a power loss does to one pending write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteFate {
    /// The write reached the medium.
    Apply,
    /// The write never reached the medium.
    Drop,
    /// Each 512-byte sector of the write independently.
    Tear(Vec<SectorFate>),
}

/// What a power loss does to one sector of a torn write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SectorFate {
    /// The sector keeps its old contents.
    Old,
    /// The sector holds the new contents.
    New,
    /// The sector holds garbage derived from the seed.
    Garbage(u8),
}

/// A write issued since the last successful sync.
#[derive(Debug, Clone)]
pub struct PendingWrite {
    /// Where the write landed (after any misdirection).
    pub offset: u64,
    /// The bytes written.
    pub data: Vec<u8>,
    /// A lost write: acknowledged, but the medium will never hold it.
    pub lost: bool,
}

#[derive(Debug, Clone, Copy)]
enum WriteFault {
    Misdirect { to: u64 },
    Lost,
    Error { kind: io::ErrorKind, landed: usize },
}

#[derive(Debug, Clone, Default)]
struct State {
    live: Vec<u8>,
    durable: Vec<u8>,
    pending: Vec<PendingWrite>,
    ops: u64,
    crash_at: Option<u64>,
    /// Write attempts so far; faults are armed for an attempt number.
    write_attempts: u64,
    write_faults: Vec<(u64, WriteFault)>,
    sync_attempts: u64,
    /// `(attempt, persisted)`: that sync fails; `persisted` says whether the
    /// pending writes reached the medium anyway.
    sync_faults: Vec<(u64, bool)>,
    failing_reads: Vec<Range<u64>>,
    writes_seen: u64,
    syncs_seen: u64,
}

/// The simulated disk. See the module documentation.
#[derive(Debug, Clone, Default)]
pub struct SimDisk {
    state: Arc<Mutex<State>>,
    clock: Option<CrashClock>,
}

/// A storage-call counter shared by several disks, so that one simulated
/// process crash stops them all at the same call: the source, the
/// destination and the journal of a copy job die together.
#[derive(Debug, Clone, Default)]
pub struct CrashClock {
    inner: Arc<Mutex<(u64, Option<u64>)>>,
}

impl CrashClock {
    /// A clock at call 0 with no crash planned.
    pub fn new() -> Self {
        CrashClock::default()
    }

    fn lock(&self) -> MutexGuard<'_, (u64, Option<u64>)> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Calls made so far on all disks of this clock.
    pub fn ops(&self) -> u64 {
        self.lock().0
    }

    /// The process dies at call `op` (counted over all disks).
    pub fn crash_at(&self, op: u64) {
        self.lock().1 = Some(op);
    }

    /// Whether the process is dead.
    pub fn is_crashed(&self) -> bool {
        let c = self.lock();
        c.1.is_some_and(|at| c.0 >= at)
    }

    /// Counts one call; false if the process is dead.
    fn tick(&self) -> bool {
        let mut c = self.lock();
        let op = c.0;
        c.0 += 1;
        c.1.is_none_or(|at| op < at)
    }
}

fn crashed() -> io::Error {
    io::Error::other("simulated process crash: the disk is gone")
}

fn garbage(seed: u8, index: usize) -> u8 {
    // Deterministic, and unlike any byte pattern a journal block holds.
    seed.wrapping_mul(151)
        .wrapping_add(index as u8)
        .wrapping_mul(29)
        ^ 0xA5
}

impl SimDisk {
    /// A zero-filled disk of `len` bytes, all durable.
    pub fn new(len: u64) -> Self {
        Self::from_bytes(vec![0; len as usize])
    }

    /// A disk whose durable and live contents are `bytes`.
    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        let state = State {
            live: bytes.clone(),
            durable: bytes,
            ..State::default()
        };
        SimDisk {
            state: Arc::new(Mutex::new(state)),
            clock: None,
        }
    }

    /// A zero-filled disk of `len` bytes whose calls count on `clock`.
    pub fn on_clock(clock: &CrashClock, len: u64) -> Self {
        SimDisk {
            clock: Some(clock.clone()),
            ..Self::new(len)
        }
    }

    /// The same disk, counting its calls on `clock` from now on.
    pub fn with_clock(self, clock: &CrashClock) -> Self {
        SimDisk {
            clock: Some(clock.clone()),
            ..self
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock is a test failure already; keep going
        // so the panic that matters is the one reported.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Storage calls made so far.
    pub fn ops(&self) -> u64 {
        self.lock().ops
    }

    /// Successful writes so far.
    pub fn writes_seen(&self) -> u64 {
        self.lock().writes_seen
    }

    /// Successful syncs so far.
    pub fn syncs_seen(&self) -> u64 {
        self.lock().syncs_seen
    }

    /// Kills the simulated process at storage call number `op` (counting from
    /// 0 over the life of the disk): that call and every later one fail
    /// without effect.
    pub fn crash_at(&self, op: u64) {
        self.lock().crash_at = Some(op);
    }

    /// Whether the simulated process is dead.
    pub fn is_crashed(&self) -> bool {
        if self.clock.as_ref().is_some_and(|c| c.is_crashed()) {
            return true;
        }
        let s = self.lock();
        s.crash_at.is_some_and(|at| s.ops >= at)
    }

    /// The writes pending since the last sync, oldest first.
    pub fn pending(&self) -> Vec<PendingWrite> {
        self.lock().pending.clone()
    }

    /// What a reader sees now.
    pub fn live_bytes(&self) -> Vec<u8> {
        self.lock().live.clone()
    }

    /// What the medium holds now.
    pub fn durable_bytes(&self) -> Vec<u8> {
        self.lock().durable.clone()
    }

    /// The disk as a restarted process sees it after its predecessor died:
    /// the page cache survives, so nothing is lost; pending writes stay
    /// pending until someone syncs.
    pub fn after_process_crash(&self) -> SimDisk {
        let s = self.lock();
        let state = State {
            live: s.live.clone(),
            durable: s.durable.clone(),
            pending: s.pending.clone(),
            failing_reads: s.failing_reads.clone(),
            ..State::default()
        };
        SimDisk {
            state: Arc::new(Mutex::new(state)),
            clock: None,
        }
    }

    /// The disk after a power cut: the durable image plus, in order, each
    /// pending write treated as `fate` decides. Lost writes never land.
    pub fn after_power_loss(
        &self,
        mut fate: impl FnMut(usize, &PendingWrite) -> WriteFate,
    ) -> SimDisk {
        let s = self.lock();
        let mut image = s.durable.clone();
        for (index, write) in s.pending.iter().enumerate() {
            let decided = fate(index, write);
            if write.lost {
                continue;
            }
            let start = write.offset as usize;
            match decided {
                WriteFate::Apply => {
                    image[start..start + write.data.len()].copy_from_slice(&write.data)
                }
                WriteFate::Drop => {}
                WriteFate::Tear(sectors) => {
                    for (n, chunk) in write.data.chunks(SECTOR_SIZE).enumerate() {
                        let at = start + n * SECTOR_SIZE;
                        match sectors.get(n).copied().unwrap_or(SectorFate::Old) {
                            SectorFate::Old => {}
                            SectorFate::New => image[at..at + chunk.len()].copy_from_slice(chunk),
                            SectorFate::Garbage(seed) => {
                                for (i, byte) in image[at..at + chunk.len()].iter_mut().enumerate()
                                {
                                    *byte = garbage(seed, i);
                                }
                            }
                        }
                    }
                }
            }
        }
        let disk = SimDisk::from_bytes(image);
        // Bad sectors stay bad.
        disk.lock().failing_reads = s.failing_reads.clone();
        disk
    }

    /// Flips one bit of the medium (and of the cache: the page was evicted
    /// and re-read).
    pub fn rot(&self, offset: u64, bit: u8) {
        let mut s = self.lock();
        let at = offset as usize;
        s.durable[at] ^= 1 << (bit % 8);
        s.live[at] ^= 1 << (bit % 8);
    }

    /// Overwrites bytes of the medium and the cache directly, as foreign
    /// corruption would. Does not count as an operation.
    pub fn scribble(&self, offset: u64, bytes: &[u8]) {
        let mut s = self.lock();
        let at = offset as usize;
        s.durable[at..at + bytes.len()].copy_from_slice(bytes);
        s.live[at..at + bytes.len()].copy_from_slice(bytes);
    }

    fn arm_write(&self, later: u64, fault: WriteFault) {
        let mut s = self.lock();
        let at = s.write_attempts + later;
        s.write_faults.push((at, fault));
    }

    /// The write `later` writes from now (0: the next) lands at `to` instead
    /// of where it was aimed.
    pub fn misdirect_write(&self, later: u64, to: u64) {
        self.arm_write(later, WriteFault::Misdirect { to });
    }

    /// The next write lands at `to` instead of where it was aimed.
    pub fn misdirect_next_write(&self, to: u64) {
        self.misdirect_write(0, to);
    }

    /// The write `later` writes from now succeeds, is seen by reads, and
    /// never reaches the medium.
    pub fn lose_write(&self, later: u64) {
        self.arm_write(later, WriteFault::Lost);
    }

    /// The next write succeeds, is seen by reads, and never reaches the medium.
    pub fn lose_next_write(&self) {
        self.lose_write(0);
    }

    /// The next write fails with `kind` after its first `landed` bytes were
    /// written (a short write when `landed > 0`).
    pub fn fail_next_write(&self, kind: io::ErrorKind, landed: usize) {
        self.arm_write(0, WriteFault::Error { kind, landed });
    }

    /// The sync `later` syncs from now fails with EIO. `persisted` says
    /// whether the pending writes reached the medium anyway; either way they
    /// are no longer pending, so a later sync succeeds without writing them
    /// (as on Linux, where the pages are marked clean).
    pub fn fail_sync(&self, later: u64, persisted: bool) {
        let mut s = self.lock();
        let at = s.sync_attempts + later;
        s.sync_faults.push((at, persisted));
    }

    /// The next sync fails with EIO; see [`SimDisk::fail_sync`].
    pub fn fail_next_sync(&self, persisted: bool) {
        self.fail_sync(0, persisted);
    }

    /// Reads touching `range` fail with EIO from now on.
    pub fn fail_reads(&self, range: Range<u64>) {
        self.lock().failing_reads.push(range);
    }

    fn begin(&self) -> io::Result<MutexGuard<'_, State>> {
        let mut s = self.lock();
        let op = s.ops;
        s.ops += 1;
        if s.crash_at.is_some_and(|at| op >= at) {
            return Err(crashed());
        }
        if let Some(clock) = &self.clock
            && !clock.tick()
        {
            return Err(crashed());
        }
        Ok(s)
    }
}

fn check_range(len: usize, offset: u64, count: usize) -> io::Result<usize> {
    let start =
        usize::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::UnexpectedEof))?;
    if start.checked_add(count).is_none_or(|end| end > len) {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "access past the end of the disk",
        ));
    }
    Ok(start)
}

impl State {
    /// One write attempt with its armed fault, if any, recorded as pending.
    /// Returns where the bytes landed.
    fn write(&mut self, offset: u64, data: &[u8]) -> io::Result<u64> {
        check_range(self.live.len(), offset, data.len())?;
        let attempt = self.write_attempts;
        self.write_attempts += 1;
        let fault = self
            .write_faults
            .iter()
            .position(|(at, _)| *at == attempt)
            .map(|i| self.write_faults.swap_remove(i).1);
        match fault {
            None => self.record_write(offset, data, false),
            Some(WriteFault::Lost) => self.record_write(offset, data, true),
            Some(WriteFault::Misdirect { to }) => {
                check_range(self.live.len(), to, data.len())?;
                // The page cache holds the bytes where they were asked
                // for; only the medium has them elsewhere. A read through
                // the cache cannot see a misdirected write, a read of the
                // medium can.
                self.record_write(to, data, false);
                let at = offset as usize;
                self.live[at..at + data.len()].copy_from_slice(data);
                return Ok(to);
            }
            Some(WriteFault::Error { kind, landed }) => {
                let landed = landed.min(data.len());
                if landed > 0 {
                    self.record_write(offset, &data[..landed], false);
                }
                return Err(match kind {
                    io::ErrorKind::StorageFull => io::Error::from_raw_os_error(28),
                    io::ErrorKind::Other => io::Error::from_raw_os_error(5),
                    other => io::Error::from(other),
                });
            }
        }
        Ok(offset)
    }

    /// The fault armed for this sync attempt: `Some(persisted)` if it fails.
    fn take_sync_fault(&mut self) -> Option<bool> {
        let attempt = self.sync_attempts;
        self.sync_attempts += 1;
        self.sync_faults
            .iter()
            .position(|(at, _)| *at == attempt)
            .map(|i| self.sync_faults.swap_remove(i).1)
    }

    /// Cuts `len` bytes at `offset` out of every pending write.
    fn forget_pending(&mut self, offset: u64, len: u64) {
        let end = offset + len;
        let mut kept = Vec::with_capacity(self.pending.len());
        for write in std::mem::take(&mut self.pending) {
            let write_end = write.offset + write.data.len() as u64;
            if write_end <= offset || end <= write.offset {
                kept.push(write);
                continue;
            }
            if write.offset < offset {
                kept.push(PendingWrite {
                    offset: write.offset,
                    data: write.data[..(offset - write.offset) as usize].to_vec(),
                    lost: write.lost,
                });
            }
            if end < write_end {
                kept.push(PendingWrite {
                    offset: end,
                    data: write.data[(end - write.offset) as usize..].to_vec(),
                    lost: write.lost,
                });
            }
        }
        self.pending = kept;
    }

    fn record_write(&mut self, offset: u64, data: &[u8], lost: bool) {
        let at = offset as usize;
        self.live[at..at + data.len()].copy_from_slice(data);
        self.pending.push(PendingWrite {
            offset,
            data: data.to_vec(),
            lost,
        });
    }
}

/// The start index of `len` bytes at `offset`, or the error a read there
/// gets: out of range, or EIO where reads were set to fail.
fn readable(s: &State, offset: u64, len: usize) -> io::Result<usize> {
    let start = check_range(s.live.len(), offset, len)?;
    let end = offset + len as u64;
    if s.failing_reads
        .iter()
        .any(|r| r.start < end && offset < r.end)
    {
        return Err(io::Error::from_raw_os_error(5));
    }
    Ok(start)
}

impl Storage for SimDisk {
    fn len(&self) -> io::Result<u64> {
        Ok(self.begin()?.live.len() as u64)
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let s = self.begin()?;
        let start = readable(&s, offset, buf.len())?;
        buf.copy_from_slice(&s.live[start..start + buf.len()]);
        Ok(())
    }

    // The medium as the next sync leaves it: the durable image with every
    // pending write that will land (at where it lands). Not the cache: pages
    // a failed sync left clean, lost writes and misdirected writes at the
    // offset asked for are not there. Recovery syncs before it reads, so the
    // pending writes are the ones that sync makes durable.
    fn read_medium_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let s = self.begin()?;
        let start = readable(&s, offset, buf.len())?;
        let mut medium = s.durable.clone();
        for write in s.pending.iter().filter(|w| !w.lost) {
            let at = write.offset as usize;
            medium[at..at + write.data.len()].copy_from_slice(&write.data);
        }
        buf.copy_from_slice(&medium[start..start + buf.len()]);
        Ok(())
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut s = self.begin()?;
        s.write(offset, data)?;
        s.writes_seen += 1;
        Ok(())
    }

    // One call: the write (with its write faults), then the sync of that
    // write alone (with the sync faults). Earlier pending writes stay
    // pending except where the new bytes cover them: the page cache holds
    // one version of a page, so a power loss can never bring back an older
    // pending write over bytes that were made durable.
    fn write_durable_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut s = self.begin()?;
        let at = s.write(offset, data)?;
        let written = s.pending.pop().expect("just recorded");
        let sync_fault = s.take_sync_fault();
        s.forget_pending(at, data.len() as u64);
        if sync_fault != Some(false) && !written.lost {
            let start = at as usize;
            s.durable[start..start + data.len()].copy_from_slice(data);
        }
        if sync_fault.is_some() {
            return Err(io::Error::from_raw_os_error(5));
        }
        // A write, not a sync call: `syncs_seen` counts `sync_data` only.
        s.writes_seen += 1;
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        let mut s = self.begin()?;
        let pending = std::mem::take(&mut s.pending);
        let fault = s.take_sync_fault();
        if fault != Some(false) {
            for write in pending.iter().filter(|w| !w.lost) {
                let at = write.offset as usize;
                s.durable[at..at + write.data.len()].copy_from_slice(&write.data);
            }
        }
        if fault.is_some() {
            return Err(io::Error::from_raw_os_error(5));
        }
        s.syncs_seen += 1;
        Ok(())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        // Size changes are modelled as immediately durable; the journal never
        // changes its size after creation, so nothing relies on this.
        let mut s = self.begin()?;
        s.live.resize(len as usize, 0);
        s.durable.resize(len as usize, 0);
        s.pending.retain(|w| w.offset + w.data.len() as u64 <= len);
        Ok(())
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        let zeros = vec![0u8; len as usize];
        let mut s = self.begin()?;
        check_range(s.live.len(), offset, zeros.len())?;
        s.record_write(offset, &zeros, false);
        s.writes_seen += 1;
        Ok(())
    }
}
