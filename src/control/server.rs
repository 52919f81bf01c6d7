//! The control socket's listener and connections.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::Value;

use super::proto::{self, Command, MAX_LINE};
use super::{Controller, event_json};
use crate::error::{Error, ErrorKind, Result};

/// A running control server. Shut it down with [`ControlHandle::shutdown`].
pub struct ControlHandle {
    path: PathBuf,
    /// The socket file's (device, inode): only that file is removed.
    identity: Option<(u64, u64)>,
    /// The listener, shared with the accept thread: shutting it down wakes
    /// the accept call without connecting to the path (which may be gone,
    /// or too long to connect to).
    wake: UnixListener,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

/// Listens on `path` (mode 0600, see [`crate::socket::bind_private`]) and
/// serves `controller` until shut down. Peers whose uid differs from ours
/// get a permission-denied reply and are disconnected.
pub fn serve(path: &Path, controller: Arc<dyn Controller>) -> Result<ControlHandle> {
    let listener = crate::socket::bind_private(path)?;
    let wake = listener
        .try_clone()
        .map_err(|e| Error::io_at("dup", path, e))?;
    let identity = std::fs::symlink_metadata(path).ok().map(|m| {
        (
            std::os::unix::fs::MetadataExt::dev(&m),
            std::os::unix::fs::MetadataExt::ino(&m),
        )
    });
    let stop = Arc::new(AtomicBool::new(false));
    let accept_stop = Arc::clone(&stop);
    let accept = std::thread::Builder::new()
        .name("livecopy-control".into())
        .spawn(move || accept_loop(listener, controller, accept_stop))
        .map_err(|e| Error::io("spawn", e))?;
    Ok(ControlHandle {
        path: path.to_path_buf(),
        identity,
        wake,
        stop,
        accept: Some(accept),
    })
}

impl ControlHandle {
    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stops accepting, removes the socket file, and waits for the listener.
    /// Connections end on their own at their next read or event.
    pub fn shutdown(mut self) {
        self.stop_now();
    }

    fn stop_now(&mut self) {
        self.stop.store(true, Ordering::Release);
        // Wake the accept call: on Linux, shutting a listening socket down
        // makes accept fail at once.
        let _ = rustix::net::shutdown(&self.wake, rustix::net::Shutdown::Both);
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
        if let Some(identity) = self.identity
            && let Ok(meta) = std::fs::symlink_metadata(&self.path)
            && (
                std::os::unix::fs::MetadataExt::dev(&meta),
                std::os::unix::fs::MetadataExt::ino(&meta),
            ) == identity
        {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl Drop for ControlHandle {
    fn drop(&mut self) {
        if self.accept.is_some() {
            self.stop_now();
        }
    }
}

fn accept_loop(listener: UnixListener, controller: Arc<dyn Controller>, stop: Arc<AtomicBool>) {
    for stream in listener.incoming() {
        if stop.load(Ordering::Acquire) {
            break;
        }
        let Ok(stream) = stream else { continue };
        let controller = Arc::clone(&controller);
        let stop = Arc::clone(&stop);
        let _ = std::thread::Builder::new()
            .name("livecopy-control-conn".into())
            .spawn(move || {
                let _ = connection(stream, controller.as_ref(), &stop);
            });
    }
}

fn error_kind(error: &Error) -> &'static str {
    match error.kind() {
        ErrorKind::InvalidInput => "invalid-input",
        ErrorKind::Poisoned => "failed",
        ErrorKind::Refused | ErrorKind::Corrupt => "refused",
        _ => "io-error",
    }
}

fn connection(
    stream: UnixStream,
    controller: &dyn Controller,
    stop: &AtomicBool,
) -> std::io::Result<()> {
    let mut writer = stream.try_clone()?;
    let uid = crate::socket::peer_uid(&stream);
    match uid {
        Ok(uid) if uid == crate::socket::own_uid() => {}
        _ => {
            let who = uid
                .as_ref()
                .map_or_else(|_| "unknown".to_string(), u32::to_string);
            tracing::warn!(uid = %who, "control client of another user refused");
            let reply = proto::error(
                &None,
                "permission-denied",
                "only the engine's own user may control it",
            );
            return writeln!(writer, "{reply}");
        }
    }
    // Reads wake up now and then so a shutdown ends idle connections.
    stream.set_read_timeout(Some(Duration::from_millis(500)))?;
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    loop {
        if stop.load(Ordering::Acquire) {
            return Ok(());
        }
        match (&mut reader)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut line)
        {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue;
            }
            Err(e) => return Err(e),
        }
        if line.last() != Some(&b'\n') {
            if line.len() > MAX_LINE {
                let reply = proto::error(&None, "bad-request", "request line too long");
                return writeln!(writer, "{reply}");
            }
            // A partial line: wait for the rest.
            continue;
        }
        let request = proto::parse_request(line.trim_ascii());
        line.clear();
        let request = match request {
            Ok(r) => r,
            Err(message) => {
                writeln!(writer, "{}", proto::error(&None, "bad-request", &message))?;
                continue;
            }
        };
        let who = uid
            .as_ref()
            .map_or_else(|_| "unknown".to_string(), u32::to_string);
        tracing::info!(command = %request.command.name(), uid = %who, "control command");
        let result = match request.command {
            Command::Status => Ok(controller.status()),
            Command::Switch => controller.switch(),
            Command::Complete => controller.complete(),
            Command::Abort => controller.abort(),
            Command::Subscribe => {
                let Some(events) = controller.subscribe() else {
                    writeln!(
                        writer,
                        "{}",
                        proto::error(&request.id, "invalid-input", "no job runs: no events")
                    )?;
                    continue;
                };
                writeln!(
                    writer,
                    "{}",
                    proto::ok(&request.id, Value::from("subscribed"))
                )?;
                return stream_events(writer, events, stop);
            }
        };
        let reply = match result {
            Ok(value) => proto::ok(&request.id, value),
            Err(e) => proto::error(&request.id, error_kind(&e), &e.describe()),
        };
        writeln!(writer, "{reply}")?;
    }
}

fn stream_events(
    mut writer: UnixStream,
    events: std::sync::mpsc::Receiver<crate::engine::Event>,
    stop: &AtomicBool,
) -> std::io::Result<()> {
    while !stop.load(Ordering::Acquire) {
        match events.recv_timeout(Duration::from_millis(500)) {
            Ok(event) => writeln!(writer, "{}", event_json(&event))?,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return Ok(()),
        }
    }
    Ok(())
}
