//! `blb-echo`: the lab's backend. TCP echo that first announces its name (an 8-byte header),
//! UDP echo (header + datagram), and a tiny HTTP server (`/health`, `/`).
//!
//! It never logs payload bytes.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::thread;
use std::time::Duration;

use anyhow::{Context, Result};
use balancer_tests::wire::{ID_LEN, id_header};
use clap::Parser;
use socket2::{Domain, Protocol, Socket, Type};

/// TCP/UDP echo server and tiny HTTP server for the balancer lab.
#[derive(Debug, Parser)]
#[command(name = "blb-echo")]
struct Args {
    /// Name announced in the 8-byte header (space-padded) and in HTTP replies.
    #[arg(long)]
    name: String,
    /// TCP echo address (repeatable), e.g. `0.0.0.0:7002` or `[::]:7002`.
    #[arg(long)]
    tcp: Vec<SocketAddr>,
    /// UDP echo address (repeatable).
    #[arg(long)]
    udp: Vec<SocketAddr>,
    /// HTTP address (repeatable): `GET /health` → 200 "ok", `GET /` → "served-by NAME".
    #[arg(long)]
    http: Vec<SocketAddr>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.tcp.is_empty() && args.udp.is_empty() && args.http.is_empty() {
        anyhow::bail!("nothing to serve: give --tcp, --udp or --http");
    }
    let header = id_header(&args.name);
    // A thread and a socket per connection: tests hold thousands open at once.
    raise_nofile();
    let mut threads = Vec::new();
    for addr in &args.tcp {
        let l = tcp_listener(*addr)?;
        threads.push(thread::spawn(move || serve_tcp(l, header)));
    }
    for addr in &args.udp {
        let s = udp_socket(*addr)?;
        threads.push(thread::spawn(move || serve_udp(s, header)));
    }
    for addr in &args.http {
        let l = tcp_listener(*addr)?;
        let name = args.name.clone();
        threads.push(thread::spawn(move || serve_http(l, name)));
    }
    println!("blb-echo ready");
    std::io::stdout().flush()?;
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

/// IPv6 sockets are v6-only so `0.0.0.0:P` and `[::]:P` can both be bound.
fn socket(addr: SocketAddr, ty: Type, proto: Protocol) -> Result<Socket> {
    let s = Socket::new(Domain::for_address(addr), ty, Some(proto))?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.set_reuse_address(true)?;
    s.bind(&addr.into())
        .with_context(|| format!("bind {addr}"))?;
    Ok(s)
}

fn tcp_listener(addr: SocketAddr) -> Result<TcpListener> {
    let s = socket(addr, Type::STREAM, Protocol::TCP)?;
    s.listen(1024)?;
    Ok(s.into())
}

fn udp_socket(addr: SocketAddr) -> Result<UdpSocket> {
    Ok(socket(addr, Type::DGRAM, Protocol::UDP)?.into())
}

/// The open-file limit raised to the hard limit (at least 65536, which root may set).
fn raise_nofile() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return;
        }
        let want = lim.rlim_max.max(65536);
        if lim.rlim_cur >= want {
            return;
        }
        let raised = libc::rlimit {
            rlim_cur: want,
            rlim_max: want,
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) != 0 {
            lim.rlim_cur = lim.rlim_max;
            let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// Stack of a connection's thread: `echo` needs little, and thousands may run at once.
const CONN_STACK: usize = 256 * 1024;

fn serve_tcp(l: TcpListener, header: [u8; ID_LEN]) {
    for conn in l.incoming() {
        let conn = match conn {
            Ok(c) => c,
            Err(e) => {
                // Out of file descriptors or threads: back off instead of spinning.
                eprintln!("blb-echo: accept: {e}");
                thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let spawned = thread::Builder::new()
            .stack_size(CONN_STACK)
            .spawn(move || {
                let _ = echo(conn, header);
            });
        if let Err(e) = spawned {
            eprintln!("blb-echo: cannot start a connection thread: {e}");
        }
    }
}

fn echo(mut conn: TcpStream, header: [u8; ID_LEN]) -> std::io::Result<()> {
    conn.set_nodelay(true)?;
    conn.write_all(&header)?;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = conn.read(&mut buf)?;
        if n == 0 {
            return conn.shutdown(std::net::Shutdown::Write);
        }
        conn.write_all(&buf[..n])?;
    }
}

fn serve_udp(s: UdpSocket, header: [u8; ID_LEN]) {
    let mut buf = vec![0u8; 65536];
    let mut out = Vec::with_capacity(65536 + ID_LEN);
    loop {
        let Ok((n, from)) = s.recv_from(&mut buf) else {
            continue;
        };
        out.clear();
        out.extend_from_slice(&header);
        out.extend_from_slice(&buf[..n]);
        let _ = s.send_to(&out, from);
    }
}

fn serve_http(l: TcpListener, name: String) {
    for conn in l.incoming().flatten() {
        let name = name.clone();
        thread::spawn(move || {
            let _ = http(conn, &name);
        });
    }
}

fn http(mut conn: TcpStream, name: &str) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut req = Vec::new();
    let mut buf = [0u8; 2048];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 16 * 1024 {
        let n = conn.read(&mut buf)?;
        if n == 0 {
            break;
        }
        req.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&req);
    let mut words = line.split_whitespace();
    let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    // The query string does not choose the page (tests put markers there).
    let path = target.split('?').next().unwrap_or("");
    let (status, body) = match (method, path) {
        ("GET" | "HEAD", "/health") => ("200 OK", "ok\n".to_string()),
        ("GET" | "HEAD", "/") => ("200 OK", format!("served-by {name}\n")),
        ("GET" | "HEAD", _) => ("404 Not Found", "not found\n".to_string()),
        _ => ("405 Method Not Allowed", "method not allowed\n".to_string()),
    };
    let mut resp = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nX-Served-By: {name}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    if method != "HEAD" {
        resp.push_str(&body);
    }
    conn.write_all(resp.as_bytes())?;
    conn.shutdown(std::net::Shutdown::Write)
}
