//! The nubo simulator: runs many real `nubo-proto` nodes on a simulated network.
//!
//! Everything derives from one seed, so every run, failing or not, can be replayed exactly.
//! Experiments are subcommands of the `nubo-sim` binary; each prints a table and, with
//! `--json`, one JSON object as its last line.

pub mod engine;
pub mod experiments;
pub mod kv_tracker;
pub mod overlay;
pub mod queue;
pub mod report;
pub mod runner;
pub mod tracker;
pub mod workload;
