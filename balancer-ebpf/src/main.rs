//! The XDP program: parse, look up the VIP, pick a backend (flow table, then Maglev ring),
//! rewrite (full NAT or DSR), pick the next hop with the FIB, transmit. Anything it does not
//! balance goes to the kernel untouched. The map ABI lives in `balancer-common`.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]

#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod program;

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
