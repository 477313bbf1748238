//! Running cargo and other programs, with the command shown first.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

/// The workspace root (this crate lives in `<root>/xtask`).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// `$CARGO_TARGET_DIR` or `<root>/target`.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"))
}

/// Where the release binaries land.
pub fn release_dir() -> PathBuf {
    target_dir().join("release")
}

/// A `cargo` command in the workspace root, without the variables `cargo run` set for xtask
/// itself (they would leak into the build scripts of the inner build).
pub fn cargo() -> Command {
    let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.current_dir(root());
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy();
        if k.starts_with("CARGO_PKG_")
            || k.starts_with("CARGO_MANIFEST_")
            || matches!(
                k.as_ref(),
                "CARGO_BIN_NAME" | "CARGO_CRATE_NAME" | "CARGO_PRIMARY_PACKAGE"
            )
        {
            c.env_remove(k.as_ref());
        }
    }
    c
}

/// Prints `$ <command>` and runs it, failing on a non-zero exit.
pub fn run(cmd: &mut Command) -> Result<()> {
    println!("$ {}", show(cmd));
    let status = cmd
        .status()
        .with_context(|| format!("starting {}", show(cmd)))?;
    if !status.success() {
        bail!("`{}` failed: {status}", show(cmd));
    }
    Ok(())
}

/// The command line, for messages.
pub fn show(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// `cargo build --release -p <pkg>…`, then points the lab at those binaries.
pub fn build_release(packages: &[&str]) -> Result<()> {
    let mut c = cargo();
    c.args(["build", "--release"]);
    for p in packages {
        c.args(["-p", p]);
    }
    run(&mut c)?;
    point_lab_at_release();
    Ok(())
}

/// The lab library looks for the balancer and the tools through these variables; without them
/// it would prefer the tools next to the running (debug) xtask.
pub fn point_lab_at_release() {
    let rel = release_dir();
    // SAFETY: called from the main thread before any other thread is started.
    unsafe {
        std::env::set_var("BALANCER_BIN", rel.join("balancer"));
        std::env::set_var("BLB_BIN_DIR", &rel);
    }
}

/// `cargo test --workspace --release --no-fail-fast <args>` (no `--workspace` when the args
/// name packages), output streamed, then one summary line over every test binary.
pub fn test(args: &[String]) -> Result<()> {
    let mut c = cargo();
    c.args(["test", "--release", "--no-fail-fast"]);
    let picks_packages = args
        .iter()
        .take_while(|a| *a != "--")
        .any(|a| a == "-p" || a.starts_with("--package") || a.starts_with("-p"));
    if !picks_packages {
        c.arg("--workspace");
    }
    c.args(args);
    println!("$ {}", show(&c));
    let mut child = c
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", show(&c)))?;
    let mut totals = Totals::default();
    if let Some(out) = child.stdout.take() {
        for line in BufReader::new(out).lines() {
            let line = line.context("reading cargo test output")?;
            println!("{line}");
            totals.add(&line);
        }
    }
    let status = child.wait()?;
    println!();
    println!(
        "summary: {} passed, {} failed, {} skipped",
        totals.passed, totals.failed, totals.ignored
    );
    if !status.success() {
        bail!("cargo test failed: {status}");
    }
    Ok(())
}

/// Sums of the `test result:` lines of every test binary.
#[derive(Debug, Default)]
struct Totals {
    passed: u64,
    failed: u64,
    ignored: u64,
}

impl Totals {
    fn add(&mut self, line: &str) {
        let Some(rest) = line.strip_prefix("test result: ") else {
            return;
        };
        for part in rest.split(['.', ';']) {
            let mut w = part.split_whitespace();
            let (Some(n), Some(what)) = (w.next(), w.next()) else {
                continue;
            };
            let Ok(n) = n.parse::<u64>() else { continue };
            match what {
                "passed" => self.passed += n,
                "failed" => self.failed += n,
                "ignored" => self.ignored += n,
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_parse_cargo_lines() {
        let mut t = Totals::default();
        t.add("test result: ok. 5 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.00s");
        t.add("test result: FAILED. 4 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out; finished in 2.89s");
        t.add("running 3 tests");
        assert_eq!((t.passed, t.failed, t.ignored), (9, 2, 1));
    }
}
