//! The seam to the controller: what the console reads (a status snapshot) and asks (actions).
//! The daemon implements [`ConsoleSource`]; tests implement it with a fake.

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;

/// Operator state of a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminState {
    /// In service.
    Up,
    /// No new flows; established flows continue.
    Drain,
    /// Out of service; its flows are reset.
    Disabled,
}

/// Health-check verdict of a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// No check configured, or none done yet.
    Unchecked,
    /// Passing.
    Up,
    /// Failing.
    Down,
}

/// What the dataplane does with a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataplaneState {
    /// Gets new flows.
    Up,
    /// Keeps its established flows only.
    Draining,
    /// Gets nothing.
    Down,
    /// A failover backend in service, waiting behind the active one.
    Standby,
}

/// A state name that is not one of the known ones.
#[derive(Debug, thiserror::Error)]
#[error("unknown state {0:?}")]
pub struct UnknownState(pub String);

macro_rules! named {
    ($t:ty, $($v:ident = $s:literal),+) => {
        impl $t {
            /// The name on the pages (and in `balancer status`).
            pub fn as_str(self) -> &'static str {
                match self { $(Self::$v => $s),+ }
            }
        }
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
        impl FromStr for $t {
            type Err = UnknownState;
            fn from_str(s: &str) -> Result<Self, UnknownState> {
                match s { $($s => Ok(Self::$v),)+ _ => Err(UnknownState(s.to_string())) }
            }
        }
    };
}
named!(
    AdminState,
    Up = "up",
    Drain = "drain",
    Disabled = "disabled"
);
named!(Health, Unchecked = "unchecked", Up = "up", Down = "down");
named!(
    DataplaneState,
    Up = "up",
    Draining = "draining",
    Down = "down",
    Standby = "standby"
);

/// Dataplane counters (cumulative since start).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Traffic {
    /// Packets forwarded.
    pub packets: u64,
    /// Bytes forwarded.
    pub bytes: u64,
    /// Flows created.
    pub new_flows: u64,
    /// Resets sent.
    pub resets: u64,
    /// Packets dropped.
    pub drops: u64,
}

/// One backend of a service.
#[derive(Debug, Clone, PartialEq)]
pub struct BackendView {
    /// Address.
    pub address: SocketAddr,
    /// Weight.
    pub weight: u32,
    /// Priority (failover order).
    pub priority: u32,
    /// Operator state.
    pub admin: AdminState,
    /// Health.
    pub health: Health,
    /// Dataplane state.
    pub state: DataplaneState,
    /// The active backend of a failover service.
    pub active: bool,
    /// Latency of the last successful check.
    pub check_latency_ms: Option<f64>,
    /// Counters.
    pub traffic: Traffic,
    /// Established flows to it now (what stays on it after a drain).
    pub flows: u64,
}

/// One layer-4 service.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceView {
    /// Name.
    pub name: String,
    /// VIP and port.
    pub vip: SocketAddr,
    /// tcp / udp.
    pub protocol: String,
    /// nat / dsr.
    pub forwarding: String,
    /// maglev / failover.
    pub scheduler: String,
    /// Health check kind.
    pub health_check: Option<String>,
    /// Active backend of a failover (HL7) service.
    pub active: Option<SocketAddr>,
    /// Counters.
    pub traffic: Traffic,
    /// Backends.
    pub backends: Vec<BackendView>,
}

/// A certificate file a listener serves.
#[derive(Debug, Clone, PartialEq)]
pub struct CertFile {
    /// PEM chain path (the leaf is read for subject, names and expiry).
    pub path: PathBuf,
    /// SNI names configured for it.
    pub server_names: Vec<String>,
}

/// A TLS listener of the L7 proxy.
#[derive(Debug, Clone, PartialEq)]
pub struct ListenerView {
    /// Name.
    pub name: String,
    /// Address.
    pub address: SocketAddr,
    /// Certificates.
    pub certificates: Vec<CertFile>,
}

/// A route of the L7 proxy.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteView {
    /// Name.
    pub name: String,
    /// Host it matches, if any.
    pub host: Option<String>,
    /// Path prefix it matches.
    pub path_prefix: String,
    /// Listeners it applies to (empty: all).
    pub listeners: Vec<String>,
    /// Pool it sends to.
    pub pool: String,
    /// Responses by status class 1xx..5xx.
    pub status_classes: [u64; 5],
}

/// A member of an L7 pool.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolMemberView {
    /// Address.
    pub address: SocketAddr,
    /// Health.
    pub health: Health,
    /// Latency of the last successful check.
    pub check_latency_ms: Option<f64>,
    /// Requests sent.
    pub requests: u64,
    /// Failed connects.
    pub connect_failures: u64,
}

/// An L7 pool.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolView {
    /// Name.
    pub name: String,
    /// Members.
    pub members: Vec<PoolMemberView>,
}

/// The L7 proxy, when configured.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct L7View {
    /// TLS listeners.
    pub listeners: Vec<ListenerView>,
    /// Routes.
    pub routes: Vec<RouteView>,
    /// Pools.
    pub pools: Vec<PoolView>,
    /// Client connections open now.
    pub open_connections: u64,
}

/// Everything the pages show, read at one moment.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct StatusSnapshot {
    /// Config file in use.
    pub config: String,
    /// Seconds since the daemon started.
    pub uptime_secs: u64,
    /// Successful reloads.
    pub reloads: u64,
    /// Refused reloads.
    pub config_errors: u64,
    /// Failovers so far.
    pub failovers: u64,
    /// Flow-table entries now.
    pub flows: usize,
    /// Layer-4 services.
    pub services: Vec<ServiceView>,
    /// Layer-7 proxy.
    pub l7: Option<L7View>,
}

impl StatusSnapshot {
    /// A service by name.
    pub fn service(&self, name: &str) -> Option<&ServiceView> {
        self.services.iter().find(|s| s.name == name)
    }
}

/// Something an operator asks the controller to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// No new flows to a backend.
    Drain {
        /// Service.
        service: String,
        /// Backend.
        backend: SocketAddr,
    },
    /// Take a backend out of service, resetting its flows.
    Disable {
        /// Service.
        service: String,
        /// Backend.
        backend: SocketAddr,
    },
    /// Put a backend back in service.
    Enable {
        /// Service.
        service: String,
        /// Backend.
        backend: SocketAddr,
    },
    /// Re-read the config file.
    Reload,
}

impl Action {
    /// The verb: drain, disable, enable, reload.
    pub fn verb(&self) -> &'static str {
        match self {
            Action::Drain { .. } => "drain",
            Action::Disable { .. } => "disable",
            Action::Enable { .. } => "enable",
            Action::Reload => "reload",
        }
    }

    /// Builds one from a verb and, for backend verbs, service and backend.
    pub fn parse(verb: &str, service: Option<&str>, backend: Option<&str>) -> Option<Action> {
        if verb == "reload" {
            return Some(Action::Reload);
        }
        let service = service?.to_string();
        let backend = backend?.parse().ok()?;
        match verb {
            "drain" => Some(Action::Drain { service, backend }),
            "disable" => Some(Action::Disable { service, backend }),
            "enable" => Some(Action::Enable { service, backend }),
            _ => None,
        }
    }

    /// Service and backend of a backend verb.
    pub fn target(&self) -> Option<(&str, SocketAddr)> {
        match self {
            Action::Drain { service, backend }
            | Action::Disable { service, backend }
            | Action::Enable { service, backend } => Some((service, *backend)),
            Action::Reload => None,
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.target() {
            Some((s, b)) => write!(f, "{} {s} {b}", self.verb()),
            None => f.write_str(self.verb()),
        }
    }
}

/// The controller could not answer or refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SourceError {
    /// The controller did not answer.
    #[error("controller unavailable: {0}")]
    Unavailable(String),
    /// The controller refused (unknown backend, a config with errors, ...); the message is
    /// shown as is, one problem a line (`file:line:column: message` for a config).
    #[error("{0}")]
    Refused(String),
}

/// The controller as the console sees it.
pub trait ConsoleSource: Send + Sync + 'static {
    /// The status now.
    fn status(&self) -> impl Future<Output = Result<StatusSnapshot, SourceError>> + Send;
    /// Does an action; `Ok` carries a one-line summary.
    fn act(&self, action: &Action) -> impl Future<Output = Result<String, SourceError>> + Send;
    /// Whether the controller writes health changes and failovers into the event log itself,
    /// as they happen. Otherwise the console derives them from its status samples (and a
    /// flap shorter than `sample_interval` is not seen).
    fn records_changes(&self) -> bool {
        false
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn names_and_actions() {
        assert_eq!("drain".parse::<AdminState>().unwrap(), AdminState::Drain);
        assert_eq!(Health::Down.to_string(), "down");
        assert!("sideways".parse::<DataplaneState>().is_err());
        assert_eq!(
            "standby".parse::<DataplaneState>().unwrap(),
            DataplaneState::Standby
        );
        let a = Action::parse("drain", Some("web"), Some("10.0.0.1:80")).unwrap();
        assert_eq!(a.to_string(), "drain web 10.0.0.1:80");
        assert_eq!(Action::parse("reload", None, None), Some(Action::Reload));
        assert_eq!(Action::parse("drain", Some("web"), Some("10.0.0.1")), None);
        assert_eq!(
            Action::parse("explode", Some("web"), Some("10.0.0.1:80")),
            None
        );
    }
}
