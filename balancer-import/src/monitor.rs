//! Reading the products' monitor send/receive strings, shared by the importers.

use crate::model::HttpCheck;

/// Turns the two-character escapes the products write in monitor strings (`\r`, `\n`,
/// `\t`, `\\`) into the characters.
pub(crate) fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars();
    while let Some(c) = it.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match it.next() {
            Some('r') => out.push('\r'),
            Some('n') => out.push('\n'),
            Some('t') => out.push('\t'),
            Some(o) => out.push(o),
            None => out.push('\\'),
        }
    }
    out
}

/// HL7 v2 over MLLP: a message header in the send string, an acknowledgement (or an MLLP
/// start byte) in either.
pub(crate) fn looks_hl7(send: Option<&str>, recv: Option<&str>) -> bool {
    let has =
        |s: Option<&str>, pats: &[&str]| s.is_some_and(|s| pats.iter().any(|p| s.contains(p)));
    has(send, &["MSH|", "\\x0b", "\\x0B", "\\013", "\u{b}"]) || has(recv, &["MSA|"])
}

/// Path and `Host` of an HTTP request written as a monitor send string, e.g.
/// `GET /health HTTP/1.1\r\nHost: app\r\n\r\n`. `None` when it is not a GET or HEAD.
pub(crate) fn request(send: &str) -> Option<(String, Option<String>)> {
    let text = unescape(send);
    let mut lines = text.split(['\r', '\n']).filter(|l| !l.is_empty());
    let first = lines.next()?;
    let mut words = first.split_whitespace();
    let method = words.next()?;
    if !method.eq_ignore_ascii_case("GET") && !method.eq_ignore_ascii_case("HEAD") {
        return None;
    }
    let path = words.next().unwrap_or("/").to_string();
    let host = lines.find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case("host")
            .then(|| v.trim().to_string())
    });
    Some((path, host.filter(|h| !h.is_empty())))
}

/// A path the balancer accepts (`/` first, printable, no spaces), else `None`.
pub(crate) fn valid_path(p: &str) -> Option<String> {
    (p.starts_with('/') && p.bytes().all(|c| c.is_ascii_graphic())).then(|| p.to_string())
}

/// What a receive string expects, and whether reading it that way was exact.
pub(crate) struct Expect {
    pub status: Vec<u16>,
    pub body: Option<String>,
    /// `None` when the receive string was taken as written; else how it was read.
    pub approx: Option<String>,
}

const REGEX_META: &[char] = &[
    '^', '$', '.', '*', '+', '?', '[', ']', '(', ')', '{', '}', '|', '\\',
];

/// Reads a receive string (F5 `recv`, NetScaler `-recv`, ARR `responseMatch`): a status
/// line or code becomes `expect_status`, other text `body_contains`. F5 and NetScaler
/// receive strings may be regular expressions: the longest literal part is kept.
pub(crate) fn expect(recv: Option<&str>, regex: bool) -> Expect {
    let Some(r) = recv.map(unescape).filter(|r| !r.trim().is_empty()) else {
        return Expect {
            status: vec![200],
            body: None,
            approx: None,
        };
    };
    if let Some(code) = status_code(&r) {
        return Expect {
            status: vec![code],
            body: None,
            approx: None,
        };
    }
    if !regex || !r.contains(REGEX_META) {
        return Expect {
            status: vec![200],
            body: Some(r),
            approx: Some("status 200 is also required".into()),
        };
    }
    let literal = r
        .split(REGEX_META)
        .max_by_key(|p| p.len())
        .unwrap_or("")
        .trim()
        .to_string();
    let approx = Some(format!(
        "the receive string is a regular expression; its longest literal part is matched as text (status 200 also required){}",
        if literal.is_empty() {
            ": none, so only the status is checked"
        } else {
            ""
        }
    ));
    Expect {
        status: vec![200],
        body: (!literal.is_empty()).then_some(literal),
        approx,
    }
}

/// `200`, `200 OK`, `HTTP/1.1 200`, `HTTP/1\.[01] 200 OK` → 200.
fn status_code(r: &str) -> Option<u16> {
    let r = r.trim().trim_start_matches('^');
    let rest = if r.len() >= 4 && r[..4].eq_ignore_ascii_case("http") {
        r.split_once(' ').map(|(_, b)| b.trim_start())?
    } else {
        r
    };
    let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
    let after = &rest[digits.len()..];
    let code: u16 = digits.parse().ok()?;
    let tail_ok = after.is_empty()
        || after.starts_with(' ')
            && after[1..]
                .chars()
                .all(|c| c.is_ascii_alphabetic() || c == ' ' || c == '$');
    ((100..=599).contains(&code) && digits.len() == 3 && tail_ok).then_some(code)
}

/// An HTTP check from a send and receive string; the second value says how it was
/// approximated, if it was.
pub(crate) fn http(
    send: Option<&str>,
    recv: Option<&str>,
    regex: bool,
) -> (HttpCheck, Vec<String>) {
    let mut notes = Vec::new();
    let (path, host) = match send.map(request) {
        None => ("/".to_string(), None),
        Some(Some((p, h))) => match valid_path(&p) {
            Some(p) => (p, h),
            None => {
                notes.push("the request path is not a plain path; \"/\" is checked".into());
                ("/".into(), h)
            }
        },
        Some(None) => {
            notes.push("the send string is not a GET request; GET / is sent".into());
            ("/".into(), None)
        }
    };
    let host = host.filter(|h| h.bytes().all(|c| c.is_ascii_graphic()));
    let e = expect(recv, regex);
    notes.extend(e.approx);
    (
        HttpCheck {
            path,
            expect_status: e.status,
            body_contains: e.body,
            host,
        },
        notes,
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn http_send_strings() {
        assert_eq!(
            request(r"GET /health HTTP/1.1\r\nHost: ws.example.org\r\nConnection: close\r\n\r\n"),
            Some(("/health".into(), Some("ws.example.org".into())))
        );
        assert_eq!(request("HEAD /"), Some(("/".into(), None)));
        assert_eq!(request("POST /x HTTP/1.0"), None);
    }

    #[test]
    fn receive_strings() {
        for (r, status, body) in [
            ("200 OK", 200, None),
            ("HTTP/1.1 200", 200, None),
            (r"^HTTP/1\.[01] 204", 204, None),
            ("HTTP/1.1 200 OK", 200, None),
            ("Service is up", 200, Some("Service is up")),
            (r"status.*(up|ok)", 200, Some("status")),
        ] {
            let e = expect(Some(r), true);
            assert_eq!(e.status, vec![status], "{r}");
            assert_eq!(e.body.as_deref(), body, "{r}");
        }
        assert!(expect(Some("Service is up"), false).approx.is_some());
        assert!(expect(None, true).approx.is_none());
    }

    #[test]
    fn hl7_is_recognised() {
        assert!(looks_hl7(
            Some(r"\x0bMSH|^~\&|MON|LB|||||QRY^A19|1|P|2.3\x1c\r"),
            None
        ));
        assert!(looks_hl7(None, Some("MSA|AA")));
        assert!(!looks_hl7(Some("GET / HTTP/1.0"), Some("200")));
    }
}
