//! Applying a [`Plan`]: addresses first, then the maps in an order that never lets a new flow
//! meet a backend that is not ready, then the addresses no longer used.
//!
//! Order: new VIPs; the port filter gains the new ports (it is a superset of old and new
//! while the rest changes); services no longer configured leave the map; counters of fresh
//! ids and slots are zeroed; globals; then per service the ring into the spare half, the
//! usable backends, the flip, the backends that go down; then slots no longer used are freed
//! (after every flip, so no live ring points at them); the port filter loses the old ports;
//! last, old VIPs. If a map write fails, the
//! maps touched are written back as they were (rings need no undo: only spare halves were
//! written, and the plan hands no id or slot in use to anyone else) and the added VIPs are
//! removed, so the state in force still describes the dataplane.

use std::{collections::BTreeMap, net::IpAddr};

use balancer_common::{Backend, Globals, Service, ServiceKey};
use tracing::warn;

use crate::control::{
    maps::{MapError, Maps, PortSet, VipError, Vips},
    plan::Plan,
    state::ServiceWrite,
};

/// Why a plan was not applied.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// An address could not be added; no map was written.
    #[error("{0}; nothing changed")]
    Vip(#[source] VipError),
    /// The maps could not be read before writing; nothing was written.
    #[error("{0}; nothing changed")]
    Read(#[source] MapError),
    /// A map write failed; the maps were written back as they were.
    #[error("{0}; the previous state was restored")]
    RolledBack(#[source] MapError),
    /// A map write failed, and so did writing the maps back.
    #[error(
        "{source}; restoring the previous state failed too ({rollback}): restart the controller"
    )]
    RollbackFailed {
        /// The first failure.
        #[source]
        source: MapError,
        /// The failure while restoring.
        rollback: MapError,
    },
}

/// What an applied plan left behind that deserves a warning.
#[derive(Debug, Default)]
pub struct Applied {
    /// Old addresses that could not be removed from the interface.
    pub stale_vips: Vec<VipError>,
}

/// Writes one service: ring into the spare half, usable backends, flip, backends going down.
/// A relayed service writes nothing: its VIP:port stays out of the service map.
pub fn write_service(w: &ServiceWrite, maps: &mut impl Maps) -> Result<(), MapError> {
    if w.relay {
        return Ok(());
    }
    maps.write_ring(w.service.id, w.service.ring_half, &w.ring)?;
    // Backends that become usable must be writable before the ring points at them.
    for (slot, b) in &w.usable {
        maps.put_backend(*slot, b)?;
    }
    maps.put_service(&w.key, &w.service)?;
    // New flows avoid a failed backend from the flip on; then its flows are reset.
    for (slot, b) in &w.down {
        maps.put_backend(*slot, b)?;
    }
    Ok(())
}

/// The ports the program must look at once `plan` is in force: every written service's
/// port and the SNAT range.
pub fn plan_ports(plan: &Plan) -> PortSet {
    let mut ports = PortSet::default();
    for w in plan.writes.iter().filter(|w| !w.relay) {
        ports.insert(u16::from_be(w.key.port));
    }
    let g = &plan.globals;
    if g.snat_port_hi != 0 && g.snat_port_lo <= g.snat_port_hi {
        ports.insert_range(g.snat_port_lo, g.snat_port_hi);
    }
    ports
}

/// The maps a plan touches, as they were before it.
struct Snapshot {
    services: Vec<(ServiceKey, Service)>,
    slots: BTreeMap<u32, Backend>,
    globals: Option<Globals>,
    ports: PortSet,
}

impl Snapshot {
    fn take(maps: &impl Maps, plan: &Plan) -> Result<Self, MapError> {
        let all: BTreeMap<u32, Backend> = maps.backends().into_iter().collect();
        let slots = touched_slots(plan)
            .map(|s| (s, all.get(&s).copied().unwrap_or_default()))
            .collect();
        Ok(Snapshot {
            services: maps.services(),
            slots,
            globals: maps.globals().ok(),
            ports: maps.ports()?,
        })
    }

    fn restore(&self, maps: &mut impl Maps) -> Result<(), MapError> {
        // Old and current ports while the services go back, then the old ones.
        let now = maps.ports()?;
        maps.set_ports(&self.ports.union(&now))?;
        for (k, _) in maps.services() {
            if !self.services.iter().any(|(o, _)| *o == k) {
                maps.remove_service(&k)?;
            }
        }
        for (slot, b) in &self.slots {
            maps.put_backend(*slot, b)?;
        }
        for (k, s) in &self.services {
            maps.put_service(k, s)?;
        }
        if let Some(g) = self.globals {
            maps.set_globals(g)?;
        }
        maps.set_ports(&self.ports)
    }
}

fn touched_slots(plan: &Plan) -> impl Iterator<Item = u32> + '_ {
    plan.writes
        .iter()
        .flat_map(|w| w.usable.iter().chain(&w.down).map(|(s, _)| *s))
        .chain(plan.free_slots.iter().map(|(s, _)| *s))
}

fn write_maps(plan: &Plan, old_ports: &PortSet, maps: &mut impl Maps) -> Result<(), MapError> {
    // A new service's port is looked at before the service is in the map; an old one's until
    // the service is gone.
    let ports = plan_ports(plan);
    if ports != *old_ports {
        maps.set_ports(&ports.union(old_ports))?;
    }
    // Removed services leave the map first: their VIPs go back to the kernel.
    for k in &plan.removed {
        maps.remove_service(k)?;
    }
    for id in &plan.fresh_ids {
        maps.reset_service_counters(*id)?;
    }
    for slot in &plan.fresh_slots {
        maps.reset_backend_counters(*slot)?;
    }
    maps.set_globals(plan.globals)?;
    for w in &plan.writes {
        write_service(w, maps)?;
    }
    for (slot, b) in &plan.free_slots {
        maps.put_backend(*slot, b)?;
    }
    if ports != *old_ports {
        maps.set_ports(&ports)?;
    }
    Ok(())
}

/// Applies `plan`. On error nothing the dataplane forwards by has changed (counters of fresh
/// ids and slots may have been zeroed: they belonged to no one).
pub fn apply(
    plan: &Plan,
    maps: &mut impl Maps,
    vips: &mut impl Vips,
) -> Result<Applied, ApplyError> {
    let mut added: Vec<IpAddr> = Vec::new();
    let undo_vips = |vips: &mut dyn FnMut(IpAddr) -> Result<(), VipError>, added: &[IpAddr]| {
        for ip in added {
            if let Err(e) = vips(*ip) {
                warn!(error = %e, "cannot take back an address added for a refused plan");
            }
        }
    };
    for ip in &plan.vips.add {
        match vips.add_vip(*ip) {
            Ok(true) => added.push(*ip),
            Ok(false) => {}
            Err(e) => {
                undo_vips(&mut |ip| vips.remove_vip(ip), &added);
                return Err(ApplyError::Vip(e));
            }
        }
    }
    let snapshot = match Snapshot::take(maps, plan) {
        Ok(s) => s,
        Err(e) => {
            undo_vips(&mut |ip| vips.remove_vip(ip), &added);
            return Err(ApplyError::Read(e));
        }
    };
    if let Err(e) = write_maps(plan, &snapshot.ports, maps) {
        let restored = snapshot.restore(maps);
        undo_vips(&mut |ip| vips.remove_vip(ip), &added);
        return Err(match restored {
            Ok(()) => ApplyError::RolledBack(e),
            Err(rollback) => ApplyError::RollbackFailed {
                source: e,
                rollback,
            },
        });
    }
    let mut applied = Applied::default();
    for ip in &plan.vips.remove {
        if let Err(e) = vips.remove_vip(*ip) {
            applied.stale_vips.push(e);
        }
    }
    Ok(applied)
}

#[cfg(test)]
mod tests {
    use balancer_common::{BE_DOWN, BE_UP};

    use crate::control::{
        fake::{Op, Rig},
        plan::PlanError,
        state::BackendHealth,
    };

    use crate::control::fake::WEB3;

    const WEB2_AND_V6: &str = r#"
[[service]]
name = "web"
vip = "10.77.0.100:80"
ring_size = 13
health = { kind = "tcp", interval = "500ms" }
backends = [ { address = "10.77.0.11:80" }, { address = "10.77.0.12:80" } ]

[[service]]
name = "web6"
vip = "[fd77::100]:80"
ring_size = 13
backends = [ { address = "[fd77::11]:80" } ]
"#;

    fn addrs(v: &[&str]) -> std::collections::BTreeSet<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_reload_refused_for_a_missing_ipv6_snat_address_changes_nothing() {
        let mut rig = Rig::new();
        rig.reload(WEB3).unwrap();
        let before = rig.maps.forwarding();
        let writes = rig.maps.writes();
        let e = rig.plan(WEB2_AND_V6).unwrap_err();
        assert!(
            matches!(e, PlanError::NoSnatAddress { family: 6, .. }),
            "{e}"
        );
        assert!(rig.reload(WEB2_AND_V6).is_err());
        assert_eq!(rig.maps.writes(), writes, "no write at all");
        assert_eq!(rig.maps.forwarding(), before);
        assert_eq!(
            rig.ring_addrs("web"),
            addrs(&["10.77.0.11:80", "10.77.0.12:80", "10.77.0.13:80"])
        );
        // Every slot the ring points at is still a live backend of web.
        let s = rig.service("web");
        for slot in rig.maps.ring_slots(s.id) {
            let b = rig.maps.slots[&slot];
            assert_eq!((b.used, b.state, b.service), (1, BE_UP, s.id));
        }
    }

    const TWO_SERVICES: &str = r#"
[[service]]
name = "web"
vip = "10.77.0.100:80"
ring_size = 13
backends = [ { address = "10.77.0.11:80" }, { address = "10.77.0.12:80" }, { address = "10.77.0.13:80" } ]

[[service]]
name = "hl7"
vip = "10.77.0.100:6661"
scheduler = "failover"
ring_size = 7
backends = [ { address = "10.77.0.11:6661" }, { address = "10.77.0.12:6661" } ]
"#;

    const CHANGED: &str = r#"
[[service]]
name = "web"
vip = "10.77.0.100:80"
ring_size = 13
backends = [ { address = "10.77.0.11:80" }, { address = "10.77.0.14:80" } ]

[[service]]
name = "dicom"
vip = "10.77.0.101:104"
ring_size = 7
backends = [ { address = "10.77.0.21:104" } ]
"#;

    #[test]
    fn every_failed_write_is_undone() {
        let mut rig = Rig::new();
        rig.reload(TWO_SERVICES).unwrap();
        // How many writes the change takes when nothing fails.
        let mut probe = Rig {
            maps: rig.maps.clone(),
            vips: rig.vips.clone(),
            state: rig.state.clone(),
            host: rig.host.clone(),
        };
        let start = probe.maps.writes();
        probe.reload(CHANGED).unwrap();
        let n = probe.maps.writes() - start;
        assert!(n > 10, "{n}");
        for k in 0..n {
            let mut r = Rig {
                maps: rig.maps.clone(),
                vips: rig.vips.clone(),
                state: rig.state.clone(),
                host: rig.host.clone(),
            };
            let before = r.maps.forwarding();
            let vips = r.vips.on.clone();
            r.maps.fail_at = Some(start + k);
            let e = r.reload(CHANGED).unwrap_err();
            assert!(e.contains("previous state was restored"), "write {k}: {e}");
            assert_eq!(r.maps.forwarding(), before, "write {k}");
            assert_eq!(r.vips.on, vips, "write {k}");
            assert_eq!(r.state, rig.state, "write {k}");
        }
    }

    #[test]
    fn the_port_filter_holds_the_services_ports_and_the_snat_range() {
        let mut rig = Rig::new();
        rig.reload(TWO_SERVICES).unwrap();
        let g = rig.maps.globals;
        assert!(
            g.snat_port_lo > 1024 && g.snat_port_hi > g.snat_port_lo,
            "{g:?}"
        );
        let p = rig.maps.ports.clone();
        assert!(p.contains(80) && p.contains(6661), "{p:?}");
        assert!(
            !p.contains(104) && !p.contains(22) && !p.contains(443),
            "{p:?}"
        );
        assert!(
            p.contains(g.snat_port_lo) && p.contains(g.snat_port_hi),
            "{p:?}"
        );
        assert!(!p.contains(g.snat_port_lo - 1), "{p:?}");
        assert!(
            g.snat_port_hi == u16::MAX || !p.contains(g.snat_port_hi + 1),
            "{p:?}"
        );
        let start = rig.maps.log.len();
        rig.reload(CHANGED).unwrap();
        let p = &rig.maps.ports;
        assert!(
            p.contains(80) && p.contains(104) && !p.contains(6661),
            "{p:?}"
        );
        // Widened before the first write of the reload, narrowed after the last (the fake
        // also refuses a service written or removed while its port is not in the filter).
        let log = &rig.maps.log[start..];
        assert_eq!(log.first(), Some(&Op::Ports), "{log:?}");
        assert_eq!(log.last(), Some(&Op::Ports), "{log:?}");
        assert_eq!(
            log.iter().filter(|o| **o == Op::Ports).count(),
            2,
            "{log:?}"
        );
        // Nothing changes, nothing is written to it.
        let start = rig.maps.log.len();
        rig.reload(CHANGED).unwrap();
        assert!(!rig.maps.log[start..].contains(&Op::Ports));
    }

    #[test]
    fn a_refused_vip_changes_no_map() {
        let mut rig = Rig::new();
        rig.reload(TWO_SERVICES).unwrap();
        let before = rig.maps.forwarding();
        let vips = rig.vips.on.clone();
        let writes = rig.maps.writes();
        rig.vips.refuse = Some("10.77.0.101".parse().unwrap());
        let e = rig.reload(CHANGED).unwrap_err();
        assert!(e.contains("nothing changed"), "{e}");
        assert_eq!(rig.maps.writes(), writes);
        assert_eq!(rig.maps.forwarding(), before);
        assert_eq!(rig.vips.on, vips);
    }

    #[test]
    fn no_free_slot_is_refused_before_any_write() {
        let mut rig = Rig::new();
        rig.reload(TWO_SERVICES).unwrap();
        // Another owner holds every other slot.
        for i in 0..balancer_common::MAX_BACKENDS {
            rig.maps.slots.entry(i).or_insert(balancer_common::Backend {
                used: 1,
                generation: 1,
                service: 63,
                ..Default::default()
            });
        }
        let writes = rig.maps.writes();
        let e = rig.plan(CHANGED).unwrap_err();
        assert!(
            matches!(e, PlanError::NoBackendSlot { needed: 2, free: 0 }),
            "{e}"
        );
        assert!(rig.reload(CHANGED).is_err());
        assert_eq!(rig.maps.writes(), writes);
    }

    #[test]
    fn a_reload_writes_new_backends_before_the_flip_and_frees_old_ones_after() {
        let mut rig = Rig::new();
        rig.reload(TWO_SERVICES).unwrap();
        let web = rig.service("web").clone();
        let gone = web.backends[1].slot; // .12 leaves
        let gone3 = web.backends[2].slot; // .13 leaves
        let from = rig.maps.log.len();
        let p = rig.reload(CHANGED).unwrap();
        let log = &rig.maps.log[from..];
        let flip = log
            .iter()
            .position(|o| {
                *o == Op::PutService {
                    id: web.id,
                    half: 1 - web.half,
                }
            })
            .expect("web flips");
        let new_slot = rig.service("web").backends[1].slot;
        assert!(!p.slots.iter().find(|a| a.slot == new_slot).unwrap().adopted);
        assert!(
            ![gone, gone3].contains(&new_slot),
            "a slot in use is not reused"
        );
        let put = |slot| {
            log.iter()
                .position(|o| matches!(o, Op::PutBackend { slot: s, .. } if *s == slot))
                .unwrap()
        };
        let ring = log
            .iter()
            .position(|o| {
                *o == Op::Ring {
                    id: web.id,
                    half: 1 - web.half,
                }
            })
            .unwrap();
        assert!(ring < flip && put(new_slot) < flip, "{log:?}");
        for g in [gone, gone3] {
            assert!(put(g) > flip, "{log:?}");
            assert_eq!(
                log[put(g)],
                Op::PutBackend {
                    slot: g,
                    state: BE_DOWN,
                    used: false
                }
            );
        }
        // The port filter is widened first (dicom's port 104 is new), then the removed service
        // leaves the map before anything else is written.
        assert_eq!(log[0], Op::Ports, "{log:?}");
        assert!(matches!(log[1], Op::RemoveService { .. }), "{log:?}");
        assert_eq!(
            rig.ring_addrs("web"),
            addrs(&["10.77.0.11:80", "10.77.0.14:80"])
        );
        assert_eq!(p.added, vec!["dicom".to_string()]);
        assert_eq!(p.replaced, vec!["web".to_string()]);
        assert_eq!(p.removed.len(), 1);
        assert!(rig.vips.on.contains(&"10.77.0.101".parse().unwrap()));
    }

    #[test]
    fn a_backend_going_down_leaves_the_ring_before_its_slot_goes_down() {
        let mut rig = Rig::new();
        rig.reload(WEB3).unwrap();
        let s = rig.service("web").clone();
        let from = rig.maps.log.len();
        rig.set_health("web", "10.77.0.12:80", BackendHealth::Down);
        let log = rig.maps.log[from..].to_vec();
        let be2 = s.backends[1].slot;
        assert_eq!(
            log[0],
            Op::Ring {
                id: s.id,
                half: 1 - s.half
            }
        );
        let flip = log
            .iter()
            .position(|o| matches!(o, Op::PutService { .. }))
            .unwrap();
        let down = log
            .iter()
            .position(|o| {
                *o == Op::PutBackend {
                    slot: be2,
                    state: BE_DOWN,
                    used: true,
                }
            })
            .unwrap();
        assert!(down > flip, "{log:?}");
        for b in [&s.backends[0], &s.backends[2]] {
            let up = log
                .iter()
                .position(|o| {
                    *o == Op::PutBackend {
                        slot: b.slot,
                        state: BE_UP,
                        used: true,
                    }
                })
                .unwrap();
            assert!(up < flip, "{log:?}");
        }
        assert_eq!(
            rig.ring_addrs("web"),
            addrs(&["10.77.0.11:80", "10.77.0.13:80"])
        );
        // Up again: back into the ring, its slot usable before the flip.
        let from = rig.maps.log.len();
        rig.set_health("web", "10.77.0.12:80", BackendHealth::Up);
        let log = rig.maps.log[from..].to_vec();
        let flip = log
            .iter()
            .position(|o| matches!(o, Op::PutService { .. }))
            .unwrap();
        let up = log
            .iter()
            .position(|o| {
                *o == Op::PutBackend {
                    slot: be2,
                    state: BE_UP,
                    used: true,
                }
            })
            .unwrap();
        assert!(up < flip);
        assert_eq!(rig.ring_addrs("web").len(), 3);
    }

    #[test]
    fn pinned_state_is_adopted_by_address_after_a_restart() {
        let mut first = Rig::new();
        first.reload(TWO_SERVICES).unwrap();
        first.set_health("web", "10.77.0.13:80", BackendHealth::Down);
        let before = first.state().clone();
        // A new controller: no state, the pinned maps.
        let mut maps = first.maps.clone();
        maps.adopted = true;
        let mut second = Rig {
            maps,
            vips: first.vips.clone(),
            state: None,
            host: first.host.clone(),
        };
        let checked = TWO_SERVICES.replace(
            "ring_size = 13\n",
            "ring_size = 13\nhealth = { kind = \"tcp\" }\n",
        );
        let p = second.reload(&checked).unwrap();
        assert!(p.fresh_slots.is_empty() && p.fresh_ids.is_empty(), "{p:?}");
        assert!(p.slots.iter().all(|a| a.adopted));
        for (name, s) in &before.services {
            let n = second.service(name);
            assert_eq!(n.id, s.id);
            for (a, b) in s.backends.iter().zip(&n.backends) {
                assert_eq!(
                    (a.address, a.slot, a.generation),
                    (b.address, b.slot, b.generation)
                );
            }
        }
        // The backend the old controller saw down stays down until its checks pass.
        let web = second.service("web");
        assert_eq!(web.backends[2].health, BackendHealth::Down);
        assert_eq!(
            second.ring_addrs("web"),
            addrs(&["10.77.0.11:80", "10.77.0.12:80"])
        );
    }
}
