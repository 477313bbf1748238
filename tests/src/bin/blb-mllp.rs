//! An HL7 v2 / MLLP peer for labs and the demo.
//!
//! `blb-mllp listen --name hl7a --addr 0.0.0.0:6661 [--code AA]`: an HL7 Listener that ACKs
//! every message (MSA-1 = code, MSH-3 = its name, so a sender can tell who answered).
//! `blb-mllp send --to 10.77.0.100:6661 --seconds 5 --interval-ms 50 [--patient NAME] [--id S1-]`:
//! a sender streaming ADT messages (control IDs `<id><sequence>`) on one connection,
//! reconnecting after a reset or timeout, printing a JSON report. Logs carry sizes, addresses
//! and control IDs only, never message content.
//! Misbehaviour for the bad-input labs: `listen --garbage-for BADG --silent-for BADS` answers
//! a message whose control ID starts with BADG with unframed bytes (its own content echoed),
//! and never answers one starting with BADS; `blb-mllp bad --to ADDR --case no-start|oversized|
//! mid-frame --bytes N` sends one bad frame and reports whether the peer closed the connection.
//! `blb-mllp bench --to ADDR --connections C --seconds S`: C connections each send small
//! messages back to back (the next once the ACK is in); prints messages/s and the ACK round
//! trip percentiles as JSON.

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
        /// Answer messages whose control ID starts with this with garbage (unframed bytes).
        #[arg(long)]
        garbage_for: Option<String>,
        /// Never answer messages whose control ID starts with this.
        #[arg(long)]
        silent_for: Option<String>,
        /// No line per message (benches).
        #[arg(long)]
        quiet: bool,
        /// Wait this long before each ACK (so that a message is in flight when it dies).
        #[arg(long, default_value_t = 0)]
        delay_ms: u64,
    },
    /// Send back to back on C connections; report messages/s and round-trip percentiles.
    Bench {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 1)]
        connections: usize,
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
    },
    /// Send one bad frame and wait for the peer to close the connection.
    Bad {
        #[arg(long)]
        to: SocketAddr,
        /// no-start | oversized | mid-frame.
        #[arg(long)]
        case: String,
        /// Message size for `oversized`.
        #[arg(long, default_value_t = 8192)]
        bytes: usize,
        /// Patient name written into PID-5 (tests look for it in logs).
        #[arg(long, default_value = "DOE^JANE")]
        patient: String,
        /// Seconds to wait for the close.
        #[arg(long, default_value_t = 30.0)]
        wait: f64,
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
        /// Control ID prefix (MSH-10 is the prefix and an 8-digit sequence number).
        #[arg(long, default_value = "MSG")]
        id: String,
    },
}

const SB: u8 = 0x0b;
const EB: u8 = 0x1c;
const CR: u8 = 0x0d;

fn read_frame(s: &mut impl Read, max: usize) -> std::io::Result<Option<Vec<u8>>> {
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

/// How a listener answers messages of certain control IDs.
#[derive(Clone, Default)]
struct Misbehave {
    garbage_for: Option<String>,
    silent_for: Option<String>,
    quiet: bool,
    delay: Duration,
}

fn listen(name: &str, addr: SocketAddr, code: &str, bad: Misbehave) -> Result<()> {
    let l = TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
    eprintln!("blb-mllp ready name={name} addr={addr}");
    for conn in l.incoming() {
        let Ok(s) = conn else { continue };
        let name = name.to_string();
        let code = code.to_string();
        let bad = bad.clone();
        std::thread::spawn(move || {
            let peer = s.peer_addr().map(|p| p.to_string()).unwrap_or_default();
            let _ = s.set_nodelay(true);
            let mut n = 0u64;
            // Buffered reads (a sender sends one message at a time, so nothing is lost when
            // the connection ends); writes go to the socket itself.
            let Ok(mut s_write) = s.try_clone() else {
                return;
            };
            let mut rd = std::io::BufReader::new(s);
            let s = &mut s_write;
            while let Ok(Some(msg)) = read_frame(&mut rd, 1 << 20) {
                n += 1;
                let control = field(&msg, "MSH", 10).unwrap_or_default();
                // Logged on receipt, before any answer: a listener killed before its ACK still
                // shows what it received.
                if !bad.quiet {
                    eprintln!(
                        "recv peer={peer} n={n} bytes={} control={control}",
                        msg.len()
                    );
                }
                let is = |p: &Option<String>| p.as_ref().is_some_and(|p| control.starts_with(p));
                if is(&bad.silent_for) {
                    eprintln!("silent peer={peer} n={n}");
                    continue;
                }
                if is(&bad.garbage_for) {
                    // The message itself, unframed: the relay must log none of it.
                    let _ = s.write_all(&msg);
                    eprintln!("garbage peer={peer} n={n}");
                    continue;
                }
                if !bad.delay.is_zero() {
                    std::thread::sleep(bad.delay);
                }
                let ack = format!(
                    "MSH|^~\\&|{name}|LISTENER|||20260101000000||ACK|{control}A|P|2.5\rMSA|{code}|{control}\r"
                );
                if s.write_all(&frame(ack.as_bytes())).is_err() {
                    break;
                }
                if !bad.quiet {
                    eprintln!("ack peer={peer} n={n}");
                }
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
    /// ACKs whose MSA-2 is not the control ID of the message just sent.
    ack_mismatches: u64,
    errors: Vec<String>,
}

fn send(
    to: SocketAddr,
    seconds: f64,
    interval: Duration,
    patient: &str,
    ack_timeout: f64,
    id: &str,
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
            "MSH|^~\\&|BLB|SENDER|HL7|LISTENER|20260101000000||ADT^A01|{id}{seq:08}|P|2.5\rEVN|A01|20260101000000\rPID|1||{seq:06}^^^HOSP^MR||{patient}||19700101|F\r"
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
                if field(&ack, "MSA", 2).as_deref() != Some(&format!("{id}{seq:08}")) {
                    r.ack_mismatches += 1;
                }
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

#[derive(serde::Serialize)]
struct BenchReport {
    messages: u64,
    errors: u64,
    per_sec: f64,
    p50_us: u64,
    p99_us: u64,
}

/// One small ADT message (~150 bytes), control ID `B<conn>-<seq>`.
fn bench(to: SocketAddr, connections: usize, length: Duration) -> Result<BenchReport> {
    let start = Instant::now();
    let workers: Vec<_> = (0..connections)
        .map(|c| {
            std::thread::spawn(move || -> Result<(Vec<u32>, u64)> {
                let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(2))?;
                s.set_nodelay(true)?;
                s.set_read_timeout(Some(Duration::from_secs(5)))?;
                let mut rd = std::io::BufReader::new(s.try_clone()?);
                let mut rtts = Vec::new();
                let mut errors = 0;
                let mut seq = 0u64;
                while start.elapsed() < length {
                    seq += 1;
                    let msg = frame(format!(
                        "MSH|^~\\&|BLB|BENCH|HL7|LISTENER|20260101000000||ADT^A01|B{c}-{seq}|P|2.5\rPID|1||{seq}^^^HOSP^MR||BENCH^PATIENT||19700101|F\r"
                    ).as_bytes());
                    let t = Instant::now();
                    match s.write_all(&msg).and_then(|_| read_frame(&mut rd, 1 << 16)) {
                        Ok(Some(_)) => rtts.push(t.elapsed().as_micros() as u32),
                        _ => {
                            errors += 1;
                            break;
                        }
                    }
                }
                Ok((rtts, errors))
            })
        })
        .collect();
    let mut all = Vec::new();
    let mut errors = 0;
    for w in workers {
        let (r, e) = w.join().map_err(|_| anyhow::anyhow!("worker panicked"))??;
        all.extend(r);
        errors += e;
    }
    let took = start.elapsed().as_secs_f64();
    all.sort_unstable();
    let pct = |p: f64| -> u64 {
        if all.is_empty() {
            0
        } else {
            u64::from(all[((all.len() as f64 * p) as usize).min(all.len() - 1)])
        }
    };
    Ok(BenchReport {
        messages: all.len() as u64,
        errors,
        per_sec: all.len() as f64 / took,
        p50_us: pct(0.50),
        p99_us: pct(0.99),
    })
}

#[derive(serde::Serialize)]
struct BadReport {
    case: String,
    /// The peer closed (or reset) the connection.
    closed: bool,
    /// It answered something before closing.
    answered: bool,
}

fn bad(to: SocketAddr, case: &str, bytes: usize, patient: &str, wait: f64) -> Result<BadReport> {
    let body = format!(
        "MSH|^~\\&|BLB|SENDER|HL7|LISTENER|20260101000000||ADT^A01|BAD-{case}|P|2.5\rPID|1||1^^^HOSP^MR||{patient}||19700101|F\r"
    );
    let wire: Vec<u8> = match case {
        "no-start" => {
            let mut w = body.into_bytes();
            w.extend([EB, CR]);
            w
        }
        "oversized" => {
            let mut m = body.into_bytes();
            while m.len() < bytes {
                m.extend(format!("NTE|1||{patient}\r").as_bytes());
            }
            frame(&m)
        }
        "mid-frame" => {
            let mut w = vec![SB];
            w.extend(&body.as_bytes()[..body.len() / 2]);
            w
        }
        other => bail!("unknown case {other}"),
    };
    let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs_f64(wait)))?;
    // The relay may close while a large frame is still being written: that is a close too.
    let wrote = s.write_all(&wire);
    let mut buf = [0u8; 256];
    let mut answered = false;
    let closed = loop {
        match s.read(&mut buf) {
            Ok(0) => break true,
            Ok(_) => answered = true,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                break false;
            }
            Err(_) => break true,
        }
    };
    Ok(BadReport {
        case: case.to_string(),
        closed: closed || wrote.is_err(),
        answered,
    })
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Listen {
            name,
            addr,
            code,
            garbage_for,
            silent_for,
            quiet,
            delay_ms,
        } => listen(
            &name,
            addr,
            &code,
            Misbehave {
                garbage_for,
                silent_for,
                quiet,
                delay: Duration::from_millis(delay_ms.min(60_000)),
            },
        ),
        Cmd::Bench {
            to,
            connections,
            seconds,
        } => {
            if !(1..=256).contains(&connections) || !(0.1..=60.0).contains(&seconds) {
                bail!("--connections 1..=256, --seconds 0.1..=60");
            }
            let r = bench(to, connections, Duration::from_secs_f64(seconds))?;
            println!("{}", serde_json::to_string(&r)?);
            Ok(())
        }
        Cmd::Bad {
            to,
            case,
            bytes,
            patient,
            wait,
        } => {
            let r = bad(to, &case, bytes, &patient, wait)?;
            println!("{}", serde_json::to_string(&r)?);
            Ok(())
        }
        Cmd::Send {
            to,
            seconds,
            interval_ms,
            patient,
            ack_timeout,
            id,
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
                &id,
            )?;
            println!("{}", serde_json::to_string(&r)?);
            Ok(())
        }
    }
}
