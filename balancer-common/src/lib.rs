//! The map ABI shared by the XDP program (`balancer-ebpf`) and the controller (`balancer`).
//!
//! Every type here is `#[repr(C)]`, `Copy`, has no implicit padding, and is read by both sides:
//! change a layout and bump [`ABI_VERSION`] so a controller refuses to adopt pinned maps of the
//! old layout (it replaces them instead).
#![no_std]

/// Bumped whenever a map name, key, value, size or flags below change.
pub const ABI_VERSION: u32 = 19;

// ---- map names (the pin file names under the pin directory) ----
/// `(vip, port, proto)` → [`Service`].
pub const MAP_SERVICES: &str = "BLB_SERVICES";
/// Backend index → [`Backend`].
pub const MAP_BACKENDS: &str = "BLB_BACKENDS";
/// Ring slots, two per array value (`[u32; 2]`: the kernel strides array values by 8 bytes):
/// slot `ring_index(service, half, slot)` is lane `i & 1` of value `i >> 1`; each holds a
/// backend index ([`NO_BACKEND`] when empty).
pub const MAP_RINGS: &str = "BLB_RINGS";
/// [`FlowKey`] → [`Flow`], both directions of every balanced flow.
pub const MAP_FLOWS: &str = "BLB_FLOWS";
/// Per-CPU [`Counters`] per service.
pub const MAP_SERVICE_STATS: &str = "BLB_SVC_STATS";
/// Per-CPU [`Counters`] per backend.
pub const MAP_BACKEND_STATS: &str = "BLB_BE_STATS";
/// Per-CPU `u64` per [`Reason`].
pub const MAP_REASONS: &str = "BLB_REASONS";
/// Global settings, one [`Globals`] at index 0.
pub const MAP_GLOBALS: &str = "BLB_GLOBALS";
/// Ring buffer of [`MirrorEvent`]s: every flow the program creates while
/// [`Globals::mirror`] is 1 (for the standby of an HA pair).
pub const MAP_MIRROR: &str = "BLB_MIRROR";
/// Bytes of the [`MAP_MIRROR`] ring buffer (a power of two multiple of the page size).
pub const MIRROR_RING_BYTES: u32 = 4 << 20;
/// Per-CPU [`MirrorCounters`] at index 0.
pub const MAP_MIRROR_STATS: &str = "BLB_MIRROR_STATS";
/// Array, index ingress ifindex (below [`IFMAC_SLOTS`]) → [`IfMac`]: the MAC of each interface
/// the program is attached to. A unicast frame to another MAC is passed untouched; an
/// all-zero entry (no MAC recorded), no check. An array, not a hash: every VIP, reply and
/// ICMP packet reads it, and the kernel inlines an array lookup.
pub const MAP_IFMACS: &str = "BLB_IFMACS";
/// Slots of [`MAP_IFMACS`]: interfaces with a lower ifindex are recorded there.
pub const IFMAC_SLOTS: u32 = 4096;
/// Hash, ingress ifindex (`u32`, [`IFMAC_SLOTS`] or above) → [`IfMac`]: the same for
/// interfaces whose ifindex is too high for the array (a host that has made many
/// interfaces).
pub const MAP_IFMACS_HIGH: &str = "BLB_IFMACS_HIGH";
/// Entries of [`MAP_IFMACS_HIGH`] (interfaces the program may be attached to).
pub const MAX_IFMACS: u32 = 64;
/// 802.1Q VLAN device ifindex (`u32`) → [`VlanDev`]: its parent (the trunk) and VLAN id,
/// written by the controller. A next hop the FIB answers on a VLAN device leaves through the
/// trunk, tagged.
pub const MAP_VLANS: &str = "BLB_VLANS";
/// Entries of [`MAP_VLANS`] and of [`MAP_VLAN_PORTS`].
pub const MAX_VLANS: u32 = 4096;
/// The other way round: [`VlanPort`] (trunk ifindex, VLAN id) → [`VlanIn`] (the VLAN
/// device's ifindex and MAC), written by the controller with [`MAP_VLANS`]. A tagged frame
/// is checked against its VLAN device's MAC and routed as arriving on that device, as the
/// kernel would; a tag without a device is treated as arriving on the trunk.
pub const MAP_VLAN_PORTS: &str = "BLB_VLAN_PORTS";
/// The destination ports the program looks at, one bit each (word `port / 64` of the array,
/// bit `port % 64`): every service's port and the SNAT port range, written by the controller
/// (a superset while it changes). A TCP/UDP frame to any other port is passed before it is
/// parsed, without a service lookup.
pub const MAP_PORTS: &str = "BLB_PORTS";
/// Entries (`u64` words) of [`MAP_PORTS`]: 65,536 bits.
pub const PORT_WORDS: u32 = 1024;
/// All maps, for pinning and adoption.
pub const ALL_MAPS: [&str; 15] = [
    MAP_SERVICES,
    MAP_BACKENDS,
    MAP_RINGS,
    MAP_FLOWS,
    MAP_SERVICE_STATS,
    MAP_BACKEND_STATS,
    MAP_REASONS,
    MAP_GLOBALS,
    MAP_MIRROR,
    MAP_MIRROR_STATS,
    MAP_IFMACS,
    MAP_IFMACS_HIGH,
    MAP_VLANS,
    MAP_VLAN_PORTS,
    MAP_PORTS,
];
/// The XDP program's name in the object file.
pub const PROGRAM_NAME: &str = "balancer";

// ---- sizes ----
/// Most services the dataplane holds (each owns two ring halves).
pub const MAX_SERVICES: u32 = 64;
/// Most backends over all services.
pub const MAX_BACKENDS: u32 = 4096;
/// Largest Maglev ring (a prime); every service's ring lives in a slot of this size.
pub const RING_MAX: u32 = 65537;
/// u32 slots in the ring array (all services, both halves).
pub const RING_WORDS: u32 = 2 * MAX_SERVICES * RING_MAX;
/// Values (`[u32; 2]`) in the ring array.
pub const RING_VALUES: u32 = RING_WORDS / 2;

/// Default flow-table size (entries; each balanced NAT flow takes two).
pub const DEFAULT_FLOW_ENTRIES: u32 = 262_144;
/// Ring slot value meaning "no backend" (an empty ring: every backend is down).
pub const NO_BACKEND: u32 = u32::MAX;

// ---- protocol numbers ----
/// IP protocol number of TCP.
pub const PROTO_TCP: u8 = 6;
/// IP protocol number of UDP.
pub const PROTO_UDP: u8 = 17;

// ---- service flags ----
/// Forwarding by DSR (MAC rewrite only). Without it: full NAT.
pub const SVC_F_DSR: u32 = 1 << 0;
/// Flows of a down backend are dropped instead of reset.
pub const SVC_F_DOWN_DROP: u32 = 1 << 1;
/// The service's VIP is IPv6.
pub const SVC_F_IPV6: u32 = 1 << 2;

// ---- backend states ----
/// Takes new and existing flows.
pub const BE_UP: u32 = 0;
/// Keeps its existing flows, takes no new ones (it is not in the ring).
pub const BE_DRAINING: u32 = 1;
/// Its flows are reset (or dropped, per service).
pub const BE_DOWN: u32 = 2;

/// An address in 16 bytes: IPv6 as is, IPv4 as v4-mapped (`::ffff:a.b.c.d`).
pub type Addr = [u8; 16];

/// Key of the service map. Port in network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ServiceKey {
    /// VIP, 16-byte form.
    pub addr: Addr,
    /// VIP port, network byte order.
    pub port: u16,
    /// [`PROTO_TCP`] or [`PROTO_UDP`].
    pub proto: u8,
    /// Always zero.
    pub pad: u8,
}

/// Value of the service map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Service {
    /// Index into the ring and the per-service counters (`< MAX_SERVICES`).
    pub id: u32,
    /// `SVC_F_*`.
    pub flags: u32,
    /// Which ring half is live (0 or 1): written last, so a packet sees a whole ring.
    pub ring_half: u32,
    /// Slots used in the ring (a prime ≤ `RING_MAX`).
    pub ring_size: u32,
    /// Seed of the 5-tuple hash.
    pub seed: u32,
    /// First SNAT port (host order), inclusive.
    pub snat_port_lo: u16,
    /// Last SNAT port (host order), inclusive.
    pub snat_port_hi: u16,
    /// SNAT source addresses for NAT mode (a pool), 16-byte form of the backends' family;
    /// the first `snat_addr_count` are used.
    pub snat_addrs: [Addr; MAX_SNAT_ADDRS],
    /// How many of `snat_addrs` are set (0 for DSR).
    pub snat_addr_count: u32,
    /// Most new flows per second per CPU (0: no limit). Past it a new flow's packet is
    /// dropped and no state is made; existing flows are not affected.
    pub new_flow_rate: u32,
}

/// Value of the backend array.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Backend {
    /// Backend address, 16-byte form.
    pub addr: Addr,
    /// Backend port, network byte order.
    pub port: u16,
    /// 1 when `addr` is IPv6.
    pub ipv6: u8,
    /// 1 while the slot belongs to a configured backend.
    pub used: u8,
    /// `BE_UP`, `BE_DRAINING`, `BE_DOWN`.
    pub state: u32,
    /// Bumped each time the slot is given to another backend; a flow with an old generation
    /// is treated as a flow of a down backend.
    pub generation: u32,
    /// Id of the service the backend belongs to (lets a restarted controller adopt slots).
    pub service: u32,
}

/// Key of the flow table: the packet's 5-tuple as it arrives. Ports in network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FlowKey {
    /// Source address.
    pub src: Addr,
    /// Destination address.
    pub dst: Addr,
    /// Source port.
    pub sport: u16,
    /// Destination port.
    pub dport: u16,
    /// IP protocol.
    pub proto: u8,
    /// Always zero.
    pub pad: [u8; 3],
}

/// The flow is a client → VIP flow (forward); without it, a backend → SNAT reply (reverse).
pub const FLOW_F_FORWARD: u32 = 1 << 0;
/// The flow is forwarded by DSR.
pub const FLOW_F_DSR: u32 = 1 << 1;
/// `ifindex`, `smac` and `dmac` hold the flow's next hop (no FIB lookup per packet).
pub const FLOW_F_NEXTHOP: u32 = 1 << 2;
/// A FIN or RST went through in this direction: the SNAT port may be reused soon.
pub const FLOW_F_CLOSING: u32 = 1 << 3;
/// A TCP flow made by a SYN that has not seen the client's next segment yet (half-open): the
/// controller expires it after [`HALF_OPEN_SECS`] instead of the idle timeout.
pub const FLOW_F_HALF_OPEN: u32 = 1 << 4;
/// Seconds a half-open flow is kept (a SYN flood cannot fill the table for the idle timeout).
pub const HALF_OPEN_SECS: u32 = 30;
/// Seconds (on the whole-second flow clock: more than one real second) after which the
/// program may give a half-open flow's SNAT port to a new flow, when none of the probed
/// ports is free. A real handshake completes in milliseconds; a spoofed SYN's never does, so
/// a SYN flood recycles its own ports instead of holding the whole range for 30 s.
pub const HALF_OPEN_REUSE_SECS: u32 = 2;
/// Seconds after the last packet before a closing flow's SNAT port may be taken again, when
/// none of the probed ports is free (the controller's sweep frees closed flows after 10 s
/// anyway). Short, because a client's retried SYN probes the same 16 ports each time: with
/// a busy backend's ports held by recently closed connections, a longer wait outlasts the
/// client's connect timeout. Three ticks of the whole-second clock: at least 2 s.
pub const CLOSING_REUSE_SECS: u32 = 3;
/// Smallest SNAT port range (the probe sequence needs room).
pub const MIN_SNAT_PORTS: u32 = 1024;
/// Most SNAT addresses per address family (a pool): each adds `snat_ports` concurrent NAT
/// flows per backend.
pub const MAX_SNAT_ADDRS: usize = 8;
// The XDP program masks pool indexes with `MAX_SNAT_ADDRS - 1`.
const _: () = assert!(MAX_SNAT_ADDRS.is_power_of_two());
/// Default idle time (s) after which a TCP flow's SNAT port may be reused.
pub const DEFAULT_TCP_IDLE_SECS: u32 = 3600;
/// Default idle time (s) after which a UDP flow's SNAT port may be reused.
pub const DEFAULT_UDP_IDLE_SECS: u32 = 300;

/// Value of the flow table: what to write into a packet of this flow.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Flow {
    /// New source address (forward: the SNAT address; reverse: the VIP).
    pub new_src: Addr,
    /// New destination address (forward: the backend; reverse: the client).
    pub new_dst: Addr,
    /// New source port, network order.
    pub new_sport: u16,
    /// New destination port, network order.
    pub new_dport: u16,
    /// `FLOW_F_*`.
    pub flags: u32,
    /// Backend index.
    pub backend: u32,
    /// Backend generation when the flow was made.
    pub generation: u32,
    /// Service id.
    pub service: u32,
    /// Egress interface of the cached next hop.
    pub ifindex: u32,
    /// Source MAC of the cached next hop.
    pub smac: [u8; 6],
    /// Destination MAC of the cached next hop.
    pub dmac: [u8; 6],
    /// Monotonic seconds of the last packet (written at most once a second).
    pub atime: u32,
    /// Reply entries: the interface the backend's packets must arrive on (the forward next
    /// hop's, or the trunk of a tagged flow); a reply from another interface is dropped.
    /// Zero in forward entries.
    pub peer_ifindex: u32,
    /// Monotonic second the cached next hop was resolved (the FIB answer's time): a forward
    /// entry's next hop is resolved again on its first packet [`NEXTHOP_TTL_SECS`] later, so
    /// an established flow follows a changed route or MAC.
    pub nh_time: u32,
    /// The route's MTU from the FIB answer (a route's `mtu` attribute, else the egress
    /// device's); 0 when the next hop did not come from the FIB (a reply entry's, taken from
    /// the client's packet): the egress device's MTU is checked then.
    pub mtu: u32,
    /// The 802.1Q VLAN id the flow's packets leave with on `ifindex` (0: untagged). A forward
    /// entry's comes with its next hop (the FIB's VLAN device, through [`MAP_VLANS`]); a
    /// reply entry's is the tag the client's frames came in with.
    pub vlan: u16,
    /// Reply entries: the VLAN id the backend's packets must arrive with on `peer_ifindex`
    /// (the forward entry's `vlan`). Zero in forward entries.
    pub peer_vlan: u16,
}

/// Seconds a FIB answer is used: the per-backend cache of new flows, and a forward entry's
/// cached next hop.
pub const NEXTHOP_TTL_SECS: u32 = 5;

/// Per-CPU traffic counters of a service or a backend.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Counters {
    /// Packets forwarded (both directions).
    pub packets: u64,
    /// Bytes forwarded (both directions, L2 frame length).
    pub bytes: u64,
    /// Flows created.
    pub new_flows: u64,
    /// Packets answered with an RST (down backend, or no backend at all).
    pub resets: u64,
    /// Packets dropped (down backend with `drop`, no neighbour, SNAT ports exhausted).
    pub drops: u64,
    /// New TCP flows the backend answered with an RST instead of a SYN-ACK (connection
    /// refused; NAT services only: DSR replies do not pass the balancer). Passive health.
    pub refused: u64,
    /// SYNs a client sent again on a half-open flow (the backend has not answered the first
    /// yet). Passive health.
    pub syn_retries: u64,
}

/// Global settings read by the program.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Globals {
    /// [`ABI_VERSION`] of the controller that wrote the maps.
    pub abi_version: u32,
    /// Lowest SNAT port of any service (host order): a fast pre-filter for reply lookups.
    pub snat_port_lo: u16,
    /// Highest SNAT port of any service (host order).
    pub snat_port_hi: u16,
    /// Idle seconds after which a TCP flow's SNAT port may be taken by a new flow.
    pub tcp_idle_secs: u32,
    /// Idle seconds after which a UDP flow's SNAT port may be taken by a new flow.
    pub udp_idle_secs: u32,
    /// 1: every flow the program creates is reported in [`MAP_MIRROR`] (its forward entry).
    pub mirror: u32,
}

/// One record of the [`MAP_MIRROR`] ring buffer: a new flow's forward entry as inserted. The
/// reply entry of a NAT flow follows from it (key: backend → SNAT address and port; value:
/// back to the client from the VIP).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct MirrorEvent {
    /// The forward key (the client's 5-tuple as received).
    pub key: FlowKey,
    /// The forward entry.
    pub flow: Flow,
}

/// Per-CPU mirror counters.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct MirrorCounters {
    /// Events written to the ring buffer.
    pub events: u64,
    /// Events lost because the ring buffer was full.
    pub dropped: u64,
}

/// Value of [`MAP_IFMACS`]: an interface's own MAC.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct IfMac {
    /// The MAC.
    pub mac: [u8; 6],
    /// Always zero.
    pub pad: [u8; 2],
}

/// Value of [`MAP_VLANS`]: an 802.1Q VLAN device's parent, id and MAC.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct VlanDev {
    /// Ifindex of the parent (the trunk the program is attached to).
    pub parent: u32,
    /// VLAN id (1–4094).
    pub vid: u16,
    /// The VLAN device's MAC (its trunk's unless set otherwise).
    pub mac: [u8; 6],
}

/// Key of [`MAP_VLAN_PORTS`]: a VLAN on a trunk.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct VlanPort {
    /// The trunk's ifindex (the interface frames arrive on).
    pub parent: u32,
    /// VLAN id (1–4094).
    pub vid: u16,
    /// Always zero.
    pub pad: u16,
}

/// Value of [`MAP_VLAN_PORTS`]: the VLAN device a tagged frame arrives for.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct VlanIn {
    /// The VLAN device's ifindex.
    pub ifindex: u32,
    /// The VLAN device's MAC.
    pub mac: [u8; 6],
    /// Always zero.
    pub pad: [u8; 2],
}

/// Why a packet got its verdict; the index into the reasons map.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Not IPv4/IPv6 (ARP, LLDP, …): passed.
    PassNotIp = 0,
    /// Not for a VIP nor a reply to a NAT flow: passed.
    PassNotVip = 1,
    /// IPv4 fragment or IPv4 with options, or a bad IP version field: passed.
    PassUnsupportedIp = 2,
    /// Neither TCP nor UDP (IPv6 with an extension header counts here too): passed.
    PassNotTcpUdp = 3,
    /// A header was cut short: passed untouched (the kernel drops it).
    PassTruncated = 4,
    /// Forwarded out of the interface it came in on.
    Tx = 5,
    /// Forwarded out of another interface.
    Redirect = 6,
    /// The next hop has no resolved neighbour yet: dropped (the client retries).
    DropNoNeighbour = 7,
    /// The FIB has no route to the next hop: passed.
    PassNoRoute = 8,
    /// The service has no live backend: TCP reset, UDP dropped.
    NoBackend = 9,
    /// The flow's backend is down: reset.
    ResetBackendDown = 10,
    /// The flow's backend is down and the service drops.
    DropBackendDown = 11,
    /// No SNAT port was free.
    DropSnatExhausted = 12,
    /// The flow table refused an insert.
    DropFlowTable = 13,
    /// A NAT flow's SNAT port belongs to another flow now (its reply entry was lost and the
    /// port claimed): TCP reset, UDP dropped. Two clients never share a backend tuple.
    PortTaken = 14,
    /// A backend's reply arrived on another interface than the one its flow was sent out of:
    /// dropped.
    DropWrongInterface = 15,
    /// The service's new-flow rate limit was reached on this CPU: dropped, no state made.
    DropRateLimited = 16,
    /// ICMP that is not an error about a balanced flow (echo, other types, errors about no
    /// flow): passed.
    PassIcmp = 17,
    /// An ICMP error whose lengths or quoted headers do not hold up: passed untouched.
    PassIcmpMalformed = 18,
    /// An ICMP error about a NAT flow, translated and forwarded (either direction).
    IcmpNat = 19,
    /// An ICMP error about a DSR flow, forwarded to its backend.
    IcmpDsr = 20,
    /// A packet too big for its egress link, answered with "fragmentation needed" / "packet
    /// too big".
    TooBig = 21,
    /// A packet too big for its egress link, dropped: IPv4 without DF, or the answer was
    /// rate-limited.
    DropTooBig = 22,
    /// A unicast frame to another MAC than the ingress interface's (a switch flooded it):
    /// passed untouched, as the kernel would drop it (`PACKET_OTHERHOST`).
    PassNotForUs = 23,
    /// The frame could not be resized to push or pop the 802.1Q tag of its next hop after
    /// it was rewritten: dropped (never forwarded or passed half-rewritten).
    DropVlanResize = 24,
    /// A TCP or UDP packet to a port of the SNAT range that matches no reply entry: its NAT
    /// flow ended, was expired or was evicted from a full flow table. Passed (the kernel
    /// answers a TCP segment with a reset). Past a few, the flow table is too small for the
    /// traffic.
    PassNoReplyFlow = 25,
}

/// Number of [`Reason`] values.
pub const REASONS: u32 = 26;

impl Reason {
    /// Every reason, in index order.
    pub const ALL: [Reason; REASONS as usize] = [
        Reason::PassNotIp,
        Reason::PassNotVip,
        Reason::PassUnsupportedIp,
        Reason::PassNotTcpUdp,
        Reason::PassTruncated,
        Reason::Tx,
        Reason::Redirect,
        Reason::DropNoNeighbour,
        Reason::PassNoRoute,
        Reason::NoBackend,
        Reason::ResetBackendDown,
        Reason::DropBackendDown,
        Reason::DropSnatExhausted,
        Reason::DropFlowTable,
        Reason::PortTaken,
        Reason::DropWrongInterface,
        Reason::DropRateLimited,
        Reason::PassIcmp,
        Reason::PassIcmpMalformed,
        Reason::IcmpNat,
        Reason::IcmpDsr,
        Reason::TooBig,
        Reason::DropTooBig,
        Reason::PassNotForUs,
        Reason::DropVlanResize,
        Reason::PassNoReplyFlow,
    ];

    /// A stable snake_case name for metrics and the CLI.
    pub const fn name(self) -> &'static str {
        match self {
            Reason::PassNotIp => "pass_not_ip",
            Reason::PassNotVip => "pass_not_vip",
            Reason::PassUnsupportedIp => "pass_unsupported_ip",
            Reason::PassNotTcpUdp => "pass_not_tcp_udp",
            Reason::PassTruncated => "pass_truncated",
            Reason::Tx => "tx",
            Reason::Redirect => "redirect",
            Reason::DropNoNeighbour => "drop_no_neighbour",
            Reason::PassNoRoute => "pass_no_route",
            Reason::NoBackend => "no_backend",
            Reason::ResetBackendDown => "reset_backend_down",
            Reason::DropBackendDown => "drop_backend_down",
            Reason::DropSnatExhausted => "drop_snat_exhausted",
            Reason::DropFlowTable => "drop_flow_table",
            Reason::PortTaken => "port_taken",
            Reason::DropWrongInterface => "drop_wrong_interface",
            Reason::DropRateLimited => "drop_rate_limited",
            Reason::PassIcmp => "pass_icmp",
            Reason::PassIcmpMalformed => "pass_icmp_malformed",
            Reason::IcmpNat => "icmp_nat",
            Reason::IcmpDsr => "icmp_dsr",
            Reason::TooBig => "too_big",
            Reason::DropTooBig => "drop_too_big",
            Reason::PassNotForUs => "pass_not_for_us",
            Reason::DropVlanResize => "drop_vlan_resize",
            Reason::PassNoReplyFlow => "pass_no_reply_flow",
        }
    }
}

/// The 5-tuple hash that picks a ring slot. Pure, so the controller and tests can predict the
/// dataplane's choice. A murmur3-style mix over the addresses, ports and protocol.
#[inline(always)]
pub fn flow_hash(key: &FlowKey, seed: u32) -> u32 {
    #[inline(always)]
    fn mix(h: u32, k: u32) -> u32 {
        let k = k
            .wrapping_mul(0xcc9e_2d51)
            .rotate_left(15)
            .wrapping_mul(0x1b87_3593);
        (h ^ k)
            .rotate_left(13)
            .wrapping_mul(5)
            .wrapping_add(0xe654_6b64)
    }
    let w = |a: &Addr, i: usize| u32::from_ne_bytes([a[i], a[i + 1], a[i + 2], a[i + 3]]);
    let mut h = seed;
    h = mix(h, w(&key.src, 0));
    h = mix(h, w(&key.src, 4));
    h = mix(h, w(&key.src, 8));
    h = mix(h, w(&key.src, 12));
    h = mix(h, w(&key.dst, 0));
    h = mix(h, w(&key.dst, 4));
    h = mix(h, w(&key.dst, 8));
    h = mix(h, w(&key.dst, 12));
    h = mix(h, ((key.sport as u32) << 16) | key.dport as u32);
    h = mix(h, key.proto as u32);
    h ^= 37;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// Maps a hash onto `0..n` by multiply-shift (no division: nothing that can trap in BPF).
#[inline(always)]
pub const fn reduce(hash: u32, n: u32) -> u32 {
    ((hash as u64 * n as u64) >> 32) as u32
}

/// The first SNAT port a new NAT flow tries (the next ones follow it, wrapping in
/// `lo..=hi`): derived from the flow hash, so a flow that lost its forward entry finds its own
/// reply entry again.
#[inline(always)]
pub const fn snat_first_port(hash: u32, lo: u16, hi: u16) -> u16 {
    let range = hi as u32 - lo as u32 + 1;
    (lo as u32 + reduce(hash.rotate_left(16) ^ 0x9e37_79b9, range)) as u16
}

/// Seconds from stamp `then` to `now` on the wrapping seconds clock flows are stamped with;
/// 0 when `then` is later than `now`. A stamp can be later: another CPU touched the flow after
/// `now` was read (the controller reads its clock once per sweep, the XDP program once per
/// packet), and a plain `now - then` would make that flow look idle for 136 years.
#[inline(always)]
pub const fn idle_secs(now: u32, then: u32) -> u32 {
    let d = now.wrapping_sub(then);
    if d > u32::MAX / 2 { 0 } else { d }
}

/// Is `fwd` the NAT forward entry that owns the reply key `rkey` (it rewrites to exactly
/// that backend, SNAT address and port)? A reply entry whose forward entry is missing or
/// owns another port serves no flow: its port is free.
#[inline(always)]
pub fn owns_reply(fwd: &Flow, rkey: &FlowKey) -> bool {
    fwd.flags & FLOW_F_FORWARD != 0
        && fwd.flags & FLOW_F_DSR == 0
        && fwd.new_src == rkey.dst
        && fwd.new_sport == rkey.dport
        && fwd.new_dst == rkey.src
        && fwd.new_dport == rkey.sport
}

/// Seconds a reply entry without its flow (see [`owns_reply`]) is kept before its port is
/// freed, by the program's probe or the controller's sweep: a claim writes its reply entry
/// a moment before its forward entry, and a young reply entry is not worth the lookup of its
/// owner (a SYN flood's ports are all young).
pub const ORPHAN_GRACE_SECS: u32 = 2;

/// Index into the rings map of `slot` in ring half `half` of service `id`.
#[inline(always)]
pub const fn ring_index(id: u32, half: u32, slot: u32) -> u32 {
    (id * 2 + half) * RING_MAX + slot
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are repr(C), Copy, and laid out without implicit padding.
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for Service {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for Flow {}
    unsafe impl aya::Pod for Counters {}
    unsafe impl aya::Pod for Globals {}
    unsafe impl aya::Pod for MirrorEvent {}
    unsafe impl aya::Pod for MirrorCounters {}
    unsafe impl aya::Pod for IfMac {}
    unsafe impl aya::Pod for VlanDev {}
    unsafe impl aya::Pod for VlanPort {}
    unsafe impl aya::Pod for VlanIn {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn a_stamp_after_now_is_not_idle() {
        assert_eq!(idle_secs(100, 40), 60);
        assert_eq!(idle_secs(100, 100), 0);
        assert_eq!(idle_secs(100, 101), 0, "touched after now was read");
        assert_eq!(idle_secs(3, u32::MAX - 1), 5, "across the wrap");
        assert_eq!(idle_secs(u32::MAX - 1, 3), 0);
    }

    #[test]
    fn layouts_have_no_padding() {
        assert_eq!(size_of::<ServiceKey>(), 20);
        assert_eq!(size_of::<Service>(), 160);
        assert_eq!(size_of::<Backend>(), 32);
        assert_eq!(size_of::<FlowKey>(), 40);
        assert_eq!(size_of::<Flow>(), 88);
        assert_eq!(size_of::<Counters>(), 56);
        assert_eq!(size_of::<Globals>(), 20);
        assert_eq!(size_of::<MirrorEvent>(), 128);
        assert_eq!(size_of::<MirrorCounters>(), 16);
        assert_eq!(size_of::<IfMac>(), 8);
        assert_eq!(size_of::<VlanDev>(), 12);
        assert_eq!(size_of::<VlanPort>(), 8);
        assert_eq!(size_of::<VlanIn>(), 12);
    }

    #[test]
    fn hash_depends_on_every_field_and_seed() {
        let k = FlowKey {
            sport: 1000u16.to_be(),
            dport: 80u16.to_be(),
            proto: 6,
            ..Default::default()
        };
        let h = flow_hash(&k, 1);
        assert_ne!(h, flow_hash(&k, 2));
        let mut k2 = k;
        k2.src[15] = 1;
        assert_ne!(h, flow_hash(&k2, 1));
        let mut k3 = k;
        k3.sport = 1001u16.to_be();
        assert_ne!(h, flow_hash(&k3, 1));
        assert_eq!(h, flow_hash(&k, 1));
    }

    #[test]
    fn reduce_stays_in_range() {
        for n in [1u32, 2, 13, 65537] {
            for h in [0u32, 1, 0x8000_0000, u32::MAX] {
                assert!(reduce(h, n) < n);
            }
        }
        assert_eq!(reduce(u32::MAX, 65537), 65536);
    }

    #[test]
    fn ring_indices_do_not_overlap() {
        assert_eq!(ring_index(0, 1, 0), RING_MAX);
        assert_eq!(ring_index(1, 0, 0), 2 * RING_MAX);
        assert!(ring_index(MAX_SERVICES - 1, 1, RING_MAX - 1) < 2 * MAX_SERVICES * RING_MAX);
    }
}
