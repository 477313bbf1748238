//! `blb-client`: drives byte-exact echo traffic against `blb-echo` (directly or through a VIP)
//! and prints one JSON report on stdout. Bounded in count and time; it only talks to the
//! address it is given. It never logs payload bytes.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, UdpSocket};
use std::process::ExitCode;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use balancer_tests::report::{ConnsReport, RateReport, StreamReport, UdpReport};
use balancer_tests::wire::{ID_LEN, Payload, parse_id};
use clap::{Parser, Subcommand};

/// Upper bounds so a mistaken argument cannot turn into a flood.
const MAX_COUNT: usize = 1_000_000;
const MAX_SECONDS: f64 = 600.0;
const MAX_CONCURRENCY: usize = 256;
const MAX_ERRORS_KEPT: usize = 10;

/// Echo traffic generator for the balancer lab.
#[derive(Debug, Parser)]
#[command(name = "blb-client")]
struct Args {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Debug, Subcommand)]
enum Mode {
    /// N connections; each sends S random bytes and checks header + byte-exact echo.
    Conns {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 100)]
        count: usize,
        #[arg(long, default_value_t = 512)]
        size: usize,
        #[arg(long, default_value_t = 8)]
        concurrency: usize,
        /// Per-connection timeout in milliseconds.
        #[arg(long, default_value_t = 5000)]
        timeout_ms: u64,
    },
    /// One long-lived connection sending a chunk per interval and checking each echo.
    Stream {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        #[arg(long, default_value_t = 100)]
        interval_ms: u64,
        #[arg(long, default_value_t = 1024)]
        chunk: usize,
        /// How long one echo may take, in milliseconds.
        #[arg(long, default_value_t = 5000)]
        timeout_ms: u64,
    },
    /// N datagrams, one at a time, each answered by header + datagram.
    Udp {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 100)]
        count: usize,
        #[arg(long, default_value_t = 64)]
        size: usize,
        #[arg(long, default_value_t = 1000)]
        timeout_ms: u64,
    },
    /// Short connections for T seconds: connect, 1 byte, header + echo, close.
    Rate {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        #[arg(long, default_value_t = 8)]
        concurrency: usize,
        #[arg(long, default_value_t = 2000)]
        timeout_ms: u64,
    },
}

fn main() -> ExitCode {
    match run(Args::parse().mode) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("blb-client: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Runs a mode, prints its report; `Ok(false)` when anything failed.
fn run(mode: Mode) -> Result<bool> {
    match mode {
        Mode::Conns {
            to,
            count,
            size,
            concurrency,
            timeout_ms,
        } => {
            check_bounds(count, 1.0, concurrency)?;
            let r = conns(to, count, size, concurrency, ms(timeout_ms));
            print_json(&r)?;
            Ok(r.failed == 0)
        }
        Mode::Stream {
            to,
            seconds,
            interval_ms,
            chunk,
            timeout_ms,
        } => {
            check_bounds(1, seconds, 1)?;
            let r = stream(to, seconds, ms(interval_ms), chunk.max(1), ms(timeout_ms));
            print_json(&r)?;
            Ok(r.ok)
        }
        Mode::Udp {
            to,
            count,
            size,
            timeout_ms,
        } => {
            check_bounds(count, 1.0, 1)?;
            let r = udp(to, count, size, ms(timeout_ms))?;
            print_json(&r)?;
            Ok(r.failed == 0)
        }
        Mode::Rate {
            to,
            seconds,
            concurrency,
            timeout_ms,
        } => {
            check_bounds(1, seconds, concurrency)?;
            let r = rate(to, seconds, concurrency, ms(timeout_ms));
            print_json(&r)?;
            Ok(r.ok > 0)
        }
    }
}

fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

fn check_bounds(count: usize, seconds: f64, concurrency: usize) -> Result<()> {
    if count == 0 || count > MAX_COUNT {
        bail!("count must be 1..={MAX_COUNT}");
    }
    if !(seconds > 0.0 && seconds <= MAX_SECONDS) {
        bail!("seconds must be in (0, {MAX_SECONDS}]");
    }
    if concurrency == 0 || concurrency > MAX_CONCURRENCY {
        bail!("concurrency must be 1..={MAX_CONCURRENCY}");
    }
    Ok(())
}

fn print_json<T: serde::Serialize>(v: &T) -> Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer(&mut out, v)?;
    writeln!(out)?;
    out.flush()?;
    Ok(())
}

fn connect(to: SocketAddr, timeout: Duration) -> Result<TcpStream> {
    let s = TcpStream::connect_timeout(&to, timeout).with_context(|| format!("connect {to}"))?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// Reads exactly `buf.len()` bytes, naming what was expected on failure.
fn read_exact(s: &mut TcpStream, buf: &mut [u8], what: &str) -> Result<()> {
    s.read_exact(buf)
        .with_context(|| format!("reading {what} ({} bytes)", buf.len()))
}

/// One request/echo connection; returns the backend name.
fn one_conn(to: SocketAddr, payload: &[u8], timeout: Duration) -> Result<String> {
    let mut s = connect(to, timeout)?;
    let mut writer = s.try_clone()?;
    let mut got = vec![0u8; ID_LEN + payload.len()];
    // The writer runs beside the reader so large payloads cannot deadlock on full buffers.
    let read = thread::scope(|sc| {
        let w = sc.spawn(|| -> Result<()> {
            writer.write_all(payload).context("sending")?;
            writer.shutdown(Shutdown::Write).context("shutdown")?;
            Ok(())
        });
        let r = read_exact(&mut s, &mut got, "header and echo");
        let w = w
            .join()
            .unwrap_or_else(|_| Err(anyhow::anyhow!("writer panicked")));
        r.and(w)
    });
    read?;
    let backend = parse_id(&got[..ID_LEN]);
    if got[ID_LEN..] != *payload {
        bail!("echo from {backend} differs from what was sent");
    }
    let mut extra = [0u8; 1];
    match s.read(&mut extra) {
        Ok(0) => Ok(backend),
        Ok(_) => bail!("{backend} sent more bytes than were echoed"),
        Err(e) => Err(e).context(format!("waiting for {backend} to close")),
    }
}

#[derive(Default)]
struct Tally {
    by_backend: BTreeMap<String, u64>,
    errors: Vec<String>,
}

fn conns(
    to: SocketAddr,
    count: usize,
    size: usize,
    concurrency: usize,
    timeout: Duration,
) -> ConnsReport {
    let next = AtomicUsize::new(0);
    let ok = AtomicU64::new(0);
    let failed = AtomicU64::new(0);
    let tally = Mutex::new(Tally::default());
    thread::scope(|sc| {
        for _ in 0..concurrency.min(count) {
            sc.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= count {
                        break;
                    }
                    let payload = Payload::new(i as u64).bytes(size);
                    let res = one_conn(to, &payload, timeout);
                    let Ok(mut t) = tally.lock() else { break };
                    match res {
                        Ok(backend) => {
                            ok.fetch_add(1, Ordering::Relaxed);
                            *t.by_backend.entry(backend).or_default() += 1;
                        }
                        Err(e) => {
                            failed.fetch_add(1, Ordering::Relaxed);
                            if t.errors.len() < MAX_ERRORS_KEPT {
                                t.errors.push(format!("conn {i}: {e:#}"));
                            }
                        }
                    }
                }
            });
        }
    });
    let t = tally.into_inner().unwrap_or_default();
    ConnsReport {
        ok: ok.into_inner(),
        failed: failed.into_inner(),
        by_backend: t.by_backend,
        errors: t.errors,
    }
}

fn stream(
    to: SocketAddr,
    seconds: f64,
    interval: Duration,
    chunk: usize,
    timeout: Duration,
) -> StreamReport {
    let mut report = StreamReport::default();
    if let Err(e) = stream_inner(to, seconds, interval, chunk, timeout, &mut report) {
        report.ok = false;
        report.error = Some(format!("{e:#}"));
    }
    report
}

fn stream_inner(
    to: SocketAddr,
    seconds: f64,
    interval: Duration,
    chunk: usize,
    timeout: Duration,
    report: &mut StreamReport,
) -> Result<()> {
    let mut s = connect(to, timeout)?;
    let mut header = [0u8; ID_LEN];
    read_exact(&mut s, &mut header, "header")?;
    report.backend = parse_id(&header);
    // Tests wait for this line before they disturb the balancer.
    eprintln!("stream connected to {}", report.backend);
    let connected = Instant::now();
    let deadline = connected + Duration::from_secs_f64(seconds);
    let mut payloads = Payload::new(0x5157);
    let mut sent = vec![0u8; chunk];
    let mut got = vec![0u8; chunk];
    while Instant::now() < deadline {
        payloads.fill(&mut sent);
        let started = Instant::now();
        s.write_all(&sent)
            .with_context(|| format!("sending chunk {}", report.chunks))?;
        read_exact(
            &mut s,
            &mut got,
            &format!("echo of chunk {}", report.chunks),
        )?;
        if got != sent {
            bail!("echo of chunk {} differs", report.chunks);
        }
        let took = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        if took > report.max_stall_ms {
            report.max_stall_ms = took;
            report.max_stall_at_ms =
                u64::try_from(started.duration_since(connected).as_millis()).unwrap_or(u64::MAX);
        }
        report.chunks += 1;
        report.bytes += chunk as u64;
        thread::sleep(interval);
    }
    s.shutdown(Shutdown::Write)?;
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).context("waiting for close")?;
    if !rest.is_empty() {
        bail!("{} unexpected bytes before close", rest.len());
    }
    report.ok = true;
    Ok(())
}

fn udp(to: SocketAddr, count: usize, size: usize, timeout: Duration) -> Result<UdpReport> {
    let bind: SocketAddr = if to.is_ipv6() {
        "[::]:0".parse()?
    } else {
        "0.0.0.0:0".parse()?
    };
    let s = UdpSocket::bind(bind)?;
    s.connect(to)?;
    s.set_read_timeout(Some(timeout))?;
    let mut report = UdpReport::default();
    let mut payloads = Payload::new(0xD6);
    let mut buf = vec![0u8; 65536];
    for _ in 0..count {
        let payload = payloads.bytes(size);
        s.send(&payload)?;
        let answered = loop {
            match s.recv(&mut buf) {
                // A late answer to an earlier datagram: skip it.
                Ok(n) if n == ID_LEN + size && buf[ID_LEN..n] != payload[..] => continue,
                Ok(n) if n == ID_LEN + size => break Some(parse_id(&buf[..ID_LEN])),
                Ok(_) => break None,
                Err(_) => break None,
            }
        };
        match answered {
            Some(backend) => {
                report.ok += 1;
                *report.by_backend.entry(backend).or_default() += 1;
            }
            None => report.failed += 1,
        }
    }
    Ok(report)
}

fn rate(to: SocketAddr, seconds: f64, concurrency: usize, timeout: Duration) -> RateReport {
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(seconds);
    let ok = AtomicU64::new(0);
    let failed = AtomicU64::new(0);
    let by = Mutex::new(BTreeMap::<String, u64>::new());
    let errors = Mutex::new(Vec::<String>::new());
    thread::scope(|sc| {
        for _ in 0..concurrency {
            sc.spawn(|| {
                let mut mine = BTreeMap::<String, u64>::new();
                while Instant::now() < deadline {
                    match short_conn(to, timeout) {
                        Ok(b) => {
                            ok.fetch_add(1, Ordering::Relaxed);
                            *mine.entry(b).or_default() += 1;
                        }
                        Err(e) => {
                            failed.fetch_add(1, Ordering::Relaxed);
                            if let Ok(mut v) = errors.lock()
                                && v.len() < 10
                            {
                                v.push(format!("{:.3}s: {e:#}", start.elapsed().as_secs_f64()));
                            }
                        }
                    }
                }
                if let Ok(mut by) = by.lock() {
                    for (k, v) in mine {
                        *by.entry(k).or_default() += v;
                    }
                }
            });
        }
    });
    let secs = start.elapsed().as_secs_f64();
    let ok = ok.into_inner();
    RateReport {
        ok,
        failed: failed.into_inner(),
        seconds: secs,
        conns_per_sec: ok as f64 / secs,
        by_backend: by.into_inner().unwrap_or_default(),
        errors: errors.into_inner().unwrap_or_default(),
    }
}

fn short_conn(to: SocketAddr, timeout: Duration) -> Result<String> {
    let mut s = connect(to, timeout)?;
    s.write_all(b"x")?;
    let mut got = [0u8; ID_LEN + 1];
    read_exact(&mut s, &mut got, "header and echo")?;
    if got[ID_LEN] != b'x' {
        bail!("wrong echo");
    }
    Ok(parse_id(&got[..ID_LEN]))
}
