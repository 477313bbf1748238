//! ECMP scale-out with BGP: balancers announce their VIPs through BIRD to a router that
//! spreads flows over them (`balancer_tests::ecmp`). Each test builds its own lab and
//! cleans it up; they run one at a time (the lab is heavy for a small machine).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddr},
    sync::Mutex,
    thread::sleep,
    time::{Duration, Instant},
};

use balancer_tests::ecmp::{ECMP_VIP, ECMP_VIP2, EcmpHost, EcmpLab, ecmp_stream_report};

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

const PORT: u16 = 7002;
/// The port of the second service, which no backend listens on at first.
const PORT2: u16 = 7003;

/// The services every balancer runs: `web` (DSR, Maglev over every backend, TCP check) on
/// the VIP, and `spare` on the second VIP, whose only backend listens on nothing at first.
fn services(lab: &EcmpLab) -> String {
    let backends: Vec<String> = lab
        .backend_hosts()
        .into_iter()
        .filter_map(EcmpHost::farm_v4)
        .map(|a| format!("{{ address = \"{a}:{PORT}\" }}"))
        .collect();
    format!(
        r#"
[[service]]
name = "web"
vip = "{ECMP_VIP}:{PORT}"
forwarding = "dsr"
health = {{ kind = "tcp", interval = "300ms", timeout = "200ms", rise = 2, fall = 2 }}
backends = [ {} ]

[[service]]
name = "spare"
vip = "{ECMP_VIP2}:{PORT2}"
forwarding = "dsr"
health = {{ kind = "tcp", interval = "300ms", timeout = "200ms", rise = 2, fall = 2 }}
backends = [ {{ address = "10.77.0.11:{PORT2}" }} ]
"#,
        backends.join(", ")
    )
}

fn hops(lbs: &[usize]) -> BTreeSet<Ipv4Addr> {
    lbs.iter()
        .map(|i| EcmpHost::Lb(*i).farm_v4().unwrap())
        .collect()
}

fn vip() -> SocketAddr {
    SocketAddr::new(ECMP_VIP.into(), PORT)
}

/// New connections through the router all succeed, byte-exact.
fn new_connections_work(lab: &EcmpLab, what: &str) {
    let r = lab.client_conns(vip(), 60, 2000).unwrap();
    assert_eq!((r.ok, r.failed), (60, 0), "{what}: {:?}", r.errors);
    eprintln!(
        "{what}: 60 new connections ok, by backend {:?}",
        r.by_backend
    );
}

#[test]
fn dsr_streams_survive_losing_a_balancer_and_adding_one() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let lab = EcmpLab::new(3, 3).unwrap();
    let _echo: Vec<_> = (1..=3)
        .map(|i| lab.spawn_echo(i, &[PORT]).unwrap())
        .collect();
    let _router = lab.start_router_bird().unwrap();
    let svc = services(&lab);
    let mut lb1 = lab
        .start_balancer(1, &lab.balancer_config(1, &svc))
        .unwrap();
    let mut lb2 = lab
        .start_balancer(2, &lab.balancer_config(2, &svc))
        .unwrap();
    let t = lab
        .wait_next_hops(ECMP_VIP, &hops(&[1, 2]), Duration::from_secs(30))
        .unwrap();
    eprintln!("router: 2 next hops for {ECMP_VIP} after {t:?}");
    new_connections_work(&lab, "two balancers");

    // Long-lived DSR streams, spread by the router's 5-tuple hash over both balancers.
    let before = [lab.new_flows(1).unwrap(), lab.new_flows(2).unwrap()];
    let t0 = Instant::now();
    let streams: Vec<_> = (0..8)
        .map(|_| lab.spawn_stream(vip(), 30.0, 20, 30_000).unwrap())
        .collect();
    sleep(Duration::from_secs(1));
    let carried = [
        lab.new_flows(1).unwrap() - before[0],
        lab.new_flows(2).unwrap() - before[1],
    ];
    eprintln!("streams: lb1 carries {}, lb2 {}", carried[0], carried[1]);
    assert!(
        carried[0] + carried[1] >= 8,
        "every stream went through a balancer: {carried:?}"
    );
    // Lose the balancer that carries streams (lb1 unless the hash put them all on lb2).
    let (lost, kept) = if carried[0] > 0 { (1, 2) } else { (2, 1) };
    assert!(carried[lost - 1] > 0, "{carried:?}");

    // (a) It vanishes silently (a hung host; its switch port stays up): no FIN, no RST, no
    // BGP notification. The router's hold timer (3 s) takes its route away and its streams
    // rehash to the other balancer, whose identical Maglev ring sends them to the same
    // backends.
    let lost_at = Instant::now();
    lab.blackhole(lost).unwrap();
    eprintln!(
        "lb{lost} blackholed {:?} after the streams started",
        lost_at - t0
    );
    let t = lab
        .wait_next_hops(ECMP_VIP, &hops(&[kept]), Duration::from_secs(15))
        .unwrap();
    eprintln!("router: lb{lost} lost silently; 1 next hop (lb{kept}) after {t:?}");
    new_connections_work(&lab, "one balancer");

    // (b) A new balancer is added and announced.
    let mut lb3 = lab
        .start_balancer(3, &lab.balancer_config(3, &svc))
        .unwrap();
    let t = lab
        .wait_next_hops(ECMP_VIP, &hops(&[kept, 3]), Duration::from_secs(30))
        .unwrap();
    eprintln!("router: lb3 added; 2 next hops (lb{kept}, lb3) after {t:?}");
    sleep(Duration::from_secs(2));
    let on_lb3 = lab.new_flows(3).unwrap();
    eprintln!("lb3 took {on_lb3} of the running streams");
    new_connections_work(&lab, "lb3 added");
    assert!(
        lab.new_flows(3).unwrap() > on_lb3,
        "lb3 forwards new connections"
    );

    // (c) The other old balancer's BIRD and controller are killed: its BGP session closes
    // at once (the kernel resets it) and the router keeps only lb3; its pinned dataplane
    // forwards until then.
    let killed_at = Instant::now();
    eprintln!(
        "lb{kept} killed {:?} after the streams started",
        killed_at - t0
    );
    let victim = if kept == 1 { &mut lb1 } else { &mut lb2 };
    victim.kill9();
    let t = lab
        .wait_next_hops(ECMP_VIP, &hops(&[3]), Duration::from_secs(10))
        .unwrap();
    eprintln!("router: lb{kept} killed (bird and balancer); 1 next hop (lb3) after {t:?}");
    new_connections_work(&lab, "lb3 alone");

    let mut longest = 0u64;
    for s in streams {
        let rep = ecmp_stream_report(s, Duration::from_secs(90)).unwrap();
        assert!(rep.ok, "stream broke: {:?} ({rep:?})", rep.error);
        assert!(rep.chunks > 200, "{rep:?}");
        eprintln!(
            "stream on {}: {} chunks, {} bytes byte-exact, longest stall {} ms (from {} ms)",
            rep.backend, rep.chunks, rep.bytes, rep.max_stall_ms, rep.max_stall_at_ms
        );
        longest = longest.max(rep.max_stall_ms);
    }
    eprintln!("longest stall of a stream: {longest} ms");
    drop((lb1, lb2));
    assert!(lb3.stop().unwrap());
}

#[test]
fn operator_withdraw_and_announce_and_a_vip_without_backends() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let lab = EcmpLab::new(2, 2).unwrap();
    let _echo: Vec<_> = (1..=2)
        .map(|i| lab.spawn_echo(i, &[PORT]).unwrap())
        .collect();
    let _router = lab.start_router_bird().unwrap();
    let svc = services(&lab);
    let mut lb1 = lab
        .start_balancer(1, &lab.balancer_config(1, &svc))
        .unwrap();
    let _lb2 = lab
        .start_balancer(2, &lab.balancer_config(2, &svc))
        .unwrap();
    lab.wait_next_hops(ECMP_VIP, &hops(&[1, 2]), Duration::from_secs(30))
        .unwrap();
    // `spare` has no backend listening: its checks fail and its VIP is withdrawn by both.
    lab.wait_next_hops(ECMP_VIP2, &BTreeSet::new(), Duration::from_secs(15))
        .unwrap();
    let sock = lb1.socket().to_string_lossy().into_owned();
    let st: serde_json::Value = serde_json::from_str(
        &lab.balancer_cli(1, &["status", "--json", "--socket", &sock])
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        st["bgp"]["announced"],
        serde_json::json!([ECMP_VIP.to_string()]),
        "{st}"
    );
    assert_eq!(st["bgp"]["withdrawn_by_operator"], false);
    assert_eq!(st["bgp"]["last_ok"], true);

    // Maintenance: lb1 leaves the ECMP group and comes back.
    let out = lab
        .balancer_cli(1, &["bgp", "withdraw", "--socket", &sock])
        .unwrap();
    assert!(out.contains("bgp withdraw: no VIP announced"), "{out}");
    let t = lab
        .wait_next_hops(ECMP_VIP, &hops(&[2]), Duration::from_secs(10))
        .unwrap();
    eprintln!("withdraw: the router dropped lb1 after {t:?}");
    new_connections_work(&lab, "lb1 withdrawn");
    let table = lab.balancer_cli(1, &["status", "--socket", &sock]).unwrap();
    assert!(
        table.contains("bgp announced none  withdrawn by operator yes"),
        "{table}"
    );
    let out = lab
        .balancer_cli(1, &["bgp", "announce", "--socket", &sock])
        .unwrap();
    assert!(
        out.contains(&format!("bgp announce: announcing {ECMP_VIP}")),
        "{out}"
    );
    let t = lab
        .wait_next_hops(ECMP_VIP, &hops(&[1, 2]), Duration::from_secs(10))
        .unwrap();
    eprintln!("announce: the router took lb1 back after {t:?}");

    // The spare service's backend comes up: its VIP is announced by both balancers.
    let _spare = lab.spawn_echo(1, &[PORT2]).unwrap();
    let t = lab
        .wait_next_hops(ECMP_VIP2, &hops(&[1, 2]), Duration::from_secs(15))
        .unwrap();
    eprintln!("spare: announced {t:?} after its backend came up");
    let r = lab
        .client_conns(SocketAddr::new(ECMP_VIP2.into(), PORT2), 20, 500)
        .unwrap();
    assert_eq!((r.ok, r.failed), (20, 0), "{:?}", r.errors);

    // A clean stop withdraws everything before the process exits.
    assert!(lb1.stop().unwrap(), "clean exit");
    assert!(
        lb1.stderr()
            .contains("bgp: every VIP withdrawn before stopping"),
        "{}",
        lb1.stderr()
    );
    // Its BIRD still runs: only the balancer's withdraw takes its next hop away.
    lab.wait_next_hops(ECMP_VIP, &hops(&[2]), Duration::from_secs(2))
        .unwrap();
    lab.wait_next_hops(ECMP_VIP2, &hops(&[2]), Duration::from_secs(2))
        .unwrap();
}
