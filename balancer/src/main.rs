//! The `balancer` command.
#![deny(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use balancer::{
    config,
    control::{daemon, operator::Verb},
    dataplane::Dataplane,
    host::net,
};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "balancer", version, about = "XDP layer-4 load balancer")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the controller in the foreground (systemd runs this).
    Run {
        /// Config file.
        #[arg(long, short, default_value = "/etc/balancer/balancer.toml")]
        config: PathBuf,
        /// Pin directory (overrides [dataplane] pin_path).
        #[arg(long)]
        pin_path: Option<PathBuf>,
    },
    /// Validate a config file without touching the system.
    Check {
        /// Config file.
        #[arg(long, short, default_value = "/etc/balancer/balancer.toml")]
        config: PathBuf,
    },
    /// Remove the dataplane: detach the program, unpin maps, take VIPs off the interface.
    Teardown {
        /// Config file (for the pin path and VIPs).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Pin directory.
        #[arg(long)]
        pin_path: Option<PathBuf>,
    },
    /// Print dataplane counters read from the pinned maps.
    Counters {
        /// Pin directory.
        #[arg(long, default_value = config::DEFAULT_PIN_PATH)]
        pin_path: PathBuf,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Attach a bare XDP_PASS program (the peer end of a veth in a lab) and pin its link.
    #[command(hide = true)]
    XdpPass {
        /// Interface.
        #[arg(long)]
        interface: String,
        /// Where to pin the link (remove the file to detach).
        #[arg(long)]
        pin: PathBuf,
    },
    /// Show services, backends, health, weights, the active listener and counters.
    Status {
        /// Print the control API's JSON instead of the table.
        #[arg(long)]
        json: bool,
        /// Control socket.
        #[arg(long, default_value = config::DEFAULT_SOCKET)]
        socket: PathBuf,
    },
    /// Send no new flows to a backend; its established flows continue.
    Drain {
        /// Service name.
        service: String,
        /// Backend address ("10.77.0.11:7002") or IP.
        backend: String,
        /// Control socket.
        #[arg(long, default_value = config::DEFAULT_SOCKET)]
        socket: PathBuf,
    },
    /// Take a backend out of service and reset its flows at once.
    Disable {
        /// Service name.
        service: String,
        /// Backend address ("10.77.0.11:7002") or IP.
        backend: String,
        /// Control socket.
        #[arg(long, default_value = config::DEFAULT_SOCKET)]
        socket: PathBuf,
    },
    /// Put a drained or disabled backend back in service (subject to its health check).
    Enable {
        /// Service name.
        service: String,
        /// Backend address ("10.77.0.11:7002") or IP.
        backend: String,
        /// Control socket.
        #[arg(long, default_value = config::DEFAULT_SOCKET)]
        socket: PathBuf,
    },
    /// Re-read the config file (as SIGHUP does); a bad file is refused with its errors.
    Reload {
        /// Control socket.
        #[arg(long, default_value = config::DEFAULT_SOCKET)]
        socket: PathBuf,
    },
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("BALANCER_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // No colour codes into the journal or a log file: only on a terminal.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .init();
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging();
    match cli.cmd {
        Cmd::Run { config, pin_path } => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            rt.block_on(daemon::run(daemon::RunOptions { config, pin_path }))
        }
        Cmd::Check { config } => match config::load(&config) {
            Ok(v) => {
                // What `run` and `reload` would refuse on this host.
                if let Err(e) = v.check_host() {
                    eprintln!("{}: {e}", config.display());
                    std::process::exit(1);
                }
                println!("{}: ok ({} services)", config.display(), v.services.len());
                Ok(())
            }
            Err(e) => {
                eprintln!("{e}");
                std::process::exit(1);
            }
        },
        Cmd::Teardown { config, pin_path } => {
            let cfg = match &config {
                Some(c) => Some(config::load(c).map_err(|e| anyhow::anyhow!("{e}"))?),
                None => None,
            };
            let pin = pin_path
                .or_else(|| cfg.as_ref().map(|c| c.pin_path.clone()))
                .unwrap_or_else(|| PathBuf::from(config::DEFAULT_PIN_PATH));
            if let Some(c) = &cfg {
                for s in &c.services {
                    for i in &c.interfaces {
                        net::remove_vip(i, s.vip.ip())?;
                    }
                }
            }
            balancer::dataplane::remove_pins(&pin)?;
            println!("dataplane at {} removed", pin.display());
            Ok(())
        }
        Cmd::Counters { pin_path, json } => {
            let dp = Dataplane::open_pinned(&pin_path)?;
            let report = balancer::dataplane::counters::counters(&dp);
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", balancer::dataplane::counters::counters_text(&report));
            }
            Ok(())
        }
        Cmd::XdpPass { interface, pin } => balancer::dataplane::attach_pass(&interface, &pin),
        Cmd::Status { json, socket } => std::process::exit(balancer::api::cli(
            &socket,
            &balancer::api::Command::Status { json },
        )),
        Cmd::Drain {
            service,
            backend,
            socket,
        } => std::process::exit(balancer::api::cli(
            &socket,
            &balancer::api::Command::Backend {
                verb: Verb::Drain,
                service,
                backend,
            },
        )),
        Cmd::Disable {
            service,
            backend,
            socket,
        } => std::process::exit(balancer::api::cli(
            &socket,
            &balancer::api::Command::Backend {
                verb: Verb::Disable,
                service,
                backend,
            },
        )),
        Cmd::Enable {
            service,
            backend,
            socket,
        } => std::process::exit(balancer::api::cli(
            &socket,
            &balancer::api::Command::Backend {
                verb: Verb::Enable,
                service,
                backend,
            },
        )),
        Cmd::Reload { socket } => {
            std::process::exit(balancer::api::cli(&socket, &balancer::api::Command::Reload))
        }
    }
}
