//! Every map of the program, in one place. Names and layouts come from `balancer-common`.

use aya_ebpf::{
    bindings::BPF_F_MMAPABLE,
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
};
use balancer_common::{
    Backend, Counters, DEFAULT_FLOW_ENTRIES, Flow, FlowKey, Globals, IFMAC_SLOTS, IfMac,
    MAX_BACKENDS, MAX_IFMACS, MAX_SERVICES, MAX_VLANS, MIRROR_RING_BYTES, MirrorCounters,
    PORT_WORDS, REASONS, RING_VALUES, Service, ServiceKey, VlanDev, VlanIn, VlanPort,
};
use balancer_ebpf::ptb::TokenBucket;

#[map(name = "BLB_SERVICES")]
pub static SERVICES: HashMap<ServiceKey, Service> = HashMap::with_max_entries(MAX_SERVICES, 0);

#[map(name = "BLB_BACKENDS")]
pub static BACKENDS: Array<Backend> = Array::with_max_entries(MAX_BACKENDS, 0);

/// Mappable, so the controller writes a whole ring half with one memcpy and then flips
/// `Service::ring_half` with one map update.
#[map(name = "BLB_RINGS")]
pub static RINGS: Array<[u32; 2]> = Array::with_max_entries(RING_VALUES, BPF_F_MMAPABLE);

/// Shared (not per-CPU): a reply may arrive on another CPU than its request.
#[map(name = "BLB_FLOWS")]
pub static FLOWS: LruHashMap<FlowKey, Flow> = LruHashMap::with_max_entries(DEFAULT_FLOW_ENTRIES, 0);

#[map(name = "BLB_SVC_STATS")]
pub static SERVICE_STATS: PerCpuArray<Counters> = PerCpuArray::with_max_entries(MAX_SERVICES, 0);

#[map(name = "BLB_BE_STATS")]
pub static BACKEND_STATS: PerCpuArray<Counters> = PerCpuArray::with_max_entries(MAX_BACKENDS, 0);

#[map(name = "BLB_REASONS")]
pub static REASON_COUNTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(REASONS, 0);

/// Per-CPU next-hop cache per backend slot: a new flow to a backend reuses the FIB answer of
/// the last few seconds instead of asking again. Not part of the ABI.
#[map(name = "BLB_NEXTHOPS")]
pub static NEXTHOPS: PerCpuArray<NextHop> = PerCpuArray::with_max_entries(MAX_BACKENDS, 0);

/// A cached FIB answer for one backend.
#[repr(C)]
pub struct NextHop {
    pub generation: u32,
    /// The interface the flow came in on, and its VLAN id below: the FIB answer depends on
    /// them.
    pub ingress: u32,
    pub time: u32,
    pub ifindex: u32,
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
    /// The route's MTU (0: unknown).
    pub mtu: u32,
    /// The VLAN id on `ifindex` (0: untagged).
    pub vlan: u16,
    /// The VLAN id the flow came in with (0: untagged).
    pub in_vid: u16,
}

/// Per-CPU second at which each backend slot's SNAT ports were last found all held (0:
/// never): new flows to it probe fewer ports for a moment. Not part of the ABI.
#[map(name = "BLB_EXHAUSTED")]
pub static EXHAUSTED: PerCpuArray<Exhausted> = PerCpuArray::with_max_entries(MAX_BACKENDS, 0);

/// One backend slot's short-probe memo on one CPU.
#[repr(C)]
pub struct Exhausted {
    /// Second at which all 16 probed ports were found held by established flows (0: never).
    pub at: u32,
    /// Scratch of the claim in progress: 1 once a probed port was held by a half-open or
    /// closing flow (or lost to another CPU). Kept in map memory, not in a variable, so the
    /// verifier does not track it through the probe loop.
    pub unsettled: u32,
}

/// Room for the entries of a new flow (the BPF stack is 512 bytes). Not part of the ABI.
#[map(name = "BLB_SCRATCH")]
pub static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

/// The entries a new flow writes.
#[repr(C)]
pub struct Scratch {
    pub flow: Flow,
    pub reply: Flow,
    pub rkey: FlowKey,
    pub okey: FlowKey,
}

/// Per-CPU new-flow window per service (Katran's connection-rate limiter). Not part of the
/// ABI.
#[map(name = "BLB_RATES")]
pub static RATES: PerCpuArray<Rate> = PerCpuArray::with_max_entries(MAX_SERVICES, 0);

/// New flows made in the current one-second window of one service on one CPU.
#[repr(C)]
pub struct Rate {
    pub start_ns: u64,
    pub count: u32,
    pub pad: u32,
}

#[map(name = "BLB_GLOBALS")]
pub static GLOBALS: Array<Globals> = Array::with_max_entries(1, 0);

/// Per-CPU token bucket of the too-big answers. Not part of the ABI.
#[map(name = "BLB_PTB_BUCKETS")]
pub static PTB_BUCKETS: PerCpuArray<TokenBucket> = PerCpuArray::with_max_entries(1, 0);

/// New flows for the standby balancer ([`balancer_common::MirrorEvent`]), while
/// `Globals::mirror` is 1.
#[map(name = "BLB_MIRROR")]
pub static MIRROR: RingBuf = RingBuf::with_byte_size(MIRROR_RING_BYTES, 0);

/// Per-CPU counts of mirror events written and lost (ring buffer full).
#[map(name = "BLB_MIRROR_STATS")]
pub static MIRROR_STATS: PerCpuArray<MirrorCounters> = PerCpuArray::with_max_entries(1, 0);

/// The MAC of each interface the controller attached the program to (ingress ifindex →
/// [`IfMac`]; all-zero: none recorded): a unicast frame to another MAC is not ours.
#[map(name = "BLB_IFMACS")]
pub static IFMACS: Array<IfMac> = Array::with_max_entries(IFMAC_SLOTS, 0);

/// The same for an ifindex of [`IFMAC_SLOTS`] or more.
#[map(name = "BLB_IFMACS_HIGH")]
pub static IFMACS_HIGH: HashMap<u32, IfMac> = HashMap::with_max_entries(MAX_IFMACS, 0);

/// Every 802.1Q VLAN device (ifindex → [`VlanDev`]: its trunk, VLAN id and MAC), written by the
/// controller: a FIB answer on a VLAN device becomes the trunk and a tag.
#[map(name = "BLB_VLANS")]
pub static VLANS: HashMap<u32, VlanDev> = HashMap::with_max_entries(MAX_VLANS, 0);

/// The same VLAN devices the other way round ((trunk, VLAN id) → [`VlanIn`]: the device and
/// its MAC): a tagged frame is for its VLAN device's MAC and arrives, for the FIB, on it.
#[map(name = "BLB_VLAN_PORTS")]
pub static VLAN_PORTS: HashMap<VlanPort, VlanIn> = HashMap::with_max_entries(MAX_VLANS, 0);

/// The destination ports the program looks at, one bit per port (word `port / 64`, bit
/// `port % 64`): every service's port and the SNAT range. A TCP/UDP frame to another port is
/// passed before it is parsed.
#[map(name = "BLB_PORTS")]
pub static PORTS: Array<u64> = Array::with_max_entries(PORT_WORDS, 0);
