//! Messages and their sealed wire form.
//!
//! ```text
//!  0      4   5        8               16              24           n-32      n
//!  +------+---+--------+---------------+---------------+------------+---------+
//!  | BLBS | 1 | 0 0 0  | epoch (u64 BE)| seq (u64 BE)  | postcard   | HMAC-   |
//!  |      |   |reserved|               |               | (Body)     | SHA256  |
//!  +------+---+--------+---------------+---------------+------------+---------+
//! ```
//!
//! The tag covers bytes `0..n-32`: header and body. [`open`] checks length, magic and
//! version (cheap, and they tell a stray datagram from a forged one), then the tag in
//! constant time, and only then decodes the body; the reserved bytes are covered by the
//! tag and ignored otherwise, so a later version can use them.

use ring::hmac;
use serde::{Deserialize, Serialize};

use crate::MAX_DATAGRAM;
use crate::error::SyncError;
use crate::key::Key;

/// The first four bytes of every datagram.
pub const MAGIC: [u8; 4] = *b"BLBS";
/// The protocol version this build seals and opens.
pub const VERSION: u8 = 1;
/// Header length: magic, version, 3 reserved bytes, epoch, seq.
pub const HEADER_LEN: usize = 24;
/// Length of the HMAC-SHA256 tag at the end of a datagram.
pub const TAG_LEN: usize = 32;
/// The largest encoded [`Body`] that fits in [`MAX_DATAGRAM`].
pub const MAX_BODY: usize = MAX_DATAGRAM - HEADER_LEN - TAG_LEN;

/// A forward flow entry as the balancer holds it.
///
/// Addresses are 16 bytes (IPv4 as v4-mapped IPv6, `::ffff:a.b.c.d`), ports in network
/// byte order as the map stores them. `src/dst/sport/dport/proto` is the client's 5-tuple
/// as received, `new_*` the rewritten one (backend and, for NAT, the SNAT source).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FlowRecord {
    /// Client source address.
    pub src: [u8; 16],
    /// Destination (VIP) address.
    pub dst: [u8; 16],
    /// Client source port (network byte order).
    pub sport: u16,
    /// Destination (VIP) port (network byte order).
    pub dport: u16,
    /// IP protocol number (6 TCP, 17 UDP).
    pub proto: u8,
    /// Source address after rewrite.
    pub new_src: [u8; 16],
    /// Destination (backend) address after rewrite.
    pub new_dst: [u8; 16],
    /// Source port after rewrite (network byte order).
    pub new_sport: u16,
    /// Destination port after rewrite (network byte order).
    pub new_dport: u16,
    /// The flow entry's flags, as the dataplane defines them.
    pub flags: u32,
    /// Seconds since the flow last saw a packet, at the sender.
    pub idle_secs: u32,
}

impl FlowRecord {
    /// The key of this flow: its client-side 5-tuple.
    pub fn id(&self) -> FlowId {
        FlowId {
            src: self.src,
            dst: self.dst,
            sport: self.sport,
            dport: self.dport,
            proto: self.proto,
        }
    }
}

/// The key of a forward flow: the client-side 5-tuple of a [`FlowRecord`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FlowId {
    /// Client source address.
    pub src: [u8; 16],
    /// Destination (VIP) address.
    pub dst: [u8; 16],
    /// Client source port (network byte order).
    pub sport: u16,
    /// Destination (VIP) port (network byte order).
    pub dport: u16,
    /// IP protocol number.
    pub proto: u8,
}

/// A node's HA role as it announces it in heartbeats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Role {
    /// Owns the VIPs and forwards traffic.
    Active,
    /// Ready to take over; mirrors the active node's state.
    Standby,
    /// Cannot serve (dataplane or health failure).
    Fault,
    /// Starting, or its role is not decided yet.
    Unknown,
}

/// An operator's state for a backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Admin {
    /// Takes new flows.
    Enabled,
    /// Keeps its flows, takes no new ones.
    Draining,
    /// Out of service.
    Disabled,
}

/// The control state of one service that the pair mirrors.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceControl {
    /// The service's name.
    pub service: String,
    /// For failover services: the backend (by name) the scheduler chose as active.
    pub active: Option<String>,
    /// Backend name → operator state.
    pub admin: Vec<(String, Admin)>,
}

/// What a message says.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Body {
    /// Sent periodically; tells the peer this node is alive and what it holds.
    Heartbeat {
        /// The sender's role.
        role: Role,
        /// [`crate::config_digest`] of the sender's configuration.
        config_digest: [u8; 32],
        /// The highest sequence number of the peer's that the sender has applied.
        applied_seq: u64,
        /// Flows in the sender's table.
        flows: u64,
        /// The sender's node name.
        node: String,
    },
    /// Flow entries: new flows (`resync: None`) or one batch of a full resync pass
    /// (`resync: Some(generation)`).
    Flows {
        /// The resync pass's generation, or `None` for new flows.
        resync: Option<u32>,
        /// The entries.
        records: Vec<FlowRecord>,
    },
    /// Flows that ended.
    Deletes(Vec<FlowId>),
    /// Asks the peer for a full resync pass.
    ResyncRequest,
    /// The end of a resync pass: its generation and how many records it sent.
    ResyncDone {
        /// The pass's generation, as in its [`Body::Flows`] batches.
        generation: u32,
        /// Records sent in the pass.
        records: u64,
    },
    /// Control state of services (failover choices, operator states).
    Control(Vec<ServiceControl>),
}

/// One opened (authenticated, decoded) datagram.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// The sender's epoch: its start time in unix nanoseconds.
    pub epoch: u64,
    /// The sender's sequence number within its epoch.
    pub seq: u64,
    /// The content.
    pub body: Body,
}

/// Seals a message: header, postcard body, HMAC-SHA256 tag.
///
/// Fails with [`SyncError::TooLarge`] when the result would exceed [`MAX_DATAGRAM`]
/// (use the `*_batches` functions to split long lists).
pub fn seal(key: &Key, epoch: u64, seq: u64, body: &Body) -> Result<Vec<u8>, SyncError> {
    Ok(seal_encoded(key, epoch, seq, &encode_body(body)?))
}

/// The postcard encoding of a body, if it fits in a datagram ([`MAX_BODY`]).
pub(crate) fn encode_body(body: &Body) -> Result<Vec<u8>, SyncError> {
    let mut buf = [0u8; MAX_BODY];
    match postcard::to_slice(body, &mut buf) {
        Ok(used) => Ok(used.to_vec()),
        Err(postcard::Error::SerializeBufferFull) => {
            let len = postcard::to_stdvec(body)
                .map_or(MAX_DATAGRAM + 1, |v| HEADER_LEN + v.len() + TAG_LEN);
            Err(SyncError::TooLarge {
                len,
                max: MAX_DATAGRAM,
            })
        }
        Err(_) => Err(SyncError::Malformed),
    }
}

/// Header, an encoded body (at most [`MAX_BODY`] bytes) and the tag.
pub(crate) fn seal_encoded(key: &Key, epoch: u64, seq: u64, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + body.len() + TAG_LEN);
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    out.extend_from_slice(&[0; 3]);
    out.extend_from_slice(&epoch.to_be_bytes());
    out.extend_from_slice(&seq.to_be_bytes());
    out.extend_from_slice(body);
    let tag = hmac::sign(key.hmac(), &out);
    out.extend_from_slice(tag.as_ref());
    out
}

/// Opens a datagram: checks length, magic and version, verifies the tag in constant time,
/// then decodes the body (which must use every byte up to the tag).
///
/// Replay is not checked here: feed `epoch` and `seq` to a [`crate::ReplayGuard`].
pub fn open(key: &Key, datagram: &[u8]) -> Result<Message, SyncError> {
    let len = datagram.len();
    if len > MAX_DATAGRAM {
        return Err(SyncError::TooLarge {
            len,
            max: MAX_DATAGRAM,
        });
    }
    if len < HEADER_LEN + TAG_LEN {
        // Report magic before length when the first bytes are there and wrong: a stray
        // short datagram of another protocol is "not ours", not "truncated".
        if len >= 4 && datagram[0..4] != MAGIC {
            return Err(SyncError::BadMagic);
        }
        return Err(SyncError::TooShort { len });
    }
    let (header, rest) = datagram.split_at(HEADER_LEN);
    if header[0..4] != MAGIC {
        return Err(SyncError::BadMagic);
    }
    if header[4] != VERSION {
        return Err(SyncError::BadVersion { version: header[4] });
    }
    let (signed, tag) = datagram.split_at(len - TAG_LEN);
    hmac::verify(key.hmac(), signed, tag).map_err(|_| SyncError::BadMac)?;
    let body_bytes = &rest[..rest.len() - TAG_LEN];
    let (body, trailing) =
        postcard::take_from_bytes::<Body>(body_bytes).map_err(|_| SyncError::Malformed)?;
    if !trailing.is_empty() {
        return Err(SyncError::Malformed);
    }
    let epoch = u64::from_be_bytes(array8(&header[8..16]));
    let seq = u64::from_be_bytes(array8(&header[16..24]));
    Ok(Message { epoch, seq, body })
}

fn array8(b: &[u8]) -> [u8; 8] {
    let mut a = [0u8; 8];
    a.copy_from_slice(b);
    a
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    pub(crate) fn key() -> Key {
        Key::from_hex("0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0").unwrap()
    }

    pub(crate) fn record(i: u32) -> FlowRecord {
        let mut src = [0u8; 16];
        src[10] = 0xff;
        src[11] = 0xff;
        src[12..].copy_from_slice(&(0x0a00_0000 | i).to_be_bytes());
        let mut dst = src;
        dst[15] = 100;
        FlowRecord {
            src,
            dst,
            sport: (40000 + i as u16).to_be(),
            dport: 80u16.to_be(),
            proto: 6,
            new_src: dst,
            new_dst: src,
            new_sport: 1234u16.to_be(),
            new_dport: 8080u16.to_be(),
            flags: i,
            idle_secs: i * 3,
        }
    }

    pub(crate) fn all_bodies() -> Vec<Body> {
        vec![
            Body::Heartbeat {
                role: Role::Active,
                config_digest: [7; 32],
                applied_seq: 42,
                flows: 1_000_000,
                node: "lb1".into(),
            },
            Body::Heartbeat {
                role: Role::Standby,
                config_digest: [0; 32],
                applied_seq: u64::MAX,
                flows: 0,
                node: String::new(),
            },
            Body::Heartbeat {
                role: Role::Fault,
                config_digest: [0xff; 32],
                applied_seq: 0,
                flows: 1,
                node: "lb2".into(),
            },
            Body::Heartbeat {
                role: Role::Unknown,
                config_digest: [1; 32],
                applied_seq: 1,
                flows: 2,
                node: "ünïcode".into(),
            },
            Body::Flows {
                resync: None,
                records: vec![record(1), record(2)],
            },
            Body::Flows {
                resync: Some(9),
                records: vec![],
            },
            Body::Deletes(vec![record(3).id(), record(4).id()]),
            Body::Deletes(vec![]),
            Body::ResyncRequest,
            Body::ResyncDone {
                generation: 9,
                records: 123_456,
            },
            Body::Control(vec![
                ServiceControl {
                    service: "hl7".into(),
                    active: Some("be1".into()),
                    admin: vec![
                        ("be1".into(), Admin::Enabled),
                        ("be2".into(), Admin::Draining),
                    ],
                },
                ServiceControl {
                    service: "web".into(),
                    active: None,
                    admin: vec![("w3".into(), Admin::Disabled)],
                },
            ]),
        ]
    }

    #[test]
    fn roundtrip_every_body() {
        let k = key();
        for (i, body) in all_bodies().into_iter().enumerate() {
            let epoch = 1_700_000_000_000_000_000 + i as u64;
            let d = seal(&k, epoch, i as u64 + 1, &body).unwrap();
            assert!(d.len() <= MAX_DATAGRAM);
            assert_eq!(&d[0..4], b"BLBS");
            assert_eq!(d[4], 1);
            assert_eq!(&d[8..16], &epoch.to_be_bytes());
            let m = open(&k, &d).unwrap();
            assert_eq!(m.epoch, epoch);
            assert_eq!(m.seq, i as u64 + 1);
            assert_eq!(m.body, body);
        }
    }

    #[test]
    fn every_flipped_bit_is_refused() {
        let k = key();
        let d = seal(&k, 5, 6, &all_bodies()[4]).unwrap();
        for byte in 0..d.len() {
            for bit in 0..8 {
                let mut m = d.clone();
                m[byte] ^= 1 << bit;
                let e = open(&k, &m).unwrap_err();
                match byte {
                    0..4 => assert!(matches!(e, SyncError::BadMagic), "{byte}: {e:?}"),
                    4 => assert!(matches!(e, SyncError::BadVersion { .. }), "{e:?}"),
                    _ => assert!(matches!(e, SyncError::BadMac), "{byte}.{bit}: {e:?}"),
                }
            }
        }
    }

    #[test]
    fn wrong_key_is_bad_mac() {
        let d = seal(&key(), 1, 1, &Body::ResyncRequest).unwrap();
        let other = Key::generate();
        assert!(matches!(open(&other, &d), Err(SyncError::BadMac)));
    }

    #[test]
    fn truncated_and_extended_are_refused() {
        let k = key();
        let d = seal(&k, 1, 1, &all_bodies()[0]).unwrap();
        for n in 0..d.len() {
            let e = open(&k, &d[..n]).unwrap_err();
            if n < HEADER_LEN + TAG_LEN {
                assert!(
                    matches!(e, SyncError::TooShort { len } if len == n),
                    "{n}: {e:?}"
                );
            } else {
                assert!(matches!(e, SyncError::BadMac), "{n}: {e:?}");
            }
        }
        let mut long = d.clone();
        long.push(0);
        assert!(matches!(open(&k, &long), Err(SyncError::BadMac)));
        let huge = vec![0u8; MAX_DATAGRAM + 1];
        assert!(matches!(open(&k, &huge), Err(SyncError::TooLarge { .. })));
    }

    /// A header and arbitrary body bytes under a valid tag: what only a key holder could
    /// send. Decoding must refuse garbage and trailing bytes without panicking.
    fn sign_raw(k: &Key, body: &[u8]) -> Vec<u8> {
        let mut d = Vec::new();
        d.extend_from_slice(&MAGIC);
        d.push(VERSION);
        d.extend_from_slice(&[0; 3]);
        d.extend_from_slice(&1u64.to_be_bytes());
        d.extend_from_slice(&2u64.to_be_bytes());
        d.extend_from_slice(body);
        let tag = hmac::sign(k.hmac(), &d);
        d.extend_from_slice(tag.as_ref());
        d
    }

    #[test]
    fn authentic_but_malformed_bodies() {
        let k = key();
        // Unknown variant, empty body, truncated body, trailing byte.
        assert!(matches!(
            open(&k, &sign_raw(&k, &[99])),
            Err(SyncError::Malformed)
        ));
        assert!(matches!(
            open(&k, &sign_raw(&k, &[])),
            Err(SyncError::Malformed)
        ));
        let good = postcard::to_stdvec(&all_bodies()[0]).unwrap();
        assert!(open(&k, &sign_raw(&k, &good)).is_ok());
        assert!(matches!(
            open(&k, &sign_raw(&k, &good[..good.len() - 1])),
            Err(SyncError::Malformed)
        ));
        let mut trailing = good.clone();
        trailing.push(0);
        assert!(matches!(
            open(&k, &sign_raw(&k, &trailing)),
            Err(SyncError::Malformed)
        ));
        // A vec length far beyond the datagram must not allocate or panic.
        let mut huge_len = vec![2u8]; // Body::Deletes
        huge_len.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0x0f]);
        assert!(matches!(
            open(&k, &sign_raw(&k, &huge_len)),
            Err(SyncError::Malformed)
        ));
    }

    #[test]
    fn reserved_bytes_are_authenticated() {
        let k = key();
        let mut d = seal(&k, 1, 1, &Body::ResyncRequest).unwrap();
        d[6] = 1;
        assert!(matches!(open(&k, &d), Err(SyncError::BadMac)));
    }

    #[test]
    fn oversized_body_does_not_seal() {
        let body = Body::Heartbeat {
            role: Role::Active,
            config_digest: [0; 32],
            applied_seq: 0,
            flows: 0,
            node: "x".repeat(MAX_DATAGRAM),
        };
        let e = seal(&key(), 1, 1, &body).unwrap_err();
        assert!(matches!(e, SyncError::TooLarge { len, max: MAX_DATAGRAM } if len > MAX_DATAGRAM));
        assert!(!e.to_string().contains("xxx"));
    }

    #[test]
    fn error_texts_carry_no_payload() {
        let k = key();
        let secret_body = Body::Heartbeat {
            role: Role::Active,
            config_digest: [0; 32],
            applied_seq: 0,
            flows: 0,
            node: "SECRETNODE".into(),
        };
        let mut d = seal(&k, 1, 1, &secret_body).unwrap();
        let n = d.len();
        d[n - 1] ^= 1;
        let e = open(&k, &d).unwrap_err();
        assert!(!e.to_string().contains("SECRET"));
        assert!(!format!("{e:?}").contains("SECRET"));
    }

    proptest! {
        #[test]
        fn open_never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..1600)) {
            let _ = open(&key(), &bytes);
        }

        #[test]
        fn open_never_panics_on_authentic_garbage(bytes in proptest::collection::vec(any::<u8>(), 0..1300)) {
            let k = key();
            let _ = open(&k, &sign_raw(&k, &bytes));
        }

        #[test]
        fn mutated_datagrams_never_open(
            which in 0usize..11,
            edits in proptest::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 1..8),
        ) {
            let k = key();
            let d = seal(&k, 77, 88, &all_bodies()[which]).unwrap();
            let mut m = d.clone();
            for (i, x) in &edits {
                let at = i.index(m.len());
                m[at] ^= x;
            }
            if m != d {
                prop_assert!(open(&k, &m).is_err());
            }
        }

        #[test]
        fn mutated_lengths_never_panic(
            which in 0usize..11,
            cut in any::<prop::sample::Index>(),
            extra in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let k = key();
            let d = seal(&k, 77, 88, &all_bodies()[which]).unwrap();
            let mut m = d[..cut.index(d.len() + 1)].to_vec();
            m.extend_from_slice(&extra);
            if m != d {
                prop_assert!(open(&k, &m).is_err());
            }
        }
    }
}
