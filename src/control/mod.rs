//! The control socket: a management tool steers a running engine (status,
//! switch, complete, abort, event subscription) over a Unix socket that only
//! the engine's own user may use.
//!
//! - [`proto`]: the JSON-lines protocol, pure.
//! - [`server`]: the socket, the peer check, one thread per connection.

pub mod proto;
pub mod server;

use std::sync::Arc;
use std::sync::mpsc::Receiver;

use serde_json::{Value, json};

pub use server::{ControlHandle, serve};

use crate::engine::{Event, Job, Status};
use crate::error::Result;
use crate::storage::Storage;

/// What the control socket drives.
pub trait Controller: Send + Sync + 'static {
    /// The state, as a JSON object.
    fn status(&self) -> Value;
    /// Switches to the destination; the result describes the switch.
    fn switch(&self) -> Result<Value>;
    /// Records completion.
    fn complete(&self) -> Result<Value>;
    /// Abandons the copy.
    fn abort(&self) -> Result<Value>;
    /// Events from now on; `None` when this controller has none.
    fn subscribe(&self) -> Option<Receiver<Event>>;
}

/// An engine event as a JSON object.
pub fn event_json(event: &Event) -> Value {
    match event {
        Event::Ready => json!({"event": "ready"}),
        Event::Switched {
            pause,
            longest_request,
        } => json!({
            "event": "switched",
            "pause_ms": pause.as_secs_f64() * 1e3,
            "longest_request_ms": longest_request.as_secs_f64() * 1e3,
        }),
        Event::Completed => json!({"event": "completed"}),
        Event::Aborted { reason } => json!({"event": "aborted", "reason": reason}),
        Event::Failed { reason } => json!({"event": "failed", "reason": reason}),
    }
}

/// A job status as a JSON object (integer byte counts, QEMU-like names).
pub fn status_json(status: &Status) -> Value {
    let left = status.to_copy.saturating_sub(status.bytes_copied);
    let percent = if status.to_copy == 0 || status.phase != crate::engine::JobPhase::Copying {
        100.0
    } else {
        (1000.0 * status.bytes_copied.min(status.to_copy) as f64 / status.to_copy as f64).floor()
            / 10.0
    };
    let eta = (status.phase == crate::engine::JobPhase::Copying && status.rate > 0.0)
        .then(|| (left as f64 / status.rate).ceil());
    json!({
        "phase": status.phase.name(),
        "ready": status.ready,
        "len": status.size,
        "offset": status.bytes_copied,
        "dirty": status.dirty_bytes,
        "rate": status.rate as u64,
        "in_flight": status.guest_in_flight,
        "switch_pause_ms": status.switch_pause.map(|p| p.as_secs_f64() * 1e3),
        "reason": status.reason,
        "bytes_to_copy": status.to_copy,
        "resumed": status.resumed,
        // The same figures with their units in their names, and what
        // people ask next.
        "bytes_copied": status.bytes_copied,
        "dirty_bytes": status.dirty_bytes,
        "size_bytes": status.size,
        "rate_bytes_per_sec": status.rate as u64,
        "percent": percent,
        "eta_seconds": eta,
    })
}

/// Drives a running [`Job`].
pub struct JobController<S: Storage + 'static, J: Storage + 'static> {
    job: Arc<Job<S, J>>,
}

impl<S: Storage + 'static, J: Storage + 'static> JobController<S, J> {
    /// Wraps a job.
    pub fn new(job: Arc<Job<S, J>>) -> Self {
        JobController { job }
    }
}

impl<S: Storage + 'static, J: Storage + 'static> Controller for JobController<S, J> {
    fn status(&self) -> Value {
        status_json(&self.job.status())
    }
    fn switch(&self) -> Result<Value> {
        let report = self.job.switch()?;
        Ok(json!({"pause_ms": report.pause.as_secs_f64() * 1e3, "seq": report.seq}))
    }
    fn complete(&self) -> Result<Value> {
        let already = self.job.status().phase == crate::engine::JobPhase::Completed;
        let seq = self.job.complete()?;
        Ok(json!({"seq": seq, "already_completed": already}))
    }
    fn abort(&self) -> Result<Value> {
        Ok(json!({"seq": self.job.abort()?}))
    }
    fn subscribe(&self) -> Option<Receiver<Event>> {
        Some(self.job.subscribe())
    }
}

/// Drives nothing but the journal: what `serve` runs when it restarts on a
/// job that already switched or ended, and serves the authoritative image
/// itself. Status reports the journal's phase; `complete` records a switch
/// that was never completed; switch and abort have nothing to act on.
pub struct JournalController<J: Storage + 'static> {
    journal: std::sync::Mutex<crate::journal::Journal<J>>,
}

impl<J: Storage + 'static> JournalController<J> {
    /// Wraps a journal this process took over (see `Journal::resume`).
    pub fn new(journal: crate::journal::Journal<J>) -> Self {
        JournalController {
            journal: std::sync::Mutex::new(journal),
        }
    }

    fn journal(&self) -> std::sync::MutexGuard<'_, crate::journal::Journal<J>> {
        self.journal.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl<J: Storage + 'static> Controller for JournalController<J> {
    fn status(&self) -> Value {
        let journal = self.journal();
        let record = journal.record();
        json!({
            "phase": record.phase.name(),
            "ready": false,
            "copying": false,
            "authoritative": record.authoritative.name(),
            "seq": journal.seq(),
        })
    }
    fn switch(&self) -> Result<Value> {
        Err(crate::Error::InvalidInput(format!(
            "no copy runs: the job is {}",
            self.journal().record().phase.name()
        )))
    }
    fn complete(&self) -> Result<Value> {
        let mut journal = self.journal();
        let phase = journal.record().phase;
        if phase == crate::journal::Phase::Completed {
            return Ok(json!({"seq": journal.seq(), "already_completed": true}));
        }
        if phase != crate::journal::Phase::Switched {
            return Err(crate::Error::InvalidInput(format!(
                "complete needs a switched job; it is {}",
                phase.name()
            )));
        }
        let copied = journal.record().bytes_copied;
        let seq = journal.commit(crate::journal::Phase::Completed, copied)?;
        Ok(json!({"seq": seq, "already_completed": false}))
    }
    fn abort(&self) -> Result<Value> {
        self.switch()
    }
    fn subscribe(&self) -> Option<Receiver<Event>> {
        None
    }
}
