//! `nubo-sim`: experiments and randomized runs over the nubo protocol core.

use clap::{Parser, Subcommand};
use std::process::ExitCode;

use nubo_sim::experiments::{aggregate, cloud, dht, fuzz, hyparview, ring, slicing};

/// Large simulations allocate and free millions of small message buffers per second across
/// gigabytes of node state, which is touched at random: mimalloc serves the small sizes from
/// per-thread pages and backs its arenas with transparent huge pages, which cuts both the
/// allocator's share of the time and the misses of the address translation (about a tenth of
/// the wall time of a 100,000-node run; docs/BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    /// Push-pull aggregation: convergence per cycle and accuracy of the size estimate.
    ///
    /// Example: nubo-sim aggregate --nodes 100000 --seed 1 --json
    Aggregate(aggregate::AggregateArgs),
    /// Ordered slicing: how many nodes misreport their slice, with churn.
    ///
    /// Example: nubo-sim slicing --nodes 10000 --slices 20 --churn 0.001 --cycles 200 --json
    Slicing(slicing::SlicingArgs),
    /// Build the ring from a random overlay: cycles until every successor and finger is right.
    ///
    /// Example: nubo-sim ring --nodes 65536 --seed 1 --json
    Ring(ring::RingArgs),
    /// The replicated key-value store: lookup hops, keys lost to a mass crash, reads after
    /// repair and during churn.
    ///
    /// Example: nubo-sim dht --nodes 16384 --keys-per-node 100 --fail 0.2 --replicas 3 --json
    Dht(dht::DhtArgs),
    /// The whole node with services: deploy, kill a fraction, churn, partition; traffic,
    /// memory, time to agree on the placement, instances missing or doubled.
    ///
    /// Example: nubo-sim cloud --nodes 20000 --services 300 --fail 0.1 --seed 1 --json
    Cloud(cloud::CloudArgs),
    /// Randomized runs with faults and invariant checks; every option derives from the seed.
    ///
    /// Example: nubo-sim fuzz --seed 1 --runs 100
    /// A failing run prints its seed; `nubo-sim fuzz --seed S --runs 1 --verbose` replays it.
    Fuzz(fuzz::FuzzArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Hyparview(args) => hyparview::run(&args).print(args.json),
        Command::Aggregate(args) => aggregate::run(&args).print(args.json),
        Command::Slicing(args) => slicing::run(&args).print(args.json),
        Command::Ring(args) => ring::run(&args).print(args.json),
        Command::Cloud(args) => cloud::run(&args).print(args.json),
        Command::Dht(args) => dht::run(&args).print(args.json),
        Command::Fuzz(args) => {
            let (report, passed) = fuzz::run(&args);
            report.print(args.json);
            if !passed {
                return ExitCode::FAILURE;
            }
        }
    }
    ExitCode::SUCCESS
}
