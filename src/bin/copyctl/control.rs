//! `copyctl status|switch|complete|abort --control SOCK`: talk to `serve`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::args::{ControlArgs, ControlCommand, Output};
use crate::exit::Exit;
use crate::output::emit;

fn request(socket: &Path, command: &str) -> anyhow::Result<Value> {
    let stream = UnixStream::connect(socket).map_err(|e| {
        anyhow::Error::new(livecopy::Error::io_at("connect", socket, e))
            .context("no engine answers there")
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

pub fn run(command: ControlCommand, args: &ControlArgs, out: Output) -> anyhow::Result<Exit> {
    let name = match command {
        ControlCommand::Status => "status",
        ControlCommand::Switch => "switch",
        ControlCommand::Complete => "complete",
        ControlCommand::Abort => "abort",
    };
    if command == ControlCommand::Switch && args.wait > 0 {
        let deadline = Instant::now() + Duration::from_secs(args.wait);
        loop {
            let status = request(&args.control, "status")?;
            let phase = status["result"]["phase"].as_str().unwrap_or("");
            if phase != "copying" || Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let reply = request(&args.control, name)?;
    let exit = exit_for(&reply);
    let human = if exit == Exit::Ok {
        let result = &reply["result"];
        match command {
            ControlCommand::Status => {
                let mut text = String::new();
                if let Some(map) = result.as_object() {
                    for (key, value) in map {
                        text.push_str(&format!("{key:<16} {value}\n"));
                    }
                }
                text
            }
            _ => format!("{name}: done {result}\n"),
        }
    } else {
        format!(
            "{name} refused: {}\n",
            reply["error"]["message"].as_str().unwrap_or("?")
        )
    };
    if exit == Exit::Ok {
        emit(out, reply["result"].clone(), &human)?;
    } else {
        emit(out, reply, &human)?;
    }
    Ok(exit)
}
