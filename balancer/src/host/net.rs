//! The host side of the network: address forms, interface addresses, VIPs on the interface,
//! and the sysctls the FIB lookup needs.

use std::{
    net::{IpAddr, Ipv6Addr},
    process::Command,
};

use balancer_common::Addr;

use super::Error;

/// The 16-byte form of an address: IPv6 as is, IPv4 as v4-mapped.
pub fn addr16(ip: IpAddr) -> Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// The address back from its 16-byte form.
pub fn ip_of(a: &Addr) -> IpAddr {
    let v6 = Ipv6Addr::from(*a);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

/// The first address of `family` on `interface` (IPv6: global scope, not link-local).
pub fn interface_address(interface: &str, v6: bool) -> Result<Option<IpAddr>, Error> {
    let addrs = nix::ifaddrs::getifaddrs().map_err(Error::Getifaddrs)?;
    for a in addrs {
        if a.interface_name != interface {
            continue;
        }
        let Some(sa) = a.address else { continue };
        if !v6 {
            if let Some(sin) = sa.as_sockaddr_in() {
                return Ok(Some(IpAddr::V4(sin.ip())));
            }
        } else if let Some(sin6) = sa.as_sockaddr_in6() {
            let ip = sin6.ip();
            if (ip.segments()[0] & 0xffc0) != 0xfe80 {
                return Ok(Some(IpAddr::V6(ip)));
            }
        }
    }
    Ok(None)
}

/// True when `ip` is configured on `interface`.
pub fn has_address(interface: &str, ip: IpAddr) -> Result<bool, Error> {
    let addrs = nix::ifaddrs::getifaddrs().map_err(Error::Getifaddrs)?;
    for a in addrs {
        if a.interface_name != interface {
            continue;
        }
        let Some(sa) = a.address else { continue };
        let found = match ip {
            IpAddr::V4(v4) => sa.as_sockaddr_in().map(|s| s.ip() == v4),
            IpAddr::V6(v6) => sa.as_sockaddr_in6().map(|s| s.ip() == v6),
        };
        if found == Some(true) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Runs `ip` with `args`: its standard output, or why it failed.
fn ip_output(args: &[&str]) -> Result<Vec<u8>, Error> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(Error::IpSpawn)?;
    if !out.status.success() {
        return Err(Error::IpFailed {
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(out.stdout)
}

fn ip_cmd(args: &[&str]) -> Result<(), Error> {
    ip_output(args).map(drop)
}

/// Puts a VIP on the interface (as a host address) so the kernel answers ARP / ND for it.
pub fn add_vip(interface: &str, ip: IpAddr) -> Result<(), Error> {
    if has_address(interface, ip)? {
        return Ok(());
    }
    match ip {
        IpAddr::V4(_) => ip_cmd(&["addr", "add", &format!("{ip}/32"), "dev", interface]),
        IpAddr::V6(_) => ip_cmd(&[
            "-6",
            "addr",
            "add",
            &format!("{ip}/128"),
            "dev",
            interface,
            "nodad",
        ]),
    }
}

/// Takes a VIP off the interface.
pub fn remove_vip(interface: &str, ip: IpAddr) -> Result<(), Error> {
    if !has_address(interface, ip)? {
        return Ok(());
    }
    let prefix = if ip.is_ipv4() { 32 } else { 128 };
    ip_cmd(&["addr", "del", &format!("{ip}/{prefix}"), "dev", interface])
}

fn write_sysctl(path: &str, value: &str) -> Result<(), Error> {
    let cur = std::fs::read_to_string(path).map_err(|source| Error::ReadSysctl {
        path: path.to_string(),
        source,
    })?;
    if cur.trim() != value {
        std::fs::write(path, value).map_err(|source| Error::WriteSysctl {
            path: path.to_string(),
            source,
        })?;
        tracing::info!(sysctl = path, value, "sysctl set");
    }
    Ok(())
}

/// The XDP FIB lookup refuses to answer for an interface that does not forward: turn
/// forwarding on for the attached interface (both families).
pub fn enable_forwarding(interface: &str) -> Result<(), Error> {
    write_sysctl(
        &format!("/proc/sys/net/ipv4/conf/{interface}/forwarding"),
        "1",
    )?;
    let v6 = format!("/proc/sys/net/ipv6/conf/{interface}/forwarding");
    if std::path::Path::new(&v6).exists() {
        write_sysctl(&v6, "1")?;
    }
    Ok(())
}

/// The kernel's ephemeral port range (`net.ipv4.ip_local_port_range`).
pub fn ephemeral_ports() -> Result<(u16, u16), Error> {
    let s = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .map_err(Error::ReadPortRange)?;
    let mut it = s.split_whitespace().map(|p| p.parse::<u16>());
    match (it.next(), it.next()) {
        (Some(Ok(lo)), Some(Ok(hi))) => Ok((lo, hi)),
        _ => Err(Error::ParsePortRange(s.trim().to_string())),
    }
}

/// Makes the kernel resolve a backend's link-layer address: the XDP program's FIB lookup
/// only reads the neighbour table, it cannot fill it. An empty UDP datagram to the discard
/// port is enough (health checks keep entries fresh too).
pub fn prime_neighbour(ip: IpAddr) {
    let bind: std::net::SocketAddr = if ip.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    if let Ok(sock) = std::net::UdpSocket::bind(bind) {
        let _ = sock.set_nonblocking(true);
        let _ = sock.send_to(&[], (ip, 9));
    }
}

/// Why an interface's MAC could not be read.
#[derive(Debug, thiserror::Error)]
pub enum MacError {
    /// The name does not fit an `ifreq` (15 bytes at most, no NUL).
    #[error("'{0}' is not a valid interface name")]
    BadName(String),
    /// The `SIOCGIFHWADDR` request failed (no such interface, …).
    #[error("reading the MAC of '{interface}': {source}")]
    Io {
        /// The interface.
        interface: String,
        /// The error of `socket` or `ioctl`.
        #[source]
        source: std::io::Error,
    },
    /// The interface has no Ethernet address (hardware type `ARPHRD_*` other than Ethernet).
    #[error("'{interface}' is not an Ethernet interface (hardware type {hw_type})")]
    NotEthernet {
        /// The interface.
        interface: String,
        /// Its `ARPHRD_*` type.
        hw_type: u16,
    },
}

/// The MAC of `interface`, by `SIOCGIFHWADDR` on a socket of this thread's network namespace
/// (`/sys/class/net` would show the namespace sysfs was mounted in, which is not this one
/// under `nsenter --net`).
pub fn interface_mac(interface: &str) -> Result<[u8; 6], MacError> {
    let bytes = interface.as_bytes();
    if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
        return Err(MacError::BadName(interface.to_string()));
    }
    let io = |source| MacError::Io {
        interface: interface.to_string(),
        source,
    };
    // SAFETY: plain syscalls on a socket owned here and an ifreq initialised to zero with a
    // NUL-terminated name; the kernel writes only within the ifreq.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(io(std::io::Error::last_os_error()));
        }
        let mut req: libc::ifreq = std::mem::zeroed();
        for (d, s) in req.ifr_name.iter_mut().zip(bytes) {
            *d = *s as libc::c_char;
        }
        let r = libc::ioctl(fd, libc::SIOCGIFHWADDR, &mut req);
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        if r < 0 {
            return Err(io(err));
        }
        let sa = req.ifr_ifru.ifru_hwaddr;
        if sa.sa_family != libc::ARPHRD_ETHER {
            return Err(MacError::NotEthernet {
                interface: interface.to_string(),
                hw_type: sa.sa_family,
            });
        }
        let mut mac = [0u8; 6];
        for (d, s) in mac.iter_mut().zip(sa.sa_data.iter()) {
            *d = *s as u8;
        }
        Ok(mac)
    }
}

/// An 802.1Q VLAN device of this network namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VlanDevice {
    /// Its name.
    pub name: String,
    /// Its ifindex.
    pub ifindex: u32,
    /// Its parent (the trunk).
    pub parent: String,
    /// The VLAN id.
    pub vid: u16,
    /// Its MAC (its trunk's unless set otherwise).
    pub mac: [u8; 6],
}

/// Every 802.1Q VLAN device of this network namespace whose parent is here too, from
/// `ip -details -json link show` (netlink, so under `nsenter --net` it is this namespace's).
/// 802.1ad (QinQ) devices and VLANs whose parent lives in another namespace are left out:
/// the XDP program cannot send through them.
pub fn vlan_devices() -> Result<Vec<VlanDevice>, Error> {
    parse_vlan_devices(&ip_output(&["-details", "-json", "link", "show"])?)
}

/// The VLAN devices in `ip -details -json link show` output.
fn parse_vlan_devices(json: &[u8]) -> Result<Vec<VlanDevice>, Error> {
    #[derive(serde::Deserialize)]
    struct Link {
        ifindex: Option<u32>,
        ifname: Option<String>,
        /// The parent's name, when it is in this namespace.
        link: Option<String>,
        /// Set when the parent is in another namespace.
        link_netnsid: Option<i64>,
        /// The MAC, `aa:bb:cc:dd:ee:ff`.
        address: Option<String>,
        linkinfo: Option<LinkInfo>,
    }
    #[derive(serde::Deserialize)]
    struct LinkInfo {
        info_kind: Option<String>,
        info_data: Option<VlanData>,
    }
    #[derive(serde::Deserialize)]
    struct VlanData {
        protocol: Option<String>,
        id: Option<u16>,
    }
    let links: Vec<Link> =
        serde_json::from_slice(json).map_err(|e| Error::IpOutput(e.to_string()))?;
    Ok(links
        .into_iter()
        .filter_map(|l| {
            let info = l.linkinfo?;
            let data = info.info_data?;
            let vid = data.id?;
            (info.info_kind.as_deref() == Some("vlan")
                && data.protocol.as_deref() == Some("802.1Q")
                && l.link_netnsid.is_none()
                && (1..=4094).contains(&vid))
            .then_some(())?;
            Some(VlanDevice {
                name: l.ifname?,
                ifindex: l.ifindex?,
                parent: l.link?,
                vid,
                mac: parse_mac(l.address.as_deref()?)?,
            })
        })
        .collect())
}

/// `aa:bb:cc:dd:ee:ff` as bytes.
fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// The least time between two link reads that [`LinkWatch::changed`] asks for: a burst of
/// link messages (a hundred containers' veths) costs one read, not a hundred.
pub const LINK_SETTLE: std::time::Duration = std::time::Duration::from_millis(250);

/// The link changes of this network namespace, from rtnetlink (`RTMGRP_LINK`): a device
/// added, removed or changed (its MAC, its state, a VLAN on a trunk). The messages are not
/// parsed: any of them is a reason to read the links again, and reading them is what the
/// caller does anyway.
pub struct LinkWatch {
    fd: tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>,
    buf: Vec<u8>,
    last: Option<tokio::time::Instant>,
    /// Messages were read and the change not reported yet (the caller's `select!` dropped
    /// [`LinkWatch::changed`] while it settled): the next call reports it.
    pending: bool,
}

impl LinkWatch {
    /// Subscribes to the link messages (needs a Tokio runtime).
    pub fn open() -> Result<Self, Error> {
        use nix::sys::socket::{
            AddressFamily, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, socket,
        };
        use std::os::fd::AsRawFd as _;
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkRoute,
        )
        .map_err(|e| Error::LinkWatch(e.into()))?;
        bind(
            fd.as_raw_fd(),
            &NetlinkAddr::new(0, libc::RTMGRP_LINK as u32),
        )
        .map_err(|e| Error::LinkWatch(e.into()))?;
        // SAFETY: the `OwnedFd` is open and owned by the `AsyncFd` from here on, so its raw
        // descriptor stays the same open socket for the `AsyncFd`'s whole life.
        let fd = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
        }
        .map_err(|e| Error::LinkWatch(e.into()))?;
        Ok(Self {
            fd,
            buf: vec![0; 32 * 1024],
            last: None,
            pending: false,
        })
    }

    /// Returns once a link changed, at least [`LINK_SETTLE`] after the last return. Every
    /// message queued by then is read, so a burst is one change. Messages lost because the
    /// socket's buffer ran over (`ENOBUFS`) are a change too: the caller reads everything.
    /// Cancel-safe (for `select!`): a change read but not yet reported is reported by the next
    /// call.
    pub async fn changed(&mut self) -> Result<(), Error> {
        if !self.pending {
            // Reads only once the socket is readable, and returns without another wait.
            self.drain(true).await?;
            self.pending = true;
        }
        if let Some(last) = self.last {
            tokio::time::sleep_until(last + LINK_SETTLE).await;
        }
        // What came in while settling belongs to this change.
        self.drain(false).await?;
        self.pending = false;
        self.last = Some(tokio::time::Instant::now());
        Ok(())
    }

    /// Reads every queued message, after waiting for one when `wait`; true when any was
    /// there (or lost).
    async fn drain(&mut self, wait: bool) -> Result<bool, Error> {
        use nix::{errno::Errno, sys::socket::MsgFlags};
        use std::os::fd::AsRawFd as _;
        let mut any = false;
        loop {
            let mut guard = if wait && !any {
                Some(self.fd.readable().await.map_err(Error::LinkWatch)?)
            } else {
                None
            };
            match nix::sys::socket::recv(
                self.fd.get_ref().as_raw_fd(),
                &mut self.buf,
                MsgFlags::MSG_DONTWAIT,
            ) {
                Ok(_) | Err(Errno::ENOBUFS) => any = true,
                Err(Errno::EINTR) => {}
                Err(Errno::EAGAIN) => {
                    if let Some(g) = guard.as_mut() {
                        g.clear_ready();
                    }
                    if any || !wait {
                        return Ok(any);
                    }
                }
                Err(e) => return Err(Error::LinkWatch(e.into())),
            }
        }
    }
}

/// Interface index by name (in this network namespace).
pub fn ifindex(interface: &str) -> Result<u32, Error> {
    nix::net::if_::if_nametoindex(interface).map_err(|source| Error::NoInterface {
        interface: interface.to_string(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::time::Duration;

    /// A link change read while [`LinkWatch::changed`] settled, and the call dropped there
    /// (as `select!` drops a branch that lost), is reported by the next call. In a network
    /// namespace of the test's own (a thread that unshared it; `ip` inherits it), on a paused
    /// clock: timers fire in order, no wall-clock time is measured.
    #[test]
    fn a_link_change_read_before_a_cancel_is_reported_by_the_next_call() {
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!("skipped: needs root (a network namespace)");
            return;
        }
        std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare");
            let ip = |args: &[&str]| {
                let s = Command::new("ip").args(args).status().expect("ip");
                assert!(s.success(), "ip {args:?}");
            };
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .start_paused(true)
                .build()
                .expect("runtime");
            rt.block_on(async {
                let mut w = LinkWatch::open().expect("link watch");
                ip(&[
                    "link", "add", "blbt0", "type", "veth", "peer", "name", "blbt0p",
                ]);
                // The first change: no read before it, so no settling.
                w.changed().await.expect("first change");
                ip(&[
                    "link", "add", "blbt1", "type", "veth", "peer", "name", "blbt1p",
                ]);
                // Read, then settling until 250 ms after the first: dropped at 50 ms.
                let cut = tokio::time::timeout(Duration::from_millis(50), w.changed()).await;
                assert!(cut.is_err(), "reported before it settled");
                // No new message: the change read before the drop is reported all the same
                // (before the fix this waited for the next message: the 10 s bound fired).
                tokio::time::timeout(Duration::from_secs(10), w.changed())
                    .await
                    .expect("the change read before the drop")
                    .expect("no error");
            });
        })
        .join()
        .expect("the namespace thread");
    }

    #[test]
    fn vlan_devices_are_read_from_ip_json() {
        // iproute2's shape, trimmed: a trunk, a VLAN on it, a QinQ device, a VLAN whose
        // parent is in another namespace, and the empty objects iproute2 6.1 prints for
        // links a `type` filter left out.
        let json = br#"[
            {"ifindex":2,"ifname":"eth0","flags":["UP"],"mtu":1500},
            {"ifindex":5,"link":"eth0","ifname":"eth0.20","mtu":1500,"address":"02:00:00:0a:0B:14",
             "linkinfo":{"info_kind":"vlan","info_data":{"protocol":"802.1Q","id":20,"flags":["REORDER_HDR"]}}},
            {"ifindex":6,"link":"eth0","ifname":"eth0.30","address":"02:00:00:00:00:1e",
             "linkinfo":{"info_kind":"vlan","info_data":{"protocol":"802.1ad","id":30}}},
            {"ifindex":7,"link_index":3,"link_netnsid":0,"ifname":"v40","address":"02:00:00:00:00:28",
             "linkinfo":{"info_kind":"vlan","info_data":{"protocol":"802.1Q","id":40}}},
            {"ifindex":8,"link":"eth0","ifname":"mv0","linkinfo":{"info_kind":"macvlan","info_data":{"mode":"bridge"}}},
            {}
        ]"#;
        assert_eq!(
            parse_vlan_devices(json).unwrap(),
            vec![VlanDevice {
                name: "eth0.20".into(),
                ifindex: 5,
                parent: "eth0".into(),
                vid: 20,
                mac: [2, 0, 0, 0x0a, 0x0b, 0x14],
            }]
        );
        // A VLAN device without a readable MAC is left out.
        for address in [
            r#""#,
            r#","address":"02:00:00:00:00""#,
            r#","address":"02:00:00:00:00:1:5""#,
        ] {
            let json = format!(
                r#"[{{"ifindex":5,"link":"eth0","ifname":"eth0.20"{address},
                   "linkinfo":{{"info_kind":"vlan","info_data":{{"protocol":"802.1Q","id":20}}}}}}]"#
            );
            assert_eq!(
                parse_vlan_devices(json.as_bytes()).unwrap(),
                vec![],
                "{address}"
            );
        }
        assert!(matches!(
            parse_vlan_devices(b"not json"),
            Err(Error::IpOutput(_))
        ));
    }

    #[test]
    fn addr16_round_trips() {
        for s in ["10.77.0.1", "fd77::100", "::1", "255.255.255.255"] {
            let ip: IpAddr = s.parse().unwrap();
            assert_eq!(ip_of(&addr16(ip)), ip);
        }
        let a = addr16("1.2.3.4".parse().unwrap());
        assert_eq!(&a[..12], &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff]);
        assert_eq!(&a[12..], &[1, 2, 3, 4]);
    }

    #[test]
    fn interface_macs_are_read_or_refused() {
        assert!(matches!(
            interface_mac("no-such-if0"),
            Err(MacError::Io { .. })
        ));
        assert!(matches!(
            interface_mac("a-name-too-long-for-ifreq"),
            Err(MacError::BadName(_))
        ));
        assert!(matches!(interface_mac(""), Err(MacError::BadName(_))));
        // Loopback's hardware type is ARPHRD_LOOPBACK: no Ethernet MAC to check against.
        assert!(matches!(
            interface_mac("lo"),
            Err(MacError::NotEthernet { hw_type: 772, .. })
        ));
    }

    #[test]
    fn loopback_has_an_address() {
        assert_eq!(
            interface_address("lo", false).unwrap(),
            Some("127.0.0.1".parse().unwrap())
        );
        assert!(has_address("lo", "127.0.0.1".parse().unwrap()).unwrap());
    }
}
