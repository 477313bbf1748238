//! The XDP test bed: a private network namespace in which the XDP program runs under
//! BPF_PROG_TEST_RUN. The packet-table tests (`tests/packet_table.rs`) and the
//! `balancer-xdp-bench` tool use it. Kept out of the production `balancer` library (with its
//! packet builders and etherparse) so the shipped binary carries no test tooling.
//!
//! The namespace has a veth `t0` (MAC 02:00:00:00:00:01, 10.77.0.1/24, fd77::1/64) with
//! permanent neighbours for the client (…::2 / .2) and backends (.11–.74), so the
//! program's FIB lookups answer exactly as on a real segment, and forwarding is on. `t0`'s
//! MAC is in `BLB_IFMACS`, so frames must be addressed to [`LB_MAC`] (or be multicast).

use std::{
    fs::File,
    net::{IpAddr, SocketAddr},
    os::fd::AsFd,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context as _, bail};
use aya::programs::{TestRun, TestRunOptions, Xdp};
use nix::sched::{CloneFlags, setns};

use balancer::dataplane::{Dataplane, LoadOptions};

pub mod bench;

/// MAC of the balancer's interface in the testbed.
pub const LB_MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];
/// MAC of a host `.n` / `::n` in the testbed.
pub const fn host_mac(n: u8) -> [u8; 6] {
    [2, 0, 0, 0, 0, n]
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A namespace with the program loaded (not attached; run through TEST_RUN).
pub struct Testbed {
    /// Namespace name.
    pub ns: String,
    /// The loaded dataplane (private maps).
    pub dp: Dataplane,
    /// Index of `t0`.
    pub ifindex: u32,
    home: File,
}

fn run(cmd: &str, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .with_context(|| format!("running {cmd}"))?;
    if !out.status.success() {
        bail!(
            "{cmd} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl Testbed {
    /// Creates the namespace, enters it on this thread, loads the program.
    pub fn new(flow_entries: u32) -> anyhow::Result<Self> {
        let ns = format!(
            "blbt{}x{}",
            std::process::id() % 100_000,
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let home = File::open("/proc/thread-self/ns/net").context("opening own netns")?;
        run("ip", &["netns", "add", &ns])?;
        let setup = || -> anyhow::Result<u32> {
            let n = |args: &[&str]| {
                let mut v = vec!["-n", ns.as_str()];
                v.extend_from_slice(args);
                run("ip", &v)
            };
            n(&[
                "link",
                "add",
                "t0",
                "address",
                "02:00:00:00:00:01",
                "type",
                "veth",
                "peer",
                "name",
                "t1",
            ])?;
            n(&["link", "set", "t0", "up"])?;
            n(&["link", "set", "t1", "up"])?;
            n(&["link", "set", "lo", "up"])?;
            n(&["addr", "add", "10.77.0.1/24", "dev", "t0"])?;
            n(&["-6", "addr", "add", "fd77::1/64", "dev", "t0", "nodad"])?;
            let mut batch = String::new();
            for h in std::iter::once(2u8).chain(11..=74) {
                let mac = format!("02:00:00:00:00:{h:02x}");
                batch += &format!("neigh replace 10.77.0.{h} lladdr {mac} dev t0 nud permanent\n");
                batch += &format!("neigh replace fd77::{h:x} lladdr {mac} dev t0 nud permanent\n");
            }
            let mut child = Command::new("ip")
                .args(["-n", ns.as_str(), "-batch", "-"])
                .stdin(std::process::Stdio::piped())
                .spawn()
                .context("running ip -batch")?;
            use std::io::Write as _;
            child
                .stdin
                .take()
                .context("ip stdin")?
                .write_all(batch.as_bytes())?;
            anyhow::ensure!(child.wait()?.success(), "ip -batch neighbours failed");
            let f = File::open(format!("/run/netns/{ns}")).context("opening the testbed netns")?;
            setns(f.as_fd(), CloneFlags::CLONE_NEWNET).context("entering the testbed netns")?;
            for p in [
                "/proc/sys/net/ipv4/conf/all/forwarding",
                "/proc/sys/net/ipv4/conf/t0/forwarding",
                "/proc/sys/net/ipv6/conf/all/forwarding",
                "/proc/sys/net/ipv6/conf/t0/forwarding",
            ] {
                std::fs::write(p, "1").with_context(|| format!("writing {p}"))?;
            }
            Ok(balancer::host::net::ifindex("t0")?)
        };
        let ifindex = match setup() {
            Ok(i) => i,
            Err(e) => {
                let _ = setns(home.as_fd(), CloneFlags::CLONE_NEWNET);
                let _ = run("ip", &["netns", "del", &ns]);
                return Err(e);
            }
        };
        // The program is run, not attached: record t0's MAC as `Dataplane::attach` does, so
        // every row runs with the destination-MAC check on.
        let dp = match Dataplane::load(&LoadOptions {
            pin_path: None,
            flow_entries,
        })
        .map_err(anyhow::Error::from)
        .and_then(|mut dp| {
            let mac = balancer::host::net::interface_mac("t0")?;
            anyhow::ensure!(mac == LB_MAC, "t0 has MAC {mac:02x?}");
            dp.set_interface_mac(ifindex, Some(mac))?;
            Ok(dp)
        }) {
            Ok(dp) => dp,
            Err(e) => {
                let _ = setns(home.as_fd(), CloneFlags::CLONE_NEWNET);
                let _ = run("ip", &["netns", "del", &ns]);
                return Err(e);
            }
        };
        Ok(Testbed {
            ns,
            dp,
            ifindex,
            home,
        })
    }

    /// Runs `ip` in the testbed's namespace (routes, addresses for a row).
    pub fn ip(&self, args: &[&str]) -> anyhow::Result<()> {
        let mut v = vec!["-n", self.ns.as_str()];
        v.extend_from_slice(args);
        run("ip", &v)
    }

    /// Runs one packet through the program: verdict and output bytes.
    pub fn run(&self, pkt: &[u8]) -> anyhow::Result<(u32, Vec<u8>)> {
        let (v, out, _) = run_prog(self.dp.program()?, pkt, self.ifindex)?;
        Ok((v, out))
    }
}

/// One TEST_RUN call with an `xdp_md` naming the ingress interface: verdict, output bytes,
/// kernel-measured duration.
pub fn run_prog(
    prog: &Xdp,
    pkt: &[u8],
    ifindex: u32,
) -> anyhow::Result<(u32, Vec<u8>, std::time::Duration)> {
    // struct xdp_md { data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex }
    let mut ctx = [0u8; 24];
    ctx[4..8].copy_from_slice(&(pkt.len() as u32).to_ne_bytes());
    ctx[12..16].copy_from_slice(&ifindex.to_ne_bytes());
    let mut out = vec![0u8; pkt.len() + 256];
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(pkt);
    opts.data_out = Some(&mut out);
    opts.ctx_in = Some(&ctx);
    let r = prog.test_run(opts).context("BPF_PROG_TEST_RUN")?;
    out.truncate(r.data_size_out as usize);
    Ok((r.return_value, out, r.duration))
}

impl Drop for Testbed {
    fn drop(&mut self) {
        let _ = setns(self.home.as_fd(), CloneFlags::CLONE_NEWNET);
        let _ = run("ip", &["netns", "del", &self.ns]);
    }
}

/// Frame builders with correct checksums (etherparse), for tests and benches.
pub mod packet {
    use super::*;
    use etherparse::PacketBuilder;

    /// TCP flags for [`tcp`].
    #[derive(Clone, Copy, Debug, Default)]
    pub struct Flags {
        /// SYN.
        pub syn: bool,
        /// ACK.
        pub ack: bool,
        /// RST.
        pub rst: bool,
        /// FIN.
        pub fin: bool,
    }

    /// A SYN.
    pub const SYN: Flags = Flags {
        syn: true,
        ack: false,
        rst: false,
        fin: false,
    };
    /// An ACK.
    pub const ACK: Flags = Flags {
        syn: false,
        ack: true,
        rst: false,
        fin: false,
    };

    fn builder(
        src_mac: [u8; 6],
        dst_mac: [u8; 6],
        src: IpAddr,
        dst: IpAddr,
    ) -> anyhow::Result<etherparse::PacketBuilderStep<etherparse::IpHeaders>> {
        let eth = PacketBuilder::ethernet2(src_mac, dst_mac);
        Ok(match (src, dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => eth.ipv4(s.octets(), d.octets(), 64),
            (IpAddr::V6(s), IpAddr::V6(d)) => eth.ipv6(s.octets(), d.octets(), 64),
            _ => bail!("mixed families"),
        })
    }

    /// An Ethernet + IP + TCP frame.
    #[allow(clippy::too_many_arguments)]
    pub fn tcp(
        src_mac: [u8; 6],
        dst_mac: [u8; 6],
        src: SocketAddr,
        dst: SocketAddr,
        seq: u32,
        ack: u32,
        flags: Flags,
        payload: &[u8],
    ) -> Vec<u8> {
        let b = builder(src_mac, dst_mac, src.ip(), dst.ip()).expect("same family");
        let mut t = b.tcp(src.port(), dst.port(), seq, 64240);
        if flags.syn {
            t = t.syn();
        }
        if flags.ack {
            t = t.ack(ack);
        }
        if flags.rst {
            t = t.rst();
        }
        if flags.fin {
            t = t.fin();
        }
        let mut out = Vec::with_capacity(t.size(payload.len()));
        t.write(&mut out, payload).expect("write to a Vec");
        out
    }

    /// An Ethernet + IP + UDP frame.
    pub fn udp(
        src_mac: [u8; 6],
        dst_mac: [u8; 6],
        src: SocketAddr,
        dst: SocketAddr,
        payload: &[u8],
    ) -> Vec<u8> {
        let b = builder(src_mac, dst_mac, src.ip(), dst.ip()).expect("same family");
        let u = b.udp(src.port(), dst.port());
        let mut out = Vec::with_capacity(u.size(payload.len()));
        u.write(&mut out, payload).expect("write to a Vec");
        out
    }
}
