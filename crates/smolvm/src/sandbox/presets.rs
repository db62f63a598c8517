//! Presets: an AI coding agent's tooling as a layer on the base, and what `start` needs to know.

/// One preset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Preset {
    /// The name on the command line and in the release (`smolvm codex start`).
    pub name: &'static str,
    /// What it is, for `--help`.
    pub about: &'static str,
    /// The command that runs the tool in the guest.
    pub command: &'static str,
    /// Host environment variables handed to the guest (into a root-only file, through the
    /// agent: never on the kernel command line, never in logs).
    pub api_keys: &'static [&'static str],
}

/// Every preset, in release order.
pub const PRESETS: &[Preset] = &[
    Preset {
        name: "codex",
        about: "OpenAI's Codex CLI",
        command: "codex",
        api_keys: &["OPENAI_API_KEY", "CODEX_API_KEY"],
    },
    Preset {
        name: "claude-code",
        about: "Anthropic's Claude Code",
        command: "claude",
        api_keys: &["ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN"],
    },
    Preset {
        name: "hermes",
        about: "Nous Research's Hermes agent",
        command: "hermes",
        api_keys: &["OPENROUTER_API_KEY", "OPENAI_API_KEY", "ANTHROPIC_API_KEY", "NOUS_API_KEY"],
    },
    Preset {
        name: "pi",
        about: "the pi coding agent",
        command: "pi",
        api_keys: &["ANTHROPIC_API_KEY", "OPENAI_API_KEY", "GEMINI_API_KEY", "OPENROUTER_API_KEY"],
    },
];

/// The preset called `name`.
pub fn find(name: &str) -> Option<&'static Preset> {
    PRESETS.iter().find(|p| p.name == name)
}

/// Where the keys land in the guest (mode 0600, root only).
pub const SECRETS_PATH: &str = "/root/.config/smolvm/secrets.env";

/// The body of the secrets file for the variables of `preset` set on the host.
pub fn secrets_env(preset: &Preset, lookup: &impl Fn(&str) -> Option<String>) -> Option<String> {
    let lines: String = preset
        .api_keys
        .iter()
        .filter_map(|k| lookup(k).map(|v| format!("export {k}={}\n", super::ssh::shell_quote(&v))))
        .collect();
    (!lines.is_empty()).then_some(lines)
}

impl super::Smolvm {
    /// Writes the preset's API-key variables that `lookup` (the host's environment, for the
    /// CLI) has into the guest's root-only file [`SECRETS_PATH`], through the agent. Returns
    /// the names handed over.
    pub fn hand_over_keys(
        &self,
        name: &str,
        preset: &Preset,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<Vec<String>, crate::agent::AgentError> {
        let Some(body) = secrets_env(preset, &lookup) else { return Ok(Vec::new()) };
        let client = self.agent(name)?;
        let mkdir = crate::agent::client::ExecRequest {
            command: crate::agent::client::Command::Argv(
                ["mkdir", "-p", "-m", "0700", "/root/.config/smolvm"].iter().map(|s| s.to_string()).collect(),
            ),
            env: vec![],
            cwd: None,
            stdin: false,
            timeout_ms: Some(30_000),
            pty: None,
        };
        client.exec_output(mkdir, None)?;
        client.write_file(SECRETS_PATH, &mut body.as_bytes(), 0o600, 0, 0)?;
        Ok(preset.api_keys.iter().filter(|k| lookup(k).is_some()).map(|k| k.to_string()).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_quoted() {
        let codex = find("codex").unwrap();
        let env = secrets_env(codex, &|k| (k == "OPENAI_API_KEY").then(|| "sk-'x'".to_string())).unwrap();
        assert_eq!(env, "export OPENAI_API_KEY='sk-'\\''x'\\'''\n");
        assert!(secrets_env(codex, &|_| None).is_none());
    }
}
