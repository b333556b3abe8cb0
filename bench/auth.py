#!/usr/bin/env python3
"""Sign-in figures for BENCHMARKS.md (issue 5): authenticated GET /api/v1/users/me
throughput against the GET /live ceiling, and login latency (argon2id-bound).

Usage: bench/auth.py [--binary target/release/confab] [--seconds 10] [--connections 50]
                     [--logins 40]

Runs the release binary on 127.0.0.1, production-like (JSON access log at info to
/dev/null), embedded backends, the server pinned to core 0 and wrk to core 1 (as
bench/foundation.py does for /live). The auth rate limits are raised so that the login
loop measures the login, not the limiter.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import foundation  # noqa: E402


def post(port, path, body, token=None):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method="POST",
                                 data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    if token:
        req.add_header("authorization", f"Bearer {token}")
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.status, json.loads(r.read() or b"null")


def wrk(port, path, seconds, connections, token=None):
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency"]
    if token:
        cmd += ["-H", f"Authorization: Bearer {token}"]
    cmd.append(f"http://127.0.0.1:{port}{path}")
    if shutil.which("taskset"):
        cmd = ["taskset", "-c", "1"] + cmd
    print("$ " + " ".join(c if not c.startswith("Authorization") else "-H 'Authorization: Bearer …'"
                          for c in cmd))
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    print(out.rstrip())
    for line in out.splitlines():
        if line.startswith("Requests/sec:"):
            return float(line.split()[1])
    return 0.0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", default="target/release/confab")
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--connections", type=int, default=50)
    ap.add_argument("--logins", type=int, default=40)
    args = ap.parse_args()
    binary = os.path.abspath(args.binary)
    if not os.path.exists(binary):
        sys.exit(f"{binary} is missing: run cargo build --release -p confab-server first")
    foundation.ensure_wrk()
    port = foundation.free_port()
    with tempfile.TemporaryDirectory() as data:
        proc = start(binary, port, data)
        try:
            while foundation.get(port, "/ready") != 200:
                time.sleep(0.01)
            status, session = post(port, "/api/v1/auth/register",
                                   {"email": "bench@example.com", "password": "correct horse battery",
                                    "name": "Bench"})
            assert status == 201, status
            token = session["accessToken"]
            live = wrk(port, "/live", args.seconds, args.connections)
            me = wrk(port, "/api/v1/users/me", args.seconds, args.connections, token)
            print(f"GET /api/v1/users/me: {me:,.0f} req/s = {100 * me / live:.0f} % of /live "
                  f"({live:,.0f} req/s) in the same run")
            times = []
            for _ in range(args.logins):
                started = time.perf_counter()
                status, _ = post(port, "/api/v1/auth/login",
                                 {"email": "bench@example.com", "password": "correct horse battery"})
                times.append((time.perf_counter() - started) * 1000)
                assert status == 200, status
            q = statistics.quantiles(times, n=100)
            print(f"login over {len(times)} sequential requests: p50 {statistics.median(times):.1f} ms, "
                  f"p99 {q[98]:.1f} ms (argon2id m=19456 KiB, t=2, p=1)")
        finally:
            foundation.stop(proc)


def start(binary, port, data):
    env = {
        "CONFAB__LOG__LEVEL": foundation.LOG_LEVEL,
        "CONFAB__AUTH__RATE_LIMIT_PER_IP_PER_MINUTE": "1000000",
        "CONFAB__AUTH__RATE_LIMIT_PER_EMAIL_PER_MINUTE": "1000000",
        "PATH": os.environ.get("PATH", ""),
        "ENVIRONMENT": "production",
        "JWT_SECRET": "bench-secret-bench-secret-bench-secret",
        "CONFAB_LISTEN": f"127.0.0.1:{port}",
        "CONFAB_DATA_DIR": data,
    }
    cmd = [binary, "serve"]
    if shutil.which("taskset"):
        cmd = ["taskset", "-c", "0"] + cmd
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


if __name__ == "__main__":
    main()
