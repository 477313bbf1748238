//! The control API's client: the CLI's calls over the unix socket.

use std::{fmt::Write as _, io::ErrorKind, path::Path, time::Duration};

use bytes::Bytes;
use http::{Method, Request as HttpRequest, header};
use http_body_util::{BodyExt as _, Empty, Limited};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::UnixStream;

use crate::api::Error;
use crate::api::protocol::Status;
use crate::api::table::status_table;
use crate::control::operator::{BgpVerb, Verb};

/// The client's limit for one call (daemon timeout plus slack).
const CLIENT_TIMEOUT: Duration = Duration::from_secs(40);
/// Largest reply the client reads.
const MAX_REPLY_BYTES: usize = 64 << 20;

/// Percent-encodes one path segment (everything but RFC 3986 unreserved characters).
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// Decodes one percent-encoded path segment; `None` on a bad escape or non-UTF-8 result.
pub fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The URI of an operator action on a backend.
pub fn backend_uri(service: &str, backend: &str, verb: Verb) -> String {
    format!(
        "/v1/services/{}/backends/{}/{}",
        percent_encode(service),
        percent_encode(backend),
        verb.name()
    )
}

/// Calls the control API on `path`: the reply's JSON on success, the daemon's `error`
/// message as the error otherwise.
pub async fn call(path: &Path, method: Method, uri: &str) -> crate::api::Result<Value> {
    tokio::time::timeout(CLIENT_TIMEOUT, call_inner(path, method, uri))
        .await
        .map_err(|_| Error::Timeout {
            socket: path.to_path_buf(),
            after: CLIENT_TIMEOUT,
        })?
}

async fn call_inner(path: &Path, method: Method, uri: &str) -> crate::api::Result<Value> {
    let stream = UnixStream::connect(path).await.map_err(|e| {
        let socket = path.to_path_buf();
        match e.kind() {
            ErrorKind::NotFound => Error::NoSocket { socket },
            ErrorKind::ConnectionRefused => Error::SocketRefused { socket },
            ErrorKind::PermissionDenied => Error::PermissionDenied { socket },
            _ => Error::Connect { socket, source: e },
        }
    })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(Error::Handshake)?;
    let conn = tokio::spawn(conn);
    let req = HttpRequest::builder()
        .method(method)
        .uri(uri)
        .header(header::HOST, "balancer")
        .header(header::ACCEPT, "application/json")
        .body(Empty::<Bytes>::new())
        .map_err(Error::BuildRequest)?;
    let resp = sender.send_request(req).await.map_err(Error::SendRequest)?;
    let status = resp.status();
    let body = Limited::new(resp.into_body(), MAX_REPLY_BYTES)
        .collect()
        .await
        .map_err(Error::ReadReply)?
        .to_bytes();
    conn.abort();
    let value: Value =
        serde_json::from_slice(&body).map_err(|source| Error::NotJson { status, source })?;
    if status.is_success() {
        Ok(value)
    } else {
        match value.get("error").and_then(Value::as_str) {
            Some(e) => Err(Error::Refused(e.to_string())),
            None => Err(Error::Status(status)),
        }
    }
}

/// A CLI verb spoken over the control socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// `balancer status [--json]`.
    Status {
        /// Print the API's JSON instead of the table.
        json: bool,
    },
    /// `balancer drain|disable|enable SVC BACKEND`.
    Backend {
        /// What to do.
        verb: Verb,
        /// Service name.
        service: String,
        /// Backend address or IP.
        backend: String,
    },
    /// `balancer reload`.
    Reload,
    /// `balancer ha notify …` (keepalived's notify script).
    HaRole(crate::control::ha::Role),
    /// `balancer bgp withdraw|announce`.
    Bgp {
        /// What to do.
        verb: BgpVerb,
    },
}

impl Command {
    /// The method and URI of the verb.
    pub fn request(&self) -> (Method, String) {
        match self {
            Command::Status { .. } => (Method::GET, "/v1/status".into()),
            Command::Backend {
                verb,
                service,
                backend,
            } => (Method::POST, backend_uri(service, backend, *verb)),
            Command::Reload => (Method::POST, "/v1/reload".into()),
            Command::HaRole(role) => (Method::POST, format!("/v1/ha/role/{}", role.name())),
            Command::Bgp { verb } => (Method::POST, format!("/v1/bgp/{}", verb.name())),
        }
    }
}

/// Runs a verb against the daemon and returns what to print: the status table (or JSON),
/// or the daemon's message. The error is the daemon's refusal, or why it could not be asked.
pub async fn command(socket: &Path, cmd: &Command) -> crate::api::Result<String> {
    let (method, uri) = cmd.request();
    let v = call(socket, method, &uri).await?;
    Ok(match cmd {
        Command::Status { json: true } => format!(
            "{}\n",
            serde_json::to_string_pretty(&v).map_err(Error::FormatJson)?
        ),
        Command::Status { json: false } => {
            let s: Status = serde_json::from_value(v).map_err(Error::StatusShape)?;
            status_table(&s)
        }
        _ => match v.get("message").and_then(Value::as_str) {
            Some(m) => format!("{m}\n"),
            None => format!("{v}\n"),
        },
    })
}

/// The CLI's entry for a verb: prints the result on stdout, or `balancer: <error>` on stderr,
/// and returns the process exit code (0 or 1).
pub fn cli(socket: &Path, cmd: &Command) -> i32 {
    let out = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(Error::Runtime)
        .and_then(|rt| rt.block_on(command(socket, cmd)));
    match out {
        Ok(text) => {
            print!("{text}");
            0
        }
        Err(e) => {
            eprintln!("balancer: {}", crate::api::chain(&e));
            1
        }
    }
}
