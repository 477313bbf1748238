//! Importers: an F5 BIG-IP `bigip.conf`, a Citrix NetScaler `ns.conf` or an IIS ARR
//! `applicationHost.config` becomes a commented `balancer.toml` and a report of what was
//! translated, approximated (and how) or left out (with the source line).
//!
//! The crate does no I/O: the caller passes the text and a file name (for messages) and
//! gets the TOML text and the [`Report`] back, or an [`ImportError`] with `file:line`.
//! Each product has its own parser module (`f5`, `netscaler`, `arr`); all of them
//! fill the same [`model::Plan`], which [`emit`] renders.

mod arr;
pub mod emit;
mod f5;
pub mod model;
mod monitor;
mod netscaler;
pub mod report;

pub use report::{Note, Outcome, Report};

/// The product a configuration comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Product {
    /// F5 BIG-IP, tmsh `bigip.conf`.
    F5,
    /// Citrix ADC / NetScaler, `ns.conf`.
    NetScaler,
    /// IIS Application Request Routing, `applicationHost.config`.
    Arr,
}

impl Product {
    /// The name used on the command line and in the generated file.
    pub fn name(self) -> &'static str {
        match self {
            Product::F5 => "F5 BIG-IP",
            Product::NetScaler => "NetScaler",
            Product::Arr => "IIS ARR",
        }
    }
}

/// A malformed input: where and what. Nothing is produced for such an input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}: {message}")]
pub struct ImportError {
    /// The file name the caller gave.
    pub file: String,
    /// 1-based line of the problem.
    pub line: usize,
    /// What is wrong.
    pub message: String,
}

/// A problem found by a parser, before the file name is attached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Fail {
    pub line: usize,
    pub message: String,
}

pub(crate) fn fail<T>(line: usize, message: impl Into<String>) -> Result<T, Fail> {
    Err(Fail {
        line,
        message: message.into(),
    })
}

/// The result of an import.
#[derive(Debug, Clone)]
pub struct Import {
    /// The `balancer.toml` text, commented.
    pub toml: String,
    /// What happened to each part of the source.
    pub report: Report,
}

/// Translates `text` (the content of `file`) from `product`.
pub fn import(product: Product, text: &str, file: &str) -> Result<Import, ImportError> {
    let mut report = Report::default();
    let plan = match product {
        Product::F5 => f5::translate(text, &mut report),
        Product::NetScaler => netscaler::translate(text, &mut report),
        Product::Arr => arr::translate(text, &mut report),
    }
    .map_err(|f| ImportError {
        file: file.to_string(),
        line: f.line,
        message: f.message,
    })?;
    let toml = emit::render(&plan, product, file);
    Ok(Import { toml, report })
}

/// A name the balancer accepts (letters, digits, `-`, `_`, `.`), from a product's object
/// name: the F5 partition (`/Common/`) is dropped, other characters become `-`.
pub(crate) fn clean_name(raw: &str) -> String {
    let base = raw.rsplit('/').next().unwrap_or(raw);
    let s: String = base
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '-'
            }
        })
        .collect();
    let s = s.trim_matches('-').to_string();
    if s.is_empty() { "unnamed".into() } else { s }
}

/// Makes `name` unique among `taken` by appending `-2`, `-3`, ...
pub(crate) fn unique(name: String, taken: &mut std::collections::HashSet<String>) -> String {
    if taken.insert(name.clone()) {
        return name;
    }
    let mut i = 2;
    loop {
        let n = format!("{name}-{i}");
        if taken.insert(n.clone()) {
            return n;
        }
        i += 1;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn names_lose_the_partition_and_odd_characters() {
        assert_eq!(clean_name("/Common/ws_pool"), "ws_pool");
        assert_eq!(clean_name("HL7 Listener (A)"), "HL7-Listener--A");
        assert_eq!(clean_name("///"), "unnamed");
        let mut t = std::collections::HashSet::new();
        assert_eq!(unique("a".into(), &mut t), "a");
        assert_eq!(unique("a".into(), &mut t), "a-2");
    }
}
