//! Planning: a validated config, the state in force, what the pinned maps hold, the last known
//! health and the operator states, turned into a [`Plan`] without touching anything.
//!
//! Everything that can be refused is refused here, before the first map write: SNAT
//! addresses of the VIP's family, service ids and backend slots. Ids and slots are adopted
//! from the maps by (VIP, backend address), so flows made by an earlier controller keep their
//! backend; a slot or id still in use is never handed to someone else in the same plan (the
//! old ring may still point at it until the flip), so a failed apply can be undone exactly.

use std::{
    collections::{BTreeMap, HashSet},
    net::{IpAddr, SocketAddr},
};

use balancer_common::{
    ABI_VERSION, BE_DOWN, Backend, Globals, MAX_BACKENDS, MAX_SERVICES, NO_BACKEND, ServiceKey,
};

use crate::{
    config::{AdminState, Forwarding, Mode, Scheduler, Validated},
    control::{
        maps::Maps,
        operator::OperatorStates,
        state::{
            BackendHealth, BackendState, Event, ServiceState, ServiceWrite, State, service_key,
        },
    },
    host::net,
};

/// The last known health of backends, by (service, address): from the state in force on a
/// reload, from the file a previous controller left on a restart.
pub type HealthBook = BTreeMap<(String, SocketAddr), BackendHealth>;

/// The last known health of every backend of `state`.
pub fn health_book(state: &State) -> HealthBook {
    state
        .services
        .iter()
        .flat_map(|(n, s)| {
            s.backends
                .iter()
                .map(move |b| ((n.clone(), b.address), b.health))
        })
        .collect()
}

/// The file format of a saved [`HealthBook`]: service → backend address → health.
type HealthFile = BTreeMap<String, BTreeMap<String, BackendHealth>>;

/// Saves the last known health of every backend of `state` (atomically, root-only), for the
/// next controller: after a restart a healthy failover standby is eligible at once.
pub fn save_health(
    path: &std::path::Path,
    state: &State,
) -> Result<(), crate::control::operator::OperatorFileError> {
    let mut f = HealthFile::new();
    for ((svc, addr), h) in health_book(state) {
        f.entry(svc).or_default().insert(addr.to_string(), h);
    }
    crate::host::write_private(path, serde_json::to_string(&f)?.as_bytes())?;
    Ok(())
}

/// Reads a book saved by [`save_health`]; a missing file is an empty book.
pub fn load_health(
    path: &std::path::Path,
) -> Result<HealthBook, crate::control::operator::OperatorFileError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(HealthBook::new()),
        Err(e) => return Err(e.into()),
    };
    let f: HealthFile = serde_json::from_str(&text)?;
    Ok(f.into_iter()
        .flat_map(|(svc, m)| {
            m.into_iter()
                .filter_map(move |(a, h)| a.parse().ok().map(|a| ((svc.clone(), a), h)))
        })
        .collect())
}

/// The host's own addresses, read before planning (the planner itself reads nothing).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostAddrs {
    /// The interface VIPs go on.
    pub interface: String,
    /// SNAT sources for IPv4 NAT services (the configured pool, else the interface's
    /// address; empty: none).
    pub snat_v4: Vec<IpAddr>,
    /// SNAT sources for IPv6 NAT services (the configured pool, else the interface's global
    /// address; empty: none).
    pub snat_v6: Vec<IpAddr>,
}

impl HostAddrs {
    /// The configured SNAT addresses, else the first interface's own.
    pub fn resolve(cfg: &Validated) -> Result<Self, std::io::Error> {
        let interface = cfg.interfaces.first().cloned().unwrap_or_default();
        let read = |v6: bool| {
            net::interface_address(&interface, v6).map_err(|e| std::io::Error::other(e.to_string()))
        };
        let snat_v4 = match cfg.snat_ipv4.is_empty() {
            false => cfg.snat_ipv4.clone(),
            true => read(false)?.into_iter().collect(),
        };
        let snat_v6 = match cfg.snat_ipv6.is_empty() {
            false => cfg.snat_ipv6.clone(),
            true => read(true)?.into_iter().collect(),
        };
        // A single balancer does not put SNAT addresses on the interface (one may be the
        // host's own, which a reload must never take off); in a pair keepalived moves them.
        if cfg.ha.is_none() {
            for ip in cfg.snat_ipv4.iter().chain(&cfg.snat_ipv6) {
                if !net::has_address(&interface, *ip).unwrap_or(true) {
                    tracing::warn!(
                        address = %ip,
                        interface = %interface,
                        "SNAT address is not on the interface: backends' replies to it reach this balancer only if they are routed to it"
                    );
                }
            }
        }
        Ok(HostAddrs {
            interface,
            snat_v4,
            snat_v6,
        })
    }
}

/// Why a config cannot be planned; nothing has changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// A NAT service has no SNAT address of its VIP's family.
    #[error(
        "service '{service}': no SNAT address of the VIP's family on {interface}; set snat_ipv{family} in [dataplane]"
    )]
    NoSnatAddress {
        /// Service.
        service: String,
        /// 4 or 6.
        family: u8,
        /// The interface searched.
        interface: String,
    },
    /// A VIP:port on the SNAT address inside the SNAT port range.
    #[error(
        "service '{service}': vip {vip} is the SNAT address with a port inside snat_ports {first}-{last}; backends' replies to that port would be taken for clients' packets: use another port or address"
    )]
    VipInSnatRange {
        /// Service.
        service: String,
        /// Its VIP.
        vip: std::net::SocketAddr,
        /// SNAT port range.
        first: u16,
        /// SNAT port range.
        last: u16,
    },
    /// Every service id is in use.
    #[error(
        "service '{0}': no free service id (ids of services still in the map are not reused in the same reload: remove services first, then add)"
    )]
    NoServiceId(String),
    /// Not enough free backend slots.
    #[error(
        "no free backend slot: {needed} new backends, {free} slots free (slots of backends still in the map are not reused in the same reload: reload in two steps)"
    )]
    NoBackendSlot {
        /// New backends in the plan.
        needed: usize,
        /// Free slots.
        free: usize,
    },
}

/// A slot given to a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotAssignment {
    /// Service id.
    pub service: u32,
    /// Backend address.
    pub address: SocketAddr,
    /// Slot.
    pub slot: u32,
    /// Generation.
    pub generation: u32,
    /// Found in the maps (flows continue) rather than fresh.
    pub adopted: bool,
}

/// Addresses to put on and take off the interface.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VipChanges {
    /// To add (before the first map write).
    pub add: Vec<IpAddr>,
    /// To remove (after the last map write).
    pub remove: Vec<IpAddr>,
}

/// Everything a reload (or a start) changes, computed before anything is written.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The state in force once the plan is applied.
    pub next: State,
    /// Services new in the config.
    pub added: Vec<String>,
    /// Services whose spec changed (written again).
    pub replaced: Vec<String>,
    /// Services in the config before and after, unchanged (written again all the same).
    pub kept: Vec<String>,
    /// Map keys of services no longer configured.
    pub removed: Vec<ServiceKey>,
    /// Every backend's slot.
    pub slots: Vec<SlotAssignment>,
    /// Service ids given to new services (their counters are zeroed).
    pub fresh_ids: Vec<u32>,
    /// Slots given to new backends (their counters are zeroed).
    pub fresh_slots: Vec<u32>,
    /// Slots no longer used: marked down (their flows are reset) and freed after the flips.
    pub free_slots: Vec<(u32, Backend)>,
    /// The globals.
    pub globals: Globals,
    /// One write per service, in name order.
    pub writes: Vec<ServiceWrite>,
    /// Interface addresses.
    pub vips: VipChanges,
    /// Failovers the plan decides.
    pub events: Vec<Event>,
}

/// The addresses a config needs on the interface: service VIPs and L7 addresses.
fn wanted_vips(cfg: &Validated) -> Vec<IpAddr> {
    // In a pair keepalived owns the addresses: they are on the active balancer only.
    if cfg.ha.is_some() {
        return Vec::new();
    }
    cfg.service_addresses().into_iter().collect()
}

/// The health a backend starts a plan with.
fn initial_health(
    checked: bool,
    known: Option<BackendHealth>,
    adopted_state: Option<u32>,
    admin: AdminState,
) -> BackendHealth {
    match (checked, known) {
        (false, _) => BackendHealth::Unchecked,
        // A surviving backend keeps its last result, also when its check changed.
        (true, Some(h)) => h,
        // Adopted from a previous controller that saw it down: down until checks pass.
        (true, None) if adopted_state == Some(BE_DOWN) && admin != AdminState::Disabled => {
            BackendHealth::Down
        }
        (true, None) => BackendHealth::Unchecked,
    }
}

/// Plans `desired` against the state in force (`current`, none at start), the maps (read,
/// never written), the last known health and the operator states.
pub fn plan(
    desired: &Validated,
    current: Option<&State>,
    maps: &impl Maps,
    health: &HealthBook,
    operator: &OperatorStates,
    host: &HostAddrs,
) -> Result<Plan, PlanError> {
    let globals = Globals {
        abi_version: ABI_VERSION,
        snat_port_lo: desired.snat_ports.first,
        snat_port_hi: desired.snat_ports.last,
        tcp_idle_secs: u32::try_from(desired.tcp_idle_timeout.as_secs()).unwrap_or(u32::MAX),
        udp_idle_secs: u32::try_from(desired.udp_idle_timeout.as_secs()).unwrap_or(u32::MAX),
        // Mirroring is switched by the HA pair's state, not by the file: a reload keeps it.
        mirror: maps.globals().map_or(0, |g| g.mirror),
    };
    let existing = maps.services();
    let slots = maps.backends();

    // SNAT first: the cheapest refusal.
    let mut snat = BTreeMap::new();
    for spec in &desired.services {
        let v4 = spec.vip.is_ipv4();
        let pool = if v4 { &host.snat_v4 } else { &host.snat_v6 };
        // A backend's reply to SNAT address:port would be taken for a client packet to it.
        let (first, last) = (desired.snat_ports.first, desired.snat_ports.last);
        if pool.contains(&spec.vip.ip()) && (first..=last).contains(&spec.vip.port()) {
            return Err(PlanError::VipInSnatRange {
                service: spec.name.clone(),
                vip: spec.vip,
                first,
                last,
            });
        }
        let a: Vec<[u8; 16]> = match (spec.forwarding, pool.is_empty()) {
            (Forwarding::Dsr, _) => Vec::new(),
            (Forwarding::Nat, false) => pool.iter().map(|ip| net::addr16(*ip)).collect(),
            (Forwarding::Nat, true) => {
                return Err(PlanError::NoSnatAddress {
                    service: spec.name.clone(),
                    family: if v4 { 4 } else { 6 },
                    interface: host.interface.clone(),
                });
            }
        };
        snat.insert(spec.name.clone(), a);
    }

    // Service ids: kept for an unchanged key, else one no service in the map holds.
    let mut ids: BTreeMap<String, (u32, u32)> = BTreeMap::new();
    let mut taken: HashSet<u32> = existing.iter().map(|(_, s)| s.id).collect();
    let mut kept_ids: HashSet<u32> = HashSet::new();
    // A relayed service (`mode = "mllp"`) is in no map: it adopts nothing, and what an L4
    // service of its VIP left there is removed or freed below.
    for spec in desired.services.iter().filter(|s| s.mode != Mode::Mllp) {
        let key = service_key(spec.vip, spec.protocol);
        if let Some((_, s)) = existing.iter().find(|(k, _)| *k == key)
            && s.id < MAX_SERVICES
            && kept_ids.insert(s.id)
        {
            ids.insert(spec.name.clone(), (s.id, s.ring_half & 1));
        }
    }
    let mut fresh_ids = Vec::new();
    for spec in &desired.services {
        if ids.contains_key(&spec.name) {
            continue;
        }
        let id = (0..MAX_SERVICES)
            .find(|i| !taken.contains(i))
            .ok_or_else(|| PlanError::NoServiceId(spec.name.clone()))?;
        taken.insert(id);
        fresh_ids.push(id);
        // Half 1 is "live", so the first ring goes into half 0.
        ids.insert(spec.name.clone(), (id, 1));
    }

    // Backend slots: adopted by (service id, address), else one no backend holds.
    let mut adopted_slots: HashSet<u32> = HashSet::new();
    let mut assignment: BTreeMap<(String, usize), SlotAssignment> = BTreeMap::new();
    let mut adopted_state: BTreeMap<(String, usize), u32> = BTreeMap::new();
    let mut need_fresh: Vec<(String, usize, u32, SocketAddr)> = Vec::new();
    for spec in &desired.services {
        let (id, _) = ids[&spec.name];
        for (i, b) in spec.backends.iter().enumerate() {
            let a16 = net::addr16(b.address.ip());
            let found = slots.iter().find(|(idx, s)| {
                spec.mode != Mode::Mllp
                    && s.used != 0
                    && s.service == id
                    && s.addr == a16
                    && s.port == b.address.port().to_be()
                    && !adopted_slots.contains(idx)
            });
            match found {
                Some((idx, s)) => {
                    adopted_slots.insert(*idx);
                    adopted_state.insert((spec.name.clone(), i), s.state);
                    assignment.insert(
                        (spec.name.clone(), i),
                        SlotAssignment {
                            service: id,
                            address: b.address,
                            slot: *idx,
                            generation: s.generation,
                            adopted: true,
                        },
                    );
                }
                None => need_fresh.push((spec.name.clone(), i, id, b.address)),
            }
        }
    }
    let by_slot: BTreeMap<u32, Backend> = slots.iter().copied().collect();
    let free: Vec<u32> = (0..MAX_BACKENDS)
        .filter(|i| by_slot.get(i).is_none_or(|b| b.used == 0))
        .collect();
    if free.len() < need_fresh.len() {
        return Err(PlanError::NoBackendSlot {
            needed: need_fresh.len(),
            free: free.len(),
        });
    }
    let mut fresh_slots = Vec::new();
    for ((name, i, id, address), slot) in need_fresh.into_iter().zip(free) {
        let generation = by_slot
            .get(&slot)
            .map_or(0, |b| b.generation)
            .wrapping_add(1)
            .max(1);
        fresh_slots.push(slot);
        assignment.insert(
            (name, i),
            SlotAssignment {
                service: id,
                address,
                slot,
                generation,
                adopted: false,
            },
        );
    }
    let free_slots: Vec<(u32, Backend)> = slots
        .iter()
        .filter(|(idx, s)| s.used != 0 && !adopted_slots.contains(idx))
        .map(|(idx, s)| {
            let mut b = *s;
            b.used = 0;
            b.state = BE_DOWN;
            (*idx, b)
        })
        .collect();

    // Backend and service states.
    let prev = current.map(|c| &c.services);
    let mut next = State {
        services: BTreeMap::new(),
        globals,
        interfaces: desired.interfaces.clone(),
        vips: wanted_vips(desired),
    };
    let (mut added, mut replaced, mut kept) = (Vec::new(), Vec::new(), Vec::new());
    for spec in &desired.services {
        let (id, half) = ids[&spec.name];
        let prev_s = prev.and_then(|p| p.get(&spec.name));
        match prev_s {
            None => added.push(spec.name.clone()),
            Some(p) if p.spec == *spec => kept.push(spec.name.clone()),
            Some(_) => replaced.push(spec.name.clone()),
        }
        let mut backends = Vec::new();
        for (i, b) in spec.backends.iter().enumerate() {
            let Some(a) = assignment.get(&(spec.name.clone(), i)) else {
                continue;
            };
            let key = (spec.name.clone(), b.address);
            let admin = match operator.get(&key) {
                Some(o) if o.configured.is_none_or(|c| c == b.state) => o.admin,
                _ => b.state,
            };
            let health = initial_health(
                spec.health.is_some(),
                health.get(&key).copied(),
                adopted_state.get(&(spec.name.clone(), i)).copied(),
                admin,
            );
            backends.push(BackendState {
                address: b.address,
                weight: b.weight,
                priority: b.priority,
                admin,
                health,
                slot: a.slot,
                generation: a.generation,
            });
        }
        let active = match prev_s {
            Some(p) => p
                .active
                .and_then(|a| p.backends.get(a))
                .and_then(|a| backends.iter().position(|b| b.address == a.address)),
            // After a restart the live ring says who was active.
            None if maps.adopted() && spec.scheduler == Scheduler::Failover => {
                let live = maps
                    .ring(id, half, 1)
                    .first()
                    .copied()
                    .unwrap_or(NO_BACKEND);
                backends.iter().position(|b| b.slot == live)
            }
            None => None,
        };
        next.services.insert(
            spec.name.clone(),
            ServiceState {
                spec: spec.clone(),
                id,
                key: service_key(spec.vip, spec.protocol),
                half,
                snat: snat.get(&spec.name).cloned().unwrap_or_default(),
                backends,
                active,
            },
        );
    }
    let mut writes = Vec::new();
    let mut events = Vec::new();
    for s in next.services.values_mut() {
        let (w, e) = s.write(&globals);
        writes.push(w);
        events.extend(e);
    }
    let removed: Vec<ServiceKey> = existing
        .iter()
        .map(|(k, _)| *k)
        .filter(|k| {
            !next
                .services
                .values()
                .any(|s| s.key == *k && s.spec.mode != Mode::Mllp)
        })
        .collect();
    let had: Vec<IpAddr> = current.map(|c| c.vips.clone()).unwrap_or_default();
    let vips = VipChanges {
        add: next
            .vips
            .iter()
            .copied()
            .filter(|ip| !had.contains(ip))
            .collect(),
        remove: had
            .iter()
            .copied()
            .filter(|ip| !next.vips.contains(ip))
            .collect(),
    };
    Ok(Plan {
        next,
        added,
        replaced,
        kept,
        removed,
        slots: assignment.into_values().collect(),
        fresh_ids,
        fresh_slots,
        free_slots,
        globals,
        writes,
        vips,
        events,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::fake::Rig;

    use crate::control::fake::WEB3 as WEB;

    #[test]
    fn a_reload_keeps_mirroring_as_it_is() {
        let mut rig = Rig::new();
        rig.reload(WEB).unwrap();
        assert_eq!(rig.maps.globals.mirror, 0);
        // The HA pair turned it on; the file does not know about it.
        rig.maps.globals.mirror = 1;
        rig.reload(&WEB.replace("500ms", "100ms")).unwrap();
        assert_eq!(rig.maps.globals.mirror, 1, "still on after the reload");
        assert_eq!(rig.maps.globals.abi_version, ABI_VERSION);
    }

    #[test]
    fn a_surviving_backend_keeps_its_health_when_its_check_changes() {
        let mut rig = Rig::new();
        rig.reload(WEB).unwrap();
        rig.set_health("web", "10.77.0.12:80", BackendHealth::Down);
        let faster = WEB.replace("500ms", "100ms");
        rig.reload(&faster).unwrap();
        let s = rig.service("web");
        assert_eq!(s.backends[1].health, BackendHealth::Down);
        assert!(!rig.ring_addrs("web").contains("10.77.0.12:80"));
        // Dropping the check makes every backend unchecked (eligible) again.
        let unchecked = WEB.replace("health = { kind = \"tcp\", interval = \"500ms\" }\n", "");
        rig.reload(&unchecked).unwrap();
        assert_eq!(rig.ring_addrs("web").len(), 3);
    }

    #[test]
    fn a_backend_that_moves_up_the_list_keeps_its_slot_and_health() {
        let mut rig = Rig::new();
        rig.reload(WEB).unwrap();
        rig.set_health("web", "10.77.0.13:80", BackendHealth::Down);
        let slot = rig.service("web").backends[2].slot;
        let without_12 = WEB.replace("{ address = \"10.77.0.12:80\" }, ", "");
        let p = rig.reload(&without_12).unwrap();
        let s = rig.service("web");
        assert_eq!(s.backends[1].address, "10.77.0.13:80".parse().unwrap());
        assert_eq!(s.backends[1].slot, slot);
        assert_eq!(s.backends[1].health, BackendHealth::Down);
        assert_eq!(p.free_slots.len(), 1);
        assert!(p.fresh_slots.is_empty());
    }

    #[test]
    fn a_healthy_standby_is_eligible_at_once_after_a_restart() {
        let hl7 = r#"
[[service]]
name = "hl7"
vip = "10.77.0.100:6661"
scheduler = "failover"
ring_size = 7
health = { kind = "mllp" }
backends = [ { address = "10.77.0.11:6661" }, { address = "10.77.0.12:6661" } ]
"#;
        let mut first = Rig::new();
        first.reload(hl7).unwrap();
        first.set_health("hl7", "10.77.0.11:6661", BackendHealth::Up);
        first.set_health("hl7", "10.77.0.12:6661", BackendHealth::Up);
        let dir = std::env::temp_dir().join(format!("balancer-health-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("health-state.json");
        save_health(&path, first.state()).unwrap();
        let book = load_health(&path).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        let mut maps = first.maps.clone();
        maps.adopted = true;
        let p = plan(
            &Rig::cfg(hl7),
            None,
            &maps,
            &book,
            &Default::default(),
            &first.host,
        )
        .unwrap();
        // The standby's slot is "down" in the maps, but the book says it was healthy.
        let s = &p.next.services["hl7"];
        assert_eq!(s.backends[1].health, BackendHealth::Up);
        let mut next = s.clone();
        next.backends[0].health = BackendHealth::Down;
        let (_, ev) = next.write(&p.globals);
        assert!(ev.is_some());
        assert_eq!(
            next.active,
            Some(1),
            "failover right after a restart is immediate"
        );
        // Without the book the adopted standby would wait for its checks.
        let p = plan(
            &Rig::cfg(hl7),
            None,
            &maps,
            &Default::default(),
            &Default::default(),
            &first.host,
        )
        .unwrap();
        assert_eq!(
            p.next.services["hl7"].backends[1].health,
            BackendHealth::Down
        );
        assert!(
            load_health(std::path::Path::new("/nonexistent/h.json"))
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn no_service_id_is_refused() {
        let many: String = (0..MAX_SERVICES)
            .map(|i| {
                format!(
                    "[[service]]\nname = \"s{i}\"\nvip = \"10.77.1.{i}:80\"\nring_size = 7\nbackends = [ {{ address = \"10.77.2.1:80\" }} ]\n"
                )
            })
            .collect();
        let mut rig = Rig::new();
        rig.reload(&many).unwrap();
        let other = many.replace("10.77.1.", "10.77.3.");
        let e = rig.plan(&other).unwrap_err();
        assert!(matches!(e, PlanError::NoServiceId(_)), "{e}");
    }

    #[test]
    fn a_vip_on_the_snat_address_inside_the_snat_ports_is_refused() {
        let mut rig = Rig::new();
        rig.reload(WEB).unwrap();
        let writes = rig.maps.writes();
        let (first, last) = {
            let c = Rig::cfg(WEB);
            (c.snat_ports.first, c.snat_ports.last)
        };
        let inside = format!(
            "{WEB}\n[[service]]\nname = \"own\"\nvip = \"10.77.0.1:{}\"\nbackends = [ {{ address = \"10.77.0.11:80\" }} ]\n",
            first + 5
        );
        let e = rig.plan(&inside).unwrap_err();
        assert!(
            matches!(&e, PlanError::VipInSnatRange { service, .. } if service == "own"),
            "{e}"
        );
        assert!(rig.reload(&inside).is_err());
        assert_eq!(rig.maps.writes(), writes, "nothing written");
        // Outside the range, or on another address, it is fine.
        let below = inside.replace(&format!(":{}\"", first + 5), &format!(":{}\"", first - 1));
        rig.plan(&below).unwrap();
        let other = inside.replace("10.77.0.1:", "10.77.0.101:");
        rig.plan(&other).unwrap();
        assert!(last >= first + 5);
        // Every address of a pool counts.
        rig.host.snat_v4 = vec!["10.77.0.1".parse().unwrap(), "10.77.0.101".parse().unwrap()];
        assert!(matches!(
            rig.plan(&other).unwrap_err(),
            PlanError::VipInSnatRange { .. }
        ));
    }

    #[test]
    fn a_nat_service_gets_the_whole_snat_pool_of_its_family() {
        let mut rig = Rig::new();
        let pool: Vec<IpAddr> = vec!["10.77.0.1".parse().unwrap(), "10.77.0.201".parse().unwrap()];
        rig.host.snat_v4 = pool.clone();
        rig.reload(WEB).unwrap();
        let want: Vec<[u8; 16]> = pool.iter().map(|ip| net::addr16(*ip)).collect();
        assert_eq!(rig.service("web").snat, want);
        let svc = rig
            .maps
            .services()
            .into_iter()
            .map(|(_, s)| s)
            .find(|s| s.id == rig.service("web").id)
            .unwrap();
        assert_eq!(svc.snat_addr_count, 2);
        assert_eq!(&svc.snat_addrs[..2], &want[..]);
        assert_eq!(svc.snat_addrs[2], [0; 16]);
    }

    #[test]
    fn dsr_needs_no_snat_address() {
        let mut rig = Rig::new();
        rig.host.snat_v4 = Vec::new();
        let nat = WEB;
        assert!(matches!(
            rig.plan(nat).unwrap_err(),
            PlanError::NoSnatAddress { family: 4, .. }
        ));
        let dsr = WEB.replace("ring_size = 13", "ring_size = 13\nforwarding = \"dsr\"");
        rig.reload(&dsr).unwrap();
        assert!(rig.service("web").snat.is_empty());
    }

    const HL7_L4: &str = r#"
[[service]]
name = "hl7"
vip = "10.77.0.100:6661"
scheduler = "failover"
ring_size = 7
health = { kind = "mllp" }
backends = [ { address = "10.77.0.11:6661" }, { address = "10.77.0.12:6661" } ]
"#;

    fn relayed(text: &str) -> String {
        text.replace(
            "scheduler = \"failover\"",
            "scheduler = \"failover\"\nmode = \"mllp\"",
        )
    }

    fn key(text: &str) -> ServiceKey {
        let cfg = Rig::cfg(text);
        service_key(cfg.services[0].vip, cfg.services[0].protocol)
    }

    #[test]
    fn a_relayed_service_is_in_no_map_but_its_vip_is_on_the_interface() {
        let mut rig = Rig::new();
        let text = format!("{}{WEB}", relayed(HL7_L4));
        let p = rig.reload(&text).unwrap();
        let fwd = rig.maps.forwarding();
        // Only "web" is in the service map: XDP passes 10.77.0.100:6661 to the kernel.
        assert_eq!(fwd.services.len(), 1);
        assert!(!fwd.services.values().any(|(k, _)| *k == key(HL7_L4)));
        let hl7 = rig.service("hl7");
        assert!(
            hl7.backends
                .iter()
                .all(|b| fwd.slots.get(&b.slot).is_none_or(|s| s.used == 0)),
            "no slot of a relayed service is used in the maps"
        );
        assert!(rig.vips.on.contains(&"10.77.0.100".parse().unwrap()));
        // The failover scheduler still chooses the listener the relay sends to.
        assert_eq!(hl7.active, Some(0));
        assert!(p.writes.iter().any(|w| w.name == "hl7" && w.relay));
        // Health changes move the active listener without a map write.
        let writes = rig.maps.writes();
        rig.set_health("hl7", "10.77.0.11:6661", BackendHealth::Down);
        assert_eq!(rig.service("hl7").active, Some(1));
        assert_eq!(rig.maps.writes(), writes);
    }

    #[test]
    fn switching_a_service_to_mllp_and_back_moves_its_vip_between_kernel_and_xdp() {
        let mut rig = Rig::new();
        rig.reload(HL7_L4).unwrap();
        let old_slots: Vec<u32> = rig.service("hl7").backends.iter().map(|b| b.slot).collect();
        assert!(rig.maps.services.contains_key(&key(HL7_L4)));
        let p = rig.reload(&relayed(HL7_L4)).unwrap();
        assert_eq!(p.removed, vec![key(HL7_L4)]);
        assert!(!rig.maps.services.contains_key(&key(HL7_L4)));
        // The L4 slots are freed (their flows reset), not adopted by the relayed service.
        for slot in &old_slots {
            assert_eq!(rig.maps.slots[slot].used, 0, "slot {slot}");
            assert_eq!(rig.maps.slots[slot].state, BE_DOWN, "slot {slot}");
        }
        // A reload of the same relayed config writes nothing of it either.
        let p = rig.reload(&relayed(HL7_L4)).unwrap();
        assert!(p.removed.is_empty());
        assert!(!rig.maps.services.contains_key(&key(HL7_L4)));
        // Back to L4: the service is in the map again, with its active listener in the ring.
        rig.reload(HL7_L4).unwrap();
        assert!(rig.maps.services.contains_key(&key(HL7_L4)));
        assert_eq!(rig.ring_addrs("hl7").len(), 1);
    }

    #[test]
    fn a_failed_switch_to_mllp_changes_nothing() {
        let mut rig = Rig::new();
        rig.reload(&format!("{HL7_L4}{WEB}")).unwrap();
        let to = format!("{}{WEB}", relayed(HL7_L4));
        let mut probe = Rig {
            maps: rig.maps.clone(),
            vips: rig.vips.clone(),
            state: rig.state.clone(),
            host: rig.host.clone(),
        };
        let start = probe.maps.writes();
        probe.reload(&to).unwrap();
        let n = probe.maps.writes() - start;
        assert!(n > 0);
        for k in 0..n {
            let mut r = Rig {
                maps: rig.maps.clone(),
                vips: rig.vips.clone(),
                state: rig.state.clone(),
                host: rig.host.clone(),
            };
            let before = r.maps.forwarding();
            r.maps.fail_at = Some(start + k);
            let e = r.reload(&to).unwrap_err();
            assert!(e.contains("previous state was restored"), "write {k}: {e}");
            assert_eq!(r.maps.forwarding(), before, "write {k}");
            assert_eq!(r.state, rig.state, "write {k}");
            assert!(r.maps.services.contains_key(&key(HL7_L4)), "write {k}");
        }
    }
}
