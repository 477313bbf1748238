//! JSON reports printed by `blb-client` (one object on stdout) and parsed back by tests.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// `blb-client conns`: many short connections, each a byte-exact request/echo.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ConnsReport {
    /// Connections whose echo came back complete and byte-exact.
    pub ok: u64,
    /// Connections that failed (connect, reset, timeout or mismatch).
    pub failed: u64,
    /// Successful connections per backend name (from the id header).
    pub by_backend: BTreeMap<String, u64>,
    /// The first few failure reasons, for the test's message.
    #[serde(default)]
    pub errors: Vec<String>,
}

/// `blb-client stream`: one long-lived connection sending a chunk per interval.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct StreamReport {
    /// The backend that served the whole stream.
    pub backend: String,
    /// Payload bytes sent (and echoed back byte-exact when `ok`).
    pub bytes: u64,
    /// Chunks sent and verified.
    pub chunks: u64,
    /// True when every chunk came back byte-exact and the stream closed cleanly.
    pub ok: bool,
    /// What went wrong, when not `ok`.
    #[serde(default)]
    pub error: Option<String>,
    /// The longest time one chunk took to come back (write to last echoed byte), in ms: the
    /// stream's longest stall.
    #[serde(default)]
    pub max_stall_ms: u64,
    /// When that chunk was written, in ms since the stream connected.
    #[serde(default)]
    pub max_stall_at_ms: u64,
}

/// `blb-client udp`: datagrams, each answered by header + datagram.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct UdpReport {
    /// Datagrams answered byte-exact.
    pub ok: u64,
    /// Datagrams lost, timed out or answered wrongly.
    pub failed: u64,
    /// Answered datagrams per backend name.
    pub by_backend: BTreeMap<String, u64>,
}

/// `blb-client rate`: short connections (connect, 1 byte, header + echo, close) for a while.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct RateReport {
    /// Completed connections.
    pub ok: u64,
    /// Failed connections.
    pub failed: u64,
    /// Wall-clock seconds measured.
    pub seconds: f64,
    /// `ok / seconds`.
    pub conns_per_sec: f64,
    /// Completed connections per backend name.
    pub by_backend: BTreeMap<String, u64>,
    /// The first few errors (kind and connection), for diagnosis.
    #[serde(default)]
    pub errors: Vec<String>,
}

/// `blb-client hold`: connections opened at a rate and held open, then one check round (a
/// few bytes on every one, byte-exact echo) when the test says so.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct HoldReport {
    /// Connections opened (connected and the backend's id header read).
    pub opened: u64,
    /// Connections that could not be opened (connect, header or timeout).
    pub failed_to_open: u64,
    /// Seconds the opening took (first connect to the last one's end).
    pub open_seconds: f64,
    /// Opened connections whose check came back byte-exact.
    pub checked_ok: u64,
    /// Opened connections whose check failed (reset, timeout, mismatch).
    pub checked_failed: u64,
    /// Connections opened before the cutoff (by default one second before the check
    /// started; the check file can name another one).
    pub old: HoldClass,
    /// Connections opened at or after the cutoff.
    pub young: HoldClass,
    /// How long before the check's start the cutoff was, in ms.
    pub cutoff_before_check_ms: i64,
    /// How long the check round took, in ms.
    pub check_ms: u64,
    /// Opened connections per backend name (from the id header).
    pub by_backend: BTreeMap<String, u64>,
    /// The first few open failures.
    #[serde(default)]
    pub open_errors: Vec<String>,
    /// The first few check failures (old ones first).
    #[serde(default)]
    pub errors: Vec<String>,
}

/// One age class of a [`HoldReport`].
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct HoldClass {
    /// Connections of this class that were open when the check started.
    pub opened: u64,
    /// Checked byte-exact.
    pub ok: u64,
    /// Check failed.
    pub failed: u64,
}

impl ConnsReport {
    /// True when the per-backend counts are all within `tolerance` (e.g. 0.3 = ±30%) of an even
    /// spread over `backends` backends, and every backend got some.
    pub fn evenly_spread(&self, backends: usize, tolerance: f64) -> bool {
        spread_ok(&self.by_backend, self.ok, backends, tolerance)
    }
}

fn spread_ok(by: &BTreeMap<String, u64>, total: u64, backends: usize, tolerance: f64) -> bool {
    if by.len() != backends || backends == 0 {
        return false;
    }
    let even = total as f64 / backends as f64;
    by.values()
        .all(|&n| (n as f64 - even).abs() <= even * tolerance)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread() {
        let mut r = ConnsReport {
            ok: 300,
            ..Default::default()
        };
        r.by_backend.insert("be1".into(), 100);
        r.by_backend.insert("be2".into(), 120);
        r.by_backend.insert("be3".into(), 80);
        assert!(r.evenly_spread(3, 0.3));
        assert!(!r.evenly_spread(3, 0.1));
        assert!(!r.evenly_spread(4, 0.3));
    }
}
