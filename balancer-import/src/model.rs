//! What an importer produces: the balancer's objects, product-neutral, each with a comment
//! naming its source. [`crate::emit`] turns a [`Plan`] into TOML.

use std::{
    net::{Ipv4Addr, SocketAddr},
    time::Duration,
};

/// Everything to write.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    /// `[dataplane] snat_ipv4`, when the source names one SNAT address.
    pub snat_ipv4: Option<Ipv4Addr>,
    /// Layer-4 services.
    pub services: Vec<Service>,
    /// TLS-terminating listeners.
    pub listeners: Vec<Listener>,
    /// Plain-HTTP listeners that redirect to HTTPS.
    pub redirects: Vec<Redirect>,
    /// Host/path routes.
    pub routes: Vec<Route>,
    /// L7 pools.
    pub pools: Vec<Pool>,
}

/// `tcp` or `udp`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Protocol {
    /// TCP.
    #[default]
    Tcp,
    /// UDP.
    Udp,
}

/// L4 scheduler.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Scheduler {
    /// Weighted Maglev.
    #[default]
    Maglev,
    /// One active backend by priority.
    Failover,
}

/// Operator state of an L4 backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum State {
    /// In service.
    #[default]
    Up,
    /// No new flows.
    Drain,
    /// Out of service.
    Disabled,
}

/// A `[[service]]`.
#[derive(Debug, Clone)]
pub struct Service {
    /// Unique name.
    pub name: String,
    /// Where it came from, for the comment above it.
    pub source: String,
    /// VIP and port.
    pub vip: SocketAddr,
    /// Protocol.
    pub protocol: Protocol,
    /// Scheduler.
    pub scheduler: Scheduler,
    /// Failover only: a recovered preferred backend takes the traffic back.
    pub failback: bool,
    /// Health check.
    pub health: Option<Check>,
    /// Backends, in order.
    pub backends: Vec<Backend>,
}

/// An L4 backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    /// Address and port.
    pub address: SocketAddr,
    /// Maglev weight.
    pub weight: u32,
    /// Failover priority (lower first).
    pub priority: Option<u32>,
    /// Operator state.
    pub state: State,
}

/// A health check, in the balancer's terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    /// What to check.
    pub kind: CheckKind,
    /// Time between checks.
    pub interval: Duration,
    /// Bound on one check; below `interval`.
    pub timeout: Duration,
    /// Successes to go up.
    pub rise: u32,
    /// Failures to go down.
    pub fall: u32,
    /// Port to check instead of the backend's.
    pub port: Option<u16>,
}

/// Kind of check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckKind {
    /// TCP connect.
    Tcp,
    /// HTTP GET.
    Http(HttpCheck),
    /// HTTPS GET, verified against a CA file.
    Https(HttpCheck),
    /// HL7 over MLLP with the balancer's MSH-only ping.
    Mllp,
}

/// The HTTP part of an `http` or `https` check.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HttpCheck {
    /// Request path.
    pub path: String,
    /// Accepted status codes.
    pub expect_status: Vec<u16>,
    /// Text the body must contain.
    pub body_contains: Option<String>,
    /// Host header.
    pub host: Option<String>,
}

/// Where the importers point `ca_file`/`ca` of TLS checks and pools: the products do not
/// verify backend certificates, the balancer does, so the operator puts the farm's CA here.
pub const BACKEND_CA: &str = "/etc/balancer/tls/backend-ca.pem";

/// Directory the imported certificate and key paths point into.
pub const TLS_DIR: &str = "/etc/balancer/tls";

/// A `[[l7.listener]]`.
#[derive(Debug, Clone)]
pub struct Listener {
    /// Unique name.
    pub name: String,
    /// Source, for the comment.
    pub source: String,
    /// Address and port.
    pub address: SocketAddr,
    /// Certificates, the first is the default.
    pub certificates: Vec<Certificate>,
}

/// A certificate and key, as file paths.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Certificate {
    /// PEM chain.
    pub cert: String,
    /// PEM key.
    pub key: String,
    /// SNI names.
    pub server_names: Vec<String>,
}

/// A `[[l7.redirect]]`.
#[derive(Debug, Clone)]
pub struct Redirect {
    /// Source, for the comment.
    pub source: String,
    /// Address and port.
    pub address: SocketAddr,
    /// HTTPS port in the `Location`.
    pub https_port: u16,
}

/// A `[[l7.route]]`.
#[derive(Debug, Clone)]
pub struct Route {
    /// Unique name.
    pub name: String,
    /// Source, for the comment.
    pub source: String,
    /// Host to match.
    pub host: Option<String>,
    /// Path prefix.
    pub path_prefix: String,
    /// Listeners it applies to (empty: all).
    pub listeners: Vec<String>,
    /// Pool name.
    pub pool: String,
}

/// L7 backend selection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Selection {
    /// Weighted round-robin.
    #[default]
    RoundRobin,
    /// Fewest requests in flight.
    LeastOutstanding,
}

/// L7 stickiness.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Sticky {
    /// None.
    #[default]
    None,
    /// A cookie set by the balancer; `Some(name)` keeps the product's cookie name.
    Cookie(Option<String>),
    /// By client address.
    Source,
}

/// A `[[l7.pool]]`.
#[derive(Debug, Clone)]
pub struct Pool {
    /// Unique name.
    pub name: String,
    /// Source, for the comment.
    pub source: String,
    /// TLS to the backends.
    pub https: bool,
    /// Selection.
    pub selection: Selection,
    /// Stickiness.
    pub sticky: Sticky,
    /// Health check.
    pub health: Option<Check>,
    /// Backends: address and weight.
    pub backends: Vec<(SocketAddr, u32)>,
}
