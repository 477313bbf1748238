//! The status as readers see it: what only the daemon knows (services, backends, health,
//! operator states, reload counts) is published as an immutable snapshot after every change;
//! counters are read from the pinned maps (and the L7 proxy and MLLP relay) by the reader itself. So `status` and a metrics
//! scrape never wait for the daemon loop, a reload or a burst of health events.

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

use arc_swap::ArcSwap;

use crate::{
    api::protocol::Status,
    dataplane::{Dataplane, counters::Traffic},
};

/// The daemon's part of the status: `traffic`, `flows`, `uptime_secs`, `reasons` and the L7
/// counters are filled in when read.
#[derive(Debug, Clone)]
pub struct Published {
    /// The status without counters.
    pub status: Status,
    /// For each service of `status` (same order): its id and its backends' slots.
    pub slots: Vec<(u32, Vec<u32>)>,
    /// The `[l7]` section in force (the console shows its listeners, routes and pools).
    pub l7: Option<Arc<balancer_l7::L7Config>>,
}

/// Where the daemon publishes and readers read.
#[derive(Clone)]
pub struct StatusBoard {
    published: Arc<ArcSwap<Published>>,
    maps: Arc<Mutex<Dataplane>>,
    flows: Arc<AtomicU64>,
    backend_flows: Arc<ArcSwap<BTreeMap<u32, u64>>>,
    expired: Arc<crate::control::flow_expiry::ExpiryTotals>,
    l7: Option<balancer_l7::MetricsHandle>,
    mllp: Option<balancer_mllp::MetricsHandle>,
    ha: Option<HaSource>,
    bgp: Option<crate::host::bird::ReportHandle>,
    started: Instant,
}

/// Reads the pair's part of the status (role, peer, mirror counters) when asked.
pub type HaSource = Arc<dyn Fn() -> crate::api::protocol::HaStatus + Send + Sync>;

impl std::fmt::Debug for StatusBoard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StatusBoard").finish_non_exhaustive()
    }
}

impl StatusBoard {
    /// A board starting with `first`; `maps` is a read-only handle on the pinned maps.
    pub fn new(
        first: Published,
        maps: Dataplane,
        flows: Arc<AtomicU64>,
        backend_flows: Arc<ArcSwap<BTreeMap<u32, u64>>>,
        l7: Option<balancer_l7::MetricsHandle>,
        mllp: Option<balancer_mllp::MetricsHandle>,
        started: Instant,
    ) -> Self {
        StatusBoard {
            published: Arc::new(ArcSwap::from_pointee(first)),
            maps: Arc::new(Mutex::new(maps)),
            flows,
            backend_flows,
            expired: Arc::default(),
            l7,
            mllp,
            ha: None,
            bgp: None,
            started,
        }
    }

    /// The same board, also reading what the flow-table sweeps removed.
    pub fn with_expiry(mut self, expired: Arc<crate::control::flow_expiry::ExpiryTotals>) -> Self {
        self.expired = expired;
        self
    }

    /// The same board, also reading the pair's role, peer and mirror counters.
    pub fn with_ha(mut self, ha: HaSource) -> Self {
        self.ha = Some(ha);
        self
    }

    /// The same board, also reading the BGP driver's results.
    pub fn with_bgp(mut self, bgp: crate::host::bird::ReportHandle) -> Self {
        self.bgp = Some(bgp);
        self
    }

    /// Replaces the daemon's part (readers in flight keep the one they loaded).
    pub fn publish(&self, p: Published) {
        self.published.store(Arc::new(p));
    }

    /// The `[l7]` section in force.
    pub fn l7_config(&self) -> Option<Arc<balancer_l7::L7Config>> {
        self.published.load().l7.clone()
    }

    /// The whole status, with counters read now.
    pub fn status(&self) -> Status {
        let p = self.published.load_full();
        let mut s = p.status.clone();
        s.uptime_secs = self.started.elapsed().as_secs();
        s.flows = usize::try_from(self.flows.load(Ordering::Relaxed)).unwrap_or(usize::MAX);
        s.flows_expired = self.expired.snapshot();
        // Only readers share this lock; the daemon has maps of its own.
        let maps = self.maps.lock().unwrap_or_else(|e| e.into_inner());
        s.reasons = maps
            .reasons()
            .into_iter()
            .map(|(r, v)| (r.name().to_string(), v))
            .collect();
        for (svc, (id, slots)) in s.services.iter_mut().zip(&p.slots) {
            svc.traffic = maps.service_counters(*id).into();
            for (b, slot) in svc.backends.iter_mut().zip(slots) {
                b.traffic = Traffic::from(maps.backend_counters(*slot));
            }
        }
        drop(maps);
        let kept = self.backend_flows.load();
        for (svc, (_, slots)) in s.services.iter_mut().zip(&p.slots) {
            for (b, slot) in svc.backends.iter_mut().zip(slots) {
                b.flows = kept.get(slot).copied().unwrap_or(0);
            }
        }
        if let Some(l7) = &self.l7 {
            let m = l7.snapshot();
            for b in &mut s.l7_backends {
                let c = m
                    .backends
                    .iter()
                    .find(|x| x.pool == b.pool && x.address == b.address);
                b.requests = c.map_or(0, |c| c.requests);
                b.connect_failures = c.map_or(0, |c| c.connect_failures);
            }
            s.l7 = Some(m);
        }
        if let (Some(h), Some(b)) = (&self.bgp, s.bgp.as_mut()) {
            h.fill(b);
        }
        s.mllp = self
            .mllp
            .as_ref()
            .map(balancer_mllp::MetricsHandle::snapshot)
            .filter(|m| !m.services.is_empty());
        if let Some(ha) = &self.ha {
            s.ha = Some(ha());
        }
        s
    }
}
