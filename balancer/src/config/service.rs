//! `[[service]]`: a layer-4 service and its backends, as written and as validated.

use serde::Deserialize;
use std::net::SocketAddr;
use toml::Spanned;

use super::health;

/// L4 protocol of a service.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, serde::Serialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// TCP.
    #[default]
    Tcp,
    /// UDP.
    Udp,
}

/// How packets reach the backend.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Forwarding {
    /// Full NAT: backends need no change.
    #[default]
    Nat,
    /// Direct server return: MAC rewrite only, backends hold the VIP on a loopback.
    Dsr,
}

/// How a backend is chosen for a new flow.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scheduler {
    /// Weighted Maglev consistent hashing over the healthy backends.
    #[default]
    Maglev,
    /// One active backend, chosen by priority.
    Failover,
}

/// What flows of a backend that went down get.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DownAction {
    /// A TCP RST, so the client reconnects at once.
    #[default]
    Reset,
    /// Silently dropped.
    Drop,
}

/// Operator state of a backend.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AdminState {
    /// Takes traffic when healthy.
    #[default]
    Up,
    /// Keeps its flows, takes no new ones.
    Drain,
    /// Out of service; its flows are reset.
    Disabled,
}

/// The lowercase word of each value, as written in the file and shown by `status`.
macro_rules! names {
    ($t:ty { $($v:ident => $n:literal),* $(,)? }) => {
        impl $t {
            /// The word for this value in the file, the status and the metrics.
            pub fn name(self) -> &'static str {
                match self {
                    $(<$t>::$v => $n),*
                }
            }
        }
        impl ::std::fmt::Display for $t {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.write_str(self.name())
            }
        }
    };
}
pub(crate) use names;

names!(Protocol { Tcp => "tcp", Udp => "udp" });
names!(Forwarding { Nat => "nat", Dsr => "dsr" });
names!(Scheduler { Maglev => "maglev", Failover => "failover" });
names!(AdminState { Up => "up", Drain => "drain", Disabled => "disabled" });
names!(DownAction { Reset => "reset", Drop => "drop" });

/// `[[service]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSection {
    /// Unique name.
    pub name: Spanned<String>,
    /// `"10.77.0.100:7002"` or `"[fd77::100]:7002"`.
    pub vip: Spanned<String>,
    /// `tcp` or `udp`.
    #[serde(default)]
    pub protocol: Protocol,
    /// `nat` or `dsr`.
    #[serde(default)]
    pub forwarding: Forwarding,
    /// `maglev` or `failover`.
    #[serde(default)]
    pub scheduler: Scheduler,
    /// Failover only: a recovered higher-priority backend takes the traffic back.
    #[serde(default)]
    pub failback: bool,
    /// Maglev ring size, a prime ≤ 65537.
    #[serde(default = "default_ring")]
    pub ring_size: Spanned<u32>,
    /// `reset` or `drop`.
    #[serde(default)]
    pub on_backend_down: DownAction,
    /// Most new flows per second per CPU (0: no limit).
    #[serde(default)]
    pub new_flow_rate: u32,
    /// `l4` (packets, in XDP) or `mllp` (HL7 messages, relayed by the controller).
    #[serde(default = "super::mllp::default_mode")]
    pub mode: Spanned<super::mllp::Mode>,
    /// `mode = "mllp"` only: the relay's limits and timeouts.
    pub mllp: Option<Spanned<super::mllp::MllpConfig>>,
    /// Health check (see the README); none means backends are always healthy.
    pub health: Option<Spanned<toml::Table>>,
    /// Passive health: a burst of refused or unanswered new flows marks a backend down.
    pub passive_health: Option<Spanned<super::passive::PassiveHealth>>,
    /// The backends.
    pub backends: Spanned<Vec<BackendEntry>>,
}

fn default_ring() -> Spanned<u32> {
    Spanned::new(0..0, balancer_common::RING_MAX)
}

/// One backend of a service.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendEntry {
    /// `"10.77.0.11:7002"`.
    pub address: Spanned<String>,
    /// Maglev weight (0–65535, default 1).
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Failover priority: lower is preferred (default: position in the list).
    pub priority: Option<u32>,
    /// Initial operator state.
    #[serde(default)]
    pub state: AdminState,
}

fn default_weight() -> u32 {
    1
}

/// A validated service, ready for the dataplane.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceSpec {
    /// Name.
    pub name: String,
    /// VIP and port.
    pub vip: SocketAddr,
    /// Protocol.
    pub protocol: Protocol,
    /// Forwarding.
    pub forwarding: Forwarding,
    /// Scheduler.
    pub scheduler: Scheduler,
    /// Failback.
    pub failback: bool,
    /// Ring size.
    pub ring_size: u32,
    /// Down action.
    pub on_backend_down: DownAction,
    /// New flows per second per CPU (0: no limit).
    pub new_flow_rate: u32,
    /// `l4` or `mllp`.
    pub mode: super::mllp::Mode,
    /// Relay limits: `Some` exactly when `mode` is `mllp` (the defaults when not written).
    pub mllp: Option<super::mllp::MllpConfig>,
    /// Health check, parsed and validated.
    pub health: Option<health::HealthSpec>,
    /// Passive health, validated (TCP services with an active check only).
    pub passive_health: Option<super::passive::PassiveHealth>,
    /// Backends.
    pub backends: Vec<BackendSpec>,
}

/// A validated backend.
#[derive(Debug, Clone, PartialEq)]
pub struct BackendSpec {
    /// Address.
    pub address: SocketAddr,
    /// Weight.
    pub weight: u32,
    /// Priority (lower first).
    pub priority: u32,
    /// Initial operator state.
    pub state: AdminState,
}
