//! `cargo xtask install`: the release binary, the systemd unit, the default config and the
//! sysctl.d file, then `systemctl daemon-reload` when systemd runs the machine.

use std::{
    fs,
    os::unix::fs::{DirBuilderExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::cmd;

/// Options of `cargo xtask install`.
#[derive(Debug, clap::Args)]
pub struct Options {
    /// Installation prefix of the binary (`<prefix>/bin/balancer`); the unit is rewritten to it.
    #[arg(long, default_value = "/usr/local")]
    prefix: PathBuf,
    /// Stage everything under this directory instead of `/` (packaging; nothing is reloaded).
    #[arg(long)]
    destdir: Option<PathBuf>,
    /// Print what would be done, change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Use the release binary already built.
    #[arg(long)]
    no_build: bool,
}

/// Where the unit, the config and the sysctl file go.
const UNIT: &str = "/etc/systemd/system/balancer.service";
const CONFIG_DIR: &str = "/etc/balancer";
const CONFIG: &str = "/etc/balancer/balancer.toml";
const SYSCTL: &str = "/etc/sysctl.d/99-balancer.conf";
/// The binary the shipped unit names.
const UNIT_BINARY: &str = "/usr/local/bin/balancer";

/// Runs the installation.
pub fn install(opts: &Options) -> Result<()> {
    if !opts.prefix.is_absolute() {
        bail!("--prefix must be absolute: {}", opts.prefix.display());
    }
    let packaging = cmd::root().join("packaging");
    let staged = |p: &Path| match &opts.destdir {
        Some(d) => d.join(p.strip_prefix("/").unwrap_or(p)),
        None => p.to_path_buf(),
    };
    let act = Actions {
        dry_run: opts.dry_run,
    };

    // 1. The binary.
    if opts.dry_run || opts.no_build {
        println!(
            "{}: cargo build --release -p balancer",
            if opts.no_build {
                "skipped"
            } else {
                "would run"
            }
        );
    } else {
        cmd::build_release(&["balancer"])?;
    }
    let binary = opts.prefix.join("bin/balancer");
    let built = cmd::release_dir().join("balancer");
    if !opts.dry_run && !built.exists() {
        bail!(
            "{} is missing: build it first (without --no-build)",
            built.display()
        );
    }
    act.copy(&built, &staged(&binary), 0o755, Replace::Always)?;

    // 2. The unit, pointing at the installed binary.
    let unit_text = fs::read_to_string(packaging.join("balancer.service"))
        .context("reading packaging/balancer.service")?;
    let unit_text = unit_text.replace(
        &format!("{UNIT_BINARY} "),
        &format!("{} ", binary.display()),
    );
    act.write(&staged(Path::new(UNIT)), &unit_text, 0o644, Replace::Always)?;

    // 3. The default config, never over an operator's file.
    act.dir(&staged(Path::new(CONFIG_DIR)), 0o700)?;
    act.copy(
        &packaging.join("balancer.toml"),
        &staged(Path::new(CONFIG)),
        0o600,
        Replace::Never,
    )?;

    // 4. Forwarding at boot (the unit keeps /proc/sys read-only for the daemon).
    act.copy(
        &packaging.join("99-balancer.conf"),
        &staged(Path::new(SYSCTL)),
        0o644,
        Replace::Never,
    )?;

    // 5. systemd, when it runs this machine.
    let unit_installed = staged(Path::new(UNIT));
    let systemd_runs = opts.destdir.is_none() && systemd_is_pid1();
    if systemd_runs && !opts.dry_run {
        cmd::run(Command::new("sysctl").arg("-p").arg(SYSCTL))?;
        cmd::run(Command::new("systemctl").arg("daemon-reload"))?;
    } else if systemd_runs {
        println!("would run: sysctl -p {SYSCTL}; systemctl daemon-reload");
    } else {
        println!(
            "systemd is not PID 1 here (or --destdir): skipped sysctl -p and systemctl daemon-reload"
        );
    }
    println!(
        "next: edit {CONFIG}, `{} check --config {CONFIG}`, then `systemctl enable --now balancer.service`",
        binary.display()
    );

    // 6. How exposed the unit is.
    let analyzed = if unit_installed.exists() {
        unit_installed
    } else {
        packaging.join("balancer.service")
    };
    match Command::new("systemd-analyze")
        .arg("security")
        .arg("--offline=true")
        .arg("--no-pager")
        .arg(&analyzed)
        .output()
    {
        Ok(out) => {
            let text = String::from_utf8_lossy(&out.stdout);
            match text.lines().find(|l| l.contains("Overall exposure level")) {
                Some(l) => println!(
                    "{}",
                    l.trim_start_matches(|c: char| !c.is_ascii_alphanumeric())
                ),
                None => println!(
                    "systemd-analyze security gave no exposure level: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            }
        }
        Err(e) => println!("systemd-analyze unavailable ({e}): exposure not rated"),
    }
    Ok(())
}

/// True when systemd is the init system (what sd_booted() checks).
fn systemd_is_pid1() -> bool {
    Path::new("/run/systemd/system").is_dir()
        && fs::read_to_string("/proc/1/comm")
            .map(|c| c.trim() == "systemd")
            .unwrap_or(false)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Replace {
    Always,
    Never,
}

/// File operations that only print under `--dry-run`.
struct Actions {
    dry_run: bool,
}

impl Actions {
    fn dir(&self, dir: &Path, mode: u32) -> Result<()> {
        if dir.is_dir() {
            return Ok(());
        }
        if self.dry_run {
            println!("would create {} (mode {mode:o})", dir.display());
            return Ok(());
        }
        fs::DirBuilder::new()
            .recursive(true)
            .mode(mode)
            .create(dir)
            .with_context(|| format!("creating {}", dir.display()))?;
        println!("created {} (mode {mode:o})", dir.display());
        Ok(())
    }

    fn copy(&self, from: &Path, to: &Path, mode: u32, replace: Replace) -> Result<()> {
        if self.dry_run {
            return self.report(to, mode, replace, &format!("from {}", from.display()));
        }
        let bytes = fs::read(from).with_context(|| format!("reading {}", from.display()))?;
        self.put(to, &bytes, mode, replace)
    }

    fn write(&self, to: &Path, text: &str, mode: u32, replace: Replace) -> Result<()> {
        if self.dry_run {
            return self.report(to, mode, replace, "");
        }
        self.put(to, text.as_bytes(), mode, replace)
    }

    fn report(&self, to: &Path, mode: u32, replace: Replace, from: &str) -> Result<()> {
        if replace == Replace::Never && to.exists() {
            println!("would keep the existing {}", to.display());
        } else {
            println!("would install {} (mode {mode:o}) {from}", to.display());
        }
        Ok(())
    }

    /// Writes through a temporary file and a rename: a running binary is replaced, not
    /// overwritten ("text file busy"), and a crash leaves no half file.
    fn put(&self, to: &Path, bytes: &[u8], mode: u32, replace: Replace) -> Result<()> {
        if replace == Replace::Never && to.exists() {
            println!("kept the existing {} (not overwritten)", to.display());
            return Ok(());
        }
        let dir = to
            .parent()
            .with_context(|| format!("{} has no parent directory", to.display()))?;
        if !dir.is_dir() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(dir)
                .with_context(|| format!("creating {}", dir.display()))?;
        }
        let name = to
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = dir.join(format!(".{name}.xtask-install"));
        fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
        fs::set_permissions(&tmp, fs::Permissions::from_mode(mode))
            .with_context(|| format!("chmod {}", tmp.display()))?;
        fs::rename(&tmp, to).with_context(|| format!("installing {}", to.display()))?;
        println!("installed {} (mode {mode:o})", to.display());
        Ok(())
    }
}
