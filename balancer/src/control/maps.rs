//! The seam between the planner and the world: the map writer ([`Maps`]: services, backends,
//! rings, globals) and the interface addresses ([`Vips`]). The real dataplane and the host
//! implement them; the unit tests use an in-memory fake.

use std::net::IpAddr;

use balancer_common::{Backend, Globals, PORT_WORDS, Service, ServiceKey};

use crate::dataplane::Dataplane;

/// A failed map read or write.
#[derive(Debug, thiserror::Error)]
#[error("{op}: {source}")]
pub struct MapError {
    /// What was being done.
    pub op: &'static str,
    /// Why it failed.
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

impl MapError {
    /// Wraps `source` as the failure of `op`.
    pub fn new(
        op: &'static str,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        MapError {
            op,
            source: source.into(),
        }
    }
}

/// The destination ports the program looks at (`BLB_PORTS`), one bit per port: the services'
/// ports and the SNAT range. A TCP/UDP frame to any other port is passed unparsed.
#[derive(Clone, PartialEq, Eq)]
pub struct PortSet(Vec<u64>);

impl Default for PortSet {
    fn default() -> Self {
        PortSet(vec![0; PORT_WORDS as usize])
    }
}

impl PortSet {
    /// The set held by the map's words (missing words are empty).
    pub fn from_words(mut words: Vec<u64>) -> Self {
        words.resize(PORT_WORDS as usize, 0);
        PortSet(words)
    }
    /// The map's words.
    pub fn words(&self) -> &[u64] {
        &self.0
    }
    /// Adds `port`.
    pub fn insert(&mut self, port: u16) {
        self.0[usize::from(port >> 6)] |= 1 << (port & 63);
    }
    /// Adds every port of `lo..=hi`.
    pub fn insert_range(&mut self, lo: u16, hi: u16) {
        for p in lo..=hi {
            self.insert(p);
        }
    }
    /// Is `port` in the set?
    pub fn contains(&self, port: u16) -> bool {
        self.0[usize::from(port >> 6)] & (1 << (port & 63)) != 0
    }
    /// Every port of either set.
    pub fn union(&self, other: &PortSet) -> PortSet {
        PortSet(self.0.iter().zip(&other.0).map(|(a, b)| a | b).collect())
    }
}

impl std::fmt::Debug for PortSet {
    /// The ports as ranges, `[80, 443, 32768-60999]`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut ranges = Vec::new();
        let mut p = 0u32;
        while p <= u32::from(u16::MAX) {
            if self.contains(p as u16) {
                let lo = p;
                while p < u32::from(u16::MAX) && self.contains(p as u16 + 1) {
                    p += 1;
                }
                ranges.push(if lo == p {
                    lo.to_string()
                } else {
                    format!("{lo}-{p}")
                });
            }
            p += 1;
        }
        write!(f, "[{}]", ranges.join(", "))
    }
}

/// The dataplane's maps as the controller reads and writes them.
pub trait Maps {
    /// True when the maps were adopted from a previous controller.
    fn adopted(&self) -> bool;
    /// Every service in the map.
    fn services(&self) -> Vec<(ServiceKey, Service)>;
    /// Every backend slot that is or was in use (used, or a non-zero generation).
    fn backends(&self) -> Vec<(u32, Backend)>;
    /// The first `size` entries of ring half `half` of service `id`.
    fn ring(&self, id: u32, half: u32, size: u32) -> Vec<u32>;
    /// The globals.
    fn globals(&self) -> Result<Globals, MapError>;
    /// Writes the globals.
    fn set_globals(&mut self, g: Globals) -> Result<(), MapError>;
    /// The port filter.
    fn ports(&self) -> Result<PortSet, MapError>;
    /// Writes the port filter.
    fn set_ports(&mut self, ports: &PortSet) -> Result<(), MapError>;
    /// Inserts or replaces a service (its `ring_half` must already hold a ring).
    fn put_service(&mut self, key: &ServiceKey, svc: &Service) -> Result<(), MapError>;
    /// Removes a service (absent is fine).
    fn remove_service(&mut self, key: &ServiceKey) -> Result<(), MapError>;
    /// Writes a backend slot.
    fn put_backend(&mut self, slot: u32, be: &Backend) -> Result<(), MapError>;
    /// Copies a ring into half `half` of service `id` (not live until the service flips).
    fn write_ring(&mut self, id: u32, half: u32, ring: &[u32]) -> Result<(), MapError>;
    /// Zeroes a backend slot's counters (the slot goes to a new backend).
    fn reset_backend_counters(&mut self, slot: u32) -> Result<(), MapError>;
    /// Zeroes a service id's counters (the id goes to a new service).
    fn reset_service_counters(&mut self, id: u32) -> Result<(), MapError>;
}

/// A failed address change on the interface.
#[derive(Debug, thiserror::Error)]
#[error("{op} {ip}: {source}")]
pub struct VipError {
    /// "adding" or "removing".
    pub op: &'static str,
    /// The address.
    pub ip: IpAddr,
    /// Why it failed.
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

/// Addresses on the interface the VIPs live on (so the kernel answers ARP / ND for them).
pub trait Vips {
    /// Puts `ip` on the interface; `false` when it was there already.
    fn add_vip(&mut self, ip: IpAddr) -> Result<bool, VipError>;
    /// Takes `ip` off the interface; absent is fine.
    fn remove_vip(&mut self, ip: IpAddr) -> Result<(), VipError>;
}

impl Maps for Dataplane {
    fn adopted(&self) -> bool {
        self.adopted
    }
    fn services(&self) -> Vec<(ServiceKey, Service)> {
        Dataplane::services(self)
    }
    fn backends(&self) -> Vec<(u32, Backend)> {
        Dataplane::backends(self)
    }
    fn ring(&self, id: u32, half: u32, size: u32) -> Vec<u32> {
        self.read_ring(id, half, size)
    }
    fn globals(&self) -> Result<Globals, MapError> {
        Dataplane::globals(self).map_err(|e| MapError::new("reading globals", e))
    }
    fn set_globals(&mut self, g: Globals) -> Result<(), MapError> {
        Dataplane::set_globals(self, g).map_err(|e| MapError::new("writing globals", e))
    }
    fn ports(&self) -> Result<PortSet, MapError> {
        self.port_words()
            .map(PortSet::from_words)
            .map_err(|e| MapError::new("reading the port filter", e))
    }
    fn set_ports(&mut self, ports: &PortSet) -> Result<(), MapError> {
        self.set_port_words(ports.words())
            .map_err(|e| MapError::new("writing the port filter", e))
    }
    fn put_service(&mut self, key: &ServiceKey, svc: &Service) -> Result<(), MapError> {
        Dataplane::put_service(self, key, svc).map_err(|e| MapError::new("writing a service", e))
    }
    fn remove_service(&mut self, key: &ServiceKey) -> Result<(), MapError> {
        Dataplane::remove_service(self, key).map_err(|e| MapError::new("removing a service", e))
    }
    fn put_backend(&mut self, slot: u32, be: &Backend) -> Result<(), MapError> {
        Dataplane::put_backend(self, slot, be).map_err(|e| MapError::new("writing a backend", e))
    }
    fn write_ring(&mut self, id: u32, half: u32, ring: &[u32]) -> Result<(), MapError> {
        Dataplane::write_ring(self, id, half, ring).map_err(|e| MapError::new("writing a ring", e))
    }
    fn reset_backend_counters(&mut self, slot: u32) -> Result<(), MapError> {
        Dataplane::reset_backend_counters(self, slot)
            .map_err(|e| MapError::new("resetting backend counters", e))
    }
    fn reset_service_counters(&mut self, id: u32) -> Result<(), MapError> {
        Dataplane::reset_service_counters(self, id)
            .map_err(|e| MapError::new("resetting service counters", e))
    }
}

/// The VIPs of the first configured interface (removals go to every interface).
#[derive(Debug, Clone)]
pub struct InterfaceVips {
    /// Interfaces; VIPs are added to the first.
    pub interfaces: Vec<String>,
}

impl Vips for InterfaceVips {
    fn add_vip(&mut self, ip: IpAddr) -> Result<bool, VipError> {
        let Some(i) = self.interfaces.first() else {
            return Ok(false);
        };
        let err = |e: crate::host::Error| VipError {
            op: "adding",
            ip,
            source: e.into(),
        };
        if crate::host::net::has_address(i, ip).map_err(err)? {
            return Ok(false);
        }
        crate::host::net::add_vip(i, ip).map_err(err)?;
        Ok(true)
    }
    fn remove_vip(&mut self, ip: IpAddr) -> Result<(), VipError> {
        for i in &self.interfaces {
            crate::host::net::remove_vip(i, ip).map_err(|e| VipError {
                op: "removing",
                ip,
                source: e.into(),
            })?;
        }
        Ok(())
    }
}
