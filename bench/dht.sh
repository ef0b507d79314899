#!/usr/bin/env bash
# The replicated key-value store at 16,384 nodes, for docs/BENCHMARKS.md.
# Usage: bench/dht.sh [OUTPUT_DIR]   (one run at a time; about 30 minutes on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-target/bench/dht}"
mkdir -p "$out"
sim="${NUBO_SIM:-target/release/nubo-sim}"
[ -n "${NUBO_SIM:-}" ] || cargo build --release -p nubo-sim

run() {
  local name="$1"; shift
  /usr/bin/time -v "$sim" dht "$@" --json >"$out/$name.txt" 2>"$out/$name.time"
  tail -n 1 "$out/$name.txt" >"$out/$name.json"
  echo "$name: $(cat "$out/$name.json") $(grep 'Maximum resident' "$out/$name.time")"
}

run n16384-fail0.2 --nodes 16384 --keys-per-node 100 --fail 0.2 --replicas 3 --seed 1
run n4096-churn --nodes 4096 --keys-per-node 100 --fail 0 --replicas 3 --churn 0.01 --churn-minutes 10 --seed 1
