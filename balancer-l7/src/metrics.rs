//! Counters for the controller to export. Lock-free on the request path: atomics behind
//! `Arc`s that outlive reloads, so a reload never resets a counter.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Upper bounds, in seconds, of the latency histogram buckets (a last `+Inf` bucket is implied).
pub const LATENCY_BUCKETS: [f64; 11] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Counters of one (route, pool) pair.
#[derive(Debug, Default)]
pub(crate) struct RouteCounters {
    status: [AtomicU64; 5],
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    latency_micros: AtomicU64,
}

impl RouteCounters {
    pub(crate) fn record(&self, status: u16, latency: Duration) {
        let class = usize::from((status / 100).clamp(1, 5)) - 1;
        self.status[class].fetch_add(1, Relaxed);
        let secs = latency.as_secs_f64();
        let b = LATENCY_BUCKETS
            .iter()
            .position(|&le| secs <= le)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.buckets[b].fetch_add(1, Relaxed);
        self.latency_micros.fetch_add(
            u64::try_from(latency.as_micros()).unwrap_or(u64::MAX),
            Relaxed,
        );
    }
}

/// Counters of one backend.
#[derive(Debug, Default)]
pub(crate) struct BackendCounters {
    pub(crate) requests: AtomicU64,
    pub(crate) connect_failures: AtomicU64,
}

/// All counters.
#[derive(Debug, Default)]
pub(crate) struct Registry {
    routes: Mutex<HashMap<(String, String), Arc<RouteCounters>>>,
    backends: Mutex<HashMap<(String, SocketAddr), Arc<BackendCounters>>>,
    pub(crate) tls12: AtomicU64,
    pub(crate) tls13: AtomicU64,
    pub(crate) tls_failures: AtomicU64,
    pub(crate) open_connections: AtomicU64,
    pub(crate) connections_total: AtomicU64,
    pub(crate) connections_refused: AtomicU64,
    pub(crate) client_write_timeouts: AtomicU64,
    pub(crate) redirects: AtomicU64,
}

impl Registry {
    /// The counters of a (route, pool) pair; unmatched requests use ("", "").
    pub(crate) fn route(&self, route: &str, pool: &str) -> Arc<RouteCounters> {
        let mut m = self.routes.lock().unwrap_or_else(|p| p.into_inner());
        m.entry((route.to_string(), pool.to_string()))
            .or_default()
            .clone()
    }

    pub(crate) fn backend(&self, pool: &str, addr: SocketAddr) -> Arc<BackendCounters> {
        let mut m = self.backends.lock().unwrap_or_else(|p| p.into_inner());
        m.entry((pool.to_string(), addr)).or_default().clone()
    }

    pub(crate) fn snapshot(&self) -> Metrics {
        let routes = self.routes.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<RouteMetrics> = routes
            .iter()
            .map(|((route, pool), c)| RouteMetrics {
                route: route.clone(),
                pool: pool.clone(),
                status_classes: std::array::from_fn(|i| c.status[i].load(Relaxed)),
                latency_buckets: std::array::from_fn(|i| c.buckets[i].load(Relaxed)),
                latency_sum_seconds: c.latency_micros.load(Relaxed) as f64 / 1e6,
            })
            .collect();
        out.sort_by(|a, b| (&a.route, &a.pool).cmp(&(&b.route, &b.pool)));
        drop(routes);
        let backends = self.backends.lock().unwrap_or_else(|p| p.into_inner());
        let mut bs: Vec<BackendMetrics> = backends
            .iter()
            .map(|((pool, addr), c)| BackendMetrics {
                pool: pool.clone(),
                address: *addr,
                requests: c.requests.load(Relaxed),
                connect_failures: c.connect_failures.load(Relaxed),
            })
            .collect();
        bs.sort_by(|a, b| (&a.pool, a.address).cmp(&(&b.pool, b.address)));
        Metrics {
            routes: out,
            backends: bs,
            tls_handshakes_tls12: self.tls12.load(Relaxed),
            tls_handshakes_tls13: self.tls13.load(Relaxed),
            tls_handshake_failures: self.tls_failures.load(Relaxed),
            open_connections: self.open_connections.load(Relaxed),
            connections_total: self.connections_total.load(Relaxed),
            connections_refused: self.connections_refused.load(Relaxed),
            client_write_timeouts: self.client_write_timeouts.load(Relaxed),
            redirects: self.redirects.load(Relaxed),
        }
    }
}

/// A snapshot of the layer-7 counters.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Metrics {
    /// Per (route, pool) pair; requests that matched no route are under route `""`, pool `""`.
    pub routes: Vec<RouteMetrics>,
    /// Per backend.
    pub backends: Vec<BackendMetrics>,
    /// Completed TLS 1.2 handshakes.
    pub tls_handshakes_tls12: u64,
    /// Completed TLS 1.3 handshakes.
    pub tls_handshakes_tls13: u64,
    /// Failed or timed-out handshakes (including refused old versions).
    pub tls_handshake_failures: u64,
    /// Client connections open now (TLS listeners).
    pub open_connections: u64,
    /// Client connections accepted since start (TLS listeners).
    pub connections_total: u64,
    /// Connections closed at accept because their listener had `max_connections` open
    /// (TLS and redirect listeners).
    #[serde(default)]
    pub connections_refused: u64,
    /// Client connections closed because a write to the client made no progress for
    /// `client_write_timeout`.
    #[serde(default)]
    pub client_write_timeouts: u64,
    /// Redirects answered by the redirect listeners.
    pub redirects: u64,
}

/// Counters of one (route, pool) pair.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RouteMetrics {
    /// Route name.
    pub route: String,
    /// Pool name.
    pub pool: String,
    /// Responses by status class: 1xx, 2xx, 3xx, 4xx, 5xx.
    pub status_classes: [u64; 5],
    /// Requests per latency bucket (not cumulative); bounds in [`LATENCY_BUCKETS`], last is `+Inf`.
    pub latency_buckets: [u64; LATENCY_BUCKETS.len() + 1],
    /// Sum of latencies, seconds.
    pub latency_sum_seconds: f64,
}

/// Counters of one backend.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct BackendMetrics {
    /// Pool name.
    pub pool: String,
    /// Backend address.
    pub address: SocketAddr,
    /// Requests sent to it.
    pub requests: u64,
    /// Connects that failed or timed out.
    pub connect_failures: u64,
}
