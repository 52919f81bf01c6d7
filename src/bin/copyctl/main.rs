//! `copyctl`: the command-line face of livecopy.
//!
//! Parsing lives in `args`, each command in its own module, rendering in
//! `output`. Results go to stdout, warnings and errors to stderr; a closed
//! stdout (`copyctl inspect J | head -1`) is not an error. Exit codes are
//! listed in `exit` and in README.md.

mod args;
mod control;
mod copy;
mod demo;
mod exit;
mod inspect;
mod man;
mod output;
mod recover;
mod resolve;
mod serve;
mod size;

use std::process::ExitCode;

use clap::Parser;

/// The event log on stderr: `serve` at info unless COPYCTL_LOG says
/// otherwise, the rest at warn. Colours only on a terminal.
fn init_log(format: args::LogFormat, default: &str) {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let filter = match std::env::var("COPYCTL_LOG") {
        Ok(spec) => EnvFilter::try_new(&spec).unwrap_or_else(|e| {
            output::say(format_args!(
                "copyctl: COPYCTL_LOG={spec:?} is not a filter ({e}); logging at {default}"
            ));
            EnvFilter::new(default)
        }),
        Err(_) => EnvFilter::new(default),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // On a failed write, tracing-subscriber would say so with
        // eprintln!, which panics when stderr's reader is gone: a log line
        // would then kill the engine thread that wrote it.
        .log_internal_errors(false)
        .with_target(false);
    let _ = match format {
        args::LogFormat::Human => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
        args::LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

fn main() -> ExitCode {
    let args = args::Cli::parse();
    let default_level = match args.command {
        args::Command::Serve(_) => "info",
        _ => "warn",
    };
    init_log(args.log_format, default_level);
    let result = match &args.command {
        args::Command::Recover(a) => recover::run(a, args.output),
        args::Command::Inspect(a) => inspect::run(a, args.output),
        args::Command::Resolve(a) => resolve::run(a, args.output),
        args::Command::Copy(a) => copy::run(a, args.output),
        args::Command::Demo(a) => demo::run(a, args.output),
        args::Command::DemoEngine(a) => demo::engine(a),
        args::Command::Completions(a) => man::completions(a),
        args::Command::Man(a) => man::pages(a),
        args::Command::Serve(a) => serve::run(a, args.output),
        args::Command::Status(a) if a.watch => control::watch(a, args.output),
        args::Command::Status(a) => {
            control::run(args::ControlCommand::Status, &a.control, 0, args.output)
        }
        args::Command::Switch(a) => control::run(
            args::ControlCommand::Switch,
            &a.control,
            a.wait,
            args.output,
        ),
        args::Command::Complete(a) => {
            control::run(args::ControlCommand::Complete, &a.control, 0, args.output)
        }
        args::Command::Abort(a) => {
            control::run(args::ControlCommand::Abort, &a.control, 0, args.output)
        }
    };
    match result {
        Ok(code) => code.into(),
        Err(error) => {
            if output::is_broken_pipe(&error) {
                return exit::Exit::Ok.into();
            }
            let code = exit::Exit::of_error(&error);
            output::say(format_args!("copyctl: {error:#}"));
            code.into()
        }
    }
}
