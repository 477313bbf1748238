//! The pieces of the XDP program that touch only the frame, written over [`frame::Frame`] so
//! they also run on the host over a byte slice and `cargo test` covers them (against
//! `etherparse`). The program itself (maps, flow state, next hop) is `src/main.rs` and its
//! modules, built for the BPF target only.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod checksum;
pub mod error;
pub mod frame;
pub mod headers;
pub mod icmp;
pub mod nat;
pub mod parse;
pub mod ptb;
pub mod rst;
#[cfg(test)]
mod tests;
pub mod vlan;
