//! The daemon's side of the web console: [`Source`] reads the status from the published
//! snapshot ([`StatusBoard`]) and sends actions on the channel the control socket uses, so a
//! drain from the console is the same `Request::Backend { verb, .. }` as `balancer drain`.

use std::collections::BTreeMap;

use balancer_console::{
    Action, AdminState as Admin, BackendView, CertFile, ConsoleSource, DataplaneState, Health,
    L7View, ListenerView, PoolMemberView, PoolView, RouteView, Running, ServiceView, SourceError,
    StatusSnapshot, Traffic,
};
use tokio::sync::mpsc;
use tracing::info;

use crate::{
    api::protocol::{Message, Request, Status, ask},
    config::{AdminState, ConsoleSection},
    control::{
        operator::Verb,
        state::{BackendHealth, SlotState},
        status::StatusBoard,
    },
    dataplane::counters,
};

/// The console's view of the daemon.
pub struct Source {
    board: StatusBoard,
    tx: mpsc::Sender<Message>,
}

/// Starts the console on `cfg.address`: status from `board`, actions on `tx`.
pub async fn start(
    cfg: ConsoleSection,
    board: StatusBoard,
    tx: mpsc::Sender<Message>,
) -> Result<Running, balancer_console::ConsoleError> {
    let running =
        balancer_console::start(cfg, Source { board, tx }, super::audit::events()).await?;
    info!(
        url = %format!("https://{}/", running.local_addr),
        fingerprint = %running.fingerprint,
        "console ready"
    );
    Ok(running)
}

fn traffic(t: &counters::Traffic) -> Traffic {
    Traffic {
        packets: t.packets,
        bytes: t.bytes,
        new_flows: t.new_flows,
        resets: t.resets,
        drops: t.drops,
    }
}

fn admin(a: AdminState) -> Admin {
    match a {
        AdminState::Up => Admin::Up,
        AdminState::Drain => Admin::Drain,
        AdminState::Disabled => Admin::Disabled,
    }
}

pub(crate) fn health(h: BackendHealth) -> Health {
    match h {
        BackendHealth::Unchecked => Health::Unchecked,
        BackendHealth::Up => Health::Up,
        BackendHealth::Down => Health::Down,
    }
}

fn slot(s: SlotState) -> DataplaneState {
    match s {
        SlotState::Up => DataplaneState::Up,
        SlotState::Draining => DataplaneState::Draining,
        SlotState::Down => DataplaneState::Down,
        SlotState::Standby => DataplaneState::Standby,
    }
}

/// Maps the daemon's status (and the `[l7]` section in force) to the console's snapshot.
pub fn snapshot(s: &Status, l7: Option<&balancer_l7::L7Config>) -> StatusSnapshot {
    let services = s
        .services
        .iter()
        .map(|svc| ServiceView {
            name: svc.name.clone(),
            vip: svc.vip,
            protocol: svc.protocol.name().to_string(),
            forwarding: svc.forwarding.name().to_string(),
            scheduler: svc.scheduler.name().to_string(),
            health_check: svc.health_check.clone(),
            active: svc.active,
            traffic: traffic(&svc.traffic),
            backends: svc
                .backends
                .iter()
                .map(|b| BackendView {
                    address: b.address,
                    weight: b.weight,
                    priority: b.priority,
                    admin: admin(b.admin),
                    health: health(b.health),
                    state: slot(b.state),
                    active: b.active,
                    check_latency_ms: b.check_latency_ms,
                    traffic: traffic(&b.traffic),
                    flows: b.flows,
                })
                .collect(),
        })
        .collect();
    let l7 = l7.map(|c| {
        let mut classes: BTreeMap<&str, [u64; 5]> = BTreeMap::new();
        for r in s.l7.iter().flat_map(|m| &m.routes) {
            let e = classes.entry(r.route.as_str()).or_default();
            for (a, b) in e.iter_mut().zip(r.status_classes) {
                *a += b;
            }
        }
        let mut pools: Vec<PoolView> = Vec::new();
        for b in &s.l7_backends {
            let m = PoolMemberView {
                address: b.address,
                health: health(b.health),
                check_latency_ms: b.check_latency_ms,
                requests: b.requests,
                connect_failures: b.connect_failures,
            };
            match pools.iter_mut().find(|p| p.name == b.pool) {
                Some(p) => p.members.push(m),
                None => pools.push(PoolView {
                    name: b.pool.clone(),
                    members: vec![m],
                }),
            }
        }
        L7View {
            listeners: c
                .listeners
                .iter()
                .map(|l| ListenerView {
                    name: l.name.clone(),
                    address: l.address,
                    certificates: l
                        .certificates
                        .iter()
                        .map(|c| CertFile {
                            path: c.cert.clone(),
                            server_names: c.server_names.clone(),
                        })
                        .collect(),
                })
                .collect(),
            routes: c
                .routes
                .iter()
                .map(|r| RouteView {
                    name: r.name.clone(),
                    host: r.host.clone(),
                    path_prefix: r.path_prefix.clone(),
                    listeners: r.listeners.clone(),
                    pool: r.pool.clone(),
                    status_classes: classes.get(r.name.as_str()).copied().unwrap_or_default(),
                })
                .collect(),
            pools,
            open_connections: s.l7.as_ref().map_or(0, |m| m.open_connections),
        }
    });
    StatusSnapshot {
        config: s.config.clone(),
        uptime_secs: s.uptime_secs,
        reloads: s.reloads,
        config_errors: s.config_errors,
        failovers: s.failovers,
        flows: s.flows,
        services,
        l7,
    }
}

/// The request the control socket would send for a console action.
pub fn request(a: &Action) -> Request {
    let backend = |verb: Verb, service: &str, backend: &std::net::SocketAddr| Request::Backend {
        verb,
        service: service.to_string(),
        backend: backend.to_string(),
    };
    match a {
        Action::Drain {
            service,
            backend: b,
        } => backend(Verb::Drain, service, b),
        Action::Disable {
            service,
            backend: b,
        } => backend(Verb::Disable, service, b),
        Action::Enable {
            service,
            backend: b,
        } => backend(Verb::Enable, service, b),
        Action::Reload => Request::Reload,
    }
}

impl ConsoleSource for Source {
    fn records_changes(&self) -> bool {
        // The daemon loop writes health changes and failovers as it applies them.
        true
    }

    async fn status(&self) -> Result<StatusSnapshot, SourceError> {
        let board = self.board.clone();
        // Reading the counters takes the readers' map lock: off the async workers.
        tokio::task::spawn_blocking(move || {
            let l7 = board.l7_config();
            snapshot(&board.status(), l7.as_deref())
        })
        .await
        .map_err(|e| SourceError::Unavailable(e.to_string()))
    }

    async fn act(&self, a: &Action) -> Result<String, SourceError> {
        let v = ask(&self.tx, request(a))
            .await
            .map_err(|e| SourceError::Unavailable(e.to_string()))?
            .map_err(SourceError::Refused)?;
        Ok(v.get("message")
            .and_then(|m| m.as_str())
            .unwrap_or("done")
            .to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_the_daemon_status() {
        let s = crate::api::tests::sample_status();
        let snap = snapshot(&s, None);
        assert_eq!(snap.services.len(), s.services.len());
        for (a, b) in snap.services.iter().zip(&s.services) {
            assert_eq!(a.name, b.name);
            assert_eq!(a.scheduler, b.scheduler.name());
            assert_eq!(a.backends.len(), b.backends.len());
            for (x, y) in a.backends.iter().zip(&b.backends) {
                assert_eq!(x.admin.as_str(), y.admin.name());
                assert_eq!(x.health.as_str(), y.health.name());
                assert_eq!(x.state.as_str(), y.state.name());
            }
        }
    }

    #[test]
    fn actions_are_the_control_socket_requests() {
        let b: std::net::SocketAddr = "10.77.0.11:7002".parse().unwrap();
        let drain = Action::Drain {
            service: "web".into(),
            backend: b,
        };
        let (_, path) = crate::api::Command::Backend {
            verb: Verb::Drain,
            service: "web".into(),
            backend: b.to_string(),
        }
        .request();
        let via_socket = crate::api::server::route(&http::Method::POST, &path).unwrap();
        assert_eq!(request(&drain), via_socket);
        assert_eq!(request(&Action::Reload), Request::Reload);
    }
}
