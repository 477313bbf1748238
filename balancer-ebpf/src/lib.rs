//! Pure pieces of the XDP program that also compile on the host, so `cargo test` covers them
//! without a kernel. The program itself is `src/main.rs` (built for the BPF target only).
#![cfg_attr(target_arch = "bpf", no_std)]

pub mod checksum;
pub mod headers;
