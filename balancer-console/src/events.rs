//! The events page's log (health changes, failovers, reloads, operator actions) and the audit
//! trail: each operator action is one `tracing` event with target `audit`.

use std::collections::VecDeque;
use std::fmt;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

/// Kind of event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// A backend's health check verdict changed.
    Health,
    /// A failover service's active backend changed.
    Failover,
    /// A config reload (accepted or refused).
    Reload,
    /// An operator action (console or CLI).
    Action,
    /// A console sign-in, sign-out or refusal.
    SignIn,
}

impl EventKind {
    /// Name on the events page.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Health => "health",
            EventKind::Failover => "failover",
            EventKind::Reload => "reload",
            EventKind::Action => "action",
            EventKind::SignIn => "sign-in",
        }
    }
}

/// One entry. Metadata only: never a payload, path or header value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Wall-clock time, seconds since the epoch.
    pub at: u64,
    /// Kind.
    pub kind: EventKind,
    /// Who: a console user, `uid N` for the CLI, or empty for the controller itself.
    pub who: String,
    /// From where: `console 192.0.2.7`, `socket`, or empty.
    pub from: String,
    /// What happened or was asked.
    pub what: String,
    /// Outcome.
    pub result: String,
}

/// Bounded log of events, newest last.
#[derive(Debug)]
pub struct EventLog {
    cap: usize,
    events: Mutex<VecDeque<Event>>,
}

/// Events kept in memory.
pub const EVENTS_KEPT: usize = 2000;

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Default for EventLog {
    fn default() -> Self {
        EventLog::new(EVENTS_KEPT)
    }
}

impl EventLog {
    /// A log keeping the last `cap` events.
    pub fn new(cap: usize) -> EventLog {
        EventLog {
            cap: cap.max(1),
            events: Mutex::new(VecDeque::new()),
        }
    }

    /// Adds an event stamped now.
    pub fn push(&self, kind: EventKind, who: &str, from: &str, what: &str, result: &str) {
        let e = Event {
            at: now_secs(),
            kind,
            who: who.to_string(),
            from: from.to_string(),
            what: what.to_string(),
            result: result.to_string(),
        };
        let mut q = self.events.lock().unwrap_or_else(|p| p.into_inner());
        if q.len() >= self.cap {
            q.pop_front();
        }
        q.push_back(e);
    }

    /// Newest first, at most `n`, optionally only those whose `what` starts with `prefix`.
    pub fn recent(&self, n: usize, filter: impl Fn(&Event) -> bool) -> Vec<Event> {
        let q = self.events.lock().unwrap_or_else(|p| p.into_inner());
        q.iter()
            .rev()
            .filter(|e| filter(e))
            .take(n)
            .cloned()
            .collect()
    }
}

/// Records an operator action or reload: one structured `audit` event in the log output and an
/// entry on the events page. `who`/`from`/`what`/`result` are metadata chosen by the caller.
pub fn audit(
    log: Option<&EventLog>,
    kind: EventKind,
    who: &str,
    from: &str,
    what: &str,
    result: &str,
) {
    tracing::info!(target: "audit", who, from, what, result, "{}", kind.as_str());
    if let Some(log) = log {
        log.push(kind, who, from, what, result);
    }
}

/// The events page's words for a backend's health change.
pub fn health_change(
    service: &str,
    backend: std::net::SocketAddr,
    before: crate::source::Health,
    after: crate::source::Health,
) -> String {
    format!("{service} {backend}: {before} → {after}")
}

/// The events page's words for a change of a failover service's active backend.
pub fn failover(
    service: &str,
    from: Option<std::net::SocketAddr>,
    to: Option<std::net::SocketAddr>,
) -> String {
    let show = |a: Option<std::net::SocketAddr>| a.map_or("none".to_string(), |a| a.to_string());
    format!("{service}: active {} → {}", show(from), show(to))
}

/// The audit result of a refused action or reload: how many problems, not their text (the
/// operator sees that in the reply; a config's text stays out of the trail). A problem is a
/// `file:line:column: message` line; a refusal without one counts as one.
pub fn refused(message: &str) -> String {
    let n = message
        .lines()
        .filter(|l| {
            l.split(':')
                .nth(1)
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        })
        .count()
        .max(1);
    format!("refused ({n} problem(s))")
}

/// `YYYY-MM-DD HH:MM:SS` UTC of a Unix time.
pub struct Utc(pub u64);

impl fmt::Display for Utc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = UNIX_EPOCH + std::time::Duration::from_secs(self.0);
        let iso = humantime::format_rfc3339_seconds(t).to_string();
        f.write_str(iso.replacen('T', " ", 1).trim_end_matches('Z'))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn bounded_newest_first() {
        let log = EventLog::new(3);
        for i in 0..5 {
            log.push(
                EventKind::Action,
                "alice",
                "console",
                &format!("a{i}"),
                "ok",
            );
        }
        let got: Vec<_> = log
            .recent(10, |_| true)
            .into_iter()
            .map(|e| e.what)
            .collect();
        assert_eq!(got, ["a4", "a3", "a2"]);
        assert_eq!(log.recent(10, |e| e.what == "a3").len(), 1);
    }

    #[test]
    fn refusals_count_positions() {
        let m = "config refused, nothing changed:\nb.toml:3:1: x\nb.toml:9:5: y";
        assert_eq!(refused(m), "refused (2 problem(s))");
        assert_eq!(refused("no service 'x'"), "refused (1 problem(s))");
    }

    #[test]
    fn utc() {
        assert_eq!(Utc(0).to_string(), "1970-01-01 00:00:00");
        assert_eq!(Utc(1_709_210_096).to_string(), "2024-02-29 12:34:56");
        assert_eq!(Utc(1_798_761_599).to_string(), "2026-12-31 23:59:59");
    }
}
