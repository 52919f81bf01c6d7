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

fn main() -> ExitCode {
    let args = args::Cli::parse();
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
        args::Command::Status(a) => control::run(args::ControlCommand::Status, a, args.output),
        args::Command::Switch(a) => control::run(args::ControlCommand::Switch, a, args.output),
        args::Command::Complete(a) => control::run(args::ControlCommand::Complete, a, args.output),
        args::Command::Abort(a) => control::run(args::ControlCommand::Abort, a, args.output),
    };
    match result {
        Ok(code) => code.into(),
        Err(error) => {
            if output::is_broken_pipe(&error) {
                return exit::Exit::Ok.into();
            }
            let code = exit::Exit::of_error(&error);
            eprintln!("copyctl: {error:#}");
            code.into()
        }
    }
}
