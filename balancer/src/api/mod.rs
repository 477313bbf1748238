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

pub use client::{Command, backend_uri, call, cli, command, percent_decode, percent_encode};
pub use protocol::{AskError, DAEMON_TIMEOUT, Message, Request, Status, ask};
pub use server::serve;
pub use table::status_table;
