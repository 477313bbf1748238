//! Replay protection and loss accounting for one peer.
//!
//! The epoch is the sender's start time ([`crate::Epoch::now`], unix nanoseconds), so a
//! restarted sender has a higher one. Within an epoch, sequence numbers rise by one per
//! message. The guard keeps the highest epoch seen and, within it, a sliding window of the
//! last [`WINDOW`] sequence numbers:
//!
//! - an epoch below the highest seen: replay;
//! - a higher epoch: the peer restarted; the window starts afresh at that message
//!   (`new_epoch`, also for the very first message the guard sees);
//! - a sequence number already seen, or older than the window: replay;
//! - anything else is accepted, late ones (reordered, but inside the window) included.
//!
//! **Loss** is counted when a sequence number leaves the window unseen: it can no longer be
//! accepted, so it is lost for good. A late arrival inside the window is therefore never
//! miscounted, and each missing number is counted exactly once. Numbers a jump passes over
//! entirely (more than a window ahead) are counted at that jump; the holes left in the
//! window when the peer restarts are counted with the new epoch's first message. Numbers
//! below the first one seen in an epoch are not counted: the receiver cannot tell whether
//! it missed them or started after they were sent.
//!
//! The guard must only see authenticated messages (after [`crate::open`]); otherwise a
//! forger could push the window forward.

use crate::error::SyncError;

/// Sequence numbers in the sliding window.
pub const WINDOW: u64 = 1024;

const WORDS: usize = (WINDOW / 64) as usize;

/// What [`ReplayGuard::check`] learned from an accepted message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Accept {
    /// The message opened an epoch: the first message from the peer, or the peer restarted.
    pub new_epoch: bool,
    /// Sequence numbers that became lost with this message (see the module text).
    pub lost: u64,
}

#[derive(Clone, Debug)]
struct Window {
    epoch: u64,
    /// Highest sequence number accepted in this epoch.
    high: u64,
    /// The first sequence number seen in this epoch: nothing below it counts as lost.
    first: u64,
    /// Bit `seq % WINDOW` is set when `seq` (in `high - WINDOW + 1 ..= high`) was seen.
    seen: [u64; WORDS],
}

impl Window {
    fn start(epoch: u64, seq: u64) -> Window {
        let mut w = Window {
            epoch,
            high: seq,
            first: seq,
            seen: [0; WORDS],
        };
        w.set(seq);
        w
    }

    fn slot(seq: u64) -> (usize, u64) {
        let i = (seq % WINDOW) as usize;
        (i / 64, 1u64 << (i % 64))
    }

    fn get(&self, seq: u64) -> bool {
        let (w, b) = Window::slot(seq);
        self.seen[w] & b != 0
    }

    fn set(&mut self, seq: u64) {
        let (w, b) = Window::slot(seq);
        self.seen[w] |= b;
    }

    fn clear(&mut self, seq: u64) {
        let (w, b) = Window::slot(seq);
        self.seen[w] &= !b;
    }

    /// Unseen numbers of the current window that count (not below `first`).
    fn holes(&self) -> u64 {
        let low = self.high.saturating_sub(WINDOW - 1).max(self.first);
        (low..=self.high).filter(|&s| !self.get(s)).count() as u64
    }

    /// Moves the window's top to `seq > high`; returns the numbers lost on the way.
    fn advance(&mut self, seq: u64) -> u64 {
        let shift = seq - self.high;
        let lost = if shift >= WINDOW {
            // The whole old window leaves, and the numbers between it and the new window
            // (`high + 1 ..= seq - WINDOW`) never entered one.
            let lost = self.holes() + (seq - WINDOW - self.high);
            self.seen = [0; WORDS];
            lost
        } else {
            let mut lost = 0;
            for s in self.high + 1..=seq {
                // `s` enters the window in the slot of `s - WINDOW`, which leaves it.
                if let Some(old) = s.checked_sub(WINDOW)
                    && old >= self.first
                    && !self.get(old)
                {
                    lost += 1;
                }
                self.clear(s);
            }
            lost
        };
        self.high = seq;
        self.set(seq);
        lost
    }
}

/// Rejects replayed and stale messages of one peer and counts lost ones.
#[derive(Clone, Debug, Default)]
pub struct ReplayGuard {
    window: Option<Window>,
}

impl ReplayGuard {
    /// A guard that has seen nothing: the first message is accepted with `new_epoch`.
    pub fn new() -> ReplayGuard {
        ReplayGuard::default()
    }

    /// Checks an authenticated message's epoch and sequence number and records it.
    ///
    /// Returns [`SyncError::Replay`] for an older epoch, a duplicate, or a sequence number
    /// more than [`WINDOW`] - 1 below the highest seen; the guard is unchanged then.
    pub fn check(&mut self, epoch: u64, seq: u64) -> Result<Accept, SyncError> {
        let Some(w) = self.window.as_mut() else {
            self.window = Some(Window::start(epoch, seq));
            return Ok(Accept {
                new_epoch: true,
                lost: 0,
            });
        };
        if epoch < w.epoch {
            return Err(SyncError::Replay);
        }
        if epoch > w.epoch {
            let lost = w.holes();
            *w = Window::start(epoch, seq);
            return Ok(Accept {
                new_epoch: true,
                lost,
            });
        }
        if seq > w.high {
            let lost = w.advance(seq);
            return Ok(Accept {
                new_epoch: false,
                lost,
            });
        }
        if w.high - seq >= WINDOW || w.get(seq) {
            return Err(SyncError::Replay);
        }
        w.set(seq);
        Ok(Accept {
            new_epoch: false,
            lost: 0,
        })
    }

    /// The epoch of the peer the guard follows, once it has seen a message.
    pub fn epoch(&self) -> Option<u64> {
        self.window.as_ref().map(|w| w.epoch)
    }

    /// The highest sequence number accepted in the current epoch.
    pub fn highest_seq(&self) -> Option<u64> {
        self.window.as_ref().map(|w| w.high)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ok(g: &mut ReplayGuard, e: u64, s: u64) -> Accept {
        g.check(e, s).unwrap_or_else(|err| panic!("{e}/{s}: {err}"))
    }

    fn replay(g: &mut ReplayGuard, e: u64, s: u64) {
        assert!(matches!(g.check(e, s), Err(SyncError::Replay)), "{e}/{s}");
    }

    #[test]
    fn in_order_stream_loses_nothing() {
        let mut g = ReplayGuard::new();
        assert_eq!(
            ok(&mut g, 10, 1),
            Accept {
                new_epoch: true,
                lost: 0
            }
        );
        for s in 2..5000 {
            assert_eq!(ok(&mut g, 10, s), Accept::default());
        }
        assert_eq!(g.highest_seq(), Some(4999));
    }

    #[test]
    fn duplicates_are_replays() {
        let mut g = ReplayGuard::new();
        ok(&mut g, 10, 1);
        ok(&mut g, 10, 2);
        replay(&mut g, 10, 2);
        replay(&mut g, 10, 1);
        ok(&mut g, 10, 5);
        ok(&mut g, 10, 3);
        replay(&mut g, 10, 3);
        replay(&mut g, 10, 5);
    }

    #[test]
    fn older_than_window_is_replay() {
        let mut g = ReplayGuard::new();
        ok(&mut g, 10, 1);
        ok(&mut g, 10, 2000);
        replay(&mut g, 10, 2000 - WINDOW);
        ok(&mut g, 10, 2000 - WINDOW + 1);
    }

    #[test]
    fn older_epoch_is_replay_and_new_epoch_resets() {
        let mut g = ReplayGuard::new();
        ok(&mut g, 100, 1);
        ok(&mut g, 100, 2);
        replay(&mut g, 99, 3);
        replay(&mut g, 0, 1_000_000);
        let a = ok(&mut g, 200, 1);
        assert!(a.new_epoch);
        assert_eq!(g.epoch(), Some(200));
        // The old epoch is now stale as a whole.
        replay(&mut g, 100, 3);
        // The new one starts its own window.
        replay(&mut g, 200, 1);
        assert_eq!(ok(&mut g, 200, 2), Accept::default());
    }

    #[test]
    fn lost_counted_when_leaving_window_not_when_late() {
        let mut g = ReplayGuard::new();
        ok(&mut g, 1, 1);
        // 2..=4 missing for now.
        assert_eq!(ok(&mut g, 1, 5).lost, 0);
        // 3 arrives late: accepted, nothing lost.
        assert_eq!(ok(&mut g, 1, 3).lost, 0);
        // Walk up until 2 and 4 leave the window: each counted once, when it leaves.
        let mut lost = 0;
        for s in 6..=(4 + WINDOW) {
            let a = ok(&mut g, 1, s);
            lost += a.lost;
            if s == 2 + WINDOW {
                assert_eq!(a.lost, 1, "2 leaves with {s}");
            }
        }
        assert_eq!(lost, 2);
        for s in (5 + WINDOW)..(5 + 3 * WINDOW) {
            assert_eq!(ok(&mut g, 1, s).lost, 0);
        }
    }

    #[test]
    fn big_jump_counts_everything_once() {
        let mut g = ReplayGuard::new();
        ok(&mut g, 1, 1);
        ok(&mut g, 1, 3); // 2 missing
        // Jump far ahead: 2 and 4..=10_000-WINDOW are lost now; the rest may still come.
        let a = ok(&mut g, 1, 10_000);
        assert_eq!(a.lost, 1 + (10_000 - WINDOW - 3));
        // Fill in the new window except one, then move on past it.
        for s in (10_000 - WINDOW + 1)..10_000 {
            if s != 9_500 {
                ok(&mut g, 1, s);
            }
        }
        let mut lost = 0;
        for s in 10_001..=(10_000 + WINDOW) {
            lost += ok(&mut g, 1, s).lost;
        }
        assert_eq!(lost, 1);
        // Total missing numbers in 1..=10_000+WINDOW: 2, 4..=8976, 9500.
    }

    #[test]
    fn restart_counts_old_holes() {
        let mut g = ReplayGuard::new();
        ok(&mut g, 1, 1);
        ok(&mut g, 1, 4); // 2 and 3 missing
        let a = ok(&mut g, 2, 1);
        assert_eq!(
            a,
            Accept {
                new_epoch: true,
                lost: 2
            }
        );
    }

    #[test]
    fn numbers_below_the_first_are_not_lost() {
        let mut g = ReplayGuard::new();
        ok(&mut g, 1, 500);
        let mut lost = 0;
        for s in 501..(500 + 3 * WINDOW) {
            lost += ok(&mut g, 1, s).lost;
        }
        assert_eq!(lost, 0);
        // A number below the first seen, still in the window, is accepted once.
        let mut g = ReplayGuard::new();
        ok(&mut g, 1, 500);
        ok(&mut g, 1, 499);
        replay(&mut g, 1, 499);
    }

    proptest! {
        /// Against a model: a set of seen numbers, the window rule, and a final count of
        /// missing numbers.
        #[test]
        fn matches_a_model(seqs in proptest::collection::vec(1u64..6000, 1..400)) {
            let mut g = ReplayGuard::new();
            let mut seen = std::collections::BTreeSet::new();
            let mut high = 0u64;
            let mut first = None;
            let mut lost = 0;
            for &s in &seqs {
                let expect_ok = match first {
                    None => true,
                    Some(_) => !seen.contains(&s) && (s > high || high - s < WINDOW),
                };
                let got = g.check(7, s);
                prop_assert_eq!(got.is_ok(), expect_ok, "seq {}", s);
                if let Ok(a) = got {
                    lost += a.lost;
                    seen.insert(s);
                    high = high.max(s);
                    first.get_or_insert(s);
                }
            }
            // Push everything out of the window with a far jump: every missing number
            // from the first seen up to the bottom of the new window (`far - WINDOW`) is
            // counted exactly once in total; those still inside it are not lost yet.
            let far = high + 10 * WINDOW;
            lost += g.check(7, far).map(|a| a.lost).unwrap_or(0);
            let first = first.unwrap_or(0);
            let missing = (first..=far - WINDOW).filter(|s| !seen.contains(s)).count() as u64;
            prop_assert_eq!(lost, missing);
        }
    }
}
