//! Where the binaries the lab runs are found.

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};

/// The `balancer` binary: `$BALANCER_BIN`, else `<target>/release/balancer` (the eBPF object
/// is only built in release). `cargo xtask test` builds it before the tests.
pub fn balancer_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("BALANCER_BIN") {
        return Ok(PathBuf::from(p));
    }
    let candidates: Vec<PathBuf> = target_dirs()
        .into_iter()
        .map(|t| t.join("release").join("balancer"))
        .collect();
    find(
        &candidates,
        "balancer (run `cargo build --release -p balancer`)",
    )
}

/// A tool of this crate (`blb-echo`, `blb-client`): `$BLB_BIN_DIR/<name>`, else next to the
/// running executable (or one level up, from `deps/`), else `<target>/{release,debug}/<name>`.
pub fn tool_bin(name: &str) -> Result<PathBuf> {
    let mut candidates = Vec::new();
    if let Some(d) = std::env::var_os("BLB_BIN_DIR") {
        candidates.push(PathBuf::from(d).join(name));
    }
    if let Ok(exe) = std::env::current_exe()
        && let Some(dir) = exe.parent()
    {
        candidates.push(dir.join(name));
        if let Some(up) = dir.parent() {
            candidates.push(up.join(name));
        }
    }
    for t in target_dirs() {
        candidates.push(t.join("release").join(name));
        candidates.push(t.join("debug").join(name));
    }
    find(
        &candidates,
        &format!("{name} (run `cargo build --release -p balancer-tests`)"),
    )
}

/// `$CARGO_TARGET_DIR`, the target directory holding the running executable, and the
/// workspace's `target/`.
fn target_dirs() -> Vec<PathBuf> {
    let mut v = Vec::new();
    if let Some(t) = std::env::var_os("CARGO_TARGET_DIR") {
        v.push(PathBuf::from(t));
    }
    if let Ok(exe) = std::env::current_exe() {
        // <target>/<profile>/deps/<exe> or <target>/<profile>/<exe>
        for anc in exe.ancestors().skip(1).take(3) {
            if anc.file_name().is_some_and(|n| n == "target") {
                v.push(anc.to_path_buf());
            }
        }
    }
    let ws = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("target");
    v.push(ws);
    v
}

fn find(candidates: &[PathBuf], what: &str) -> Result<PathBuf> {
    match candidates.iter().find(|p| p.is_file()) {
        Some(p) => Ok(p.clone()),
        None => bail!("cannot find {what}; looked at {candidates:?}"),
    }
}
