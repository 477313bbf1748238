//! The import report: one note per source object, in three groups.
//!
//! Notes name objects and settings, never whole source lines: a product's file also holds
//! passwords, keys and monitor strings that must not end up in a terminal or a ticket.

use std::fmt;

/// What happened to one source object or setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Outcome {
    /// Carried over with the same meaning.
    Translated,
    /// Carried over with a different but close meaning (the note says how).
    Approximated,
    /// Left out (the note says why).
    NotTranslated,
}

/// One entry of the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    /// 1-based source line.
    pub line: usize,
    /// What happened.
    pub outcome: Outcome,
    /// The source object, e.g. `ltm pool /Common/ws_pool`.
    pub subject: String,
    /// What it became, or how it was approximated, or why it was left out.
    pub detail: String,
}

/// Every note of an import, in source order within each group.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// The notes, in the order they were made.
    pub notes: Vec<Note>,
}

impl Report {
    pub(crate) fn add(
        &mut self,
        line: usize,
        outcome: Outcome,
        subject: impl Into<String>,
        detail: impl Into<String>,
    ) {
        self.notes.push(Note {
            line,
            outcome,
            subject: subject.into(),
            detail: detail.into(),
        });
    }

    pub(crate) fn ok(
        &mut self,
        line: usize,
        subject: impl Into<String>,
        detail: impl Into<String>,
    ) {
        self.add(line, Outcome::Translated, subject, detail);
    }

    pub(crate) fn approx(
        &mut self,
        line: usize,
        subject: impl Into<String>,
        detail: impl Into<String>,
    ) {
        self.add(line, Outcome::Approximated, subject, detail);
    }

    pub(crate) fn skip(
        &mut self,
        line: usize,
        subject: impl Into<String>,
        detail: impl Into<String>,
    ) {
        self.add(line, Outcome::NotTranslated, subject, detail);
    }

    /// The notes with `outcome`, sorted by line.
    pub fn with(&self, outcome: Outcome) -> Vec<&Note> {
        let mut v: Vec<&Note> = self.notes.iter().filter(|n| n.outcome == outcome).collect();
        v.sort_by_key(|n| n.line);
        v
    }

    /// Renders the report for a terminal, naming `file` in every line.
    pub fn render(&self, file: &str) -> String {
        let mut out = String::new();
        for (outcome, title) in [
            (Outcome::Translated, "translated"),
            (Outcome::Approximated, "approximated"),
            (Outcome::NotTranslated, "not translated"),
        ] {
            let notes = self.with(outcome);
            out.push_str(&format!("{title} ({}):\n", notes.len()));
            for n in notes {
                out.push_str(&format!(
                    "  {file}:{}: {}: {}\n",
                    n.line, n.subject, n.detail
                ));
            }
        }
        out
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.render("input"))
    }
}
