//! The health-check specification: what the config file's `health = { ... }` table says.

use std::{path::PathBuf, time::Duration};

use serde::Deserialize;

use crate::SpecError;

/// Default time between two checks of one target (HAProxy's `inter`).
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(2);
/// Upper bound of the default timeout (the default is half the interval, at most this).
pub const MAX_DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);
/// Default consecutive successes that turn a down target up.
pub const DEFAULT_RISE: u32 = 2;
/// Default consecutive failures that turn an up target down.
pub const DEFAULT_FALL: u32 = 3;
/// Default HTTP path.
pub const DEFAULT_PATH: &str = "/";
/// Default accepted HTTP status codes.
pub const DEFAULT_EXPECT_STATUS: [u16; 1] = [200];

/// How to check one backend, with its timing and debouncing.
///
/// Deserialized from an inline table of the config file, for example
///
/// ```toml
/// health = { kind = "mllp", interval = "250ms", timeout = "200ms", rise = 2, fall = 2 }
/// health = { kind = "http", path = "/health", expect_status = [200], interval = "500ms", timeout = "300ms", rise = 2, fall = 2 }
/// health = { kind = "https", path = "/health", ca_file = "/etc/balancer/backend-ca.pem", sni = "app1.example.org" }
/// ```
///
/// Keys and defaults:
///
/// | key | kinds | default |
/// |---|---|---|
/// | `kind` | all | required: `tcp`, `http`, `https` or `mllp` |
/// | `interval` | all | `2s` |
/// | `timeout` | all | half the interval, at most `1s`; must be below `interval` |
/// | `rise` | all | `2` |
/// | `fall` | all | `3` |
/// | `jitter` | all | a tenth of the interval; each check starts up to this much after its slot, at most half the interval |
/// | `path` | http, https | `"/"` |
/// | `expect_status` | http, https | `[200]` |
/// | `body_contains` | http, https | none (body not read) |
/// | `host` | http, https | the target address (`ip:port`) |
/// | `ca_file` | https | none: the operating system's trust store |
/// | `insecure` | https | `false`; `true` skips certificate verification |
/// | `sni` | https | `host` without its port, else the target IP |
/// | `port` | all | the backend's own port; set it to check another port of the same host |
/// | `message` | mllp | [`crate::mllp::ping`]: an MSH-only `NMQ^N01`, no patient data |
///
/// Unknown keys, and keys that do not belong to the chosen kind, are errors. Deserializing
/// also runs [`HealthSpec::validate`], so a bad value is reported with its place in the file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(try_from = "RawSpec")]
pub struct HealthSpec {
    /// What to check and how (the `kind` key and its kind-specific keys).
    pub kind: CheckKind,
    /// Time between the starts of two checks of one target.
    pub interval: Duration,
    /// Bound on one whole check: connect, handshake, request and answer.
    pub timeout: Duration,
    /// Consecutive successes that turn a down target up.
    pub rise: u32,
    /// Consecutive failures that turn an up target down.
    pub fall: u32,
    /// Each check starts at a random offset in `[0, jitter)` after its slot, so that many
    /// targets added together do not probe in lockstep. The slots themselves never drift.
    pub jitter: Duration,
    /// Port to check instead of the target's own (HAProxy's `port`, F5's alias port).
    pub port: Option<u16>,
}

/// What a check does. The `kind` key of the config table chooses the variant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckKind {
    /// Healthy iff a TCP connection is established within the timeout.
    Tcp,
    /// `GET path` over HTTP/1.1; healthy iff the status is in `expect_status` and, if set,
    /// the body (first 64 KiB) contains `body_contains`.
    Http {
        /// Request target, starting with `/`.
        path: String,
        /// Accepted status codes.
        expect_status: Vec<u16>,
        /// Substring the body must contain; the body is not read when unset.
        body_contains: Option<String>,
        /// `Host` header; the target's `ip:port` when unset.
        host: Option<String>,
    },
    /// As [`CheckKind::Http`], over TLS 1.2 or 1.3 (rustls, ring).
    Https {
        /// Request target, starting with `/`.
        path: String,
        /// Accepted status codes.
        expect_status: Vec<u16>,
        /// Substring the body must contain; the body is not read when unset.
        body_contains: Option<String>,
        /// `Host` header; the target's `ip:port` when unset.
        host: Option<String>,
        /// PEM file of the CA certificate(s) to verify the server against; the operating
        /// system's trust store when unset.
        ca_file: Option<PathBuf>,
        /// Skip certificate verification (handshake signatures are still checked).
        /// Explicit only: never the default, and not allowed together with `ca_file`.
        insecure: bool,
        /// Server name sent and verified; `host` without its port, else the target IP.
        sni: Option<String>,
    },
    /// Send one HL7 v2 message framed by MLLP; healthy iff the answer is an ACK whose
    /// MSA-1 is `AA` or `CA`.
    Mllp {
        /// The message to send (segments separated by `\r`; `\n` and `\r\n` are accepted
        /// and turned into `\r`). Unset: [`crate::mllp::ping`], which carries no patient data.
        message: Option<String>,
    },
}

impl CheckKind {
    /// The config name of this kind: `tcp`, `http`, `https` or `mllp`.
    pub fn name(&self) -> &'static str {
        match self {
            CheckKind::Tcp => "tcp",
            CheckKind::Http { .. } => "http",
            CheckKind::Https { .. } => "https",
            CheckKind::Mllp { .. } => "mllp",
        }
    }

    /// An `http` check of `path` with the defaults (status 200, no body match, default host).
    pub fn http(path: impl Into<String>) -> Self {
        CheckKind::Http {
            path: path.into(),
            expect_status: DEFAULT_EXPECT_STATUS.to_vec(),
            body_contains: None,
            host: None,
        }
    }

    /// An `mllp` check sending the default ping.
    pub fn mllp() -> Self {
        CheckKind::Mllp { message: None }
    }
}

impl HealthSpec {
    /// A spec of `kind` with the default timing: interval 2 s, timeout 1 s, rise 2, fall 3,
    /// jitter 200 ms. Change fields with struct update syntax.
    pub fn new(kind: CheckKind) -> Self {
        HealthSpec {
            kind,
            interval: DEFAULT_INTERVAL,
            timeout: default_timeout(DEFAULT_INTERVAL),
            rise: DEFAULT_RISE,
            fall: DEFAULT_FALL,
            jitter: default_jitter(DEFAULT_INTERVAL),
            port: None,
        }
    }

    /// Checks the values: `0 < timeout < interval`, `jitter <= interval / 2`,
    /// `rise, fall` in `1..=1000`, HTTP path starting with `/`, status codes in `100..=599`,
    /// no `ca_file` together with `insecure`, a well-formed `sni`, an MLLP message starting
    /// with `MSH`. Returns a short human-readable message on the first problem.
    pub fn validate(&self) -> Result<(), SpecError> {
        if self.port == Some(0) {
            return Err(SpecError::ZeroPort);
        }
        if self.interval < Duration::from_millis(1) {
            return Err(SpecError::IntervalTooShort);
        }
        if self.timeout.is_zero() {
            return Err(SpecError::ZeroTimeout);
        }
        if self.timeout >= self.interval {
            return Err(SpecError::TimeoutNotBelowInterval {
                timeout: self.timeout,
                interval: self.interval,
            });
        }
        if self.jitter > self.interval / 2 {
            return Err(SpecError::JitterTooLarge {
                jitter: self.jitter,
                interval: self.interval,
            });
        }
        for (name, value) in [("rise", self.rise), ("fall", self.fall)] {
            if !(1..=1000).contains(&value) {
                return Err(SpecError::CountOutOfRange { name, value });
            }
        }
        match &self.kind {
            CheckKind::Tcp => Ok(()),
            CheckKind::Http {
                path,
                expect_status,
                body_contains,
                host,
            } => validate_http(
                path,
                expect_status,
                body_contains.as_deref(),
                host.as_deref(),
            ),
            CheckKind::Https {
                path,
                expect_status,
                body_contains,
                host,
                ca_file,
                insecure,
                sni,
            } => {
                validate_http(
                    path,
                    expect_status,
                    body_contains.as_deref(),
                    host.as_deref(),
                )?;
                if *insecure && ca_file.is_some() {
                    return Err(SpecError::InsecureWithCaFile);
                }
                if let Some(sni) = sni {
                    rustls_pki_types::ServerName::try_from(sni.as_str())
                        .map_err(|_| SpecError::BadSni(sni.clone()))?;
                }
                Ok(())
            }
            CheckKind::Mllp { message } => match message {
                None => Ok(()),
                Some(m) => {
                    let b = m.as_bytes();
                    if !m.starts_with("MSH") || b.len() < 8 {
                        return Err(SpecError::MllpWithoutMsh);
                    }
                    if b.iter()
                        .any(|&c| c == crate::mllp::START || c == crate::mllp::END)
                    {
                        return Err(SpecError::MllpFramingBytes);
                    }
                    Ok(())
                }
            },
        }
    }
}

fn validate_http(
    path: &str,
    expect_status: &[u16],
    body_contains: Option<&str>,
    host: Option<&str>,
) -> Result<(), SpecError> {
    let printable = |s: &str| s.bytes().all(|c| c.is_ascii_graphic());
    if !path.starts_with('/') || !printable(path) {
        return Err(SpecError::BadPath(path.to_string()));
    }
    if expect_status.is_empty() {
        return Err(SpecError::NoExpectStatus);
    }
    if let Some(bad) = expect_status.iter().find(|s| !(100..=599).contains(*s)) {
        return Err(SpecError::BadStatus(*bad));
    }
    if body_contains == Some("") {
        return Err(SpecError::EmptyBodyContains);
    }
    if let Some(h) = host
        && (h.is_empty() || !printable(h))
    {
        return Err(SpecError::BadHost(h.to_string()));
    }
    Ok(())
}

fn default_timeout(interval: Duration) -> Duration {
    (interval / 2).min(MAX_DEFAULT_TIMEOUT)
}

fn default_jitter(interval: Duration) -> Duration {
    interval / 10
}

/// The flat table as written; turned into a [`HealthSpec`] by `TryFrom`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSpec {
    kind: RawKind,
    #[serde(default, with = "humantime_serde")]
    interval: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    jitter: Option<Duration>,
    rise: Option<u32>,
    fall: Option<u32>,
    path: Option<String>,
    expect_status: Option<Vec<u16>>,
    body_contains: Option<String>,
    host: Option<String>,
    ca_file: Option<PathBuf>,
    insecure: Option<bool>,
    sni: Option<String>,
    message: Option<String>,
    port: Option<u16>,
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum RawKind {
    Tcp,
    Http,
    Https,
    Mllp,
}

impl TryFrom<RawSpec> for HealthSpec {
    type Error = SpecError;

    fn try_from(r: RawSpec) -> Result<Self, SpecError> {
        let name = match r.kind {
            RawKind::Tcp => "tcp",
            RawKind::Http => "http",
            RawKind::Https => "https",
            RawKind::Mllp => "mllp",
        };
        let http_like = matches!(r.kind, RawKind::Http | RawKind::Https);
        let present = [
            ("path", r.path.is_some(), http_like),
            ("expect_status", r.expect_status.is_some(), http_like),
            ("body_contains", r.body_contains.is_some(), http_like),
            ("host", r.host.is_some(), http_like),
            ("ca_file", r.ca_file.is_some(), r.kind == RawKind::Https),
            ("insecure", r.insecure.is_some(), r.kind == RawKind::Https),
            ("sni", r.sni.is_some(), r.kind == RawKind::Https),
            ("message", r.message.is_some(), r.kind == RawKind::Mllp),
        ];
        if let Some(&(key, ..)) = present.iter().find(|(_, set, allowed)| *set && !allowed) {
            return Err(SpecError::KeyOfOtherKind { key, kind: name });
        }
        let path = r.path.unwrap_or_else(|| DEFAULT_PATH.to_string());
        let expect_status = r
            .expect_status
            .unwrap_or_else(|| DEFAULT_EXPECT_STATUS.to_vec());
        let kind = match r.kind {
            RawKind::Tcp => CheckKind::Tcp,
            RawKind::Http => CheckKind::Http {
                path,
                expect_status,
                body_contains: r.body_contains,
                host: r.host,
            },
            RawKind::Https => CheckKind::Https {
                path,
                expect_status,
                body_contains: r.body_contains,
                host: r.host,
                ca_file: r.ca_file,
                insecure: r.insecure.unwrap_or(false),
                sni: r.sni,
            },
            RawKind::Mllp => CheckKind::Mllp { message: r.message },
        };
        let interval = r.interval.unwrap_or(DEFAULT_INTERVAL);
        let spec = HealthSpec {
            kind,
            interval,
            timeout: r.timeout.unwrap_or_else(|| default_timeout(interval)),
            rise: r.rise.unwrap_or(DEFAULT_RISE),
            fall: r.fall.unwrap_or(DEFAULT_FALL),
            jitter: r.jitter.unwrap_or_else(|| default_jitter(interval)),
            port: r.port,
        };
        spec.validate()?;
        Ok(spec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize)]
    struct Doc {
        health: HealthSpec,
    }

    fn parse(s: &str) -> Result<HealthSpec, String> {
        toml::from_str::<Doc>(s)
            .map(|d| d.health)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn parses_the_documented_examples() {
        let m = parse(
            r#"health = { kind = "mllp", interval = "250ms", timeout = "200ms", rise = 2, fall = 2 }"#,
        )
        .unwrap();
        assert_eq!(m.kind, CheckKind::Mllp { message: None });
        assert_eq!(m.interval, Duration::from_millis(250));
        assert_eq!(m.timeout, Duration::from_millis(200));
        assert_eq!((m.rise, m.fall), (2, 2));
        assert_eq!(m.jitter, Duration::from_millis(25));

        let h = parse(
            r#"health = { kind = "http", path = "/health", expect_status = [200], interval = "500ms", timeout = "300ms", rise = 2, fall = 2 }"#,
        )
        .unwrap();
        assert_eq!(
            h.kind,
            CheckKind::Http {
                path: "/health".into(),
                expect_status: vec![200],
                body_contains: None,
                host: None
            }
        );
    }

    #[test]
    fn defaults() {
        let t = parse(r#"health = { kind = "tcp" }"#).unwrap();
        assert_eq!(t, HealthSpec::new(CheckKind::Tcp));
        assert_eq!(t.interval, Duration::from_secs(2));
        assert_eq!(t.timeout, Duration::from_secs(1));
        assert_eq!(t.jitter, Duration::from_millis(200));
        assert_eq!((t.rise, t.fall), (2, 3));

        let s = parse(r#"health = { kind = "https", interval = "600ms" }"#).unwrap();
        assert_eq!(s.timeout, Duration::from_millis(300));
        let CheckKind::Https {
            path,
            expect_status,
            insecure,
            ca_file,
            ..
        } = s.kind
        else {
            panic!("not https")
        };
        assert_eq!(path, "/");
        assert_eq!(expect_status, vec![200]);
        assert!(!insecure);
        assert!(ca_file.is_none());
    }

    #[test]
    fn rejects_unknown_and_foreign_keys() {
        let e = parse(r#"health = { kind = "tcp", colour = "red" }"#).unwrap_err();
        assert!(e.contains("colour"), "{e}");
        let e = parse(r#"health = { kind = "tcp", path = "/" }"#).unwrap_err();
        assert!(e.contains("`path` is not a key of kind = \"tcp\""), "{e}");
        let e = parse(r#"health = { kind = "http", insecure = true }"#).unwrap_err();
        assert!(e.contains("insecure"), "{e}");
        let e = parse(r#"health = { kind = "smtp" }"#).unwrap_err();
        assert!(e.contains("smtp"), "{e}");
        let e = parse(r#"health = { interval = "1s" }"#).unwrap_err();
        assert!(e.contains("kind"), "{e}");
    }

    #[test]
    fn rejects_bad_values() {
        for (doc, needle) in [
            (
                r#"{ kind = "tcp", interval = "1s", timeout = "1s" }"#,
                "below interval",
            ),
            (r#"{ kind = "tcp", timeout = "0ms" }"#, "above zero"),
            (r#"{ kind = "tcp", rise = 0 }"#, "rise"),
            (r#"{ kind = "tcp", fall = 0 }"#, "fall"),
            (
                r#"{ kind = "tcp", interval = "1s", jitter = "600ms" }"#,
                "jitter",
            ),
            (r#"{ kind = "tcp", interval = "soon" }"#, "interval"),
            (r#"{ kind = "http", expect_status = [99] }"#, "99"),
            (r#"{ kind = "http", expect_status = [600] }"#, "600"),
            (r#"{ kind = "http", expect_status = [] }"#, "empty"),
            (r#"{ kind = "http", path = "health" }"#, "path"),
            (r#"{ kind = "http", path = "/a b" }"#, "path"),
            (
                r#"{ kind = "https", insecure = true, ca_file = "/x.pem" }"#,
                "contradict",
            ),
            (r#"{ kind = "https", sni = "bad name!" }"#, "sni"),
            (r#"{ kind = "mllp", message = "PID|1" }"#, "MSH"),
        ] {
            let e = parse(&format!("health = {doc}")).unwrap_err();
            assert!(e.contains(needle), "{doc}: {e}");
        }
    }

    #[test]
    fn validate_accepts_good_specs() {
        HealthSpec::new(CheckKind::Tcp).validate().unwrap();
        HealthSpec::new(CheckKind::http("/health"))
            .validate()
            .unwrap();
        HealthSpec::new(CheckKind::mllp()).validate().unwrap();
        let s = parse(
            r#"health = { kind = "https", path = "/h", expect_status = [200, 204], body_contains = "ok", host = "app.example.org:8443", ca_file = "/etc/ca.pem", sni = "app.example.org" }"#,
        )
        .unwrap();
        s.validate().unwrap();
    }
}
