#!/usr/bin/env python3
"""Relay versus nginx versus direct, in front of the same mock provider, in one run.

Run through scripts/bench.sh, which builds the release binaries and installs nginx and
wrk. Measures, for each target:
  - non-streaming requests per second (wrk, keep-alive) and the proxy's CPU seconds per
    request (from /proc, user + system, all of its processes);
  - N concurrent SSE streams of E events I ms apart (relay-load): time to first event
    and per-event delay from the mock's send stamp, p50 and p99; the difference to
    direct is what the proxy adds;
  - the proxy's peak RSS and its RSS growth per open stream.
Prints a Markdown table and the raw figures as JSON. Everything runs on loopback and
stops by itself; every process started here is stopped by pid.
"""
import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
TENANT_KEY = "sk-bench-tenant"
PROVIDER_KEY = "sk-bench-upstream"
PATH = "/mock/openai/v1/chat/completions"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout=20):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port}")


def tree(pid):
    """pid and its children (nginx workers)."""
    pids = [pid]
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                with open(f"/proc/{p}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                if int(fields[1]) == pid:
                    pids.append(int(p))
            except OSError:
                pass
    return pids


def cpu_seconds(pids):
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except OSError:
            pass
    return total / CLK_TCK


def rss_bytes(pids, field="VmRSS"):
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith(field + ":"):
                        total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


class Sampler(threading.Thread):
    """Samples the summed RSS of some processes every 50 ms."""

    def __init__(self, pids):
        super().__init__(daemon=True)
        self.pids, self.peak, self.stop_flag = pids, 0, False

    def run(self):
        while not self.stop_flag:
            self.peak = max(self.peak, rss_bytes(self.pids))
            time.sleep(0.05)


def start(cmd, **kw):
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, **kw)


def stop(proc, sig=signal.SIGINT):
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wrk(port, seconds, conns, tmp, key, latency=False):
    """wrk with keep-alive POSTs of a small chat request; with latency, p50/p99 in ms."""
    script = os.path.join(tmp, f"post-{key}.lua")
    with open(script, "w") as f:
        f.write(
            'wrk.method = "POST"\n'
            'wrk.body = \'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"bench"}]}\'\n'
            'wrk.headers["content-type"] = "application/json"\n'
            f'wrk.headers["authorization"] = "Bearer {key}"\n'
        )
    out = subprocess.run(
        ["wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "-s", script] + (["--latency"] if latency else [])
        + [f"http://127.0.0.1:{port}{PATH}"],
        capture_output=True, text=True, timeout=seconds + 30,
    ).stdout
    total = int(re.search(r"(\d+) requests in", out).group(1))
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    result = {"requests": total, "rps": rps, "non_2xx": int(non2xx.group(1)) if non2xx else 0,
              "socket_errors": errors.group(1) if errors else ""}
    if latency:
        for pct in (50, 99):
            m = re.search(rf"\s{pct}%\s+([\d.]+)(us|ms|s)\b", out)
            v, unit = float(m.group(1)), m.group(2)
            result[f"p{pct}_ms"] = v / 1000 if unit == "us" else v * 1000 if unit == "s" else v
    return result


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("bindir", help="folder with the release stream-relay and relay-load")
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--conns", type=int, default=64)
    ap.add_argument("--streams", type=int, default=1000)
    ap.add_argument("--events", type=int, default=50)
    ap.add_argument("--interval-ms", type=int, default=20)
    ap.add_argument("--ramp-ms", type=int, default=500,
                    help="streams start spread over this; keep it under events x interval so all are open at once")
    ap.add_argument("--threads", type=int, default=2, help="relay threads and nginx workers")
    a = ap.parse_args()
    relay_bin = os.path.join(a.bindir, "stream-relay")
    load_bin = os.path.join(a.bindir, "relay-load")
    tmp = tempfile.mkdtemp(prefix="stream-relay-bench-")
    procs = []
    try:
        mock = start([relay_bin, "mock", "--listen", "127.0.0.1:0", "--key", PROVIDER_KEY])
        procs.append(mock)
        mock_port = int(mock.stdout.readline().rsplit(":", 1)[1])

        relay_port, admin_port = free_port(), free_port()
        with open(os.path.join(tmp, "relay.yaml"), "w") as f:
            f.write(f"""server:
  threads: {a.threads}
  pid_file: {tmp}/relay.pid
  upgrade_sock: {tmp}/upgrade.sock
  grace_period_seconds: 1
  graceful_shutdown_timeout_seconds: 1
  upstream_keepalive_pool_size: 2048
listen: {{ proxy: "127.0.0.1:{relay_port}", admin: "127.0.0.1:{admin_port}" }}
routes:
  - {{ name: mock-openai, prefix: /mock/openai/v1, provider: openai, upstreams: ["http://127.0.0.1:{mock_port}/v1"], key: "env:BENCH_PROVIDER_KEY" }}
tenants:
  - {{ id: bench, key_sha256: ["{subprocess.check_output([relay_bin, 'hash-key', TENANT_KEY], text=True).strip()}"] }}
""")
        env = dict(os.environ, BENCH_PROVIDER_KEY=PROVIDER_KEY, RUST_LOG="warn")
        relay = start([relay_bin, "-c", os.path.join(tmp, "relay.yaml")], env=env)
        procs.append(relay)
        # The same relay with local limits on (high enough never to refuse): what a limit
        # decision costs in throughput.
        limited_port, limited_admin = free_port(), free_port()
        with open(os.path.join(tmp, "relay.yaml")) as f:
            limited_conf = f.read()
        limited_conf = (limited_conf.replace(f"127.0.0.1:{relay_port}", f"127.0.0.1:{limited_port}")
                        .replace(f"127.0.0.1:{admin_port}", f"127.0.0.1:{limited_admin}")
                        .replace(f"{tmp}/relay.pid", f"{tmp}/limited.pid")
                        .replace(f"{tmp}/upgrade.sock", f"{tmp}/limited.sock")
                        + "limits:\n  default: { requests_per_second: 1000000000, requests_per_minute: 1000000000,"
                        " tokens_per_minute: 1000000000000, concurrent_requests: 1000000 }\n")
        with open(os.path.join(tmp, "limited.yaml"), "w") as f:
            f.write(limited_conf)
        limited = start([relay_bin, "-c", os.path.join(tmp, "limited.yaml")], env=env)
        procs.append(limited)

        nginx_port = free_port()
        with open(os.path.join(tmp, "nginx.conf"), "w") as f:
            f.write(f"""worker_processes {a.threads};
pid {tmp}/nginx.pid;
error_log stderr error;
worker_rlimit_nofile 16384;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  client_body_temp_path {tmp}/nginx-body;
  proxy_temp_path {tmp}/nginx-proxy;
  upstream mock {{ server 127.0.0.1:{mock_port}; keepalive 1024; }}
  server {{
    listen 127.0.0.1:{nginx_port};
    location /mock/openai/v1/ {{
      proxy_pass http://mock/v1/;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Authorization "Bearer {PROVIDER_KEY}";
      proxy_buffering off;
      proxy_read_timeout 120s;
    }}
  }}
}}
""")
        nginx = start(["nginx", "-p", tmp, "-c", os.path.join(tmp, "nginx.conf"), "-g", "daemon off;"])
        procs.append(nginx)
        for p in (relay_port, nginx_port, mock_port, limited_port):
            wait_port(p)
        time.sleep(0.5)

        # Direct requests carry the provider key; through a proxy, the tenant's key.
        targets = [("direct", mock_port, mock.pid, PROVIDER_KEY), ("nginx", nginx_port, nginx.pid, TENANT_KEY),
                   ("stream-relay", relay_port, relay.pid, TENANT_KEY)]
        results = {}
        for name, port, pid, key in targets + [("stream-relay+limits", limited_port, limited.pid, TENANT_KEY)]:
            pids = tree(pid)
            wrk(port, 2, a.conns, tmp, key)  # warm-up: connections, pools, caches
            c0 = cpu_seconds(pids)
            r = wrk(port, a.seconds, a.conns, tmp, key)
            if r["non_2xx"] or r["socket_errors"]:
                raise SystemExit(f"{name}: wrk saw failures: {r}")
            r["cpu_s"] = cpu_seconds(pids) - c0
            r["cpu_us_per_request"] = 1e6 * r["cpu_s"] / max(r["requests"], 1)
            results[name] = {"json": r}
            print(f"{name}: {r['rps']:.0f} req/s, {r['cpu_us_per_request']:.1f} us CPU/request", file=sys.stderr)

        for name, port, pid, key in targets:
            pids = tree(pid)
            time.sleep(1.0)
            base = rss_bytes(pids)
            sampler = Sampler(pids)
            sampler.start()
            out = subprocess.run(
                [load_bin, "--target", f"127.0.0.1:{port}", "--path", PATH, "--streams", str(a.streams),
                 "--events", str(a.events), "--interval-ms", str(a.interval_ms), "--ramp-ms", str(a.ramp_ms),
                 "--header", f"authorization: Bearer {key}", "--timeout-s", "120"],
                capture_output=True, text=True, timeout=300,
            )
            sampler.stop_flag = True
            sampler.join()
            s = json.loads(out.stdout)
            s["rss_base"] = base
            s["rss_peak_sampled"] = sampler.peak
            s["rss_hwm"] = rss_bytes(pids, "VmHWM")
            s["rss_per_stream"] = max(sampler.peak - base, 0) / max(s["peak_open"], 1)
            results[name]["streams"] = s
            print(f"{name}: {s['complete']}/{s['streams']} streams complete, first event p50 "
                  f"{s['first_event_us']['p50']} us, event delay p50/p99 {s['event_delay_us']['p50']}/"
                  f"{s['event_delay_us']['p99']} us", file=sys.stderr)
    finally:
        for p in reversed(procs):
            stop(p, signal.SIGQUIT if p.args[0] == "nginx" else signal.SIGINT)

    d = results["direct"]["streams"]
    print(f"\nstream-relay bench: {a.streams} streams x {a.events} events, {a.interval_ms} ms apart; "
          f"wrk -c{a.conns} {a.seconds}s; {a.threads} relay threads / nginx workers; "
          f"{os.cpu_count()} cores\n")
    print("| target | req/s | CPU us/req | streams ok (peak open) | first event p50 / p99 (ms) "
          "| event delay p50 / p99 (ms) | added p50: first event / per event (ms) | peak RSS (MB) "
          "| RSS per open stream (KB) |")
    print("|---|---|---|---|---|---|---|---|---|")
    ms = lambda us: us / 1000.0  # noqa: E731
    for name in ("direct", "nginx", "stream-relay"):
        j, s = results[name]["json"], results[name]["streams"]
        print(f"| {name} | {j['rps']:.0f} | {j['cpu_us_per_request']:.1f} | {s['complete']}/{s['streams']} ({s['peak_open']}) "
              f"| {ms(s['first_event_us']['p50']):.2f} / {ms(s['first_event_us']['p99']):.2f} "
              f"| {ms(s['event_delay_us']['p50']):.2f} / {ms(s['event_delay_us']['p99']):.2f} "
              f"| {ms(s['first_event_us']['p50'] - d['first_event_us']['p50']):.2f} / "
              f"{ms(s['event_delay_us']['p50'] - d['event_delay_us']['p50']):.2f} "
              f"| {s['rss_hwm'] / 1e6:.1f} | {s['rss_per_stream'] / 1024:.1f} |")
    lj = results["stream-relay+limits"]["json"]
    rj = results["stream-relay"]["json"]
    print(f"\nwith local limits on: {lj['rps']:.0f} req/s, {lj['cpu_us_per_request']:.1f} us CPU/request "
          f"({100.0 * (lj['rps'] / rj['rps'] - 1):+.1f}% throughput, "
          f"{100.0 * (lj['cpu_us_per_request'] / rj['cpu_us_per_request'] - 1):+.1f}% CPU per request; target: under 2% cost)")
    r, n = results["stream-relay"], results["nginx"]
    cpu_ratio = r["json"]["cpu_us_per_request"] / max(n["json"]["cpu_us_per_request"], 1e-9)
    p99_gap = ms(r["streams"]["event_delay_us"]["p99"] - n["streams"]["event_delay_us"]["p99"])
    kb = r["streams"]["rss_per_stream"] / 1024
    print(f"\ntargets: CPU per request {cpu_ratio:.2f}x nginx's (target <= 1); per-event p99 "
          f"{p99_gap:+.2f} ms against nginx (target <= +0.5); {kb:.1f} KB per open stream (target <= 50)")
    print("(direct's CPU is the mock's own; the proxies' CPU is theirs alone. p99s on a shared "
          "2-core machine move by milliseconds between runs: compare several runs.)")
    print("\n" + json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
