//! Listeners and client connections: TLS handshake, HTTP/1.1 or h2 by ALPN, idle timer,
//! graceful drain.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use http::StatusCode;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_rustls::TlsAcceptor;

use crate::config::{L7Config, RedirectConfig};
use crate::metrics::Registry;
use crate::pool::HealthMap;
use crate::proxy;
use crate::route::Snapshot;

/// State shared by every listener and connection.
pub(crate) struct Shared {
    pub(crate) snapshot: ArcSwap<Snapshot>,
    pub(crate) config: ArcSwap<L7Config>,
    /// Per TLS listener, by name.
    pub(crate) tls: HashMap<String, ArcSwap<ServerConfig>>,
    pub(crate) registry: Registry,
    pub(crate) health: HealthMap,
    /// Stop accepting, finish in-flight requests.
    pub(crate) soft_stop: watch::Sender<bool>,
    /// Close whatever is left.
    pub(crate) hard_stop: watch::Sender<bool>,
    epoch: Instant,
}

impl Shared {
    pub(crate) fn new(
        snapshot: Snapshot,
        config: L7Config,
        tls: HashMap<String, ArcSwap<ServerConfig>>,
        registry: Registry,
        health: HealthMap,
    ) -> Shared {
        Shared {
            snapshot: ArcSwap::from_pointee(snapshot),
            config: ArcSwap::from_pointee(config),
            tls,
            registry,
            health,
            soft_stop: watch::channel(false).0,
            hard_stop: watch::channel(false).0,
            epoch: Instant::now(),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
}

/// What a listener serves.
#[derive(Clone)]
pub(crate) enum Kind {
    Tls(Arc<str>),
    Redirect(RedirectConfig),
}

/// Accepts connections until the soft stop. A connection past the listener's
/// `max_connections` is closed at once (as Envoy's listener limit does) rather than left in
/// the backlog, so a flood of slow clients cannot hold every descriptor.
pub(crate) async fn accept_loop(
    shared: Arc<Shared>,
    listener: TcpListener,
    kind: Kind,
    drain: mpsc::Sender<()>,
) {
    let mut stop = shared.soft_stop.subscribe();
    let open = Arc::new(AtomicUsize::new(0));
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((tcp, peer)) => {
                    let Some(slot) = Slot::take(&open, max_connections(&shared, &kind)) else {
                        shared.registry.connections_refused.fetch_add(1, Relaxed);
                        tracing::debug!(peer = %peer, "listener at max_connections; connection closed");
                        drop(tcp);
                        continue;
                    };
                    let _ = tcp.set_nodelay(true);
                    let (shared, kind, drain) = (shared.clone(), kind.clone(), drain.clone());
                    tokio::spawn(async move {
                        match kind {
                            Kind::Tls(name) => serve_tls(shared, name, tcp, peer, slot).await,
                            Kind::Redirect(r) => serve_redirect(shared, r, tcp, slot).await,
                        }
                        drop(drain);
                    });
                }
                Err(e) => {
                    // Out of descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = stop.changed() => break,
        }
    }
}

/// The connection cap of a listener, from the configuration in force (TLS listeners follow
/// reloads; redirect listeners keep the value they started with).
fn max_connections(shared: &Shared, kind: &Kind) -> usize {
    match kind {
        Kind::Tls(name) => shared
            .snapshot
            .load()
            .listeners
            .get(&**name)
            .map_or(usize::MAX, |l| l.max_connections),
        Kind::Redirect(r) => r.max_connections,
    }
}

/// One of a listener's `max_connections` places, given back on drop.
struct Slot(Arc<AtomicUsize>);

impl Slot {
    fn take(open: &Arc<AtomicUsize>, max: usize) -> Option<Slot> {
        open.fetch_update(Relaxed, Relaxed, |n| (n < max).then_some(n + 1))
            .ok()
            .map(|_| Slot(open.clone()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

/// Counts an open client connection.
struct OpenConn<'a>(&'a Registry);

impl<'a> OpenConn<'a> {
    fn new(r: &'a Registry) -> Self {
        r.open_connections.fetch_add(1, Relaxed);
        r.connections_total.fetch_add(1, Relaxed);
        OpenConn(r)
    }
}

impl Drop for OpenConn<'_> {
    fn drop(&mut self) {
        self.0.open_connections.fetch_sub(1, Relaxed);
    }
}

async fn serve_tls(
    shared: Arc<Shared>,
    name: Arc<str>,
    tcp: TcpStream,
    peer: SocketAddr,
    slot: Slot,
) {
    let _open = OpenConn::new(&shared.registry);
    // Declared after `_open`, so dropped first: the place is free once the count drops.
    let _slot = slot;
    let Some(lcfg) = shared.snapshot.load().listeners.get(&*name).cloned() else {
        return;
    };
    let Some(tls_cfg) = shared.tls.get(&*name).map(|t| t.load_full()) else {
        return;
    };
    let acceptor = TlsAcceptor::from(tls_cfg);
    let tls = match tokio::time::timeout(lcfg.handshake_timeout, acceptor.accept(tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            shared.registry.tls_failures.fetch_add(1, Relaxed);
            tracing::debug!(listener = %name, error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            shared.registry.tls_failures.fetch_add(1, Relaxed);
            return;
        }
    };
    let (_, session) = tls.get_ref();
    match session.protocol_version() {
        Some(rustls::ProtocolVersion::TLSv1_3) => shared.registry.tls13.fetch_add(1, Relaxed),
        _ => shared.registry.tls12.fetch_add(1, Relaxed),
    };
    let alpn = session.alpn_protocol().map(<[u8]>::to_vec);

    let last = Arc::new(AtomicU64::new(shared.now_ms()));
    let stalled = Arc::new(AtomicU64::new(NOT_STALLED));
    let in_flight = Arc::new(AtomicUsize::new(0));
    let io = Activity {
        inner: tls,
        last: last.clone(),
        stalled: stalled.clone(),
        shared: shared.clone(),
    };
    let svc = {
        let (shared, in_flight) = (shared.clone(), in_flight.clone());
        service_fn(move |req| {
            proxy::handle(shared.clone(), name.clone(), peer, in_flight.clone(), req)
        })
    };
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(lcfg.client_header_timeout)
        .max_buf_size(lcfg.max_header_bytes.max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(lcfg.max_header_bytes).unwrap_or(u32::MAX));
    let builder = match alpn.as_deref() {
        Some(b"h2") => builder.http2_only(),
        Some(_) => builder.http1_only(),
        None => builder,
    };
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), svc);
    let mut conn = std::pin::pin!(conn);
    let mut soft = shared.soft_stop.subscribe();
    let mut hard = shared.hard_stop.subscribe();
    let mut draining = false;
    if *soft.borrow_and_update() {
        conn.as_mut().graceful_shutdown();
        draining = true;
    }
    let idle_ms = u64::try_from(lcfg.idle_timeout.as_millis()).unwrap_or(u64::MAX);
    let write_ms = u64::try_from(lcfg.client_write_timeout.as_millis()).unwrap_or(u64::MAX);
    let period =
        (lcfg.idle_timeout.min(lcfg.client_write_timeout) / 4).max(Duration::from_millis(100));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "client connection ended");
                }
                break;
            }
            _ = soft.changed(), if !draining => {
                conn.as_mut().graceful_shutdown();
                draining = true;
            }
            _ = hard.changed() => break,
            _ = tick.tick() => {
                let now = shared.now_ms();
                let since = stalled.load(Relaxed);
                if since != NOT_STALLED && now.saturating_sub(since) >= write_ms {
                    // The client stopped reading: no graceful end is possible, drop it.
                    shared.registry.client_write_timeouts.fetch_add(1, Relaxed);
                    tracing::debug!(listener = %lcfg.name, "client stopped reading; connection closed");
                    break;
                }
                let quiet = now.saturating_sub(last.load(Relaxed));
                if !draining && in_flight.load(Relaxed) == 0 && quiet >= idle_ms {
                    conn.as_mut().graceful_shutdown();
                    draining = true;
                }
            }
        }
    }
}

async fn serve_redirect(shared: Arc<Shared>, r: RedirectConfig, tcp: TcpStream, _slot: Slot) {
    let status = StatusCode::from_u16(r.status).unwrap_or(StatusCode::MOVED_PERMANENTLY);
    let in_flight = Arc::new(AtomicUsize::new(0));
    let svc = {
        let shared = shared.clone();
        service_fn(move |req| {
            proxy::redirect(shared.clone(), r.https_port, status, in_flight.clone(), req)
        })
    };
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10));
    let builder = builder.http1_only();
    let conn = builder.serve_connection(TokioIo::new(tcp), svc);
    let mut conn = std::pin::pin!(conn);
    let mut soft = shared.soft_stop.subscribe();
    let mut hard = shared.hard_stop.subscribe();
    let mut draining = false;
    if *soft.borrow_and_update() {
        conn.as_mut().graceful_shutdown();
        draining = true;
    }
    loop {
        tokio::select! {
            _ = conn.as_mut() => break,
            _ = soft.changed(), if !draining => {
                conn.as_mut().graceful_shutdown();
                draining = true;
            }
            _ = hard.changed() => break,
        }
    }
}

/// `Activity::stalled` when no write is waiting on the client.
const NOT_STALLED: u64 = u64::MAX;

/// A stream that records the time of its last read or write, for the idle timer, and since
/// when a write has been waiting on a client that does not read, for the write timeout.
struct Activity<T> {
    inner: T,
    last: Arc<AtomicU64>,
    stalled: Arc<AtomicU64>,
    shared: Arc<Shared>,
}

impl<T> Activity<T> {
    fn touch(&self) {
        self.last.store(self.shared.now_ms(), Relaxed);
    }

    /// Notes the outcome of a write or flush: progress clears the stall, a pending one
    /// starts it (if not started yet).
    fn wrote<V>(&self, r: &Poll<io::Result<V>>, progress: bool) {
        match r {
            Poll::Pending => {
                if self.stalled.load(Relaxed) == NOT_STALLED {
                    self.stalled.store(self.shared.now_ms(), Relaxed);
                }
            }
            Poll::Ready(_) => {
                if self.stalled.load(Relaxed) != NOT_STALLED {
                    self.stalled.store(NOT_STALLED, Relaxed);
                }
                if progress {
                    self.touch();
                }
            }
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Activity<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.touch();
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Activity<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.wrote(&r, matches!(r, Poll::Ready(Ok(n)) if n > 0));
        r
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.wrote(&r, matches!(r, Poll::Ready(Ok(n)) if n > 0));
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_flush(cx);
        this.wrote(&r, false);
        r
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
