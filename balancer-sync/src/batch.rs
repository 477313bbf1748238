//! Cutting long lists into bodies that each seal below [`MAX_DATAGRAM`].
//!
//! Postcard writes `[u8; 16]` as 16 raw bytes, `u8` as one byte and `u16` / `u32` /
//! `u64` as LEB128 varints of at most 3 / 5 / 10 bytes. The per-chunk counts below are
//! worked out from the worst case of every field, so any records fit, whatever their
//! values; the tests check the worst case against the encoder.

use crate::MAX_DATAGRAM;
use crate::error::SyncError;
use crate::wire::{Body, FlowId, FlowRecord, MAX_BODY, ServiceControl};

const ADDR: usize = 16;
const VARINT_U16: usize = 3;
const VARINT_U32: usize = 5;
/// A vec length below 16384 takes at most two varint bytes; no chunk comes near that.
const VEC_LEN: usize = 2;
/// The variant index of a `Body`.
const VARIANT: usize = 1;

/// The largest encoding of one [`FlowRecord`]: 4 addresses, 4 ports, proto, flags, idle.
pub const MAX_FLOW_RECORD_ENCODED: usize = 4 * ADDR + 4 * VARINT_U16 + 1 + 2 * VARINT_U32;

/// The largest encoding of one [`FlowId`]: 2 addresses, 2 ports, proto.
pub const MAX_FLOW_ID_ENCODED: usize = 2 * ADDR + 2 * VARINT_U16 + 1;

/// `Body::Flows` around its records: variant, `Option` tag, generation, vec length.
const FLOWS_OVERHEAD: usize = VARIANT + 1 + VARINT_U32 + VEC_LEN;
/// `Body::Deletes` around its ids: variant, vec length.
const DELETES_OVERHEAD: usize = VARIANT + VEC_LEN;
/// `Body::Control` around its entries: variant, vec length.
const CONTROL_OVERHEAD: usize = VARIANT + VEC_LEN;

/// Records per [`Body::Flows`] batch (15): the most that always seal below
/// [`MAX_DATAGRAM`].
pub const FLOWS_PER_BATCH: usize = (MAX_BODY - FLOWS_OVERHEAD) / MAX_FLOW_RECORD_ENCODED;

/// Ids per [`Body::Deletes`] batch (34): the most that always seal below [`MAX_DATAGRAM`].
pub const IDS_PER_BATCH: usize = (MAX_BODY - DELETES_OVERHEAD) / MAX_FLOW_ID_ENCODED;

/// Splits flow records into [`Body::Flows`] bodies of at most [`FLOWS_PER_BATCH`] records,
/// each tagged with `resync` (`None` for new flows, `Some(generation)` in a resync pass).
///
/// No records, no bodies: a resync pass of an empty table is only its
/// [`Body::ResyncDone`].
pub fn flow_batches(resync: Option<u32>, records: &[FlowRecord]) -> Vec<Body> {
    records
        .chunks(FLOWS_PER_BATCH)
        .map(|chunk| Body::Flows {
            resync,
            records: chunk.to_vec(),
        })
        .collect()
}

/// Splits flow ids into [`Body::Deletes`] bodies of at most [`IDS_PER_BATCH`] ids.
pub fn delete_batches(ids: &[FlowId]) -> Vec<Body> {
    ids.chunks(IDS_PER_BATCH)
        .map(|chunk| Body::Deletes(chunk.to_vec()))
        .collect()
}

/// Packs service control entries greedily, in order, into [`Body::Control`] bodies that
/// each seal below [`MAX_DATAGRAM`] (entries vary in size: names are strings).
///
/// Fails with [`SyncError::TooLarge`] if one entry alone cannot fit (about 1300 bytes of
/// names). No entries, no bodies.
pub fn control_batches(services: &[ServiceControl]) -> Result<Vec<Body>, SyncError> {
    let room = MAX_BODY - CONTROL_OVERHEAD;
    let mut out = Vec::new();
    let mut chunk: Vec<ServiceControl> = Vec::new();
    let mut used = 0;
    for svc in services {
        let size = postcard::to_stdvec(svc)
            .map_err(|_| SyncError::Malformed)?
            .len();
        if size > room {
            return Err(SyncError::TooLarge {
                len: size + CONTROL_OVERHEAD + MAX_DATAGRAM - MAX_BODY,
                max: MAX_DATAGRAM,
            });
        }
        if used + size > room {
            out.push(Body::Control(std::mem::take(&mut chunk)));
            used = 0;
        }
        used += size;
        chunk.push(svc.clone());
    }
    if !chunk.is_empty() {
        out.push(Body::Control(chunk));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::tests::{key, record};
    use crate::wire::{Admin, open, seal};

    fn worst_record() -> FlowRecord {
        FlowRecord {
            src: [0xff; 16],
            dst: [0xff; 16],
            sport: u16::MAX,
            dport: u16::MAX,
            proto: u8::MAX,
            new_src: [0xff; 16],
            new_dst: [0xff; 16],
            new_sport: u16::MAX,
            new_dport: u16::MAX,
            flags: u32::MAX,
            idle_secs: u32::MAX,
        }
    }

    #[test]
    fn worst_case_sizes_match_the_encoder() {
        let r = worst_record();
        assert_eq!(
            postcard::to_stdvec(&r).unwrap().len(),
            MAX_FLOW_RECORD_ENCODED
        );
        assert_eq!(
            postcard::to_stdvec(&r.id()).unwrap().len(),
            MAX_FLOW_ID_ENCODED
        );
        assert_eq!(FLOWS_PER_BATCH, 15);
        assert_eq!(IDS_PER_BATCH, 34);
    }

    #[test]
    fn largest_flow_batch_seals_and_opens() {
        let k = key();
        let records = vec![worst_record(); FLOWS_PER_BATCH * 3 + 1];
        let bodies = flow_batches(Some(u32::MAX), &records);
        assert_eq!(bodies.len(), 4);
        for b in &bodies {
            let d = seal(&k, u64::MAX, u64::MAX, b).unwrap();
            assert!(d.len() <= MAX_DATAGRAM, "{}", d.len());
            assert_eq!(&open(&k, &d).unwrap().body, b);
        }
        // The bound is tight enough to matter: one record more would not fit.
        let over = Body::Flows {
            resync: Some(u32::MAX),
            records: vec![worst_record(); FLOWS_PER_BATCH + 1],
        };
        assert!(matches!(
            seal(&k, 1, 1, &over),
            Err(SyncError::TooLarge { .. })
        ));
    }

    #[test]
    fn largest_delete_batch_seals_and_opens() {
        let k = key();
        let ids = vec![worst_record().id(); IDS_PER_BATCH * 2];
        let bodies = delete_batches(&ids);
        assert_eq!(bodies.len(), 2);
        for b in &bodies {
            let d = seal(&k, u64::MAX, u64::MAX, b).unwrap();
            assert!(d.len() <= MAX_DATAGRAM);
            assert_eq!(&open(&k, &d).unwrap().body, b);
        }
        let over = Body::Deletes(vec![worst_record().id(); IDS_PER_BATCH + 1]);
        assert!(seal(&k, 1, 1, &over).is_err());
    }

    #[test]
    fn batches_keep_every_record_in_order() {
        let records: Vec<_> = (0..100).map(record).collect();
        let mut back = Vec::new();
        for b in flow_batches(None, &records) {
            match b {
                Body::Flows {
                    resync: None,
                    records,
                } => {
                    assert!(records.len() <= FLOWS_PER_BATCH);
                    back.extend(records);
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(back, records);
        assert!(flow_batches(Some(1), &[]).is_empty());
        assert!(delete_batches(&[]).is_empty());
        let ids: Vec<_> = records.iter().map(FlowRecord::id).collect();
        let back: Vec<_> = delete_batches(&ids)
            .into_iter()
            .flat_map(|b| match b {
                Body::Deletes(v) => v,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(back, ids);
    }

    #[test]
    fn control_batches_fit_and_keep_order() {
        let k = key();
        let services: Vec<_> = (0..60)
            .map(|i| ServiceControl {
                service: format!("service-{i:03}-{}", "s".repeat(i % 40)),
                active: (i % 2 == 0).then(|| format!("backend-{i}")),
                admin: (0..(i % 7))
                    .map(|j| {
                        (
                            format!("backend-{j}-{}", "b".repeat(j * 5)),
                            Admin::Draining,
                        )
                    })
                    .collect(),
            })
            .collect();
        let bodies = control_batches(&services).unwrap();
        assert!(bodies.len() > 1);
        let mut back = Vec::new();
        for b in &bodies {
            let d = seal(&k, 1, 1, b).unwrap();
            assert!(d.len() <= MAX_DATAGRAM);
            match open(&k, &d).unwrap().body {
                Body::Control(v) => back.extend(v),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(back, services);
        assert!(control_batches(&[]).unwrap().is_empty());

        let huge = ServiceControl {
            service: "x".repeat(MAX_DATAGRAM),
            active: None,
            admin: vec![],
        };
        assert!(matches!(
            control_batches(&[huge]),
            Err(SyncError::TooLarge { .. })
        ));
    }
}
