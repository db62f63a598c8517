//! `process.Process`: Start (streamed output and end), Connect to a running process, List,
//! SendInput / StreamInput / CloseStdin, SendSignal. PTY sessions are not offered (the guest
//! agent has none yet): they fail with `unimplemented`, saying so.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::{json, Value};

use super::connect::{self, Code, RpcError};
use super::{agent_error, target, Target};
use crate::app::{lock, App};
use crate::process::{self as procs, ProcConfig, ProcEnd, ProcEvent, Spawn};

/// Largest unary request body.
const MAX_UNARY: usize = 16 << 20;

#[derive(Debug, Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct ConfigJ {
    cmd: String,
    args: Vec<String>,
    envs: BTreeMap<String, String>,
    cwd: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct StartReq {
    process: ConfigJ,
    pty: Option<Value>,
    tag: Option<String>,
    stdin: Option<bool>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(default)]
struct Selector {
    pid: Option<u32>,
    tag: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(default)]
struct Selected {
    process: Selector,
}

#[derive(Debug, Deserialize, Default)]
#[serde(default)]
struct InputJ {
    stdin: Option<String>,
    pty: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(default)]
struct SendInputReq {
    process: Selector,
    input: InputJ,
}

#[derive(Debug, Deserialize, Default)]
#[serde(default)]
struct SignalReq {
    process: Selector,
    signal: Value,
}

pub async fn call(State(app): State<Arc<App>>, Path(method): Path<String>, req: Request) -> Response {
    let headers = req.headers().clone();
    let t = match target(&app, &headers, None, |_| false).await {
        Ok(t) => t,
        Err(r) => return r,
    };
    if method == "StreamInput" {
        return stream_input(&t, req.into_body()).await.unwrap_or_else(|e| connect::stream_error(&e));
    }
    let body = match axum::body::to_bytes(req.into_body(), MAX_UNARY).await {
        Ok(b) => b,
        Err(e) => return RpcError::new(Code::InvalidArgument, format!("read the request: {e}")).into_response(),
    };
    let streaming = matches!(method.as_str(), "Start" | "Connect");
    let result = match method.as_str() {
        "Start" => start(&app, &t, &headers, &body).await,
        "Connect" => attach(&t, &headers, &body),
        "List" => Ok(list(&t)),
        "SendInput" => send_input(&t, &headers, &body),
        "CloseStdin" => with_proc(&t, &headers, &body, |p, t| t.conn.client.exec_input(p.exec_id).close_stdin()),
        "SendSignal" => send_signal(&t, &headers, &body),
        "Update" => Err(RpcError::new(Code::Unimplemented, "PTY sessions are not supported by smolvm's agent yet")),
        other => Err(RpcError::new(Code::Unimplemented, format!("process.Process/{other} is not served"))),
    };
    match result {
        Ok(r) => r,
        Err(e) if streaming => connect::stream_error(&e),
        Err(e) => e.into_response(),
    }
}

fn selected(t: &Target, sel: &Selector) -> Result<Arc<procs::Proc>, RpcError> {
    let found = match (sel.pid, &sel.tag) {
        (Some(pid), _) => procs::find(&t.conn, pid),
        (None, Some(tag)) => lock(&t.conn.procs).values().find(|p| p.tag.as_ref() == Some(tag)).cloned(),
        (None, None) => return Err(RpcError::new(Code::InvalidArgument, "no process selected (pid or tag)")),
    };
    found.ok_or_else(|| {
        let what = sel.pid.map(|p| format!("pid {p}")).or(sel.tag.as_ref().map(|t| format!("tag {t:?}")));
        RpcError::new(Code::NotFound, format!("process with {} not found", what.unwrap_or_default()))
    })
}

fn with_proc(
    t: &Target,
    headers: &HeaderMap,
    body: &Bytes,
    f: impl FnOnce(&procs::Proc, &Target) -> Result<(), smolvm::agent::AgentError>,
) -> Result<Response, RpcError> {
    let req: Selected = connect::request(headers, body)?;
    let p = selected(t, &req.process)?;
    f(&p, t).map_err(agent_error)?;
    Ok(connect::unary(&json!({})))
}

async fn start(app: &Arc<App>, t: &Target, headers: &HeaderMap, body: &Bytes) -> Result<Response, RpcError> {
    let req: StartReq = connect::request(headers, body)?;
    if req.pty.is_some() {
        return Err(RpcError::new(Code::Unimplemented, "PTY sessions are not supported by smolvm's agent yet"));
    }
    if req.process.cmd.is_empty() {
        return Err(RpcError::new(Code::InvalidArgument, "process.cmd is empty"));
    }
    let cwd = t.path(req.process.cwd.as_deref().unwrap_or(&t.home));
    let name = t.id.clone();
    let sandbox_env =
        app.blocking(move |s| s.guest_env(&name)).await.map_err(|e| RpcError::new(Code::Internal, e.to_string()))?;
    let sandbox_env = sandbox_env.map_err(|e| RpcError::new(Code::Internal, e.to_string()))?;
    let deadline = connect::timeout(headers);
    let spawn = Spawn {
        config: ProcConfig { cmd: req.process.cmd, args: req.process.args, envs: req.process.envs, cwd: Some(cwd) },
        tag: req.tag,
        sandbox_env,
        // Absent: open, as envd before 0.3 always had it.
        stdin: req.stdin.unwrap_or(true),
        timeout: deadline,
    };
    let slot = t.conn.limits.processes.take(crate::limits::MAX_PROCESSES).ok_or_else(|| {
        RpcError::new(
            Code::ResourceExhausted,
            format!(
                "this sandbox has {} processes started through the API still running; wait for some to end or kill them",
                crate::limits::MAX_PROCESSES
            ),
        )
    })?;
    let conn = t.conn.clone();
    let home = t.home.clone();
    let (proc, rx) = tokio::task::spawn_blocking(move || {
        if home != "/root" {
            // E2B's default user's home, made on first use.
            let _ = conn.client.fs(&smolvm_protocol::agent::FsRequest::MakeDir { path: home });
        }
        procs::spawn(&conn, spawn, slot)
    })
    .await
    .map_err(|e| RpcError::new(Code::Internal, e.to_string()))?
    .map_err(agent_error)?;
    Ok(events(proc.pid, rx, keepalive(headers)))
}

fn attach(t: &Target, headers: &HeaderMap, body: &Bytes) -> Result<Response, RpcError> {
    let req: Selected = connect::request(headers, body)?;
    let p = selected(t, &req.process)?;
    let rx = p.subscribe().ok_or_else(|| {
        RpcError::new(
            Code::ResourceExhausted,
            format!("process {} has {} streams following it already", p.pid, crate::limits::MAX_FOLLOWERS),
        )
    })?;
    Ok(events(p.pid, rx, keepalive(headers)))
}

/// `Keepalive-Ping-Interval` (seconds), default 90 as envd's.
fn keepalive(headers: &HeaderMap) -> Duration {
    let secs = headers.get("keepalive-ping-interval").and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok());
    Duration::from_secs(secs.unwrap_or(90u64).clamp(1, 3600))
}

/// The event stream of a process: `start`, its output, `end`; keepalives while it is quiet.
fn events(pid: u32, mut rx: tokio::sync::mpsc::Receiver<ProcEvent>, ping: Duration) -> Response {
    let (tx, out) = tokio::sync::mpsc::channel::<Bytes>(8);
    tokio::spawn(async move {
        let ev = |e: Value| connect::message(&json!({ "event": e }));
        if tx.send(ev(json!({"start": {"pid": pid}}))).await.is_err() {
            return;
        }
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + ping, ping);
        loop {
            let next = tokio::select! {
                e = rx.recv() => e,
                _ = tick.tick() => {
                    if tx.send(ev(json!({"keepalive": {}}))).await.is_err() { return; }
                    continue;
                }
            };
            tick.reset();
            let frame = match next {
                Some(ProcEvent::Stdout(d)) => ev(json!({"data": {"stdout": connect::encode_bytes(&d)}})),
                Some(ProcEvent::Stderr(d)) => ev(json!({"data": {"stderr": connect::encode_bytes(&d)}})),
                Some(ProcEvent::End(end)) => {
                    let _ = tx.send(ev(json!({"end": end_json(&end)}))).await;
                    let err = end
                        .timed_out
                        .then(|| RpcError::new(Code::DeadlineExceeded, "the command's timeout passed; it was killed"));
                    let _ = tx.send(connect::end(err.as_ref())).await;
                    return;
                }
                None => {
                    let e = RpcError::new(
                        Code::Unavailable,
                        "the process's events ended without its end (the sandbox went away?)",
                    );
                    let _ = tx.send(connect::end(Some(&e))).await;
                    return;
                }
            };
            // A client that went away: the process goes on (as with envd).
            if tx.send(frame).await.is_err() {
                return;
            }
        }
    });
    connect::stream(out)
}

fn end_json(e: &ProcEnd) -> Value {
    let mut v = json!({"exitCode": e.exit_code, "exited": e.exited, "status": e.status});
    if let Some(err) = &e.error {
        v["error"] = json!(err);
    }
    v
}

fn list(t: &Target) -> Response {
    let procs = lock(&t.conn.procs).values().cloned().collect::<Vec<_>>();
    let mut items: Vec<Value> = procs
        .iter()
        .map(|p| {
            let mut v = json!({
                "pid": p.pid,
                "config": {"cmd": p.config.cmd, "args": p.config.args, "envs": p.config.envs, "cwd": p.config.cwd},
            });
            if let Some(tag) = &p.tag {
                v["tag"] = json!(tag);
            }
            v
        })
        .collect();
    items.sort_by_key(|v| v["pid"].as_u64());
    connect::unary(&json!({ "processes": items }))
}

fn send_input(t: &Target, headers: &HeaderMap, body: &Bytes) -> Result<Response, RpcError> {
    let req: SendInputReq = connect::request(headers, body)?;
    let p = selected(t, &req.process)?;
    if req.input.pty.is_some() {
        return Err(RpcError::new(Code::Unimplemented, "PTY input: PTY sessions are not supported yet"));
    }
    let data = connect::decode_bytes(req.input.stdin.as_deref().unwrap_or_default())?;
    t.conn.client.exec_input(p.exec_id).write_stdin(&data).map_err(agent_error)?;
    Ok(connect::unary(&json!({})))
}

fn signal_number(v: &Value) -> Result<i32, RpcError> {
    match v {
        Value::String(s) if s == "SIGNAL_SIGKILL" => Ok(libc::SIGKILL),
        Value::String(s) if s == "SIGNAL_SIGTERM" => Ok(libc::SIGTERM),
        Value::Number(n) if n.as_i64() == Some(9) || n.as_i64() == Some(15) => Ok(n.as_i64().unwrap_or(9) as i32),
        other => {
            Err(RpcError::new(Code::InvalidArgument, format!("signal {other}: only SIGKILL and SIGTERM are offered")))
        }
    }
}

fn send_signal(t: &Target, headers: &HeaderMap, body: &Bytes) -> Result<Response, RpcError> {
    let req: SignalReq = connect::request(headers, body)?;
    let p = selected(t, &req.process)?;
    let sig = signal_number(&req.signal)?;
    t.conn.client.exec_input(p.exec_id).signal(sig).map_err(agent_error)?;
    Ok(connect::unary(&json!({})))
}

/// The client stream: `start` naming the process, then `data` chunks, until the body ends.
async fn stream_input(t: &Target, body: Body) -> Result<Response, RpcError> {
    let mut s = body.into_data_stream();
    let mut buf = BytesMut::new();
    let mut target: Option<Arc<procs::Proc>> = None;
    while let Some(chunk) = s.next().await {
        let chunk = chunk.map_err(|e| RpcError::new(Code::InvalidArgument, format!("read the stream: {e}")))?;
        buf.extend_from_slice(&chunk);
        for (flags, msg) in connect::take_envelopes(&mut buf)? {
            if flags & 0x02 != 0 {
                continue;
            }
            let v: Value = serde_json::from_slice(&msg)
                .map_err(|e| RpcError::new(Code::InvalidArgument, format!("a malformed message: {e}")))?;
            if let Some(start) = v.get("start") {
                let sel: Selector = serde_json::from_value(start["process"].clone()).unwrap_or_default();
                target = Some(selected(t, &sel)?);
            } else if let Some(data) = v.get("data") {
                let p = target.as_ref().ok_or_else(|| RpcError::new(Code::InvalidArgument, "data before start"))?;
                let stdin = data["input"]["stdin"].as_str().unwrap_or_default();
                let bytes = connect::decode_bytes(stdin)?;
                let input = t.conn.client.exec_input(p.exec_id);
                input.write_stdin(&bytes).map_err(agent_error)?;
            }
        }
    }
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    let _ = tx.send(connect::message(&json!({}))).await;
    let _ = tx.send(connect::end(None)).await;
    Ok(connect::stream(rx))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn requests_read_as_the_sdks_send_them() {
        let r: StartReq =
            serde_json::from_str(r#"{"process":{"cmd":"/bin/bash","args":["-l","-c","echo hello"]},"stdin":false}"#)
                .unwrap();
        assert_eq!((r.process.cmd.as_str(), r.process.args.len(), r.stdin), ("/bin/bash", 3, Some(false)));
        assert_eq!(signal_number(&json!("SIGNAL_SIGKILL")).unwrap(), 9);
        assert_eq!(signal_number(&json!(15)).unwrap(), 15);
        assert!(signal_number(&json!("SIGNAL_SIGHUP")).is_err());
        let e = end_json(&ProcEnd {
            exit_code: 3,
            exited: true,
            status: "exit status 3".into(),
            error: Some("exit status 3".into()),
            timed_out: false,
        });
        assert_eq!(e, json!({"exitCode": 3, "exited": true, "status": "exit status 3", "error": "exit status 3"}));
    }
}
