//! Desired state (config + health + operator actions) turned into map writes.
//!
//! Every backend of every service owns one slot of the backend array; every service owns an id
//! (its ring and counters). On start the slots and ids found in pinned maps are adopted by
//! (VIP, backend address), so flows made by an earlier controller keep their backend.

use std::{
    collections::{BTreeMap, HashSet},
    net::{IpAddr, SocketAddr},
};

use anyhow::{Context as _, anyhow, bail};
use balancer_common::{
    ABI_VERSION, BE_DOWN, BE_DRAINING, BE_UP, Backend, Globals, MAX_BACKENDS, MAX_SERVICES,
    NO_BACKEND, PROTO_TCP, PROTO_UDP, SVC_F_DOWN_DROP, SVC_F_DSR, SVC_F_IPV6, Service, ServiceKey,
};
use serde::Serialize;
use tracing::info;

use crate::{
    config::{AdminState, DownAction, Forwarding, Protocol, Scheduler, ServiceSpec, Validated},
    dataplane::{Dataplane, maglev},
    host::net,
};

/// Health as the controller knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    /// No check configured, or not checked yet and assumed up.
    Unchecked,
    /// Passing.
    Up,
    /// Failing.
    Down,
}

/// One backend's live state.
#[derive(Debug, Clone)]
pub struct BackendState {
    /// Address.
    pub address: SocketAddr,
    /// Weight.
    pub weight: u32,
    /// Priority.
    pub priority: u32,
    /// Operator state.
    pub admin: AdminState,
    /// Health.
    pub health: Health,
    /// Slot in the backend array.
    pub slot: u32,
    /// Slot generation.
    pub generation: u32,
}

impl BackendState {
    /// The state the dataplane sees.
    pub fn dataplane_state(&self) -> u32 {
        match (self.admin, self.health) {
            (AdminState::Disabled, _) | (_, Health::Down) => BE_DOWN,
            (AdminState::Drain, _) => BE_DRAINING,
            _ => BE_UP,
        }
    }
    fn eligible(&self) -> bool {
        self.dataplane_state() == BE_UP
    }
}

/// One service's live state.
#[derive(Debug, Clone)]
pub struct ServiceState {
    /// The validated config.
    pub spec: ServiceSpec,
    /// Service id.
    pub id: u32,
    /// Map key.
    pub key: ServiceKey,
    /// Live ring half.
    pub half: u32,
    /// SNAT address (16-byte form).
    pub snat: [u8; 16],
    /// Backends in config order.
    pub backends: Vec<BackendState>,
    /// Failover: index (in `backends`) of the active backend.
    pub active: Option<usize>,
}

/// A change worth logging (once) and counting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A failover service changed its active backend.
    Failover {
        /// Service.
        service: String,
        /// Old active.
        from: Option<SocketAddr>,
        /// New active.
        to: Option<SocketAddr>,
    },
}

/// The controller's view of the dataplane.
#[derive(Debug, Clone)]
pub struct State {
    /// Services by name.
    pub services: BTreeMap<String, ServiceState>,
    /// SNAT port range.
    pub snat_ports: (u16, u16),
    /// Interfaces (for VIPs).
    pub interfaces: Vec<String>,
    snat_v4: Option<IpAddr>,
    snat_v6: Option<IpAddr>,
}

/// The seed of a service's 5-tuple hash: stable across restarts.
fn seed_of(name: &str) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in name.as_bytes() {
        h ^= *b as u32;
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

/// The service-map key of a VIP.
pub fn service_key(vip: SocketAddr, protocol: Protocol) -> ServiceKey {
    ServiceKey {
        addr: net::addr16(vip.ip()),
        port: vip.port().to_be(),
        proto: match protocol {
            Protocol::Tcp => PROTO_TCP,
            Protocol::Udp => PROTO_UDP,
        },
        pad: 0,
    }
}

impl State {
    /// Builds the state for a validated config against what the maps already hold, writes
    /// everything, and puts the VIPs on the interfaces.
    pub fn apply_config(
        dp: &mut Dataplane,
        cfg: &Validated,
        old: Option<State>,
    ) -> anyhow::Result<State> {
        let raw = &cfg.raw.dataplane;
        let snat_ports = (raw.snat_ports.get_ref()[0], raw.snat_ports.get_ref()[1]);
        let iface = cfg.interfaces.first().cloned().unwrap_or_default();
        let snat_v4 = match cfg.snat_ipv4 {
            Some(ip) => Some(ip),
            None => net::interface_address(&iface, false)?,
        };
        let snat_v6 = match cfg.snat_ipv6 {
            Some(ip) => Some(ip),
            None => net::interface_address(&iface, true)?,
        };
        let mut st = State {
            services: BTreeMap::new(),
            snat_ports,
            interfaces: cfg.interfaces.clone(),
            snat_v4,
            snat_v6,
        };
        // What is already there: services by key, backend slots by (service id, address).
        let existing: Vec<(ServiceKey, Service)> = dp.services();
        let slots: Vec<(u32, Backend)> = dp.backends();
        let mut used_ids: HashSet<u32> = HashSet::new();
        let mut used_slots: HashSet<u32> = HashSet::new();
        let old = old.map(|o| o.services).unwrap_or_default();

        // Pass 1: keep ids of services whose key is unchanged.
        let mut ids: BTreeMap<String, (u32, u32)> = BTreeMap::new();
        for spec in &cfg.services {
            let key = service_key(spec.vip, spec.protocol);
            if let Some((_, s)) = existing.iter().find(|(k, _)| *k == key)
                && s.id < MAX_SERVICES
                && used_ids.insert(s.id)
            {
                ids.insert(spec.name.clone(), (s.id, s.ring_half));
            }
        }
        for spec in &cfg.services {
            if ids.contains_key(&spec.name) {
                continue;
            }
            let id = (0..MAX_SERVICES)
                .find(|i| !used_ids.contains(i) && !existing.iter().any(|(_, s)| s.id == *i))
                .or_else(|| (0..MAX_SERVICES).find(|i| !used_ids.contains(i)))
                .ok_or_else(|| anyhow!("no free service id"))?;
            used_ids.insert(id);
            dp.reset_service_counters(id)?;
            ids.insert(spec.name.clone(), (id, 1));
        }

        // Pass 2: backend slots, adopted by (service id, address), else fresh.
        // (slot, generation, dataplane state) of a backend found in the pinned maps.
        type Adopted = Option<(u32, u32, u32)>;
        type Plan = (ServiceSpec, u32, u32, Vec<(usize, Adopted)>);
        let mut plan: Vec<Plan> = Vec::new();
        for spec in &cfg.services {
            let (id, half) = ids[&spec.name];
            let mut bes = Vec::new();
            for (i, b) in spec.backends.iter().enumerate() {
                let a16 = net::addr16(b.address.ip());
                let found = slots.iter().find(|(idx, s)| {
                    s.used != 0
                        && s.service == id
                        && s.addr == a16
                        && s.port == b.address.port().to_be()
                        && !used_slots.contains(idx)
                });
                let adopt = found.map(|(idx, s)| (*idx, s.generation, s.state));
                if let Some((idx, _, _)) = adopt {
                    used_slots.insert(idx);
                }
                bes.push((i, adopt));
            }
            plan.push((spec.clone(), id, half, bes));
        }
        // Slots no longer configured: mark down (their flows get reset), free.
        for (idx, s) in &slots {
            if s.used != 0 && !used_slots.contains(idx) {
                let mut b = *s;
                b.used = 0;
                b.state = BE_DOWN;
                dp.put_backend(*idx, &b)?;
            }
        }
        let fresh_slots = dp.backends();
        let mut next_free = 0u32;
        let mut take_slot = |used: &mut HashSet<u32>| -> anyhow::Result<(u32, u32)> {
            while next_free < MAX_BACKENDS {
                let i = next_free;
                next_free += 1;
                if used.contains(&i) {
                    continue;
                }
                let cur = fresh_slots
                    .iter()
                    .find(|(idx, _)| *idx == i)
                    .map(|(_, b)| *b);
                if cur.map(|b| b.used != 0).unwrap_or(false) {
                    continue;
                }
                used.insert(i);
                let generation = cur
                    .map(|b| b.generation)
                    .unwrap_or(0)
                    .wrapping_add(1)
                    .max(1);
                return Ok((i, generation));
            }
            bail!("no free backend slot")
        };

        for (spec, id, half, bes) in plan {
            let prev = old.get(&spec.name);
            let mut backends = Vec::new();
            for (i, adopt) in bes {
                let b = &spec.backends[i];
                let (slot, generation, was) = match adopt {
                    Some(x) => x,
                    None => {
                        let (slot, g) = take_slot(&mut used_slots)?;
                        dp.reset_backend_counters(slot)?;
                        (slot, g, BE_UP)
                    }
                };
                // Health and operator overrides carry over a reload for the same backend.
                let prev_be = prev.and_then(|p| p.backends.iter().find(|x| x.address == b.address));
                let health = match (&spec.health, prev_be) {
                    (None, _) => Health::Unchecked,
                    (Some(_), Some(p))
                        if prev.map(|p| p.spec.health == spec.health).unwrap_or(false) =>
                    {
                        p.health
                    }
                    // Adopted from a previous controller: a backend it saw down stays down
                    // until its checks pass again.
                    (Some(_), None)
                        if adopt.is_some() && was == BE_DOWN && b.state != AdminState::Disabled =>
                    {
                        Health::Down
                    }
                    (Some(_), _) => Health::Unchecked,
                };
                let admin = match prev_be {
                    Some(p)
                        if prev
                            .map(|ps| {
                                ps.spec
                                    .backends
                                    .iter()
                                    .any(|x| x.address == b.address && x.state == b.state)
                            })
                            .unwrap_or(false) =>
                    {
                        p.admin
                    }
                    _ => b.state,
                };
                backends.push(BackendState {
                    address: b.address,
                    weight: b.weight,
                    priority: b.priority,
                    admin,
                    health,
                    slot,
                    generation,
                });
            }
            let snat_ip = if spec.vip.is_ipv4() {
                st.snat_v4
            } else {
                st.snat_v6
            };
            let snat = match (spec.forwarding, snat_ip) {
                (Forwarding::Dsr, _) => [0; 16],
                (Forwarding::Nat, Some(ip)) => net::addr16(ip),
                (Forwarding::Nat, None) => bail!(
                    "service '{}': no SNAT address of the VIP's family on {iface}; set snat_ipv{} in [dataplane]",
                    spec.name,
                    if spec.vip.is_ipv4() { 4 } else { 6 }
                ),
            };
            let active = match prev {
                Some(p) => p
                    .active
                    .and_then(|a| p.backends.get(a))
                    .and_then(|a| backends.iter().position(|b| b.address == a.address)),
                // After a restart the live ring says who was active.
                None if dp.adopted && spec.scheduler == Scheduler::Failover => {
                    let live = dp
                        .read_ring(id, half & 1, 1)
                        .first()
                        .copied()
                        .unwrap_or(NO_BACKEND);
                    backends.iter().position(|b| b.slot == live)
                }
                None => None,
            };
            let key = service_key(spec.vip, spec.protocol);
            st.services.insert(
                spec.name.clone(),
                ServiceState {
                    spec,
                    id,
                    key,
                    half,
                    snat,
                    backends,
                    active,
                },
            );
        }

        // Services no longer configured leave the map first (their VIPs go back to the kernel).
        for (k, _) in &existing {
            if !st.services.values().any(|s| s.key == *k) {
                dp.remove_service(k)?;
            }
        }
        let (lo, hi) = st.snat_ports;
        dp.set_globals(Globals {
            abi_version: ABI_VERSION,
            snat_port_lo: lo,
            snat_port_hi: hi,
            tcp_idle_secs: cfg.raw.dataplane.tcp_idle_timeout.as_secs() as u32,
            udp_idle_secs: cfg.raw.dataplane.udp_idle_timeout.as_secs() as u32,
        })?;
        let names: Vec<String> = st.services.keys().cloned().collect();
        for n in names {
            st.write_service(dp, &n)?;
        }
        // VIPs of removed services off the interface, VIPs of current ones on.
        if let Some(o) = &old_vips(&old) {
            for ip in o {
                if !st.services.values().any(|s| s.spec.vip.ip() == *ip) {
                    for i in &st.interfaces {
                        net::remove_vip(i, *ip)?;
                    }
                }
            }
        }
        for s in st.services.values() {
            if let Some(i) = st.interfaces.first() {
                net::add_vip(i, s.spec.vip.ip())
                    .with_context(|| format!("adding VIP {}", s.spec.vip.ip()))?;
            }
        }
        Ok(st)
    }

    /// Writes one service: backend slots, a new ring into the spare half, then the flip.
    /// Returns the failover event, if the active backend changed.
    pub fn write_service(
        &mut self,
        dp: &mut Dataplane,
        name: &str,
    ) -> anyhow::Result<Option<Event>> {
        let s = self
            .services
            .get_mut(name)
            .ok_or_else(|| anyhow!("no service '{name}'"))?;
        let event = s.choose_active();
        let ring: Vec<u32> = match s.spec.scheduler {
            Scheduler::Maglev => {
                let entries: Vec<maglev::Entry> = s
                    .backends
                    .iter()
                    .filter(|b| b.eligible())
                    .map(|b| maglev::Entry {
                        name: b.address.to_string(),
                        weight: b.weight,
                        value: b.slot,
                    })
                    .collect();
                maglev::build(&entries, s.spec.ring_size)
            }
            Scheduler::Failover => {
                let v = s.active.map(|a| s.backends[a].slot).unwrap_or(NO_BACKEND);
                vec![v; s.spec.ring_size as usize]
            }
        };
        let spare = 1 - (s.half & 1);
        dp.write_ring(s.id, spare, &ring)?;
        // New flows avoid a failed backend from the flip on; then its flows are reset.
        let mut flags = 0;
        if s.spec.forwarding == Forwarding::Dsr {
            flags |= SVC_F_DSR;
        }
        if s.spec.on_backend_down == DownAction::Drop {
            flags |= SVC_F_DOWN_DROP;
        }
        if s.spec.vip.is_ipv6() {
            flags |= SVC_F_IPV6;
        }
        let svc = Service {
            id: s.id,
            flags,
            ring_half: spare,
            ring_size: s.spec.ring_size,
            seed: seed_of(&s.spec.name),
            snat_port_lo: self.snat_ports.0,
            snat_port_hi: self.snat_ports.1,
            snat_addr: s.snat,
        };
        // Backends that become usable must be writable before the ring points at them.
        let states: Vec<u32> = (0..s.backends.len())
            .map(|i| s.effective_state(i))
            .collect();
        for (b, st) in s.backends.iter().zip(&states) {
            if *st != BE_DOWN {
                dp.put_backend(b.slot, &slot_value(s.id, b, *st))?;
            }
        }
        dp.put_service(&s.key, &svc)?;
        s.half = spare;
        for (b, st) in s.backends.iter().zip(&states) {
            if *st == BE_DOWN {
                dp.put_backend(b.slot, &slot_value(s.id, b, *st))?;
            }
        }
        Ok(event)
    }

    fn backend_mut(&mut self, service: &str, backend: usize) -> anyhow::Result<&mut BackendState> {
        self.services
            .get_mut(service)
            .ok_or_else(|| anyhow!("no service '{service}'"))?
            .backends
            .get_mut(backend)
            .ok_or_else(|| anyhow!("no backend {backend}"))
    }

    /// Sets a backend's health and writes the service if that changes anything.
    pub fn set_health(
        &mut self,
        dp: &mut Dataplane,
        service: &str,
        backend: usize,
        health: Health,
    ) -> anyhow::Result<Option<Event>> {
        let b = self.backend_mut(service, backend)?;
        if b.health == health {
            return Ok(None);
        }
        b.health = health;
        self.write_service(dp, service)
    }

    /// Sets a backend's operator state and writes the service.
    pub fn set_admin(
        &mut self,
        dp: &mut Dataplane,
        service: &str,
        backend: usize,
        admin: AdminState,
    ) -> anyhow::Result<Option<Event>> {
        self.backend_mut(service, backend)?.admin = admin;
        self.write_service(dp, service)
    }

    /// Finds a backend by service name and address (or "address:port" / position).
    pub fn find(&self, service: &str, backend: &str) -> anyhow::Result<(String, usize)> {
        let s = self
            .services
            .get(service)
            .ok_or_else(|| anyhow!("no service '{service}'"))?;
        let i = s
            .backends
            .iter()
            .position(|b| b.address.to_string() == backend || b.address.ip().to_string() == backend)
            .ok_or_else(|| anyhow!("service '{service}' has no backend '{backend}'"))?;
        Ok((service.to_string(), i))
    }
}

fn old_vips(old: &BTreeMap<String, ServiceState>) -> Option<Vec<IpAddr>> {
    if old.is_empty() {
        None
    } else {
        Some(old.values().map(|s| s.spec.vip.ip()).collect())
    }
}

fn slot_value(service: u32, b: &BackendState, state: u32) -> Backend {
    Backend {
        addr: net::addr16(b.address.ip()),
        port: b.address.port().to_be(),
        ipv6: b.address.is_ipv6() as u8,
        used: 1,
        state,
        generation: b.generation,
        service,
    }
}

impl ServiceState {
    /// What the dataplane does with backend `i`. In a failover service only the active
    /// backend keeps flows: the others are "down" to the dataplane (their flows are reset),
    /// so that after a failover or a failback every sender ends up on the one live listener.
    /// A drained standby keeps its existing flows.
    pub fn effective_state(&self, i: usize) -> u32 {
        let b = &self.backends[i];
        let own = b.dataplane_state();
        if self.spec.scheduler != Scheduler::Failover || self.active == Some(i) || own == BE_DOWN {
            return own;
        }
        if own == BE_DRAINING {
            BE_DRAINING
        } else {
            BE_DOWN
        }
    }

    /// A name for backend `i`'s dataplane state: up, draining, down, or standby (a healthy
    /// backend of a failover service that is not the active one).
    pub fn state_name(&self, i: usize) -> &'static str {
        let st = self.effective_state(i);
        if st == BE_DOWN && self.backends[i].dataplane_state() == BE_UP {
            "standby"
        } else {
            crate::dataplane::counters::state_name(st)
        }
    }

    /// Failover: keeps the active backend while it is eligible (and, with failback, while no
    /// eligible backend has a better priority); else the eligible one with the best priority.
    fn choose_active(&mut self) -> Option<Event> {
        if self.spec.scheduler != Scheduler::Failover {
            return None;
        }
        let best = self
            .backends
            .iter()
            .enumerate()
            .filter(|(_, b)| b.eligible())
            .min_by_key(|(i, b)| (b.priority, *i))
            .map(|(i, _)| i);
        let keep = match self.active {
            Some(a) if self.backends[a].eligible() => {
                !self.spec.failback
                    || best
                        .map(|b| self.backends[b].priority >= self.backends[a].priority)
                        .unwrap_or(true)
            }
            _ => false,
        };
        let new = if keep { self.active } else { best };
        if new == self.active {
            return None;
        }
        let ev = Event::Failover {
            service: self.spec.name.clone(),
            from: self.active.map(|a| self.backends[a].address),
            to: new.map(|a| self.backends[a].address),
        };
        info!(service = %self.spec.name, from = ?self.active.map(|a| self.backends[a].address), to = ?new.map(|a| self.backends[a].address), "active backend changed");
        self.active = new;
        Some(ev)
    }
}
