#!/usr/bin/env bash
# Rolling update of a 10-replica HTTP service over 10 real agents on loopback: total update
# time (from `nubo deploy` until it returns, every replica ready at the new version) and the
# longest gap with no replica answering, polled every 50 ms through every address the
# service was seen at. Run once with the default [update] settings (min_healthy_time 10s,
# like Nomad's) and once with min_healthy_time 1s. For docs/BENCHMARKS.md. Needs python3.
# Usage: bench/update.sh [REPLICAS]   (default 10; about 4 minutes)
set -euo pipefail
cd "$(dirname "$0")/.."
nubo="${NUBO:-target/release/nubo}"
[ -n "${NUBO:-}" ] || cargo build --release -p nubo
exec python3 bench/update.py "$nubo" "${1:-10}"
