#!/usr/bin/env python3
"""Foundation figures for BENCHMARKS.md: cold start to /ready, idle RSS, GET /live throughput,
release binary size.

Usage: bench/foundation.py [--binary target/release/confab] [--runs 30] [--seconds 10]
                           [--connections 50] [--log-level info|warn]

Runs the release binary on 127.0.0.1 only, production-like (JSON logs to /dev/null, as a
deployment would ship them). Cold start is measured from fork/exec to the first 200 from
/ready, polling every 0.5 ms over a fresh TCP connection. Throughput uses wrk (installed from
Debian's packages if missing), pinned so the server and the load tool get one core each.
"""
import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(port, path, timeout=0.5):
    """Returns the status of GET path, or None when nothing answers yet."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            head = s.recv(64).decode("latin-1")
            return int(head.split(" ")[1])
    except (OSError, IndexError, ValueError):
        return None


LOG_LEVEL = "info"


def start(binary, port, data_dir, cpu=None):
    env = {
        "CONFAB__LOG__LEVEL": LOG_LEVEL,
        "PATH": os.environ.get("PATH", ""),
        "ENVIRONMENT": "production",
        "JWT_SECRET": "bench-secret-bench-secret-bench-secret",
        "CONFAB_LISTEN": f"127.0.0.1:{port}",
        "CONFAB_DATA_DIR": data_dir,
    }
    cmd = [binary, "serve"]
    if cpu is not None and shutil.which("taskset"):
        cmd = ["taskset", "-c", str(cpu)] + cmd
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop(proc):
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def cold_start(binary, runs):
    samples = []
    for _ in range(runs):
        port = free_port()
        with tempfile.TemporaryDirectory() as data:
            t0 = time.perf_counter()
            proc = start(binary, port, data)
            while True:
                if get(port, "/ready") == 200:
                    samples.append((time.perf_counter() - t0) * 1000)
                    break
                if proc.poll() is not None:
                    sys.exit(f"confab exited with {proc.returncode} before it was ready")
                if time.perf_counter() - t0 > 10:
                    sys.exit("confab was not ready within 10 s")
                time.sleep(0.0005)
            stop(proc)
    return samples


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return None


def ensure_wrk():
    if shutil.which("wrk"):
        return
    print("installing wrk from Debian's packages ...", file=sys.stderr)
    subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], check=True,
                   stdout=subprocess.DEVNULL)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", default="target/release/confab")
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--connections", type=int, default=50)
    ap.add_argument("--log-level", default="info",
                    help="info writes one JSON access-log line per request (as deployed); "
                         "warn shows what that line costs")
    args = ap.parse_args()
    global LOG_LEVEL
    LOG_LEVEL = args.log_level
    binary = os.path.abspath(args.binary)
    if not os.path.exists(binary):
        sys.exit(f"{binary} is missing: run cargo build --release -p confab-server first")

    size = os.path.getsize(binary)
    print(f"binary: {binary} {size / 1e6:.1f} MB ({size} bytes)")

    samples = cold_start(binary, args.runs)
    q = statistics.quantiles(samples, n=10)
    print(f"cold start to /ready over {len(samples)} runs: p50 {statistics.median(samples):.1f} ms, "
          f"p90 {q[8]:.1f} ms, min {min(samples):.1f} ms, max {max(samples):.1f} ms")

    port = free_port()
    with tempfile.TemporaryDirectory() as data:
        proc = start(binary, port, data, cpu=0)
        while get(port, "/ready") != 200:
            time.sleep(0.01)
        time.sleep(1.0)
        # taskset execs confab, so the pid is confab's either way.
        idle = rss_kib(proc.pid)
        print(f"idle RSS after 1 s: {idle / 1024:.1f} MiB ({idle} KiB)")

        ensure_wrk()
        cmd = ["wrk", "-t1", f"-c{args.connections}", f"-d{args.seconds}s", "--latency",
               f"http://127.0.0.1:{port}/live"]
        if shutil.which("taskset"):
            cmd = ["taskset", "-c", "1"] + cmd
        print("$ " + " ".join(cmd))
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        print(out.rstrip())
        print(f"RSS after load: {rss_kib(proc.pid) / 1024:.1f} MiB")
        stop(proc)


if __name__ == "__main__":
    main()
