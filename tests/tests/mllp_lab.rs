//! MLLP message mode lab: three senders stream through the relay on the VIP while the active
//! HL7 listener dies three times in a row across two listeners (process kill in one test,
//! link down in the other). Every message is ACKed exactly once on the sender's one
//! connection, reaches a listener at least once, and is seen twice only where the balancer
//! logged a replay. Also a real client: Debian's `mllp_send`, strict and `--loose`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    thread::sleep,
    time::{Duration, Instant},
};

use balancer_tests::{Host, Lab, LabChild, tool_bin};
use serde_json::Value;

const PORT: u16 = 6661;
const VIP: &str = "10.77.0.100:6661";
const SENDERS: usize = 3;

fn socket(lab: &Lab) -> PathBuf {
    lab.dir().join("control.sock")
}

fn config(lab: &Lab) -> String {
    format!(
        r#"[dataplane]
interface = "eth0"

[controller]
socket = "{}"

[[service]]
name = "hl7"
vip = "{VIP}"
scheduler = "failover"
mode = "mllp"
health = {{ kind = "mllp", interval = "250ms", timeout = "200ms", rise = 2, fall = 2 }}
mllp = {{ ack_timeout = "1s", hold_timeout = "20s" }}
backends = [
  {{ address = "10.77.0.11:{PORT}", priority = 1 }},
  {{ address = "10.77.0.12:{PORT}", priority = 2 }},
]
"#,
        socket(lab).display()
    )
}

fn status(lab: &Lab) -> Value {
    let s = socket(lab).to_string_lossy().to_string();
    serde_json::from_str(
        &lab.balancer_cli(&["status", "--json", "--socket", &s])
            .unwrap(),
    )
    .unwrap()
}

fn active(lab: &Lab) -> String {
    status(lab)["services"][0]["active"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

fn health(lab: &Lab, addr: &str) -> String {
    status(lab)["services"][0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["address"] == addr)
        .map(|b| b["health"].as_str().unwrap_or("").to_string())
        .unwrap_or_default()
}

fn wait_until(limit: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while t.elapsed() < limit {
        if f() {
            return;
        }
        sleep(Duration::from_millis(20));
    }
    panic!("{what}: not within {limit:?}");
}

fn spawn(lab: &Lab, host: Host, args: &[&str]) -> LabChild {
    let mut cmd = lab.command(host, tool_bin("blb-mllp").unwrap());
    cmd.args(args);
    lab.spawn_command(cmd, &format!("[{host}] blb-mllp {}", args.join(" ")))
        .unwrap()
}

fn listen(lab: &Lab, i: usize) -> LabChild {
    let name = format!("hl7{}", ["", "a", "b"][i]);
    let mut c = spawn(
        lab,
        Host::Backend(i),
        &[
            "listen",
            "--name",
            &name,
            "--addr",
            &format!("0.0.0.0:{PORT}"),
            // Most of the time a message is in flight at a listener: a kill catches one.
            "--delay-ms",
            "10",
        ],
    );
    c.wait_for_output("blb-mllp ready", Duration::from_secs(10))
        .unwrap();
    c
}

/// How the active listener dies.
#[derive(Clone, Copy, Debug)]
enum Death {
    Kill,
    LinkDown,
}

fn run(death: Death) {
    let lab = Lab::new(2).unwrap();
    // Every listener process ever started, to read which control IDs each one received.
    let mut listeners: BTreeMap<usize, LabChild> = BTreeMap::new();
    let mut dead: Vec<LabChild> = Vec::new();
    for i in [1, 2] {
        listeners.insert(i, listen(&lab, i));
    }
    let mut bal = lab.start_balancer(&config(&lab)).unwrap();
    wait_until(Duration::from_secs(10), "hl7a active", || {
        active(&lab) == "10.77.0.11:6661"
    });
    let senders: Vec<LabChild> = (1..=SENDERS)
        .map(|i| {
            spawn(
                &lab,
                Host::Client,
                &[
                    "send",
                    "--to",
                    VIP,
                    "--seconds",
                    "16",
                    "--interval-ms",
                    "20",
                    "--ack-timeout",
                    "25",
                    "--id",
                    &format!("S{i}-"),
                    "--patient",
                    "ZZLABPATIENT^MARKER",
                ],
            )
        })
        .collect();
    sleep(Duration::from_secs(1));
    let addr = |i: usize| format!("10.77.0.1{i}:{PORT}");
    // Three failures in a row: a, then b, then a again; each comes back as standby.
    let mut victim = 1;
    for round in 0..3 {
        assert_eq!(active(&lab), addr(victim), "round {round}");
        match death {
            Death::Kill => dead.push(
                listeners
                    .remove(&victim)
                    .map(|mut c| {
                        c.kill();
                        c
                    })
                    .unwrap(),
            ),
            Death::LinkDown => {
                lab.exec(
                    Host::Backend(victim),
                    &["ip", "link", "set", "eth0", "down"],
                )
                .unwrap();
            }
        }
        let other = 3 - victim;
        wait_until(Duration::from_secs(10), "failover", || {
            active(&lab) == addr(other)
        });
        sleep(Duration::from_millis(500));
        match death {
            Death::Kill => {
                listeners.insert(victim, listen(&lab, victim));
            }
            Death::LinkDown => {
                lab.exec(Host::Backend(victim), &["ip", "link", "set", "eth0", "up"])
                    .unwrap();
            }
        }
        wait_until(Duration::from_secs(10), "the failed listener back", || {
            health(&lab, &addr(victim)) == "up"
        });
        assert_eq!(active(&lab), addr(other), "no failback: it stays standby");
        sleep(Duration::from_millis(800));
        victim = other;
    }
    let reports: Vec<Value> = senders
        .into_iter()
        .map(|s| {
            let done = s.wait_output(Duration::from_secs(60)).unwrap();
            serde_json::from_str(&done.stdout).unwrap()
        })
        .collect();
    let st = status(&lab);
    let m = &st["mllp"]["services"][0];
    let replayed = m["replayed"].as_u64().unwrap();
    bal.stop().unwrap();
    let logs = bal.logs();

    // Control IDs each listener process received, over every incarnation.
    let mut received: BTreeMap<String, u64> = BTreeMap::new();
    for c in listeners.values().chain(dead.iter()) {
        for line in c.stderr().lines() {
            if let Some(id) = line.split("control=").nth(1) {
                *received.entry(id.trim().to_string()).or_default() += 1;
            }
        }
    }
    let replayed_ids: BTreeSet<String> = logs
        .lines()
        .filter(|l| l.contains("replaying a message"))
        .filter_map(|l| l.split("control_id=").nth(1))
        .filter_map(|s| s.split_whitespace().next())
        .map(|s| s.trim_matches('"').to_string())
        .collect();
    let mut longest_gap = 0;
    for (i, r) in reports.iter().enumerate() {
        let sent = r["sent"].as_u64().unwrap();
        assert!(sent > 100, "sender {i}: {r}");
        assert_eq!(r["acked"], sent, "sender {i}: every message ACKed: {r}");
        assert_eq!(
            r["ack_mismatches"], 0,
            "sender {i}: each ACK for its own message: {r}"
        );
        assert_eq!(r["resets"], 0, "sender {i}: no reset: {r}");
        assert_eq!(r["timeouts"], 0, "sender {i}: {r}");
        assert_eq!(
            r["connects"], 1,
            "sender {i}: one connection throughout: {r}"
        );
        assert!(
            r["errors"].as_array().unwrap().is_empty(),
            "sender {i}: {r}"
        );
        for seq in 1..=sent {
            let id = format!("S{}-{seq:08}", i + 1);
            let n = received.get(&id).copied().unwrap_or(0);
            assert!(n >= 1, "{id} never reached a listener");
            if n > 1 {
                assert!(
                    replayed_ids.contains(&id),
                    "{id} duplicated without a replay logged"
                );
            }
        }
        longest_gap = longest_gap.max(r["max_gap_ms"].as_u64().unwrap());
    }
    let duplicates = received.values().filter(|n| **n > 1).count() as u64;
    assert!(
        duplicates <= replayed,
        "{duplicates} duplicates, {replayed} replays"
    );
    assert!(
        m["relayed"].as_u64().unwrap()
            >= reports
                .iter()
                .map(|r| r["sent"].as_u64().unwrap())
                .sum::<u64>()
    );
    assert!(
        !logs.contains("ZZLABPATIENT"),
        "patient data in the balancer's log"
    );
    println!(
        "mllp lab ({death:?}): sent {} messages, replayed {replayed}, duplicates at the listeners {duplicates}, longest ACK gap {longest_gap} ms",
        reports
            .iter()
            .map(|r| r["sent"].as_u64().unwrap())
            .sum::<u64>()
    );
}

#[test]
fn mllp_mode_survives_three_listener_kills_without_loss_or_reset() {
    run(Death::Kill);
}

#[test]
fn mllp_mode_survives_three_listener_link_downs_without_loss_or_reset() {
    run(Death::LinkDown);
}

/// Debian's `mllp_send` (python3-hl7), one message at a time, strict and with `--loose`.
#[test]
fn mllp_send_gets_its_ack_through_the_relay() {
    let lab = Lab::new(2).unwrap();
    let _a = listen(&lab, 1);
    let _b = listen(&lab, 2);
    let bal = lab.start_balancer(&config(&lab)).unwrap();
    wait_until(Duration::from_secs(10), "hl7a active", || {
        active(&lab) == "10.77.0.11:6661"
    });
    let mut strict = String::new();
    for (i, loose) in [false, true].into_iter().enumerate() {
        // Strict mode reads MLLP frames from the file; loose mode a text file with newlines.
        let sep = if loose { "\n" } else { "\r" };
        let body = format!(
            "MSH|^~\\&|LAB|CLINIC|HL7|LISTENER|20260101000000||ADT^A01|MS{i}|P|2.5{sep}PID|1||12345^^^HOSP^MR||DOE^JANE||19700101|F{sep}"
        );
        let msg = if loose {
            body
        } else {
            format!("\u{b}{body}\u{1c}\r")
        };
        let file = lab.write_file("adt.hl7", &msg).unwrap();
        let f = file.to_string_lossy().to_string();
        if !loose {
            strict = f.clone();
        }
        let mut args = vec!["mllp_send", "--port", "6661", "--file", &f];
        if loose {
            args.push("--loose");
        }
        args.push("10.77.0.100");
        let out = lab.exec(Host::Client, &args).unwrap();
        assert!(out.contains("MSA|AA|"), "loose={loose}: {out:?}");
        assert!(out.contains("hl7a"), "loose={loose}: {out:?}");
    }
    let st = status(&lab);
    assert_eq!(st["mllp"]["services"][0]["relayed"], 2, "{st}");
    // A reload changes a message-mode service's limits and adds one more service; another
    // removes it again. The first service serves throughout.
    let sock = socket(&lab).to_string_lossy().to_string();
    let send = |port: &str| {
        lab.exec(
            Host::Client,
            &[
                "mllp_send",
                "--port",
                port,
                "--file",
                &strict,
                "10.77.0.100",
            ],
        )
    };
    let second = format!(
        r#"
[[service]]
name = "hl7-second"
vip = "10.77.0.100:6670"
scheduler = "failover"
mode = "mllp"
health = {{ kind = "mllp", interval = "250ms", timeout = "200ms", rise = 2, fall = 2 }}
backends = [ {{ address = "10.77.0.12:{PORT}" }} ]
"#
    );
    let changed = config(&lab).replace("ack_timeout = \"1s\"", "ack_timeout = \"3s\"");
    std::fs::write(bal.config_path(), format!("{changed}{second}")).unwrap();
    lab.balancer_cli(&["reload", "--socket", &sock]).unwrap();
    wait_until(
        Duration::from_secs(10),
        "hl7-second's listener active",
        || status(&lab)["services"][1]["active"] == "10.77.0.12:6661",
    );
    let out = send("6670").unwrap();
    assert!(
        out.contains("MSA|AA|") && out.contains("hl7b"),
        "added service: {out:?}"
    );
    let out = send("6661").unwrap();
    assert!(
        out.contains("MSA|AA|"),
        "kept service after the reload: {out:?}"
    );
    let st = status(&lab);
    assert_eq!(
        st["mllp"]["services"][0]["relayed"], 3,
        "kept counters: {st}"
    );
    assert_eq!(st["mllp"]["services"][1]["relayed"], 1, "{st}");
    std::fs::write(bal.config_path(), changed).unwrap();
    lab.balancer_cli(&["reload", "--socket", &sock]).unwrap();
    assert!(
        send("6670").is_err(),
        "the removed service's port still answers"
    );
    let out = send("6661").unwrap();
    assert!(
        out.contains("MSA|AA|"),
        "after removing the other service: {out:?}"
    );
    assert_eq!(
        status(&lab)["mllp"]["services"].as_array().unwrap().len(),
        1
    );
}

/// Bad input from senders and listeners: each case gets one clear log line without a payload
/// byte, and a sender streaming alongside sees every message ACKed on its one connection.
#[test]
fn bad_senders_and_bad_listeners_are_logged_without_payload_and_others_unaffected() {
    let lab = Lab::new(2).unwrap();
    // Both listeners answer health checks and normal messages; hl7a answers BADG-… with
    // garbage, hl7b never answers BADS-….
    let bad_listener = |i: usize, flag: &str, prefix: &str| {
        let mut c = spawn(
            &lab,
            Host::Backend(i),
            &[
                "listen",
                "--name",
                ["", "hl7a", "hl7b"][i],
                "--addr",
                &format!("0.0.0.0:{PORT}"),
                flag,
                prefix,
            ],
        );
        c.wait_for_output("blb-mllp ready", Duration::from_secs(10))
            .unwrap();
        c
    };
    let _a = bad_listener(1, "--garbage-for", "BADG");
    let _b = bad_listener(2, "--silent-for", "BADS");
    let cfg = config(&lab).replace(
        "mllp = { ack_timeout = \"1s\", hold_timeout = \"20s\" }",
        "mllp = { ack_timeout = \"1s\", hold_timeout = \"20s\", frame_timeout = \"1s\", max_message_bytes = 4096 }",
    );
    let mut bal = lab.start_balancer(&cfg).unwrap();
    wait_until(Duration::from_secs(10), "hl7a active", || {
        active(&lab) == "10.77.0.11:6661"
    });
    let steady = spawn(
        &lab,
        Host::Client,
        &[
            "send",
            "--to",
            VIP,
            "--seconds",
            "12",
            "--interval-ms",
            "20",
            "--ack-timeout",
            "25",
            "--id",
            "S1-",
            "--patient",
            "ZZLABPATIENT^MARKER",
        ],
    );
    sleep(Duration::from_millis(500));
    // Senders: each bad frame closes that sender's connection.
    for (case, line) in [
        ("no-start", "no MLLP start block"),
        ("oversized", "MLLP message over 4096 bytes"),
        ("mid-frame", "sender stopped mid-frame"),
    ] {
        let out = lab
            .exec(
                Host::Client,
                &[
                    tool_bin("blb-mllp").unwrap().to_str().unwrap(),
                    "bad",
                    "--to",
                    VIP,
                    "--case",
                    case,
                    "--patient",
                    "ZZLABPATIENT^MARKER",
                ],
            )
            .unwrap();
        let r: Value = serde_json::from_str(out.trim()).unwrap();
        assert_eq!(r["closed"], true, "{case}: {r}");
        assert_eq!(r["answered"], false, "{case}: {r}");
        bal.wait_for_log(line, Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("{case}: {e}"));
    }
    // Listeners: garbage fails hl7a, the message is replayed to hl7b and ACKed once.
    let one = |id: &str| -> Value {
        let c = spawn(
            &lab,
            Host::Client,
            &[
                "send",
                "--to",
                VIP,
                "--seconds",
                "0.05",
                "--interval-ms",
                "100",
                "--ack-timeout",
                "25",
                "--id",
                id,
                "--patient",
                "ZZLABPATIENT^MARKER",
            ],
        );
        serde_json::from_str(&c.wait_output(Duration::from_secs(60)).unwrap().stdout).unwrap()
    };
    let g = one("BADG-");
    let relay_log = |bal: &balancer_tests::BalancerProc| {
        bal.logs()
            .lines()
            .filter(|l| l.contains("mllp") || l.contains("failover") || l.contains("health"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    if g["acked"] != 1 {
        println!("{}", relay_log(&bal));
    }
    assert_eq!(
        (g["sent"].as_u64(), g["acked"].as_u64()),
        (Some(1), Some(1)),
        "{g}"
    );
    assert_eq!(g["by_listener"]["hl7b"], 1, "{g}");
    bal.wait_for_log("answer is not an HL7 ACK", Duration::from_secs(10))
        .unwrap();
    assert_eq!(active(&lab), "10.77.0.12:6661");
    // hl7a comes back as standby; then hl7b never answers: failed after ack_timeout and
    // the message is replayed to hl7a.
    wait_until(Duration::from_secs(10), "hl7a back up", || {
        health(&lab, "10.77.0.11:6661") == "up"
    });
    let s = one("BADS-");
    assert_eq!(
        (s["sent"].as_u64(), s["acked"].as_u64()),
        (Some(1), Some(1)),
        "{s}"
    );
    assert_eq!(s["by_listener"]["hl7a"], 1, "{s}");
    bal.wait_for_log("no ACK within", Duration::from_secs(10))
        .unwrap();
    assert_eq!(active(&lab), "10.77.0.11:6661");

    let r: Value =
        serde_json::from_str(&steady.wait_output(Duration::from_secs(60)).unwrap().stdout).unwrap();
    let sent = r["sent"].as_u64().unwrap();
    assert!(sent > 100, "{r}");
    assert_eq!(r["acked"], sent, "the steady sender lost nothing: {r}");
    assert_eq!(r["resets"], 0, "{r}");
    assert_eq!(r["connects"], 1, "{r}");
    assert_eq!(r["ack_mismatches"], 0, "{r}");
    let st = status(&lab);
    let m = &st["mllp"]["services"][0];
    assert_eq!(m["frame_errors"], 3, "{m}");
    assert!(m["replayed"].as_u64().unwrap() >= 2, "{m}");
    let garbage: u64 = m["listeners"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["garbage"].as_u64().unwrap())
        .sum();
    assert_eq!(garbage, 1, "{m}");
    bal.stop().unwrap();
    let logs = bal.logs();
    for needle in ["ZZLABPATIENT", "NTE|", "PID|", "MSH|"] {
        assert!(!logs.contains(needle), "{needle} in the balancer's log");
    }
    // Each relay log line of a bad case names the case, not the content.
    for l in logs
        .lines()
        .filter(|l| l.contains("mllp relay:") && l.contains("WARN"))
    {
        println!("{l}");
    }
}
