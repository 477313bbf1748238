//! Health checks for the balancer controller.
//!
//! A [`HealthSpec`] (one inline table of the config file) says how to check a backend:
//! `tcp` (connect), `http` / `https` (GET a path, match status and optionally a body
//! substring) or `mllp` (send an HL7 v2 message, expect an ACK with MSA-1 `AA` or `CA`).
//! A [`Monitor`] runs one tokio task per target and reports debounced state changes
//! (`rise` consecutive successes, `fall` consecutive failures) as [`HealthEvent`]s.
//! [`probe`] runs one check, for tests and the CLI.
//!
//! ```no_run
//! use std::time::Duration;
//! use balancer_health::{CheckKind, Health, HealthSpec, Monitor};
//!
//! # async fn demo() {
//! let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
//! let mut monitor = Monitor::new(tx);
//! let spec = HealthSpec {
//!     interval: Duration::from_millis(250),
//!     timeout: Duration::from_millis(200),
//!     ..HealthSpec::new(CheckKind::mllp())
//! };
//! spec.validate().expect("valid spec");
//! monitor.add(1, "10.0.0.11:2575".parse().unwrap(), spec, Health::Down);
//! while let Some(ev) = rx.recv().await {
//!     println!("target {} is {} ({})", ev.target, ev.health, ev.reason);
//! }
//! # }
//! ```
//!
//! No payload byte of any service ever reaches a log line, an event or an error string:
//! failure reasons are built from status codes, ACK codes and error kinds only.

#![warn(missing_docs)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

mod error;
pub mod mllp;
mod monitor;
mod probe;
mod spec;
mod tls;

pub use error::{IoReason, ProbeError, SpecError};
pub use monitor::{Health, HealthEvent, Monitor, TargetId};
pub use probe::probe;
pub use spec::{CheckKind, HealthSpec};
