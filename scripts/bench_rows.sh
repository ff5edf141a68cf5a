#!/usr/bin/env bash
# The request log's cost (rows to ClickHouse versus the local file, and while ClickHouse
# is down) and the ClickHouse writer's rows per second (scripts/bench_rows.py).
# Installs wrk and clickhouse-server from Debian when missing. Arguments go to
# bench_rows.py (--seconds, --conns, --threads, --rounds).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
need_build_tools
need_packages wrk:wrk clickhouse-server:clickhouse-server
cargo build --release --locked --bins
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
exec python3 scripts/bench_rows.py "$CARGO_TARGET_DIR/release" "$@"
