//! Mirrored flows between the two balancers of an HA pair, as plain data: what the active
//! balancer's flow entries say ([`to_mirrored`]) and the entries the standby installs for them
//! ([`entries`]). The two balancers may number services and backend slots differently, so a
//! flow travels by identity (service key, backend address and port) and is translated to this
//! balancer's ids on arrival. Pure: no maps, no I/O.

use balancer_common::{
    FLOW_F_CLOSING, FLOW_F_DSR, FLOW_F_FORWARD, FLOW_F_HALF_OPEN, Flow, FlowKey, ServiceKey,
    idle_secs,
};

use super::flow_expiry::reply_key;

/// The flags a mirrored flow carries (the others, such as the cached next hop, are local).
pub const MIRRORED_FLAGS: u32 = FLOW_F_FORWARD | FLOW_F_DSR | FLOW_F_CLOSING | FLOW_F_HALF_OPEN;

/// This balancer's slot and generation of a backend of service `id` (this balancer's id) by
/// address and port (network order), as [`entries`] asks for it.
pub type BackendLookup<'a> = dyn Fn(u32, &[u8; 16], u16) -> Option<(u32, u32)> + 'a;

/// One flow as the active balancer sees it: the forward key and the forward entry's rewrite
/// (addresses in 16-byte form, ports in network order, flags only [`MIRRORED_FLAGS`]). It is
/// the sync channel's record itself, so nothing is copied field by field on the way.
pub use balancer_sync::FlowRecord as MirroredFlow;

/// A forward entry as a mirrored flow (`None` for a reply entry). `now` is the flow clock
/// ([`super::flow_expiry::now_secs`]).
pub fn to_mirrored(key: &FlowKey, f: &Flow, now: u32) -> Option<MirroredFlow> {
    if f.flags & FLOW_F_FORWARD == 0 {
        return None;
    }
    Some(MirroredFlow {
        src: key.src,
        dst: key.dst,
        sport: key.sport,
        dport: key.dport,
        proto: key.proto,
        new_src: f.new_src,
        new_dst: f.new_dst,
        new_sport: f.new_sport,
        new_dport: f.new_dport,
        flags: f.flags & MIRRORED_FLAGS,
        idle_secs: idle_secs(now, f.atime),
    })
}

/// The flow-table entries of a mirrored flow on this balancer: the forward entry, and for NAT
/// the reply entry (as the program restores a lost one), both without a next hop (the program
/// resolves it on the first packet of each direction). `service` gives this balancer's
/// service id for a service key; `backend` gives the slot and generation of a service's
/// backend by address and port (network order; for DSR the VIP's port). `None` when either is
/// unknown here (the caller counts it).
pub fn entries(
    m: &MirroredFlow,
    service: &dyn Fn(&ServiceKey) -> Option<u32>,
    backend: &BackendLookup,
    now: u32,
) -> Option<Vec<(FlowKey, Flow)>> {
    if m.flags & FLOW_F_FORWARD == 0 {
        return None;
    }
    let id = service(&ServiceKey {
        addr: m.dst,
        port: m.dport,
        proto: m.proto,
        pad: 0,
    })?;
    let dsr = m.flags & FLOW_F_DSR != 0;
    let be_port = if dsr { m.dport } else { m.new_dport };
    let (slot, generation) = backend(id, &m.new_dst, be_port)?;
    let key = FlowKey {
        src: m.src,
        dst: m.dst,
        sport: m.sport,
        dport: m.dport,
        proto: m.proto,
        pad: [0; 3],
    };
    let atime = now.wrapping_sub(m.idle_secs);
    let forward = Flow {
        new_src: m.new_src,
        new_dst: m.new_dst,
        new_sport: m.new_sport,
        new_dport: m.new_dport,
        flags: m.flags & MIRRORED_FLAGS,
        backend: slot,
        generation,
        service: id,
        atime,
        ..Flow::default()
    };
    let mut out = vec![(key, forward)];
    if !dsr {
        let reply = Flow {
            new_src: key.dst,
            new_dst: key.src,
            new_sport: key.dport,
            new_dport: key.sport,
            flags: m.flags & (FLOW_F_CLOSING | FLOW_F_HALF_OPEN),
            backend: slot,
            generation,
            service: id,
            atime,
            ..Flow::default()
        };
        out.push((reply_key(&forward, key.proto), reply));
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use balancer_common::{FLOW_F_NEXTHOP, PROTO_TCP, PROTO_UDP};

    use super::*;
    use crate::host::net::addr16;

    fn a(s: &str) -> [u8; 16] {
        addr16(s.parse::<IpAddr>().unwrap())
    }

    /// The active balancer's forward entry of a flow, as its program made it.
    fn active_entry(
        client: &str,
        vip: &str,
        snat: &str,
        be: &str,
        dsr: bool,
        proto: u8,
    ) -> (FlowKey, Flow) {
        let key = FlowKey {
            src: a(client),
            dst: a(vip),
            sport: 40001u16.to_be(),
            dport: 7002u16.to_be(),
            proto,
            pad: [0; 3],
        };
        let f = Flow {
            new_src: if dsr { a(client) } else { a(snat) },
            new_dst: a(be),
            new_sport: if dsr { key.sport } else { 12345u16.to_be() },
            new_dport: if dsr { key.dport } else { 8002u16.to_be() },
            flags: FLOW_F_FORWARD
                | FLOW_F_NEXTHOP
                | FLOW_F_HALF_OPEN
                | if dsr { FLOW_F_DSR } else { 0 },
            backend: 7,
            generation: 3,
            service: 2,
            ifindex: 9,
            smac: [1; 6],
            dmac: [2; 6],
            atime: 990,
            peer_ifindex: 0,
            nh_time: 985,
            mtu: 1300,
            vlan: 20,
            peer_vlan: 0,
        };
        (key, f)
    }

    /// This balancer: the service at `vip`:7002 is id 5, the backend `be` at port `port` is
    /// slot 40, generation 8.
    #[allow(clippy::type_complexity)]
    fn here(
        vip: [u8; 16],
        be: [u8; 16],
        port: u16,
    ) -> (
        impl Fn(&ServiceKey) -> Option<u32>,
        impl Fn(u32, &[u8; 16], u16) -> Option<(u32, u32)>,
    ) {
        (
            move |k: &ServiceKey| {
                (k.addr == vip && k.port == 7002u16.to_be() && k.pad == 0).then_some(5)
            },
            move |id: u32, addr: &[u8; 16], p: u16| {
                (id == 5 && *addr == be && p == port.to_be()).then_some((40, 8))
            },
        )
    }

    #[test]
    fn nat_flows_get_both_entries_in_this_balancers_numbering_v4_and_v6() {
        for (client, vip, snat, be, proto) in [
            (
                "10.77.0.2",
                "10.77.0.100",
                "10.77.0.1",
                "10.77.0.12",
                PROTO_TCP,
            ),
            ("fd77::2", "fd77::100", "fd77::1", "fd77::12", PROTO_UDP),
        ] {
            let (key, f) = active_entry(client, vip, snat, be, false, proto);
            let m = to_mirrored(&key, &f, 1000).unwrap();
            assert_eq!(m.idle_secs, 10);
            assert_eq!(
                m.flags,
                FLOW_F_FORWARD | FLOW_F_HALF_OPEN,
                "the next hop is not mirrored"
            );
            let (svc, bes) = here(a(vip), a(be), 8002);
            let e = entries(&m, &svc, &bes, 5000).unwrap();
            assert_eq!(e.len(), 2);
            let (fk, fwd) = e[0];
            assert_eq!(fk, key);
            assert_eq!(
                fwd,
                Flow {
                    flags: FLOW_F_FORWARD | FLOW_F_HALF_OPEN,
                    backend: 40,
                    generation: 8,
                    service: 5,
                    ifindex: 0,
                    smac: [0; 6],
                    dmac: [0; 6],
                    atime: 4990,
                    peer_ifindex: 0,
                    nh_time: 0,
                    mtu: 0,
                    vlan: 0,
                    ..f
                },
                "same rewrite (SNAT port included), this balancer's slot, no next hop (nor VLAN)"
            );
            // The reply entry exactly as the program restores a lost one.
            let (rk, reply) = e[1];
            assert_eq!(
                rk,
                FlowKey {
                    src: a(be),
                    dst: a(snat),
                    sport: 8002u16.to_be(),
                    dport: 12345u16.to_be(),
                    proto,
                    pad: [0; 3],
                }
            );
            assert_eq!(
                reply,
                Flow {
                    new_src: a(vip),
                    new_dst: a(client),
                    new_sport: 7002u16.to_be(),
                    new_dport: 40001u16.to_be(),
                    flags: FLOW_F_HALF_OPEN,
                    backend: 40,
                    generation: 8,
                    service: 5,
                    atime: 4990,
                    ..Flow::default()
                }
            );
        }
    }

    #[test]
    fn dsr_flows_get_a_forward_entry_only_and_match_the_backend_by_the_vip_port() {
        for (client, vip, be) in [
            ("10.77.0.2", "10.77.0.100", "10.77.0.13"),
            ("fd77::2", "fd77::100", "fd77::13"),
        ] {
            let (key, mut f) = active_entry(client, vip, "::", be, true, PROTO_TCP);
            f.flags |= FLOW_F_CLOSING;
            let m = to_mirrored(&key, &f, 990).unwrap();
            assert_eq!(m.idle_secs, 0);
            let (svc, bes) = here(a(vip), a(be), 7002);
            let e = entries(&m, &svc, &bes, 2000).unwrap();
            assert_eq!(e.len(), 1, "DSR replies bypass the balancer");
            assert_eq!(e[0].0, key);
            let fwd = e[0].1;
            assert_eq!(
                fwd.flags,
                FLOW_F_FORWARD | FLOW_F_DSR | FLOW_F_HALF_OPEN | FLOW_F_CLOSING
            );
            assert_eq!((fwd.new_src, fwd.new_dst), (a(client), a(be)));
            assert_eq!((fwd.new_sport, fwd.new_dport), (key.sport, key.dport));
            assert_eq!((fwd.backend, fwd.generation, fwd.service), (40, 8, 5));
            assert_eq!((fwd.ifindex, fwd.peer_ifindex, fwd.atime), (0, 0, 2000));
        }
    }

    #[test]
    fn reply_entries_are_not_mirrored() {
        let (_, mut f) = active_entry(
            "10.77.0.2",
            "10.77.0.100",
            "10.77.0.1",
            "10.77.0.12",
            false,
            PROTO_TCP,
        );
        f.flags &= !FLOW_F_FORWARD;
        assert_eq!(to_mirrored(&FlowKey::default(), &f, 1000), None);
    }

    #[test]
    fn unknown_service_or_backend_gives_nothing() {
        let (key, f) = active_entry(
            "10.77.0.2",
            "10.77.0.100",
            "10.77.0.1",
            "10.77.0.12",
            false,
            PROTO_TCP,
        );
        let m = to_mirrored(&key, &f, 1000).unwrap();
        // Another VIP here.
        let (svc, bes) = here(a("10.77.0.101"), a("10.77.0.12"), 8002);
        assert_eq!(entries(&m, &svc, &bes, 1000), None, "unknown service");
        // The service is known, the backend is not (another address, or another port).
        let (svc, bes) = here(a("10.77.0.100"), a("10.77.0.13"), 8002);
        assert_eq!(
            entries(&m, &svc, &bes, 1000),
            None,
            "unknown backend address"
        );
        let (svc, bes) = here(a("10.77.0.100"), a("10.77.0.12"), 8003);
        assert_eq!(entries(&m, &svc, &bes, 1000), None, "unknown backend port");
        // Another protocol on the same VIP and port is another service.
        let mut udp = m;
        udp.proto = PROTO_UDP;
        let only_tcp = |k: &ServiceKey| (k.proto == PROTO_TCP).then_some(5);
        let any_be = |_: u32, _: &[u8; 16], _: u16| Some((1, 1));
        assert_eq!(entries(&udp, &only_tcp, &any_be, 1000), None);
        assert!(entries(&m, &only_tcp, &any_be, 1000).is_some());
    }

    #[test]
    fn slots_and_generations_are_this_balancers() {
        let (key, f) = active_entry(
            "10.77.0.2",
            "10.77.0.100",
            "10.77.0.1",
            "10.77.0.12",
            false,
            PROTO_TCP,
        );
        let m = to_mirrored(&key, &f, 1000).unwrap();
        // Here the same backend sits in slot 3 of service 0, generation 1; slot 7 (the active
        // balancer's number) belongs to another backend.
        let svc = |_: &ServiceKey| Some(0);
        let bes = |id: u32, addr: &[u8; 16], port: u16| match (
            id,
            *addr == a("10.77.0.12"),
            u16::from_be(port),
        ) {
            (0, true, 8002) => Some((3, 1)),
            _ => None,
        };
        let e = entries(&m, &svc, &bes, 1000).unwrap();
        for (_, fl) in &e {
            assert_eq!((fl.backend, fl.generation, fl.service), (3, 1, 0));
            assert_eq!(fl.flags & FLOW_F_NEXTHOP, 0);
        }
    }
}
