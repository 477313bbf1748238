//! The 802.1Q tag of a frame's next hop: kept, rewritten, pushed or popped, so a flow leaves
//! through its trunk on its own VLAN whatever VLAN (or none) it came in on.

use core::mem::size_of;

use crate::{
    error::Error,
    frame::Frame,
    headers::{ETH_P_8021Q, EthHdr, VLAN_VID_MASK, VlanHdr},
    parse::Pkt,
};

/// Gives the frame the tag of VLAN `vid` (0: no tag). `p` is the frame as parsed, before any
/// change of size. Call it after the L3/L4 rewrite (whose offsets it invalidates) and before
/// the MACs are written: a pushed or popped tag leaves the MAC bytes undefined.
///
/// A rewritten tag keeps the frame's priority bits; a pushed one has priority 0. Nothing is
/// changed when the frame cannot be resized.
#[inline(always)]
pub fn retag<F: Frame>(f: &mut F, p: &Pkt, vid: u16) -> Result<(), Error> {
    let tag_off = size_of::<EthHdr>() - 2;
    if p.vlan {
        if vid != 0 {
            if p.vid == vid {
                return Ok(());
            }
            let t: *mut VlanHdr = f.ptr_at(size_of::<EthHdr>())?;
            // SAFETY: bounds-checked.
            unsafe {
                let tci = u16::from_be((*t).tci);
                (*t).tci = ((tci & !VLAN_VID_MASK) | (vid & VLAN_VID_MASK)).to_be();
            }
            return Ok(());
        }
        // Pop: the inner EtherType, 4 bytes on, becomes the frame's.
        f.shrink_head(size_of::<VlanHdr>())?;
        return Ok(());
    }
    if vid == 0 {
        return Ok(());
    }
    // Push: 4 bytes in front; the old EtherType, now 4 bytes further on, becomes the tag's
    // inner one. The MACs are written by the caller.
    f.grow_head(size_of::<VlanHdr>())?;
    let t: *mut [u16; 2] = f.ptr_at(tag_off)?;
    // SAFETY: bounds-checked.
    unsafe {
        *t = [ETH_P_8021Q, (vid & VLAN_VID_MASK).to_be()];
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use etherparse::{PacketBuilder, SlicedPacket, VlanId};

    use super::*;
    use crate::{frame::SliceFrame, nat::set_macs, parse::parse};

    const A: [u8; 6] = [2, 0, 0, 0, 0, 0xa];
    const B: [u8; 6] = [2, 0, 0, 0, 0, 0xb];

    fn frame(vid: Option<u16>) -> Vec<u8> {
        let b = PacketBuilder::ethernet2(A, B);
        let mut out = Vec::new();
        match vid {
            Some(v) => b
                .single_vlan(VlanId::try_new(v).unwrap())
                .ipv4([10, 0, 0, 2], [10, 0, 0, 100], 64)
                .tcp(40000, 80, 7, 1000)
                .write(&mut out, b"payload"),
            None => b
                .ipv4([10, 0, 0, 2], [10, 0, 0, 100], 64)
                .tcp(40000, 80, 7, 1000)
                .write(&mut out, b"payload"),
        }
        .unwrap();
        out
    }

    /// Runs `retag` and `set_macs` on a frame with 8 bytes of headroom; returns the frame.
    fn run(input: &[u8], vid: u16) -> Vec<u8> {
        let mut buf = vec![0u8; 8];
        buf.extend_from_slice(input);
        let mut f = SliceFrame::with_headroom(&mut buf, 8);
        let p = parse(&f).unwrap();
        retag(&mut f, &p, vid).unwrap();
        set_macs(&f, B, A).unwrap();
        let (start, len) = f.window();
        buf[start..start + len].to_vec()
    }

    fn vid_of(frame: &[u8]) -> Option<u16> {
        let s = SlicedPacket::from_ethernet(frame).unwrap();
        s.vlan().map(|v| match v {
            etherparse::VlanSlice::SingleVlan(t) => t.vlan_identifier().value(),
            etherparse::VlanSlice::DoubleVlan(_) => panic!("double tag"),
        })
    }

    #[test]
    fn tags_are_kept_rewritten_pushed_and_popped() {
        for (from, to) in [
            (None, 0u16),
            (None, 20),
            (Some(10), 0),
            (Some(10), 10),
            (Some(10), 20),
            (Some(10), 4094),
        ] {
            let input = frame(from);
            let out = run(&input, to);
            assert_eq!(vid_of(&out), (to != 0).then_some(to), "{from:?} -> {to}");
            // Everything but the MACs and the tag is the input's.
            let expected = frame((to != 0).then_some(to));
            assert_eq!(&out[..6], &A, "{from:?} -> {to}: destination MAC");
            assert_eq!(&out[6..12], &B, "{from:?} -> {to}: source MAC");
            assert_eq!(&out[12..], &expected[12..], "{from:?} -> {to}");
        }
    }

    #[test]
    fn a_rewritten_tag_keeps_its_priority() {
        let mut input = frame(Some(10));
        input[14] |= 0xa0; // PCP 5
        let out = run(&input, 30);
        assert_eq!(u16::from_be_bytes([out[14], out[15]]), 0xa000 | 30);
    }

    #[test]
    fn no_headroom_changes_nothing() {
        let input = frame(None);
        let mut buf = input.clone();
        let mut f = SliceFrame::new(&mut buf);
        let p = parse(&f).unwrap();
        assert_eq!(retag(&mut f, &p, 20), Err(Error::Truncated));
        assert_eq!(buf, input);
    }
}
