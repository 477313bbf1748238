//! `cargo xtask <command>`: set-up, build, tests, demo and benches of the balancer.

mod bench;
mod cmd;
mod deb;
mod demo;
mod demo_pair;
mod install;
mod setup;
mod sigint;

use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

/// Project tasks (run as root: they install packages and build network namespaces).
#[derive(Debug, Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Install what is missing: Debian packages, nightly rust-src, bpf-linker (idempotent).
    Setup,
    /// Set up if needed, then build the balancer (eBPF object included) in release.
    Build,
    /// Set up, build, then run every test of the workspace (unit, BPF test-run, namespace labs).
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter, `-- --nocapture`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Set up, build, then run the demo lab: a client, the balancer and three backends.
    Demo {
        /// Use the release binaries already built instead of building first.
        #[arg(long)]
        no_build: bool,
        /// After the steps, keep the lab and its web console up until Ctrl-C.
        #[arg(long)]
        console: bool,
    },
    /// Set up, build, then measure throughput and connection rate, and XDP ns/packet.
    Bench(bench::Options),
    /// Build in release, then install the binary, the systemd unit, the default config
    /// (never over an existing one) and the sysctl.d file; rate the unit's exposure.
    Install(install::Options),
    /// Build balancer_<version>_amd64.deb with dpkg-deb: binary, unit, conffile, sysctl
    /// drop-in, man pages, completions (`--lintian` checks it).
    Deb(deb::Options),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli.task) {
        Ok(()) => ExitCode::SUCCESS,
        Err(_) if sigint::interrupted() => {
            eprintln!("xtask: interrupted; the lab was cleaned up");
            ExitCode::from(130)
        }
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(task: Task) -> Result<()> {
    match task {
        Task::Setup => setup::setup(),
        Task::Build => {
            setup::setup()?;
            cmd::build_release(&["balancer"])
        }
        Task::Test { args } => {
            setup::setup()?;
            cmd::build_release(&["balancer", "balancer-tests", "balancer-testbed"])?;
            cmd::test(&args)
        }
        Task::Demo { no_build, console } => {
            sigint::install()?;
            setup::setup()?;
            build_for_lab(no_build)?;
            demo::run(console)
        }
        Task::Bench(opts) => {
            sigint::install()?;
            setup::setup()?;
            build_for_lab(opts.no_build)?;
            bench::run(&opts)
        }
        Task::Install(opts) => install::install(&opts),
        Task::Deb(opts) => deb::build(&opts).map(|_| ()),
    }
}

/// The balancer and the lab's tools in release, unless told to use what is built.
fn build_for_lab(no_build: bool) -> Result<()> {
    if no_build {
        cmd::point_lab_at_release();
        Ok(())
    } else {
        cmd::build_release(&["balancer", "balancer-tests", "balancer-testbed"])
    }
}
