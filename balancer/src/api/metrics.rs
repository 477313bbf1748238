//! Prometheus metrics: the daemon's [`Status`] snapshot in the OpenMetrics text format.
//!
//! Each scrape asks for the status through the control channel (answered from the daemon's
//! published snapshot plus live counters, never by the daemon loop) and renders it into a new
//! registry, so the endpoint holds no state of its own. Names (all prefixed
//! `balancer_`):
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `service_{packets,bytes,new_flows,resets,drops}_total` | counter | service |
//! | `backend_{packets,bytes,new_flows,resets,drops}_total` | counter | service, backend |
//! | `backend_health_up` (1 passing or unchecked, 0 failing) | gauge | service, backend |
//! | `backend_serving` (1 when the dataplane sends it new flows) | gauge | service, backend |
//! | `backend_state` (1 for the current state) | gauge | service, backend, state |
//! | `backend_admin_state` (1 for the operator state) | gauge | service, backend, admin |
//! | `backend_active` (1 for a failover service's active backend) | gauge | service, backend |
//! | `backend_weight`, `backend_priority` | gauge | service, backend |
//! | `backend_check_latency_seconds` (last successful check) | gauge | service, backend |
//! | `service_active_backends` (failover services; 0: no live listener) | gauge | service |
//! | `failovers_total`, `reloads_total`, `config_errors_total` | counter | |
//! | `flow_table_entries`, `flow_table_capacity`, `snat_ports`, `uptime_seconds` | gauge | |
//! | `dataplane_verdicts_total` | counter | reason |
//! | `flows_expired_total` (removed by the flow-table sweep) | counter | reason: closed, idle, half_open, orphan |
//! | `l7_request_duration_seconds` | histogram | route, pool |
//! | `l7_backend_health_up` | gauge | pool, backend |
//! | `l7_certificate_expiry_timestamp_seconds` | gauge | listener, cert |
//! | `mllp_messages_{relayed,replayed,unacked}_total`, `mllp_frame_errors_total`, `mllp_senders_{accepted,refused}_total` | counter | service |
//! | `mllp_messages_in_flight`, `mllp_in_flight_bytes`, `mllp_senders_connected` | gauge | service |
//! | `mllp_ack_duration_seconds` (listener ACK latency) | histogram | service |
//! | `mllp_acks_total` | counter | service, listener, code |
//! | `mllp_listener_{delivered,failures,garbage}_total` | counter | service, listener |
//! | `mllp_active_listener` (1 for the listener messages go to) | gauge | service, listener |
//! | `ha_role` (1 for this balancer's role) | gauge | node, role |
//! | `ha_peer_heard_seconds` (since the peer's last valid message), `ha_config_matches` (1 same config as the peer) | gauge | |
//! | `ha_mirror_{flows_sent,flows_applied,flows_unknown,deletes_sent,deletes_applied,resyncs_sent,resyncs_received,events_dropped}_total` | counter | |
//! | `ha_mirror_lag_messages` (sent, not yet acknowledged by the peer) | gauge | |
//! | `ha_sync_messages_{sent,accepted}_total`, `ha_sync_dropped_total` (reason: auth, replay, malformed, foreign), `ha_sync_lost_total` | counter | |
//! | `bgp_announced` (1 while BIRD announces the VIP, 0 withdrawn) | gauge | vip |
//! | `bgp_withdrawn_by_operator`, `bgp_birdc_failures_total` | gauge, counter | |

use std::{convert::Infallible, net::SocketAddr, sync::atomic::AtomicU64, time::Duration};

use bytes::Bytes;
use http::{HeaderValue, Method, Request as HttpRequest, Response, StatusCode, header};
use http_body_util::Full;
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::{
    encoding::{EncodeMetric, MetricEncoder, NoLabelSet, text::encode},
    metrics::{MetricType, TypedMetric, counter::Counter, family::Family, gauge::Gauge},
    registry::{Registry, Unit},
};
use tokio::{net::TcpListener, sync::mpsc};
use tracing::{debug, info, warn};

use crate::{
    api::protocol::{AskError, Message, Request, Status, ask},
    control::state::{BackendHealth, SlotState},
    dataplane::counters::Traffic,
};

/// The content type of the OpenMetrics text format that [`render`] produces.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// Content type of the Prometheus text format, served to scrapers that do not ask for
/// OpenMetrics (`promtool check metrics`, older agents, curl).
pub const TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The formats `/metrics` speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// OpenMetrics 1.0 (what Prometheus asks for first).
    OpenMetrics,
    /// The Prometheus text format 0.0.4.
    Text,
}

impl Format {
    /// OpenMetrics when the `Accept` header lists it, else the text format.
    pub fn from_accept(accept: Option<&str>) -> Self {
        match accept {
            Some(a) if a.contains("application/openmetrics-text") => Format::OpenMetrics,
            _ => Format::Text,
        }
    }

    fn content_type(self) -> &'static str {
        match self {
            Format::OpenMetrics => CONTENT_TYPE,
            Format::Text => TEXT_CONTENT_TYPE,
        }
    }
}

/// The exposition `open_metrics` (as [`render`] writes it) in the Prometheus text format 0.0.4.
/// OpenMetrics names a counter family without the `_total` its sample carries, and has
/// `# UNIT` and `# EOF` lines; the text format names the family as its sample and has neither.
/// Gauges and histograms are written alike in both.
pub fn to_text_format(open_metrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = open_metrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(open_metrics.len() + 16 * counters.len());
    for line in open_metrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| line.strip_prefix(p).map(|rest| (p, rest)));
        match meta {
            Some((p, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                out.push_str(p);
                out.push_str(name);
                if counters.contains(name) {
                    out.push_str("_total");
                }
                out.push(' ');
                out.push_str(tail);
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

type Labels = Vec<(&'static str, String)>;
type Counters = Family<Labels, Counter>;
type Gauges = Family<Labels, Gauge>;
type FloatGauges = Family<Labels, Gauge<f64, AtomicU64>>;

/// The five traffic counters of one label set.
#[derive(Default)]
struct TrafficFamilies {
    packets: Counters,
    bytes: Counters,
    new_flows: Counters,
    resets: Counters,
    drops: Counters,
}

impl TrafficFamilies {
    fn add(&self, labels: &Labels, t: &Traffic) {
        self.packets.get_or_create(labels).inc_by(t.packets);
        self.bytes.get_or_create(labels).inc_by(t.bytes);
        self.new_flows.get_or_create(labels).inc_by(t.new_flows);
        self.resets.get_or_create(labels).inc_by(t.resets);
        self.drops.get_or_create(labels).inc_by(t.drops);
    }

    fn register(self, reg: &mut Registry, what: &str) {
        reg.register(
            format!("{what}_packets"),
            format!("Packets forwarded, per {what}"),
            self.packets,
        );
        reg.register(
            format!("{what}_bytes"),
            format!("Bytes forwarded, per {what}"),
            self.bytes,
        );
        reg.register(
            format!("{what}_new_flows"),
            format!("Flows created, per {what}"),
            self.new_flows,
        );
        reg.register(
            format!("{what}_resets"),
            format!("TCP resets sent for flows of a down backend, per {what}"),
            self.resets,
        );
        reg.register(
            format!("{what}_drops"),
            format!("Packets dropped, per {what}"),
            self.drops,
        );
    }
}

/// Sum, count and (upper bound, cumulative count) buckets.
type HistogramState = (f64, u64, Vec<(f64, u64)>);

/// A histogram counted elsewhere (the L7 proxy's atomics), set once per scrape.
#[derive(Debug, Default)]
struct HistogramSnapshot(std::sync::Mutex<HistogramState>);

impl HistogramSnapshot {
    /// `buckets`: per-bucket counts (not cumulative), the last one `+Inf`.
    fn set(&self, sum: f64, buckets: &[u64]) {
        self.set_with(&balancer_l7::LATENCY_BUCKETS, sum, buckets);
    }

    /// Like [`HistogramSnapshot::set`], with the upper bounds `le` (`+Inf` implied).
    fn set_with(&self, le: &[f64], sum: f64, buckets: &[u64]) {
        let bounds = le.iter().copied().chain([f64::MAX]);
        let b: Vec<(f64, u64)> = bounds.zip(buckets.iter().copied()).collect();
        let count = buckets.iter().sum();
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = (sum, count, b);
    }
}

impl TypedMetric for HistogramSnapshot {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for HistogramSnapshot {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        encoder.encode_histogram::<NoLabelSet>(g.0, g.1, &g.2, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// The notAfter of each L7 listener's certificate file, read now (the proxy reloads changed
/// files within `cert_watch_interval`, so the file is what it serves or is about to).
pub fn certificate_expiry(
    l7: &balancer_l7::L7Config,
) -> Vec<crate::api::protocol::CertificateStatus> {
    let not_after = |path: &std::path::Path| -> Option<i64> {
        let pem = std::fs::read(path).ok()?;
        let (_, pem) = x509_parser::pem::parse_x509_pem(&pem).ok()?;
        let cert = pem.parse_x509().ok()?;
        Some(cert.validity().not_after.timestamp())
    };
    l7.listeners
        .iter()
        .flat_map(|l| {
            l.certificates
                .iter()
                .map(|c| crate::api::protocol::CertificateStatus {
                    listener: l.name.clone(),
                    cert: c.cert.display().to_string(),
                    not_after: not_after(&c.cert),
                })
        })
        .collect()
}

/// A label value escaped for the text format (the encoder writes values as they are).
fn esc(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

fn gauge(f: &Gauges, labels: &Labels, v: i64) {
    f.get_or_create(labels).set(v);
}

/// Renders a status snapshot as OpenMetrics text (ends with `# EOF`).
pub fn render(status: &Status) -> String {
    let mut reg = Registry::with_prefix("balancer");

    let service_traffic = TrafficFamilies::default();
    let backend_traffic = TrafficFamilies::default();
    let refused = Counters::default();
    let syn_retries = Counters::default();
    let health_up = Gauges::default();
    let serving = Gauges::default();
    let state = Gauges::default();
    let admin = Gauges::default();
    let active = Gauges::default();
    let weight = Gauges::default();
    let priority = Gauges::default();
    let latency = FloatGauges::default();
    let active_backends = Gauges::default();

    for s in &status.services {
        let sl: Labels = vec![("service", esc(&s.name))];
        service_traffic.add(&sl, &s.traffic);
        if s.scheduler == crate::config::Scheduler::Failover {
            let n = s.backends.iter().filter(|b| b.active).count();
            gauge(&active_backends, &sl, i64::try_from(n).unwrap_or(i64::MAX));
        }
        for b in &s.backends {
            let bl: Labels = vec![
                ("service", esc(&s.name)),
                ("backend", b.address.to_string()),
            ];
            backend_traffic.add(&bl, &b.traffic);
            refused.get_or_create(&bl).inc_by(b.traffic.refused);
            syn_retries.get_or_create(&bl).inc_by(b.traffic.syn_retries);
            gauge(&health_up, &bl, i64::from(b.health != BackendHealth::Down));
            gauge(&serving, &bl, i64::from(b.state == SlotState::Up));
            let with = |key, value: &str| {
                let mut l = bl.clone();
                l.push((key, esc(value)));
                l
            };
            gauge(&state, &with("state", b.state.name()), 1);
            gauge(&admin, &with("admin", b.admin.name()), 1);
            gauge(&active, &bl, i64::from(b.active));
            gauge(&weight, &bl, i64::from(b.weight));
            gauge(&priority, &bl, i64::from(b.priority));
            if let Some(ms) = b.check_latency_ms {
                latency.get_or_create(&bl).set(ms / 1e3);
            }
        }
    }

    service_traffic.register(&mut reg, "service");
    backend_traffic.register(&mut reg, "backend");
    reg.register(
        "backend_refused_flows",
        "New TCP flows the backend answered with an RST (NAT services; passive health)",
        refused,
    );
    reg.register(
        "backend_syn_retries",
        "SYNs clients sent again on a half-open flow to the backend (passive health)",
        syn_retries,
    );
    reg.register(
        "backend_health_up",
        "Health check passing (1) or failing (0); unchecked counts as 1",
        health_up,
    );
    reg.register(
        "backend_serving",
        "The dataplane sends new flows to the backend (1) or not (0)",
        serving,
    );
    reg.register(
        "backend_state",
        "Dataplane state of the backend (up, draining, down): 1 for the current one",
        state,
    );
    reg.register(
        "backend_admin_state",
        "Operator state of the backend (up, drain, disabled): 1 for the current one",
        admin,
    );
    reg.register(
        "backend_active",
        "The active backend of a failover service (1)",
        active,
    );
    reg.register("backend_weight", "Configured weight", weight);
    reg.register("backend_priority", "Configured failover priority", priority);
    reg.register_with_unit(
        "backend_check_latency",
        "Latency of the last successful health check",
        Unit::Seconds,
        latency,
    );
    reg.register(
        "service_active_backends",
        "Active backends of a failover service (0: new connections are refused)",
        active_backends,
    );

    let counter = |v: u64| {
        let c = Counter::<u64>::default();
        c.inc_by(v);
        c
    };
    reg.register(
        "failovers",
        "Active backend changes of failover services",
        counter(status.failovers),
    );
    reg.register(
        "reloads",
        "Successful config reloads",
        counter(status.reloads),
    );
    reg.register(
        "config_errors",
        "Refused config reloads",
        counter(status.config_errors),
    );
    let g = |v: i64| {
        let g = Gauge::<i64>::default();
        g.set(v);
        g
    };
    reg.register(
        "flow_table_entries",
        "Entries in the dataplane flow table",
        g(status.flows as i64),
    );
    reg.register(
        "flow_table_capacity",
        "Size of the dataplane flow table (flow_table_size; a NAT flow takes two entries)",
        g(i64::from(status.capacity.flow_table_entries)),
    );
    reg.register(
        "snat_ports",
        "SNAT source ports per SNAT address (the snat_ports range)",
        g(i64::from(status.capacity.snat_ports)),
    );
    reg.register_with_unit(
        "uptime",
        "Seconds since the daemon started",
        Unit::Seconds,
        g(i64::try_from(status.uptime_secs).unwrap_or(i64::MAX)),
    );
    let verdicts = Counters::default();
    for (reason, n) in &status.reasons {
        verdicts
            .get_or_create(&vec![("reason", esc(reason))])
            .inc_by(*n);
    }
    reg.register(
        "dataplane_verdicts",
        "Dataplane verdicts by reason",
        verdicts,
    );
    let expired = Counters::default();
    for (reason, n) in &status.flows_expired {
        expired
            .get_or_create(&vec![("reason", esc(reason))])
            .inc_by(*n);
    }
    reg.register(
        "flows_expired",
        "Flows the controller's sweep removed, by reason (closed, idle, half_open, orphan: a reply entry whose flow was gone)",
        expired,
    );

    if let Some(l7) = &status.l7 {
        register_l7(&mut reg, l7);
    }
    if let Some(m) = &status.mllp {
        register_mllp(&mut reg, m);
    }
    if let Some(ha) = &status.ha {
        register_ha(&mut reg, ha);
    }
    if let Some(b) = &status.bgp {
        register_bgp(&mut reg, b);
    }
    if !status.l7_backends.is_empty() {
        let up = Gauges::default();
        for b in &status.l7_backends {
            let l: Labels = vec![("pool", esc(&b.pool)), ("backend", b.address.to_string())];
            gauge(&up, &l, i64::from(b.health != BackendHealth::Down));
        }
        reg.register(
            "l7_backend_health_up",
            "L7 pool member health check passing (1) or failing (0); unchecked counts as 1",
            up,
        );
    }
    if status.certificates.iter().any(|c| c.not_after.is_some()) {
        let expiry = Gauges::default();
        for c in &status.certificates {
            if let Some(t) = c.not_after {
                let l: Labels = vec![("listener", esc(&c.listener)), ("cert", esc(&c.cert))];
                gauge(&expiry, &l, t);
            }
        }
        reg.register(
            "l7_certificate_expiry_timestamp_seconds",
            "notAfter of an L7 listener's certificate file, Unix time",
            expiry,
        );
    }

    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut out, &reg);
    out
}

/// The BGP announcements: one 0/1 sample per VIP of the config (and any still announced),
/// the operator's withdraw and the failed `birdc` runs.
fn register_bgp(reg: &mut Registry, b: &crate::host::bird::BgpStatus) {
    let announced = Gauges::default();
    let vips: std::collections::BTreeSet<_> = b.vips.iter().chain(&b.announced).collect();
    for vip in vips {
        gauge(
            &announced,
            &vec![("vip", vip.to_string())],
            i64::from(b.announced.contains(vip)),
        );
    }
    reg.register(
        "bgp_announced",
        "The VIP is announced to the routers through BIRD (1) or withdrawn (0)",
        announced,
    );
    let withdrawn = Gauge::<i64>::default();
    withdrawn.set(i64::from(b.withdrawn_by_operator));
    reg.register(
        "bgp_withdrawn_by_operator",
        "The operator withdrew this balancer from BGP (balancer bgp withdraw)",
        withdrawn,
    );
    let failures = Counter::<u64>::default();
    failures.inc_by(b.failures);
    reg.register(
        "bgp_birdc_failures",
        "Failed updates of BIRD (routes file or birdc configure)",
        failures,
    );
}

/// The L7 proxy's counters: requests by status class and latency buckets per (route, pool),
/// TLS handshakes by version, connections, redirects, per-backend requests and connect
/// failures.
fn register_l7(reg: &mut Registry, m: &balancer_l7::Metrics) {
    let requests = Counters::default();
    let durations = Family::<Labels, HistogramSnapshot>::default();
    for r in &m.routes {
        let rl: Labels = vec![("route", esc(&r.route)), ("pool", esc(&r.pool))];
        for (i, n) in r.status_classes.iter().enumerate() {
            let mut l = rl.clone();
            l.push(("class", format!("{}xx", i + 1)));
            requests.get_or_create(&l).inc_by(*n);
        }
        durations
            .get_or_create(&rl)
            .set(r.latency_sum_seconds, &r.latency_buckets);
    }
    reg.register(
        "l7_requests",
        "HTTP responses by status class, per route and pool",
        requests,
    );
    reg.register_with_unit(
        "l7_request_duration",
        "Time from request received to response head sent, per route and pool",
        Unit::Seconds,
        durations,
    );
    let be_requests = Counters::default();
    let be_failures = Counters::default();
    for b in &m.backends {
        let l: Labels = vec![("pool", esc(&b.pool)), ("backend", b.address.to_string())];
        be_requests.get_or_create(&l).inc_by(b.requests);
        be_failures.get_or_create(&l).inc_by(b.connect_failures);
    }
    reg.register(
        "l7_backend_requests",
        "Requests sent to a backend",
        be_requests,
    );
    reg.register(
        "l7_backend_connect_failures",
        "Failed connects to a backend",
        be_failures,
    );
    let handshakes = Counters::default();
    handshakes
        .get_or_create(&vec![("version", "1.2".to_string())])
        .inc_by(m.tls_handshakes_tls12);
    handshakes
        .get_or_create(&vec![("version", "1.3".to_string())])
        .inc_by(m.tls_handshakes_tls13);
    reg.register(
        "l7_tls_handshakes",
        "Completed TLS handshakes by version",
        handshakes,
    );
    let c = |v: u64| {
        let c = Counter::<u64>::default();
        c.inc_by(v);
        c
    };
    reg.register(
        "l7_tls_handshake_failures",
        "Failed or timed-out TLS handshakes",
        c(m.tls_handshake_failures),
    );
    reg.register(
        "l7_connections",
        "Client connections accepted",
        c(m.connections_total),
    );
    reg.register(
        "l7_redirects",
        "Answers of the HTTP-to-HTTPS redirect listeners",
        c(m.redirects),
    );
    let open = Gauge::<i64>::default();
    open.set(i64::try_from(m.open_connections).unwrap_or(i64::MAX));
    reg.register("l7_open_connections", "Client connections open now", open);
}

/// The MLLP relay's counters, per service and per listener (counts and codes only: no
/// message content reaches a label).
fn register_mllp(reg: &mut Registry, m: &balancer_mllp::Metrics) {
    /// Name, help, and the value of one service.
    type PerService = (
        &'static str,
        &'static str,
        fn(&balancer_mllp::ServiceMetrics) -> u64,
    );
    let counters: [PerService; 6] = [
        (
            "mllp_messages_relayed",
            "Messages whose listener ACK was relayed to their sender",
            |s| s.relayed,
        ),
        (
            "mllp_messages_replayed",
            "Messages sent again after their listener failed before ACKing (possible duplicates)",
            |s| s.replayed,
        ),
        (
            "mllp_messages_unacked",
            "Messages given up without an ACK (sender closed so that it resends)",
            |s| s.unacked,
        ),
        (
            "mllp_frame_errors",
            "Sender connections closed for a framing error, a size limit or a mid-frame timeout",
            |s| s.frame_errors,
        ),
        (
            "mllp_senders_accepted",
            "Sender connections accepted",
            |s| s.senders_total,
        ),
        (
            "mllp_senders_refused",
            "Sender connections refused over max_senders",
            |s| s.senders_refused,
        ),
    ];
    let gauges: [PerService; 3] = [
        (
            "mllp_messages_in_flight",
            "Messages held now, waiting for a listener ACK",
            |s| s.in_flight,
        ),
        (
            "mllp_in_flight_bytes",
            "Bytes of the messages held now",
            |s| s.in_flight_bytes,
        ),
        (
            "mllp_senders_connected",
            "Sender connections open now",
            |s| s.senders_connected,
        ),
    ];
    for (name, help, get) in counters {
        let f = Counters::default();
        for s in &m.services {
            f.get_or_create(&vec![("service", esc(&s.name))])
                .inc_by(get(s));
        }
        reg.register(name, help, f);
    }
    for (name, help, get) in gauges {
        let f = Gauges::default();
        for s in &m.services {
            gauge(
                &f,
                &vec![("service", esc(&s.name))],
                i64::try_from(get(s)).unwrap_or(i64::MAX),
            );
        }
        reg.register(name, help, f);
    }
    let durations = Family::<Labels, HistogramSnapshot>::default();
    let acks = Counters::default();
    let delivered = Counters::default();
    let failures = Counters::default();
    let garbage = Counters::default();
    let active = Gauges::default();
    for s in &m.services {
        durations
            .get_or_create(&vec![("service", esc(&s.name))])
            .set_with(
                &balancer_mllp::ACK_LATENCY_BUCKETS,
                s.ack_latency_sum_seconds,
                &s.ack_latency_buckets,
            );
        for l in &s.listeners {
            let ll: Labels = vec![
                ("service", esc(&s.name)),
                ("listener", l.address.to_string()),
            ];
            for (code, n) in &l.acks {
                let mut c = ll.clone();
                c.push(("code", esc(code)));
                acks.get_or_create(&c).inc_by(*n);
            }
            delivered.get_or_create(&ll).inc_by(l.delivered);
            failures.get_or_create(&ll).inc_by(l.failures);
            garbage.get_or_create(&ll).inc_by(l.garbage);
            gauge(&active, &ll, i64::from(s.active == Some(l.address)));
        }
    }
    reg.register_with_unit(
        "mllp_ack_duration",
        "Time from a message written to the listener to its ACK read",
        Unit::Seconds,
        durations,
    );
    reg.register("mllp_acks", "Listener ACKs by code (MSA-1)", acks);
    reg.register(
        "mllp_listener_delivered",
        "Messages written to a listener (replays included)",
        delivered,
    );
    reg.register(
        "mllp_listener_failures",
        "Times the relay failed a listener (reset, ACK timeout, garbage, NACK rate, connect)",
        failures,
    );
    reg.register(
        "mllp_listener_garbage",
        "Answers of a listener that were not an HL7 ACK",
        garbage,
    );
    reg.register(
        "mllp_active_listener",
        "1 for the listener the relay sends a service's messages to",
        active,
    );
}

fn register_ha(reg: &mut Registry, ha: &crate::api::protocol::HaStatus) {
    use crate::control::ha::Role;
    let roles = Gauges::default();
    for r in [Role::Unknown, Role::Active, Role::Standby, Role::Fault] {
        gauge(
            &roles,
            &vec![("node", esc(&ha.node)), ("role", r.name().to_string())],
            i64::from(ha.role == r),
        );
    }
    reg.register("ha_role", "1 for this balancer's role in the pair", roles);
    if let Some(ms) = ha.peer_heard_ms {
        let g = Gauge::<f64, AtomicU64>::default();
        g.set(ms as f64 / 1e3);
        reg.register_with_unit(
            "ha_peer_heard",
            "Seconds since the peer's last valid sync message",
            Unit::Seconds,
            g,
        );
    }
    if let Some(same) = ha.config_matches {
        let g = Gauge::<i64>::default();
        g.set(i64::from(same));
        reg.register(
            "ha_config_matches",
            "1 when the peer runs the same config (digest of all but the per-node parts)",
            g,
        );
    }
    let m = &ha.mirror;
    let counters: [(&str, &str, u64); 11] = [
        (
            "ha_mirror_flows_sent",
            "New flows sent to the peer",
            m.flows_sent,
        ),
        (
            "ha_mirror_flows_applied",
            "Flows of the peer installed here",
            m.flows_applied,
        ),
        (
            "ha_mirror_flows_unknown",
            "Flows of the peer with no service or backend here",
            m.flows_unknown,
        ),
        (
            "ha_mirror_deletes_sent",
            "Expired flows sent to the peer",
            m.deletes_sent,
        ),
        (
            "ha_mirror_deletes_applied",
            "Expired flows of the peer removed here",
            m.deletes_applied,
        ),
        (
            "ha_mirror_resyncs_sent",
            "Full resync passes sent",
            m.resyncs_sent,
        ),
        (
            "ha_mirror_resyncs_received",
            "Full resync passes received",
            m.resyncs_received,
        ),
        (
            "ha_mirror_events_dropped",
            "New-flow events the program could not queue (ring buffer full)",
            m.events_dropped,
        ),
        (
            "ha_sync_messages_sent",
            "Sync messages sent",
            m.messages_sent,
        ),
        (
            "ha_sync_messages_accepted",
            "Sync messages received and accepted",
            m.messages_accepted,
        ),
        (
            "ha_sync_lost",
            "Sync messages of the peer that never arrived",
            m.lost,
        ),
    ];
    for (name, help, v) in counters {
        let c = Counter::<u64>::default();
        c.inc_by(v);
        reg.register(name, help, c);
    }
    let dropped = Counters::default();
    for (reason, v) in [
        ("auth", m.dropped_auth),
        ("replay", m.dropped_replay),
        ("malformed", m.dropped_malformed),
        ("foreign", m.dropped_foreign),
    ] {
        dropped
            .get_or_create(&vec![("reason", reason.to_string())])
            .inc_by(v);
    }
    reg.register(
        "ha_sync_dropped",
        "Sync datagrams dropped, by reason",
        dropped,
    );
    let lag = Gauge::<i64>::default();
    lag.set(i64::try_from(m.lag_messages).unwrap_or(i64::MAX));
    reg.register(
        "ha_mirror_lag_messages",
        "Sync messages sent that the peer has not acknowledged yet",
        lag,
    );
}

/// How long a scrape may wait for the daemon.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(10);

/// Binds the metrics endpoint for [`serve_on`] (the daemon binds it first thing at start,
/// so a taken port stops the start before anything else is touched).
pub async fn bind(addr: SocketAddr) -> crate::api::Result<TcpListener> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| crate::api::Error::BindMetrics { addr, source })?;
    info!(addr = %listener.local_addr().unwrap_or(addr), "metrics listening");
    Ok(listener)
}

/// Serves `GET /metrics` on a bound listener until it fails; everything else is 404 (tests
/// bind port 0 first).
pub async fn serve_on(listener: TcpListener, tx: mpsc::Sender<Message>) -> crate::api::Result<()> {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                // Usually out of descriptors: back off instead of spinning or dying.
                warn!(error = %e, "metrics accept failed; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let tx = tx.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let tx = tx.clone();
                async move { Ok::<_, Infallible>(handle(req, &tx).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(5))
                .serve_connection(TokioIo::new(stream), svc);
            match tokio::time::timeout(Duration::from_secs(120), conn).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    debug!(peer = %peer, error = %e, "metrics connection ended with an error")
                }
                Err(_) => {
                    debug!(peer = %peer, "metrics connection closed after the connection timeout")
                }
            }
        });
    }
}

async fn handle(req: HttpRequest<Incoming>, tx: &mpsc::Sender<Message>) -> Response<Full<Bytes>> {
    let format = Format::from_accept(
        req.headers()
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok()),
    );
    if req.method() != Method::GET || req.uri().path() != "/metrics" {
        return text(
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "not found\n".into(),
        );
    }
    let reply = tokio::time::timeout(SCRAPE_TIMEOUT, ask(tx, Request::Status)).await;
    let status = match reply {
        Ok(Ok(Ok(v))) => serde_json::from_value::<Status>(v)
            .map_err(|e| format!("bad status from the daemon: {e}")),
        Ok(Ok(Err(e))) => Err(e),
        Ok(Err(AskError::Gone)) => Err(AskError::Gone.to_string()),
        Ok(Err(AskError::Timeout)) | Err(_) => Err(AskError::Timeout.to_string()),
    };
    match status {
        Ok(s) => {
            let om = render(&s);
            let body = match format {
                Format::OpenMetrics => om,
                Format::Text => to_text_format(&om),
            };
            text(StatusCode::OK, format.content_type(), body)
        }
        Err(e) => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain; charset=utf-8",
            format!("{e}\n"),
        ),
    }
}

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

#[cfg(test)]
mod tests {
    use std::io::{Read as _, Write as _};

    /// A self-signed certificate made for this test; its notAfter is [`TEST_CERT_NOT_AFTER`].
    const TEST_CERT: &str = include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/expiry-test-cert.pem"
    ));
    /// `openssl x509 -enddate` of [`TEST_CERT`], in Unix seconds.
    const TEST_CERT_NOT_AFTER: i64 = 1830720360;

    use super::*;
    use crate::api::tests::sample_status;

    fn line<'a>(text: &'a str, prefix: &str) -> &'a str {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no line {prefix} in\n{text}"))
    }

    #[test]
    fn bgp_announcements_are_one_sample_per_vip_and_in_the_table() {
        let mut st = sample_status();
        assert!(
            !render(&st).contains("balancer_bgp_"),
            "no [bgp]: no bgp metrics"
        );
        let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        st.bgp = Some(crate::host::bird::BgpStatus {
            announced: vec![ip("10.77.0.100")],
            desired: vec![ip("10.77.0.100")],
            withdrawn_by_operator: false,
            vips: vec![ip("10.77.0.100"), ip("10.77.0.101")],
            routes_file: "/etc/bird/balancer-vips.conf".into(),
            last_result: Some("ok".into()),
            last_ok: Some(true),
            last_at: Some(1_900_000_000),
            failures: 2,
        });
        let t = render(&st);
        assert!(
            t.contains("balancer_bgp_announced{vip=\"10.77.0.100\"} 1\n"),
            "{t}"
        );
        assert!(
            t.contains("balancer_bgp_announced{vip=\"10.77.0.101\"} 0\n"),
            "{t}"
        );
        assert!(t.contains("balancer_bgp_withdrawn_by_operator 0\n"), "{t}");
        assert!(t.contains("balancer_bgp_birdc_failures_total 2\n"), "{t}");
        let table = crate::api::table::status_table(&st);
        assert!(
            table.contains("\nbgp announced 10.77.0.100  withdrawn by operator no  birdc ok\n"),
            "{table}"
        );
        let b = st.bgp.as_mut().unwrap();
        b.withdrawn_by_operator = true;
        b.desired.clear();
        b.last_ok = Some(false);
        b.last_result = Some("Unable to connect to server control socket".into());
        let table = crate::api::table::status_table(&st);
        assert!(
            table.contains("bgp announced 10.77.0.100  withdrawn by operator yes  pending none  birdc failed (2 failures): Unable to connect"),
            "{table}"
        );
    }

    #[test]
    fn render_sample() {
        let t = render(&sample_status());
        println!("{t}");
        assert!(t.ends_with("# EOF\n"));
        assert!(t.contains("# TYPE balancer_service_packets counter"));
        assert_eq!(
            line(&t, "balancer_service_packets_total{service=\"web\"}"),
            "balancer_service_packets_total{service=\"web\"} 3000000"
        );
        assert_eq!(
            line(
                &t,
                "balancer_backend_bytes_total{service=\"web\",backend=\"10.77.0.12:7002\"}"
            ),
            "balancer_backend_bytes_total{service=\"web\",backend=\"10.77.0.12:7002\"} 3000000000"
        );
        assert!(t.contains(
            "balancer_backend_health_up{service=\"hl7-listener\",backend=\"10.77.0.11:6661\"} 0\n"
        ));
        assert!(t.contains(
            "balancer_backend_health_up{service=\"web\",backend=\"[fd00::13]:7002\"} 1\n"
        ));
        assert!(
            t.contains("balancer_backend_serving{service=\"web\",backend=\"10.77.0.12:7002\"} 0\n")
        );
        assert!(t.contains("balancer_backend_state{service=\"web\",backend=\"10.77.0.12:7002\",state=\"draining\"} 1\n"));
        assert!(t.contains("balancer_backend_admin_state{service=\"web\",backend=\"10.77.0.12:7002\",admin=\"drain\"} 1\n"));
        assert!(t.contains(
            "balancer_backend_active{service=\"hl7-listener\",backend=\"10.77.0.12:6661\"} 1\n"
        ));
        assert!(t.contains("balancer_service_active_backends{service=\"hl7-listener\"} 1\n"));
        assert!(!t.contains("balancer_service_active_backends{service=\"web\"}"));
        assert!(t.contains("# UNIT balancer_backend_check_latency_seconds seconds"));
        let lat = line(
            &t,
            "balancer_backend_check_latency_seconds{service=\"hl7-listener\",backend=\"10.77.0.12:6661\"}",
        );
        let v: f64 = lat.rsplit(' ').next().unwrap().parse().unwrap();
        assert!((v - 0.00084).abs() < 1e-9, "{lat}");
        // No latency sample for a backend never checked successfully.
        assert!(!t.contains("balancer_backend_check_latency_seconds{service=\"hl7-listener\",backend=\"10.77.0.11:6661\"}"));
        assert!(t.contains("balancer_failovers_total 1\n"));
        assert!(t.contains(
            "balancer_backend_refused_flows_total{service=\"web\",backend=\"10.77.0.11:7002\"} 7\n"
        ), "{t}");
        assert!(t.contains(
            "balancer_backend_syn_retries_total{service=\"web\",backend=\"10.77.0.11:7002\"} 3\n"
        ), "{t}");
        assert!(t.contains("balancer_reloads_total 2\n"));
        assert!(t.contains("balancer_config_errors_total 1\n"));
        assert!(t.contains("balancer_flow_table_entries 1234\n"));
        assert!(t.contains("balancer_uptime_seconds 3723\n"));
        assert!(t.contains("balancer_dataplane_verdicts_total{reason=\"no_backend\"} 3\n"));
        assert!(
            t.contains("balancer_flows_expired_total{reason=\"orphan\"} 7\n"),
            "{t}"
        );
        assert!(
            t.contains("balancer_flows_expired_total{reason=\"half_open\"} 40\n"),
            "{t}"
        );
    }

    /// The sample status with an L7 proxy that served requests.
    fn with_l7() -> Status {
        let mut s = sample_status();
        s.l7 = Some(balancer_l7::Metrics {
            routes: vec![balancer_l7::RouteMetrics {
                route: "web-services".into(),
                pool: "web-services".into(),
                status_classes: [0, 90, 0, 8, 2],
                latency_buckets: [10, 20, 30, 20, 10, 5, 3, 1, 1, 0, 0, 0],
                latency_sum_seconds: 4.5,
            }],
            backends: vec![balancer_l7::BackendMetrics {
                pool: "web-services".into(),
                address: "10.77.0.11:7002".parse().unwrap(),
                requests: 100,
                connect_failures: 1,
            }],
            tls_handshakes_tls12: 3,
            tls_handshakes_tls13: 97,
            tls_handshake_failures: 1,
            open_connections: 4,
            connections_total: 100,
            redirects: 5,
            client_write_timeouts: 0,
            connections_refused: 0,
        });
        s.l7_backends = vec![crate::api::protocol::L7BackendStatus {
            pool: "web-services".into(),
            address: "10.77.0.11:7002".parse().unwrap(),
            health: BackendHealth::Down,
            check_latency_ms: None,
            requests: 100,
            connect_failures: 1,
        }];
        s
    }

    #[test]
    fn l7_latency_is_a_histogram_and_new_gauges_are_there() {
        let t = render(&with_l7());
        assert!(
            t.contains("# TYPE balancer_l7_request_duration_seconds histogram\n"),
            "{t}"
        );
        let rl = "route=\"web-services\",pool=\"web-services\"";
        assert!(
            t.contains(&format!(
                "balancer_l7_request_duration_seconds_bucket{{le=\"0.005\",{rl}}} 10\n"
            )),
            "{t}"
        );
        assert!(
            t.contains(&format!(
                "balancer_l7_request_duration_seconds_bucket{{le=\"0.025\",{rl}}} 60\n"
            )),
            "{t}"
        );
        assert!(
            t.contains(&format!(
                "balancer_l7_request_duration_seconds_bucket{{le=\"+Inf\",{rl}}} 100\n"
            )),
            "{t}"
        );
        assert!(
            t.contains(&format!(
                "balancer_l7_request_duration_seconds_count{{{rl}}} 100\n"
            )),
            "{t}"
        );
        assert!(
            t.contains(&format!(
                "balancer_l7_request_duration_seconds_sum{{{rl}}} 4.5\n"
            )),
            "{t}"
        );
        assert!(t.contains("balancer_flow_table_capacity 262144\n"));
        assert!(t.contains("balancer_snat_ports 22768\n"));
        assert!(t.contains(
            "balancer_l7_backend_health_up{pool=\"web-services\",backend=\"10.77.0.11:7002\"} 0\n"
        ));
        assert!(t.contains("balancer_l7_certificate_expiry_timestamp_seconds{listener=\"https\",cert=\"/etc/balancer/tls/lb.example.org.pem\"} 1900000000\n"));
        assert!(
            !t.contains("missing.pem"),
            "an unreadable file has no sample"
        );
    }

    #[test]
    fn mllp_counters_are_rendered_per_service_and_listener() {
        let mut s = sample_status();
        let l = |a: &str, aa: u64, ae: u64| balancer_mllp::ListenerMetrics {
            address: a.parse().unwrap(),
            delivered: aa + ae,
            acks: [("AA".to_string(), aa), ("AE".to_string(), ae)].into(),
            failures: 1,
            garbage: 0,
        };
        s.mllp = Some(balancer_mllp::Metrics {
            services: vec![balancer_mllp::ServiceMetrics {
                name: "hl7".into(),
                vip: "10.77.0.100:6661".parse().unwrap(),
                active: Some("10.77.0.12:6661".parse().unwrap()),
                senders_connected: 3,
                senders_total: 4,
                senders_refused: 0,
                relayed: 100,
                in_flight: 2,
                in_flight_bytes: 512,
                replayed: 1,
                frame_errors: 0,
                unacked: 0,
                ack_latency_buckets: vec![90, 10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                ack_latency_sum_seconds: 0.05,
                listeners: vec![l("10.77.0.11:6661", 40, 0), l("10.77.0.12:6661", 59, 1)],
            }],
        });
        let t = render(&s);
        for want in [
            "balancer_mllp_messages_relayed_total{service=\"hl7\"} 100\n",
            "balancer_mllp_messages_replayed_total{service=\"hl7\"} 1\n",
            "balancer_mllp_messages_in_flight{service=\"hl7\"} 2\n",
            "balancer_mllp_senders_connected{service=\"hl7\"} 3\n",
            "# TYPE balancer_mllp_ack_duration_seconds histogram\n",
            "balancer_mllp_ack_duration_seconds_bucket{le=\"0.001\",service=\"hl7\"} 100\n",
            "balancer_mllp_ack_duration_seconds_count{service=\"hl7\"} 100\n",
            "balancer_mllp_acks_total{service=\"hl7\",listener=\"10.77.0.12:6661\",code=\"AE\"} 1\n",
            "balancer_mllp_listener_failures_total{service=\"hl7\",listener=\"10.77.0.11:6661\"} 1\n",
            "balancer_mllp_active_listener{service=\"hl7\",listener=\"10.77.0.12:6661\"} 1\n",
            "balancer_mllp_active_listener{service=\"hl7\",listener=\"10.77.0.11:6661\"} 0\n",
        ] {
            assert!(t.contains(want), "{want}\n{t}");
        }
    }

    /// Runs `promtool` with `args` in `dir`, `stdin` piped in; returns (success, output).
    fn promtool(dir: &std::path::Path, args: &[&str], stdin: &str) -> (bool, String) {
        use std::process::{Command, Stdio};
        let mut c = Command::new("promtool")
            .args(args)
            .current_dir(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("promtool (Debian package prometheus; `cargo xtask setup` installs it)");
        c.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
        let o = c.wait_with_output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        (o.status.success(), text)
    }

    fn monitoring_dir() -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/prometheus")
    }

    #[test]
    fn promtool_checks_and_unit_tests_the_alerting_rules() {
        let dir = monitoring_dir();
        let (ok, out) = promtool(&dir, &["check", "rules", "balancer-rules.yml"], "");
        assert!(ok, "{out}");
        let (ok, out) = promtool(&dir, &["test", "rules", "balancer-rules.test.yml"], "");
        assert!(ok && out.contains("SUCCESS"), "{out}");
    }

    #[test]
    fn promtool_accepts_the_text_exposition() {
        for status in [sample_status(), with_l7()] {
            let t = to_text_format(&render(&status));
            assert!(
                t.contains("# TYPE balancer_service_packets_total counter\n"),
                "{t}"
            );
            assert!(t.contains("# HELP balancer_service_packets_total "), "{t}");
            assert!(!t.contains("# EOF") && !t.contains("# UNIT"), "{t}");
            let (ok, out) = promtool(&monitoring_dir(), &["check", "metrics"], &t);
            assert!(
                ok && out.trim().is_empty(),
                "promtool check metrics:\n{out}\n{t}"
            );
        }
    }

    #[test]
    fn the_text_format_keeps_every_sample() {
        let om = render(&with_l7());
        let t = to_text_format(&om);
        let samples = |x: &str| -> Vec<String> {
            x.lines()
                .filter(|l| !l.starts_with('#'))
                .map(str::to_owned)
                .collect()
        };
        assert_eq!(samples(&om), samples(&t));
        assert_eq!(Format::from_accept(None), Format::Text);
        assert_eq!(Format::from_accept(Some("text/plain")), Format::Text);
        assert_eq!(
            Format::from_accept(Some(
                "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
            )),
            Format::OpenMetrics,
            "what Prometheus sends"
        );
    }

    /// Every `balancer_*` name in the rules and the dashboard is one the exposition has.
    #[test]
    fn rules_and_dashboard_use_exported_names() {
        let t = render(&with_l7());
        let exported: std::collections::BTreeSet<&str> = t
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split(['{', ' ']).next())
            .collect();
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        for f in [
            "packaging/prometheus/balancer-rules.yml",
            "packaging/grafana/balancer-dashboard.json",
        ] {
            let text = std::fs::read_to_string(root.join(f)).unwrap();
            let mut used = 0;
            for (i, _) in text.match_indices("balancer_") {
                let name: String = text[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                assert!(
                    exported.contains(name.as_str()),
                    "{f}: {name} is not exported"
                );
                used += 1;
            }
            assert!(used > 10, "{f}");
        }
        serde_json::from_str::<serde_json::Value>(
            &std::fs::read_to_string(root.join("packaging/grafana/balancer-dashboard.json"))
                .unwrap(),
        )
        .unwrap();
    }

    #[test]
    fn certificate_expiry_reads_the_files() {
        let dir = std::env::temp_dir().join(format!("balancer-cert-expiry-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good.pem");
        std::fs::write(&good, TEST_CERT).unwrap();
        let bad = dir.join("bad.pem");
        std::fs::write(&bad, "not a certificate").unwrap();
        let l7: balancer_l7::L7Config = toml::from_str(&format!(
            "[[listener]]\nname = \"https\"\naddress = \"127.0.0.1:8443\"\n[[listener.certificate]]\ncert = {good:?}\nkey = \"/k\"\n[[listener.certificate]]\ncert = {bad:?}\nkey = \"/k\"\n"
        ))
        .unwrap();
        let c = certificate_expiry(&l7);
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].not_after, Some(TEST_CERT_NOT_AFTER));
        assert_eq!(c[1].not_after, None);
    }

    #[test]
    fn label_values_are_escaped() {
        let mut s = sample_status();
        s.services[0].name = "we\"ird\\name\n".into();
        let t = render(&s);
        assert!(t.contains("service=\"we\\\"ird\\\\name\\n\""), "{t}");
    }

    #[tokio::test]
    async fn serve_scrape() {
        let (tx, mut rx) = mpsc::channel::<Message>(4);
        tokio::spawn(async move {
            while let Some(m) = rx.recv().await {
                let reply = match m.request {
                    Request::Status => {
                        serde_json::to_value(sample_status()).map_err(|e| e.to_string())
                    }
                    _ => Err("unexpected".into()),
                };
                let _ = m.reply.send(reply);
            }
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve_on(listener, tx));

        let get = move |req: &'static str| {
            tokio::task::spawn_blocking(move || {
                let mut s = std::net::TcpStream::connect(addr).unwrap();
                s.write_all(req.as_bytes()).unwrap();
                let mut out = String::new();
                s.read_to_string(&mut out).unwrap();
                out
            })
        };
        let r = get("GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        assert!(r.contains("content-type: text/plain; version=0.0.4"), "{r}");
        assert!(
            r.contains("# TYPE balancer_backend_packets_total counter\n"),
            "{r}"
        );
        assert!(!r.contains("# EOF"), "{r}");
        let r = get("GET /metrics HTTP/1.1\r\nhost: x\r\naccept: application/openmetrics-text; version=1.0.0\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        assert!(
            r.contains("content-type: application/openmetrics-text"),
            "{r}"
        );
        assert!(r.contains("balancer_backend_packets_total{service=\"web\",backend=\"10.77.0.11:7002\"} 1000000\n"), "{r}");
        assert!(r.ends_with("# EOF\n"), "{r}");
        let r = get("GET /other HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        assert!(r.starts_with("HTTP/1.1 404"), "{r}");
        let r = get(
            "POST /metrics HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
        )
        .await
        .unwrap();
        assert!(r.starts_with("HTTP/1.1 404"), "{r}");
    }

    #[tokio::test]
    async fn daemon_gone_is_503() {
        let (tx, rx) = mpsc::channel::<Message>(1);
        drop(rx);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve_on(listener, tx));
        let r = tokio::task::spawn_blocking(move || {
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
                .unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).unwrap();
            out
        })
        .await
        .unwrap();
        assert!(r.starts_with("HTTP/1.1 503"), "{r}");
    }
}
