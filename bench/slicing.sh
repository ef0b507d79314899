#!/usr/bin/env bash
# Ordered slicing under churn, for docs/BENCHMARKS.md.
# Usage: bench/slicing.sh [OUTPUT_DIR]   (two runs at a time; about 30 minutes on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-target/bench/slicing}"
mkdir -p "$out"
cargo build --release -p nubo-sim
sim=target/release/nubo-sim

run() {
  local name="$1"; shift
  /usr/bin/time -v "$sim" slicing "$@" --json >"$out/$name.txt" 2>"$out/$name.time"
  tail -n 1 "$out/$name.txt" >"$out/$name.json"
  echo "$name: $(cat "$out/$name.json")"
}

run n10000 --nodes 10000 --slices 20 --churn 0.001 --cycles 200 --seed 1 &
run n3000 --nodes 3000 --slices 20 --churn 0.001 --cycles 200 --seed 1 &
wait
run n10000-correlated --nodes 10000 --slices 20 --churn 0.001 --correlated-churn --cycles 200 --seed 1 &
run n3000-drift --nodes 3000 --slices 20 --churn 0.001 --drift 0.01 --cycles 200 --seed 1 &
wait
