//! An HA pair in the lab ([`crate::LabConfig::peer`]): two balancers with Debian's keepalived
//! (VRRPv3, unicast adverts, 100 ms) in their own namespaces, in front of three backends
//! (echo, and HL7 listeners on be1 and be2). keepalived owns the VIPs and the SNAT address;
//! the active balancer mirrors its flows and failover choices to the standby. Used by the
//! pair lab test and the demo.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    thread::sleep,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::{BalancerProc, Host, Lab, LabChild, balancer_bin, tool_bin};

/// The second VIP, for the DSR service (the backends hold it on their loopback).
pub const DSR_VIP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 101);
/// The SNAT address: virtual, moved by keepalived with the VIPs.
pub const SNAT: &str = "10.77.0.200";
pub const HL7_PORT: u16 = 6661;

/// One balancer of the pair.
pub struct Node {
    /// Its namespace.
    pub host: Host,
    /// Its `[ha] node`.
    pub name: &'static str,
    /// Its config file.
    pub config: PathBuf,
    /// Its control socket.
    pub socket: PathBuf,
    /// `balancer run`, while it runs.
    pub balancer: Option<BalancerProc>,
    /// keepalived, while it runs.
    pub keepalived: Option<LabChild>,
    /// keepalived starts so far.
    starts: u32,
}

/// The pair's config for `node` (own and peer addresses), and its control socket.
pub fn config(
    lab: &Lab,
    node: &str,
    own: Ipv4Addr,
    peer: Ipv4Addr,
    key: &Path,
) -> (String, PathBuf) {
    // A directory per node: the role and keepalived track files live beside the socket, as
    // /run/balancer does on each machine.
    let dir = lab.dir().join(node);
    let _ = std::fs::create_dir_all(&dir);
    let socket = dir.join("control.sock");
    let text = format!(
        r#"
[dataplane]
interface = "eth0"
snat_ipv4 = "{SNAT}"

[controller]
socket = "{socket}"

[[service]]
name = "web"
vip = "10.77.0.100:7002"
health = {{ kind = "tcp", interval = "250ms", fall = 2, rise = 2 }}
backends = [ {{ address = "10.77.0.11:7002" }}, {{ address = "10.77.0.12:7002" }}, {{ address = "10.77.0.13:7002" }} ]

[[service]]
name = "web-dsr"
vip = "{DSR_VIP}:7002"
forwarding = "dsr"
health = {{ kind = "tcp", interval = "250ms", fall = 2, rise = 2 }}
backends = [ {{ address = "10.77.0.11:7002" }}, {{ address = "10.77.0.12:7002" }}, {{ address = "10.77.0.13:7002" }} ]

[[service]]
name = "hl7"
vip = "10.77.0.100:{HL7_PORT}"
scheduler = "failover"
failback = false
health = {{ kind = "mllp", interval = "250ms", fall = 2, rise = 2 }}
backends = [ {{ address = "10.77.0.11:{HL7_PORT}" }}, {{ address = "10.77.0.12:{HL7_PORT}" }} ]

[ha]
node = "{node}"
bind = "{own}:7946"
peer = "{peer}:7946"
key_file = "{key}"
advert_interval = "100ms"
priority = {priority}
resync_interval = "5s"
"#,
        socket = socket.display(),
        key = key.display(),
        // Different priorities: with equal ones VRRP breaks the tie by the higher address,
        // which then takes over whenever it returns, nopreempt or not.
        priority = if own.octets()[3] == 1 { 150 } else { 100 },
    );
    (text, socket)
}

impl Node {
    /// The balancer on `host` (`Lb` or `Peer`), nothing started.
    pub fn new(lab: &Lab, host: Host, name: &'static str, key: &Path) -> Result<Node> {
        let (own, peer) = match host {
            Host::Lb => (Host::Lb, Host::Peer),
            _ => (Host::Peer, Host::Lb),
        };
        let own = own.v4().context("v4")?;
        let peer = peer.v4().context("v4")?;
        let (text, socket) = config(lab, name, own, peer, key);
        let config = lab.write_file(&format!("{name}.toml"), &text)?;
        Ok(Node {
            host,
            name,
            config,
            socket,
            balancer: None,
            keepalived: None,
            starts: 0,
        })
    }

    /// Starts `balancer run` (returns once it is ready).
    pub fn start_balancer(&mut self, lab: &Lab) -> Result<()> {
        self.balancer = Some(
            lab.start_balancer_file(self.host, &self.config, &[])
                .with_context(|| format!("starting balancer {}", self.name))?,
        );
        Ok(())
    }

    /// Generates keepalived's config with `balancer ha keepalived-conf` and starts it.
    pub fn start_keepalived(&mut self, lab: &Lab) -> Result<()> {
        let bin = balancer_bin()?;
        let conf = lab
            .balancer_cli_on(
                self.host,
                &[
                    "ha",
                    "keepalived-conf",
                    "--config",
                    &self.config.to_string_lossy(),
                    "--balancer",
                    &bin.to_string_lossy(),
                ],
            )
            .context("balancer ha keepalived-conf")?;
        let path = lab.write_file(&format!("keepalived-{}.conf", self.name), &conf)?;
        // Fresh pid files each start: a killed keepalived's files must not stop the next one.
        self.starts += 1;
        let pid = lab
            .dir()
            .join(format!("keepalived-{}-{}.pid", self.name, self.starts));
        let vrrp_pid = self.vrrp_pid(lab);
        let args = [
            "keepalived".to_string(),
            "--dont-fork".into(),
            "--log-console".into(),
            "--no-syslog".into(),
            "--vrrp".into(),
            format!("--use-file={}", path.display()),
            format!("--pid={}", pid.display()),
            format!("--vrrp_pid={}", vrrp_pid.display()),
        ];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.keepalived = Some(lab.spawn(self.host, &args)?);
        Ok(())
    }

    fn vrrp_pid(&self, lab: &Lab) -> PathBuf {
        lab.dir()
            .join(format!("keepalived-{}-{}-vrrp.pid", self.name, self.starts))
    }

    /// `kill -9` of keepalived: its VRRP child first, then the parent (no clean-up, the
    /// addresses stay on the interface).
    pub fn kill_keepalived(&mut self, lab: &Lab) {
        if let Ok(pid) = std::fs::read_to_string(self.vrrp_pid(lab))
            && let Ok(pid) = pid.trim().parse::<i32>()
        {
            // SAFETY: plain kill(2) of a process this lab started.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
        if let Some(k) = self.keepalived.as_mut() {
            k.kill();
        }
        self.keepalived = None;
    }

    /// `balancer status --json`, if it answers.
    pub fn status(&self, lab: &Lab) -> Option<serde_json::Value> {
        let out = lab
            .balancer_cli_on(
                self.host,
                &[
                    "status",
                    "--json",
                    "--socket",
                    &self.socket.to_string_lossy(),
                ],
            )
            .ok()?;
        serde_json::from_str(&out).ok()
    }

    /// Its HA role as its status says (`none` when it does not answer).
    pub fn role(&self, lab: &Lab) -> String {
        self.status(lab)
            .and_then(|s| s["ha"]["role"].as_str().map(str::to_string))
            .unwrap_or_else(|| "none".into())
    }

    /// Whether the VIP is on its interface.
    pub fn holds_vip(&self, lab: &Lab) -> bool {
        lab.exec(
            self.host,
            &["ip", "-4", "-br", "addr", "show", "dev", "eth0"],
        )
        .map(|o| o.contains("10.77.0.100/32"))
        .unwrap_or(false)
    }

    /// Its balancer's and keepalived's output.
    pub fn logs(&self) -> String {
        let mut s = String::new();
        if let Some(b) = &self.balancer {
            s.push_str(&format!("--- {} balancer\n{}", self.name, b.logs()));
        }
        if let Some(k) = &self.keepalived {
            s.push_str(&format!(
                "--- {} keepalived\n{}{}",
                self.name,
                k.stdout(),
                k.stderr()
            ));
        }
        s
    }
}

/// Waits until `active` reports the active role and holds the VIP, and (`exclusive`) the
/// other one does not.
pub fn wait_active(
    lab: &Lab,
    active: &Node,
    standby: &Node,
    exclusive: bool,
    limit: Duration,
) -> Result<Duration> {
    let t0 = Instant::now();
    while t0.elapsed() < limit {
        if active.role(lab) == "active"
            && active.holds_vip(lab)
            && (!exclusive || !standby.holds_vip(lab))
        {
            return Ok(t0.elapsed());
        }
        sleep(Duration::from_millis(20));
    }
    bail!(
        "{} did not become active within {limit:?} (its role {}, peer's {})\n{}\n{}",
        active.name,
        active.role(lab),
        standby.role(lab),
        active.logs(),
        standby.logs()
    );
}

/// Waits until `node`'s status says `role`.
pub fn wait_role(lab: &Lab, node: &Node, role: &str, limit: Duration) -> Result<()> {
    let t0 = Instant::now();
    while t0.elapsed() < limit {
        if node.role(lab) == role {
            return Ok(());
        }
        sleep(Duration::from_millis(50));
    }
    bail!(
        "{} is not {role} within {limit:?} (it is {})\n{}",
        node.name,
        node.role(lab),
        node.logs()
    );
}

/// Waits until the standby has installed at least `n` mirrored flows.
pub fn wait_mirrored(lab: &Lab, standby: &Node, n: u64, limit: Duration) -> Result<()> {
    let t0 = Instant::now();
    while t0.elapsed() < limit {
        let applied = standby
            .status(lab)
            .and_then(|s| s["ha"]["mirror"]["flows_applied"].as_u64())
            .unwrap_or(0);
        if applied >= n {
            return Ok(());
        }
        sleep(Duration::from_millis(50));
    }
    bail!(
        "{} installed fewer than {n} mirrored flows within {limit:?}\n{}",
        standby.name,
        standby.logs()
    );
}

/// Starts the backends' echo servers and HL7 listeners (`hl7a` on be1, `hl7b` on be2), and
/// puts the DSR VIP on their loopback.
pub fn prepare_backends(lab: &Lab) -> Result<Vec<LabChild>> {
    let mut kids = lab.spawn_echo_all()?;
    for h in lab.backend_hosts() {
        lab.exec(
            h,
            &["ip", "addr", "add", &format!("{DSR_VIP}/32"), "dev", "lo"],
        )?;
        lab.exec(
            h,
            &[
                "sysctl",
                "-qw",
                "net.ipv4.conf.all.arp_ignore=1",
                "net.ipv4.conf.all.arp_announce=2",
            ],
        )?;
    }
    for (i, name) in [(1, "hl7a"), (2, "hl7b")] {
        let bin = tool_bin("blb-mllp")?;
        let mut cmd = lab.command(Host::Backend(i), bin);
        cmd.args([
            "listen",
            "--name",
            name,
            "--addr",
            &format!("0.0.0.0:{HL7_PORT}"),
        ]);
        let mut c = lab.spawn_command(cmd, &format!("[b{i}] blb-mllp listen"))?;
        c.wait_for_output("blb-mllp ready", Duration::from_secs(10))?;
        kids.push(c);
    }
    Ok(kids)
}

/// A fresh pre-shared key file, mode 0600.
pub fn key_file(lab: &Lab) -> Result<PathBuf> {
    let key = lab.write_file("ha.key", &format!("{}\n", random_hex(32)?))?;
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    Ok(key)
}

fn random_hex(n: usize) -> Result<String> {
    let mut b = vec![0u8; n];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut b)?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// A pair lab, up: three backends with their servers, lb1 active and lb2 standby.
pub struct PairLab {
    /// The lab (dropped last: it removes the namespaces).
    pub lab: Lab,
    /// The backends' echo servers and HL7 listeners.
    pub servers: Vec<LabChild>,
    /// lb1 (`Host::Lb`), active.
    pub a: Node,
    /// lb2 (`Host::Peer`), standby.
    pub b: Node,
}

/// Builds a pair lab and starts everything in it (see [`PairLab`]).
pub fn pair_lab() -> Result<PairLab> {
    let lab = Lab::with_config(crate::LabConfig {
        backends: 3,
        peer: true,
        ..crate::LabConfig::default()
    })?;
    let servers = prepare_backends(&lab)?;
    let key = key_file(&lab)?;
    let mut a = Node::new(&lab, Host::Lb, "lb1", &key)?;
    let mut b = Node::new(&lab, Host::Peer, "lb2", &key)?;
    start_pair(&lab, &mut a, &mut b)?;
    lab.resolve_neighbours(Host::Client)?;
    Ok(PairLab { lab, servers, a, b })
}

/// Starts both balancers and both keepalived, `a` first (so `a` is active), and waits until
/// `a` is active and `b` standby.
pub fn start_pair(lab: &Lab, a: &mut Node, b: &mut Node) -> Result<()> {
    a.start_balancer(lab)?;
    b.start_balancer(lab)?;
    a.start_keepalived(lab)?;
    wait_active(lab, a, b, true, Duration::from_secs(10))?;
    b.start_keepalived(lab)?;
    wait_role(lab, b, "standby", Duration::from_secs(10))?;
    Ok(())
}
