#!/usr/bin/env bash
# Cycles for the ring to form from a random overlay, 2^10 to 2^16 nodes, for docs/BENCHMARKS.md.
# Usage: bench/ring.sh [OUTPUT_DIR]   (one run at a time; about 15 minutes on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-target/bench/ring}"
mkdir -p "$out"
sim="${NUBO_SIM:-target/release/nubo-sim}"
[ -n "${NUBO_SIM:-}" ] || cargo build --release -p nubo-sim

for exp in 10 11 12 13 14 15 16; do
  nodes=$((1 << exp))
  /usr/bin/time -v "$sim" ring --nodes "$nodes" --seed 1 --json >"$out/n$nodes.txt" 2>"$out/n$nodes.time"
  tail -n 1 "$out/n$nodes.txt" >"$out/n$nodes.json"
  echo "2^$exp: $(cat "$out/n$nodes.json") $(grep 'Maximum resident' "$out/n$nodes.time")"
done
