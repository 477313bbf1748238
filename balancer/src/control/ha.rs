//! One balancer of an active/standby pair: its VRRP role (told by keepalived), the file
//! keepalived tracks, and how a standby follows the active balancer's failover choices and
//! operator states so the two never send HL7 traffic to different listeners.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::{
    config::{AdminState, Scheduler},
    control::state::State,
};

/// This balancer's role in the pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// keepalived has not said yet (and no earlier role was recorded).
    #[default]
    Unknown,
    /// VRRP master: holds the addresses, serves, mirrors its flows to the peer.
    Active,
    /// VRRP backup: installs the peer's flows, follows its failover choices.
    Standby,
    /// VRRP fault or stopped: holds no addresses.
    Fault,
}

crate::config::names!(Role { Unknown => "unknown", Active => "active", Standby => "standby", Fault => "fault" });

impl Role {
    /// Parses the API's spelling.
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "active" => Some(Role::Active),
            "standby" => Some(Role::Standby),
            "fault" => Some(Role::Fault),
            _ => None,
        }
    }
}

/// Where the last role keepalived told is kept, so a restarted controller (keepalived still
/// running, and silent) starts in it.
pub fn role_file(socket: &Path) -> PathBuf {
    socket
        .parent()
        .unwrap_or(Path::new("/run/balancer"))
        .join("ha-role")
}

/// The recorded role, if any.
pub fn load_role(path: &Path) -> Role {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| Role::parse(s.trim()))
        .unwrap_or_default()
}

/// Records the role (atomically: write, then rename).
pub fn save_role(path: &Path, role: Role) -> std::io::Result<()> {
    write_atomic(path, role.name())
}

/// Writes the file keepalived tracks: `0` while the controller serves, `1` when it does not
/// (keepalived, with `weight 0`, goes to FAULT at once and the peer takes over).
pub fn write_track(path: &Path, serving: bool) -> std::io::Result<()> {
    write_atomic(path, if serving { "0\n" } else { "1\n" })
}

fn write_atomic(path: &Path, text: &str) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

/// The active balancer's view of one service, as a standby receives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerService {
    /// Service name.
    pub service: String,
    /// Its failover choice.
    pub active: Option<SocketAddr>,
    /// Operator states of its backends.
    pub admin: Vec<(SocketAddr, AdminState)>,
}

/// What a standby changes to follow its peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Follow {
    /// Take the peer's operator state for a backend.
    Admin {
        /// Service.
        service: String,
        /// Backend.
        backend: SocketAddr,
        /// The peer's state.
        admin: AdminState,
    },
    /// Make the peer's failover choice the active backend.
    Active {
        /// Service.
        service: String,
        /// Backend.
        backend: SocketAddr,
    },
}

/// The changes that make `state` agree with the active peer. Services or backends this
/// balancer does not have (the configs differ: the status says so) are skipped; a failover
/// choice this balancer sees as down is not followed (its own rule then keeps the service on
/// an eligible listener, and takes the peer's choice again once that one is up).
pub fn follow(state: &State, peer: &[PeerService]) -> Vec<Follow> {
    let mut out = Vec::new();
    for p in peer {
        let Some(s) = state.services.get(&p.service) else {
            continue;
        };
        for (addr, admin) in &p.admin {
            if let Some(b) = s.backends.iter().find(|b| b.address == *addr)
                && b.admin != *admin
            {
                out.push(Follow::Admin {
                    service: p.service.clone(),
                    backend: *addr,
                    admin: *admin,
                });
            }
        }
        if s.spec.scheduler != Scheduler::Failover {
            continue;
        }
        let Some(want) = p.active else { continue };
        let Some(i) = s.position(want) else { continue };
        let admin_after = p
            .admin
            .iter()
            .find(|(a, _)| *a == want)
            .map(|(_, st)| *st)
            .unwrap_or(s.backends[i].admin);
        let mut b = s.backends[i].clone();
        b.admin = admin_after;
        if s.active != Some(i) && b.eligible() {
            out.push(Follow::Active {
                service: p.service.clone(),
                backend: want,
            });
        }
    }
    out
}

/// The active balancer's view to send: every service's failover choice and operator states.
pub fn view(state: &State) -> Vec<PeerService> {
    state
        .services
        .values()
        .map(|s| PeerService {
            service: s.spec.name.clone(),
            active: s.active.and_then(|a| s.backends.get(a)).map(|b| b.address),
            admin: s.backends.iter().map(|b| (b.address, b.admin)).collect(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::{fake::Rig, state::BackendHealth};

    const HL7: &str = r#"
[[service]]
name = "hl7"
vip = "10.77.0.100:6661"
scheduler = "failover"
failback = false
backends = [ { address = "10.77.0.11:6661" }, { address = "10.77.0.12:6661" } ]

[[service]]
name = "web"
vip = "10.77.0.100:80"
backends = [ { address = "10.77.0.11:80" }, { address = "10.77.0.12:80" } ]
"#;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn a_standby_takes_the_peers_listener_and_operator_states() {
        let mut rig = Rig::new();
        rig.reload(HL7).expect("applies");
        let st = rig.state();
        assert_eq!(st.services["hl7"].active, Some(0));
        let peer = vec![
            PeerService {
                service: "hl7".into(),
                active: Some(a("10.77.0.12:6661")),
                admin: vec![(a("10.77.0.11:6661"), AdminState::Up)],
            },
            PeerService {
                service: "web".into(),
                active: None,
                admin: vec![(a("10.77.0.12:80"), AdminState::Drain)],
            },
            PeerService {
                service: "gone".into(),
                active: None,
                admin: vec![],
            },
        ];
        let f = follow(st, &peer);
        assert_eq!(
            f,
            vec![
                Follow::Active {
                    service: "hl7".into(),
                    backend: a("10.77.0.12:6661")
                },
                Follow::Admin {
                    service: "web".into(),
                    backend: a("10.77.0.12:80"),
                    admin: AdminState::Drain
                },
            ]
        );
        // Agreeing already: nothing to do.
        let same = view(st);
        assert!(follow(st, &same).is_empty());
    }

    #[test]
    fn a_choice_this_balancer_sees_down_is_not_followed() {
        let mut rig = Rig::new();
        rig.reload(HL7).expect("applies");
        rig.set_health("hl7", "10.77.0.12:6661", BackendHealth::Down);
        let peer = vec![PeerService {
            service: "hl7".into(),
            active: Some(a("10.77.0.12:6661")),
            admin: vec![],
        }];
        assert!(follow(rig.state(), &peer).is_empty());
        // Disabled by the peer: followed as an operator state, not as the choice.
        let peer = vec![PeerService {
            service: "hl7".into(),
            active: Some(a("10.77.0.11:6661")),
            admin: vec![(a("10.77.0.11:6661"), AdminState::Disabled)],
        }];
        assert_eq!(
            follow(rig.state(), &peer),
            vec![Follow::Admin {
                service: "hl7".into(),
                backend: a("10.77.0.11:6661"),
                admin: AdminState::Disabled
            }]
        );
    }

    #[test]
    fn roles_and_track_file_round_trip() {
        let dir = std::env::temp_dir().join(format!("blb-ha-{}", std::process::id()));
        let path = role_file(&dir.join("control.sock"));
        assert_eq!(load_role(&path), Role::Unknown);
        save_role(&path, Role::Standby).expect("save");
        assert_eq!(load_role(&path), Role::Standby);
        let track = dir.join("ha-track");
        write_track(&track, true).expect("track");
        assert_eq!(std::fs::read_to_string(&track).expect("read"), "0\n");
        write_track(&track, false).expect("track");
        assert_eq!(std::fs::read_to_string(&track).expect("read"), "1\n");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
