//! The network-namespace lab: a switch, a balancer host, a client and N backends.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Once;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::bins::{balancer_bin, tool_bin};
use crate::process::LabChild;
use crate::report::{ConnsReport, RateReport, StreamReport, UdpReport};

/// The IPv4 VIP the lab's balancer serves (added to its `eth0` by the balancer itself).
pub const VIP_V4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 100);
/// The IPv6 VIP.
pub const VIP_V6: Ipv6Addr = Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 0x100);
/// The port `blb-echo` listens on for TCP and UDP in [`Lab::spawn_echo`].
pub const ECHO_PORT: u16 = 7002;
/// The port `blb-echo` serves its small HTTP mode on in [`Lab::spawn_echo`].
pub const HTTP_PORT: u16 = 8080;
/// Every lab's namespaces start with this.
pub const PREFIX_BASE: &str = "blb";

/// Bounded wait for `balancer ready` on the balancer's output.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// Upper bound for one [`Lab::exec`].
const EXEC_TIMEOUT: Duration = Duration::from_secs(120);

static NEXT_LAB: AtomicU32 = AtomicU32::new(0);
static STALE_ONCE: Once = Once::new();

/// One machine of the lab, each its own network namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Host {
    /// `<p>-sw`: holds the bridge `br0` and the switch side of every veth.
    Switch,
    /// `<p>-lb`: the balancer (10.77.0.1, fd77::1; the VIPs are added by the balancer).
    Lb,
    /// `<p>-lb2`: the second balancer of a pair, with [`LabConfig::peer`] (10.77.0.3, fd77::3).
    Peer,
    /// `<p>-c`: the client (10.77.0.2, fd77::2).
    Client,
    /// `<p>-b<i>`, `i` from 1: backend `i` (10.77.0.1`i`, fd77::1`i`, name `be<i>`).
    Backend(usize),
}

impl Host {
    /// The namespace suffix and switch port name: `sw`, `lb`, `c`, `b1`…
    pub fn short(self) -> String {
        match self {
            Host::Switch => "sw".into(),
            Host::Lb => "lb".into(),
            Host::Peer => "lb2".into(),
            Host::Client => "c".into(),
            Host::Backend(i) => format!("b{i}"),
        }
    }

    fn host_octet(self) -> Option<u8> {
        match self {
            Host::Switch => None,
            Host::Lb => Some(1),
            Host::Peer => Some(3),
            Host::Client => Some(2),
            Host::Backend(i) => u8::try_from(10 + i).ok(),
        }
    }

    /// The host's IPv4 address on `eth0` (none for the switch).
    pub fn v4(self) -> Option<Ipv4Addr> {
        self.host_octet().map(|o| Ipv4Addr::new(10, 77, 0, o))
    }

    /// The host's IPv6 address on `eth0`: `fd77::<same digits as the IPv4 octet>`.
    pub fn v6(self) -> Option<Ipv6Addr> {
        let o = self.host_octet()?;
        format!("fd77::{o}").parse().ok()
    }

    /// The name `blb-echo` uses for this backend (`be<i>`), as seen in the id header.
    pub fn echo_name(self) -> String {
        match self {
            Host::Backend(i) => format!("be{i}"),
            other => other.short(),
        }
    }
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.short())
    }
}

/// How a lab is built. `Default` is what the balancer tests need.
#[derive(Debug, Clone)]
pub struct LabConfig {
    /// Number of backends (`<p>-b1` … `<p>-bN`), 0 to 89.
    pub backends: usize,
    /// Keep TX checksum offload on the hosts' `eth0`. Off by default: a veth sends
    /// CHECKSUM_PARTIAL packets, and once XDP rewrites and re-transmits such a frame
    /// (XDP_TX) the receiver would see the unfinished checksum and drop it.
    pub tx_checksum_offload: bool,
    /// A second balancer host, [`Host::Peer`] (an HA pair).
    pub peer: bool,
}

impl Default for LabConfig {
    fn default() -> Self {
        Self {
            backends: 3,
            tx_checksum_offload: false,
            peer: false,
        }
    }
}

/// A running lab. Dropping it (also while unwinding from a panic) kills every process in its
/// namespaces, removes the balancer's pins and deletes the namespaces.
#[derive(Debug)]
pub struct Lab {
    prefix: String,
    backends: usize,
    peer: bool,
    dir: PathBuf,
    balancer_started: AtomicBool,
    next_file: AtomicU32,
}

impl Lab {
    /// A lab with `backends` backends and the default settings.
    pub fn new(backends: usize) -> Result<Self> {
        Self::with_config(LabConfig {
            backends,
            ..LabConfig::default()
        })
    }

    /// A lab built as `config` says. Needs root.
    pub fn with_config(config: LabConfig) -> Result<Self> {
        if !is_root() {
            bail!("the namespace lab needs root (network namespaces, veth, XDP)");
        }
        if config.backends > 89 {
            bail!("at most 89 backends (10.77.0.11 ..= 10.77.0.99)");
        }
        cleanup_stale_once();
        let prefix = next_prefix();
        let dir = std::env::temp_dir().join(&prefix);
        // The lab exists (and cleans up on drop) from here on, even if building it fails.
        let lab = Self {
            prefix,
            backends: config.backends,
            peer: config.peer,
            dir,
            balancer_started: AtomicBool::new(false),
            next_file: AtomicU32::new(0),
        };
        std::fs::create_dir_all(&lab.dir)
            .with_context(|| format!("creating {}", lab.dir.display()))?;
        lab.build(&config)
            .with_context(|| format!("building lab {}", lab.prefix))?;
        Ok(lab)
    }

    fn build(&self, config: &LabConfig) -> Result<()> {
        ensure_bpffs()?;
        let sw = self.ns(Host::Switch);
        ip(&["netns", "add", &sw])?;
        ip(&["-n", &sw, "link", "set", "lo", "up"])?;
        ip(&["-n", &sw, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &sw, "link", "set", "br0", "up"])?;
        for host in self.hosts() {
            let ns = self.ns(host);
            let port = host.short();
            ip(&["netns", "add", &ns])?;
            // Created inside the switch namespace, the peer moved straight into the host:
            // no name ever appears in the root namespace, so labs never collide.
            ip(&[
                "-n", &sw, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns",
                &ns,
            ])?;
            ip(&["-n", &sw, "link", "set", &port, "master", "br0"])?;
            ip(&["-n", &sw, "link", "set", &port, "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            let (Some(v4), Some(v6)) = (host.v4(), host.v6()) else {
                continue;
            };
            ip(&["-n", &ns, "addr", "add", &format!("{v4}/24"), "dev", "eth0"])?;
            // nodad: usable at once, no 1-2 s of "tentative".
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{v6}/64"),
                "dev",
                "eth0",
                "nodad",
            ])?;
            if !config.tx_checksum_offload {
                self.exec(host, &["ethtool", "-K", "eth0", "tx", "off"])?;
            }
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
        }
        // XDP_TX/XDP_REDIRECT frames from the balancer's eth0 are only delivered when its
        // veth peer runs NAPI. GRO alone was seen to stall after a few dozen flows on this
        // kernel; a pass-through XDP program on the peer is reliable. Its link is pinned in a
        // directory of its own (`<pin_path>-pass`): the balancer's pin directory is the
        // balancer's to replace.
        let bin = balancer_bin()?;
        let bin = bin.to_string_lossy();
        for lb in self.balancer_hosts() {
            let port = lb.short();
            let pass_pin = self.pass_pin_dir().join(format!("link-{port}"));
            let pin = pass_pin.to_string_lossy();
            self.exec(
                Host::Switch,
                &[&bin, "xdp-pass", "--interface", &port, "--pin", &pin],
            )?;
            self.exec(
                lb,
                &[
                    "sysctl",
                    "-q",
                    "-w",
                    "net.ipv4.ip_forward=1",
                    "net.ipv6.conf.all.forwarding=1",
                    "net.ipv4.conf.all.rp_filter=0",
                    "net.ipv4.conf.eth0.rp_filter=0",
                    // The lb forwards out the port it received on (nat hairpin, nftables bench):
                    // no ICMP redirects that would teach the client to bypass it.
                    "net.ipv4.conf.all.send_redirects=0",
                    "net.ipv4.conf.eth0.send_redirects=0",
                ],
            )?;
        }
        // Connection-rate runs close tens of thousands of connections from the client:
        // let it reuse TIME_WAIT ports instead of running out.
        self.exec(
            Host::Client,
            &[
                "sysctl",
                "-q",
                "-w",
                "net.ipv4.tcp_tw_reuse=1",
                "net.ipv4.ip_local_port_range=10000 65000",
            ],
        )?;
        Ok(())
    }

    /// The unique prefix of this lab's names (`blb<pid>x<n>`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Number of backends.
    pub fn backends(&self) -> usize {
        self.backends
    }

    /// The namespace name of `host`: `<prefix>-<short>`.
    pub fn ns(&self, host: Host) -> String {
        format!("{}-{}", self.prefix, host.short())
    }

    /// All hosts with an `eth0` (everything but the switch): lb, client, backends.
    pub fn hosts(&self) -> Vec<Host> {
        let mut v = self.balancer_hosts();
        v.push(Host::Client);
        v.extend((1..=self.backends).map(Host::Backend));
        v
    }

    /// The balancer hosts: `Lb`, and `Peer` in a pair lab.
    pub fn balancer_hosts(&self) -> Vec<Host> {
        if self.peer {
            vec![Host::Lb, Host::Peer]
        } else {
            vec![Host::Lb]
        }
    }

    /// The backend hosts, `Backend(1)` … `Backend(N)`.
    pub fn backend_hosts(&self) -> Vec<Host> {
        (1..=self.backends).map(Host::Backend).collect()
    }

    /// A scratch directory, removed with the lab.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the switch port's pass-through XDP link is pinned: `/sys/fs/bpf/<prefix>-pass`.
    pub fn pass_pin_dir(&self) -> PathBuf {
        PathBuf::from("/sys/fs/bpf").join(format!("{}-pass", self.prefix))
    }

    /// Where this lab's balancer pins its program, link and maps: `/sys/fs/bpf/<prefix>`.
    pub fn pin_path(&self) -> PathBuf {
        PathBuf::from("/sys/fs/bpf").join(&self.prefix)
    }

    /// The pin directory of the balancer on `host`: [`Lab::pin_path`] for `Lb`,
    /// `/sys/fs/bpf/<prefix>-lb2` for `Peer`.
    pub fn pin_path_of(&self, host: Host) -> PathBuf {
        match host {
            Host::Peer => PathBuf::from("/sys/fs/bpf").join(format!("{}-lb2", self.prefix)),
            _ => self.pin_path(),
        }
    }

    /// A `Command` running `program` inside `host`'s network namespace (through
    /// `nsenter --net`, so the mount namespace, and with it /sys/fs/bpf, stays the host's).
    pub fn command(&self, host: Host, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.ns(host)))
            .arg("--")
            .arg(program);
        c
    }

    /// Runs `args` in `host` (bounded to two minutes) and returns its stdout; fails with the
    /// output when it exits non-zero.
    pub fn exec(&self, host: Host, args: &[&str]) -> Result<String> {
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

    /// Starts `args` in `host`, stdin closed, stdout and stderr captured. Killed when the
    /// handle is dropped (and in any case when the lab is).
    pub fn spawn(&self, host: Host, args: &[&str]) -> Result<LabChild> {
        let (program, rest) = args.split_first().context("empty command")?;
        let mut cmd = self.command(host, program);
        cmd.args(rest);
        self.spawn_command(cmd, &format!("[{host}] {}", args.join(" ")))
    }

    /// Starts a prepared [`Lab::command`] with stdin closed and stdout/stderr captured.
    pub fn spawn_command(&self, mut cmd: Command, what: &str) -> Result<LabChild> {
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {what}"))?;
        Ok(LabChild::new(child, what.to_string()))
    }

    /// Starts `blb-echo` on backend `i` as `be<i>`: TCP and UDP echo on port [`ECHO_PORT`]
    /// and HTTP on [`HTTP_PORT`], IPv4 and IPv6; returns once it listens.
    pub fn spawn_echo(&self, i: usize) -> Result<LabChild> {
        let host = Host::Backend(i);
        let name = host.echo_name();
        let tcp4 = format!("0.0.0.0:{ECHO_PORT}");
        let tcp6 = format!("[::]:{ECHO_PORT}");
        let http4 = format!("0.0.0.0:{HTTP_PORT}");
        let http6 = format!("[::]:{HTTP_PORT}");
        self.spawn_tool(
            host,
            "blb-echo",
            &[
                "--name", &name, "--tcp", &tcp4, "--tcp", &tcp6, "--udp", &tcp4, "--udp", &tcp6,
                "--http", &http4, "--http", &http6,
            ],
        )
    }

    /// Starts `blb-echo` on every backend (see [`Lab::spawn_echo`]).
    pub fn spawn_echo_all(&self) -> Result<Vec<LabChild>> {
        (1..=self.backends).map(|i| self.spawn_echo(i)).collect()
    }

    /// Starts a `blb-echo` with arguments of your own in `host`; returns once it listens.
    pub fn spawn_tool(&self, host: Host, tool: &str, args: &[&str]) -> Result<LabChild> {
        let bin = tool_bin(tool)?;
        let mut cmd = self.command(host, &bin);
        cmd.args(args);
        let mut child = self.spawn_command(cmd, &format!("[{host}] {tool} {}", args.join(" ")))?;
        if tool == "blb-echo" {
            child.wait_for_output("blb-echo ready", Duration::from_secs(10))?;
        }
        Ok(child)
    }

    /// Runs `blb-client <args>` in the client namespace and returns its stdout (the JSON
    /// report) whatever its exit status; fails only if it cannot run or prints nothing.
    pub fn client(&self, args: &[&str]) -> Result<String> {
        let bin = tool_bin("blb-client")?;
        let mut cmd = self.command(Host::Client, &bin);
        cmd.args(args);
        let what = format!("[c] blb-client {}", args.join(" "));
        let done = self.spawn_command(cmd, &what)?.wait_output(EXEC_TIMEOUT)?;
        if done.stdout.trim().is_empty() {
            bail!("{what}: {} and no report\n{}", done.status, done.stderr);
        }
        Ok(done.stdout)
    }

    /// `blb-client conns`: `count` connections of `size` random bytes, `concurrency` at a time.
    pub fn client_conns(
        &self,
        to: SocketAddr,
        count: usize,
        size: usize,
        concurrency: usize,
    ) -> Result<ConnsReport> {
        let out = self.client(&[
            "conns",
            "--to",
            &to.to_string(),
            "--count",
            &count.to_string(),
            "--size",
            &size.to_string(),
            "--concurrency",
            &concurrency.to_string(),
        ])?;
        serde_json::from_str(&out).with_context(|| format!("parsing conns report {out:?}"))
    }

    /// Starts `blb-client stream` in the background (one long-lived connection sending a
    /// chunk every `interval_ms` for `seconds`); read its report with
    /// [`stream_report`] once it exits.
    pub fn spawn_stream(&self, to: SocketAddr, seconds: f64, interval_ms: u64) -> Result<LabChild> {
        let bin = tool_bin("blb-client")?;
        let args = [
            "stream".to_string(),
            "--to".into(),
            to.to_string(),
            "--seconds".into(),
            seconds.to_string(),
            "--interval-ms".into(),
            interval_ms.to_string(),
        ];
        let mut cmd = self.command(Host::Client, &bin);
        cmd.args(&args);
        let mut child = self.spawn_command(cmd, &format!("[c] blb-client {}", args.join(" ")))?;
        child.wait_for_output("stream connected", Duration::from_secs(10))?;
        Ok(child)
    }

    /// `blb-client udp`: `count` datagrams, one at a time.
    pub fn client_udp(&self, to: SocketAddr, count: usize) -> Result<UdpReport> {
        let out = self.client(&[
            "udp",
            "--to",
            &to.to_string(),
            "--count",
            &count.to_string(),
        ])?;
        serde_json::from_str(&out).with_context(|| format!("parsing udp report {out:?}"))
    }

    /// `blb-client rate`: short connections for `seconds` with `concurrency` workers.
    pub fn client_rate(
        &self,
        to: SocketAddr,
        seconds: f64,
        concurrency: usize,
    ) -> Result<RateReport> {
        let out = self.client(&[
            "rate",
            "--to",
            &to.to_string(),
            "--seconds",
            &seconds.to_string(),
            "--concurrency",
            &concurrency.to_string(),
        ])?;
        serde_json::from_str(&out).with_context(|| format!("parsing rate report {out:?}"))
    }

    /// Makes `from` resolve the link-layer address of every other host (one ping each, v4
    /// and v6), as traffic or health checks would. Fails if a host does not answer.
    pub fn resolve_neighbours(&self, from: Host) -> Result<()> {
        for h in self.hosts().into_iter().filter(|h| *h != from) {
            for addr in [h.v4().map(IpAddr::V4), h.v6().map(IpAddr::V6)]
                .into_iter()
                .flatten()
            {
                self.exec(
                    from,
                    &["ping", "-q", "-c", "1", "-W", "2", &addr.to_string()],
                )?;
            }
        }
        Ok(())
    }

    /// A `[controller]` table naming this lab's own control socket, for configs that need no
    /// other controller setting: every lab's balancer has its own socket (see
    /// [`Lab::start_balancer_file`]).
    pub fn controller_section(&self) -> String {
        format!(
            "\n[controller]\nsocket = \"{}\"\n",
            self.dir.join("control.sock").display()
        )
    }

    /// Writes `contents` to a new file in [`Lab::dir`] and returns its path.
    pub fn write_file(&self, name_hint: &str, contents: &str) -> Result<PathBuf> {
        let n = self.next_file.fetch_add(1, Ordering::Relaxed);
        let path = self.dir.join(format!("{n}-{name_hint}"));
        std::fs::write(&path, contents).with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }

    /// Starts `balancer run --config <file> --pin-path <pin_path>` in the lb namespace and
    /// waits (20 s at most) for `balancer ready` on its output.
    pub fn start_balancer(&self, config_toml: &str) -> Result<BalancerProc> {
        self.start_balancer_with(config_toml, &[])
    }

    /// Like [`Lab::start_balancer`], with extra arguments after the standard ones.
    pub fn start_balancer_with(&self, config_toml: &str, extra: &[&str]) -> Result<BalancerProc> {
        self.start_balancer_on(Host::Lb, config_toml, extra)
    }

    /// Starts `balancer run` on balancer host `host` (`Lb` or `Peer`) with its own pins.
    pub fn start_balancer_on(
        &self,
        host: Host,
        config_toml: &str,
        extra: &[&str],
    ) -> Result<BalancerProc> {
        let config = self.write_file("balancer.toml", config_toml)?;
        self.start_balancer_file(host, &config, extra)
    }

    /// Starts `balancer run --config <config>` on `host` (a file written before, e.g. to run
    /// the same file again after a kill).
    pub fn start_balancer_file(
        &self,
        host: Host,
        config: &Path,
        extra: &[&str],
    ) -> Result<BalancerProc> {
        let bin = balancer_bin()?;
        let config = config.to_path_buf();
        // Labs run in parallel: a balancer on the default socket would find another lab's
        // there and refuse to start (or, on a developer's box, the real one).
        let Some(socket) = control_socket(&config)? else {
            bail!(
                "{}: a lab's config must name its own [controller] socket (Lab::controller_section)",
                config.display()
            );
        };
        let pin = self.pin_path_of(host);
        let mut cmd = self.command(host, &bin);
        cmd.arg("run")
            .arg("--config")
            .arg(&config)
            .arg("--pin-path")
            .arg(&pin)
            .args(extra);
        self.balancer_started.store(true, Ordering::Relaxed);
        let mut child = self.spawn_command(cmd, &format!("[{host}] balancer run"))?;
        child.wait_for_output("balancer ready", READY_TIMEOUT)?;
        // The promise behind every `balancer status` a test makes right after this: ready
        // means the control socket is listening (no retry here, so a race shows).
        if !socket.exists() {
            bail!(
                "[{host}] balancer said ready before its control socket {} existed",
                socket.display()
            );
        }
        Ok(BalancerProc { child, config })
    }

    /// Runs `balancer <args>` in the lb namespace and returns its stdout (fails on non-zero).
    pub fn balancer_cli(&self, args: &[&str]) -> Result<String> {
        self.balancer_cli_on(Host::Lb, args)
    }

    /// Runs `balancer <args>` on balancer host `host` and returns its stdout.
    pub fn balancer_cli_on(&self, host: Host, args: &[&str]) -> Result<String> {
        let bin = balancer_bin()?;
        let mut cmd = self.command(host, &bin);
        cmd.args(args);
        let what = format!("[{host}] balancer {}", args.join(" "));
        let done = self.spawn_command(cmd, &what)?.wait_output(EXEC_TIMEOUT)?;
        if !done.status.success() {
            bail!("{what}: {}\n{}{}", done.status, done.stdout, done.stderr);
        }
        Ok(done.stdout)
    }

    /// `balancer counters --pin-path <pin_path> --json`, parsed.
    pub fn counters(&self) -> Result<serde_json::Value> {
        let pin = self.pin_path();
        let pin = pin.to_string_lossy();
        let out = self.balancer_cli(&["counters", "--pin-path", &pin, "--json"])?;
        serde_json::from_str(&out).with_context(|| format!("parsing counters {out:?}"))
    }

    /// `balancer teardown --pin-path <pin_path>`: detaches the program and removes the pins.
    pub fn teardown_balancer(&self) -> Result<()> {
        let pin = self.pin_path();
        let pin = pin.to_string_lossy();
        self.balancer_cli(&["teardown", "--pin-path", &pin])?;
        Ok(())
    }

    /// True while the namespace of `host` exists.
    pub fn ns_exists(&self, host: Host) -> bool {
        netns_path(&self.ns(host)).exists()
    }

    /// Names of all namespaces of this lab (switch last).
    pub fn namespaces(&self) -> Vec<String> {
        let mut v: Vec<String> = self.hosts().into_iter().map(|h| self.ns(h)).collect();
        v.push(self.ns(Host::Switch));
        v
    }

    /// Removes namespaces, pins and scratch directories left by labs of processes that no
    /// longer run (a crashed or killed earlier run). Runs once per process before the first
    /// lab is built; returns how many labs were removed.
    pub fn cleanup_stale() -> Result<usize> {
        let mut stale = std::collections::BTreeSet::new();
        let mut namespaces = Vec::new();
        if let Ok(entries) = std::fs::read_dir("/run/netns") {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if let Some(prefix) = stale_prefix(&name) {
                    stale.insert(prefix);
                    namespaces.push(name);
                }
            }
        }
        for dir in ["/sys/fs/bpf".into(), std::env::temp_dir()] {
            if let Ok(entries) = std::fs::read_dir(&dir) {
                for e in entries.flatten() {
                    let name = e.file_name().to_string_lossy().into_owned();
                    if let Some(prefix) = stale_prefix(&name) {
                        stale.insert(prefix);
                    }
                }
            }
        }
        // Hosts before switches, so the veths go with their host namespace.
        namespaces.sort_by_key(|n| n.ends_with("-sw"));
        for ns in &namespaces {
            kill_netns_processes(ns);
        }
        for prefix in &stale {
            remove_pins(&PathBuf::from("/sys/fs/bpf").join(prefix));
            remove_pins(&PathBuf::from("/sys/fs/bpf").join(format!("{prefix}-pass")));
            remove_pins(&PathBuf::from("/sys/fs/bpf").join(format!("{prefix}-lb2")));
        }
        for ns in &namespaces {
            let _ = ip(&["netns", "del", ns]);
        }
        for prefix in &stale {
            let _ = std::fs::remove_dir_all(std::env::temp_dir().join(prefix));
        }
        Ok(stale.len())
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let namespaces = self.namespaces();
        for ns in &namespaces {
            kill_netns_processes(ns);
        }
        if self.balancer_started.load(Ordering::Relaxed)
            && self.pin_path().exists()
            && let Err(e) = self.teardown_balancer()
        {
            eprintln!("lab {}: balancer teardown: {e:#}", self.prefix);
        }
        if self.peer
            && self.balancer_started.load(Ordering::Relaxed)
            && self.pin_path_of(Host::Peer).exists()
        {
            let pin = self.pin_path_of(Host::Peer);
            let pin = pin.to_string_lossy();
            if let Err(e) = self.balancer_cli_on(Host::Peer, &["teardown", "--pin-path", &pin]) {
                eprintln!("lab {}: peer balancer teardown: {e:#}", self.prefix);
            }
        }
        remove_pins(&self.pin_path());
        remove_pins(&self.pin_path_of(Host::Peer));
        remove_pins(&self.pass_pin_dir());
        for ns in &namespaces {
            if netns_path(ns).exists()
                && let Err(e) = ip(&["netns", "del", ns])
            {
                eprintln!("lab {}: {e:#}", self.prefix);
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The balancer controller started by [`Lab::start_balancer`].
///
/// Dropping it stops the process (SIGTERM, then SIGKILL after 5 s) but leaves the pinned
/// dataplane in place, like a normal stop of the service; the lab tears the pins down when it
/// is dropped (or call [`Lab::teardown_balancer`]). So a test can stop or `kill -9` one
/// balancer and start the next on the same pins.
#[derive(Debug)]
pub struct BalancerProc {
    child: LabChild,
    config: PathBuf,
}

impl BalancerProc {
    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The config file it was started with (rewrite it, then [`BalancerProc::signal`] SIGHUP).
    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// Everything it wrote to stderr (its log) so far.
    pub fn stderr(&self) -> String {
        self.child.stderr()
    }

    /// Everything it wrote to stdout so far.
    pub fn stdout(&self) -> String {
        self.child.stdout()
    }

    /// stdout and stderr together (for "no PHI in any log" checks).
    pub fn logs(&self) -> String {
        format!("{}{}", self.child.stdout(), self.child.stderr())
    }

    /// Waits up to `timeout` for `needle` to appear in its output.
    pub fn wait_for_log(&mut self, needle: &str, timeout: Duration) -> Result<()> {
        self.child.wait_for_output(needle, timeout)
    }

    /// Sends a signal (e.g. `libc::SIGHUP`).
    pub fn signal(&mut self, signal: i32) -> Result<()> {
        self.child.signal(signal)
    }

    /// True while the process runs.
    pub fn is_running(&mut self) -> bool {
        self.child.is_running()
    }

    /// SIGTERM, then waits up to 10 s (SIGKILL after that). Returns whether it exited
    /// successfully; the pins stay.
    pub fn stop(&mut self) -> Result<bool> {
        self.child.signal(libc::SIGTERM)?;
        match self.child.wait_timeout(Duration::from_secs(10)) {
            Some(status) => Ok(status.success()),
            None => {
                self.child.kill();
                bail!("balancer did not stop within 10 s of SIGTERM; killed");
            }
        }
    }

    /// `kill -9`: no chance to clean up; the pins stay.
    pub fn kill9(&mut self) {
        self.child.kill();
    }
}

/// Lines of the balancer's own log a failing test prints (its last ones).
const LOG_TAIL_ON_FAILURE: usize = 60;

impl Drop for BalancerProc {
    fn drop(&mut self) {
        // A failing test shows what the daemon said last (metadata only: it never logs a
        // payload), so a failure seen only in CI's output can be read without a rerun.
        if std::thread::panicking() {
            let logs = self.logs();
            let lines: Vec<&str> = logs.lines().collect();
            let from = lines.len().saturating_sub(LOG_TAIL_ON_FAILURE);
            eprintln!(
                "--- balancer (pid {}, {}) log, last {} of {} lines{} ---",
                self.child.id(),
                self.config.display(),
                lines.len() - from,
                lines.len(),
                if self.child.is_running() {
                    ""
                } else {
                    ", exited"
                }
            );
            for l in &lines[from..] {
                eprintln!("{l}");
            }
        }
        if self.child.is_running() {
            let _ = self.child.signal(libc::SIGTERM);
            if self.child.wait_timeout(Duration::from_secs(5)).is_none() {
                self.child.kill();
            }
        }
    }
}

/// Reads the report of a finished `blb-client stream` (see [`Lab::spawn_stream`]).
pub fn stream_report(child: LabChild, timeout: Duration) -> Result<StreamReport> {
    let done = child.wait_output(timeout)?;
    serde_json::from_str(done.stdout.lines().last().unwrap_or_default()).with_context(|| {
        format!(
            "parsing stream report; stdout {:?} stderr {:?}",
            done.stdout, done.stderr
        )
    })
}

/// A socket address on the IPv4 VIP.
pub fn vip4(port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(VIP_V4), port)
}

/// A socket address on the IPv6 VIP.
pub fn vip6(port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V6(VIP_V6), port)
}

/// Removes the labs of dead processes, once per process (before its first lab).
pub(crate) fn cleanup_stale_once() {
    STALE_ONCE.call_once(|| {
        if let Err(e) = Lab::cleanup_stale() {
            eprintln!("lab: cleaning up stale labs: {e:#}");
        }
    });
}

/// A new lab prefix, `blb<pid>x<n>`, unique in this process (other topologies use it too,
/// so [`Lab::cleanup_stale`] finds their namespaces, pins and scratch directories).
pub(crate) fn next_prefix() -> String {
    let n = NEXT_LAB.fetch_add(1, Ordering::Relaxed);
    format!("{PREFIX_BASE}{}x{n}", std::process::id())
}

pub(crate) fn is_root() -> bool {
    // SAFETY: geteuid(2) cannot fail and touches no memory.
    unsafe { libc::geteuid() == 0 }
}

pub(crate) fn netns_path(ns: &str) -> PathBuf {
    PathBuf::from("/run/netns").join(ns)
}

/// Runs `ip <args>` in the root namespace; fails with its stderr.
pub(crate) fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running ip (iproute2 installed?)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// SIGKILLs every process in `ns` and waits (2 s at most) until none is left.
pub(crate) fn kill_netns_processes(ns: &str) {
    if !netns_path(ns).exists() {
        return;
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let pids: Vec<libc::pid_t> = Command::new("ip")
            .args(["netns", "pids", ns])
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .split_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        if pids.is_empty() || Instant::now() >= deadline {
            return;
        }
        for pid in pids {
            // SAFETY: kill(2) has no memory effects.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Removes a pin directory (bpffs files unlink like any file).
pub(crate) fn remove_pins(path: &Path) {
    if path.exists()
        && let Err(e) = std::fs::remove_dir_all(path)
    {
        eprintln!("removing {}: {e}", path.display());
    }
}

/// The lab prefix of `name` (`blb<pid>x<n>[-…]`) when the process that made it is gone.
fn stale_prefix(name: &str) -> Option<String> {
    let prefix = name.split('-').next()?;
    let rest = prefix.strip_prefix(PREFIX_BASE)?;
    let (pid, n) = rest.split_once('x')?;
    if pid.is_empty() || n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let pid: u32 = pid.parse().ok()?;
    let alive = Path::new("/proc").join(pid.to_string()).exists();
    (!alive).then(|| prefix.to_string())
}

/// Mounts the BPF filesystem on /sys/fs/bpf when it is not (the balancer pins there).
pub(crate) fn ensure_bpffs() -> Result<()> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    if mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf"))
    {
        return Ok(());
    }
    let out = Command::new("mount")
        .args(["-t", "bpf", "bpf", "/sys/fs/bpf"])
        .output()
        .context("running mount")?;
    if !out.status.success() {
        bail!(
            "mount -t bpf bpf /sys/fs/bpf: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The `[controller] socket` a config file names, if it names one.
fn control_socket(config: &Path) -> Result<Option<PathBuf>> {
    let text =
        std::fs::read_to_string(config).with_context(|| format!("reading {}", config.display()))?;
    let value: toml::Table =
        toml::from_str(&text).with_context(|| format!("parsing {}", config.display()))?;
    Ok(value
        .get("controller")
        .and_then(|c| c.get("socket"))
        .and_then(|s| s.as_str())
        .map(PathBuf::from))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert_eq!(Host::Lb.v4(), Some(Ipv4Addr::new(10, 77, 0, 1)));
        assert_eq!(Host::Backend(3).v4(), Some(Ipv4Addr::new(10, 77, 0, 13)));
        assert_eq!(Host::Backend(1).v6(), "fd77::11".parse().ok());
        assert_eq!(Host::Switch.v4(), None);
        assert_eq!(vip6(80).to_string(), "[fd77::100]:80");
    }

    #[test]
    fn stale_names() {
        // pid 0 never has a /proc entry of its own.
        assert_eq!(stale_prefix("blb0x3-sw").as_deref(), Some("blb0x3"));
        assert_eq!(stale_prefix("blb0x3").as_deref(), Some("blb0x3"));
        let me = format!("blb{}x0-lb", std::process::id());
        assert_eq!(stale_prefix(&me), None);
        assert_eq!(stale_prefix("other-ns"), None);
        assert_eq!(stale_prefix("blbx-sw"), None);
    }
}
