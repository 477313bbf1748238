//! One probe of each kind against real peers on 127.0.0.1.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use balancer_health::{CheckKind, HealthSpec, probe};
use common::{MllpReply, WAIT};

fn spec(kind: CheckKind) -> HealthSpec {
    HealthSpec {
        interval: Duration::from_secs(5),
        timeout: Duration::from_secs(2),
        jitter: Duration::ZERO,
        ..HealthSpec::new(kind)
    }
}

/// One probe, bounded by the test's own wait as well.
async fn run(addr: SocketAddr, spec: &HealthSpec) -> Result<Duration, String> {
    spec.validate().unwrap();
    tokio::time::timeout(WAIT, probe(addr, spec))
        .await
        .expect("probe not bounded by its timeout")
        .map_err(|e| e.to_string())
}

fn assert_no_payload(reason: &str) {
    assert!(!reason.contains("SECRET"), "payload in reason: {reason}");
    assert!(reason.len() < 120, "reason too long: {reason}");
}

#[tokio::test]
async fn tcp_up_and_refused() {
    let up = common::tcp_listener().await;
    run(up, &spec(CheckKind::Tcp)).await.unwrap();

    let down = common::closed_port().await;
    let e = run(down, &spec(CheckKind::Tcp)).await.unwrap_err();
    assert_eq!(e, "connect refused");
}

#[tokio::test]
async fn port_override_checks_another_port_of_the_same_host() {
    let up = common::tcp_listener().await;
    let down = common::closed_port().await;
    // The target is the closed port; the check goes to the listening one.
    let s = HealthSpec {
        port: Some(up.port()),
        ..spec(CheckKind::Tcp)
    };
    run(down, &s).await.unwrap();
    let s = HealthSpec {
        port: Some(down.port()),
        ..spec(CheckKind::Tcp)
    };
    assert_eq!(run(up, &s).await.unwrap_err(), "connect refused");
    let bad = HealthSpec {
        port: Some(0),
        ..spec(CheckKind::Tcp)
    };
    assert!(bad.validate().is_err());
}

fn http(path: &str, expect: &[u16], body: Option<&str>, host: Option<&str>) -> CheckKind {
    CheckKind::Http {
        path: path.into(),
        expect_status: expect.to_vec(),
        body_contains: body.map(Into::into),
        host: host.map(Into::into),
    }
}

#[tokio::test]
async fn http_status_and_body() {
    let server = common::http_server(200).await;
    let addr = server.addr;

    run(addr, &spec(http("/health", &[200], None, None)))
        .await
        .unwrap();
    assert_eq!(
        server.last_host.lock().unwrap().as_deref(),
        Some(addr.to_string().as_str()),
        "Host defaults to the address"
    );
    run(
        addr,
        &spec(http(
            "/health",
            &[200],
            Some("healthy"),
            Some("app.example.org"),
        )),
    )
    .await
    .unwrap();
    assert_eq!(
        server.last_host.lock().unwrap().as_deref(),
        Some("app.example.org")
    );

    let e = run(
        addr,
        &spec(http("/health", &[200], Some("all systems go"), None)),
    )
    .await
    .unwrap_err();
    assert_eq!(e, "status 200, body mismatch");

    server.set_status(503);
    let e = run(addr, &spec(http("/health", &[200], None, None)))
        .await
        .unwrap_err();
    assert_eq!(e, "status 503");
    assert_no_payload(&e);
    // 503 accepted when listed.
    run(addr, &spec(http("/health", &[200, 503], None, None)))
        .await
        .unwrap();
    assert_eq!(server.hits(), 5);
}

#[tokio::test]
async fn http_against_wrong_peers() {
    let down = common::closed_port().await;
    let e = run(down, &spec(CheckKind::http("/"))).await.unwrap_err();
    assert_eq!(e, "connect refused");

    // An MLLP peer drops the connection on a request that is not a frame.
    let mllp = common::mllp_server(MllpReply::Garbage).await;
    let e = run(mllp.addr, &spec(CheckKind::http("/")))
        .await
        .unwrap_err();
    assert_eq!(e, "http: connection closed before response");

    // A peer that accepts and never answers: the timeout decides.
    let mute = common::tcp_listener().await;
    let s = HealthSpec {
        timeout: Duration::from_millis(200),
        ..spec(CheckKind::http("/"))
    };
    let e = run(mute, &s).await.unwrap_err();
    assert_eq!(e, "timeout 200ms");
}

fn https(ca_file: Option<PathBuf>, insecure: bool, sni: Option<&str>) -> CheckKind {
    CheckKind::Https {
        path: "/health".into(),
        expect_status: vec![200],
        body_contains: Some("healthy".into()),
        host: None,
        ca_file,
        insecure,
        sni: sni.map(Into::into),
    }
}

#[tokio::test]
async fn https_verifies_against_ca_file() {
    let pki = common::pki();
    let server = common::https_server(200, pki.server_config.clone()).await;
    let addr = server.addr;

    // Verified against the test CA, by IP address and by name.
    run(addr, &spec(https(Some(pki.ca_file.clone()), false, None)))
        .await
        .unwrap();
    run(
        addr,
        &spec(https(Some(pki.ca_file.clone()), false, Some("localhost"))),
    )
    .await
    .unwrap();

    // Without the CA (system trust store) the self-made CA is unknown.
    let e = run(addr, &spec(https(None, false, None)))
        .await
        .unwrap_err();
    assert!(e.starts_with("tls: ") && e.contains("certificate"), "{e}");

    // Another CA does not vouch for it either.
    let other = common::pki();
    let e = run(addr, &spec(https(Some(other.ca_file.clone()), false, None)))
        .await
        .unwrap_err();
    assert!(e.starts_with("tls: ") && e.contains("certificate"), "{e}");

    // Right CA, wrong name.
    let e = run(
        addr,
        &spec(https(
            Some(pki.ca_file.clone()),
            false,
            Some("other.example.org"),
        )),
    )
    .await
    .unwrap_err();
    assert!(e.starts_with("tls: ") && e.contains("certificate"), "{e}");

    // insecure = true skips verification.
    run(addr, &spec(https(None, true, None))).await.unwrap();

    // Status checks still apply over TLS.
    server.set_status(503);
    let e = run(addr, &spec(https(None, true, None))).await.unwrap_err();
    assert_eq!(e, "status 503");

    // An unreadable CA file is a failure that names the file, not a panic.
    let missing = pki.ca_file.with_extension("missing");
    let e = run(addr, &spec(https(Some(missing), false, None)))
        .await
        .unwrap_err();
    assert!(e.starts_with("ca_file "), "{e}");

    // A plain-HTTP server spoken to over TLS fails cleanly.
    let plain = common::http_server(200).await;
    let e = run(plain.addr, &spec(https(None, true, None)))
        .await
        .unwrap_err();
    assert!(e.starts_with("tls: "), "{e}");

    let _ = std::fs::remove_file(&pki.ca_file);
    let _ = std::fs::remove_file(&other.ca_file);
}

#[tokio::test]
async fn mllp_accepts_aa_and_ca_only() {
    for code in ["AA", "CA"] {
        let peer = common::mllp_server(MllpReply::Ack(code)).await;
        run(peer.addr, &spec(CheckKind::mllp())).await.unwrap();
    }
    for code in ["AE", "AR", "CE", "CR"] {
        let peer = common::mllp_server(MllpReply::Ack(code)).await;
        let e = run(peer.addr, &spec(CheckKind::mllp())).await.unwrap_err();
        assert_eq!(e, format!("MSA-1 {code}"));
    }
}

#[tokio::test]
async fn mllp_failures_name_no_payload() {
    let cases = [
        (MllpReply::Garbage, "mllp: bad MLLP framing: no start byte"),
        (MllpReply::NotAck, "mllp: reply without MSA segment"),
        (MllpReply::Oversized, "mllp: MLLP frame over 65536 bytes"),
        (MllpReply::Close, "mllp: connection closed before ACK"),
    ];
    for (reply, want) in cases {
        let peer = common::mllp_server(reply).await;
        let e = run(peer.addr, &spec(CheckKind::mllp())).await.unwrap_err();
        assert_eq!(e, want, "{reply:?}");
        assert_no_payload(&e);
    }
    let down = common::closed_port().await;
    let e = run(down, &spec(CheckKind::mllp())).await.unwrap_err();
    assert_eq!(e, "connect refused");
}

#[tokio::test]
async fn mllp_silence_times_out() {
    let peer = common::mllp_server(MllpReply::Silence).await;
    let s = HealthSpec {
        timeout: Duration::from_millis(200),
        ..spec(CheckKind::mllp())
    };
    let e = run(peer.addr, &s).await.unwrap_err();
    assert_eq!(e, "timeout 200ms");
    assert_eq!(peer.received.lock().unwrap().len(), 1, "message was sent");
}

#[tokio::test]
async fn default_mllp_ping_carries_no_patient_data() {
    let peer = common::mllp_server(MllpReply::Ack("AA")).await;
    run(peer.addr, &spec(CheckKind::mllp())).await.unwrap();
    let received = peer.received.lock().unwrap().clone();
    assert_eq!(received.len(), 1);
    let msg = String::from_utf8(received[0].clone()).unwrap();
    assert!(msg.starts_with("MSH|^~\\&|"), "{msg}");
    let segments: Vec<&str> = msg.split('\r').collect();
    assert!(
        segments.iter().all(|s| !s.starts_with("PID")),
        "PID segment in ping: {msg}"
    );
    assert_eq!(segments.len(), 1, "MSH only: {msg}");
}

#[tokio::test]
async fn mllp_custom_message_is_sent_with_cr_segments() {
    let peer = common::mllp_server(MllpReply::Ack("AA")).await;
    let kind = CheckKind::Mllp {
        message: Some("MSH|^~\\&|LB|H|||20260101||QRY^Q01|42|P|2.3\nQRD|x".into()),
    };
    run(peer.addr, &spec(kind)).await.unwrap();
    let received = peer.received.lock().unwrap().clone();
    assert_eq!(
        received,
        vec![b"MSH|^~\\&|LB|H|||20260101||QRY^Q01|42|P|2.3\rQRD|x".to_vec()]
    );
}
