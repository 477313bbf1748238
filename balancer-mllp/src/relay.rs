//! One relayed service: the accept loop, one task per sender connection, and the delivery
//! of a held message to the active listener (and, when that one fails, to the next).

use std::collections::{HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;

use balancer_health::mllp::{self, FrameError, FrameLimits, Header};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::time::{Instant, timeout, timeout_at};
use tracing::{debug, info, warn};

use crate::metrics::{ACK_CODES, ListenerCounters, ServiceCounters};
use crate::{FailReason, ListenerFailure, MllpConfig};

/// What every task of one service shares.
pub(crate) struct Svc {
    pub(crate) name: Arc<str>,
    pub(crate) vip: SocketAddr,
    /// The address as configured (`vip` is the bound one: they differ for port 0).
    pub(crate) configured: SocketAddr,
    /// Limits and timeouts; a reload swaps them in place (sessions read them per message).
    cfg: ArcSwap<MllpConfig>,
    pub(crate) counters: ServiceCounters,
    /// The listener chosen by the failover scheduler; `None`: no usable one.
    pub(crate) active: watch::Sender<Option<SocketAddr>>,
    /// Bytes of held messages (permits are bytes).
    budget: Arc<Semaphore>,
    senders: Arc<Semaphore>,
    failures: mpsc::Sender<ListenerFailure>,
    /// Listeners already reported failed since the scheduler last chose: one report each.
    reported: Mutex<HashSet<SocketAddr>>,
    /// Recent ACKs per listener, `true` for AE/AR, for the NACK-rate rule.
    recent: Mutex<std::collections::HashMap<SocketAddr, VecDeque<bool>>>,
    /// True: stop accepting; senders between messages are closed, held messages finish.
    pub(crate) stop: watch::Sender<bool>,
    /// A duplicate of the listening socket, handed to the service that takes this VIP over
    /// in a reload (a renamed service), so the address is never unbound in between.
    pub(crate) socket: std::net::TcpListener,
}

impl Svc {
    pub(crate) fn new(
        name: &str,
        configured: SocketAddr,
        socket: std::net::TcpListener,
        cfg: MllpConfig,
        failures: mpsc::Sender<ListenerFailure>,
    ) -> std::io::Result<Svc> {
        let vip = socket.local_addr()?;
        // Validated: max_in_flight_bytes fits in u32, and semaphores take up to usize::MAX >> 3.
        let budget = Arc::new(Semaphore::new(cfg.max_in_flight_bytes));
        let senders = Arc::new(Semaphore::new(cfg.max_senders));
        Ok(Svc {
            name: Arc::from(name),
            vip,
            configured,
            cfg: ArcSwap::from_pointee(cfg),
            counters: ServiceCounters::default(),
            active: watch::Sender::new(None),
            budget,
            senders,
            failures,
            reported: Mutex::new(HashSet::new()),
            recent: Mutex::new(std::collections::HashMap::new()),
            stop: watch::Sender::new(false),
            socket,
        })
    }

    /// The limits in force.
    pub(crate) fn cfg(&self) -> arc_swap::Guard<Arc<MllpConfig>> {
        self.cfg.load()
    }

    /// A reload's new limits: timeouts and frame limits apply from each sender's next
    /// message; `max_in_flight_bytes` and `max_senders` grow at once and shrink as held
    /// bytes and senders leave (nothing in flight is cut; the wait runs on `rt`).
    pub(crate) fn set_limits(&self, new: MllpConfig, rt: &tokio::runtime::Handle) {
        let (bytes, senders) = (new.max_in_flight_bytes, new.max_senders);
        let old = self.cfg.swap(Arc::new(new));
        resize(&self.budget, old.max_in_flight_bytes, bytes, rt);
        resize(&self.senders, old.max_senders, senders, rt);
    }

    /// The scheduler's choice; a change re-arms failure reports and the NACK windows.
    pub(crate) fn set_active(&self, listener: Option<SocketAddr>) {
        let changed = self.active.send_if_modified(|a| {
            let changed = *a != listener;
            *a = listener;
            changed
        });
        if changed {
            self.reported
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clear();
            self.recent
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clear();
            info!(service = %self.name, listener = ?listener, "mllp relay: active listener");
        }
    }

    /// Fails a listener: counted always, reported to the scheduler once per choice.
    fn fail(&self, listener: SocketAddr, reason: FailReason, hdr: &Header) {
        self.counters
            .listener(listener)
            .failures
            .fetch_add(1, Relaxed);
        let first = self
            .reported
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(listener);
        warn!(service = %self.name, listener = %listener, control_id = %hdr.control_id, reason = %reason, "mllp relay: listener failed (passive health)");
        if first {
            let f = ListenerFailure {
                service: self.name.to_string(),
                listener,
                reason,
            };
            // Bounded: when the controller is behind, it already has a report to act on.
            if self.failures.try_send(f).is_err() {
                debug!(service = %self.name, listener = %listener, "failure report queue full");
            }
        }
    }

    /// Counts an ACK code; true when the listener's NACK rate is now above the threshold.
    fn note_ack(&self, listener: SocketAddr, code: &str) -> Option<f64> {
        let nack = matches!(code, "AE" | "AR");
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        let w = recent.entry(listener).or_default();
        let cfg = self.cfg();
        w.push_back(nack);
        while w.len() > cfg.nack_window {
            w.pop_front();
        }
        if w.len() < cfg.nack_window {
            return None;
        }
        let rate = w.iter().filter(|n| **n).count() as f64 / w.len() as f64;
        if rate > cfg.nack_threshold {
            w.clear();
            Some(rate)
        } else {
            None
        }
    }
}

/// The frame limits of a service's limits.
fn frame_limits(cfg: &MllpConfig) -> FrameLimits {
    FrameLimits {
        max_message: cfg.max_message_bytes,
        max_before_start: cfg.max_bytes_before_start,
    }
}

/// Grows a semaphore at once, or shrinks it by taking the difference as permits are
/// given back.
fn resize(sem: &Arc<Semaphore>, old: usize, new: usize, rt: &tokio::runtime::Handle) {
    if new > old {
        sem.add_permits(new - old);
    } else if new < old {
        let want = old - new;
        let gone = sem.forget_permits(want);
        if gone < want {
            let sem = sem.clone();
            // Validated limits fit in u32.
            let rest = u32::try_from(want - gone).unwrap_or(u32::MAX);
            rt.spawn(async move {
                if let Ok(p) = sem.acquire_many_owned(rest).await {
                    p.forget();
                }
            });
        }
    }
}

/// Resolves once the service is stopped (at once when it already is).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    // The borrow guard ends with this statement, not held across the caller's awaits.
    let _ = stop.wait_for(|s| *s).await;
}

/// Accepts sender connections until stopped.
pub(crate) async fn accept_loop(svc: Arc<Svc>, tcp: TcpListener) {
    let mut stop = svc.stop.subscribe();
    loop {
        let (stream, peer) = tokio::select! {
            r = tcp.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    warn!(service = %svc.name, error = %e, "mllp relay: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stopped(&mut stop) => return,
        };
        let Ok(permit) = svc.senders.clone().try_acquire_owned() else {
            svc.counters.senders_refused.fetch_add(1, Relaxed);
            warn!(service = %svc.name, sender = %peer, max_senders = svc.cfg().max_senders, "mllp relay: sender refused: max_senders reached");
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let svc = svc.clone();
        tokio::spawn(async move {
            svc.counters.senders_total.fetch_add(1, Relaxed);
            svc.counters.senders_connected.fetch_add(1, Relaxed);
            debug!(service = %svc.name, sender = %peer, "mllp relay: sender connected");
            let why = session(&svc, stream, peer).await;
            svc.counters.senders_connected.fetch_sub(1, Relaxed);
            debug!(service = %svc.name, sender = %peer, reason = why, "mllp relay: sender closed");
            drop(permit);
        });
    }
}

/// The relay's connection to one listener.
struct Upstream {
    addr: SocketAddr,
    io: BufReader<TcpStream>,
}

impl Upstream {
    /// A connection the listener closed (or wrote to unasked) while idle is not reused.
    fn is_stale(&self) -> bool {
        if !self.io.buffer().is_empty() {
            return true;
        }
        let mut b = [0u8; 1];
        !matches!(self.io.get_ref().try_read(&mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
    }
}

/// Serves one sender connection; returns why it ended.
async fn session(svc: &Svc, stream: TcpStream, peer: SocketAddr) -> &'static str {
    let (rd, mut wr) = stream.into_split();
    let mut rd = BufReader::with_capacity(16 * 1024, rd);
    let mut active = svc.active.subscribe();
    let mut up: Option<Upstream> = None;
    let mut stop = svc.stop.subscribe();
    loop {
        let cfg = svc.cfg.load_full();
        let limits = frame_limits(&cfg);
        // Between messages: wait (bounded) for the next one's first byte.
        let first = tokio::select! {
            r = timeout(cfg.idle_timeout, rd.fill_buf()) => r,
            _ = stopped(&mut stop) => return "relay stopping",
        };
        match first {
            Err(_) => {
                info!(service = %svc.name, sender = %peer, idle = ?cfg.idle_timeout, "mllp relay: idle sender closed");
                return "idle";
            }
            Ok(Err(_)) => return "read error",
            Ok(Ok([])) => return "closed by sender",
            Ok(Ok(_)) => {}
        }
        let started = Instant::now();
        let msg = match timeout(
            cfg.frame_timeout,
            mllp::read_frame_bounded(&mut rd, &limits),
        )
        .await
        {
            Ok(Ok(Some(m))) => m,
            Ok(Ok(None)) => return "closed by sender",
            Ok(Err(FrameError::Io(_))) => return "read error",
            Ok(Err(e)) => {
                svc.counters.frame_errors.fetch_add(1, Relaxed);
                warn!(service = %svc.name, sender = %peer, error = %e, "mllp relay: frame error; sender connection closed");
                return "frame error";
            }
            Err(_) => {
                svc.counters.frame_errors.fetch_add(1, Relaxed);
                warn!(service = %svc.name, sender = %peer, frame_timeout = ?cfg.frame_timeout, "mllp relay: sender stopped mid-frame; connection closed");
                return "mid-frame timeout";
            }
        };
        let hdr = mllp::header(&msg);
        let len = msg.len();
        // Back-pressure: the sender is not read again until its message fits in the budget.
        let Ok(permit) = svc.budget.acquire_many(len.max(1) as u32).await else {
            return "relay stopping";
        };
        svc.counters.in_flight.fetch_add(1, Relaxed);
        svc.counters.in_flight_bytes.fetch_add(len as u64, Relaxed);
        let ack = deliver(svc, &mut active, &mut up, &msg, &hdr).await;
        svc.counters.in_flight.fetch_sub(1, Relaxed);
        svc.counters.in_flight_bytes.fetch_sub(len as u64, Relaxed);
        drop(msg);
        drop(permit);
        let (ack, code, listener) = match ack {
            Ok(a) => a,
            Err(GiveUp::HoldTimeout) => {
                svc.counters.unacked.fetch_add(1, Relaxed);
                warn!(service = %svc.name, sender = %peer, control_id = %hdr.control_id, message_type = %hdr.message_type, bytes = len, hold_timeout = ?cfg.hold_timeout, "mllp relay: no listener ACKed in time; sender connection closed without an ACK so that it resends");
                return "no listener";
            }
            Err(GiveUp::Attempts(n)) => {
                svc.counters.unacked.fetch_add(1, Relaxed);
                warn!(service = %svc.name, sender = %peer, control_id = %hdr.control_id, message_type = %hdr.message_type, bytes = len, failed_listeners = n, "mllp relay: message failed at max_attempts listeners (a poison message?); given up, sender connection closed without an ACK");
                return "max attempts";
            }
        };
        // Counted before the ACK goes out, so that a sender holding its ACK sees it counted.
        svc.counters.relayed.fetch_add(1, Relaxed);
        if let Err(e) = wr.write_all(&mllp::frame(&ack)).await {
            svc.counters.relayed.fetch_sub(1, Relaxed);
            warn!(service = %svc.name, sender = %peer, control_id = %hdr.control_id, error = %e.kind(), "mllp relay: sender gone before its ACK");
            return "write error";
        }
        debug!(service = %svc.name, sender = %peer, listener = %listener, control_id = %hdr.control_id, message_type = %hdr.message_type, bytes = len, ack = %code, ack_bytes = ack.len(), took_us = started.elapsed().as_micros() as u64, "mllp relay: message ACKed");
    }
}

/// Why one attempt at a listener did not give an ACK.
enum Attempt {
    /// The scheduler chose another listener while waiting.
    Switched,
    /// The listener failed (reason), `sent` when the message was written to it.
    Failed(FailReason, bool),
}

/// Why a held message was given up.
enum GiveUp {
    /// No usable listener ACKed within `hold_timeout`.
    HoldTimeout,
    /// It failed at this many listeners after it was written to them (`max_attempts`).
    Attempts(u32),
}

/// Delivers a held message until a listener ACKs it: `(ack, code, listener)`, or why not.
async fn deliver(
    svc: &Svc,
    active: &mut watch::Receiver<Option<SocketAddr>>,
    up: &mut Option<Upstream>,
    msg: &[u8],
    hdr: &Header,
) -> Result<(Vec<u8>, String, SocketAddr), GiveUp> {
    let cfg = svc.cfg.load_full();
    let deadline = Instant::now() + cfg.hold_timeout;
    let mut failed_after_send = 0u32;
    let mut failed: Option<SocketAddr> = None;
    let mut sent_before = false;
    let mut attempt = 0u32;
    loop {
        let target = match *active.borrow_and_update() {
            Some(t) if Some(t) != failed => Some(t),
            _ => None,
        };
        let Some(target) = target else {
            // Wait for the scheduler to choose (again): any choice re-arms the failed one.
            match timeout_at(deadline, active.changed()).await {
                Ok(Ok(())) => {
                    failed = None;
                    continue;
                }
                _ => return Err(GiveUp::HoldTimeout),
            }
        };
        attempt += 1;
        match try_listener(svc, active, up, target, msg, hdr, sent_before, attempt).await {
            Ok(done) => return Ok(done),
            Err(Attempt::Switched) => {
                *up = None;
                sent_before = true;
            }
            Err(Attempt::Failed(reason, sent)) => {
                *up = None;
                sent_before |= sent;
                svc.fail(target, reason, hdr);
                failed = Some(target);
                if sent {
                    failed_after_send += 1;
                    if failed_after_send >= cfg.max_attempts {
                        return Err(GiveUp::Attempts(failed_after_send));
                    }
                }
            }
        }
        if Instant::now() >= deadline {
            return Err(GiveUp::HoldTimeout);
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn try_listener(
    svc: &Svc,
    active: &mut watch::Receiver<Option<SocketAddr>>,
    up: &mut Option<Upstream>,
    target: SocketAddr,
    msg: &[u8],
    hdr: &Header,
    sent_before: bool,
    attempt: u32,
) -> Result<(Vec<u8>, String, SocketAddr), Attempt> {
    if up
        .as_ref()
        .is_some_and(|u| u.addr != target || u.is_stale())
    {
        *up = None;
    }
    let cfg = svc.cfg.load_full();
    let conn = match up {
        Some(u) => u,
        None => {
            let s = match timeout(cfg.connect_timeout, TcpStream::connect(target)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => return Err(Attempt::Failed(FailReason::Connect(e.kind()), false)),
                Err(_) => {
                    return Err(Attempt::Failed(
                        FailReason::ConnectTimeout(cfg.connect_timeout),
                        false,
                    ));
                }
            };
            let _ = s.set_nodelay(true);
            up.insert(Upstream {
                addr: target,
                io: BufReader::with_capacity(8 * 1024, s),
            })
        }
    };
    if sent_before {
        svc.counters.replayed.fetch_add(1, Relaxed);
        warn!(service = %svc.name, listener = %target, control_id = %hdr.control_id, message_type = %hdr.message_type, bytes = msg.len(), attempt, "mllp relay: replaying a message not ACKed by the failed listener (possible duplicate)");
    }
    let counters: Arc<ListenerCounters> = svc.counters.listener(target);
    let limits = frame_limits(&cfg);
    let sent_at = Instant::now();
    let exchange = async {
        conn.io
            .get_mut()
            .write_all(&mllp::frame(msg))
            .await
            .map_err(|e| FailReason::Io(e.kind()))?;
        counters.delivered.fetch_add(1, Relaxed);
        match mllp::read_frame_bounded(&mut conn.io, &limits).await {
            Ok(Some(a)) => Ok(a),
            Ok(None) => Err(FailReason::Closed),
            Err(FrameError::Io(e)) => Err(FailReason::Io(e.kind())),
            Err(e) => Err(FailReason::Garbage(e.to_string())),
        }
    };
    let switched = async {
        loop {
            if active.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
            if *active.borrow_and_update() != Some(target) {
                return;
            }
        }
    };
    let ack = tokio::select! {
        r = timeout(cfg.ack_timeout, exchange) => match r {
            Ok(Ok(a)) => a,
            Ok(Err(reason)) => {
                if matches!(reason, FailReason::Garbage(_)) {
                    counters.garbage.fetch_add(1, Relaxed);
                }
                return Err(Attempt::Failed(reason, true));
            }
            Err(_) => return Err(Attempt::Failed(FailReason::AckTimeout(cfg.ack_timeout), true)),
        },
        _ = switched => {
            info!(service = %svc.name, listener = %target, control_id = %hdr.control_id, "mllp relay: active listener changed before the ACK; the message goes to the new one");
            return Err(Attempt::Switched);
        }
    };
    let Some(code) = mllp::ack_code(&ack) else {
        counters.garbage.fetch_add(1, Relaxed);
        return Err(Attempt::Failed(
            FailReason::Garbage("an MLLP frame without MSA-1".to_string()),
            true,
        ));
    };
    svc.counters.record_latency(sent_at.elapsed());
    match ACK_CODES.iter().position(|c| *c == code) {
        Some(i) => {
            counters.acks[i].fetch_add(1, Relaxed);
        }
        None => {
            counters.garbage.fetch_add(1, Relaxed);
            return Err(Attempt::Failed(
                FailReason::Garbage("an unknown MSA-1 code".to_string()),
                true,
            ));
        }
    }
    if matches!(code.as_str(), "AE" | "AR") {
        info!(service = %svc.name, listener = %target, control_id = %hdr.control_id, message_type = %hdr.message_type, ack = %code, "mllp relay: listener refused a message; its NACK is relayed");
    }
    if let Some(rate) = svc.note_ack(target, &code) {
        // The NACK itself is a valid answer: it goes to the sender; later messages go elsewhere.
        svc.fail(target, FailReason::NackRate(rate), hdr);
    }
    Ok((ack, code, target))
}
