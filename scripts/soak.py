#!/usr/bin/env python3
"""Soak run: the relay on the shipped configuration (built-in mock, rows to a file)
under scripts/load.py's realistic mix for a few minutes, its memory sampled all along.

Run through scripts/soak.sh. The first third of the run is warm-up (pools, allocator
caches fill); the relay's RSS over the last third must not exceed that of the middle
third by more than --max-growth-mb. The RSS series is printed. Bounded in time, loopback only, every process stopped by pid.
"""
import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return 0.0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("bindir")
    ap.add_argument("--seconds", type=float, default=180)
    ap.add_argument("--rate", type=float, default=150)
    ap.add_argument("--max-growth-mb", type=float, default=2.0)
    a = ap.parse_args()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    tmp = tempfile.mkdtemp(prefix="stream-relay-soak-")
    port, admin, mock = free_port(), free_port(), free_port()
    conf = open(os.path.join(root, "conf/relay.yaml")).read()
    conf = (conf.replace("127.0.0.1:8080", f"127.0.0.1:{port}")
                .replace("127.0.0.1:9090", f"127.0.0.1:{admin}")
                .replace("127.0.0.1:18080", f"127.0.0.1:{mock}")
                .replace("/tmp/stream-relay", tmp)
                # The demo tenant's limits would refuse most of the load: limits stay
                # on (their code runs), set above the soak's rate.
                .replace("default: { requests_per_minute: 600, concurrent_requests: 50 }",
                         "default: { requests_per_minute: 1000000, concurrent_requests: 100000 }"))
    path = os.path.join(tmp, "relay.yaml")
    with open(path, "w") as f:
        f.write(conf)
    relay = subprocess.Popen([os.path.join(a.bindir, "stream-relay"), "-c", path],
                             stdout=subprocess.DEVNULL, stderr=open(os.path.join(tmp, "relay.log"), "w"),
                             env=dict(os.environ, RUST_LOG="warn"))
    samples = []
    stop = threading.Event()
    try:
        deadline = time.time() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline:
                    raise SystemExit("relay did not start")
                time.sleep(0.1)

        def sample():
            t0 = time.time()
            while not stop.is_set():
                samples.append((time.time() - t0, rss_mb(relay.pid)))
                stop.wait(2)
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        load = subprocess.run([sys.executable, os.path.join(root, "scripts/load.py"),
                               "--relay", f"http://127.0.0.1:{port}", "--seconds", str(a.seconds),
                               "--rate", str(a.rate), "--concurrency", "300"],
                              capture_output=True, text=True, timeout=a.seconds + 300)
        stop.set()
        sampler.join()
    finally:
        stop.set()
        relay.send_signal(signal.SIGINT)
        try:
            relay.wait(15)
        except subprocess.TimeoutExpired:
            relay.kill()
    print(load.stdout)
    n = len(samples)
    third = max(n // 3, 1)
    middle = samples[third:2 * third] or samples
    first = sum(r for _, r in middle) / len(middle)
    last = sum(r for _, r in samples[-third:]) / third
    print("RSS (MB) every ~10 s: " + " ".join(f"{r:.1f}" for _, r in samples[::5]))
    print(f"RSS middle third {first:.1f} MB, last third {last:.1f} MB, growth {last - first:+.1f} MB "
          f"(limit {a.max_growth_mb} MB), peak {max(r for _, r in samples):.1f} MB")
    failures = re.search(r"unexpected failures: (\d+)", load.stdout)
    refused = re.search(r" 429 (\d+)", load.stdout)
    if refused and int(refused.group(1)) > 0.2 * len(samples) * 2 * a.rate:
        raise SystemExit("most requests were refused: the soak did not exercise the relay")
    if last - first > a.max_growth_mb:
        raise SystemExit("memory grew")
    if failures and int(failures.group(1)) > 0:
        raise SystemExit("requests failed unexpectedly")


if __name__ == "__main__":
    main()
