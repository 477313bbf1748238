//! `[ha]`: this balancer is one of an active/standby pair. keepalived (VRRP) owns the
//! virtual addresses (the VIPs and the SNAT addresses) and tells the controller its role; the
//! active balancer mirrors its flows and its failover choices to the standby over an
//! authenticated UDP channel (`balancer-sync`). Both balancers run the same file but for this
//! section (`node`, `bind`, `peer`, `priority`).

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use serde::Deserialize;
use toml::Spanned;

use super::{Diags, Forwarding, ServiceSpec};

/// The `[ha]` table as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HaSection {
    /// This balancer's name in logs, status and the peer's status (default: the host name).
    pub node: Option<String>,
    /// This balancer's own (not virtual) address for the sync channel: `"10.0.0.1:7946"`.
    pub bind: Spanned<String>,
    /// The peer's sync address: `"10.0.0.2:7946"`.
    pub peer: Spanned<String>,
    /// The pre-shared key: at least 32 bytes as hex (`openssl rand -hex 32`), mode 0600.
    pub key_file: Spanned<PathBuf>,
    /// How often the active balancer sends every flow again (repairs lost messages and keeps
    /// the standby's copies from expiring).
    #[serde(default = "default_resync", with = "humantime_serde")]
    pub resync_interval: Duration,
    /// For `balancer ha keepalived-conf`: the VRRP interface (default: the first dataplane
    /// interface).
    pub vrrp_interface: Option<String>,
    /// VRRP virtual router id (1–255), the same on both balancers.
    #[serde(default = "default_vrid")]
    pub virtual_router_id: u8,
    /// VRRP priority of this balancer (1–254). With `nopreempt` (the default) the first to
    /// start is master and a returning balancer does not take the addresses back, provided
    /// the two priorities differ (equal ones are broken by the higher address, which then
    /// always wins).
    #[serde(default = "default_priority")]
    pub priority: u8,
    /// VRRPv3 advertisement interval (10 ms steps, at least 10 ms): the master is declared
    /// dead after about three of them.
    #[serde(default = "default_advert", with = "humantime_serde")]
    pub advert_interval: Duration,
    /// A returning balancer with a higher priority takes the addresses back (VRRP preempt).
    #[serde(default)]
    pub preempt: bool,
}

fn default_resync() -> Duration {
    // Below the 30 s a half-open copy is kept: a copy mirrored at its SYN gets its
    // established flags from the next pass long before the standby would expire it.
    Duration::from_secs(10)
}
fn default_vrid() -> u8 {
    77
}
fn default_priority() -> u8 {
    100
}
fn default_advert() -> Duration {
    Duration::from_millis(200)
}

/// The validated section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ha {
    /// This balancer's name.
    pub node: String,
    /// Sync channel, local side.
    pub bind: SocketAddr,
    /// Sync channel, the peer.
    pub peer: SocketAddr,
    /// Key file.
    pub key_file: PathBuf,
    /// Full resync period.
    pub resync_interval: Duration,
    /// VRRP interface (for the generated keepalived config).
    pub vrrp_interface: String,
    /// VRRP virtual router id.
    pub virtual_router_id: u8,
    /// VRRP priority.
    pub priority: u8,
    /// VRRP advertisement interval.
    pub advert_interval: Duration,
    /// VRRP preempt.
    pub preempt: bool,
}

/// The host name, for `node`'s default.
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "balancer".into())
}

/// Checks the section against the rest of the file.
pub(super) fn validate(
    s: &Spanned<HaSection>,
    interfaces: &[String],
    snat: (bool, bool),
    services: &[ServiceSpec],
    d: &mut Diags,
) -> Option<Ha> {
    let before = d.out.len();
    let h = s.get_ref();
    let bind = super::parse_sock(d, &h.bind, "ha bind");
    let peer = super::parse_sock(d, &h.peer, "ha peer");
    if let (Some(b), Some(p)) = (bind, peer) {
        if b.ip() == p.ip() {
            d.at(
                h.peer.span(),
                "ha peer: the peer's address must not be this balancer's own",
            );
        }
        if b.is_ipv4() != p.is_ipv4() {
            d.at(
                h.peer.span(),
                "ha peer and bind must be of the same address family",
            );
        }
        if b.ip().is_unspecified() {
            d.at(
                h.bind.span(),
                "ha bind: give this balancer's own address (the channel is bound to it)",
            );
        }
        if services
            .iter()
            .any(|s| s.vip.ip() == b.ip() || s.vip.ip() == p.ip())
        {
            d.at(
                h.bind.span(),
                "ha bind and peer must be the balancers' own addresses, not a VIP (VIPs move with keepalived)",
            );
        }
    }
    if !h.key_file.get_ref().is_absolute() {
        d.at(h.key_file.span(), "ha key_file must be an absolute path");
    }
    if h.resync_interval < Duration::from_secs(1) || h.resync_interval > Duration::from_secs(3600) {
        d.at(s.span(), "ha resync_interval must be between 1 s and 1 h");
    }
    if h.virtual_router_id == 0 {
        d.at(s.span(), "ha virtual_router_id must be 1..=255");
    }
    if h.priority == 0 || h.priority == 255 {
        d.at(s.span(), "ha priority must be 1..=254");
    }
    let cs = h.advert_interval.as_millis();
    if !(10..=40_950).contains(&cs) || !cs.is_multiple_of(10) {
        d.at(
            s.span(),
            "ha advert_interval must be a multiple of 10 ms between 10 ms and 40.95 s (VRRPv3)",
        );
    }
    // The backends' replies go to the SNAT address: it must move with the VIPs, so it cannot
    // be an interface's own address picked at start.
    for svc in services.iter().filter(|s| s.forwarding == Forwarding::Nat) {
        let (have, family) = if svc.vip.is_ipv4() {
            (snat.0, 4)
        } else {
            (snat.1, 6)
        };
        if !have {
            d.at(
                s.span(),
                format!(
                    "ha: NAT service '{}' needs snat_ipv{family} in [dataplane]: in a pair the SNAT address is a virtual address keepalived moves with the VIPs",
                    svc.name
                ),
            );
        }
    }
    let node = h.node.clone().unwrap_or_else(hostname);
    if node.is_empty() || node.len() > 64 || !node.chars().all(|c| c.is_ascii_graphic()) {
        d.at(s.span(), "ha node: 1 to 64 printable characters, no spaces");
    }
    let vrrp_interface = h
        .vrrp_interface
        .clone()
        .or_else(|| interfaces.first().cloned())
        .unwrap_or_default();
    if d.out.len() != before {
        return None;
    }
    Some(Ha {
        node,
        bind: bind?,
        peer: peer?,
        key_file: h.key_file.get_ref().clone(),
        resync_interval: h.resync_interval,
        vrrp_interface,
        virtual_router_id: h.virtual_router_id,
        priority: h.priority,
        advert_interval: h.advert_interval,
        preempt: h.preempt,
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    const BASE: &str = "[dataplane]\ninterface = \"eth0\"\nsnat_ipv4 = \"10.77.0.200\"\n\n[[service]]\nname = \"web\"\nvip = \"10.77.0.100:80\"\nbackends = [ { address = \"10.77.0.11:80\" } ]\n";
    const HA: &str = "\n[ha]\nnode = \"lb1\"\nbind = \"10.77.0.1:7946\"\npeer = \"10.77.0.3:7946\"\nkey_file = \"/etc/balancer/ha.key\"\n";

    #[test]
    fn a_good_section_is_typed_with_defaults() {
        let v = super::super::parse(&format!("{BASE}{HA}"), Path::new("b.toml")).expect("valid");
        let ha = v.ha.expect("ha");
        assert_eq!(ha.node, "lb1");
        assert_eq!(ha.peer, "10.77.0.3:7946".parse().expect("addr"));
        assert_eq!(ha.vrrp_interface, "eth0");
        assert_eq!(ha.advert_interval.as_millis(), 200);
        assert!(!ha.preempt);
        assert!(
            super::super::parse(BASE, Path::new("b.toml"))
                .expect("valid")
                .ha
                .is_none()
        );
    }

    #[test]
    fn bad_sections_are_refused_with_their_line() {
        let cases = [
            (
                HA.replace("10.77.0.3", "10.77.0.1"),
                "must not be this balancer's own",
            ),
            (
                HA.replace("\"10.77.0.3:7946\"", "\"10.77.0.100:7946\""),
                "not a VIP",
            ),
            (
                HA.replace("/etc/balancer/ha.key", "ha.key"),
                "absolute path",
            ),
            (
                format!("{HA}advert_interval = \"15ms\"\n"),
                "multiple of 10 ms",
            ),
            (format!("{HA}priority = 255\n"), "1..=254"),
            (format!("{HA}nonsense = 1\n"), "unknown field"),
        ];
        for (ha, want) in cases {
            let e = super::super::parse(&format!("{BASE}{ha}"), Path::new("b.toml"))
                .expect_err(want)
                .to_string();
            assert!(e.contains(want), "{want}: {e}");
            assert!(e.starts_with("b.toml:"), "{e}");
        }
    }

    #[test]
    fn a_nat_service_in_a_pair_needs_a_configured_snat_address() {
        let base = BASE.replace("snat_ipv4 = \"10.77.0.200\"\n", "");
        let e = super::super::parse(&format!("{base}{HA}"), Path::new("b.toml"))
            .expect_err("no snat")
            .to_string();
        assert!(e.contains("needs snat_ipv4"), "{e}");
        let dsr = base.replace("[[service]]\n", "[[service]]\nforwarding = \"dsr\"\n");
        assert!(super::super::parse(&format!("{dsr}{HA}"), Path::new("b.toml")).is_ok());
    }
}
