#!/usr/bin/env bash
# Instructions per non-streaming request, relay against bare Pingora, counted by
# valgrind's callgrind: the same figure for the same build and workload on a loaded or a
# quiet machine, so a change of a few hundred instructions per request shows, where the
# timed bench (scripts/bench-vs-bare.sh) moves by 20%. User-space instructions only: the
# kernel's share (sends, receives, epoll) is not in them. Not in CI.
#
#   scripts/instructions-per-request.sh                 # bare and relay, 3,000 requests each
#   N=1000 TARGETS=relay scripts/instructions-per-request.sh
#   RELAY_BIN=/other/stream-relay scripts/instructions-per-request.sh
#   TOP=40 scripts/instructions-per-request.sh          # more of the relay's own functions
#   WORKLOAD=stream N=200 scripts/instructions-per-request.sh   # per stream of 50 events
#   INCLUDE_USAGE=0 WORKLOAD=stream ...   # clients that do not ask for usage (the relay strips it)
#
# It prints instructions per request for each target, then the relay's own functions
# (src/) with their inclusive instructions per request. Needs valgrind (Debian's
# valgrind) and the shared bench's mock, load generator and bare proxy
# (../shared/bench/run.sh builds them).
set -euo pipefail
cd "$(dirname "$0")/.."
BENCH=${BENCH:-../shared/bench}
BENCH_TARGET=${BENCH_TARGET:-$HOME/.cache/relay-bench/target}
WORKLOAD=${WORKLOAD:-rps}
N=${N:-3000}
EVENTS=50
TOP=${TOP:-25}
TARGETS=${TARGETS:-"bare relay"}
RELAY_BIN=${RELAY_BIN:-${CARGO_TARGET_DIR:-$HOME/.cache/stream-relay/target}/release/stream-relay}
MOCK_BIN=$BENCH_TARGET/release/mock-upstream
LG_BIN=$BENCH_TARGET/release/loadgen
BARE_BIN=$BENCH_TARGET/bare/release/pingora-bare
for b in valgrind callgrind_control callgrind_annotate; do
  command -v "$b" >/dev/null || { echo "needs $b (apt-get install valgrind)" >&2; exit 2; }
done
for b in "$MOCK_BIN" "$LG_BIN"; do
  [ -x "$b" ] || { echo "no $b: run $BENCH/run.sh once to build the bench tools" >&2; exit 2; }
done
OUT=$(mktemp -d /tmp/relay-instructions.XXXXXX)
KEY=sk-upstream-mock
PIDS=()
stop_all() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap stop_all EXIT

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
MOCK_PORT=$(port)
MOCK_EXPECT_KEY=$KEY MOCK_THREADS=1 "$MOCK_BIN" "127.0.0.1:$MOCK_PORT" > "$OUT/mock.log" 2>&1 &
PIDS+=($!)

measure() { # TARGET -> prints "TARGET INSTRUCTIONS_PER_REQUEST", leaves $OUT/TARGET.out
  local t=$1 p pid
  p=$(port)
  case $t in
    bare)
      [ -x "$BARE_BIN" ] || { echo "no $BARE_BIN" >&2; return 1; }
      UPSTREAM_KEY=$KEY valgrind --tool=callgrind --callgrind-out-file="$OUT/$t.%p" \
        "$BARE_BIN" "127.0.0.1:$p" "127.0.0.1:$MOCK_PORT" 1 > "$OUT/$t.log" 2>&1 &
      pid=$! ;;
    relay)
      [ -x "$RELAY_BIN" ] || { echo "no $RELAY_BIN (cargo build --release)" >&2; return 1; }
      mkdir -p "$OUT/relay"
      sed -e "s/@MOCK_PORT@/$MOCK_PORT/g" -e "s/@RELAY_PORT@/$p/g" -e "s/@ADMIN_PORT@/$(port)/g" \
          -e "s#@DIR@#$OUT/relay#g" "$BENCH/relay-bench.yaml" > "$OUT/relay/relay.yaml"
      ( cd "$OUT/relay" && UPSTREAM_KEY=$KEY exec valgrind --tool=callgrind \
          --callgrind-out-file="$OUT/$t.%p" "$RELAY_BIN" -c "$OUT/relay/relay.yaml" ) > "$OUT/$t.log" 2>&1 &
      pid=$! ;;
    *) echo "unknown target $t" >&2; return 1 ;;
  esac
  PIDS+=("$pid")
  local up=0
  for _ in $(seq 1 240); do
    if curl -s -o /dev/null "http://127.0.0.1:$p/health"; then up=1; break; fi
    sleep 0.5
  done
  [ $up = 1 ] || { echo "$t did not start (see $OUT/$t.log)" >&2; return 1; }
  local url=(--url "http://127.0.0.1:$p" -H "Authorization: Bearer sk-relay-bench")
  local warm=("$LG_BIN" rps "${url[@]}" -c 4 -n 200 --timeout-s 120)
  local load=("$LG_BIN" rps "${url[@]}" -c 8 -n "$N" --timeout-s 600)
  if [ "$WORKLOAD" = stream ]; then
    warm=("$LG_BIN" stream "${url[@]}" -k 10 -n 20 --chunks "$EVENTS" --delay-ms 2 --include-usage --timeout-s 120)
    load=("$LG_BIN" stream "${url[@]}" -k 20 -n "$N" --chunks "$EVENTS" --delay-ms 2 --timeout-s 600)
    # Without it, the relay asks for usage itself and strips what that brings.
    [ "${INCLUDE_USAGE:-1}" = 1 ] && load+=(--include-usage)
  fi
  # Warm-up (connections, pools, lazy statics), not counted.
  "${warm[@]}" > /dev/null 2>> "$OUT/load.err"
  sleep 1
  callgrind_control -z "$pid" > /dev/null 2>&1
  "${load[@]}" > "$OUT/$t.rps.json" 2>> "$OUT/load.err"
  sleep 1.5
  callgrind_control -d "$pid" > /dev/null 2>&1
  sleep 1
  # SIGINT: Pingora's fast shutdown (SIGTERM waits out its grace period).
  kill -INT "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  local ok dump total
  ok=$(python3 -c 'import json,sys; d=json.loads(open(sys.argv[1]).read().strip().splitlines()[-1]); print(d.get("ok", d.get("streams_ok")))' "$OUT/$t.rps.json")
  [ "$ok" = "$N" ] || { echo "$t: $ok of $N requests answered" >&2; return 1; }
  dump=$(ls "$OUT/$t".*.1)
  mv "$dump" "$OUT/$t.out"
  total=$(grep '^totals:' "$OUT/$t.out" | awk '{print $2}')
  if [ "$WORKLOAD" = stream ]; then
    echo "$t $((total / N)) per stream, $((total / N / EVENTS)) per event"
  else
    echo "$t $((total / N))"
  fi
}

if [ "$WORKLOAD" = stream ]; then
  echo "instructions per stream ($N streams of $EVENTS events, include_usage=${INCLUDE_USAGE:-1}; user space):"
else
  echo "instructions per request ($N non-streaming requests, user space):"
fi
for t in $TARGETS; do measure "$t"; done
if [ -f "$OUT/relay.out" ]; then
  echo
  echo "the relay's own functions, inclusive instructions per request (or stream):"
  callgrind_annotate --inclusive=yes --threshold=100 "$OUT/relay.out" 2>/dev/null \
    | python3 -c '
import re, sys
n, top = int(sys.argv[1]), int(sys.argv[2])
seen = {}
for line in sys.stdin:
    m = re.match(r"\s*([\d,]+) \(\s*[\d.]+%\)\s+\S*?(src/[\w/]+\.rs):(stream_relay::\S+)", line)
    if m:
        name = m.group(3)
        seen[name] = max(seen.get(name, 0), int(m.group(1).replace(",", "")) // n)
for name, c in sorted(seen.items(), key=lambda kv: -kv[1])[:top]:
    print(f"{c:8d}  {name}")
' "$N" "$TOP"
fi
echo "callgrind files: $OUT"
