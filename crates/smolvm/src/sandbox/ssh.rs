//! SSH to a sandbox: the managed key pair, strict host-key pinning, command quoting.
//!
//! Every connection is strict: the guest's host key, read from its readiness line, is written
//! to the sandbox's own `known_hosts`, and ssh runs with `StrictHostKeyChecking=yes` against
//! that file only (no user or global known_hosts, no user config).

use std::path::{Path, PathBuf};
use std::process::Command;

/// Why the managed key could not be made.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{what} {path}: {source}")]
    Io { what: &'static str, path: String, source: std::io::Error },
    #[error("run ssh-keygen: {0}")]
    NoKeygen(std::io::Error),
    #[error("ssh-keygen: {0}")]
    Keygen(String),
}

/// The managed key pair under `<home>/keys/`, created on first use.
pub fn ensure_key(keys_dir: &Path) -> Result<PathBuf, KeyError> {
    let key = keys_dir.join("id_ed25519");
    if key.exists() && key.with_extension("pub").exists() {
        return Ok(key);
    }
    let io = |what, p: &Path| {
        let path = p.display().to_string();
        move |source| KeyError::Io { what, path, source }
    };
    std::fs::create_dir_all(keys_dir).map_err(io("create", keys_dir))?;
    let _ = std::fs::set_permissions(keys_dir, std::os::unix::fs::PermissionsExt::from_mode(0o700));
    // Generated under a temporary name and renamed: a concurrent create never sees half a key.
    let tmp = keys_dir.join(format!(".id_ed25519.{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let _ = std::fs::remove_file(tmp.with_extension(format!("{}.pub", std::process::id())));
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "smolvm"])
        .arg("-f")
        .arg(&tmp)
        .output()
        .map_err(KeyError::NoKeygen)?;
    if !out.status.success() {
        return Err(KeyError::Keygen(String::from_utf8_lossy(&out.stderr).trim().to_string()));
    }
    let tmp_pub = PathBuf::from(format!("{}.pub", tmp.display()));
    if key.exists() && key.with_extension("pub").exists() {
        // Another process won the race; use its key.
        let _ = std::fs::remove_file(&tmp);
        let _ = std::fs::remove_file(&tmp_pub);
        return Ok(key);
    }
    std::fs::rename(&tmp_pub, key.with_extension("pub")).map_err(io("install", &key.with_extension("pub")))?;
    std::fs::rename(&tmp, &key).map_err(io("install", &key))?;
    Ok(key)
}

/// Writes the sandbox's `known_hosts` with the guest's host key for `[127.0.0.1]:port`.
pub fn write_known_hosts(path: &Path, port: u16, host_key: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, format!("[127.0.0.1]:{port} {}\n", host_key.trim()))?;
    std::fs::rename(tmp, path)
}

/// The options every ssh/scp invocation gets. No user configuration is read (`-F /dev/null`),
/// and nothing of the user's is handed to the guest: no agent (a `Host * ForwardAgent yes`
/// in `~/.ssh/config` must never give a guest the user's keys), no X11, no forwards, no local
/// commands.
pub fn common_options(key: &Path, known_hosts: &Path, control: &Path) -> Vec<String> {
    let mut v: Vec<String> = vec!["-F".into(), "/dev/null".into()];
    let mut o = |s: String| {
        v.push("-o".into());
        v.push(s);
    };
    o(format!("IdentityFile={}", key.display()));
    o("IdentitiesOnly=yes".into());
    o("StrictHostKeyChecking=yes".into());
    o(format!("UserKnownHostsFile={}", known_hosts.display()));
    o("GlobalKnownHostsFile=/dev/null".into());
    o("BatchMode=yes".into());
    o("LogLevel=ERROR".into());
    o("ConnectTimeout=30".into());
    o("ForwardAgent=no".into());
    o("ForwardX11=no".into());
    o("ClearAllForwardings=yes".into());
    o("PermitLocalCommand=no".into());
    // One TCP+SSH handshake per sandbox, reused by later commands for five minutes.
    o("ControlMaster=auto".into());
    o(format!("ControlPath={}", control.display()));
    o("ControlPersist=300".into());
    v
}

/// The environment an ssh/scp child keeps: what a terminal session needs, passed through
/// untouched, nothing else (no `SSH_AUTH_SOCK`, no API keys or tokens of the host).
pub fn child_env(cmd: &mut Command) {
    cmd.env_clear();
    for k in ["PATH", "HOME", "TERM", "LANG", "LC_ALL", "USER", "LOGNAME"] {
        if let Some(v) = std::env::var_os(k) {
            cmd.env(k, v);
        }
    }
}

/// Quotes one word for a POSIX shell.
pub fn shell_quote(s: &str) -> String {
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(&b)) {
        return s.to_string();
    }
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The remote command line for an argv: each word quoted, so it reaches the guest unchanged.
pub fn remote_command(argv: &[String]) -> String {
    argv.iter().map(|a| shell_quote(a)).collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    #[test]
    fn no_user_config_no_agent_no_forwards_reach_a_guest() {
        let o = common_options(Path::new("/k"), Path::new("/kh"), Path::new("/ctl"));
        // `-F /dev/null` first: a user's `Host * ForwardAgent yes` is never read.
        assert_eq!(&o[..2], ["-F", "/dev/null"]);
        for want in [
            "ForwardAgent=no",
            "ForwardX11=no",
            "ClearAllForwardings=yes",
            "PermitLocalCommand=no",
            "StrictHostKeyChecking=yes",
        ] {
            assert!(o.iter().any(|x| x == want), "{want} missing from {o:?}");
        }
        let mut c = Command::new("ssh");
        c.env("SSH_AUTH_SOCK", "/tmp/agent").env("OPENAI_API_KEY", "sk-x");
        child_env(&mut c);
        let kept: Vec<String> =
            c.get_envs().filter(|(_, v)| v.is_some()).map(|(k, _)| k.to_string_lossy().into_owned()).collect();
        assert!(!kept.iter().any(|k| k == "SSH_AUTH_SOCK" || k == "OPENAI_API_KEY"), "{kept:?}");
    }

    use super::*;

    #[test]
    fn quoting_survives_a_shell() {
        let argv: Vec<String> = ["echo", "a b", "it's", "$HOME", "", "x;y"].iter().map(|s| s.to_string()).collect();
        let cmd = remote_command(&argv);
        let out = Command::new("sh").arg("-c").arg(&cmd).output().unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "a b it's $HOME  x;y\n");
    }
}
