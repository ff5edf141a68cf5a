#!/usr/bin/env bash
# A soak run of a few minutes (not part of the test suite): the release relay on the
# shipped configuration under scripts/load.py's mix, its RSS sampled; fails if memory
# grows. Arguments go to soak.py (--seconds, default 180; --rate; --max-growth-mb).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
need_build_tools
cargo build --release --locked --bins
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
exec python3 scripts/soak.py "$CARGO_TARGET_DIR/release" "$@"
