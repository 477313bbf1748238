//! Passive health: every [`POLL`] the controller reads each watched backend's `refused` and
//! `syn_retries` counters (written by the XDP program, see `balancer-common::Counters`) and
//! reports a backend whose failures within its window reach the service's limit. The daemon
//! then marks it down at once and restarts its active check from down.
//!
//! The detector is pure (counts in, bursts out) and tested here; [`Poller`] runs it on its own
//! thread against the pinned maps, so a busy daemon loop never delays a detection.

use std::{
    collections::{HashMap, VecDeque},
    net::SocketAddr,
    path::Path,
    thread,
    time::Instant,
};

use tokio::sync::{mpsc, watch};
use tracing::warn;

pub use crate::config::passive::{POLL, PassiveHealth};
use crate::dataplane::Dataplane;

/// A backend to watch: a healthy backend of a service with `passive_health`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Watch {
    /// Service name.
    pub service: String,
    /// Backend address.
    pub address: SocketAddr,
    /// Its dataplane slot (the counters' index).
    pub slot: u32,
    /// The slot's generation (a slot given to another backend starts over).
    pub generation: u32,
    /// The limit.
    pub spec: PassiveHealth,
}

/// A burst of failures of one watched backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Burst {
    /// The backend, as watched.
    pub watch: Watch,
    /// Refused flows plus retransmitted SYNs within the window.
    pub failures: u64,
}

#[derive(Debug)]
struct Track {
    watch: Watch,
    last: u64,
    seen: VecDeque<(Instant, u64)>,
    in_window: u64,
    fired: bool,
}

/// Counts in, bursts out.
#[derive(Debug, Default)]
pub struct Detector {
    tracks: HashMap<u32, Track>,
}

impl Detector {
    /// Watches exactly `watches`. A backend watched as before keeps its history; a new one (or
    /// a changed slot, generation or limit) starts from its counter's value now.
    pub fn set(&mut self, watches: &[Watch], read: impl Fn(u32) -> u64) {
        let mut next = HashMap::with_capacity(watches.len());
        for w in watches {
            let track = match self.tracks.remove(&w.slot) {
                Some(t) if t.watch == *w => t,
                _ => Track {
                    watch: w.clone(),
                    last: read(w.slot),
                    seen: VecDeque::new(),
                    in_window: 0,
                    fired: false,
                },
            };
            next.insert(w.slot, track);
        }
        self.tracks = next;
    }

    /// Reads every watched counter at `now`; a backend is reported once per watch.
    pub fn observe(&mut self, now: Instant, read: impl Fn(u32) -> u64) -> Vec<Burst> {
        let mut out = Vec::new();
        for (slot, t) in &mut self.tracks {
            let cur = read(*slot);
            // A counter below its last value was zeroed (slot reuse): start from it.
            let delta = cur.saturating_sub(t.last);
            t.last = cur;
            if delta > 0 {
                t.seen.push_back((now, delta));
                t.in_window += delta;
            }
            while let Some(&(at, n)) = t.seen.front() {
                if now.saturating_duration_since(at) < t.watch.spec.window {
                    break;
                }
                t.seen.pop_front();
                t.in_window -= n;
            }
            if !t.fired && t.in_window >= u64::from(t.watch.spec.failures) {
                t.fired = true;
                out.push(Burst {
                    watch: t.watch.clone(),
                    failures: t.in_window,
                });
            }
        }
        out
    }

    /// True when nothing is watched.
    pub fn is_empty(&self) -> bool {
        self.tracks.is_empty()
    }
}

/// The failures counter of a backend slot.
fn failures(dp: &Dataplane, slot: u32) -> u64 {
    let c = dp.backend_counters(slot);
    c.refused + c.syn_retries
}

/// The polling thread and the channel that tells it what to watch; dropping it stops the
/// thread.
pub struct Poller {
    watches: Option<watch::Sender<Vec<Watch>>>,
    handle: Option<thread::JoinHandle<()>>,
}

impl Poller {
    /// Starts polling the maps pinned at `pin`, watching nothing yet; bursts go to `bursts`.
    pub fn start(pin: &Path, bursts: mpsc::UnboundedSender<Burst>) -> Result<Self, std::io::Error> {
        let dp = Dataplane::open_pinned(pin).map_err(std::io::Error::other)?;
        let (tx, mut watches) = watch::channel(Vec::<Watch>::new());
        let handle = thread::Builder::new()
            .name("passive-health".into())
            .spawn(move || {
                let mut det = Detector::default();
                loop {
                    match watches.has_changed() {
                        Ok(true) => {
                            let w = watches.borrow_and_update().clone();
                            det.set(&w, |s| failures(&dp, s));
                        }
                        Ok(false) => {}
                        Err(_) => break,
                    }
                    if !det.is_empty() {
                        for b in det.observe(Instant::now(), |s| failures(&dp, s)) {
                            if bursts.send(b).is_err() {
                                return;
                            }
                        }
                    }
                    thread::sleep(POLL);
                }
            })?;
        Ok(Poller {
            watches: Some(tx),
            handle: Some(handle),
        })
    }

    /// Watches exactly `watches` from now on (an unchanged set keeps every history).
    pub fn watch(&self, watches: Vec<Watch>) {
        if let Some(tx) = &self.watches {
            tx.send_if_modified(|w| {
                if *w == watches {
                    false
                } else {
                    *w = watches;
                    true
                }
            });
        }
    }
}

impl Drop for Poller {
    fn drop(&mut self) {
        // Closing the channel ends the thread's loop.
        self.watches.take();
        if let Some(h) = self.handle.take()
            && h.join().is_err()
        {
            warn!("the passive health thread panicked");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{cell::RefCell, time::Duration};

    use super::*;

    fn w(slot: u32, failures: u32, window_ms: u64) -> Watch {
        Watch {
            service: "web".into(),
            address: format!("10.77.0.{}:80", 10 + slot).parse().unwrap(),
            slot,
            generation: 1,
            spec: PassiveHealth {
                failures,
                window: Duration::from_millis(window_ms),
            },
        }
    }

    /// Counters the test sets, read the way the poller reads the maps.
    struct Counts(RefCell<HashMap<u32, u64>>);

    impl Counts {
        fn new(v: &[(u32, u64)]) -> Self {
            Counts(RefCell::new(v.iter().copied().collect()))
        }
        fn add(&self, slot: u32, n: u64) {
            *self.0.borrow_mut().entry(slot).or_default() += n;
        }
        fn set(&self, slot: u32, n: u64) {
            self.0.borrow_mut().insert(slot, n);
        }
        fn read(&self) -> impl Fn(u32) -> u64 + '_ {
            |s| self.0.borrow().get(&s).copied().unwrap_or(0)
        }
    }

    #[test]
    fn a_burst_within_the_window_is_reported_once() {
        let c = Counts::new(&[(1, 500), (2, 0)]);
        let mut d = Detector::default();
        d.set(&[w(1, 5, 1000), w(2, 5, 1000)], c.read());
        let t0 = Instant::now();
        // Failures before the watch began do not count.
        assert!(d.observe(t0, c.read()).is_empty());
        c.add(1, 3);
        assert!(
            d.observe(t0 + Duration::from_millis(50), c.read())
                .is_empty()
        );
        c.add(1, 2);
        c.add(2, 4);
        let b = d.observe(t0 + Duration::from_millis(100), c.read());
        assert_eq!(b.len(), 1);
        assert_eq!((b[0].watch.slot, b[0].failures), (1, 5));
        c.add(1, 50);
        assert!(
            d.observe(t0 + Duration::from_millis(150), c.read())
                .is_empty(),
            "reported once per watch"
        );
    }

    #[test]
    fn failures_spread_wider_than_the_window_are_not_a_burst() {
        let c = Counts::new(&[]);
        let mut d = Detector::default();
        d.set(&[w(1, 3, 1000)], c.read());
        let t0 = Instant::now();
        for i in 0..10 {
            c.add(1, 1);
            let at = t0 + Duration::from_millis(600 * i);
            assert!(d.observe(at, c.read()).is_empty(), "poll {i}");
        }
    }

    #[test]
    fn a_new_watch_a_reused_slot_and_a_zeroed_counter_start_over() {
        let c = Counts::new(&[(1, 0)]);
        let mut d = Detector::default();
        d.set(&[w(1, 2, 1000)], c.read());
        let t0 = Instant::now();
        c.add(1, 2);
        assert_eq!(d.observe(t0, c.read()).len(), 1);
        // Down, then up again: the daemon watches it anew and it may fire again.
        d.set(&[], c.read());
        d.set(&[w(1, 2, 1000)], c.read());
        assert!(
            d.observe(t0, c.read()).is_empty(),
            "old failures do not count"
        );
        c.add(1, 2);
        assert_eq!(d.observe(t0, c.read()).len(), 1);
        // The same watch set again keeps the history (and the fired mark).
        d.set(&[w(1, 2, 1000)], c.read());
        c.add(1, 5);
        assert!(d.observe(t0, c.read()).is_empty());
        // The slot goes to another backend with zeroed counters.
        let mut other = w(1, 2, 1000);
        other.generation = 2;
        other.address = "10.77.0.99:80".parse().unwrap();
        d.set(std::slice::from_ref(&other), c.read());
        c.set(1, 1);
        assert!(
            d.observe(t0, c.read()).is_empty(),
            "zeroed counter: no delta"
        );
        c.add(1, 2);
        let b = d.observe(t0, c.read());
        assert_eq!(b.len(), 1);
        assert_eq!(b[0].watch, other);
    }
}
