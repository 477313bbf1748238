//! The pair-sync protocol of an HA balancer pair.
//!
//! Two balancers of a pair mirror their flow state (new forward flows, deletions, full
//! resync passes) and their control state (failover choices, operator drain/disable) to
//! each other over UDP, by default on port [`PORT`] (7946).
//!
//! Every datagram is one [`Message`]: a fixed 24-byte header (magic `BLBS`, version 1,
//! three reserved bytes, the sender's epoch and sequence number, both big-endian), the
//! [`Body`] encoded with postcard, and a 32-byte HMAC-SHA256 tag over header and body
//! under the pair's shared [`Key`]. [`seal`] builds one, [`open`] checks the tag (in
//! constant time, before any decoding) and decodes it. Every sealed message fits in
//! [`MAX_DATAGRAM`] bytes; [`flow_batches`], [`delete_batches`] and [`control_batches`]
//! cut long lists into bodies that do.
//!
//! A receiver keeps a [`ReplayGuard`]: the epoch is the sender's start time
//! ([`Epoch::now`]), so it only rises; within an epoch a 1024-sequence sliding window
//! rejects duplicates and counts lost sequence numbers.
//!
//! [`Link`] puts it together over a tokio UDP socket, with [`Stats`] counters. Nothing
//! that came off the wire (payload byte, key byte) ever reaches a log line or an error
//! string: drops are logged with their reason, source address and length only.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use balancer_sync::{Body, Key, Link, Role};
//! let key = Key::from_file(std::path::Path::new("/etc/balancer/ha.key"))?;
//! let link = Link::bind(
//!     "10.0.0.1:7946".parse()?,
//!     "10.0.0.2:7946".parse()?,
//!     key,
//! )
//! .await?;
//! link.send(&Body::Heartbeat {
//!     role: Role::Active,
//!     config_digest: [0; 32],
//!     applied_seq: 0,
//!     flows: 0,
//!     node: "lb1".into(),
//! })
//! .await?;
//! let msg = link.recv().await;
//! println!("epoch {} seq {}: {:?}", msg.epoch, msg.seq, msg.body);
//! # Ok(()) }
//! ```

#![deny(missing_docs)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

mod batch;
mod digest;
mod error;
mod key;
mod link;
mod replay;
mod stats;
mod wire;

pub use batch::{
    FLOWS_PER_BATCH, IDS_PER_BATCH, MAX_FLOW_ID_ENCODED, MAX_FLOW_RECORD_ENCODED, control_batches,
    delete_batches, flow_batches,
};
pub use digest::config_digest;
pub use error::{KeyError, SyncError};
pub use key::Key;
pub use link::{Epoch, Link};
pub use replay::{Accept, ReplayGuard, WINDOW};
pub use stats::{Stats, StatsSnapshot};
pub use wire::{
    Admin, Body, FlowId, FlowRecord, HEADER_LEN, MAGIC, MAX_BODY, Message, Role, ServiceControl,
    TAG_LEN, VERSION, open, seal,
};

/// The default UDP port of the pair-sync protocol.
pub const PORT: u16 = 7946;

/// The largest datagram the protocol sends or accepts: every sealed message fits.
///
/// 1400 bytes stays below a 1500-byte Ethernet MTU with IPv6 and a tunnel header to spare,
/// so a sync datagram is never fragmented.
pub const MAX_DATAGRAM: usize = 1400;
