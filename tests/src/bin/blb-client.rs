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
use balancer_tests::report::{ConnsReport, HoldReport, RateReport, StreamReport, UdpReport};
use balancer_tests::wire::{ID_LEN, Payload, parse_id};
use clap::{Parser, Subcommand};

/// Upper bounds so a mistaken argument cannot turn into a flood.
const MAX_COUNT: usize = 1_000_000;
const MAX_SECONDS: f64 = 600.0;
const MAX_CONCURRENCY: usize = 256;
const MAX_ERRORS_KEPT: usize = 10;
/// At most this many connections held open at once, and this rate.
const MAX_HOLD: usize = 50_000;
const MAX_RATE: u64 = 20_000;

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
    /// New connections at a rate for T seconds, each held open (its id header read); then,
    /// once the check file exists (or after `--wait-seconds`), a few bytes on every one and
    /// a byte-exact echo. The file may hold a cutoff (unix time in ms): connections opened
    /// before it are reported as `old`, later ones as `young`; without one the cutoff is one
    /// second before the check starts.
    Hold {
        #[arg(long)]
        to: SocketAddr,
        /// New connections per second.
        #[arg(long, default_value_t = 1000)]
        rate: u64,
        /// How long to open connections.
        #[arg(long, default_value_t = 2.0)]
        seconds: f64,
        /// The check starts once this file exists.
        #[arg(long)]
        check_file: std::path::PathBuf,
        /// The check starts after this long at the latest (counted from the start).
        #[arg(long, default_value_t = 60.0)]
        wait_seconds: f64,
        /// Threads opening connections.
        #[arg(long, default_value_t = 32)]
        workers: usize,
        /// Bytes sent on each connection in the check.
        #[arg(long, default_value_t = 16)]
        size: usize,
        /// Connect and header timeout, and how long one check echo may take, in ms.
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
        Mode::Hold {
            to,
            rate,
            seconds,
            check_file,
            wait_seconds,
            workers,
            size,
            timeout_ms,
        } => {
            check_bounds(1, seconds, workers)?;
            check_bounds(1, wait_seconds, 1)?;
            if rate == 0 || rate > MAX_RATE {
                bail!("rate must be 1..={MAX_RATE}");
            }
            let count = (rate as f64 * seconds).round() as usize;
            if count == 0 || count > MAX_HOLD {
                bail!("rate x seconds must be 1..={MAX_HOLD} connections");
            }
            raise_nofile(count as u64 + 64)?;
            let r = hold(
                to,
                count,
                rate,
                &check_file,
                Duration::from_secs_f64(wait_seconds),
                workers,
                size.clamp(1, 4096),
                ms(timeout_ms),
            );
            print_json(&r)?;
            Ok(r.old.failed == 0 && r.opened > 0)
        }
    }
}

/// Raises the open-file limit to at least `n` (the hard limit too, which root may).
fn raise_nofile(n: u64) -> Result<()> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            bail!("getrlimit: {}", std::io::Error::last_os_error());
        }
        if lim.rlim_cur >= n {
            return Ok(());
        }
        lim.rlim_cur = n;
        lim.rlim_max = lim.rlim_max.max(n);
        if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
            bail!(
                "cannot raise the open-file limit to {n}: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    Ok(())
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

/// One connection `hold` keeps open.
struct Held {
    index: usize,
    stream: TcpStream,
    /// When its header arrived, in unix ms.
    opened_ms: i64,
    backend: String,
}

fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Opens one connection and reads its id header.
fn open_held(to: SocketAddr, index: usize, timeout: Duration) -> Result<Held> {
    let mut s = connect(to, timeout)?;
    let mut header = [0u8; ID_LEN];
    read_exact(&mut s, &mut header, "header")?;
    Ok(Held {
        index,
        stream: s,
        opened_ms: unix_ms(),
        backend: parse_id(&header),
    })
}

/// Waits until `file` exists (at most until `limit`); returns the cutoff it names, if any.
fn wait_check_file(file: &std::path::Path, limit: Instant) -> Option<i64> {
    loop {
        if let Ok(text) = std::fs::read_to_string(file) {
            return text.trim().parse().ok();
        }
        if Instant::now() >= limit {
            eprintln!("hold: no check file within the wait; checking now");
            return None;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

#[allow(clippy::too_many_arguments)]
fn hold(
    to: SocketAddr,
    count: usize,
    rate: u64,
    check_file: &std::path::Path,
    wait: Duration,
    workers: usize,
    size: usize,
    timeout: Duration,
) -> HoldReport {
    let start = Instant::now();
    let next = AtomicUsize::new(0);
    let failed = AtomicU64::new(0);
    let held = Mutex::new(Vec::<Held>::with_capacity(count));
    let open_errors = Mutex::new(Vec::<String>::new());
    // Tests wait for this line before they disturb the balancer.
    eprintln!("hold: opening {count} connections at {rate}/s");
    thread::scope(|sc| {
        for _ in 0..workers.min(count) {
            sc.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= count {
                        break;
                    }
                    // Connection i starts at i / rate seconds; a late worker starts at once.
                    let due = start + Duration::from_secs_f64(i as f64 / rate as f64);
                    if let Some(d) = due.checked_duration_since(Instant::now()) {
                        thread::sleep(d);
                    }
                    match open_held(to, i, timeout) {
                        Ok(h) => {
                            if let Ok(mut v) = held.lock() {
                                v.push(h);
                            }
                        }
                        Err(e) => {
                            failed.fetch_add(1, Ordering::Relaxed);
                            if let Ok(mut v) = open_errors.lock()
                                && v.len() < MAX_ERRORS_KEPT
                            {
                                v.push(format!(
                                    "conn {i} at {:.3}s: {e:#}",
                                    start.elapsed().as_secs_f64()
                                ));
                            }
                        }
                    }
                }
            });
        }
    });
    let open_seconds = start.elapsed().as_secs_f64();
    let mut held = held.into_inner().unwrap_or_default();
    held.sort_by_key(|h| h.index);
    let mut report = HoldReport {
        opened: held.len() as u64,
        failed_to_open: failed.into_inner(),
        open_seconds,
        open_errors: open_errors.into_inner().unwrap_or_default(),
        ..HoldReport::default()
    };
    for h in &held {
        *report.by_backend.entry(h.backend.clone()).or_default() += 1;
    }
    eprintln!(
        "hold: opened {} (failed {}) in {open_seconds:.2}s",
        report.opened, report.failed_to_open
    );
    let cutoff = wait_check_file(check_file, start + wait);
    eprintln!("hold: checking");
    let check_start = Instant::now();
    let check_start_ms = unix_ms();
    let cutoff = cutoff.unwrap_or(check_start_ms - 1000);
    report.cutoff_before_check_ms = check_start_ms - cutoff;
    check_held(&mut held, size, timeout, cutoff, &mut report);
    report.check_ms = u64::try_from(check_start.elapsed().as_millis()).unwrap_or(u64::MAX);
    report
}

/// The check round: a few bytes on every connection first, then every echo read back
/// (within one overall deadline, so a round of dead connections stays bounded).
fn check_held(
    held: &mut [Held],
    size: usize,
    timeout: Duration,
    cutoff_ms: i64,
    report: &mut HoldReport,
) {
    let mut payloads = Payload::new(0x401D);
    let mut sent: Vec<Option<Vec<u8>>> = Vec::with_capacity(held.len());
    let mut failures: Vec<(bool, String)> = Vec::new();
    let mut outcome: Vec<Result<(), String>> = Vec::with_capacity(held.len());
    for h in held.iter_mut() {
        let p = payloads.bytes(size);
        match h.stream.write_all(&p) {
            Ok(()) => {
                sent.push(Some(p));
                outcome.push(Ok(()));
            }
            Err(e) => {
                sent.push(None);
                outcome.push(Err(format!("sending: {e}")));
            }
        }
    }
    let deadline = Instant::now() + timeout * 2;
    let mut got = vec![0u8; size];
    for ((h, p), out) in held.iter_mut().zip(&sent).zip(outcome.iter_mut()) {
        let Some(p) = p else { continue };
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        let res = h
            .stream
            .set_read_timeout(Some(left.min(timeout)))
            .map_err(|e| e.to_string())
            .and_then(|()| {
                read_exact(&mut h.stream, &mut got, "echo").map_err(|e| format!("{e:#}"))
            })
            .and_then(|()| {
                if got == *p {
                    Ok(())
                } else {
                    Err("echo differs from what was sent".to_string())
                }
            });
        *out = res;
    }
    for (h, out) in held.iter().zip(outcome) {
        let old = h.opened_ms < cutoff_ms;
        let class = if old {
            &mut report.old
        } else {
            &mut report.young
        };
        class.opened += 1;
        match out {
            Ok(()) => {
                class.ok += 1;
                report.checked_ok += 1;
            }
            Err(e) => {
                class.failed += 1;
                report.checked_failed += 1;
                failures.push((
                    old,
                    format!(
                        "{} conn {} ({}, opened {} ms before the cutoff): {e}",
                        if old { "old" } else { "young" },
                        h.index,
                        h.backend,
                        cutoff_ms - h.opened_ms
                    ),
                ));
            }
        }
    }
    // Old failures first: they are the ones a test asserts on.
    failures.sort_by_key(|(old, _)| !*old);
    report.errors = failures
        .into_iter()
        .take(MAX_ERRORS_KEPT)
        .map(|(_, e)| e)
        .collect();
}
