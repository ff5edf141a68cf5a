#!/usr/bin/env bash
# Runs the relay on the shipped configuration (or the file given with -c), building it
# first. Needs no Redis, no ClickHouse and no provider keys: the demo tenant streams from
# the built-in mock provider.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
need_build_tools
cargo build --release --locked
if [ $# -eq 0 ]; then set -- -c conf/relay.yaml; fi
exec "$CARGO_TARGET_DIR/release/stream-relay" "$@"
