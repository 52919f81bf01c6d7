//! Clients for the two control channels: QEMU's QMP, and copyctl's
//! JSON-lines control socket. Every message is stamped when it arrives.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::util::{Context, Res, line_reader};

/// A QMP monitor connection, capabilities negotiated.
pub struct Qmp {
    stream: UnixStream,
    incoming: Receiver<(Instant, String)>,
    /// Events read while waiting for something else.
    events: Vec<(Instant, Value)>,
}

impl Qmp {
    pub fn connect(path: &Path, timeout: Duration) -> Res<Qmp> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => fail!("connect to QMP at {}: {e}", path.display()),
            }
        };
        let incoming = line_reader(stream.try_clone().ctx(|| "clone the QMP socket".into())?);
        let mut qmp = Qmp {
            stream,
            incoming,
            events: Vec::new(),
        };
        let (_, greeting) = qmp.next(timeout)?;
        if greeting.get("QMP").is_none() {
            fail!("no QMP greeting: {greeting}");
        }
        qmp.execute(json!({"execute": "qmp_capabilities"}), timeout)?;
        Ok(qmp)
    }

    fn next(&mut self, timeout: Duration) -> Res<(Instant, Value)> {
        match self.incoming.recv_timeout(timeout) {
            Ok((at, line)) => Ok((
                at,
                serde_json::from_str(&line).ctx(|| format!("QMP sent {line:?}"))?,
            )),
            Err(RecvTimeoutError::Timeout) => fail!("QMP: nothing within {timeout:?}"),
            Err(RecvTimeoutError::Disconnected) => fail!("QMP: the daemon closed the monitor"),
        }
    }

    /// Sends a command; returns when it was sent and its `return` value.
    pub fn execute(&mut self, command: Value, timeout: Duration) -> Res<(Instant, Value)> {
        let sent = Instant::now();
        writeln!(self.stream, "{command}").ctx(|| "write to QMP".into())?;
        loop {
            let (at, message) = self.next(timeout)?;
            if let Some(ret) = message.get("return") {
                let _ = at;
                return Ok((sent, ret.clone()));
            }
            if let Some(error) = message.get("error") {
                fail!("QMP {command} failed: {error}");
            }
            if message.get("event").is_some() {
                self.events.push((at, message));
            }
        }
    }

    /// Waits for an event by name (one read earlier counts); returns its
    /// arrival time and body.
    pub fn wait_event(&mut self, name: &str, timeout: Duration) -> Res<(Instant, Value)> {
        if let Some(i) = self.events.iter().position(|(_, e)| e["event"] == name) {
            return Ok(self.events.remove(i));
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                fail!("QMP: no {name} within {timeout:?}");
            }
            let (at, message) = self
                .next(left)
                .map_err(|e| format!("waiting for {name}: {e}"))?;
            if message["event"] == name {
                return Ok((at, message));
            }
            if message["event"] == "BLOCK_JOB_ERROR" {
                fail!("QMP: {message}");
            }
            if message.get("event").is_some() {
                self.events.push((at, message));
            }
        }
    }

    /// Asks the daemon to exit.
    pub fn quit(&mut self) {
        let _ = writeln!(self.stream, "{}", json!({"execute": "quit"}));
    }
}

/// One request on copyctl's control socket (one connection each).
pub fn control(path: &Path, command: &str, timeout: Duration) -> Res<(Instant, Value)> {
    let mut stream = UnixStream::connect(path).ctx(|| format!("connect to {}", path.display()))?;
    stream.set_read_timeout(Some(timeout)).ok();
    let incoming = line_reader(stream.try_clone().ctx(|| "clone".into())?);
    writeln!(stream, "{}", json!({"command": command})).ctx(|| "write".into())?;
    let (at, line) = incoming
        .recv_timeout(timeout)
        .ctx(|| format!("no answer to {command}"))?;
    // Closing the socket ends the engine's side and our reader thread.
    let _ = stream.shutdown(std::net::Shutdown::Both);
    let reply: Value = serde_json::from_str(&line).ctx(|| format!("control sent {line:?}"))?;
    if reply["ok"] != true {
        fail!("{command} refused: {reply}");
    }
    Ok((at, reply["result"].clone()))
}

/// copyctl's event stream.
pub struct Events {
    stream: UnixStream,
    incoming: Receiver<(Instant, String)>,
}

impl Drop for Events {
    fn drop(&mut self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }
}

impl Events {
    pub fn subscribe(path: &Path, timeout: Duration) -> Res<Events> {
        let deadline = Instant::now() + timeout;
        let mut stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(2)),
                Err(e) => fail!("connect to {}: {e}", path.display()),
            }
        };
        let incoming = line_reader(stream.try_clone().ctx(|| "clone".into())?);
        writeln!(stream, "{}", json!({"command": "subscribe"})).ctx(|| "subscribe".into())?;
        let (_, line) = incoming
            .recv_timeout(timeout)
            .ctx(|| "no answer to subscribe".to_string())?;
        let reply: Value = serde_json::from_str(&line).ctx(|| format!("control sent {line:?}"))?;
        if reply["ok"] != true {
            fail!("subscribe refused: {reply}");
        }
        Ok(Events { stream, incoming })
    }

    /// Waits for an event by name.
    pub fn wait(&mut self, name: &str, timeout: Duration) -> Res<(Instant, Value)> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let (at, line) = self
                .incoming
                .recv_timeout(left)
                .ctx(|| format!("no {name} event within {timeout:?}"))?;
            let event: Value = serde_json::from_str(&line).ctx(|| format!("event {line:?}"))?;
            if event["event"] == name {
                return Ok((at, event));
            }
            if event["event"] == "failed" || event["event"] == "aborted" {
                fail!("the copy ended: {event}");
            }
        }
    }
}
