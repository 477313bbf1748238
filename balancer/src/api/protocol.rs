//! Messages between the control API (and metrics) and the daemon loop, and the status
//! report they carry. The daemon owns all state; the API asks it through a channel.

use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use crate::{
    config::{AdminState, Forwarding, Protocol, Scheduler},
    control::operator::{BgpVerb, Verb},
    control::state::{BackendHealth, SlotState},
    dataplane::counters::Traffic,
};

/// What an operator (or the metrics endpoint) asks of the daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Request {
    /// The whole status.
    Status,
    /// An operator action on one backend: drain, disable or enable.
    Backend {
        /// What to do.
        verb: Verb,
        /// Service name.
        service: String,
        /// Backend address ("10.77.0.11:7002") or IP.
        backend: String,
    },
    /// Re-read the config file; a bad file is refused and the running config keeps serving.
    Reload,
    /// keepalived's word on this balancer's VRRP role (`balancer ha notify`).
    HaRole {
        /// The role.
        role: crate::control::ha::Role,
    },
    /// Withdraw or announce this balancer's VIPs (BGP, `[bgp]`).
    Bgp {
        /// What to do.
        verb: BgpVerb,
    },
}

/// The daemon's answer: a JSON value, or an error message for the operator.
pub type Reply = Result<serde_json::Value, String>;

/// A request with the channel its reply goes back on.
#[derive(Debug)]
pub struct Message {
    /// The request.
    pub request: Request,
    /// Where the reply goes.
    pub reply: oneshot::Sender<Reply>,
}

/// One backend in the status.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BackendStatus {
    /// Address.
    pub address: SocketAddr,
    /// Weight.
    pub weight: u32,
    /// Priority (failover).
    pub priority: u32,
    /// Operator state: up / drain / disabled.
    pub admin: AdminState,
    /// Health: unchecked / up / down.
    pub health: BackendHealth,
    /// What the dataplane does with it: up / draining / down / standby.
    pub state: SlotState,
    /// The failover service's active backend.
    pub active: bool,
    /// Last successful check latency in milliseconds.
    pub check_latency_ms: Option<f64>,
    /// Dataplane counters.
    pub traffic: Traffic,
    /// Established flows to it (at the last flow-table sweep, every few seconds).
    #[serde(default)]
    pub flows: u64,
}

/// One service in the status.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ServiceStatus {
    /// Name.
    pub name: String,
    /// VIP.
    pub vip: SocketAddr,
    /// tcp / udp.
    pub protocol: Protocol,
    /// nat / dsr.
    pub forwarding: Forwarding,
    /// maglev / failover.
    pub scheduler: Scheduler,
    /// Health check kind, if any.
    pub health_check: Option<String>,
    /// Active backend of a failover service.
    pub active: Option<SocketAddr>,
    /// Dataplane counters.
    pub traffic: Traffic,
    /// Backends.
    pub backends: Vec<BackendStatus>,
}

/// Everything `balancer status` shows.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Status {
    /// Config file in use.
    pub config: String,
    /// Interfaces the program is attached to.
    pub interfaces: Vec<String>,
    /// Seconds since the daemon started.
    pub uptime_secs: u64,
    /// Successful reloads.
    pub reloads: u64,
    /// Refused reloads (bad config).
    pub config_errors: u64,
    /// Failovers (active backend changes of failover services).
    pub failovers: u64,
    /// Flow-table entries.
    pub flows: usize,
    /// Global verdict reasons.
    pub reasons: BTreeMap<String, u64>,
    /// Flows the controller's sweep removed since it started, by why: `closed`, `idle`,
    /// `half_open` (a handshake that never completed), `orphan` (a reply entry whose flow
    /// was gone: its SNAT port freed).
    #[serde(default)]
    pub flows_expired: BTreeMap<String, u64>,
    /// Services.
    pub services: Vec<ServiceStatus>,
    /// Layer-7 proxy counters, when an `[l7]` section runs.
    #[serde(default)]
    pub l7: Option<balancer_l7::Metrics>,
    /// Layer-7 pool members and their health.
    #[serde(default)]
    pub l7_backends: Vec<L7BackendStatus>,
    /// MLLP relay counters, when a service runs in `mode = "mllp"` (no message content).
    #[serde(default)]
    pub mllp: Option<balancer_mllp::Metrics>,
    /// What the flow and SNAT gauges are measured against.
    #[serde(default)]
    pub capacity: Capacity,
    /// Expiry of the L7 listeners' certificate files.
    #[serde(default)]
    pub certificates: Vec<CertificateStatus>,
    /// This balancer's part of a pair, when it has an `[ha]` section.
    #[serde(default)]
    pub ha: Option<HaStatus>,
    /// The BGP announcements, when a `[bgp]` section runs.
    #[serde(default)]
    pub bgp: Option<crate::host::bird::BgpStatus>,
}

/// One balancer of a pair: its role, the peer as last heard, and the mirror's counters.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct HaStatus {
    /// This balancer's name.
    pub node: String,
    /// Its VRRP role, as keepalived told it.
    pub role: crate::control::ha::Role,
    /// The peer's sync address.
    pub peer: String,
    /// The peer's name, from its last heartbeat.
    #[serde(default)]
    pub peer_node: Option<String>,
    /// The peer's role, from its last heartbeat.
    #[serde(default)]
    pub peer_role: Option<crate::control::ha::Role>,
    /// Milliseconds since the last valid message from the peer.
    #[serde(default)]
    pub peer_heard_ms: Option<u64>,
    /// Whether the peer runs the same config (digest of everything but `[ha]` and
    /// `[console]`); `None` before its first heartbeat.
    #[serde(default)]
    pub config_matches: Option<bool>,
    /// The flow mirror.
    #[serde(default)]
    pub mirror: MirrorStatus,
}

/// Counters of the flow mirror and its channel (since the controller started).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct MirrorStatus {
    /// New flows sent to the peer (as active).
    pub flows_sent: u64,
    /// Flows of the peer installed here (as standby), resyncs included.
    pub flows_applied: u64,
    /// Flows of the peer this balancer has no service or backend for (not installed).
    pub flows_unknown: u64,
    /// Expired flows whose removal was sent to the peer.
    pub deletes_sent: u64,
    /// Removals of the peer applied here.
    pub deletes_applied: u64,
    /// Full resync passes sent.
    pub resyncs_sent: u64,
    /// Full resync passes received.
    pub resyncs_received: u64,
    /// New-flow events the XDP program could not queue (ring buffer full): repaired by the
    /// next resync.
    pub events_dropped: u64,
    /// Messages sent that the peer has not acknowledged yet (its last heartbeat).
    pub lag_messages: u64,
    /// Sync messages sent.
    pub messages_sent: u64,
    /// Sync messages received and accepted.
    pub messages_accepted: u64,
    /// Dropped: bad MAC (forged, wrong key, corrupted).
    pub dropped_auth: u64,
    /// Dropped: replayed or older than the window.
    pub dropped_replay: u64,
    /// Dropped: undecodable.
    pub dropped_malformed: u64,
    /// Dropped: not from the peer's address.
    pub dropped_foreign: u64,
    /// Messages of the peer that never arrived (sequence gaps).
    pub lost: u64,
}

/// Sizes from the config that usage is measured against.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Capacity {
    /// `[dataplane] flow_table_size`.
    pub flow_table_entries: u32,
    /// Ports in `[dataplane] snat_ports` (per SNAT address).
    pub snat_ports: u32,
}

/// One certificate file of an L7 listener.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CertificateStatus {
    /// Listener name.
    pub listener: String,
    /// Certificate file.
    pub cert: String,
    /// Its leaf's notAfter, Unix seconds; `None` when the file cannot be read or parsed.
    pub not_after: Option<i64>,
}

/// One member of an L7 pool.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct L7BackendStatus {
    /// Pool name.
    pub pool: String,
    /// Address.
    pub address: SocketAddr,
    /// Health: unchecked / up / down.
    pub health: BackendHealth,
    /// Last successful check latency in milliseconds.
    pub check_latency_ms: Option<f64>,
    /// Requests sent to it.
    pub requests: u64,
    /// Failed connects to it.
    pub connect_failures: u64,
}

/// How long the daemon may take to answer one request (a reload re-reads the config and
/// rewrites maps; everything else is immediate).
pub const DAEMON_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AskError {
    /// The daemon loop is gone (shutting down).
    Gone,
    /// No answer within [`DAEMON_TIMEOUT`].
    Timeout,
}

impl std::fmt::Display for AskError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AskError::Gone => f.write_str("the daemon is shutting down"),
            AskError::Timeout => f.write_str("the daemon did not answer in time"),
        }
    }
}

impl std::error::Error for AskError {}

/// Sends one request to the daemon loop and waits (at most [`DAEMON_TIMEOUT`]) for its reply.
pub async fn ask(tx: &mpsc::Sender<Message>, request: Request) -> Result<Reply, AskError> {
    let (reply, rx) = oneshot::channel();
    let work = async {
        tx.send(Message { request, reply })
            .await
            .map_err(|_| AskError::Gone)?;
        rx.await.map_err(|_| AskError::Gone)
    };
    tokio::time::timeout(DAEMON_TIMEOUT, work)
        .await
        .map_err(|_| AskError::Timeout)?
}
