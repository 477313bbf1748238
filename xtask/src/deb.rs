//! `cargo xtask deb`: `balancer_<version>_amd64.deb`, built with `dpkg-deb` from a staged tree.
//!
//! `dpkg-deb` is part of dpkg (Essential on every Debian system), so building needs nothing
//! from the network and no extra tool to compile; the package's metadata lives in
//! `[package.metadata.deb]` of `balancer/Cargo.toml`, read with `cargo metadata`.
//!
//! Contents: the stripped binary in `/usr/bin`, the hardened unit (pointed at it) in
//! `/lib/systemd/system`, the default config as a conffile (`/etc/balancer`, 0700/0600), the
//! sysctl drop-in in `/usr/lib/sysctl.d`, man pages and bash/zsh/fish completions generated
//! by the binary itself, copyright, changelog and lintian overrides. The maintainer scripts
//! run `systemctl daemon-reload` only when systemd is PID 1, and never enable or start the
//! service: the default config names an interface that must be set first.

use std::{
    fs,
    io::Write as _,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::cmd;

/// Options of `cargo xtask deb`.
#[derive(Debug, clap::Args)]
pub struct Options {
    /// Use the release binary already built.
    #[arg(long)]
    pub no_build: bool,
    /// Run lintian on the package (with the shipped overrides).
    #[arg(long)]
    pub lintian: bool,
}

/// `[package.metadata.deb]` of the balancer crate.
struct Meta {
    version: String,
    maintainer: String,
    section: String,
    depends: String,
    description: String,
    extended: String,
}

fn meta() -> Result<Meta> {
    let out = cmd::cargo()
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .output()
        .context("cargo metadata")?;
    if !out.status.success() {
        bail!("cargo metadata: {}", String::from_utf8_lossy(&out.stderr));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let pkg = v["packages"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["name"] == "balancer"))
        .context("no balancer package in cargo metadata")?;
    let d = &pkg["metadata"]["deb"];
    let s = |k: &str| -> Result<String> {
        d[k].as_str()
            .map(str::to_string)
            .with_context(|| format!("[package.metadata.deb] {k} is missing"))
    };
    Ok(Meta {
        version: pkg["version"]
            .as_str()
            .context("balancer has no version")?
            .to_string(),
        maintainer: s("maintainer")?,
        section: s("section")?,
        depends: s("depends")?,
        description: pkg["description"]
            .as_str()
            .context("balancer has no description")?
            .to_string(),
        extended: s("extended-description")?,
    })
}

/// Paths inside the package.
const BIN: &str = "usr/bin/balancer";
const UNIT: &str = "lib/systemd/system/balancer.service";
const CONFIG: &str = "etc/balancer/balancer.toml";
const SYSCTL: &str = "usr/lib/sysctl.d/99-balancer.conf";
const DOC: &str = "usr/share/doc/balancer";

/// Builds the package; returns its path.
pub fn build(opts: &Options) -> Result<PathBuf> {
    let m = meta()?;
    if !opts.no_build {
        cmd::build_release(&["balancer"])?;
    }
    let built = cmd::release_dir().join("balancer");
    if !built.exists() {
        bail!("{} is missing: build it first", built.display());
    }
    let packaging = cmd::root().join("packaging");
    let stage = cmd::target_dir().join("deb/balancer");
    if stage.exists() {
        fs::remove_dir_all(&stage).with_context(|| format!("removing {}", stage.display()))?;
    }
    let at = |p: &str| stage.join(p);

    // The binary, stripped (the symbols stay in target/; lintian wants no debug data).
    put_file(&at(BIN), &fs::read(&built)?, 0o755)?;
    cmd::run(
        Command::new("strip")
            .args(["--strip-unneeded", "--remove-section=.comment"])
            .arg(at(BIN)),
    )?;
    check_libraries(&at(BIN), &m.depends)?;

    let unit = fs::read_to_string(packaging.join("balancer.service"))?
        .replace("/usr/local/bin/balancer ", "/usr/bin/balancer ")
        .replace(
            "# Installed by `cargo xtask install`;",
            "# Installed by the balancer package (or `cargo xtask install`);",
        );
    put_file(&at(UNIT), unit.as_bytes(), 0o644)?;
    put_file(
        &at(CONFIG),
        &fs::read(packaging.join("balancer.toml"))?,
        0o600,
    )?;
    fs::set_permissions(at("etc/balancer"), fs::Permissions::from_mode(0o700))?;
    put_file(
        &at(SYSCTL),
        &fs::read(packaging.join("99-balancer.conf"))?,
        0o644,
    )?;

    // Man pages and completions, from the binary's own clap definition.
    let man = at("usr/share/man/man1");
    fs::create_dir_all(&man)?;
    cmd::run(Command::new(&built).arg("man").arg(&man))?;
    for page in fs::read_dir(&man)? {
        let p = page?.path();
        cmd::run(Command::new("gzip").args(["-9n"]).arg(&p))?;
    }
    for (shell, path) in [
        ("bash", "usr/share/bash-completion/completions/balancer"),
        ("zsh", "usr/share/zsh/vendor-completions/_balancer"),
        ("fish", "usr/share/fish/vendor_completions.d/balancer.fish"),
    ] {
        let out = Command::new(&built).args(["completions", shell]).output()?;
        if !out.status.success() || out.stdout.is_empty() {
            bail!("balancer completions {shell} failed");
        }
        put_file(&at(path), &out.stdout, 0o644)?;
    }

    put_file(
        &at(&format!("{DOC}/copyright")),
        copyright(&m).as_bytes(),
        0o644,
    )?;
    let changelog = at(&format!("{DOC}/changelog"));
    put_file(&changelog, changelog_text(&m).as_bytes(), 0o644)?;
    cmd::run(Command::new("gzip").args(["-9n"]).arg(&changelog))?;
    put_file(
        &at("usr/share/lintian/overrides/balancer"),
        &fs::read(packaging.join("debian/lintian-overrides"))?,
        0o644,
    )?;

    // Control area.
    let debian = stage.join("DEBIAN");
    fs::create_dir_all(&debian)?;
    for script in ["postinst", "postrm"] {
        put_file(
            &debian.join(script),
            &fs::read(packaging.join("debian").join(script))?,
            0o755,
        )?;
    }
    put_file(
        &debian.join("conffiles"),
        format!("/{CONFIG}\n").as_bytes(),
        0o644,
    )?;
    put_file(&debian.join("md5sums"), md5sums(&stage)?.as_bytes(), 0o644)?;
    let size_kib = du_kib(&stage)?;
    let control = format!(
        "Package: balancer\nVersion: {}\nArchitecture: amd64\nMaintainer: {}\nInstalled-Size: {size_kib}\nDepends: {}\nSection: {}\nPriority: optional\nDescription: {}\n{}",
        m.version,
        m.maintainer,
        m.depends,
        m.section,
        m.description,
        m.extended
            .lines()
            .map(|l| if l.trim().is_empty() {
                " .\n".to_string()
            } else {
                format!(" {l}\n")
            })
            .collect::<String>()
    );
    put_file(&debian.join("control"), control.as_bytes(), 0o644)?;

    let deb = cmd::target_dir().join(format!("balancer_{}_amd64.deb", m.version));
    cmd::run(
        Command::new("dpkg-deb")
            .args(["--root-owner-group", "-Zxz", "--build"])
            .arg(&stage)
            .arg(&deb),
    )?;
    if opts.lintian {
        lintian(&deb)?;
    }
    println!("built {}", deb.display());
    Ok(deb)
}

/// Runs lintian; any tag not overridden fails.
pub fn lintian(deb: &Path) -> Result<()> {
    let out = Command::new("lintian")
        .args([
            "--fail-on",
            "error,warning,info",
            "--info",
            "--display-info",
        ])
        .arg(deb)
        .output()
        .context("lintian (Debian package lintian)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    print!("{text}");
    if !out.status.success() {
        bail!(
            "lintian reported tags on {}:\n{text}{}",
            deb.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

fn put_file(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    if let Some(d) = path.parent() {
        fs::create_dir_all(d)?;
    }
    let mut f = fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    f.write_all(bytes)?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// Fails when the binary needs a shared library the `Depends:` line does not cover.
fn check_libraries(bin: &Path, depends: &str) -> Result<()> {
    let out = Command::new("ldd").arg(bin).output().context("ldd")?;
    let text = String::from_utf8_lossy(&out.stdout);
    for line in text.lines() {
        let lib = line.split_whitespace().next().unwrap_or("");
        let pkg = match lib {
            l if l.starts_with("linux-vdso") || l.contains("ld-linux") => continue,
            l if l.starts_with("libc.so") || l.starts_with("libm.so") => "libc6",
            l if l.starts_with("libgcc_s.so") => "libgcc-s1",
            other => bail!(
                "{}: links {other}, which [package.metadata.deb] depends does not name",
                bin.display()
            ),
        };
        if !depends.contains(pkg) {
            bail!(
                "{}: needs {lib} (package {pkg}), missing from depends = {depends:?}",
                bin.display()
            );
        }
    }
    Ok(())
}

fn md5sums(stage: &Path) -> Result<String> {
    let mut files = Vec::new();
    walk(stage, &mut files)?;
    files.sort();
    let mut out = String::new();
    for f in files {
        let rel = f.strip_prefix(stage)?;
        if rel.starts_with("DEBIAN") {
            continue;
        }
        let o = Command::new("md5sum").arg(&f).output()?;
        let sum = String::from_utf8_lossy(&o.stdout);
        let sum = sum.split_whitespace().next().context("md5sum")?;
        out.push_str(&format!("{sum}  {}\n", rel.display()));
    }
    Ok(out)
}

fn walk(d: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for e in fs::read_dir(d)? {
        let p = e?.path();
        if p.is_dir() {
            walk(&p, out)?;
        } else {
            out.push(p);
        }
    }
    Ok(())
}

fn du_kib(stage: &Path) -> Result<u64> {
    let mut files = Vec::new();
    walk(stage, &mut files)?;
    let bytes: u64 = files
        .iter()
        .filter(|f| !f.strip_prefix(stage).is_ok_and(|r| r.starts_with("DEBIAN")))
        .map(|f| fs::metadata(f).map(|m| m.len()).unwrap_or(0))
        .sum();
    Ok(bytes.div_ceil(1024))
}

fn copyright(m: &Meta) -> String {
    format!(
        "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\
         Upstream-Name: balancer\n\
         Upstream-Contact: {}\n\n\
         Files: *\n\
         Copyright: 2026 the balancer authors\n\
         License: MIT or Apache-2.0\n \
         This package may be used under the terms of the MIT license or of the\n \
         Apache License, Version 2.0, at your option.\n \
         .\n \
         On Debian systems, the full text of the Apache License, Version 2.0 is in\n \
         /usr/share/common-licenses/Apache-2.0.\n",
        m.maintainer
    )
}

fn changelog_text(m: &Meta) -> String {
    // A fixed date: the package is reproducible; the version says which source it is.
    format!(
        "balancer ({}) unstable; urgency=medium\n\n  * Package built by `cargo xtask deb`.\n\n -- {}  Tue, 01 Dec 2026 00:00:00 +0000\n",
        m.version, m.maintainer
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    //! Builds the package from the release binary (`cargo xtask test` builds it first),
    //! installs it with `dpkg -i`, checks the installed files, purges it and checks that
    //! nothing is left. It runs as root on the developer's machine: it stays away from a
    //! machine that already has a balancer (package or `cargo xtask install`).

    use super::*;

    fn dpkg_installed() -> bool {
        Command::new("dpkg-query")
            .args(["-W", "-f=${Status}", "balancer"])
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("installed"))
    }

    /// Purges the package even when an assertion fails halfway.
    struct Purge;
    impl Drop for Purge {
        fn drop(&mut self) {
            let _ = Command::new("dpkg").args(["--purge", "balancer"]).output();
        }
    }

    fn ok(c: &mut Command) -> String {
        let o = c.output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(o.status.success(), "{}: {text}", cmd::show(c));
        text
    }

    #[test]
    fn deb_installs_checks_and_purges_cleanly() {
        let existing = [
            "/usr/bin/balancer",
            "/usr/local/bin/balancer",
            "/etc/balancer",
            "/lib/systemd/system/balancer.service",
            "/etc/systemd/system/balancer.service",
        ];
        if dpkg_installed() || existing.iter().any(|p| Path::new(p).exists()) {
            eprintln!(
                "SKIPPED deb_installs_checks_and_purges_cleanly: a balancer is already installed here (package or one of {existing:?}); the test does not touch it"
            );
            return;
        }
        if !cmd::release_dir().join("balancer").exists() {
            panic!("the release binary is missing: run `cargo xtask test` (it builds it first)");
        }
        let deb = build(&Options {
            no_build: true,
            lintian: true,
        })
        .unwrap();
        let listing = ok(Command::new("dpkg-deb").arg("-c").arg(&deb));
        for want in [
            "./usr/bin/balancer",
            "./lib/systemd/system/balancer.service",
            "./etc/balancer/balancer.toml",
            "./usr/lib/sysctl.d/99-balancer.conf",
            "./usr/share/man/man1/balancer.1.gz",
            "./usr/share/man/man1/balancer-import.1.gz",
            "./usr/share/bash-completion/completions/balancer",
            "./usr/share/zsh/vendor-completions/_balancer",
            "./usr/share/fish/vendor_completions.d/balancer.fish",
        ] {
            assert!(listing.contains(want), "{want} not in\n{listing}");
        }
        let files: Vec<String> = listing
            .lines()
            .filter(|l| l.starts_with('-'))
            .filter_map(|l| l.split_whitespace().last())
            .map(|p| p.trim_start_matches('.').to_string())
            .collect();

        let _purge = Purge;
        ok(Command::new("dpkg").arg("-i").arg(&deb));
        let mode = |p: &str| fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode("/etc/balancer"), 0o700);
        assert_eq!(mode("/etc/balancer/balancer.toml"), 0o600);
        assert_eq!(mode("/usr/bin/balancer"), 0o755);
        let conffiles = ok(Command::new("dpkg-query").args(["-W", "-f=${Conffiles}", "balancer"]));
        assert!(
            conffiles.contains("/etc/balancer/balancer.toml"),
            "{conffiles}"
        );
        // Installed, not enabled: the default config must be edited first.
        assert!(
            !Path::new("/etc/systemd/system/multi-user.target.wants/balancer.service").exists()
        );

        let check = ok(Command::new("/usr/bin/balancer").args([
            "check",
            "--config",
            "/etc/balancer/balancer.toml",
        ]));
        assert!(check.contains(": ok ("), "{check}");
        let unit = fs::read_to_string("/lib/systemd/system/balancer.service").unwrap();
        assert!(unit.contains("ExecStart=/usr/bin/balancer run"), "{unit}");
        ok(Command::new("systemd-analyze")
            .args(["verify", "/lib/systemd/system/balancer.service"]));
        let bash = fs::read_to_string("/usr/share/bash-completion/completions/balancer").unwrap();
        assert!(bash.contains("import"), "completions know the commands");

        ok(Command::new("dpkg").args(["--purge", "balancer"]));
        assert!(!dpkg_installed());
        for f in &files {
            assert!(!Path::new(f).exists(), "{f} is left after purge");
        }
        assert!(
            !Path::new("/etc/balancer").exists(),
            "/etc/balancer is left after purge"
        );
    }
}
