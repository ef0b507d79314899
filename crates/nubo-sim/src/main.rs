//! `nubo-sim`: experiments and randomized runs over the nubo protocol core.

use clap::{Parser, Subcommand};
use nubo_sim::experiments::hyparview;

/// Deterministic simulator of a nubo cloud. Every run is reproducible from its --seed.
#[derive(Parser)]
#[command(name = "nubo-sim", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Kill a fraction of the nodes of a warmed-up overlay, then measure broadcast reliability.
    ///
    /// Example: nubo-sim hyparview --nodes 10000 --fail 0.8 --seed 1 --json
    Hyparview(hyparview::HyparviewArgs),
}

fn main() {
    let cli = Cli::parse();
    match cli.command {
        Command::Hyparview(args) => hyparview::run(&args).print(args.json),
    }
}
