//! Typed errors. Their messages are short and never contain payload bytes: they are built
//! from status codes, ACK codes, error kinds and configuration values only.

use std::{io, path::PathBuf, time::Duration};

/// Why a [`crate::HealthSpec`] is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// `port = 0`.
    #[error("port must be 1..=65535")]
    ZeroPort,
    /// `interval` below 1 ms.
    #[error("interval must be at least 1ms")]
    IntervalTooShort,
    /// `timeout = 0`.
    #[error("timeout must be above zero")]
    ZeroTimeout,
    /// `timeout >= interval`.
    #[error("timeout ({timeout:?}) must be below interval ({interval:?})")]
    TimeoutNotBelowInterval {
        /// The configured timeout.
        timeout: Duration,
        /// The configured interval.
        interval: Duration,
    },
    /// `jitter > interval / 2`.
    #[error("jitter ({jitter:?}) must be at most half the interval ({interval:?})")]
    JitterTooLarge {
        /// The configured jitter.
        jitter: Duration,
        /// The configured interval.
        interval: Duration,
    },
    /// `rise` or `fall` outside `1..=1000`.
    #[error("{name} must be between 1 and 1000, got {value}")]
    CountOutOfRange {
        /// `"rise"` or `"fall"`.
        name: &'static str,
        /// The configured value.
        value: u32,
    },
    /// An HTTP path that does not start with `/` or holds spaces.
    #[error("path {0:?} must start with '/' and hold no spaces")]
    BadPath(String),
    /// `expect_status = []`.
    #[error("expect_status must not be empty")]
    NoExpectStatus,
    /// A status outside `100..=599`.
    #[error("expect_status {0} is not in 100..=599")]
    BadStatus(u16),
    /// `body_contains = ""`.
    #[error("body_contains must not be empty")]
    EmptyBodyContains,
    /// An empty host, or one with spaces.
    #[error("host {0:?} must be non-empty and hold no spaces")]
    BadHost(String),
    /// Both `insecure = true` and `ca_file`.
    #[error("insecure = true and ca_file contradict each other")]
    InsecureWithCaFile,
    /// An `sni` that is neither a DNS name nor an IP address.
    #[error("sni {0:?} is not a DNS name or IP address")]
    BadSni(String),
    /// An MLLP message that does not start with `MSH`.
    #[error("mllp message must start with an MSH segment")]
    MllpWithoutMsh,
    /// An MLLP message holding the framing bytes.
    #[error("mllp message must not contain MLLP framing bytes")]
    MllpFramingBytes,
    /// A key that belongs to another kind of check.
    #[error("`{key}` is not a key of kind = \"{kind}\"")]
    KeyOfOtherKind {
        /// The key as written.
        key: &'static str,
        /// The check's kind.
        kind: &'static str,
    },
}

/// A short name for an I/O error, from its kind only (no OS text, no payload).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoReason(pub io::ErrorKind);

impl std::fmt::Display for IoReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use io::ErrorKind as K;
        let s = match self.0 {
            K::ConnectionRefused => "refused",
            K::ConnectionReset => "reset",
            K::ConnectionAborted => "aborted",
            K::TimedOut => "timed out",
            K::UnexpectedEof => "closed by peer",
            K::BrokenPipe => "broken pipe",
            K::HostUnreachable => "host unreachable",
            K::NetworkUnreachable => "network unreachable",
            K::AddrNotAvailable => "address not available",
            K::PermissionDenied => "permission denied",
            other => return write!(f, "error ({other:?})"),
        };
        f.write_str(s)
    }
}

impl From<&io::Error> for IoReason {
    fn from(e: &io::Error) -> Self {
        IoReason(e.kind())
    }
}

/// Why one check found its target unhealthy (or could not run). The message is the
/// `reason` of a [`crate::HealthEvent`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProbeError {
    /// The TCP connect failed.
    #[error("connect {0}")]
    Connect(IoReason),
    /// No verdict within the spec's timeout.
    #[error("timeout {0:?}")]
    Timeout(Duration),
    /// The TLS client configuration could not be built.
    #[error("tls setup: {0}")]
    TlsSetup(String),
    /// The `ca_file` could not be read or parsed.
    #[error("ca_file {}: {reason}", path.display())]
    CaFile {
        /// The file.
        path: PathBuf,
        /// What went wrong (no file content).
        reason: String,
    },
    /// The `ca_file` holds no usable certificate.
    #[error("ca_file {}: no usable certificate", .0.display())]
    NoUsableCa(PathBuf),
    /// The name to send as SNI is not a valid server name.
    #[error("invalid server name")]
    ServerName,
    /// The TLS handshake failed (rustls' error, or the I/O error kind).
    #[error("tls: {0}")]
    Handshake(String),
    /// The HTTP exchange failed; hyper's error kind, named without its bytes.
    #[error("http: {0}")]
    Http(&'static str),
    /// The request could not be built.
    #[error("http: invalid request")]
    InvalidRequest,
    /// A status not in `expect_status`.
    #[error("status {0}")]
    Status(u16),
    /// The body could not be read within the size bound.
    #[error("status {status}, body unreadable or over {max} bytes")]
    BodyUnreadable {
        /// The response status.
        status: u16,
        /// The size bound.
        max: usize,
    },
    /// The body does not contain `body_contains`.
    #[error("status {0}, body mismatch")]
    BodyMismatch(u16),
    /// Sending the MLLP message failed.
    #[error("mllp send: {0}")]
    MllpSend(IoReason),
    /// The reply is not a well-formed MLLP frame (the text names the problem, not the bytes).
    #[error("mllp: {0}")]
    MllpFrame(String),
    /// The peer closed before an ACK.
    #[error("mllp: connection closed before ACK")]
    MllpClosed,
    /// Reading the reply failed.
    #[error("mllp receive: {0}")]
    MllpReceive(IoReason),
    /// A negative acknowledgment: `AE`, `AR`, `CE` or `CR`.
    #[error("MSA-1 {0}")]
    Nack(&'static str),
    /// MSA-1 holds something that is not an acknowledgment code.
    #[error("mllp: MSA-1 is not an acknowledgment code")]
    NotAnAck,
    /// The reply has no MSA segment.
    #[error("mllp: reply without MSA segment")]
    NoMsa,
}
