//! Limits and timeouts of one relayed service (`[service.mllp]` in the controller's file).

use std::time::Duration;

use serde::Deserialize;

/// Limits and timeouts of one relayed service. Every field has a default.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MllpConfig {
    /// Sender connections open at once; one more is accepted and closed with a log line.
    pub max_senders: usize,
    /// Largest message accepted from a sender or ACK accepted from a listener, in bytes.
    pub max_message_bytes: usize,
    /// Bytes of all messages held in memory at once (across senders); a sender whose
    /// message does not fit waits, unread (TCP back-pressure), until others are ACKed.
    pub max_in_flight_bytes: usize,
    /// Whitespace bytes tolerated before a start block; any other byte is a frame error.
    pub max_bytes_before_start: usize,
    /// Time for the rest of a frame once it started: a sender that stops mid-frame is closed.
    #[serde(with = "humantime_serde")]
    pub frame_timeout: Duration,
    /// A sender connection idle this long between messages is closed.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Time to open a connection to a listener.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Time a listener has to ACK a message; past it the listener is failed (passive
    /// health) and the message is replayed to the next one.
    #[serde(with = "humantime_serde")]
    pub ack_timeout: Duration,
    /// Longest time a message waits for a listener when none is usable; then the sender's
    /// connection is closed without an ACK (the sender resends).
    #[serde(with = "humantime_serde")]
    pub hold_timeout: Duration,
    /// Listeners one message may fail at after it was written to them (garbage, no ACK,
    /// closed); then the relay gives it up (closes its sender's connection without an ACK)
    /// rather than take every listener out in turn for one poison message.
    pub max_attempts: u32,
    /// Fraction (0–1) of AE/AR answers among the last `nack_window` ACKs of a listener above
    /// which it is failed; 1 never fails a listener for its NACKs.
    pub nack_threshold: f64,
    /// Number of recent ACKs `nack_threshold` is computed over.
    pub nack_window: usize,
}

impl Default for MllpConfig {
    fn default() -> Self {
        MllpConfig {
            max_senders: 256,
            max_message_bytes: 1 << 20,
            max_in_flight_bytes: 64 << 20,
            max_bytes_before_start: 64,
            frame_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(3600),
            connect_timeout: Duration::from_secs(2),
            ack_timeout: Duration::from_secs(5),
            hold_timeout: Duration::from_secs(30),
            max_attempts: 3,
            nack_threshold: 0.5,
            nack_window: 20,
        }
    }
}

impl MllpConfig {
    /// Every problem of the values, as sentences naming the key.
    pub fn validate(&self) -> Result<(), Vec<String>> {
        let mut e = Vec::new();
        if self.max_senders == 0 {
            e.push("max_senders must be at least 1".to_string());
        }
        if self.max_message_bytes < 64 {
            e.push("max_message_bytes must be at least 64".to_string());
        }
        if self.max_in_flight_bytes < self.max_message_bytes {
            e.push("max_in_flight_bytes must be at least max_message_bytes".to_string());
        }
        if u32::try_from(self.max_in_flight_bytes).is_err() {
            e.push(format!("max_in_flight_bytes must be at most {}", u32::MAX));
        }
        for (name, d) in [
            ("frame_timeout", self.frame_timeout),
            ("idle_timeout", self.idle_timeout),
            ("connect_timeout", self.connect_timeout),
            ("ack_timeout", self.ack_timeout),
            ("hold_timeout", self.hold_timeout),
        ] {
            if d < Duration::from_millis(1) {
                e.push(format!("{name} must be at least 1ms"));
            }
        }
        if !(1..=100).contains(&self.max_attempts) {
            e.push("max_attempts must be within 1..=100".to_string());
        }
        if !(0.0..=1.0).contains(&self.nack_threshold) {
            e.push("nack_threshold must be within 0..=1".to_string());
        }
        if self.nack_window == 0 || self.nack_window > 10_000 {
            e.push("nack_window must be within 1..=10000".to_string());
        }
        if e.is_empty() { Ok(()) } else { Err(e) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_keys_parse() {
        assert_eq!(MllpConfig::default().validate(), Ok(()));
        let c: MllpConfig =
            toml::from_str("ack_timeout = \"1s\"\nmax_senders = 3\nnack_threshold = 0.2").unwrap();
        assert_eq!(c.ack_timeout, Duration::from_secs(1));
        assert_eq!(c.max_senders, 3);
        assert_eq!(c.max_message_bytes, 1 << 20);
        assert!(toml::from_str::<MllpConfig>("ack_timout = \"1s\"").is_err());
    }

    #[test]
    fn bad_values_are_all_named() {
        let c = MllpConfig {
            max_senders: 0,
            max_in_flight_bytes: 10,
            ack_timeout: Duration::ZERO,
            nack_threshold: 1.5,
            nack_window: 0,
            ..MllpConfig::default()
        };
        let e = c.validate().unwrap_err();
        for key in [
            "max_senders",
            "max_in_flight_bytes",
            "ack_timeout",
            "nack_threshold",
            "nack_window",
        ] {
            assert!(e.iter().any(|m| m.starts_with(key)), "{key}: {e:?}");
        }
    }
}
