#!/usr/bin/env bash
# Runs the whole test suite, installing what it needs when missing: build tools from
# Debian (Redis, ClickHouse, HAProxy, Prometheus and systemd for the tests that start
# them), the official OpenAI and Anthropic Python SDKs and `websockets` (the OpenAI SDK's
# Realtime client), for the SDK compatibility test, and chdb-core (a current ClickHouse).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
need_build_tools
need_packages python3:python3 pip3:python3-pip redis-server:redis-server systemd-analyze:systemd haproxy:haproxy prometheus:prometheus \
  clickhouse-server:clickhouse-server clickhouse-client:clickhouse-client
if ! python3 -c 'import openai, anthropic, websockets' 2>/dev/null; then
  python3 -m pip install -q --disable-pip-version-check openai anthropic websockets \
    || python3 -m pip install -q --disable-pip-version-check --break-system-packages openai anthropic websockets
fi
# chdb-core: a current ClickHouse (26.9) in-process, for the tests of the current table
# layout (tests/fixtures/chdb_http.py puts ClickHouse's HTTP interface in front of it).
if ! python3 -c 'import chdb' 2>/dev/null; then
  python3 -m pip install -q --disable-pip-version-check --no-deps chdb-core \
    || python3 -m pip install -q --disable-pip-version-check --no-deps --break-system-packages chdb-core
fi
# --no-fail-fast: one failing test binary does not hide the results of the others.
cargo test --locked --all-targets --no-fail-fast "$@"
