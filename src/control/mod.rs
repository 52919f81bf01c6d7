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
        Event::Switched { pause } => {
            json!({"event": "switched", "pause_ms": pause.as_secs_f64() * 1e3})
        }
        Event::Completed => json!({"event": "completed"}),
        Event::Aborted { reason } => json!({"event": "aborted", "reason": reason}),
        Event::Failed { reason } => json!({"event": "failed", "reason": reason}),
    }
}

/// A job status as a JSON object (integer byte counts, QEMU-like names).
pub fn status_json(status: &Status) -> Value {
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
        Ok(json!({"seq": self.job.complete()?}))
    }
    fn abort(&self) -> Result<Value> {
        Ok(json!({"seq": self.job.abort()?}))
    }
    fn subscribe(&self) -> Option<Receiver<Event>> {
        Some(self.job.subscribe())
    }
}
