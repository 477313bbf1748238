//! The balancer's HL7 message relay for `failover` services in `mode = "mllp"`.
//!
//! The relay terminates senders' MLLP connections on the service's VIP:port and relays
//! message by message to the listener the controller's failover scheduler made active,
//! over its own connections. Each message (one in flight per sender connection, as MLLP
//! requires) is held in memory until that listener's ACK arrives; the ACK goes back to the
//! sender unchanged, exactly once. When the listener fails before ACKing (reset, timeout,
//! garbage, health check down) the held message waits for the scheduler's next choice and
//! is replayed there; the sender's connection stays open. A replay is a possible duplicate
//! at the listeners: it is logged with the control ID only and counted.
//!
//! Passive health: a reset, an ACK timeout, an answer that is not an ACK, or an AE/AR rate
//! above `nack_threshold` fails the listener; the relay reports it as a [`ListenerFailure`]
//! and the controller takes it out (its own health check brings it back).
//!
//! The relay runs on a thread of its own with a single-threaded runtime: one core serves
//! every sender and listener connection, and the controller's loop never waits for it
//! (nor it for the controller, beyond [`Relay::set_active`]).
//!
//! Message bytes exist only in memory while in flight: no log line, error, metric or
//! failure report holds any; logs carry control ID, message type, sizes, times and codes.
//!
//! ```no_run
//! # async fn f() -> Result<(), balancer_mllp::RelayError> {
//! use balancer_mllp::{MllpConfig, Relay, ServiceConfig};
//! let (relay, mut failures) = Relay::start(vec![ServiceConfig {
//!     name: "hl7".into(),
//!     vip: "10.0.0.100:6661".parse().unwrap(),
//!     limits: MllpConfig::default(),
//! }])
//! .await?;
//! relay.set_active("hl7", Some("10.0.0.11:6661".parse().unwrap()));
//! while let Some(f) = failures.recv().await {
//!     // The scheduler picks the next listener.
//!     relay.set_active(&f.service, Some("10.0.0.12:6661".parse().unwrap()));
//! }
//! # Ok(()) }
//! ```

#![warn(missing_docs)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

mod config;
mod metrics;
mod relay;

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::sync::mpsc;

pub use config::MllpConfig;
pub use metrics::{ACK_CODES, ACK_LATENCY_BUCKETS, ListenerMetrics, Metrics, ServiceMetrics};

use relay::Svc;

/// One relayed service.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceConfig {
    /// Service name (as in the controller's file).
    pub name: String,
    /// Address to listen on for senders.
    pub vip: SocketAddr,
    /// Limits and timeouts.
    pub limits: MllpConfig,
}

/// Why the relay could not start.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// A service's limits are out of range.
    #[error("service {service}: {problems}")]
    Invalid {
        /// Service name.
        service: String,
        /// The problems, joined.
        problems: String,
    },
    /// Two services have the same name.
    #[error("service {0} is defined twice")]
    Duplicate(String),
    /// The relay's thread or runtime could not be started.
    #[error("cannot start the relay thread: {0}")]
    Thread(std::io::Error),
    /// The listening socket could not be opened.
    #[error("service {service}: cannot listen on {address}: {source}")]
    Bind {
        /// Service name.
        service: String,
        /// Address.
        address: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
}

/// Why the relay failed a listener (passive health).
#[derive(Debug, Clone, PartialEq)]
pub enum FailReason {
    /// The connection could not be opened.
    Connect(std::io::ErrorKind),
    /// Opening the connection took longer than `connect_timeout`.
    ConnectTimeout(Duration),
    /// The listener closed the connection before its ACK.
    Closed,
    /// A read or write failed (reset, broken pipe).
    Io(std::io::ErrorKind),
    /// No ACK within `ack_timeout` while the connection stayed open.
    AckTimeout(Duration),
    /// The answer was not an HL7 ACK (what was wrong, never its bytes).
    Garbage(String),
    /// AE/AR among its recent ACKs above `nack_threshold`.
    NackRate(f64),
}

impl fmt::Display for FailReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FailReason::Connect(k) => write!(f, "connect failed: {k}"),
            FailReason::ConnectTimeout(d) => write!(f, "connect timed out after {d:?}"),
            FailReason::Closed => write!(f, "connection closed before the ACK"),
            FailReason::Io(k) => write!(f, "connection failed before the ACK: {k}"),
            FailReason::AckTimeout(d) => write!(f, "no ACK within {d:?}"),
            FailReason::Garbage(w) => write!(f, "answer is not an HL7 ACK: {w}"),
            FailReason::NackRate(r) => {
                write!(f, "AE/AR rate {:.0}% above the threshold", r * 100.0)
            }
        }
    }
}

/// A listener the relay failed: the controller takes it out of the failover choice.
#[derive(Debug, Clone, PartialEq)]
pub struct ListenerFailure {
    /// Service name.
    pub service: String,
    /// The listener.
    pub listener: SocketAddr,
    /// Why.
    pub reason: FailReason,
}

/// A running relay.
pub struct Relay {
    /// The services in force, shared with every [`MetricsHandle`].
    services: Arc<ArcSwap<Vec<Arc<Svc>>>>,
    failures: mpsc::Sender<ListenerFailure>,
    /// The relay thread's runtime: accept loops of services added by a reload start there.
    rt: tokio::runtime::Handle,
    /// Dropped (by [`Relay::shutdown`] or with the relay): the relay thread ends.
    _exit: tokio::sync::oneshot::Sender<()>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Relay {
    fn drop(&mut self) {
        for s in self.services.load().iter() {
            let _ = s.stop.send(true);
        }
    }
}

/// A checked change of the relay's services, made by [`Relay::prepare`]: every limit
/// validated and every new VIP bound. Applied by [`Relay::commit`]; dropped, it changes
/// nothing (the new sockets close).
#[must_use = "an update does nothing until committed"]
pub struct Update {
    /// The services in the new order: kept ones with their new limits, or new ones with
    /// the socket to serve.
    next: Vec<(Arc<Svc>, Option<MllpConfig>, Option<std::net::TcpListener>)>,
    /// Services that go away: they stop accepting; held messages finish.
    removed: Vec<Arc<Svc>>,
}

impl Update {
    /// How many services are added, kept and removed, for the reload's log line.
    pub fn summary(&self) -> (usize, usize, usize) {
        let added = self.next.iter().filter(|(_, _, s)| s.is_some()).count();
        (added, self.next.len() - added, self.removed.len())
    }
}

impl fmt::Debug for Update {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (added, kept, removed) = self.summary();
        f.debug_struct("Update")
            .field("added", &added)
            .field("kept", &kept)
            .field("removed", &removed)
            .finish()
    }
}

impl Relay {
    /// Validates the services, binds every VIP:port and starts serving. Returns the relay
    /// and the stream of listener failures, which the caller's scheduler answers with
    /// [`Relay::set_active`]. Until then no listener is active and messages are held.
    /// An empty list is fine: services may come with a later [`Relay::prepare`].
    pub async fn start(
        services: Vec<ServiceConfig>,
    ) -> Result<(Relay, mpsc::Receiver<ListenerFailure>), RelayError> {
        let (tx, rx) = mpsc::channel(64);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(RelayError::Thread)?;
        let handle = rt.handle().clone();
        let (exit, exit_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("mllp-relay".into())
            .spawn(move || {
                rt.block_on(async move {
                    let _ = exit_rx.await;
                });
                // Dropping the runtime closes whatever connection is still open.
            })
            .map_err(RelayError::Thread)?;
        let relay = Relay {
            services: Arc::new(ArcSwap::from_pointee(Vec::new())),
            failures: tx,
            rt: handle,
            _exit: exit,
            thread: Some(thread),
        };
        let update = relay.prepare(services)?;
        relay.commit(update);
        Ok((relay, rx))
    }

    /// Checks a new list of services against the running ones, without changing anything:
    /// limits validated, names unique, every new VIP:port bound (a VIP not yet on an
    /// interface is fine: the socket is bound with `IP_FREEBIND`). A service keeps running
    /// (its senders' connections stay open) when its name and VIP are unchanged, whatever
    /// its limits; a renamed service on the same VIP takes the old socket over.
    pub fn prepare(&self, services: Vec<ServiceConfig>) -> Result<Update, RelayError> {
        let old = self.services.load_full();
        let mut next = Vec::new();
        for s in &services {
            s.limits.validate().map_err(|p| RelayError::Invalid {
                service: s.name.clone(),
                problems: p.join("; "),
            })?;
            if services.iter().filter(|o| o.name == s.name).count() > 1 {
                return Err(RelayError::Duplicate(s.name.clone()));
            }
            let bind_err = |source| RelayError::Bind {
                service: s.name.clone(),
                address: s.vip,
                source,
            };
            if let Some(kept) = old
                .iter()
                .find(|o| *o.name == *s.name && o.configured == s.vip)
            {
                next.push((kept.clone(), Some(s.limits.clone()), None));
                continue;
            }
            // A VIP the relay already holds for a service that goes (or is renamed).
            let socket = match old
                .iter()
                .find(|o| s.vip.port() != 0 && o.configured == s.vip)
            {
                Some(o) => o.socket.try_clone().map_err(bind_err)?,
                None => bind(s.vip).map_err(bind_err)?,
            };
            let handover = socket.try_clone().map_err(bind_err)?;
            let svc = Svc::new(
                &s.name,
                s.vip,
                socket,
                s.limits.clone(),
                self.failures.clone(),
            )
            .map_err(bind_err)?;
            next.push((Arc::new(svc), None, Some(handover)));
        }
        let removed = old
            .iter()
            .filter(|o| !next.iter().any(|(n, _, _)| Arc::ptr_eq(n, o)))
            .cloned()
            .collect();
        Ok(Update { next, removed })
    }

    /// Applies a prepared update: new services start accepting, kept ones take their new
    /// limits, removed ones stop accepting (their senders between messages are closed, the
    /// held messages finish). Cannot fail.
    pub fn commit(&self, update: Update) {
        let Update { next, removed } = update;
        let mut list = Vec::with_capacity(next.len());
        for (svc, limits, socket) in next {
            if let Some(limits) = limits {
                svc.set_limits(limits, &self.rt);
            }
            if let Some(socket) = socket {
                let s = svc.clone();
                self.rt.spawn(async move {
                    match TcpListener::from_std(socket) {
                        Ok(tcp) => {
                            tracing::info!(service = %s.name, address = %s.vip, "mllp relay listening");
                            relay::accept_loop(s, tcp).await;
                        }
                        Err(e) => {
                            tracing::error!(service = %s.name, address = %s.vip, error = %e, "mllp relay: cannot serve the socket");
                        }
                    }
                });
            }
            list.push(svc);
        }
        for s in removed {
            tracing::info!(service = %s.name, address = %s.vip, "mllp relay: service removed; held messages finish");
            let _ = s.stop.send(true);
        }
        self.services.store(Arc::new(list));
    }

    /// Sets the listener a service's messages go to (`None`: none usable, messages wait up
    /// to `hold_timeout`). A message waiting on another listener is replayed to this one.
    /// Unknown services are ignored.
    pub fn set_active(&self, service: &str, listener: Option<SocketAddr>) {
        if let Some(s) = self.services.load().iter().find(|s| &*s.name == service) {
            s.set_active(listener);
        }
    }

    /// The bound address of a service (useful when configured with port 0).
    pub fn local_addr(&self, service: &str) -> Option<SocketAddr> {
        self.services
            .load()
            .iter()
            .find(|s| &*s.name == service)
            .map(|s| s.vip)
    }

    /// The services' names, VIPs (as configured) and limits.
    pub fn services(&self) -> Vec<ServiceConfig> {
        self.services
            .load()
            .iter()
            .map(|s| ServiceConfig {
                name: s.name.to_string(),
                vip: s.configured,
                limits: MllpConfig::clone(&s.cfg()),
            })
            .collect()
    }

    /// A snapshot of the counters.
    pub fn metrics(&self) -> Metrics {
        self.metrics_handle().snapshot()
    }

    /// A handle that reads the counters from anywhere (status readers, the metrics endpoint).
    pub fn metrics_handle(&self) -> MetricsHandle {
        MetricsHandle(self.services.clone())
    }

    /// Stops accepting and lets held messages finish for up to `grace`; then closes the rest
    /// (their senders get no ACK and resend).
    pub async fn shutdown(mut self, grace: Duration) {
        let deadline = tokio::time::Instant::now() + grace;
        let services = self.services.load_full();
        // Senders between messages close at once; the ones with a message in flight finish it.
        for s in services.iter() {
            let _ = s.stop.send(true);
        }
        while tokio::time::Instant::now() < deadline
            && services
                .iter()
                .any(|s| s.counters.in_flight.load(Relaxed) > 0)
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let thread = self.thread.take();
        drop(self);
        if let Some(t) = thread {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
    }
}

/// A non-blocking listening socket on `addr` with SO_REUSEADDR (as a restarted controller
/// needs) and IP_FREEBIND (a VIP a reload adds is bound before the controller puts it on
/// the interface, or while keepalived holds it on the other balancer of a pair).
fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    s.set_reuse_address(true)?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
        s.set_freebind_v6(true)?;
    } else {
        s.set_freebind_v4(true)?;
    }
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(1024)?;
    Ok(s.into())
}

/// Reads the relay's counters without the [`Relay`] itself.
#[derive(Clone)]
pub struct MetricsHandle(Arc<ArcSwap<Vec<Arc<Svc>>>>);

impl MetricsHandle {
    /// A snapshot of the counters.
    pub fn snapshot(&self) -> Metrics {
        Metrics {
            services: self
                .0
                .load()
                .iter()
                .map(|s| s.counters.snapshot(&s.name, s.vip, *s.active.borrow()))
                .collect(),
        }
    }
}

impl fmt::Debug for MetricsHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MetricsHandle").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests;
