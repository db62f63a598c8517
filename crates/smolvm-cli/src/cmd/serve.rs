//! `smolvm serve` and `smolvm mcp`: the library's server, on a tokio runtime of its own.

use std::net::SocketAddr;

use anyhow::{bail, Context};
use smolvm_serve::{ApiKey, App, ServeConfig};

use crate::cli::ServeArgs;

fn app(
    default_timeout: u64,
    public_hosts: Vec<String>,
    allow_host_access: bool,
) -> anyhow::Result<std::sync::Arc<App>> {
    let smolvm = crate::config::from_env();
    let key_path = key_path(&smolvm);
    let (key, made) = ApiKey::load_or_create(&key_path)?;
    if made {
        tracing::info!("made a new API key in {}", key_path.display());
    }
    Ok(App::new(ServeConfig {
        smolvm,
        key,
        default_timeout_secs: default_timeout,
        reap_interval: std::time::Duration::from_secs(1),
        public_hosts,
        allow_host_access,
    }))
}

fn key_path(c: &smolvm::config::Config) -> std::path::PathBuf {
    c.home.data.join("serve").join("api-key")
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().context("start the async runtime")
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

pub fn serve(a: ServeArgs, json: bool) -> anyhow::Result<i32> {
    let addr: SocketAddr = a.listen.parse().with_context(|| format!("--listen {}: not an address:port", a.listen))?;
    if !addr.ip().is_loopback() && !a.allow_remote {
        bail!(
            "--listen {addr} is reachable from other machines; whoever has the key could run code in your sandboxes over plain HTTP. Add --allow-remote if that is what you want"
        );
    }
    let public = if addr.ip().is_loopback() { Vec::new() } else { vec![addr.ip().to_string()] };
    let app = app(a.default_timeout, public, a.allow_host_access)?;
    let key_file = key_path(&app.config.smolvm);
    let rt = runtime()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("listen on {addr} (another server there?)"))?;
        let bound = listener.local_addr()?;
        if !bound.ip().is_loopback() {
            tracing::warn!("listening on {bound}, beyond this machine: plain HTTP, anyone with the key runs code here");
        }
        let url = format!("http://{bound}");
        if json {
            // One line: a program reading a long-running server's output wants it whole.
            crate::cmd::say(serde_json::json!({
                "url": url,
                "key_file": key_file,
                "env": {"E2B_API_KEY": app.key().expose(), "E2B_API_URL": url, "E2B_SANDBOX_URL": url},
                "openapi": format!("{url}/openapi.json"),
                "mcp": format!("{url}/mcp"),
            }));
        } else {
            crate::cmd::say(format!(
                "smolvm serve: listening on {url} (OpenAPI at {url}/openapi.json, MCP at {url}/mcp)"
            ));
            crate::cmd::say("For the E2B SDKs (Python and JS), set:");
            crate::cmd::say(format!("  export E2B_API_KEY={}   # kept in {}", app.key().expose(), key_file.display()));
            crate::cmd::say(format!("  export E2B_API_URL={url}"));
            crate::cmd::say(format!("  export E2B_SANDBOX_URL={url}"));
        }
        use std::io::Write;
        let _ = std::io::stdout().flush();
        smolvm_serve::serve(app, listener, shutdown_signal()).await?;
        anyhow::Ok(0)
    })
}

pub fn mcp() -> anyhow::Result<i32> {
    let app = app(300, Vec::new(), false)?;
    runtime()?.block_on(smolvm_serve::mcp::serve_stdio(app))?;
    Ok(0)
}
