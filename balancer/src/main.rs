//! The `balancer` command.
#![deny(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use anyhow::Context as _;

use balancer::{
    config,
    control::{
        daemon,
        operator::{BgpVerb, Verb},
    },
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
    /// Announce or withdraw this balancer's VIPs through BIRD (ECMP with BGP, `[bgp]`).
    Bgp {
        #[command(subcommand)]
        cmd: BgpCmd,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell) to stdout.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Write the man pages (balancer.1 and one per command) into a directory.
    #[command(hide = true)]
    Man {
        /// Output directory.
        dir: PathBuf,
    },
    /// Translate an F5, NetScaler or IIS ARR configuration into a balancer.toml
    ///
    /// The file goes to stdout (or --output); the report of what was translated,
    /// approximated and not translated goes to stderr. Nothing is written for a bad input.
    Import {
        /// The product the file comes from.
        product: ImportFrom,
        /// bigip.conf, ns.conf or applicationHost.config.
        file: PathBuf,
        /// Write the result here (mode 0600) instead of stdout.
        #[arg(long, short)]
        output: Option<PathBuf>,
        /// Replace the output file if it exists.
        #[arg(long)]
        force: bool,
    },
    /// Manage the web console's users (the `[console] users` file, mode 0600, argon2 hashes).
    User {
        #[command(subcommand)]
        cmd: UserCmd,
    },
    /// An active/standby pair (`[ha]`): keepalived's config, notify and health check.
    Ha {
        #[command(subcommand)]
        cmd: HaCmd,
    },
}

#[derive(Subcommand)]
enum HaCmd {
    /// Print the keepalived.conf for this balancer (VRRPv3, unicast to the peer, every VIP
    /// and SNAT address, tracking the controller).
    KeepalivedConf {
        /// Config file.
        #[arg(long, short, default_value = "/etc/balancer/balancer.toml")]
        config: PathBuf,
        /// This program's path as keepalived should run it (default: this executable).
        #[arg(long)]
        balancer: Option<PathBuf>,
    },
    /// keepalived's notify script: tells the controller its VRRP role.
    Notify {
        /// Control socket.
        #[arg(long, default_value = config::DEFAULT_SOCKET)]
        socket: PathBuf,
        /// What keepalived appends: INSTANCE|GROUP <name> MASTER|BACKUP|FAULT|STOP [priority].
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// keepalived's track script: exits 1 when the controller does not answer.
    Check {
        /// Control socket.
        #[arg(long, default_value = config::DEFAULT_SOCKET)]
        socket: PathBuf,
    },
}

#[derive(Subcommand)]
enum BgpCmd {
    /// Withdraw every VIP (maintenance): the routers stop sending this balancer traffic.
    Withdraw {
        /// Control socket.
        #[arg(long, default_value = config::DEFAULT_SOCKET)]
        socket: PathBuf,
    },
    /// Announce the VIPs again (each while its services have a backend up).
    Announce {
        /// Control socket.
        #[arg(long, default_value = config::DEFAULT_SOCKET)]
        socket: PathBuf,
    },
    /// Print the balancer side of BIRD's config: router id, the routes file, BGP sessions.
    BirdConf {
        /// Config file (its [bgp] section; the defaults without one).
        #[arg(long, short, default_value = "/etc/balancer/balancer.toml")]
        config: PathBuf,
        /// BIRD router id (usually this balancer's own IPv4 address).
        #[arg(long)]
        router_id: std::net::Ipv4Addr,
        /// This balancer's AS number.
        #[arg(long)]
        local_as: u32,
        /// An upstream router's address (repeat for each router; IPv6 ones carry the IPv6 VIPs).
        #[arg(long = "neighbor", required = true)]
        neighbors: Vec<std::net::IpAddr>,
        /// The upstream routers' AS number.
        #[arg(long)]
        neighbor_as: u32,
        /// BGP hold time in seconds: how long a lost balancer stays in the routers' ECMP group.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(3..))]
        hold_time: u16,
    },
}

#[derive(Subcommand)]
enum UserCmd {
    /// Add a user; the password is read from stdin (asked twice on a terminal).
    Add {
        /// User name.
        name: String,
        /// viewer (sees everything) or operator (also drains, disables, enables, reloads).
        #[arg(long, default_value = "viewer", value_parser = ["viewer", "operator"])]
        role: String,
        #[command(flatten)]
        file: UsersFile,
    },
    /// Set a user's password (read from stdin), and its role with --role.
    Passwd {
        /// User name.
        name: String,
        /// New role.
        #[arg(long, value_parser = ["viewer", "operator"])]
        role: Option<String>,
        #[command(flatten)]
        file: UsersFile,
    },
    /// Remove a user; its console sessions end at once.
    Remove {
        /// User name.
        name: String,
        #[command(flatten)]
        file: UsersFile,
    },
    /// List users and roles.
    List {
        #[command(flatten)]
        file: UsersFile,
    },
}

#[derive(clap::Args)]
struct UsersFile {
    /// Config file whose `[console] users` names the users file.
    #[arg(long, short, default_value = "/etc/balancer/balancer.toml")]
    config: PathBuf,
    /// The users file itself (instead of reading the config).
    #[arg(long)]
    users: Option<PathBuf>,
}

impl UsersFile {
    fn path(&self) -> anyhow::Result<PathBuf> {
        if let Some(u) = &self.users {
            return Ok(u.clone());
        }
        let cfg = config::load(&self.config).map_err(|e| anyhow::anyhow!("{e}"))?;
        match &cfg.console {
            Some(c) => Ok(c.users.clone()),
            None => anyhow::bail!(
                "{} has no [console] section: add one or pass --users",
                self.config.display()
            ),
        }
    }
}

/// `balancer user`: edits the users file; a running console sees the change at once.
fn user(cmd: UserCmd) -> anyhow::Result<()> {
    use balancer_console::{EventKind, Role, Users};
    let role = |r: &str| r.parse::<Role>().map_err(|e| anyhow::anyhow!("{e}"));
    let (file, what) = match &cmd {
        UserCmd::Add { name, role, file } => (file, format!("user add {name} ({role})")),
        UserCmd::Passwd { name, file, .. } => (file, format!("user passwd {name}")),
        UserCmd::Remove { name, file } => (file, format!("user remove {name}")),
        UserCmd::List { file } => (file, String::new()),
    };
    let path = file.path()?;
    let mut users = Users::load(&path)?;
    match &cmd {
        UserCmd::List { .. } => {
            for (name, role) in users.list() {
                println!("{name}\t{role}");
            }
            return Ok(());
        }
        UserCmd::Add { name, role: r, .. } => {
            let r = role(r)?;
            let pw = read_password(&format!("Password for {name}: "))?;
            users.add(name, r, &pw)?;
        }
        UserCmd::Passwd { name, role: r, .. } => {
            let r = r.as_deref().map(role).transpose()?;
            let pw = read_password(&format!("New password for {name}: "))?;
            users.passwd(name, &pw, r)?;
        }
        UserCmd::Remove { name, .. } => users.remove(name)?,
    }
    users.save(&path)?;
    let who = format!("uid {}", nix::unistd::getuid());
    balancer::api::audit::record(EventKind::Action, &who, "command line", &what, "ok");
    println!("{what}: saved {}", path.display());
    Ok(())
}

/// Reads a password from stdin: twice and without echo on a terminal, one line otherwise.
fn read_password(prompt: &str) -> anyhow::Result<String> {
    use std::io::{BufRead as _, IsTerminal as _, Write as _};
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        let mut line = String::new();
        stdin.lock().read_line(&mut line)?;
        return Ok(line.trim_end_matches(['\r', '\n']).to_string());
    }
    let ask = |p: &str| -> anyhow::Result<String> {
        use nix::sys::termios::{LocalFlags, SetArg, tcgetattr, tcsetattr};
        eprint!("{p}");
        std::io::stderr().flush()?;
        let stdin = std::io::stdin();
        let old = tcgetattr(&stdin)?;
        let mut quiet = old.clone();
        quiet.local_flags.remove(LocalFlags::ECHO);
        tcsetattr(&stdin, SetArg::TCSANOW, &quiet)?;
        let mut line = String::new();
        let r = stdin.lock().read_line(&mut line);
        tcsetattr(&stdin, SetArg::TCSANOW, &old)?;
        eprintln!();
        r?;
        Ok(line.trim_end_matches(['\r', '\n']).to_string())
    };
    let a = ask(prompt)?;
    let b = ask("Again: ")?;
    anyhow::ensure!(a == b, "the passwords differ");
    Ok(a)
}

/// Products `balancer import` reads.
#[derive(Clone, Copy, clap::ValueEnum)]
enum ImportFrom {
    /// F5 BIG-IP tmsh bigip.conf.
    F5,
    /// Citrix ADC / NetScaler ns.conf.
    Netscaler,
    /// IIS Application Request Routing applicationHost.config.
    Arr,
}

/// `balancer import`: nothing is written unless the input translates and the result validates.
fn import(
    from: ImportFrom,
    file: &std::path::Path,
    output: Option<&std::path::Path>,
    force: bool,
) -> anyhow::Result<()> {
    use std::io::Write as _;
    let product = match from {
        ImportFrom::F5 => balancer_import::Product::F5,
        ImportFrom::Netscaler => balancer_import::Product::NetScaler,
        ImportFrom::Arr => balancer_import::Product::Arr,
    };
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let name = file.display().to_string();
    let out = match balancer_import::import(product, &text, &name) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1);
        }
    };
    // The importer's output must pass the same validation as any hand-written file.
    if let Err(e) = config::parse(
        &out.toml,
        output.unwrap_or(std::path::Path::new("<output>")),
    ) {
        anyhow::bail!("the translation of {name} does not validate (an importer bug):\n{e}");
    }
    eprint!("{}", out.report.render(&name));
    match output {
        None => std::io::stdout().write_all(out.toml.as_bytes())?,
        Some(path) => {
            if path.exists() && !force {
                anyhow::bail!("{} exists (use --force to replace it)", path.display());
            }
            // Written beside the target and renamed: a reader never sees half a file.
            let tmp = path.with_extension("toml.tmp");
            {
                use std::os::unix::fs::OpenOptionsExt as _;
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&tmp)
                    .with_context(|| format!("creating {}", tmp.display()))?;
                f.write_all(out.toml.as_bytes())?;
                f.sync_all()?;
            }
            std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
            eprintln!("wrote {}", path.display());
        }
    }
    Ok(())
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
                for w in v.warnings() {
                    eprintln!("{}: warning: {w}", config.display());
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
        Cmd::XdpPass { interface, pin } => Ok(balancer::dataplane::attach_pass(&interface, &pin)?),
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
        Cmd::Bgp {
            cmd: BgpCmd::Withdraw { socket },
        } => std::process::exit(balancer::api::cli(
            &socket,
            &balancer::api::Command::Bgp {
                verb: BgpVerb::Withdraw,
            },
        )),
        Cmd::Bgp {
            cmd: BgpCmd::Announce { socket },
        } => std::process::exit(balancer::api::cli(
            &socket,
            &balancer::api::Command::Bgp {
                verb: BgpVerb::Announce,
            },
        )),
        Cmd::Bgp {
            cmd:
                BgpCmd::BirdConf {
                    config,
                    router_id,
                    local_as,
                    neighbors,
                    neighbor_as,
                    hold_time,
                },
        } => {
            let cfg = config::load(&config).map_err(|e| anyhow::anyhow!("{e}"))?;
            let bgp = cfg.bgp.unwrap_or_default();
            print!(
                "{}",
                balancer::host::bird::bird_conf(
                    &bgp,
                    &balancer::host::bird::BirdConfOptions {
                        router_id,
                        local_as,
                        neighbors,
                        neighbor_as,
                        hold_time,
                    },
                )
            );
            Ok(())
        }
        Cmd::Completions { shell } => {
            use clap::CommandFactory as _;
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "balancer",
                &mut std::io::stdout(),
            );
            Ok(())
        }
        Cmd::Man { dir } => {
            use clap::CommandFactory as _;
            clap_mangen::generate_to(Cli::command(), &dir)
                .with_context(|| format!("writing man pages to {}", dir.display()))
        }
        Cmd::Import {
            product,
            file,
            output,
            force,
        } => import(product, &file, output.as_deref(), force),
        Cmd::User { cmd } => user(cmd),
        Cmd::Ha { cmd } => ha(cmd),
    }
}

fn ha(cmd: HaCmd) -> anyhow::Result<()> {
    match cmd {
        HaCmd::KeepalivedConf {
            config: path,
            balancer,
        } => {
            let cfg = config::load(&path).map_err(|e| anyhow::anyhow!("{e}"))?;
            let exe = match balancer {
                Some(b) => b,
                None => std::env::current_exe().context("finding this program's path")?,
            };
            let path = std::fs::canonicalize(&path).unwrap_or(path);
            match balancer::host::keepalived::render(&cfg, &exe, &path) {
                Some(text) => {
                    print!("{text}");
                    Ok(())
                }
                None => anyhow::bail!("{}: no [ha] section", path.display()),
            }
        }
        HaCmd::Notify { socket, args } => {
            let role = balancer::host::keepalived::role_of_notify(&args)?;
            // Recorded first: a controller whose socket is not up yet (it is starting) takes
            // the role from the file.
            let file = balancer::control::ha::role_file(&socket);
            if let Err(e) = balancer::control::ha::save_role(&file, role) {
                eprintln!(
                    "balancer: cannot record the role in {}: {e}",
                    file.display()
                );
            }
            std::process::exit(balancer::api::cli(
                &socket,
                &balancer::api::Command::HaRole(role),
            ))
        }
        HaCmd::Check { socket } => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let r = rt.block_on(async {
                tokio::time::timeout(
                    std::time::Duration::from_millis(900),
                    balancer::api::call(&socket, http::Method::GET, "/v1/status"),
                )
                .await
            });
            match r {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => {
                    eprintln!("balancer: {}", balancer::api::chain(&e));
                    std::process::exit(1)
                }
                Err(_) => {
                    eprintln!("balancer: no status within 900 ms");
                    std::process::exit(1)
                }
            }
        }
    }
}
