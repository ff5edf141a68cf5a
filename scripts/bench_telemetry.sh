#!/usr/bin/env bash
# What OpenTelemetry costs on the request path: the relay with telemetry.otlp off and on
# (scripts/bench_telemetry.py). Installs wrk when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
need_build_tools
need_packages wrk:wrk
cargo build --release --locked --bins
exec python3 scripts/bench_telemetry.py "${CARGO_TARGET_DIR:-target}/release" "$@"
