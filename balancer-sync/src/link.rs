//! The UDP transport: one socket, one peer.

use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::net::UdpSocket;

use crate::MAX_DATAGRAM;
use crate::error::SyncError;
use crate::key::Key;
use crate::replay::{Accept, ReplayGuard};
use crate::stats::{Stats, add};
use crate::wire::{Body, Message, encode_body, open, seal_encoded};

/// The sender's epoch: its start time.
pub struct Epoch;

impl Epoch {
    /// The current unix time in nanoseconds (0 if the clock is before 1970).
    ///
    /// A node takes it once at start as its epoch, so a restarted node's epoch is higher
    /// and its peer resets its replay window. A clock stepped back across a restart makes
    /// the peer drop the new epoch's messages as replays until the peer restarts too.
    pub fn now() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
    }
}

/// Why a datagram was dropped; the only thing besides address and length a log line says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reason {
    ForeignSource,
    BadMac,
    Malformed,
    Replay,
    Socket,
}

impl Reason {
    const COUNT: usize = 5;

    fn as_str(self) -> &'static str {
        match self {
            Reason::ForeignSource => "foreign source",
            Reason::BadMac => "bad mac",
            Reason::Malformed => "malformed",
            Reason::Replay => "replay",
            Reason::Socket => "socket error",
        }
    }
}

/// At most one log line per reason per [`LOG_EVERY`]; the others are counted and the
/// count rides on the next line.
const LOG_EVERY: Duration = Duration::from_secs(1);

#[derive(Clone, Copy, Debug, Default)]
struct LogSlot {
    last: Option<Instant>,
    suppressed: u64,
}

impl LogSlot {
    /// `Some(lines suppressed since the last one)` when a line may be logged now.
    fn admit(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(t) if now.saturating_duration_since(t) < LOG_EVERY => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

/// A pair-sync endpoint: sends sealed messages to the peer and receives the peer's.
///
/// All methods take `&self`: one task may send while another receives (share it in an
/// `Arc`). Sequence numbers start at 1 under the link's own [`Epoch`], taken when it is
/// created.
#[derive(Debug)]
pub struct Link {
    socket: UdpSocket,
    peer: SocketAddr,
    key: Key,
    epoch: u64,
    next_seq: AtomicU64,
    guard: Mutex<ReplayGuard>,
    stats: Stats,
    log: Mutex<[LogSlot; Reason::COUNT]>,
}

impl Link {
    /// Binds a UDP socket on `bind` for talking to `peer` under `key`.
    ///
    /// Only datagrams from `peer`'s IP address (any port) are considered.
    pub async fn bind(bind: SocketAddr, peer: SocketAddr, key: Key) -> Result<Link, SyncError> {
        let socket = UdpSocket::bind(bind)
            .await
            .map_err(|source| SyncError::Io { addr: bind, source })?;
        Ok(Link::from_socket(socket, peer, key))
    }

    /// A link over a socket bound elsewhere (tests, or a socket set up with other options).
    pub fn from_socket(socket: UdpSocket, peer: SocketAddr, key: Key) -> Link {
        Link {
            socket,
            peer,
            key,
            epoch: Epoch::now(),
            next_seq: AtomicU64::new(1),
            guard: Mutex::new(ReplayGuard::new()),
            stats: Stats::default(),
            log: Mutex::new([LogSlot::default(); Reason::COUNT]),
        }
    }

    /// Seals `body` with the next sequence number and sends it to the peer.
    ///
    /// A body too large to seal fails with [`SyncError::TooLarge`] without using a
    /// sequence number; a socket error is [`SyncError::Io`] naming the peer. Both count
    /// as `send_errors`.
    pub async fn send(&self, body: &Body) -> Result<(), SyncError> {
        let encoded = match encode_body(body) {
            Ok(e) => e,
            Err(e) => {
                add(&self.stats.send_errors, 1);
                return Err(e);
            }
        };
        let seq = self.next_seq.fetch_add(1, Relaxed);
        let datagram = seal_encoded(&self.key, self.epoch, seq, &encoded);
        match self.socket.send_to(&datagram, self.peer).await {
            Ok(n) => {
                add(&self.stats.sent, 1);
                add(&self.stats.sent_bytes, n as u64);
                Ok(())
            }
            Err(source) => {
                add(&self.stats.send_errors, 1);
                Err(SyncError::Io {
                    addr: self.peer,
                    source,
                })
            }
        }
    }

    /// Waits for the next valid message from the peer.
    ///
    /// Drops (and counts, and logs at most once a second per reason, with only the reason,
    /// the source address and the length) datagrams from another IP address, with a bad
    /// tag, malformed ones, and replays. Socket errors are logged and waited out.
    pub async fn recv(&self) -> Message {
        self.recv_accepted().await.0
    }

    /// [`Link::recv`], also returning what the replay guard learned (a peer restart,
    /// lost sequence numbers).
    pub async fn recv_accepted(&self) -> (Message, Accept) {
        let mut buf = [0u8; MAX_DATAGRAM + 1];
        loop {
            let (len, src) = match self.socket.recv_from(&mut buf).await {
                Ok(r) => r,
                Err(e) => {
                    if let Some(suppressed) = self.admit(Reason::Socket) {
                        tracing::warn!(error = %e, suppressed, "pair sync: receive failed");
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            add(&self.stats.received, 1);
            if src.ip().to_canonical() != self.peer.ip().to_canonical() {
                self.drop_datagram(Reason::ForeignSource, src, len);
                continue;
            }
            let msg = match open(&self.key, &buf[..len]) {
                Ok(m) => m,
                Err(SyncError::BadMac) => {
                    self.drop_datagram(Reason::BadMac, src, len);
                    continue;
                }
                Err(_) => {
                    self.drop_datagram(Reason::Malformed, src, len);
                    continue;
                }
            };
            let checked = self
                .guard
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .check(msg.epoch, msg.seq);
            match checked {
                Ok(accept) => {
                    add(&self.stats.accepted, 1);
                    add(&self.stats.lost, accept.lost);
                    if accept.new_epoch {
                        tracing::info!(source = %src, epoch = msg.epoch, "pair sync: peer epoch started");
                    }
                    return (msg, accept);
                }
                Err(_) => self.drop_datagram(Reason::Replay, src, len),
            }
        }
    }

    /// The counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// The sequence number the next message will carry (messages sent so far + 1).
    pub fn next_seq(&self) -> u64 {
        self.next_seq.load(Relaxed)
    }

    /// This link's epoch (its creation time in unix nanoseconds).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The peer's address.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// The local address of the socket.
    pub fn local_addr(&self) -> Result<SocketAddr, SyncError> {
        self.socket.local_addr().map_err(|source| SyncError::Io {
            addr: self.peer,
            source,
        })
    }

    fn drop_datagram(&self, reason: Reason, src: SocketAddr, len: usize) {
        let counter = match reason {
            Reason::ForeignSource => &self.stats.dropped_foreign_source,
            Reason::BadMac => &self.stats.dropped_auth,
            Reason::Malformed => &self.stats.dropped_malformed,
            Reason::Replay => &self.stats.dropped_replay,
            Reason::Socket => return,
        };
        add(counter, 1);
        if let Some(suppressed) = self.admit(reason) {
            tracing::warn!(
                reason = reason.as_str(),
                source = %src,
                len,
                suppressed,
                "pair sync: datagram dropped"
            );
        }
    }

    fn admit(&self, reason: Reason) -> Option<u64> {
        let mut slots = self.log.lock().unwrap_or_else(|p| p.into_inner());
        slots[reason as usize].admit(Instant::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::tests::{all_bodies, key, record};
    use crate::wire::{Role, seal};
    use std::sync::Arc;

    const WAIT: Duration = Duration::from_secs(5);

    async fn socket(ip: &str) -> UdpSocket {
        UdpSocket::bind(format!("{ip}:0")).await.unwrap()
    }

    async fn pair() -> (Arc<Link>, Arc<Link>) {
        let a = socket("127.0.0.1").await;
        let b = socket("127.0.0.1").await;
        let (aa, ba) = (a.local_addr().unwrap(), b.local_addr().unwrap());
        (
            Arc::new(Link::from_socket(a, ba, key())),
            Arc::new(Link::from_socket(b, aa, key())),
        )
    }

    async fn recv(link: &Link) -> Message {
        tokio::time::timeout(WAIT, link.recv()).await.unwrap()
    }

    fn heartbeat(node: &str) -> Body {
        Body::Heartbeat {
            role: Role::Active,
            config_digest: [3; 32],
            applied_seq: 0,
            flows: 2,
            node: node.into(),
        }
    }

    #[tokio::test]
    async fn two_links_exchange_messages_from_two_tasks() {
        let (a, b) = pair().await;
        // b receives in one task while a sends from another, and the other way round.
        let b2 = b.clone();
        let receiver = tokio::spawn(async move {
            let mut got = Vec::new();
            for _ in 0..all_bodies().len() {
                got.push(recv(&b2).await);
            }
            got
        });
        for body in all_bodies() {
            a.send(&body).await.unwrap();
        }
        let got = receiver.await.unwrap();
        assert_eq!(
            got.iter().map(|m| m.body.clone()).collect::<Vec<_>>(),
            all_bodies()
        );
        assert!(got.iter().all(|m| m.epoch == a.epoch()));
        assert_eq!(
            got.iter().map(|m| m.seq).collect::<Vec<_>>(),
            (1..=all_bodies().len() as u64).collect::<Vec<_>>()
        );

        b.send(&heartbeat("lb2")).await.unwrap();
        let back = recv(&a).await;
        assert_eq!(back.body, heartbeat("lb2"));
        assert_eq!(back.seq, 1);

        let sa = a.stats().snapshot();
        assert_eq!(sa.sent, all_bodies().len() as u64);
        assert!(sa.sent_bytes > 0);
        assert_eq!(sa.accepted, 1);
        let sb = b.stats().snapshot();
        assert_eq!(sb.received, all_bodies().len() as u64);
        assert_eq!(sb.accepted, all_bodies().len() as u64);
        assert_eq!(sb.sent, 1);
        assert_eq!(sb.lost, 0);
    }

    #[tokio::test]
    async fn forged_and_foreign_datagrams_are_dropped_and_counted() {
        let (a, b) = pair().await;
        let b_addr = b.local_addr().unwrap();

        // A third host: even a correctly sealed datagram from another IP is dropped.
        let foreign = socket("127.0.0.2").await;
        let sealed = seal(&key(), Epoch::now(), 1, &heartbeat("mallory")).unwrap();
        foreign.send_to(&sealed, b_addr).await.unwrap();

        // A third socket on the peer's IP: forged under another key, garbage, oversized.
        let local = socket("127.0.0.1").await;
        let forged = seal(&Key::generate(), Epoch::now(), 1, &heartbeat("mallory")).unwrap();
        local.send_to(&forged, b_addr).await.unwrap();
        local.send_to(b"hello", b_addr).await.unwrap();
        local
            .send_to(&[0u8; MAX_DATAGRAM + 100], b_addr)
            .await
            .unwrap();

        a.send(&heartbeat("lb1")).await.unwrap();
        let m = recv(&b).await;
        assert_eq!(m.body, heartbeat("lb1"));

        let s = b.stats().snapshot();
        assert_eq!(s.received, 5);
        assert_eq!(s.dropped_foreign_source, 1);
        assert_eq!(s.dropped_auth, 1);
        assert_eq!(s.dropped_malformed, 2);
        assert_eq!(s.accepted, 1);
    }

    #[tokio::test]
    async fn replayed_datagram_is_counted_and_not_returned() {
        // a sends to a capturing socket on the same IP, which forwards to b (and replays).
        let tap = socket("127.0.0.1").await;
        let a_sock = socket("127.0.0.1").await;
        let b_sock = socket("127.0.0.1").await;
        let (tap_addr, a_addr, b_addr) = (
            tap.local_addr().unwrap(),
            a_sock.local_addr().unwrap(),
            b_sock.local_addr().unwrap(),
        );
        let a = Link::from_socket(a_sock, tap_addr, key());
        let b = Link::from_socket(b_sock, a_addr, key());
        let mut buf = [0u8; 2048];

        let first = Body::Flows {
            resync: None,
            records: vec![record(1)],
        };
        a.send(&first).await.unwrap();
        let (n, _) = tap.recv_from(&mut buf).await.unwrap();
        let captured = buf[..n].to_vec();
        tap.send_to(&captured, b_addr).await.unwrap();
        assert_eq!(recv(&b).await.body, first);

        // The replay, then a fresh message: only the fresh one comes out.
        tap.send_to(&captured, b_addr).await.unwrap();
        let second = Body::Deletes(vec![record(1).id()]);
        a.send(&second).await.unwrap();
        let (n, _) = tap.recv_from(&mut buf).await.unwrap();
        tap.send_to(&buf[..n], b_addr).await.unwrap();
        let m = recv(&b).await;
        assert_eq!(m.body, second);
        assert_eq!(m.seq, 2);

        let s = b.stats().snapshot();
        assert_eq!(s.received, 3);
        assert_eq!(s.dropped_replay, 1);
        assert_eq!(s.accepted, 2);

        // A message of an older epoch (a captured datagram from before a restart) too.
        let old = seal(&key(), a.epoch() - 1, 99, &Body::ResyncRequest).unwrap();
        tap.send_to(&old, b_addr).await.unwrap();
        a.send(&Body::ResyncRequest).await.unwrap();
        let (n, _) = tap.recv_from(&mut buf).await.unwrap();
        tap.send_to(&buf[..n], b_addr).await.unwrap();
        assert_eq!(recv(&b).await.seq, 3);
        assert_eq!(b.stats().snapshot().dropped_replay, 2);
    }

    #[tokio::test]
    async fn peer_restart_is_a_new_epoch() {
        let a_sock = socket("127.0.0.1").await;
        let b = Link::from_socket(
            socket("127.0.0.1").await,
            a_sock.local_addr().unwrap(),
            key(),
        );
        let b_addr = b.local_addr().unwrap();
        let a = Link::from_socket(a_sock, b_addr, key());
        a.send(&Body::ResyncRequest).await.unwrap();
        let (_, acc) = tokio::time::timeout(WAIT, b.recv_accepted()).await.unwrap();
        assert!(acc.new_epoch);
        a.send(&Body::ResyncRequest).await.unwrap();
        let (_, acc) = tokio::time::timeout(WAIT, b.recv_accepted()).await.unwrap();
        assert!(!acc.new_epoch);
        // "Restart": a new link on the same socket address has a later epoch, seq 1 again.
        let a_addr = a.local_addr().unwrap();
        drop(a);
        tokio::time::sleep(Duration::from_millis(2)).await;
        let a = Link::bind(a_addr, b_addr, key()).await.unwrap();
        a.send(&Body::ResyncRequest).await.unwrap();
        let (m, acc) = tokio::time::timeout(WAIT, b.recv_accepted()).await.unwrap();
        assert!(acc.new_epoch);
        assert_eq!(m.seq, 1);
    }

    #[tokio::test]
    async fn oversized_send_fails_without_burning_a_seq() {
        let (a, b) = pair().await;
        let huge = Body::Heartbeat {
            role: Role::Active,
            config_digest: [0; 32],
            applied_seq: 0,
            flows: 0,
            node: "n".repeat(2000),
        };
        assert!(matches!(
            a.send(&huge).await,
            Err(SyncError::TooLarge { .. })
        ));
        assert_eq!(a.stats().snapshot().send_errors, 1);
        a.send(&Body::ResyncRequest).await.unwrap();
        assert_eq!(recv(&b).await.seq, 1);
    }

    #[tokio::test]
    async fn bind_error_names_the_address() {
        let taken = socket("127.0.0.1").await;
        let addr = taken.local_addr().unwrap();
        let e = Link::bind(addr, addr, key()).await.unwrap_err();
        assert!(matches!(e, SyncError::Io { .. }));
        assert!(e.to_string().contains(&addr.to_string()), "{e}");
    }

    #[test]
    fn log_lines_are_limited_to_one_per_second_per_reason() {
        let mut slot = LogSlot::default();
        let t0 = Instant::now();
        assert_eq!(slot.admit(t0), Some(0));
        assert_eq!(slot.admit(t0 + Duration::from_millis(10)), None);
        assert_eq!(slot.admit(t0 + Duration::from_millis(999)), None);
        assert_eq!(slot.admit(t0 + Duration::from_millis(1000)), Some(2));
        assert_eq!(slot.admit(t0 + Duration::from_millis(1500)), None);
        assert_eq!(slot.admit(t0 + Duration::from_millis(2100)), Some(1));
    }

    #[test]
    fn epoch_is_unix_nanoseconds() {
        let e = Epoch::now();
        // After 2024, before 2100.
        assert!(
            e > 1_704_067_200_000_000_000 && e < 4_102_444_800_000_000_000,
            "{e}"
        );
        assert!(Epoch::now() >= e);
    }
}
