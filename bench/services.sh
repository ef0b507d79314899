#!/usr/bin/env bash
# Services on real agents: recovery time from kill -9 of a host to a healthy replacement
# (median and max over TRIALS), and time to deploy 100 services x 2 replicas on 10 agents
# until all are healthy. For docs/BENCHMARKS.md. Needs python3 (the services run
# python3 -m http.server).
# Usage: bench/services.sh [TRIALS] [SERVICES]   (defaults 10 and 100; about 5 minutes)
set -euo pipefail
cd "$(dirname "$0")/.."
nubo="${NUBO:-target/release/nubo}"
[ -n "${NUBO:-}" ] || cargo build --release -p nubo
exec python3 bench/services.py "$nubo" "${1:-10}" "${2:-100}"
