//! The `[console]` section of the balancer's config file.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// `[console]`: the web console. Absent means no console.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsoleConfig {
    /// Management address and port to serve HTTPS on (only there).
    pub address: SocketAddr,
    /// Users file (`balancer user add|passwd|remove`), mode 0600.
    #[serde(default = "default_users")]
    pub users: PathBuf,
    /// PEM certificate chain; without it a self-signed certificate is made at first start.
    pub cert: Option<PathBuf>,
    /// PEM private key of `cert`.
    pub key: Option<PathBuf>,
    /// Where the self-signed certificate and key are kept between starts.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// Lifetime of a session from sign-in.
    #[serde(default = "default_session_ttl", with = "humantime_serde")]
    pub session_ttl: Duration,
    /// Failed sign-ins in a row (per user name, and per source address) before a lockout.
    #[serde(default = "default_max_failures")]
    pub max_failures: u32,
    /// How long a lockout lasts.
    #[serde(default = "default_lockout", with = "humantime_serde")]
    pub lockout: Duration,
    /// Sign-in attempts allowed per source address per minute.
    #[serde(default = "default_rate")]
    pub sign_in_rate: u32,
    /// How often the status is sampled for the charts and the health-change history.
    #[serde(default = "default_sample", with = "humantime_serde")]
    pub sample_interval: Duration,
    /// How often the pages refresh themselves in the browser.
    #[serde(default = "default_refresh", with = "humantime_serde")]
    pub refresh_interval: Duration,
}

/// Default users file.
pub const DEFAULT_USERS: &str = "/etc/balancer/console-users";
/// Default directory of the generated certificate.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/balancer/console";

fn default_users() -> PathBuf {
    PathBuf::from(DEFAULT_USERS)
}
fn default_state_dir() -> PathBuf {
    PathBuf::from(DEFAULT_STATE_DIR)
}
fn default_session_ttl() -> Duration {
    Duration::from_secs(8 * 3600)
}
fn default_max_failures() -> u32 {
    5
}
fn default_lockout() -> Duration {
    Duration::from_secs(15 * 60)
}
fn default_rate() -> u32 {
    20
}
fn default_sample() -> Duration {
    Duration::from_secs(5)
}
fn default_refresh() -> Duration {
    Duration::from_secs(3)
}

impl ConsoleConfig {
    /// Checks what serde cannot; each problem is one message.
    pub fn validate(&self) -> Result<(), Vec<String>> {
        let mut errs = Vec::new();
        if self.cert.is_some() != self.key.is_some() {
            errs.push("cert and key go together".to_string());
        }
        if self.max_failures == 0 {
            errs.push("max_failures must be at least 1".to_string());
        }
        if self.sign_in_rate == 0 {
            errs.push("sign_in_rate must be at least 1".to_string());
        }
        if self.session_ttl < Duration::from_secs(60) {
            errs.push("session_ttl must be at least 1m".to_string());
        }
        if self.sample_interval < Duration::from_millis(200) {
            errs.push("sample_interval must be at least 200ms".to_string());
        }
        if self.refresh_interval < Duration::from_millis(500) {
            errs.push("refresh_interval must be at least 500ms".to_string());
        }
        if errs.is_empty() { Ok(()) } else { Err(errs) }
    }

    /// A config with the defaults, serving on `address`.
    pub fn new(address: SocketAddr) -> ConsoleConfig {
        ConsoleConfig {
            address,
            users: default_users(),
            cert: None,
            key: None,
            state_dir: default_state_dir(),
            session_ttl: default_session_ttl(),
            max_failures: default_max_failures(),
            lockout: default_lockout(),
            sign_in_rate: default_rate(),
            sample_interval: default_sample(),
            refresh_interval: default_refresh(),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_checks() {
        let c: ConsoleConfig = toml::from_str("address = \"127.0.0.1:9443\"").unwrap();
        assert_eq!(c, ConsoleConfig::new("127.0.0.1:9443".parse().unwrap()));
        assert!(c.validate().is_ok());
        let bad: ConsoleConfig =
            toml::from_str("address = \"127.0.0.1:9443\"\ncert = \"/x.pem\"\nmax_failures = 0")
                .unwrap();
        assert_eq!(bad.validate().unwrap_err().len(), 2);
        assert!(toml::from_str::<ConsoleConfig>("address = \"127.0.0.1:1\"\nport = 1").is_err());
    }
}
