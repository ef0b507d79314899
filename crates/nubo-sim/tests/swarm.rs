//! Swarm runs in CI: 100 seeds of the fast profile must pass, and a run is exactly
//! reproducible from its seed.

use nubo_sim::experiments::fuzz::{FuzzArgs, Profile, Scenario, run, run_scenario};

#[test]
fn one_hundred_fast_seeds_pass() {
    let args = FuzzArgs {
        seed: 1,
        runs: 100,
        profile: Profile::Fast,
        verbose: false,
        json: false,
    };
    let (report, passed) = run(&args);
    assert!(
        passed,
        "failing seeds: {}",
        report.to_json()["failing_seeds"]
    );
}

#[test]
fn a_seed_replays_exactly() {
    for seed in [7, 4242] {
        let scenario = Scenario::from_seed(seed, Profile::Fast);
        let first = run_scenario(&scenario, false);
        let second = run_scenario(&Scenario::from_seed(seed, Profile::Fast), false);
        assert_eq!(first.events, second.events, "seed {seed}");
        assert_eq!(first.faults, second.faults, "seed {seed}");
        assert_eq!(first.broadcasts, second.broadcasts, "seed {seed}");
        assert_eq!(first.violations, second.violations, "seed {seed}");
    }
}

#[test]
fn different_seeds_explore_different_runs() {
    let a = run_scenario(&Scenario::from_seed(1, Profile::Fast), false);
    let b = run_scenario(&Scenario::from_seed(2, Profile::Fast), false);
    assert_ne!(a.events, b.events);
}

/// Seeds that once failed, each for a reason fixed since: 1047 left the overlay in two
/// complete graphs of four nodes, every active view full, for good after healing.
const ONCE_FAILED: &[u64] = &[1047];

#[test]
fn seeds_that_once_failed_pass() {
    for &seed in ONCE_FAILED {
        let outcome = run_scenario(&Scenario::from_seed(seed, Profile::Fast), false);
        assert!(
            outcome.violations.is_empty(),
            "seed {seed}: {:?}",
            outcome.violations
        );
    }
}
