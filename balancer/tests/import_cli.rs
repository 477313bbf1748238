//! `balancer import` end to end: each product's sample farm becomes a file that
//! `balancer check` accepts; a malformed input names its file and line and writes nothing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

const BIN: &str = env!("CARGO_BIN_EXE_balancer");

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../balancer-import/tests/fixtures")
        .join(name)
}

fn run(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().unwrap()
}

/// A fresh directory under the target dir, removed first if a previous run left it.
fn scratch(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("import-{name}"));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn each_product_imports_to_a_file_balancer_check_accepts() {
    for (product, file, services, l7) in [
        ("f5", "bigip.conf", 3, true),
        ("netscaler", "ns.conf", 2, true),
        ("arr", "applicationHost.config", 0, true),
    ] {
        let dir = scratch(product);
        let out = dir.join("balancer.toml");
        let src = fixture(file);
        let r = run(&[
            "import",
            product,
            src.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
        ]);
        let stderr = String::from_utf8_lossy(&r.stderr);
        assert!(r.status.success(), "{product}: {stderr}");
        assert!(
            r.stdout.is_empty(),
            "{product}: -o writes nothing to stdout"
        );
        for group in ["translated (", "approximated (", "not translated ("] {
            assert!(stderr.contains(group), "{product}: {stderr}");
        }
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(
            std::fs::metadata(&out).unwrap().permissions().mode() & 0o777,
            0o600
        );

        let c = run(&["check", "--config", out.to_str().unwrap()]);
        assert!(
            c.status.success(),
            "{product}: {}\n{}",
            String::from_utf8_lossy(&c.stderr),
            std::fs::read_to_string(&out).unwrap()
        );
        let v = balancer::config::load(&out).unwrap();
        assert_eq!(v.services.len(), services, "{product}");
        assert_eq!(v.l7.is_some(), l7, "{product}");

        // Without -o the file goes to stdout and is the same.
        let r = run(&["import", product, src.to_str().unwrap()]);
        assert!(r.status.success());
        assert_eq!(r.stdout, std::fs::read(&out).unwrap(), "{product}");

        // An existing file is kept unless --force.
        let again = run(&[
            "import",
            product,
            src.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
        ]);
        assert!(!again.status.success());
        assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));
        let forced = run(&[
            "import",
            product,
            src.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--force",
        ]);
        assert!(forced.status.success());
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            1,
            "no temporary file left"
        );
    }
}

#[test]
fn a_malformed_input_names_file_and_line_and_writes_nothing() {
    for (product, file, line) in [
        ("f5", "bad-brace.conf", 5),
        ("f5", "bad-pool-ref.conf", 3),
        ("netscaler", "bad-quote.conf", 3),
        ("netscaler", "bad-bind.conf", 4),
        ("arr", "bad-xml.config", 6),
        ("arr", "bad-timespan.config", 7),
    ] {
        let dir = scratch(&format!("bad-{product}-{file}"));
        let out = dir.join("balancer.toml");
        let src = fixture(file);
        let r = run(&[
            "import",
            product,
            src.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
        ]);
        assert_eq!(r.status.code(), Some(1), "{file}");
        let stderr = String::from_utf8_lossy(&r.stderr);
        assert!(
            stderr.starts_with(&format!("{}:{line}: ", src.display())),
            "{file}: {stderr}"
        );
        assert!(r.stdout.is_empty());
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            0,
            "{file}: nothing written"
        );
    }
}
