#!/usr/bin/env bash
# A response cache hit against a miss (scripts/bench_cache.py): requests per second, the
# relay's CPU per request and latency, JSON and streams. Installs wrk when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
need_build_tools
need_packages wrk:wrk
cargo build --release --locked --bins
exec python3 scripts/bench_cache.py "${CARGO_TARGET_DIR:-target}/release" "$@"
