//! The XDP buffer as a [`Frame`].

use core::mem::size_of;

use aya_ebpf::{
    helpers::generated::{bpf_csum_diff, bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::XdpContext,
};
use balancer_ebpf::{
    error::Error,
    frame::{Frame, MAX_HDR_OFFSET},
    ptb::{SUM_CHUNK, SUM_CHUNKS_MAX},
};

/// One packet's XDP context.
pub struct Xdp<'a> {
    /// The context.
    pub ctx: &'a XdpContext,
    /// The ingress interface, read once: the verifier refuses a load through a context
    /// pointer the compiler kept with an offset.
    ingress: u32,
}

impl<'a> Xdp<'a> {
    /// Wraps the context.
    #[inline(always)]
    pub fn new(ctx: &'a XdpContext) -> Self {
        Xdp {
            ctx,
            ingress: ctx.ingress_ifindex() as u32,
        }
    }

    /// The interface the packet came in on.
    #[inline(always)]
    pub fn ingress(&self) -> u32 {
        self.ingress
    }
}

impl Frame for Xdp<'_> {
    #[inline(always)]
    fn ptr_at<T>(&self, offset: usize) -> Result<*mut T, Error> {
        let start = self.ctx.data();
        let end = self.ctx.data_end();
        if offset > MAX_HDR_OFFSET || start + offset + size_of::<T>() > end {
            return Err(Error::Truncated);
        }
        Ok((start + offset) as *mut T)
    }

    #[inline(always)]
    fn len(&self) -> usize {
        self.ctx.data_end() - self.ctx.data()
    }

    #[inline(always)]
    fn shrink(&mut self, by: usize) -> Result<(), Error> {
        // SAFETY: helper call; callers re-derive every packet pointer afterwards.
        if unsafe { bpf_xdp_adjust_tail(self.ctx.ctx, -(by as i32)) } != 0 {
            return Err(Error::Truncated);
        }
        Ok(())
    }

    #[inline(always)]
    fn grow_head(&mut self, by: usize) -> Result<(), Error> {
        // SAFETY: helper call; callers re-derive every packet pointer afterwards.
        if unsafe { bpf_xdp_adjust_head(self.ctx.ctx, -(by as i32)) } != 0 {
            return Err(Error::Truncated);
        }
        Ok(())
    }

    #[inline(always)]
    fn shrink_head(&mut self, by: usize) -> Result<(), Error> {
        // SAFETY: helper call; callers re-derive every packet pointer afterwards.
        if unsafe { bpf_xdp_adjust_head(self.ctx.ctx, by as i32) } != 0 {
            return Err(Error::Truncated);
        }
        Ok(())
    }

    #[inline(always)]
    fn sum(&self, offset: usize, len: usize) -> Result<u32, Error> {
        if offset > MAX_HDR_OFFSET {
            return Err(Error::Truncated);
        }
        let mut acc: u32 = 0;
        let mut i = 0;
        while i < SUM_CHUNKS_MAX {
            let off = i * SUM_CHUNK;
            if off >= len {
                break;
            }
            let start = self.ctx.data() + offset + off;
            if start + SUM_CHUNK > self.ctx.data_end() {
                return Err(Error::Truncated);
            }
            // SAFETY: helper call over SUM_CHUNK bounds-checked packet bytes.
            let s = unsafe {
                bpf_csum_diff(
                    core::ptr::null_mut(),
                    0,
                    start as *mut u32,
                    SUM_CHUNK as u32,
                    acc,
                )
            };
            if s < 0 {
                return Err(Error::Truncated);
            }
            acc = s as u32;
            i += 1;
        }
        Ok(acc)
    }
}
