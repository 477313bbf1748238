//! The controller's core: the daemon loop that owns all state, reconciliation of desired
//! state into the dataplane, and flow expiry.

pub mod daemon;
pub mod flow_expiry;
pub mod reconcile;
