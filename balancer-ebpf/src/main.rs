//! The XDP program: parse, look up the VIP, pick a backend (flow table, then Maglev ring),
//! rewrite (full NAT or DSR), pick the next hop with the FIB, transmit. Anything it does not
//! balance goes to the kernel untouched. The map ABI lives in `balancer-common`.
//!
//! Modules by concern: `entry` (the XDP entry, the only place an outcome becomes an action
//! and a reason counter), `flow` (the flow state machine), `snat` (port claims), `fib` (next
//! hop), `mirror` (new flows reported to the standby), `tx` (rewrite and send), `related` (ICMP errors about a flow), `toobig` (packets
//! too big for the egress link), `stats`, `maps`, `xdp` (the XDP buffer as a frame). Parse,
//! NAT rewrite, RST builder and the `Error` enum live in the library (`src/lib.rs`), written
//! over byte slices so they are tested on the host.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]

#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[cfg(target_arch = "bpf")]
mod entry;
#[cfg(target_arch = "bpf")]
mod fib;
#[cfg(target_arch = "bpf")]
mod flow;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod mirror;
#[cfg(target_arch = "bpf")]
mod related;
#[cfg(target_arch = "bpf")]
mod snat;
#[cfg(target_arch = "bpf")]
mod stats;
#[cfg(target_arch = "bpf")]
mod toobig;
#[cfg(target_arch = "bpf")]
mod tx;
#[cfg(target_arch = "bpf")]
mod xdp;

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
