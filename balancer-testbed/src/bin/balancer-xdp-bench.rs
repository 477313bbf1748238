//! `balancer-xdp-bench`: ns/packet of the XDP program through BPF_PROG_TEST_RUN beside a bare
//! XDP_PASS program, and Maglev build times (`cargo xtask bench` runs it).

use anyhow::Context as _;
use clap::Parser;

/// Measure ns/packet of the XDP program through BPF_PROG_TEST_RUN (root).
#[derive(Parser)]
#[command(name = "balancer-xdp-bench")]
struct Cli {
    /// Calls per case (repeat = 1 each).
    #[arg(long, default_value_t = 1_000_000)]
    calls: u32,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let table = balancer_testbed::bench::xdp(cli.calls).context("bench-xdp")?;
    print!("{table}");
    Ok(())
}
