//! smolvm's own API, beside E2B's, under `/smolvm/v1/`: the templates (presets) there are, a
//! sandbox's network policy, snapshots. Same key, same error shape.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::app::App;
use crate::control::ApiError;

#[derive(Debug, Serialize, ToSchema)]
pub struct Template {
    /// What `templateID` takes.
    pub name: String,
    pub about: String,
}

#[utoipa::path(get, path = "/smolvm/v1/templates", tag = "smolvm", responses((status = 200, body = [Template])))]
pub async fn templates() -> Json<Vec<Template>> {
    let mut out =
        vec![Template { name: "base".into(), about: "the smolvm base image (Debian, the agent, sshd)".into() }];
    out.extend(
        smolvm::sandbox::presets::PRESETS.iter().map(|p| Template { name: p.name.into(), about: p.about.into() }),
    );
    Json(out)
}

#[utoipa::path(get, path = "/smolvm/v1/sandboxes/{sandboxID}/network", tag = "smolvm", params(("sandboxID" = String, Path)),
    responses((status = 200, description = "the policy (smolvm's NetworkPolicy JSON)", body = Object), (status = 404, body = ApiError)))]
pub async fn get_network(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let name = id.clone();
    let info = app.blocking(move |s| s.info(&name)).await?;
    let info = info.map_err(|_| ApiError::new(StatusCode::NOT_FOUND, format!("sandbox {id:?} not found")))?;
    Ok(Json(serde_json::to_value(&info.network_policy).unwrap_or_default()))
}

#[utoipa::path(put, path = "/smolvm/v1/sandboxes/{sandboxID}/network", tag = "smolvm", params(("sandboxID" = String, Path)),
    request_body(content = Object, description = "smolvm's NetworkPolicy: mode (nat|none), allow_domains, allow_cidrs, allow_host_ports"),
    responses((status = 204), (status = 400, body = ApiError), (status = 404, body = ApiError)))]
pub async fn put_network(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    body: Result<Json<serde_json::Value>, axum::extract::rejection::JsonRejection>,
) -> Result<StatusCode, ApiError> {
    let Json(v) =
        body.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("a malformed body: {}", e.body_text())))?;
    let policy: smolvm::sandbox::NetworkPolicy = serde_json::from_value(v)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("not a network policy: {e}")))?;
    crate::control::host_access_allowed(&app, &policy)?;
    let name = id.clone();
    app.blocking(move |s| s.set_network(&name, &policy)).await?.map_err(|e| match e {
        smolvm::sandbox::LifecycleError::Sandbox(smolvm::sandbox::SandboxError::NotFound(_)) => {
            ApiError::new(StatusCode::NOT_FOUND, format!("sandbox {id:?} not found"))
        }
        other => ApiError::new(StatusCode::BAD_REQUEST, other.to_string()),
    })?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize, ToSchema, Default)]
#[serde(default)]
pub struct NewSnapshot {
    /// Default: `<sandbox>-<unix time>`.
    pub name: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Snapshot {
    pub name: String,
    pub source: Option<String>,
    pub created_at: i64,
    pub memory_mib: u32,
    pub cpus: u32,
    pub bytes: u64,
}

fn snapshot_out(s: smolvm::sandbox::SnapshotInfo) -> Snapshot {
    Snapshot {
        name: s.name,
        source: s.source,
        created_at: s.created_at,
        memory_mib: s.memory_mib,
        cpus: s.cpus,
        bytes: s.bytes,
    }
}

#[utoipa::path(post, path = "/smolvm/v1/sandboxes/{sandboxID}/snapshots", tag = "smolvm", params(("sandboxID" = String, Path)), request_body = NewSnapshot,
    responses((status = 201, body = Snapshot), (status = 400, body = ApiError), (status = 404, body = ApiError)))]
pub async fn snapshot(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    body: Option<Json<NewSnapshot>>,
) -> Result<(StatusCode, Json<Snapshot>), ApiError> {
    let snap = body.and_then(|b| b.0.name);
    let name = id.clone();
    let info = app.blocking(move |s| s.snapshot(&name, snap.as_deref())).await?.map_err(|e| match e {
        smolvm::sandbox::LifecycleError::Sandbox(smolvm::sandbox::SandboxError::NotFound(_)) => {
            ApiError::new(StatusCode::NOT_FOUND, format!("sandbox {id:?} not found"))
        }
        other => ApiError::new(StatusCode::BAD_REQUEST, other.to_string()),
    })?;
    Ok((StatusCode::CREATED, Json(snapshot_out(info))))
}

#[utoipa::path(get, path = "/smolvm/v1/snapshots", tag = "smolvm", responses((status = 200, body = [Snapshot])))]
pub async fn snapshots(State(app): State<Arc<App>>) -> Result<Json<Vec<Snapshot>>, ApiError> {
    let list = app.blocking(|s| s.snapshots()).await?;
    Ok(Json(list.into_iter().map(snapshot_out).collect()))
}

#[utoipa::path(delete, path = "/smolvm/v1/snapshots/{name}", tag = "smolvm", params(("name" = String, Path)),
    responses((status = 204), (status = 404, body = ApiError)))]
pub async fn delete_snapshot(State(app): State<Arc<App>>, Path(name): Path<String>) -> Result<StatusCode, ApiError> {
    let n = name.clone();
    app.blocking(move |s| s.delete_snapshot(&n))
        .await?
        .map_err(|e| ApiError::new(StatusCode::NOT_FOUND, format!("snapshot {name:?}: {e}")))?;
    Ok(StatusCode::NO_CONTENT)
}
