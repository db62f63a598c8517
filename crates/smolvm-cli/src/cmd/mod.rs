//! One module per command group. Each returns the process exit code.

mod doctor;
mod exec;
mod image;
mod network;
mod sandbox;
mod secret;
mod serve;
mod snapshot;

use crate::cli::{Cli, Command, Parsed, PresetCommand, PresetListCommand};

pub fn dispatch(parsed: Parsed) -> anyhow::Result<i32> {
    match parsed {
        Parsed::Main(cli) => run(cli),
        Parsed::Preset { preset, json, command: PresetCommand::Start(a), .. } => {
            sandbox::preset_start(preset.name, a, json)
        }
    }
}

pub fn run(cli: Cli) -> anyhow::Result<i32> {
    let json = cli.json;
    match cli.command {
        Command::Create(a) => sandbox::create(a, json),
        Command::List => sandbox::list(json),
        Command::Status { name } => sandbox::status(&name, json),
        Command::Exec { name, tty, timeout, command } => exec::exec(&name, tty, timeout, &command),
        Command::Ssh { name, command } => sandbox::ssh(&name, &command),
        Command::Cp { from, to } => exec::cp(&from, &to),
        Command::Stop { name, timeout } => sandbox::stop(&name, timeout, json),
        Command::Start { name, timeout } => sandbox::start(&name, timeout, json),
        Command::Delete { names, force: _ } => sandbox::delete(&names, json),
        Command::Pause { name } => snapshot::pause(&name, json),
        Command::Resume { name, timeout } => snapshot::resume(&name, timeout, json),
        Command::Snapshot(a) => snapshot::run(a, json),
        Command::Fork { name, count, new_name, timeout } => snapshot::fork(&name, count, new_name, timeout, json),
        Command::Logs { name, network: false } => sandbox::logs(&name),
        Command::Logs { name, network: true } => network::logs(&name),
        Command::Network(c) => network::run(c, json),
        Command::Secret(c) => secret::run(c, json),
        Command::Expose { name, guest_port, host_port } => sandbox::expose(&name, guest_port, host_port, json),
        Command::Env(c) => sandbox::env(c, json),
        Command::Serve(a) => serve::serve(a, json),
        Command::Mcp => serve::mcp(),
        Command::Doctor => doctor::run(json),
        Command::Image(c) => image::run(c, json).map(|()| 0),
        Command::Preset(PresetListCommand::List) => sandbox::preset_list(json),
        // DIR only names the sandbox in the process list: they work in their current directory.
        Command::AgentProxy { dir: _, owner } => smolvm::agent::proxy_main(owner).map(|()| 0).map_err(Into::into),
        Command::Netd { dir: _, owner } => smolvm::net::netd_main(owner).map(|()| 0).map_err(Into::into),
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
