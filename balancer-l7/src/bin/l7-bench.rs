//! Benchmark: requests/s and p50/p99 latency through the balancer's L7 proxy beside HAProxy,
//! configured the same way (same certificate, same two backends, TLS 1.2+/ALPN, round-robin),
//! with the same client (wrk), for HTTPS keep-alive and one connection per request.
//!
//! `cargo run --release -p balancer-l7 --bin l7-bench -- [--duration 10] [--connections 50]
//! [--threads 1] [--workers 1] [--trials 3]` needs `openssl`, `haproxy` and `wrk` on PATH.
//! Everything runs on 127.0.0.1 and stops by itself.
//!
//! Each mode runs `trials` times, balancer and HAProxy interleaved; the medians are printed,
//! and beside them each proxy's CPU time per request (user + system time of its threads over
//! the run, divided by the requests): on a small machine where the client, the backends and
//! the proxy share the cores, that is the steadier of the two numbers.

#![allow(clippy::print_stdout)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

struct Args {
    duration: u64,
    connections: u32,
    threads: u32,
    workers: usize,
    trials: usize,
}

fn args() -> anyhow::Result<Args> {
    let mut a = Args {
        duration: 10,
        connections: 50,
        threads: 1,
        workers: 1,
        trials: 3,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let v = it.next().with_context(|| format!("{k} needs a value"))?;
        match k.as_str() {
            "--duration" => a.duration = v.parse()?,
            "--connections" => a.connections = v.parse()?,
            "--threads" => a.threads = v.parse()?,
            "--workers" => a.workers = v.parse()?,
            "--trials" => a.trials = v.parse::<usize>()?.max(1),
            _ => bail!("unknown argument {k}"),
        }
    }
    Ok(a)
}

/// A backend on its own single-threaded runtime: `200 ok`.
fn spawn_backend() -> anyhow::Result<SocketAddr> {
    let std_listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    std_listener.set_nonblocking(true)?;
    let addr = std_listener.local_addr()?;
    std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        rt.block_on(async move {
            let Ok(listener) = tokio::net::TcpListener::from_std(std_listener) else {
                return;
            };
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let _ = tcp.set_nodelay(true);
                tokio::spawn(async move {
                    let svc = service_fn(|_req| async {
                        Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from_static(
                            b"ok\n",
                        ))))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
    });
    Ok(addr)
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn make_cert(dir: &Path) -> anyhow::Result<(PathBuf, PathBuf, PathBuf)> {
    let (cert, key, both) = (
        dir.join("cert.pem"),
        dir.join("key.pem"),
        dir.join("both.pem"),
    );
    let st = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .args(["-nodes", "-days", "2", "-subj", "/CN=lb.bench", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .args(["-addext", "subjectAltName=DNS:lb.bench"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .context("openssl")?;
    if !st.success() {
        bail!("openssl req failed");
    }
    std::fs::write(
        &both,
        [std::fs::read(&cert)?, std::fs::read(&key)?].concat(),
    )?;
    Ok((cert, key, both))
}

/// Kills the child process on drop.
struct Reaper(Child);

impl Drop for Reaper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_haproxy(
    dir: &Path,
    both: &Path,
    port: u16,
    backends: &[SocketAddr],
    threads: usize,
) -> anyhow::Result<Reaper> {
    let servers: String = backends
        .iter()
        .enumerate()
        .map(|(i, b)| format!("  server s{i} {b}\n"))
        .collect();
    let cfg = format!(
        "global\n  nbthread {threads}\n  maxconn 4096\n  ssl-default-bind-options ssl-min-ver TLSv1.2\n\
         ssl-default-bind-ciphers ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305\n\
         defaults\n  mode http\n  timeout connect 2s\n  timeout client 30s\n  timeout server 30s\n  option forwardfor\n\
         frontend fe\n  bind 127.0.0.1:{port} ssl crt {} alpn h2,http/1.1\n  http-request set-header X-Forwarded-Proto https\n  default_backend be\n\
         backend be\n  balance roundrobin\n{servers}",
        both.display()
    );
    let path = dir.join("haproxy.cfg");
    std::fs::write(&path, cfg)?;
    let child = Command::new("haproxy")
        .arg("-f")
        .arg(&path)
        .arg("-db")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("haproxy")?;
    let r = Reaper(child);
    for _ in 0..50 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(r);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("haproxy did not start listening on {port}")
}

#[derive(Debug, Default, Clone, Copy)]
struct Result {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: u64,
    /// CPU time of the proxy per request, microseconds.
    cpu_us: f64,
}

/// User + system time, in clock ticks, of the threads of process `pid` (those named `comm`
/// when given), from `/proc/<pid>/task/*/stat`.
fn cpu_ticks(pid: u32, comm: Option<&str>) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    let mut total = 0;
    for t in tasks.flatten() {
        let Ok(stat) = std::fs::read_to_string(t.path().join("stat")) else {
            continue;
        };
        // `tid (comm) state ...`: comm may hold spaces, so split at the last parenthesis.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        if comm.is_some_and(|c| &stat[open + 1..close] != c) {
            continue;
        }
        // After `)`: state is field 3, utime field 14, stime field 15.
        let f: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        let tick = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        total += tick(11) + tick(12);
    }
    total
}

/// Clock ticks per second of `/proc/*/stat` (`USER_HZ`, 100 on Linux).
const USER_HZ: f64 = 100.0;

/// The median of `v` by requests/s (the upper one of an even count).
fn median(mut v: Vec<Result>) -> Result {
    v.sort_by(|a, b| a.rps.total_cmp(&b.rps));
    v[v.len() / 2]
}

/// Runs wrk against `port` while counting the CPU time of the proxy's threads.
fn measured(
    a: &Args,
    port: u16,
    close: bool,
    pid: u32,
    comm: Option<&str>,
) -> anyhow::Result<Result> {
    let before = cpu_ticks(pid, comm);
    let mut r = wrk(a, port, close)?;
    let ticks = cpu_ticks(pid, comm).saturating_sub(before);
    let requests = r.rps * a.duration as f64;
    r.cpu_us = ticks as f64 / USER_HZ * 1e6 / requests.max(1.0);
    Ok(r)
}

fn parse_latency(v: &str) -> Option<f64> {
    let (n, unit) = v.split_at(v.find(|c: char| c.is_ascii_alphabetic())?);
    let n: f64 = n.parse().ok()?;
    Some(match unit {
        "us" => n / 1000.0,
        "ms" => n,
        "s" => n * 1000.0,
        "m" => n * 60_000.0,
        _ => return None,
    })
}

fn wrk(a: &Args, port: u16, close: bool) -> anyhow::Result<Result> {
    let mut c = Command::new("wrk");
    c.args([
        "-t",
        &a.threads.to_string(),
        "-c",
        &a.connections.to_string(),
    ])
    .args([
        "-d",
        &format!("{}s", a.duration),
        "--latency",
        "--timeout",
        "5s",
    ]);
    if close {
        c.args(["-H", "Connection: close"]);
    }
    c.arg(format!("https://127.0.0.1:{port}/"));
    let out = c.output().context("wrk")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut r = Result::default();
    for line in text.lines() {
        let mut f = line.split_whitespace();
        match (f.next(), f.next()) {
            (Some("Requests/sec:"), Some(v)) => r.rps = v.parse().unwrap_or(0.0),
            (Some("50%"), Some(v)) => r.p50_ms = parse_latency(v).unwrap_or(f64::NAN),
            (Some("99%"), Some(v)) => r.p99_ms = parse_latency(v).unwrap_or(f64::NAN),
            (Some("Non-2xx"), _) | (Some("Socket"), _) => {
                r.errors += line
                    .split(|c: char| !c.is_ascii_digit())
                    .filter_map(|n| n.parse::<u64>().ok())
                    .sum::<u64>();
            }
            _ => {}
        }
    }
    if r.rps == 0.0 {
        bail!(
            "wrk gave no result:\n{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(r)
}

fn main() -> anyhow::Result<()> {
    let a = args()?;
    let dir = std::env::temp_dir().join(format!("l7-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let (cert, key, both) = make_cert(&dir)?;
    let backends = [spawn_backend()?, spawn_backend()?];

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(a.workers)
        .enable_all()
        .build()?;
    let pool_backends: String = backends
        .iter()
        .map(|b| format!("[[pool.backend]]\naddress = \"{b}\"\n"))
        .collect();
    let toml_cfg = format!(
        "threads = {}\n[[listener]]\nname = \"bench\"\naddress = \"127.0.0.1:0\"\nalpn = [\"h2\", \"http/1.1\"]\n\
         [[listener.certificate]]\ncert = {:?}\nkey = {:?}\nserver_names = [\"lb.bench\"]\n\
         [[pool]]\nname = \"p\"\n{pool_backends}\
         [[route]]\nname = \"all\"\npool = \"p\"\n",
        a.workers,
        cert.display().to_string(),
        key.display().to_string()
    );
    let cfg: balancer_l7::L7Config = toml::from_str(&toml_cfg).context("bench config")?;
    let l7 = rt.block_on(balancer_l7::L7::start(cfg))?;
    let l7_port = l7.listener_addr("bench").context("listener")?.port();
    let hap_port = free_port()?;
    let haproxy = start_haproxy(&dir, &both, hap_port, &backends, a.workers)?;
    let hap_pid = haproxy.0.id();

    println!(
        "wrk -t{} -c{} -d{}s, {} proxy thread(s), 2 backends, TLS on 127.0.0.1; median of {} \
         interleaved trials",
        a.threads, a.connections, a.duration, a.workers, a.trials
    );
    println!(
        "{:<20} {:>9} {:>9} {:>6} {:>8} {:>8} {:>6} {:>8} {:>8} {:>8} {:>8}",
        "mode",
        "bal r/s",
        "hap r/s",
        "ratio",
        "bal cpu",
        "hap cpu",
        "ratio",
        "bal p50",
        "hap p50",
        "bal p99",
        "hap p99"
    );
    let me = std::process::id();
    for (name, close) in [("https keep-alive", false), ("https conn/request", true)] {
        let (mut bs, mut hs) = (Vec::new(), Vec::new());
        for _ in 0..a.trials {
            bs.push(measured(&a, l7_port, close, me, Some("l7"))?);
            hs.push(measured(&a, hap_port, close, hap_pid, None)?);
        }
        let trials: Vec<String> = bs
            .iter()
            .zip(&hs)
            .map(|(b, h)| format!("{:.2}", b.rps / h.rps))
            .collect();
        let errors: u64 = bs.iter().chain(&hs).map(|r| r.errors).sum();
        let (b, h) = (median(bs), median(hs));
        println!(
            "{:<20} {:>9.0} {:>9.0} {:>6.2} {:>6.1}us {:>6.1}us {:>6.2} {:>6.2}ms {:>6.2}ms {:>6.2}ms {:>6.2}ms",
            name,
            b.rps,
            h.rps,
            b.rps / h.rps,
            b.cpu_us,
            h.cpu_us,
            h.cpu_us / b.cpu_us,
            b.p50_ms,
            h.p50_ms,
            b.p99_ms,
            h.p99_ms
        );
        println!("  r/s ratio per trial: {}", trials.join(" "));
        if errors > 0 {
            println!("  errors (all trials): {errors}");
        }
    }
    rt.block_on(l7.shutdown(Duration::from_secs(2)));
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
