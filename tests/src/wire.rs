//! The echo protocol spoken between `blb-echo` and `blb-client`.
//!
//! TCP: on accept the server writes an [`ID_LEN`]-byte header (its name, space-padded), then
//! echoes every byte it reads. UDP: every reply is the header followed by the datagram.
//! The header tells the client which backend served it, so a test can count the spread.

use std::time::{SystemTime, UNIX_EPOCH};

/// Length of the backend id header that starts every TCP stream and UDP reply.
pub const ID_LEN: usize = 8;

/// The header for a backend `name`: the name cut or space-padded to [`ID_LEN`] bytes.
pub fn id_header(name: &str) -> [u8; ID_LEN] {
    let mut h = [b' '; ID_LEN];
    for (dst, src) in h.iter_mut().zip(name.bytes()) {
        *dst = src;
    }
    h
}

/// The backend name carried by a header (trailing padding removed).
pub fn parse_id(header: &[u8]) -> String {
    String::from_utf8_lossy(header).trim_end().to_string()
}

/// A small, fast, non-cryptographic generator (xorshift64*): test payloads only need to differ.
#[derive(Debug, Clone)]
pub struct Payload {
    state: u64,
}

impl Payload {
    /// A generator seeded from the clock and `salt` (e.g. a connection index).
    pub fn new(salt: u64) -> Self {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        Self::seeded(now ^ salt.wrapping_mul(0x9E37_79B9_7F4A_7C15))
    }

    /// A generator with a fixed seed (reproducible payloads).
    pub fn seeded(seed: u64) -> Self {
        Self { state: seed | 1 }
    }

    /// Fills `buf` with pseudo-random bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.state ^= self.state >> 12;
            self.state ^= self.state << 25;
            self.state ^= self.state >> 27;
            let v = self.state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }

    /// A new vector of `len` pseudo-random bytes.
    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        self.fill(&mut v);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_pads_and_cuts() {
        assert_eq!(&id_header("be1"), b"be1     ");
        assert_eq!(&id_header("backend-number-1"), b"backend-");
        assert_eq!(parse_id(&id_header("be2")), "be2");
    }

    #[test]
    fn payload_differs_and_is_reproducible() {
        let a = Payload::seeded(7).bytes(33);
        let b = Payload::seeded(7).bytes(33);
        let c = Payload::seeded(8).bytes(33);
        assert_eq!(a, b);
        assert_ne!(a, c);
    }
}
