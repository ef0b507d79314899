//! Experiments, one per subcommand of `nubo-sim`.

pub mod aggregate;
pub mod cloud;
pub mod dht;
pub mod fuzz;
pub mod hyparview;
pub mod ring;
pub mod slicing;
