#!/usr/bin/env python3
"""A realistic load on a relay in front of the mock provider, for demos and soak runs.

Mix per request (by weight): short streams, long streams, non-streaming JSON, Anthropic
streams, audio, and errors the mock is asked to produce (500, 429, a stream cut
mid-way), spread over the given tenant keys. Bounded by --requests and --seconds, it
stops by itself; a progress line is updated every second and a summary printed at the
end. Only loopback or the address you give; standard library only.

  scripts/load.py --relay http://127.0.0.1:8080 --key sk-relay-demo --seconds 60
"""
import argparse
import http.client
import json
import random
import statistics
import sys
import threading
import time
from collections import Counter
from urllib.parse import urlparse

MIX = [
    # (name, weight, path, body, headers)
    ("stream-short", 40, "/mock/openai/v1/chat/completions",
     {"model": "gpt-4o-mini", "stream": True, "messages": [{"role": "user", "content": "hi"}]},
     {"x-mock-chunks": "20", "x-mock-interval-ms": "20"}),
    ("stream-long", 10, "/mock/openai/v1/chat/completions",
     {"model": "gpt-4o", "stream": True, "messages": [{"role": "user", "content": "essay"}]},
     {"x-mock-chunks": "200", "x-mock-interval-ms": "25", "x-mock-first-delay-ms": "300"}),
    ("json", 25, "/mock/openai/v1/chat/completions",
     {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}, {}),
    ("anthropic", 10, "/mock/anthropic/v1/messages",
     {"model": "claude-sonnet-4-5", "max_tokens": 256, "stream": True,
      "messages": [{"role": "user", "content": "hi"}]},
     {"anthropic-version": "2023-06-01", "x-mock-chunks": "30"}),
    ("audio", 5, "/mock/audio/v1/audio/speech",
     {"model": "tts-1", "input": "Hello there", "voice": "alloy"},
     {"x-mock-chunks": "16", "x-mock-interval-ms": "20"}),
    ("error-500", 4, "/mock/openai/v1/chat/completions",
     {"model": "gpt-4o-mini", "messages": []}, {"x-mock-status": "500"}),
    ("error-429", 3, "/mock/openai/v1/chat/completions",
     {"model": "gpt-4o-mini", "messages": []}, {"x-mock-status": "429"}),
    ("cut", 3, "/mock/openai/v1/chat/completions",
     {"model": "gpt-4o-mini", "stream": True, "messages": []},
     {"x-mock-chunks": "20", "x-mock-cut-after": "5"}),
]


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.by_kind = Counter()
        self.by_status = Counter()
        self.failures = Counter()
        self.first_byte = []
        self.sent = 0

    def add(self, kind, status, first_byte, failure=None):
        with self.lock:
            self.by_kind[kind] += 1
            self.by_status[status] += 1
            if first_byte is not None:
                self.first_byte.append(first_byte)
            if failure:
                self.failures[failure] += 1


def one(target, key, kind, path, body, headers, stats):
    data = json.dumps(body).encode()
    h = {"content-type": "application/json", "authorization": f"Bearer {key}", "x-api-key": key}
    h.update(headers)
    start = time.monotonic()
    conn = http.client.HTTPConnection(target.hostname, target.port or 80, timeout=60)
    try:
        conn.request("POST", path, body=data, headers=h)
        resp = conn.getresponse()
        first = None
        while True:
            chunk = resp.read1(65536)
            if first is None:
                first = time.monotonic() - start
            if not chunk:
                break
        stats.add(kind, resp.status, first)
    except (http.client.IncompleteRead, ConnectionError) as e:
        # Expected for the "cut" kind: the stream ends without its last chunk.
        stats.add(kind, "cut" if kind == "cut" else "error", None,
                  None if kind == "cut" else type(e).__name__)
    except Exception as e:  # noqa: BLE001 - counted and shown in the summary
        stats.add(kind, "error", None, type(e).__name__)
    finally:
        conn.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--relay", default="http://127.0.0.1:8080")
    ap.add_argument("--key", action="append", help="tenant relay key (repeat for several tenants)")
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--requests", type=int, default=100000, help="stop after this many")
    ap.add_argument("--rate", type=float, default=50, help="requests started per second")
    ap.add_argument("--concurrency", type=int, default=200, help="most requests open at once")
    a = ap.parse_args()
    keys = a.key or ["sk-relay-demo"]
    target = urlparse(a.relay)
    stats = Stats()
    slots = threading.BoundedSemaphore(a.concurrency)
    weights = [m[1] for m in MIX]
    start = time.monotonic()
    last_print = 0.0
    threads = []

    def run(*args):
        try:
            one(*args)
        finally:
            slots.release()

    while stats.sent < a.requests and time.monotonic() - start < a.seconds:
        kind, _, path, body, headers = random.choices(MIX, weights)[0]
        slots.acquire()
        t = threading.Thread(target=run, args=(target, random.choice(keys), kind, path, body, headers, stats),
                             daemon=True)
        t.start()
        threads.append(t)
        stats.sent += 1
        now = time.monotonic() - start
        if now - last_print >= 1:
            last_print = now
            with stats.lock:
                done = sum(stats.by_kind.values())
                ok = sum(v for k, v in stats.by_status.items() if isinstance(k, int) and k < 400)
            sys.stderr.write(f"\r{now:6.1f}s sent {stats.sent} done {done} ok {ok} "
                             f"open {stats.sent - done} failures {sum(stats.failures.values())}   ")
            sys.stderr.flush()
        time.sleep(max(0.0, (stats.sent / a.rate) - (time.monotonic() - start)))
    for t in threads:
        t.join(timeout=120)
    elapsed = time.monotonic() - start
    sys.stderr.write("\n")
    fb = sorted(stats.first_byte)
    q = (lambda p: fb[min(len(fb) - 1, int(p * len(fb)))] * 1000) if fb else (lambda p: 0.0)
    print(f"load: {stats.sent} requests in {elapsed:.1f}s ({stats.sent / elapsed:.1f}/s) over {len(keys)} tenant(s)")
    print("by kind:   " + ", ".join(f"{k} {v}" for k, v in sorted(stats.by_kind.items())))
    print("by status: " + ", ".join(f"{k} {v}" for k, v in sorted(stats.by_status.items(), key=str)))
    print(f"first byte ms: p50 {q(0.5):.1f}, p95 {q(0.95):.1f}, p99 {q(0.99):.1f}"
          + (f", mean {statistics.mean(fb) * 1000:.1f}" if fb else ""))
    unexpected = sum(stats.failures.values())
    print(f"unexpected failures: {unexpected}" + (f" ({dict(stats.failures)})" if unexpected else ""))
    return 1 if unexpected else 0


if __name__ == "__main__":
    sys.exit(main())
