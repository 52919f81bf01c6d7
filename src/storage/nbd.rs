//! [`Storage`] over an NBD export: an image on another host or behind
//! another storage daemon (qemu-storage-daemon, qemu-nbd, nbdkit).
//!
//! One connection carries many requests at once: callers write their
//! request under the writer lock and wait for their own reply, which a
//! reader thread matches by handle. The mapping to the trait:
//!
//! | Storage            | NBD                                            |
//! |--------------------|------------------------------------------------|
//! | `read_at`          | READ (structured replies when the server has them) |
//! | `write_at`         | WRITE                                          |
//! | `write_durable_at` | WRITE with FUA (WRITE then FLUSH without FUA)  |
//! | `sync_data`        | FLUSH: the spec makes every write the server replied to before it durable |
//! | `punch_hole`       | WRITE_ZEROES (TRIM's contents are unspecified) |
//! | `write_zeroes`     | WRITE_ZEROES with NO_HOLE                      |
//! | `next_data`        | BLOCK_STATUS, `base:allocation`                |
//!
//! Never an acknowledgement the server did not give: a reply that breaks
//! the protocol (unknown handle, bad magic, a chunk that does not fit its
//! request, a short read) ends the connection, and every request waiting
//! on it, and every later one, fails.
//!
//! A connection that drops (end of stream, a socket error, an ESHUTDOWN
//! reply) fails every request waiting on it and every later one, until
//! [`Storage::only_copy`] is called on a storage opened with a
//! `reconnect_delay`. Before that call the caller holds another copy of
//! the data, and a restarted server may have lost writes it acknowledged
//! but never flushed: reconnecting could leave the copy silently
//! different from the source, so a drop must abort the job instead.
//! After it, the export is the guest's disk and waiting beats failing:
//! - A request whose reply never came is re-sent whole on the new
//!   connection by its caller, which still holds its payload. A write may
//!   so reach the server twice, with the same data at the same place.
//! - Only one thread reconnects a connection; the others wait for it. All
//!   wait until `down_since + reconnect_delay`, `down_since` being when
//!   the drop was seen; then they fail with EIO at once, as QEMU's client
//!   does after its `reconnect-delay`. A request arriving later still makes
//!   one attempt (at most one a second, bounded by a short timeout) and
//!   fails with EIO at once if it fails, so the engine above stays
//!   responsive and a server that comes back late is still picked up.
//! - The new connection must negotiate the same export: same size, flags,
//!   block sizes and reply features. A server that answers with another
//!   one is refused (the export changed) and the attempt counts as failed.
//! - Writes the lost connection had acknowledged but no FLUSH had covered
//!   may be gone with a restarted server (the spec promises durability
//!   only after a FLUSH reply), and so may those of every other
//!   connection to it (multi-conn), noticed down or not yet. A FLUSH on
//!   a new connection does not cover them, so the next `sync_data` fails with EIO, once, instead of
//!   acknowledging a flush the server never gave for those writes. FUA
//!   writes are not in doubt: their reply was their durability.
//! - A protocol violation never reconnects: once a server sent a reply we
//!   cannot parse or match, we cannot tell which of its earlier replies
//!   were true, nor which requests are really unanswered, and re-sending
//!   to the same broken server would fail again. Every connection to the
//!   export is given up, as QEMU's client does.
//!
//! When the server advertises multi-conn, up to `connections` connections
//! share the requests, each to the least busy one (see `pool.rs`); each
//! reconnects on its own.
//!
//! The server's block-size constraints are obeyed: requests are split at
//! its maximum payload, and reads and writes not aligned to its minimum
//! block go through the covering blocks (a write reads them, patches and
//! writes them back, exclusive of every other write).

mod conn;
mod handshake;
mod pool;

use conn::Ledger;
pub(crate) use conn::fuzz_replies;
use handshake::{client_tls, open};

use std::io;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use pool::Pool;

use super::Storage;
use super::location::NbdAddress;
use crate::error::Result;
use crate::nbd::proto::{self, Command};
use crate::nbd::structured::{self as st, BlockSizes};

/// How long the handshake may take before the server counts as dead.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// The largest payload sent or accepted, whatever the server advertises:
/// 32 MiB is what every server takes (QEMU drops a connection above it).
const MAX_PAYLOAD: u32 = 32 << 20;
/// The largest WRITE_ZEROES or BLOCK_STATUS length asked for at once.
const MAX_EFFECT: u64 = 1 << 30;

/// What the handshake learnt about the export.
#[derive(Debug, Clone, Copy)]
pub struct ExportInfo {
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags (`proto::TFLAG_*`).
    pub flags: u16,
    /// Block-size constraints (the spec's defaults when none were sent).
    pub block: BlockSizes,
    /// Whether structured replies were negotiated.
    pub structured: bool,
    /// The id of `base:allocation`, when the server offers it.
    pub allocation: Option<u32>,
    /// The TLS cipher suite of the first connection, `None` in clear.
    pub tls_suite: Option<&'static str>,
}

impl ExportInfo {
    fn has(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }
}

/// How an [`NbdStorage`] behaves beyond the protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdOptions {
    /// How long to wait for a dropped server once [`Storage::only_copy`]
    /// was called (`--reconnect-delay`); `None` never reconnects.
    pub reconnect_delay: Option<Duration>,
    /// The most connections opened when the server advertises multi-conn
    /// (one is used otherwise).
    pub connections: usize,
    /// TLS credentials (QEMU's layout: `ca-cert.pem`, optionally
    /// `client-cert.pem` and `client-key.pem`) for `nbds` addresses that
    /// name none themselves (`tls-certificates=`).
    pub tls_creds: Option<PathBuf>,
}

impl Default for NbdOptions {
    fn default() -> Self {
        NbdOptions {
            reconnect_delay: None,
            // nbdcopy opens 4 by default; more buys little on 2-4 cores.
            connections: 4,
            tls_creds: None,
        }
    }
}

/// An NBD export behind the [`Storage`] trait.
pub struct NbdStorage {
    address: NbdAddress,
    info: ExportInfo,
    pool: Pool,
    /// Aligned writes share it; a read-modify-write of partial blocks takes
    /// it alone, so no other write lands in between.
    rmw: RwLock<()>,
}

impl std::fmt::Debug for NbdStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdStorage")
            .field("address", &self.address.to_string())
            .field("info", &self.info)
            .finish()
    }
}

impl NbdStorage {
    /// Connects to the export at `address` and negotiates, with the
    /// default options: never reconnect, a pool when the server allows.
    /// `writable` refuses a read-only export, and one that cannot flush
    /// (its writes could never be made durable).
    pub fn connect(address: &NbdAddress, writable: bool) -> Result<Self> {
        Self::connect_with(address, writable, NbdOptions::default())
    }

    /// [`NbdStorage::connect`] with `options`.
    pub fn connect_with(address: &NbdAddress, writable: bool, options: NbdOptions) -> Result<Self> {
        let tls = client_tls(address, &options)?;
        let ledger = Arc::new(Ledger::default());
        let first = open(address, tls.as_ref(), writable, HANDSHAKE_TIMEOUT, &ledger)?;
        let info = first.info;
        let pool = Pool::new(address.clone(), tls, writable, options, first, ledger);
        Ok(NbdStorage {
            address: address.clone(),
            info,
            pool,
            rmw: RwLock::new(()),
        })
    }

    /// How many connections carry the requests.
    pub fn connections(&self) -> usize {
        self.pool.connections()
    }

    /// How many requests each connection was given so far, reconnects
    /// included: how the pool spread the load.
    pub fn requests_per_connection(&self) -> Vec<u64> {
        self.pool.requests_per_connection()
    }

    /// Requests sent and not yet answered, over all connections.
    pub fn in_flight(&self) -> usize {
        self.pool.in_flight()
    }

    /// What the handshake learnt.
    pub fn info(&self) -> ExportInfo {
        self.info
    }

    /// The address this storage was opened with.
    pub fn address(&self) -> &NbdAddress {
        &self.address
    }

    fn min(&self) -> u64 {
        u64::from(self.info.block.minimum)
    }

    fn max_payload(&self) -> u64 {
        let m = self.info.block.maximum.min(MAX_PAYLOAD);
        // A multiple of the minimum, so that split pieces stay aligned.
        u64::from(m) / self.min() * self.min()
    }

    fn check_range(&self, offset: u64, len: u64) -> io::Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.info.size => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "{offset}+{len} is past the export's end ({})",
                    self.info.size
                ),
            )),
        }
    }

    fn aligned(&self, offset: u64, len: u64) -> bool {
        offset.is_multiple_of(self.min()) && len.is_multiple_of(self.min())
    }

    /// The covering range of whole minimum blocks.
    fn cover(&self, offset: u64, len: u64) -> Range<u64> {
        let m = self.min();
        let start = offset / m * m;
        let end = (offset + len).div_ceil(m) * m;
        start..end.min(self.info.size.div_ceil(m) * m)
    }

    fn read_aligned(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let step = self.max_payload() as usize;
        for (n, piece) in buf.chunks_mut(step).enumerate() {
            let at = offset + (n * step) as u64;
            self.pool
                .call(Command::Read, 0, at, piece.len() as u32, None, Some(piece))?;
        }
        Ok(())
    }

    fn write_aligned(&self, offset: u64, data: &[u8], fua: bool) -> io::Result<()> {
        let step = self.max_payload() as usize;
        let flags = if fua && self.info.has(proto::TFLAG_SEND_FUA) {
            proto::CMD_FLAG_FUA
        } else {
            0
        };
        for (n, piece) in data.chunks(step).enumerate() {
            let at = offset + (n * step) as u64;
            self.pool.call(
                Command::Write,
                flags,
                at,
                piece.len() as u32,
                Some(piece),
                None,
            )?;
        }
        if fua && flags == 0 {
            self.sync_data()?;
        }
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8], fua: bool) -> io::Result<()> {
        self.check_range(offset, data.len() as u64)?;
        if data.is_empty() {
            return Ok(());
        }
        if self.aligned(offset, data.len() as u64) {
            let _shared = self.rmw.read().unwrap_or_else(|p| p.into_inner());
            return self.write_aligned(offset, data, fua);
        }
        let _alone = self.rmw.write().unwrap_or_else(|p| p.into_inner());
        let cover = self.cover(offset, data.len() as u64);
        let mut block = vec![0u8; (cover.end - cover.start) as usize];
        self.read_aligned(cover.start, &mut block)?;
        let at = (offset - cover.start) as usize;
        block[at..at + data.len()].copy_from_slice(data);
        self.write_aligned(cover.start, &block, fua)
    }

    /// WRITE_ZEROES over `offset..offset+len` in pieces, with `flags`.
    fn zero(&self, offset: u64, len: u64, flags: u16) -> io::Result<()> {
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        if !self.info.has(proto::TFLAG_SEND_WRITE_ZEROES) || !self.aligned(offset, len) {
            return self.write_zero_bytes(offset, len);
        }
        let _shared = self.rmw.read().unwrap_or_else(|p| p.into_inner());
        let step = MAX_EFFECT / self.min() * self.min();
        let mut done = 0;
        while done < len {
            let n = (len - done).min(step);
            self.pool.call(
                Command::WriteZeroes,
                flags,
                offset + done,
                n as u32,
                None,
                None,
            )?;
            done += n;
        }
        Ok(())
    }

    fn write_zero_bytes(&self, offset: u64, len: u64) -> io::Result<()> {
        let zeros = vec![0u8; len.min(1 << 20) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(zeros.len() as u64);
            self.write(offset + done, &zeros[..n as usize], false)?;
            done += n;
        }
        Ok(())
    }
}

impl Storage for NbdStorage {
    fn len(&self) -> io::Result<u64> {
        Ok(self.info.size)
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        if self.aligned(offset, buf.len() as u64) {
            return self.read_aligned(offset, buf);
        }
        let cover = self.cover(offset, buf.len() as u64);
        let mut block = vec![0u8; (cover.end - cover.start) as usize];
        self.read_aligned(cover.start, &mut block)?;
        let at = (offset - cover.start) as usize;
        buf.copy_from_slice(&block[at..at + buf.len()]);
        Ok(())
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.write(offset, data, false)
    }

    fn write_durable_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.write(offset, data, true)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.pool.flush()
    }

    fn set_len(&self, _len: u64) -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "an NBD export cannot be resized",
        ))
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.zero(offset, len, 0)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.zero(offset, len, proto::CMD_FLAG_NO_HOLE)
    }

    fn next_data(&self, offset: u64) -> io::Result<Option<Range<u64>>> {
        self.next_data_before(offset, self.info.size)
    }

    // Block status costs a round trip per gigabyte scanned: stop at `end`.
    fn next_data_before(&self, offset: u64, end: u64) -> io::Result<Option<Range<u64>>> {
        let size = self.info.size;
        let end = end.min(size);
        if self.info.allocation.is_none() {
            return Ok((offset < end).then_some(offset..end));
        }
        let m = self.min();
        // Requests stay aligned to the export's minimum block.
        let limit = end.div_ceil(m).saturating_mul(m).min(size);
        let mut at = offset / m * m;
        let mut data_start: Option<u64> = None;
        while at < limit {
            let len = (limit - at).min(MAX_EFFECT / m * m);
            let extents = self.pool.block_status(at, len as u32)?;
            for e in extents {
                let next = (at + u64::from(e.length)).min(limit);
                let zero = e.flags & st::STATE_ZERO != 0;
                match (zero, data_start) {
                    (false, None) => data_start = Some(at.max(offset)),
                    (true, Some(start)) => return Ok(Some(start..at.min(end))),
                    _ => {}
                }
                at = next;
                if at >= limit {
                    break;
                }
            }
        }
        Ok(data_start
            .filter(|&start| start < end)
            .map(|start| start..end))
    }

    fn block_size(&self) -> u64 {
        self.min()
    }

    fn only_copy(&self) {
        self.pool.only_copy();
    }
}
