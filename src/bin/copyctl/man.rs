//! `copyctl completions` and `copyctl man`: generated from the parser's
//! own definitions (clap_complete, clap_mangen), so they describe exactly
//! the options `copyctl` accepts.

use std::io::Write;

use anyhow::Context;
use clap::CommandFactory;

use crate::args::{Cli, CompletionsArgs, ManArgs, Shell};
use crate::exit::Exit;

pub fn completions(args: &CompletionsArgs) -> anyhow::Result<Exit> {
    let mut command = Cli::command();
    let shell = match args.shell {
        Shell::Bash => clap_complete::Shell::Bash,
        Shell::Zsh => clap_complete::Shell::Zsh,
        Shell::Fish => clap_complete::Shell::Fish,
    };
    let mut out = std::io::stdout().lock();
    clap_complete::generate(shell, &mut command, "copyctl", &mut out);
    out.flush().context("writing the completion script")?;
    Ok(Exit::Ok)
}

pub fn pages(args: &ManArgs) -> anyhow::Result<Exit> {
    let command = Cli::command();
    let Some(dir) = &args.dir else {
        let mut out = std::io::stdout().lock();
        clap_mangen::Man::new(command)
            .render(&mut out)
            .context("writing the man page")?;
        return Ok(Exit::Ok);
    };
    anyhow::ensure!(
        dir.is_dir(),
        livecopy::Error::InvalidInput(format!("{} is not a directory", dir.display()))
    );
    // Subcommand pages are named copyctl-NAME.1, as git's are.
    clap_mangen::generate_to(command, dir)
        .with_context(|| format!("writing the man pages into {}", dir.display()))?;
    Ok(Exit::Ok)
}
