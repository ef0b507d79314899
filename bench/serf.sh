#!/usr/bin/env bash
# nubo and Serf side by side on loopback: convergence, idle bytes/CPU/RSS per agent and time
# until all see a kill -9, for clouds of 50 and 100 agents of each, in interleaved rounds.
# Serf comes from Debian's package, installed here if missing. For docs/BENCHMARKS.md.
# Usage: bench/serf.sh [SIZES] [IDLE_SECONDS] [ROUNDS]   (defaults "50,100", 60, 2)
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v serf >/dev/null; then
  apt-get install -y -q serf >/dev/null 2>&1 \
    || (apt-get update -q >/dev/null && apt-get install -y -q serf >/dev/null)
fi
nubo="${NUBO:-target/release/nubo}"
[ -n "${NUBO:-}" ] || cargo build --release -p nubo
# Many agents, each with sockets and files.
ulimit -n 65536 2>/dev/null || true
exec python3 bench/serf.py "$nubo" "$(command -v serf)" "${1:-50,100}" "${2:-60}" "${3:-2}"
