//! The seam between the planner and the world: the map writer ([`Maps`]: services, backends,
//! rings, globals) and the interface addresses ([`Vips`]). The real dataplane and the host
//! implement them; the unit tests use an in-memory fake.

use std::net::IpAddr;

use balancer_common::{Backend, Globals, Service, ServiceKey};

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
