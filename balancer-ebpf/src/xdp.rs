//! The XDP buffer as a [`Frame`].

use core::mem::size_of;

use aya_ebpf::{EbpfContext, helpers::generated::bpf_xdp_adjust_tail, programs::XdpContext};
use balancer_ebpf::{
    error::Error,
    frame::{Frame, MAX_HDR_OFFSET},
};

/// One packet's XDP context.
pub struct Xdp<'a>(pub &'a XdpContext);

impl Xdp<'_> {
    /// The interface the packet came in on.
    #[inline(always)]
    pub fn ingress(&self) -> u32 {
        self.0.ingress_ifindex() as u32
    }
}

impl Frame for Xdp<'_> {
    #[inline(always)]
    fn ptr_at<T>(&self, offset: usize) -> Result<*mut T, Error> {
        let start = self.0.data();
        let end = self.0.data_end();
        if offset > MAX_HDR_OFFSET || start + offset + size_of::<T>() > end {
            return Err(Error::Truncated);
        }
        Ok((start + offset) as *mut T)
    }

    #[inline(always)]
    fn len(&self) -> usize {
        self.0.data_end() - self.0.data()
    }

    #[inline(always)]
    fn shrink(&mut self, by: usize) -> Result<(), Error> {
        // SAFETY: helper call; callers re-derive every packet pointer afterwards.
        if unsafe { bpf_xdp_adjust_tail(self.0.ctx, -(by as i32)) } != 0 {
            return Err(Error::Truncated);
        }
        Ok(())
    }
}
