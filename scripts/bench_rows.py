#!/usr/bin/env python3
"""The request log's cost, and the ClickHouse writer's speed, in one run.

Run through scripts/bench_rows.sh, which builds the release binaries and installs wrk
and clickhouse-server. Starts the mock provider, a ClickHouse of its own (temporary data
directory, free loopback ports) and two relays that differ only in where rows go, then:
  1. wrk against the relay writing rows to the local file (the default sink) and against
     the relay writing to ClickHouse: requests per second, latency p50/p99, CPU per
     request;
  2. ClickHouse stopped: wrk again against the ClickHouse relay, whose rows now go to
     the disk spool; the latency should not move;
  3. ClickHouse started again: the time until the spool is replayed gives the writer's
     rows per second into ClickHouse (batches of batch_rows, one dedup query each);
     then every request the relay counted must be in the table exactly once.
Everything runs on loopback and stops by itself; every process started here is stopped
by pid.
"""
import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402
from bench import (PROVIDER_KEY, TENANT_KEY, cpu_seconds, free_port, start, stop,  # noqa: E402
                   tree, wait_port)


def ch_query(port, sql):
    req = urllib.request.Request(f"http://127.0.0.1:{port}/", data=sql.encode(), method="POST")
    with urllib.request.urlopen(req, timeout=30) as r:
        return r.read().decode()


def start_clickhouse(tmp, http_port, tcp_port):
    d = os.path.join(tmp, "clickhouse")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "config.xml"), "w") as f:
        f.write(f"""<yandex>
  <logger><level>warning</level><log>{d}/server.log</log><errorlog>{d}/error.log</errorlog><console>0</console></logger>
  <http_port>{http_port}</http_port><tcp_port>{tcp_port}</tcp_port><listen_host>127.0.0.1</listen_host>
  <path>{d}/data/</path><tmp_path>{d}/tmp/</tmp_path><user_files_path>{d}/user_files/</user_files_path>
  <users_config>{d}/users.xml</users_config><default_profile>default</default_profile>
  <default_database>default</default_database><mark_cache_size>5368709</mark_cache_size>
</yandex>
""")
    with open(os.path.join(d, "users.xml"), "w") as f:
        f.write("""<yandex><profiles><default></default></profiles>
  <users><default><password></password><networks><ip>127.0.0.1</ip></networks><profile>default</profile><quota>default</quota></default></users>
  <quotas><default></default></quotas></yandex>
""")
    binary = shutil.which("clickhouse-server") or "/usr/sbin/clickhouse-server"
    proc = subprocess.Popen([binary, f"--config-file={d}/config.xml"], cwd=d,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while True:
        try:
            if ch_query(http_port, "SELECT 1").strip() == "1":
                return proc
        except OSError:
            pass
        if time.time() > deadline:
            raise SystemExit("clickhouse-server did not start")
        time.sleep(0.1)


def wrk(port, seconds, conns, tmp):
    r = bench.wrk(port, seconds, conns, tmp, TENANT_KEY, latency=True)
    if r["non_2xx"] or r["socket_errors"]:
        raise SystemExit(f"wrk saw failures: {r}")
    return r


def metric(admin_port, name):
    text = urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=10).read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and (len(line) == len(name) or line[len(name)] in " {"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("bindir", help="folder with the release stream-relay")
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--conns", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="wrk runs per relay, alternating")
    a = ap.parse_args()
    relay_bin = os.path.join(a.bindir, "stream-relay")
    tmp = tempfile.mkdtemp(prefix="stream-relay-bench-rows-")
    procs = []
    ch = None
    try:
        mock = start([relay_bin, "mock", "--listen", "127.0.0.1:0", "--key", PROVIDER_KEY])
        procs.append(mock)
        mock_port = int(mock.stdout.readline().rsplit(":", 1)[1])
        ch_http, ch_tcp = free_port(), free_port()
        ch = start_clickhouse(tmp, ch_http, ch_tcp)
        tenant_hash = subprocess.check_output([relay_bin, "hash-key", TENANT_KEY], text=True).strip()
        env = dict(os.environ, BENCH_PROVIDER_KEY=PROVIDER_KEY, RUST_LOG="warn")
        relays = {}
        for name, rows in (
            ("file", f"rows:\n  file: {{ path: {tmp}/rows.jsonl }}\n"),
            ("clickhouse", f"rows:\n  clickhouse: {{ url: 'http://127.0.0.1:{ch_http}', database: bench, "
                           f"spool_dir: {tmp}/spool, retry_interval: 500ms, timeout: 5s }}\n"),
        ):
            port, admin = free_port(), free_port()
            conf = os.path.join(tmp, f"{name}.yaml")
            with open(conf, "w") as f:
                f.write(f"""server:
  threads: {a.threads}
  pid_file: {tmp}/{name}.pid
  upgrade_sock: {tmp}/{name}.sock
  grace_period_seconds: 1
  graceful_shutdown_timeout_seconds: 1
  upstream_keepalive_pool_size: 2048
listen: {{ proxy: "127.0.0.1:{port}", admin: "127.0.0.1:{admin}" }}
routes:
  - {{ name: mock-openai, prefix: /mock/openai/v1, provider: openai, upstreams: ["http://127.0.0.1:{mock_port}/v1"], key: "env:BENCH_PROVIDER_KEY" }}
tenants:
  - {{ id: bench, key_sha256: ["{tenant_hash}"] }}
{rows}""")
            p = start([relay_bin, "-c", conf], env=env)
            procs.append(p)
            wait_port(port)
            wait_port(admin)
            relays[name] = (port, admin, p.pid)

        results = {"file": [], "clickhouse": []}
        for name, (port, _, _) in relays.items():
            wrk(port, 2, a.conns, tmp)  # warm-up
        for _ in range(a.rounds):
            for name, (port, _, pid) in relays.items():
                pids = tree(pid)
                c0 = cpu_seconds(pids)
                r = wrk(port, a.seconds, a.conns, tmp)
                r["cpu_us_per_request"] = 1e6 * (cpu_seconds(pids) - c0) / max(r["requests"], 1)
                results[name].append(r)
                print(f"{name}: {r['rps']:.0f} req/s, p50 {r['p50_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms, "
                      f"{r['cpu_us_per_request']:.1f} us CPU/request", file=sys.stderr)

        port, admin, pid = relays["clickhouse"]
        deadline = time.time() + 60
        while metric(admin, "stream_relay_rows_written_total") < metric(admin, "stream_relay_requests_total"):
            if time.time() > deadline:
                raise SystemExit("the ClickHouse writer did not catch up with the traffic")
            time.sleep(0.2)
        stop(ch, signal.SIGTERM)
        ch = None
        time.sleep(0.5)
        pids = tree(pid)
        c0 = cpu_seconds(pids)
        down = wrk(port, a.seconds, a.conns, tmp)
        down["cpu_us_per_request"] = 1e6 * (cpu_seconds(pids) - c0) / max(down["requests"], 1)
        print(f"clickhouse down: {down['rps']:.0f} req/s, p50 {down['p50_ms']:.2f} ms, p99 {down['p99_ms']:.2f} ms",
              file=sys.stderr)
        time.sleep(1.5)  # the last batches reach the spool
        spooled = metric(admin, 'stream_relay_rows_spool_total{event="spooled"}')
        served = metric(admin, "stream_relay_requests_total")

        ch = start_clickhouse(tmp, ch_http, ch_tcp)
        t0 = time.time()
        while True:
            n = int(ch_query(ch_http, "SELECT count() FROM bench.stream_logs").strip() or 0)
            if n >= served:
                break
            if time.time() - t0 > 300:
                raise SystemExit(f"replay stuck at {n} of {served} rows")
            time.sleep(0.05)
        replay_s = time.time() - t0
        unique = int(ch_query(ch_http, "SELECT uniqExact(request_id) FROM bench.stream_logs").strip())
        dropped = metric(admin, "stream_relay_rows_dropped_total")
    finally:
        for p in reversed(procs):
            stop(p)
        if ch is not None:
            stop(ch, signal.SIGTERM)
        shutil.rmtree(tmp, ignore_errors=True)

    def med(rs, k):
        return sorted(r[k] for r in rs)[len(rs) // 2]

    f, c = results["file"], results["clickhouse"]
    print(f"\nrequest log bench: wrk -c{a.conns} {a.seconds}s x {a.rounds} rounds (medians); "
          f"{a.threads} relay threads; {os.cpu_count()} cores\n")
    print("| rows to | req/s | latency p50 / p99 (ms) | CPU us/req |")
    print("|---|---|---|---|")
    for name, rs in (("file (default)", f), ("ClickHouse", c)):
        print(f"| {name} | {med(rs, 'rps'):.0f} | {med(rs, 'p50_ms'):.2f} / {med(rs, 'p99_ms'):.2f} "
              f"| {med(rs, 'cpu_us_per_request'):.1f} |")
    print(f"| ClickHouse down (spool) | {down['rps']:.0f} | {down['p50_ms']:.2f} / {down['p99_ms']:.2f} "
          f"| {down['cpu_us_per_request']:.1f} |")
    apart = 100.0 * (med(c, "rps") / med(f, "rps") - 1)
    print(f"\nClickHouse vs file: {apart:+.1f}% throughput (target: under 5% apart)")
    print(f"writer: {spooled:.0f} spooled rows replayed in {replay_s:.2f} s = "
          f"{spooled / max(replay_s, 1e-9):.0f} rows/s into ClickHouse (counted from ClickHouse's "
          f"first answer, so it includes up to one retry_interval, 500 ms, before the relay's probe)")
    print(f"table: {n} rows for {served:.0f} requests served, {unique} distinct request ids; "
          f"dropped {dropped:.0f}")
    if n != served or unique != n or dropped:
        raise SystemExit("rows lost or doubled")
    print("\n" + json.dumps({"file": f, "clickhouse": c, "clickhouse_down": down, "replay_s": replay_s,
                             "spooled": spooled, "rows": n}, indent=1))


if __name__ == "__main__":
    main()
