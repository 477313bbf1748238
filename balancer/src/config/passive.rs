//! Passive health (`passive_health = { … }` on a TCP service): the dataplane counts, per
//! backend, new flows the backend refused with an RST and SYNs clients had to send again;
//! a burst of them marks the backend down at once (HAProxy `observe layer4`, Envoy outlier
//! detection). Its active check brings it back after `rise` passing checks.

use std::time::Duration;

use serde::Deserialize;

/// The `passive_health` table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PassiveHealth {
    /// Refused flows plus retransmitted SYNs within `window` that mark the backend down.
    #[serde(default = "default_failures")]
    pub failures: u32,
    /// The sliding window they are counted in.
    #[serde(default = "default_window", with = "humantime_serde")]
    pub window: Duration,
}

fn default_failures() -> u32 {
    10
}

fn default_window() -> Duration {
    Duration::from_secs(1)
}

/// How often the controller reads the counters (the reaction time of passive health).
pub const POLL: Duration = Duration::from_millis(50);

impl PassiveHealth {
    /// Checks the values; the message names the bad field.
    pub fn validate(&self) -> Result<(), String> {
        if self.failures == 0 {
            return Err("failures must be at least 1".into());
        }
        if self.window < POLL || self.window > Duration::from_secs(60) {
            return Err(format!(
                "window must be between {} ms and 60 s",
                POLL.as_millis()
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<PassiveHealth, String> {
        let p: PassiveHealth = toml::from_str(s).map_err(|e| e.message().to_string())?;
        p.validate().map(|()| p)
    }

    #[test]
    fn defaults_and_limits() {
        assert_eq!(
            parse("").unwrap(),
            PassiveHealth {
                failures: 10,
                window: Duration::from_secs(1)
            }
        );
        assert_eq!(
            parse("failures = 3\nwindow = \"500ms\"").unwrap().window,
            Duration::from_millis(500)
        );
        assert!(parse("failures = 0").unwrap_err().contains("failures"));
        assert!(parse("window = \"10ms\"").unwrap_err().contains("window"));
        assert!(parse("failurs = 3").unwrap_err().contains("failurs"));
    }
}
