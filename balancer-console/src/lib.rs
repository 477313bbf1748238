//! Web console of the balancer: HTTPS on a management address, local users with roles, status
//! pages with live refresh and charts, confirmed operator actions, and an audit trail.
//!
//! The console reads the controller through [`ConsoleSource`] (a status snapshot and actions);
//! the daemon implements it, tests use a fake. Nothing here touches the dataplane.

pub mod auth;
pub mod config;
pub mod events;
pub mod history;
mod pages;
mod server;
pub mod source;
pub mod tls;
pub mod users;

pub use config::ConsoleConfig;
pub use events::{EventKind, EventLog, audit, failover, health_change};
pub use server::{CSP, ConsoleError, Running, start};
pub use source::{
    Action, AdminState, BackendView, CertFile, ConsoleSource, DataplaneState, Health, L7View,
    ListenerView, PoolMemberView, PoolView, RouteView, ServiceView, SourceError, StatusSnapshot,
    Traffic,
};
pub use users::{Role, Users};
