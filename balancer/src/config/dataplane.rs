//! `[dataplane]`: where and how the XDP program runs, SNAT, the flow table.

use std::path::PathBuf;

use serde::Deserialize;
use toml::Spanned;

use super::{DEFAULT_PIN_PATH, DEFAULT_SNAT_PORTS};

/// `[dataplane]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataplaneSection {
    /// One interface to attach to.
    pub interface: Option<Spanned<String>>,
    /// Several interfaces (two-arm set-ups); alternative to `interface`.
    #[serde(default)]
    pub interfaces: Vec<Spanned<String>>,
    /// `auto` (driver, falling back to skb), `driver`, `skb`.
    #[serde(default)]
    pub xdp_mode: XdpMode,
    /// SNAT source for IPv4 backends, one address or a pool; default: the interface's own
    /// IPv4 address.
    pub snat_ipv4: Option<Spanned<SnatAddrs>>,
    /// SNAT source for IPv6 backends, one address or a pool; default: the interface's own
    /// global IPv6 address.
    pub snat_ipv6: Option<Spanned<SnatAddrs>>,
    /// First and last SNAT port, e.g. `[10000, 32767]`.
    #[serde(default = "default_snat_ports")]
    pub snat_ports: Spanned<[u16; 2]>,
    /// Flow-table entries (a NAT flow takes two).
    #[serde(default = "default_flow_table")]
    pub flow_table_size: u32,
    /// Pin directory.
    #[serde(default = "default_pin_path")]
    pub pin_path: PathBuf,
    /// Idle time after which a TCP flow's SNAT port may go to a new flow (e.g. "1h").
    #[serde(default = "default_tcp_idle", with = "humantime_serde")]
    pub tcp_idle_timeout: std::time::Duration,
    /// Idle time after which a UDP flow's SNAT port may go to a new flow (e.g. "5m").
    #[serde(default = "default_udp_idle", with = "humantime_serde")]
    pub udp_idle_timeout: std::time::Duration,
}

fn default_tcp_idle() -> std::time::Duration {
    std::time::Duration::from_secs(balancer_common::DEFAULT_TCP_IDLE_SECS as u64)
}
fn default_udp_idle() -> std::time::Duration {
    std::time::Duration::from_secs(balancer_common::DEFAULT_UDP_IDLE_SECS as u64)
}

fn default_snat_ports() -> Spanned<[u16; 2]> {
    Spanned::new(0..0, DEFAULT_SNAT_PORTS)
}
fn default_flow_table() -> u32 {
    balancer_common::DEFAULT_FLOW_ENTRIES
}
fn default_pin_path() -> PathBuf {
    PathBuf::from(DEFAULT_PIN_PATH)
}

/// XDP attach mode.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum XdpMode {
    /// Driver mode, falling back to skb (generic) mode with a log line.
    #[default]
    Auto,
    /// Native (driver) mode only.
    Driver,
    /// Generic (skb) mode only.
    Skb,
}

/// The SNAT source-port range, `[first, last]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnatPorts {
    /// First port.
    pub first: u16,
    /// Last port.
    pub last: u16,
}

/// A config this host cannot run (checked by `check`, `run` and `reload` alike).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostCheckError {
    /// SNAT ports inside the kernel's ephemeral range (the health checks' source ports).
    #[error(
        "snat_ports {first}-{last} overlap this host's ephemeral ports {eph_first}-{eph_last} (net.ipv4.ip_local_port_range): choose a disjoint range"
    )]
    SnatPortsOverlap {
        /// First SNAT port.
        first: u16,
        /// Last SNAT port.
        last: u16,
        /// First ephemeral port.
        eph_first: u16,
        /// Last ephemeral port.
        eph_last: u16,
    },
    /// The ephemeral range could not be read.
    #[error("reading net.ipv4.ip_local_port_range: {0}")]
    Unreadable(String),
}

impl SnatPorts {
    /// Refuses a range that overlaps the kernel's ephemeral ports `eph` (first, last).
    pub fn check_against(&self, eph: (u16, u16)) -> Result<(), HostCheckError> {
        let (eph_first, eph_last) = eph;
        if self.first <= eph_last && eph_first <= self.last {
            return Err(HostCheckError::SnatPortsOverlap {
                first: self.first,
                last: self.last,
                eph_first,
                eph_last,
            });
        }
        Ok(())
    }
}

/// `snat_ipv4` / `snat_ipv6`: one address (`"192.0.2.200"`) or a pool
/// (`["192.0.2.200", "192.0.2.201"]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum SnatAddrs {
    /// One address.
    One(String),
    /// A pool.
    Pool(Vec<String>),
}

impl SnatAddrs {
    /// The addresses as written.
    pub fn texts(&self) -> Vec<&str> {
        match self {
            SnatAddrs::One(a) => vec![a.as_str()],
            SnatAddrs::Pool(v) => v.iter().map(String::as_str).collect(),
        }
    }
}
