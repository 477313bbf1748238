//! The host around the balancer: interface addresses, VIPs and sysctls, systemd, and BIRD
//! (the VIP announcements of `[bgp]`).

pub mod bird;
pub mod keepalived;
pub mod net;
pub mod systemd;

/// What failed on the host side of the network ([`net`]): reading addresses, running `ip`,
/// the sysctls, interface look-ups. The cause, when there is one, is the error's source.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The interface addresses could not be listed.
    #[error("getifaddrs")]
    Getifaddrs(#[source] nix::Error),
    /// `ip` could not be started.
    #[error("running ip (iproute2)")]
    IpSpawn(#[source] std::io::Error),
    /// `ip` ran and failed.
    #[error("ip {args}: {stderr}")]
    IpFailed {
        /// Its arguments, space-separated.
        args: String,
        /// What it printed on stderr (trimmed).
        stderr: String,
    },
    /// `ip` printed something that is not what it documents.
    #[error("unexpected output of ip: {0}")]
    IpOutput(String),
    /// A sysctl could not be read.
    #[error("reading {path}")]
    ReadSysctl {
        /// The file under /proc/sys.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A forwarding sysctl could not be written.
    #[error(
        "writing {path}: the XDP FIB lookup needs forwarding on; under the hardened unit /proc/sys is read-only, so install packaging/99-balancer.conf in /etc/sysctl.d"
    )]
    WriteSysctl {
        /// The file under /proc/sys.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// `net.ipv4.ip_local_port_range` could not be read.
    #[error("reading ip_local_port_range")]
    ReadPortRange(#[source] std::io::Error),
    /// `net.ipv4.ip_local_port_range` holds something else than two ports.
    #[error("cannot parse ip_local_port_range '{0}'")]
    ParsePortRange(String),
    /// The rtnetlink socket for link changes could not be opened or read.
    #[error("watching link changes (rtnetlink)")]
    LinkWatch(#[source] std::io::Error),
    /// No interface of that name in this network namespace.
    #[error("no interface '{interface}'")]
    NoInterface {
        /// The name.
        interface: String,
        /// The error of `if_nametoindex`.
        #[source]
        source: nix::Error,
    },
}

/// Writes `bytes` to `path` atomically (a temporary file renamed over it), mode 0600.
pub fn write_private(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    std::io::Write::write_all(&mut f, bytes)?;
    std::fs::rename(&tmp, path)
}
