//! One connection to an export: requests sent under a lock, replies
//! matched to their waiters by a reader thread, and the ledger of which
//! acknowledged writes a FLUSH can vouch for.

use std::collections::{BTreeMap, HashMap};
use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Instant;

use super::handshake::{proto_error, read_exact_vec};
use super::{ExportInfo, MAX_PAYLOAD};
use crate::nbd::Stream;
use crate::nbd::proto::{self, Command, Request};
use crate::nbd::structured::{self as st, ChunkHeader, Extent, ReplyKind};

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
    pub(super) seq: AtomicU64,
    /// Connection drops seen so far.
    pub(super) epoch: AtomicU64,
    /// Per epoch, the lowest and highest numbers of the writes acknowledged
    /// (without FUA) on connections of that epoch and not yet covered by a
    /// FLUSH (the lowest may be below the true one: never above it).
    pub(super) unflushed: Mutex<BTreeMap<u64, (u64, u64)>>,
}

impl Ledger {
    pub(super) fn epoch(&self) -> u64 {
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
    pub(super) fn acknowledged(&self, epoch: u64) -> u64 {
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

/// What a waiting request expects back.
pub(super) enum Expect {
    /// Data for `len` bytes at `offset`.
    Read { offset: u64, len: u32 },
    /// Extents of `context` starting at `offset`.
    Status { context: u32 },
    /// Nothing but success or an error.
    Done,
}

/// A request waiting for its reply.
pub(super) struct Waiter {
    pub(super) expect: Expect,
    pub(super) data: Vec<u8>,
    /// Read ranges already filled, start -> end: chunks must not overlap.
    pub(super) filled: BTreeMap<u64, u64>,
    pub(super) extents: Vec<Extent>,
    pub(super) error: Option<io::Error>,
    pub(super) done: bool,
    /// A write that a successful reply leaves waiting for a FLUSH.
    pub(super) dirties: bool,
}

impl Waiter {
    pub(super) fn new(expect: Expect, dirties: bool) -> Self {
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
pub(super) struct Broken {
    pub(super) why: String,
    /// The server broke the protocol (no reconnect), rather than the
    /// stream ending or failing.
    pub(super) violation: bool,
    pub(super) at: Instant,
}

#[derive(Default)]
pub(super) struct State {
    pub(super) next_handle: u64,
    pub(super) waiting: HashMap<u64, Waiter>,
    /// Set once; every request fails from then on.
    pub(super) broken: Option<Broken>,
}

pub(super) struct Shared {
    pub(super) state: Mutex<State>,
    pub(super) replied: Condvar,
    /// Shared by every connection of one storage: numbers acknowledged
    /// writes, so that a FLUSH knows which ones it covers.
    pub(super) ledger: Arc<Ledger>,
    /// This connection's epoch (see [`Ledger`]).
    pub(super) epoch: u64,
}

impl Shared {
    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn break_with(&self, why: String, violation: bool) {
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
    pub(super) fn finish(&self, state: &mut State, handle: u64) {
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
pub(super) enum Failure {
    /// The server answered with an error: the request is done.
    Server(io::Error),
    /// No answer will come on this connection.
    Lost(Broken),
}

impl Failure {
    pub(super) fn into_io(self) -> io::Error {
        match self {
            Failure::Server(e) => e,
            Failure::Lost(b) => lost(&b.why),
        }
    }
}

pub(super) struct Connection {
    pub(super) info: ExportInfo,
    pub(super) writer: Mutex<Stream>,
    pub(super) shared: Arc<Shared>,
    pub(super) reader: Option<JoinHandle<()>>,
    /// A handle to shut the socket down when dropped (the reader blocks).
    pub(super) closer: Stream,
}

impl Connection {
    pub(super) fn start(
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
    pub(super) fn call(
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

    pub(super) fn block_status(
        &self,
        offset: u64,
        length: u32,
    ) -> std::result::Result<Vec<Extent>, Failure> {
        // The pool only opens connections whose features match the first
        // one's, so a storage with allocation has it on every connection;
        // the id itself is per connection.
        let Some(context) = self.info.allocation else {
            return Err(Failure::Server(io::Error::new(
                io::ErrorKind::Unsupported,
                "no base:allocation on this connection",
            )));
        };
        let command = Command::BlockStatus;
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
    pub(super) fn send(
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
            let mut parts = [
                std::io::IoSlice::new(&header),
                std::io::IoSlice::new(payload.unwrap_or_default()),
            ];
            crate::nbd::write_all_vectored(&mut *writer, &mut parts)
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

pub(super) fn lost(why: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        format!("NBD export lost: {why}"),
    )
}

pub(super) fn violation(why: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why.into())
}

/// An NBD error number as the `io::Error` of the same Linux errno; the
/// spec's numbers are Linux's.
pub(super) fn server_error(code: u32, message: &str) -> io::Error {
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
pub(super) fn read_replies(
    reader: &mut impl Read,
    shared: &Shared,
    structured: bool,
) -> io::Result<()> {
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

pub(super) fn simple_reply(
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

pub(super) fn chunk(shared: &Shared, header: &ChunkHeader, payload: &[u8]) -> io::Result<()> {
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
pub(super) fn fill(
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
