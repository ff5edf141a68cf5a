#!/usr/bin/env bash
# The performance regression guard (not in CI: timings): runs ../shared/bench/run.sh on
# the relay's release build next to bare Pingora, then prints the relay's cost as ratios
# to bare's, per round and as medians, against the targets of the lean request path:
# CPU per request and per stream phase at most 1.25x bare's, per-event added p99 within
# 0.5 ms, the burst of 2,000 streams at most 2x bare's p99, peak RSS at most bare's + 10
# MiB. It exits 0 whatever the figures: a loaded machine moves them, so read them.
#
#   scripts/bench-vs-bare.sh                      # bare and relay, one round (about 3 minutes)
#   ROUNDS=3 scripts/bench-vs-bare.sh             # three rounds, medians
#   TARGETS="nginx bare relay" ROUNDS=3 scripts/bench-vs-bare.sh
#   RELAY_BIN=/other/stream-relay scripts/bench-vs-bare.sh
#   REPORT=DIR scripts/bench-vs-bare.sh           # only the ratios of an earlier run's results
set -euo pipefail
cd "$(dirname "$0")/.."
BENCH=${BENCH:-../shared/bench}
if [ -z "${REPORT:-}" ]; then
  [ -x "$BENCH/run.sh" ] || { echo "no $BENCH/run.sh (set BENCH)" >&2; exit 2; }
  export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/stream-relay/target}
  if [ -z "${RELAY_BIN:-}" ]; then
    cargo build --release --locked --bin stream-relay
    export RELAY_BIN=$CARGO_TARGET_DIR/release/stream-relay
  fi
  export OUT=${OUT:-/tmp/stream-relay-bench/$(date -u +%Y%m%dT%H%M%SZ)}
  export TARGETS=${TARGETS:-"bare relay"} ROUNDS=${ROUNDS:-1}
  mkdir -p "$OUT"
  bash "$BENCH/run.sh" >&2
  REPORT=$OUT
fi
python3 - "$REPORT" <<'PY'
import glob, json, os, statistics, sys
out = sys.argv[1]

def load(p):
    try:
        with open(p) as f:
            return json.loads(f.read().strip().splitlines()[-1])
    except (OSError, ValueError, IndexError):
        return None

def cpu(tag, a, b):
    s0, s1 = load(f"{out}/{tag}.snap-{a}.json"), load(f"{out}/{tag}.snap-{b}.json")
    try:
        return s1["proxy"]["cpu_s"] - s0["proxy"]["cpu_s"]
    except (TypeError, KeyError):
        return None

def p99(d, key):
    try:
        return d[key]["p99"]
    except (TypeError, KeyError):
        return None

def figures(tag):
    rps, st, cap = (load(f"{out}/{tag}.{p}.json") for p in ("rps", "stream", "cap"))
    s4 = load(f"{out}/{tag}.snap-4.json") or {}
    c_rps = cpu(tag, 0, 1)
    return {
        "cpu_req_us": c_rps / rps["ok"] * 1e6 if c_rps and rps and rps.get("ok") else None,
        "stream_cpu_s": cpu(tag, 1, 2),
        "event_p99": p99(st, "event_added_ms"),
        "cap_ttft_p99": p99(cap, "ttft_added_ms"),
        "cap_event_p99": p99(cap, "event_added_ms"),
        "cap_ok": f'{cap.get("streams_ok")}/{cap.get("streams")}' if cap else None,
        "rss_mib": (s4.get("proxy") or {}).get("hwm_kb", 0) / 1024 or None,
    }

tags = sorted({os.path.basename(p).split(".snap-0.json")[0] for p in glob.glob(f"{out}/*.snap-0.json")})
rounds = sorted({t.split(".r")[1] for t in tags if ".r" in t}) or [""]
def tag(name, r):
    return f"{name}.r{r}" if r else name

def f(x, nd=2):
    return "–" if x is None else (f"{x:.{nd}f}" if isinstance(x, float) else str(x))

def ratio(a, b):
    return a / b if a is not None and b else None

rows = []
print("| round | target | CPU/request µs | stream CPU s | event p99 ms | burst TTFT / event p99 ms | burst ok | peak RSS MiB |")
print("|---|---|---|---|---|---|---|---|")
for r in rounds:
    for name in ("nginx", "bare", "relay"):
        if not os.path.exists(f"{out}/{tag(name, r)}.snap-0.json"):
            continue
        x = figures(tag(name, r))
        print(f'| {r or 1} | {name} | {f(x["cpu_req_us"], 1)} | {f(x["stream_cpu_s"], 1)} | {f(x["event_p99"])} | {f(x["cap_ttft_p99"])} / {f(x["cap_event_p99"])} | {f(x["cap_ok"])} | {f(x["rss_mib"], 0)} |')
    b, rl = figures(tag("bare", r)), figures(tag("relay", r))
    rows.append({
        "CPU per request, relay/bare (target <= 1.25)": ratio(rl["cpu_req_us"], b["cpu_req_us"]),
        "stream-phase CPU, relay/bare (target <= 1.25)": ratio(rl["stream_cpu_s"], b["stream_cpu_s"]),
        "per-event added p99, relay - bare ms (target <= 0.5)": None if None in (rl["event_p99"], b["event_p99"]) else rl["event_p99"] - b["event_p99"],
        "burst TTFT-added p99, relay/bare (target <= 2)": ratio(rl["cap_ttft_p99"], b["cap_ttft_p99"]),
        "burst event-added p99, relay/bare (target <= 2)": ratio(rl["cap_event_p99"], b["cap_event_p99"]),
        "peak RSS, relay - bare MiB (target <= 10)": None if None in (rl["rss_mib"], b["rss_mib"]) else rl["rss_mib"] - b["rss_mib"],
    })
print()
print("| relay against bare | " + " | ".join(f"round {r or 1}" for r in rounds) + " | median |")
print("|---|" + "---|" * (len(rounds) + 1))
for k in rows[0]:
    vals = [row[k] for row in rows]
    known = [v for v in vals if v is not None]
    med = statistics.median(known) if known else None
    print(f"| {k} | " + " | ".join(f(v) for v in vals) + f" | {f(med)} |")
print(f"\nresults: {out}")
PY
