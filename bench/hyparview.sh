#!/usr/bin/env bash
# The HyParView paper's experiment at 10,000 and 100,000 nodes, for docs/BENCHMARKS.md.
# Usage: bench/hyparview.sh [OUTPUT_DIR]   (one run at a time: each uses two cores)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-target/bench/hyparview}"
mkdir -p "$out"
cargo build --release -p nubo-sim
sim=target/release/nubo-sim

run() {
  local name="$1"; shift
  /usr/bin/time -v "$sim" hyparview "$@" --json >"$out/$name.txt" 2>"$out/$name.time"
  tail -n 1 "$out/$name.txt" >"$out/$name.json"
  echo "$name: $(cat "$out/$name.json")"
}

for fail in 0 0.5 0.8 0.9 0.95; do
  run "n10000-fail$fail" --nodes 10000 --fail "$fail" --seed 1
done
run "n100000-fail0" --nodes 100000 --broadcasts 100 --fail 0 --seed 1
run "n100000-fail0.8" --nodes 100000 --broadcasts 100 --fail 0.8 --seed 1
run "n100000-fail0.95" --nodes 100000 --broadcasts 100 --fail 0.95 --seed 1
