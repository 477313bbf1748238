//! The operators' surfaces: the control API on a root-only unix socket (protocol, server,
//! client, the status table) and the Prometheus metrics endpoint.
//!
//! Routes:
//! - `GET  /v1/status`: the daemon's [`Status`] as JSON.
//! - `POST /v1/services/{service}/backends/{backend}/{drain|disable|enable}`
//! - `POST /v1/reload`
//! - `POST /v1/ha/role/{active|standby|fault}` (keepalived's notify script, through `balancer ha notify`)
//! - `POST /v1/bgp/{withdraw|announce}` (with `[bgp]`; answered once BIRD took the change)
//!
//! Successful operations answer `{"ok": true, "message": "..."}`; every failure answers
//! `{"error": "..."}` with 400 (a bad request or one the daemon refused), 403 (peer not root),
//! 404 (no such route), 405 (wrong method), 409 (reload refused: the running config keeps
//! serving), 503 (daemon gone) or 504 (daemon did not answer in time).
//!
//! The API only ever asks the daemon through its channel: it owns no state.

pub mod audit;
pub mod client;
pub mod console;
pub mod metrics;
pub mod protocol;
pub mod server;
pub mod table;
#[cfg(test)]
pub(crate) mod tests;

use std::{net::SocketAddr, path::PathBuf, time::Duration};

/// What failed in the operators' surfaces: the client's call, or the socket's or the
/// metrics endpoint's set-up. The cause, when there is one, is the error's source; the CLI
/// prints the whole chain (`balancer: <error>: <cause>`).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The daemon did not answer within the client's limit.
    #[error("no answer from the control socket {} within {after:?}", socket.display())]
    Timeout {
        /// The control socket.
        socket: PathBuf,
        /// The limit.
        after: Duration,
    },
    /// No control socket at the path (`ENOENT`: the daemon is not running, or elsewhere).
    #[error("is balancer running? no control socket at {}", socket.display())]
    NoSocket {
        /// The control socket.
        socket: PathBuf,
    },
    /// The socket exists but nobody accepts on it (`ECONNREFUSED`: a stale socket).
    #[error("is balancer running? the control socket {} refuses connections", socket.display())]
    SocketRefused {
        /// The control socket.
        socket: PathBuf,
    },
    /// The caller may not connect (`EACCES`): the socket is root only.
    #[error("permission denied on {}: the control socket is root only", socket.display())]
    PermissionDenied {
        /// The control socket.
        socket: PathBuf,
    },
    /// Any other failure to connect.
    #[error("connecting to {}", socket.display())]
    Connect {
        /// The control socket.
        socket: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The HTTP handshake on the socket failed.
    #[error("control socket handshake")]
    Handshake(#[source] hyper::Error),
    /// The request could not be built (a URI that is not one).
    #[error("building the request")]
    BuildRequest(#[source] http::Error),
    /// The request could not be sent.
    #[error("sending the request")]
    SendRequest(#[source] hyper::Error),
    /// The reply could not be read (or was larger than the client's limit).
    #[error("reading the reply")]
    ReadReply(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The reply's body is not JSON.
    #[error("the control socket answered {status} with a body that is not JSON")]
    NotJson {
        /// The reply's status.
        status: http::StatusCode,
        /// The parser's error.
        #[source]
        source: serde_json::Error,
    },
    /// The daemon refused: its `error` message.
    #[error("{0}")]
    Refused(String),
    /// A failure status without an `error` message.
    #[error("the control socket answered {0}")]
    Status(http::StatusCode),
    /// The daemon's status does not have the shape of [`Status`].
    #[error("the daemon's status has an unexpected shape")]
    StatusShape(#[source] serde_json::Error),
    /// The status could not be printed as JSON.
    #[error("formatting the status as JSON")]
    FormatJson(#[source] serde_json::Error),
    /// The CLI's runtime could not be started.
    #[error("starting the runtime")]
    Runtime(#[source] std::io::Error),
    /// The control socket could not be accepted on any more.
    #[error("control socket accept")]
    Accept(#[source] std::io::Error),
    /// The socket's directory could not be created.
    #[error("creating {}", path.display())]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Another daemon answers on the socket.
    #[error("{} is in use: is another balancer running?", path.display())]
    InUse {
        /// The control socket.
        path: PathBuf,
    },
    /// Something else than a socket is at the path.
    #[error("{} exists and is not a socket; refusing to replace it", path.display())]
    NotASocket {
        /// The path.
        path: PathBuf,
    },
    /// A stale socket could not be removed.
    #[error("removing stale {}", path.display())]
    RemoveStale {
        /// The control socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The path could not be inspected (`lstat`, `stat`).
    #[error("inspecting {}", path.display())]
    Inspect {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The socket could not be bound.
    #[error("binding {}", path.display())]
    Bind {
        /// The control socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The socket's mode could not be set to 0600.
    #[error("chmod 0600 {}", path.display())]
    Chmod {
        /// The control socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The socket could not be given to root.
    #[error("chown root {}", path.display())]
    Chown {
        /// The control socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The metrics listener could not be bound.
    #[error("binding metrics on {addr}")]
    BindMetrics {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// An API result.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// `error: cause: cause…`: an error and its chain of sources on one line.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        out.push_str(": ");
        out.push_str(&s.to_string());
        src = s.source();
    }
    out
}

pub use client::{Command, backend_uri, call, cli, command, percent_decode, percent_encode};
pub use protocol::{AskError, DAEMON_TIMEOUT, Message, Request, Status, ask};
pub use server::serve;
pub use table::status_table;
