//! Pools: backends, their health, selection among the healthy ones, and pooled connections.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::config::{BackendProtocol, PoolConfig, Scheme, Selection, Sticky};
use crate::metrics::{BackendCounters, Registry};
use crate::tls;

/// Boxed error of proxied bodies.
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Body type on both sides of the proxy.
pub(crate) type Body = UnsyncBoxBody<Bytes, BoxError>;

/// A byte stream to a backend, plain or TLS.
pub(crate) trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

/// Why no connection to a backend could be had.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnectError {
    #[error("connect timed out")]
    Timeout,
    #[error("connect: {0}")]
    Tcp(std::io::Error),
    #[error("tls: {0}")]
    Tls(std::io::Error),
    #[error("http handshake: {0}")]
    Http(hyper::Error),
}

/// A request sender on a backend connection.
pub(crate) enum Sender {
    H1 {
        tx: http1::SendRequest<Body>,
        /// Taken from the idle list (may have been closed by the backend meanwhile).
        reused: bool,
    },
    H2(http2::SendRequest<Body>),
}

/// One backend of a pool.
pub(crate) struct Backend {
    pub(crate) addr: SocketAddr,
    pub(crate) weight: u32,
    server_name: ServerName<'static>,
    /// Health as fed by the controller; shared across reloads.
    pub(crate) up: Arc<AtomicBool>,
    pub(crate) outstanding: AtomicUsize,
    /// Milliseconds since `epoch` until which the backend is skipped after a failed connect.
    failed_until_ms: AtomicU64,
    epoch: Instant,
    /// Opaque value of the stickiness cookie naming this backend.
    pub(crate) sticky_id: String,
    idle_h1: Mutex<Vec<(http1::SendRequest<Body>, Instant)>>,
    h2: tokio::sync::Mutex<Option<http2::SendRequest<Body>>>,
    pub(crate) counters: Arc<BackendCounters>,
}

/// A pool: configuration, TLS client and backends.
pub(crate) struct Pool {
    pub(crate) name: String,
    pub(crate) cfg: PoolConfig,
    tls: Option<TlsConnector>,
    pub(crate) backends: Vec<Arc<Backend>>,
    rr: AtomicUsize,
}

fn hash_of(v: impl Hash) -> u64 {
    let mut h = DefaultHasher::new();
    v.hash(&mut h);
    h.finish()
}

/// Shared health flags, keyed by (pool, backend), kept across reloads.
pub(crate) type HealthMap = Mutex<std::collections::HashMap<(String, SocketAddr), Arc<AtomicBool>>>;

impl Pool {
    /// Builds a pool, reading its CA file.
    pub(crate) fn new(
        cfg: &PoolConfig,
        health: &HealthMap,
        registry: &Registry,
    ) -> anyhow::Result<Pool> {
        let tls = match (cfg.scheme, &cfg.ca) {
            (Scheme::Https, Some(ca)) => Some(TlsConnector::from(tls::backend_client_config(
                ca,
                cfg.protocol == BackendProtocol::H2,
            )?)),
            (Scheme::Https, None) => anyhow::bail!("pool {}: https needs a ca", cfg.name),
            _ => None,
        };
        let mut health = health.lock().unwrap_or_else(|p| p.into_inner());
        let epoch = Instant::now();
        let mut backends = Vec::new();
        for b in &cfg.backends {
            let name = b
                .server_name
                .clone()
                .or_else(|| cfg.server_name.clone())
                .unwrap_or_else(|| b.address.ip().to_string());
            let server_name = ServerName::try_from(name.clone())
                .map_err(|e| anyhow::anyhow!("pool {}: server name {name:?}: {e}", cfg.name))?;
            let up = health
                .entry((cfg.name.clone(), b.address))
                .or_insert_with(|| Arc::new(AtomicBool::new(true)))
                .clone();
            backends.push(Arc::new(Backend {
                addr: b.address,
                weight: b.weight,
                server_name,
                up,
                outstanding: AtomicUsize::new(0),
                failed_until_ms: AtomicU64::new(0),
                epoch,
                sticky_id: format!("{:016x}", hash_of((&cfg.name, b.address))),
                idle_h1: Mutex::new(Vec::new()),
                h2: tokio::sync::Mutex::new(None),
                counters: registry.backend(&cfg.name, b.address),
            }));
        }
        Ok(Pool {
            name: cfg.name.clone(),
            cfg: cfg.clone(),
            tls,
            backends,
            rr: AtomicUsize::new(0),
        })
    }

    fn candidates(&self, tried: &[usize], honour_cooldown: bool) -> Vec<usize> {
        (0..self.backends.len())
            .filter(|i| {
                let b = &self.backends[*i];
                b.up.load(Relaxed)
                    && b.weight > 0
                    && !tried.contains(i)
                    && (!honour_cooldown || !b.cooling_down())
            })
            .collect()
    }

    /// Picks a backend among the healthy ones not yet tried for this request.
    ///
    /// `sticky` is the cookie value presented by the client or a hash of its address.
    pub(crate) fn select(&self, tried: &[usize], sticky: Option<&StickyKey>) -> Option<usize> {
        let mut cands = self.candidates(tried, true);
        if cands.is_empty() {
            cands = self.candidates(tried, false);
        }
        if cands.is_empty() {
            return None;
        }
        match sticky {
            Some(StickyKey::Cookie(v)) => {
                if let Some(i) = cands.iter().find(|i| self.backends[**i].sticky_id == *v) {
                    return Some(*i);
                }
            }
            Some(StickyKey::Source(h)) => {
                // Rendezvous hashing: only the clients of a lost backend move.
                return cands
                    .iter()
                    .copied()
                    .max_by_key(|i| hash_of((h, &self.backends[*i].sticky_id)));
            }
            None => {}
        }
        let n = self.rr.fetch_add(1, Relaxed);
        match self.cfg.selection {
            Selection::RoundRobin => {
                let total: u64 = cands
                    .iter()
                    .map(|i| u64::from(self.backends[*i].weight))
                    .sum();
                let mut at = (n as u64) % total.max(1);
                for i in &cands {
                    let w = u64::from(self.backends[*i].weight);
                    if at < w {
                        return Some(*i);
                    }
                    at -= w;
                }
                cands.first().copied()
            }
            Selection::LeastOutstanding => {
                // Start the scan at a rotating offset so ties spread out.
                let len = cands.len();
                let mut best = cands[n % len];
                for k in 0..len {
                    let i = cands[(n + k) % len];
                    let (a, b) = (&self.backends[i], &self.backends[best]);
                    let lhs = a.outstanding.load(Relaxed) as u64 * u64::from(b.weight);
                    let rhs = b.outstanding.load(Relaxed) as u64 * u64::from(a.weight);
                    if lhs < rhs {
                        best = i;
                    }
                }
                Some(best)
            }
        }
    }

    /// Opens a byte stream to a backend (TCP, then TLS for `https`), bounded by `connect_timeout`.
    async fn open(&self, b: &Backend) -> Result<Box<dyn Io>, ConnectError> {
        let fut = async {
            let tcp = TcpStream::connect(b.addr)
                .await
                .map_err(ConnectError::Tcp)?;
            let _ = tcp.set_nodelay(true);
            match &self.tls {
                None => Ok(Box::new(tcp) as Box<dyn Io>),
                Some(c) => {
                    let s = c
                        .connect(b.server_name.clone(), tcp)
                        .await
                        .map_err(ConnectError::Tls)?;
                    Ok(Box::new(s) as Box<dyn Io>)
                }
            }
        };
        tokio::time::timeout(self.cfg.connect_timeout, fut)
            .await
            .map_err(|_| ConnectError::Timeout)?
    }

    /// A sender to backend `b`: an idle pooled one, the shared h2 one, or a new connection.
    /// `upgrade` asks for a fresh HTTP/1.1 connection that supports protocol upgrades.
    /// `fresh` skips idle connections (one just turned out closed).
    pub(crate) async fn checkout(
        &self,
        b: &Backend,
        upgrade: bool,
        fresh: bool,
    ) -> Result<Sender, ConnectError> {
        if upgrade || self.cfg.protocol == BackendProtocol::Http1 {
            if !upgrade
                && !fresh
                && let Some(tx) = b.take_idle(self.cfg.idle_timeout)
            {
                return Ok(Sender::H1 { tx, reused: true });
            }
            return Ok(Sender::H1 {
                tx: self.connect_h1(b, upgrade).await?,
                reused: false,
            });
        }
        let mut slot = b.h2.lock().await;
        if let Some(tx) = slot.as_ref()
            && !tx.is_closed()
            && !fresh
        {
            return Ok(Sender::H2(tx.clone()));
        }
        let io = self.open(b).await?;
        let (tx, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(Duration::from_secs(30))
            .handshake(TokioIo::new(io))
            .await
            .map_err(ConnectError::Http)?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "backend h2 connection ended");
            }
        });
        *slot = Some(tx.clone());
        Ok(Sender::H2(tx))
    }

    /// A new HTTP/1.1 connection.
    pub(crate) async fn connect_h1(
        &self,
        b: &Backend,
        upgrade: bool,
    ) -> Result<http1::SendRequest<Body>, ConnectError> {
        let io = self.open(b).await?;
        let (tx, conn) = http1::Builder::new()
            .handshake(TokioIo::new(io))
            .await
            .map_err(ConnectError::Http)?;
        tokio::spawn(async move {
            let r = if upgrade {
                conn.with_upgrades().await
            } else {
                conn.await
            };
            if let Err(e) = r {
                tracing::debug!(error = %e, "backend connection ended");
            }
        });
        Ok(tx)
    }
}

/// What stickiness keys a request on.
pub(crate) enum StickyKey {
    Cookie(String),
    Source(u64),
}

impl StickyKey {
    pub(crate) fn source(ip: std::net::IpAddr) -> StickyKey {
        StickyKey::Source(hash_of(ip))
    }
}

impl Pool {
    /// The stickiness key of a request, if the pool is sticky.
    pub(crate) fn sticky_key(
        &self,
        headers: &http::HeaderMap,
        client: SocketAddr,
    ) -> Option<StickyKey> {
        match self.cfg.sticky {
            Sticky::None => None,
            Sticky::Source => Some(StickyKey::source(client.ip())),
            Sticky::Cookie => cookie_value(headers, &self.cfg.sticky_cookie).map(StickyKey::Cookie),
        }
    }
}

/// The value of cookie `name` in the request's `Cookie` headers.
fn cookie_value(headers: &http::HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
}

impl Backend {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn cooling_down(&self) -> bool {
        self.failed_until_ms.load(Relaxed) > self.now_ms()
    }

    /// Records a failed connect: skipped for `cooldown` unless nothing else is left.
    pub(crate) fn connect_failed(&self, cooldown: Duration) {
        self.counters.connect_failures.fetch_add(1, Relaxed);
        let until = self.now_ms() + u64::try_from(cooldown.as_millis()).unwrap_or(u64::MAX / 2);
        self.failed_until_ms.store(until, Relaxed);
    }

    fn take_idle(&self, max_age: Duration) -> Option<http1::SendRequest<Body>> {
        let mut idle = self.idle_h1.lock().unwrap_or_else(|p| p.into_inner());
        while let Some((tx, since)) = idle.pop() {
            if since.elapsed() < max_age && tx.is_ready() {
                return Some(tx);
            }
        }
        None
    }

    /// Returns a connection whose exchange completed to the idle list.
    pub(crate) fn checkin(&self, tx: http1::SendRequest<Body>, max_idle: usize, max_age: Duration) {
        if tx.is_closed() {
            return;
        }
        let mut idle = self.idle_h1.lock().unwrap_or_else(|p| p.into_inner());
        // Old or closed connections at the bottom of the stack are dropped here (one clock
        // read, not one per idle connection).
        let now = Instant::now();
        idle.retain(|(t, since)| !t.is_closed() && now.duration_since(*since) < max_age);
        if idle.len() < max_idle {
            idle.push((tx, now));
        }
    }
}

/// Decrements a backend's in-flight count when dropped.
pub(crate) struct InFlight(pub(crate) Arc<Backend>);

impl InFlight {
    pub(crate) fn new(b: Arc<Backend>) -> InFlight {
        b.outstanding.fetch_add(1, Relaxed);
        b.counters.requests.fetch_add(1, Relaxed);
        InFlight(b)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.outstanding.fetch_sub(1, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::L7Config;

    fn pool(toml_src: &str) -> Pool {
        let cfg: L7Config = toml::from_str(toml_src).unwrap();
        Pool::new(&cfg.pools[0], &HealthMap::default(), &Registry::default()).unwrap()
    }

    const THREE: &str = r#"
        [[pool]]
        name = "p"
        [[pool.backend]]
        address = "127.0.0.1:1"
        [[pool.backend]]
        address = "127.0.0.1:2"
        weight = 2
        [[pool.backend]]
        address = "127.0.0.1:3"
    "#;

    #[test]
    fn weighted_round_robin_skips_down_and_tried() {
        let p = pool(THREE);
        let mut counts = [0; 3];
        for _ in 0..400 {
            counts[p.select(&[], None).unwrap()] += 1;
        }
        assert_eq!(counts, [100, 200, 100]);
        p.backends[1].up.store(false, Relaxed);
        for _ in 0..10 {
            let i = p.select(&[0], None).unwrap();
            assert_eq!(i, 2);
        }
        assert_eq!(p.select(&[0, 2], None), None);
    }

    #[test]
    fn cooldown_is_relaxed_when_nothing_else_is_left() {
        let p = pool(THREE);
        p.backends[0].connect_failed(Duration::from_secs(60));
        for _ in 0..10 {
            assert_ne!(p.select(&[], None), Some(0));
        }
        assert_eq!(p.select(&[1, 2], None), Some(0));
    }

    #[test]
    fn source_stickiness_is_stable_and_moves_only_lost_clients() {
        let p = pool(THREE);
        let k = StickyKey::source("10.1.2.3".parse().unwrap());
        let first = p.select(&[], Some(&k)).unwrap();
        for _ in 0..5 {
            assert_eq!(p.select(&[], Some(&k)), Some(first));
        }
        let other = (first + 1) % 3;
        p.backends[other].up.store(false, Relaxed);
        assert_eq!(p.select(&[], Some(&k)), Some(first));
    }

    #[test]
    fn cookie_value_is_parsed() {
        let mut h = http::HeaderMap::new();
        h.append(
            http::header::COOKIE,
            "a=1; BALANCER_STICKY=abc".parse().unwrap(),
        );
        assert_eq!(cookie_value(&h, "BALANCER_STICKY").as_deref(), Some("abc"));
        assert_eq!(cookie_value(&h, "b"), None);
    }
}
