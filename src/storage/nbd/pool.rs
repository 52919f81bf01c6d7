//! The connections behind one [`NbdStorage`](super::NbdStorage): which one
//! a request goes to, and what happens when one drops (the rules are in
//! the parent module's comment).
//!
//! Several connections are opened only when the server advertises
//! multi-conn, which promises that its cache, if any, is shared by every
//! connection to the export, so a FLUSH on one connection makes durable
//! every write *replied to* before the FLUSH was sent, on any connection.
//! `sync_data` must cover every write that returned before it, and a write
//! returns only after its reply arrived; so any FLUSH sent once
//! `sync_data` was called covers them, whichever connection carries it.
//! Without multi-conn a second connection could have its own cache that
//! our FLUSH never reaches, hence one connection only.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::conn::{Broken, Connection, Failure, Ledger, lost};
use super::handshake::{ClientTarget, open};
use super::{ExportInfo, NbdOptions};
use crate::nbd::proto::{self, Command};
use crate::nbd::structured::Extent;
use crate::storage::location::NbdAddress;

/// The first pause between failed reconnect attempts; it doubles up to
/// [`MAX_PAUSE`], so a server back after a restart is found within a
/// fraction of a second without spinning on a dead one.
const FIRST_PAUSE: Duration = Duration::from_millis(10);
const MAX_PAUSE: Duration = Duration::from_millis(250);
/// The shortest handshake an attempt is given, even at the end of the
/// budget: a local server answers in well under it.
const MIN_ATTEMPT: Duration = Duration::from_millis(50);
/// Once the budget is spent, a request makes at most one attempt of at
/// most this long, and at most one per [`LATE_EVERY`]: it must fail fast.
const LATE_ATTEMPT: Duration = Duration::from_secs(1);
const LATE_EVERY: Duration = Duration::from_secs(1);

pub(super) struct Pool {
    address: NbdAddress,
    /// TLS for every connection, reconnections included.
    tls: Option<ClientTarget>,
    writable: bool,
    /// What every connection must negotiate: the first one's export.
    info: ExportInfo,
    links: Vec<Link>,
    /// Where the search for the least busy connection starts, turning, so
    /// that idle connections share the load.
    next: AtomicUsize,
    budget: Option<Duration>,
    /// Set by `only_copy`: reconnecting is allowed from then on.
    only_copy: AtomicBool,
    /// Numbers acknowledged writes and tells which a FLUSH vouches for;
    /// shared with every connection's reader.
    ledger: Arc<Ledger>,
    /// A protocol violation on any connection: the server is not trusted
    /// again.
    poisoned: Mutex<Option<String>>,
}

struct Link {
    state: Mutex<LinkState>,
    changed: Condvar,
    busy: AtomicUsize,
    used: AtomicU64,
}

struct LinkState {
    conn: Option<Arc<Connection>>,
    /// Counts connections, so that a loss seen by several callers takes
    /// down only the connection they used.
    generation: u64,
    /// When the drop was seen; meaningful while `conn` is `None`.
    down_since: Instant,
    why: String,
    reconnecting: bool,
    last_late_attempt: Option<Instant>,
}

impl Link {
    fn new(conn: Connection) -> Link {
        Link {
            state: Mutex::new(LinkState {
                conn: Some(Arc::new(conn)),
                generation: 0,
                down_since: Instant::now(),
                why: String::new(),
                reconnecting: false,
                last_late_attempt: None,
            }),
            changed: Condvar::new(),
            busy: AtomicUsize::new(0),
            used: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, LinkState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Decrements a connection's busy count however the request ends.
struct Busy<'a>(&'a AtomicUsize);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Pool {
    pub(super) fn new(
        address: NbdAddress,
        tls: Option<ClientTarget>,
        writable: bool,
        options: NbdOptions,
        first: Connection,
        ledger: Arc<Ledger>,
    ) -> Pool {
        let info = first.info;
        let mut links = vec![Link::new(first)];
        if info.has(proto::TFLAG_CAN_MULTI_CONN) {
            while links.len() < options.connections {
                // A server that takes fewer connections than we would like
                // is still served well by those it took.
                match open(
                    &address,
                    tls.as_ref(),
                    writable,
                    super::HANDSHAKE_TIMEOUT,
                    &ledger,
                ) {
                    Ok(conn) if same_export(&info, &conn.info).is_ok() => {
                        links.push(Link::new(conn))
                    }
                    _ => break,
                }
            }
        }
        Pool {
            address,
            tls,
            writable,
            info,
            links,
            next: AtomicUsize::new(0),
            budget: options.reconnect_delay,
            only_copy: AtomicBool::new(false),
            ledger,
            poisoned: Mutex::new(None),
        }
    }

    pub(super) fn connections(&self) -> usize {
        self.links.len()
    }

    pub(super) fn requests_per_connection(&self) -> Vec<u64> {
        self.links
            .iter()
            .map(|l| l.used.load(Ordering::SeqCst))
            .collect()
    }

    pub(super) fn in_flight(&self) -> usize {
        self.links
            .iter()
            .map(|l| l.busy.load(Ordering::SeqCst))
            .sum()
    }

    pub(super) fn only_copy(&self) {
        self.only_copy.store(true, Ordering::SeqCst);
    }

    /// The budget, once reconnecting is allowed.
    fn budget(&self) -> Option<Duration> {
        self.budget
            .filter(|_| self.only_copy.load(Ordering::SeqCst))
    }

    fn poisoned(&self) -> Option<String> {
        self.poisoned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub(super) fn call(
        &self,
        command: Command,
        flags: u16,
        offset: u64,
        length: u32,
        payload: Option<&[u8]>,
        mut into: Option<&mut [u8]>,
    ) -> io::Result<()> {
        self.run(|c| c.call(command, flags, offset, length, payload, into.as_deref_mut()))
    }

    pub(super) fn block_status(&self, offset: u64, length: u32) -> io::Result<Vec<Extent>> {
        self.run(|c| c.block_status(offset, length))
    }

    /// FLUSH, on whichever connection is least busy (see the module
    /// comment for why one is enough).
    pub(super) fn flush(&self) -> io::Result<()> {
        // Taken before the FLUSH is sent: every write numbered so far had
        // its reply before the server could see this FLUSH.
        let covers = self.ledger.covers();
        let mut epoch = 0;
        // On the oldest connection: a FLUSH vouches for the writes of its
        // epoch and later ones (Ledger), so the oldest covers the most.
        self.run_on(self.oldest(), |c| {
            epoch = c.shared.epoch;
            c.call(Command::Flush, 0, 0, 0, None, None)
        })?;
        if !self.ledger.flushed(epoch, covers) {
            return Err(eio(format!(
                "{}: writes the server acknowledged on a connection that dropped before a \
                 FLUSH covered them may be lost; this FLUSH cannot vouch for them",
                self.address
            )));
        }
        Ok(())
    }

    /// The least busy connection that is up, starting the search at a
    /// turning point; a connection that is down only when all are.
    fn pick(&self) -> &Link {
        let n = self.links.len();
        if n == 1 {
            return &self.links[0];
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        let i = (0..n)
            .map(|k| (start + k) % n)
            .min_by_key(|&i| {
                let link = &self.links[i];
                let down = link.lock().conn.is_none();
                (down, link.busy.load(Ordering::SeqCst))
            })
            .expect("at least one connection");
        &self.links[i]
    }

    /// The connection of the lowest epoch that is up (any, when none is).
    fn oldest(&self) -> &Link {
        self.links
            .iter()
            .min_by_key(|link| {
                link.lock()
                    .conn
                    .as_ref()
                    .map_or(u64::MAX, |c| c.shared.epoch)
            })
            .expect("at least one connection")
    }

    /// Runs `request` on a connection until it gets an answer, re-sending
    /// it after a reconnect when the connection it went out on dropped.
    fn run<T>(
        &self,
        request: impl FnMut(&Connection) -> std::result::Result<T, Failure>,
    ) -> io::Result<T> {
        self.run_on(self.pick(), request)
    }

    /// [`Pool::run`] on `link`.
    fn run_on<T>(
        &self,
        link: &Link,
        mut request: impl FnMut(&Connection) -> std::result::Result<T, Failure>,
    ) -> io::Result<T> {
        link.busy.fetch_add(1, Ordering::SeqCst);
        let _busy = Busy(&link.busy);
        loop {
            let (conn, generation) = self.usable(link)?;
            link.used.fetch_add(1, Ordering::SeqCst);
            let broken = match request(&conn) {
                Ok(v) => return Ok(v),
                // A server going down answers what it has not done with
                // ESHUTDOWN: not done is what a re-send needs.
                Err(Failure::Server(e))
                    if e.raw_os_error() == Some(proto::ESHUTDOWN as i32)
                        && self.budget().is_some() =>
                {
                    // The spec's soft disconnect: nothing more is taken from
                    // a server that said it is going, so no late reply can
                    // acknowledge a write after the drop below.
                    conn.shared
                        .break_with(format!("the server is shutting down: {e}"), false);
                    let _ = conn.closer.shutdown();
                    Broken {
                        why: format!("the server is shutting down: {e}"),
                        violation: false,
                        at: Instant::now(),
                    }
                }
                Err(Failure::Server(e)) => return Err(e),
                Err(Failure::Lost(broken)) => broken,
            };
            self.went_down(link, generation, conn.shared.epoch, &broken);
            drop(conn);
            if broken.violation || self.budget().is_none() {
                return Err(Failure::Lost(broken).into_io());
            }
        }
    }

    /// Takes `conn` out of service, once, however many callers saw it go.
    fn went_down(&self, link: &Link, generation: u64, epoch: u64, broken: &Broken) {
        if broken.violation {
            self.poisoned
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get_or_insert_with(|| broken.why.clone());
        }
        let old = {
            let mut state = link.lock();
            if state.generation != generation || state.conn.is_none() {
                return;
            }
            state.down_since = broken.at;
            state.why = broken.why.clone();
            state.conn.take()
        };
        // Connections made from now on are of a new epoch: a FLUSH on one
        // of them vouches for no write acknowledged on this one or its
        // contemporaries (the Ledger says why).
        self.ledger.dropped(epoch);
        link.changed.notify_all();
        drop(old);
    }

    /// A connection to send on: the current one, or one this thread or
    /// another makes within the budget.
    fn usable(&self, link: &Link) -> io::Result<(Arc<Connection>, u64)> {
        let mut state = link.lock();
        let mut waited = false;
        loop {
            if let Some(why) = self.poisoned() {
                return Err(lost(&why));
            }
            if let Some(conn) = &state.conn {
                return Ok((Arc::clone(conn), state.generation));
            }
            let Some(budget) = self.budget() else {
                return Err(lost(&state.why));
            };
            let deadline = state.down_since + budget;
            let now = Instant::now();
            if now >= deadline && waited {
                return Err(exhausted(&state.why, budget));
            }
            if state.reconnecting {
                if now >= deadline {
                    return Err(exhausted(&state.why, budget));
                }
                state = link
                    .changed
                    .wait_timeout(state, deadline - now)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
                waited = true;
                continue;
            }
            let late = now >= deadline;
            if late {
                if state
                    .last_late_attempt
                    .is_some_and(|t| now.duration_since(t) < LATE_EVERY)
                {
                    return Err(exhausted(&state.why, budget));
                }
                state.last_late_attempt = Some(now);
            }
            state.reconnecting = true;
            drop(state);
            let outcome = self.reconnect(deadline, late);
            state = link.lock();
            state.reconnecting = false;
            link.changed.notify_all();
            match outcome {
                Ok(conn) => {
                    state.conn = Some(Arc::new(conn));
                    state.generation += 1;
                    state.last_late_attempt = None;
                }
                Err(why) => {
                    state.why = why;
                    return Err(exhausted(&state.why, budget));
                }
            }
        }
    }

    /// Attempts until one succeeds or `deadline` passes; one attempt only
    /// when `late`.
    fn reconnect(&self, deadline: Instant, late: bool) -> std::result::Result<Connection, String> {
        let mut pause = FIRST_PAUSE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let timeout = if late {
                LATE_ATTEMPT
            } else {
                left.clamp(MIN_ATTEMPT, super::HANDSHAKE_TIMEOUT)
            };
            let why = match open(
                &self.address,
                self.tls.as_ref(),
                self.writable,
                timeout,
                &self.ledger,
            ) {
                Ok(conn) => match same_export(&self.info, &conn.info) {
                    Ok(()) => return Ok(conn),
                    Err(why) => why,
                },
                Err(e) => e.describe(),
            };
            let left = deadline.saturating_duration_since(Instant::now());
            if late || left.is_zero() {
                return Err(why);
            }
            // A pause between attempts, not a wait for an event: nothing
            // tells us when a server starts listening.
            std::thread::sleep(pause.min(left));
            pause = (pause * 2).min(MAX_PAUSE);
        }
    }
}

/// Whether `new` is the export `old` was: a server that came back with
/// another one must not receive the guest's writes.
fn same_export(old: &ExportInfo, new: &ExportInfo) -> std::result::Result<(), String> {
    if new.size != old.size {
        return Err(format!(
            "the export changed: it has {} bytes, it had {}",
            new.size, old.size
        ));
    }
    if new.flags != old.flags {
        return Err(format!(
            "the export changed: transmission flags {:#x}, were {:#x}",
            new.flags, old.flags
        ));
    }
    if new.block != old.block
        || new.structured != old.structured
        || new.allocation.is_some() != old.allocation.is_some()
    {
        return Err("the export changed: its block sizes or reply features differ".into());
    }
    Ok(())
}

const EIO: i32 = proto::EIO as i32;

/// EIO with a message. std has no error kind for EIO, and the guest is
/// told EIO for every error without one of the kinds it maps.
fn eio(message: String) -> io::Error {
    io::Error::other(format!("{}: {message}", io::Error::from_raw_os_error(EIO)))
}

fn exhausted(why: &str, budget: Duration) -> io::Error {
    eio(format!(
        "NBD export lost and not back within the reconnect delay of {:.1} s: {why}",
        budget.as_secs_f64()
    ))
}
