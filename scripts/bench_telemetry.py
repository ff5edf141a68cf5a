#!/usr/bin/env python3
"""What OpenTelemetry costs: the relay with `telemetry.otlp` off and on, in one run
(scripts/bench_telemetry.sh builds and runs it).

Two relays in front of the same mock, the same configuration but for `telemetry.otlp`
(on: every trace sampled, or one in ten; exported to a collector sink in this script that
answers 200 to every export). wrk sends non-streaming requests for --seconds with
--conns keep-alive connections to each in turn, --rounds rounds. For each: requests per second
and the relay's CPU per request (user + system, from /proc). Prints a Markdown table and
the figures as JSON.
"""
import argparse
import http.server
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(__file__))
from bench import PROVIDER_KEY, TENANT_KEY, cpu_seconds, free_port, start, stop, tree, wait_port, wrk  # noqa: E402


class Sink(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    spans_bytes = 0

    def log_message(self, *a):
        pass

    def do_POST(self):
        n = int(self.headers.get("Content-Length", 0))
        Sink.spans_bytes += len(self.rfile.read(n))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()


def relay_conf(tmp, name, port, admin, mock_port, key_hash, threads, otlp):
    path = os.path.join(tmp, f"{name}.yaml")
    with open(path, "w") as f:
        f.write(f"""server:
  threads: {threads}
  pid_file: {tmp}/{name}.pid
  upgrade_sock: {tmp}/{name}.sock
  grace_period_seconds: 1
  graceful_shutdown_timeout_seconds: 1
  upstream_keepalive_pool_size: 2048
listen: {{ proxy: "127.0.0.1:{port}", admin: "127.0.0.1:{admin}" }}
routes:
  - {{ name: mock-openai, prefix: /mock/openai/v1, provider: openai, upstreams: ["http://127.0.0.1:{mock_port}/v1"], key: "env:BENCH_PROVIDER_KEY" }}
pricing:
  gpt-4o-mini: {{ input: 0.15, output: 0.60 }}
rows: {{ file: {{ path: {tmp}/{name}-rows.jsonl }} }}
tenants:
  - {{ id: bench, key_sha256: ["{key_hash}"] }}
{otlp}
""")
    return path


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("bindir")
    ap.add_argument("--seconds", type=int, default=6)
    ap.add_argument("--conns", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    relay_bin = os.path.join(a.bindir, "stream-relay")
    tmp = tempfile.mkdtemp(prefix="stream-relay-bench-otel-")
    sink = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Sink)
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    procs = []
    try:
        mock = start([relay_bin, "mock", "--listen", "127.0.0.1:0", "--key", PROVIDER_KEY])
        procs.append(mock)
        mock_port = int(mock.stdout.readline().rsplit(":", 1)[1])
        key_hash = subprocess.check_output([relay_bin, "hash-key", TENANT_KEY], text=True).strip()
        env = dict(os.environ, BENCH_PROVIDER_KEY=PROVIDER_KEY, RUST_LOG="warn")
        relays = {}
        sink_url = f"http://127.0.0.1:{sink.server_port}"
        for name, otlp in (
            ("off", ""),
            ("on", f"telemetry: {{ otlp: {{ endpoint: \"{sink_url}\" }} }}"),
            ("on, 10%", f"telemetry: {{ otlp: {{ endpoint: \"{sink_url}\", sample_ratio: 0.1 }} }}"),
        ):
            port, admin = free_port(), free_port()
            conf = relay_conf(tmp, name.replace(", ", "-").replace("%", ""), port, admin, mock_port, key_hash, a.threads, otlp)
            p = start([relay_bin, "-c", conf], env=env)
            procs.append(p)
            wait_port(port)
            relays[name] = (port, tree(p.pid))
        results = {name: [] for name in relays}
        for _ in range(a.rounds):
            for name in relays:
                port, pids = relays[name]
                before = cpu_seconds(pids)
                r = wrk(port, a.seconds, a.conns, tmp, TENANT_KEY)
                r["cpu_us_per_request"] = (cpu_seconds(pids) - before) / max(r["requests"], 1) * 1e6
                results[name].append(r)
                time.sleep(0.5)
        print(f"{a.conns} connections, {a.seconds} s each, {a.rounds} rounds, {a.threads} relay threads; "
              f"the collector sink took {Sink.spans_bytes} bytes\n")
        print("| telemetry.otlp | req/s (median) | relay CPU µs/request (median) |")
        print("|---|---|---|")
        med = lambda xs: sorted(xs)[len(xs) // 2]
        for name in relays:
            rs = results[name]
            print(f"| {name} | {med([r['rps'] for r in rs]):.0f} | {med([r['cpu_us_per_request'] for r in rs]):.1f} |")
        print("\n" + json.dumps(results))
    finally:
        for p in reversed(procs):
            stop(p)
        sink.shutdown()


if __name__ == "__main__":
    main()
