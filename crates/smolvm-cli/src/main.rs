//! `smolvm`: the command-line interface over the `smolvm` library.
//!
//! This crate only parses arguments, calls the library and prints results (a table for people,
//! `--json` for programs). `anyhow` lives here and nowhere else.

mod cli;
mod cmd;
mod config;
mod hints;
mod progress;

fn main() -> std::process::ExitCode {
    let parsed = cli::parse();
    // Everything smolvm and its children (QEMU, the helpers) create in its home is the user's
    // alone: keys, disks, sockets, logs. A release being built is meant to be published: it
    // keeps the user's mask.
    let builds = matches!(&parsed, cli::Parsed::Main(c) if matches!(c.command, cli::Command::Image(cli::ImageCommand::Build(_) | cli::ImageCommand::Pin { .. })));
    if !builds {
        // SAFETY: umask(2) only sets this process's file mode mask.
        let user_umask = unsafe { libc::umask(0o077) };
        // Files written for the user elsewhere (smolvm cp out) keep the user's own mask.
        let _ = config::USER_UMASK.set(user_umask as u32);
    }
    let verbose = match &parsed {
        cli::Parsed::Main(c) => c.verbose,
        cli::Parsed::Preset { verbose, .. } => *verbose,
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("SMOLVM_LOG").unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(match verbose {
            0 => "smolvm=info,smolvm_serve=info",
            1 => "smolvm=debug,smolvm_serve=debug",
            _ => "smolvm=trace,smolvm_serve=trace",
        })
    });
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false).init();
    match cmd::dispatch(parsed) {
        Ok(code) => std::process::ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(e) => {
            // Errors can carry a guest's words (a command's stderr, a file name): no escape
            // sequence of theirs reaches the terminal.
            eprintln!("smolvm: error: {}", smolvm::text::escape_controls(&error_text(&e)));
            std::process::ExitCode::FAILURE
        }
    }
}

/// The error and its causes, each cause added only if the text so far does not already say it
/// (library errors often include their cause in their own message).
fn error_text(e: &anyhow::Error) -> String {
    let mut text = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !text.contains(&c) {
            text.push_str(": ");
            text.push_str(&c);
        }
    }
    if let Some(h) = hints::for_chain(e.chain()) {
        text.push_str("\n  hint: ");
        text.push_str(&h);
    }
    text
}
