//! Tests of the lab harness and the traffic tools themselves (no balancer needed).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::time::Duration;

use balancer_tests::{ECHO_PORT, HTTP_PORT, Host, Lab, stream_report};

fn backend_addr(host: Host, v6: bool) -> SocketAddr {
    if v6 {
        SocketAddr::new(host.v6().unwrap().into(), ECHO_PORT)
    } else {
        SocketAddr::new(host.v4().unwrap().into(), ECHO_PORT)
    }
}

fn gone(namespaces: &[String]) -> bool {
    namespaces
        .iter()
        .all(|ns| !Path::new("/run/netns").join(ns).exists())
}

#[test]
fn lab_comes_up_and_cleans_up() {
    let lab = Lab::new(2).unwrap();
    let namespaces = lab.namespaces();
    assert_eq!(namespaces.len(), 5);
    for ns in &namespaces {
        assert!(Path::new("/run/netns").join(ns).exists(), "{ns} missing");
    }
    let addrs = lab
        .exec(Host::Backend(2), &["ip", "-br", "addr", "show", "eth0"])
        .unwrap();
    assert!(addrs.contains("10.77.0.12/24"), "{addrs}");
    assert!(addrs.contains("fd77::12/64"), "{addrs}");
    // The switch carries v4 and v6 between the hosts (no DAD delay for v6).
    let _echo = lab.spawn_echo(2).unwrap();
    for v6 in [false, true] {
        let u = lab
            .client_udp(backend_addr(Host::Backend(2), v6), 3)
            .unwrap();
        assert_eq!(u.ok, 3, "{u:?}");
    }
    let arp = lab
        .exec(Host::Lb, &["ip", "-br", "link", "show", "eth0"])
        .unwrap();
    assert!(arp.contains("UP"), "{arp}");
    // A process left running in a namespace does not keep the lab alive.
    let _sleeper = lab.spawn(Host::Backend(1), &["sleep", "600"]).unwrap();
    let dir = lab.dir().to_path_buf();
    drop(_sleeper);
    let orphan = lab.spawn(Host::Client, &["sleep", "600"]).unwrap();
    std::mem::forget(orphan);
    drop(lab);
    assert!(gone(&namespaces), "namespaces left: {namespaces:?}");
    assert!(!dir.exists());
}

#[test]
fn lab_cleans_up_after_a_panic() {
    let mut names = Vec::new();
    let result = catch_unwind(AssertUnwindSafe(|| {
        let lab = Lab::new(1).unwrap();
        names = lab.namespaces();
        let _echo = lab.spawn_echo(1).unwrap();
        panic!("test panic inside the lab");
    }));
    assert!(result.is_err());
    assert!(!names.is_empty());
    assert!(gone(&names), "namespaces left: {names:?}");
}

#[test]
fn direct_echo_is_byte_exact_v4_and_v6() {
    let lab = Lab::new(3).unwrap();
    let _echo = lab.spawn_echo_all().unwrap();
    for v6 in [false, true] {
        for host in lab.backend_hosts() {
            let to = backend_addr(host, v6);
            let r = lab.client_conns(to, 20, 3000, 4).unwrap();
            assert_eq!(r.failed, 0, "{to}: {r:?}");
            assert_eq!(r.ok, 20);
            assert_eq!(r.by_backend.get(&host.echo_name()), Some(&20), "{r:?}");
        }
    }
    // Large payloads exercise the concurrent writer and partial reads.
    let r = lab
        .client_conns(backend_addr(Host::Backend(1), false), 4, 1 << 20, 2)
        .unwrap();
    assert_eq!((r.ok, r.failed), (4, 0), "{r:?}");
}

#[test]
fn udp_stream_rate_and_http_tools() {
    let lab = Lab::new(1).unwrap();
    let _echo = lab.spawn_echo(1).unwrap();
    let b1 = Host::Backend(1);

    let u = lab.client_udp(backend_addr(b1, false), 50).unwrap();
    assert_eq!((u.ok, u.failed), (50, 0), "{u:?}");
    let u = lab.client_udp(backend_addr(b1, true), 20).unwrap();
    assert_eq!((u.ok, u.failed), (20, 0), "{u:?}");
    assert_eq!(u.by_backend.get("be1"), Some(&20));

    let s = lab.spawn_stream(backend_addr(b1, false), 1.0, 50).unwrap();
    let s = stream_report(s, Duration::from_secs(20)).unwrap();
    assert!(s.ok, "{s:?}");
    assert_eq!(s.backend, "be1");
    assert!(s.chunks >= 5, "{s:?}");

    let r = lab.client_rate(backend_addr(b1, false), 1.0, 2).unwrap();
    assert!(r.ok > 10, "{r:?}");
    assert_eq!(r.failed, 0, "{r:?}");

    let url = format!("http://10.77.0.11:{HTTP_PORT}/");
    let body = lab
        .exec(Host::Client, &["curl", "-sf", "-m", "5", &url])
        .unwrap();
    assert_eq!(body, "served-by be1\n");
    let url = format!("http://[fd77::11]:{HTTP_PORT}/health");
    let body = lab
        .exec(Host::Client, &["curl", "-sf", "-m", "5", &url])
        .unwrap();
    assert_eq!(body, "ok\n");
}

#[test]
fn a_stream_reports_a_dead_backend() {
    let lab = Lab::new(1).unwrap();
    let mut echo = lab.spawn_echo(1).unwrap();
    let s = lab
        .spawn_stream(backend_addr(Host::Backend(1), false), 10.0, 20)
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    echo.kill();
    let r = stream_report(s, Duration::from_secs(20)).unwrap();
    assert!(!r.ok, "{r:?}");
    assert!(r.error.is_some());
}

#[test]
fn neighbours_resolve_from_the_balancer_host() {
    let lab = Lab::new(2).unwrap();
    lab.resolve_neighbours(Host::Lb).unwrap();
    let neigh = lab
        .exec(Host::Lb, &["ip", "neigh", "show", "dev", "eth0"])
        .unwrap();
    for a in ["10.77.0.2 ", "10.77.0.11 ", "10.77.0.12 ", "fd77::12 "] {
        assert!(neigh.contains(a), "{a} missing from\n{neigh}");
    }
}

#[test]
fn stale_labs_of_dead_processes_are_removed() {
    // pid 0 never runs in /proc: a lab named after it is stale by definition.
    let ns = "blb0x424242-sw";
    let out = std::process::Command::new("ip")
        .args(["netns", "add", ns])
        .status()
        .unwrap();
    assert!(out.success());
    assert!(Path::new("/run/netns").join(ns).exists());
    let removed = Lab::cleanup_stale().unwrap();
    assert!(removed >= 1);
    assert!(!Path::new("/run/netns").join(ns).exists());
}
