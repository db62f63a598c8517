//! Running the recipe scripts and tools, with errors that say what to do.

use std::process::Command;

use crate::BuildError;

/// Runs `cmd` with its output on our stderr (the tools' progress goes to the user), and fails with the
/// command line, its status and `hint`.
pub(crate) fn run(cmd: &mut Command, hint: &str) -> Result<(), BuildError> {
    let shown = format!("{cmd:?}").replace('"', "");
    tracing::debug!("running {shown}");
    // Tools' chatter goes to stderr: stdout carries only smolvm's own result (e.g. --json).
    cmd.stdout(std::io::stderr());
    let status = cmd.status().map_err(|e| BuildError::Command {
        command: shown.clone(),
        status: e.to_string(),
        hint: if e.kind() == std::io::ErrorKind::NotFound {
            "; the tool is not installed: run scripts/install-host-deps.sh".into()
        } else {
            format!("; {hint}")
        },
    })?;
    if status.success() {
        Ok(())
    } else {
        Err(BuildError::Command { command: shown, status: status.to_string(), hint: format!("; {hint}") })
    }
}

/// Runs `cmd` and returns its stdout.
pub(crate) fn output(cmd: &mut Command, hint: &str) -> Result<String, BuildError> {
    let shown = format!("{cmd:?}").replace('"', "");
    let out = cmd.output().map_err(|e| BuildError::Command {
        command: shown.clone(),
        status: e.to_string(),
        hint: format!("; {hint}"),
    })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        return Err(BuildError::Command {
            command: shown,
            status: format!("{}: {}", out.status, stderr.trim()),
            hint: format!("; {hint}"),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Sparse, reflinking copy (the images are mostly holes).
pub(crate) fn copy_sparse(from: &std::path::Path, to: &std::path::Path) -> Result<(), BuildError> {
    run(
        Command::new("cp").arg("--sparse=always").arg("--reflink=auto").arg(from).arg(to),
        "check free space on the output filesystem",
    )
}
