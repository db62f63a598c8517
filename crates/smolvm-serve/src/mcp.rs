//! The MCP server: sandboxes as tools for coding agents (Claude Code, Codex, any MCP client),
//! over stdio (`smolvm mcp`) or streamable HTTP at `/mcp` on `smolvm serve` (behind the API
//! key, as a bearer token). Built on `rmcp`, the protocol's official Rust SDK.
//!
//! Results are structured (`structuredContent`, with a text copy); a mistake of the caller or
//! a failed command is a tool error (`isError: true`) the agent can read and act on, never a
//! protocol error.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::CallToolResult;
use rmcp::schemars::{self, JsonSchema};
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use rmcp::{tool, tool_handler, tool_router, ErrorData, ServerHandler, ServiceExt};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::app::App;

/// Output kept per stream in a result: an agent's context is the limit, not the sandbox.
const OUTPUT_CAP: usize = 256 * 1024;
/// A file read in one call at most.
const READ_CAP: usize = 8 << 20;

#[derive(Debug, Deserialize, JsonSchema)]
pub struct CreateParams {
    /// `base` (default) or a preset: `codex`, `claude-code`, `hermes`, `pi`.
    #[serde(default)]
    pub template: Option<String>,
    /// The sandbox's name (default: generated).
    #[serde(default)]
    pub name: Option<String>,
    /// `nat` (default: the internet, never the host or private networks) or `none`.
    #[serde(default)]
    pub network: Option<String>,
    /// With any set, only these domains (`*.example.com` patterns allowed) are reachable.
    #[serde(default)]
    pub allow_domains: Vec<String>,
    /// Guest memory in MiB (default 512).
    #[serde(default)]
    pub memory_mib: Option<u32>,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct RunParams {
    pub sandbox: String,
    /// A shell command line, run by `/bin/sh -c` as root.
    pub command: String,
    /// Killed after this many seconds (default 60, at most 3600).
    #[serde(default)]
    pub timeout_secs: Option<u64>,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct ReadParams {
    pub sandbox: String,
    /// An absolute path in the sandbox.
    pub path: String,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct WriteParams {
    pub sandbox: String,
    /// An absolute path in the sandbox; missing parent directories are made.
    pub path: String,
    pub content: String,
    /// `content` is base64 (for binary files).
    #[serde(default)]
    pub base64: bool,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct SandboxParams {
    pub sandbox: String,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct SandboxOut {
    pub name: String,
    pub status: String,
    pub template: String,
    pub memory_mib: u32,
    pub network: String,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct SandboxList {
    pub sandboxes: Vec<SandboxOut>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct RunOut {
    pub exit_code: i32,
    pub stdout: String,
    pub stderr: String,
    pub timed_out: bool,
    /// The output passed the cap; what is here is its beginning.
    pub truncated: bool,
}

fn sandbox_out(i: &smolvm::sandbox::SandboxInfo) -> SandboxOut {
    SandboxOut {
        name: i.name.clone(),
        status: i.status.to_string(),
        template: i.preset.clone().unwrap_or_else(|| "base".into()),
        memory_mib: i.memory_mib,
        network: format!("{:?}", i.network).to_lowercase(),
    }
}

fn tool_error(message: impl Into<String>) -> CallToolResult {
    CallToolResult::structured_error(json!({"error": message.into()}))
}

fn structured(v: &impl Serialize) -> CallToolResult {
    CallToolResult::structured(serde_json::to_value(v).unwrap_or_default())
}

fn capped(mut b: Vec<u8>) -> (String, bool) {
    let cut = b.len() > OUTPUT_CAP;
    b.truncate(OUTPUT_CAP);
    (String::from_utf8_lossy(&b).into_owned(), cut)
}

/// The tools, over one [`App`].
#[derive(Debug, Clone)]
pub struct Tools {
    app: Arc<App>,
    tool_router: ToolRouter<Self>,
}

#[tool_router]
impl Tools {
    pub fn new(app: Arc<App>) -> Tools {
        Tools { app, tool_router: Self::tool_router() }
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&smolvm::sandbox::Smolvm) -> T + Send + 'static,
    ) -> Result<T, ErrorData> {
        self.app.blocking(f).await.map_err(|e| ErrorData::internal_error(e.to_string(), None))
    }

    #[tool(
        description = "Create a sandbox: a disposable, hardware-isolated Linux VM (Debian; you are root). Returns its name, used by the other tools. The default network reaches the internet but never this host or private networks."
    )]
    async fn create_sandbox(&self, Parameters(p): Parameters<CreateParams>) -> Result<CallToolResult, ErrorData> {
        let mut opts = smolvm::sandbox::CreateOptions { name: p.name, ..Default::default() };
        match p.template.as_deref() {
            None | Some("base") | Some("") => {}
            Some(t) if smolvm::sandbox::presets::find(t).is_some() => opts.preset = Some(t.into()),
            Some(t) => return Ok(tool_error(format!("no template {t:?}: use base, codex, claude-code, hermes or pi"))),
        }
        match p.network.as_deref() {
            None | Some("nat") => {}
            Some("none") => opts.network = smolvm::sandbox::NetworkPolicy::none(),
            Some(n) => return Ok(tool_error(format!("network {n:?}: use nat or none"))),
        }
        for d in &p.allow_domains {
            match serde_json::from_value(json!(d)) {
                Ok(pat) => opts.network.allow_domains.push(pat),
                Err(e) => return Ok(tool_error(format!("allow_domains {d:?}: {e}"))),
            }
        }
        if let Some(m) = p.memory_mib {
            opts.memory_mib = m;
        }
        let r = self.blocking(move |s| s.create(&opts, &mut |_| {})).await?;
        Ok(match r {
            Ok(info) => structured(&sandbox_out(&info)),
            Err(e) => tool_error(format!("create failed: {e}")),
        })
    }

    #[tool(
        description = "Run a shell command in a sandbox (as root, /bin/sh -c). Returns exit_code, stdout, stderr; a command that runs past timeout_secs is killed (timed_out)."
    )]
    async fn run_command(&self, Parameters(p): Parameters<RunParams>) -> Result<CallToolResult, ErrorData> {
        let secs = p.timeout_secs.unwrap_or(60);
        if secs == 0 || secs > 3600 {
            return Ok(tool_error("timeout_secs: the range is 1 to 3600"));
        }
        let argv = vec!["/bin/sh".to_string(), "-c".to_string(), p.command];
        let name = p.sandbox;
        let r = self.blocking(move |s| s.exec(&name, &argv, None, Some(Duration::from_secs(secs)))).await?;
        Ok(match r {
            Ok(out) => {
                let code = out.code();
                let (stdout, a) = capped(out.stdout);
                let (stderr, b) = capped(out.stderr);
                let o = RunOut {
                    exit_code: code,
                    stdout,
                    stderr,
                    timed_out: out.timed_out,
                    truncated: a || b || out.truncated,
                };
                let v = serde_json::to_value(&o).unwrap_or_default();
                if code == 0 && !o.timed_out {
                    CallToolResult::structured(v)
                } else {
                    CallToolResult::structured_error(v)
                }
            }
            Err(e) => tool_error(e.to_string()),
        })
    }

    #[tool(
        description = "Read a file from a sandbox. Text comes back as is; a file that is not UTF-8 comes back as base64 (encoding: base64)."
    )]
    async fn read_file(&self, Parameters(p): Parameters<ReadParams>) -> Result<CallToolResult, ErrorData> {
        let (name, path) = (p.sandbox, p.path);
        let r = self
            .blocking(move |s| -> Result<Vec<u8>, String> {
                let client = s.agent(&name).map_err(|e| e.to_string())?;
                let st = client.stat(&path).map_err(|e| e.to_string())?.ok_or(format!("{path}: no such file"))?;
                if st.is_dir {
                    return Err(format!("{path} is a directory"));
                }
                if st.size as usize > READ_CAP {
                    return Err(format!("{path} is {} bytes; this tool reads at most {READ_CAP}", st.size));
                }
                // The size is the guest's word: what it sends past the cap is refused, not kept.
                let mut buf = CappedBuf(Vec::new());
                client.read_file(&path, &mut buf).map_err(|e| e.to_string())?;
                Ok(buf.0)
            })
            .await?;
        Ok(match r {
            Ok(bytes) => match String::from_utf8(bytes) {
                Ok(text) => structured(&json!({"size": text.len(), "encoding": "utf-8", "content": text})),
                Err(e) => {
                    let b = e.into_bytes();
                    let content = base64::engine::general_purpose::STANDARD.encode(&b);
                    structured(&json!({"size": b.len(), "encoding": "base64", "content": content}))
                }
            },
            Err(e) => tool_error(e),
        })
    }

    #[tool(
        description = "Write a file in a sandbox (replaced atomically; parent directories made). Set base64 for binary content."
    )]
    async fn write_file(&self, Parameters(p): Parameters<WriteParams>) -> Result<CallToolResult, ErrorData> {
        let data = if p.base64 {
            match base64::engine::general_purpose::STANDARD.decode(p.content.trim()) {
                Ok(d) => d,
                Err(e) => return Ok(tool_error(format!("content is not base64: {e}"))),
            }
        } else {
            p.content.into_bytes()
        };
        if !p.path.starts_with('/') {
            return Ok(tool_error(format!("{}: need an absolute path", p.path)));
        }
        let (name, path) = (p.sandbox, p.path);
        let len = data.len();
        let r = self
            .blocking(move |s| -> Result<(), String> {
                let client = s.agent(&name).map_err(|e| e.to_string())?;
                if let Some((parent, _)) = path.rsplit_once('/').filter(|(p, _)| !p.is_empty()) {
                    let req = smolvm_protocol::agent::FsRequest::MakeDir { path: parent.into() };
                    // Older guests (no Fs) still write into existing directories.
                    let _ = client.fs(&req);
                }
                client.write_file(&path, &mut data.as_slice(), 0o644, 0, 0).map_err(|e| e.to_string())
            })
            .await?;
        Ok(match r {
            Ok(()) => structured(&json!({"written": len})),
            Err(e) => tool_error(e),
        })
    }

    #[tool(description = "List the sandboxes (name, status, template, memory, network).")]
    async fn list_sandboxes(&self) -> Result<CallToolResult, ErrorData> {
        let r = self.blocking(|s| s.list()).await?;
        Ok(match r {
            Ok(list) => structured(&SandboxList { sandboxes: list.iter().map(sandbox_out).collect() }),
            Err(e) => tool_error(e.to_string()),
        })
    }

    #[tool(description = "Delete a sandbox: its VM is killed and its disk thrown away.")]
    async fn delete_sandbox(&self, Parameters(p): Parameters<SandboxParams>) -> Result<CallToolResult, ErrorData> {
        let name = p.sandbox;
        self.app.drop_conn(&name);
        let n = name.clone();
        let r = self.blocking(move |s| s.delete(&n)).await?;
        self.app.meta.remove(&name);
        Ok(match r {
            Ok(()) => structured(&json!({"deleted": name})),
            Err(e) => tool_error(e.to_string()),
        })
    }
}

#[tool_handler(router = self.tool_router, name = "smolvm", instructions = "smolvm sandboxes: create_sandbox, then run_command / read_file / write_file in it by name; delete_sandbox when done.")]
impl ServerHandler for Tools {}

/// `smolvm mcp`: serves on stdin/stdout until stdin closes.
pub async fn serve_stdio(app: Arc<App>) -> Result<(), std::io::Error> {
    let service = Tools::new(app).serve(rmcp::transport::stdio()).await.map_err(std::io::Error::other)?;
    service.waiting().await.map_err(std::io::Error::other)?;
    Ok(())
}

/// The `/mcp` endpoint of `smolvm serve` (stateful sessions, in memory).
pub fn http_service(app: Arc<App>) -> StreamableHttpService<Tools, LocalSessionManager> {
    let mut hosts = vec!["localhost".to_string(), "127.0.0.1".to_string(), "::1".to_string()];
    hosts.extend(app.config.public_hosts.iter().cloned());
    let config = StreamableHttpServerConfig::default().with_allowed_hosts(hosts);
    StreamableHttpService::new(move || Ok(Tools::new(app.clone())), Arc::new(LocalSessionManager::default()), config)
}

/// A buffer that refuses to grow past [`READ_CAP`].
struct CappedBuf(Vec<u8>);

impl std::io::Write for CappedBuf {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.0.len() + buf.len() > READ_CAP {
            return Err(std::io::Error::other(format!("the file sent more than {READ_CAP} bytes")));
        }
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
