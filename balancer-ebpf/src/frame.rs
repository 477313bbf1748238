//! A frame the packet path reads and writes: the XDP buffer in the kernel, a byte slice on the
//! host (so parse, rewrite and the RST builder run under `cargo test`).

use core::{marker::PhantomData, mem::size_of};

use crate::error::Error;

/// Largest header offset a step reads at. The explicit bound keeps the verifier's range of an
/// offset that went through the stack.
pub const MAX_HDR_OFFSET: usize = 128;

/// Bounds-checked access to a frame's bytes.
pub trait Frame {
    /// A pointer to a `T` at `offset`, or [`Error::Truncated`] when it does not fit.
    fn ptr_at<T>(&self, offset: usize) -> Result<*mut T, Error>;
    /// Bytes in the frame.
    fn len(&self) -> usize;
    /// Cuts `by` bytes off the end. Pointers from [`Frame::ptr_at`] are invalid afterwards.
    fn shrink(&mut self, by: usize) -> Result<(), Error>;
    /// Adds `by` bytes in front of the frame (their content is undefined). Pointers from
    /// [`Frame::ptr_at`] are invalid afterwards.
    fn grow_head(&mut self, by: usize) -> Result<(), Error>;
    /// Removes `by` bytes from the front of the frame. Pointers from [`Frame::ptr_at`] are
    /// invalid afterwards.
    fn shrink_head(&mut self, by: usize) -> Result<(), Error>;
    /// One's complement sum (unfolded, memory-order words) of `len` bytes at `offset`;
    /// `len` is a multiple of [`crate::ptb::SUM_CHUNK`], at most
    /// [`crate::ptb::SUM_CHUNKS_MAX`] chunks.
    fn sum(&self, offset: usize, len: usize) -> Result<u32, Error>;
    /// True for an empty frame.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A frame over a byte slice (host tests).
pub struct SliceFrame<'a> {
    ptr: *mut u8,
    len: usize,
    /// Bytes of the slice in front of the frame, room for [`Frame::grow_head`].
    head: usize,
    _buf: PhantomData<&'a mut [u8]>,
}

impl<'a> SliceFrame<'a> {
    /// The whole slice is the frame. Headers need 2-byte alignment: `buf` must start on an
    /// even address (any `Vec<u8>` does).
    pub fn new(buf: &'a mut [u8]) -> Self {
        SliceFrame {
            ptr: buf.as_mut_ptr(),
            len: buf.len(),
            head: 0,
            _buf: PhantomData,
        }
    }

    /// The frame starts `headroom` bytes into the slice; [`Frame::grow_head`] may use them.
    /// `headroom` must be even, like the kernel's. Panics when it exceeds the slice (tests).
    pub fn with_headroom(buf: &'a mut [u8], headroom: usize) -> Self {
        assert!(
            headroom <= buf.len() && headroom.is_multiple_of(2),
            "headroom"
        );
        SliceFrame {
            // SAFETY: in bounds (asserted).
            ptr: unsafe { buf.as_mut_ptr().add(headroom) },
            len: buf.len() - headroom,
            head: headroom,
            _buf: PhantomData,
        }
    }

    /// Where the frame is in the slice now: (start, length).
    pub fn window(&self) -> (usize, usize) {
        (self.head, self.len)
    }
}

impl Frame for SliceFrame<'_> {
    fn ptr_at<T>(&self, offset: usize) -> Result<*mut T, Error> {
        if offset > MAX_HDR_OFFSET || offset + size_of::<T>() > self.len {
            return Err(Error::Truncated);
        }
        // SAFETY: in bounds of the borrowed slice (checked above).
        let p = unsafe { self.ptr.add(offset) };
        if !(p as usize).is_multiple_of(core::mem::align_of::<T>()) {
            return Err(Error::Truncated);
        }
        Ok(p as *mut T)
    }

    fn len(&self) -> usize {
        self.len
    }

    fn shrink(&mut self, by: usize) -> Result<(), Error> {
        if by > self.len {
            return Err(Error::Truncated);
        }
        self.len -= by;
        Ok(())
    }

    fn grow_head(&mut self, by: usize) -> Result<(), Error> {
        if by > self.head {
            return Err(Error::Truncated);
        }
        // SAFETY: stays inside the borrowed slice (by <= head).
        self.ptr = unsafe { self.ptr.sub(by) };
        self.head -= by;
        self.len += by;
        Ok(())
    }

    fn shrink_head(&mut self, by: usize) -> Result<(), Error> {
        if by > self.len {
            return Err(Error::Truncated);
        }
        // SAFETY: stays inside the borrowed slice (by <= len).
        self.ptr = unsafe { self.ptr.add(by) };
        self.head += by;
        self.len -= by;
        Ok(())
    }

    fn sum(&self, offset: usize, len: usize) -> Result<u32, Error> {
        let chunk = crate::ptb::SUM_CHUNK;
        if !len.is_multiple_of(chunk)
            || len / chunk > crate::ptb::SUM_CHUNKS_MAX
            || offset + len > self.len
        {
            return Err(Error::Truncated);
        }
        // SAFETY: in bounds of the borrowed slice (checked above).
        let bytes = unsafe { core::slice::from_raw_parts(self.ptr.add(offset), len) };
        Ok(bytes
            .chunks(2)
            .map(|w| u16::from_ne_bytes([w[0], w[1]]) as u32)
            .fold(0u32, |a, w| {
                let s = a as u64 + w as u64;
                ((s & 0xffff_ffff) + (s >> 32)) as u32
            }))
    }
}
