//! Counters of the relay: atomics on the message path, read as a [`Metrics`] snapshot.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Upper bounds, in seconds, of the ACK latency histogram buckets (`+Inf` is implied).
pub const ACK_LATENCY_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

/// ACK codes (MSA-1) counted per listener, in this order in [`ListenerMetrics::acks`].
pub const ACK_CODES: [&str; 6] = ["AA", "CA", "AE", "AR", "CE", "CR"];

/// Counters of one service.
#[derive(Debug, Default)]
pub(crate) struct ServiceCounters {
    pub(crate) senders_connected: AtomicU64,
    pub(crate) senders_total: AtomicU64,
    pub(crate) senders_refused: AtomicU64,
    pub(crate) relayed: AtomicU64,
    pub(crate) in_flight: AtomicU64,
    pub(crate) in_flight_bytes: AtomicU64,
    pub(crate) replayed: AtomicU64,
    pub(crate) frame_errors: AtomicU64,
    pub(crate) unacked: AtomicU64,
    buckets: [AtomicU64; ACK_LATENCY_BUCKETS.len() + 1],
    latency_micros: AtomicU64,
    listeners: Mutex<BTreeMap<SocketAddr, Arc<ListenerCounters>>>,
}

/// Counters of one listener of a service.
#[derive(Debug, Default)]
pub(crate) struct ListenerCounters {
    pub(crate) delivered: AtomicU64,
    pub(crate) acks: [AtomicU64; ACK_CODES.len()],
    pub(crate) failures: AtomicU64,
    pub(crate) garbage: AtomicU64,
}

impl ServiceCounters {
    pub(crate) fn listener(&self, addr: SocketAddr) -> Arc<ListenerCounters> {
        let mut m = self.listeners.lock().unwrap_or_else(|p| p.into_inner());
        m.entry(addr).or_default().clone()
    }

    pub(crate) fn record_latency(&self, latency: Duration) {
        let secs = latency.as_secs_f64();
        let b = ACK_LATENCY_BUCKETS
            .iter()
            .position(|&le| secs <= le)
            .unwrap_or(ACK_LATENCY_BUCKETS.len());
        self.buckets[b].fetch_add(1, Relaxed);
        self.latency_micros.fetch_add(
            u64::try_from(latency.as_micros()).unwrap_or(u64::MAX),
            Relaxed,
        );
    }

    pub(crate) fn snapshot(
        &self,
        name: &str,
        vip: SocketAddr,
        active: Option<SocketAddr>,
    ) -> ServiceMetrics {
        let listeners = self
            .listeners
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(a, c)| ListenerMetrics {
                address: *a,
                delivered: c.delivered.load(Relaxed),
                acks: ACK_CODES
                    .iter()
                    .zip(&c.acks)
                    .map(|(k, v)| (k.to_string(), v.load(Relaxed)))
                    .collect(),
                failures: c.failures.load(Relaxed),
                garbage: c.garbage.load(Relaxed),
            })
            .collect();
        ServiceMetrics {
            name: name.to_string(),
            vip,
            active,
            senders_connected: self.senders_connected.load(Relaxed),
            senders_total: self.senders_total.load(Relaxed),
            senders_refused: self.senders_refused.load(Relaxed),
            relayed: self.relayed.load(Relaxed),
            in_flight: self.in_flight.load(Relaxed),
            in_flight_bytes: self.in_flight_bytes.load(Relaxed),
            replayed: self.replayed.load(Relaxed),
            frame_errors: self.frame_errors.load(Relaxed),
            unacked: self.unacked.load(Relaxed),
            ack_latency_buckets: self.buckets.iter().map(|b| b.load(Relaxed)).collect(),
            ack_latency_sum_seconds: self.latency_micros.load(Relaxed) as f64 / 1e6,
            listeners,
        }
    }
}

/// A snapshot of every relayed service.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Metrics {
    /// Services, in configuration order.
    pub services: Vec<ServiceMetrics>,
}

/// A snapshot of one relayed service. No field holds message content.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ServiceMetrics {
    /// Service name.
    pub name: String,
    /// Address the relay listens on.
    pub vip: SocketAddr,
    /// The listener messages go to now.
    pub active: Option<SocketAddr>,
    /// Sender connections open now.
    pub senders_connected: u64,
    /// Sender connections accepted since start.
    pub senders_total: u64,
    /// Sender connections refused (`max_senders`).
    pub senders_refused: u64,
    /// Messages whose ACK was relayed to their sender.
    pub relayed: u64,
    /// Messages held now, waiting for an ACK.
    pub in_flight: u64,
    /// Bytes of the messages held now.
    pub in_flight_bytes: u64,
    /// Messages sent again to a listener after one failed before ACKing them (each one a
    /// possible duplicate at the listeners, logged with its control ID).
    pub replayed: u64,
    /// Sender connections closed for a framing error, a size limit or a mid-frame timeout.
    pub frame_errors: u64,
    /// Messages given up without an ACK (no usable listener within `hold_timeout`, or
    /// failed at `max_attempts` listeners): their
    /// sender's connection was closed so that it resends.
    pub unacked: u64,
    /// ACK latency (message written to a listener until its ACK read), per bucket of
    /// [`ACK_LATENCY_BUCKETS`] plus `+Inf`; not cumulative.
    pub ack_latency_buckets: Vec<u64>,
    /// Sum of the ACK latencies, in seconds.
    pub ack_latency_sum_seconds: f64,
    /// Listeners that were sent messages.
    pub listeners: Vec<ListenerMetrics>,
}

/// Counters of one listener.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ListenerMetrics {
    /// Listener address.
    pub address: SocketAddr,
    /// Messages written to it.
    pub delivered: u64,
    /// ACKs by code (MSA-1, see [`ACK_CODES`]).
    pub acks: BTreeMap<String, u64>,
    /// Times it was failed by the relay (reset, ACK timeout, garbage, NACK rate, connect).
    pub failures: u64,
    /// Answers that were not an HL7 ACK (no MLLP frame, no MSA-1).
    pub garbage: u64,
}
