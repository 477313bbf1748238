//! Link counters.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use serde::Serialize;

/// Counters of a [`crate::Link`], updated with relaxed atomics (each is exact; a snapshot
/// is not one instant across all of them).
#[derive(Debug, Default)]
pub struct Stats {
    /// Datagrams sent.
    pub sent: AtomicU64,
    /// Bytes of the datagrams sent.
    pub sent_bytes: AtomicU64,
    /// Sends that failed (socket error, or a body too large to seal).
    pub send_errors: AtomicU64,
    /// Datagrams received, before any check.
    pub received: AtomicU64,
    /// Messages that passed every check and were handed to the caller.
    pub accepted: AtomicU64,
    /// Dropped: the HMAC tag did not verify.
    pub dropped_auth: AtomicU64,
    /// Dropped: replayed, duplicate, or stale (see [`crate::ReplayGuard`]).
    pub dropped_replay: AtomicU64,
    /// Dropped: too short, too long, not our magic or version, or an undecodable body.
    pub dropped_malformed: AtomicU64,
    /// Dropped: from an IP address other than the peer's.
    pub dropped_foreign_source: AtomicU64,
    /// Sequence numbers of the peer's that never arrived (see [`crate::Accept::lost`]).
    pub lost: AtomicU64,
}

/// A plain copy of [`Stats`], for status reports and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct StatsSnapshot {
    /// See [`Stats::sent`].
    pub sent: u64,
    /// See [`Stats::sent_bytes`].
    pub sent_bytes: u64,
    /// See [`Stats::send_errors`].
    pub send_errors: u64,
    /// See [`Stats::received`].
    pub received: u64,
    /// See [`Stats::accepted`].
    pub accepted: u64,
    /// See [`Stats::dropped_auth`].
    pub dropped_auth: u64,
    /// See [`Stats::dropped_replay`].
    pub dropped_replay: u64,
    /// See [`Stats::dropped_malformed`].
    pub dropped_malformed: u64,
    /// See [`Stats::dropped_foreign_source`].
    pub dropped_foreign_source: u64,
    /// See [`Stats::lost`].
    pub lost: u64,
}

impl Stats {
    /// Reads every counter.
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            sent: self.sent.load(Relaxed),
            sent_bytes: self.sent_bytes.load(Relaxed),
            send_errors: self.send_errors.load(Relaxed),
            received: self.received.load(Relaxed),
            accepted: self.accepted.load(Relaxed),
            dropped_auth: self.dropped_auth.load(Relaxed),
            dropped_replay: self.dropped_replay.load(Relaxed),
            dropped_malformed: self.dropped_malformed.load(Relaxed),
            dropped_foreign_source: self.dropped_foreign_source.load(Relaxed),
            lost: self.lost.load(Relaxed),
        }
    }
}

pub(crate) fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_reads_every_counter() {
        let s = Stats::default();
        let all = [
            &s.sent,
            &s.sent_bytes,
            &s.send_errors,
            &s.received,
            &s.accepted,
            &s.dropped_auth,
            &s.dropped_replay,
            &s.dropped_malformed,
            &s.dropped_foreign_source,
            &s.lost,
        ];
        for (i, c) in all.iter().enumerate() {
            add(c, i as u64 + 1);
        }
        let snap = s.snapshot();
        assert_eq!(
            [
                snap.sent,
                snap.sent_bytes,
                snap.send_errors,
                snap.received,
                snap.accepted,
                snap.dropped_auth,
                snap.dropped_replay,
                snap.dropped_malformed,
                snap.dropped_foreign_source,
                snap.lost,
            ],
            [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
        );
    }
}
