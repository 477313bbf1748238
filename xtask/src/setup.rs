//! `cargo xtask setup`: installs what is missing, and only that.

use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use crate::cmd;

/// Debian packages: LLVM 22 for bpf-linker, and the peers and tools the labs, the demo and the
/// benches use (prometheus for promtool, lintian and binutils for the package test).
const PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "iproute2",
    "nftables",
    "ethtool",
    "curl",
    "openssl",
    "haproxy",
    "wrk",
    "iperf3",
    "hping3",
    "python3-hl7",
    "python3-scapy",
    "tshark",
    "socat",
    "procps",
    "util-linux",
    "iputils-ping",
    "mount",
    "prometheus",
    "lintian",
    // `cargo xtask deb`: strip(1) for the packaged binary.
    "binutils",
    // The console lab drives a headless browser over WebDriver.
    "chromium",
    "chromium-driver",
    // The HA pair lab: VRRP between the two balancers.
    "keepalived",
    // The ECMP lab runs its own BIRD processes (router and balancers) in its namespaces.
    "bird2",
];

const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

/// Checks everything and installs what is missing. Quick when nothing is.
pub fn setup() -> Result<()> {
    if !is_root() {
        bail!(
            "setup needs root (apt-get install, and the labs build network namespaces): \
             run it as root, e.g. `sudo -E cargo xtask setup`"
        );
    }
    debian_packages()?;
    nightly_rust_src()?;
    bpf_linker()?;
    Ok(())
}

fn is_root() -> bool {
    // SAFETY: geteuid(2) cannot fail and touches no memory.
    unsafe { libc::geteuid() == 0 }
}

fn debian_packages() -> Result<()> {
    let missing = missing_packages()?;
    if missing.is_empty() {
        println!("ok: debian packages ({} present)", PACKAGES.len());
        return Ok(());
    }
    println!("installing: {}", missing.join(" "));
    cmd::run(
        Command::new("apt-get")
            .arg("update")
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    cmd::run(
        Command::new("apt-get")
            .args(["install", "-y", "-q"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    let still = missing_packages()?;
    if !still.is_empty() {
        bail!("still missing after apt-get install: {}", still.join(" "));
    }
    println!("ok: debian packages ({} installed)", missing.len());
    if missing.iter().any(|p| p == "bird2") {
        disable_distro_bird();
    }
    Ok(())
}

/// The bird2 package enables and starts a system BIRD with the distro's config. No test
/// uses it (the ECMP lab runs its own BIRD processes with their own configs and sockets),
/// so a BIRD that setup itself just installed is stopped and disabled. A BIRD that was
/// installed before is never touched.
fn disable_distro_bird() {
    if !std::path::Path::new("/run/systemd/system").exists() {
        return;
    }
    match Command::new("systemctl")
        .args(["disable", "--now", "bird.service"])
        .status()
    {
        Ok(s) if s.success() => {
            println!("ok: stopped and disabled the distro's bird.service (the labs run their own)")
        }
        Ok(s) => println!("note: systemctl disable --now bird.service: {s}"),
        Err(e) => println!("note: systemctl disable --now bird.service: {e}"),
    }
}

/// Packages whose dpkg status is not "install ok installed".
fn missing_packages() -> Result<Vec<String>> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Package} ${Status}\\n"])
        .args(PACKAGES)
        .stderr(Stdio::null())
        .output()
        .context("running dpkg-query (is this Debian?)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let installed: Vec<&str> = text
        .lines()
        .filter(|l| l.ends_with(" install ok installed"))
        .filter_map(|l| l.split_whitespace().next())
        .map(|p| p.split(':').next().unwrap_or(p))
        .collect();
    Ok(PACKAGES
        .iter()
        .filter(|p| !installed.contains(p))
        .map(|p| p.to_string())
        .collect())
}

fn nightly_rust_src() -> Result<()> {
    let out = Command::new("rustup")
        .args(["component", "list", "--toolchain", "nightly", "--installed"])
        .output()
        .context("running rustup")?;
    if !out.status.success() {
        bail!(
            "no nightly toolchain: the eBPF program needs the installed nightly (LLVM 22); \
             it cannot be fetched here and must not be updated ({})",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    if String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.trim().starts_with("rust-src"))
    {
        println!("ok: nightly rust-src");
        return Ok(());
    }
    println!("installing: nightly rust-src");
    cmd::run(Command::new("rustup").args([
        "component",
        "add",
        "rust-src",
        "--toolchain",
        "nightly",
    ]))
}

fn bpf_linker() -> Result<()> {
    if let Some(v) = bpf_linker_version() {
        println!("ok: {v}");
        return Ok(());
    }
    println!("installing: bpf-linker (built against LLVM 22, about two minutes)");
    let mut c = cmd::cargo();
    c.args([
        "install",
        "bpf-linker",
        "--no-default-features",
        "--features",
        "llvm-22",
        "--locked",
    ])
    .env("LLVM_PREFIX", LLVM_PREFIX);
    cmd::run(&mut c)?;
    match bpf_linker_version() {
        Some(v) => {
            println!("ok: {v}");
            Ok(())
        }
        None => bail!(
            "bpf-linker installed but `bpf-linker --version` fails (is ~/.cargo/bin on PATH?)"
        ),
    }
}

fn bpf_linker_version() -> Option<String> {
    let out = Command::new("bpf-linker").arg("--version").output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}
