#!/usr/bin/env bash
# Benchmarks Trellis against bare poem and bare poem-openapi in one run and writes
# tests/bench/RESULTS.md. Needs 2 CPUs (server on CPU 0, wrk on CPU 1); installs wrk, and
# starts PostgreSQL and Redis (scripts/services.sh) for the shared-state and nginx
# scenarios. BENCH_ROUNDS (default 5) and BENCH_DURATION (seconds per run, default 10)
# tune it.
set -euo pipefail
cd "$(dirname "$0")/../.."
if ! command -v wrk >/dev/null 2>&1; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq --no-install-recommends wrk >/dev/null
fi
cargo build --release -p trellis-server -p trellis-bench-baselines
scripts/services.sh install
services_env=$(scripts/services.sh start pg; scripts/services.sh start redis)
trap 'scripts/services.sh stop redis >/dev/null 2>&1; scripts/services.sh stop pg >/dev/null 2>&1 || true' EXIT
env $(echo "$services_env" | grep -E '^TEST_(POSTGRES|REDIS)_URL=' | sort -u) python3 tests/bench/bench.py
