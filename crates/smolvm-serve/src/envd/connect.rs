//! The Connect protocol as the E2B SDKs speak it to envd: JSON codec only, unary calls as a
//! plain JSON body, server streams as a sequence of 5-byte-prefixed envelopes closed by an
//! end-of-stream envelope (flag 0x02) that carries the error, if any.

use axum::body::Body;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::{BufMut, Bytes, BytesMut};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::json;

pub const STREAM_CONTENT_TYPE: &str = "application/connect+json";
/// A flag of an envelope: the stream's last, carrying its end (and error).
const END_STREAM: u8 = 0x02;
const COMPRESSED: u8 = 0x01;

/// Connect's error codes, with the HTTP status a unary error is sent with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    InvalidArgument,
    Unauthenticated,
    PermissionDenied,
    NotFound,
    AlreadyExists,
    DeadlineExceeded,
    Unimplemented,
    Unavailable,
    Internal,
    ResourceExhausted,
}

impl Code {
    pub fn name(self) -> &'static str {
        match self {
            Code::InvalidArgument => "invalid_argument",
            Code::Unauthenticated => "unauthenticated",
            Code::PermissionDenied => "permission_denied",
            Code::NotFound => "not_found",
            Code::AlreadyExists => "already_exists",
            Code::DeadlineExceeded => "deadline_exceeded",
            Code::Unimplemented => "unimplemented",
            Code::Unavailable => "unavailable",
            Code::Internal => "internal",
            Code::ResourceExhausted => "resource_exhausted",
        }
    }

    pub fn status(self) -> StatusCode {
        match self {
            Code::InvalidArgument => StatusCode::BAD_REQUEST,
            Code::Unauthenticated => StatusCode::UNAUTHORIZED,
            Code::PermissionDenied => StatusCode::FORBIDDEN,
            Code::NotFound => StatusCode::NOT_FOUND,
            Code::AlreadyExists => StatusCode::CONFLICT,
            Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
            Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
            Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Code::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        }
    }
}

/// An RPC's failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RpcError {
    pub code: Code,
    pub message: String,
}

impl RpcError {
    pub fn new(code: Code, message: impl Into<String>) -> RpcError {
        RpcError { code, message: message.into() }
    }

    fn json(&self) -> serde_json::Value {
        json!({"code": self.code.name(), "message": self.message})
    }
}

impl IntoResponse for RpcError {
    /// The unary form: the status, and the error as the JSON body.
    fn into_response(self) -> Response {
        (self.code.status(), [(header::CONTENT_TYPE, "application/json")], self.json().to_string()).into_response()
    }
}

/// One envelope.
pub fn envelope(flags: u8, json: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(5 + json.len());
    b.put_u8(flags);
    b.put_u32(json.len() as u32);
    b.put_slice(json);
    b.freeze()
}

/// A message envelope of `msg`.
pub fn message<T: Serialize>(msg: &T) -> Bytes {
    envelope(0, &serde_json::to_vec(msg).unwrap_or_default())
}

/// The end-of-stream envelope: `{}`, or the error.
pub fn end(error: Option<&RpcError>) -> Bytes {
    let body = match error {
        None => json!({}),
        Some(e) => json!({"error": e.json()}),
    };
    envelope(END_STREAM, body.to_string().as_bytes())
}

/// Splits complete envelopes off the front of `buf`: (flags, payload) each.
pub fn take_envelopes(buf: &mut BytesMut) -> Result<Vec<(u8, Bytes)>, RpcError> {
    let mut out = Vec::new();
    while buf.len() >= 5 {
        let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
        if len > 64 << 20 {
            return Err(RpcError::new(Code::InvalidArgument, format!("an envelope of {len} bytes is too large")));
        }
        if buf.len() < 5 + len {
            break;
        }
        let flags = buf[0];
        if flags & COMPRESSED != 0 {
            return Err(RpcError::new(Code::Unimplemented, "compressed messages are not supported (send identity)"));
        }
        let mut frame = buf.split_to(5 + len);
        out.push((flags, frame.split_off(5).freeze()));
    }
    Ok(out)
}

/// Whether a request is in the streaming form (enveloped), by its content type.
pub fn is_stream(headers: &HeaderMap) -> bool {
    headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|v| v.starts_with(STREAM_CONTENT_TYPE))
}

/// Decodes a request message: the body itself (unary) or its first envelope (a server-stream
/// call's single request message).
pub fn request<T: DeserializeOwned>(headers: &HeaderMap, body: &Bytes) -> Result<T, RpcError> {
    let json: Bytes = if is_stream(headers) {
        let mut buf = BytesMut::from(&body[..]);
        let mut env = take_envelopes(&mut buf)?;
        if env.is_empty() {
            return Err(RpcError::new(Code::InvalidArgument, "the request holds no complete message envelope"));
        }
        env.remove(0).1
    } else {
        body.clone()
    };
    let json: &[u8] = if json.is_empty() { b"{}" } else { &json };
    serde_json::from_slice(json).map_err(|e| RpcError::new(Code::InvalidArgument, format!("a malformed request: {e}")))
}

/// A unary success.
pub fn unary<T: Serialize>(msg: &T) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], serde_json::to_vec(msg).unwrap_or_default()).into_response()
}

/// A streaming response whose envelopes come from `rx` (the sender ends it with [`end`]).
pub fn stream(rx: tokio::sync::mpsc::Receiver<Bytes>) -> Response {
    let body = Body::from_stream(futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, std::io::Error>(b), rx))
    }));
    ([(header::CONTENT_TYPE, STREAM_CONTENT_TYPE)], body).into_response()
}

/// A streaming response that fails at once (errors of server streams travel in the body).
pub fn stream_error(e: &RpcError) -> Response {
    ([(header::CONTENT_TYPE, STREAM_CONTENT_TYPE)], end(Some(e))).into_response()
}

/// `Connect-Timeout-Ms`, read leniently (old SDKs sent `1500.0`).
pub fn timeout(headers: &HeaderMap) -> Option<std::time::Duration> {
    let v = headers.get("connect-timeout-ms")?.to_str().ok()?;
    let ms: f64 = v.trim().parse().ok()?;
    (ms.is_finite() && ms > 0.0).then(|| std::time::Duration::from_millis(ms as u64))
}

/// proto3 JSON `bytes`: standard base64 (with or without padding, or URL-safe).
pub fn decode_bytes(s: &str) -> Result<Vec<u8>, RpcError> {
    use base64::Engine;
    let e = base64::engine::general_purpose::STANDARD.decode(s);
    e.or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(s))
        .or_else(|_| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(s.trim_end_matches('=')))
        .map_err(|e| RpcError::new(Code::InvalidArgument, format!("bytes that are not base64: {e}")))
}

pub fn encode_bytes(b: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(b)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn envelopes_split_whole_and_wait_for_the_rest() {
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&envelope(0, b"{\"a\":1}"));
        let second = end(None);
        buf.extend_from_slice(&second[..3]);
        let got = take_envelopes(&mut buf).unwrap();
        assert_eq!(got, vec![(0, Bytes::from_static(b"{\"a\":1}"))]);
        assert_eq!(buf.len(), 3);
        buf.extend_from_slice(&second[3..]);
        assert_eq!(take_envelopes(&mut buf).unwrap(), vec![(2, Bytes::from_static(b"{}"))]);
        let mut bad = BytesMut::from(&envelope(1, b"x")[..]);
        assert_eq!(take_envelopes(&mut bad).unwrap_err().code, Code::Unimplemented);
    }

    #[test]
    fn timeouts_read_leniently() {
        let mut h = HeaderMap::new();
        h.insert("connect-timeout-ms", "1500.0".parse().unwrap());
        assert_eq!(timeout(&h), Some(std::time::Duration::from_millis(1500)));
        h.insert("connect-timeout-ms", "0".parse().unwrap());
        assert_eq!(timeout(&h), None);
    }
}
