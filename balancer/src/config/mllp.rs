//! `mode = "mllp"` of a `[[service]]` and its `mllp = { … }` limits: HL7 messages relayed by
//! the controller instead of packets forwarded by the XDP program (see `balancer-mllp`).

use serde::Deserialize;
use toml::Spanned;

use super::{Diags, Forwarding, Protocol, Scheduler, ServiceSection};

pub use balancer_mllp::MllpConfig;

/// How a service's traffic reaches its backends.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Packets, in the XDP program.
    #[default]
    L4,
    /// HL7 messages, relayed by the controller (failover services only): each message is
    /// held until the active listener ACKs it and replayed to the next one if it fails.
    Mllp,
}

super::names!(Mode { L4 => "l4", Mllp => "mllp" });

pub(super) fn default_mode() -> Spanned<Mode> {
    Spanned::new(0..0, Mode::L4)
}

/// `mode = "mllp"` needs a TCP NAT failover service with a health check (a listener the
/// relay failed comes back through it); returns its relay limits (the defaults when no
/// `mllp` table is written), or `None` for an L4 service.
pub(super) fn check(d: &mut Diags, s: &ServiceSection) -> Option<MllpConfig> {
    if *s.mode.get_ref() != Mode::Mllp {
        if let Some(m) = &s.mllp {
            d.at(m.span(), "mllp limits need mode = \"mllp\"");
        }
        return None;
    }
    let span = s.mode.span();
    if s.scheduler != Scheduler::Failover {
        d.at(
            span.clone(),
            "mode = \"mllp\" needs scheduler = \"failover\"",
        );
    }
    if s.protocol != Protocol::Tcp || s.forwarding != Forwarding::Nat {
        d.at(
            span.clone(),
            "mode = \"mllp\" needs protocol = \"tcp\" and forwarding = \"nat\"",
        );
    }
    if s.health.is_none() {
        d.at(
            span,
            "mode = \"mllp\" needs a health check: a listener the relay fails comes back when it passes",
        );
    }
    if let Some(p) = &s.passive_health {
        d.at(
            p.span(),
            "passive_health counts the XDP program's flows: a mode = \"mllp\" service has none (the relay fails listeners itself)",
        );
    }
    let limits = s
        .mllp
        .as_ref()
        .map(|m| m.get_ref().clone())
        .unwrap_or_default();
    if let (Some(m), Err(errs)) = (&s.mllp, limits.validate()) {
        for e in errs {
            d.at(m.span(), format!("mllp: {e}"));
        }
    }
    Some(limits)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::{ConfigError, Validated, parse};

    fn p(t: &str) -> Result<Validated, ConfigError> {
        parse(t, Path::new("b.toml"))
    }

    const MLLP: &str = r#"
[dataplane]
interface = "eth0"

[[service]]
name = "hl7"
vip = "10.77.0.100:6661"
scheduler = "failover"
mode = "mllp"
health = { kind = "mllp", interval = "250ms", timeout = "200ms", rise = 2, fall = 2 }
mllp = { ack_timeout = "2s", max_senders = 64 }
backends = [ { address = "10.77.0.11:6661" }, { address = "10.77.0.12:6661" } ]
"#;

    #[test]
    fn mllp_mode_is_accepted_with_its_limits() {
        let v = p(MLLP).expect("valid");
        assert_eq!(v.services[0].mode, Mode::Mllp);
        let m = v.services[0].mllp.as_ref().unwrap();
        assert_eq!(m.ack_timeout, std::time::Duration::from_secs(2));
        assert_eq!(m.max_senders, 64);
        assert_eq!(m.max_message_bytes, MllpConfig::default().max_message_bytes);
        let l4 = MLLP
            .replace("mode = \"mllp\"\n", "")
            .replace("mllp = { ack_timeout = \"2s\", max_senders = 64 }\n", "");
        let v = p(&l4).unwrap();
        assert_eq!(
            (v.services[0].mode, v.services[0].mllp.is_none()),
            (Mode::L4, true)
        );
        // Without an mllp table the relay runs with the defaults.
        let v =
            p(&MLLP.replace("mllp = { ack_timeout = \"2s\", max_senders = 64 }\n", "")).unwrap();
        assert_eq!(v.services[0].mllp, Some(MllpConfig::default()));
    }

    #[test]
    fn mllp_mode_errors_point_at_the_key() {
        let line_of = |t: &str, key: &str| t.lines().position(|l| l.starts_with(key)).unwrap() + 1;
        // Rows: edit of the good text, key the error points at, message part.
        let rows = [
            (
                "scheduler = \"failover\"",
                "scheduler = \"maglev\"",
                "mode",
                "scheduler = \"failover\"",
            ),
            (
                "mode = \"mllp\"",
                "mode = \"mllp\"\nforwarding = \"dsr\"",
                "mode",
                "forwarding = \"nat\"",
            ),
            ("health = {", "#health = {", "mode", "needs a health check"),
            (
                "mllp = {",
                "passive_health = { failures = 3, window = \"1s\" }\nmllp = {",
                "passive_health",
                "the relay fails listeners itself",
            ),
            (
                "max_senders = 64",
                "max_senders = 0",
                "mllp",
                "mllp: max_senders",
            ),
            ("max_senders = 64", "max_sender = 1", "mllp", "max_sender"),
            (
                "mode = \"mllp\"",
                "mode = \"l4\"",
                "mllp",
                "need mode = \"mllp\"",
            ),
            (
                "mode = \"mllp\"",
                "mode = \"hl7\"",
                "mode",
                "unknown variant",
            ),
        ];
        for (from, to, key, want) in rows {
            let text = MLLP.replace(from, to);
            let e = p(&text).unwrap_err();
            let line = line_of(&text, key);
            assert!(
                e.to_string().starts_with(&format!("b.toml:{line}:")),
                "{to}: {e}"
            );
            assert!(e.to_string().contains(want), "{to}: {e}");
        }
    }
}
