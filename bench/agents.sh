#!/usr/bin/env bash
# A cloud of real agents on loopback: time until every agent sees every member alive, then
# resident memory, CPU and network bytes per agent while idle. For docs/BENCHMARKS.md.
# Usage: bench/agents.sh [AGENTS] [IDLE_SECONDS]   (defaults 50 and 60; about 2 minutes)
set -euo pipefail
cd "$(dirname "$0")/.."
nubo="${NUBO:-target/release/nubo}"
[ -n "${NUBO:-}" ] || cargo build --release -p nubo
exec python3 bench/agents.py "$nubo" "${1:-50}" "${2:-60}"
