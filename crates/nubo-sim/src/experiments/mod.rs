//! Experiments, one per subcommand of `nubo-sim`.

pub mod hyparview;
