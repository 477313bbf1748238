//! The balancer controller: configuration, the XDP dataplane, Maglev, reconciliation.
//!
//! The binary (`src/main.rs`) is a thin clap front end over this library.

pub mod api;
pub mod bench;
pub mod config;
pub mod control;
pub mod daemon;
pub mod dataplane;
pub mod gc;
pub mod health;
pub mod maglev;
pub mod metrics;
pub mod net;
pub mod reconcile;
pub mod report;
pub mod systemd;
pub mod testbed;
