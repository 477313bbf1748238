//! Periodic checks of many targets, debounced into up/down events.

use std::{
    collections::HashMap,
    fmt,
    hash::{BuildHasher, RandomState},
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::{sync::mpsc::UnboundedSender, task::JoinHandle};

use crate::{HealthSpec, probe::Prober};

/// Opaque id of a target, chosen by the caller (for example a backend index).
pub type TargetId = u64;

/// Debounced state of a target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Health {
    /// Passing: `rise` consecutive successes since it was last down (or added up).
    Up,
    /// Failing: `fall` consecutive failures since it was last up (or added down).
    Down,
}

impl Health {
    /// `true` for [`Health::Up`].
    pub fn is_up(self) -> bool {
        self == Health::Up
    }
}

impl fmt::Display for Health {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Health::Up => "up",
            Health::Down => "down",
        })
    }
}

/// A change of a target's debounced state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthEvent {
    /// The id given to [`Monitor::add`].
    pub target: TargetId,
    /// The checked address.
    pub addr: SocketAddr,
    /// The new state.
    pub health: Health,
    /// Outcome of the check that completed the change, e.g. `"status 200"`,
    /// `"connect refused"`, `"MSA-1 AE"`, `"timeout 200ms"`. Never a payload byte.
    pub reason: String,
    /// Latency of that check when it succeeded.
    pub latency: Option<Duration>,
    /// When the change was decided.
    pub at: Instant,
}

/// State readable while the target's task runs.
#[derive(Debug)]
struct Shared {
    up: AtomicBool,
    /// Latency of the latest check in nanoseconds, [`NO_LATENCY`] when it failed.
    latency_ns: AtomicU64,
}

const NO_LATENCY: u64 = u64::MAX;

impl Shared {
    fn new(initial: Health) -> Self {
        Shared {
            up: AtomicBool::new(initial == Health::Up),
            latency_ns: AtomicU64::new(NO_LATENCY),
        }
    }

    fn health(&self) -> Health {
        if self.up.load(Ordering::Relaxed) {
            Health::Up
        } else {
            Health::Down
        }
    }

    fn latency(&self) -> Option<Duration> {
        match self.latency_ns.load(Ordering::Relaxed) {
            NO_LATENCY => None,
            ns => Some(Duration::from_nanos(ns)),
        }
    }
}

#[derive(Debug)]
struct Target {
    task: JoinHandle<()>,
    shared: Arc<Shared>,
}

impl Drop for Target {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Runs health checks for a set of targets: one tokio task per target, checks of different
/// targets concurrent. An event is sent only when a target's debounced state changes, after
/// `rise` consecutive successes (down to up) or `fall` consecutive failures (up to down).
///
/// The first check of a target runs at once when it is added; the next ones start every
/// `interval` (plus a random offset below `jitter`) on a fixed schedule that does not drift;
/// a check that overruns its slot skips the slots it missed. Dropping the monitor stops all
/// checks. A dropped event receiver does not stop the checks: [`Monitor::state`] stays current.
#[derive(Debug)]
pub struct Monitor {
    events: UnboundedSender<HealthEvent>,
    targets: HashMap<TargetId, Target>,
}

impl Monitor {
    /// A monitor with no targets, sending state changes to `events`.
    pub fn new(events: UnboundedSender<HealthEvent>) -> Self {
        Monitor {
            events,
            targets: HashMap::new(),
        }
    }

    /// Starts checking `addr` as `spec` says, from state `initial`; replaces (and stops)
    /// the checks of a target already known by `id`, whose state starts over from
    /// `initial`. An event the replaced task had already sent may still be in the channel.
    ///
    /// Call [`HealthSpec::validate`] first: out-of-range values are clamped here (interval
    /// and timeout at least 1 ms, rise and fall at least 1, jitter at most the interval).
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub fn add(&mut self, id: TargetId, addr: SocketAddr, spec: HealthSpec, initial: Health) {
        let shared = Arc::new(Shared::new(initial));
        let task = tokio::spawn(run_target(
            id,
            addr,
            spec,
            initial,
            shared.clone(),
            self.events.clone(),
        ));
        self.targets.insert(id, Target { task, shared });
    }

    /// Stops checking `id`; no event for it is sent after this returns (one already queued
    /// may still be received). Unknown ids are ignored.
    pub fn remove(&mut self, id: TargetId) {
        self.targets.remove(&id);
    }

    /// Current debounced state of `id`, `None` if unknown.
    pub fn state(&self, id: TargetId) -> Option<Health> {
        self.targets.get(&id).map(|t| t.shared.health())
    }

    /// Latency of the latest check of `id` if it succeeded; `None` if it failed, if no
    /// check has finished yet, or if `id` is unknown.
    pub fn last_latency(&self, id: TargetId) -> Option<Duration> {
        self.targets.get(&id).and_then(|t| t.shared.latency())
    }

    /// Ids of all targets being checked, in no particular order.
    pub fn targets(&self) -> impl Iterator<Item = TargetId> + '_ {
        self.targets.keys().copied()
    }
}

/// Rise/fall counting: turns a sequence of check outcomes into state changes.
#[derive(Debug, Clone)]
struct Debounce {
    state: Health,
    successes: u32,
    failures: u32,
    rise: u32,
    fall: u32,
}

impl Debounce {
    fn new(initial: Health, rise: u32, fall: u32) -> Self {
        Debounce {
            state: initial,
            successes: 0,
            failures: 0,
            rise: rise.max(1),
            fall: fall.max(1),
        }
    }

    /// Records one outcome; returns the new state when it changed.
    fn observe(&mut self, ok: bool) -> Option<Health> {
        if ok {
            self.failures = 0;
            self.successes = self.successes.saturating_add(1);
            if self.state == Health::Down && self.successes >= self.rise {
                self.state = Health::Up;
                return Some(Health::Up);
            }
        } else {
            self.successes = 0;
            self.failures = self.failures.saturating_add(1);
            if self.state == Health::Up && self.failures >= self.fall {
                self.state = Health::Down;
                return Some(Health::Down);
            }
        }
        None
    }
}

const MIN_PERIOD: Duration = Duration::from_millis(1);

async fn run_target(
    id: TargetId,
    addr: SocketAddr,
    mut spec: HealthSpec,
    initial: Health,
    shared: Arc<Shared>,
    events: UnboundedSender<HealthEvent>,
) {
    let interval = spec.interval.max(MIN_PERIOD);
    spec.timeout = spec.timeout.max(MIN_PERIOD);
    let jitter = spec.jitter.min(interval);
    let mut debounce = Debounce::new(initial, spec.rise, spec.fall);
    let mut rng = Rng::seeded(id);
    let kind = spec.kind.name();
    let prober = if matches!(spec.kind, crate::CheckKind::Https { .. }) {
        // Reads the CA file or the system trust store: keep that off the async workers.
        match tokio::task::spawn_blocking(move || Prober::new(addr, spec)).await {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(target_id = id, error = %e, "health check setup failed");
                return;
            }
        }
    } else {
        Prober::new(addr, spec)
    };
    let mut slot = tokio::time::Instant::now();
    loop {
        let result = prober.run().await;
        let latency = result.as_ref().ok().map(|s| s.latency);
        shared.latency_ns.store(
            latency.map_or(NO_LATENCY, |l| {
                u64::try_from(l.as_nanos()).unwrap_or(NO_LATENCY - 1)
            }),
            Ordering::Relaxed,
        );
        if let Some(health) = debounce.observe(result.is_ok()) {
            shared.up.store(health == Health::Up, Ordering::Relaxed);
            let reason = match &result {
                Ok(s) => s.detail.clone(),
                Err(e) => e.to_string(),
            };
            // debug: the controller logs each change once, at info, when it acts on it.
            tracing::debug!(target_id = id, %addr, kind, %health, %reason, "health changed");
            let event = HealthEvent {
                target: id,
                addr,
                health,
                reason,
                latency,
                at: Instant::now(),
            };
            if events.send(event).is_err() {
                tracing::debug!(target_id = id, "health event receiver gone");
            }
        }
        slot = next_slot(slot, interval, tokio::time::Instant::now());
        let offset = rng.below(jitter);
        tokio::time::sleep_until(slot + offset).await;
    }
}

/// The first slot after `now` on the grid `slot + k * interval` (k >= 1): the schedule
/// never drifts, and slots missed by an overrunning check are skipped, not bunched.
fn next_slot(
    slot: tokio::time::Instant,
    interval: Duration,
    now: tokio::time::Instant,
) -> tokio::time::Instant {
    let next = slot + interval;
    if next > now {
        return next;
    }
    let behind = now.duration_since(next).as_nanos();
    let skip = behind / interval.as_nanos() + 1;
    let skip = u32::try_from(skip).unwrap_or(u32::MAX);
    next + interval.saturating_mul(skip)
}

/// xorshift64*: enough to spread check start times, seeded per target and process.
struct Rng(u64);

impl Rng {
    fn seeded(id: TargetId) -> Self {
        Rng(RandomState::new().hash_one(id) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform-enough duration in `[0, max)`; zero when `max` is zero.
    fn below(&mut self, max: Duration) -> Duration {
        let ns = u64::try_from(max.as_nanos()).unwrap_or(u64::MAX);
        if ns == 0 {
            return Duration::ZERO;
        }
        Duration::from_nanos(self.next() % ns)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debounce_rise_and_fall() {
        let mut d = Debounce::new(Health::Down, 2, 3);
        assert_eq!(d.observe(true), None);
        assert_eq!(d.observe(true), Some(Health::Up));
        assert_eq!(d.observe(true), None);
        assert_eq!(d.observe(false), None);
        assert_eq!(d.observe(false), None);
        assert_eq!(d.observe(true), None, "a success resets the failure count");
        assert_eq!(d.observe(false), None);
        assert_eq!(d.observe(false), None);
        assert_eq!(d.observe(false), Some(Health::Down));
        assert_eq!(d.observe(false), None, "no repeated events");
        // Alternating outcomes never change anything.
        for i in 0..100 {
            assert_eq!(d.observe(i % 2 == 0), None);
        }
    }

    #[test]
    fn debounce_clamps_zero_thresholds() {
        let mut d = Debounce::new(Health::Up, 0, 0);
        assert_eq!(d.observe(false), Some(Health::Down));
        assert_eq!(d.observe(true), Some(Health::Up));
    }

    #[test]
    fn slots_do_not_drift() {
        let t0 = tokio::time::Instant::now();
        let i = Duration::from_millis(100);
        // A check finishing within its slot: next slot is exactly one interval later.
        assert_eq!(next_slot(t0, i, t0 + Duration::from_millis(30)), t0 + i);
        // Overrun by 2.5 intervals: slots 1 and 2 are skipped, the grid is kept.
        assert_eq!(
            next_slot(t0, i, t0 + Duration::from_millis(250)),
            t0 + Duration::from_millis(300)
        );
        // Exactly on a slot boundary: that slot has started, take the next.
        assert_eq!(
            next_slot(t0, i, t0 + Duration::from_millis(200)),
            t0 + Duration::from_millis(300)
        );
    }

    #[test]
    fn jitter_stays_below_bound() {
        let mut r = Rng::seeded(7);
        let max = Duration::from_millis(10);
        let draws: Vec<_> = (0..1000).map(|_| r.below(max)).collect();
        assert!(draws.iter().all(|d| *d < max));
        assert!(draws.iter().any(|d| *d > max / 2), "not spread");
        assert_eq!(r.below(Duration::ZERO), Duration::ZERO);
    }
}
