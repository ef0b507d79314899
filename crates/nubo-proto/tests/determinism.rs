//! Architecture invariant: the protocol core is deterministic. It reads no clock, draws no OS
//! randomness, performs no I/O and iterates no hash map. Clippy's `disallowed-methods` and
//! `disallowed-types` (see `clippy.toml`) enforce this on types; this test also checks the
//! source text, so that a new module or a macro cannot slip past.

use std::path::Path;

const FORBIDDEN: &[(&str, &str)] = &[
    ("Instant::now", "reads the clock"),
    ("SystemTime", "reads the clock"),
    ("thread_rng", "draws OS randomness"),
    ("rand::rng(", "draws OS randomness"),
    ("getrandom", "draws OS randomness"),
    ("OsRng", "draws OS randomness"),
    ("HashMap", "iterates in a random order"),
    ("HashSet", "iterates in a random order"),
    ("std::fs", "performs I/O"),
    ("std::net::", "performs I/O (use core::net for addresses)"),
    ("std::io", "performs I/O"),
    ("std::env", "reads the environment"),
    ("std::thread", "spawns or sleeps"),
    ("tokio", "is the runtime's business, not the core's"),
    ("println!", "writes to stdout"),
    ("eprintln!", "writes to stderr"),
];

fn check_dir(dir: &Path, findings: &mut Vec<String>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            check_dir(&path, findings);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let text = std::fs::read_to_string(&path).unwrap();
            for (number, line) in text.lines().enumerate() {
                let code = line.split("//").next().unwrap_or("");
                for (pattern, why) in FORBIDDEN {
                    if code.contains(pattern) {
                        findings.push(format!(
                            "{}:{}: `{pattern}` {why}",
                            path.display(),
                            number + 1
                        ));
                    }
                }
            }
        }
    }
}

#[test]
fn core_source_uses_no_clock_randomness_io_or_hash_iteration() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut findings = Vec::new();
    check_dir(&src, &mut findings);
    assert!(
        findings.is_empty(),
        "nondeterminism in nubo-proto:\n{}",
        findings.join("\n")
    );
}

#[test]
fn core_depends_on_nothing_that_does_io() {
    let manifest =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml")).unwrap();
    for crate_name in [
        "tokio",
        "quinn",
        "rand",
        "getrandom",
        "redb",
        "hyper",
        "axum",
    ] {
        assert!(
            !manifest.contains(&format!("\n{crate_name}")),
            "nubo-proto must not depend on {crate_name}"
        );
    }
}
