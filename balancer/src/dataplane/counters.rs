//! Counters as read from the dataplane maps, for `balancer counters` and status.

use std::{collections::BTreeMap, net::SocketAddr};

use balancer_common::{BE_DOWN, BE_DRAINING, Counters, PROTO_TCP};
use serde::{Deserialize, Serialize};

use crate::{dataplane::Dataplane, host::net};

/// Traffic counters.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
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
    /// New flows the backend refused with an RST.
    #[serde(default)]
    pub refused: u64,
    /// Client SYNs sent again on a half-open flow.
    #[serde(default)]
    pub syn_retries: u64,
}

impl From<Counters> for Traffic {
    fn from(c: Counters) -> Self {
        Traffic {
            packets: c.packets,
            bytes: c.bytes,
            new_flows: c.new_flows,
            resets: c.resets,
            drops: c.drops,
            refused: c.refused,
            syn_retries: c.syn_retries,
        }
    }
}

/// One backend slot.
#[derive(Debug, Clone, Serialize)]
pub struct BackendReport {
    /// Slot.
    pub slot: u32,
    /// Address.
    pub address: SocketAddr,
    /// up / draining / down.
    pub state: &'static str,
    /// Counters.
    #[serde(flatten)]
    pub traffic: Traffic,
}

/// One service.
#[derive(Debug, Clone, Serialize)]
pub struct ServiceReport {
    /// Service id.
    pub id: u32,
    /// VIP.
    pub vip: SocketAddr,
    /// tcp / udp.
    pub protocol: &'static str,
    /// Counters.
    #[serde(flatten)]
    pub traffic: Traffic,
    /// Backends.
    pub backends: Vec<BackendReport>,
}

/// Everything.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Services by id.
    pub services: Vec<ServiceReport>,
    /// Global reasons.
    pub reasons: BTreeMap<&'static str, u64>,
    /// Flow-table entries.
    pub flows: usize,
}

/// State name of a dataplane backend state.
pub fn state_name(s: u32) -> &'static str {
    match s {
        BE_DOWN => "down",
        BE_DRAINING => "draining",
        _ => "up",
    }
}

/// Reads every counter (walks the flow table to count it: for the CLI, not the daemon).
pub fn counters(dp: &Dataplane) -> Report {
    let backends = dp.backends();
    let mut services: Vec<ServiceReport> = dp
        .services()
        .into_iter()
        .map(|(k, s)| ServiceReport {
            id: s.id,
            vip: SocketAddr::new(net::ip_of(&k.addr), u16::from_be(k.port)),
            protocol: if k.proto == PROTO_TCP { "tcp" } else { "udp" },
            traffic: dp.service_counters(s.id).into(),
            backends: backends
                .iter()
                .filter(|(_, b)| b.used != 0 && b.service == s.id)
                .map(|(i, b)| BackendReport {
                    slot: *i,
                    address: SocketAddr::new(net::ip_of(&b.addr), u16::from_be(b.port)),
                    state: state_name(b.state),
                    traffic: dp.backend_counters(*i).into(),
                })
                .collect(),
        })
        .collect();
    services.sort_by_key(|s| s.id);
    Report {
        services,
        reasons: dp
            .reasons()
            .into_iter()
            .map(|(r, v)| (r.name(), v))
            .collect(),
        flows: dp.flow_count(),
    }
}

/// A readable table of a report.
pub fn counters_text(r: &Report) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    for svc in &r.services {
        let _ = writeln!(
            s,
            "service {} {} {}: packets {} bytes {} new_flows {} resets {} drops {}",
            svc.id,
            svc.vip,
            svc.protocol,
            svc.traffic.packets,
            svc.traffic.bytes,
            svc.traffic.new_flows,
            svc.traffic.resets,
            svc.traffic.drops
        );
        for b in &svc.backends {
            let _ = writeln!(
                s,
                "  backend {:<24} {:<8} packets {:>10} bytes {:>12} new_flows {:>8} resets {}",
                b.address.to_string(),
                b.state,
                b.traffic.packets,
                b.traffic.bytes,
                b.traffic.new_flows,
                b.traffic.resets
            );
        }
    }
    let _ = writeln!(s, "flow-table entries: {}", r.flows);
    for (k, v) in &r.reasons {
        if *v > 0 {
            let _ = writeln!(s, "  {k}: {v}");
        }
    }
    s
}
