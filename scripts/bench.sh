#!/usr/bin/env bash
# The relay against nginx and direct, in front of the mock provider (scripts/bench.py).
# Installs nginx and wrk from Debian when missing. Arguments go to bench.py
# (--streams, --events, --interval-ms, --seconds, --conns, --threads).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
need_build_tools
need_packages nginx:nginx-light wrk:wrk
cargo build --release --locked --bins
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
exec python3 scripts/bench.py "$CARGO_TARGET_DIR/release" "$@"
