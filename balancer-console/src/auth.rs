//! Sessions, CSRF tokens, sign-in rate limit and lockout.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use ring::rand::{SecureRandom as _, SystemRandom};

use crate::users::Role;

/// Name of the session cookie; `__Host-` makes the browser insist on Secure, Path=/ and no Domain.
pub const COOKIE: &str = "__Host-balancer-session";

/// 32 random bytes in hex; `None` if the system has no randomness (nothing is then signed in).
pub fn random_token() -> Option<String> {
    let mut b = [0u8; 32];
    SystemRandom::new().fill(&mut b).ok()?;
    Some(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// Compares secrets without an early exit on the first differing byte.
pub fn same_secret(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// A signed-in user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// User name.
    pub user: String,
    /// Role at sign-in.
    pub role: Role,
    /// The token every action form carries.
    pub csrf: String,
    /// When it ends.
    pub expires: Instant,
}

/// The open sessions, by cookie value.
#[derive(Debug, Default)]
pub struct Sessions {
    by_token: HashMap<String, Session>,
}

/// Most sessions kept; the oldest go first beyond it, so a flood of sign-ins cannot grow memory.
const MAX_SESSIONS: usize = 1024;

impl Sessions {
    /// Opens a session; returns its cookie value.
    pub fn open(&mut self, user: &str, role: Role, ttl: Duration, now: Instant) -> Option<String> {
        self.by_token.retain(|_, s| s.expires > now);
        if self.by_token.len() >= MAX_SESSIONS
            && let Some(oldest) = self
                .by_token
                .iter()
                .min_by_key(|(_, s)| s.expires)
                .map(|(t, _)| t.clone())
        {
            self.by_token.remove(&oldest);
        }
        let token = random_token()?;
        let csrf = random_token()?;
        self.by_token.insert(
            token.clone(),
            Session {
                user: user.to_string(),
                role,
                csrf,
                expires: now + ttl,
            },
        );
        Some(token)
    }

    /// The live session of a cookie value.
    pub fn get(&mut self, token: &str, now: Instant) -> Option<Session> {
        match self.by_token.get(token) {
            Some(s) if s.expires > now => Some(s.clone()),
            Some(_) => {
                self.by_token.remove(token);
                None
            }
            None => None,
        }
    }

    /// Ends a session.
    pub fn close(&mut self, token: &str) {
        self.by_token.remove(token);
    }

    /// Ends every session of a user (removed, or role changed in the users file).
    pub fn close_user(&mut self, user: &str) {
        self.by_token.retain(|_, s| s.user != user);
    }

    /// Users with a live session and their role then.
    pub fn users(&self) -> Vec<(String, Role)> {
        self.by_token
            .values()
            .map(|s| (s.user.clone(), s.role))
            .collect()
    }
}

/// Why a sign-in attempt is not even checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Too many attempts from this address this minute.
    RateLimited,
    /// Too many failures in a row for this user or address.
    LockedOut,
}

#[derive(Debug, Clone, Copy)]
struct Failures {
    count: u32,
    locked_until: Option<Instant>,
}

/// Counts sign-in attempts per source address and failures per user name and address.
#[derive(Debug)]
pub struct Throttle {
    max_failures: u32,
    lockout: Duration,
    rate: u32,
    attempts: HashMap<IpAddr, (Instant, u32)>,
    failures: HashMap<String, Failures>,
}

/// Most keys tracked; beyond it stale ones are dropped first, then the map is cleared.
const MAX_TRACKED: usize = 65536;

impl Throttle {
    /// `max_failures` in a row lock for `lockout`; `rate` attempts per address per minute.
    pub fn new(max_failures: u32, lockout: Duration, rate: u32) -> Throttle {
        Throttle {
            max_failures,
            lockout,
            rate,
            attempts: HashMap::new(),
            failures: HashMap::new(),
        }
    }

    fn keys(user: &str, ip: IpAddr) -> [String; 2] {
        [format!("user:{user}"), format!("addr:{ip}")]
    }

    /// Call before checking a password: counts the attempt, refuses it when limited or locked.
    pub fn before(&mut self, user: &str, ip: IpAddr, now: Instant) -> Result<(), Refusal> {
        if self.attempts.len() >= MAX_TRACKED {
            self.attempts
                .retain(|_, (start, _)| now.duration_since(*start) < Duration::from_secs(60));
            if self.attempts.len() >= MAX_TRACKED {
                self.attempts.clear();
            }
        }
        let a = self.attempts.entry(ip).or_insert((now, 0));
        if now.duration_since(a.0) >= Duration::from_secs(60) {
            *a = (now, 0);
        }
        a.1 += 1;
        if a.1 > self.rate {
            return Err(Refusal::RateLimited);
        }
        for k in Self::keys(user, ip) {
            if let Some(f) = self.failures.get_mut(&k)
                && let Some(until) = f.locked_until
            {
                if now < until {
                    return Err(Refusal::LockedOut);
                }
                // The lockout is over: a fresh count, but one more failure locks again.
                f.locked_until = None;
                f.count = self.max_failures.saturating_sub(1);
            }
        }
        Ok(())
    }

    /// Records the outcome of a checked password; returns true when this failure locked.
    pub fn after(&mut self, user: &str, ip: IpAddr, ok: bool, now: Instant) -> bool {
        let mut locked = false;
        if self.failures.len() >= MAX_TRACKED {
            self.failures
                .retain(|_, f| f.locked_until.is_some_and(|u| u > now));
            if self.failures.len() >= MAX_TRACKED {
                self.failures.clear();
            }
        }
        for k in Self::keys(user, ip) {
            if ok {
                self.failures.remove(&k);
                continue;
            }
            let f = self.failures.entry(k).or_insert(Failures {
                count: 0,
                locked_until: None,
            });
            f.count += 1;
            if f.count >= self.max_failures && f.locked_until.is_none() {
                f.locked_until = Some(now + self.lockout);
                locked = true;
            }
        }
        locked
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_and_compared_whole() {
        let (a, b) = (random_token().unwrap(), random_token().unwrap());
        assert_eq!(a.len(), 64);
        assert_ne!(a, b);
        assert!(same_secret(&a, &a.clone()));
        assert!(!same_secret(&a, &b));
        assert!(!same_secret(&a, &a[..63]));
    }

    #[test]
    fn sessions_expire_and_close() {
        let now = Instant::now();
        let mut s = Sessions::default();
        let t = s
            .open("alice", Role::Operator, Duration::from_secs(60), now)
            .unwrap();
        let got = s.get(&t, now + Duration::from_secs(59)).unwrap();
        assert_eq!((got.user.as_str(), got.role), ("alice", Role::Operator));
        assert!(
            s.get(&t, now + Duration::from_secs(60)).is_none(),
            "expired"
        );
        assert!(s.get(&t, now).is_none(), "expired sessions are gone");
        let t = s
            .open("alice", Role::Operator, Duration::from_secs(60), now)
            .unwrap();
        s.close(&t);
        assert!(s.get(&t, now).is_none());
        let t = s
            .open("bob", Role::Viewer, Duration::from_secs(60), now)
            .unwrap();
        s.close_user("bob");
        assert!(s.get(&t, now).is_none());
    }

    #[test]
    fn sessions_are_bounded() {
        let now = Instant::now();
        let mut s = Sessions::default();
        let first = s
            .open("a", Role::Viewer, Duration::from_secs(60), now)
            .unwrap();
        for i in 0..MAX_SESSIONS {
            s.open("a", Role::Viewer, Duration::from_secs(61 + i as u64), now)
                .unwrap();
        }
        assert_eq!(s.users().len(), MAX_SESSIONS);
        assert!(s.get(&first, now).is_none(), "the oldest went first");
    }

    #[test]
    fn lockout_after_n_failures_then_expires() {
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let now = Instant::now();
        let mut t = Throttle::new(3, Duration::from_secs(600), 100);
        for i in 0..3 {
            t.before("alice", ip, now).unwrap();
            assert_eq!(
                t.after("alice", ip, false, now),
                i == 2,
                "locks on the third"
            );
        }
        assert_eq!(t.before("alice", ip, now), Err(Refusal::LockedOut));
        let other: IpAddr = "192.0.2.2".parse().unwrap();
        assert_eq!(
            t.before("alice", other, now),
            Err(Refusal::LockedOut),
            "per user"
        );
        assert_eq!(
            t.before("bob", ip, now),
            Err(Refusal::LockedOut),
            "per address"
        );
        t.before("bob", other, now).unwrap();
        let later = now + Duration::from_secs(600);
        t.before("alice", ip, later).unwrap();
        assert!(
            t.after("alice", ip, false, later),
            "one failure after a lockout locks again"
        );
        let much_later = later + Duration::from_secs(600);
        t.before("alice", ip, much_later).unwrap();
        t.after("alice", ip, true, much_later);
        t.before("alice", ip, much_later).unwrap();
        assert!(
            !t.after("alice", ip, false, much_later),
            "a success resets the count"
        );
    }

    #[test]
    fn rate_limit_per_address_per_minute() {
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let now = Instant::now();
        let mut t = Throttle::new(100, Duration::from_secs(1), 5);
        for _ in 0..5 {
            t.before("x", ip, now).unwrap();
        }
        assert_eq!(t.before("y", ip, now), Err(Refusal::RateLimited));
        t.before("y", "192.0.2.9".parse().unwrap(), now).unwrap();
        t.before("y", ip, now + Duration::from_secs(60)).unwrap();
    }
}
