//! The controller's core. A reload (or a start) is planned ([`plan`]: pure, every refusal
//! happens there) and then applied ([`apply`]: the map writes, in order, undone on failure);
//! health and operator changes rewrite one service. The daemon loop owns all state.
//!
//! | module | concern |
//! |---|---|
//! | [`state`] | the controller's view of the dataplane: services, slots, health, operator states |
//! | [`plan`] | desired config + state in force + maps + health + operator states → [`plan::Plan`] |
//! | [`apply`] | a plan into the maps, in a safe order, rolled back on failure |
//! | [`maps`] | the map-writer and address traits, implemented by the dataplane and the host |
//! | [`checks`] | health-check registrations: ids that are never reused, events matched by address |
//! | [`failover`] | which backend of a failover service is active |
//! | [`operator`] | drain / disable / enable: the verb, overrides across reloads and restarts |
//! | [`status`] | the status snapshot readers get without waiting for the loop |
//! | [`daemon`] | `balancer run`: the loop, health events, the API, signals |
//! | [`flow_expiry`] | idle flows leave the flow table |
//! | [`ha`] | one balancer of a pair: its VRRP role, the track file, following the active peer |
//! | [`pair`] | the pair's sync tasks: flows and control state mirrored over the authenticated channel |
//! | [`mirror`] | flows of the HA pair's other balancer, translated to this one's numbering |

pub mod apply;
pub mod checks;
pub mod daemon;
pub mod failover;
#[cfg(test)]
mod fake;
pub mod flow_expiry;
pub mod ha;
pub mod maps;
pub mod mirror;
pub mod operator;
pub mod pair;
pub mod passive;
pub mod plan;
pub mod state;
pub mod status;

/// A request about a service or backend the state does not have.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    /// No such service.
    #[error("no service '{0}'")]
    NoService(String),
    /// No such backend in the service.
    #[error("service '{service}' has no backend '{backend}'")]
    NoBackend {
        /// Service.
        service: String,
        /// Backend as given.
        backend: String,
    },
}

/// Why a config could not be put in force; nothing changed.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// The interface's addresses could not be read.
    #[error("reading the interface's addresses: {0}")]
    Host(#[source] std::io::Error),
    /// The planner refused it.
    #[error(transparent)]
    Plan(#[from] plan::PlanError),
    /// Applying failed (and was undone).
    #[error(transparent)]
    Apply(#[from] apply::ApplyError),
}

/// Plans `cfg` against the state in force (none at start) and applies it to the dataplane
/// and the interface: the one path of a start and a reload.
pub fn reconcile(
    dp: &mut crate::dataplane::Dataplane,
    cfg: &crate::config::Validated,
    current: Option<&state::State>,
    health: &plan::HealthBook,
    ops: &operator::OperatorStates,
) -> Result<plan::Plan, ReconcileError> {
    let host = plan::HostAddrs::resolve(cfg).map_err(ReconcileError::Host)?;
    let p = plan::plan(cfg, current, dp, health, ops, &host)?;
    let mut vips = maps::InterfaceVips {
        interfaces: cfg.interfaces.clone(),
    };
    let applied = apply::apply(&p, dp, &mut vips)?;
    for e in applied.stale_vips {
        tracing::warn!(error = %e, "an address no longer used stays on the interface");
    }
    Ok(p)
}
