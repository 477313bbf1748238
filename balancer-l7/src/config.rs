//! The `[l7]` section of the controller's TOML file.
//!
//! Every key is documented in `balancer-l7/README.md`; keep both in step.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// Layer-7 configuration: TLS listeners, plain-HTTP redirect listeners, routes and pools.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct L7Config {
    /// TLS-terminating listeners (`[[l7.listener]]`).
    #[serde(default, rename = "listener")]
    pub listeners: Vec<ListenerConfig>,
    /// Plain-HTTP listeners that answer every request with a redirect to HTTPS (`[[l7.redirect]]`).
    #[serde(default, rename = "redirect")]
    pub redirects: Vec<RedirectConfig>,
    /// Routes, host and/or path prefix to a pool (`[[l7.route]]`).
    #[serde(default, rename = "route")]
    pub routes: Vec<RouteConfig>,
    /// Pools of backends (`[[l7.pool]]`).
    #[serde(default, rename = "pool")]
    pub pools: Vec<PoolConfig>,
    /// How often certificate and key files are checked for changes; `"0s"` disables the watch.
    #[serde(default = "default_cert_watch", with = "humantime_serde")]
    pub cert_watch_interval: Duration,
    /// Threads of the proxy's own runtime (1 to 64; default 1): with 1 a single-threaded
    /// runtime, else a work-stealing one. The proxy never shares the controller's threads.
    /// Changes with a restart.
    #[serde(default = "default_threads")]
    pub threads: usize,
}

/// One TLS-terminating listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// Unique name, used by routes (`listeners = [...]`) and in metrics.
    pub name: String,
    /// Address and port to listen on, e.g. `"0.0.0.0:443"`.
    pub address: SocketAddr,
    /// Certificates, chosen by SNI. The first one is the default.
    #[serde(rename = "certificate")]
    pub certificates: Vec<CertificateConfig>,
    /// What a client whose SNI matches no certificate gets: `default` certificate or `reject`.
    #[serde(default)]
    pub unknown_sni: UnknownSni,
    /// Lowest TLS version accepted: `"1.2"` (default) or `"1.3"`. Older versions are never offered.
    #[serde(default)]
    pub min_tls_version: TlsVersion,
    /// ALPN protocols offered to clients, in preference order: `"h2"`, `"http/1.1"`.
    #[serde(default = "default_alpn")]
    pub alpn: Vec<String>,
    /// Largest request head (request line plus headers) accepted; larger gets 431.
    #[serde(default = "default_max_header_bytes")]
    pub max_header_bytes: usize,
    /// Largest request body accepted; larger gets 413.
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: u64,
    /// Client connections open at once on this listener; a connection past it is closed at
    /// accept (counted in `connections_refused`).
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// A write to the client that makes no progress for this long (a client that stops
    /// reading its response) closes the connection (counted in `client_write_timeouts`).
    #[serde(default = "default_client_write_timeout", with = "humantime_serde")]
    pub client_write_timeout: Duration,
    /// What becomes of a client's `X-Forwarded-For`: `append` the client address to it, or
    /// `replace` it (and drop the client's `Forwarded` and `X-Real-IP`).
    #[serde(default)]
    pub x_forwarded_for: ForwardedFor,
    /// Time a client has to send a complete request head; it also bounds an idle HTTP/1.1 keep-alive wait.
    #[serde(default = "default_client_header_timeout", with = "humantime_serde")]
    pub client_header_timeout: Duration,
    /// A connection with no request in flight and no byte moved for this long is closed.
    #[serde(default = "default_idle_timeout", with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Time a TLS handshake may take.
    #[serde(default = "default_handshake_timeout", with = "humantime_serde")]
    pub handshake_timeout: Duration,
}

/// Handling of the forwarding headers a client sends.
#[derive(Debug, Clone, Copy, Deserialize, Default, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ForwardedFor {
    /// Keep the client's `X-Forwarded-For` lines and append the client address (clients
    /// behind a trusted proxy).
    #[default]
    Append,
    /// `X-Forwarded-For` is the client address alone; `Forwarded` and `X-Real-IP` from the
    /// client are removed, so a backend cannot be fooled by a forged chain.
    Replace,
}

/// A certificate chain and its private key, PEM files.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateConfig {
    /// PEM file with the leaf certificate first, then intermediates.
    pub cert: PathBuf,
    /// PEM file with the private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// SNI names this certificate answers; `*.example.org` matches one label. Empty means
    /// it is only used as the default.
    #[serde(default)]
    pub server_names: Vec<String>,
}

/// Behaviour for a ClientHello whose SNI names no configured certificate (or has no SNI).
#[derive(Debug, Clone, Copy, Deserialize, Default, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum UnknownSni {
    /// Serve the listener's first certificate.
    #[default]
    Default,
    /// Fail the handshake.
    Reject,
}

/// Lowest TLS protocol version.
#[derive(Debug, Clone, Copy, Deserialize, Default, PartialEq, Eq)]
pub enum TlsVersion {
    /// TLS 1.2 and 1.3.
    #[default]
    #[serde(rename = "1.2")]
    Tls12,
    /// TLS 1.3 only.
    #[serde(rename = "1.3")]
    Tls13,
}

/// A plain-HTTP listener that redirects every request to HTTPS.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedirectConfig {
    /// Address and port to listen on, e.g. `"0.0.0.0:80"`.
    pub address: SocketAddr,
    /// HTTPS port put in the `Location`; 443 is left out of the URL.
    #[serde(default = "default_https_port")]
    pub https_port: u16,
    /// Redirect status: 301, 302, 307 or 308.
    #[serde(default = "default_redirect_status")]
    pub status: u16,
    /// Client connections open at once; a connection past it is closed at accept.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
}

/// A route: requests whose host and path match go to `pool`.
///
/// The most specific route wins: a route with a host before one without, then the longest
/// path prefix, then the first in the file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Unique name, used in metrics.
    pub name: String,
    /// Host to match (case-insensitive, port ignored); `*.example.org` matches one label. Unset matches any host.
    #[serde(default)]
    pub host: Option<String>,
    /// Path prefix to match, on `/` boundaries (`/ui` matches `/ui` and `/ui/x`, not `/uix`). Default `/`.
    #[serde(default = "default_path_prefix")]
    pub path_prefix: String,
    /// Listeners the route applies to; empty means all.
    #[serde(default)]
    pub listeners: Vec<String>,
    /// Pool that serves the route.
    pub pool: String,
    /// Put the request path (never the query string) in the access log. Off by default:
    /// paths such as `/Patient/12345` identify patients.
    #[serde(default)]
    pub log_path: bool,
}

/// A pool of backends.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    /// Unique name, used by routes, by `set_backend_health` and in metrics.
    pub name: String,
    /// `http` or `https` to the backends.
    #[serde(default)]
    pub scheme: Scheme,
    /// `http1` or `h2` to the backends (`h2` over `http` is prior-knowledge h2c).
    #[serde(default)]
    pub protocol: BackendProtocol,
    /// PEM file of the CA(s) that sign the backends' certificates; required for `https`.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// Name sent as SNI and checked in the backend's certificate, unless a backend sets its own.
    #[serde(default)]
    pub server_name: Option<String>,
    /// `round_robin` (weighted) or `least_outstanding`.
    #[serde(default)]
    pub selection: Selection,
    /// `none`, `cookie` or `source` stickiness.
    #[serde(default)]
    pub sticky: Sticky,
    /// Cookie name for `sticky = "cookie"`.
    #[serde(default = "default_sticky_cookie")]
    pub sticky_cookie: String,
    /// Health check of the pool's backends, the same table as everywhere else in the
    /// controller's file (`balancer_health::HealthSpec`). The controller runs it and feeds the
    /// results to [`crate::L7::set_backend_health`]; this crate does not probe by itself.
    #[serde(default)]
    pub health: Option<balancer_health::HealthSpec>,
    /// Time to open a TCP (and TLS) connection to a backend before trying the next one.
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Time from request sent to response head received; past it the client gets 504.
    #[serde(default = "default_response_timeout", with = "humantime_serde")]
    pub response_timeout: Duration,
    /// After a failed connect a backend is skipped for this long (unless nothing else is left).
    #[serde(default = "default_fail_cooldown", with = "humantime_serde")]
    pub fail_cooldown: Duration,
    /// Idle HTTP/1.1 connections kept per backend (default 256): a connection coming back to
    /// a full pool is closed, so this is sized for a backend's concurrency; idle ones go after
    /// `idle_timeout`.
    #[serde(default = "default_max_idle")]
    pub max_idle_per_backend: usize,
    /// An idle pooled backend connection older than this is closed.
    #[serde(default = "default_pool_idle_timeout", with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// The backends.
    #[serde(rename = "backend")]
    pub backends: Vec<BackendConfig>,
}

/// One backend server.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    /// IP address and port.
    pub address: SocketAddr,
    /// Relative share of requests; 0 drains (no new requests).
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// SNI and certificate name for this backend (overrides the pool's `server_name`).
    #[serde(default)]
    pub server_name: Option<String>,
}

/// Transport to backends.
#[derive(Debug, Clone, Copy, Deserialize, Default, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Scheme {
    /// Plain TCP.
    #[default]
    Http,
    /// TLS, verified against the pool's `ca`.
    Https,
}

/// HTTP version to backends.
#[derive(Debug, Clone, Copy, Deserialize, Default, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum BackendProtocol {
    /// HTTP/1.1, pooled keep-alive connections.
    #[default]
    Http1,
    /// HTTP/2, one multiplexed connection per backend.
    H2,
}

/// Backend selection algorithm.
#[derive(Debug, Clone, Copy, Deserialize, Default, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Selection {
    /// Weighted round-robin.
    #[default]
    RoundRobin,
    /// Fewest requests in flight relative to weight.
    LeastOutstanding,
}

/// Session stickiness.
#[derive(Debug, Clone, Copy, Deserialize, Default, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Sticky {
    /// None.
    #[default]
    None,
    /// A cookie set by the balancer names the backend (by an opaque hash, not its address).
    Cookie,
    /// The client's address picks the backend (rendezvous hash over the healthy backends).
    Source,
}

fn default_threads() -> usize {
    1
}
fn default_cert_watch() -> Duration {
    Duration::from_secs(10)
}
fn default_alpn() -> Vec<String> {
    vec!["h2".into(), "http/1.1".into()]
}
fn default_max_header_bytes() -> usize {
    16 * 1024
}
fn default_max_body_bytes() -> u64 {
    10 * 1024 * 1024
}
fn default_max_connections() -> usize {
    10_000
}
fn default_client_write_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_client_header_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_idle_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_handshake_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_https_port() -> u16 {
    443
}
fn default_redirect_status() -> u16 {
    301
}
fn default_path_prefix() -> String {
    "/".into()
}
fn default_sticky_cookie() -> String {
    "BALANCER_STICKY".into()
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(2)
}
fn default_response_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_fail_cooldown() -> Duration {
    Duration::from_secs(5)
}
fn default_max_idle() -> usize {
    256
}
fn default_pool_idle_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_weight() -> u32 {
    1
}

fn valid_host_pattern(h: &str) -> bool {
    let h = h.strip_prefix("*.").unwrap_or(h);
    !h.is_empty()
        && !h.contains('*')
        && h.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_')
}

impl L7Config {
    /// Checks cross-references and values; returns every problem found, each as one line.
    ///
    /// Files (certificates, keys, CAs) are read by [`crate::L7::start`] and
    /// [`crate::L7::reload`], not here.
    pub fn validate(&self) -> Result<(), Vec<String>> {
        let mut errs = Vec::new();
        if !(1..=64).contains(&self.threads) {
            errs.push(format!(
                "l7.threads: {} is not between 1 and 64",
                self.threads
            ));
        }
        let mut addrs = HashSet::new();
        let mut listener_names = HashSet::new();
        for (i, l) in self.listeners.iter().enumerate() {
            let at = format!("l7.listener[{i}] ({})", l.name);
            if l.name.is_empty() {
                errs.push(format!("{at}: name is empty"));
            }
            if !listener_names.insert(l.name.as_str()) {
                errs.push(format!("{at}: duplicate listener name"));
            }
            if l.address.port() != 0 && !addrs.insert(l.address) {
                errs.push(format!("{at}: address {} used twice", l.address));
            }
            if l.certificates.is_empty() {
                errs.push(format!("{at}: needs at least one [[certificate]]"));
            }
            for (j, c) in l.certificates.iter().enumerate() {
                for n in &c.server_names {
                    if !valid_host_pattern(n) {
                        errs.push(format!(
                            "{at}: certificate[{j}]: server name {n:?} is not a DNS name or *.wildcard"
                        ));
                    }
                }
            }
            if l.alpn.is_empty() {
                errs.push(format!("{at}: alpn is empty"));
            }
            for p in &l.alpn {
                if p != "h2" && p != "http/1.1" {
                    errs.push(format!(
                        "{at}: alpn {p:?} unsupported (use \"h2\" or \"http/1.1\")"
                    ));
                }
            }
            if l.max_header_bytes < 1024 {
                errs.push(format!("{at}: max_header_bytes must be at least 1024"));
            }
            if l.client_header_timeout.is_zero()
                || l.idle_timeout.is_zero()
                || l.client_write_timeout.is_zero()
            {
                errs.push(format!(
                    "{at}: client_header_timeout, idle_timeout and client_write_timeout must be > 0"
                ));
            }
            if l.max_connections == 0 {
                errs.push(format!("{at}: max_connections must be at least 1"));
            }
        }
        for (i, r) in self.redirects.iter().enumerate() {
            let at = format!("l7.redirect[{i}]");
            if r.address.port() != 0 && !addrs.insert(r.address) {
                errs.push(format!("{at}: address {} used twice", r.address));
            }
            if ![301, 302, 307, 308].contains(&r.status) {
                errs.push(format!("{at}: status must be 301, 302, 307 or 308"));
            }
            if r.max_connections == 0 {
                errs.push(format!("{at}: max_connections must be at least 1"));
            }
        }
        let mut pool_names = HashSet::new();
        for (i, p) in self.pools.iter().enumerate() {
            let at = format!("l7.pool[{i}] ({})", p.name);
            if p.name.is_empty() {
                errs.push(format!("{at}: name is empty"));
            }
            if !pool_names.insert(p.name.as_str()) {
                errs.push(format!("{at}: duplicate pool name"));
            }
            if p.backends.is_empty() {
                errs.push(format!("{at}: needs at least one [[backend]]"));
            }
            let mut seen = HashSet::new();
            for b in &p.backends {
                if !seen.insert(b.address) {
                    errs.push(format!("{at}: backend {} listed twice", b.address));
                }
            }
            if p.scheme == Scheme::Https && p.ca.is_none() {
                errs.push(format!(
                    "{at}: scheme = \"https\" needs ca = \"<pem file>\""
                ));
            }
            if p.scheme == Scheme::Http && p.ca.is_some() {
                errs.push(format!(
                    "{at}: ca is only meaningful with scheme = \"https\""
                ));
            }
            if p.connect_timeout.is_zero() || p.response_timeout.is_zero() {
                errs.push(format!(
                    "{at}: connect_timeout and response_timeout must be > 0"
                ));
            }
            if p.sticky == Sticky::Cookie
                && (p.sticky_cookie.is_empty()
                    || !p
                        .sticky_cookie
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'))
            {
                errs.push(format!("{at}: sticky_cookie must be [A-Za-z0-9_-]+"));
            }
        }
        let mut route_names = HashSet::new();
        for (i, r) in self.routes.iter().enumerate() {
            let at = format!("l7.route[{i}] ({})", r.name);
            if !route_names.insert(r.name.as_str()) {
                errs.push(format!("{at}: duplicate route name"));
            }
            if !pool_names.contains(r.pool.as_str()) {
                errs.push(format!("{at}: pool {:?} is not defined", r.pool));
            }
            for l in &r.listeners {
                if !listener_names.contains(l.as_str()) {
                    errs.push(format!("{at}: listener {l:?} is not defined"));
                }
            }
            if let Some(h) = &r.host
                && !valid_host_pattern(h)
            {
                errs.push(format!("{at}: host {h:?} is not a DNS name or *.wildcard"));
            }
            if !r.path_prefix.starts_with('/') {
                errs.push(format!("{at}: path_prefix must start with '/'"));
            }
        }
        if errs.is_empty() { Ok(()) } else { Err(errs) }
    }
}
