//! `[console]`: the web console (HTTPS on a management address). The section's keys and
//! defaults are `balancer_console::ConsoleConfig`; this file checks it against the rest of the
//! file. Absent: no console.

use std::net::SocketAddr;

use toml::Spanned;

pub use balancer_console::ConsoleConfig as ConsoleSection;

use super::{Diags, ServiceSpec};

/// Checks the section: its own rules, and that its address is no VIP and not the metrics one.
pub(super) fn validate(
    c: &Spanned<ConsoleSection>,
    services: &[ServiceSpec],
    metrics: Option<SocketAddr>,
    d: &mut Diags,
) -> Option<ConsoleSection> {
    let before = d.out.len();
    let s = c.get_ref();
    if let Err(errs) = s.validate() {
        for e in errs {
            d.at(c.span(), format!("console: {e}"));
        }
    }
    if services.iter().any(|v| v.vip == s.address) {
        d.at(
            c.span(),
            format!("console: address {} is also a service VIP", s.address),
        );
    }
    if metrics == Some(s.address) {
        d.at(
            c.span(),
            format!("console: address {} is also the metrics address", s.address),
        );
    }
    if !s.users.is_absolute() {
        d.at(c.span(), "console: users must be an absolute path");
    }
    (d.out.len() == before).then(|| s.clone())
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    const BASE: &str = "[dataplane]\ninterface = \"eth0\"\n\n[[service]]\nname = \"web\"\nvip = \"10.77.0.100:443\"\nbackends = [ { address = \"10.77.0.11:443\" } ]\n";

    #[test]
    fn absent_is_no_console_and_a_good_one_is_typed() {
        let v = super::super::parse(BASE, Path::new("b.toml")).expect("valid");
        assert!(v.console.is_none());
        let text = format!("{BASE}\n[console]\naddress = \"10.0.0.1:9443\"\n");
        let v = super::super::parse(&text, Path::new("b.toml")).expect("valid");
        let c = v.console.expect("console");
        assert_eq!(c.address, "10.0.0.1:9443".parse().expect("address"));
        assert_eq!(c.max_failures, 5);
    }

    #[test]
    fn errors_carry_file_line_and_column() {
        let text = format!("{BASE}\n[console]\naddress = \"10.77.0.100:443\"\nmax_failures = 0\n");
        let e = super::super::parse(&text, Path::new("b.toml")).expect_err("refused");
        let s = e.to_string();
        assert!(s.contains("max_failures must be at least 1"), "{s}");
        assert!(s.contains("is also a service VIP"), "{s}");
        let line = BASE.lines().count() + 2;
        assert!(s.starts_with(&format!("b.toml:{line}:")), "{s}");
        let text = format!("{BASE}\n[console]\naddress = \"10.0.0.1\"\n");
        let e = super::super::parse(&text, Path::new("b.toml")).expect_err("refused");
        assert!(
            e.to_string().starts_with(&format!("b.toml:{}:", line + 1)),
            "{e}"
        );
        let text = format!("{BASE}\n[console]\naddress = \"10.0.0.1:9443\"\ncolour = 1\n");
        let e = super::super::parse(&text, Path::new("b.toml")).expect_err("refused");
        assert!(e.to_string().contains("colour"), "{e}");
    }
}
