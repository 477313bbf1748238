//! Operator states: drain / disable / enable set through the API, carried across reloads
//! and controller restarts, and the one verb type the CLI, the client and the API share.

use std::{collections::BTreeMap, net::SocketAddr, path::Path};

use serde::{Deserialize, Serialize};

use crate::{config::AdminState, control::state::State};

/// An operator's action on one backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verb {
    /// No new flows to the backend; existing flows continue.
    Drain,
    /// Out of service: its flows are reset at once.
    Disable,
    /// Back in service (subject to its health check).
    Enable,
}

impl Verb {
    /// Every verb, in CLI order.
    pub const ALL: [Verb; 3] = [Verb::Drain, Verb::Disable, Verb::Enable];

    /// The word used on the command line, in API paths and in replies.
    pub fn name(self) -> &'static str {
        match self {
            Verb::Drain => "drain",
            Verb::Disable => "disable",
            Verb::Enable => "enable",
        }
    }

    /// The verb named `s`.
    pub fn parse(s: &str) -> Option<Verb> {
        Verb::ALL.into_iter().find(|v| v.name() == s)
    }

    /// The operator state the verb sets.
    pub fn admin(self) -> AdminState {
        match self {
            Verb::Drain => AdminState::Drain,
            Verb::Disable => AdminState::Disabled,
            Verb::Enable => AdminState::Up,
        }
    }
}

/// An operator's action on this balancer's BGP announcements (maintenance of one member of
/// an ECMP group): the one verb type the CLI, the client and the API share.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BgpVerb {
    /// Withdraw every VIP: the routers send this balancer no more traffic (flows already
    /// here move to the other balancers; the dataplane still forwards what arrives).
    Withdraw,
    /// Announce again (each VIP subject to its services' backends).
    Announce,
}

impl BgpVerb {
    /// Every verb, in CLI order.
    pub const ALL: [BgpVerb; 2] = [BgpVerb::Withdraw, BgpVerb::Announce];

    /// The word used on the command line, in API paths and in replies.
    pub fn name(self) -> &'static str {
        match self {
            BgpVerb::Withdraw => "withdraw",
            BgpVerb::Announce => "announce",
        }
    }

    /// The verb named `s`.
    pub fn parse(s: &str) -> Option<BgpVerb> {
        BgpVerb::ALL.into_iter().find(|v| v.name() == s)
    }

    /// Whether the verb leaves the balancer withdrawn by the operator.
    pub fn withdrawn(self) -> bool {
        self == BgpVerb::Withdraw
    }
}

/// Where the operator's BGP withdraw is kept across controller restarts (beside the
/// operator states; a reboot starts announced again).
pub fn load_bgp_withdrawn(path: &Path) -> Result<bool, OperatorFileError> {
    match std::fs::read_to_string(path) {
        Ok(t) => Ok(serde_json::from_str::<BgpFile>(&t)?.withdrawn),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Saves the operator's BGP withdraw (see [`load_bgp_withdrawn`]).
pub fn save_bgp_withdrawn(path: &Path, withdrawn: bool) -> Result<(), OperatorFileError> {
    crate::host::write_private(
        path,
        serde_json::to_string_pretty(&BgpFile { withdrawn })?.as_bytes(),
    )?;
    Ok(())
}

#[derive(Serialize, Deserialize)]
struct BgpFile {
    withdrawn: bool,
}

/// One backend's operator override.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OperatorState {
    /// The state the operator set.
    pub admin: AdminState,
    /// The config's state for the backend when the override was made; the override lapses
    /// when the config changes it. `None`: holds whatever the config says (restored after a
    /// restart, when the old config is not known).
    pub configured: Option<AdminState>,
}

/// Operator overrides by (service, backend address).
pub type OperatorStates = BTreeMap<(String, SocketAddr), OperatorState>;

/// The overrides in force in `state`: backends whose operator state differs from the config.
pub fn from_state(state: &State) -> OperatorStates {
    let mut out = OperatorStates::new();
    for (name, s) in &state.services {
        for (b, spec) in s.backends.iter().zip(&s.spec.backends) {
            if b.admin != spec.state {
                out.insert(
                    (name.clone(), b.address),
                    OperatorState {
                        admin: b.admin,
                        configured: Some(spec.state),
                    },
                );
            }
        }
    }
    out
}

/// The file format: service → backend address → state.
type File = BTreeMap<String, BTreeMap<String, AdminState>>;

/// Why the overrides could not be saved or read.
#[derive(Debug, thiserror::Error)]
pub enum OperatorFileError {
    /// Reading or writing the file.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// Not the expected JSON.
    #[error("{0}")]
    Format(#[from] serde_json::Error),
}

/// Writes the overrides of `state` to `path` (atomically, root-only).
pub fn save(path: &Path, state: &State) -> Result<(), OperatorFileError> {
    let mut f = File::new();
    for ((svc, addr), o) in from_state(state) {
        f.entry(svc).or_default().insert(addr.to_string(), o.admin);
    }
    crate::host::write_private(path, serde_json::to_string_pretty(&f)?.as_bytes())?;
    Ok(())
}

/// Reads overrides saved by [`save`]; a missing file is no override.
pub fn load(path: &Path) -> Result<OperatorStates, OperatorFileError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(OperatorStates::new()),
        Err(e) => return Err(e.into()),
    };
    let f: File = serde_json::from_str(&text)?;
    let mut out = OperatorStates::new();
    for (svc, backends) in f {
        for (addr, admin) in backends {
            // A backend written by an older controller under another form is skipped.
            if let Ok(a) = addr.parse::<SocketAddr>() {
                out.insert(
                    (svc.clone(), a),
                    OperatorState {
                        admin,
                        configured: None,
                    },
                );
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::fake::Rig;

    const WEB: &str = r#"
[[service]]
name = "web"
vip = "10.77.0.100:80"
ring_size = 13
backends = [ { address = "10.77.0.11:80" }, { address = "10.77.0.12:80" }, { address = "10.77.0.13:80" } ]
"#;

    fn admin(rig: &Rig, a: &str) -> AdminState {
        let s = rig.service("web");
        s.backends[s.position(a.parse().unwrap()).unwrap()].admin
    }

    #[test]
    fn drain_and_disable_survive_a_reload_until_the_config_changes_that_backend() {
        let mut rig = Rig::new();
        rig.reload(WEB).unwrap();
        rig.set_admin("web", "10.77.0.11:80", AdminState::Drain);
        rig.set_admin("web", "10.77.0.12:80", AdminState::Disabled);
        let ring = rig.ring_addrs("web");
        assert_eq!(ring.len(), 1, "{ring:?}");
        let s = rig.service("web");
        assert_eq!(
            rig.maps.slots[&s.backends[0].slot].state,
            balancer_common::BE_DRAINING
        );
        rig.reload(WEB).unwrap();
        assert_eq!(admin(&rig, "10.77.0.11:80"), AdminState::Drain);
        assert_eq!(admin(&rig, "10.77.0.12:80"), AdminState::Disabled);
        assert_eq!(rig.ring_addrs("web"), ring);
        // The config now says something about .12: the config wins there, .11 stays drained.
        let changed = WEB.replace(
            "{ address = \"10.77.0.12:80\" }",
            "{ address = \"10.77.0.12:80\", state = \"drain\" }",
        );
        rig.reload(&changed).unwrap();
        assert_eq!(admin(&rig, "10.77.0.11:80"), AdminState::Drain);
        assert_eq!(admin(&rig, "10.77.0.12:80"), AdminState::Drain);
        // Enable brings it back into the ring.
        rig.set_admin("web", "10.77.0.11:80", AdminState::Up);
        assert!(rig.ring_addrs("web").contains("10.77.0.11:80"));
    }

    #[test]
    fn overrides_survive_a_restart_through_the_file() {
        let mut rig = Rig::new();
        rig.reload(WEB).unwrap();
        rig.set_admin("web", "10.77.0.13:80", AdminState::Disabled);
        let dir = std::env::temp_dir().join(format!("balancer-op-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("admin-state.json");
        save(&path, rig.state()).unwrap();
        let ops = load(&path).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        let key = ("web".to_string(), "10.77.0.13:80".parse().unwrap());
        assert_eq!(ops[&key].admin, AdminState::Disabled);
        let p = crate::control::plan::plan(
            &Rig::cfg(WEB),
            None,
            &rig.maps,
            &Default::default(),
            &ops,
            &rig.host,
        )
        .unwrap();
        let s = &p.next.services["web"];
        assert_eq!(s.backends[2].admin, AdminState::Disabled);
        assert_eq!(
            load(Path::new("/nonexistent/admin-state.json"))
                .unwrap()
                .len(),
            0
        );
    }

    #[test]
    fn verbs_round_trip() {
        for v in Verb::ALL {
            assert_eq!(Verb::parse(v.name()), Some(v));
        }
        assert_eq!(Verb::parse("up"), None);
    }
}
