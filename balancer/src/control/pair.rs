//! The pair's sync runtime: the tasks that mirror flows and control state between the two
//! balancers over the authenticated channel (`balancer-sync`).
//!
//! - **Active:** every flow the XDP program creates is reported on its ring buffer
//!   (`BLB_MIRROR`); a task drains it and sends the flows in batches at once. Flows the
//!   expiry sweep removes are sent as deletes. A full pass over the table is sent every
//!   `resync_interval`, when the standby asks (it just became standby) and when the peer
//!   restarted (a new epoch): that repairs lost datagrams and dropped ring-buffer events and
//!   keeps the standby's copies from expiring. The failover choices and operator states go
//!   with every heartbeat.
//! - **Standby:** installs the peer's flows in its own pinned table (translated to its own
//!   service ids and backend slots: the two may number them differently), removes deleted
//!   ones, and follows the peer's failover choices and operator states (the daemon applies
//!   them). Its copies carry no next hop: the program resolves one on the first packet.
//! - **Both:** a heartbeat every advert interval with the role, the config digest, the
//!   highest sequence applied from the peer (the peer's lag) and the flow count.
//!
//! Nothing here blocks the packet path: the program only queues an event (and counts it when
//! the ring buffer is full); a slow or absent peer costs datagrams, counted, and the next
//! resync repairs them.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use arc_swap::ArcSwap;
use balancer_common::{FlowKey, ServiceKey};
use balancer_sync::{Body, FlowId, FlowRecord, Link, ServiceControl};
use tokio::sync::{Notify, mpsc};
use tracing::{debug, info, warn};

use crate::{
    api::protocol::{HaStatus, MirrorStatus},
    config::{AdminState, Ha},
    control::{
        ha::{PeerService, Role},
        mirror,
        state::State,
    },
    dataplane::Dataplane,
};

/// Datagrams a resync pass sends before it pauses for a millisecond (so a pass over a full
/// table does not overrun the peer's socket buffer).
const RESYNC_BURST: usize = 16;

/// (backend address, backend port in network order) → (slot, generation).
type Slots = HashMap<([u8; 16], u16), (u32, u32)>;

/// How this balancer finds its own service id and backend slot for a peer's flow.
#[derive(Debug, Default, Clone)]
pub struct Translation {
    /// Service key → service id.
    services: HashMap<ServiceKey, u32>,
    /// Service id → its backends.
    backends: HashMap<u32, Slots>,
}

impl Translation {
    /// From the state in force.
    pub fn of(state: &State) -> Translation {
        let mut services = HashMap::new();
        let mut by_id = HashMap::new();
        for s in state.services.values() {
            let mut backends = HashMap::new();
            for b in &s.backends {
                let addr = crate::host::net::addr16(b.address.ip());
                backends.insert((addr, b.address.port().to_be()), (b.slot, b.generation));
                // DSR flows name the VIP port, which a DSR backend shares.
                backends
                    .entry((addr, s.spec.vip.port().to_be()))
                    .or_insert((b.slot, b.generation));
            }
            services.insert(s.key, s.id);
            by_id.insert(s.id, backends);
        }
        Translation {
            services,
            backends: by_id,
        }
    }
}

/// What the tasks and the daemon share.
pub struct Shared {
    node: String,
    role: AtomicU8,
    digest: [u8; 32],
    peer: Mutex<PeerView>,
    translation: ArcSwap<Translation>,
    control: ArcSwap<Vec<ServiceControl>>,
    /// Highest sequence applied from the peer (sent back in heartbeats).
    applied_seq: AtomicU64,
    generation: AtomicU32,
    resync: Notify,
    counters: Counters,
}

#[derive(Default)]
struct Counters {
    flows_sent: AtomicU64,
    flows_applied: AtomicU64,
    flows_unknown: AtomicU64,
    deletes_sent: AtomicU64,
    deletes_applied: AtomicU64,
    resyncs_sent: AtomicU64,
    resyncs_received: AtomicU64,
}

/// The peer as last heard.
#[derive(Debug, Clone, Default)]
struct PeerView {
    node: Option<String>,
    role: Option<Role>,
    heard: Option<Instant>,
    digest: Option<[u8; 32]>,
    /// The highest of our sequence numbers the peer has applied.
    acked: u64,
}

fn role_code(r: Role) -> u8 {
    match r {
        Role::Unknown => 0,
        Role::Active => 1,
        Role::Standby => 2,
        Role::Fault => 3,
    }
}

fn role_of(c: u8) -> Role {
    match c {
        1 => Role::Active,
        2 => Role::Standby,
        3 => Role::Fault,
        _ => Role::Unknown,
    }
}

fn wire_role(r: Role) -> balancer_sync::Role {
    match r {
        Role::Unknown => balancer_sync::Role::Unknown,
        Role::Active => balancer_sync::Role::Active,
        Role::Standby => balancer_sync::Role::Standby,
        Role::Fault => balancer_sync::Role::Fault,
    }
}

fn our_role(r: balancer_sync::Role) -> Role {
    match r {
        balancer_sync::Role::Unknown => Role::Unknown,
        balancer_sync::Role::Active => Role::Active,
        balancer_sync::Role::Standby => Role::Standby,
        balancer_sync::Role::Fault => Role::Fault,
    }
}

fn wire_admin(a: AdminState) -> balancer_sync::Admin {
    match a {
        AdminState::Up => balancer_sync::Admin::Enabled,
        AdminState::Drain => balancer_sync::Admin::Draining,
        AdminState::Disabled => balancer_sync::Admin::Disabled,
    }
}

fn our_admin(a: balancer_sync::Admin) -> AdminState {
    match a {
        balancer_sync::Admin::Enabled => AdminState::Up,
        balancer_sync::Admin::Draining => AdminState::Drain,
        balancer_sync::Admin::Disabled => AdminState::Disabled,
    }
}

fn key_of(id: &FlowId) -> FlowKey {
    FlowKey {
        src: id.src,
        dst: id.dst,
        sport: id.sport,
        dport: id.dport,
        proto: id.proto,
        pad: [0; 3],
    }
}

fn id_of(k: &FlowKey) -> FlowId {
    FlowId {
        src: k.src,
        dst: k.dst,
        sport: k.sport,
        dport: k.dport,
        proto: k.proto,
    }
}

/// The active balancer's failover choices and operator states, on the wire.
pub fn control_of(view: &[PeerService]) -> Vec<ServiceControl> {
    view.iter()
        .map(|p| ServiceControl {
            service: p.service.clone(),
            active: p.active.map(|a| a.to_string()),
            admin: p
                .admin
                .iter()
                .map(|(a, s)| (a.to_string(), wire_admin(*s)))
                .collect(),
        })
        .collect()
}

/// A peer's control state, with names this balancer can parse (others are skipped).
pub fn peer_services(c: &[ServiceControl]) -> Vec<PeerService> {
    c.iter()
        .map(|s| PeerService {
            service: s.service.clone(),
            active: s.active.as_deref().and_then(|a| a.parse().ok()),
            admin: s
                .admin
                .iter()
                .filter_map(|(a, st)| Some((a.parse().ok()?, our_admin(*st))))
                .collect(),
        })
        .collect()
}

/// The running pair: the shared view and the tasks.
pub struct Pair {
    /// The channel.
    pub link: Arc<Link>,
    /// What the tasks and the daemon share.
    pub shared: Arc<Shared>,
    cfg: Ha,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Pair {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Pair {
    /// Binds the channel and starts the tasks. `pin` is the pinned dataplane (the tasks open
    /// handles of their own), `reader` the mirror ring buffer, `control` the channel peer
    /// control states go to the daemon on, `deletes` where the expiry sweep's removed flows
    /// arrive.
    pub async fn start(
        cfg: &Ha,
        config_text: &str,
        role: Role,
        pin: &std::path::Path,
        reader: crate::dataplane::mirror::MirrorReader,
        control: mpsc::UnboundedSender<Vec<ServiceControl>>,
        deletes: mpsc::UnboundedReceiver<Vec<FlowKey>>,
    ) -> anyhow::Result<Pair> {
        let key = balancer_sync::Key::from_file(&cfg.key_file)?;
        let digest = balancer_sync::config_digest(config_text)?;
        let link = Arc::new(Link::bind(cfg.bind, cfg.peer, key).await?);
        let shared = Arc::new(Shared {
            node: cfg.node.clone(),
            role: AtomicU8::new(role_code(role)),
            digest,
            peer: Mutex::new(PeerView::default()),
            translation: ArcSwap::from_pointee(Translation::default()),
            control: ArcSwap::from_pointee(Vec::new()),
            applied_seq: AtomicU64::new(0),
            generation: AtomicU32::new(0),
            resync: Notify::new(),
            counters: Counters::default(),
        });
        let installer = Dataplane::open_pinned(pin)?;
        let walker = pin.to_path_buf();
        let tasks = vec![
            tokio::spawn(events(link.clone(), shared.clone(), reader)),
            tokio::spawn(heartbeats(
                link.clone(),
                shared.clone(),
                cfg.advert_interval,
            )),
            tokio::spawn(resyncs(
                link.clone(),
                shared.clone(),
                walker,
                cfg.resync_interval,
            )),
            tokio::spawn(receive(link.clone(), shared.clone(), installer, control)),
            tokio::spawn(send_deletes(link.clone(), shared.clone(), deletes)),
        ];
        info!(bind = %cfg.bind, peer = %cfg.peer, "pair sync channel bound");
        Ok(Pair {
            link,
            shared,
            cfg: cfg.clone(),
            tasks,
        })
    }

    /// The role changed: the tasks act on it from now on. A new standby asks the active
    /// peer for a full pass at once.
    pub async fn set_role(&self, role: Role) {
        let old = role_of(self.shared.role.swap(role_code(role), Ordering::AcqRel));
        if role == Role::Standby
            && old != Role::Standby
            && let Err(e) = self.link.send(&Body::ResyncRequest).await
        {
            warn!(error = %e, "pair sync: cannot ask the peer for a resync");
        }
    }

    /// The state in force changed: new translation, new control view.
    pub fn publish(&self, state: &State) {
        self.shared
            .translation
            .store(Arc::new(Translation::of(state)));
        self.shared
            .control
            .store(Arc::new(control_of(&crate::control::ha::view(state))));
    }

    /// What the status board calls to read the pair's part of the status.
    pub fn status_source(
        &self,
        pin: &std::path::Path,
    ) -> anyhow::Result<crate::control::status::HaSource> {
        let shared = self.shared.clone();
        let link = self.link.clone();
        let peer = self.cfg.peer;
        let dp = Mutex::new(Dataplane::open_pinned(pin)?);
        Ok(Arc::new(move || {
            let dropped = dp.lock().map(|d| d.mirror_counters().dropped).unwrap_or(0);
            shared.status(&link, peer, dropped)
        }))
    }

    /// Whether the peer was heard within three advert intervals (at least one second).
    pub fn peer_alive(&self) -> Option<String> {
        let p = self
            .shared
            .peer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let limit = (self.cfg.advert_interval * 3).max(Duration::from_secs(1));
        match p.heard {
            Some(t) if t.elapsed() < limit => Some(p.node.unwrap_or_else(|| "the peer".into())),
            _ => None,
        }
    }
}

impl Shared {
    fn role(&self) -> Role {
        role_of(self.role.load(Ordering::Acquire))
    }

    /// The pair's part of the status, read now.
    pub fn status(&self, link: &Link, peer: std::net::SocketAddr, events_dropped: u64) -> HaStatus {
        let p = self.peer.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let s = link.stats().snapshot();
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        HaStatus {
            node: self.node.clone(),
            role: self.role(),
            peer: peer.to_string(),
            peer_node: p.node,
            peer_role: p.role,
            peer_heard_ms: p
                .heard
                .map(|t| u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX)),
            config_matches: p.digest.map(|d| d == self.digest),
            mirror: MirrorStatus {
                flows_sent: get(&c.flows_sent),
                flows_applied: get(&c.flows_applied),
                flows_unknown: get(&c.flows_unknown),
                deletes_sent: get(&c.deletes_sent),
                deletes_applied: get(&c.deletes_applied),
                resyncs_sent: get(&c.resyncs_sent),
                resyncs_received: get(&c.resyncs_received),
                events_dropped,
                lag_messages: link.next_seq().saturating_sub(1).saturating_sub(p.acked),
                messages_sent: s.sent,
                messages_accepted: s.accepted,
                dropped_auth: s.dropped_auth,
                dropped_replay: s.dropped_replay,
                dropped_malformed: s.dropped_malformed,
                dropped_foreign: s.dropped_foreign_source,
                lost: s.lost,
            },
        }
    }
}

async fn send_all(link: &Link, bodies: Vec<Body>) -> usize {
    let mut sent = 0;
    for b in bodies {
        match link.send(&b).await {
            Ok(()) => sent += 1,
            Err(e) => debug!(error = %e, "pair sync: send failed"),
        }
    }
    sent
}

/// Active: the program's new flows to the peer, as they come.
async fn events(
    link: Arc<Link>,
    shared: Arc<Shared>,
    reader: crate::dataplane::mirror::MirrorReader,
) {
    // SAFETY: the reader owns the ring buffer's map fd, which stays open and the same for
    // the reader's lifetime (the AsyncFd owns the reader).
    let registered = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(reader, tokio::io::Interest::READABLE)
    };
    let fd = match registered {
        Ok(fd) => fd,
        Err(e) => {
            warn!(error = %e, "pair sync: cannot wait on the mirror ring buffer; new flows reach the peer with the resyncs only");
            return;
        }
    };
    let mut fd = fd;
    let mut out = Vec::new();
    loop {
        let Ok(mut guard) = fd.readable_mut().await else {
            return;
        };
        out.clear();
        guard.get_inner_mut().drain(&mut out);
        guard.clear_ready();
        if out.is_empty() || shared.role() != Role::Active {
            continue;
        }
        let now = crate::control::flow_expiry::now_secs();
        let records: Vec<FlowRecord> = out
            .iter()
            .filter_map(|(k, f)| mirror::to_mirrored(k, f, now))
            .collect();
        let n = records.len() as u64;
        send_all(&link, balancer_sync::flow_batches(None, &records)).await;
        shared.counters.flows_sent.fetch_add(n, Ordering::Relaxed);
    }
}

/// Both: a heartbeat each interval; the active also sends its control state.
async fn heartbeats(link: Arc<Link>, shared: Arc<Shared>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let role = shared.role();
        let hb = Body::Heartbeat {
            role: wire_role(role),
            config_digest: shared.digest,
            applied_seq: shared.applied_seq.load(Ordering::Relaxed),
            flows: 0,
            node: shared.node.clone(),
        };
        let _ = link.send(&hb).await;
        if role == Role::Active {
            let control = shared.control.load_full();
            if let Ok(bodies) = balancer_sync::control_batches(&control) {
                send_all(&link, bodies).await;
            }
        }
    }
}

/// Active: a full pass over the table every `every`, and when asked.
async fn resyncs(link: Arc<Link>, shared: Arc<Shared>, pin: std::path::PathBuf, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shared.resync.notified() => {}
        }
        if shared.role() != Role::Active {
            continue;
        }
        let p = pin.clone();
        let walked = tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<FlowRecord>> {
            let dp = Dataplane::open_pinned(&p)?;
            let now = crate::control::flow_expiry::now_secs();
            Ok(dp
                .flows()
                .iter()
                .filter_map(|(k, f)| mirror::to_mirrored(k, f, now))
                .collect())
        })
        .await;
        let records = match walked {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                warn!(error = %e, "pair sync: cannot walk the flow table for a resync");
                continue;
            }
            Err(_) => continue,
        };
        let generation = shared.generation.fetch_add(1, Ordering::Relaxed) + 1;
        let t0 = Instant::now();
        for (i, b) in balancer_sync::flow_batches(Some(generation), &records)
            .into_iter()
            .enumerate()
        {
            if i > 0 && i % RESYNC_BURST == 0 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            let _ = link.send(&b).await;
        }
        let _ = link
            .send(&Body::ResyncDone {
                generation,
                records: records.len() as u64,
            })
            .await;
        shared.counters.resyncs_sent.fetch_add(1, Ordering::Relaxed);
        debug!(
            generation,
            flows = records.len(),
            ms = t0.elapsed().as_millis() as u64,
            "pair sync: resync pass sent"
        );
    }
}

/// Active: flows the expiry sweep removed.
async fn send_deletes(
    link: Arc<Link>,
    shared: Arc<Shared>,
    mut deletes: mpsc::UnboundedReceiver<Vec<FlowKey>>,
) {
    while let Some(keys) = deletes.recv().await {
        if shared.role() != Role::Active || keys.is_empty() {
            continue;
        }
        let ids: Vec<FlowId> = keys.iter().map(id_of).collect();
        send_all(&link, balancer_sync::delete_batches(&ids)).await;
        shared
            .counters
            .deletes_sent
            .fetch_add(ids.len() as u64, Ordering::Relaxed);
    }
}

/// Both: the peer's messages.
async fn receive(
    link: Arc<Link>,
    shared: Arc<Shared>,
    mut dp: Dataplane,
    control: mpsc::UnboundedSender<Vec<ServiceControl>>,
) {
    loop {
        let (msg, accept) = link.recv_accepted().await;
        shared.applied_seq.store(msg.seq, Ordering::Relaxed);
        let role = shared.role();
        if accept.new_epoch && role == Role::Active {
            // The peer (re)started: it gets everything now, not at the next interval.
            shared.resync.notify_one();
        }
        match msg.body {
            Body::Heartbeat {
                role: r,
                config_digest,
                applied_seq,
                node,
                ..
            } => {
                let mut p = shared.peer.lock().unwrap_or_else(|e| e.into_inner());
                if p.digest != Some(config_digest) && config_digest != shared.digest {
                    warn!(peer = %node, "the peer's config differs from this balancer's (services, backends or settings): run the same file on both");
                }
                p.node = Some(node);
                p.role = Some(our_role(r));
                p.heard = Some(Instant::now());
                p.digest = Some(config_digest);
                p.acked = applied_seq;
            }
            Body::Flows { resync, records } => {
                touch_peer(&shared);
                if role == Role::Active {
                    continue;
                }
                let t = shared.translation.load_full();
                let now = crate::control::flow_expiry::now_secs();
                let mut entries = Vec::new();
                let mut unknown = 0u64;
                for r in &records {
                    let svc = |k: &ServiceKey| t.services.get(k).copied();
                    let be = |id: u32, addr: &[u8; 16], port: u16| {
                        t.backends
                            .get(&id)
                            .and_then(|b| b.get(&(*addr, port)).copied())
                    };
                    match mirror::entries(r, &svc, &be, now) {
                        Some(e) => entries.extend(e),
                        None => unknown += 1,
                    }
                }
                match dp.install_flows(&entries) {
                    Ok(_) => {}
                    Err(e) => warn!(error = %e, "pair sync: installing mirrored flows failed"),
                }
                let applied = records.len() as u64 - unknown;
                shared
                    .counters
                    .flows_applied
                    .fetch_add(applied, Ordering::Relaxed);
                shared
                    .counters
                    .flows_unknown
                    .fetch_add(unknown, Ordering::Relaxed);
                let _ = resync;
            }
            Body::Deletes(ids) => {
                touch_peer(&shared);
                if role == Role::Active {
                    continue;
                }
                let mut n = 0u64;
                for id in &ids {
                    let key = key_of(id);
                    if let Some(f) = dp.flow(&key) {
                        if f.flags & balancer_common::FLOW_F_DSR == 0 {
                            let rkey = crate::control::flow_expiry::reply_key(&f, key.proto);
                            // Only this flow's own reply entry.
                            if dp
                                .flow(&rkey)
                                .is_some_and(|r| r.new_dst == key.src && r.new_dport == key.sport)
                            {
                                let _ = dp.remove_flow(&rkey);
                            }
                        }
                        if dp.remove_flow(&key).is_ok() {
                            n += 1;
                        }
                    }
                }
                shared
                    .counters
                    .deletes_applied
                    .fetch_add(n, Ordering::Relaxed);
            }
            Body::ResyncRequest => {
                touch_peer(&shared);
                if role == Role::Active {
                    shared.resync.notify_one();
                }
            }
            Body::ResyncDone {
                generation,
                records,
            } => {
                touch_peer(&shared);
                shared
                    .counters
                    .resyncs_received
                    .fetch_add(1, Ordering::Relaxed);
                debug!(generation, records, "pair sync: resync pass received");
            }
            Body::Control(c) => {
                touch_peer(&shared);
                if role != Role::Active {
                    let _ = control.send(c);
                }
            }
        }
    }
}

fn touch_peer(shared: &Shared) {
    shared.peer.lock().unwrap_or_else(|e| e.into_inner()).heard = Some(Instant::now());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::fake::Rig;

    const TWO: &str = r#"
[[service]]
name = "hl7"
vip = "10.77.0.100:6661"
scheduler = "failover"
backends = [ { address = "10.77.0.11:6661" }, { address = "10.77.0.12:6661" } ]

[[service]]
name = "dsr"
vip = "10.77.0.101:7002"
forwarding = "dsr"
backends = [ { address = "10.77.0.11:7002" } ]
"#;

    #[test]
    fn control_state_survives_the_wire_both_ways() {
        let mut rig = Rig::new();
        rig.reload(TWO).expect("applies");
        rig.set_admin("hl7", "10.77.0.12:6661", AdminState::Drain);
        let view = crate::control::ha::view(rig.state());
        let wire = control_of(&view);
        let hl7 = wire
            .iter()
            .position(|s| s.service == "hl7")
            .expect("hl7 sent");
        assert_eq!(wire[hl7].active.as_deref(), Some("10.77.0.11:6661"));
        assert_eq!(peer_services(&wire), view);
        // A name this balancer cannot parse is skipped, not misread.
        let mut bad = wire.clone();
        bad[hl7].active = Some("listener-a".into());
        assert_eq!(peer_services(&bad)[hl7].active, None);
    }

    #[test]
    fn translation_finds_this_balancers_slots_by_backend_identity() {
        let mut rig = Rig::new();
        rig.reload(TWO).expect("applies");
        let t = Translation::of(rig.state());
        let hl7 = rig.service("hl7");
        let id = t.services[&hl7.key];
        assert_eq!(id, hl7.id);
        let backends = &t.backends[&id];
        let b = &hl7.backends[1];
        let addr = crate::host::net::addr16(b.address.ip());
        assert_eq!(
            backends.get(&(addr, 6661u16.to_be())),
            Some(&(b.slot, b.generation))
        );
        // A DSR flow names the VIP port, which is also the backend's.
        let dsr = rig.service("dsr");
        let backends = &t.backends[&t.services[&dsr.key]];
        assert!(backends.contains_key(&(
            crate::host::net::addr16(dsr.backends[0].address.ip()),
            7002u16.to_be()
        )));
    }

    #[test]
    fn records_round_trip() {
        let r = FlowRecord {
            src: [1; 16],
            dst: [2; 16],
            sport: 1,
            dport: 2,
            proto: 6,
            new_src: [3; 16],
            new_dst: [4; 16],
            new_sport: 3,
            new_dport: 4,
            flags: 5,
            idle_secs: 6,
        };
        assert_eq!(
            key_of(&r.id()),
            FlowKey {
                src: [1; 16],
                dst: [2; 16],
                sport: 1,
                dport: 2,
                proto: 6,
                pad: [0; 3]
            }
        );
        assert_eq!(id_of(&key_of(&r.id())), r.id());
        for role in [Role::Unknown, Role::Active, Role::Standby, Role::Fault] {
            assert_eq!(role_of(role_code(role)), role);
            assert_eq!(our_role(wire_role(role)), role);
        }
    }
}
