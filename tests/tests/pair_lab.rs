//! An HA pair: two balancers (`lb`, `lb2`) with Debian's keepalived (VRRPv3, unicast adverts,
//! 100 ms) in their own namespaces, in front of three backends (echo, and HL7 listeners on
//! be1 and be2). keepalived owns the VIPs and the SNAT address; the active balancer mirrors
//! its flows and failover choices to the standby over the authenticated sync channel.
//!
//! While a NAT stream, a DSR stream and an HL7 sender (a message every 20 ms) run through the
//! VIPs, the active balancer is faulted in turn: `kill -9` of its controller and keepalived
//! (restarted afterwards, as systemd would), its link taken down (and up again), and a clean
//! stop (SIGTERM) and start. Each time the other takes over and the old one comes back as
//! standby (no preemption). Every stream must stay byte-exact without a reset, the HL7
//! sender must get every ACK from one listener, and new connections must succeed.

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    thread::sleep,
    time::{Duration, Instant},
};

use balancer_tests::{
    BalancerProc, Host, Lab, LabChild, LabConfig, balancer_bin, stream_report, tool_bin, vip4,
};

/// The second VIP, for the DSR service (the backends hold it on their loopback).
const DSR_VIP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 101);
/// The SNAT address: virtual, moved by keepalived with the VIPs.
const SNAT: &str = "10.77.0.200";
const HL7_PORT: u16 = 6661;

/// One balancer of the pair.
struct Node {
    host: Host,
    name: &'static str,
    config: PathBuf,
    socket: PathBuf,
    balancer: Option<BalancerProc>,
    keepalived: Option<LabChild>,
}

fn config(lab: &Lab, node: &str, own: Ipv4Addr, peer: Ipv4Addr, key: &Path) -> (String, PathBuf) {
    let socket = lab.dir().join(format!("{node}.sock"));
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
resync_interval = "5s"
"#,
        socket = socket.display(),
        key = key.display(),
    );
    (text, socket)
}

impl Node {
    fn new(lab: &Lab, host: Host, name: &'static str, key: &Path) -> Node {
        let (own, peer) = match host {
            Host::Lb => (Host::Lb, Host::Peer),
            _ => (Host::Peer, Host::Lb),
        };
        let own = own.v4().expect("v4");
        let peer = peer.v4().expect("v4");
        let (text, socket) = config(lab, name, own, peer, key);
        let config = lab
            .write_file(&format!("{name}.toml"), &text)
            .expect("config");
        Node {
            host,
            name,
            config,
            socket,
            balancer: None,
            keepalived: None,
        }
    }

    fn start_balancer(&mut self, lab: &Lab) {
        self.balancer = Some(
            lab.start_balancer_file(self.host, &self.config, &[])
                .unwrap_or_else(|e| panic!("{}: {e:#}", self.name)),
        );
    }

    /// Generates keepalived's config with `balancer ha keepalived-conf` and starts it.
    fn start_keepalived(&mut self, lab: &Lab) {
        let bin = balancer_bin().expect("balancer");
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
            .expect("keepalived-conf");
        let path = lab
            .write_file(&format!("keepalived-{}.conf", self.name), &conf)
            .expect("write");
        let pid = lab.dir().join(format!("keepalived-{}.pid", self.name));
        let vrrp_pid = lab.dir().join(format!("keepalived-{}-vrrp.pid", self.name));
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
        self.keepalived = Some(lab.spawn(self.host, &args).expect("keepalived"));
    }

    fn status(&self, lab: &Lab) -> Option<serde_json::Value> {
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

    fn role(&self, lab: &Lab) -> String {
        self.status(lab)
            .and_then(|s| s["ha"]["role"].as_str().map(str::to_string))
            .unwrap_or_else(|| "none".into())
    }

    fn holds_vip(&self, lab: &Lab) -> bool {
        lab.exec(
            self.host,
            &["ip", "-4", "-br", "addr", "show", "dev", "eth0"],
        )
        .map(|o| o.contains("10.77.0.100/32"))
        .unwrap_or(false)
    }

    fn logs(&self) -> String {
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
fn wait_active(
    lab: &Lab,
    active: &Node,
    standby: &Node,
    exclusive: bool,
    limit: Duration,
) -> Duration {
    let t0 = Instant::now();
    while t0.elapsed() < limit {
        if active.role(lab) == "active"
            && active.holds_vip(lab)
            && (!exclusive || !standby.holds_vip(lab))
        {
            return t0.elapsed();
        }
        sleep(Duration::from_millis(50));
    }
    panic!(
        "{} did not become active within {limit:?} (its role {}, peer's {})\n{}\n{}",
        active.name,
        active.role(lab),
        standby.role(lab),
        active.logs(),
        standby.logs()
    );
}

fn wait_role(lab: &Lab, node: &Node, role: &str, limit: Duration) {
    let t0 = Instant::now();
    while t0.elapsed() < limit {
        if node.role(lab) == role {
            return;
        }
        sleep(Duration::from_millis(50));
    }
    panic!(
        "{} is not {role} within {limit:?} (it is {})\n{}",
        node.name,
        node.role(lab),
        node.logs()
    );
}

/// Waits until the standby has installed at least `n` mirrored flows.
fn wait_mirrored(lab: &Lab, standby: &Node, n: u64, limit: Duration) {
    let t0 = Instant::now();
    while t0.elapsed() < limit {
        let applied = standby
            .status(lab)
            .and_then(|s| s["ha"]["mirror"]["flows_applied"].as_u64())
            .unwrap_or(0);
        if applied >= n {
            return;
        }
        sleep(Duration::from_millis(50));
    }
    panic!(
        "{} installed fewer than {n} mirrored flows within {limit:?}\n{}",
        standby.name,
        standby.logs()
    );
}

fn prepare_backends(lab: &Lab) -> Vec<LabChild> {
    let mut kids = lab.spawn_echo_all().expect("echo");
    for h in lab.backend_hosts() {
        lab.exec(
            h,
            &["ip", "addr", "add", &format!("{DSR_VIP}/32"), "dev", "lo"],
        )
        .expect("dsr vip");
        lab.exec(
            h,
            &[
                "sysctl",
                "-qw",
                "net.ipv4.conf.all.arp_ignore=1",
                "net.ipv4.conf.all.arp_announce=2",
            ],
        )
        .expect("arp");
    }
    for (i, name) in [(1, "hl7a"), (2, "hl7b")] {
        let bin = tool_bin("blb-mllp").expect("blb-mllp");
        let mut cmd = lab.command(Host::Backend(i), bin);
        cmd.args([
            "listen",
            "--name",
            name,
            "--addr",
            &format!("0.0.0.0:{HL7_PORT}"),
        ]);
        let mut c = lab
            .spawn_command(cmd, &format!("[b{i}] blb-mllp listen"))
            .expect("listener");
        c.wait_for_output("blb-mllp ready", Duration::from_secs(10))
            .expect("listener ready");
        kids.push(c);
    }
    kids
}

fn key_file(lab: &Lab) -> PathBuf {
    let key = lab
        .write_file(
            "ha.key",
            "6b1f0e2d9c8a7b6c5d4e3f201918171615141312111009080706050403020100\n",
        )
        .expect("key");
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .expect("chmod");
    key
}

/// The HL7 sender's report (`blb-mllp send`).
fn hl7_report(child: LabChild) -> serde_json::Value {
    let done = child
        .wait_output(Duration::from_secs(120))
        .expect("hl7 sender ends");
    serde_json::from_str(done.stdout.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("hl7 report: {e}: {:?} {:?}", done.stdout, done.stderr))
}

#[test]
fn the_pair_survives_kill_link_down_and_stop_of_the_active_balancer() {
    let lab = Lab::with_config(LabConfig {
        backends: 3,
        peer: true,
        ..LabConfig::default()
    })
    .expect("lab");
    let _servers = prepare_backends(&lab);
    let key = key_file(&lab);
    let mut a = Node::new(&lab, Host::Lb, "lb1", &key);
    let mut b = Node::new(&lab, Host::Peer, "lb2", &key);
    a.start_balancer(&lab);
    b.start_balancer(&lab);
    a.start_keepalived(&lab);
    wait_active(&lab, &a, &b, true, Duration::from_secs(10));
    b.start_keepalived(&lab);
    wait_role(&lab, &b, "standby", Duration::from_secs(10));
    lab.resolve_neighbours(Host::Client).expect("neighbours");

    // Long-lived flows through the VIPs for the whole test.
    let seconds = 45.0;
    let nat = lab
        .spawn_stream(vip4(7002), seconds, 20)
        .expect("nat stream");
    let dsr = lab
        .spawn_stream(SocketAddr::new(DSR_VIP.into(), 7002), seconds, 20)
        .expect("dsr stream");
    let hl7 = {
        let bin = tool_bin("blb-mllp").expect("blb-mllp");
        let mut cmd = lab.command(Host::Client, bin);
        cmd.args([
            "send",
            "--to",
            &vip4(HL7_PORT).to_string(),
            "--seconds",
            &format!("{seconds}"),
            "--interval-ms",
            "20",
        ]);
        lab.spawn_command(cmd, "[c] blb-mllp send").expect("sender")
    };
    // The standby has the streams' flows before anything fails.
    sleep(Duration::from_secs(2));
    wait_mirrored(&lab, &b, 3, Duration::from_secs(5));

    let mut takeovers = Vec::new();
    let mut new_conns_failed = 0;
    // 1. kill -9 of the active's controller and keepalived.
    a.balancer.as_mut().expect("a").kill9();
    if let Some(k) = a.keepalived.as_mut() {
        k.kill();
    }
    // keepalived was killed too: the addresses stay on its interface until it is restarted.
    takeovers.push((
        "kill -9",
        wait_active(&lab, &b, &a, false, Duration::from_secs(5)),
    ));
    // systemd restarts both: the old active comes back as standby (no preemption) and
    // keepalived takes the addresses it left behind off its interface.
    a.keepalived = None;
    a.start_balancer(&lab);
    a.start_keepalived(&lab);
    wait_role(&lab, &a, "standby", Duration::from_secs(10));
    assert!(
        !a.holds_vip(&lab),
        "the restarted keepalived left the VIP on lb1"
    );
    let r = lab.client_conns(vip4(7002), 30, 256, 5).expect("conns");
    new_conns_failed += r.failed;
    sleep(Duration::from_secs(2));

    // 2. The active's link goes down.
    lab.exec(b.host, &["ip", "link", "set", "eth0", "down"])
        .expect("link down");
    takeovers.push((
        "link down",
        wait_active(&lab, &a, &b, true, Duration::from_secs(5)),
    ));
    lab.exec(b.host, &["ip", "link", "set", "eth0", "up"])
        .expect("link up");
    wait_role(&lab, &b, "standby", Duration::from_secs(10));
    let r = lab.client_conns(vip4(7002), 30, 256, 5).expect("conns");
    new_conns_failed += r.failed;
    sleep(Duration::from_secs(2));

    // 3. A clean stop of the active controller, then its start.
    assert!(a.balancer.as_mut().expect("a").stop().expect("stop"));
    takeovers.push((
        "stop",
        wait_active(&lab, &b, &a, true, Duration::from_secs(5)),
    ));
    a.start_balancer(&lab);
    wait_role(&lab, &a, "standby", Duration::from_secs(10));
    let r = lab.client_conns(vip4(7002), 30, 256, 5).expect("conns");
    new_conns_failed += r.failed;

    let nat = stream_report(nat, Duration::from_secs(90)).expect("nat report");
    let dsr = stream_report(dsr, Duration::from_secs(90)).expect("dsr report");
    let hl7 = hl7_report(hl7);
    eprintln!("takeovers (until the new active holds the VIP): {takeovers:?}");
    eprintln!(
        "nat stream: ok {} chunks {} longest round trip {} ms",
        nat.ok, nat.chunks, nat.max_rtt_ms
    );
    eprintln!(
        "dsr stream: ok {} chunks {} longest round trip {} ms",
        dsr.ok, dsr.chunks, dsr.max_rtt_ms
    );
    eprintln!("hl7 sender: {hl7}");
    let logs = format!("{}\n{}", a.logs(), b.logs());
    assert!(nat.ok, "nat stream broke: {:?}\n{logs}", nat.error);
    assert!(dsr.ok, "dsr stream broke: {:?}\n{logs}", dsr.error);
    assert_eq!(hl7["resets"], 0, "hl7 sender saw resets: {hl7}\n{logs}");
    assert_eq!(hl7["sent"], hl7["acked"], "hl7 messages unacked: {hl7}");
    assert_eq!(
        hl7["sequence"].as_array().map(Vec::len),
        Some(1),
        "hl7 ACKs came from more than one listener: {hl7}"
    );
    assert_eq!(new_conns_failed, 0, "new connections failed\n{logs}");
    // Patient data never reaches a log.
    assert!(!logs.contains("DOE^JANE"), "a patient name is in a log");
}
