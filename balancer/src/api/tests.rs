//! Tests of the control API: routes, client, table, server over a real socket.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::Duration,
};

use std::os::unix::fs::PermissionsExt as _;

use http::{Method, StatusCode};
use serde_json::json;
use tokio::{net::UnixStream, sync::mpsc};

use crate::{
    api::{
        client::*,
        protocol::{BackendStatus, Message, Request, ServiceStatus, Status},
        server::*,
        table::*,
    },
    control::operator::Verb,
    dataplane::counters::Traffic,
};

/// An enum of the status from its lowercase word.
fn word<T: serde::de::DeserializeOwned>(w: &str) -> T {
    serde_json::from_value(serde_json::Value::String(w.into())).unwrap()
}

/// A status with one failover service and one maglev service.
pub(crate) fn sample_status() -> Status {
    let traffic = |p: u64| Traffic {
        packets: p,
        bytes: p * 1500,
        new_flows: p / 100,
        resets: p / 1000,
        drops: 0,
        refused: 7,
        syn_retries: 3,
    };
    let backend =
        |addr: &str, weight, priority, health: &str, state: &str, active, p| BackendStatus {
            address: addr.parse().unwrap(),
            weight,
            priority,
            admin: word(if state == "draining" { "drain" } else { "up" }),
            health: word(health),
            state: word(state),
            active,
            check_latency_ms: (health == "up").then_some(0.84),
            traffic: traffic(p),
            flows: 0,
        };
    Status {
        config: "/etc/balancer/balancer.toml".into(),
        l7: None,
        l7_backends: Vec::new(),
        mllp: None,
        capacity: crate::api::protocol::Capacity {
            flow_table_entries: 262144,
            snat_ports: 22768,
        },
        bgp: None,
        certificates: vec![
            crate::api::protocol::CertificateStatus {
                listener: "https".into(),
                cert: "/etc/balancer/tls/lb.example.org.pem".into(),
                not_after: Some(1_900_000_000),
            },
            crate::api::protocol::CertificateStatus {
                listener: "https".into(),
                cert: "/etc/balancer/tls/missing.pem".into(),
                not_after: None,
            },
        ],
        ha: None,
        interfaces: vec!["eth0".into()],
        uptime_secs: 3723,
        reloads: 2,
        config_errors: 1,
        failovers: 1,
        flows: 1234,
        reasons: BTreeMap::from([("pass".into(), 99), ("no_backend".into(), 3)]),
        flows_expired: BTreeMap::from([
            ("closed".into(), 120),
            ("idle".into(), 2),
            ("half_open".into(), 40),
            ("orphan".into(), 7),
        ]),
        services: vec![
            ServiceStatus {
                name: "hl7-listener".into(),
                vip: "10.77.0.100:6661".parse().unwrap(),
                protocol: word("tcp"),
                forwarding: word("nat"),
                scheduler: word("failover"),
                health_check: Some("mllp".into()),
                active: Some("10.77.0.12:6661".parse().unwrap()),
                traffic: traffic(5000),
                backends: vec![
                    backend("10.77.0.11:6661", 1, 1, "down", "down", false, 1000),
                    backend("10.77.0.12:6661", 1, 2, "up", "up", true, 4000),
                ],
            },
            ServiceStatus {
                name: "web".into(),
                vip: "10.77.0.100:7002".parse().unwrap(),
                protocol: word("tcp"),
                forwarding: word("nat"),
                scheduler: word("maglev"),
                health_check: Some("http".into()),
                active: None,
                traffic: traffic(3_000_000),
                backends: vec![
                    backend("10.77.0.11:7002", 1, 0, "up", "up", false, 1_000_000),
                    backend("10.77.0.12:7002", 2, 0, "up", "draining", false, 2_000_000),
                    backend("[fd00::13]:7002", 1, 0, "unchecked", "up", false, 0),
                ],
            },
        ],
    }
}

#[test]
fn routes() {
    assert_eq!(
        route(&Method::GET, "/v1/status").ok(),
        Some(Request::Status)
    );
    assert_eq!(
        route(&Method::POST, "/v1/reload").ok(),
        Some(Request::Reload)
    );
    assert_eq!(
        route(&Method::POST, "/v1/ha/role/standby").ok(),
        Some(Request::HaRole {
            role: crate::control::ha::Role::Standby
        })
    );
    assert!(route(&Method::POST, "/v1/ha/role/leader").is_err());
    assert!(route(&Method::GET, "/v1/ha/role/active").is_err());
    assert_eq!(
        route(&Method::POST, "/v1/bgp/withdraw").ok(),
        Some(Request::Bgp {
            verb: crate::control::operator::BgpVerb::Withdraw
        })
    );
    assert_eq!(
        route(&Method::POST, "/v1/bgp/announce").ok(),
        Some(Request::Bgp {
            verb: crate::control::operator::BgpVerb::Announce
        })
    );
    assert_eq!(
        route(&Method::GET, "/v1/bgp/withdraw")
            .err()
            .map(|r| r.status()),
        Some(StatusCode::METHOD_NOT_ALLOWED)
    );
    assert_eq!(
        route(&Method::POST, "/v1/bgp/flap")
            .err()
            .map(|r| r.status()),
        Some(StatusCode::NOT_FOUND)
    );
    assert_eq!(
        route(
            &Method::POST,
            "/v1/services/web/backends/10.77.0.11%3A7002/drain"
        )
        .ok(),
        Some(Request::Backend {
            verb: Verb::Drain,
            service: "web".into(),
            backend: "10.77.0.11:7002".into()
        })
    );
    assert_eq!(
        route(
            &Method::POST,
            "/v1/services/hl7/backends/10.77.0.11:6661/disable"
        )
        .ok(),
        Some(Request::Backend {
            verb: Verb::Disable,
            service: "hl7".into(),
            backend: "10.77.0.11:6661".into()
        })
    );
    assert_eq!(
        route(
            &Method::POST,
            "/v1/services/a%20b/backends/%5Bfd00%3A%3A1%5D%3A80/enable"
        )
        .ok(),
        Some(Request::Backend {
            verb: Verb::Enable,
            service: "a b".into(),
            backend: "[fd00::1]:80".into()
        })
    );
    let code = |m: &Method, p: &str| route(m, p).err().map(|r| r.status());
    assert_eq!(
        code(&Method::POST, "/v1/status"),
        Some(StatusCode::METHOD_NOT_ALLOWED)
    );
    assert_eq!(
        code(&Method::GET, "/v1/reload"),
        Some(StatusCode::METHOD_NOT_ALLOWED)
    );
    assert_eq!(
        code(&Method::GET, "/v1/services/web/backends/x/drain"),
        Some(StatusCode::METHOD_NOT_ALLOWED)
    );
    assert_eq!(
        code(&Method::POST, "/v1/services/web/backends/x/explode"),
        Some(StatusCode::NOT_FOUND)
    );
    assert_eq!(code(&Method::GET, "/"), Some(StatusCode::NOT_FOUND));
    assert_eq!(
        code(&Method::GET, "/v1/status/"),
        Some(StatusCode::NOT_FOUND)
    );
    assert_eq!(code(&Method::GET, ""), Some(StatusCode::NOT_FOUND));
    assert_eq!(
        code(&Method::POST, "/v1/services/%zz/backends/x/drain"),
        Some(StatusCode::BAD_REQUEST)
    );
    assert_eq!(
        code(&Method::POST, "/v1/services/%ff/backends/x/drain"),
        Some(StatusCode::BAD_REQUEST)
    );
    assert_eq!(
        code(&Method::POST, "/v1/services/%/backends/x/drain"),
        Some(StatusCode::BAD_REQUEST)
    );
}

#[test]
fn percent_round_trip() {
    for s in ["web", "10.77.0.11:7002", "[fd00::1]:80", "a b/c%d", "ünï"] {
        assert_eq!(percent_decode(&percent_encode(s)).as_deref(), Some(s));
    }
    assert_eq!(percent_decode("%4"), None);
    assert_eq!(percent_decode("%é1"), None);
    assert_eq!(
        backend_uri("web", "10.0.0.1:80", Verb::Drain),
        "/v1/services/web/backends/10.0.0.1%3A80/drain"
    );
}

#[test]
fn table() {
    let t = status_table(&sample_status());
    println!("{t}");
    assert!(
        t.contains("reloads 2  config errors 1  failovers 1  flows 1234"),
        "{t}"
    );
    assert!(t.contains("hl7-listener  10.77.0.100:6661"), "{t}");
    assert!(t.contains("10.77.0.12:6661"), "{t}");
    assert!(t.contains("draining"), "{t}");
    assert!(t.contains("[fd00::13]:7002"), "{t}");
    assert!(t.contains("0.8ms"), "{t}");
    assert!(t.contains("uptime 1h02m03s"), "{t}");
    // Every backend line of a service has the same width as its header.
    let lines: Vec<&str> = t.lines().filter(|l| l.starts_with("  ")).collect();
    assert_eq!(lines.len(), 2 + 3 + 2);
}

/// The relay's services and listeners get their own tables, and survive the JSON round trip.
#[test]
fn mllp_table_and_json() {
    let mut st = sample_status();
    st.mllp = Some(balancer_mllp::Metrics {
        services: vec![balancer_mllp::ServiceMetrics {
            name: "hl7".into(),
            vip: "10.77.0.100:6663".parse().unwrap(),
            active: Some("10.77.0.12:6661".parse().unwrap()),
            senders_connected: 3,
            senders_total: 3,
            senders_refused: 0,
            relayed: 87,
            in_flight: 1,
            in_flight_bytes: 2048,
            replayed: 1,
            frame_errors: 2,
            unacked: 0,
            ack_latency_buckets: vec![0, 87, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            ack_latency_sum_seconds: 0.087,
            listeners: vec![balancer_mllp::ListenerMetrics {
                address: "10.77.0.12:6661".parse().unwrap(),
                delivered: 88,
                acks: [("AA".to_string(), 86), ("AE".to_string(), 1)].into(),
                failures: 1,
                garbage: 0,
            }],
        }],
    });
    let t = status_table(&st);
    let row = t
        .lines()
        .find(|l| l.starts_with("hl7 ") && l.contains("10.77.0.12:6661") && l.contains("ms"))
        .unwrap_or_else(|| panic!("{t}"));
    let cells: Vec<&str> = row.split_whitespace().collect();
    // SERVICE ACTIVE SENDERS RELAYED IN-FLIGHT(2) REPLAYED UNACKED FRAME-ERRORS ACK-AVG
    assert_eq!(
        cells,
        [
            "hl7",
            "10.77.0.12:6661",
            "3",
            "87",
            "1",
            "(2.0KiB)",
            "1",
            "0",
            "2",
            "1.00ms"
        ],
        "{t}"
    );
    assert!(t.contains("MLLP SERVICE  LISTENER"), "{t}");
    let back: Status = serde_json::from_str(&serde_json::to_string(&st).unwrap()).unwrap();
    assert_eq!(back, st);
}

#[test]
fn bytes_and_uptime() {
    assert_eq!(human_bytes(512), "512B");
    assert_eq!(human_bytes(1536), "1.5KiB");
    assert_eq!(human_bytes(3 << 30), "3.0GiB");
    assert_eq!(uptime(59), "0h00m59s");
    assert_eq!(uptime(90061), "1d01h01m");
}

fn temp_socket(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("balancer-api-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir.join("sub").join("control.sock")
}

/// A daemon stand-in: answers Status with the sample, refuses one backend and one reload.
fn fake_daemon() -> mpsc::Sender<Message> {
    let (tx, mut rx) = mpsc::channel::<Message>(8);
    tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            let reply = match m.request {
                Request::Status => serde_json::to_value(sample_status()).map_err(|e| e.to_string()),
                Request::Reload => {
                    Err("config refused, nothing changed:\nbalancer.toml:3:7: bad".into())
                }
                Request::Backend {
                    verb: Verb::Drain,
                    service,
                    backend,
                } if service == "web" => {
                    Ok(json!({ "ok": true, "message": format!("drain: {service} {backend}") }))
                }
                Request::Backend { service, .. } => Err(format!("no service '{service}'")),
                Request::HaRole { role } => Ok(json!({ "ok": true, "message": role.name() })),
                Request::Bgp { verb } => {
                    Ok(json!({ "ok": true, "message": format!("bgp {}: 1 VIP", verb.name()) }))
                }
            };
            let _ = m.reply.send(reply);
        }
    });
    tx
}

async fn raw(path: &Path, request: &str) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut s = UnixStream::connect(path).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

async fn wait_for(path: &Path) {
    for _ in 0..200 {
        if path.exists() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{} never appeared", path.display());
}

#[tokio::test]
async fn serve_and_call() {
    let path = temp_socket("serve");
    let server = tokio::spawn({
        let path = path.clone();
        let tx = fake_daemon();
        async move { serve(&path, tx).await }
    });
    wait_for(&path).await;
    let dir_mode = std::fs::metadata(path.parent().unwrap())
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(dir_mode, 0o700);
    let sock_mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(sock_mode, 0o600);

    let v = call(&path, Method::GET, "/v1/status").await.unwrap();
    let st: Status = serde_json::from_value(v).unwrap();
    assert_eq!(st, sample_status());

    let v = call(
        &path,
        Method::POST,
        &backend_uri("web", "10.77.0.11:7002", Verb::Drain),
    )
    .await
    .unwrap();
    assert_eq!(v["ok"], json!(true));
    assert_eq!(v["message"], json!("drain: web 10.77.0.11:7002"));

    let e = call(
        &path,
        Method::POST,
        &backend_uri("nope", "1.2.3.4", Verb::Drain),
    )
    .await
    .unwrap_err();
    assert_eq!(e.to_string(), "no service 'nope'");
    let e = call(&path, Method::POST, "/v1/reload").await.unwrap_err();
    assert!(e.to_string().contains("balancer.toml:3:7"), "{e}");

    let r = raw(
        &path,
        "POST /v1/reload HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 409"), "{r}");
    let r = raw(
        &path,
        "POST /v1/services/nope/backends/x/enable HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 400"), "{r}");
    let r = raw(
        &path,
        "GET /v2/status HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(
        r.starts_with("HTTP/1.1 404") && r.contains("{\"error\":"),
        "{r}"
    );
    let r = raw(
        &path,
        "DELETE /v1/status HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(
        r.starts_with("HTTP/1.1 405") && r.to_lowercase().contains("allow: get"),
        "{r}"
    );
    // Garbage is answered (or the connection closed), never a crash.
    let r = raw(&path, "\x00\x01garbage\r\n\r\n").await;
    assert!(r.is_empty() || r.starts_with("HTTP/1.1 400"), "{r}");
    // Still serving after all of that.
    call(&path, Method::GET, "/v1/status").await.unwrap();

    // A second daemon does not steal a live socket.
    let e = bind(&path).unwrap_err();
    assert!(e.to_string().contains("in use"), "{e}");

    server.abort();
    let _ = server.await;
    // The socket file is left behind: the next start replaces it.
    assert!(path.exists());
    let l = bind(&path).unwrap();
    drop(l);
    let _ = std::fs::remove_dir_all(path.parent().unwrap().parent().unwrap());
}

#[tokio::test]
async fn daemon_gone_is_503_and_missing_socket_is_clear() {
    let path = temp_socket("gone");
    let (tx, rx) = mpsc::channel::<Message>(1);
    drop(rx);
    let server = tokio::spawn({
        let path = path.clone();
        async move { serve(&path, tx).await }
    });
    wait_for(&path).await;
    let r = raw(
        &path,
        "GET /v1/status HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 503"), "{r}");
    server.abort();
    let _ = server.await;
    let _ = std::fs::remove_dir_all(path.parent().unwrap().parent().unwrap());

    let e = call(&path, Method::GET, "/v1/status").await.unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "is balancer running? no control socket at {}",
            path.display()
        )
    );
}
