//! Internet checksums (RFC 1071) and their incremental update (RFC 1624, eqn. 3).
//!
//! Words are taken in memory order (`u16::from_ne_bytes` of the wire bytes): the one's
//! complement sum commutes with byte swapping, so nothing here converts byte order and a result
//! is stored back exactly as it was read.

/// Folds a 32-bit one's complement accumulator to 16 bits.
#[inline(always)]
pub fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// Adds the change of one 16-bit word from `old` to `new` to a difference accumulator.
#[inline(always)]
pub fn diff16(acc: u32, old: u16, new: u16) -> u32 {
    acc + (!old as u32) + new as u32
}

/// Adds the change of a run of words to a difference accumulator.
#[inline(always)]
pub fn diff_words<const N: usize>(mut acc: u32, old: &[u16; N], new: &[u16; N]) -> u32 {
    let mut i = 0;
    while i < N {
        acc = diff16(acc, old[i], new[i]);
        i += 1;
    }
    acc
}

/// Applies a difference accumulator to a stored checksum: `HC' = ~(~HC + ~m + m')`.
#[inline(always)]
pub fn apply(csum: u16, diff: u32) -> u16 {
    !fold((!csum) as u32 + fold(diff) as u32)
}

/// Like [`apply`] for a UDP checksum: zero means "no checksum" (IPv4 only) and stays zero; a
/// computed zero is sent as `0xffff`.
#[inline(always)]
pub fn apply_udp(csum: u16, diff: u32) -> u16 {
    if csum == 0 {
        return 0;
    }
    let c = apply(csum, diff);
    if c == 0 { 0xffff } else { c }
}

/// One's complement sum of words, unfolded.
#[inline(always)]
pub fn sum_words<const N: usize>(mut acc: u32, words: &[u16; N]) -> u32 {
    let mut i = 0;
    while i < N {
        acc += words[i] as u32;
        i += 1;
    }
    acc
}

/// Memory-order word of a protocol number or length, as it sits in a pseudo-header.
#[inline(always)]
pub fn be_word(v: u16) -> u16 {
    u16::from_ne_bytes(v.to_be_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Independent reference: RFC 1071 over bytes, big-endian pairs, u64 accumulator.
    fn reference(bytes: &[u8]) -> u16 {
        let mut sum: u64 = 0;
        for c in bytes.chunks(2) {
            let hi = c[0] as u64;
            let lo = *c.get(1).unwrap_or(&0) as u64;
            sum += (hi << 8) | lo;
        }
        while sum >> 16 != 0 {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    }

    fn words(bytes: &[u8]) -> Vec<u16> {
        bytes
            .chunks(2)
            .map(|c| u16::from_ne_bytes([c[0], c[1]]))
            .collect()
    }

    fn full(bytes: &[u8]) -> u16 {
        let mut acc = 0u32;
        for w in words(bytes) {
            acc += w as u32;
        }
        !fold(acc)
    }

    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            self.0 >> 33
        }
    }

    #[test]
    fn full_sum_matches_reference() {
        let mut r = Lcg(7);
        for len in (2..200).step_by(2) {
            let b: Vec<u8> = (0..len).map(|_| r.next() as u8).collect();
            assert_eq!(full(&b).to_ne_bytes(), reference(&b).to_be_bytes());
        }
    }

    #[test]
    fn incremental_update_matches_recompute() {
        let mut r = Lcg(42);
        for _ in 0..2000 {
            let n = 10 + (r.next() as usize % 30);
            let mut b: Vec<u8> = (0..n * 2).map(|_| r.next() as u8).collect();
            // Word 0 holds the checksum; make the buffer valid first.
            b[0] = 0;
            b[1] = 0;
            let c = full(&b);
            b[0..2].copy_from_slice(&c.to_ne_bytes());
            // Change 1..8 random words and update incrementally.
            let mut acc = 0;
            for _ in 0..1 + r.next() % 8 {
                let i = 1 + r.next() as usize % (n - 1);
                let old = u16::from_ne_bytes([b[2 * i], b[2 * i + 1]]);
                let new = r.next() as u16;
                acc = diff16(acc, old, new);
                b[2 * i..2 * i + 2].copy_from_slice(&new.to_ne_bytes());
            }
            let stored = u16::from_ne_bytes([b[0], b[1]]);
            let updated = apply(stored, acc);
            b[0..2].copy_from_slice(&updated.to_ne_bytes());
            // A valid buffer sums (with its checksum) to 0xffff, i.e. reference() == 0.
            assert_eq!(reference(&b), 0, "buffer {b:?}");
        }
    }

    #[test]
    fn udp_zero_checksum_kept_and_zero_result_sent_as_ffff() {
        assert_eq!(apply_udp(0, diff16(0, 1, 2)), 0);
        // Stored 0x0001, one word 0 -> 1: the updated sum is 0x0000, which UDP sends as 0xffff.
        let d = diff16(0, 0, 1);
        assert_eq!(apply(0x0001, d), 0, "the case must reach the zero branch");
        assert_eq!(apply_udp(0x0001, d), 0xffff);
    }

    #[test]
    fn diff_words_equals_word_by_word() {
        let a = [1u16, 2, 3, 4];
        let b = [5u16, 6, 7, 8];
        let mut acc = 0;
        for i in 0..4 {
            acc = diff16(acc, a[i], b[i]);
        }
        assert_eq!(diff_words(0, &a, &b), acc);
        assert_eq!(sum_words(0, &a), 10);
        assert_eq!(be_word(6), u16::from_ne_bytes([0, 6]));
    }
}
