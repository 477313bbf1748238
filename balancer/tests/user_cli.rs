//! `balancer user add|passwd|remove|list` end to end: the users file is mode 0600 with Argon2id
//! hashes (never the password), found through `[console] users` of the config or `--users`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    io::Write as _,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
};

const BIN: &str = env!("CARGO_BIN_EXE_balancer");

fn scratch(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("user-{name}"));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Runs `balancer user ARGS` with `stdin` as its input (not a terminal: one line).
fn user(args: &[&str], stdin: &str) -> Output {
    let mut c = Command::new(BIN)
        .arg("user")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A command refused before it reads (a bad role) may have exited already: a broken pipe.
    if let Err(e) = c.stdin.take().unwrap().write_all(stdin.as_bytes()) {
        assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe, "{e}");
    }
    c.wait_with_output().unwrap()
}

fn ok(o: &Output) -> String {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn add_passwd_list_remove_through_the_config() {
    let d = scratch("config");
    let users = d.join("console-users");
    let cfg = d.join("balancer.toml");
    std::fs::write(
        &cfg,
        format!(
            "[dataplane]\ninterface = \"eth0\"\n\n[console]\naddress = \"127.0.0.1:9443\"\nusers = \"{}\"\n",
            users.display()
        ),
    )
    .unwrap();
    let c = cfg.to_str().unwrap();
    ok(&user(
        &["add", "alice", "--role", "operator", "-c", c],
        "correct horse battery\n",
    ));
    ok(&user(&["add", "bob", "-c", c], "another long password\n"));
    let mode = std::fs::metadata(&users).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let text = std::fs::read_to_string(&users).unwrap();
    assert!(text.contains("$argon2id$"), "{text}");
    assert!(!text.contains("correct horse"), "no password in the file");
    assert_eq!(
        ok(&user(&["list", "-c", c], "")),
        "alice\toperator\nbob\tviewer\n"
    );
    // A duplicate and an unknown role are refused; the file is unchanged.
    assert!(
        !user(&["add", "alice", "-c", c], "whatever password\n")
            .status
            .success()
    );
    assert!(
        !user(
            &["add", "carol", "--role", "root", "-c", c],
            "whatever password\n"
        )
        .status
        .success()
    );
    assert_eq!(std::fs::read_to_string(&users).unwrap(), text);
    ok(&user(
        &["passwd", "bob", "--role", "operator", "-c", c],
        "a new long password\n",
    ));
    assert_ne!(std::fs::read_to_string(&users).unwrap(), text);
    ok(&user(&["remove", "alice", "-c", c], ""));
    assert_eq!(ok(&user(&["list", "-c", c], "")), "bob\toperator\n");
}

#[test]
fn a_config_without_console_needs_users_and_a_readable_file_is_refused() {
    let d = scratch("plain");
    let cfg = d.join("balancer.toml");
    std::fs::write(&cfg, "[dataplane]\ninterface = \"eth0\"\n").unwrap();
    let o = user(&["list", "-c", cfg.to_str().unwrap()], "");
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("no [console] section"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let users = d.join("users");
    let u = users.to_str().unwrap();
    ok(&user(
        &["add", "alice", "--users", u],
        "correct horse battery\n",
    ));
    std::fs::set_permissions(&users, std::fs::Permissions::from_mode(0o644)).unwrap();
    let o = user(&["list", "--users", u], "");
    assert!(!o.status.success(), "a file others can read is refused");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("chmod 600"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}
