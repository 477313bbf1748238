//! The audit trail: every operator action (console, control socket with the peer's uid,
//! `balancer user`) and every reload is one `tracing` event with target `audit` (who, from
//! where, what, result) and an entry in the process's event log, which the console's events
//! page shows. Metadata only: never a payload, a password or a config's text.

use std::sync::{Arc, OnceLock};

use balancer_console::{EventKind, EventLog};

use crate::api::protocol::Request;

static EVENTS: OnceLock<Arc<EventLog>> = OnceLock::new();

/// The process's event log.
pub fn events() -> Arc<EventLog> {
    EVENTS.get_or_init(|| Arc::new(EventLog::default())).clone()
}

/// One audit record: a structured `audit` event and an entry on the events page.
pub fn record(kind: EventKind, who: &str, from: &str, what: &str, result: &str) {
    balancer_console::audit(Some(&events()), kind, who, from, what, result);
}

/// A change the controller made by itself (a health change, a failover): an entry on the
/// events page at the moment it happens (the daemon's own log line is its record there).
pub fn change(kind: EventKind, what: &str) {
    events().push(kind, "", "", what, "");
}

/// A reload's outcome for the trail: ok, or how many problems (their text is in the reply
/// and the daemon's own log, not in the trail).
pub fn reload_result<T>(r: &Result<T, String>) -> String {
    match r {
        Ok(_) => "ok".to_string(),
        Err(e) => format!("refused ({} problem(s))", problems(e)),
    }
}

/// Problems in a refused reload's message: its `file:line:column:` lines, at least one.
fn problems(e: &str) -> usize {
    e.lines()
        .filter(|l| {
            l.split(':')
                .nth(1)
                .is_some_and(|n| n.parse::<u32>().is_ok())
        })
        .count()
        .max(1)
}

/// Records a reload asked by `who` from `from`.
pub fn reload(who: &str, from: &str, r: &Result<String, String>) {
    record(EventKind::Reload, who, from, "reload", &reload_result(r));
}

/// The trail's kind and words for a request; `None` for a status read.
pub fn describe(r: &Request) -> Option<(EventKind, String)> {
    match r {
        Request::Status => None,
        Request::Reload => Some((EventKind::Reload, "reload".to_string())),
        Request::HaRole { role } => Some((EventKind::Action, format!("ha role {}", role.name()))),
        Request::Bgp { verb } => Some((EventKind::Action, format!("bgp {}", verb.name()))),
        Request::Backend {
            verb,
            service,
            backend,
        } => Some((
            EventKind::Action,
            format!("{} {service} {backend}", verb.name()),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::operator::Verb;

    #[test]
    fn words_and_results() {
        let r = Request::Backend {
            verb: Verb::Drain,
            service: "web".into(),
            backend: "10.77.0.11:7002".into(),
        };
        assert_eq!(
            describe(&r),
            Some((EventKind::Action, "drain web 10.77.0.11:7002".into()))
        );
        assert_eq!(describe(&Request::Status), None);
        assert_eq!(reload_result(&Ok::<_, String>("reloaded")), "ok");
        let refused = "config refused, nothing changed:\nb.toml:3:1: x\nb.toml:9:5: y";
        assert_eq!(
            reload_result(&Err::<(), _>(refused.into())),
            "refused (2 problem(s))"
        );
        assert_eq!(
            reload_result(&Err::<(), _>("pin_path change only with a restart".into())),
            "refused (1 problem(s))"
        );
    }

    #[test]
    fn the_log_keeps_what_was_recorded() {
        record(
            EventKind::Action,
            "uid 0",
            "control socket",
            "enable web 10.0.0.1:80",
            "ok",
        );
        let got = events().recent(10, |e| e.what == "enable web 10.0.0.1:80");
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].who, "uid 0");
    }
}
