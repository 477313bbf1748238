//! `balancer run`: load, adopt or attach, apply the config, then serve health events, operator
//! requests and signals. One task owns all state; everything else talks to it by channel.

use std::{
    collections::HashMap,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use balancer_health::{Health as Checked, HealthEvent, Monitor, TargetId};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};
use tracing::{error, info, warn};

use crate::{
    config::{self, AdminState, Validated},
    control::{BackendStatus, Message, Request, ServiceStatus, Status},
    dataplane::{Dataplane, LoadOptions},
    health, net,
    reconcile::{Event, Health, State},
    report::Traffic,
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
    targets: HashMap<TargetId, (String, usize)>,
    l7: Option<balancer_l7::L7>,
    l7_targets: HashMap<TargetId, (String, std::net::SocketAddr)>,
    gc_timeouts: std::sync::Arc<std::sync::Mutex<crate::gc::Timeouts>>,
    gc: crate::gc::Collector,
    started: Instant,
    reloads: u64,
    config_errors: u64,
    failovers: u64,
}

fn target_id(service_id: u32, backend: usize) -> TargetId {
    ((service_id as u64) << 32) | backend as u64
}

impl Daemon {
    /// Loads, adopts or attaches, and applies the config.
    pub async fn start(
        opts: RunOptions,
        events: mpsc::UnboundedSender<HealthEvent>,
    ) -> anyhow::Result<Self> {
        let cfg = config::load(&opts.config).map_err(|e| anyhow::anyhow!("{e}"))?;
        let pin = opts
            .pin_path
            .clone()
            .unwrap_or_else(|| cfg.raw.dataplane.pin_path.clone());
        check_snat_ports(&cfg)?;
        let mut dp = Dataplane::load(&LoadOptions {
            pin_path: Some(pin.clone()),
            flow_entries: cfg.raw.dataplane.flow_table_size,
        })?;
        if dp.adopted {
            info!(pin_path = %pin.display(), "adopted pinned maps: established flows continue");
        }
        let state = State::apply_config(&mut dp, &cfg, None)?;
        for iface in &cfg.interfaces {
            net::enable_forwarding(iface)?;
            dp.attach(iface, cfg.raw.dataplane.xdp_mode)
                .with_context(|| format!("attaching to {iface}"))?;
        }
        let gc_timeouts = std::sync::Arc::new(std::sync::Mutex::new(timeouts(&cfg)));
        let gc = crate::gc::Collector::start(&pin, gc_timeouts.clone(), Duration::from_secs(5))?;
        let l7 = match &cfg.raw.l7 {
            Some(l7) => {
                add_l7_addresses(&cfg)?;
                Some(
                    balancer_l7::L7::start(l7.get_ref().clone())
                        .await
                        .context("starting the L7 proxy")?,
                )
            }
            None => None,
        };
        let mut d = Daemon {
            opts,
            cfg,
            dp,
            state,
            monitor: Monitor::new(events),
            targets: HashMap::new(),
            l7,
            l7_targets: HashMap::new(),
            gc_timeouts,
            gc,
            started: Instant::now(),
            reloads: 0,
            config_errors: 0,
            failovers: 0,
        };
        d.restore_admin();
        d.register_checks();
        d.prime_neighbours(true);
        Ok(d)
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

    /// (Re)registers a health check for every backend of every service (and L7 pool) that
    /// has one.
    fn register_checks(&mut self) {
        for id in std::mem::take(&mut self.targets).into_keys() {
            self.monitor.remove(id);
        }
        for id in std::mem::take(&mut self.l7_targets).into_keys() {
            self.monitor.remove(id);
        }
        if let Some(l7) = &self.cfg.raw.l7 {
            for (p, pool) in l7.get_ref().pools.iter().enumerate() {
                let Some(spec) = &pool.health else { continue };
                for (i, b) in pool.backends.iter().enumerate() {
                    let id = (1u64 << 63) | ((p as u64) << 32) | i as u64;
                    self.monitor.add(id, b.address, spec.clone(), Checked::Up);
                    self.l7_targets.insert(id, (pool.name.clone(), b.address));
                }
            }
        }
        for (name, s) in &self.state.services {
            let Some(table) = &s.spec.health else {
                continue;
            };
            let spec = match health::spec_from_table(table) {
                Ok(spec) => spec,
                Err(e) => {
                    // Validated already; a failure here is a bug, not an operator error.
                    error!(service = %name, error = %e, "health check spec invalid");
                    continue;
                }
            };
            for (i, b) in s.backends.iter().enumerate() {
                let id = target_id(s.id, i);
                let initial = if b.health == Health::Down {
                    Checked::Down
                } else {
                    Checked::Up
                };
                self.monitor.add(id, b.address, spec.clone(), initial);
                self.targets.insert(id, (name.clone(), i));
            }
        }
        // A checked backend starts up (it needs `fall` failures to go down), as the monitor
        // sees it; both states mean the same to the dataplane, so no map write.
        for s in self.state.services.values_mut() {
            if s.spec.health.is_some() {
                for b in &mut s.backends {
                    if b.health == Health::Unchecked {
                        b.health = Health::Up;
                    }
                }
            }
        }
    }

    fn note(&mut self, ev: Option<Event>) {
        if let Some(Event::Failover { service, from, to }) = ev {
            self.failovers += 1;
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

    /// Applies one health change.
    pub fn on_health(&mut self, ev: HealthEvent) {
        if let Some((pool, addr)) = self.l7_targets.get(&ev.target) {
            if let Some(l7) = &self.l7 {
                l7.set_backend_health(pool, *addr, ev.health.is_up());
                info!(pool = %pool, backend = %addr, up = ev.health.is_up(), reason = %ev.reason, "l7 backend health changed");
            }
            return;
        }
        let Some((service, idx)) = self.targets.get(&ev.target).cloned() else {
            return;
        };
        let new = if ev.health.is_up() {
            Health::Up
        } else {
            Health::Down
        };
        let Some(old) = self
            .state
            .services
            .get(&service)
            .and_then(|s| s.backends.get(idx))
            .map(|b| b.health)
        else {
            return;
        };
        if old == new {
            return;
        }
        match self.state.set_health(&mut self.dp, &service, idx, new) {
            Ok(e) => {
                let took = ev.at.elapsed();
                info!(
                    service = %service,
                    backend = %ev.addr,
                    old = ?old,
                    new = ?new,
                    reason = %ev.reason,
                    map_update_us = took.as_micros() as u64,
                    "backend health changed"
                );
                self.note(e);
            }
            Err(e) => {
                error!(service = %service, backend = %ev.addr, error = %e, "cannot apply health change")
            }
        }
    }

    /// Re-reads the config file; a bad file changes nothing.
    pub async fn reload(&mut self) -> Result<String, String> {
        let new = match config::load(&self.opts.config) {
            Ok(c) => c,
            Err(e) => {
                self.config_errors += 1;
                error!(errors = %e, "reload refused: the running config keeps serving");
                return Err(format!("config refused, nothing changed:\n{e}"));
            }
        };
        if let Err(e) = check_snat_ports(&new) {
            self.config_errors += 1;
            return Err(e.to_string());
        }
        if new.interfaces != self.cfg.interfaces
            || new.raw.dataplane.pin_path != self.cfg.raw.dataplane.pin_path
        {
            self.config_errors += 1;
            return Err("interfaces and pin_path change only with a restart".into());
        }
        // L7 first: it refuses a bad certificate as a whole, before anything else changes.
        match (&self.l7, &new.raw.l7) {
            (Some(l7), Some(c)) => {
                if let Err(e) = add_l7_addresses(&new) {
                    self.config_errors += 1;
                    return Err(e.to_string());
                }
                if let Err(e) = l7.reload(c.get_ref().clone()).await {
                    self.config_errors += 1;
                    error!(error = %e, "reload refused by the L7 proxy: the running config keeps serving");
                    return Err(format!("l7 refused, nothing changed: {e:#}"));
                }
            }
            (None, None) => {}
            _ => {
                self.config_errors += 1;
                return Err("adding or removing the [l7] section needs a restart".into());
            }
        }
        match State::apply_config(&mut self.dp, &new, Some(self.state.clone())) {
            Ok(s) => {
                self.state = s;
                if let Ok(mut t) = self.gc_timeouts.lock() {
                    *t = timeouts(&new);
                }
                self.cfg = new;
                self.reloads += 1;
                self.register_checks();
                self.prime_neighbours(true);
                self.save_admin();
                info!(services = self.state.services.len(), "config reloaded");
                Ok(format!("reloaded: {} services", self.state.services.len()))
            }
            Err(e) => {
                self.config_errors += 1;
                error!(error = %e, "reload failed");
                Err(format!("reload failed: {e}"))
            }
        }
    }

    /// Answers an operator request.
    pub async fn on_request(&mut self, req: Request) -> Result<serde_json::Value, String> {
        let admin = |op: &str| match op {
            "drain" => AdminState::Drain,
            "disable" => AdminState::Disabled,
            _ => AdminState::Up,
        };
        let (op, service, backend) = match req {
            Request::Status => {
                return serde_json::to_value(self.status()).map_err(|e| e.to_string());
            }
            Request::Reload => {
                return self
                    .reload()
                    .await
                    .map(|m| serde_json::json!({ "ok": true, "message": m }));
            }
            Request::Drain { service, backend } => ("drain", service, backend),
            Request::Disable { service, backend } => ("disable", service, backend),
            Request::Enable { service, backend } => ("enable", service, backend),
        };
        let (svc, idx) = self
            .state
            .find(&service, &backend)
            .map_err(|e| e.to_string())?;
        let old = self.state.services[&svc].backends[idx].admin;
        let ev = self
            .state
            .set_admin(&mut self.dp, &svc, idx, admin(op))
            .map_err(|e| e.to_string())?;
        let addr = self.state.services[&svc].backends[idx].address;
        info!(service = %svc, backend = %addr, old = ?old, new = ?admin(op), reason = "operator", "backend admin state changed");
        self.save_admin();
        self.note(ev);
        Ok(serde_json::json!({ "ok": true, "message": format!("{op}: {svc} {addr}") }))
    }

    /// The status report.
    pub fn status(&self) -> Status {
        let flows = self.gc.entries.load(std::sync::atomic::Ordering::Relaxed) as usize;
        // Only the verdict reasons: service and backend counters are read per entry below.
        let reasons = self.dp.reasons();
        let l7 = self.l7.as_ref().map(|l| l.metrics());
        let services = self
            .state
            .services
            .values()
            .map(|s| ServiceStatus {
                name: s.spec.name.clone(),
                vip: s.spec.vip,
                protocol: format!("{:?}", s.spec.protocol).to_lowercase(),
                forwarding: format!("{:?}", s.spec.forwarding).to_lowercase(),
                scheduler: format!("{:?}", s.spec.scheduler).to_lowercase(),
                health_check: s
                    .spec
                    .health
                    .as_ref()
                    .and_then(|h| h.get("kind"))
                    .and_then(|k| k.as_str())
                    .map(str::to_string),
                active: s.active.map(|a| s.backends[a].address),
                traffic: self.dp.service_counters(s.id).into(),
                backends: s
                    .backends
                    .iter()
                    .enumerate()
                    .map(|(i, b)| BackendStatus {
                        address: b.address,
                        weight: b.weight,
                        priority: b.priority,
                        admin: format!("{:?}", b.admin).to_lowercase(),
                        health: format!("{:?}", b.health).to_lowercase(),
                        state: s.state_name(i).to_string(),
                        active: s.active == Some(i),
                        check_latency_ms: self
                            .monitor
                            .last_latency(target_id(s.id, i))
                            .map(|d| d.as_secs_f64() * 1e3),
                        traffic: Traffic::from(self.dp.backend_counters(b.slot)),
                    })
                    .collect(),
            })
            .collect();
        Status {
            config: self.opts.config.display().to_string(),
            interfaces: self.cfg.interfaces.clone(),
            uptime_secs: self.started.elapsed().as_secs(),
            reloads: self.reloads,
            config_errors: self.config_errors,
            failovers: self.failovers,
            flows,
            reasons: reasons
                .into_iter()
                .map(|(r, v)| (r.name().to_string(), v))
                .collect(),
            services,
            l7_backends: self.l7_backends(l7.as_ref()),
            l7,
            capacity: crate::control::Capacity {
                flow_table_entries: self.cfg.raw.dataplane.flow_table_size,
                snat_ports: {
                    let [lo, hi] = *self.cfg.raw.dataplane.snat_ports.get_ref();
                    u32::from(hi.saturating_sub(lo)) + 1
                },
            },
            certificates: self
                .cfg
                .raw
                .l7
                .as_ref()
                .map(|l| crate::metrics::certificate_expiry(l.get_ref()))
                .unwrap_or_default(),
        }
    }
}

/// Starts the control socket and the metrics endpoint.
fn start_endpoints(d: &Daemon, tx: &mpsc::Sender<Message>) {
    let socket = d.cfg.raw.controller.socket.clone();
    let t = tx.clone();
    tokio::spawn(async move {
        if let Err(e) = crate::api::serve(&socket, t).await {
            error!(error = %e, "control socket failed");
        }
    });
    if let Some(addr) = d.cfg.metrics {
        let t = tx.clone();
        tokio::spawn(async move {
            if let Err(e) = crate::metrics::serve(addr, t).await {
                error!(error = %e, "metrics endpoint failed");
            }
        });
    }
}

/// Puts the L7 listeners' and redirects' addresses on the interface (like VIPs), so the proxy
/// can bind them and the kernel answers ARP / ND for them.
fn add_l7_addresses(cfg: &Validated) -> anyhow::Result<()> {
    let Some(l7) = &cfg.raw.l7 else { return Ok(()) };
    let Some(iface) = cfg.interfaces.first() else {
        return Ok(());
    };
    let addrs = l7
        .get_ref()
        .listeners
        .iter()
        .map(|l| l.address)
        .chain(l7.get_ref().redirects.iter().map(|r| r.address));
    for a in addrs {
        let ip = a.ip();
        if ip.is_unspecified() || ip.is_loopback() {
            continue;
        }
        net::add_vip(iface, ip).with_context(|| format!("adding L7 address {ip}"))?;
    }
    Ok(())
}

/// Operator overrides (drain / disable / enable against the config), by service and backend.
type AdminOverrides =
    std::collections::BTreeMap<String, std::collections::BTreeMap<String, AdminState>>;

impl Daemon {
    /// Where operator overrides are kept across controller restarts: beside the control
    /// socket (a runtime directory: a reboot starts from the config again).
    fn admin_file(&self) -> PathBuf {
        let sock = &self.cfg.raw.controller.socket;
        sock.parent()
            .unwrap_or(std::path::Path::new("/run/balancer"))
            .join("admin-state.json")
    }

    /// Writes the operator overrides (atomically, root-only).
    fn save_admin(&self) {
        let mut o = AdminOverrides::new();
        for (name, s) in &self.state.services {
            for (b, spec) in s.backends.iter().zip(&s.spec.backends) {
                if b.admin != spec.state {
                    o.entry(name.clone())
                        .or_default()
                        .insert(b.address.to_string(), b.admin);
                }
            }
        }
        let path = self.admin_file();
        let tmp = path.with_extension("json.tmp");
        let write = || -> anyhow::Result<()> {
            use std::os::unix::fs::OpenOptionsExt as _;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            std::io::Write::write_all(&mut f, serde_json::to_string_pretty(&o)?.as_bytes())?;
            std::fs::rename(&tmp, &path)?;
            Ok(())
        };
        if let Err(e) = write() {
            warn!(path = %path.display(), error = %e, "cannot save operator states; they will not survive a restart");
        }
    }

    /// Re-applies the operator overrides saved by a previous controller.
    fn restore_admin(&mut self) {
        let path = self.admin_file();
        let Ok(text) = std::fs::read_to_string(&path) else {
            return;
        };
        let o: AdminOverrides = match serde_json::from_str(&text) {
            Ok(o) => o,
            Err(e) => {
                warn!(path = %path.display(), error = %e, "ignoring unreadable operator states");
                return;
            }
        };
        for (svc, backends) in o {
            for (addr, admin) in backends {
                let Ok((name, idx)) = self.state.find(&svc, &addr) else {
                    continue;
                };
                match self.state.set_admin(&mut self.dp, &name, idx, admin) {
                    Ok(ev) => {
                        info!(service = %name, backend = %addr, state = ?admin, "operator state restored");
                        self.note(ev);
                    }
                    Err(e) => {
                        warn!(service = %name, backend = %addr, error = %e, "cannot restore operator state")
                    }
                }
            }
        }
    }

    /// Members of the L7 pools with their checked health and counters.
    fn l7_backends(
        &self,
        m: Option<&balancer_l7::Metrics>,
    ) -> Vec<crate::control::L7BackendStatus> {
        let Some(l7) = &self.cfg.raw.l7 else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (p, pool) in l7.get_ref().pools.iter().enumerate() {
            for (i, b) in pool.backends.iter().enumerate() {
                let id = (1u64 << 63) | ((p as u64) << 32) | i as u64;
                let health = match (pool.health.is_some(), self.monitor.state(id)) {
                    (false, _) | (true, None) => "unchecked".to_string(),
                    (true, Some(h)) => if h.is_up() { "up" } else { "down" }.to_string(),
                };
                let counters = m.and_then(|m| {
                    m.backends
                        .iter()
                        .find(|x| x.pool == pool.name && x.address == b.address)
                });
                out.push(crate::control::L7BackendStatus {
                    pool: pool.name.clone(),
                    address: b.address,
                    health,
                    check_latency_ms: self.monitor.last_latency(id).map(|d| d.as_secs_f64() * 1e3),
                    requests: counters.map_or(0, |c| c.requests),
                    connect_failures: counters.map_or(0, |c| c.connect_failures),
                });
            }
        }
        out
    }
}

fn timeouts(cfg: &Validated) -> crate::gc::Timeouts {
    crate::gc::Timeouts {
        tcp_idle: cfg.raw.dataplane.tcp_idle_timeout.as_secs() as u32,
        udp_idle: cfg.raw.dataplane.udp_idle_timeout.as_secs() as u32,
    }
}

fn check_snat_ports(cfg: &Validated) -> anyhow::Result<()> {
    let (eph_lo, eph_hi) = net::ephemeral_ports()?;
    let [lo, hi] = *cfg.raw.dataplane.snat_ports.get_ref();
    if lo <= eph_hi && eph_lo <= hi {
        anyhow::bail!(
            "snat_ports {lo}-{hi} overlap the kernel's ephemeral ports {eph_lo}-{eph_hi} (net.ipv4.ip_local_port_range): choose a disjoint range"
        );
    }
    Ok(())
}

/// Runs until SIGTERM / SIGINT. The dataplane keeps forwarding after the process exits
/// (everything is pinned); `balancer teardown` removes it.
pub async fn run(opts: RunOptions) -> anyhow::Result<()> {
    let (ev_tx, mut ev_rx) = mpsc::unbounded_channel();
    let mut d = Daemon::start(opts, ev_tx).await?;
    let (ctl_tx, mut ctl_rx) = mpsc::channel::<Message>(64);
    start_endpoints(&d, &ctl_tx);
    info!(
        services = d.state.services.len(),
        interfaces = ?d.cfg.interfaces,
        "balancer ready"
    );
    crate::systemd::ready();
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let mut neigh = tokio::time::interval(Duration::from_secs(10));
    // The watchdog is fed from this loop, so a stuck loop gets the daemon restarted.
    let mut dog = tokio::time::interval(
        crate::systemd::watchdog_period()
            .map(|p| p / 2)
            .unwrap_or(Duration::from_secs(3600)),
    );
    loop {
        tokio::select! {
            _ = dog.tick() => crate::systemd::watchdog(),
            _ = neigh.tick() => d.prime_neighbours(false),
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => {
                crate::systemd::reloading();
                let _ = d.reload().await;
                crate::systemd::ready();
            }
            Some(ev) = ev_rx.recv() => d.on_health(ev),
            Some(msg) = ctl_rx.recv() => {
                let reload = msg.request == Request::Reload;
                if reload {
                    crate::systemd::reloading();
                }
                let reply = d.on_request(msg.request).await;
                if reload {
                    crate::systemd::ready();
                }
                let _ = msg.reply.send(reply);
            }
        }
    }
    crate::systemd::stopping();
    if let Some(l7) = d.l7.take() {
        l7.shutdown(Duration::from_secs(10)).await;
    }
    info!("stopping: the dataplane keeps forwarding (balancer teardown removes it)");
    Ok(())
}
