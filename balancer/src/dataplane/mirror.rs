//! The mirror of an HA pair, dataplane side: the active balancer's program reports every flow
//! it creates (`Globals::mirror`) in the `BLB_MIRROR` ring buffer, [`MirrorReader`] drains it;
//! the standby installs what it receives with [`Dataplane::install_flows`] (entries without a
//! cached next hop: the program resolves it on the flow's first packet). The conversion
//! between the two balancers' numbering lives in [`crate::control::mirror`].

use std::{
    mem::size_of,
    os::fd::{AsRawFd, RawFd},
};

use aya::maps::{MapData, RingBuf};
use balancer_common::{Flow, FlowKey, MirrorCounters, MirrorEvent};

use super::{Dataplane, Error, Result};

/// The consumer end of the mirror ring buffer. Readable (poll / `AsyncFd`) when events wait.
pub struct MirrorReader {
    ring: RingBuf<MapData>,
}

impl MirrorReader {
    /// Reads every event that is ready into `out` (appended), returns how many. Records of
    /// another size than a [`MirrorEvent`] are skipped.
    pub fn drain(&mut self, out: &mut Vec<(FlowKey, Flow)>) -> usize {
        let mut n = 0;
        while let Some(item) = self.ring.next() {
            if item.len() != size_of::<MirrorEvent>() {
                continue;
            }
            // SAFETY: exactly a MirrorEvent's bytes; plain data, any bit pattern is valid.
            let ev: MirrorEvent = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
            out.push((ev.key, ev.flow));
            n += 1;
        }
        n
    }
}

impl AsRawFd for MirrorReader {
    fn as_raw_fd(&self) -> RawFd {
        self.ring.as_raw_fd()
    }
}

impl Dataplane {
    /// Turns the program's mirror events on or off (the other globals are kept).
    pub fn set_mirror(&mut self, on: bool) -> Result<()> {
        let mut g = self.globals()?;
        g.mirror = u32::from(on);
        self.set_globals(g)
    }

    /// Mirror events written and lost, summed over CPUs.
    pub fn mirror_counters(&self) -> MirrorCounters {
        let mut c = MirrorCounters::default();
        if let Ok(v) = self.mirror_stats.get(&0, 0) {
            for x in v.iter() {
                c.events += x.events;
                c.dropped += x.dropped;
            }
        }
        c
    }

    /// The consumer of the mirror ring buffer (once: a second call fails).
    pub fn mirror_reader(&mut self) -> Result<MirrorReader> {
        let map = self.mirror.take().ok_or(Error::MirrorTaken)?;
        let ring = RingBuf::try_from(map).map_err(|source| Error::Map {
            what: "opening the mirror ring buffer",
            source,
        })?;
        Ok(MirrorReader { ring })
    }

    /// Writes flow entries (`BPF_ANY`: the mirror is authoritative over what is there) and
    /// returns how many were written. Stops at the first refused write.
    pub fn install_flows(&mut self, entries: &[(FlowKey, Flow)]) -> Result<usize> {
        for (i, (k, f)) in entries.iter().enumerate() {
            self.flows
                .insert(k, f, 0)
                .map_err(|source| Error::InstallFlow {
                    index: i + 1,
                    total: entries.len(),
                    source,
                })?;
        }
        Ok(entries.len())
    }
}
