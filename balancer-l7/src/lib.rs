//! The balancer's layer-7 part, embedded by the controller: TLS termination (rustls, ring)
//! with SNI, routing by host and path prefix to pools of HTTP/1.1 or h2 backends (plain or
//! TLS), passive failover on connect errors, an HTTP-to-HTTPS redirect listener, an access
//! log without query strings, and certificate reload without dropping connections.
//!
//! ```no_run
//! # async fn f(toml_text: &str) -> anyhow::Result<()> {
//! let cfg: balancer_l7::L7Config = toml::from_str(toml_text)?;
//! let l7 = balancer_l7::L7::start(cfg).await?;
//! l7.set_backend_health("ui", "10.0.0.11:8080".parse()?, false);
//! l7.shutdown(std::time::Duration::from_secs(10)).await;
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

mod config;
mod metrics;
mod pool;
mod proxy;
mod route;
mod server;
mod tls;

pub use tls::provider as server_crypto_provider;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::sync::mpsc;

pub use config::{
    BackendConfig, BackendProtocol, CertificateConfig, ForwardedFor, L7Config, ListenerConfig,
    PoolConfig, RedirectConfig, RouteConfig, Scheme, Selection, Sticky, TlsVersion, UnknownSni,
};
pub use metrics::{BackendMetrics, LATENCY_BUCKETS, Metrics, RouteMetrics};
pub use tls::CertError;

use crate::route::Snapshot;
use crate::server::{Kind, Shared};

/// A running layer-7 proxy.
pub struct L7 {
    shared: Arc<Shared>,
    listeners: HashMap<String, SocketAddr>,
    redirects: Vec<SocketAddr>,
    drain_tx: mpsc::Sender<()>,
    drain_rx: mpsc::Receiver<()>,
    watcher: Option<tokio::task::JoinHandle<()>>,
    /// The proxy's own runtime, on its own thread(s): a request's tasks never wait for the
    /// controller's work, and with one thread no task hops between threads.
    runtime: Runtime,
}

/// The proxy's runtime and the thread that drives it; stops (closing whatever is still open)
/// when dropped.
struct Runtime {
    handle: tokio::runtime::Handle,
    exit: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Runtime {
    fn start(threads: usize) -> anyhow::Result<Runtime> {
        let mut b = if threads <= 1 {
            tokio::runtime::Builder::new_current_thread()
        } else {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(threads);
            b
        };
        let rt = b
            .enable_all()
            .thread_name("l7")
            .build()
            .context("l7: building the runtime")?;
        let handle = rt.handle().clone();
        let (exit, exit_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("l7".into())
            .spawn(move || {
                rt.block_on(async move {
                    let _ = exit_rx.await;
                });
            })
            .context("l7: starting its thread")?;
        Ok(Runtime {
            handle,
            exit: Some(exit),
            thread: Some(thread),
        })
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        drop(self.exit.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn invalid(errs: Vec<String>) -> anyhow::Error {
    anyhow::anyhow!("invalid [l7] configuration:\n  {}", errs.join("\n  "))
}

/// Builds every listener's TLS configuration; the first unusable certificate is an error.
fn build_tls(cfg: &L7Config) -> anyhow::Result<HashMap<String, Arc<rustls::ServerConfig>>> {
    cfg.listeners
        .iter()
        .map(|l| {
            let c = tls::server_config(l)
                .with_context(|| format!("listener {}: certificate refused", l.name))?;
            Ok((l.name.clone(), c))
        })
        .collect()
}

/// Reads the proxy's counters from anywhere (see [`L7::metrics_handle`]).
#[derive(Clone)]
pub struct MetricsHandle(Arc<Shared>);

impl MetricsHandle {
    /// A snapshot of the counters.
    pub fn snapshot(&self) -> Metrics {
        self.0.registry.snapshot()
    }
}

impl std::fmt::Debug for MetricsHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetricsHandle").finish_non_exhaustive()
    }
}

/// A configuration checked by [`L7::prepare`], not live yet.
pub struct Prepared {
    cfg: L7Config,
    tls: HashMap<String, Arc<rustls::ServerConfig>>,
    snapshot: Snapshot,
}

impl std::fmt::Debug for Prepared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prepared").finish_non_exhaustive()
    }
}

impl L7 {
    /// Validates the configuration, loads certificates, binds every listener and starts serving.
    pub async fn start(cfg: L7Config) -> anyhow::Result<L7> {
        cfg.validate().map_err(invalid)?;
        let tls = build_tls(&cfg)?;
        let registry = metrics::Registry::default();
        let health = pool::HealthMap::default();
        let snapshot = Snapshot::build(&cfg, &health, &registry)?;
        let runtime = Runtime::start(cfg.threads)?;
        // Bound on the proxy's runtime (its I/O driver owns the sockets).
        let bind = |addr: SocketAddr| {
            let h = runtime.handle.spawn(TcpListener::bind(addr));
            async move { h.await.map_err(std::io::Error::other)? }
        };
        let mut bound = Vec::new();
        for l in &cfg.listeners {
            let tcp = bind(l.address)
                .await
                .with_context(|| format!("listener {}: bind {}", l.name, l.address))?;
            bound.push((Kind::Tls(Arc::from(l.name.as_str())), tcp));
        }
        for r in &cfg.redirects {
            let tcp = bind(r.address)
                .await
                .with_context(|| format!("redirect listener: bind {}", r.address))?;
            bound.push((Kind::Redirect(r.clone()), tcp));
        }
        let tls = tls.into_iter().map(|(k, v)| (k, ArcSwap::new(v))).collect();
        let shared = Arc::new(Shared::new(snapshot, cfg.clone(), tls, registry, health));
        let (drain_tx, drain_rx) = mpsc::channel(1);
        let mut listeners = HashMap::new();
        let mut redirects = Vec::new();
        for (kind, tcp) in bound {
            let addr = tcp.local_addr()?;
            match &kind {
                Kind::Tls(name) => {
                    listeners.insert(name.to_string(), addr);
                }
                Kind::Redirect(_) => redirects.push(addr),
            }
            tracing::info!(address = %addr, "l7 listener up");
            runtime.handle.spawn(server::accept_loop(
                shared.clone(),
                tcp,
                kind,
                drain_tx.clone(),
            ));
        }
        let watcher = Some(runtime.handle.spawn(watch_certificates(shared.clone())));
        Ok(L7 {
            shared,
            listeners,
            redirects,
            drain_tx,
            drain_rx,
            watcher,
            runtime,
        })
    }

    /// Swaps certificates, TLS policy, routes and pools atomically. Nothing changes if any
    /// certificate, key or CA is unusable: the old configuration keeps serving. The set of
    /// listeners (names and addresses) and redirect listeners cannot change without a restart.
    /// Requests in flight finish on the configuration they started with.
    pub async fn reload(&self, cfg: L7Config) -> anyhow::Result<()> {
        let prepared = self.prepare(cfg)?;
        self.commit(prepared);
        Ok(())
    }

    /// Everything [`L7::reload`] can refuse, done without changing anything: validation,
    /// the listener set, certificates, keys and CAs, routes and pools. [`L7::commit`] makes
    /// the result live; dropping it changes nothing.
    pub fn prepare(&self, cfg: L7Config) -> anyhow::Result<Prepared> {
        cfg.validate().map_err(invalid)?;
        let old = self.shared.config.load();
        let names = |c: &L7Config| {
            let mut v: Vec<(String, SocketAddr)> = c
                .listeners
                .iter()
                .map(|l| (l.name.clone(), l.address))
                .collect();
            v.sort();
            v
        };
        let redirects = |c: &L7Config| {
            let mut v: Vec<SocketAddr> = c.redirects.iter().map(|r| r.address).collect();
            v.sort();
            v
        };
        if names(&old) != names(&cfg) || redirects(&old) != redirects(&cfg) {
            anyhow::bail!("l7 listeners changed (name or address): a restart is needed");
        }
        if old.threads != cfg.threads {
            anyhow::bail!("l7 threads changed: a restart is needed");
        }
        let tls = build_tls(&cfg)?;
        let snapshot = Snapshot::build(&cfg, &self.shared.health, &self.shared.registry)?;
        Ok(Prepared { cfg, tls, snapshot })
    }

    /// Makes a prepared configuration live, atomically per listener.
    pub fn commit(&self, prepared: Prepared) {
        let Prepared { cfg, tls, snapshot } = prepared;
        for (name, c) in tls {
            if let Some(slot) = self.shared.tls.get(&name) {
                slot.store(c);
            }
        }
        self.shared.snapshot.store(Arc::new(snapshot));
        self.shared.config.store(Arc::new(cfg));
        tracing::info!("l7 configuration reloaded");
    }

    /// Marks a backend of a pool up or down (fed by the controller's health checks).
    /// Backends start up. Unknown pools or backends are remembered for a later reload.
    pub fn set_backend_health(&self, pool: &str, backend: SocketAddr, up: bool) {
        let mut h = self.shared.health.lock().unwrap_or_else(|p| p.into_inner());
        let flag = h
            .entry((pool.to_string(), backend))
            .or_insert_with(|| Arc::new(std::sync::atomic::AtomicBool::new(up)));
        if flag.swap(up, Relaxed) != up {
            tracing::info!(pool, backend = %backend, up, "l7 backend health changed");
        }
    }

    /// The bound address of a TLS listener (useful when configured with port 0).
    pub fn listener_addr(&self, name: &str) -> Option<SocketAddr> {
        self.listeners.get(name).copied()
    }

    /// The bound addresses of the redirect listeners, in configuration order.
    pub fn redirect_addrs(&self) -> &[SocketAddr] {
        &self.redirects
    }

    /// A handle on the counters that any task can read without the `L7` itself.
    pub fn metrics_handle(&self) -> MetricsHandle {
        MetricsHandle(self.shared.clone())
    }

    /// A snapshot of the counters.
    pub fn metrics(&self) -> Metrics {
        self.shared.registry.snapshot()
    }

    /// Stops accepting, lets in-flight requests finish for up to `grace`, then closes what is left.
    pub async fn shutdown(self, grace: Duration) {
        let L7 {
            shared,
            drain_tx,
            mut drain_rx,
            watcher,
            runtime,
            ..
        } = self;
        if let Some(w) = watcher {
            w.abort();
        }
        let _ = shared.soft_stop.send(true);
        drop(drain_tx);
        if tokio::time::timeout(grace, drain_rx.recv()).await.is_err() {
            tracing::warn!("l7 drain grace expired; closing remaining connections");
            let _ = shared.hard_stop.send(true);
            let _ = tokio::time::timeout(Duration::from_secs(1), drain_rx.recv()).await;
        }
        // Stopping the runtime joins its thread: not on the caller's async thread.
        let _ = tokio::task::spawn_blocking(move || drop(runtime)).await;
    }
}

/// Modification time and length of every certificate and key file, to spot a change.
fn cert_files_stamp(cfg: &L7Config) -> Vec<Option<(SystemTime, u64)>> {
    cfg.listeners
        .iter()
        .flat_map(|l| l.certificates.iter())
        .flat_map(|c| [&c.cert, &c.key])
        .map(|p| {
            std::fs::metadata(p)
                .ok()
                .and_then(|m| Some((m.modified().ok()?, m.len())))
        })
        .collect()
}

/// Reloads certificates when their files change; a bad one is logged and the old one kept.
async fn watch_certificates(shared: Arc<Shared>) {
    let mut last = cert_files_stamp(&shared.config.load());
    loop {
        let every = shared.config.load().cert_watch_interval;
        if every.is_zero() {
            tokio::time::sleep(Duration::from_secs(5)).await;
            continue;
        }
        tokio::time::sleep(every).await;
        let cfg = shared.config.load_full();
        let now = cert_files_stamp(&cfg);
        if now == last {
            continue;
        }
        last = now;
        for l in &cfg.listeners {
            match tls::server_config(l) {
                Ok(c) => {
                    if let Some(slot) = shared.tls.get(&l.name) {
                        slot.store(c);
                        tracing::info!(listener = %l.name, "certificates reloaded from disk");
                    }
                }
                Err(e) => {
                    tracing::error!(listener = %l.name, error = %e, "certificate change refused; the old one keeps serving");
                }
            }
        }
    }
}
