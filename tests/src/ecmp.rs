//! The ECMP lab: a client behind a router that runs BIRD with multipath, up to N balancers
//! that each run `balancer run` and their own BIRD peering with the router, and backends.
//!
//! ```text
//!   <p>-c client 10.78.0.2 ── eth0 ─ veth ─ eth0 <p>-r router 10.78.0.1
//!                                             │   BIRD AS 65000, merge paths (ECMP),
//!                                             │   fib_multipath_hash_policy = 1
//!                                            eth1 10.77.0.254
//!                      <p>-sw bridge br0 ─────┴──────┬──────────────┬─────────────┐
//!        lb1 10.77.0.1    lb2 10.77.0.2    lb3 10.77.0.3      b1 10.77.0.11    b2 …
//!        balancer + BIRD AS 65001 each (eBGP to 10.77.0.254,   VIPs on lo, default
//!        hold time 3), XDP on eth0                             route via 10.77.0.254
//! ```
//!
//! The VIPs (10.88.0.0/24) are on no segment: the router reaches them only through the BGP
//! routes the balancers announce (a /32 per VIP, next hop the balancer), merged into one
//! multipath route. Balancers forward DSR: backends answer the client through the router.
//! Names follow [`crate::Lab`]: namespaces `blb<pid>x<n>-<host>`, pins under
//! `/sys/fs/bpf/<prefix>/` and `<prefix>-pass`, a scratch directory; dropping the lab (also on
//! a panic) kills its processes and removes all of it, and [`crate::Lab::cleanup_stale`]
//! removes what a killed run left.

use std::collections::BTreeSet;
use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::bins::{balancer_bin, tool_bin};
use crate::lab::{
    cleanup_stale_once, ensure_bpffs, ip, is_root, kill_netns_processes, netns_path, next_prefix,
    remove_pins,
};
use crate::process::LabChild;
use crate::report::{ConnsReport, StreamReport};

/// The DSR VIP the balancers serve.
pub const ECMP_VIP: Ipv4Addr = Ipv4Addr::new(10, 88, 0, 100);
/// A second VIP, for a service whose backends can be made to fail.
pub const ECMP_VIP2: Ipv4Addr = Ipv4Addr::new(10, 88, 0, 101);
/// The router's address on the balancers' segment (their BGP neighbour).
pub const ROUTER_FARM: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 254);
/// The router's address on the client's segment.
pub const ROUTER_CLIENT: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 1);
/// The client.
pub const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 2);
/// The router's AS.
pub const ROUTER_AS: u32 = 65000;
/// The balancers' AS.
pub const BALANCER_AS: u32 = 65001;

const EXEC_TIMEOUT: Duration = Duration::from_secs(120);
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// One machine of the ECMP lab.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EcmpHost {
    /// `<p>-sw`: the bridge of the farm segment.
    Switch,
    /// `<p>-r`: the router.
    Router,
    /// `<p>-c`: the client.
    Client,
    /// `<p>-lb<i>`, from 1: balancer `i` (10.77.0.`i`).
    Lb(usize),
    /// `<p>-b<i>`, from 1: backend `i` (10.77.0.1`i`, `blb-echo` name `be<i>`).
    Backend(usize),
}

impl EcmpHost {
    /// The namespace suffix (and switch port name): `sw`, `r`, `c`, `lb1`, `b1`…
    pub fn short(self) -> String {
        match self {
            EcmpHost::Switch => "sw".into(),
            EcmpHost::Router => "r".into(),
            EcmpHost::Client => "c".into(),
            EcmpHost::Lb(i) => format!("lb{i}"),
            EcmpHost::Backend(i) => format!("b{i}"),
        }
    }

    /// The address on the farm segment (balancers, backends, the router's `eth1`).
    pub fn farm_v4(self) -> Option<Ipv4Addr> {
        let o = match self {
            EcmpHost::Router => 254,
            EcmpHost::Lb(i) => u8::try_from(i).ok()?,
            EcmpHost::Backend(i) => u8::try_from(10 + i).ok()?,
            EcmpHost::Switch | EcmpHost::Client => return None,
        };
        Some(Ipv4Addr::new(10, 77, 0, o))
    }
}

impl fmt::Display for EcmpHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.short())
    }
}

/// A running ECMP lab (see the module documentation).
#[derive(Debug)]
pub struct EcmpLab {
    prefix: String,
    balancers: usize,
    backends: usize,
    dir: PathBuf,
}

impl EcmpLab {
    /// Builds the namespaces, links and addresses for `balancers` balancers (1 to 9) and
    /// `backends` backends (1 to 9), and starts the router's BIRD. Needs root.
    pub fn new(balancers: usize, backends: usize) -> Result<Self> {
        if !is_root() {
            bail!("the ECMP lab needs root (network namespaces, veth, XDP)");
        }
        if !(1..=9).contains(&balancers) || !(1..=9).contains(&backends) {
            bail!("1 to 9 balancers and backends");
        }
        cleanup_stale_once();
        let prefix = next_prefix();
        let dir = std::env::temp_dir().join(&prefix);
        let lab = EcmpLab {
            prefix,
            balancers,
            backends,
            dir,
        };
        std::fs::create_dir_all(&lab.dir)
            .with_context(|| format!("creating {}", lab.dir.display()))?;
        lab.build()
            .with_context(|| format!("building ECMP lab {}", lab.prefix))?;
        Ok(lab)
    }

    /// The namespace of `host`.
    pub fn ns(&self, host: EcmpHost) -> String {
        format!("{}-{}", self.prefix, host.short())
    }

    /// The scratch directory (configs, sockets, routes files), removed with the lab.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The balancer hosts.
    pub fn lb_hosts(&self) -> Vec<EcmpHost> {
        (1..=self.balancers).map(EcmpHost::Lb).collect()
    }

    /// The backend hosts.
    pub fn backend_hosts(&self) -> Vec<EcmpHost> {
        (1..=self.backends).map(EcmpHost::Backend).collect()
    }

    fn farm_hosts(&self) -> Vec<EcmpHost> {
        let mut v = vec![EcmpHost::Router];
        v.extend(self.lb_hosts());
        v.extend(self.backend_hosts());
        v
    }

    fn namespaces(&self) -> Vec<String> {
        let mut v: Vec<String> = self.farm_hosts().into_iter().map(|h| self.ns(h)).collect();
        v.push(self.ns(EcmpHost::Client));
        v.push(self.ns(EcmpHost::Switch));
        v
    }

    /// Where balancer `i` pins its dataplane.
    pub fn pin_path(&self, i: usize) -> PathBuf {
        PathBuf::from("/sys/fs/bpf")
            .join(&self.prefix)
            .join(format!("lb{i}"))
    }

    fn pass_pin_dir(&self) -> PathBuf {
        PathBuf::from("/sys/fs/bpf").join(format!("{}-pass", self.prefix))
    }

    /// Balancer `i`'s own directory (control socket, BIRD socket and config, routes file).
    pub fn lb_dir(&self, i: usize) -> PathBuf {
        self.dir.join(format!("lb{i}"))
    }

    fn build(&self) -> Result<()> {
        ensure_bpffs()?;
        let sw = self.ns(EcmpHost::Switch);
        ip(&["netns", "add", &sw])?;
        ip(&["-n", &sw, "link", "set", "lo", "up"])?;
        ip(&["-n", &sw, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &sw, "link", "set", "br0", "up"])?;
        for host in self.farm_hosts().into_iter().chain([EcmpHost::Client]) {
            let ns = self.ns(host);
            ip(&["netns", "add", &ns])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        }
        // The client's link to the router: a veth made in the router, one end moved.
        let r = self.ns(EcmpHost::Router);
        let c = self.ns(EcmpHost::Client);
        ip(&[
            "-n", &r, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", &c,
        ])?;
        ip(&[
            "-n",
            &r,
            "addr",
            "add",
            &format!("{ROUTER_CLIENT}/24"),
            "dev",
            "eth0",
        ])?;
        ip(&[
            "-n",
            &c,
            "addr",
            "add",
            &format!("{CLIENT}/24"),
            "dev",
            "eth0",
        ])?;
        // The farm segment: router eth1, balancers' and backends' eth0 on the bridge.
        for host in self.farm_hosts() {
            let ns = self.ns(host);
            let dev = if host == EcmpHost::Router {
                "eth1"
            } else {
                "eth0"
            };
            let port = host.short();
            ip(&[
                "-n", &sw, "link", "add", &port, "type", "veth", "peer", "name", dev, "netns", &ns,
            ])?;
            ip(&["-n", &sw, "link", "set", &port, "master", "br0"])?;
            ip(&["-n", &sw, "link", "set", &port, "up"])?;
            let addr = host.farm_v4().context("farm address")?;
            ip(&["-n", &ns, "addr", "add", &format!("{addr}/24"), "dev", dev])?;
        }
        // Every sender's checksums complete (see `LabConfig::tx_checksum_offload`).
        for (host, dev) in [
            (EcmpHost::Client, "eth0"),
            (EcmpHost::Router, "eth0"),
            (EcmpHost::Router, "eth1"),
        ]
        .into_iter()
        .chain(self.lb_hosts().into_iter().map(|h| (h, "eth0")))
        .chain(self.backend_hosts().into_iter().map(|h| (h, "eth0")))
        {
            self.exec(host, &["ethtool", "-K", dev, "tx", "off"])?;
            ip(&["-n", &self.ns(host), "link", "set", dev, "up"])?;
        }
        ip(&[
            "-n",
            &c,
            "route",
            "add",
            "default",
            "via",
            &ROUTER_CLIENT.to_string(),
        ])?;
        // Frames the balancers send with XDP_TX reach the bridge only when the veth peer
        // runs XDP (see `Lab`): a pass-through program on each balancer's switch port.
        let bin = balancer_bin()?;
        let bin = bin.to_string_lossy();
        for h in self.lb_hosts() {
            let pin = self.pass_pin_dir().join(format!("link-{}", h.short()));
            let pin = pin.to_string_lossy();
            self.exec(
                EcmpHost::Switch,
                &[&bin, "xdp-pass", "--interface", &h.short(), "--pin", &pin],
            )?;
            self.exec(
                h,
                &[
                    "sysctl",
                    "-q",
                    "-w",
                    "net.ipv4.ip_forward=1",
                    "net.ipv4.conf.all.rp_filter=0",
                    "net.ipv4.conf.eth0.rp_filter=0",
                    "net.ipv4.conf.all.send_redirects=0",
                    "net.ipv4.conf.eth0.send_redirects=0",
                ],
            )?;
            if let EcmpHost::Lb(i) = h {
                std::fs::create_dir_all(self.lb_dir(i))?;
            }
        }
        self.exec(
            EcmpHost::Router,
            &[
                "sysctl",
                "-q",
                "-w",
                "net.ipv4.ip_forward=1",
                // Hash flows by their 5-tuple over the next hops: streams spread.
                "net.ipv4.fib_multipath_hash_policy=1",
                "net.ipv4.conf.all.rp_filter=0",
                "net.ipv4.conf.eth0.rp_filter=0",
                "net.ipv4.conf.eth1.rp_filter=0",
            ],
        )?;
        self.exec(
            EcmpHost::Client,
            &[
                "sysctl",
                "-q",
                "-w",
                "net.ipv4.tcp_tw_reuse=1",
                "net.ipv4.ip_local_port_range=10000 65000",
                // The router hashes a flow by the hash its skb carries from the client's
                // socket (one kernel), and TCP picks a new one after a retransmission
                // timeout: the stream would reroute itself around a lost balancer, which a
                // real router (hashing the headers) never does.
                "net.core.txrehash=0",
            ],
        )?;
        // DSR backends: the VIPs on a loopback, no ARP for them, replies via the router.
        for h in self.backend_hosts() {
            for vip in [ECMP_VIP, ECMP_VIP2] {
                self.exec(h, &["ip", "addr", "add", &format!("{vip}/32"), "dev", "lo"])?;
            }
            self.exec(
                h,
                &[
                    "sysctl",
                    "-q",
                    "-w",
                    "net.ipv4.conf.all.arp_ignore=1",
                    "net.ipv4.conf.all.arp_announce=2",
                ],
            )?;
            self.exec(
                h,
                &[
                    "ip",
                    "route",
                    "add",
                    "default",
                    "via",
                    &ROUTER_FARM.to_string(),
                ],
            )?;
        }
        Ok(())
    }

    /// A `Command` running `program` in `host` (`nsenter --net`, the host's mounts).
    pub fn command(&self, host: EcmpHost, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.ns(host)))
            .arg("--")
            .arg(program);
        c
    }

    fn spawn_command(&self, mut cmd: Command, what: &str) -> Result<LabChild> {
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {what}"))?;
        Ok(LabChild::new(child, what.to_string()))
    }

    /// Starts `args` in `host` (killed when the handle or the lab is dropped).
    pub fn spawn(&self, host: EcmpHost, args: &[&str]) -> Result<LabChild> {
        let (program, rest) = args.split_first().context("empty command")?;
        let mut cmd = self.command(host, program);
        cmd.args(rest);
        self.spawn_command(cmd, &format!("[{host}] {}", args.join(" ")))
    }

    /// Runs `args` in `host` (two minutes at most); its stdout, or an error with the output.
    pub fn exec(&self, host: EcmpHost, args: &[&str]) -> Result<String> {
        let done = self.spawn(host, args)?.wait_output(EXEC_TIMEOUT)?;
        if !done.status.success() {
            bail!(
                "[{host}] {}: {}\n{}{}",
                args.join(" "),
                done.status,
                done.stdout,
                done.stderr
            );
        }
        Ok(done.stdout)
    }

    /// Starts `blb-echo` on backend `i` (name `be<i>`) on `ports`, IPv4; returns once it
    /// listens.
    pub fn spawn_echo(&self, i: usize, ports: &[u16]) -> Result<LabChild> {
        let host = EcmpHost::Backend(i);
        let bin = tool_bin("blb-echo")?;
        let mut cmd = self.command(host, &bin);
        cmd.arg("--name").arg(format!("be{i}"));
        for p in ports {
            cmd.arg("--tcp").arg(format!("0.0.0.0:{p}"));
        }
        let mut child = self.spawn_command(cmd, &format!("[{host}] blb-echo"))?;
        child.wait_for_output("blb-echo ready", Duration::from_secs(10))?;
        Ok(child)
    }

    /// The router's BIRD: a BGP session to every balancer slot (those not started yet stay
    /// idle until their BIRD connects), every route merged into a multipath kernel route.
    pub fn start_router_bird(&self) -> Result<LabChild> {
        let mut conf = format!(
            "log stderr all;\nrouter id {ROUTER_FARM};\nprotocol device {{\n  scan time 1;\n}}\nprotocol kernel {{\n  ipv4 {{ import none; export all; }};\n  merge paths on;\n}}\n"
        );
        for h in self.lb_hosts() {
            let addr = h.farm_v4().context("lb address")?;
            conf.push_str(&format!(
                "protocol bgp {name} {{\n  local {ROUTER_FARM} as {ROUTER_AS};\n  neighbor {addr} as {BALANCER_AS};\n  hold time 3;\n  connect retry time 1;\n  error wait time 1, 5;\n  ipv4 {{ import all; export none; }};\n}}\n",
                name = h.short()
            ));
        }
        let path = self.dir.join("router-bird.conf");
        std::fs::write(&path, conf)?;
        self.start_bird(EcmpHost::Router, &path, &self.dir.join("router-bird.ctl"))
    }

    /// Starts `bird -f` in `host` with `conf` and control socket `socket`; returns once the
    /// socket answers.
    pub fn start_bird(&self, host: EcmpHost, conf: &Path, socket: &Path) -> Result<LabChild> {
        let pid = socket.with_extension("pid");
        let mut cmd = self.command(host, "bird");
        cmd.arg("-f")
            .arg("-c")
            .arg(conf)
            .arg("-s")
            .arg(socket)
            .arg("-P")
            .arg(&pid);
        let mut child = self.spawn_command(cmd, &format!("[{host}] bird"))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let s = socket.to_string_lossy();
            if self
                .exec(host, &["birdc", "-s", &s, "show", "status"])
                .is_ok()
            {
                return Ok(child);
            }
            if !child.is_running() {
                bail!("bird in {host} exited: {}", child.stderr());
            }
            if Instant::now() >= deadline {
                bail!(
                    "bird in {host} did not answer within 10 s: {}",
                    child.stderr()
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// The balancer config of balancer `i` (its own sockets and routes file) with `services`.
    pub fn balancer_config(&self, i: usize, services: &str) -> String {
        let d = self.lb_dir(i);
        format!(
            "[dataplane]\ninterface = \"eth0\"\n\n[controller]\nsocket = \"{}\"\n\n[bgp]\nsocket = \"{}\"\nroutes_file = \"{}\"\n{services}",
            d.join("control.sock").display(),
            d.join("bird.ctl").display(),
            d.join("vips.conf").display(),
        )
    }

    /// Starts balancer `i`: its BIRD (with the config `balancer bgp bird-conf` prints), then
    /// `balancer run` with `config_toml`; returns once the balancer is ready.
    pub fn start_balancer(&self, i: usize, config_toml: &str) -> Result<EcmpBalancer> {
        let host = EcmpHost::Lb(i);
        let d = self.lb_dir(i);
        let config = d.join("balancer.toml");
        std::fs::write(&config, config_toml)?;
        let bin = balancer_bin()?;
        let bin = bin.to_string_lossy();
        let cfg = config.to_string_lossy();
        let id = host.farm_v4().context("lb address")?.to_string();
        let las = BALANCER_AS.to_string();
        let nas = ROUTER_AS.to_string();
        let neighbor = ROUTER_FARM.to_string();
        let mut bird_conf = self.exec(
            host,
            &[
                &bin,
                "bgp",
                "bird-conf",
                "--config",
                &cfg,
                "--router-id",
                &id,
                "--local-as",
                &las,
                "--neighbor",
                &neighbor,
                "--neighbor-as",
                &nas,
            ],
        )?;
        bird_conf.push_str("log stderr all;\n");
        let bird_path = d.join("bird.conf");
        std::fs::write(&bird_path, &bird_conf)?;
        let bird = self.start_bird(host, &bird_path, &d.join("bird.ctl"))?;
        let mut cmd = self.command(host, &*bin);
        cmd.arg("run")
            .arg("--config")
            .arg(&config)
            .arg("--pin-path")
            .arg(self.pin_path(i));
        let mut child = self.spawn_command(cmd, &format!("[{host}] balancer run"))?;
        child.wait_for_output("balancer ready", READY_TIMEOUT)?;
        Ok(EcmpBalancer {
            index: i,
            child,
            bird: Some(bird),
            socket: d.join("control.sock"),
        })
    }

    /// `balancer <args>` in balancer `i`'s namespace; its stdout (fails on non-zero).
    pub fn balancer_cli(&self, i: usize, args: &[&str]) -> Result<String> {
        let bin = balancer_bin()?;
        let bin = bin.to_string_lossy();
        let mut all = vec![&*bin];
        all.extend_from_slice(args);
        self.exec(EcmpHost::Lb(i), &all)
    }

    /// The next hops of the router's kernel route to `vip` (empty: no route).
    pub fn next_hops(&self, vip: Ipv4Addr) -> Result<BTreeSet<Ipv4Addr>> {
        let out = self.exec(
            EcmpHost::Router,
            &["ip", "-4", "route", "show", "exact", &format!("{vip}/32")],
        )?;
        let words: Vec<&str> = out.split_whitespace().collect();
        Ok(words
            .windows(2)
            .filter(|w| w[0] == "via")
            .filter_map(|w| w[1].parse().ok())
            .collect())
    }

    /// Waits (at most `timeout`) until the router's route to `vip` has exactly `want` as
    /// next hops; returns how long that took.
    pub fn wait_next_hops(
        &self,
        vip: Ipv4Addr,
        want: &BTreeSet<Ipv4Addr>,
        timeout: Duration,
    ) -> Result<Duration> {
        let start = Instant::now();
        loop {
            let got = self.next_hops(vip)?;
            if &got == want {
                return Ok(start.elapsed());
            }
            if start.elapsed() >= timeout {
                let bgp = self
                    .exec(
                        EcmpHost::Router,
                        &[
                            "birdc",
                            "-s",
                            &self.dir.join("router-bird.ctl").to_string_lossy(),
                            "show",
                            "route",
                            "all",
                        ],
                    )
                    .unwrap_or_default();
                bail!(
                    "router: next hops of {vip} are {got:?} after {timeout:?}, want {want:?}\n{bgp}"
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// `blb-client conns` from the client: `count` connections of `size` bytes.
    pub fn client_conns(&self, to: SocketAddr, count: usize, size: usize) -> Result<ConnsReport> {
        let bin = tool_bin("blb-client")?;
        let mut cmd = self.command(EcmpHost::Client, &bin);
        cmd.args([
            "conns",
            "--to",
            &to.to_string(),
            "--count",
            &count.to_string(),
            "--size",
            &size.to_string(),
            "--concurrency",
            "4",
        ]);
        let done = self
            .spawn_command(cmd, "[c] blb-client conns")?
            .wait_output(EXEC_TIMEOUT)?;
        serde_json::from_str(done.stdout.trim())
            .with_context(|| format!("conns report {:?} {:?}", done.stdout, done.stderr))
    }

    /// Starts a `blb-client stream` from the client (a chunk every `interval_ms` for
    /// `seconds`, each echo awaited up to `timeout_ms`); returns once it is connected.
    pub fn spawn_stream(
        &self,
        to: SocketAddr,
        seconds: f64,
        interval_ms: u64,
        timeout_ms: u64,
    ) -> Result<LabChild> {
        let bin = tool_bin("blb-client")?;
        let mut cmd = self.command(EcmpHost::Client, &bin);
        cmd.args([
            "stream",
            "--to",
            &to.to_string(),
            "--seconds",
            &seconds.to_string(),
            "--interval-ms",
            &interval_ms.to_string(),
            "--timeout-ms",
            &timeout_ms.to_string(),
        ]);
        let mut child = self.spawn_command(cmd, "[c] blb-client stream")?;
        child.wait_for_output("stream connected", Duration::from_secs(10))?;
        Ok(child)
    }

    /// New flows balancer `i` made so far (its service counters).
    pub fn new_flows(&self, i: usize) -> Result<u64> {
        let pin = self.pin_path(i);
        let out = self.balancer_cli(
            i,
            &["counters", "--pin-path", &pin.to_string_lossy(), "--json"],
        )?;
        let v: serde_json::Value = serde_json::from_str(&out)?;
        Ok(v["services"]
            .as_array()
            .map(|s| s.iter().filter_map(|x| x["new_flows"].as_u64()).sum())
            .unwrap_or(0))
    }

    /// Makes balancer `i` vanish silently, as a hung host behind a switch port that stays up:
    /// the bridge drops every frame from and to its port (nftables, bridge family), so the
    /// router's frames to its MAC go nowhere, no other host sees them, and no BGP
    /// notification or TCP reset leaves it; the router notices when the hold time runs out.
    pub fn blackhole(&self, i: usize) -> Result<()> {
        let port = EcmpHost::Lb(i).short();
        let rules = format!(
            "table bridge blb {{\n  chain blackhole {{\n    type filter hook forward priority 0; policy accept;\n    iifname \"{port}\" drop\n    oifname \"{port}\" drop\n  }}\n}}\n"
        );
        let path = self.dir.join(format!("blackhole-{port}.nft"));
        std::fs::write(&path, rules)?;
        self.exec(EcmpHost::Switch, &["nft", "-f", &path.to_string_lossy()])?;
        Ok(())
    }

    /// Takes balancer `i`'s link down (no FIN, no RST, no BGP notification). On this lab's
    /// bridge the port going down flushes its forwarding entries, so frames the router still
    /// sends to the balancer's MAC are flooded to every port, and the other balancers' XDP
    /// programs forward them (they do not check the destination MAC).
    pub fn link_down(&self, i: usize) -> Result<()> {
        ip(&[
            "-n",
            &self.ns(EcmpHost::Lb(i)),
            "link",
            "set",
            "eth0",
            "down",
        ])
    }
}

impl Drop for EcmpLab {
    fn drop(&mut self) {
        let namespaces = self.namespaces();
        for ns in &namespaces {
            kill_netns_processes(ns);
        }
        remove_pins(&PathBuf::from("/sys/fs/bpf").join(&self.prefix));
        remove_pins(&self.pass_pin_dir());
        for ns in &namespaces {
            if netns_path(ns).exists()
                && let Err(e) = ip(&["netns", "del", ns])
            {
                eprintln!("ecmp lab {}: {e:#}", self.prefix);
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A balancer of the ECMP lab with its BIRD.
#[derive(Debug)]
pub struct EcmpBalancer {
    /// Its number.
    pub index: usize,
    child: LabChild,
    bird: Option<LabChild>,
    socket: PathBuf,
}

impl EcmpBalancer {
    /// Its control socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Its log so far.
    pub fn stderr(&self) -> String {
        self.child.stderr()
    }

    /// Waits for `needle` in its log.
    pub fn wait_for_log(&mut self, needle: &str, timeout: Duration) -> Result<()> {
        self.child.wait_for_output(needle, timeout)
    }

    /// SIGTERM; waits up to 15 s for a clean exit.
    pub fn stop(&mut self) -> Result<bool> {
        self.child.signal(libc::SIGTERM)?;
        match self.child.wait_timeout(Duration::from_secs(15)) {
            Some(s) => Ok(s.success()),
            None => {
                self.child.kill();
                bail!("balancer {} did not stop within 15 s", self.index);
            }
        }
    }

    /// `kill -9` of the balancer and its BIRD.
    pub fn kill9(&mut self) {
        self.child.kill();
        if let Some(b) = self.bird.as_mut() {
            b.kill();
        }
    }
}

impl Drop for EcmpBalancer {
    fn drop(&mut self) {
        if self.child.is_running() {
            let _ = self.child.signal(libc::SIGTERM);
            if self.child.wait_timeout(Duration::from_secs(5)).is_none() {
                self.child.kill();
            }
        }
    }
}

/// Reads a finished stream's report.
pub fn ecmp_stream_report(child: LabChild, timeout: Duration) -> Result<StreamReport> {
    let done = child.wait_output(timeout)?;
    serde_json::from_str(done.stdout.lines().last().unwrap_or_default()).with_context(|| {
        format!(
            "parsing stream report; stdout {:?} stderr {:?}",
            done.stdout, done.stderr
        )
    })
}
