//! `copyctl status|switch|complete|abort --control SOCK`: talk to `serve`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::args::{ControlCommand, Output, StatusArgs};
use crate::exit::Exit;
use crate::output::emit;
use crate::size::human;

fn request(socket: &Path, command: &str) -> anyhow::Result<Value> {
    let stream = UnixStream::connect(socket).map_err(|e| {
        let why = match e.kind() {
            std::io::ErrorKind::PermissionDenied => {
                "the control socket belongs to another user: run this as the user that runs serve"
            }
            std::io::ErrorKind::NotFound => {
                "no such socket: is serve running, with this --control?"
            }
            std::io::ErrorKind::ConnectionRefused => {
                "nothing listens there: the serve that made it has stopped"
            }
            _ => "no engine answers there",
        };
        anyhow::Error::new(livecopy::Error::io_at("connect", socket, e)).context(why)
    })?;
    stream.set_read_timeout(Some(Duration::from_secs(120)))?;
    let mut writer = stream.try_clone()?;
    // One write; if the engine already refused us and hung up, its reply
    // may still be waiting to be read, so a failed write is not the end.
    let sent = writer.write_all(format!("{}\n", json!({ "command": command })).as_bytes());
    let mut line = String::new();
    let read = BufReader::new(stream).read_line(&mut line);
    if line.is_empty() {
        sent?;
        read?;
        anyhow::bail!(livecopy::Error::io_at(
            "control request",
            socket,
            std::io::Error::other("the engine closed the connection without a reply"),
        ));
    }
    Ok(serde_json::from_str(&line)?)
}

fn exit_for(reply: &Value) -> Exit {
    match reply["error"]["kind"].as_str() {
        None => Exit::Ok,
        Some("invalid-input") | Some("bad-request") => Exit::BadInput,
        Some("permission-denied") => Exit::Io,
        _ => Exit::Io,
    }
}

/// A status result for people: the phase, how far the copy got, how fast,
/// how long is left.
fn status_text(result: &Value) -> String {
    let u = |key: &str| result[key].as_u64();
    let phase = result["phase"].as_str().unwrap_or("?");
    let mut text = String::new();
    let mut line = |key: &str, value: String| text.push_str(&format!("{key:<14} {value}\n"));
    match (u("bytes_copied"), u("bytes_to_copy")) {
        (Some(copied), Some(total)) => {
            line(
                "phase:",
                format!(
                    "{phase} ({:.1}%)",
                    result["percent"].as_f64().unwrap_or(0.0)
                ),
            );
            let resumed = if result["resumed"] == true {
                " (resumed: what may differ)"
            } else {
                ""
            };
            line(
                "copied:",
                format!("{} of {}{resumed}", human(copied), human(total)),
            );
            line(
                "rate:",
                format!(
                    "{:.1} MiB/s",
                    u("rate_bytes_per_sec").unwrap_or(0) as f64 / (1 << 20) as f64
                ),
            );
            line(
                "eta:",
                match result["eta_seconds"].as_f64() {
                    Some(s) => format!("{s:.0} s"),
                    None => "-".into(),
                },
            );
            line("dirty:", human(u("dirty_bytes").unwrap_or(0)));
            line(
                "in flight:",
                format!("{} guest requests", u("in_flight").unwrap_or(0)),
            );
            if let Some(pause) = result["switch_pause_ms"].as_f64() {
                line("switch pause:", format!("{pause:.3} ms"));
            }
            if let Some(reason) = result["reason"].as_str() {
                line("reason:", reason.to_string());
            }
        }
        _ => {
            // No job runs: the journal's verdict.
            if let Some(map) = result.as_object() {
                for (key, value) in map {
                    let value = value
                        .as_str()
                        .map_or_else(|| value.to_string(), String::from);
                    line(&format!("{key}:"), value);
                }
            }
        }
    }
    text
}

/// One line of progress, for --watch and switch --wait.
fn progress_line(result: &Value) -> String {
    let phase = result["phase"].as_str().unwrap_or("?");
    match (
        result["bytes_copied"].as_u64(),
        result["bytes_to_copy"].as_u64(),
    ) {
        (Some(copied), Some(total)) => format!(
            "{phase:<9} {:5.1}%  {} of {}  {:.1} MiB/s  eta {}  dirty {}",
            result["percent"].as_f64().unwrap_or(0.0),
            human(copied),
            human(total),
            result["rate_bytes_per_sec"].as_u64().unwrap_or(0) as f64 / (1 << 20) as f64,
            result["eta_seconds"]
                .as_f64()
                .map_or_else(|| "-".into(), |s| format!("{s:.0} s")),
            human(result["dirty_bytes"].as_u64().unwrap_or(0)),
        ),
        _ => phase.to_string(),
    }
}

/// `status --watch`: until the job completes, aborts or fails (or the
/// engine goes away: an error).
pub fn watch(args: &StatusArgs, out: Output) -> anyhow::Result<Exit> {
    match watching(args, out) {
        // A reader that went away (`| head`) ends the watch, not an error.
        Err(e)
            if e.downcast_ref::<std::io::Error>()
                .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe) =>
        {
            Ok(Exit::Ok)
        }
        other => other,
    }
}

fn watching(args: &StatusArgs, out: Output) -> anyhow::Result<Exit> {
    use std::io::IsTerminal;
    let terminal = std::io::stdout().is_terminal() && out == Output::Human;
    let mut stdout = std::io::stdout().lock();
    loop {
        let reply = request(&args.control, "status")?;
        let exit = exit_for(&reply);
        if exit != Exit::Ok {
            match out {
                Output::Human => eprintln!(
                    "copyctl: status refused: {}",
                    reply["error"]["message"].as_str().unwrap_or("?")
                ),
                Output::Json => emit(out, reply, "")?,
            }
            return Ok(exit);
        }
        let result = &reply["result"];
        match (out, terminal) {
            (Output::Json, _) => writeln!(stdout, "{}", with_ok(result))?,
            (Output::Human, true) => write!(stdout, "\r\x1b[K{}", progress_line(result))?,
            (Output::Human, false) => writeln!(stdout, "{}", progress_line(result))?,
        }
        stdout.flush()?;
        let phase = result["phase"].as_str().unwrap_or("");
        if !matches!(phase, "copying" | "ready" | "switched") {
            if terminal {
                writeln!(stdout)?;
            }
            return Ok(Exit::Ok);
        }
        std::thread::sleep(Duration::from_secs_f64(args.interval));
    }
}

pub fn run(
    command: ControlCommand,
    control: &Path,
    wait: u64,
    out: Output,
) -> anyhow::Result<Exit> {
    let name = match command {
        ControlCommand::Status => "status",
        ControlCommand::Switch => "switch",
        ControlCommand::Complete => "complete",
        ControlCommand::Abort => "abort",
    };
    if command == ControlCommand::Switch && wait > 0 {
        use std::io::IsTerminal;
        // The copy's progress while waiting, on a terminal only.
        let terminal = std::io::stderr().is_terminal();
        let deadline = Instant::now() + Duration::from_secs(wait);
        loop {
            let status = request(control, "status")?;
            let phase = status["result"]["phase"].as_str().unwrap_or("");
            if terminal {
                eprint!("\r\x1b[K{}", progress_line(&status["result"]));
            }
            if phase != "copying" || Instant::now() >= deadline {
                if terminal {
                    eprintln!();
                }
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let reply = request(control, name)?;
    let exit = exit_for(&reply);
    let human = if exit == Exit::Ok {
        let result = &reply["result"];
        match command {
            ControlCommand::Status => status_text(result),
            ControlCommand::Switch => format!(
                "switched: guest paused {:.3} ms (journal seq {})\n",
                result["pause_ms"].as_f64().unwrap_or(f64::NAN),
                result["seq"]
            ),
            ControlCommand::Complete if result["already_completed"] == true => {
                format!("already completed (journal seq {})\n", result["seq"])
            }
            ControlCommand::Complete => {
                format!("completed (journal seq {})\n", result["seq"])
            }
            ControlCommand::Abort => format!("aborted (journal seq {})\n", result["seq"]),
        }
    } else {
        format!(
            "{name} refused: {}\n",
            reply["error"]["message"].as_str().unwrap_or("?")
        )
    };
    match (exit, out) {
        (Exit::Ok, _) => emit(out, with_ok(&reply["result"]), &human)?,
        // A refusal is an error for people (stderr) and a result for
        // programs (the same envelope as a success: `ok` says which).
        (_, Output::Human) => eprint!("copyctl: {human}"),
        (_, Output::Json) => emit(out, reply, &human)?,
    }
    Ok(exit)
}

/// A successful result with `"ok": true` beside its fields, so that every
/// JSON answer of a control command has `ok` (a refusal is `"ok": false`
/// with an `error` object).
fn with_ok(result: &serde_json::Value) -> serde_json::Value {
    let mut result = result.clone();
    if let Some(fields) = result.as_object_mut() {
        fields.insert("ok".into(), true.into());
    }
    result
}
