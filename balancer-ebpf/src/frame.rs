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
    /// True for an empty frame.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A frame over a byte slice (host tests).
pub struct SliceFrame<'a> {
    ptr: *mut u8,
    len: usize,
    _buf: PhantomData<&'a mut [u8]>,
}

impl<'a> SliceFrame<'a> {
    /// The whole slice is the frame. Headers need 2-byte alignment: `buf` must start on an
    /// even address (any `Vec<u8>` does).
    pub fn new(buf: &'a mut [u8]) -> Self {
        SliceFrame {
            ptr: buf.as_mut_ptr(),
            len: buf.len(),
            _buf: PhantomData,
        }
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
}
