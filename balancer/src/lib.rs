//! The balancer controller: configuration, the XDP dataplane, Maglev, reconciliation.
//!
//! The binary (`src/main.rs`) is a thin clap front end over this library. The folders are the
//! architecture:
//!
//! | folder | concern |
//! |---|---|
//! | [`config`] | the TOML file, validated as a whole with `file:line:column` errors |
//! | [`dataplane`] | loading, pinning and attaching the XDP program; typed maps; Maglev rings; counters |
//! | [`control`] | the daemon loop, reconciliation of desired state into maps, flow expiry |
//! | [`api`] | the root-only control socket (protocol, server, client, status table) and metrics |
//! | [`host`] | interface addresses, VIPs, sysctls; systemd notifications |

#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod api;
pub mod config;
pub mod control;
pub mod dataplane;
pub mod host;
