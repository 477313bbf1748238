//! BIRD as the balancer's BGP speaker (route health injection, as F5 RHI or keepalived with
//! BIRD do it): the balancer decides which VIPs this host announces ([`announced`], pure),
//! writes them as static routes into a file BIRD includes ([`render`], written atomically)
//! and tells BIRD to re-read its config (`birdc -s SOCKET configure`: a soft
//! reconfiguration, the BGP sessions stay up and only the changed routes are sent). BIRD
//! exports the routes to the upstream routers with itself as next hop, so the routers spread
//! the VIPs' traffic over every balancer announcing them (ECMP).
//!
//! The work runs in a task of its own ([`Driver`]): the daemon loop only hands it the set it
//! wants, so a slow or hanging `birdc` never delays a health event. A failing `birdc` is
//! logged and retried with a backoff; the last result is in the status.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::config::{BgpConfig, ServiceSpec};

/// How long one `birdc configure` may take before it is killed and counted as failed.
const BIRDC_TIMEOUT: Duration = Duration::from_secs(10);
/// First retry delay after a failure; doubled up to [`RETRY_MAX`].
const RETRY_MIN: Duration = Duration::from_secs(1);
/// Longest retry delay.
const RETRY_MAX: Duration = Duration::from_secs(30);

/// The VIPs this balancer announces: every service VIP, unless the operator withdrew this
/// balancer (`withdrawn`: nothing is announced), and, with `withdraw_when_no_backend`, only
/// the VIPs of which at least one service has a backend taking new flows (`serving`: service
/// name → such backends). A VIP shared by several services (ports) stays announced while any
/// of them can serve: withdrawing it would take the working ports away too.
pub fn announced(
    services: &[ServiceSpec],
    serving: &BTreeMap<String, usize>,
    withdrawn: bool,
    withdraw_when_no_backend: bool,
) -> BTreeSet<IpAddr> {
    if withdrawn {
        return BTreeSet::new();
    }
    services
        .iter()
        .filter(|s| !withdraw_when_no_backend || serving.get(&s.name).copied().unwrap_or(0) > 0)
        .map(|s| s.vip.ip())
        .collect()
}

/// Every VIP of the config (announced or not): the metrics give each one a 0/1 sample.
pub fn all_vips(services: &[ServiceSpec]) -> BTreeSet<IpAddr> {
    services.iter().map(|s| s.vip.ip()).collect()
}

/// The routes file for `vips`: the static protocols `<protocol>4` and `<protocol>6`, always
/// both (possibly empty, so BIRD's export filters always find them), one blackhole route per
/// VIP (`/32`, `/128`). The route is never installed in a kernel table (the balancer's BIRD
/// config has no kernel protocol exporting it); it only exists to be exported by BGP with
/// next hop self.
pub fn render(vips: &BTreeSet<IpAddr>, cfg: &BgpConfig) -> String {
    let mut out = String::from(
        "# Written by balancer ([bgp] routes_file): the VIPs this balancer announces.\n# Do not edit: it is rewritten whenever the set changes.\n",
    );
    for (proto, channel, v4) in [
        (cfg.protocol_v4(), "ipv4", true),
        (cfg.protocol_v6(), "ipv6", false),
    ] {
        let _ = writeln!(out, "protocol static {proto} {{\n  {channel};");
        for ip in vips.iter().filter(|ip| ip.is_ipv4() == v4) {
            let len = if v4 { 32 } else { 128 };
            let _ = writeln!(out, "  route {ip}/{len} blackhole;");
        }
        out.push_str("}\n");
    }
    out
}

/// Writes `text` to `path` atomically: a temporary file in the same directory, synced, then
/// renamed over it (BIRD never reads half a file). Mode 0644: BIRD usually runs as its own
/// user, and the file holds nothing but VIP addresses.
pub fn write_routes(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let name = path
        .file_name()
        .map_or_else(|| "routes".into(), |n| n.to_string_lossy().into_owned());
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o644)
        .open(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)
}

/// The answer of one `birdc configure`: its output, when BIRD took the new config.
fn judge(success: bool, output: &str) -> Result<String, String> {
    let text = output
        .lines()
        .filter(|l| !l.starts_with("BIRD ") || !l.ends_with(" ready."))
        .collect::<Vec<_>>()
        .join("; ");
    let took = output.lines().any(|l| {
        let l = l.trim();
        l == "Reconfigured"
            || l.starts_with("Reconfiguration in progress")
            || l.starts_with("Reconfiguration already in progress")
    });
    if success && took {
        Ok(text)
    } else if text.is_empty() {
        Err("birdc failed without output".into())
    } else {
        Err(text)
    }
}

/// Runs `birdc -s SOCKET configure` (bounded by [`BIRDC_TIMEOUT`]).
pub async fn configure(cfg: &BgpConfig) -> Result<String, String> {
    let run = tokio::process::Command::new(&cfg.birdc)
        .arg("-s")
        .arg(&cfg.socket)
        .arg("configure")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(BIRDC_TIMEOUT, run).await {
        Err(_) => Err(format!(
            "{} did not answer within {BIRDC_TIMEOUT:?}",
            cfg.birdc.display()
        )),
        Ok(Err(e)) => Err(format!("cannot run {}: {e}", cfg.birdc.display())),
        Ok(Ok(out)) => {
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            judge(out.status.success(), &text)
        }
    }
}

/// The announcement as `status` shows it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct BgpStatus {
    /// VIPs BIRD was last told to announce successfully (what the routers are sent).
    pub announced: Vec<IpAddr>,
    /// VIPs the balancer wants announced now (differs from `announced` while a change is
    /// being applied or `birdc` fails).
    pub desired: Vec<IpAddr>,
    /// The operator withdrew this balancer (`balancer bgp withdraw`).
    pub withdrawn_by_operator: bool,
    /// Every VIP of the config (the metrics' 0/1 samples).
    #[serde(default)]
    pub vips: Vec<IpAddr>,
    /// The routes file.
    pub routes_file: PathBuf,
    /// The last `birdc configure`: `ok` or the error.
    pub last_result: Option<String>,
    /// Whether it succeeded.
    pub last_ok: Option<bool>,
    /// When it ran, Unix seconds.
    pub last_at: Option<u64>,
    /// Failed attempts since the start.
    pub failures: u64,
}

/// What the driver was asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Wanted {
    generation: u64,
    vips: BTreeSet<IpAddr>,
}

/// What the driver did last.
#[derive(Debug, Clone, Default)]
struct Done {
    /// Generation of the last successful apply.
    generation: u64,
    applied: Option<BTreeSet<IpAddr>>,
    last_result: Option<String>,
    last_ok: Option<bool>,
    last_at: Option<u64>,
    failures: u64,
}

/// The task that writes the routes file and runs `birdc`, and what the daemon keeps of it.
#[derive(Debug)]
pub struct Driver {
    cfg: BgpConfig,
    wanted: watch::Sender<Wanted>,
    done: watch::Receiver<Done>,
    report: Arc<Mutex<Done>>,
}

/// A read-only handle on the driver's results for status readers.
#[derive(Debug, Clone)]
pub struct ReportHandle(Arc<Mutex<Done>>);

impl Driver {
    /// Starts the driver task. Nothing is written until the first [`Driver::want`].
    pub fn start(cfg: BgpConfig) -> Self {
        let (wanted, mut wanted_rx) = watch::channel(Wanted {
            generation: 0,
            vips: BTreeSet::new(),
        });
        let (done_tx, done) = watch::channel(Done::default());
        let report = Arc::new(Mutex::new(Done::default()));
        let shared = report.clone();
        let c = cfg.clone();
        tokio::spawn(async move {
            let mut state = Done::default();
            let mut retry = RETRY_MIN;
            let mut failing = false;
            loop {
                if failing {
                    tokio::select! {
                        r = wanted_rx.changed() => if r.is_err() { return },
                        _ = tokio::time::sleep(retry) => {}
                    }
                } else if wanted_rx.changed().await.is_err() {
                    return;
                }
                let want = wanted_rx.borrow_and_update().clone();
                if want.generation == 0 {
                    continue;
                }
                if state.applied.as_ref() == Some(&want.vips) {
                    state.generation = want.generation;
                    failing = false;
                } else {
                    let r = apply(&c, &want.vips).await;
                    state.last_at = SystemTime::now()
                        .duration_since(UNIX_EPOCH)
                        .ok()
                        .map(|d| d.as_secs());
                    match r {
                        Ok(_) => {
                            info!(announced = ?want.vips, routes_file = %c.routes_file.display(), "bgp: BIRD announces the new VIP set");
                            state.applied = Some(want.vips.clone());
                            state.generation = want.generation;
                            state.last_result = Some("ok".into());
                            state.last_ok = Some(true);
                            failing = false;
                            retry = RETRY_MIN;
                        }
                        Err(e) => {
                            state.failures += 1;
                            warn!(error = %e, retry_in_s = retry.as_secs(), wanted = ?want.vips, "bgp: updating BIRD failed; retrying");
                            state.last_result = Some(e);
                            state.last_ok = Some(false);
                            if failing {
                                retry = (retry * 2).min(RETRY_MAX);
                            }
                            failing = true;
                        }
                    }
                }
                if let Ok(mut r) = shared.lock() {
                    *r = state.clone();
                }
                let _ = done_tx.send(state.clone());
            }
        });
        Driver {
            cfg,
            wanted,
            done,
            report,
        }
    }

    /// Asks for `vips` to be announced (applied by the task when it differs from what BIRD
    /// has); returns the request's generation, to wait for with [`Driver::wait`].
    pub fn want(&self, vips: BTreeSet<IpAddr>) -> u64 {
        let mut generation = 0;
        self.wanted.send_if_modified(|w| {
            if w.generation != 0 && w.vips == vips {
                generation = w.generation;
                return false;
            }
            w.generation += 1;
            w.vips = vips;
            generation = w.generation;
            true
        });
        generation
    }

    /// A future that resolves when request `generation` (or a later one) was applied, or
    /// after `timeout`: `Ok` with BIRD's answer, `Err` with the last failure.
    pub fn wait(
        &self,
        generation: u64,
        timeout: Duration,
    ) -> impl std::future::Future<Output = Result<(), String>> + Send + 'static {
        let mut rx = self.done.clone();
        async move {
            let r = tokio::time::timeout(timeout, async {
                loop {
                    {
                        let d = rx.borrow_and_update();
                        if d.generation >= generation {
                            return Ok(());
                        }
                    }
                    if rx.changed().await.is_err() {
                        return Err("the bgp driver stopped".to_string());
                    }
                }
            })
            .await;
            match r {
                Ok(r) => r,
                Err(_) => {
                    let last = rx.borrow().clone();
                    Err(match (last.last_ok, last.last_result) {
                        (Some(false), Some(e)) => {
                            format!("BIRD did not take the change within {timeout:?}: {e}")
                        }
                        _ => format!("BIRD did not take the change within {timeout:?}"),
                    })
                }
            }
        }
    }

    /// The handle status readers use.
    pub fn handle(&self) -> ReportHandle {
        ReportHandle(self.report.clone())
    }

    /// The config it runs with.
    pub fn config(&self) -> &BgpConfig {
        &self.cfg
    }
}

impl ReportHandle {
    /// Fills the driver's part of `s`: what BIRD announces and the last `birdc` result.
    pub fn fill(&self, s: &mut BgpStatus) {
        let d = self.0.lock().map(|d| d.clone()).unwrap_or_default();
        s.announced = d
            .applied
            .map(|a| a.into_iter().collect())
            .unwrap_or_default();
        s.last_result = d.last_result;
        s.last_ok = d.last_ok;
        s.last_at = d.last_at;
        s.failures = d.failures;
    }
}

/// Writes the file, then asks BIRD to read it.
async fn apply(cfg: &BgpConfig, vips: &BTreeSet<IpAddr>) -> Result<String, String> {
    write_routes(&cfg.routes_file, &render(vips, cfg))
        .map_err(|e| format!("writing {}: {e}", cfg.routes_file.display()))?;
    configure(cfg).await
}

/// Options of `balancer bgp bird-conf`.
#[derive(Debug, Clone)]
pub struct BirdConfOptions {
    /// BIRD's router id (an IPv4 address, usually the balancer's own).
    pub router_id: std::net::Ipv4Addr,
    /// This balancer's AS.
    pub local_as: u32,
    /// The upstream routers.
    pub neighbors: Vec<IpAddr>,
    /// Their AS.
    pub neighbor_as: u32,
    /// BGP hold time in seconds (3 to 65535).
    pub hold_time: u16,
}

/// The balancer side of BIRD's config: router id, the routes file, and one `protocol bgp`
/// per upstream router exporting only the balancer's static protocols (IPv4 routes to IPv4
/// neighbours, IPv6 routes to IPv6 neighbours), importing nothing.
pub fn bird_conf(cfg: &BgpConfig, o: &BirdConfOptions) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# BIRD 2 config of the balancer side, printed by `balancer bgp bird-conf`.\n# Debian: /etc/bird/bird.conf (then `birdc configure`, or `systemctl reload bird`).\nrouter id {};\n",
        o.router_id
    );
    out.push_str("# Interfaces, so the directly connected BGP neighbours resolve.\nprotocol device {\n  scan time 10;\n}\n\n");
    let file = cfg.routes_file.display().to_string();
    // A pattern: BIRD starts even before the balancer wrote the file the first time.
    let include = include_pattern(&file);
    let _ = writeln!(
        out,
        "# The VIPs the balancer announces (static protocols {} and {}), rewritten by the\n# balancer, which then runs `birdc configure`. Written as a pattern so that BIRD\n# starts before the balancer first wrote the file.\ninclude \"{include}\";\n",
        cfg.protocol_v4(),
        cfg.protocol_v6()
    );
    for (i, n) in o.neighbors.iter().enumerate() {
        let (channel, proto) = if n.is_ipv4() {
            ("ipv4", cfg.protocol_v4())
        } else {
            ("ipv6", cfg.protocol_v6())
        };
        let _ = writeln!(
            out,
            "protocol bgp upstream{n} {{\n  description \"upstream router {addr}\";\n  local as {las};\n  neighbor {addr} as {nas};\n  hold time {hold};        # a lost balancer leaves the ECMP group within {hold} s\n  keepalive time {ka};\n  connect delay time 1;\n  connect retry time 5;\n  error wait time 5, 30;   # rejoin soon after the router or the link comes back\n  {channel} {{\n    import none;         # the balancer routes nothing it learns\n    export where proto = \"{proto}\";\n    next hop self;\n  }};\n}}\n",
            n = i + 1,
            addr = n,
            las = o.local_as,
            nas = o.neighbor_as,
            hold = o.hold_time,
            ka = (o.hold_time / 3).max(1),
        );
    }
    out
}

/// `file` as a pattern matching only itself (its last character in brackets), so that an
/// `include` of it is no error while the file does not exist yet; `file` itself when it
/// ends otherwise or holds pattern characters.
fn include_pattern(file: &str) -> String {
    match file.chars().last() {
        Some(last) if last.is_ascii_alphanumeric() && !file.contains(['*', '?', '[', ']']) => {
            format!("{}[{last}]", &file[..file.len() - 1])
        }
        _ => file.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn services(text: &str) -> Vec<ServiceSpec> {
        crate::config::parse(text, Path::new("b.toml"))
            .expect("valid")
            .services
    }

    const CFG: &str = r#"
[dataplane]
interface = "eth0"

[[service]]
name = "web"
vip = "10.77.0.100:80"
forwarding = "dsr"
backends = [ { address = "10.77.0.11:80" }, { address = "10.77.0.12:80" } ]

[[service]]
name = "web-tls"
vip = "10.77.0.100:443"
forwarding = "dsr"
backends = [ { address = "10.77.0.11:443" } ]

[[service]]
name = "hl7"
vip = "10.77.0.101:6661"
scheduler = "failover"
backends = [ { address = "10.77.0.11:6661" } ]

[[service]]
name = "web6"
vip = "[fd77::100]:80"
forwarding = "dsr"
backends = [ { address = "[fd77::11]:80" } ]
"#;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    fn serving(pairs: &[(&str, usize)]) -> BTreeMap<String, usize> {
        pairs.iter().map(|(n, c)| (n.to_string(), *c)).collect()
    }

    #[test]
    fn every_vip_is_announced_while_its_services_can_serve() {
        let s = services(CFG);
        let all = serving(&[("web", 2), ("web-tls", 1), ("hl7", 1), ("web6", 1)]);
        let a = announced(&s, &all, false, true);
        assert_eq!(
            a,
            [ip("10.77.0.100"), ip("10.77.0.101"), ip("fd77::100")]
                .into_iter()
                .collect()
        );
        assert_eq!(a, all_vips(&s));
    }

    #[test]
    fn an_operator_withdraw_withdraws_everything() {
        let s = services(CFG);
        let all = serving(&[("web", 2), ("web-tls", 1), ("hl7", 1), ("web6", 1)]);
        assert!(announced(&s, &all, true, true).is_empty());
        assert!(announced(&s, &all, true, false).is_empty());
    }

    #[test]
    fn a_vip_without_a_serving_backend_is_withdrawn_unless_the_rule_is_off() {
        let s = services(CFG);
        // hl7 has no live listener; web6 is missing from the map (no backend).
        let some = serving(&[("web", 2), ("web-tls", 1), ("hl7", 0)]);
        assert_eq!(
            announced(&s, &some, false, true),
            [ip("10.77.0.100")].into_iter().collect()
        );
        assert_eq!(announced(&s, &some, false, false), all_vips(&s));
        // A VIP stays while any of its services can serve (web-tls down, web up).
        let one_port = serving(&[("web", 0), ("web-tls", 1)]);
        assert_eq!(
            announced(&s, &one_port, false, true),
            [ip("10.77.0.100")].into_iter().collect()
        );
        assert!(announced(&s, &serving(&[]), false, true).is_empty());
    }

    #[test]
    fn the_routes_file_has_both_protocols_and_one_route_per_vip() {
        let cfg = BgpConfig::default();
        let vips = [ip("10.77.0.101"), ip("fd77::100"), ip("10.77.0.100")]
            .into_iter()
            .collect();
        let text = render(&vips, &cfg);
        let body: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(
            body,
            [
                "protocol static balancer_vips4 {",
                "  ipv4;",
                "  route 10.77.0.100/32 blackhole;",
                "  route 10.77.0.101/32 blackhole;",
                "}",
                "protocol static balancer_vips6 {",
                "  ipv6;",
                "  route fd77::100/128 blackhole;",
                "}",
            ]
        );
        let empty = render(&BTreeSet::new(), &cfg);
        assert!(empty.contains("protocol static balancer_vips4 {\n  ipv4;\n}\n"));
        assert!(empty.contains("protocol static balancer_vips6 {\n  ipv6;\n}\n"));
    }

    #[test]
    fn the_routes_file_is_replaced_atomically() {
        let dir = std::env::temp_dir().join(format!("blb-bird-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("vips.conf");
        write_routes(&path, "one\n").expect("write");
        write_routes(&path, "two\n").expect("write");
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "two\n");
        let names: Vec<_> = std::fs::read_dir(&dir)
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("vips.conf")]);
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o644);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn birdc_answers_are_judged_by_their_text_and_status() {
        assert!(
            judge(
                true,
                "BIRD 2.0.12 ready.\nReading configuration from /etc/bird/bird.conf\nReconfigured\n"
            )
            .is_ok()
        );
        assert!(judge(true, "BIRD 2.0.12 ready.\nReconfiguration in progress\n").is_ok());
        let e = judge(
            false,
            "BIRD 2.0.12 ready.\nReading configuration from bird.conf\n/etc/bird/balancer-vips.conf:3:9 syntax error\n",
        )
        .unwrap_err();
        assert!(e.contains("syntax error") && !e.contains("ready."), "{e}");
        let e = judge(
            false,
            "Unable to connect to server control socket (/run/bird/bird.ctl): No such file or directory\n",
        )
        .unwrap_err();
        assert!(e.contains("Unable to connect"), "{e}");
        assert!(judge(false, "").is_err());
    }

    #[tokio::test]
    async fn a_failing_birdc_is_retried_and_the_file_is_written_anyway() {
        let dir = std::env::temp_dir().join(format!("blb-bird-drv-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let cfg = BgpConfig {
            birdc: PathBuf::from("/nonexistent/birdc"),
            socket: dir.join("bird.ctl"),
            routes_file: dir.join("vips.conf"),
            ..BgpConfig::default()
        };
        let d = Driver::start(cfg.clone());
        let g = d.want([ip("10.77.0.100")].into_iter().collect());
        let r = d.wait(g, Duration::from_millis(2500)).await;
        assert!(r.is_err(), "{r:?}");
        assert!(
            std::fs::read_to_string(&cfg.routes_file)
                .expect("written")
                .contains("route 10.77.0.100/32 blackhole;")
        );
        let mut s = BgpStatus::default();
        d.handle().fill(&mut s);
        assert!(s.failures >= 2, "retried: {s:?}");
        assert_eq!(s.last_ok, Some(false));
        assert!(s.announced.is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn bird_conf_has_the_include_and_one_session_per_neighbour() {
        let cfg = BgpConfig::default();
        let text = bird_conf(
            &cfg,
            &BirdConfOptions {
                router_id: "10.77.0.1".parse().expect("id"),
                local_as: 65001,
                neighbors: vec![ip("10.77.0.254"), ip("fd77::fe")],
                neighbor_as: 65000,
                hold_time: 3,
            },
        );
        assert!(text.contains("router id 10.77.0.1;"), "{text}");
        assert!(
            text.contains("include \"/etc/bird/balancer-vips.con[f]\";"),
            "{text}"
        );
        assert!(text.contains("neighbor 10.77.0.254 as 65000;"), "{text}");
        assert!(
            text.contains("export where proto = \"balancer_vips4\";"),
            "{text}"
        );
        assert!(text.contains("neighbor fd77::fe as 65000;"), "{text}");
        assert!(
            text.contains("export where proto = \"balancer_vips6\";"),
            "{text}"
        );
        assert!(text.contains("hold time 3;"), "{text}");
        assert_eq!(text.matches("protocol bgp ").count(), 2);
    }
}
