//! Network-namespace labs and traffic tools for the balancer's integration tests, the demo
//! and the benches.
//!
//! # Topology
//!
//! ```text
//!                      <p>-sw  (bridge br0)
//!      ┌──────────────┬───────┴──────┬──────────────┬─────
//!      lb             c              b1             b2 …        switch-side veth ports
//!      │              │              │              │
//!    eth0           eth0           eth0           eth0          host side, one namespace each
//!   <p>-lb         <p>-c          <p>-b1         <p>-b2 …
//!   10.77.0.1      10.77.0.2      10.77.0.11     10.77.0.12 …
//!   fd77::1        fd77::2        fd77::11       fd77::12 …
//!   balancer       client         backend be1    backend be2 …
//!   (XDP on eth0; adds the VIPs 10.77.0.100 and fd77::100 itself)
//! ```
//!
//! - Everything is one /24 (and one /64) on one bridge: client, balancer and backends share
//!   an L2 segment, as in the reference deployment.
//! - `<p>` is `blb<pid>x<n>`, unique per lab, so labs run in parallel. The veths are
//!   created inside `<p>-sw` with the peer moved straight into the host namespace, so no
//!   interface name ever collides in the root namespace.
//! - The switch port `lb` runs a pass-through XDP program (`balancer xdp-pass`, pinned as
//!   `<pin_path>/link-pass-lb`): frames the XDP program sends back out of the balancer's
//!   `eth0` (XDP_TX/XDP_REDIRECT) are only delivered when that veth peer runs NAPI, and GRO
//!   alone was seen to stall after a few dozen flows. So a lab needs the balancer binary.
//! - TX checksum offload is off on every `eth0` (see [`LabConfig::tx_checksum_offload`]).
//! - IPv6 addresses are added with `nodad` (usable at once); the lb namespace forwards IPv4
//!   and IPv6, with rp_filter and ICMP redirects off.
//! - Commands run through `nsenter --net=/run/netns/<ns>`, which keeps the host's mount
//!   namespace: a restarted balancer sees the pins it left in `/sys/fs/bpf/<p>`.
//! - Dropping the [`Lab`] (also while unwinding from a panic) kills every process in its
//!   namespaces, runs `balancer teardown`, removes `/sys/fs/bpf/<p>` and deletes the namespaces.
//!   [`Lab::cleanup_stale`] removes what a killed earlier run left behind.
//!
//! [`ecmp`] builds a second, routed topology: a client behind a router running BIRD with
//! multipath, and several balancers each announcing the VIPs through its own BIRD.
//!
//! # Example
//!
//! ```no_run
//! use balancer_tests::{Lab, vip4, ECHO_PORT};
//! # fn main() -> anyhow::Result<()> {
//! let lab = Lab::new(3)?;
//! let _echo = lab.spawn_echo_all()?;
//! let _lb = lab.start_balancer(&balancer_tests::sample_config(&lab, "nat"))?;
//! let report = lab.client_conns(vip4(ECHO_PORT), 300, 512, 16)?;
//! assert_eq!(report.failed, 0);
//! assert!(report.evenly_spread(3, 0.3));
//! # Ok(())
//! # }
//! ```

mod bins;
pub mod ecmp;
mod lab;
pub mod pair;
mod process;
pub mod report;
pub mod wire;

pub use bins::{balancer_bin, tool_bin};
pub use lab::{
    BalancerProc, ECHO_PORT, HTTP_PORT, Host, Lab, LabConfig, PREFIX_BASE, VIP_V4, VIP_V6,
    stream_report, vip4, vip6,
};
pub use process::{Finished, LabChild};
pub use report::{ConnsReport, RateReport, StreamReport, UdpReport};

/// The sample config of the dataplane issue for `lab`'s backends: one TCP service `web` on
/// 10.77.0.100:7002 with `forwarding` (`nat` or `dsr`), Maglev over every backend's port 7002.
pub fn sample_config(lab: &Lab, forwarding: &str) -> String {
    let backends: Vec<String> = lab
        .backend_hosts()
        .into_iter()
        .filter_map(|h| h.v4())
        .map(|a| format!("{{ address = \"{a}:{ECHO_PORT}\" }}"))
        .collect();
    format!(
        r#"[dataplane]
interface = "eth0"
xdp_mode = "auto"

[[service]]
name = "web"
vip = "{VIP_V4}:{ECHO_PORT}"
protocol = "tcp"
forwarding = "{forwarding}"
scheduler = "maglev"
backends = [ {} ]
{}"#,
        backends.join(", "),
        lab.controller_section()
    )
}
