//! SYN-flood lab (issue: flow state): spoofed SYNs from an unrouted prefix of the lab
//! (10.99.0.0/16, which no namespace owns or routes) at the HL7 VIP, while new MLLP
//! connections (Debian's `mllp_send`) and new web connections keep succeeding. The HL7
//! service is a failover service, so all its flows share one backend's SNAT port range.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{thread::sleep, time::Duration};

use balancer_tests::{ECHO_PORT, Host, Lab, LabChild, tool_bin, vip4};
use serde_json::Value;

const HL7_PORT: u16 = 6661;
/// SYNs per second and seconds: 96,000 SYNs, four times the 22,768 SNAT ports of the
/// default range that the active listener's flows share.
const FLOOD_RATE: &str = "8000";
const FLOOD_SECONDS: &str = "12";

fn spawn_tool(lab: &Lab, host: Host, tool: &str, args: &[&str]) -> LabChild {
    let mut cmd = lab.command(host, tool_bin(tool).unwrap());
    cmd.args(args);
    lab.spawn_command(cmd, &format!("[{host}] {tool} {}", args.join(" ")))
        .unwrap()
}

fn config(lab: &Lab) -> String {
    format!(
        r#"[dataplane]
interface = "eth0"

[controller]
socket = "{}"

[[service]]
name = "hl7-listener"
vip = "10.77.0.100:{HL7_PORT}"
scheduler = "failover"
health = {{ kind = "mllp", interval = "500ms", timeout = "400ms", rise = 2, fall = 3 }}
backends = [
  {{ address = "10.77.0.11:{HL7_PORT}", priority = 1 }},
  {{ address = "10.77.0.12:{HL7_PORT}", priority = 2 }},
]

[[service]]
name = "web"
vip = "10.77.0.100:{ECHO_PORT}"
backends = [ {{ address = "10.77.0.11:{ECHO_PORT}" }}, {{ address = "10.77.0.12:{ECHO_PORT}" }}, {{ address = "10.77.0.13:{ECHO_PORT}" }} ]
"#,
        lab.dir().join("control.sock").display()
    )
}

fn status(lab: &Lab) -> Value {
    let sock = lab.dir().join("control.sock");
    let out = lab
        .balancer_cli(&["status", "--json", "--socket", &sock.to_string_lossy()])
        .unwrap();
    serde_json::from_str(&out).unwrap()
}

fn active(lab: &Lab) -> String {
    status(lab)["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "hl7-listener")
        .and_then(|s| s["active"].as_str())
        .unwrap_or("")
        .to_string()
}

#[test]
fn a_spoofed_syn_flood_at_the_hl7_vip_leaves_new_mllp_and_web_connections_working() {
    let lab = Lab::new(3).unwrap();
    let _echo = lab.spawn_echo_all().unwrap();
    let listeners: Vec<LabChild> = [(1, "hl7a"), (2, "hl7b")]
        .into_iter()
        .map(|(i, name)| {
            let mut c = spawn_tool(
                &lab,
                Host::Backend(i),
                "blb-mllp",
                &[
                    "listen",
                    "--name",
                    name,
                    "--addr",
                    &format!("0.0.0.0:{HL7_PORT}"),
                ],
            );
            c.wait_for_output("blb-mllp ready", Duration::from_secs(10))
                .unwrap();
            c
        })
        .collect();
    let _b = lab.start_balancer(&config(&lab)).unwrap();
    for _ in 0..100 {
        if active(&lab) == "10.77.0.11:6661" {
            break;
        }
        sleep(Duration::from_millis(100));
    }
    assert_eq!(active(&lab), "10.77.0.11:6661");
    let msg = lab
        .write_file(
            "adt.hl7",
            "MSH|^~\\&|LAB|CLINIC|HL7|LISTENER|20260101000000||ADT^A01|FLOOD1|P|2.5\r\nPID|1||12345^^^HOSP^MR||ZZFLOOD^TEST||19700101|F\r\n",
        )
        .unwrap();
    let flood = spawn_tool(
        &lab,
        Host::Client,
        "blb-flood",
        &[
            "--to",
            &format!("10.77.0.100:{HL7_PORT}"),
            "--from",
            "10.99.0.0/16",
            "--rate",
            FLOOD_RATE,
            "--seconds",
            FLOOD_SECONDS,
        ],
    );
    // Past the point where the flood's half-open flows would hold every SNAT port.
    sleep(Duration::from_secs(4));
    let mut acked = 0;
    let mut failures = Vec::new();
    for _ in 0..20 {
        match lab.exec(
            Host::Client,
            &[
                "mllp_send",
                "--loose",
                "-p",
                &HL7_PORT.to_string(),
                "-f",
                &msg.display().to_string(),
                "10.77.0.100",
            ],
        ) {
            Ok(out) if out.contains("MSA|AA") => acked += 1,
            Ok(out) => failures.push(format!("no AA: {} bytes", out.len())),
            Err(e) => failures.push(e.to_string()),
        }
    }
    let web = lab.client_conns(vip4(ECHO_PORT), 200, 512, 4).unwrap();
    let report = flood.wait_output(Duration::from_secs(60)).unwrap();
    let report: Value = serde_json::from_str(report.stdout.trim()).unwrap();
    let reasons = lab.counters().unwrap()["reasons"].clone();
    println!("flood {report}; mllp {acked}/20 acked; web {web:?}; reasons {reasons}");
    assert!(
        report["sent"].as_u64().unwrap() > 22_768,
        "the flood outnumbered the SNAT ports: {report}"
    );
    // The flood recycles its own half-open ports (HALF_OPEN_REUSE_SECS), so a new client's
    // SYN finds a port at once. Holding them for 30 s instead, 73,238 of 95,997 flood SYNs
    // found no port here, and real clients got through only by LRU eviction and SYN retries.
    let exhausted = reasons["drop_snat_exhausted"].as_u64().unwrap();
    assert!(
        exhausted * 100 < report["sent"].as_u64().unwrap(),
        "SYNs dropped for want of a SNAT port: {exhausted} {report}"
    );
    assert_eq!(acked, 20, "{failures:?} {reasons}");
    assert_eq!(web.failed, 0, "{:?} {reasons}", web.errors);
    assert_eq!(
        active(&lab),
        "10.77.0.11:6661",
        "the flood did not fail the listener over"
    );
    drop(listeners);
}
