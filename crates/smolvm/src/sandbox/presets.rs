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
    /// The secrets it uses: host environment variables whose values stay on the host; the
    /// guest gets placeholders, and the values are added to requests to these hosts only.
    pub secrets: &'static [PresetSecret],
    /// How the tool is told to use its key at start, run in the guest as root (the key's
    /// variable holds its placeholder): its own login command or config file. `None`: the
    /// variable is enough.
    pub auth_setup: Option<&'static str>,
}

/// A secret a preset declares: the variable and the API hosts it is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PresetSecret {
    pub var: &'static str,
    pub hosts: &'static [&'static str],
}

const OPENAI: &[&str] = &["api.openai.com"];
const ANTHROPIC: &[&str] = &["api.anthropic.com"];
const OPENROUTER: &[&str] = &["openrouter.ai"];

/// The presets every release carries: the one table that the CLI's `<preset> start`
/// subcommands, the release builder and the tests are generated from.
pub const PRESETS: &[Preset] = &[
    Preset {
        name: "codex",
        about: "OpenAI's Codex CLI",
        command: "codex",
        secrets: &[PresetSecret { var: "OPENAI_API_KEY", hosts: OPENAI }],
        // Codex keeps its own credentials: an API-key login from the variable (it lands on
        // its sign-in menu otherwise).
        auth_setup: Some("printenv OPENAI_API_KEY | codex login --with-api-key >/dev/null"),
    },
    Preset {
        name: "claude-code",
        about: "Anthropic's Claude Code",
        command: "claude",
        secrets: &[PresetSecret { var: "ANTHROPIC_API_KEY", hosts: ANTHROPIC }],
        // Claude Code asks whether to use a key found in the environment, walks a new user
        // through onboarding, and asks whether to trust the folder it opens in (the home): all
        // answered in its config (the key is approved by its last 20 characters, as the tool
        // records it).
        auth_setup: Some(
            "python3 - <<'PY'\nimport json, os\np = os.path.expanduser('~/.claude.json')\n\
             try:\n    c = json.load(open(p))\nexcept Exception:\n    c = {}\n\
             k = os.environ['ANTHROPIC_API_KEY']\nc['hasCompletedOnboarding'] = True\n\
             a = c.setdefault('customApiKeyResponses', {}).setdefault('approved', [])\n\
             if k[-20:] not in a: a.append(k[-20:])\n\
             c.setdefault('projects', {}).setdefault('/root', {})['hasTrustDialogAccepted'] = True\n\
             json.dump(c, open(p, 'w'))\nPY",
        ),
    },
    Preset {
        name: "hermes",
        about: "Nous Research's Hermes agent",
        command: "hermes",
        secrets: &[
            PresetSecret { var: "OPENROUTER_API_KEY", hosts: OPENROUTER },
            PresetSecret { var: "OPENAI_API_KEY", hosts: OPENAI },
            PresetSecret { var: "ANTHROPIC_API_KEY", hosts: ANTHROPIC },
        ],
        auth_setup: None,
    },
    Preset {
        name: "pi",
        about: "the pi coding agent",
        command: "pi",
        secrets: &[
            PresetSecret { var: "ANTHROPIC_API_KEY", hosts: ANTHROPIC },
            PresetSecret { var: "OPENAI_API_KEY", hosts: OPENAI },
            PresetSecret { var: "OPENROUTER_API_KEY", hosts: OPENROUTER },
        ],
        auth_setup: None,
    },
];

/// The preset called `name`.
pub fn find(name: &str) -> Option<&'static Preset> {
    PRESETS.iter().find(|p| p.name == name)
}

impl Preset {
    /// Its secrets whose variables `lookup` (the host's environment, for the CLI) has, and
    /// those it has not.
    pub fn secrets_from(
        &self,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> (Vec<super::secrets::Secret>, Vec<&'static str>) {
        let mut found = Vec::new();
        let mut missing = Vec::new();
        for s in self.secrets {
            match lookup(s.var).filter(|v| !v.is_empty()) {
                Some(v) => found.push(super::secrets::Secret {
                    name: s.var.to_string(),
                    hosts: s.hosts.iter().map(|h| h.to_string()).collect(),
                    headers: vec![],
                    value: super::secrets::SecretValue::new(v),
                }),
                None => missing.push(s.var),
            }
        }
        (found, missing)
    }
}

impl super::Smolvm {
    /// Runs the preset's auth setup in a running sandbox (its keys' variables hold their
    /// placeholders there), if it has one and was handed a key.
    pub fn setup_preset_auth(&self, name: &str, preset: &Preset) -> Result<(), crate::agent::AgentError> {
        let Some(script) = preset.auth_setup else { return Ok(()) };
        let have: Vec<String> = self.secrets(name).map(|v| v.into_iter().map(|s| s.name).collect()).unwrap_or_default();
        if !preset.secrets.iter().any(|s| have.iter().any(|h| h == s.var)) {
            return Ok(());
        }
        let out = self.exec(
            name,
            &["bash".into(), "-lc".into(), script.into()],
            None,
            Some(std::time::Duration::from_secs(120)),
        )?;
        if out.code() != 0 {
            return Err(crate::agent::AgentError::Guest {
                sandbox: name.into(),
                message: format!(
                    "{}'s auth setup failed (exit {}): {}",
                    preset.name,
                    out.code(),
                    crate::text::escape_controls(String::from_utf8_lossy(&out.stderr).trim())
                ),
                errno: None,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_preset_declares_where_its_keys_go() {
        for p in PRESETS {
            assert!(!p.secrets.is_empty(), "{}", p.name);
            for s in p.secrets {
                assert!(!s.hosts.is_empty() && s.hosts.iter().all(|h| h.contains('.')), "{}: {}", p.name, s.var);
            }
        }
        let codex = find("codex").unwrap();
        let (found, missing) = codex.secrets_from(|k| (k == "OPENAI_API_KEY").then(|| "sk-x".to_string()));
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].hosts, vec!["api.openai.com".to_string()]);
        assert!(missing.is_empty());
        let (found, missing) = codex.secrets_from(|_| None);
        assert!(found.is_empty() && missing == vec!["OPENAI_API_KEY"]);
    }
}
