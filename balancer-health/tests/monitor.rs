//! The Monitor against real peers: first check at once, rise/fall debouncing, events only
//! on changes, many targets concurrently, remove and replace.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    collections::HashMap,
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use balancer_health::{CheckKind, Health, HealthEvent, HealthSpec, Monitor};
use common::{MllpReply, WAIT};
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

fn timing(kind: CheckKind, interval_ms: u64, timeout_ms: u64, rise: u32, fall: u32) -> HealthSpec {
    let spec = HealthSpec {
        interval: Duration::from_millis(interval_ms),
        timeout: Duration::from_millis(timeout_ms),
        rise,
        fall,
        jitter: Duration::ZERO,
        ..HealthSpec::new(kind)
    };
    spec.validate().unwrap();
    spec
}

async fn next_event(rx: &mut UnboundedReceiver<HealthEvent>) -> HealthEvent {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("no health event in time")
        .expect("event channel closed")
}

/// Waits until `count()` (checks a peer has served) has grown by `n + 1`, so that the
/// results of `n` checks have been handled, then asserts that none of them gave an event.
async fn no_event_over_checks(
    rx: &mut UnboundedReceiver<HealthEvent>,
    count: impl Fn() -> usize,
    n: usize,
) {
    let start = count();
    let deadline = Instant::now() + WAIT;
    while count() < start + n + 1 {
        assert!(Instant::now() < deadline, "checks stopped at {}", count());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    if let Ok(ev) = rx.try_recv() {
        panic!("unexpected event: {ev:?}");
    }
}

#[tokio::test]
async fn first_check_runs_at_once() {
    let (tx, mut rx) = unbounded_channel();
    let mut monitor = Monitor::new(tx);
    let up = common::tcp_listener().await;
    // A 60 s interval: only the immediate first check can produce this event in time.
    let spec = HealthSpec {
        interval: Duration::from_secs(60),
        timeout: Duration::from_secs(2),
        rise: 1,
        jitter: Duration::from_secs(30),
        ..HealthSpec::new(CheckKind::Tcp)
    };
    spec.validate().unwrap();
    let before = Instant::now();
    monitor.add(1, up, spec, Health::Down);
    assert_eq!(monitor.state(1), Some(Health::Down));
    let ev = next_event(&mut rx).await;
    assert_eq!((ev.target, ev.addr, ev.health), (1, up, Health::Up));
    assert_eq!(ev.reason, "connected");
    assert!(ev.latency.is_some());
    assert!(ev.at >= before);
    assert_eq!(monitor.state(1), Some(Health::Up));
    assert!(monitor.last_latency(1).is_some());
}

#[tokio::test]
async fn rise_and_fall_debounce_and_events_only_on_change() {
    let server = common::http_server(200).await;
    let (tx, mut rx) = unbounded_channel();
    let mut monitor = Monitor::new(tx);
    let spec = timing(CheckKind::http("/health"), 40, 35, 2, 3);
    monitor.add(7, server.addr, spec, Health::Down);

    let ev = next_event(&mut rx).await;
    assert_eq!((ev.target, ev.health), (7, Health::Up));
    assert_eq!(ev.reason, "status 200");
    assert!(
        server.hits() >= 2,
        "up after {} checks, rise is 2",
        server.hits()
    );
    assert_eq!(monitor.state(7), Some(Health::Up));

    // Steady state: checks go on, no events.
    no_event_over_checks(&mut rx, || server.hits(), 5).await;
    assert!(monitor.last_latency(7).is_some());

    // Failing: down only after 3 consecutive failures.
    server.set_status(503);
    let ev = next_event(&mut rx).await;
    assert_eq!((ev.target, ev.health), (7, Health::Down));
    assert_eq!(ev.reason, "status 503");
    assert_eq!(ev.latency, None);
    assert!(
        server.failures_served() >= 3,
        "down after {} failures, fall is 3",
        server.failures_served()
    );
    assert_eq!(monitor.state(7), Some(Health::Down));
    assert_eq!(monitor.last_latency(7), None);
    no_event_over_checks(&mut rx, || server.hits(), 3).await;

    // Recovering.
    server.set_status(200);
    let ev = next_event(&mut rx).await;
    assert_eq!((ev.target, ev.health), (7, Health::Up));
    assert_eq!(monitor.state(7), Some(Health::Up));
}

#[tokio::test]
async fn flapping_target_never_changes_state() {
    let server = common::http_server(200).await;
    server.alternate.store(1, Ordering::SeqCst);
    let (tx, mut rx) = unbounded_channel();
    let mut monitor = Monitor::new(tx);
    monitor.add(
        3,
        server.addr,
        timing(CheckKind::http("/"), 40, 39, 3, 3),
        Health::Up,
    );
    no_event_over_checks(&mut rx, || server.hits(), 8).await;
    assert_eq!(monitor.state(3), Some(Health::Up));
}

#[tokio::test]
async fn mllp_target_goes_down_on_negative_ack() {
    let nack = common::mllp_server(MllpReply::Ack("AE")).await;
    let (tx, mut rx) = unbounded_channel();
    let mut monitor = Monitor::new(tx);
    monitor.add(
        9,
        nack.addr,
        timing(CheckKind::mllp(), 20, 15, 2, 2),
        Health::Up,
    );
    let ev = next_event(&mut rx).await;
    assert_eq!((ev.health, ev.reason.as_str()), (Health::Down, "MSA-1 AE"));
    assert!(nack.received.lock().unwrap().len() >= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_targets_are_checked_concurrently() {
    let (tx, mut rx) = unbounded_channel();
    let mut monitor = Monitor::new(tx);
    let mut want = HashMap::new();
    let mut silent = Vec::new();
    for id in 0..50u64 {
        if id % 2 == 0 {
            // Silent peers: each check waits out its whole 300 ms timeout.
            let peer = common::mllp_server(MllpReply::Silence).await;
            let spec = timing(CheckKind::mllp(), 10_000, 300, 1, 1);
            monitor.add(id, peer.addr, spec, Health::Up);
            want.insert(id, Health::Down);
            silent.push(peer);
        } else {
            let peer = common::mllp_server(MllpReply::Ack("AA")).await;
            let spec = timing(CheckKind::mllp(), 10_000, 300, 1, 1);
            monitor.add(id, peer.addr, spec, Health::Down);
            want.insert(id, Health::Up);
        }
    }
    let mut got = HashMap::new();
    while got.len() < 50 {
        let ev = next_event(&mut rx).await;
        if ev.health == Health::Down
            && !got.values().any(|e: &HealthEvent| e.health == Health::Down)
        {
            // When the first silent check gives up, every silent peer already holds its
            // message: the checks wait side by side, not one after the other.
            let waiting = silent
                .iter()
                .filter(|p| !p.received.lock().unwrap().is_empty())
                .count();
            assert_eq!(waiting, silent.len(), "checks ran one after the other");
        }
        assert!(
            got.insert(ev.target, ev.clone()).is_none(),
            "second event {ev:?}"
        );
    }
    for (id, health) in &want {
        assert_eq!(got[id].health, *health, "target {id}");
        assert_eq!(monitor.state(*id), Some(*health));
        if *health == Health::Down {
            assert_eq!(got[id].reason, "timeout 300ms");
        } else {
            assert_eq!(got[id].reason, "MSA-1 AA");
        }
    }
    assert_eq!(monitor.targets().count(), 50);
}

#[tokio::test]
async fn remove_stops_checks_and_events() {
    let removed = common::http_server(503).await;
    let other = common::http_server(200).await;
    let (tx, mut rx) = unbounded_channel();
    let mut monitor = Monitor::new(tx);
    monitor.add(
        5,
        removed.addr,
        timing(CheckKind::http("/"), 20, 15, 1, 1),
        Health::Up,
    );
    let ev = next_event(&mut rx).await;
    assert_eq!((ev.target, ev.health), (5, Health::Down));
    monitor.remove(5);
    assert_eq!(monitor.state(5), None);
    assert_eq!(monitor.last_latency(5), None);
    // A check in flight at the removal may still reach the peer; none after it.
    let hits = removed.hits() + 1;
    removed.set_status(200);
    monitor.add(
        6,
        other.addr,
        timing(CheckKind::http("/"), 20, 15, 1, 1),
        Health::Up,
    );
    // Ten checks of the other target, at the removed one's pace: none of the removed one.
    no_event_over_checks(&mut rx, || other.hits(), 10).await;
    assert!(removed.hits() <= hits, "checks went on after remove");
    monitor.remove(5); // unknown ids are ignored
}

#[tokio::test]
async fn add_replaces_a_target() {
    let down = common::closed_port().await;
    let up = common::tcp_listener().await;
    let (tx, mut rx) = unbounded_channel();
    let mut monitor = Monitor::new(tx);

    monitor.add(1, down, timing(CheckKind::Tcp, 30, 20, 1, 1), Health::Up);
    let ev = next_event(&mut rx).await;
    assert_eq!((ev.addr, ev.health), (down, Health::Down));
    assert_eq!(ev.reason, "connect refused");

    monitor.add(1, up, timing(CheckKind::Tcp, 30, 20, 1, 1), Health::Down);
    // An event of the replaced task may already be queued: skip events for the old address.
    let ev = loop {
        let ev = next_event(&mut rx).await;
        if ev.addr == up {
            break ev;
        }
    };
    assert_eq!(ev.health, Health::Up);
    assert_eq!(monitor.state(1), Some(Health::Up));
    assert_eq!(monitor.targets().collect::<Vec<_>>(), vec![1]);
}

#[tokio::test]
async fn dropping_the_monitor_stops_everything() {
    let down = common::closed_port().await;
    let (tx, mut rx) = unbounded_channel();
    let mut monitor = Monitor::new(tx);
    monitor.add(1, down, timing(CheckKind::Tcp, 100, 50, 1, 3), Health::Up);
    drop(monitor);
    // All senders are gone once the task is aborted: the channel closes, no event came.
    let end = tokio::time::timeout(WAIT, rx.recv()).await.unwrap();
    assert!(end.is_none(), "event after drop: {end:?}");
}

#[tokio::test]
async fn https_target_through_the_monitor() {
    let pki = common::pki();
    let server = common::https_server(200, pki.server_config.clone()).await;
    let (tx, mut rx) = unbounded_channel();
    let mut monitor = Monitor::new(tx);
    let kind = CheckKind::Https {
        path: "/health".into(),
        expect_status: vec![200],
        body_contains: Some("healthy".into()),
        host: Some("localhost".into()),
        ca_file: Some(pki.ca_file.clone()),
        insecure: false,
        sni: None,
    };
    monitor.add(2, server.addr, timing(kind, 50, 40, 1, 1), Health::Down);
    let ev = next_event(&mut rx).await;
    assert_eq!(
        (ev.health, ev.reason.as_str()),
        (Health::Up, "status 200, body match")
    );
    server.set_status(500);
    let ev = next_event(&mut rx).await;
    assert_eq!(
        (ev.health, ev.reason.as_str()),
        (Health::Down, "status 500")
    );
    assert!(!ev.health.is_up());
    let _ = std::fs::remove_file(&pki.ca_file);
}
