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

mod pool;

use std::collections::{BTreeMap, HashMap};
use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::ops::Range;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use pool::Pool;

use super::Storage;
use super::location::{Endpoint, NbdAddress};
use crate::error::{Error, Result};
use crate::nbd::Stream;
use crate::nbd::proto::{self, Command, ProtoError, Request};
use crate::nbd::structured::{self as st, BlockSizes, ChunkHeader, Extent, ReplyKind};
use crate::nbd::tls::{self, TlsStream};
use rustls_pki_types::ServerName;

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
        let size = self.info.size;
        if self.info.allocation.is_none() {
            return Ok((offset < size).then_some(offset..size));
        }
        let m = self.min();
        let mut at = offset / m * m;
        let mut data_start: Option<u64> = None;
        while at < size {
            let len = (size - at).min(MAX_EFFECT / m * m);
            let extents = self.pool.block_status(at, len as u32)?;
            for e in extents {
                let end = (at + u64::from(e.length)).min(size);
                let zero = e.flags & st::STATE_ZERO != 0;
                match (zero, data_start) {
                    (false, None) => data_start = Some(at.max(offset)),
                    (true, Some(start)) => return Ok(Some(start..at)),
                    _ => {}
                }
                at = end;
                if at >= size {
                    break;
                }
            }
        }
        Ok(data_start.map(|start| start..size))
    }

    fn only_copy(&self) {
        self.pool.only_copy();
    }
}

/// The TLS configuration and server name an `nbds` address needs; `None`
/// for a plain one. Loaded once per storage: every connection and
/// reconnection uses the same credentials.
fn client_tls(address: &NbdAddress, options: &NbdOptions) -> Result<Option<ClientTarget>> {
    if !address.tls {
        return Ok(None);
    }
    let dir = address
        .tls_certificates
        .as_ref()
        .or(options.tls_creds.as_ref())
        .ok_or_else(|| {
            Error::InvalidInput(format!(
                "{address}: nbds needs TLS credentials: --tls-creds DIR or \
                 ?tls-certificates=DIR (ca-cert.pem, client-cert.pem, client-key.pem)"
            ))
        })?;
    let config = tls::client_config(dir)?;
    let host = match (&address.tls_hostname, &address.endpoint) {
        (Some(name), _) => name.as_str(),
        (None, Endpoint::Tcp { host, .. }) => host.as_str(),
        // What QEMU and libnbd would need spelled out; the usual name of
        // a certificate for a server on this host.
        (None, Endpoint::Unix { .. }) => "localhost",
    };
    let name =
        tls::server_name(host).map_err(|e| Error::InvalidInput(format!("{address}: {e}")))?;
    Ok(Some(ClientTarget { config, name }))
}

/// What a TLS connection to one export is checked against.
#[derive(Debug, Clone)]
pub(crate) struct ClientTarget {
    config: tls::ClientTls,
    name: ServerName<'static>,
}

/// Dials `address` and negotiates within `timeout`: one connection ready
/// for requests, its reader thread running. With `tls`, STARTTLS comes
/// first and nothing else is said in plain text.
fn open(
    address: &NbdAddress,
    tls: Option<&ClientTarget>,
    writable: bool,
    timeout: Duration,
    ledger: &Arc<Ledger>,
) -> Result<Connection> {
    let what = |e: io::Error| Error::InvalidInput(format!("{address}: {e}"));
    let mut stream = dial(&address.endpoint, timeout).map_err(|e| Error::Io {
        op: "connect to the NBD server",
        path: None,
        source: io::Error::new(e.kind(), format!("{address}: {e}")),
    })?;
    stream.set_read_timeout(Some(timeout)).map_err(what)?;
    greet(&mut stream).map_err(what)?;
    if let Some(target) = tls {
        start_tls(&mut stream).map_err(what)?;
        stream = Stream::Tls(
            TlsStream::connect(stream, &target.config, target.name.clone()).map_err(what)?,
        );
    }
    let mut reader = stream.try_clone().map_err(what)?;
    let mut writer = stream;
    let info = handshake(&mut reader, &mut writer, &address.export)
        .map_err(|e| match tls {
            // Under TLS 1.3 the server checks our certificate after our
            // side of the handshake is done; GnuTLS servers then just
            // hang up, so the first read is where a refusal shows.
            Some(target)
                if matches!(
                    e.kind(),
                    io::ErrorKind::UnexpectedEof
                        | io::ErrorKind::ConnectionReset
                        | io::ErrorKind::BrokenPipe
                ) =>
            {
                io::Error::new(
                    e.kind(),
                    if target.config.presents_certificate() {
                        format!(
                            "the server closed the connection after the TLS handshake: it \
                             may have refused our client certificate ({})",
                            target.config.dir().join(tls::CLIENT_CERT).display()
                        )
                    } else {
                        format!(
                            "the server closed the connection after the TLS handshake: it \
                             may require a client certificate, and {} has no {}",
                            target.config.dir().display(),
                            tls::CLIENT_CERT
                        )
                    },
                )
            }
            _ => e,
        })
        .map_err(what)?;
    reader.set_read_timeout(None).map_err(what)?;
    if writable && info.has(proto::TFLAG_READ_ONLY) {
        return Err(Error::InvalidInput(format!(
            "{address}: the export is read-only"
        )));
    }
    if writable && !info.has(proto::TFLAG_SEND_FLUSH) {
        return Err(Error::InvalidInput(format!(
            "{address}: the export does not take FLUSH, so no write to it could be \
             made durable"
        )));
    }
    Connection::start(reader, writer, info, Arc::clone(ledger)).map_err(what)
}

/// Which acknowledged writes a FLUSH can vouch for, shared by every
/// connection of one export.
///
/// A FLUSH covers the writes its server instance replied to before it; a
/// server that restarted may have lost the rest. We cannot see instances,
/// only connections: each connection belongs to the *epoch* of drops seen
/// when it was opened. A connection of epoch `f` that is alive talks to an
/// instance that has been up since it opened (a restart would have ended
/// it), so a FLUSH it answers covers every write acknowledged on
/// connections of epoch `f` or later. A write acknowledged on a connection
/// of an earlier epoch, and not yet flushed, may have been acknowledged by
/// an instance that is gone: that FLUSH must not vouch for it. Counting by
/// epoch, not by what a drop saw, also catches a reply parsed after the
/// drop was handled (a late segment, a slow reader thread).
#[derive(Default)]
pub(super) struct Ledger {
    /// Numbers acknowledged writes.
    seq: AtomicU64,
    /// Connection drops seen so far.
    epoch: AtomicU64,
    /// Per epoch, the lowest and highest numbers of the writes acknowledged
    /// (without FUA) on connections of that epoch and not yet covered by a
    /// FLUSH (the lowest may be below the true one: never above it).
    unflushed: Mutex<BTreeMap<u64, (u64, u64)>>,
}

impl Ledger {
    fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    /// A connection of `epoch` was lost: connections made from now on are
    /// of a new epoch. Only a loss on a connection of the current epoch is
    /// news: the older connections of a pool die one by one after the
    /// same restart, and each of them must not make the connections that
    /// replaced the first ones look older than they are.
    pub(super) fn dropped(&self, epoch: u64) {
        let _ = self
            .epoch
            .compare_exchange(epoch, epoch + 1, Ordering::SeqCst, Ordering::SeqCst);
    }

    /// Numbers a write acknowledged on a connection of `epoch`.
    fn acknowledged(&self, epoch: u64) -> u64 {
        let mut unflushed = self.unflushed.lock().unwrap_or_else(|p| p.into_inner());
        let n = self.seq.fetch_add(1, Ordering::SeqCst) + 1;
        let entry = unflushed.entry(epoch).or_insert((n, n));
        entry.1 = entry.1.max(n);
        n
    }

    /// The number of the last write acknowledged so far: what a FLUSH sent
    /// now covers.
    pub(super) fn covers(&self) -> u64 {
        self.seq.load(Ordering::SeqCst)
    }

    /// A FLUSH sent when `covers` was current succeeded on a connection of
    /// `epoch`. Returns false when it cannot vouch for every write it had
    /// to cover (some were acknowledged on an older epoch's connection);
    /// those are then reported, once.
    pub(super) fn flushed(&self, epoch: u64, covers: u64) -> bool {
        let mut unflushed = self.unflushed.lock().unwrap_or_else(|p| p.into_inner());
        let doubt = unflushed
            .iter()
            .any(|(&e, &(first, _))| e < epoch && first <= covers);
        // Covered (or reported): every write up to `covers`. Writes
        // acknowledged after the FLUSH was sent wait for the next one.
        unflushed.retain(|_, range| {
            range.0 = range.0.max(covers + 1);
            range.0 <= range.1
        });
        !doubt
    }
}

fn dial(endpoint: &Endpoint, timeout: Duration) -> io::Result<Stream> {
    match endpoint {
        Endpoint::Unix { socket } => UnixStream::connect(socket).map(Stream::Unix),
        Endpoint::Tcp { host, port } => {
            let mut last = io::Error::new(io::ErrorKind::NotFound, "the host has no address");
            for addr in (host.as_str(), *port).to_socket_addrs()? {
                match TcpStream::connect_timeout(&addr, timeout) {
                    Ok(s) => {
                        // Requests are small and latency-bound.
                        s.set_nodelay(true)?;
                        return Ok(Stream::Tcp(s));
                    }
                    Err(e) => last = e,
                }
            }
            Err(last)
        }
    }
}

/// Why the handshake failed, for the message.
fn proto_error(e: ProtoError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

fn read_exact_vec(reader: &mut impl Read, len: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    reader.read_exact(&mut buf)?;
    Ok(buf)
}

/// One option's replies: `on_reply` sees every reply that is not the final
/// ACK or an error; the error replies come back as `Err` with the
/// server's message.
fn option(
    reader: &mut impl Read,
    writer: &mut impl Write,
    option: u32,
    data: &[u8],
    mut on_reply: impl FnMut(u32, &[u8]) -> io::Result<()>,
) -> io::Result<std::result::Result<(), (u32, String)>> {
    writer.write_all(&proto::encode_option(option, data))?;
    loop {
        let header =
            proto::parse_option_reply_header(&proto::read_array(reader)?).map_err(proto_error)?;
        if header.option != option {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "a reply to option {} while {option} was asked",
                    header.option
                ),
            ));
        }
        if header.length as usize > proto::MAX_STRING + 64 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("an option reply of {} bytes", header.length),
            ));
        }
        let body = read_exact_vec(reader, header.length as usize)?;
        match header.reply {
            proto::REP_ACK => return Ok(Ok(())),
            r if r & proto::REP_ERR != 0 => {
                return Ok(Err((r, String::from_utf8_lossy(&body).into_owned())));
            }
            r => on_reply(r, &body)?,
        }
    }
}

fn refused(what: &str, error: (u32, String)) -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionRefused, refused_text(what, error))
}

fn refused_text(what: &str, (code, message): (u32, String)) -> String {
    let reason = match code {
        proto::REP_ERR_UNSUP => "not supported".to_string(),
        proto::REP_ERR_POLICY => "refused by policy".to_string(),
        proto::REP_ERR_UNKNOWN => "no such export".to_string(),
        proto::REP_ERR_TLS_REQD => "the server requires TLS (use nbds://)".to_string(),
        proto::REP_ERR_BLOCK_SIZE_REQD => "the server requires block sizes".to_string(),
        proto::REP_ERR_SHUTDOWN => "the server is shutting down".to_string(),
        c => format!("error {:#x}", c),
    };
    let message = if message.is_empty() {
        String::new()
    } else {
        format!(": {message}")
    };
    format!("{what}: {reason}{message}")
}

/// The greeting and our flags: fixed newstyle, which STARTTLS needs too.
fn greet(stream: &mut Stream) -> io::Result<()> {
    let flags = proto::parse_greeting(&proto::read_array(stream)?).map_err(proto_error)?;
    if flags & proto::FLAG_FIXED_NEWSTYLE == 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "the server does not speak fixed newstyle NBD",
        ));
    }
    let no_zeroes = flags & proto::FLAG_NO_ZEROES != 0;
    let client_flags = proto::FLAG_C_FIXED_NEWSTYLE
        | if no_zeroes {
            proto::FLAG_C_NO_ZEROES
        } else {
            0
        };
    stream.write_all(&proto::encode_client_flags(client_flags))
}

/// NBD_OPT_STARTTLS, the first option: anything but an ACK ends the
/// connection, never a fall back to plain text (which a man in the
/// middle could force by answering for the server).
fn start_tls(stream: &mut Stream) -> io::Result<()> {
    let refused = |why: String| {
        io::Error::new(
            io::ErrorKind::ConnectionRefused,
            format!("{why}; refusing to go on without TLS"),
        )
    };
    let mut reader = stream.try_clone()?;
    match option(&mut reader, stream, proto::OPT_STARTTLS, &[], |r, _| {
        Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("an unexpected reply {r:#x} to STARTTLS"),
        ))
    }) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(refused(refused_text("the server refused STARTTLS", e))),
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::UnexpectedEof
                    | io::ErrorKind::ConnectionReset
                    | io::ErrorKind::BrokenPipe
            ) =>
        {
            Err(refused(format!(
                "the server closed the connection at STARTTLS ({e})"
            )))
        }
        Err(e) => Err(e),
    }
}

/// Structured replies and `base:allocation` when offered, then GO with a
/// block-size request (which commits us to the sizes).
fn handshake(
    reader: &mut impl Read,
    writer: &mut impl Write,
    export: &str,
) -> io::Result<ExportInfo> {
    let structured = option(reader, writer, proto::OPT_STRUCTURED_REPLY, &[], |_, _| {
        Ok(())
    })?
    .is_ok();
    let mut allocation = None;
    if structured {
        let request = st::encode_meta_context_request(export, &[st::BASE_ALLOCATION]);
        let outcome = option(
            reader,
            writer,
            proto::OPT_SET_META_CONTEXT,
            &request,
            |r, body| {
                if r == st::REP_META_CONTEXT {
                    let (id, name) = st::parse_rep_meta_context(body).map_err(proto_error)?;
                    if name == st::BASE_ALLOCATION {
                        allocation = Some(id);
                    }
                }
                Ok(())
            },
        )?;
        if outcome.is_err() {
            allocation = None;
        }
    }

    let request =
        proto::encode_info_request(export, &[proto::INFO_BLOCK_SIZE]).map_err(proto_error)?;
    let mut export_info = None;
    let mut block = None;
    let outcome = option(reader, writer, proto::OPT_GO, &request, |r, body| {
        if r != proto::REP_INFO {
            return Ok(());
        }
        match st::info_type(body) {
            Some(proto::INFO_EXPORT) => {
                export_info = Some(proto::parse_info_export(body).map_err(proto_error)?)
            }
            Some(proto::INFO_BLOCK_SIZE) => {
                block = Some(st::parse_info_block_size(body).map_err(proto_error)?)
            }
            // Unknown information is to be ignored.
            _ => {}
        }
        Ok(())
    })?;
    outcome.map_err(|e| refused(&format!("export {export:?}"), e))?;
    let (size, flags) = export_info.ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "GO succeeded without NBD_INFO_EXPORT",
        )
    })?;
    let block = block.unwrap_or(BlockSizes {
        // What the spec tells a client to assume when the server is silent.
        minimum: 1,
        preferred: proto::PREFERRED_BLOCK,
        maximum: MAX_PAYLOAD,
    });
    Ok(ExportInfo {
        size,
        flags,
        block,
        structured,
        allocation,
    })
}

/// What a waiting request expects back.
enum Expect {
    /// Data for `len` bytes at `offset`.
    Read { offset: u64, len: u32 },
    /// Extents of `context` starting at `offset`.
    Status { context: u32 },
    /// Nothing but success or an error.
    Done,
}

/// A request waiting for its reply.
struct Waiter {
    expect: Expect,
    data: Vec<u8>,
    /// Read ranges already filled, start -> end: chunks must not overlap.
    filled: BTreeMap<u64, u64>,
    extents: Vec<Extent>,
    error: Option<io::Error>,
    done: bool,
    /// A write that a successful reply leaves waiting for a FLUSH.
    dirties: bool,
}

impl Waiter {
    fn new(expect: Expect, dirties: bool) -> Self {
        let data = match expect {
            Expect::Read { len, .. } => vec![0u8; len as usize],
            _ => Vec::new(),
        };
        Waiter {
            expect,
            data,
            filled: BTreeMap::new(),
            extents: Vec::new(),
            error: None,
            done: false,
            dirties,
        }
    }
}

/// Why a connection is gone.
#[derive(Clone)]
struct Broken {
    why: String,
    /// The server broke the protocol (no reconnect), rather than the
    /// stream ending or failing.
    violation: bool,
    at: Instant,
}

#[derive(Default)]
struct State {
    next_handle: u64,
    waiting: HashMap<u64, Waiter>,
    /// Set once; every request fails from then on.
    broken: Option<Broken>,
}

struct Shared {
    state: Mutex<State>,
    replied: Condvar,
    /// Shared by every connection of one storage: numbers acknowledged
    /// writes, so that a FLUSH knows which ones it covers.
    ledger: Arc<Ledger>,
    /// This connection's epoch (see [`Ledger`]).
    epoch: u64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn break_with(&self, why: String, violation: bool) {
        let mut state = self.lock();
        state.broken.get_or_insert(Broken {
            why,
            violation,
            at: Instant::now(),
        });
        drop(state);
        self.replied.notify_all();
    }

    /// Marks `handle` answered; a successful write gets its number.
    fn finish(&self, state: &mut State, handle: u64) {
        let Some(waiter) = state.waiting.get_mut(&handle) else {
            return;
        };
        waiter.done = true;
        if waiter.dirties && waiter.error.is_none() {
            // Numbered by the reader as the reply is parsed: before any
            // caller learns of it, so a FLUSH sent afterwards covers it.
            self.ledger.acknowledged(self.epoch);
        }
    }
}

/// Why a request got no success.
enum Failure {
    /// The server answered with an error: the request is done.
    Server(io::Error),
    /// No answer will come on this connection.
    Lost(Broken),
}

impl Failure {
    fn into_io(self) -> io::Error {
        match self {
            Failure::Server(e) => e,
            Failure::Lost(b) => lost(&b.why),
        }
    }
}

struct Connection {
    info: ExportInfo,
    writer: Mutex<Stream>,
    shared: Arc<Shared>,
    reader: Option<JoinHandle<()>>,
    /// A handle to shut the socket down when dropped (the reader blocks).
    closer: Stream,
}

impl Connection {
    fn start(
        reader: Stream,
        writer: Stream,
        info: ExportInfo,
        ledger: Arc<Ledger>,
    ) -> io::Result<Self> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            replied: Condvar::new(),
            epoch: ledger.epoch(),
            ledger,
        });
        let closer = writer.try_clone()?;
        let for_reader = Arc::clone(&shared);
        let structured = info.structured;
        let reader = std::thread::Builder::new()
            .name("nbd-client-reader".into())
            .spawn(move || {
                let mut reader = reader;
                let (why, violation) = match read_replies(&mut reader, &for_reader, structured) {
                    Ok(()) => ("the server closed the connection".to_string(), false),
                    // Every reply the server sent that we could not accept
                    // is InvalidData; anything else is the stream's fault.
                    Err(e) => (
                        format!("the connection failed: {e}"),
                        e.kind() == io::ErrorKind::InvalidData,
                    ),
                };
                for_reader.break_with(why, violation);
            })?;
        Ok(Connection {
            info,
            writer: Mutex::new(writer),
            shared,
            reader: Some(reader),
            closer,
        })
    }

    /// Sends one request and waits for its reply. For a read, `into`
    /// receives the data.
    fn call(
        &self,
        command: Command,
        flags: u16,
        offset: u64,
        length: u32,
        payload: Option<&[u8]>,
        into: Option<&mut [u8]>,
    ) -> std::result::Result<(), Failure> {
        let expect = match command {
            Command::Read => Expect::Read {
                offset,
                len: length,
            },
            _ => Expect::Done,
        };
        let dirties = matches!(
            command,
            Command::Write | Command::WriteZeroes | Command::Trim
        ) && flags & proto::CMD_FLAG_FUA == 0;
        let waiter = self.send(command, flags, offset, length, payload, expect, dirties)?;
        if let Some(into) = into {
            into.copy_from_slice(&waiter.data);
        }
        Ok(())
    }

    fn block_status(&self, offset: u64, length: u32) -> std::result::Result<Vec<Extent>, Failure> {
        // The pool only opens connections whose features match the first
        // one's, so a storage with allocation has it on every connection;
        // the id itself is per connection.
        let Some(context) = self.info.allocation else {
            return Err(Failure::Server(io::Error::new(
                io::ErrorKind::Unsupported,
                "no base:allocation on this connection",
            )));
        };
        let command = Command::Other(st::CMD_BLOCK_STATUS);
        let expect = Expect::Status { context };
        let waiter = self.send(command, 0, offset, length, None, expect, false)?;
        if waiter.extents.is_empty() {
            return Err(Failure::Server(io::Error::new(
                io::ErrorKind::InvalidData,
                "a block status reply without extents for base:allocation",
            )));
        }
        Ok(waiter.extents)
    }

    #[allow(clippy::too_many_arguments)]
    fn send(
        &self,
        command: Command,
        flags: u16,
        offset: u64,
        length: u32,
        payload: Option<&[u8]>,
        expect: Expect,
        dirties: bool,
    ) -> std::result::Result<Waiter, Failure> {
        let handle = {
            let mut state = self.shared.lock();
            if let Some(broken) = &state.broken {
                return Err(Failure::Lost(broken.clone()));
            }
            let handle = state.next_handle;
            state.next_handle += 1;
            // Registered before the request is sent, so that its reply
            // always finds it.
            state.waiting.insert(handle, Waiter::new(expect, dirties));
            handle
        };
        let header = proto::encode_request(&Request {
            flags,
            command,
            handle,
            offset,
            length,
        });
        let sent = {
            let mut writer = self.writer.lock().unwrap_or_else(|p| p.into_inner());
            writer
                .write_all(&header)
                .and_then(|()| payload.map_or(Ok(()), |p| writer.write_all(p)))
        };
        if let Err(e) = sent {
            // Half a request may be on the wire: the stream is useless.
            self.shared
                .break_with(format!("sending a request failed: {e}"), false);
            let _ = self.closer.shutdown();
        }
        let mut state = self.shared.lock();
        loop {
            if state.waiting.get(&handle).is_some_and(|w| w.done) {
                let waiter = state.waiting.remove(&handle).expect("present");
                return match waiter.error {
                    Some(e) => Err(Failure::Server(e)),
                    None => Ok(waiter),
                };
            }
            if let Some(broken) = &state.broken {
                let broken = broken.clone();
                state.waiting.remove(&handle);
                return Err(Failure::Lost(broken));
            }
            state = self
                .shared
                .replied
                .wait(state)
                .unwrap_or_else(|p| p.into_inner());
        }
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        // Best effort: a polite disconnect, then the socket down so the
        // reader thread ends.
        let disc = proto::encode_request(&Request {
            flags: 0,
            command: Command::Disc,
            handle: u64::MAX,
            offset: 0,
            length: 0,
        });
        if let Ok(mut writer) = self.writer.lock() {
            let _ = writer.write_all(&disc);
        }
        let _ = self.closer.shutdown();
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}

fn lost(why: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        format!("NBD export lost: {why}"),
    )
}

fn violation(why: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why.into())
}

/// An NBD error number as the `io::Error` of the same Linux errno; the
/// spec's numbers are Linux's.
fn server_error(code: u32, message: &str) -> io::Error {
    let errno = match code {
        proto::EPERM
        | proto::EIO
        | proto::ENOMEM
        | proto::EINVAL
        | proto::ENOSPC
        | proto::EOVERFLOW
        | proto::ENOTSUP
        | proto::ESHUTDOWN => code as i32,
        _ => proto::EIO as i32,
    };
    let os = io::Error::from_raw_os_error(errno);
    if message.is_empty() {
        os
    } else {
        io::Error::new(os.kind(), format!("{os} ({message})"))
    }
}

/// The reader thread: every reply, matched to its waiter, until the
/// stream ends or breaks the protocol (`Err`).
fn read_replies(reader: &mut impl Read, shared: &Shared, structured: bool) -> io::Result<()> {
    loop {
        let mut magic = [0u8; 4];
        match reader.read(&mut magic[..1]) {
            Ok(0) => return Ok(()),
            Ok(_) => reader.read_exact(&mut magic[1..])?,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
        match st::reply_kind(&magic).map_err(proto_error)? {
            ReplyKind::Simple => {
                let mut bytes = [0u8; proto::SIMPLE_REPLY_LEN];
                bytes[..4].copy_from_slice(&magic);
                reader.read_exact(&mut bytes[4..])?;
                let reply = proto::parse_simple_reply(&bytes).map_err(proto_error)?;
                simple_reply(reader, shared, reply.handle, reply.error)?;
            }
            ReplyKind::Structured if structured => {
                let mut bytes = [0u8; st::STRUCTURED_HEADER_LEN];
                bytes[..4].copy_from_slice(&magic);
                reader.read_exact(&mut bytes[4..])?;
                let header = st::parse_chunk_header(&bytes).map_err(proto_error)?;
                if header.length > MAX_PAYLOAD + 64 {
                    return Err(violation(format!(
                        "a reply chunk of {} bytes",
                        header.length
                    )));
                }
                let payload = read_exact_vec(reader, header.length as usize)?;
                chunk(shared, &header, &payload)?;
            }
            ReplyKind::Structured => {
                return Err(violation("a structured reply that was never negotiated"));
            }
        }
        shared.replied.notify_all();
    }
}

fn simple_reply(
    reader: &mut impl Read,
    shared: &Shared,
    handle: u64,
    error: u32,
) -> io::Result<()> {
    // The data of a read follows the header; its length is only known
    // from the request, so look it up without holding the lock while
    // reading the socket.
    let read_len = {
        let state = shared.lock();
        let waiter = state
            .waiting
            .get(&handle)
            .filter(|w| !w.done)
            .ok_or_else(|| violation(format!("a reply for unknown handle {handle}")))?;
        match waiter.expect {
            Expect::Read { len, .. } if error == 0 => Some(len as usize),
            Expect::Status { .. } if error == 0 => {
                return Err(violation("a simple reply to BLOCK_STATUS"));
            }
            _ => None,
        }
    };
    let data = match read_len {
        Some(len) => Some(read_exact_vec(reader, len)?),
        None => None,
    };
    let mut state = shared.lock();
    let waiter = state.waiting.get_mut(&handle).expect("still waiting");
    if error != 0 {
        waiter.error = Some(server_error(error, ""));
    } else if let Some(data) = data {
        waiter.data = data;
    }
    shared.finish(&mut state, handle);
    Ok(())
}

fn chunk(shared: &Shared, header: &ChunkHeader, payload: &[u8]) -> io::Result<()> {
    let mut state = shared.lock();
    let waiter = state
        .waiting
        .get_mut(&header.handle)
        .filter(|w| !w.done)
        .ok_or_else(|| {
            violation(format!(
                "a reply chunk for unknown handle {}",
                header.handle
            ))
        })?;
    match (header.kind, &waiter.expect) {
        (st::REPLY_TYPE_NONE, _) => {
            if !header.done() || !payload.is_empty() {
                return Err(violation("a NONE chunk that does not end its reply"));
            }
        }
        (st::REPLY_TYPE_OFFSET_DATA, &Expect::Read { offset, len }) => {
            let (at, data) = st::parse_offset_data(payload).map_err(proto_error)?;
            fill(waiter, offset, len, at, data.len() as u64, Some(data))?;
        }
        (st::REPLY_TYPE_OFFSET_HOLE, &Expect::Read { offset, len }) => {
            let (at, hole) = st::parse_offset_hole(payload).map_err(proto_error)?;
            fill(waiter, offset, len, at, u64::from(hole), None)?;
        }
        (st::REPLY_TYPE_BLOCK_STATUS, &Expect::Status { context }) => {
            let (id, extents) = st::parse_block_status(payload).map_err(proto_error)?;
            // Only the context we selected; another one is the server's
            // business and ignored.
            if id == context {
                waiter.extents = extents;
            }
        }
        (kind, _) if header.is_error() => {
            let error = st::parse_error_chunk(kind, payload).map_err(proto_error)?;
            if waiter.error.is_none() {
                waiter.error = Some(server_error(error.error, &error.message));
            }
        }
        (kind, _) => {
            return Err(violation(format!(
                "a reply chunk of type {kind} that does not fit its request"
            )));
        }
    }
    if header.done() {
        if let Expect::Read { len, .. } = waiter.expect
            && waiter.error.is_none()
        {
            let covered: u64 = waiter.filled.iter().map(|(s, e)| e - s).sum();
            if covered != u64::from(len) {
                return Err(violation(format!(
                    "a read reply that covers {covered} of {len} bytes"
                )));
            }
        }
        shared.finish(&mut state, header.handle);
    }
    Ok(())
}

/// Places `n` bytes at absolute offset `at` (data, or zeros for a hole)
/// into a read of `len` bytes at `offset`, refusing anything outside the
/// request or over a range already filled.
fn fill(
    waiter: &mut Waiter,
    offset: u64,
    len: u32,
    at: u64,
    n: u64,
    data: Option<&[u8]>,
) -> io::Result<()> {
    let start = at
        .checked_sub(offset)
        .ok_or_else(|| violation("a read chunk before its request"))?;
    let end = start
        .checked_add(n)
        .filter(|&e| e <= u64::from(len) && n > 0)
        .ok_or_else(|| violation("a read chunk past its request"))?;
    let overlaps_before = waiter
        .filled
        .range(..end)
        .next_back()
        .is_some_and(|(_, &e)| e > start);
    if overlaps_before {
        return Err(violation("read chunks that overlap"));
    }
    waiter.filled.insert(start, end);
    let target = &mut waiter.data[start as usize..end as usize];
    match data {
        Some(d) => target.copy_from_slice(d),
        None => target.fill(0),
    }
    Ok(())
}

/// The fuzz target's body: `bytes` as what a server sends after three
/// requests (a 4096-byte read at 0 as handle 0, a write as handle 1, a
/// block status of context 1 as handle 2), the first byte choosing
/// whether structured replies were negotiated. The reader must never
/// panic, and a request it completes without an error must have got all
/// it asked for.
pub(crate) fn fuzz_replies(bytes: &[u8]) {
    let Some((&mode, stream)) = bytes.split_first() else {
        return;
    };
    let shared = Shared {
        state: Mutex::new(State::default()),
        replied: Condvar::new(),
        ledger: Arc::default(),
        epoch: 0,
    };
    let expects = [
        Expect::Read {
            offset: 0,
            len: 4096,
        },
        Expect::Done,
        Expect::Status { context: 1 },
    ];
    for (handle, expect) in expects.into_iter().enumerate() {
        let dirties = matches!(expect, Expect::Done);
        shared
            .lock()
            .waiting
            .insert(handle as u64, Waiter::new(expect, dirties));
    }
    let _ = read_replies(&mut &stream[..], &shared, mode & 1 == 1);
    for (handle, waiter) in &shared.lock().waiting {
        if !waiter.done || waiter.error.is_some() {
            continue;
        }
        if let Expect::Read { len, .. } = waiter.expect {
            assert_eq!(waiter.data.len(), len as usize, "handle {handle}");
            let covered: u64 =
                waiter.filled.values().sum::<u64>() - waiter.filled.keys().sum::<u64>();
            assert!(
                waiter.filled.is_empty() || covered == u64::from(len),
                "a read completed with {covered} of {len} bytes"
            );
        }
    }
}
