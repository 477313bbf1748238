//! The shipped systemd unit: `systemd-analyze verify` passes and
//! `systemd-analyze security --offline=true` rates its exposure 2.5 or less.
//!
//! systemd is not PID 1 on the build machines, but `systemd-analyze` works offline. The unit
//! names /usr/local/bin/balancer, which verify wants to exist: the test checks a copy that
//! points at the binary cargo just built.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

const BIN: &str = env!("CARGO_BIN_EXE_balancer");
const MAX_EXPOSURE: f64 = 2.5;

fn packaging() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging")
}

fn unit_text() -> String {
    std::fs::read_to_string(packaging().join("balancer.service"))
        .expect("packaging/balancer.service")
}

/// A copy of the unit, named balancer.service, with the built binary in place of the
/// installed one.
fn unit_copy(name: &str) -> (PathBuf, PathBuf) {
    let dir = std::env::temp_dir().join(format!("balancer-unit-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let text = unit_text();
    assert!(
        text.contains("/usr/local/bin/balancer "),
        "the unit runs /usr/local/bin/balancer"
    );
    let path = dir.join("balancer.service");
    std::fs::write(
        &path,
        text.replace("/usr/local/bin/balancer ", &format!("{BIN} ")),
    )
    .unwrap();
    (dir, path)
}

fn systemd_analyze(args: &[&str]) -> std::process::Output {
    Command::new("systemd-analyze")
        .args(args)
        .output()
        .expect("systemd-analyze runs (apt-get install systemd; `cargo xtask setup` does)")
}

/// Settings as `key=value` pairs, comments and sections left out.
fn settings(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with('['))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

fn get<'a>(s: &'a [(String, String)], key: &str) -> Vec<&'a str> {
    s.iter()
        .filter(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .collect()
}

#[test]
fn verify_passes() {
    let (dir, unit) = unit_copy("verify");
    let out = systemd_analyze(&["verify", unit.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "systemd-analyze verify failed:\n{stderr}"
    );
    // verify exits 0 on some warnings too: none may concern our unit.
    let ours: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("balancer.service"))
        .collect();
    assert!(
        ours.is_empty(),
        "systemd-analyze verify warns:\n{}",
        ours.join("\n")
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn exposure_at_most_2_5() {
    let (dir, unit) = unit_copy("security");
    let out = systemd_analyze(&[
        "security",
        "--offline=true",
        "--no-pager",
        unit.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| {
            panic!(
                "no exposure level in:\n{stdout}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    // "→ Overall exposure level for balancer.service: 2.1 OK 🙂"
    let score: f64 = line
        .rsplit(':')
        .next()
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("cannot parse '{line}'"));
    println!("{line}");
    assert!(
        score <= MAX_EXPOSURE,
        "exposure {score} > {MAX_EXPOSURE}:\n{stdout}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn unit_keeps_what_the_daemon_needs() {
    let s = settings(&unit_text());
    assert_eq!(get(&s, "Type"), ["notify"]);
    assert_eq!(get(&s, "ExecReload"), ["/bin/kill -HUP $MAINPID"]);
    assert_eq!(get(&s, "KillMode"), ["mixed"]);
    assert!(!get(&s, "WatchdogSec").is_empty());
    // It forwards traffic and health-checks backends: no IP filter, no private network.
    assert!(get(&s, "IPAddressDeny").is_empty());
    assert!(get(&s, "PrivateNetwork").is_empty());
    // It reads /proc/sys/net.
    assert!(!get(&s, "ProcSubset").contains(&"pid"));
    // The pins and the control socket are writable.
    assert!(
        get(&s, "ReadWritePaths")
            .iter()
            .any(|v| v.split_whitespace().any(|p| p == "/sys/fs/bpf"))
    );
    assert_eq!(get(&s, "RuntimeDirectory"), ["balancer"]);
    assert_eq!(get(&s, "RuntimeDirectoryMode"), ["0700"]);
    let caps = get(&s, "CapabilityBoundingSet").join(" ");
    for cap in ["CAP_BPF", "CAP_NET_ADMIN", "CAP_PERFMON"] {
        assert!(caps.contains(cap), "{cap} missing from {caps}");
    }
    assert!(
        !caps.contains("CAP_SYS_ADMIN"),
        "CAP_SYS_ADMIN is not needed: {caps}"
    );
    assert_eq!(get(&s, "AmbientCapabilities").join(" "), caps);
    // bpf(2) is allowed by the syscall filter, after the @privileged removal.
    let filters = get(&s, "SystemCallFilter");
    let last_bpf = filters
        .iter()
        .rposition(|f| f.split_whitespace().any(|w| w == "bpf"));
    let last_priv = filters.iter().rposition(|f| f.contains("~@privileged"));
    assert!(
        last_bpf > last_priv,
        "bpf must be allowed after ~@privileged: {filters:?}"
    );
    // /proc/sys is read-only for the daemon: the sysctl.d file turns forwarding on.
    assert_eq!(get(&s, "ProtectKernelTunables"), ["yes"]);
    let sysctl = settings(&std::fs::read_to_string(packaging().join("99-balancer.conf")).unwrap());
    assert_eq!(get(&sysctl, "net.ipv4.ip_forward"), ["1"]);
}

#[test]
fn default_config_is_valid() {
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(packaging().join("balancer.toml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "packaging/balancer.toml: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
