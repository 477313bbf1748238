//! In-memory maps and interface for the planner's unit tests: every write is logged, and a
//! write can be made to fail.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    io,
    net::IpAddr,
};

use balancer_common::{Backend, Globals, RING_MAX, Service, ServiceKey};

use crate::control::maps::{MapError, Maps, PortSet, VipError, Vips};

/// One logged write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Globals,
    Ports,
    PutService { id: u32, half: u32 },
    RemoveService { key: ServiceKey },
    PutBackend { slot: u32, state: u32, used: bool },
    Ring { id: u32, half: u32 },
    ResetBackend(u32),
    ResetService(u32),
}

/// What the dataplane forwards by: services, slots, live ring halves, globals.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forwarding {
    pub services: BTreeMap<u32, (ServiceKey, Service)>,
    pub slots: BTreeMap<u32, Backend>,
    pub live_rings: BTreeMap<u32, Vec<u32>>,
    pub globals: Globals,
    pub ports: PortSet,
}

#[derive(Debug, Default, Clone)]
pub struct FakeMaps {
    pub adopted: bool,
    pub services: HashMap<ServiceKey, Service>,
    pub slots: BTreeMap<u32, Backend>,
    pub rings: HashMap<(u32, u32), Vec<u32>>,
    pub globals: Globals,
    pub ports: PortSet,
    pub log: Vec<Op>,
    /// The write with this index (counted from 0 over the fake's life) fails.
    pub fail_at: Option<usize>,
    writes: usize,
}

impl FakeMaps {
    pub fn forwarding(&self) -> Forwarding {
        Forwarding {
            services: self
                .services
                .iter()
                .map(|(k, s)| (s.id, (*k, *s)))
                .collect(),
            slots: self.slots.clone(),
            live_rings: self
                .services
                .values()
                .map(|s| {
                    let r = self
                        .rings
                        .get(&(s.id, s.ring_half))
                        .cloned()
                        .unwrap_or_default();
                    (s.id, r)
                })
                .collect(),
            globals: self.globals,
            ports: self.ports.clone(),
        }
    }

    /// The slots the live ring of service `id` points at.
    pub fn ring_slots(&self, id: u32) -> BTreeSet<u32> {
        self.forwarding()
            .live_rings
            .get(&id)
            .map(|r| r.iter().copied().collect())
            .unwrap_or_default()
    }

    pub fn writes(&self) -> usize {
        self.writes
    }

    fn write(&mut self, op: Op) -> Result<(), MapError> {
        let n = self.writes;
        self.writes += 1;
        if self.fail_at == Some(n) {
            return Err(MapError::new(
                "fake",
                io::Error::other(format!("write {n} fails")),
            ));
        }
        self.log.push(op);
        Ok(())
    }
}

impl Maps for FakeMaps {
    fn adopted(&self) -> bool {
        self.adopted
    }
    fn services(&self) -> Vec<(ServiceKey, Service)> {
        self.services.iter().map(|(k, s)| (*k, *s)).collect()
    }
    fn backends(&self) -> Vec<(u32, Backend)> {
        self.slots
            .iter()
            .filter(|(_, b)| b.used != 0 || b.generation != 0)
            .map(|(i, b)| (*i, *b))
            .collect()
    }
    fn ring(&self, id: u32, half: u32, size: u32) -> Vec<u32> {
        let mut r = self.rings.get(&(id, half)).cloned().unwrap_or_default();
        r.truncate(size as usize);
        r
    }
    fn globals(&self) -> Result<Globals, MapError> {
        Ok(self.globals)
    }
    fn set_globals(&mut self, g: Globals) -> Result<(), MapError> {
        self.write(Op::Globals)?;
        self.globals = g;
        Ok(())
    }
    fn ports(&self) -> Result<PortSet, MapError> {
        Ok(self.ports.clone())
    }
    fn set_ports(&mut self, ports: &PortSet) -> Result<(), MapError> {
        self.write(Op::Ports)?;
        self.ports = ports.clone();
        Ok(())
    }
    fn put_service(&mut self, key: &ServiceKey, svc: &Service) -> Result<(), MapError> {
        // The program must look at a service's port before the service is in the map.
        assert!(
            self.ports.contains(u16::from_be(key.port)),
            "service port {} written before the port filter has it ({:?})",
            u16::from_be(key.port),
            self.ports
        );
        self.write(Op::PutService {
            id: svc.id,
            half: svc.ring_half,
        })?;
        self.services.insert(*key, *svc);
        Ok(())
    }
    fn remove_service(&mut self, key: &ServiceKey) -> Result<(), MapError> {
        // ... and until it has left the map.
        if self.services.contains_key(key) {
            assert!(
                self.ports.contains(u16::from_be(key.port)),
                "service port {} left the port filter before the service ({:?})",
                u16::from_be(key.port),
                self.ports
            );
        }
        self.write(Op::RemoveService { key: *key })?;
        self.services.remove(key);
        Ok(())
    }
    fn put_backend(&mut self, slot: u32, be: &Backend) -> Result<(), MapError> {
        self.write(Op::PutBackend {
            slot,
            state: be.state,
            used: be.used != 0,
        })?;
        if *be == Backend::default() {
            self.slots.remove(&slot);
        } else {
            self.slots.insert(slot, *be);
        }
        Ok(())
    }
    fn write_ring(&mut self, id: u32, half: u32, ring: &[u32]) -> Result<(), MapError> {
        assert!(ring.len() <= RING_MAX as usize);
        self.write(Op::Ring { id, half })?;
        self.rings.insert((id, half), ring.to_vec());
        Ok(())
    }
    fn reset_backend_counters(&mut self, slot: u32) -> Result<(), MapError> {
        self.write(Op::ResetBackend(slot))
    }
    fn reset_service_counters(&mut self, id: u32) -> Result<(), MapError> {
        self.write(Op::ResetService(id))
    }
}

/// Interface addresses; `refuse` cannot be added.
#[derive(Debug, Default, Clone)]
pub struct FakeVips {
    pub on: BTreeSet<IpAddr>,
    pub refuse: Option<IpAddr>,
}

impl Vips for FakeVips {
    fn add_vip(&mut self, ip: IpAddr) -> Result<bool, VipError> {
        if self.refuse == Some(ip) {
            return Err(VipError {
                op: "adding",
                ip,
                source: Box::new(io::Error::other("refused by the fake")),
            });
        }
        Ok(self.on.insert(ip))
    }
    fn remove_vip(&mut self, ip: IpAddr) -> Result<(), VipError> {
        self.on.remove(&ip);
        Ok(())
    }
}

/// A controller on fakes: the maps, the interface, and the state in force.
pub struct Rig {
    pub maps: FakeMaps,
    pub vips: FakeVips,
    pub state: Option<crate::control::state::State>,
    pub host: crate::control::plan::HostAddrs,
}

pub const HEADER: &str = "[dataplane]\ninterface = \"eth0\"\n";

impl Rig {
    pub fn new() -> Self {
        Rig {
            maps: FakeMaps::default(),
            vips: FakeVips::default(),
            state: None,
            host: crate::control::plan::HostAddrs {
                interface: "eth0".into(),
                snat_v4: vec!["10.77.0.1".parse().unwrap()],
                snat_v6: Vec::new(),
            },
        }
    }

    pub fn cfg(text: &str) -> crate::config::Validated {
        crate::config::parse(&format!("{HEADER}{text}"), std::path::Path::new("t.toml"))
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Plans `text` against the state in force, with its health and operator states.
    pub fn plan(
        &self,
        text: &str,
    ) -> Result<crate::control::plan::Plan, crate::control::plan::PlanError> {
        let (health, ops) = match &self.state {
            Some(s) => (book(s), crate::control::operator::from_state(s)),
            None => Default::default(),
        };
        crate::control::plan::plan(
            &Self::cfg(text),
            self.state.as_ref(),
            &self.maps,
            &health,
            &ops,
            &self.host,
        )
    }

    /// Plans and applies `text`; the plan's state is in force when it applied.
    pub fn reload(&mut self, text: &str) -> Result<crate::control::plan::Plan, String> {
        let p = self.plan(text).map_err(|e| e.to_string())?;
        crate::control::apply::apply(&p, &mut self.maps, &mut self.vips)
            .map_err(|e| e.to_string())?;
        self.state = Some(p.next.clone());
        Ok(p)
    }

    pub fn state(&self) -> &crate::control::state::State {
        self.state.as_ref().expect("a state in force")
    }

    pub fn service(&self, name: &str) -> &crate::control::state::ServiceState {
        &self.state().services[name]
    }

    /// Applies a health or operator change the way the daemon does.
    pub fn change(&mut self, c: Option<crate::control::state::Change>) {
        if let Some(c) = c {
            crate::control::apply::write_service(&c.write, &mut self.maps).unwrap();
            self.state.as_mut().unwrap().commit(c);
        }
    }

    pub fn set_health(&mut self, svc: &str, addr: &str, h: crate::control::state::BackendHealth) {
        let c = self
            .state()
            .health_change(svc, addr.parse().unwrap(), h)
            .unwrap();
        self.change(c);
    }

    pub fn set_admin(&mut self, svc: &str, addr: &str, a: crate::config::AdminState) {
        let c = self
            .state()
            .admin_change(svc, addr.parse().unwrap(), a)
            .unwrap();
        self.change(c);
    }

    /// The addresses of the backends the live ring of `svc` sends new flows to.
    pub fn ring_addrs(&self, svc: &str) -> BTreeSet<String> {
        let s = self.service(svc);
        self.maps
            .ring_slots(s.id)
            .into_iter()
            .filter_map(|slot| s.backends.iter().find(|b| b.slot == slot))
            .map(|b| b.address.to_string())
            .collect()
    }
}

pub fn book(s: &crate::control::state::State) -> crate::control::plan::HealthBook {
    crate::control::plan::health_book(s)
}

/// One TCP-checked maglev service of three backends: the planner and apply tests share it.
pub(crate) const WEB3: &str = r#"
[[service]]
name = "web"
vip = "10.77.0.100:80"
ring_size = 13
health = { kind = "tcp", interval = "500ms" }
backends = [ { address = "10.77.0.11:80" }, { address = "10.77.0.12:80" }, { address = "10.77.0.13:80" } ]
"#;
