//! Experiments, one per subcommand of `nubo-sim`.

pub mod fuzz;
pub mod hyparview;
