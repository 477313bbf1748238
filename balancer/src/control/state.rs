//! The controller's view of the dataplane: every service with its id, ring half and backends,
//! each backend with its slot, operator state and health. A [`State`] is what the last
//! successful apply put into the maps; [`super::plan`] computes the next one.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
};

use balancer_common::{
    BE_DOWN, BE_DRAINING, BE_UP, Backend, Globals, MAX_SNAT_ADDRS, NO_BACKEND, PROTO_TCP,
    PROTO_UDP, SVC_F_DOWN_DROP, SVC_F_DSR, SVC_F_IPV6, Service, ServiceKey,
};
use serde::{Deserialize, Serialize};

use crate::{
    config::{AdminState, DownAction, Forwarding, Mode, Protocol, Scheduler, ServiceSpec},
    control::{ControlError, failover},
    dataplane::maglev,
    host::net,
};

/// A backend's health as the controller knows it (the checker's own debounced state is
/// `balancer_health::Health`; this one adds "not checked").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendHealth {
    /// No check configured, or not checked yet and assumed up.
    Unchecked,
    /// Passing.
    Up,
    /// Failing.
    Down,
}

/// What the dataplane does with a backend, as the status shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SlotState {
    /// Takes new flows.
    Up,
    /// Keeps its flows, takes no new ones.
    Draining,
    /// Its flows are reset or dropped.
    Down,
    /// A healthy backend of a failover service that is not the active one.
    Standby,
}

crate::config::names!(BackendHealth { Unchecked => "unchecked", Up => "up", Down => "down" });
crate::config::names!(SlotState { Up => "up", Draining => "draining", Down => "down", Standby => "standby" });

/// One backend's live state.
#[derive(Debug, Clone, PartialEq)]
pub struct BackendState {
    /// Address.
    pub address: SocketAddr,
    /// Maglev weight.
    pub weight: u32,
    /// Failover priority (lower first).
    pub priority: u32,
    /// Operator state.
    pub admin: AdminState,
    /// Health.
    pub health: BackendHealth,
    /// Slot in the backend array.
    pub slot: u32,
    /// Slot generation (bumped when a slot goes to another backend).
    pub generation: u32,
}

impl BackendState {
    /// The state the dataplane sees, ignoring failover.
    pub fn dataplane_state(&self) -> u32 {
        match (self.admin, self.health) {
            (AdminState::Disabled, _) | (_, BackendHealth::Down) => BE_DOWN,
            (AdminState::Drain, _) => BE_DRAINING,
            _ => BE_UP,
        }
    }

    /// May take new flows.
    pub fn eligible(&self) -> bool {
        self.dataplane_state() == BE_UP
    }
}

/// One service's live state.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceState {
    /// The validated config.
    pub spec: ServiceSpec,
    /// Service id (ring and counters).
    pub id: u32,
    /// Map key.
    pub key: ServiceKey,
    /// Live ring half.
    pub half: u32,
    /// SNAT addresses, the pool in config order (16-byte form; empty for DSR).
    pub snat: Vec<[u8; 16]>,
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

/// Everything one service write puts into the maps, in the order [`super::apply`] writes it:
/// the ring into the spare half, the usable backends, the service (the flip), then the
/// backends that go down.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceWrite {
    /// Service name.
    pub name: String,
    /// Map key.
    pub key: ServiceKey,
    /// The service value; its `ring_half` is the half `ring` goes into.
    pub service: Service,
    /// The ring.
    pub ring: Vec<u32>,
    /// Slots that take or keep flows: written before the flip.
    pub usable: Vec<(u32, Backend)>,
    /// Slots that go down: written after the flip.
    pub down: Vec<(u32, Backend)>,
    /// A relayed service (`mode = "mllp"`): nothing of it goes into the maps, so the XDP
    /// program passes its VIP:port to the kernel, where the controller's relay listens.
    pub relay: bool,
}

/// The controller's view of the dataplane.
#[derive(Debug, Clone, PartialEq)]
pub struct State {
    /// Services by name.
    pub services: BTreeMap<String, ServiceState>,
    /// The globals in the map.
    pub globals: Globals,
    /// Interfaces (for VIPs).
    pub interfaces: Vec<String>,
    /// Addresses this state put on the interface (service VIPs and L7 addresses).
    pub vips: Vec<IpAddr>,
}

/// The seed of a service's 5-tuple hash: stable across restarts.
pub fn seed_of(name: &str) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in name.as_bytes() {
        h ^= u32::from(*b);
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

/// The backend-array value of a backend in `state`.
pub fn slot_value(service: u32, b: &BackendState, state: u32) -> Backend {
    Backend {
        addr: net::addr16(b.address.ip()),
        port: b.address.port().to_be(),
        ipv6: u8::from(b.address.is_ipv6()),
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
        let Some(b) = self.backends.get(i) else {
            return BE_DOWN;
        };
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

    /// Backend `i`'s dataplane state, with "standby" for a healthy failover backend that is
    /// not the active one.
    pub fn slot_state(&self, i: usize) -> SlotState {
        let st = self.effective_state(i);
        let own = self.backends.get(i).map(BackendState::dataplane_state);
        match st {
            BE_DOWN if own == Some(BE_UP) => SlotState::Standby,
            BE_DOWN => SlotState::Down,
            BE_DRAINING => SlotState::Draining,
            _ => SlotState::Up,
        }
    }

    /// Index of the backend at `address`.
    pub fn position(&self, address: SocketAddr) -> Option<usize> {
        self.backends.iter().position(|b| b.address == address)
    }

    /// Chooses the active backend (failover), then computes the write that makes this state
    /// live: the ring goes into the spare half, and `half` becomes that half.
    pub fn write(&mut self, globals: &Globals) -> (ServiceWrite, Option<Event>) {
        let event = failover::choose_active(self);
        let ring: Vec<u32> = match self.spec.scheduler {
            Scheduler::Maglev => {
                let entries: Vec<maglev::Entry> = self
                    .backends
                    .iter()
                    .filter(|b| b.eligible())
                    .map(|b| maglev::Entry {
                        name: b.address.to_string(),
                        weight: b.weight,
                        value: b.slot,
                    })
                    .collect();
                maglev::build(&entries, self.spec.ring_size)
            }
            Scheduler::Failover => {
                let v = self
                    .active
                    .and_then(|a| self.backends.get(a))
                    .map_or(NO_BACKEND, |b| b.slot);
                vec![v; self.spec.ring_size as usize]
            }
        };
        let spare = 1 - (self.half & 1);
        let mut flags = 0;
        if self.spec.forwarding == Forwarding::Dsr {
            flags |= SVC_F_DSR;
        }
        if self.spec.on_backend_down == DownAction::Drop {
            flags |= SVC_F_DOWN_DROP;
        }
        if self.spec.vip.is_ipv6() {
            flags |= SVC_F_IPV6;
        }
        let mut snat_addrs = [[0; 16]; MAX_SNAT_ADDRS];
        let snat_addr_count = self.snat.len().min(MAX_SNAT_ADDRS);
        snat_addrs[..snat_addr_count].copy_from_slice(&self.snat[..snat_addr_count]);
        let service = Service {
            id: self.id,
            flags,
            ring_half: spare,
            ring_size: self.spec.ring_size,
            seed: seed_of(&self.spec.name),
            snat_port_lo: globals.snat_port_lo,
            snat_port_hi: globals.snat_port_hi,
            snat_addrs,
            snat_addr_count: snat_addr_count as u32,
            new_flow_rate: self.spec.new_flow_rate,
        };
        let mut usable = Vec::new();
        let mut down = Vec::new();
        for (i, b) in self.backends.iter().enumerate() {
            let st = self.effective_state(i);
            let v = (b.slot, slot_value(self.id, b, st));
            if st == BE_DOWN {
                down.push(v);
            } else {
                usable.push(v);
            }
        }
        self.half = spare;
        let write = ServiceWrite {
            name: self.spec.name.clone(),
            key: self.key,
            service,
            ring,
            usable,
            down,
            relay: self.spec.mode == Mode::Mllp,
        };
        (write, event)
    }
}

/// A change of one service, ready to be written: the state it leads to and its write.
#[derive(Debug, Clone)]
pub struct Change {
    /// The service as it will be.
    pub next: ServiceState,
    /// What to write.
    pub write: ServiceWrite,
    /// A failover it causes.
    pub event: Option<Event>,
}

impl State {
    fn service(&self, service: &str) -> Result<&ServiceState, ControlError> {
        self.services
            .get(service)
            .ok_or_else(|| ControlError::NoService(service.to_string()))
    }

    /// Finds a backend by service name and address ("10.77.0.11:7002") or IP.
    pub fn find(&self, service: &str, backend: &str) -> Result<SocketAddr, ControlError> {
        let s = self.service(service)?;
        s.backends
            .iter()
            .find(|b| b.address.to_string() == backend || b.address.ip().to_string() == backend)
            .map(|b| b.address)
            .ok_or_else(|| ControlError::NoBackend {
                service: service.to_string(),
                backend: backend.to_string(),
            })
    }

    /// The change that gives backend `address` of `service` the health `health`; `None`
    /// when that is its health already. Nothing changes until [`State::commit`].
    pub fn health_change(
        &self,
        service: &str,
        address: SocketAddr,
        health: BackendHealth,
    ) -> Result<Option<Change>, ControlError> {
        self.change(service, address, |b| {
            if b.health == health {
                false
            } else {
                b.health = health;
                true
            }
        })
    }

    /// The change that gives backend `address` of `service` the operator state `admin`.
    pub fn admin_change(
        &self,
        service: &str,
        address: SocketAddr,
        admin: AdminState,
    ) -> Result<Option<Change>, ControlError> {
        self.change(service, address, |b| {
            if b.admin == admin {
                false
            } else {
                b.admin = admin;
                true
            }
        })
    }

    /// The change that makes `address` the active backend of failover service `service`
    /// (a standby following its peer's choice); `None` when it is active already. The
    /// failover rule still applies: a backend that cannot take flows is not made active.
    pub fn active_change(
        &self,
        service: &str,
        address: SocketAddr,
    ) -> Result<Option<Change>, ControlError> {
        let mut next = self.service(service)?.clone();
        let i = next
            .position(address)
            .ok_or_else(|| ControlError::NoBackend {
                service: service.to_string(),
                backend: address.to_string(),
            })?;
        if next.active == Some(i) {
            return Ok(None);
        }
        next.active = Some(i);
        let (write, event) = next.write(&self.globals);
        Ok(Some(Change { next, write, event }))
    }

    fn change(
        &self,
        service: &str,
        address: SocketAddr,
        f: impl FnOnce(&mut BackendState) -> bool,
    ) -> Result<Option<Change>, ControlError> {
        let mut next = self.service(service)?.clone();
        let b = next
            .backends
            .iter_mut()
            .find(|b| b.address == address)
            .ok_or_else(|| ControlError::NoBackend {
                service: service.to_string(),
                backend: address.to_string(),
            })?;
        if !f(b) {
            return Ok(None);
        }
        let (write, event) = next.write(&self.globals);
        Ok(Some(Change { next, write, event }))
    }

    /// Writes `change` (if any) and, once written, makes it part of the state.
    pub fn set(
        &mut self,
        maps: &mut impl crate::control::maps::Maps,
        change: Option<Change>,
    ) -> Result<Option<Event>, crate::control::maps::MapError> {
        let Some(change) = change else {
            return Ok(None);
        };
        crate::control::apply::write_service(&change.write, maps)?;
        let event = change.event.clone();
        self.commit(change);
        Ok(event)
    }

    /// Makes a written change part of the state.
    pub fn commit(&mut self, change: Change) {
        self.services
            .insert(change.next.spec.name.clone(), change.next);
    }
}

#[cfg(test)]
mod tests {
    use crate::control::fake::Rig;
    use crate::control::state::BackendHealth;

    /// One DSR service of four backends at full ring size, as every balancer of an ECMP
    /// group would run it.
    const WEB: &str = r#"
[[service]]
name = "web"
vip = "10.88.0.100:7002"
forwarding = "dsr"
health = { kind = "tcp", interval = "500ms" }
backends = [ { address = "10.77.0.11:7002" }, { address = "10.77.0.12:7002", weight = 2 }, { address = "10.77.0.13:7002" }, { address = "10.77.0.14:7002" } ]
"#;

    /// Another service whose backends take slots first on one of the balancers.
    const OTHER: &str = r#"
[[service]]
name = "other"
vip = "10.88.0.101:80"
backends = [ { address = "10.77.0.21:80" }, { address = "10.77.0.22:80" }, { address = "10.77.0.23:80" } ]
"#;

    /// The live ring of `svc` by backend address (what a flow hashed to each position
    /// reaches), and the service's flow-hash seed.
    fn ring(rig: &Rig, svc: &str) -> (Vec<Option<String>>, u32) {
        let s = rig.service(svc);
        let f = rig.maps.forwarding();
        let by_slot = |slot: &u32| {
            s.backends
                .iter()
                .find(|b| b.slot == *slot)
                .map(|b| b.address.to_string())
        };
        let positions = f.live_rings[&s.id].iter().map(by_slot).collect();
        (positions, f.services[&s.id].1.seed)
    }

    fn slots(rig: &Rig, svc: &str) -> Vec<u32> {
        rig.service(svc).backends.iter().map(|b| b.slot).collect()
    }

    #[test]
    fn balancers_with_other_slots_and_histories_build_the_same_rings() {
        // Balancer A: the config from the start.
        let mut a = Rig::new();
        a.reload(WEB).expect("a");
        // Balancer B: another service came first (its backends hold the low slots and
        // service id 0), then the same file; its backends are listed in another order.
        let mut b = Rig::new();
        b.reload(OTHER).expect("b other");
        b.reload(&format!("{OTHER}{WEB}")).expect("b both");
        b.reload(WEB).expect("b web");
        assert_ne!(slots(&a, "web"), slots(&b, "web"), "slots differ");
        assert_ne!(a.service("web").id, b.service("web").id, "ids differ");
        let (ra, sa) = ring(&a, "web");
        let (rb, sb) = ring(&b, "web");
        assert_eq!(ra.len(), 65537);
        assert!(ra.iter().all(Option::is_some));
        assert_eq!(sa, sb, "the flow hash seed is the service name's");
        assert!(ra == rb, "same backend at every ring position");
        // The same file with the backends in another order: the same ring.
        let mut c = Rig::new();
        let reordered = WEB.replace(
            "{ address = \"10.77.0.11:7002\" }, { address = \"10.77.0.12:7002\", weight = 2 }",
            "{ address = \"10.77.0.12:7002\", weight = 2 }, { address = \"10.77.0.11:7002\" }",
        );
        assert_ne!(reordered, WEB);
        c.reload(&reordered).expect("c");
        assert!(
            ring(&c, "web").0 == ra,
            "backend order in the file does not matter"
        );

        // Health events in another order on each balancer end in the same rings.
        let down = BackendHealth::Down;
        let up = BackendHealth::Up;
        a.set_health("web", "10.77.0.11:7002", down);
        a.set_health("web", "10.77.0.13:7002", down);
        a.set_health("web", "10.77.0.11:7002", up);
        b.set_health("web", "10.77.0.13:7002", down);
        b.set_health("web", "10.77.0.11:7002", down);
        b.set_health("web", "10.77.0.11:7002", up);
        let (ra2, _) = ring(&a, "web");
        assert!(
            ra2 == ring(&b, "web").0,
            "same rings after the health events"
        );
        assert!(!ra2.contains(&Some("10.77.0.13:7002".to_string())));
        assert!(ra2 != ra);
        // Back to all up: the very first ring again, on both.
        a.set_health("web", "10.77.0.13:7002", up);
        b.set_health("web", "10.77.0.13:7002", up);
        assert!(ring(&a, "web").0 == ra && ring(&b, "web").0 == ra);
    }
}
