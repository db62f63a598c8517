//! The control plane: E2B's sandbox REST API (create, list, get, kill, timeout, pause, resume,
//! connect) over the library, plus smolvm's own extensions under `/smolvm/v1/`. Every route
//! needs the API key (`X-API-Key`, or `Authorization: Bearer`). Errors are E2B's
//! `{code, message}` with `code` = the HTTP status (the JS SDK branches on the body's code).

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use smolvm::sandbox::{CreateError, CreateOptions, LifecycleError, SandboxError, SandboxInfo, Status};
use utoipa::ToSchema;

use crate::app::App;
use crate::envd::ENVD_VERSION;
use crate::meta::Meta;

/// The longest timeout a sandbox may be given (E2B's own maximum: 24 hours).
pub const MAX_TIMEOUT_SECS: u64 = 24 * 3600;

/// An error answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct ApiError {
    /// The HTTP status, repeated.
    pub code: u16,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError { code: status.as_u16(), message: message.into() }
    }
    fn not_found(id: &str) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, format!("sandbox {id:?} not found"))
    }
    fn internal(e: impl std::fmt::Display) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, Json(self)).into_response()
    }
}

impl From<crate::app::AppError> for ApiError {
    fn from(e: crate::app::AppError) -> ApiError {
        ApiError::internal(e)
    }
}

/// The one mapping of the library's error kinds to the control plane's statuses.
fn status_of(kind: smolvm::error::ErrorKind) -> StatusCode {
    use smolvm::error::ErrorKind as K;
    match kind {
        K::NotFound => StatusCode::NOT_FOUND,
        K::Conflict => StatusCode::CONFLICT,
        K::InvalidInput => StatusCode::BAD_REQUEST,
        K::PermissionDenied => StatusCode::FORBIDDEN,
        K::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        K::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        K::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

fn by_kind(e: impl smolvm::error::Kind + std::fmt::Display) -> ApiError {
    ApiError::new(status_of(e.kind()), e.to_string())
}

fn sandbox_error(id: &str, e: SandboxError) -> ApiError {
    match e {
        // E2B's shape of the message, which its SDKs show.
        SandboxError::NotFound(_) => ApiError::not_found(id),
        other => by_kind(other),
    }
}

fn lifecycle_error(id: &str, e: LifecycleError) -> ApiError {
    match e {
        LifecycleError::Sandbox(s) => sandbox_error(id, s),
        other => by_kind(other),
    }
}

fn create_error(e: CreateError) -> ApiError {
    match e {
        // An unknown template is E2B's 404, though to the library it is a bad option.
        CreateError::NoPreset(_) => ApiError::new(StatusCode::NOT_FOUND, e.to_string()),
        // A snapshot that cannot be used here is the request's fault, whatever the reason.
        CreateError::Snapshot(_) | CreateError::SnapshotImage { .. } => {
            ApiError::new(StatusCode::BAD_REQUEST, e.to_string())
        }
        other => by_kind(other),
    }
}

/// `POST /v2/sandboxes` (and v1 `POST /sandboxes`).
#[derive(Debug, Deserialize, ToSchema, Default)]
#[serde(rename_all = "camelCase", default)]
pub struct NewSandbox {
    /// `base`, or a preset's name (`codex`, `claude-code`, `hermes`, `pi`).
    #[serde(rename = "templateID")]
    pub template_id: Option<String>,
    /// Seconds until the server removes it (default 300; at most 86400).
    pub timeout: Option<u64>,
    pub metadata: BTreeMap<String, String>,
    pub env_vars: BTreeMap<String, String>,
    /// Pause instead of removing it when its timeout passes.
    pub auto_pause: bool,
    /// `false`: no network at all (smolvm's `--network none`).
    #[serde(rename = "allow_internet_access", alias = "allowInternetAccess")]
    pub allow_internet_access: Option<bool>,
    /// E2B's egress rules: `allowOut` (domains and CIDRs) becomes smolvm's allow-list.
    #[schema(value_type = Object)]
    pub network: Option<serde_json::Value>,
    /// v1 only; every smolvm sandbox is "secure" (its envd needs a token).
    pub secure: Option<bool>,
    /// smolvm extension: the sandbox's resources.
    #[serde(rename = "memoryMB")]
    pub memory_mb: Option<u32>,
    pub cpu_count: Option<u32>,
}

/// A sandbox as create and connect return it.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Sandbox {
    #[serde(rename = "templateID")]
    pub template_id: String,
    #[serde(rename = "sandboxID")]
    pub sandbox_id: String,
    #[serde(rename = "clientID")]
    pub client_id: String,
    pub alias: Option<String>,
    pub envd_version: String,
    /// Required by the sandbox's envd routes (`X-Access-Token`).
    pub envd_access_token: String,
    pub domain: Option<String>,
}

/// A listed sandbox (and `GET /sandboxes/{id}`).
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ListedSandbox {
    #[serde(rename = "templateID")]
    pub template_id: String,
    pub alias: Option<String>,
    #[serde(rename = "sandboxID")]
    pub sandbox_id: String,
    #[serde(rename = "clientID")]
    pub client_id: String,
    /// RFC 3339.
    pub started_at: String,
    /// RFC 3339: when its timeout passes.
    pub end_at: String,
    pub cpu_count: u32,
    #[serde(rename = "memoryMB")]
    pub memory_mb: u32,
    #[serde(rename = "diskSizeMB")]
    pub disk_size_mb: u64,
    /// `running` or `paused`.
    pub state: String,
    pub envd_version: String,
    pub metadata: BTreeMap<String, String>,
    pub envd_access_token: String,
    pub domain: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema, Default)]
#[serde(default)]
pub struct TimeoutBody {
    /// Seconds from now.
    pub timeout: Option<u64>,
}

#[derive(Debug, Deserialize, Default, utoipa::IntoParams)]
#[serde(default, rename_all = "camelCase")]
pub struct ListQuery {
    /// `k=v&k2=v2`, URL-encoded: only sandboxes with these metadata.
    pub metadata: Option<String>,
    /// Comma-separated: `running`, `paused`.
    pub state: Option<String>,
    pub limit: Option<usize>,
    pub next_token: Option<String>,
}

fn template_of(info: &SandboxInfo, meta: Option<&Meta>) -> String {
    meta.map(|m| m.template.clone()).unwrap_or_else(|| info.preset.clone().unwrap_or_else(|| "base".into()))
}

fn sandbox_out(app: &App, id: &str, template: &str) -> Sandbox {
    Sandbox {
        template_id: template.to_string(),
        sandbox_id: id.to_string(),
        client_id: "smolvm".into(),
        alias: Some(template.to_string()),
        envd_version: ENVD_VERSION.into(),
        envd_access_token: app.sandbox_token(id),
        domain: None,
    }
}

fn listed(app: &App, info: &SandboxInfo, meta: Option<&Meta>) -> ListedSandbox {
    let template = template_of(info, meta);
    let started = meta.map(|m| m.started_at).filter(|s| *s > 0).unwrap_or(info.created_at);
    let end = meta.map(|m| m.end_at).filter(|e| *e > 0).unwrap_or(i64::from(i32::MAX));
    ListedSandbox {
        alias: Some(template.clone()),
        template_id: template,
        sandbox_id: info.name.clone(),
        client_id: "smolvm".into(),
        started_at: smolvm::timefmt::rfc3339_utc(started),
        end_at: smolvm::timefmt::rfc3339_utc(end),
        cpu_count: info.cpus,
        memory_mb: info.memory_mib,
        disk_size_mb: info.disk_mib,
        state: if info.status == Status::Paused { "paused".into() } else { "running".into() },
        envd_version: ENVD_VERSION.into(),
        metadata: meta.map(|m| m.metadata.clone()).unwrap_or_default(),
        envd_access_token: app.sandbox_token(&info.name),
        domain: None,
    }
}

fn timeout_secs(app: &App, t: Option<u64>) -> Result<u64, ApiError> {
    let t = t.unwrap_or(app.config.default_timeout_secs);
    if t == 0 || t > MAX_TIMEOUT_SECS {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("timeout {t} s: the range is 1 to {MAX_TIMEOUT_SECS}"),
        ));
    }
    Ok(t)
}

/// Refuses (403) a policy that opens the host (its ports, private ranges) unless the server
/// was started with `--allow-host-access`.
pub fn host_access_allowed(app: &App, policy: &smolvm::sandbox::NetworkPolicy) -> Result<(), ApiError> {
    if app.config.allow_host_access || (policy.allow_host_ports.is_empty() && !policy.allow_private) {
        return Ok(());
    }
    Err(ApiError::new(
        StatusCode::FORBIDDEN,
        "allow_host_ports and allow_private open the host's services and networks: this server does not let API \
         callers do that (start it with --allow-host-access)",
    ))
}

/// E2B's `network.allowOut` as smolvm's allow-lists; `denyOut` has no meaning in an
/// allow-list policy and is refused rather than ignored.
fn network_policy(body: &NewSandbox) -> Result<smolvm::sandbox::NetworkPolicy, ApiError> {
    if body.allow_internet_access == Some(false) {
        return Ok(smolvm::sandbox::NetworkPolicy::none());
    }
    let mut policy = smolvm::sandbox::NetworkPolicy::default();
    let Some(net) = &body.network else { return Ok(policy) };
    let bad = |m: String| ApiError::new(StatusCode::BAD_REQUEST, m);
    if net.get("denyOut").is_some_and(|d| d.as_array().is_some_and(|a| !a.is_empty())) {
        return Err(bad("network.denyOut is not supported: smolvm's policy is an allow-list (use allowOut)".into()));
    }
    for item in net.get("allowOut").and_then(|a| a.as_array()).into_iter().flatten() {
        let s = item.as_str().ok_or_else(|| bad(format!("network.allowOut: {item} is not a string")))?;
        if s.contains('/') || s.parse::<std::net::IpAddr>().is_ok() {
            let cidr = if s.contains('/') { s.to_string() } else { format!("{s}/32") };
            let c = serde_json::from_value(serde_json::json!(cidr))
                .map_err(|e| bad(format!("network.allowOut {s:?}: {e}")))?;
            policy.allow_cidrs.push(c);
        } else {
            let d = serde_json::from_value(serde_json::json!(s))
                .map_err(|e| bad(format!("network.allowOut {s:?}: {e}")))?;
            policy.allow_domains.push(d);
        }
    }
    Ok(policy)
}

#[utoipa::path(post, path = "/v2/sandboxes", tag = "sandboxes", request_body = NewSandbox,
    responses((status = 201, body = Sandbox), (status = 400, body = ApiError), (status = 401, body = ApiError), (status = 404, description = "unknown template", body = ApiError)))]
pub async fn create(
    State(app): State<Arc<App>>,
    body: Result<Json<NewSandbox>, axum::extract::rejection::JsonRejection>,
) -> Result<(StatusCode, Json<Sandbox>), ApiError> {
    let Json(body) =
        body.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("a malformed body: {}", e.body_text())))?;
    let template = body.template_id.clone().filter(|t| !t.is_empty()).unwrap_or_else(|| "base".into());
    let preset = match template.as_str() {
        "base" => None,
        t if smolvm::sandbox::presets::find(t).is_some() => Some(t.to_string()),
        t => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                format!("template {t:?} not found: use \"base\" or a preset (codex, claude-code, hermes, pi)"),
            ))
        }
    };
    let timeout = timeout_secs(&app, body.timeout)?;
    let mut opts = CreateOptions { preset, network: network_policy(&body)?, ..CreateOptions::default() };
    if let Some(m) = body.memory_mb {
        opts.memory_mib = m;
    }
    if let Some(c) = body.cpu_count {
        opts.cpus = c;
    }
    let env = body.env_vars.clone();
    let info = app
        .blocking(move |s| -> Result<SandboxInfo, ApiError> {
            let info = s.create(&opts, &mut |_| {}).map_err(create_error)?;
            for (k, v) in &env {
                if let Err(e) = s.env_set(&info.name, k, v) {
                    let _ = s.delete(&info.name);
                    return Err(lifecycle_error(&info.name, e));
                }
            }
            Ok(info)
        })
        .await??;
    let now = smolvm::timefmt::now_secs();
    let meta = Meta {
        template: template.clone(),
        metadata: body.metadata,
        end_at: now + timeout as i64,
        auto_pause: body.auto_pause,
        started_at: now,
        generation: crate::key::random_hex(16),
    };
    app.meta.put(&info.name, &meta).map_err(ApiError::internal)?;
    tracing::info!("created {} ({template}), expires in {timeout} s", info.name);
    Ok((StatusCode::CREATED, Json(sandbox_out(&app, &info.name, &template))))
}

fn metadata_filter(q: &Option<String>) -> Vec<(String, String)> {
    let Some(text) = q else { return Vec::new() };
    text.split('&')
        .filter_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            Some((percent_decode(k), percent_decode(v)))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    let hex = |c: u8| (c as char).to_digit(16);
    while i < b.len() {
        match b[i] {
            // Bytes, not a `str` slice: `%` before a multi-byte character must not split it.
            b'%' if i + 2 < b.len() => match (hex(b[i + 1]), hex(b[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[utoipa::path(get, path = "/v2/sandboxes", tag = "sandboxes", params(ListQuery),
    responses((status = 200, body = [ListedSandbox]), (status = 401, body = ApiError)))]
pub async fn list(
    State(app): State<Arc<App>>,
    Query(q): Query<ListQuery>,
) -> Result<Json<Vec<ListedSandbox>>, ApiError> {
    let infos = app.blocking(|s| s.list()).await?.map_err(ApiError::internal)?;
    let states: Vec<String> =
        q.state.as_deref().unwrap_or("running,paused").split(',').map(|s| s.trim().to_string()).collect();
    let want = metadata_filter(&q.metadata);
    let mut out: Vec<ListedSandbox> = infos
        .iter()
        .filter(|i| matches!(i.status, Status::Running | Status::Paused))
        .map(|i| listed(&app, i, app.meta.get(&i.name).as_ref()))
        .filter(|l| states.contains(&l.state))
        .filter(|l| want.iter().all(|(k, v)| l.metadata.get(k) == Some(v)))
        .collect();
    out.sort_by(|a, b| a.started_at.cmp(&b.started_at).then(a.sandbox_id.cmp(&b.sandbox_id)));
    if let Some(limit) = q.limit.filter(|l| *l > 0) {
        out.truncate(limit);
    }
    Ok(Json(out))
}

/// v1 `GET /sandboxes`: the running ones.
#[utoipa::path(get, path = "/sandboxes", tag = "sandboxes", responses((status = 200, body = [ListedSandbox]), (status = 401, body = ApiError)))]
pub async fn list_v1(app: State<Arc<App>>) -> Result<Json<Vec<ListedSandbox>>, ApiError> {
    list(app, Query(ListQuery { state: Some("running".into()), ..ListQuery::default() })).await
}

async fn info(app: &Arc<App>, id: &str) -> Result<SandboxInfo, ApiError> {
    let name = id.to_string();
    let i = app.blocking(move |s| s.info(&name)).await?;
    let i = i.map_err(|e| sandbox_error(id, e))?;
    match i.status {
        Status::Running | Status::Paused => Ok(i),
        // Stopped or crashed: E2B knows no such state; to its SDKs the sandbox is gone.
        _ => Err(ApiError::not_found(id)),
    }
}

#[utoipa::path(get, path = "/sandboxes/{sandboxID}", tag = "sandboxes", params(("sandboxID" = String, Path)),
    responses((status = 200, body = ListedSandbox), (status = 404, body = ApiError)))]
pub async fn get_one(State(app): State<Arc<App>>, Path(id): Path<String>) -> Result<Json<ListedSandbox>, ApiError> {
    let i = info(&app, &id).await?;
    Ok(Json(listed(&app, &i, app.meta.get(&id).as_ref())))
}

#[utoipa::path(delete, path = "/sandboxes/{sandboxID}", tag = "sandboxes", params(("sandboxID" = String, Path)),
    responses((status = 204), (status = 404, body = ApiError)))]
pub async fn kill(State(app): State<Arc<App>>, Path(id): Path<String>) -> Result<StatusCode, ApiError> {
    remove(&app, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Deletes a sandbox and forgets it (kill, and an expired timeout).
pub async fn remove(app: &Arc<App>, id: &str) -> Result<(), ApiError> {
    app.drop_conn(id);
    let name = id.to_string();
    app.blocking(move |s| s.delete(&name)).await?.map_err(|e| lifecycle_error(id, e))?;
    app.meta.remove(id);
    Ok(())
}

#[utoipa::path(post, path = "/sandboxes/{sandboxID}/timeout", tag = "sandboxes", params(("sandboxID" = String, Path)), request_body = TimeoutBody,
    responses((status = 204), (status = 400, body = ApiError), (status = 404, body = ApiError)))]
pub async fn set_timeout(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    body: Result<Json<TimeoutBody>, axum::extract::rejection::JsonRejection>,
) -> Result<StatusCode, ApiError> {
    let Json(body) =
        body.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("a malformed body: {}", e.body_text())))?;
    let t = body.timeout.ok_or_else(|| ApiError::new(StatusCode::BAD_REQUEST, "timeout is required"))?;
    let t = timeout_secs(&app, Some(t))?;
    let i = info(&app, &id).await?;
    extend(&app, &i, t)?;
    Ok(StatusCode::NO_CONTENT)
}

fn extend(app: &App, i: &SandboxInfo, secs: u64) -> Result<(), ApiError> {
    let mut m = app.meta.get(&i.name).unwrap_or_else(|| Meta {
        template: template_of(i, None),
        started_at: i.created_at,
        ..Meta::default()
    });
    m.end_at = smolvm::timefmt::now_secs() + secs as i64;
    app.meta.put(&i.name, &m).map_err(ApiError::internal)
}

#[utoipa::path(post, path = "/sandboxes/{sandboxID}/pause", tag = "sandboxes", params(("sandboxID" = String, Path)),
    responses((status = 204), (status = 404, body = ApiError), (status = 409, description = "already paused", body = ApiError)))]
pub async fn pause(State(app): State<Arc<App>>, Path(id): Path<String>) -> Result<StatusCode, ApiError> {
    let i = info(&app, &id).await?;
    if i.status == Status::Paused {
        return Err(ApiError::new(StatusCode::CONFLICT, format!("sandbox {id} is already paused")));
    }
    app.drop_conn(&id);
    let name = id.clone();
    app.blocking(move |s| s.pause(&name)).await?.map_err(|e| lifecycle_error(&id, e))?;
    Ok(StatusCode::NO_CONTENT)
}

/// Resumes a paused sandbox; `Ok(false)` if it was running already.
async fn resume_if_paused(app: &Arc<App>, i: &SandboxInfo) -> Result<bool, ApiError> {
    if i.status != Status::Paused {
        return Ok(false);
    }
    let name = i.name.clone();
    let id = i.name.clone();
    app.blocking(move |s| s.resume(&name, smolvm::sandbox::DEFAULT_READY_TIMEOUT))
        .await?
        .map_err(|e| lifecycle_error(&id, e))?;
    Ok(true)
}

#[utoipa::path(post, path = "/v2/sandboxes/{sandboxID}/connect", tag = "sandboxes", params(("sandboxID" = String, Path)), request_body = TimeoutBody,
    responses((status = 200, description = "it was running", body = Sandbox), (status = 201, description = "resumed", body = Sandbox), (status = 404, body = ApiError)))]
pub async fn connect(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    body: Option<Json<TimeoutBody>>,
) -> Result<(StatusCode, Json<Sandbox>), ApiError> {
    let i = info(&app, &id).await?;
    let resumed = resume_if_paused(&app, &i).await?;
    if let Some(t) = body.and_then(|b| b.0.timeout) {
        extend(&app, &i, timeout_secs(&app, Some(t))?)?;
    }
    let status = if resumed { StatusCode::CREATED } else { StatusCode::OK };
    Ok((status, Json(sandbox_out(&app, &id, &template_of(&i, app.meta.get(&id).as_ref())))))
}

/// v1 `POST /sandboxes/{id}/resume`: 409 when it runs.
#[utoipa::path(post, path = "/sandboxes/{sandboxID}/resume", tag = "sandboxes", params(("sandboxID" = String, Path)), request_body = TimeoutBody,
    responses((status = 201, body = Sandbox), (status = 404, body = ApiError), (status = 409, description = "already running", body = ApiError)))]
pub async fn resume(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    body: Option<Json<TimeoutBody>>,
) -> Result<(StatusCode, Json<Sandbox>), ApiError> {
    let i = info(&app, &id).await?;
    if !resume_if_paused(&app, &i).await? {
        return Err(ApiError::new(StatusCode::CONFLICT, format!("sandbox {id} is already running")));
    }
    if let Some(t) = body.and_then(|b| b.0.timeout) {
        extend(&app, &i, timeout_secs(&app, Some(t))?)?;
    }
    Ok((StatusCode::CREATED, Json(sandbox_out(&app, &id, &template_of(&i, app.meta.get(&id).as_ref())))))
}

/// `GET /sandboxes/{id}/metrics`: none are collected yet (an empty list, as for a sandbox
/// too young to have any).
#[utoipa::path(get, path = "/sandboxes/{sandboxID}/metrics", tag = "sandboxes", params(("sandboxID" = String, Path)),
    responses((status = 200, description = "no metrics are collected yet: an empty list", body = [Object]), (status = 404, body = ApiError)))]
pub async fn metrics(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
) -> Result<Json<Vec<serde_json::Value>>, ApiError> {
    info(&app, &id).await?;
    Ok(Json(Vec::new()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hostile_metadata_query_is_decoded_without_a_panic() {
        // What `?metadata=%25a%C3%A9%3Dx` is after the query's own decoding: `%a` then a
        // two-byte character. A `str` slice there split the character, and the panic took the
        // whole server down.
        let q = Some("%a\u{e9}=x".to_string());
        assert_eq!(metadata_filter(&q), vec![("%a\u{e9}".to_string(), "x".to_string())]);
        assert_eq!(percent_decode("\u{e9}%\u{e9}\u{e9}"), "\u{e9}%\u{e9}\u{e9}");
        assert_eq!(percent_decode("%"), "%");
        assert_eq!(percent_decode("%zz%41"), "%zzA");
    }

    #[test]
    fn metadata_queries_decode_as_the_sdk_encodes_them() {
        let q = Some("user%3Aname=a%20b&k=v".to_string());
        assert_eq!(metadata_filter(&q), vec![("user:name".into(), "a b".into()), ("k".into(), "v".into())]);
    }

    #[test]
    fn allow_out_becomes_allow_lists_and_deny_out_is_refused() {
        let body = NewSandbox {
            network: Some(serde_json::json!({"allowOut": ["example.com", "203.0.113.0/24", "198.51.100.7"]})),
            ..NewSandbox::default()
        };
        let p = network_policy(&body).unwrap_or_default();
        assert_eq!((p.allow_domains.len(), p.allow_cidrs.len()), (1, 2));
        let deny = NewSandbox { network: Some(serde_json::json!({"denyOut": ["0.0.0.0/0"]})), ..NewSandbox::default() };
        assert!(network_policy(&deny).is_err());
        let off = NewSandbox { allow_internet_access: Some(false), ..NewSandbox::default() };
        assert_eq!(network_policy(&off).unwrap_or_default().mode, smolvm::sandbox::NetworkMode::None);
    }
}
