//! The L7 proxy inside the daemon, in a lab: TLS terminated on the VIP with a certificate for
//! the balancer's name, routed to backends' HTTP, health-checked by the controller, and the L4
//! service on the same VIP keeps working (the XDP program passes the L7 port to the kernel).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{thread::sleep, time::Duration};

use balancer_tests::{ECHO_PORT, HTTP_PORT, Host, Lab, vip4};

fn openssl_cert(lab: &Lab) -> (String, String) {
    let dir = lab.dir();
    let cert = dir.join("lb.pem");
    let key = dir.join("lb.key");
    let out = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
        ])
        .args([
            "-subj",
            "/CN=lb.example.org",
            "-addext",
            "subjectAltName=DNS:lb.example.org",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (cert.display().to_string(), key.display().to_string())
}

fn curl(lab: &Lab, url: &str, extra: &[&str]) -> String {
    let mut args = vec!["curl", "-sS", "--max-time", "5", "--cacert"];
    let ca = lab.dir().join("lb.pem").display().to_string();
    args.push(&ca);
    args.extend_from_slice(&["--resolve", "lb.example.org:443:10.77.0.100"]);
    args.extend_from_slice(extra);
    args.push(url);
    lab.exec(Host::Client, &args)
        .unwrap_or_else(|e| format!("ERROR {e}"))
}

#[test]
fn tls_terminated_on_the_vip_routes_to_healthy_backends() {
    let lab = Lab::new(3).unwrap();
    let mut echo = lab.spawn_echo_all().unwrap();
    let (cert, key) = openssl_cert(&lab);
    let backends: Vec<String> = lab
        .backend_hosts()
        .into_iter()
        .map(|h| {
            format!(
                "  [[l7.pool.backend]]\n  address = \"{}:{HTTP_PORT}\"\n",
                h.v4().unwrap()
            )
        })
        .collect();
    let l4: Vec<String> = lab
        .backend_hosts()
        .into_iter()
        .map(|h| format!("{{ address = \"{}:{ECHO_PORT}\" }}", h.v4().unwrap()))
        .collect();
    let cfg = format!(
        r#"[dataplane]
interface = "eth0"

[controller]
socket = "{sock}"
metrics = "127.0.0.1:9550"

[[service]]
name = "web-l4"
vip = "10.77.0.100:{ECHO_PORT}"
backends = [ {l4} ]

[[l7.listener]]
name = "https"
address = "10.77.0.100:443"
  [[l7.listener.certificate]]
  cert = "{cert}"
  key = "{key}"
  server_names = ["lb.example.org"]

[[l7.redirect]]
address = "10.77.0.100:80"
https_port = 443

[[l7.route]]
name = "all"
host = "lb.example.org"
pool = "web"

[[l7.pool]]
name = "web"
health = {{ kind = "http", path = "/health", interval = "200ms", timeout = "150ms", rise = 2, fall = 2 }}
{backends}"#,
        sock = lab.dir().join("control.sock").display(),
        l4 = l4.join(", "),
        backends = backends.join("")
    );
    let mut b = lab.start_balancer(&cfg).unwrap();
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..30 {
        let body = curl(&lab, "https://lb.example.org/?patient=ZZQUERYMARKER", &[]);
        assert!(body.starts_with("served-by be"), "{body}");
        seen.insert(body.trim().to_string());
    }
    assert_eq!(seen.len(), 3, "{seen:?}");
    // TLS 1.1 is refused.
    let old = curl(
        &lab,
        "https://lb.example.org/",
        &["--tls-max", "1.1", "--tlsv1.1"],
    );
    assert!(old.starts_with("ERROR"), "TLS 1.1 accepted: {old}");
    // HTTP redirects to HTTPS.
    let r = lab
        .exec(
            Host::Client,
            &[
                "curl",
                "-sS",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code} %{redirect_url}",
                "http://10.77.0.100/x",
            ],
        )
        .unwrap();
    assert!(r.starts_with("301") || r.starts_with("308"), "{r}");
    // The L4 service on the same VIP still works next to the proxy.
    let r = lab.client_conns(vip4(ECHO_PORT), 30, 100, 2).unwrap();
    assert_eq!(r.failed, 0, "{:?}", r.errors);
    // A killed backend leaves the pool once its checks fail; no client error after that.
    echo[0].kill();
    sleep(Duration::from_millis(1200));
    for _ in 0..20 {
        let body = curl(&lab, "https://lb.example.org/", &[]);
        assert!(
            body.starts_with("served-by be2") || body.starts_with("served-by be3"),
            "{body}"
        );
    }
    b.stop().unwrap();
    assert!(
        !b.logs().contains("ZZQUERYMARKER"),
        "a query string reached the log"
    );
}
