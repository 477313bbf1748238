//! The CLI verbs against the control socket served by `api::serve`, with a stand-in daemon;
//! and the socket refusing non-root clients (run as uid 65534 through `setpriv`).

use std::{
    collections::BTreeMap,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use balancer::{
    api::{
        self,
        protocol::{BackendStatus, Message, Request, ServiceStatus, Status},
    },
    dataplane::counters::Traffic,
};
use serde_json::json;
use tokio::sync::mpsc;

const BIN: &str = env!("CARGO_BIN_EXE_balancer");

/// An enum of the status from its lowercase word.
fn word<T: serde::de::DeserializeOwned>(w: &str) -> T {
    serde_json::from_value(serde_json::Value::String(w.into())).unwrap()
}

fn status() -> Status {
    let t = Traffic {
        packets: 10,
        bytes: 15_000,
        new_flows: 2,
        resets: 1,
        drops: 0,
        refused: 0,
        syn_retries: 0,
    };
    let b = |a: &str, active: bool, health: &str| BackendStatus {
        address: a.parse().unwrap(),
        weight: 1,
        priority: if active { 1 } else { 2 },
        admin: word("up"),
        health: word(health),
        state: word(if health == "down" { "down" } else { "up" }),
        active,
        check_latency_ms: Some(1.25),
        traffic: t.clone(),
        flows: 3,
    };
    Status {
        l7: None,
        l7_backends: Vec::new(),
        mllp: None,
        capacity: Default::default(),
        certificates: Vec::new(),
        ha: None,
        bgp: None,
        config: "/etc/balancer/balancer.toml".into(),
        interfaces: vec!["lb0".into()],
        uptime_secs: 42,
        reloads: 0,
        config_errors: 0,
        failovers: 1,
        flows: 3,
        reasons: BTreeMap::new(),
        flows_expired: BTreeMap::new(),
        services: vec![ServiceStatus {
            name: "hl7-listener".into(),
            vip: "10.77.0.100:6661".parse().unwrap(),
            protocol: word("tcp"),
            forwarding: word("nat"),
            scheduler: word("failover"),
            health_check: Some("mllp".into()),
            active: Some("10.77.0.12:6661".parse().unwrap()),
            traffic: t.clone(),
            backends: vec![
                b("10.77.0.11:6661", false, "down"),
                b("10.77.0.12:6661", true, "up"),
            ],
        }],
    }
}

/// The daemon stand-in: counts the requests it sees.
fn fake_daemon(seen: Arc<AtomicUsize>) -> mpsc::Sender<Message> {
    let (tx, mut rx) = mpsc::channel::<Message>(8);
    tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            seen.fetch_add(1, Ordering::SeqCst);
            let reply = match m.request {
                Request::Status => serde_json::to_value(status()).map_err(|e| e.to_string()),
                Request::Reload => Err(
                    "config refused, nothing changed:\nbalancer.toml:4:9: unknown field `vipp`"
                        .into(),
                ),
                Request::HaRole { role } => {
                    Ok(json!({ "ok": true, "message": format!("ha role: {role}") }))
                }
                Request::Bgp { verb } => Ok(
                    json!({ "ok": true, "message": format!("bgp {}: no VIP announced", verb.name()) }),
                ),
                Request::Backend {
                    service, backend, ..
                } => {
                    if service == "hl7-listener" {
                        Ok(json!({ "ok": true, "message": format!("done: {service} {backend}") }))
                    } else {
                        Err(format!("no service '{service}'"))
                    }
                }
            };
            let _ = m.reply.send(reply);
        }
    });
    tx
}

async fn balancer(args: &[&str]) -> Output {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || Command::new(BIN).args(&args).output().unwrap())
        .await
        .unwrap()
}

async fn as_nobody(args: &[&str]) -> Output {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", BIN])
            .args(&args)
            .output()
            .expect("setpriv (util-linux) runs")
    })
    .await
    .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

async fn start(dir: &Path) -> (PathBuf, Arc<AtomicUsize>) {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let sock = dir.join("run").join("control.sock");
    let seen = Arc::new(AtomicUsize::new(0));
    let tx = fake_daemon(seen.clone());
    let path = sock.clone();
    tokio::spawn(async move { api::serve(&path, tx).await });
    for _ in 0..200 {
        if sock.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    (sock, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_verbs_through_the_socket() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test runs as root (it checks that non-root is refused)"
    );
    let dir = std::env::temp_dir().join(format!("balancer-ctl-{}", std::process::id()));
    let (sock, _seen) = start(&dir).await;
    let s = sock.to_str().unwrap();

    let out = balancer(&["status", "--socket", s]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let table = text(&out.stdout);
    println!("{table}");
    assert!(table.contains("hl7-listener"), "{table}");
    assert!(table.contains("10.77.0.12:6661"), "{table}");
    assert!(table.contains("failover"), "{table}");

    let out = balancer(&["status", "--json", "--socket", s]).await;
    assert!(out.status.success());
    let back: Status = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(back, status());

    for verb in ["drain", "disable", "enable"] {
        let out = balancer(&[verb, "hl7-listener", "10.77.0.11:6661", "--socket", s]).await;
        assert!(out.status.success(), "{verb}: {}", text(&out.stderr));
        assert_eq!(text(&out.stdout), "done: hl7-listener 10.77.0.11:6661\n");
    }
    let out = balancer(&["drain", "nope", "10.0.0.1", "--socket", s]).await;
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(text(&out.stderr), "balancer: no service 'nope'\n");

    for verb in ["withdraw", "announce"] {
        let out = balancer(&["bgp", verb, "--socket", s]).await;
        assert!(out.status.success(), "bgp {verb}: {}", text(&out.stderr));
        assert_eq!(text(&out.stdout), format!("bgp {verb}: no VIP announced\n"));
    }

    let out = balancer(&["reload", "--socket", s]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("balancer.toml:4:9: unknown field `vipp`"),
        "{}",
        text(&out.stderr)
    );

    let missing = dir.join("nowhere.sock");
    let out = balancer(&["status", "--socket", missing.to_str().unwrap()]).await;
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr),
        format!(
            "balancer: is balancer running? no control socket at {}\n",
            missing.display()
        )
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_root_is_refused() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test runs as root (it checks that non-root is refused)"
    );
    let dir = std::env::temp_dir().join(format!("balancer-ctl-nobody-{}", std::process::id()));
    let (sock, seen) = start(&dir).await;
    let s = sock.to_str().unwrap();
    let run = sock.parent().unwrap();
    assert_eq!(
        std::fs::metadata(run).unwrap().permissions().mode() & 0o777,
        0o700
    );
    assert_eq!(
        std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777,
        0o600
    );

    // First line of defence: file permissions.
    let out = as_nobody(&["status", "--socket", s]).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    assert!(
        text(&out.stderr).contains("permission denied"),
        "{}",
        text(&out.stderr)
    );

    // Second: the peer credentials, even when the permissions are opened up by mistake.
    std::fs::set_permissions(run, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    for args in [
        vec!["status", "--socket", s],
        vec!["disable", "hl7-listener", "10.77.0.12:6661", "--socket", s],
        vec!["reload", "--socket", s],
    ] {
        let out = as_nobody(&args).await;
        assert_eq!(
            out.status.code(),
            Some(1),
            "{args:?}: {}",
            text(&out.stdout)
        );
        assert_eq!(
            text(&out.stderr),
            "balancer: forbidden: the control socket serves root only\n"
        );
    }
    assert_eq!(
        seen.load(Ordering::SeqCst),
        0,
        "a non-root request reached the daemon"
    );

    // Root still gets through.
    let out = balancer(&["status", "--socket", s]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(seen.load(Ordering::SeqCst), 1);
    let _ = std::fs::remove_dir_all(&dir);
}
