//! Sockets, the handshake and the request pipeline.
//!
//! One thread accepts; each connection gets a thread that does the
//! handshake and then reads requests, and up to [`MAX_IN_FLIGHT`] worker
//! threads (started as the pipeline fills) that call the device and write
//! the replies, under a mutex on the socket's write half. Replies go out in
//! completion order, matched by the client's handle.
//!
//! A connection that breaks the protocol, or whose client vanishes, ends
//! alone; the others keep going. The library prints nothing: what happened
//! is counted in [`Stats`].
//!
//! FLUSH ordering: requests are numbered as they are read; a FLUSH waits
//! until every request numbered before it has been answered, then calls
//! [`ExportDevice::flush`]. That covers every write the client saw
//! completed before it sent the FLUSH (and a few more).

use std::collections::{BTreeSet, VecDeque};
use std::io::{self, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixListener;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use super::Stream;
use super::errno_for;
use super::proto::{
    self, ClientOption, Command, InfoRequest, OptionHeader, Payload, ProtoError, ReadError, Request,
};
use super::structured::{self as st, ChunkHeader, MetaContextRequest};
use super::tls::{ServerTls, TlsStream};
use super::{Allocation, ExportDevice};
use crate::error::{Error, Result};

/// Requests one connection may have in flight (QEMU's `MAX_NBD_REQUESTS`).
pub const MAX_IN_FLIGHT: usize = 16;
/// Option data kept in memory; longer options are answered
/// `NBD_REP_ERR_TOO_BIG` (a name is at most 4096 bytes).
const MAX_OPTION_DATA: u32 = 8 << 10;
/// Option data read and thrown away; longer ends the connection.
const OPTION_DISCARD_LIMIT: u32 = 1 << 20;
/// WRITE payloads over [`proto::MAX_PAYLOAD`] up to this are read, thrown
/// away and answered `EINVAL`; longer ends the connection.
const WRITE_DISCARD_LIMIT: u32 = 128 << 20;
/// Options one connection may send before it is considered abusive.
const MAX_OPTIONS: usize = 1024;
/// How long a client may take over each read during the handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(60);
/// The whole negotiation, TLS handshake included, must end within this:
/// the per-read timeout alone lets a peer that sends a byte a minute hold
/// a connection for ever.
const NEGOTIATION_DEADLINE: Duration = Duration::from_secs(10);
/// Connections still negotiating at most (unauthenticated peers, when TLS
/// is required); more are closed at once. Each costs a thread.
const MAX_NEGOTIATING: usize = 32;
/// Extents one BLOCK_STATUS reply describes at most (the client asks
/// again from where it ends); each costs a SEEK_DATA and a SEEK_HOLE.
const MAX_EXTENTS: usize = 256;
/// The id of `base:allocation`, the one metadata context.
const ALLOCATION_ID: u32 = 1;
/// How often the accept loop looks at the stop flag.
const ACCEPT_POLL: Duration = Duration::from_millis(20);

/// Counters, for logs and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Connections accepted.
    pub connections: u64,
    /// Connections open now.
    pub active: u64,
    /// Requests received in the transmission phase.
    pub requests: u64,
    /// Requests answered with an error.
    pub errors: u64,
    /// Connections ended by a protocol violation, a stream error or a
    /// client that vanished mid-message.
    pub dropped: u64,
}

#[derive(Default)]
struct Counters {
    connections: AtomicU64,
    active: AtomicU64,
    requests: AtomicU64,
    errors: AtomicU64,
    dropped: AtomicU64,
}

struct Shared {
    device: Arc<dyn ExportDevice>,
    name: String,
    read_only: AtomicBool,
    /// Set: TLS is required before any option but STARTTLS and ABORT.
    tls: OnceLock<ServerTls>,
    stop: AtomicBool,
    running: AtomicBool,
    counters: Counters,
    connections: Mutex<Vec<Connection>>,
}

struct Connection {
    stream: Stream,
    thread: JoinHandle<()>,
    /// Set once the connection reached transmission (after TLS, when TLS
    /// is on): until then the peer is not authenticated.
    negotiated: Arc<AtomicBool>,
    accepted: std::time::Instant,
}

enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

/// The socket file a Unix listener owns, removed when the server goes if
/// it is still the same file.
struct SocketFile {
    path: PathBuf,
    identity: (u64, u64),
}

/// An NBD server for one export. Build it with [`bind_unix`] or
/// [`bind_tcp`], then [`run`](Server::run) it on the current thread or
/// [`spawn`](Server::spawn) it.
pub struct Server {
    listener: Listener,
    shared: Arc<Shared>,
    socket: Option<SocketFile>,
}

/// A server running on its own thread; [`shutdown`](ServerHandle::shutdown)
/// (or dropping the handle) stops it.
pub struct ServerHandle {
    shared: Arc<Shared>,
    path: Option<PathBuf>,
    local_addr: Option<SocketAddr>,
    thread: Option<JoinHandle<Result<()>>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn shared(device: Arc<dyn ExportDevice>, name: &str) -> Result<Arc<Shared>> {
    if name.len() > proto::MAX_STRING || name.contains('\0') {
        return Err(Error::InvalidInput(format!(
            "export name must be at most {} bytes without NUL",
            proto::MAX_STRING
        )));
    }
    Ok(Arc::new(Shared {
        device,
        name: name.to_string(),
        read_only: AtomicBool::new(false),
        tls: OnceLock::new(),
        stop: AtomicBool::new(false),
        running: AtomicBool::new(false),
        counters: Counters::default(),
        connections: Mutex::new(Vec::new()),
    }))
}

/// Listens on a new Unix socket at `path`, mode 0600, serving `device` as
/// export `name` (clients asking for `""` get it too). Fails if anything
/// exists at `path`.
///
/// The socket is bound inside a fresh mode-0700 directory next to `path`,
/// made 0600, and renamed into place without replacing anything, so it is
/// never reachable by others with a looser mode. (If that temporary path
/// would be too long for a socket address but `path` is not, it is bound
/// at `path` directly and made 0600 right after; in that short window its
/// mode is whatever the umask allows.) The file is removed when the server
/// is dropped.
pub fn bind_unix(
    path: impl AsRef<Path>,
    device: Arc<dyn ExportDevice>,
    name: &str,
) -> Result<Server> {
    let path = path.as_ref();
    let shared = shared(device, name)?;
    let listener = crate::socket::bind_private(path)?;
    let meta = std::fs::symlink_metadata(path).map_err(|e| Error::io_at("stat", path, e))?;
    let socket = SocketFile {
        path: path.to_path_buf(),
        identity: (meta.dev(), meta.ino()),
    };
    listener
        .set_nonblocking(true)
        .map_err(|e| Error::io_at("fcntl", path, e))?;
    Ok(Server {
        listener: Listener::Unix(listener),
        shared,
        socket: Some(socket),
    })
}

/// Listens on TCP at `addr` (port 0 picks a free one), serving `device`
/// as export `name`. Without [`Server::tls`] NBD has no authentication nor
/// encryption: use it so only on networks where every peer may read and
/// write the export.
pub fn bind_tcp(
    addr: impl ToSocketAddrs,
    device: Arc<dyn ExportDevice>,
    name: &str,
) -> Result<Server> {
    let shared = shared(device, name)?;
    let listener = TcpListener::bind(addr).map_err(|e| Error::io("bind", e))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| Error::io("fcntl", e))?;
    Ok(Server {
        listener: Listener::Tcp(listener),
        shared,
        socket: None,
    })
}

impl Server {
    /// Serves the export read-only: advertises `READ_ONLY` and answers
    /// writes, zeroes and trims with `EPERM`.
    pub fn read_only(self, read_only: bool) -> Self {
        self.shared.read_only.store(read_only, Ordering::Relaxed);
        self
    }

    /// Requires TLS (the spec's FORCEDTLS): before NBD_OPT_STARTTLS every
    /// option but ABORT is answered `NBD_REP_ERR_TLS_REQD`, and
    /// `NBD_OPT_EXPORT_NAME`, which cannot be answered with an error, ends
    /// the connection. Negotiation then starts over inside TLS. A second
    /// call is ignored: a server's mode never changes under its clients.
    pub fn tls(self, tls: ServerTls) -> Self {
        let _ = self.shared.tls.set(tls);
        self
    }

    /// The TCP address, for a TCP server (useful after binding port 0).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        match &self.listener {
            Listener::Tcp(l) => l.local_addr().ok(),
            Listener::Unix(_) => None,
        }
    }

    /// The socket path, for a Unix server.
    pub fn path(&self) -> Option<&Path> {
        self.socket.as_ref().map(|s| s.path.as_path())
    }

    /// The counters so far.
    pub fn stats(&self) -> Stats {
        self.shared.stats()
    }

    /// Asks a running [`run`](Server::run) to stop: it stops accepting,
    /// closes every connection, waits for their threads and returns.
    pub fn shutdown(&self) {
        self.shared.stop.store(true, Ordering::SeqCst);
    }

    /// Accepts connections, one thread each, until
    /// [`shutdown`](Server::shutdown), then closes them and waits for their
    /// threads. Returns an error only if the listening socket fails; a
    /// failing connection ends alone. The accept loop looks at the stop
    /// flag every 20 ms (the listener is non-blocking), so a new connection
    /// may wait that long to be accepted.
    pub fn run(&self) -> Result<()> {
        if self.shared.running.swap(true, Ordering::SeqCst) {
            return Err(Error::InvalidInput("the server is already running".into()));
        }
        let result = self.accept_loop();
        self.shared.close_all();
        self.shared.running.store(false, Ordering::SeqCst);
        result
    }

    /// Runs the server on a new thread.
    pub fn spawn(self) -> ServerHandle {
        let shared = Arc::clone(&self.shared);
        let path = self.path().map(Path::to_path_buf);
        let local_addr = self.local_addr();
        let thread = thread::Builder::new()
            .name("nbd-accept".into())
            .spawn(move || self.run());
        let thread = match thread {
            Ok(t) => Some(t),
            Err(e) => {
                // Keep the error for shutdown() to report.
                let error = Error::io("spawn", e);
                Some(thread::spawn(move || Err(error)))
            }
        };
        ServerHandle {
            shared,
            path,
            local_addr,
            thread,
        }
    }

    fn accept_loop(&self) -> Result<()> {
        while !self.shared.stop.load(Ordering::SeqCst) {
            let accepted = match &self.listener {
                Listener::Unix(l) => l.accept().map(|(s, _)| Stream::Unix(s)),
                Listener::Tcp(l) => l.accept().map(|(s, _)| {
                    let _ = s.set_nodelay(true);
                    Stream::Tcp(s)
                }),
            };
            match accepted {
                Ok(stream) => self.shared.start_connection(stream),
                Err(e) => match e.kind() {
                    io::ErrorKind::WouldBlock => thread::sleep(ACCEPT_POLL),
                    io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted => {}
                    _ => match e.raw_os_error() {
                        // Out of descriptors or memory: wait, try again.
                        Some(23 | 24 | 105 | 12) => thread::sleep(ACCEPT_POLL * 5),
                        _ => return Err(Error::io("accept", e)),
                    },
                },
            }
            self.shared.reap();
        }
        Ok(())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(socket) = &self.socket
            && let Ok(meta) = std::fs::symlink_metadata(&socket.path)
            && (meta.dev(), meta.ino()) == socket.identity
        {
            let _ = std::fs::remove_file(&socket.path);
        }
    }
}

impl ServerHandle {
    /// The counters so far.
    pub fn stats(&self) -> Stats {
        self.shared.stats()
    }

    /// The socket path, for a Unix server.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The TCP address, for a TCP server.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.local_addr
    }

    /// Stops accepting, closes every connection (in-flight requests finish
    /// first), removes the socket file, and returns the final counters, or
    /// the error that stopped the accept loop.
    pub fn shutdown(mut self) -> Result<Stats> {
        self.stop()?;
        Ok(self.shared.stats())
    }

    fn stop(&mut self) -> Result<()> {
        self.shared.stop.store(true, Ordering::SeqCst);
        match self.thread.take() {
            Some(thread) => thread
                .join()
                .unwrap_or_else(|_| Err(Error::InvalidInput("the accept thread panicked".into()))),
            None => Ok(()),
        }
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

impl Shared {
    fn stats(&self) -> Stats {
        let c = &self.counters;
        Stats {
            connections: c.connections.load(Ordering::Relaxed),
            active: c.active.load(Ordering::Relaxed),
            requests: c.requests.load(Ordering::Relaxed),
            errors: c.errors.load(Ordering::Relaxed),
            dropped: c.dropped.load(Ordering::Relaxed),
        }
    }

    fn start_connection(self: &Arc<Self>, stream: Stream) {
        self.counters.connections.fetch_add(1, Ordering::Relaxed);
        let negotiating = lock(&self.connections)
            .iter()
            .filter(|c| !c.negotiated.load(Ordering::Acquire) && !c.thread.is_finished())
            .count();
        if negotiating >= MAX_NEGOTIATING {
            self.counters.dropped.fetch_add(1, Ordering::Relaxed);
            let _ = stream.shutdown();
            return;
        }
        // Accepted sockets do not inherit O_NONBLOCK on Linux; make sure.
        if stream.set_nonblocking(false).is_err() {
            self.counters.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let Ok(registered) = stream.try_clone() else {
            self.counters.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        };
        self.counters.active.fetch_add(1, Ordering::Relaxed);
        let shared = Arc::clone(self);
        let negotiated = Arc::new(AtomicBool::new(false));
        let done = Arc::clone(&negotiated);
        let peer = stream.peer();
        let spawned = thread::Builder::new()
            .name("nbd-conn".into())
            .spawn(move || {
                tracing::info!(peer = %peer, "NBD client connected");
                let end = serve_connection(&shared, stream, &done);
                tracing::info!(peer = %peer, end = %format!("{end:?}").to_lowercase(), "NBD client disconnected");
                if end == End::Dropped {
                    shared.counters.dropped.fetch_add(1, Ordering::Relaxed);
                }
                shared.counters.active.fetch_sub(1, Ordering::Relaxed);
            });
        match spawned {
            Ok(thread) => lock(&self.connections).push(Connection {
                stream: registered,
                thread,
                negotiated,
                accepted: std::time::Instant::now(),
            }),
            Err(_) => {
                self.counters.active.fetch_sub(1, Ordering::Relaxed);
                self.counters.dropped.fetch_add(1, Ordering::Relaxed);
                let _ = registered.shutdown();
            }
        }
    }

    /// Joins the threads of connections that ended, and cuts those still
    /// negotiating past the deadline (their thread then ends).
    fn reap(&self) {
        let finished: Vec<Connection> = {
            let mut all = lock(&self.connections);
            for c in all.iter() {
                if !c.negotiated.load(Ordering::Acquire)
                    && c.accepted.elapsed() > NEGOTIATION_DEADLINE
                {
                    let _ = c.stream.shutdown();
                }
            }
            let (done, open) = std::mem::take(&mut *all)
                .into_iter()
                .partition(|c| c.thread.is_finished());
            *all = open;
            done
        };
        for c in finished {
            let _ = c.thread.join();
        }
    }

    fn close_all(&self) {
        let all = std::mem::take(&mut *lock(&self.connections));
        for c in &all {
            let _ = c.stream.shutdown();
        }
        for c in all {
            let _ = c.thread.join();
        }
    }

    fn transmission_flags(&self, session: &Session) -> u16 {
        // Multi-conn: see the module's documentation.
        let mut flags = proto::TFLAG_HAS_FLAGS
            | proto::TFLAG_SEND_FLUSH
            | proto::TFLAG_SEND_FUA
            | proto::TFLAG_SEND_TRIM
            | proto::TFLAG_SEND_WRITE_ZEROES
            | proto::TFLAG_SEND_FAST_ZERO
            | proto::TFLAG_CAN_MULTI_CONN;
        if session.structured {
            // A read is always one data chunk.
            flags |= proto::TFLAG_SEND_DF;
        }
        if self.read_only.load(Ordering::Relaxed) {
            flags |= proto::TFLAG_READ_ONLY;
        }
        flags
    }

    /// The block sizes the export advertises: the device's minimum, never
    /// more than what divides the export's size (a client could not reach
    /// the tail otherwise).
    fn block_sizes(&self) -> (u32, u32, u32) {
        let size = self.device.size();
        let divides = 1u64 << size.trailing_zeros().min(16);
        let minimum = u64::from(self.device.block_size().max(1)).min(divides) as u32;
        debug_assert!(minimum.is_power_of_two() && minimum <= 64 << 10);
        let preferred = proto::PREFERRED_BLOCK.max(minimum);
        (minimum, preferred, proto::MAX_PAYLOAD)
    }

    fn serves(&self, name: &str) -> bool {
        name.is_empty() || name == self.name
    }
}

/// How a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// DISC, ABORT, or the client closed between messages.
    Clean,
    /// Protocol violation, stream error, or a half message.
    Dropped,
}

impl From<ReadError> for End {
    fn from(_: ReadError) -> End {
        End::Dropped
    }
}

impl From<io::Error> for End {
    fn from(_: io::Error) -> End {
        End::Dropped
    }
}

impl From<ProtoError> for End {
    fn from(_: ProtoError) -> End {
        End::Dropped
    }
}

/// Reads a whole `N`-byte header, or `None` if the stream ends before its
/// first byte.
fn read_header<const N: usize>(reader: &mut impl Read) -> io::Result<Option<[u8; N]>> {
    let mut buf = [0u8; N];
    let mut filled = 0;
    while filled < N {
        match reader.read(&mut buf[filled..]) {
            Ok(0) if filled == 0 => return Ok(None),
            Ok(0) => return Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(Some(buf))
}

const READ_BUFFER: usize = 128 << 10;

/// The read buffer over a TLS session, which keeps its own buffer of
/// plaintext: headers and small payloads come through this one, and most
/// of a larger payload is read straight into its own buffer (a 128 KiB
/// buffer here made every 64 KiB write's payload one copy longer).
const TLS_READ_BUFFER: usize = 16 << 10;

fn serve_connection(shared: &Arc<Shared>, stream: Stream, negotiated: &AtomicBool) -> End {
    let mut current = None;
    let end = (|| {
        let mut reader = BufReader::with_capacity(READ_BUFFER, stream.try_clone()?);
        let mut writer = stream.try_clone()?;
        // Also bounds the TLS handshake: the timeout is the socket's.
        stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
        writer.write_all(&proto::encode_greeting())?;
        let Some(flags) = read_header::<4>(&mut reader)? else {
            return Ok(End::Clean);
        };
        let flags = proto::parse_client_flags(&flags)?;
        let mut mode = match shared.tls.get() {
            Some(_) => Tls::Required,
            None => Tls::Off,
        };
        let mut session = Session::default();
        loop {
            match negotiate(shared, &mut reader, &mut writer, flags, mode, &mut session)? {
                Negotiated::Transmission => break,
                Negotiated::Closed => return Ok(End::Clean),
                Negotiated::StartTls => {
                    let Some(config) = shared.tls.get() else {
                        return Err(End::Dropped);
                    };
                    // The client must wait for our ACK before its
                    // ClientHello; bytes already here are not TLS.
                    if !reader.buffer().is_empty() {
                        return Err(End::Dropped);
                    }
                    let secured = Stream::Tls(TlsStream::accept(stream.try_clone()?, config)?);
                    // Everything negotiated before TLS is forgotten, as the
                    // spec says (the client flags are not options).
                    session = Session::default();
                    reader = BufReader::with_capacity(TLS_READ_BUFFER, secured.try_clone()?);
                    writer = secured.try_clone()?;
                    current = Some(secured);
                    mode = Tls::On;
                }
            }
        }
        stream.set_read_timeout(None)?;
        negotiated.store(true, Ordering::Release);
        Ok::<End, End>(transmission(shared, &mut reader, writer, session))
    })()
    .unwrap_or_else(|end| end);
    if let Some(secured) = current.filter(|_| end == End::Clean) {
        secured.close_notify();
    }
    let _ = stream.shutdown();
    end
}

/// What the options negotiated for the transmission phase.
#[derive(Debug, Clone, Copy, Default)]
struct Session {
    /// NBD_OPT_STRUCTURED_REPLY was acknowledged.
    structured: bool,
    /// `base:allocation` is selected: BLOCK_STATUS answers.
    allocation: bool,
}

enum Negotiated {
    Transmission,
    Closed,
    StartTls,
}

/// Where a connection stands with TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tls {
    /// The server has no TLS: STARTTLS is unsupported.
    Off,
    /// TLS is required and not started: only STARTTLS and ABORT go.
    Required,
    /// Inside TLS.
    On,
}

fn send_reply(writer: &mut impl Write, option: u32, reply: u32, data: &[u8]) -> io::Result<()> {
    writer.write_all(&proto::encode_option_reply(option, reply, data))
}

/// Option haggling, until transmission, the end, or STARTTLS (after
/// which it starts over inside TLS).
fn negotiate(
    shared: &Shared,
    reader: &mut impl Read,
    writer: &mut impl Write,
    flags: proto::ClientFlags,
    tls: Tls,
    session: &mut Session,
) -> std::result::Result<Negotiated, End> {
    for _ in 0..MAX_OPTIONS {
        let Some(header) = read_header::<{ proto::OPTION_HEADER_LEN }>(reader)? else {
            return Ok(Negotiated::Closed);
        };
        let header: OptionHeader = proto::parse_option_header(&header)?;
        let option = header.option;
        if option == proto::OPT_SET_META_CONTEXT {
            // A SET replaces the selection even when it fails.
            session.allocation = false;
        }
        let data = proto::read_option_data(reader, &header, MAX_OPTION_DATA, OPTION_DISCARD_LIMIT)?;
        match (tls, option) {
            (Tls::Required, proto::OPT_STARTTLS) => {
                if data.as_ref().is_none_or(|d| !d.is_empty()) {
                    send_reply(
                        writer,
                        option,
                        proto::REP_ERR_INVALID,
                        b"STARTTLS takes no data",
                    )?;
                    continue;
                }
                send_reply(writer, option, proto::REP_ACK, &[])?;
                return Ok(Negotiated::StartTls);
            }
            (Tls::On, proto::OPT_STARTTLS) => {
                send_reply(writer, option, proto::REP_ERR_INVALID, b"TLS is already on")?;
                continue;
            }
            // Nothing but TLS: EXPORT_NAME cannot be refused any other way.
            (Tls::Required, proto::OPT_EXPORT_NAME) => return Err(End::Dropped),
            (Tls::Required, o) if o != proto::OPT_ABORT => {
                let message = format!("option {o} is not permitted before TLS (STARTTLS)");
                send_reply(writer, option, proto::REP_ERR_TLS_REQD, message.as_bytes())?;
                continue;
            }
            _ => {}
        }
        let Some(data) = data else {
            if option == proto::OPT_EXPORT_NAME {
                // No way to answer an EXPORT_NAME with an error.
                return Err(End::Dropped);
            }
            send_reply(writer, option, proto::REP_ERR_TOO_BIG, b"option too long")?;
            continue;
        };
        let parsed = match proto::parse_option_data(option, &data) {
            Ok(parsed) => parsed,
            Err(_) if option == proto::OPT_EXPORT_NAME => return Err(End::Dropped),
            Err(e) => {
                send_reply(
                    writer,
                    option,
                    proto::REP_ERR_INVALID,
                    e.to_string().as_bytes(),
                )?;
                continue;
            }
        };
        match parsed {
            ClientOption::ExportName(name) => {
                if !shared.serves(&name) {
                    return Err(End::Dropped);
                }
                writer.write_all(&proto::encode_export_name_reply(
                    shared.device.size(),
                    shared.transmission_flags(session),
                    flags.no_zeroes,
                ))?;
                return Ok(Negotiated::Transmission);
            }
            ClientOption::Abort => {
                // The client may already be gone; that is fine.
                let _ = send_reply(writer, option, proto::REP_ACK, &[]);
                return Ok(Negotiated::Closed);
            }
            ClientOption::List => {
                send_reply(
                    writer,
                    option,
                    proto::REP_SERVER,
                    &proto::encode_rep_server(&shared.name),
                )?;
                send_reply(writer, option, proto::REP_ACK, &[])?;
            }
            ClientOption::Info(request) => {
                send_info(shared, writer, option, &request, session)?;
            }
            ClientOption::Go(request) => {
                if send_info(shared, writer, option, &request, session)? {
                    return Ok(Negotiated::Transmission);
                }
            }
            ClientOption::StructuredReply => {
                session.structured = true;
                send_reply(writer, option, proto::REP_ACK, &[])?;
            }
            ClientOption::ListMetaContext(request) => {
                meta_context(shared, writer, option, &request, session, false)?;
            }
            ClientOption::SetMetaContext(request) => {
                meta_context(shared, writer, option, &request, session, true)?;
            }
            ClientOption::Unsupported(_) => {
                send_reply(writer, option, proto::REP_ERR_UNSUP, &[])?;
            }
        }
    }
    Err(End::Dropped)
}

/// Answers LIST_META_CONTEXT (`set` false) and SET_META_CONTEXT: the
/// one context is `base:allocation`; `base:` lists it too. A SET replaces
/// the selection, so one that selects nothing turns block status off.
fn meta_context(
    shared: &Shared,
    writer: &mut impl Write,
    option: u32,
    request: &MetaContextRequest,
    session: &mut Session,
    set: bool,
) -> io::Result<()> {
    if !session.structured {
        let message = b"negotiate structured replies (NBD_OPT_STRUCTURED_REPLY) first";
        return send_reply(writer, option, proto::REP_ERR_INVALID, message);
    }
    if !shared.serves(&request.export) {
        let message = format!("no export named {:?}", request.export);
        return send_reply(writer, option, proto::REP_ERR_UNKNOWN, message.as_bytes());
    }
    let matches = |q: &str| q == st::BASE_ALLOCATION || (!set && q == "base:");
    let selected = if request.queries.is_empty() {
        !set
    } else {
        request.queries.iter().any(|q| matches(q))
    };
    if set {
        session.allocation = selected;
    }
    if selected {
        // LIST's ids mean nothing; SET's name the context in BLOCK_STATUS.
        let id = if set { ALLOCATION_ID } else { 0 };
        let data = st::encode_rep_meta_context(id, st::BASE_ALLOCATION);
        send_reply(writer, option, st::REP_META_CONTEXT, &data)?;
    }
    send_reply(writer, option, proto::REP_ACK, &[])
}

/// Answers INFO/GO; true if the export was found (and acknowledged).
fn send_info(
    shared: &Shared,
    writer: &mut impl Write,
    option: u32,
    request: &InfoRequest,
    session: &Session,
) -> io::Result<bool> {
    if !shared.serves(&request.name) {
        let message = format!("no export named {:?}", request.name);
        send_reply(writer, option, proto::REP_ERR_UNKNOWN, message.as_bytes())?;
        return Ok(false);
    }
    // INFO_NAME and INFO_DESCRIPTION requests are optional to honour and
    // ignored; block sizes are sent whether asked for or not.
    let export =
        proto::encode_info_export(shared.device.size(), shared.transmission_flags(session));
    send_reply(writer, option, proto::REP_INFO, &export)?;
    let (minimum, preferred, maximum) = shared.block_sizes();
    let sizes = proto::encode_info_block_size(minimum, preferred, maximum);
    send_reply(writer, option, proto::REP_INFO, &sizes)?;
    send_reply(writer, option, proto::REP_ACK, &[])?;
    Ok(true)
}

/// The requests of one connection that have been read and not answered,
/// by sequence number.
struct Flight {
    outstanding: Mutex<BTreeSet<u64>>,
    changed: Condvar,
}

impl Flight {
    /// Waits for a free slot, then registers `seq`; returns how many are in
    /// flight with it.
    fn enter(&self, seq: u64) -> usize {
        let mut set = lock(&self.outstanding);
        while set.len() >= MAX_IN_FLIGHT {
            set = self
                .changed
                .wait(set)
                .unwrap_or_else(PoisonError::into_inner);
        }
        set.insert(seq);
        set.len()
    }

    fn leave(&self, seq: u64) {
        lock(&self.outstanding).remove(&seq);
        self.changed.notify_all();
    }

    /// Waits until every request before `seq` has been answered.
    fn wait_before(&self, seq: u64) {
        let mut set = lock(&self.outstanding);
        while set.first().is_some_and(|&first| first < seq) {
            set = self
                .changed
                .wait(set)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }
}

struct Job {
    seq: u64,
    request: Request,
    payload: Payload,
}

struct Conn<'a> {
    shared: &'a Shared,
    session: Session,
    writer: Mutex<Stream>,
    broken: AtomicBool,
    flight: Flight,
}

/// What a request that succeeded answers.
enum Answer {
    /// A read's data, after room for the reply's header (see
    /// [`Conn::header_room`]).
    Data(Vec<u8>),
    /// Nothing but success.
    Done,
    /// BLOCK_STATUS's extents for `base:allocation`.
    Extents(Vec<Allocation>),
}

/// Why a request failed: the NBD error number, and for a structured
/// reply's error chunk, a message for people.
struct Failure {
    errno: u32,
    message: String,
}

impl Failure {
    fn new(errno: u32, message: impl Into<String>) -> Failure {
        Failure {
            errno,
            message: message.into(),
        }
    }

    fn device(error: Error) -> Failure {
        Failure::new(errno_for(&error), error.to_string())
    }
}

fn transmission(shared: &Shared, reader: &mut impl Read, writer: Stream, session: Session) -> End {
    let conn = Conn {
        shared,
        session,
        writer: Mutex::new(writer),
        broken: AtomicBool::new(false),
        flight: Flight {
            outstanding: Mutex::new(BTreeSet::new()),
            changed: Condvar::new(),
        },
    };
    let queue = Queue::default();
    let end = thread::scope(|scope| {
        let mut workers = 0usize;
        let mut seq = 0u64;
        let end = loop {
            let header = match read_header::<{ proto::REQUEST_LEN }>(reader) {
                Ok(Some(header)) => header,
                Ok(None) => break End::Clean,
                Err(_) => break End::Dropped,
            };
            let Ok(request) = proto::parse_request(&header) else {
                break End::Dropped;
            };
            shared.counters.requests.fetch_add(1, Ordering::Relaxed);
            let payload = match proto::read_payload(
                reader,
                &request,
                proto::MAX_PAYLOAD,
                WRITE_DISCARD_LIMIT,
            ) {
                Ok(payload) => payload,
                Err(_) => break End::Dropped,
            };
            if request.command == Command::Disc {
                break End::Clean;
            }
            let in_flight = conn.flight.enter(seq);
            let job = Job {
                seq,
                request,
                payload,
            };
            seq += 1;
            if in_flight > workers && workers < MAX_IN_FLIGHT {
                let spawned = thread::Builder::new()
                    .name("nbd-worker".into())
                    .spawn_scoped(scope, || worker(&conn, &queue));
                if spawned.is_ok() {
                    workers += 1;
                }
            }
            if workers == 0 {
                conn.run(job);
            } else {
                queue.push(job);
            }
        };
        queue.close();
        end
    });
    if conn.broken.load(Ordering::SeqCst) {
        End::Dropped
    } else {
        end
    }
}

/// Requests read and not yet taken by a worker. One condition variable
/// wakes exactly one idle worker per request; a channel behind a mutex
/// woke two threads per request (the receiver, then the next one waiting
/// for the mutex), which cost a fifth of the write throughput over TCP.
#[derive(Default)]
struct Queue {
    state: Mutex<(VecDeque<Job>, bool)>,
    ready: Condvar,
}

impl Queue {
    fn push(&self, job: Job) {
        lock(&self.state).0.push_back(job);
        self.ready.notify_one();
    }

    /// No more jobs: idle workers return once the queue is empty.
    fn close(&self) {
        lock(&self.state).1 = true;
        self.ready.notify_all();
    }

    fn pop(&self) -> Option<Job> {
        let mut state = lock(&self.state);
        loop {
            if let Some(job) = state.0.pop_front() {
                return Some(job);
            }
            if state.1 {
                return None;
            }
            state = self
                .ready
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }
}

fn worker(conn: &Conn<'_>, queue: &Queue) {
    while let Some(job) = queue.pop() {
        conn.run(job);
    }
}

impl Conn<'_> {
    fn run(&self, job: Job) {
        let Job {
            seq,
            request,
            payload,
        } = job;
        if request.command == Command::Flush {
            self.flight.wait_before(seq);
        }
        let outcome = catch_unwind(AssertUnwindSafe(|| self.execute(&request, payload)))
            .unwrap_or_else(|_| Err(Failure::new(proto::EIO, "internal error")));
        self.reply(&request, outcome);
        self.flight.leave(seq);
    }

    /// Bytes before a read's data in its reply: the simple reply's header,
    /// or the structured chunk's and its offset.
    fn header_room(&self) -> usize {
        if self.session.structured {
            st::OFFSET_DATA_PREFIX_LEN
        } else {
            proto::SIMPLE_REPLY_LEN
        }
    }

    /// Performs one request.
    fn execute(&self, request: &Request, payload: Payload) -> std::result::Result<Answer, Failure> {
        let device = &*self.shared.device;
        let read_only = self.shared.read_only.load(Ordering::Relaxed);
        if request.flags & !request.command.allowed_flags() != 0 {
            return Err(Failure::new(
                proto::EINVAL,
                "flags not valid for this command",
            ));
        }
        let len = u64::from(request.length);
        let in_range = request
            .offset
            .checked_add(len)
            .is_some_and(|end| end <= device.size());
        let fua = request.fua();
        let beyond = || Failure::new(proto::EINVAL, "beyond the end of the export");
        let no_space = || Failure::new(proto::ENOSPC, "beyond the end of the export");
        let read_only_error = || Failure::new(proto::EPERM, "the export is read-only");
        match request.command {
            Command::Read => {
                if request.length > proto::MAX_PAYLOAD {
                    return Err(Failure::new(
                        proto::EINVAL,
                        "read longer than the maximum payload",
                    ));
                }
                if !in_range {
                    return Err(beyond());
                }
                let room = self.header_room();
                let mut buf = vec![0u8; room + request.length as usize];
                device
                    .read(request.offset, &mut buf[room..])
                    .map_err(Failure::device)?;
                Ok(Answer::Data(buf))
            }
            Command::Write => {
                let Payload::Data(data) = payload else {
                    return Err(Failure::new(
                        proto::EINVAL,
                        "write longer than the maximum payload",
                    ));
                };
                if read_only {
                    return Err(read_only_error());
                }
                if !in_range {
                    return Err(no_space());
                }
                device
                    .write(request.offset, &data, fua)
                    .map_err(Failure::device)?;
                Ok(Answer::Done)
            }
            Command::WriteZeroes => {
                if read_only {
                    return Err(read_only_error());
                }
                if !in_range {
                    return Err(no_space());
                }
                if request.flags & proto::CMD_FLAG_FAST_ZERO != 0 && !device.zeroes_fast() {
                    // The client writes zeros itself if it still needs them.
                    return Err(Failure::new(
                        proto::ENOTSUP,
                        "zeroing here is not faster than writing zeros",
                    ));
                }
                if len > 0 {
                    device
                        .write_zeroes(request.offset, len, fua)
                        .map_err(Failure::device)?;
                }
                Ok(Answer::Done)
            }
            Command::Trim => {
                if read_only {
                    return Err(read_only_error());
                }
                if !in_range {
                    return Err(beyond());
                }
                if len > 0 {
                    device.trim(request.offset, len).map_err(Failure::device)?;
                }
                if fua {
                    device.flush().map_err(Failure::device)?;
                }
                Ok(Answer::Done)
            }
            Command::Flush => {
                device.flush().map_err(Failure::device)?;
                Ok(Answer::Done)
            }
            Command::BlockStatus => {
                if !self.session.allocation {
                    return Err(Failure::new(
                        proto::EINVAL,
                        "no metadata context selected (NBD_OPT_SET_META_CONTEXT)",
                    ));
                }
                if len == 0 || !in_range {
                    return Err(beyond());
                }
                let max = if request.flags & proto::CMD_FLAG_REQ_ONE != 0 {
                    1
                } else {
                    MAX_EXTENTS
                };
                let extents = device
                    .allocation(request.offset, request.length, max)
                    .map_err(Failure::device)?;
                let (minimum, _, _) = self.shared.block_sizes();
                let mut extents =
                    super::align_allocation(request.offset, &extents, u64::from(minimum));
                extents.truncate(max);
                // Checked right before it goes out: what the spec requires
                // of a BLOCK_STATUS chunk.
                let total: u64 = extents.iter().map(|e| u64::from(e.length)).sum();
                let valid = !extents.is_empty()
                    && extents.len() <= max
                    && extents.iter().all(|e| e.length > 0)
                    && total <= len;
                if !valid {
                    return Err(Failure::new(
                        proto::EIO,
                        "the device described its allocation wrongly",
                    ));
                }
                Ok(Answer::Extents(extents))
            }
            Command::Disc | Command::Other(_) => {
                Err(Failure::new(proto::EINVAL, "unknown command"))
            }
        }
    }

    /// Encodes the answer: a simple reply without structured replies; with
    /// them, a chunk for reads, block status and errors, and a simple reply
    /// for any other success (which the spec allows).
    fn encode(&self, request: &Request, outcome: std::result::Result<Answer, Failure>) -> Vec<u8> {
        let handle = request.handle;
        let chunk = |kind: u16, length: usize| {
            st::encode_chunk_header(&ChunkHeader {
                flags: st::REPLY_FLAG_DONE,
                kind,
                handle,
                length: length as u32,
            })
        };
        let simple = |error: u32| proto::encode_simple_reply(error, handle).to_vec();
        match (self.session.structured, outcome) {
            (false, Ok(Answer::Data(mut bytes))) => {
                bytes[..proto::SIMPLE_REPLY_LEN]
                    .copy_from_slice(&proto::encode_simple_reply(0, handle));
                bytes
            }
            (false, Ok(_)) => simple(0),
            (false, Err(failure)) => simple(failure.errno),
            (true, Ok(Answer::Data(mut bytes))) if bytes.len() > self.header_room() => {
                let len = (bytes.len() - st::OFFSET_DATA_PREFIX_LEN) as u32;
                let prefix = st::encode_offset_data_prefix(handle, request.offset, len);
                bytes[..st::OFFSET_DATA_PREFIX_LEN].copy_from_slice(&prefix);
                bytes
            }
            // A read of 0 bytes: a data chunk must carry at least one.
            (true, Ok(Answer::Data(_))) => chunk(st::REPLY_TYPE_NONE, 0).to_vec(),
            (true, Ok(Answer::Done)) => simple(0),
            (true, Ok(Answer::Extents(extents))) => {
                let wire: Vec<st::Extent> = extents
                    .iter()
                    .map(|e| st::Extent {
                        length: e.length,
                        flags: if e.hole {
                            st::STATE_HOLE | st::STATE_ZERO
                        } else {
                            0
                        },
                    })
                    .collect();
                let payload = st::encode_block_status(ALLOCATION_ID, &wire);
                let mut bytes = chunk(st::REPLY_TYPE_BLOCK_STATUS, payload.len()).to_vec();
                bytes.extend_from_slice(&payload);
                bytes
            }
            (true, Err(failure)) => {
                let payload = st::encode_error_chunk(failure.errno, &failure.message);
                let mut bytes = chunk(st::REPLY_TYPE_ERROR, payload.len()).to_vec();
                bytes.extend_from_slice(&payload);
                bytes
            }
        }
    }

    fn reply(&self, request: &Request, outcome: std::result::Result<Answer, Failure>) {
        if self.broken.load(Ordering::SeqCst) {
            return;
        }
        if outcome.is_err() {
            self.shared.counters.errors.fetch_add(1, Ordering::Relaxed);
        }
        let bytes = self.encode(request, outcome);
        let mut writer = lock(&self.writer);
        if writer.write_all(&bytes).is_err() {
            self.broken.store(true, Ordering::SeqCst);
            // Wake the reader: nobody is listening to the answers.
            let _ = writer.shutdown();
        }
    }
}
