//! `GET /files` (download) and `POST /files` (upload: multipart, or a raw body that may be
//! gzipped), streamed through the agent's file reads and atomic writes. Parent directories
//! are made, as envd does. Errors are E2B's `{code, message}` with the HTTP status.

use std::io::Read;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{FromRequest, Multipart, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use bytes::Bytes;
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::json;
use sha2::Digest;
use smolvm_protocol::agent::{EntryKind, FsRequest};

use super::connect::{Code, RpcError};
use super::filesystem::fs;
use super::{target, Target};
use crate::app::App;

#[derive(Debug, Deserialize, Default)]
#[serde(default)]
pub struct FileQuery {
    path: Option<String>,
    username: Option<String>,
    signature: Option<String>,
    signature_expiration: Option<i64>,
}

/// An error of the `/files` routes: E2B's shape, `code` = the status.
fn error(status: StatusCode, message: impl Into<String>) -> Response {
    let body = json!({"code": status.as_u16(), "message": message.into()});
    (status, [(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
}

fn rpc_to_http(e: RpcError) -> Response {
    let status = match e.code {
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::InvalidArgument | Code::AlreadyExists => StatusCode::BAD_REQUEST,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::Unavailable => StatusCode::BAD_GATEWAY,
        // From the guest's errno (a full disk, a quota): E2B's answer for a full disk.
        Code::ResourceExhausted => StatusCode::INSUFFICIENT_STORAGE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    error(status, e.message)
}

/// A signed URL's check: `v1_` + unpadded base64 of SHA-256 over
/// `path:operation:user:token[:expiration]`, unexpired.
fn signature_ok(app: &App, id: &str, q: &FileQuery, op: &str) -> bool {
    let (Some(sig), Some(path)) = (&q.signature, &q.path) else { return false };
    if q.signature_expiration.is_some_and(|exp| exp < smolvm::timefmt::now_secs()) {
        return false;
    }
    let token = app.sandbox_token(id);
    let user = q.username.as_deref().unwrap_or_default();
    let mut text = format!("{path}:{op}:{user}:{token}");
    if let Some(exp) = q.signature_expiration {
        text.push_str(&format!(":{exp}"));
    }
    let want = format!("v1_{}", base64::engine::general_purpose::STANDARD_NO_PAD.encode(sha2::Sha256::digest(text)));
    subtle::ConstantTimeEq::ct_eq(want.as_bytes(), sig.as_bytes()).into()
}

async fn file_target(app: &Arc<App>, headers: &HeaderMap, q: &FileQuery, op: &str) -> Result<Target, Response> {
    target(app, headers, q.username.as_deref(), |id| signature_ok(app, id, q, op)).await
}

pub async fn download(State(app): State<Arc<App>>, Query(q): Query<FileQuery>, headers: HeaderMap) -> Response {
    let t = match file_target(&app, &headers, &q, "read").await {
        Ok(t) => t,
        Err(r) => return r,
    };
    let Some(p) = q.path.as_deref() else {
        return error(StatusCode::BAD_REQUEST, "the path query parameter is missing");
    };
    let path = t.path(p);
    match fs(&t, FsRequest::Stat { path: path.clone() }).await {
        Ok(r) if r.entries.first().is_some_and(|e| e.kind == EntryKind::Dir) => {
            return error(StatusCode::BAD_REQUEST, format!("{path} is a directory"))
        }
        // A device or a FIFO never ends, or never starts: refused before a byte is streamed
        // (the guest's agent refuses it too, behind a link).
        Ok(r) if r.entries.first().is_some_and(|e| e.kind == EntryKind::Other) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("{path} is not a regular file (a device, FIFO or socket is not read)"),
            )
        }
        Ok(_) => {}
        Err(e) => return rpc_to_http(e),
    }
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(16);
    let conn = t.conn.clone();
    let p2 = path.clone();
    tokio::task::spawn_blocking(move || {
        let mut sink = ChanWriter(tx.clone());
        if let Err(e) = conn.client.read_file(&p2, &mut sink) {
            let _ = tx.blocking_send(Err(std::io::Error::other(e.to_string())));
        }
    });
    let body = Body::from_stream(futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx)));
    let name = path.rsplit('/').next().unwrap_or_default().replace('"', "");
    (
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (header::CONTENT_DISPOSITION, format!("inline; filename=\"{name}\"")),
        ],
        body,
    )
        .into_response()
}

/// A `Write` that hands each chunk to the response body.
struct ChanWriter(tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>);

impl std::io::Write for ChanWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .blocking_send(Ok(Bytes::copy_from_slice(buf)))
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the client went away"))?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A `Read` over chunks an async task feeds (the request body, as it arrives).
struct ChanReader {
    rx: tokio::sync::mpsc::Receiver<Result<Bytes, String>>,
    cur: Bytes,
}

impl Read for ChanReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.cur.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(b)) => self.cur = b,
                Some(Err(e)) => return Err(std::io::Error::other(e)),
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.cur.len());
        buf[..n].copy_from_slice(&self.cur[..n]);
        let _ = self.cur.split_to(n);
        Ok(n)
    }
}

/// Writes one file from a stream of chunks: parents made, then an atomic write.
async fn write_one(
    t: &Target,
    path: String,
    gzip: bool,
    mut chunks: impl futures_util::Stream<Item = Result<Bytes, String>> + Unpin,
) -> Result<serde_json::Value, Response> {
    if let Some((parent, _)) = path.rsplit_once('/').filter(|(p, _)| !p.is_empty()) {
        match fs(t, FsRequest::MakeDir { path: parent.to_string() }).await {
            Ok(_) => {}
            Err(e) if e.code == Code::AlreadyExists => {}
            Err(e) => return Err(rpc_to_http(e)),
        }
    }
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let conn = t.conn.clone();
    let p2 = path.clone();
    let writer = tokio::task::spawn_blocking(move || {
        let reader = ChanReader { rx, cur: Bytes::new() };
        let mut reader: Box<dyn Read> =
            if gzip { Box::new(flate2::read::GzDecoder::new(reader)) } else { Box::new(reader) };
        conn.client.write_file(&p2, &mut reader, 0o644, 0, 0)
    });
    while let Some(c) = chunks.next().await {
        let failed = c.is_err();
        if tx.send(c).await.is_err() || failed {
            break;
        }
    }
    drop(tx);
    match writer.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            let rpc = super::agent_error(e);
            return Err(rpc_to_http(RpcError::new(rpc.code, format!("write {path}: {}", rpc.message))));
        }
        Err(e) => return Err(error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())),
    }
    let name = path.rsplit('/').next().unwrap_or_default().to_string();
    Ok(json!({"path": path, "name": name, "type": "file"}))
}

pub async fn upload(State(app): State<Arc<App>>, Query(q): Query<FileQuery>, req: Request) -> Response {
    let headers = req.headers().clone();
    let t = match file_target(&app, &headers, &q, "write").await {
        Ok(t) => t,
        Err(r) => return r,
    };
    let ctype = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    let mut written = Vec::new();
    if ctype.starts_with("multipart/form-data") {
        let mut mp = match Multipart::from_request(req, &app).await {
            Ok(m) => m,
            Err(e) => return error(StatusCode::BAD_REQUEST, format!("a malformed multipart body: {e}")),
        };
        loop {
            let field = match mp.next_field().await {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => return error(StatusCode::BAD_REQUEST, format!("a malformed multipart body: {e}")),
            };
            if field.name() != Some("file") {
                continue;
            }
            // One file: the query's path. Several: each part's file name is its full path.
            let path = match (q.path.as_deref(), field.file_name()) {
                (Some(p), _) => t.path(p),
                (None, Some(f)) if !f.is_empty() => t.path(f),
                _ => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        "a file part without a path (no path parameter, no file name)",
                    )
                }
            };
            let chunks = field.map(|c| c.map_err(|e| e.to_string()));
            match write_one(&t, path, false, Box::pin(chunks)).await {
                Ok(v) => written.push(v),
                Err(r) => return r,
            }
        }
    } else {
        let Some(p) = q.path.as_deref() else {
            return error(StatusCode::BAD_REQUEST, "a raw upload needs the path query parameter");
        };
        let gzip =
            headers.get(header::CONTENT_ENCODING).and_then(|v| v.to_str().ok()).is_some_and(|v| v.contains("gzip"));
        let chunks = req.into_body().into_data_stream().map(|c| c.map_err(|e| e.to_string()));
        match write_one(&t, t.path(p), gzip, Box::pin(chunks)).await {
            Ok(v) => written.push(v),
            Err(r) => return r,
        }
    }
    if written.is_empty() {
        return error(StatusCode::BAD_REQUEST, "no file in the request (a multipart part named \"file\")");
    }
    axum::Json(written).into_response()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_reader_joins_chunks_and_ends() {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.try_send(Ok(Bytes::from_static(b"ab"))).unwrap();
        tx.try_send(Ok(Bytes::from_static(b"cde"))).unwrap();
        drop(tx);
        let mut s = String::new();
        ChanReader { rx, cur: Bytes::new() }.read_to_string(&mut s).unwrap();
        assert_eq!(s, "abcde");
    }
}
