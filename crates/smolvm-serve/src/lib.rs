//! `smolvm serve`: local sandboxes behind E2B's API, so that the official E2B SDKs (and what
//! is built on them) run unchanged against this host; and an MCP server for coding agents.
//!
//! Modules:
//! - [`control`]: E2B's control plane (create, list, kill, timeout, pause, connect) over the
//!   library; [`ext`]: smolvm's own routes under `/smolvm/v1/`; [`openapi`]: the document at
//!   `/openapi.json`, generated from those handlers' annotations.
//! - [`envd`]: the in-sandbox API (processes, file system, file transfer) in the Connect
//!   protocol, translated onto the guest agent's protocol; [`process`]: processes that outlive
//!   the request that started them.
//! - [`key`]: the API key and the per-sandbox tokens derived from it; [`meta`]: what the
//!   server keeps per sandbox (template, metadata, expiry); [`app`]: the shared state.
//! - [`mcp`]: the MCP tools, over stdio (`smolvm mcp`) or streamable HTTP at `/mcp`.
//!
//! One listener serves both planes (the SDKs are pointed at it with `E2B_API_URL` and
//! `E2B_SANDBOX_URL`): paths do not collide, and envd requests carry `E2b-Sandbox-Id`.

pub mod app;
pub mod control;
pub mod envd;
pub mod ext;
pub mod key;
pub mod limits;
pub mod listen;
pub mod mcp;
pub mod meta;
pub mod openapi;
pub mod process;

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::Router;

pub use app::{App, ServeConfig};
pub use key::ApiKey;

/// Whether a control-plane request carries the API key (`X-API-Key`, or a bearer token).
pub fn has_key(app: &App, headers: &axum::http::HeaderMap) -> bool {
    let header = |n| headers.get(n).and_then(|v: &axum::http::HeaderValue| v.to_str().ok());
    header("x-api-key").is_some_and(|k| app.key().matches(k))
        || header("authorization").and_then(|v| v.strip_prefix("Bearer ")).is_some_and(|k| app.key().matches(k.trim()))
}

async fn require_key(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    if has_key(&app, req.headers()) {
        return next.run(req).await;
    }
    if req.uri().path().starts_with("/mcp") {
        // MCP clients show a JSON-RPC error body to their user; anything else becomes a
        // generic "server returned an error".
        let body = serde_json::json!({"jsonrpc": "2.0", "id": null,
            "error": {"code": -32000, "message": "Unauthorized: send the API key as Authorization: Bearer <key>"}});
        return (StatusCode::UNAUTHORIZED, [("www-authenticate", "Bearer")], axum::Json(body)).into_response();
    }
    control::ApiError::new(StatusCode::UNAUTHORIZED, "a missing or wrong API key (X-API-Key)").into_response()
}

/// A sandbox id in a route (`/sandboxes/{id}/...`) must be a sandbox name, as the URL has it
/// (no percent-encoding: no name needs one): checked before any handler turns it into a path.
async fn valid_ids(req: Request, next: Next) -> Response {
    let path = req.uri().path();
    let mut segments = path.split('/');
    while let Some(s) = segments.next() {
        if s == "sandboxes" {
            if let Some(id) = segments.next() {
                if let Err(e) = smolvm::sandbox::names::validate(id) {
                    return control::ApiError::new(StatusCode::BAD_REQUEST, e.to_string()).into_response();
                }
            }
        }
    }
    next.run(req).await
}

/// Every route of the server.
pub fn router(app: Arc<App>) -> Router {
    let control = Router::new()
        .route("/v2/sandboxes", post(control::create).get(control::list))
        .route("/sandboxes", post(control::create).get(control::list_v1))
        .route("/sandboxes/{id}", get(control::get_one).delete(control::kill))
        .route("/sandboxes/{id}/timeout", post(control::set_timeout))
        .route("/sandboxes/{id}/pause", post(control::pause))
        .route("/sandboxes/{id}/resume", post(control::resume))
        .route("/sandboxes/{id}/connect", post(control::connect))
        .route("/v2/sandboxes/{id}/connect", post(control::connect))
        .route("/sandboxes/{id}/metrics", get(control::metrics))
        .route("/smolvm/v1/templates", get(ext::templates))
        .route("/smolvm/v1/sandboxes/{id}/network", get(ext::get_network).put(ext::put_network))
        .route("/smolvm/v1/sandboxes/{id}/snapshots", post(ext::snapshot))
        .route("/smolvm/v1/snapshots", get(ext::snapshots))
        .route("/smolvm/v1/snapshots/{name}", delete(ext::delete_snapshot))
        .nest_service("/mcp", mcp::http_service(app.clone()))
        .route_layer(axum::middleware::from_fn(valid_ids))
        .route_layer(axum::middleware::from_fn_with_state(app.clone(), require_key));
    Router::new()
        .merge(control)
        .merge(envd::routes())
        .route("/openapi.json", get(openapi::document))
        .fallback(|| async { control::ApiError::new(StatusCode::NOT_FOUND, "no such route (see /openapi.json)") })
        .layer(axum::middleware::from_fn(catch_panics))
        .with_state(app)
}

/// A panic while answering one request answers that request with a 500 and leaves every other
/// session alone (the host binary unwinds; see the workspace's release profile).
async fn catch_panics(req: Request, next: Next) -> Response {
    use futures_util::FutureExt;
    let route = format!("{} {}", req.method(), req.uri().path());
    match std::panic::AssertUnwindSafe(next.run(req)).catch_unwind().await {
        Ok(r) => r,
        Err(_) => {
            tracing::error!("{route}: the handler panicked (a bug); answered 500");
            control::ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal error (the server logged it)")
                .into_response()
        }
    }
}

/// Removes (or, with auto-pause, pauses) sandboxes whose timeout passed; runs forever.
pub async fn reap(app: Arc<App>) {
    let mut tick = tokio::time::interval(app.config.reap_interval);
    loop {
        tick.tick().await;
        let now = smolvm::timefmt::now_secs();
        app.meta.sweep_tombstones();
        for (id, mut m) in app.meta.all() {
            if m.end_at == 0 || m.end_at > now {
                continue;
            }
            let name = id.clone();
            let status = app.blocking(move |s| s.info(&name).map(|i| i.status)).await;
            match status {
                Ok(Ok(smolvm::sandbox::Status::Paused)) => continue,
                Ok(Err(smolvm::sandbox::SandboxError::NotFound(_))) => {
                    // Deleted behind the server's back (the CLI): forget it.
                    app.meta.remove(&id);
                    continue;
                }
                _ => {}
            }
            if m.auto_pause {
                app.drop_conn(&id);
                let name = id.clone();
                match app.blocking(move |s| s.pause(&name)).await {
                    Ok(Ok(_)) => tracing::info!("{id}: its timeout passed; paused"),
                    other => tracing::warn!("{id}: its timeout passed, and pausing it failed: {other:?}"),
                }
                m.end_at = 0;
                let _ = app.meta.put(&id, &m);
            } else {
                match control::remove(&app, &id).await {
                    Ok(()) => tracing::info!("{id}: its timeout passed; removed"),
                    Err(e) => tracing::warn!("{id}: its timeout passed, and removing it failed: {}", e.message),
                }
            }
        }
    }
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("listen on {addr}: {source}")]
    Listen { addr: String, source: std::io::Error },
    #[error("the server failed: {0}")]
    Serve(std::io::Error),
}

/// How long requests in flight get to finish after the shutdown signal: streams of
/// background processes and MCP sessions stay open as long as their clients, so the server
/// does not wait for them longer than this.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(3);

/// Serves on `listener` until `shutdown` completes (and the grace for requests in flight).
/// Sandboxes are not touched: they outlive the server.
pub async fn serve(
    app: Arc<App>,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    tokio::spawn(reap(app.clone()));
    listen::run(listener, router(app), shutdown, SHUTDOWN_GRACE).await.map_err(ServeError::Serve)
}
