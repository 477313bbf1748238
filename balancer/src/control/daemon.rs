//! `balancer run`: load, adopt or attach, apply the config, then serve health events, operator
//! requests and signals. One task owns all state; everything else talks to it by channel.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use balancer_health::{Health as Checked, HealthEvent, Monitor};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};
use tracing::{debug, error, info, warn};

use crate::{
    api::protocol::{BackendStatus, Message, Request, ServiceStatus, Status},
    config::{self, Validated},
    control::{
        ReconcileError,
        checks::{Checks, Owner},
        operator::{self, OperatorStates},
        passive,
        plan::{self, HealthBook},
        state::{BackendHealth, Event, State},
        status::{Published, StatusBoard},
    },
    dataplane::{Dataplane, LoadOptions, counters::Traffic},
    host::{bird, net},
};

/// Options of `balancer run`.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Config file.
    pub config: PathBuf,
    /// Pin directory override.
    pub pin_path: Option<PathBuf>,
}

/// Everything the daemon task owns.
pub struct Daemon {
    opts: RunOptions,
    cfg: Validated,
    dp: Dataplane,
    state: State,
    monitor: Monitor,
    checks: Checks,
    l7: Option<balancer_l7::L7>,
    /// The HL7 message relay of the `mode = "mllp"` services.
    mllp: Option<balancer_mllp::Relay>,
    /// Listeners the relay failed (passive health); taken by [`run`].
    mllp_failures: Option<mpsc::Receiver<balancer_mllp::ListenerFailure>>,
    gc_timeouts: std::sync::Arc<std::sync::Mutex<crate::control::flow_expiry::Timeouts>>,
    /// Kept for its lifetime: dropping it stops the sweep.
    _flow_expiry: crate::control::flow_expiry::Collector,
    /// Reads the passive-health counters; told what to watch at every publish.
    passive: passive::Poller,
    /// The pin directory in use (maps, program, links).
    pin_dir: PathBuf,
    /// The VIP announcements through BIRD (`[bgp]`); told the wanted set at every publish.
    bgp: Option<bird::Driver>,
    /// The operator withdrew this balancer from BGP (`balancer bgp withdraw`).
    bgp_withdrawn: bool,
    board: StatusBoard,
    /// The `[l7]` section in force, shared with status readers.
    l7_config: Option<std::sync::Arc<balancer_l7::L7Config>>,
    reloads: u64,
    config_errors: u64,
    failovers: u64,
    /// One balancer of a pair (`[ha]`): its role and what keepalived tracks.
    ha: Option<HaNode>,
    /// The pair's sync runtime (with `[ha]`).
    pair: Option<crate::control::pair::Pair>,
    /// The active peer's control states (a standby follows them); taken by [`run`].
    peer_control: Option<mpsc::UnboundedReceiver<Vec<balancer_sync::ServiceControl>>>,
    /// The control socket and metrics endpoint, bound first thing in [`Daemon::start`];
    /// taken by [`run`], which serves them.
    listeners: Option<Listeners>,
}

/// The operator endpoints, bound before anything else is touched.
struct Listeners {
    control: tokio::net::UnixListener,
    metrics: Option<tokio::net::TcpListener>,
}

/// This balancer's part of a pair.
struct HaNode {
    /// The section.
    cfg: config::Ha,
    /// The role keepalived told last.
    role: crate::control::ha::Role,
    /// Where the role is recorded for a restarted controller.
    role_file: PathBuf,
    /// The file keepalived tracks.
    track_file: PathBuf,
    /// What the track file says now (it turns to "not serving" when the program is no
    /// longer attached to an interface).
    serving: bool,
}

/// Why a reload was refused or failed; the running config keeps serving.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The file does not validate.
    #[error("config refused, nothing changed:\n{0}")]
    Config(#[from] config::ConfigError),
    /// This host cannot run it (SNAT ports in the ephemeral range).
    #[error("{0}; nothing changed")]
    Host(#[from] config::HostCheckError),
    /// Interfaces, pin path, `[console]`, `[bgp]` or the presence of `[l7]` changed.
    #[error("{0} change only with a restart; nothing changed")]
    RestartNeeded(&'static str),
    /// The L7 proxy refused its part (certificate, listeners).
    #[error("l7 refused, nothing changed: {0}")]
    L7(String),
    /// The MLLP relay refused its part (limits, a VIP it cannot bind).
    #[error("mllp relay refused, nothing changed: {0}")]
    Mllp(String),
    /// The planner refused it, or applying it failed and was undone.
    #[error("reload refused, nothing changed: {0}")]
    Reconcile(#[from] ReconcileError),
}

impl Daemon {
    /// Loads, adopts or attaches, and applies the config.
    pub async fn start(
        opts: RunOptions,
        health_events: mpsc::UnboundedSender<HealthEvent>,
        bursts: mpsc::UnboundedSender<passive::Burst>,
    ) -> anyhow::Result<Self> {
        let cfg = config::load(&opts.config).map_err(|e| anyhow::anyhow!("{e}"))?;
        // First of all: a second daemon on the same socket (another balancer answers there)
        // stops here, before it touches the keepalived track file, the pinned maps or the
        // interfaces of the one that runs; so does one whose metrics port is taken.
        let listeners = Listeners {
            control: crate::api::server::bind(&cfg.socket).context("control socket")?,
            metrics: match cfg.metrics {
                Some(addr) => Some(crate::api::metrics::bind(addr).await?),
                None => None,
            },
        };
        let ha = cfg.ha.clone().map(|h| {
            let role_file = crate::control::ha::role_file(&cfg.socket);
            let role = crate::control::ha::load_role(&role_file);
            let track_file = crate::host::keepalived::track_file(&cfg);
            // Not serving until ready: keepalived keeps (or moves) the addresses elsewhere.
            if let Err(e) = crate::control::ha::write_track(&track_file, false) {
                warn!(path = %track_file.display(), error = %e, "cannot write the keepalived track file");
            }
            info!(node = %h.node, peer = %h.peer, role = %role, "one balancer of a pair: keepalived owns the addresses");
            HaNode {
                cfg: h,
                role,
                role_file,
                track_file,
                serving: false,
            }
        });
        let pin = opts
            .pin_path
            .clone()
            .unwrap_or_else(|| cfg.pin_path.clone());
        cfg.check_host()?;
        for w in cfg.warnings() {
            warn!("{w}");
        }
        let mut dp = Dataplane::load(&LoadOptions {
            pin_path: Some(pin.clone()),
            flow_entries: cfg.flow_table_size,
        })?;
        if dp.adopted {
            info!(pin_path = %pin.display(), "adopted pinned maps: established flows continue");
        }
        let admin_file = admin_file(&cfg);
        let ops = operator::load(&admin_file).unwrap_or_else(|e| {
            warn!(path = %admin_file.display(), error = %e, "ignoring unreadable operator states");
            OperatorStates::new()
        });
        let health_file = health_file(&cfg);
        let book = plan::load_health(&health_file).unwrap_or_else(|e| {
            warn!(path = %health_file.display(), error = %e, "ignoring an unreadable health record");
            HealthBook::new()
        });
        let p = crate::control::reconcile(&mut dp, &cfg, None, &book, &ops)?;
        for ((svc, addr), o) in &ops {
            info!(service = %svc, backend = %addr, state = ?o.admin, "operator state restored");
        }
        // The first choice of an active backend is no failover (failover.rs logs it).
        let state = p.next;
        // Before the program sees traffic: a flow to a backend on a VLAN must find its trunk.
        if let Err(e) = sync_vlans(&mut dp, &cfg.interfaces) {
            warn!(error = %format!("{e:#}"), "VLAN devices not read: flows through them are not tagged");
        }
        for iface in &cfg.interfaces {
            net::enable_forwarding(iface)?;
            dp.attach(iface, cfg.xdp_mode)
                .with_context(|| format!("attaching to {iface}"))?;
        }
        let gc_timeouts = std::sync::Arc::new(std::sync::Mutex::new(timeouts(&cfg)));
        let (removed_tx, removed_rx) = mpsc::unbounded_channel();
        let gc = crate::control::flow_expiry::Collector::start(
            &pin,
            gc_timeouts.clone(),
            Duration::from_secs(5),
            ha.as_ref().map(|_| removed_tx),
        )?;
        let (peer_tx, peer_rx) = mpsc::unbounded_channel();
        let pair = match &ha {
            Some(h) => {
                dp.set_mirror(h.role == crate::control::ha::Role::Active)?;
                let reader = dp.mirror_reader()?;
                let text = std::fs::read_to_string(&opts.config)
                    .with_context(|| format!("reading {}", opts.config.display()))?;
                Some(
                    crate::control::pair::Pair::start(
                        &h.cfg, &text, h.role, &pin, reader, peer_tx, removed_rx,
                    )
                    .await
                    .context("starting the pair sync")?,
                )
            }
            None => None,
        };
        let l7 = match &cfg.l7 {
            Some(l7) => {
                // Its addresses were put on the interface with the VIPs.
                Some(
                    balancer_l7::L7::start(l7.clone())
                        .await
                        .context("starting the L7 proxy")?,
                )
            }
            None => None,
        };
        // Its VIPs were put on the interface by the reconcile; the XDP program passes them.
        // Started even with no mllp service, so that a reload can add one.
        let (relay, failures) = balancer_mllp::Relay::start(mllp_services(&cfg))
            .await
            .context("starting the MLLP relay")?;
        let (mllp, mllp_failures) = (Some(relay), Some(failures));
        let ha_source = match &pair {
            Some(p) => Some(p.status_source(&pin)?),
            None => None,
        };
        let board = StatusBoard::new(
            Published {
                status: Status::default(),
                slots: Vec::new(),
                l7: None,
            },
            Dataplane::open_pinned(&pin).context("opening the pinned maps for status readers")?,
            gc.entries.clone(),
            gc.kept.clone(),
            l7.as_ref().map(balancer_l7::L7::metrics_handle),
            mllp.as_ref().map(balancer_mllp::Relay::metrics_handle),
            Instant::now(),
        );
        let board = board.with_expiry(gc.expired.clone());
        let board = match ha_source {
            Some(h) => board.with_ha(h),
            None => board,
        };
        let bgp = d_bgp(&cfg);
        let bgp_withdrawn = match &bgp {
            Some(_) => operator::load_bgp_withdrawn(&bgp_file(&cfg)).unwrap_or_else(|e| {
                warn!(path = %bgp_file(&cfg).display(), error = %e, "ignoring an unreadable bgp state; announcing");
                false
            }),
            None => false,
        };
        if bgp_withdrawn {
            info!(
                "bgp: withdrawn by the operator before this start; nothing is announced until `balancer bgp announce`"
            );
        }
        let board = match &bgp {
            Some(b) => board.with_bgp(b.handle()),
            None => board,
        };
        let mut d = Daemon {
            opts,
            cfg,
            dp,
            state,
            monitor: Monitor::new(health_events),
            checks: Checks::default(),
            l7,
            mllp,
            mllp_failures,
            gc_timeouts,
            _flow_expiry: gc,
            pin_dir: pin.clone(),
            passive: passive::Poller::start(&pin, bursts)
                .context("starting the passive health poller")?,
            board,
            bgp,
            bgp_withdrawn,
            l7_config: None,
            reloads: 0,
            config_errors: 0,
            failovers: 0,
            ha,
            pair,
            peer_control: Some(peer_rx),
            listeners: Some(listeners),
        };
        d.l7_config = d.cfg.l7.clone().map(std::sync::Arc::new);
        d.register_checks();
        d.prime_neighbours(true);
        d.save_health();
        d.publish();
        Ok(d)
    }

    /// Follows the links of the namespace: the attached interfaces' MACs (a unicast frame to
    /// another MAC is passed, so a changed MAC must be recorded at once) and the 802.1Q VLAN
    /// devices (a flow whose next hop is one leaves through its trunk, tagged). At start, on
    /// every rtnetlink link change (coalesced, [`net::LINK_SETTLE`] apart) and every minute as
    /// a backstop; a failure is logged and the old entries kept.
    fn sync_links(&mut self) {
        let mut changed = false;
        for iface in &self.cfg.interfaces {
            match self.dp.refresh_interface_mac(iface) {
                Ok(Some(mac)) => {
                    changed = true;
                    info!(interface = %iface, mac = %crate::dataplane::fmt_mac(&mac), "interface MAC changed: frames to it are balanced, frames to the old one passed")
                }
                Ok(None) => {}
                Err(e) => {
                    warn!(interface = %iface, error = %e, "interface MAC not read: the recorded one stays")
                }
            }
        }
        // The kernel forgets a device's neighbours when its MAC changes, and the program cannot
        // resolve one: without this, new flows to backends no health check touches would be
        // dropped (`drop_no_neighbour`) until the next 10 s refresh.
        if changed {
            self.prime_neighbours(true);
        }
        if let Err(e) = sync_vlans(&mut self.dp, &self.cfg.interfaces) {
            warn!(error = %format!("{e:#}"), "VLAN devices not read: the recorded ones stay");
        }
    }

    /// Resolves backends' neighbours: all of them (`all`), or those no health check touches.
    fn prime_neighbours(&self, all: bool) {
        for s in self.state.services.values() {
            if all || s.spec.health.is_none() {
                for b in &s.backends {
                    net::prime_neighbour(b.address.ip());
                }
            }
        }
    }

    /// Makes the registered checks those of the state in force (and of the L7 pools): an
    /// unchanged check keeps running, a changed one restarts from the last known result.
    fn register_checks(&mut self) {
        let mut wanted = Vec::new();
        if let Some(l7) = &self.cfg.l7 {
            for pool in &l7.pools {
                let Some(spec) = &pool.health else { continue };
                let owner = Owner::Pool(pool.name.clone());
                for b in &pool.backends {
                    let initial = self
                        .checks
                        .id_of(&owner, b.address)
                        .and_then(|id| self.monitor.state(id))
                        .unwrap_or(Checked::Up);
                    wanted.push((owner.clone(), b.address, spec.clone(), initial));
                }
            }
        }
        for (name, s) in &self.state.services {
            let Some(spec) = &s.spec.health else {
                continue;
            };
            for b in &s.backends {
                let initial = if b.health == BackendHealth::Down {
                    Checked::Down
                } else {
                    Checked::Up
                };
                wanted.push((
                    Owner::Service(name.clone()),
                    b.address,
                    spec.clone(),
                    initial,
                ));
            }
        }
        let changes = self.checks.reconcile(wanted);
        for id in changes.stop {
            self.monitor.remove(id);
        }
        for c in changes.start {
            self.monitor.add(c.id, c.address, c.spec, c.initial);
        }
        // A checked backend starts up (it needs `fall` failures to go down), as the monitor
        // sees it; both states mean the same to the dataplane, so no map write.
        for s in self.state.services.values_mut() {
            if s.spec.health.is_some() {
                for b in &mut s.backends {
                    if b.health == BackendHealth::Unchecked {
                        b.health = BackendHealth::Up;
                    }
                }
            }
        }
    }

    fn note(&mut self, ev: Option<Event>) {
        if let Some(Event::Failover { service, from, to }) = ev {
            self.failovers += 1;
            crate::api::audit::change(
                balancer_console::EventKind::Failover,
                &balancer_console::failover(&service, from, to),
            );
            match to {
                Some(to) => {
                    info!(service = %service, from = ?from, to = %to, "failover: new active backend")
                }
                None => {
                    warn!(service = %service, from = ?from, "failover: no healthy backend left; new connections are refused")
                }
            }
        }
    }

    /// Applies one health change and publishes the status.
    pub fn on_health(&mut self, ev: HealthEvent) {
        self.apply_health(ev);
        self.publish();
    }

    /// Applies one health change. An event of a superseded registration is dropped.
    fn apply_health(&mut self, ev: HealthEvent) {
        let Some(reg) = self.checks.resolve(ev.target) else {
            debug!(
                target_id = ev.target,
                "health event of a superseded check dropped"
            );
            return;
        };
        let service = match &reg.owner {
            Owner::Pool(pool) => {
                if let Some(l7) = &self.l7 {
                    l7.set_backend_health(pool, reg.address, ev.health.is_up());
                    let (before, after) = if ev.health.is_up() {
                        (balancer_console::Health::Down, balancer_console::Health::Up)
                    } else {
                        (balancer_console::Health::Up, balancer_console::Health::Down)
                    };
                    crate::api::audit::change(
                        balancer_console::EventKind::Health,
                        &balancer_console::health_change(
                            &format!("pool {pool}"),
                            reg.address,
                            before,
                            after,
                        ),
                    );
                    info!(pool = %pool, backend = %reg.address, up = ev.health.is_up(), reason = %ev.reason, "l7 backend health changed");
                }
                return;
            }
            Owner::Service(s) => s.clone(),
        };
        let new = if ev.health.is_up() {
            BackendHealth::Up
        } else {
            BackendHealth::Down
        };
        self.set_health(&service, reg.address, new, &ev.reason, ev.at);
    }

    /// Gives a backend the health `new` (from its check, or from passive health), writes the
    /// maps and logs the change.
    fn set_health(
        &mut self,
        service: &str,
        address: std::net::SocketAddr,
        new: BackendHealth,
        reason: &str,
        at: Instant,
    ) {
        let change = match self.state.health_change(service, address, new) {
            Ok(Some(c)) => c,
            Ok(None) => return,
            Err(e) => {
                error!(service = %service, backend = %address, error = %e, "health event for an unknown backend");
                return;
            }
        };
        let old = self
            .state
            .services
            .get(service)
            .and_then(|s| s.backends.iter().find(|b| b.address == address))
            .map(|b| b.health);
        match self.state.set(&mut self.dp, Some(change)) {
            Ok(event) => {
                let took = at.elapsed();
                info!(
                    service = %service,
                    backend = %address,
                    old = ?old,
                    new = ?new,
                    reason = %reason,
                    map_update_us = took.as_micros() as u64,
                    "backend health changed"
                );
                crate::api::audit::change(
                    balancer_console::EventKind::Health,
                    &balancer_console::health_change(
                        service,
                        address,
                        old.map_or(
                            balancer_console::Health::Unchecked,
                            crate::api::console::health,
                        ),
                        crate::api::console::health(new),
                    ),
                );
                self.note(event);
                self.save_health();
            }
            Err(e) => {
                error!(service = %service, backend = %address, error = %e, "cannot apply health change")
            }
        }
    }

    /// A burst of refused or unanswered new flows (passive health): the backend goes down at
    /// once, and its active check starts over from down, so it returns after `rise` passing
    /// checks. A burst of a backend that changed meanwhile (down already, removed, its slot
    /// reused) is dropped.
    pub fn on_passive(&mut self, b: passive::Burst) {
        let at = Instant::now();
        let w = &b.watch;
        let current = self
            .state
            .services
            .get(&w.service)
            .and_then(|s| s.backends.iter().find(|x| x.address == w.address));
        match current {
            Some(x)
                if x.slot == w.slot
                    && x.generation == w.generation
                    && x.health == BackendHealth::Up => {}
            _ => {
                debug!(service = %w.service, backend = %w.address, "passive health burst of a changed backend dropped");
                return;
            }
        }
        let owner = Owner::Service(w.service.clone());
        if let Some((old, start)) = self.checks.renew(&owner, w.address, Checked::Down) {
            self.monitor.remove(old);
            self.monitor
                .add(start.id, start.address, start.spec, start.initial);
        }
        warn!(
            service = %w.service,
            backend = %w.address,
            failures = b.failures,
            window_ms = w.spec.window.as_millis() as u64,
            "passive health: refused or unanswered new flows; down until its check passes"
        );
        let reason = format!(
            "passive: {} refused or unanswered new flows in {} ms",
            b.failures,
            w.spec.window.as_millis()
        );
        self.set_health(&w.service, w.address, BackendHealth::Down, &reason, at);
        self.publish();
    }

    /// The healthy backends of services with passive health, for the poller.
    fn passive_watches(&self) -> Vec<passive::Watch> {
        let mut out = Vec::new();
        for s in self.state.services.values() {
            let Some(spec) = s.spec.passive_health else {
                continue;
            };
            for b in &s.backends {
                if b.health == BackendHealth::Up {
                    out.push(passive::Watch {
                        service: s.spec.name.clone(),
                        address: b.address,
                        slot: b.slot,
                        generation: b.generation,
                        spec,
                    });
                }
            }
        }
        out
    }

    /// Re-reads the config file; a refused or failed reload changes nothing.
    pub async fn reload(&mut self) -> Result<String, String> {
        let r = self.reload_inner();
        self.publish();
        r
    }

    fn reload_inner(&mut self) -> Result<String, String> {
        match self.try_reload() {
            Ok(n) => {
                info!(services = n, "config reloaded");
                Ok(format!("reloaded: {n} services"))
            }
            Err(e) => {
                self.config_errors += 1;
                error!(error = %e, "reload refused: the running config keeps serving");
                Err(e.to_string())
            }
        }
    }

    fn try_reload(&mut self) -> Result<usize, ReloadError> {
        let new = config::load(&self.opts.config)?;
        new.check_host()?;
        for w in new.warnings() {
            warn!("{w}");
        }
        if new.interfaces != self.cfg.interfaces {
            return Err(ReloadError::RestartNeeded("interfaces"));
        }
        if new.pin_path != self.cfg.pin_path {
            return Err(ReloadError::RestartNeeded("pin_path"));
        }
        if new.console != self.cfg.console {
            return Err(ReloadError::RestartNeeded("the [console] settings"));
        }
        if new.ha != self.cfg.ha {
            return Err(ReloadError::RestartNeeded("the [ha] settings"));
        }
        if new.bgp != self.cfg.bgp {
            return Err(ReloadError::RestartNeeded("the [bgp] settings"));
        }
        // The relay's part is checked (limits, new VIPs bound) before anything changes, and
        // committed only after L4 applied: services kept by name and VIP keep their senders.
        let mllp = match &self.mllp {
            Some(relay) => Some(
                relay
                    .prepare(mllp_services(&new))
                    .map_err(|e| ReloadError::Mllp(e.to_string()))?,
            ),
            None => None,
        };
        // L7 is checked first (certificates, listeners) and made live only after L4 applied.
        let l7 = match (&self.l7, &new.l7) {
            (Some(l7), Some(c)) => Some(
                l7.prepare(c.clone())
                    .map_err(|e| ReloadError::L7(format!("{e:#}")))?,
            ),
            (None, None) => None,
            _ => return Err(ReloadError::RestartNeeded("adding or removing [l7]")),
        };
        let health = plan::health_book(&self.state);
        let ops = operator::from_state(&self.state);
        let p = crate::control::reconcile(&mut self.dp, &new, Some(&self.state), &health, &ops)?;
        if let (Some(l7), Some(prepared)) = (&self.l7, l7) {
            l7.commit(prepared);
        }
        if let (Some(relay), Some(update)) = (&self.mllp, mllp) {
            let (added, kept, removed) = update.summary();
            relay.commit(update);
            if added + removed > 0 {
                info!(added, kept, removed, "mllp relay services changed");
            }
        }
        // Active backends a reload changes are logged by failover.rs, not counted as failovers.
        self.state = p.next;
        if let Ok(mut t) = self.gc_timeouts.lock() {
            *t = timeouts(&new);
        }
        self.l7_config = new.l7.clone().map(std::sync::Arc::new);
        self.cfg = new;
        self.reloads += 1;
        self.register_checks();
        self.prime_neighbours(true);
        self.save_admin();
        self.save_health();
        Ok(self.state.services.len())
    }

    /// Answers an operator request.
    pub async fn on_request(&mut self, req: Request) -> Result<serde_json::Value, String> {
        let (verb, service, backend) = match req {
            Request::Status => {
                return serde_json::to_value(self.status()).map_err(|e| e.to_string());
            }
            Request::Reload => {
                return self
                    .reload()
                    .await
                    .map(|m| serde_json::json!({ "ok": true, "message": m }));
            }
            Request::HaRole { role } => return self.on_role(role).await,
            Request::Bgp { verb } => {
                let (wait, message) = self.on_bgp(verb)?;
                wait.await?;
                return Ok(serde_json::json!({ "ok": true, "message": message }));
            }
            Request::Backend {
                verb,
                service,
                backend,
            } => (verb, service, backend),
        };
        if let (Some(ha), Some(pair)) = (&self.ha, &self.pair)
            && ha.role != crate::control::ha::Role::Active
            && let Some(peer) = pair.peer_alive()
        {
            return Err(format!(
                "this balancer is the {} of the pair: act on the active balancer ({peer}); this one follows its operator states",
                ha.role
            ));
        }
        let addr = self
            .state
            .find(&service, &backend)
            .map_err(|e| e.to_string())?;
        let old = self
            .state
            .services
            .get(&service)
            .and_then(|s| s.backends.iter().find(|b| b.address == addr))
            .map(|b| b.admin);
        let admin = verb.admin();
        let change = self
            .state
            .admin_change(&service, addr, admin)
            .map_err(|e| e.to_string())?;
        let event = self
            .state
            .set(&mut self.dp, change)
            .map_err(|e| e.to_string())?;
        self.note(event);
        info!(service = %service, backend = %addr, old = ?old, new = ?admin, reason = "operator", "backend admin state changed");
        self.save_admin();
        self.publish();
        Ok(
            serde_json::json!({ "ok": true, "message": format!("{}: {service} {addr}", verb.name()) }),
        )
    }

    /// keepalived's last word as `balancer ha notify` recorded it in the role file (before it
    /// calls the socket): a notify that came while this controller was starting, its socket
    /// not up yet, is taken from the file within a second instead of being lost (the
    /// controller would stay in the role it read at start, say active beside a standby
    /// keepalived).
    async fn follow_role_file(&mut self) {
        let Some(ha) = &self.ha else { return };
        let recorded = crate::control::ha::load_role(&ha.role_file);
        if recorded != crate::control::ha::Role::Unknown && recorded != ha.role {
            info!(role = %recorded, "ha role taken from the role file: keepalived's notify did not reach the control socket");
            let _ = self.on_role(recorded).await;
        }
    }

    /// keepalived's word on this balancer's role.
    async fn on_role(
        &mut self,
        role: crate::control::ha::Role,
    ) -> Result<serde_json::Value, String> {
        let Some(ha) = self.ha.as_mut() else {
            return Err("this balancer has no [ha] section".into());
        };
        let old = ha.role;
        ha.role = role;
        if let Err(e) = crate::control::ha::save_role(&ha.role_file, role) {
            warn!(path = %ha.role_file.display(), error = %e, "cannot record the HA role");
        }
        let active = role == crate::control::ha::Role::Active;
        // The mirror first: a flow made from now on reaches the peer.
        if let Err(e) = self.dp.set_mirror(active) {
            warn!(error = %e, "cannot switch the flow mirror");
        }
        if let Some(p) = &self.pair {
            p.set_role(role).await;
        }
        if old != role {
            info!(node = %ha.cfg.node, old = %old, new = %role, flows = self.dp.flow_count(), "ha role changed");
        }
        self.publish();
        Ok(serde_json::json!({ "ok": true, "message": format!("ha role: {role}") }))
    }

    /// The active peer's failover choices and operator states: a standby takes them, so the
    /// two balancers never send HL7 traffic to different listeners.
    fn on_peer_control(&mut self, c: Vec<balancer_sync::ServiceControl>) {
        if self
            .ha
            .as_ref()
            .is_none_or(|h| h.role == crate::control::ha::Role::Active)
        {
            return;
        }
        let peer = crate::control::pair::peer_services(&c);
        let todo = crate::control::ha::follow(&self.state, &peer);
        if todo.is_empty() {
            return;
        }
        let mut admin_changed = false;
        for f in todo {
            let (service, backend, change) = match &f {
                crate::control::ha::Follow::Admin {
                    service,
                    backend,
                    admin,
                } => {
                    admin_changed = true;
                    (
                        service.clone(),
                        *backend,
                        self.state.admin_change(service, *backend, *admin),
                    )
                }
                crate::control::ha::Follow::Active { service, backend } => (
                    service.clone(),
                    *backend,
                    self.state.active_change(service, *backend),
                ),
            };
            match change
                .map_err(|e| e.to_string())
                .and_then(|c| self.state.set(&mut self.dp, c).map_err(|e| e.to_string()))
            {
                Ok(ev) => {
                    self.note(ev);
                    info!(service = %service, backend = %backend, change = ?f, "following the active peer");
                }
                Err(e) => {
                    warn!(service = %service, backend = %backend, error = %e, "cannot follow the active peer")
                }
            }
        }
        if admin_changed {
            self.save_admin();
        }
        self.publish();
    }

    /// Tells keepalived (through its track file) whether this controller serves.
    fn track(&mut self, serving: bool) {
        if let Some(ha) = self.ha.as_mut() {
            ha.serving = serving;
            if let Err(e) = crate::control::ha::write_track(&ha.track_file, serving) {
                warn!(path = %ha.track_file.display(), error = %e, "cannot write the keepalived track file");
            }
        }
    }

    /// Every second in a pair: the dataplane still serves when the program's link is still
    /// pinned for every interface (`balancer teardown`, or someone detaching it, ends that);
    /// keepalived hears of a change through the track file at once.
    fn check_dataplane(&mut self) {
        let Some(serving) = self.ha.as_ref().map(|h| h.serving) else {
            return;
        };
        let attached = self
            .cfg
            .interfaces
            .iter()
            .all(|i| self.pin_dir.join(format!("link-{i}")).exists());
        if attached != serving {
            if attached {
                info!("the XDP program is attached again: serving");
            } else {
                error!(
                    "the XDP program is no longer attached to every interface: keepalived hands the addresses to the peer"
                );
            }
            self.track(attached);
        }
    }

    /// The status, counters read now (what `status` and the metrics endpoint answer).
    pub fn status(&self) -> Status {
        self.board.status()
    }

    /// Publishes the daemon's part of the status for readers. Called after every change of
    /// the state, so it also tells the MLLP relay each service's active listener.
    fn publish(&self) {
        if let Some(p) = &self.pair {
            p.publish(&self.state);
        }
        self.sync_mllp();
        self.sync_bgp();
        self.board.publish(self.published());
        self.passive.watch(self.passive_watches());
    }

    /// Tells the BGP driver the VIPs to announce now (it acts only when the set changed).
    fn sync_bgp(&self) {
        if let Some(b) = &self.bgp {
            b.want(self.desired_vips());
        }
    }

    /// The VIPs this balancer should announce: see [`bird::announced`].
    fn desired_vips(&self) -> std::collections::BTreeSet<std::net::IpAddr> {
        let Some(b) = &self.bgp else {
            return Default::default();
        };
        let serving = self
            .state
            .services
            .iter()
            .map(|(name, s)| {
                let n = (0..s.backends.len())
                    .filter(|i| s.slot_state(*i) == crate::control::state::SlotState::Up)
                    .count();
                (name.clone(), n)
            })
            .collect();
        bird::announced(
            &self.cfg.services,
            &serving,
            self.bgp_withdrawn,
            b.config().withdraw_when_no_backend,
        )
    }

    /// `balancer bgp withdraw|announce`: records the operator's choice (kept across
    /// restarts), hands the new set to the driver and returns a future that resolves when
    /// BIRD took it (at most 15 s), with the reply's message.
    pub fn on_bgp(
        &mut self,
        verb: crate::control::operator::BgpVerb,
    ) -> Result<
        (
            impl std::future::Future<Output = Result<(), String>> + Send + 'static,
            String,
        ),
        String,
    > {
        if self.bgp.is_none() {
            return Err("bgp is off: the config has no [bgp] section".into());
        }
        let old = self.bgp_withdrawn;
        self.bgp_withdrawn = verb.withdrawn();
        let path = bgp_file(&self.cfg);
        if let Err(e) = operator::save_bgp_withdrawn(&path, self.bgp_withdrawn) {
            warn!(path = %path.display(), error = %e, "cannot save the bgp state; it will not survive a restart");
        }
        info!(
            old_withdrawn = old,
            withdrawn = self.bgp_withdrawn,
            reason = "operator",
            "bgp: {}",
            verb.name()
        );
        let vips = self.desired_vips();
        self.publish();
        let Some(b) = &self.bgp else {
            return Err("bgp is off: the config has no [bgp] section".into());
        };
        let generation = b.want(vips.clone());
        let list: Vec<String> = vips.iter().map(ToString::to_string).collect();
        let message = if vips.is_empty() {
            format!("bgp {}: no VIP announced", verb.name())
        } else {
            format!("bgp {}: announcing {}", verb.name(), list.join(" "))
        };
        Ok((b.wait(generation, Duration::from_secs(15)), message))
    }

    /// The daemon's part of the BGP status (the driver's part is filled when read).
    fn bgp_status(&self) -> Option<bird::BgpStatus> {
        let b = self.bgp.as_ref()?;
        Some(bird::BgpStatus {
            desired: self.desired_vips().into_iter().collect(),
            withdrawn_by_operator: self.bgp_withdrawn,
            vips: bird::all_vips(&self.cfg.services).into_iter().collect(),
            routes_file: b.config().routes_file.clone(),
            ..Default::default()
        })
    }

    /// Tells the relay each mllp service's active listener, as the failover scheduler chose.
    fn sync_mllp(&self) {
        let Some(relay) = &self.mllp else { return };
        for s in self.state.services.values() {
            if s.spec.mode == config::Mode::Mllp {
                relay.set_active(
                    &s.spec.name,
                    s.active.and_then(|a| s.backends.get(a)).map(|b| b.address),
                );
            }
        }
    }

    /// A listener the relay failed (reset, no ACK, garbage, NACK rate): down at once, and
    /// its active check starts over from down under a new registration, so it comes back
    /// (as a standby: no failback unless configured) after `rise` passing checks.
    pub fn on_mllp_failure(&mut self, f: balancer_mllp::ListenerFailure) {
        let at = Instant::now();
        let up = self
            .state
            .services
            .get(&f.service)
            .and_then(|s| s.backends.iter().find(|b| b.address == f.listener))
            .is_some_and(|b| b.health != BackendHealth::Down);
        if !up {
            debug!(service = %f.service, backend = %f.listener, "relay failure of a listener down already (or gone) dropped");
            return;
        }
        let owner = Owner::Service(f.service.clone());
        if let Some((old, start)) = self.checks.renew(&owner, f.listener, Checked::Down) {
            self.monitor.remove(old);
            self.monitor
                .add(start.id, start.address, start.spec, start.initial);
        }
        warn!(service = %f.service, backend = %f.listener, reason = %f.reason, "mllp listener failed by the relay (passive health): down until its check passes");
        let reason = format!("mllp relay: {}", f.reason);
        self.set_health(&f.service, f.listener, BackendHealth::Down, &reason, at);
        self.publish();
    }

    /// The daemon's part of the status: everything but the counters.
    fn published(&self) -> Published {
        let mut slots = Vec::new();
        let services = self
            .state
            .services
            .values()
            .map(|s| {
                slots.push((s.id, s.backends.iter().map(|b| b.slot).collect()));
                ServiceStatus {
                    name: s.spec.name.clone(),
                    vip: s.spec.vip,
                    protocol: s.spec.protocol,
                    forwarding: s.spec.forwarding,
                    scheduler: s.spec.scheduler,
                    health_check: s.spec.health.as_ref().map(|h| h.kind.name().to_string()),
                    active: s.active.and_then(|a| s.backends.get(a)).map(|b| b.address),
                    traffic: Traffic::default(),
                    backends: s
                        .backends
                        .iter()
                        .enumerate()
                        .map(|(i, b)| BackendStatus {
                            address: b.address,
                            weight: b.weight,
                            priority: b.priority,
                            admin: b.admin,
                            health: b.health,
                            state: s.slot_state(i),
                            active: s.active == Some(i),
                            check_latency_ms: self
                                .checks
                                .id_of(&Owner::Service(s.spec.name.clone()), b.address)
                                .and_then(|id| self.monitor.last_latency(id))
                                .map(|d| d.as_secs_f64() * 1e3),
                            traffic: Traffic::default(),
                            flows: 0,
                        })
                        .collect(),
                }
            })
            .collect();
        Published {
            status: Status {
                config: self.opts.config.display().to_string(),
                interfaces: self.cfg.interfaces.clone(),
                uptime_secs: 0,
                reloads: self.reloads,
                config_errors: self.config_errors,
                failovers: self.failovers,
                flows: 0,
                reasons: Default::default(),
                flows_expired: Default::default(),
                services,
                l7_backends: self.l7_backends(),
                l7: None,
                mllp: None,
                capacity: crate::api::protocol::Capacity {
                    flow_table_entries: self.cfg.flow_table_size,
                    snat_ports: u32::from(
                        self.cfg
                            .snat_ports
                            .last
                            .saturating_sub(self.cfg.snat_ports.first),
                    ) + 1,
                },
                certificates: self
                    .cfg
                    .l7
                    .as_ref()
                    .map(crate::api::metrics::certificate_expiry)
                    .unwrap_or_default(),
                ha: self.ha.as_ref().map(|h| crate::api::protocol::HaStatus {
                    node: h.cfg.node.clone(),
                    role: h.role,
                    peer: h.cfg.peer.to_string(),
                    ..Default::default()
                }),
                bgp: self.bgp_status(),
            },
            slots,
            l7: self.l7_config.clone(),
        }
    }
}

/// Serves the control socket and the metrics endpoint bound in [`Daemon::start`] (so both
/// listen before `balancer ready`). Status requests are answered from the published
/// snapshot, off the daemon loop; the others go to the loop. Returns the channel they share
/// (the console asks on it too).
fn start_endpoints(
    d: &Daemon,
    listeners: Listeners,
    daemon_tx: &mpsc::Sender<Message>,
) -> mpsc::Sender<Message> {
    let Listeners { control, metrics } = listeners;
    let (tx, mut rx) = mpsc::channel::<Message>(64);
    let board = d.board.clone();
    let to_daemon = daemon_tx.clone();
    tokio::spawn(async move {
        while let Some(msg) = rx.recv().await {
            if msg.request == Request::Status {
                let board = board.clone();
                tokio::task::spawn_blocking(move || {
                    let reply = serde_json::to_value(board.status()).map_err(|e| e.to_string());
                    let _ = msg.reply.send(reply);
                });
            } else {
                // Its own task: a busy loop must not hold up the status requests behind it.
                let t = to_daemon.clone();
                tokio::spawn(async move {
                    let _ = t.send(msg).await;
                });
            }
        }
    });
    let t = tx.clone();
    tokio::spawn(async move {
        if let Err(e) = crate::api::server::serve_on(control, t).await {
            error!(error = %e, "control socket failed");
        }
    });
    if let Some(listener) = metrics {
        let t = tx.clone();
        tokio::spawn(async move {
            if let Err(e) = crate::api::metrics::serve_on(listener, t).await {
                error!(error = %e, "metrics endpoint failed");
            }
        });
    }
    tx
}

/// Where operator overrides are kept across controller restarts: beside the control socket
/// (a runtime directory: a reboot starts from the config again).
fn admin_file(cfg: &Validated) -> PathBuf {
    cfg.socket
        .parent()
        .unwrap_or(std::path::Path::new("/run/balancer"))
        .join("admin-state.json")
}

/// Where the operator's BGP withdraw is kept for the next controller (beside the operator
/// states).
fn bgp_file(cfg: &Validated) -> PathBuf {
    admin_file(cfg).with_file_name("bgp-state.json")
}

/// The BGP driver of a config with a `[bgp]` section.
fn d_bgp(cfg: &Validated) -> Option<bird::Driver> {
    cfg.bgp.clone().map(bird::Driver::start)
}

/// Where the last known health is kept for the next controller (beside the operator states).
fn health_file(cfg: &Validated) -> PathBuf {
    admin_file(cfg).with_file_name("health-state.json")
}

impl Daemon {
    /// Writes the last known health of every backend.
    fn save_health(&self) {
        let path = health_file(&self.cfg);
        if let Err(e) = plan::save_health(&path, &self.state) {
            warn!(path = %path.display(), error = %e, "cannot save backend health; a restarted controller starts from the pinned states");
        }
    }

    /// Writes the operator overrides.
    fn save_admin(&self) {
        let path = admin_file(&self.cfg);
        if let Err(e) = operator::save(&path, &self.state) {
            warn!(path = %path.display(), error = %e, "cannot save operator states; they will not survive a restart");
        }
    }

    /// Members of the L7 pools with their checked health (counters are filled when read).
    fn l7_backends(&self) -> Vec<crate::api::protocol::L7BackendStatus> {
        let Some(l7) = &self.cfg.l7 else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for pool in &l7.pools {
            let owner = Owner::Pool(pool.name.clone());
            for b in &pool.backends {
                let id = self.checks.id_of(&owner, b.address);
                let health = match (
                    pool.health.is_some(),
                    id.and_then(|id| self.monitor.state(id)),
                ) {
                    (false, _) | (true, None) => BackendHealth::Unchecked,
                    (true, Some(Checked::Up)) => BackendHealth::Up,
                    (true, Some(Checked::Down)) => BackendHealth::Down,
                };
                out.push(crate::api::protocol::L7BackendStatus {
                    pool: pool.name.clone(),
                    address: b.address,
                    health,
                    check_latency_ms: id
                        .and_then(|id| self.monitor.last_latency(id))
                        .map(|d| d.as_secs_f64() * 1e3),
                    requests: 0,
                    connect_failures: 0,
                });
            }
        }
        out
    }
}

/// The services the MLLP relay serves, from a validated config.
fn mllp_services(cfg: &Validated) -> Vec<balancer_mllp::ServiceConfig> {
    cfg.services
        .iter()
        .filter_map(|s| {
            Some(balancer_mllp::ServiceConfig {
                name: s.name.clone(),
                vip: s.vip,
                limits: s.mllp.clone()?,
            })
        })
        .collect()
}

fn timeouts(cfg: &Validated) -> crate::control::flow_expiry::Timeouts {
    crate::control::flow_expiry::Timeouts {
        tcp_idle: u32::try_from(cfg.tcp_idle_timeout.as_secs()).unwrap_or(u32::MAX),
        udp_idle: u32::try_from(cfg.udp_idle_timeout.as_secs()).unwrap_or(u32::MAX),
    }
}

/// Runs until SIGTERM / SIGINT. The dataplane keeps forwarding after the process exits
/// (everything is pinned); `balancer teardown` removes it.
pub async fn run(opts: RunOptions) -> anyhow::Result<()> {
    let (ev_tx, mut ev_rx) = mpsc::unbounded_channel();
    let (burst_tx, mut burst_rx) = mpsc::unbounded_channel();
    let mut d = Daemon::start(opts, ev_tx, burst_tx).await?;
    let (ctl_tx, mut ctl_rx) = mpsc::channel::<Message>(64);
    let mut mllp_rx = d.mllp_failures.take();
    let mut peer_rx = d.peer_control.take();
    let listeners = d
        .listeners
        .take()
        .context("the endpoints were served already")?;
    let endpoints = start_endpoints(&d, listeners, &ctl_tx);
    let console = match &d.cfg.console {
        Some(c) => Some(
            crate::api::console::start(c.clone(), d.board.clone(), endpoints)
                .await
                .context("starting the console")?,
        ),
        None => None,
    };
    info!(
        services = d.state.services.len(),
        interfaces = ?d.cfg.interfaces,
        "balancer ready"
    );
    crate::host::systemd::ready();
    d.track(true);
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let mut neigh = tokio::time::interval(Duration::from_secs(10));
    let mut links_poll = tokio::time::interval(Duration::from_secs(60));
    let mut links = match net::LinkWatch::open() {
        Ok(w) => Some(w),
        Err(e) => {
            warn!(error = %format!("{:#}", anyhow::Error::from(e)), "link changes not watched: MACs and VLAN devices are read every minute");
            None
        }
    };
    // Check latencies change without events: refresh the published status now and then.
    let mut refresh = tokio::time::interval(Duration::from_secs(1));
    // The watchdog is fed from this loop, so a stuck loop gets the daemon restarted.
    let mut dog = tokio::time::interval(
        crate::host::systemd::watchdog_period()
            .map(|p| p / 2)
            .unwrap_or(Duration::from_secs(3600)),
    );
    loop {
        tokio::select! {
            _ = dog.tick() => crate::host::systemd::watchdog(),
            _ = neigh.tick() => d.prime_neighbours(false),
            _ = links_poll.tick() => d.sync_links(),
            r = async {
                match links.as_mut() {
                    Some(w) => w.changed().await,
                    None => std::future::pending().await,
                }
            } => match r {
                Ok(()) => d.sync_links(),
                Err(e) => {
                    warn!(error = %format!("{:#}", anyhow::Error::from(e)), "link changes no longer watched: MACs and VLAN devices are read every minute");
                    links = None;
                }
            },
            _ = refresh.tick() => {
                d.follow_role_file().await;
                d.check_dataplane();
                d.publish();
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => {
                crate::host::systemd::reloading();
                let r = d.reload().await;
                crate::api::audit::reload("signal", "SIGHUP", &r);
                crate::host::systemd::ready();
            }
            Some(ev) = ev_rx.recv() => d.on_health(ev),
            Some(b) = burst_rx.recv() => d.on_passive(b),
            Some(f) = async {
                match mllp_rx.as_mut() {
                    Some(rx) => rx.recv().await,
                    None => std::future::pending().await,
                }
            } => d.on_mllp_failure(f),
            Some(c) = async {
                match peer_rx.as_mut() {
                    Some(rx) => rx.recv().await,
                    None => std::future::pending().await,
                }
            } => d.on_peer_control(c),
            Some(msg) = ctl_rx.recv() => {
                // A BGP verb is answered once BIRD took the change, off the loop.
                if let Request::Bgp { verb } = msg.request {
                    match d.on_bgp(verb) {
                        Ok((wait, message)) => {
                            let reply = msg.reply;
                            tokio::spawn(async move {
                                let r = wait
                                    .await
                                    .map(|()| serde_json::json!({ "ok": true, "message": message }));
                                let _ = reply.send(r);
                            });
                        }
                        Err(e) => {
                            let _ = msg.reply.send(Err(e));
                        }
                    }
                    continue;
                }
                let reload = msg.request == Request::Reload;
                if reload {
                    crate::host::systemd::reloading();
                }
                let reply = d.on_request(msg.request).await;
                if reload {
                    crate::host::systemd::ready();
                }
                let _ = msg.reply.send(reply);
            }
        }
    }
    crate::host::systemd::stopping();
    // First of all: keepalived hands the addresses to the peer at once.
    d.track(false);
    // First out of the ECMP group: the routers move the traffic to the other balancers
    // (the dataplane keeps forwarding whatever still arrives here).
    if let Some(b) = &d.bgp {
        let generation = b.want(Default::default());
        match b.wait(generation, Duration::from_secs(3)).await {
            Ok(()) => info!("bgp: every VIP withdrawn before stopping"),
            Err(e) => warn!(error = %e, "bgp: could not withdraw the VIPs before stopping"),
        }
    }
    if let Some(c) = console {
        c.stop();
    }
    if let Some(l7) = d.l7.take() {
        l7.shutdown(Duration::from_secs(10)).await;
    }
    if let Some(relay) = d.mllp.take() {
        relay.shutdown(Duration::from_secs(10)).await;
    }
    info!("stopping: the dataplane keeps forwarding (balancer teardown removes it)");
    Ok(())
}

/// Writes the namespace's 802.1Q VLAN devices (ifindex → trunk, VLAN id and MAC) into
/// `BLB_VLANS` and `BLB_VLAN_PORTS`; logs a change. A VLAN whose trunk vanished meanwhile is
/// left out. A tagged frame on an attached trunk is routed as arriving on its VLAN device,
/// so a new VLAN device of an attached interface gets forwarding turned on, as the attached
/// interfaces do.
fn sync_vlans(dp: &mut Dataplane, interfaces: &[String]) -> anyhow::Result<()> {
    let mut devs = std::collections::HashMap::new();
    let found = net::vlan_devices()?;
    for v in &found {
        let Ok(parent) = net::ifindex(&v.parent) else {
            continue;
        };
        devs.insert(
            v.ifindex,
            balancer_common::VlanDev {
                parent,
                vid: v.vid,
                mac: v.mac,
            },
        );
    }
    if dp.set_vlans(&devs)? > 0 {
        let names: Vec<String> = found
            .iter()
            .map(|v| format!("{} (VLAN {} on {})", v.name, v.vid, v.parent))
            .collect();
        info!(vlans = ?names, "VLAN devices recorded: flows through them leave through the trunk, tagged");
        for v in found.iter().filter(|v| interfaces.contains(&v.parent)) {
            if let Err(e) = net::enable_forwarding(&v.name) {
                warn!(vlan = %v.name, error = %e, "tagged frames arriving on this VLAN are passed to the kernel");
            }
        }
    }
    Ok(())
}
