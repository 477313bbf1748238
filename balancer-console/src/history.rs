//! Samples of the status kept in memory for the charts (the last hour), and the health and
//! failover changes found between two samples.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::Duration;

use crate::events::{EventKind, EventLog, failover, health_change};
use crate::source::{Health, StatusSnapshot, Traffic};

/// One sample of the counters the charts use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    /// Milliseconds since the console started.
    pub at_ms: u64,
    /// Packets forwarded (cumulative).
    pub packets: u64,
    /// Bytes forwarded (cumulative).
    pub bytes: u64,
    /// Flows created (cumulative).
    pub new_flows: u64,
}

impl Sample {
    fn of(at_ms: u64, t: &Traffic) -> Sample {
        Sample {
            at_ms,
            packets: t.packets,
            bytes: t.bytes,
            new_flows: t.new_flows,
        }
    }
}

/// Points kept per series over the window: the charts' resolution (10 s for an hour), whatever
/// the sampling interval, so memory stays at about 12 KiB per service and per backend.
pub const POINTS: usize = 360;

/// One counter series: a ring at the chart's step, and the last two raw samples for "now".
#[derive(Debug, Default)]
struct Series {
    ring: VecDeque<Sample>,
    prev: Option<Sample>,
    latest: Option<Sample>,
}

impl Series {
    fn push(&mut self, s: Sample, step_ms: u64) {
        self.prev = self.latest.replace(s);
        if self
            .ring
            .back()
            .is_none_or(|b| s.at_ms >= b.at_ms + step_ms)
        {
            if self.ring.len() >= POINTS {
                self.ring.pop_front();
            }
            self.ring.push_back(s);
        }
    }

    fn chart(&self) -> Vec<Sample> {
        let mut v: Vec<Sample> = self.ring.iter().copied().collect();
        if let Some(l) = self.latest
            && v.last().is_none_or(|b| l.at_ms > b.at_ms)
        {
            v.push(l);
        }
        v
    }
}

/// Series per service and per backend covering a window, and the health and active backend
/// seen last.
#[derive(Debug)]
pub struct History {
    step_ms: u64,
    services: HashMap<String, Series>,
    backends: HashMap<(String, SocketAddr), Series>,
    health: HashMap<(String, SocketAddr), Health>,
    active: HashMap<String, Option<SocketAddr>>,
    primed: bool,
}

impl History {
    /// Charts over `window` ([`POINTS`] points); samples come every `interval`.
    pub fn new(window: Duration, interval: Duration) -> History {
        let step = (window / POINTS as u32).max(interval);
        History {
            step_ms: u64::try_from(step.as_millis()).unwrap_or(u64::MAX),
            services: HashMap::new(),
            backends: HashMap::new(),
            health: HashMap::new(),
            active: HashMap::new(),
            primed: false,
        }
    }

    /// Adds a sample; changes of health and of the active backend since the previous sample
    /// go to `log` when given (not on the first sample, which only sets the baseline).
    pub fn record(&mut self, at_ms: u64, s: &StatusSnapshot, log: Option<&EventLog>) {
        let step = self.step_ms;
        let mut seen_b = Vec::new();
        for svc in &s.services {
            self.services
                .entry(svc.name.clone())
                .or_default()
                .push(Sample::of(at_ms, &svc.traffic), step);
            for b in &svc.backends {
                let key = (svc.name.clone(), b.address);
                self.backends
                    .entry(key.clone())
                    .or_default()
                    .push(Sample::of(at_ms, &b.traffic), step);
                let before = self.health.insert(key.clone(), b.health);
                if self.primed
                    && let Some(log) = log
                    && let Some(before) = before
                    && before != b.health
                {
                    log.push(
                        EventKind::Health,
                        "",
                        "",
                        &health_change(&svc.name, b.address, before, b.health),
                        "",
                    );
                }
                seen_b.push(key);
            }
            let before = self.active.insert(svc.name.clone(), svc.active);
            if self.primed
                && let Some(log) = log
                && let Some(before) = before
                && before != svc.active
            {
                log.push(
                    EventKind::Failover,
                    "",
                    "",
                    &failover(&svc.name, before, svc.active),
                    "",
                );
            }
        }
        // Services and backends gone after a reload take their history with them.
        self.services
            .retain(|n, _| s.services.iter().any(|svc| &svc.name == n));
        self.active
            .retain(|n, _| s.services.iter().any(|svc| &svc.name == n));
        self.backends.retain(|k, _| seen_b.contains(k));
        self.health.retain(|k, _| seen_b.contains(k));
        self.primed = true;
    }

    /// Chart samples of a service, oldest first (the ring, then the latest sample).
    pub fn service(&self, name: &str) -> Vec<Sample> {
        self.services
            .get(name)
            .map(Series::chart)
            .unwrap_or_default()
    }

    /// Chart samples of a backend, oldest first.
    pub fn backend(&self, service: &str, addr: SocketAddr) -> Vec<Sample> {
        self.backends
            .get(&(service.to_string(), addr))
            .map(Series::chart)
            .unwrap_or_default()
    }

    /// The last two raw samples of a service, for the rates "now".
    pub fn service_now(&self, name: &str) -> Vec<Sample> {
        self.services
            .get(name)
            .map(|s| s.prev.into_iter().chain(s.latest).collect())
            .unwrap_or_default()
    }
}

/// Per-second rates between consecutive samples of one counter: (ms, rate).
pub fn rates(samples: &[Sample], counter: impl Fn(&Sample) -> u64) -> Vec<(u64, f64)> {
    samples
        .windows(2)
        .map(|w| {
            let dt = w[1].at_ms.saturating_sub(w[0].at_ms).max(1) as f64 / 1000.0;
            // A counter that went back (a restart of the dataplane) counts as zero, not negative.
            let dv = counter(&w[1]).saturating_sub(counter(&w[0])) as f64;
            (w[1].at_ms, dv / dt)
        })
        .collect()
}

/// How much a counter grew over the samples no older than `span` before the last one.
pub fn growth(samples: &[Sample], span: Duration, counter: impl Fn(&Sample) -> u64) -> u64 {
    let Some(last) = samples.last() else {
        return 0;
    };
    let from = last.at_ms.saturating_sub(span.as_millis() as u64);
    let first = samples.iter().find(|s| s.at_ms >= from).unwrap_or(last);
    counter(last).saturating_sub(counter(first))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::source::{AdminState, BackendView, DataplaneState, ServiceView};

    fn snap(health: Health, active: Option<&str>, bytes: u64) -> StatusSnapshot {
        let b = |a: &str| BackendView {
            flows: 0,
            address: a.parse().unwrap(),
            weight: 1,
            priority: 0,
            admin: AdminState::Up,
            health,
            state: DataplaneState::Up,
            active: false,
            check_latency_ms: None,
            traffic: Traffic {
                bytes,
                ..Traffic::default()
            },
        };
        StatusSnapshot {
            services: vec![ServiceView {
                name: "hl7".into(),
                vip: "10.0.0.1:2575".parse().unwrap(),
                protocol: "tcp".into(),
                forwarding: "nat".into(),
                scheduler: "failover".into(),
                health_check: Some("mllp".into()),
                active: active.map(|a| a.parse().unwrap()),
                traffic: Traffic::default(),
                backends: vec![b("10.0.0.11:2575"), b("10.0.0.12:2575")],
            }],
            ..StatusSnapshot::default()
        }
    }

    #[test]
    fn coarse_ring_with_the_latest_sample_appended() {
        let log = EventLog::new(10);
        // 10 s per point over an hour; samples every second.
        let mut h = History::new(Duration::from_secs(3600), Duration::from_secs(1));
        for i in 0..25 {
            h.record(i * 1000, &snap(Health::Up, None, i * 100), Some(&log));
        }
        let at: Vec<u64> = h.service("hl7").iter().map(|s| s.at_ms).collect();
        assert_eq!(at, [0, 10_000, 20_000, 24_000]);
        let b = h.backend("hl7", "10.0.0.11:2575".parse().unwrap());
        assert_eq!(rates(&b, |s| s.bytes).last(), Some(&(24_000, 100.0)));
    }

    #[test]
    fn changes_become_events_and_rings_are_bounded() {
        let log = EventLog::new(100);
        // One point per second over 360 s.
        let mut h = History::new(Duration::from_secs(360), Duration::from_secs(1));
        h.record(0, &snap(Health::Up, Some("10.0.0.11:2575"), 0), Some(&log));
        assert!(
            log.recent(10, |_| true).is_empty(),
            "the first sample is the baseline"
        );
        h.record(
            1000,
            &snap(Health::Up, Some("10.0.0.11:2575"), 500),
            Some(&log),
        );
        h.record(
            2000,
            &snap(Health::Down, Some("10.0.0.12:2575"), 1500),
            Some(&log),
        );
        let ev = log.recent(10, |_| true);
        assert_eq!(ev.iter().filter(|e| e.kind == EventKind::Health).count(), 2);
        let f: Vec<_> = ev
            .iter()
            .filter(|e| e.kind == EventKind::Failover)
            .collect();
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].what, "hl7: active 10.0.0.11:2575 → 10.0.0.12:2575");
        let s = h.backend("hl7", "10.0.0.11:2575".parse().unwrap());
        assert_eq!(rates(&s, |t| t.bytes), vec![(1000, 500.0), (2000, 1000.0)]);
        assert_eq!(growth(&s, Duration::from_secs(1), |t| t.bytes), 1000);
        // A controller that records its changes itself: the samples add none.
        h.record(3000, &snap(Health::Up, Some("10.0.0.11:2575"), 2000), None);
        assert_eq!(log.recent(10, |_| true).len(), ev.len());
        for i in 4..400 {
            h.record(i * 1000, &snap(Health::Down, None, 0), Some(&log));
        }
        assert_eq!(h.service("hl7").len(), POINTS, "bounded");
        assert_eq!(h.service_now("hl7").len(), 2);
        h.record(401_000, &StatusSnapshot::default(), Some(&log));
        assert!(h.service("hl7").is_empty(), "gone with its service");
    }
}
