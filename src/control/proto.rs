//! The control protocol: one JSON object per line, in both directions.
//! Pure code: parsing requests and shaping replies, no I/O.
//!
//! ```text
//! -> {"command": "status"}                  (an optional "id" is echoed back)
//! <- {"ok": true, "result": {...}}
//! <- {"ok": false, "error": {"kind": "invalid-input", "message": "..."}}
//! -> {"command": "subscribe"}
//! <- {"ok": true, "result": "subscribed"}, then one line per event:
//! <- {"event": "ready"} | {"event": "switched", "pause_ms": 0.4} | ...
//! ```
//!
//! Commands: status, switch, complete, abort, subscribe.

use serde_json::{Value, json};

/// The longest request line accepted.
pub const MAX_LINE: usize = 4096;

/// A control request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Report the job's state.
    Status,
    /// Hand the guest over to the destination.
    Switch,
    /// Record that the switch was acknowledged.
    Complete,
    /// Abandon the copy before the switch.
    Abort,
    /// Turn this connection into an event stream.
    Subscribe,
}

impl Command {
    /// The wire name.
    pub fn name(self) -> &'static str {
        match self {
            Command::Status => "status",
            Command::Switch => "switch",
            Command::Complete => "complete",
            Command::Abort => "abort",
            Command::Subscribe => "subscribe",
        }
    }
}

/// A parsed request: the command and the id to echo.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// What to do.
    pub command: Command,
    /// Echoed in the reply when present.
    pub id: Option<Value>,
}

/// Parses one request line. Never panics; the error is for the client.
pub fn parse_request(line: &[u8]) -> Result<Request, String> {
    if line.len() > MAX_LINE {
        return Err(format!("request longer than {MAX_LINE} bytes"));
    }
    let value: Value = serde_json::from_slice(line).map_err(|e| format!("not JSON: {e}"))?;
    let object = value.as_object().ok_or("a request is a JSON object")?;
    let command = match object.get("command").and_then(Value::as_str) {
        Some("status") => Command::Status,
        Some("switch") => Command::Switch,
        Some("complete") => Command::Complete,
        Some("abort") => Command::Abort,
        Some("subscribe") => Command::Subscribe,
        Some(other) => return Err(format!("unknown command {other:?}")),
        None => return Err("a request needs a \"command\" string".into()),
    };
    if let Some(extra) = object.keys().find(|k| *k != "command" && *k != "id") {
        return Err(format!("unknown field {extra:?}"));
    }
    Ok(Request {
        command,
        id: object.get("id").cloned(),
    })
}

/// A success reply.
pub fn ok(id: &Option<Value>, result: Value) -> String {
    with_id(json!({"ok": true, "result": result}), id)
}

/// An error reply. `kind` is kebab-case: bad-request, invalid-input,
/// io-error, failed, permission-denied.
pub fn error(id: &Option<Value>, kind: &str, message: &str) -> String {
    with_id(
        json!({"ok": false, "error": {"kind": kind, "message": message}}),
        id,
    )
}

fn with_id(mut reply: Value, id: &Option<Value>) -> String {
    if let Some(id) = id {
        reply["id"] = id.clone();
    }
    reply.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_and_garbage_is_refused() {
        assert_eq!(
            parse_request(br#"{"command":"status"}"#).unwrap().command,
            Command::Status
        );
        let r = parse_request(br#"{"command":"switch","id":7}"#).unwrap();
        assert_eq!((r.command, r.id), (Command::Switch, Some(json!(7))));
        for bad in [
            &b"garbage"[..],
            b"[]",
            b"{}",
            br#"{"command":"format-disk"}"#,
            br#"{"command":"status","force":true}"#,
            br#"{"command":3}"#,
            b"\xff\xfe",
        ] {
            assert!(
                parse_request(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        assert!(parse_request(&vec![b' '; MAX_LINE + 1]).is_err());
    }

    #[test]
    fn replies_are_one_line_of_json() {
        let reply = error(&Some(json!("a")), "bad-request", "no\nnewline");
        assert!(!reply.contains('\n'));
        let v: Value = serde_json::from_str(&reply).unwrap();
        assert_eq!(v["id"], "a");
        assert_eq!(v["ok"], false);
    }
}
