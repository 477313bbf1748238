//! The `balancer status` table, rendered from a [`Status`].

use std::fmt::Write as _;

use crate::api::protocol::Status;

/// Renders a status as the readable table of `balancer status`.
pub fn status_table(s: &Status) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "config {}  interfaces {}  uptime {}",
        s.config,
        if s.interfaces.is_empty() {
            "-".to_string()
        } else {
            s.interfaces.join(",")
        },
        uptime(s.uptime_secs)
    );
    let _ = writeln!(
        out,
        "reloads {}  config errors {}  failovers {}  flows {}",
        s.reloads, s.config_errors, s.failovers, s.flows
    );
    if let Some(ha) = &s.ha {
        let _ = writeln!(out, "{}", ha_line(ha));
    }
    if !s.reasons.is_empty() {
        let reasons: Vec<String> = s.reasons.iter().map(|(k, v)| format!("{k} {v}")).collect();
        let _ = writeln!(out, "verdicts {}", reasons.join("  "));
    }
    if let Some(b) = &s.bgp {
        out.push_str(&bgp_line(b));
    }
    for svc in &s.services {
        out.push('\n');
        let t = &svc.traffic;
        let head = [
            vec![
                "SERVICE",
                "VIP",
                "PROTO",
                "FWD",
                "SCHEDULER",
                "CHECK",
                "ACTIVE",
                "PACKETS",
                "BYTES",
                "NEW FLOWS",
                "RESETS",
                "DROPS",
            ]
            .into_iter()
            .map(str::to_string)
            .collect::<Vec<_>>(),
            vec![
                svc.name.clone(),
                svc.vip.to_string(),
                svc.protocol.name().to_string(),
                svc.forwarding.name().to_string(),
                svc.scheduler.name().to_string(),
                svc.health_check.clone().unwrap_or_else(|| "-".into()),
                svc.active.map_or_else(
                    || {
                        if svc.scheduler == crate::config::Scheduler::Failover {
                            "NONE".into()
                        } else {
                            "-".into()
                        }
                    },
                    |a| a.to_string(),
                ),
                t.packets.to_string(),
                human_bytes(t.bytes),
                t.new_flows.to_string(),
                t.resets.to_string(),
                t.drops.to_string(),
            ],
        ];
        out.push_str(&columns(&head, "lllllllrrrrr", ""));
        let mut rows = vec![
            [
                "BACKEND",
                "WEIGHT",
                "PRIO",
                "ADMIN",
                "HEALTH",
                "STATE",
                "ACTIVE",
                "LATENCY",
                "PACKETS",
                "BYTES",
                "NEW FLOWS",
                "RESETS",
                "DROPS",
            ]
            .into_iter()
            .map(str::to_string)
            .collect::<Vec<_>>(),
        ];
        for b in &svc.backends {
            let t = &b.traffic;
            rows.push(vec![
                b.address.to_string(),
                b.weight.to_string(),
                b.priority.to_string(),
                b.admin.name().to_string(),
                b.health.name().to_string(),
                b.state.name().to_string(),
                if b.active { "*".into() } else { "".into() },
                b.check_latency_ms
                    .map_or_else(|| "-".into(), |ms| format!("{ms:.1}ms")),
                t.packets.to_string(),
                human_bytes(t.bytes),
                t.new_flows.to_string(),
                t.resets.to_string(),
                t.drops.to_string(),
            ]);
        }
        out.push_str(&columns(&rows, "lrrllllrrrrrr", "  "));
    }
    if !s.l7_backends.is_empty() {
        out.push('\n');
        let mut rows = vec![
            [
                "L7 POOL",
                "BACKEND",
                "HEALTH",
                "LATENCY",
                "REQUESTS",
                "CONNECT FAILURES",
            ]
            .into_iter()
            .map(str::to_string)
            .collect::<Vec<_>>(),
        ];
        for b in &s.l7_backends {
            rows.push(vec![
                b.pool.clone(),
                b.address.to_string(),
                b.health.name().to_string(),
                b.check_latency_ms
                    .map_or_else(|| "-".into(), |ms| format!("{ms:.1}ms")),
                b.requests.to_string(),
                b.connect_failures.to_string(),
            ]);
        }
        out.push_str(&columns(&rows, "lllrrr", ""));
    }
    if let Some(m) = &s.mllp {
        out.push_str(&mllp_text(m));
    }
    out
}

/// The BGP line of `balancer status`: what BIRD announces, the operator's withdraw, a
/// change not applied yet and the last `birdc` result.
fn bgp_line(b: &crate::host::bird::BgpStatus) -> String {
    let list = |v: &[std::net::IpAddr]| {
        if v.is_empty() {
            "none".to_string()
        } else {
            v.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(",")
        }
    };
    let mut line = format!(
        "bgp announced {}  withdrawn by operator {}",
        list(&b.announced),
        if b.withdrawn_by_operator { "yes" } else { "no" }
    );
    if b.desired != b.announced {
        let _ = write!(line, "  pending {}", list(&b.desired));
    }
    let _ = write!(
        line,
        "  birdc {}",
        match (&b.last_ok, &b.last_result) {
            (Some(true), _) => "ok".to_string(),
            (Some(false), Some(e)) => format!("failed ({} failures): {e}", b.failures),
            _ => "-".to_string(),
        }
    );
    line.push('\n');
    line
}

/// The MLLP relay's services and listeners, for `balancer status`.
fn mllp_text(m: &balancer_mllp::Metrics) -> String {
    let head = |h: &[&str]| h.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let mut svc = vec![head(&[
        "MLLP SERVICE",
        "ACTIVE",
        "SENDERS",
        "RELAYED",
        "IN FLIGHT",
        "REPLAYED",
        "UNACKED",
        "FRAME ERRORS",
        "ACK AVG",
    ])];
    let mut lis = vec![head(&[
        "MLLP SERVICE",
        "LISTENER",
        "DELIVERED",
        "AA",
        "CA",
        "AE",
        "AR",
        "FAILURES",
        "GARBAGE",
    ])];
    for s in &m.services {
        let acks: u64 = s.ack_latency_buckets.iter().sum();
        svc.push(vec![
            s.name.clone(),
            s.active.map_or_else(|| "-".into(), |a| a.to_string()),
            s.senders_connected.to_string(),
            s.relayed.to_string(),
            format!("{} ({})", s.in_flight, human_bytes(s.in_flight_bytes)),
            s.replayed.to_string(),
            s.unacked.to_string(),
            s.frame_errors.to_string(),
            if acks == 0 {
                "-".into()
            } else {
                format!("{:.2}ms", s.ack_latency_sum_seconds * 1e3 / acks as f64)
            },
        ]);
        for l in &s.listeners {
            let code = |c: &str| l.acks.get(c).copied().unwrap_or(0).to_string();
            lis.push(vec![
                s.name.clone(),
                l.address.to_string(),
                l.delivered.to_string(),
                code("AA"),
                code("CA"),
                code("AE"),
                code("AR"),
                l.failures.to_string(),
                l.garbage.to_string(),
            ]);
        }
    }
    format!(
        "\n{}\n{}",
        columns(&svc, "llrrrrrrr", ""),
        columns(&lis, "llrrrrrrr", "")
    )
}

/// Aligns rows in columns; `align` has one letter per column: `l`eft or `r`ight.
fn columns(rows: &[Vec<String>], align: &str, indent: &str) -> String {
    let n = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..n)
        .map(|i| {
            rows.iter()
                .filter_map(|r| r.get(i))
                .map(|c| c.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let mut line = String::from(indent);
        for (i, c) in r.iter().enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            let w = widths[i];
            if align.as_bytes().get(i) != Some(&b'r') {
                let _ = write!(line, "{c:<w$}");
            } else {
                let _ = write!(line, "{c:>w$}");
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

pub(crate) fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if b < 1024 {
        return format!("{b}B");
    }
    let mut v = b as f64 / 1024.0;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1}{}", UNITS[u])
}

pub(crate) fn uptime(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    if d > 0 {
        format!("{d}d{h:02}h{m:02}m")
    } else {
        format!("{h}h{m:02}m{s:02}s")
    }
}

/// The pair's two lines: role and peer, then the mirror's counters.
fn ha_line(ha: &crate::api::protocol::HaStatus) -> String {
    let peer = match (&ha.peer_node, ha.peer_role, ha.peer_heard_ms) {
        (Some(n), Some(r), Some(ms)) => format!("{n} ({r}, heard {ms} ms ago)"),
        _ => "not heard".to_string(),
    };
    let config = match ha.config_matches {
        Some(true) => "same config",
        Some(false) => "CONFIG DIFFERS FROM THE PEER'S",
        None => "config not compared yet",
    };
    let m = &ha.mirror;
    format!(
        "ha node {} role {}  peer {} {peer}  {config}\nmirror flows sent {} applied {} unknown {}  deletes sent {} applied {}  resyncs sent {} received {}  lag {} msgs  events dropped {}  sync msgs sent {} accepted {}  dropped auth {} replay {} malformed {} foreign {}  lost {}",
        ha.node,
        ha.role,
        ha.peer,
        m.flows_sent,
        m.flows_applied,
        m.flows_unknown,
        m.deletes_sent,
        m.deletes_applied,
        m.resyncs_sent,
        m.resyncs_received,
        m.lag_messages,
        m.events_dropped,
        m.messages_sent,
        m.messages_accepted,
        m.dropped_auth,
        m.dropped_replay,
        m.dropped_malformed,
        m.dropped_foreign,
        m.lost
    )
}
