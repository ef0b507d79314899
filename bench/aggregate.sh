#!/usr/bin/env bash
# Push-pull aggregation at 100,000 nodes, for docs/BENCHMARKS.md.
# Usage: bench/aggregate.sh [OUTPUT_DIR]   (two runs at a time; about 30 minutes on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-target/bench/aggregate}"
mkdir -p "$out"
cargo build --release -p nubo-sim
sim=target/release/nubo-sim

run() {
  local name="$1"; shift
  /usr/bin/time -v "$sim" aggregate "$@" --json >"$out/$name.txt" 2>"$out/$name.time"
  tail -n 1 "$out/$name.txt" >"$out/$name.json"
  echo "$name: $(cat "$out/$name.json")"
}

run n100000 --nodes 100000 --seed 1 &
run n100000-crash0.5 --nodes 100000 --seed 1 --crash 0.5 --crash-at-cycle 5 &
wait
run n100000-loss0.2 --nodes 100000 --seed 1 --loss 0.2 &
run n10000-churn0.001 --nodes 10000 --seed 1 --churn 0.001 &
wait
