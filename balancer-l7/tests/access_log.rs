//! No path (unless its route opts in), query string, cookie, header or body byte ever
//! reaches any log: they can carry PHI (`/Patient/12345`).
//! Own test binary: it installs a global tracing subscriber that captures everything.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use balancer_l7::L7;
use common::*;

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_query_string_marker_in_any_log() {
    let cap = Capture::default();
    let writer = cap.clone();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .init();

    let dir = TempDir::new("phi");
    let ca = Ca::new("test CA");
    let ca_path = ca.write(&dir, "ca.pem");
    let (c, k) = ca.leaf(&dir, "a", "a.test", &["a.test"]);
    let a = backend("A", None).await;
    let dead = dead_port().await;
    let toml = format!(
        r#"
        [[listener]]
        name = "web"
        address = "127.0.0.1:0"
        [[listener.certificate]]
        cert = {c:?}
        key = {k:?}
        server_names = ["a.test"]
        [[redirect]]
        address = "127.0.0.1:0"
        [[pool]]
        name = "p"
        response_timeout = "500ms"
        [[pool.backend]]
        address = "{dead}"
        [[pool.backend]]
        address = "{a}"
        [[route]]
        name = "api"
        path_prefix = "/api"
        pool = "p"
        [[route]]
        name = "open"
        path_prefix = "/open"
        pool = "p"
        log_path = true
        "#,
        c = c.display().to_string(),
        k = k.display().to_string(),
        a = a.addr,
    );
    let l7 = L7::start(config(&toml)).await.unwrap();
    let port = l7.listener_addr("web").unwrap().port();
    let marker = "PHIMARKER7731";
    let q = format!("?patient={marker}&mrn={marker}");
    let cookie = format!("session={marker}");
    let hdr = format!("X-Patient: {marker}");
    for (path, extra) in [
        (format!("/api/Patient/{marker}{q}"), vec!["--http1.1"]),
        (format!("/api/Patient/{marker}{q}"), vec!["--http2"]),
        (format!("/api/{marker}/slow{q}"), vec![]),
        (format!("/nowhere/{marker}{q}"), vec![]),
        (
            format!("/api/post/{marker}{q}"),
            vec!["--data-binary", marker],
        ),
        (format!("/open/visible{q}"), vec![]),
    ] {
        let mut args: Vec<&str> = extra;
        args.extend(["-b", &cookie, "-H", &hdr]);
        let (code, _, _) = curl(&ca_path, "a.test", port, &path, &args).await;
        assert_ne!(code, 0);
    }
    let mut cmd = std::process::Command::new("curl");
    cmd.args([
        "-sS",
        "--max-time",
        "5",
        "-H",
        "Host: a.test",
        "-b",
        &cookie,
    ])
    .arg(format!(
        "http://{}/redir/{marker}{q}",
        l7.redirect_addrs()[0]
    ));
    let out = run_async(cmd, Duration::from_secs(10)).await;
    assert!(out.status.success());
    l7.shutdown(Duration::from_secs(5)).await;

    let log = String::from_utf8(cap.0.lock().unwrap().clone()).unwrap();
    let access: Vec<&str> = log.lines().filter(|l| l.contains(" access:")).collect();
    eprintln!("{}", access.join("\n"));
    assert_eq!(access.len(), 7, "{log}");
    let has = |parts: &[&str]| access.iter().any(|l| parts.iter().all(|p| l.contains(p)));
    assert!(has(&["route=api", "status=200", "path=-"]), "{log}");
    assert!(has(&["route=-", "status=404", "path=-"]), "{log}");
    assert!(has(&["route=redirect", "status=301", "path=-"]), "{log}");
    assert!(has(&["route=api", "status=504"]), "{log}");
    assert!(has(&[&format!("backend={}", a.addr)]), "{log}");
    // The route that opted in logs its path (still without the query string).
    assert!(
        has(&["route=open", "status=200", "path=/open/visible "]),
        "{log}"
    );
    for hidden in ["/api", "/nowhere", "/redir", "/Patient"] {
        assert!(
            !log.contains(hidden),
            "{hidden} leaked into the log:\n{log}"
        );
    }
    assert!(!log.contains(marker), "marker leaked into the log:\n{log}");
    assert!(!log.contains("patient="), "query string leaked:\n{log}");
}
