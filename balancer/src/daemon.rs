//! `balancer run`: load, adopt or attach, apply the config, then serve signals.

use std::path::PathBuf;

use anyhow::Context as _;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info};

use crate::{
    config,
    dataplane::{Dataplane, LoadOptions},
    net,
    reconcile::State,
};

/// Options of `balancer run`.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Config file.
    pub config: PathBuf,
    /// Pin directory override.
    pub pin_path: Option<PathBuf>,
}

/// Runs until SIGTERM / SIGINT. The dataplane keeps forwarding after the process exits
/// (everything is pinned); `balancer teardown` removes it.
pub async fn run(opts: RunOptions) -> anyhow::Result<()> {
    let cfg = config::load(&opts.config).map_err(|e| anyhow::anyhow!("{e}"))?;
    let pin = opts.pin_path.clone().unwrap_or_else(|| cfg.raw.dataplane.pin_path.clone());
    let (eph_lo, eph_hi) = net::ephemeral_ports()?;
    let [lo, hi] = *cfg.raw.dataplane.snat_ports.get_ref();
    if lo <= eph_hi && eph_lo <= hi {
        anyhow::bail!(
            "snat_ports {lo}-{hi} overlap the kernel's ephemeral ports {eph_lo}-{eph_hi} (net.ipv4.ip_local_port_range): choose a disjoint range"
        );
    }
    let mut dp = Dataplane::load(&LoadOptions {
        pin_path: Some(pin.clone()),
        flow_entries: cfg.raw.dataplane.flow_table_size,
    })?;
    if dp.adopted {
        info!(pin_path = %pin.display(), "adopted pinned maps: established flows continue");
    }
    let mut state = State::apply_config(&mut dp, &cfg, None)?;
    for iface in &cfg.interfaces {
        net::enable_forwarding(iface)?;
        dp.attach(iface, cfg.raw.dataplane.xdp_mode)
            .with_context(|| format!("attaching to {iface}"))?;
    }
    info!(
        services = state.services.len(),
        interfaces = ?cfg.interfaces,
        "balancer ready"
    );
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => {
                match config::load(&opts.config) {
                    Err(e) => error!(errors = %e, "reload refused: the running config keeps serving"),
                    Ok(new) => match State::apply_config(&mut dp, &new, Some(state.clone())) {
                        Ok(s) => {
                            state = s;
                            info!("config reloaded");
                        }
                        Err(e) => error!(error = %e, "reload failed"),
                    },
                }
            }
        }
    }
    info!("stopping: the dataplane keeps forwarding (balancer teardown removes it)");
    Ok(())
}
