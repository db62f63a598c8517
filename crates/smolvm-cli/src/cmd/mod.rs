//! One module per command group.

mod image;

use crate::cli::{Cli, Command};

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Image(c) => image::run(c, cli.json),
    }
}

/// Prints a serializable value as pretty JSON on stdout.
pub(crate) fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    #[allow(clippy::print_stdout)]
    {
        println!("{}", serde_json::to_string_pretty(value)?);
    }
    Ok(())
}

/// Prints a line of human output on stdout.
#[allow(clippy::print_stdout)]
pub(crate) fn say(line: impl std::fmt::Display) {
    println!("{line}");
}
