//! `[bgp]`: announce the VIPs through BIRD for ECMP scale-out (route health injection).
//!
//! The balancer does not speak BGP. It writes one BIRD file, `routes_file`, holding two
//! static protocols (`<protocol>4` and `<protocol>6`) with one route per VIP it announces,
//! and asks the local BIRD to re-read its config (`birdc -s socket configure`, a soft
//! reconfiguration: BGP sessions stay up). BIRD's own config includes that file and exports
//! those two protocols to the upstream routers; `balancer bgp bird-conf` prints that part.
//! Absent: nothing is announced and BIRD is never called.

use std::path::PathBuf;

use serde::Deserialize;
use toml::Spanned;

use super::Diags;

/// `[bgp]` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BgpSection {
    /// The `birdc` binary.
    #[serde(default = "default_birdc")]
    pub birdc: Spanned<PathBuf>,
    /// BIRD's control socket (`birdc -s`).
    #[serde(default = "default_socket")]
    pub socket: Spanned<PathBuf>,
    /// The file the balancer writes and BIRD includes.
    #[serde(default = "default_routes_file")]
    pub routes_file: Spanned<PathBuf>,
    /// Base name of the static protocols in `routes_file` (`<protocol>4`, `<protocol>6`).
    #[serde(default = "default_protocol")]
    pub protocol: Spanned<String>,
    /// Withdraw a VIP when none of its services has a backend that takes new flows.
    #[serde(default = "default_true")]
    pub withdraw_when_no_backend: bool,
}

/// Default `birdc`.
pub const DEFAULT_BIRDC: &str = "/usr/sbin/birdc";
/// Default BIRD control socket (Debian's `bird2`).
pub const DEFAULT_BIRD_SOCKET: &str = "/run/bird/bird.ctl";
/// Default routes file.
pub const DEFAULT_ROUTES_FILE: &str = "/etc/bird/balancer-vips.conf";
/// Default base name of the static protocols.
pub const DEFAULT_PROTOCOL: &str = "balancer_vips";

fn default_birdc() -> Spanned<PathBuf> {
    Spanned::new(0..0, PathBuf::from(DEFAULT_BIRDC))
}
fn default_socket() -> Spanned<PathBuf> {
    Spanned::new(0..0, PathBuf::from(DEFAULT_BIRD_SOCKET))
}
fn default_routes_file() -> Spanned<PathBuf> {
    Spanned::new(0..0, PathBuf::from(DEFAULT_ROUTES_FILE))
}
fn default_protocol() -> Spanned<String> {
    Spanned::new(0..0, DEFAULT_PROTOCOL.to_string())
}
fn default_true() -> bool {
    true
}

/// `[bgp]`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BgpConfig {
    /// The `birdc` binary.
    pub birdc: PathBuf,
    /// BIRD's control socket.
    pub socket: PathBuf,
    /// The file the balancer writes and BIRD includes.
    pub routes_file: PathBuf,
    /// Base name of the static protocols.
    pub protocol: String,
    /// Withdraw a VIP whose services have no backend taking new flows.
    pub withdraw_when_no_backend: bool,
}

impl BgpConfig {
    /// The static protocol holding the IPv4 routes.
    pub fn protocol_v4(&self) -> String {
        format!("{}4", self.protocol)
    }

    /// The static protocol holding the IPv6 routes.
    pub fn protocol_v6(&self) -> String {
        format!("{}6", self.protocol)
    }
}

impl Default for BgpConfig {
    fn default() -> Self {
        BgpConfig {
            birdc: PathBuf::from(DEFAULT_BIRDC),
            socket: PathBuf::from(DEFAULT_BIRD_SOCKET),
            routes_file: PathBuf::from(DEFAULT_ROUTES_FILE),
            protocol: DEFAULT_PROTOCOL.to_string(),
            withdraw_when_no_backend: true,
        }
    }
}

/// A BIRD symbol: a letter, then letters, digits and `_` (the `4`/`6` suffix included, at
/// most 64 characters).
fn is_bird_symbol(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && s.len() < 64
}

/// Checks the section; every problem points at its value (or at the section for a default).
pub(super) fn validate(b: &Spanned<BgpSection>, d: &mut Diags) -> Option<BgpConfig> {
    let before = d.out.len();
    let s = b.get_ref();
    let at = |v: &std::ops::Range<usize>| {
        if v.is_empty() && v.start == 0 {
            b.span()
        } else {
            v.clone()
        }
    };
    for (what, p) in [
        ("birdc", &s.birdc),
        ("socket", &s.socket),
        ("routes_file", &s.routes_file),
    ] {
        if !p.get_ref().is_absolute() {
            d.at(
                at(&p.span()),
                format!(
                    "bgp: {what} must be an absolute path ('{}')",
                    p.get_ref().display()
                ),
            );
        }
    }
    let rf = s.routes_file.get_ref();
    if rf.file_name().is_none() || rf.to_string_lossy().ends_with('/') {
        d.at(
            at(&s.routes_file.span()),
            "bgp: routes_file must name a file",
        );
    }
    if !is_bird_symbol(s.protocol.get_ref()) {
        d.at(
            at(&s.protocol.span()),
            format!(
                "bgp: protocol '{}' is not a BIRD protocol name (a letter, then letters, digits and '_', under 63 characters)",
                s.protocol.get_ref()
            ),
        );
    }
    (d.out.len() == before).then(|| BgpConfig {
        birdc: s.birdc.get_ref().clone(),
        socket: s.socket.get_ref().clone(),
        routes_file: rf.clone(),
        protocol: s.protocol.get_ref().clone(),
        withdraw_when_no_backend: s.withdraw_when_no_backend,
    })
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    const BASE: &str = "[dataplane]\ninterface = \"eth0\"\n\n[[service]]\nname = \"web\"\nvip = \"10.77.0.100:80\"\nforwarding = \"dsr\"\nbackends = [ { address = \"10.77.0.11:80\" } ]\n";

    fn p(t: &str) -> Result<super::super::Validated, super::super::ConfigError> {
        super::super::parse(t, Path::new("b.toml"))
    }

    #[test]
    fn absent_is_off_and_empty_is_the_defaults() {
        assert!(p(BASE).expect("valid").bgp.is_none());
        let v = p(&format!("{BASE}\n[bgp]\n")).expect("valid");
        assert_eq!(v.bgp, Some(super::BgpConfig::default()));
        let b = v.bgp.expect("bgp");
        assert_eq!(b.protocol_v4(), "balancer_vips4");
        assert_eq!(b.protocol_v6(), "balancer_vips6");
        assert!(b.withdraw_when_no_backend);
    }

    #[test]
    fn every_key_is_typed() {
        let text = format!(
            "{BASE}\n[bgp]\nbirdc = \"/opt/bird/sbin/birdc\"\nsocket = \"/run/bird/lb.ctl\"\nroutes_file = \"/etc/bird/vips.conf\"\nprotocol = \"lb_vips\"\nwithdraw_when_no_backend = false\n"
        );
        let b = p(&text).expect("valid").bgp.expect("bgp");
        assert_eq!(b.birdc, PathBuf::from("/opt/bird/sbin/birdc"));
        assert_eq!(b.socket, PathBuf::from("/run/bird/lb.ctl"));
        assert_eq!(b.routes_file, PathBuf::from("/etc/bird/vips.conf"));
        assert_eq!(b.protocol_v6(), "lb_vips6");
        assert!(!b.withdraw_when_no_backend);
    }

    #[test]
    fn errors_carry_file_line_and_column() {
        let line = BASE.lines().count() + 3;
        let text = format!(
            "{BASE}\n[bgp]\nsocket = \"bird.ctl\"\nprotocol = \"9-vips\"\nroutes_file = \"/etc/bird/\"\n"
        );
        let e = p(&text).expect_err("refused");
        let s = e.to_string();
        assert_eq!(e.0.len(), 3, "{s}");
        assert!(
            s.starts_with(&format!(
                "b.toml:{line}:10: bgp: socket must be an absolute path"
            )),
            "{s}"
        );
        assert!(
            s.contains(&format!("b.toml:{}:12: bgp: protocol '9-vips'", line + 1)),
            "{s}"
        );
        assert!(
            s.contains(&format!(
                "b.toml:{}:15: bgp: routes_file must name a file",
                line + 2
            )),
            "{s}"
        );
        let text = format!("{BASE}\n[bgp]\nneighbour = \"10.0.0.1\"\n");
        let e = p(&text).expect_err("refused").to_string();
        assert!(
            e.starts_with(&format!("b.toml:{line}:1:")) && e.contains("neighbour"),
            "{e}"
        );
    }
}
