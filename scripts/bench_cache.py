#!/usr/bin/env python3
"""A cache hit against a miss, in one run (scripts/bench_cache.sh builds and runs it).

One relay in front of the mock, with the response cache on its route. wrk sends, each
for --seconds with --conns keep-alive connections:
  - hit:  the same deterministic request every time (served from the cache);
  - miss: a deterministic request with a new `seed` each time (a new key: forwarded to
          the mock, and its answer stored);
both as JSON and as a stream of --events events (no pacing); the hit runs start with
their entry stored. For each: requests per
second, the relay's CPU per request (user + system, from /proc) and wrk's latency
p50 / p99. Prints a Markdown table and the figures as JSON.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
from bench import PROVIDER_KEY, TENANT_KEY, cpu_seconds, free_port, start, stop, tree, wait_port  # noqa: E402

PATH = "/mock/openai/v1/chat/completions"


def wrk(port, seconds, conns, tmp, name, stream, events, unique):
    script = os.path.join(tmp, f"{name}.lua")
    body = ('{"model":"gpt-4o-mini","messages":[{"role":"user","content":"bench"}],"temperature":0'
            + (',"stream":true' if stream else "") + ',"seed":%d}')
    with open(script, "w") as f:
        f.write(
            "local n = 0\n"
            "request = function()\n"
            + ("  n = n + 1\n" if unique else "")
            + f"  local body = string.format('{body}', n)\n"
            "  return wrk.format('POST', nil, {\n"
            "    ['content-type'] = 'application/json',\n"
            f"    ['authorization'] = 'Bearer {TENANT_KEY}',\n"
            f"    ['x-mock-chunks'] = '{events}',\n"
            "    ['x-mock-interval-ms'] = '0',\n"
            "  }, body)\n"
            "end\n"
        )
    out = subprocess.run(
        ["wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "-s", script, "--latency",
         f"http://127.0.0.1:{port}{PATH}"],
        capture_output=True, text=True, timeout=seconds + 30,
    ).stdout
    r = {"requests": int(re.search(r"(\d+) requests in", out).group(1)),
         "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))}
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    r["non_2xx"] = int(non2xx.group(1)) if non2xx else 0
    for pct in (50, 99):
        m = re.search(rf"\s{pct}%\s+([\d.]+)(us|ms|s)\b", out)
        v, unit = float(m.group(1)), m.group(2)
        r[f"p{pct}_ms"] = v / 1000 if unit == "us" else v * 1000 if unit == "s" else v
    return r


def warm(port, stream, events):
    """Sends the hit run's request once (seed 0), so that its answer is stored."""
    import http.client
    body = ('{"model":"gpt-4o-mini","messages":[{"role":"user","content":"bench"}],"temperature":0'
            + (',"stream":true' if stream else "") + ',"seed":0}')
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    c.request("POST", PATH, body, {"content-type": "application/json", "authorization": f"Bearer {TENANT_KEY}",
                                   "x-mock-chunks": str(events), "x-mock-interval-ms": "0"})
    r = c.getresponse()
    r.read()
    c.close()
    time.sleep(0.3)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("bindir")
    ap.add_argument("--seconds", type=int, default=8)
    ap.add_argument("--conns", type=int, default=32)
    ap.add_argument("--events", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    relay_bin = os.path.join(a.bindir, "stream-relay")
    tmp = tempfile.mkdtemp(prefix="stream-relay-bench-cache-")
    procs = []
    try:
        mock = start([relay_bin, "mock", "--listen", "127.0.0.1:0", "--key", PROVIDER_KEY])
        procs.append(mock)
        mock_port = int(mock.stdout.readline().rsplit(":", 1)[1])
        port, admin = free_port(), free_port()
        key_hash = subprocess.check_output([relay_bin, "hash-key", TENANT_KEY], text=True).strip()
        with open(os.path.join(tmp, "relay.yaml"), "w") as f:
            f.write(f"""server:
  threads: {a.threads}
  pid_file: {tmp}/relay.pid
  upgrade_sock: {tmp}/upgrade.sock
  grace_period_seconds: 1
  graceful_shutdown_timeout_seconds: 1
  upstream_keepalive_pool_size: 2048
listen: {{ proxy: "127.0.0.1:{port}", admin: "127.0.0.1:{admin}" }}
routes:
  - {{ name: mock-openai, prefix: /mock/openai/v1, provider: openai, upstreams: ["http://127.0.0.1:{mock_port}/v1"],
      key: "env:BENCH_PROVIDER_KEY", cache: {{ ttl: 1h }} }}
pricing:
  gpt-4o-mini: {{ input: 0.15, output: 0.60 }}
cache: {{ memory_bytes: 268435456 }}
rows: {{ file: {{ path: {tmp}/rows.jsonl }} }}
tenants:
  - {{ id: bench, key_sha256: ["{key_hash}"] }}
""")
        env = dict(os.environ, BENCH_PROVIDER_KEY=PROVIDER_KEY, RUST_LOG="warn")
        relay = start([relay_bin, "-c", os.path.join(tmp, "relay.yaml")], env=env)
        procs.append(relay)
        wait_port(port)
        pids = tree(relay.pid)
        results = {}
        for stream in (False, True):
            for name, unique in (("miss", True), ("hit", False)):
                label = f"{'stream' if stream else 'json'} {name}"
                if not unique:
                    # The entry first, so that the run measures hits only.
                    warm(port, stream, a.events)
                before = cpu_seconds(pids)
                r = wrk(port, a.seconds, a.conns, tmp, label.replace(" ", "-"), stream, a.events, unique)
                r["cpu_us_per_request"] = (cpu_seconds(pids) - before) / max(r["requests"], 1) * 1e6
                results[label] = r
                time.sleep(0.5)
        print(f"{a.conns} connections, {a.seconds} s each, streams of {a.events} events, {a.threads} relay threads\n")
        print("| request | req/s | relay CPU µs/req | p50 ms | p99 ms | non-2xx |")
        print("|---|---|---|---|---|---|")
        for label, r in results.items():
            print(f"| {label} | {r['rps']:.0f} | {r['cpu_us_per_request']:.1f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['non_2xx']} |")
        print("\n" + json.dumps(results))
    finally:
        for p in reversed(procs):
            stop(p)


if __name__ == "__main__":
    main()
