//! An HL7 v2 / MLLP peer for labs and the demo.
//!
//! `blb-mllp listen --name hl7a --addr 0.0.0.0:6661 [--code AA]`: an HL7 Listener that ACKs
//! every message (MSA-1 = code, MSH-3 = its name, so a sender can tell who answered).
//! `blb-mllp send --to 10.77.0.100:6661 --seconds 5 --interval-ms 50 [--patient NAME]`: a sender
//! streaming ADT messages on one connection, reconnecting after a reset or timeout, printing a
//! JSON report. Logs carry sizes and addresses only, never message content.

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Listen and ACK.
    Listen {
        #[arg(long)]
        name: String,
        #[arg(long)]
        addr: SocketAddr,
        /// MSA-1 to answer with (AA, AE, AR, CA…).
        #[arg(long, default_value = "AA")]
        code: String,
    },
    /// Stream messages through one connection, reconnecting on errors.
    Send {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        #[arg(long, default_value_t = 50)]
        interval_ms: u64,
        /// Patient name written into PID-5 (tests look for it in logs).
        #[arg(long, default_value = "DOE^JANE")]
        patient: String,
        /// Seconds to wait for an ACK.
        #[arg(long, default_value_t = 2.0)]
        ack_timeout: f64,
    },
}

const SB: u8 = 0x0b;
const EB: u8 = 0x1c;
const CR: u8 = 0x0d;

fn read_frame(s: &mut TcpStream, max: usize) -> std::io::Result<Option<Vec<u8>>> {
    let mut byte = [0u8; 1];
    // Skip to the start byte.
    loop {
        if s.read(&mut byte)? == 0 {
            return Ok(None);
        }
        if byte[0] == SB {
            break;
        }
    }
    let mut msg = Vec::new();
    loop {
        if s.read(&mut byte)? == 0 {
            return Ok(None);
        }
        if byte[0] == EB {
            if s.read(&mut byte)? == 0 {
                return Ok(None);
            }
            return Ok(Some(msg));
        }
        msg.push(byte[0]);
        if msg.len() > max {
            return Err(std::io::Error::other("frame too large"));
        }
    }
}

fn frame(msg: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(msg.len() + 3);
    f.push(SB);
    f.extend_from_slice(msg);
    f.push(EB);
    f.push(CR);
    f
}

fn field(msg: &[u8], segment: &str, n: usize) -> Option<String> {
    let text = String::from_utf8_lossy(msg);
    let seg = text.split('\r').find(|s| s.starts_with(segment))?;
    // MSH-1 is the separator itself, so MSH fields are shifted by one.
    let idx = if segment == "MSH" { n - 1 } else { n };
    seg.split('|').nth(idx).map(str::to_string)
}

fn listen(name: &str, addr: SocketAddr, code: &str) -> Result<()> {
    let l = TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
    eprintln!("blb-mllp ready name={name} addr={addr}");
    for conn in l.incoming() {
        let Ok(mut s) = conn else { continue };
        let name = name.to_string();
        let code = code.to_string();
        std::thread::spawn(move || {
            let peer = s.peer_addr().map(|p| p.to_string()).unwrap_or_default();
            let mut n = 0u64;
            while let Ok(Some(msg)) = read_frame(&mut s, 1 << 20) {
                n += 1;
                let control = field(&msg, "MSH", 10).unwrap_or_default();
                let ack = format!(
                    "MSH|^~\\&|{name}|LISTENER|||20260101000000||ACK|{control}A|P|2.5\rMSA|{code}|{control}\r"
                );
                if s.write_all(&frame(ack.as_bytes())).is_err() {
                    break;
                }
                eprintln!("ack peer={peer} n={n} bytes={}", msg.len());
            }
            eprintln!("closed peer={peer} messages={n}");
        });
    }
    Ok(())
}

#[derive(serde::Serialize, Default)]
struct SendReport {
    sent: u64,
    acked: u64,
    by_listener: BTreeMap<String, u64>,
    /// Listener names in ACK order, run-length encoded: [["hl7a", 10], ["hl7b", 5]].
    sequence: Vec<(String, u64)>,
    resets: u64,
    timeouts: u64,
    refused: u64,
    connects: u64,
    /// Longest time between two ACKs, in ms.
    max_gap_ms: u64,
    errors: Vec<String>,
}

fn send(
    to: SocketAddr,
    seconds: f64,
    interval: Duration,
    patient: &str,
    ack_timeout: f64,
) -> Result<SendReport> {
    let mut r = SendReport::default();
    let end = Instant::now() + Duration::from_secs_f64(seconds);
    let mut conn: Option<TcpStream> = None;
    let mut last_ack = Instant::now();
    let mut seq = 0u64;
    while Instant::now() < end {
        if conn.is_none() {
            match TcpStream::connect_timeout(&to, Duration::from_secs(1)) {
                Ok(s) => {
                    s.set_read_timeout(Some(Duration::from_secs_f64(ack_timeout)))?;
                    r.connects += 1;
                    conn = Some(s);
                }
                Err(e) => {
                    if e.kind() == std::io::ErrorKind::ConnectionRefused {
                        r.refused += 1;
                    } else {
                        r.errors.push(format!("connect: {:?}", e.kind()));
                    }
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                }
            }
        }
        let Some(s) = conn.as_mut() else { continue };
        seq += 1;
        let msg = format!(
            "MSH|^~\\&|BLB|SENDER|HL7|LISTENER|20260101000000||ADT^A01|MSG{seq:08}|P|2.5\rEVN|A01|20260101000000\rPID|1||{seq:06}^^^HOSP^MR||{patient}||19700101|F\r"
        );
        let outcome = s
            .write_all(&frame(msg.as_bytes()))
            .and_then(|_| read_frame(s, 1 << 20));
        r.sent += 1;
        match outcome {
            Ok(Some(ack)) => {
                let code = field(&ack, "MSA", 1).unwrap_or_default();
                if code != "AA" && code != "CA" {
                    r.errors.push(format!("nack {code}"));
                }
                r.acked += 1;
                let who = field(&ack, "MSH", 3).unwrap_or_default();
                *r.by_listener.entry(who.clone()).or_default() += 1;
                match r.sequence.last_mut() {
                    Some((w, n)) if *w == who => *n += 1,
                    _ => r.sequence.push((who, 1)),
                }
                r.max_gap_ms = r.max_gap_ms.max(last_ack.elapsed().as_millis() as u64);
                last_ack = Instant::now();
            }
            Ok(None) => {
                r.resets += 1;
                conn = None;
            }
            Err(e) => {
                match e.kind() {
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                        r.timeouts += 1
                    }
                    std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe => {
                        r.resets += 1
                    }
                    k => r.errors.push(format!("{k:?}")),
                }
                conn = None;
            }
        }
        std::thread::sleep(interval);
    }
    Ok(r)
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Listen { name, addr, code } => listen(&name, addr, &code),
        Cmd::Send {
            to,
            seconds,
            interval_ms,
            patient,
            ack_timeout,
        } => {
            if !(0.0..=600.0).contains(&seconds) {
                bail!("--seconds must be within 0..=600");
            }
            let r = send(
                to,
                seconds,
                Duration::from_millis(interval_ms),
                &patient,
                ack_timeout,
            )?;
            println!("{}", serde_json::to_string(&r)?);
            Ok(())
        }
    }
}
