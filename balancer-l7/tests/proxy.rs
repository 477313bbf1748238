//! End-to-end tests of the layer-7 proxy with real clients (curl, openssl s_client) and
//! small hyper backends, all on 127.0.0.1 with ephemeral ports.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use balancer_l7::L7;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const T: Duration = Duration::from_secs(10);

fn listener_toml(
    name: &str,
    certs: &[(&std::path::Path, &std::path::Path, &[&str])],
    extra: &str,
) -> String {
    let mut s = format!("[[listener]]\nname = \"{name}\"\naddress = \"127.0.0.1:0\"\n{extra}\n");
    for (c, k, names) in certs {
        s += &format!(
            "[[listener.certificate]]\ncert = {:?}\nkey = {:?}\nserver_names = {:?}\n",
            c.display().to_string(),
            k.display().to_string(),
            names
        );
    }
    s
}

fn pool_toml(name: &str, backends: &[std::net::SocketAddr], extra: &str) -> String {
    let mut s = format!("[[pool]]\nname = \"{name}\"\n{extra}\n");
    for b in backends {
        s += &format!("[[pool.backend]]\naddress = \"{b}\"\n");
    }
    s
}

fn route_toml(name: &str, host: Option<&str>, prefix: &str, pool: &str) -> String {
    let host = host
        .map(|h| format!("host = \"{h}\"\n"))
        .unwrap_or_default();
    format!("[[route]]\nname = \"{name}\"\n{host}path_prefix = \"{prefix}\"\npool = \"{pool}\"\n")
}

/// One TLS listener "web" with a certificate for a.test (and *.a.test), one pool "p".
struct Lab {
    _dir: TempDir,
    ca_path: std::path::PathBuf,
    l7: L7,
    port: u16,
}

async fn lab(
    tag: &str,
    backends: &[std::net::SocketAddr],
    pool_extra: &str,
    listener_extra: &str,
) -> Lab {
    let dir = TempDir::new(tag);
    let ca = Ca::new("test CA");
    let ca_path = ca.write(&dir, "ca.pem");
    let (c, k) = ca.leaf(&dir, "a", "a.test", &["a.test", "*.a.test"]);
    let toml = format!(
        "{}{}{}",
        listener_toml("web", &[(&c, &k, &["a.test", "*.a.test"])], listener_extra),
        pool_toml("p", backends, pool_extra),
        route_toml("all", None, "/", "p"),
    );
    let l7 = L7::start(config(&toml)).await.unwrap();
    let port = l7.listener_addr("web").unwrap().port();
    Lab {
        _dir: dir,
        ca_path,
        l7,
        port,
    }
}

fn subject_cn(out: &str) -> Option<String> {
    out.lines()
        .find(|l| l.starts_with("subject="))
        .and_then(|l| l.split("CN = ").nth(1))
        .map(|s| s.trim().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_selects_certificate_and_old_tls_is_refused() {
    let dir = TempDir::new("sni");
    let ca = Ca::new("test CA");
    let (ac, ak) = ca.leaf(&dir, "a", "a.test", &["a.test"]);
    let (bc, bk) = ca.leaf(&dir, "b", "b.test", &["b.test", "*.b.test"]);
    let be = backend("A", None).await;
    let toml = format!(
        "{}{}{}{}",
        listener_toml(
            "web",
            &[(&ac, &ak, &["a.test"]), (&bc, &bk, &["b.test", "*.b.test"])],
            ""
        ),
        listener_toml(
            "strict",
            &[(&ac, &ak, &["a.test"])],
            "unknown_sni = \"reject\""
        ),
        pool_toml("p", &[be.addr], ""),
        route_toml("all", None, "/", "p"),
    );
    let l7 = L7::start(config(&toml)).await.unwrap();
    let web = l7.listener_addr("web").unwrap().port();
    let strict = l7.listener_addr("strict").unwrap().port();

    let out = s_client(web, Some("a.test"), &[]).await;
    assert_eq!(subject_cn(&out).as_deref(), Some("a.test"), "{out}");
    let out = s_client(web, Some("b.test"), &[]).await;
    assert_eq!(subject_cn(&out).as_deref(), Some("b.test"), "{out}");
    let out = s_client(web, Some("x.b.test"), &[]).await;
    assert_eq!(
        subject_cn(&out).as_deref(),
        Some("b.test"),
        "wildcard: {out}"
    );
    let out = s_client(web, Some("unknown.test"), &[]).await;
    assert_eq!(
        subject_cn(&out).as_deref(),
        Some("a.test"),
        "default: {out}"
    );
    let out = s_client(strict, Some("unknown.test"), &[]).await;
    assert_eq!(subject_cn(&out), None, "reject policy: {out}");
    let out = s_client(strict, Some("a.test"), &[]).await;
    assert_eq!(subject_cn(&out).as_deref(), Some("a.test"), "{out}");

    // TLS 1.2 and 1.3 only; the client is told to allow old versions and weak suites.
    let out = s_client(web, Some("a.test"), &["-tls1_2"]).await;
    assert!(out.contains("New, TLSv1.2, Cipher is ECDHE-"), "{out}");
    let out = s_client(web, Some("a.test"), &["-tls1_3"]).await;
    assert!(out.contains("New, TLSv1.3, Cipher is TLS_"), "{out}");
    for old in ["-tls1", "-tls1_1"] {
        let out = s_client(
            web,
            Some("a.test"),
            &[old, "-cipher", "DEFAULT:@SECLEVEL=0"],
        )
        .await;
        assert!(subject_cn(&out).is_none(), "{old} accepted: {out}");
        assert!(out.contains("Cipher is (NONE)"), "{old}: {out}");
        // The server read the ClientHello and answered with an alert: it refused, not the client.
        assert!(out.contains("SSL alert number"), "{old}: {out}");
    }
    // A TLS 1.2 client offering only CBC (non-AEAD) suites is refused.
    let out = s_client(
        web,
        Some("a.test"),
        &[
            "-tls1_2",
            "-cipher",
            "ECDHE-RSA-AES128-SHA:ECDHE-ECDSA-AES128-SHA:AES128-SHA",
        ],
    )
    .await;
    assert!(subject_cn(&out).is_none(), "CBC accepted: {out}");

    let m = l7.metrics();
    assert!(
        m.tls_handshakes_tls12 >= 1 && m.tls_handshakes_tls13 >= 1,
        "{m:?}"
    );
    assert!(m.tls_handshake_failures >= 3, "{m:?}");
    l7.shutdown(T).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_and_path_routes_h1_h2_and_forwarded_headers() {
    let dir = TempDir::new("routes");
    let ca = Ca::new("test CA");
    let ca_path = ca.write(&dir, "ca.pem");
    let (c, k) = ca.leaf(&dir, "lb", "lb", &["a.test", "b.test"]);
    let (a, b, c2) = (
        backend("A", None).await,
        backend("B", None).await,
        backend("C", None).await,
    );
    let toml = format!(
        "{}{}{}{}{}{}{}",
        listener_toml("web", &[(&c, &k, &["a.test", "b.test"])], ""),
        pool_toml("pa", &[a.addr], ""),
        pool_toml("pb", &[b.addr], ""),
        pool_toml("pc", &[c2.addr], "protocol = \"h2\""),
        route_toml("api", Some("a.test"), "/api", "pa"),
        route_toml("b", Some("b.test"), "/", "pb"),
        route_toml("b-special", Some("b.test"), "/special", "pc"),
    );
    let l7 = L7::start(config(&toml)).await.unwrap();
    let port = l7.listener_addr("web").unwrap().port();

    let (code, body, info) = curl(&ca_path, "a.test", port, "/api/x?q=1", &["--http1.1"]).await;
    assert_eq!(code, 200, "{body} {info}");
    assert!(body.starts_with("id=A path=/api/x "), "{body}");
    assert!(body.contains("xff=127.0.0.1 proto=https"), "{body}");
    assert!(body.contains(&format!("fhost=a.test:{port}")), "{body}");
    assert!(info.ends_with("version=1.1"), "{info}");

    let (code, body, info) = curl(&ca_path, "b.test", port, "/x", &["--http2"]).await;
    assert_eq!(code, 200, "{body}");
    assert!(body.starts_with("id=B path=/x "), "{body}");
    assert!(
        body.contains("version=HTTP/1.1"),
        "backend gets HTTP/1.1: {body}"
    );
    assert!(info.ends_with("version=2"), "client got h2 by ALPN: {info}");

    let (code, body, _) = curl(&ca_path, "b.test", port, "/special/1", &["--http2"]).await;
    assert_eq!(code, 200);
    assert!(body.starts_with("id=C path=/special/1 "), "{body}");
    assert!(body.contains("version=HTTP/2.0"), "h2 to backend: {body}");
    assert!(body.contains(&format!("fhost=b.test:{port}")), "{body}");

    let (code, body, _) = curl(
        &ca_path,
        "b.test",
        port,
        "/y",
        &[
            "-H",
            "X-Forwarded-For: 192.0.2.7",
            "-H",
            "Forwarded: for=192.0.2.8",
            "--http1.1",
        ],
    )
    .await;
    assert_eq!(code, 200);
    assert!(
        body.contains("xff=192.0.2.7, 127.0.0.1 "),
        "appended: {body}"
    );
    assert!(body.contains("fwd=for=192.0.2.8 "), "kept: {body}");

    let (code, _, _) = curl(&ca_path, "a.test", port, "/other", &[]).await;
    assert_eq!(code, 404, "no route");

    let m = l7.metrics();
    let api = m.routes.iter().find(|r| r.route == "api").unwrap();
    assert_eq!(api.pool, "pa");
    assert_eq!(api.status_classes[1], 1, "{api:?}");
    assert_eq!(api.latency_buckets.iter().sum::<u64>(), 1);
    let unrouted = m.routes.iter().find(|r| r.route.is_empty()).unwrap();
    assert_eq!(unrouted.status_classes[3], 1);
    l7.shutdown(T).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_redirects_to_https() {
    let be = backend("A", None).await;
    let dir = TempDir::new("redir");
    let ca = Ca::new("test CA");
    let (c, k) = ca.leaf(&dir, "a", "a.test", &["a.test"]);
    let toml = format!(
        "{}{}{}[[redirect]]\naddress = \"127.0.0.1:0\"\nhttps_port = 8443\n[[redirect]]\naddress = \"127.0.0.1:0\"\nstatus = 308\n",
        listener_toml("web", &[(&c, &k, &["a.test"])], ""),
        pool_toml("p", &[be.addr], ""),
        route_toml("all", None, "/", "p"),
    );
    let l7 = L7::start(config(&toml)).await.unwrap();
    let r = l7.redirect_addrs().to_vec();
    let mut cmd = std::process::Command::new("curl");
    cmd.args(["-sS", "-i", "--max-time", "5", "-H", "Host: lb.test:80"])
        .arg(format!("http://{}/x/y?q=1", r[0]));
    let out = run_async(cmd, T).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("HTTP/1.1 301"), "{text}");
    assert!(
        text.contains("location: https://lb.test:8443/x/y?q=1\r\n"),
        "{text}"
    );
    let mut cmd = std::process::Command::new("curl");
    cmd.args(["-sS", "-i", "--max-time", "5", "-H", "Host: LB.test"])
        .arg(format!("http://{}/", r[1]));
    let out = run_async(cmd, T).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("HTTP/1.1 308"), "{text}");
    assert!(text.contains("location: https://lb.test/\r\n"), "{text}");
    assert_eq!(l7.metrics().redirects, 2);
    l7.shutdown(T).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_failure_and_killed_backend_fail_over() {
    let a = backend("A", None).await;
    let b = backend("B", None).await;
    let dead = dead_port().await;
    let lab = lab("failover", &[dead, a.addr, b.addr], "", "").await;
    let mut seen = std::collections::HashSet::new();
    for i in 0..12 {
        let (code, body, info) =
            curl(&lab.ca_path, "a.test", lab.port, &format!("/{i}"), &[]).await;
        assert_eq!(code, 200, "request {i}: {body} {info}");
        seen.insert(body[..4].to_string());
    }
    assert_eq!(seen.len(), 2, "both live backends used: {seen:?}");
    let m = lab.l7.metrics();
    let d = m.backends.iter().find(|x| x.address == dead).unwrap();
    assert!(d.connect_failures >= 1, "{m:?}");

    // Kill A (its pooled keep-alive connections close too): no client error.
    a.kill();
    tokio::time::sleep(Duration::from_millis(100)).await;
    for i in 0..12 {
        let (code, body, _) = curl(&lab.ca_path, "a.test", lab.port, &format!("/k{i}"), &[]).await;
        assert_eq!(code, 200, "after kill {i}: {body}");
        assert!(body.starts_with("id=B"), "{body}");
    }
    // The controller's health checks mark everything down: nothing healthy left.
    for x in [dead, a.addr, b.addr] {
        lab.l7.set_backend_health("p", x, false);
    }
    let (code, _, _) = curl(&lab.ca_path, "a.test", lab.port, "/", &[]).await;
    assert_eq!(code, 503);
    lab.l7.set_backend_health("p", b.addr, true);
    let (code, _, _) = curl(&lab.ca_path, "a.test", lab.port, "/", &[]).await;
    assert_eq!(code, 200);
    // Nothing reachable at all: 502.
    lab.l7.set_backend_health("p", dead, true);
    b.kill();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (code, _, _) = curl(&lab.ca_path, "a.test", lab.port, "/", &[]).await;
    assert_eq!(code, 502);
    lab.l7.shutdown(T).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_backend_gives_504() {
    let a = backend("A", None).await;
    let lab = lab("slow", &[a.addr], "response_timeout = \"500ms\"", "").await;
    // The backend answers /slow after 3 s: a 504 means the proxy gave up first.
    let (code, _, _) = curl(&lab.ca_path, "a.test", lab.port, "/slow", &[]).await;
    assert_eq!(code, 504);
    let (code, _, _) = curl(&lab.ca_path, "a.test", lab.port, "/fast", &[]).await;
    assert_eq!(code, 200);
    lab.l7.shutdown(T).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_headers_431_and_body_413() {
    let a = backend("A", None).await;
    let lab = lab(
        "limits",
        &[a.addr],
        "",
        "max_header_bytes = 8192\nmax_body_bytes = 1024",
    )
    .await;
    let big = format!("X-Big: {}", "a".repeat(12_000));
    for v in ["--http1.1", "--http2"] {
        let (code, body, info) =
            curl(&lab.ca_path, "a.test", lab.port, "/", &["-H", &big, v]).await;
        assert_eq!(code, 431, "{v}: {body} {info}");
    }
    let medium = format!("X-Medium: {}", "a".repeat(4_000));
    let (code, _, _) = curl(&lab.ca_path, "a.test", lab.port, "/", &["-H", &medium]).await;
    assert_eq!(code, 200, "under the limit");
    let (code, _, _) = curl(
        &lab.ca_path,
        "a.test",
        lab.port,
        "/",
        &["--data-binary", &"x".repeat(4096)],
    )
    .await;
    assert_eq!(code, 413);
    let (code, body, _) = curl(
        &lab.ca_path,
        "a.test",
        lab.port,
        "/",
        &[
            "-H",
            "Transfer-Encoding: chunked",
            "--data-binary",
            &"x".repeat(4096),
            "--http1.1",
        ],
    )
    .await;
    assert_eq!(code, 413, "chunked body over the limit: {body}");
    let (code, body, info) = curl(
        &lab.ca_path,
        "a.test",
        lab.port,
        "/",
        &["--data-binary", "small"],
    )
    .await;
    assert_eq!(code, 200, "{body} {info}");
    lab.l7.shutdown(T).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_backend_with_private_ca() {
    let dir = TempDir::new("beca");
    let bca = Ca::new("backend CA");
    let bca_path = bca.write(&dir, "backend-ca.pem");
    let other = Ca::new("other CA");
    let other_path = other.write(&dir, "other-ca.pem");
    let (bc, bk) = bca.leaf(&dir, "backend", "backend.test", &["backend.test"]);
    let tls_be = backend("S", Some(backend_tls(&bc, &bk))).await;
    let ca_s = bca_path.display().to_string();
    let other_s = other_path.display().to_string();

    let fca = Ca::new("front CA");
    let fca_path = fca.write(&dir, "front-ca.pem");
    let (c, k) = fca.leaf(&dir, "a", "a.test", &["a.test"]);
    let toml = format!(
        "{}{}{}{}{}{}{}",
        listener_toml("web", &[(&c, &k, &["a.test"])], ""),
        pool_toml(
            "h1",
            &[tls_be.addr],
            &format!("scheme = \"https\"\nca = {ca_s:?}\nserver_name = \"backend.test\"")
        ),
        pool_toml(
            "h2",
            &[tls_be.addr],
            &format!(
                "scheme = \"https\"\nprotocol = \"h2\"\nca = {ca_s:?}\nserver_name = \"backend.test\""
            )
        ),
        pool_toml(
            "wrong",
            &[tls_be.addr],
            &format!("scheme = \"https\"\nca = {other_s:?}\nserver_name = \"backend.test\"")
        ),
        route_toml("h1", None, "/h1", "h1"),
        route_toml("h2", None, "/h2", "h2"),
        route_toml("wrong", None, "/wrong", "wrong"),
    );
    let l7 = L7::start(config(&toml)).await.unwrap();
    let port = l7.listener_addr("web").unwrap().port();
    let (code, body, _) = curl(&fca_path, "a.test", port, "/h1", &[]).await;
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("version=HTTP/1.1"), "{body}");
    let (code, body, _) = curl(&fca_path, "a.test", port, "/h2", &[]).await;
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("version=HTTP/2.0"), "{body}");
    let (code, _, _) = curl(&fca_path, "a.test", port, "/wrong", &[]).await;
    assert_eq!(code, 502, "certificate not signed by the configured CA");
    l7.shutdown(T).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrade_is_passed_through() {
    let a = backend("A", None).await;
    let lab = lab("ws", &[a.addr], "", "").await;
    let ca_pem = std::fs::read_to_string(&lab.ca_path).unwrap();
    let tls = tokio_rustls::TlsConnector::from(client_tls(&ca_pem, &[b"http/1.1"]));
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", lab.port))
        .await
        .unwrap();
    let mut s = tls
        .connect("a.test".try_into().unwrap(), tcp)
        .await
        .unwrap();
    s.write_all(
        b"GET /chat HTTP/1.1\r\nHost: a.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        tokio::time::timeout(T, s.read_exact(&mut byte))
            .await
            .unwrap()
            .unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    // A masked text frame "hello"; the backend echoes the bytes.
    let frame = [
        0x81u8,
        0x85,
        1,
        2,
        3,
        4,
        b'h' ^ 1,
        b'e' ^ 2,
        b'l' ^ 3,
        b'l' ^ 4,
        b'o' ^ 1,
    ];
    for _ in 0..3 {
        s.write_all(&frame).await.unwrap();
        let mut back = [0u8; 11];
        tokio::time::timeout(T, s.read_exact(&mut back))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(back, frame);
    }
    drop(s);
    lab.l7.shutdown(T).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_reload_keeps_open_connections() {
    let a = backend("A", None).await;
    let dir = TempDir::new("reload");
    let ca = Ca::new("test CA");
    let ca_path = ca.write(&dir, "ca.pem");
    let (c, k) = ca.leaf(&dir, "site", "gen1", &["a.test"]);
    let toml = format!(
        "cert_watch_interval = \"200ms\"\n{}{}{}",
        listener_toml("web", &[(&c, &k, &["a.test"])], ""),
        pool_toml("p", &[a.addr], ""),
        route_toml("all", None, "/", "p"),
    );
    let l7 = L7::start(config(&toml)).await.unwrap();
    let port = l7.listener_addr("web").unwrap().port();

    // An open keep-alive connection made before the reload.
    let ca_pem = std::fs::read_to_string(&ca_path).unwrap();
    let tls = tokio_rustls::TlsConnector::from(client_tls(&ca_pem, &[b"http/1.1"]));
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let s = tls
        .connect("a.test".try_into().unwrap(), tcp)
        .await
        .unwrap();
    let (mut tx, conn) = hyper::client::conn::http1::handshake::<
        _,
        http_body_util::Empty<bytes::Bytes>,
    >(hyper_util::rt::TokioIo::new(s))
    .await
    .unwrap();
    tokio::spawn(conn);
    let get = || {
        hyper::Request::builder()
            .uri("/held")
            .header("host", "a.test")
            .body(http_body_util::Empty::new())
            .unwrap()
    };
    assert_eq!(tx.send_request(get()).await.unwrap().status(), 200);

    // New certificate through reload().
    let staging = TempDir::new("reload-staging");
    let (c2, k2) = ca.leaf(&staging, "site", "gen2", &["a.test"]);
    std::fs::copy(&c2, &c).unwrap();
    std::fs::copy(&k2, &k).unwrap();
    l7.reload(config(&toml)).await.unwrap();
    let out = s_client(port, Some("a.test"), &[]).await;
    assert_eq!(subject_cn(&out).as_deref(), Some("gen2"), "{out}");
    let resp = tokio::time::timeout(T, tx.send_request(get()))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), 200, "the open connection continues");

    // A mismatched key is refused with a clear error; the old certificate keeps serving.
    let (_, k3) = ca.leaf(&staging, "other", "gen3", &["a.test"]);
    std::fs::copy(&k3, &k).unwrap();
    let err = l7.reload(config(&toml)).await.unwrap_err();
    assert!(format!("{err:#}").contains("does not match"), "{err:#}");
    let out = s_client(port, Some("a.test"), &[]).await;
    assert_eq!(subject_cn(&out).as_deref(), Some("gen2"), "{out}");
    // Unreadable file: refused too.
    let bad = config(&toml.replace(&c.display().to_string(), "/nonexistent/cert.pem"));
    let err = l7.reload(bad).await.unwrap_err();
    assert!(
        format!("{err:#}").contains("/nonexistent/cert.pem"),
        "{err:#}"
    );

    // Files changed on disk (no reload call): picked up by the watcher.
    let (c4, k4) = ca.leaf(&staging, "site4", "gen4", &["a.test"]);
    std::fs::copy(&k4, &k).unwrap();
    std::fs::copy(&c4, &c).unwrap();
    let deadline = Instant::now() + T;
    loop {
        let out = s_client(port, Some("a.test"), &[]).await;
        if subject_cn(&out).as_deref() == Some("gen4") {
            break;
        }
        assert!(Instant::now() < deadline, "watcher did not reload: {out}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let resp = tokio::time::timeout(T, tx.send_request(get()))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), 200);
    l7.shutdown(T).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cookie_stickiness() {
    let a = backend("A", None).await;
    let b = backend("B", None).await;
    let lab = lab("sticky", &[a.addr, b.addr], "sticky = \"cookie\"", "").await;
    let (code, body, _) = curl(&lab.ca_path, "a.test", lab.port, "/", &["-D", "-"]).await;
    assert_eq!(code, 200);
    let cookie = body
        .lines()
        .find_map(|l| l.strip_prefix("set-cookie: "))
        .and_then(|l| l.split(';').next())
        .unwrap_or_else(|| panic!("no cookie: {body}"))
        .to_string();
    let id = body.lines().find(|l| l.starts_with("id=")).unwrap()[..4].to_string();
    for _ in 0..6 {
        let (code, body, _) = curl(&lab.ca_path, "a.test", lab.port, "/", &["-b", &cookie]).await;
        assert_eq!(code, 200);
        assert!(body.starts_with(&id), "{id} expected: {body}");
    }
    lab.l7.shutdown(T).await;
}

/// The proxy runs on its own runtime: from a single-threaded caller too, with one thread or
/// several; `threads` is refused out of range and changes only with a restart.
#[tokio::test(flavor = "current_thread")]
async fn the_proxy_runs_on_its_own_threads() {
    let a = backend("A", None).await;
    let dir = TempDir::new("threads");
    let ca = Ca::new("test CA");
    let ca_path = ca.write(&dir, "ca.pem");
    let (c, k) = ca.leaf(&dir, "a", "a.test", &["a.test"]);
    let body = format!(
        "{}{}{}",
        listener_toml("web", &[(&c, &k, &["a.test"])], ""),
        pool_toml("p", &[a.addr], ""),
        route_toml("all", None, "/", "p")
    );
    for threads in [1, 3] {
        let v = format!("threads = {threads}\n{body}");
        let l7 = L7::start(config(&v)).await.unwrap();
        let port = l7.listener_addr("web").unwrap().port();
        for _ in 0..3 {
            let (code, got, _) = curl(&ca_path, "a.test", port, "/", &[]).await;
            assert_eq!(code, 200, "threads = {threads}");
            assert!(got.starts_with("id=A"), "{got}");
        }
        let other = format!("threads = {}\n{body}", threads + 1);
        let e = l7.reload(config(&other)).await.unwrap_err().to_string();
        assert!(e.contains("threads changed"), "{e}");
        let (code, _, _) = curl(&ca_path, "a.test", port, "/", &[]).await;
        assert_eq!(code, 200, "the refused reload changed nothing");
        l7.shutdown(T).await;
        let (code, _, _) = curl(&ca_path, "a.test", port, "/", &[]).await;
        assert_ne!(code, 200, "stopped with its runtime");
    }
    for bad in [0, 65] {
        let v = format!("threads = {bad}\n{body}");
        let e = L7::start(config(&v))
            .await
            .err()
            .expect("refused")
            .to_string();
        assert!(e.contains("l7.threads"), "{e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_finishes_in_flight_requests() {
    let a = backend("A", None).await;
    let lab = lab("drain", &[a.addr], "", "").await;
    let ca = lab.ca_path.clone();
    let port = lab.port;
    let slow = tokio::spawn(async move { curl(&ca, "a.test", port, "/slow", &[]).await });
    // Wait until the request is in flight at the backend.
    let deadline = Instant::now() + T;
    while lab
        .l7
        .metrics()
        .backends
        .iter()
        .map(|b| b.requests)
        .sum::<u64>()
        == 0
    {
        assert!(
            Instant::now() < deadline,
            "request never reached the backend"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(lab.l7.metrics().open_connections, 1);
    lab.l7.shutdown(T).await;
    let (code, body, _) = slow.await.unwrap();
    assert_eq!(code, 200, "{body}");
    let (code, _, _) = curl(&lab.ca_path, "a.test", port, "/", &[]).await;
    assert_eq!(code, 0, "listener closed");
}

/// A TLS connection to the lab's listener, with one ALPN protocol.
async fn tls_connect(
    lab: &Lab,
    alpn: &[u8],
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let ca_pem = std::fs::read_to_string(&lab.ca_path).unwrap();
    let tls = tokio_rustls::TlsConnector::from(client_tls(&ca_pem, &[alpn]));
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", lab.port)).await?;
    tls.connect("a.test".try_into().unwrap(), tcp).await
}

fn get(path: &str) -> hyper::Request<http_body_util::Empty<bytes::Bytes>> {
    hyper::Request::builder()
        .uri(format!("https://a.test{path}"))
        .header("host", "a.test")
        .body(http_body_util::Empty::new())
        .unwrap()
}

/// A request sender over its own TLS connection (HTTP/1.1 or h2 by `alpn`).
async fn client_conn(lab: &Lab, alpn: &[u8]) -> Sender {
    let io = hyper_util::rt::TokioIo::new(tls_connect(lab, alpn).await.unwrap());
    if alpn == b"h2" {
        let (tx, conn) =
            hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
                .await
                .unwrap();
        tokio::spawn(conn);
        Sender::H2(tx)
    } else {
        let (tx, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
        tokio::spawn(conn);
        Sender::H1(tx)
    }
}

enum Sender {
    H1(hyper::client::conn::http1::SendRequest<http_body_util::Empty<bytes::Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>>),
}

impl Sender {
    async fn status(&mut self, path: &str) -> Result<u16, hyper::Error> {
        let r = match self {
            Sender::H1(tx) => {
                let mut req = get(path);
                *req.uri_mut() = path.parse().unwrap();
                tx.send_request(req).await?
            }
            Sender::H2(tx) => tx.send_request(get(path)).await?,
        };
        let status = r.status().as_u16();
        http_body_util::BodyExt::collect(r.into_body()).await?;
        Ok(status)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_client_connection_is_closed() {
    let a = backend("A", None).await;
    let lab = lab("idle", &[a.addr], "", "idle_timeout = \"1s\"").await;
    for alpn in [&b"http/1.1"[..], &b"h2"[..]] {
        // One connection stays quiet after its request, another keeps asking every 100 ms:
        // the server closes the quiet one and only that one.
        let mut quiet = tls_connect(&lab, alpn).await.unwrap();
        if alpn == b"http/1.1" {
            quiet
                .write_all(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
                .await
                .unwrap();
        }
        let mut busy = client_conn(&lab, alpn).await;
        let closed = async {
            let mut buf = vec![0u8; 4096];
            let mut got = 0;
            loop {
                match quiet.read(&mut buf).await {
                    Ok(0) | Err(_) => return got,
                    Ok(n) => got += n,
                }
            }
        };
        let mut closed = std::pin::pin!(closed);
        let mut asked = 0;
        let got = loop {
            tokio::select! {
                got = &mut closed => break got,
                _ = tokio::time::sleep(Duration::from_millis(100)) => {
                    assert_eq!(busy.status("/busy").await.unwrap(), 200, "{alpn:?}");
                    asked += 1;
                    assert!(asked < 200, "{alpn:?}: the quiet connection was never closed");
                }
            }
        };
        if alpn == b"http/1.1" {
            assert!(got > 0, "the quiet connection got its response first");
        }
        assert_eq!(
            busy.status("/after").await.unwrap(),
            200,
            "{alpn:?}: the busy connection is still open"
        );
    }
    lab.l7.shutdown(T).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_that_stops_reading_is_cut() {
    let a = backend("A", None).await;
    let lab = lab("stall", &[a.addr], "", "client_write_timeout = \"500ms\"").await;
    // A client that reads is never cut, however long the transfer.
    let mut cmd = std::process::Command::new("curl");
    cmd.args([
        "-sS",
        "--max-time",
        "60",
        "-o",
        "/dev/null",
        "-w",
        "%{size_download}",
    ])
    .arg("--cacert")
    .arg(&lab.ca_path)
    .args(["--resolve", &format!("a.test:{}:127.0.0.1", lab.port)])
    .arg(format!("https://a.test:{}/big", lab.port));
    let out = run_async(cmd, Duration::from_secs(90)).await;
    assert_eq!(String::from_utf8_lossy(&out.stdout), BIG.to_string());
    assert_eq!(lab.l7.metrics().client_write_timeouts, 0);

    // A client with a small receive window that stops reading after the first bytes.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let tcp = sock
        .connect(([127, 0, 0, 1], lab.port).into())
        .await
        .unwrap();
    let ca_pem = std::fs::read_to_string(&lab.ca_path).unwrap();
    let tls = tokio_rustls::TlsConnector::from(client_tls(&ca_pem, &[b"http/1.1"]));
    let mut s = tls
        .connect("a.test".try_into().unwrap(), tcp)
        .await
        .unwrap();
    s.write_all(b"GET /big HTTP/1.1\r\nHost: a.test\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = tokio::time::timeout(T, s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(got > 0);
    let deadline = tokio::time::Instant::now() + T;
    while lab.l7.metrics().client_write_timeouts == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the stalled client was never cut"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // What was already in the socket buffers still arrives, then the connection ends short.
    loop {
        match tokio::time::timeout(T, s.read(&mut buf)).await.unwrap() {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    assert!(got < BIG, "the whole body arrived: {got}");
    assert_eq!(lab.l7.metrics().client_write_timeouts, 1);
    lab.l7.shutdown(T).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_cap_refuses_the_next_connection() {
    let a = backend("A", None).await;
    let lab = lab("cap", &[a.addr], "", "max_connections = 2").await;
    let mut first = client_conn(&lab, b"http/1.1").await;
    let mut second = client_conn(&lab, b"h2").await;
    assert_eq!(first.status("/1").await.unwrap(), 200);
    assert_eq!(second.status("/2").await.unwrap(), 200);
    // The third is closed at accept: its handshake fails and it is counted.
    assert!(tls_connect(&lab, b"http/1.1").await.is_err());
    let m = lab.l7.metrics();
    assert_eq!((m.connections_refused, m.open_connections), (1, 2), "{m:?}");
    // Once one closes, a new connection is served.
    drop(first);
    let deadline = tokio::time::Instant::now() + T;
    while lab.l7.metrics().open_connections != 1 {
        assert!(tokio::time::Instant::now() < deadline, "never closed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (code, _, _) = curl(&lab.ca_path, "a.test", lab.port, "/3", &[]).await;
    assert_eq!(code, 200);
    assert_eq!(second.status("/4").await.unwrap(), 200);
    assert_eq!(lab.l7.metrics().connections_refused, 1);
    lab.l7.shutdown(T).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_for_replace_drops_the_client_chain() {
    let a = backend("A", None).await;
    let lab = lab("xff", &[a.addr], "", "x_forwarded_for = \"replace\"").await;
    for v in ["--http1.1", "--http2"] {
        let (code, body, _) = curl(
            &lab.ca_path,
            "a.test",
            lab.port,
            "/",
            &[
                "-H",
                "X-Forwarded-For: 192.0.2.7",
                "-H",
                "Forwarded: for=192.0.2.8",
                "-H",
                "X-Real-IP: 192.0.2.9",
                v,
            ],
        )
        .await;
        assert_eq!(code, 200, "{body}");
        assert!(body.contains(" xff=127.0.0.1 "), "{v}: {body}");
        assert!(body.contains(" fwd=- realip=-"), "{v}: {body}");
    }
    lab.l7.shutdown(T).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_swaps_routes_and_pools_atomically() {
    let a = backend("A", None).await;
    let b = backend("B", None).await;
    let dir = TempDir::new("reroute");
    let ca = Ca::new("test CA");
    let ca_path = ca.write(&dir, "ca.pem");
    let (c, k) = ca.leaf(&dir, "a", "a.test", &["a.test"]);
    let base = listener_toml("web", &[(&c, &k, &["a.test"])], "");
    let v1 = format!(
        "{base}{}{}",
        pool_toml("p", &[a.addr], ""),
        route_toml("all", None, "/", "p")
    );
    let v2 = format!(
        "{base}{}{}{}{}",
        pool_toml("p", &[a.addr], ""),
        pool_toml("q", &[b.addr], ""),
        route_toml("all", None, "/", "p"),
        route_toml("new", None, "/new", "q"),
    );
    let l7 = L7::start(config(&v1)).await.unwrap();
    let port = l7.listener_addr("web").unwrap().port();
    let (_, body, _) = curl(&ca_path, "a.test", port, "/new/x", &[]).await;
    assert!(body.starts_with("id=A"), "{body}");
    l7.reload(config(&v2)).await.unwrap();
    let (_, body, _) = curl(&ca_path, "a.test", port, "/new/x", &[]).await;
    assert!(body.starts_with("id=B"), "{body}");
    // A configuration that does not validate, or moves a listener, changes nothing.
    let bad = v2.replace("pool = \"q\"", "pool = \"missing\"");
    let err = l7.reload(config(&bad)).await.unwrap_err();
    assert!(
        format!("{err:#}").contains("\"missing\" is not defined"),
        "{err:#}"
    );
    let moved = v2.replace("127.0.0.1:0", "127.0.0.2:0");
    assert!(l7.reload(config(&moved)).await.is_err());
    let (_, body, _) = curl(&ca_path, "a.test", port, "/new/x", &[]).await;
    assert!(body.starts_with("id=B"), "{body}");
    l7.shutdown(T).await;
}

/// `n` requests for `path` at once, over `n` HTTP/1.1 connections (curl `--parallel`); their
/// status codes.
async fn burst(lab: &Lab, path: &str, n: usize) -> Vec<u16> {
    let mut c = std::process::Command::new("curl");
    c.args(["-sS", "--http1.1", "--max-time", "20", "--cacert"])
        .arg(&lab.ca_path)
        .args(["--resolve", &format!("a.test:{}:127.0.0.1", lab.port)])
        .args(["--parallel", "--parallel-immediate", "--parallel-max"])
        .arg(n.to_string())
        .args(["-w", "%{http_code}\n"]);
    for _ in 0..n {
        // `-o` applies to one URL: each gets its own.
        c.args(["-o", "/dev/null"])
            .arg(format!("https://a.test:{}{path}", lab.port));
    }
    let out = run_async(c, Duration::from_secs(30)).await;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim().parse().unwrap_or(0))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_backend_connections_are_kept_for_the_next_burst() {
    // 40 slow requests at once need 40 backend connections. Once answered, all 40 wait in
    // the pool (the default keeps 256 per backend, purged by age), and the next burst takes
    // them again: no backend connection is closed and reopened between bursts. A small cap
    // (the old default, 32) closed the extra ones at once, and every burst opened them
    // again: connection churn for the backend, and a TLS handshake each for https pools.
    let a = backend("A", None).await;
    let lab = lab("burst", &[a.addr], "", "").await;
    let first = burst(&lab, "/slow", 40).await;
    assert_eq!(first, vec![200; 40], "first burst");
    let opened = a.accepted();
    assert!(
        opened > 32,
        "the burst was concurrent: {opened} backend connections"
    );
    let second = burst(&lab, "/slow", 40).await;
    assert_eq!(second, vec![200; 40], "second burst");
    assert_eq!(a.accepted(), opened, "the second burst reused the pool");
    lab.l7.shutdown(T).await;
}
