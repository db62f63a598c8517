//! The in-sandbox API the E2B SDKs speak to (their `envd`), served by the host and translated
//! onto smolvm's agent protocol: nothing of E2B runs in the guest.
//!
//! Requests reach a sandbox by the `E2b-Sandbox-Id` header the SDKs send on every envd call
//! (or a `<port>-<id>.<domain>` Host), and are allowed by the sandbox's access token
//! (`X-Access-Token`, derived from the API key: [`crate::key`]), the API key itself, or for
//! `/files` a signed URL.

pub mod connect;
pub mod files;
pub mod filesystem;
pub mod process;

use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::json;

use crate::app::{App, Conn};
use connect::{Code, RpcError};

/// The envd version the server reports: the SDKs gate features on it, so it is the newest
/// whose features are all served (stdin flag, default user, CloseStdin, octet-stream uploads).
pub const ENVD_VERSION: &str = "0.5.7";

pub fn routes() -> Router<Arc<App>> {
    Router::new()
        .route("/health", get(health))
        // Uploads stream to the guest: no size limit but the guest's disk.
        .route("/files", get(files::download).post(files::upload).layer(axum::extract::DefaultBodyLimit::disable()))
        .route("/process.Process/{method}", post(process::call))
        .route("/filesystem.Filesystem/{method}", post(filesystem::call))
}

/// A request's sandbox, checked.
#[derive(Debug, Clone)]
pub struct Target {
    pub id: String,
    pub conn: Arc<Conn>,
    /// The home of the request's user: where relative paths start.
    pub home: String,
}

impl Target {
    /// An absolute guest path for `p` (relative to the user's home; `~` is the home).
    pub fn path(&self, p: &str) -> String {
        if p.starts_with('/') {
            p.to_string()
        } else if p == "~" || p.is_empty() {
            self.home.clone()
        } else if let Some(rest) = p.strip_prefix("~/") {
            format!("{}/{rest}", self.home)
        } else {
            format!("{}/{p}", self.home)
        }
    }
}

/// The sandbox a request names: the header, else the Host name. Only a valid sandbox name
/// counts: anything else names none.
pub fn sandbox_id(headers: &HeaderMap) -> Option<String> {
    let id = named_id(headers)?;
    smolvm::sandbox::names::validate(&id).ok().map(|()| id)
}

fn named_id(headers: &HeaderMap) -> Option<String> {
    if let Some(id) = headers.get("e2b-sandbox-id").and_then(|v| v.to_str().ok()) {
        return Some(id.to_string());
    }
    let host = headers.get(axum::http::header::HOST)?.to_str().ok()?;
    let first = host.split('.').next()?;
    let (port, id) = first.split_once('-')?;
    (port.chars().all(|c| c.is_ascii_digit()) && !id.is_empty() && host.contains('.')).then(|| id.to_string())
}

/// E2B's answer for a request to a sandbox that does not run: a 502 whose message says "not
/// found", which the SDKs turn into their not-found / not-running errors.
pub fn not_found(id: &str) -> Response {
    let body = json!({"sandboxId": id, "message": format!("The sandbox {id} was not found"), "code": 502});
    (StatusCode::BAD_GATEWAY, [(axum::http::header::CONTENT_TYPE, "application/json")], body.to_string())
        .into_response()
}

/// The user a request runs as (`Authorization: Basic <user>:`). Everything runs as root in a
/// smolvm guest; `user` (E2B's default name) is root with `/home/user` as its home.
fn user_home(headers: &HeaderMap, query_user: Option<&str>) -> Result<String, RpcError> {
    let user = match query_user.filter(|u| !u.is_empty()) {
        Some(u) => Some(u.to_string()),
        None => headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Basic "))
            .and_then(|b| connect::decode_bytes(b.trim()).ok())
            .map(|raw| String::from_utf8_lossy(&raw).split(':').next().unwrap_or_default().to_string())
            .filter(|u| !u.is_empty()),
    };
    match user.as_deref() {
        None | Some("root") => Ok("/root".into()),
        Some("user") => Ok("/home/user".into()),
        Some(other) => Err(RpcError::new(
            Code::InvalidArgument,
            format!("no user {other:?} in a smolvm sandbox: commands run as root (use user \"root\" or \"user\")"),
        )),
    }
}

/// Whether the request may reach sandbox `id`: its token, or the API key.
pub fn allowed(app: &App, headers: &HeaderMap, id: &str) -> bool {
    let header = |n: &str| headers.get(n).and_then(|v| v.to_str().ok());
    header("x-access-token").is_some_and(|t| app.token_matches(id, t))
        || header("x-api-key").is_some_and(|k| app.key().matches(k))
}

/// Resolves and checks a request's sandbox. `signed` says the request carried a valid URL
/// signature (the `/files` links).
pub async fn target(
    app: &Arc<App>,
    headers: &HeaderMap,
    query_user: Option<&str>,
    signed: impl FnOnce(&str) -> bool,
) -> Result<Target, Response> {
    let Some(id) = sandbox_id(headers) else {
        let e = RpcError::new(Code::InvalidArgument, "no E2b-Sandbox-Id header: which sandbox is this for?");
        return Err(e.into_response());
    };
    if !allowed(app, headers, &id) && !signed(&id) {
        return Err(refused(app, headers, &id));
    }
    let home = user_home(headers, query_user).map_err(IntoResponse::into_response)?;
    match app.conn(&id).await {
        Ok(conn) => Ok(Target { id, conn, home }),
        Err(e) => {
            tracing::debug!("envd request for {id}: {e}");
            Err(not_found(&id))
        }
    }
}

/// An agent failure as an RPC error.
/// The one place a library error's kind becomes a Connect code (`/files` then maps codes to
/// HTTP statuses).
pub fn agent_error(e: smolvm::agent::AgentError) -> RpcError {
    use smolvm::agent::AgentError as E;
    use smolvm::error::{ErrorKind as K, Kind};
    let code = match (&e, e.kind()) {
        (E::Unsupported { .. }, _) => Code::Unimplemented,
        // A sandbox that is paused or stopped: its envd does not answer, as E2B's would not.
        (E::Sandbox(_), K::Conflict) => Code::Unavailable,
        (_, K::NotFound) => Code::NotFound,
        (_, K::Conflict) => Code::AlreadyExists,
        (_, K::InvalidInput) => Code::InvalidArgument,
        (_, K::PermissionDenied) => Code::PermissionDenied,
        (_, K::ResourceExhausted) => Code::ResourceExhausted,
        (_, K::Unavailable) => Code::Unavailable,
        (_, K::Internal) => Code::Internal,
    };
    RpcError::new(code, e.to_string())
}

/// The answer to a caller the sandbox does not admit: the same whether or not a sandbox of
/// that name exists, so that a caller without its token learns nothing of it. The one
/// exception is the caller whose token was valid for the sandbox removed last under that name
/// (E2B's SDKs after `kill`): it is told "not found", which the SDKs turn into their own error.
fn refused(app: &App, headers: &HeaderMap, id: &str) -> Response {
    let token = headers.get("x-access-token").and_then(|v| v.to_str().ok());
    if token.is_some_and(|t| app.token_was_valid(id, t)) {
        return not_found(id);
    }
    RpcError::new(Code::Unauthenticated, "a missing or wrong X-Access-Token for this sandbox").into_response()
}

/// `GET /health`: 204 while the sandbox's agent answers, else E2B's 502; only for a caller
/// the sandbox admits (with no sandbox named: 204, the server's own health).
async fn health(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    let Some(id) = sandbox_id(&headers) else {
        return match named_id(&headers) {
            // An id that is no sandbox name: nothing to look up.
            Some(_) => StatusCode::BAD_REQUEST.into_response(),
            None => StatusCode::NO_CONTENT.into_response(),
        };
    };
    if !allowed(&app, &headers, &id) {
        return refused(&app, &headers, &id);
    }
    match app.conn(&id).await {
        Ok(_) => StatusCode::NO_CONTENT.into_response(),
        Err(_) => not_found(&id),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_sandbox_comes_from_the_header_or_the_host() {
        let mut h = HeaderMap::new();
        h.insert("host", "49983-sbx-abc123.localhost".parse().unwrap());
        assert_eq!(sandbox_id(&h).as_deref(), Some("sbx-abc123"));
        h.insert("host", "127.0.0.1:3000".parse().unwrap());
        assert_eq!(sandbox_id(&h), None);
        h.insert("e2b-sandbox-id", "sbx-x".parse().unwrap());
        assert_eq!(sandbox_id(&h).as_deref(), Some("sbx-x"));
    }

    #[test]
    fn users_map_to_root_with_their_home() {
        let mut h = HeaderMap::new();
        assert_eq!(user_home(&h, None).unwrap(), "/root");
        h.insert("authorization", "Basic dXNlcjo=".parse().unwrap());
        assert_eq!(user_home(&h, None).unwrap(), "/home/user");
        assert_eq!(user_home(&h, Some("root")).unwrap(), "/root");
        assert!(user_home(&h, Some("mallory")).is_err());
    }
}
