//! The relay against in-process listeners and senders on loopback.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::time::Duration;

use balancer_health::mllp::{self, FrameLimits};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, mpsc};

use super::*;

const LIMITS: FrameLimits = FrameLimits {
    max_message: 1 << 20,
    max_before_start: 16,
};
const WAIT: Duration = Duration::from_secs(10);

/// What an in-process listener does with each message.
#[derive(Clone)]
enum Behaviour {
    /// ACK with this code, MSH-3 = name.
    Ack(&'static str, &'static str),
    /// Read the message, then close the connection without an answer.
    Close,
    /// Read the message and never answer.
    Silent,
    /// Answer with bytes that are not MLLP.
    Garbage,
    /// ACK AA once notified (one notification per message).
    Hold(&'static str, Arc<Notify>),
}

struct Listener {
    addr: SocketAddr,
    /// Control IDs received, in order.
    seen: Arc<std::sync::Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn listener(b: Behaviour) -> Listener {
    let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = tcp.local_addr().unwrap();
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let s = seen.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((conn, _)) = tcp.accept().await else {
                return;
            };
            let (b, s) = (b.clone(), s.clone());
            tokio::spawn(async move {
                let mut io = BufReader::new(conn);
                while let Ok(Some(m)) = mllp::read_frame_bounded(&mut io, &LIMITS).await {
                    let id = mllp::header(&m).control_id;
                    // MSH-3 = the listener's name, so a test can tell who answered.
                    let ack = |code: &str, name: &str| {
                        format!(
                            "MSH|^~\\&|{name}|L|||20260101||ACK^A01|A{id}|P|2.5\rMSA|{code}|{id}"
                        )
                    };
                    s.lock().unwrap().push(id.clone());
                    let out = match &b {
                        Behaviour::Ack(code, name) => mllp::frame(ack(code, name).as_bytes()),
                        Behaviour::Close => return,
                        Behaviour::Silent => {
                            std::future::pending::<()>().await;
                            return;
                        }
                        Behaviour::Garbage => b"HTTP/1.1 400 Bad Request\r\n\r\n".to_vec(),
                        Behaviour::Hold(name, n) => {
                            n.notified().await;
                            mllp::frame(ack("AA", name).as_bytes())
                        }
                    };
                    if io.get_mut().write_all(&out).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    Listener { addr, seen, task }
}

async fn relay(limits: MllpConfig) -> (Relay, mpsc::Receiver<ListenerFailure>, SocketAddr) {
    let (r, rx) = Relay::start(vec![ServiceConfig {
        name: "hl7".into(),
        vip: "127.0.0.1:0".parse().unwrap(),
        limits,
    }])
    .await
    .unwrap();
    let addr = r.local_addr("hl7").unwrap();
    (r, rx, addr)
}

fn message(id: &str) -> Vec<u8> {
    format!("MSH|^~\\&|SND|SF|RCV|RF|20260101||ADT^A01|{id}|P|2.5\rPID|1||42^^^H^MR||DOE^JANE\r")
        .into_bytes()
}

struct Sender(BufReader<TcpStream>);

impl Sender {
    async fn connect(to: SocketAddr) -> Sender {
        Sender(BufReader::new(TcpStream::connect(to).await.unwrap()))
    }
    /// Sends one message, returns its ACK's (MSH-3, MSA-1, MSA-2).
    async fn send(&mut self, id: &str) -> (String, String, String) {
        self.0
            .get_mut()
            .write_all(&mllp::frame(&message(id)))
            .await
            .unwrap();
        let ack = tokio::time::timeout(WAIT, mllp::read_frame_bounded(&mut self.0, &LIMITS))
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let text = String::from_utf8(ack).unwrap();
        let f = |seg: &str, n: usize| {
            let s = text.split('\r').find(|s| s.starts_with(seg)).unwrap_or("");
            s.split('|').nth(n).unwrap_or("").to_string()
        };
        (f("MSH", 2), f("MSA", 1), f("MSA", 2))
    }
    /// True when the relay closed the connection (EOF) within WAIT.
    async fn closed(&mut self) -> bool {
        let mut b = [0u8; 64];
        matches!(
            tokio::time::timeout(WAIT, self.0.read(&mut b)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }
}

fn svc(r: &Relay) -> ServiceMetrics {
    r.metrics().services.remove(0)
}

fn listener_metrics(r: &Relay, a: SocketAddr) -> ListenerMetrics {
    svc(r)
        .listeners
        .into_iter()
        .find(|l| l.address == a)
        .unwrap()
}

/// Plays the failover scheduler: on each failure, the next listener of `order` becomes active.
fn scheduler(
    r: Arc<Relay>,
    mut rx: mpsc::Receiver<ListenerFailure>,
    order: Vec<SocketAddr>,
) -> mpsc::Receiver<ListenerFailure> {
    let (tx, out) = mpsc::channel(16);
    tokio::spawn(async move {
        while let Some(f) = rx.recv().await {
            let next = order
                .iter()
                .skip_while(|a| **a != f.listener)
                .nth(1)
                .copied();
            r.set_active(&f.service, next);
            let _ = tx.send(f).await;
        }
    });
    out
}

#[tokio::test]
async fn relays_every_message_and_its_ack_unchanged() {
    let a = listener(Behaviour::Ack("AA", "A")).await;
    let (r, _rx, vip) = relay(MllpConfig::default()).await;
    r.set_active("hl7", Some(a.addr));
    let mut s = Sender::connect(vip).await;
    for i in 0..20 {
        let id = format!("M{i}");
        assert_eq!(s.send(&id).await, ("A".into(), "AA".into(), id));
    }
    let m = svc(&r);
    assert_eq!(
        (m.relayed, m.replayed, m.in_flight, m.senders_connected),
        (20, 0, 0, 1)
    );
    assert_eq!(m.ack_latency_buckets.iter().sum::<u64>(), 20);
    let l = listener_metrics(&r, a.addr);
    assert_eq!((l.delivered, l.acks["AA"], l.failures), (20, 20, 0));
    assert_eq!(a.seen.lock().unwrap().len(), 20);
}

/// A listener that fails before ACKing: the message goes to the next one, the sender gets
/// exactly one ACK on its open connection, and the replay is counted.
#[tokio::test]
async fn a_failed_listener_is_replaced_and_the_message_replayed() {
    for (bad, want) in [
        (Behaviour::Close, "connection closed before the ACK"),
        (Behaviour::Silent, "no ACK within"),
        (Behaviour::Garbage, "answer is not an HL7 ACK"),
    ] {
        let a = listener(bad).await;
        let b = listener(Behaviour::Ack("AA", "B")).await;
        let (r, rx, vip) = relay(MllpConfig {
            ack_timeout: Duration::from_millis(300),
            ..MllpConfig::default()
        })
        .await;
        let r = Arc::new(r);
        let mut failures = scheduler(r.clone(), rx, vec![a.addr, b.addr]);
        r.set_active("hl7", Some(a.addr));
        let mut s = Sender::connect(vip).await;
        assert_eq!(
            s.send("X1").await,
            ("B".into(), "AA".into(), "X1".into()),
            "{want}"
        );
        assert_eq!(s.send("X2").await.0, "B", "{want}");
        let f = failures.recv().await.unwrap();
        assert_eq!(f.listener, a.addr);
        assert!(f.reason.to_string().starts_with(want), "{}", f.reason);
        assert!(!f.reason.to_string().contains("HTTP"), "{}", f.reason);
        let m = svc(&r);
        assert_eq!((m.relayed, m.replayed, m.unacked), (2, 1, 0), "{want}");
        assert_eq!(listener_metrics(&r, a.addr).failures, 1, "{want}");
        assert_eq!(*a.seen.lock().unwrap(), ["X1"], "{want}");
        assert_eq!(*b.seen.lock().unwrap(), ["X1", "X2"], "{want}");
    }
}

/// The scheduler switching (health check down) while a listener sits on a message: the
/// message goes to the new listener without waiting for the ACK timeout.
#[tokio::test]
async fn a_scheduler_switch_replays_the_held_message() {
    let hold = Arc::new(Notify::new());
    let a = listener(Behaviour::Hold("A", hold.clone())).await;
    let b = listener(Behaviour::Ack("AA", "B")).await;
    let (r, _rx, vip) = relay(MllpConfig {
        ack_timeout: Duration::from_secs(60),
        ..MllpConfig::default()
    })
    .await;
    let r = Arc::new(r);
    r.set_active("hl7", Some(a.addr));
    let mut s = Sender::connect(vip).await;
    let seen = a.seen.clone();
    let r2 = r.clone();
    let switch = tokio::spawn(async move {
        while seen.lock().unwrap().is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        r2.set_active("hl7", Some(b.addr));
        b
    });
    assert_eq!(s.send("H1").await.0, "B");
    let b = switch.await.unwrap();
    assert_eq!(*b.seen.lock().unwrap(), ["H1"]);
    assert_eq!(svc(&r).replayed, 1);
    // A's late ACK is never relayed: the next message's ACK is B's, for the next message.
    hold.notify_one();
    assert_eq!(s.send("H2").await, ("B".into(), "AA".into(), "H2".into()));
}

#[tokio::test]
async fn nacks_are_relayed_counted_and_fail_a_listener_above_the_rate() {
    let a = listener(Behaviour::Ack("AR", "A")).await;
    let b = listener(Behaviour::Ack("AE", "B")).await;
    let (r, rx, vip) = relay(MllpConfig {
        nack_window: 4,
        nack_threshold: 0.5,
        ..MllpConfig::default()
    })
    .await;
    let r = Arc::new(r);
    let mut failures = scheduler(r.clone(), rx, vec![a.addr, b.addr]);
    r.set_active("hl7", Some(a.addr));
    let mut s = Sender::connect(vip).await;
    for i in 0..4 {
        assert_eq!(s.send(&format!("N{i}")).await.1, "AR");
    }
    let f = failures.recv().await.unwrap();
    assert_eq!(f.listener, a.addr);
    assert!(
        matches!(f.reason, FailReason::NackRate(x) if x == 1.0),
        "{:?}",
        f.reason
    );
    assert_eq!(s.send("N4").await, ("B".into(), "AE".into(), "N4".into()));
    let m = svc(&r);
    assert_eq!((m.relayed, m.replayed), (5, 0));
    assert_eq!(listener_metrics(&r, a.addr).acks["AR"], 4);
    assert_eq!(listener_metrics(&r, b.addr).acks["AE"], 1);
}

/// Bad input closes that sender only, with a frame error counted; a second sender on the
/// same relay is served throughout.
#[tokio::test]
async fn bad_senders_are_closed_and_others_unaffected() {
    let a = listener(Behaviour::Ack("AA", "A")).await;
    let (r, _rx, vip) = relay(MllpConfig {
        max_message_bytes: 256,
        max_in_flight_bytes: 256,
        frame_timeout: Duration::from_millis(200),
        ..MllpConfig::default()
    })
    .await;
    r.set_active("hl7", Some(a.addr));
    let mut good = Sender::connect(vip).await;
    let rows: [&[u8]; 3] = [
        b"GET / HTTP/1.1\r\n\r\n",
        &[mllp::START; 300],
        b"\x0bMSH|^~\\&|SND|SF|RCV|RF|20260101||ADT^A01|HALF|P|2.5\rPID|1",
    ];
    for (i, bad) in rows.iter().enumerate() {
        let mut s = TcpStream::connect(vip).await.unwrap();
        s.write_all(bad).await.unwrap();
        let mut s = Sender(BufReader::new(s));
        assert!(s.closed().await, "row {i}");
        assert_eq!(good.send(&format!("G{i}")).await.1, "AA", "row {i}");
        assert_eq!(svc(&r).frame_errors, i as u64 + 1, "row {i}");
    }
    assert_eq!(*a.seen.lock().unwrap(), ["G0", "G1", "G2"]);
}

#[tokio::test]
async fn senders_over_the_limit_are_refused() {
    let a = listener(Behaviour::Ack("AA", "A")).await;
    let (r, _rx, vip) = relay(MllpConfig {
        max_senders: 1,
        ..MllpConfig::default()
    })
    .await;
    r.set_active("hl7", Some(a.addr));
    let mut first = Sender::connect(vip).await;
    assert_eq!(first.send("F1").await.1, "AA");
    let mut second = Sender::connect(vip).await;
    assert!(second.closed().await);
    assert_eq!(svc(&r).senders_refused, 1);
    assert_eq!(first.send("F2").await.1, "AA");
}

/// No listener within `hold_timeout`: the sender's connection is closed without an ACK.
#[tokio::test]
async fn no_listener_closes_the_sender_without_an_ack() {
    let (r, _rx, vip) = relay(MllpConfig {
        hold_timeout: Duration::from_millis(100),
        ..MllpConfig::default()
    })
    .await;
    let mut s = TcpStream::connect(vip).await.unwrap();
    s.write_all(&mllp::frame(&message("U1"))).await.unwrap();
    let mut s = Sender(BufReader::new(s));
    assert!(s.closed().await);
    let m = svc(&r);
    assert_eq!((m.unacked, m.relayed, m.in_flight), (1, 0, 0));
}

/// Back-pressure: with room for one message in flight, a second sender's message is not
/// forwarded (and that sender not read further) until the first one is ACKed.
#[tokio::test]
async fn the_in_flight_budget_holds_senders_back() {
    let hold = Arc::new(Notify::new());
    let a = listener(Behaviour::Hold("A", hold.clone())).await;
    let size = message("B1").len();
    let (r, _rx, vip) = relay(MllpConfig {
        max_message_bytes: size + 10,
        max_in_flight_bytes: size + 10,
        ..MllpConfig::default()
    })
    .await;
    let r = Arc::new(r);
    r.set_active("hl7", Some(a.addr));
    let acked = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for id in ["B1", "B2"] {
        let acked = acked.clone();
        tasks.push(tokio::spawn(async move {
            let mut s = Sender::connect(vip).await;
            let ack = s.send(id).await;
            acked.fetch_add(1, SeqCst);
            ack
        }));
    }
    while svc(&r).senders_connected < 2 || a.seen.lock().unwrap().is_empty() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        a.seen.lock().unwrap().len(),
        1,
        "second message forwarded over the budget"
    );
    assert_eq!(svc(&r).in_flight, 1);
    hold.notify_one();
    while a.seen.lock().unwrap().len() < 2 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    hold.notify_one();
    for t in tasks {
        assert_eq!(t.await.unwrap().1, "AA");
    }
    assert_eq!(acked.load(SeqCst), 2);
}

/// A message every listener answers with garbage fails `max_attempts` listeners, then is given
/// up (its sender closed without an ACK) instead of taking out every listener in turn.
#[tokio::test]
async fn a_poison_message_is_given_up_after_max_attempts() {
    let ls = [
        listener(Behaviour::Garbage).await,
        listener(Behaviour::Garbage).await,
        listener(Behaviour::Garbage).await,
    ];
    let (r, rx, vip) = relay(MllpConfig {
        max_attempts: 2,
        ..MllpConfig::default()
    })
    .await;
    let r = Arc::new(r);
    let order: Vec<SocketAddr> = ls.iter().map(|l| l.addr).collect();
    let mut failures = scheduler(r.clone(), rx, order);
    r.set_active("hl7", Some(ls[0].addr));
    let mut s = TcpStream::connect(vip).await.unwrap();
    s.write_all(&mllp::frame(&message("P1"))).await.unwrap();
    let mut s = Sender(BufReader::new(s));
    assert!(s.closed().await);
    for l in &ls[..2] {
        let f = tokio::time::timeout(WAIT, failures.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(f.listener, l.addr);
        assert!(matches!(f.reason, FailReason::Garbage(_)), "{:?}", f.reason);
    }
    assert!(
        ls[2].seen.lock().unwrap().is_empty(),
        "the third listener was spared"
    );
    let m = svc(&r);
    assert_eq!(
        (m.unacked, m.relayed, m.replayed, m.in_flight),
        (1, 0, 1, 0)
    );
}

/// Not a test: messages/s through the relay on loopback (16 senders back to back), printed.
/// `cargo test --release -p balancer-mllp -- --ignored --nocapture loopback_rate`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn loopback_rate() {
    let a = listener(Behaviour::Ack("AA", "A")).await;
    let (r, _rx, vip) = relay(MllpConfig::default()).await;
    r.set_active("hl7", Some(a.addr));
    let t = std::time::Instant::now();
    let mut tasks = Vec::new();
    for c in 0..16 {
        tasks.push(tokio::spawn(async move {
            let mut s = Sender::connect(vip).await;
            let mut n = 0u64;
            while t.elapsed() < Duration::from_secs(3) {
                s.send(&format!("L{c}-{n}")).await;
                n += 1;
            }
            n
        }));
    }
    let mut n = 0;
    for t in tasks {
        n += t.await.unwrap();
    }
    println!(
        "loopback: {:.0} messages/s through the relay",
        n as f64 / t.elapsed().as_secs_f64()
    );
    a.seen.lock().unwrap().clear();
}

/// A loopback address with a port free a moment ago (for a service whose VIP must be
/// configured, not picked by the kernel).
fn free_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

fn service(name: &str, vip: SocketAddr, limits: MllpConfig) -> ServiceConfig {
    ServiceConfig {
        name: name.into(),
        vip,
        limits,
    }
}

#[tokio::test]
async fn a_reload_adds_changes_renames_and_removes_services_without_closing_kept_senders() {
    let l = listener(Behaviour::Ack("AA", "L1")).await;
    let a_vip = free_addr();
    let (r, _rx) = Relay::start(vec![service("a", a_vip, MllpConfig::default())])
        .await
        .unwrap();
    r.set_active("a", Some(l.addr));
    let mut sa = Sender::connect(a_vip).await;
    assert_eq!(sa.send("m1").await.1, "AA");

    // A refused update changes nothing: the running service, its limits and its sender.
    let before = r.services();
    let bad = MllpConfig {
        max_senders: 0,
        ..MllpConfig::default()
    };
    let e = r
        .prepare(vec![
            service("a", a_vip, MllpConfig::default()),
            service("b", "127.0.0.1:0".parse().unwrap(), bad),
        ])
        .unwrap_err();
    assert!(e.to_string().contains("max_senders"), "{e}");
    let taken = r.local_addr("a").unwrap();
    let e = r
        .prepare(vec![service("x", l.addr, MllpConfig::default())])
        .unwrap_err();
    assert!(matches!(e, RelayError::Bind { .. }), "{e}");
    assert_eq!(r.services(), before);
    assert_eq!(r.local_addr("a"), Some(taken));
    assert_eq!(sa.send("m2").await.1, "AA");

    // a kept with new limits, b added.
    let changed = MllpConfig {
        ack_timeout: Duration::from_secs(7),
        max_senders: 3,
        ..MllpConfig::default()
    };
    let u = r
        .prepare(vec![
            service("a", a_vip, changed.clone()),
            service("b", "127.0.0.1:0".parse().unwrap(), MllpConfig::default()),
        ])
        .unwrap();
    assert_eq!(u.summary(), (1, 1, 0));
    r.commit(u);
    assert_eq!(r.services()[0].limits, changed);
    r.set_active("b", Some(l.addr));
    let mut sb = Sender::connect(r.local_addr("b").unwrap()).await;
    assert_eq!(sb.send("b1").await.1, "AA");
    // The sender of the kept service was not disconnected.
    assert_eq!(sa.send("m3").await.1, "AA");
    assert_eq!(
        svc(&r).relayed,
        3,
        "a's counters (m1, m2, m3) survive the reload"
    );

    // a renamed to c on the same VIP: the socket is handed over, never unbound; a's idle
    // sender is closed (it reconnects to c), b is removed.
    let u = r
        .prepare(vec![service("c", a_vip, MllpConfig::default())])
        .unwrap();
    assert_eq!(u.summary(), (1, 0, 2));
    r.commit(u);
    assert!(
        sa.closed().await,
        "the removed service's idle sender is closed"
    );
    assert!(
        sb.closed().await,
        "the removed service's idle sender is closed"
    );
    r.set_active("c", Some(l.addr));
    let mut sc = Sender::connect(a_vip).await;
    assert_eq!(sc.send("c1").await.1, "AA");
    assert_eq!(r.services().len(), 1);
    assert_eq!(svc(&r).name, "c");
    assert_eq!(svc(&r).relayed, 1);
}

#[tokio::test]
async fn a_removed_service_finishes_its_held_message() {
    let release = Arc::new(Notify::new());
    let l = listener(Behaviour::Hold("L1", release.clone())).await;
    let (r, _rx, vip) = relay(MllpConfig::default()).await;
    r.set_active("hl7", Some(l.addr));
    let mut s = Sender::connect(vip).await;
    let held = tokio::spawn(async move { s.send("h1").await });
    // Bounded: the message reaches the listener before the service goes.
    for _ in 0..1000 {
        if !l.seen.lock().unwrap().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(*l.seen.lock().unwrap(), vec!["h1".to_string()]);
    let u = r.prepare(Vec::new()).unwrap();
    assert_eq!(u.summary(), (0, 0, 1));
    r.commit(u);
    release.notify_one();
    let (_, code, id) = tokio::time::timeout(WAIT, held).await.unwrap().unwrap();
    assert_eq!((code.as_str(), id.as_str()), ("AA", "h1"));
    assert!(r.metrics().services.is_empty());
}
