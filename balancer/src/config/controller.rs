//! `[controller]`: the control socket and the metrics endpoint.

use std::path::PathBuf;

use serde::Deserialize;
use toml::Spanned;

use super::DEFAULT_SOCKET;

/// `[controller]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControllerSection {
    /// Unix control socket (root only).
    #[serde(default = "default_socket")]
    pub socket: PathBuf,
    /// Prometheus metrics listen address, e.g. "127.0.0.1:9550"; off when absent.
    pub metrics: Option<Spanned<String>>,
}

fn default_socket() -> PathBuf {
    PathBuf::from(DEFAULT_SOCKET)
}

impl Default for ControllerSection {
    fn default() -> Self {
        ControllerSection {
            socket: default_socket(),
            metrics: None,
        }
    }
}
