//! The demo's last part: an HA pair. A second lab with two balancers (`lb1`, `lb2`) and
//! keepalived, a NAT stream and an HL7 sender through the VIP, then `kill -9` of the active
//! balancer's controller and keepalived: the standby takes over with the mirrored flows, and
//! the stream and the sender carry on.

use std::time::Duration;

use anyhow::{Context, Result};
use balancer_tests::{
    Host, Lab,
    pair::{self, Node},
    stream_report, tool_bin, vip4,
};

use crate::sigint;

fn ha_line(lab: &Lab, n: &Node) -> String {
    let Some(s) = n.status(lab) else {
        return format!("  {}: no answer", n.name);
    };
    let h = &s["ha"];
    let m = &h["mirror"];
    format!(
        "  {}: role {}  peer {} ({})  config {}  flows sent {} applied {}  sync msgs accepted {} dropped {}",
        n.name,
        h["role"].as_str().unwrap_or("?"),
        h["peer_node"].as_str().unwrap_or("-"),
        h["peer_role"].as_str().unwrap_or("-"),
        match h["config_matches"].as_bool() {
            Some(true) => "same",
            Some(false) => "DIFFERS",
            None => "-",
        },
        m["flows_sent"],
        m["flows_applied"],
        m["messages_accepted"],
        m["dropped_auth"].as_u64().unwrap_or(0)
            + m["dropped_replay"].as_u64().unwrap_or(0)
            + m["dropped_malformed"].as_u64().unwrap_or(0)
            + m["dropped_foreign"].as_u64().unwrap_or(0),
    )
}

/// Builds the pair lab, shows a takeover, removes the lab.
pub fn run() -> Result<()> {
    println!(
        "balancers lb1 10.77.0.1 and lb2 10.77.0.3, each with keepalived (VRRPv3, unicast, 100 ms adverts); \
         VIP 10.77.0.100 and SNAT address {} move with the active one; flows mirrored over UDP 7946 (HMAC-SHA256)",
        pair::SNAT
    );
    let pair::PairLab {
        lab,
        servers: _servers,
        mut a,
        b,
    } = pair::pair_lab().context("building the pair lab")?;
    println!("lab {} is up", lab.prefix());
    println!("{}\n{}", ha_line(&lab, &a), ha_line(&lab, &b));
    sigint::check()?;
    let seconds = 8.0;
    let stream = lab.spawn_stream(vip4(7002), seconds, 20)?;
    let hl7 = {
        let mut cmd = lab.command(Host::Client, tool_bin("blb-mllp")?);
        cmd.args([
            "send",
            "--to",
            &vip4(pair::HL7_PORT).to_string(),
            "--seconds",
            &format!("{seconds}"),
            "--interval-ms",
            "20",
        ]);
        lab.spawn_command(cmd, "[c] blb-mllp send")?
    };
    std::thread::sleep(Duration::from_secs(2));
    pair::wait_mirrored(&lab, &b, 2, Duration::from_secs(5))?;
    println!(
        "  a NAT stream (a chunk every 20 ms) and an HL7 sender (a message every 20 ms) run through the VIP"
    );
    println!("  kill -9 of lb1's controller and keepalived ...");
    if let Some(p) = a.balancer.as_mut() {
        p.kill9();
    }
    a.kill_keepalived(&lab);
    let took = pair::wait_active(&lab, &b, &a, false, Duration::from_secs(5))?;
    println!(
        "  lb2 active and holding the VIP {} ms later",
        took.as_millis()
    );
    // As systemd would: both come back, lb1 as standby (no preemption).
    a.start_balancer(&lab)?;
    a.start_keepalived(&lab)?;
    pair::wait_role(&lab, &a, "standby", Duration::from_secs(10))?;
    println!("  lb1 restarted: standby (no preemption)");
    let s = stream_report(stream, Duration::from_secs(60))?;
    let done = hl7.wait_output(Duration::from_secs(60))?;
    let h: serde_json::Value = serde_json::from_str(done.stdout.lines().last().unwrap_or_default())
        .context("the HL7 sender's report")?;
    println!(
        "  NAT stream: {} ({} chunks, slowest round trip {} ms)",
        if s.ok {
            "byte-exact, no reset"
        } else {
            "BROKEN"
        },
        s.chunks,
        s.max_stall_ms
    );
    println!(
        "  HL7 sender: sent {}, acked {}, resets {}, listeners {}, longest ACK gap {} ms",
        h["sent"], h["acked"], h["resets"], h["sequence"], h["max_gap_ms"]
    );
    println!("{}\n{}", ha_line(&lab, &b), ha_line(&lab, &a));
    let prefix = lab.prefix().to_string();
    drop(lab);
    println!("lab {prefix} removed");
    Ok(())
}
