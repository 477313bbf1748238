//! Flow expiry: closed and idle flows leave the flow table, so their SNAT ports are free for
//! new flows long before LRU pressure would evict them (like conntrack's timers).
//!
//! Runs on its own thread with its own handle to the pinned flow table, so a sweep of a big
//! table never delays health changes in the daemon loop. Deleting concurrently with the XDP
//! program is safe: each element is replaced or removed atomically.

use std::{
    collections::BTreeMap,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::Duration,
};

use anyhow::Context as _;
use arc_swap::ArcSwap;
use aya::maps::{HashMap, Map, MapData};
use balancer_common::{
    FLOW_F_CLOSING, FLOW_F_DSR, FLOW_F_FORWARD, FLOW_F_HALF_OPEN, Flow, FlowKey, HALF_OPEN_SECS,
    MAP_FLOWS, PROTO_TCP, idle_secs, owns_reply,
};
use tracing::debug;

/// Seconds a closed flow stays (stray retransmissions of its last segments still pass).
pub const CLOSED_LINGER_SECS: u32 = 10;

pub use balancer_common::ORPHAN_GRACE_SECS;

/// Expiry settings.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// Idle seconds before a TCP flow goes.
    pub tcp_idle: u32,
    /// Idle seconds before a UDP flow goes.
    pub udp_idle: u32,
}

/// Monotonic seconds on the clock the XDP program stamps flows with
/// (`bpf_ktime_get_coarse_ns` is CLOCK_MONOTONIC_COARSE).
pub fn now_secs() -> u32 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u32
}

/// The reverse (reply) key of a NAT forward entry.
pub fn reply_key(f: &Flow, proto: u8) -> FlowKey {
    FlowKey {
        src: f.new_dst,
        dst: f.new_src,
        sport: f.new_dport,
        dport: f.new_sport,
        proto,
        pad: [0; 3],
    }
}

/// What one sweep did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Sweep {
    /// Entries looked at.
    pub seen: u64,
    /// Flows removed because they were closed.
    pub closed: u64,
    /// Flows removed because they were idle.
    pub idle: u64,
    /// Of `idle`, the half-open flows (a handshake that never completed).
    pub half_open: u64,
    /// Reply entries removed because their forward entry was gone or had another port.
    pub orphans: u64,
    /// Table entries removed (a NAT flow has two).
    pub entries_removed: u64,
    /// Established flows that stay (not closing, not half-open), by backend slot: what a
    /// drain leaves on a backend.
    pub kept: BTreeMap<u32, u64>,
    /// Keys of the forward entries removed (the HA mirror deletes them on the standby too).
    pub removed_forward: Vec<FlowKey>,
}

/// Why a flow leaves the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// It saw a FIN or RST and has been quiet for [`CLOSED_LINGER_SECS`].
    Closed,
    /// Its handshake never completed within [`HALF_OPEN_SECS`] of the client's last SYN.
    HalfOpen,
    /// Quiet for the protocol's idle timeout.
    Idle,
}

/// Whether a flow is over. `f` is its forward entry (or a reply entry whose forward entry is
/// gone, judged alone) and `r` its reply entry, when that belongs to this client. Stamps later
/// than `now` (touched while the sweep ran) count as activity now.
pub fn expiry(f: &Flow, r: Option<&Flow>, proto: u8, t: Timeouts, now: u32) -> Option<Expiry> {
    let idle_limit = if proto == PROTO_TCP {
        t.tcp_idle
    } else {
        t.udp_idle
    };
    let closing = f.flags & FLOW_F_CLOSING != 0 || r.is_some_and(|r| r.flags & FLOW_F_CLOSING != 0);
    let last = r.map_or(f.atime, |r| latest(f.atime, r.atime));
    let idle = idle_secs(now, last);
    if closing && idle >= CLOSED_LINGER_SECS {
        return Some(Expiry::Closed);
    }
    // A SYN whose handshake never completed (a SYN flood) goes early, counted from the
    // client's last SYN: the backend's SYN-ACK retransmits do not keep it.
    if f.flags & FLOW_F_HALF_OPEN != 0 && idle_secs(now, f.atime) >= HALF_OPEN_SECS {
        return Some(Expiry::HalfOpen);
    }
    (idle_limit != 0 && idle >= idle_limit).then_some(Expiry::Idle)
}

/// What a reply entry is to the sweep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Orphan {
    /// Its flow's forward entry is there and uses its SNAT address and port.
    Owned,
    /// It serves no flow (the forward entry was evicted or expired, or the client's flow has
    /// another port now): its port is freed at once.
    Free,
    /// Without its flow, but stamped in the last [`ORPHAN_GRACE_SECS`]: the program writes a
    /// claim's reply entry before its forward entry, so it may be a flow being made.
    Young,
}

/// Judges reply entry `r` at key `rk` against `fw`, the entry at its forward key.
pub fn orphan(rk: &FlowKey, r: &Flow, fw: Option<&Flow>, now: u32) -> Orphan {
    if fw.is_some_and(|fw| owns_reply(fw, rk)) {
        Orphan::Owned
    } else if idle_secs(now, r.atime) >= ORPHAN_GRACE_SECS {
        Orphan::Free
    } else {
        Orphan::Young
    }
}

/// One pass over the table.
pub fn sweep(flows: &mut HashMap<MapData, FlowKey, Flow>, t: Timeouts, now: u32) -> Sweep {
    let mut s = Sweep::default();
    let keys: Vec<FlowKey> = flows.keys().filter_map(Result::ok).collect();
    for k in keys {
        s.seen += 1;
        let Ok(f) = flows.get(&k, 0) else { continue };
        let (why, pair) = if f.flags & FLOW_F_FORWARD != 0 {
            let rk = reply_key(&f, k.proto);
            // The reply entry counts only if it belongs to this client.
            let r = if f.flags & FLOW_F_DSR == 0 {
                flows
                    .get(&rk, 0)
                    .ok()
                    .filter(|r| r.new_dst == k.src && r.new_dport == k.sport)
            } else {
                None
            };
            let why = expiry(&f, r.as_ref(), k.proto, t, now);
            let flags = r.map_or(f.flags, |r| f.flags | r.flags);
            if why.is_none() && flags & (FLOW_F_CLOSING | FLOW_F_HALF_OPEN) == 0 {
                *s.kept.entry(f.backend).or_default() += 1;
            }
            (why, r.map(|_| rk))
        } else {
            // A reply entry whose forward entry is gone (evicted or expired): judged alone.
            let fk = FlowKey {
                src: f.new_dst,
                dst: f.new_src,
                sport: f.new_dport,
                dport: f.new_sport,
                proto: k.proto,
                pad: [0; 3],
            };
            match orphan(&k, &f, flows.get(&fk, 0).ok().as_ref(), now) {
                Orphan::Owned => continue,
                Orphan::Free => {
                    let _ = flows.remove(&k);
                    s.entries_removed += 1;
                    s.orphans += 1;
                    continue;
                }
                Orphan::Young => (expiry(&f, None, k.proto, t, now), None),
            }
        };
        let Some(why) = why else { continue };
        let _ = flows.remove(&k);
        s.entries_removed += 1;
        if f.flags & FLOW_F_FORWARD != 0 {
            s.removed_forward.push(k);
        }
        if let Some(rk) = pair {
            let _ = flows.remove(&rk);
            s.entries_removed += 1;
        }
        match why {
            Expiry::Closed => s.closed += 1,
            Expiry::HalfOpen => {
                s.idle += 1;
                s.half_open += 1;
            }
            Expiry::Idle => s.idle += 1,
        }
    }
    s
}

/// The later of two stamps on a wrapping seconds clock.
fn latest(a: u32, b: u32) -> u32 {
    if b.wrapping_sub(a) < u32::MAX / 2 {
        b
    } else {
        a
    }
}

/// What the sweeps removed since the collector started (status and metrics).
#[derive(Debug, Default)]
pub struct ExpiryTotals {
    closed: AtomicU64,
    idle: AtomicU64,
    half_open: AtomicU64,
    orphans: AtomicU64,
}

impl ExpiryTotals {
    /// Adds one sweep.
    pub fn add(&self, s: &Sweep) {
        self.closed.fetch_add(s.closed, Ordering::Relaxed);
        self.idle
            .fetch_add(s.idle.saturating_sub(s.half_open), Ordering::Relaxed);
        self.half_open.fetch_add(s.half_open, Ordering::Relaxed);
        self.orphans.fetch_add(s.orphans, Ordering::Relaxed);
    }

    /// The totals by why (`closed`, `idle`, `half_open`, `orphan`).
    pub fn snapshot(&self) -> BTreeMap<String, u64> {
        [
            ("closed", &self.closed),
            ("idle", &self.idle),
            ("half_open", &self.half_open),
            ("orphan", &self.orphans),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.load(Ordering::Relaxed)))
        .collect()
    }
}

/// A running expiry thread; stops when dropped.
pub struct Collector {
    stop: Arc<AtomicBool>,
    /// Entries in the table at the last sweep (status and metrics read this instead of
    /// walking the table themselves).
    pub entries: Arc<AtomicU64>,
    /// Established flows by backend slot at the last sweep.
    pub kept: Arc<ArcSwap<BTreeMap<u32, u64>>>,
    /// What the sweeps removed so far.
    pub expired: Arc<ExpiryTotals>,
    handle: Option<thread::JoinHandle<()>>,
}

impl Collector {
    /// Starts sweeping the flow table pinned under `pin_dir` every `every`; the forward keys
    /// of removed flows go to `removed` (the pair's mirror), when given.
    pub fn start(
        pin_dir: &Path,
        timeouts: Arc<std::sync::Mutex<Timeouts>>,
        every: Duration,
        removed: Option<tokio::sync::mpsc::UnboundedSender<Vec<FlowKey>>>,
    ) -> anyhow::Result<Self> {
        let data =
            MapData::from_pin(pin_dir.join(MAP_FLOWS)).context("opening the pinned flow table")?;
        let mut flows: HashMap<MapData, FlowKey, Flow> = HashMap::try_from(Map::LruHashMap(data))?;
        let stop = Arc::new(AtomicBool::new(false));
        let entries = Arc::new(AtomicU64::new(0));
        let kept: Arc<ArcSwap<BTreeMap<u32, u64>>> = Arc::default();
        let expired: Arc<ExpiryTotals> = Arc::default();
        let (st, en, kp, ex) = (stop.clone(), entries.clone(), kept.clone(), expired.clone());
        let handle = thread::Builder::new()
            .name("flow-gc".into())
            .spawn(move || {
                while !st.load(Ordering::Relaxed) {
                    let t = match timeouts.lock() {
                        Ok(t) => *t,
                        Err(_) => break,
                    };
                    let mut s = sweep(&mut flows, t, now_secs());
                    // A removed flow took its reply entry too.
                    en.store(s.seen.saturating_sub(s.entries_removed), Ordering::Relaxed);
                    ex.add(&s);
                    kp.store(Arc::new(std::mem::take(&mut s.kept)));
                    // The pair's active balancer tells its standby what expired.
                    if let Some(tx) = &removed
                        && !s.removed_forward.is_empty()
                    {
                        let _ = tx.send(std::mem::take(&mut s.removed_forward));
                    }
                    if s.closed + s.idle + s.orphans > 0 {
                        debug!(
                            seen = s.seen,
                            closed = s.closed,
                            idle = s.idle,
                            orphans = s.orphans,
                            "expired flows"
                        );
                    }
                    let mut waited = Duration::ZERO;
                    while waited < every && !st.load(Ordering::Relaxed) {
                        thread::sleep(Duration::from_millis(100));
                        waited += Duration::from_millis(100);
                    }
                }
            })?;
        Ok(Collector {
            stop,
            entries,
            kept,
            expired,
            handle: Some(handle),
        })
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Timeouts = Timeouts {
        tcp_idle: 3600,
        udp_idle: 300,
    };

    fn flow(flags: u32, atime: u32) -> Flow {
        Flow {
            flags,
            atime,
            ..Default::default()
        }
    }

    #[test]
    fn a_flow_touched_after_the_sweep_read_its_clock_stays() {
        // The sweep reads `now` once; a busy flow is stamped a second later meanwhile.
        let now = 1_000;
        let f = flow(FLOW_F_FORWARD, now + 1);
        let r = flow(0, now + 1);
        assert_eq!(expiry(&f, Some(&r), PROTO_TCP, T, now), None);
        assert_eq!(
            expiry(&r, None, PROTO_TCP, T, now),
            None,
            "a lone reply entry"
        );
        let half = flow(FLOW_F_FORWARD | FLOW_F_HALF_OPEN, now + 1);
        assert_eq!(expiry(&half, None, PROTO_TCP, T, now), None);
        let closing = flow(FLOW_F_FORWARD | FLOW_F_CLOSING, now + 1);
        assert_eq!(expiry(&closing, None, PROTO_TCP, T, now), None);
    }

    #[test]
    fn expiry_totals_split_half_open_from_idle() {
        let t = ExpiryTotals::default();
        t.add(&Sweep {
            closed: 2,
            idle: 5,
            half_open: 3,
            orphans: 4,
            ..Default::default()
        });
        t.add(&Sweep {
            idle: 1,
            ..Default::default()
        });
        let want: BTreeMap<String, u64> =
            [("closed", 2), ("idle", 3), ("half_open", 3), ("orphan", 4)]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect();
        assert_eq!(t.snapshot(), want);
    }

    #[test]
    fn a_reply_entry_without_its_flow_frees_its_port_at_once() {
        let now = 5_000;
        let rk = FlowKey {
            src: [11; 16],
            dst: [200; 16],
            sport: 7002,
            dport: 10_001,
            proto: PROTO_TCP,
            pad: [0; 3],
        };
        let r = flow(0, now - 3_000);
        let fw = Flow {
            new_src: rk.dst,
            new_dst: rk.src,
            new_sport: rk.dport,
            new_dport: rk.sport,
            ..flow(FLOW_F_FORWARD, now - 3_000)
        };
        assert_eq!(orphan(&rk, &r, Some(&fw), now), Orphan::Owned);
        // Idle for far less than the TCP timeout, yet free: nothing uses the port.
        assert_eq!(orphan(&rk, &r, None, now), Orphan::Free);
        let moved = Flow {
            new_sport: 10_002,
            ..fw
        };
        assert_eq!(
            orphan(&rk, &r, Some(&moved), now),
            Orphan::Free,
            "the client's flow has another port"
        );
        let reply = Flow { flags: 0, ..fw };
        assert_eq!(orphan(&rk, &r, Some(&reply), now), Orphan::Free);
        // A claim in progress: reply entry written, forward entry not yet.
        let fresh = flow(0, now - ORPHAN_GRACE_SECS + 1);
        assert_eq!(orphan(&rk, &fresh, None, now), Orphan::Young);
        let later = flow(0, now + 1);
        assert_eq!(orphan(&rk, &later, None, now), Orphan::Young);
    }

    #[test]
    fn closed_half_open_and_idle_flows_go_on_time() {
        let now = 100_000;
        let busy = flow(FLOW_F_FORWARD, now - 5);
        assert_eq!(expiry(&busy, None, PROTO_TCP, T, now), None);
        let closed = flow(FLOW_F_FORWARD | FLOW_F_CLOSING, now - CLOSED_LINGER_SECS);
        assert_eq!(
            expiry(&closed, None, PROTO_TCP, T, now),
            Some(Expiry::Closed)
        );
        // The reply entry's FIN closes the pair; its later stamp keeps it a little longer.
        let f = flow(FLOW_F_FORWARD, now - 20);
        let r = flow(FLOW_F_CLOSING, now - 2);
        assert_eq!(expiry(&f, Some(&r), PROTO_TCP, T, now), None);
        let r = flow(FLOW_F_CLOSING, now - CLOSED_LINGER_SECS);
        assert_eq!(
            expiry(&f, Some(&r), PROTO_TCP, T, now),
            Some(Expiry::Closed)
        );
        // Half-open counts from the client's SYN only.
        let syn = flow(FLOW_F_FORWARD | FLOW_F_HALF_OPEN, now - HALF_OPEN_SECS);
        let synack = flow(FLOW_F_HALF_OPEN, now);
        assert_eq!(
            expiry(&syn, Some(&synack), PROTO_TCP, T, now),
            Some(Expiry::HalfOpen)
        );
        let udp = flow(FLOW_F_FORWARD, now - 300);
        assert_eq!(expiry(&udp, None, 17, T, now), Some(Expiry::Idle));
        assert_eq!(expiry(&udp, None, PROTO_TCP, T, now), None);
        let off = Timeouts {
            tcp_idle: 0,
            udp_idle: 0,
        };
        let old = flow(FLOW_F_FORWARD, now - 90_000);
        assert_eq!(
            expiry(&old, None, PROTO_TCP, off, now),
            None,
            "0: never idle"
        );
    }

    #[test]
    fn latest_handles_wrap() {
        assert_eq!(latest(5, 7), 7);
        assert_eq!(latest(7, 5), 7);
        assert_eq!(latest(u32::MAX - 1, 2), 2);
    }
}
