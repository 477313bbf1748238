//! Runs the layer-7 proxy alone from the `[l7]` section of a TOML file.
//!
//! `cargo run -p balancer-l7 --example l7-proxy -- balancer-l7/examples/l7.toml`
//! SIGHUP reloads the file; Ctrl-C drains for up to 10 s and stops.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use balancer_l7::{L7, L7Config};
use tokio::signal::unix::{SignalKind, signal};

#[derive(serde::Deserialize)]
struct File {
    l7: L7Config,
}

fn load(path: &str) -> anyhow::Result<L7Config> {
    let text = std::fs::read_to_string(path)?;
    let file: File = toml::from_str(&text)?;
    Ok(file.l7)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let path = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "balancer-l7/examples/l7.toml".into());
    let l7 = L7::start(load(&path)?).await?;
    let mut hup = signal(SignalKind::hangup())?;
    loop {
        tokio::select! {
            _ = hup.recv() => match load(&path) {
                Ok(cfg) => if let Err(e) = l7.reload(cfg).await {
                    tracing::error!("reload refused: {e:#}");
                },
                Err(e) => tracing::error!("reload refused: {e:#}"),
            },
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    let m = l7.metrics();
    tracing::info!(?m, "stopping");
    l7.shutdown(Duration::from_secs(10)).await;
    Ok(())
}
