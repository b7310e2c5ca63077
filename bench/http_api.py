"""`diffuse http` benchmarks, each beside its baseline in this run, on one warm daemon (tiny model).

1. One txt2img through HTTP (A1111's /sdapi/v1/txt2img: JSON in, the job queued, the PNG read and
   sent back as base64) vs the same job through the Python `Client` (submit, wait, the PNG read):
   same prompt, steps, size, sampler and seed, run alternately. Target: ratio ≤ 1.05.
2. /sdapi/v1/progress with 20 concurrent pollers (threads, one keep-alive connection each) for a
   few seconds, while the daemon is idle and while a job runs: requests per second and latency.

The daemon and the HTTP server are subprocesses in a temporary folder; both end with the bench.

    python bench/http_api.py [--repeats 7] [--steps 20] [--size 128] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import base64
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

from diffusiond.clients.client import Client, DaemonUnreachable

PROMPT = "a lighthouse at dusk, oil painting"
POLLERS = 20


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _start(home: Path, threads: int) -> tuple[subprocess.Popen, subprocess.Popen, str]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    config = home / "config.toml"
    config.write_text(f'model = "tiny"\ndevice = "cpu"\nruntime_dir = "{home / "run"}"\n'
                      f'state_dir = "{home / "state"}"\noutput_dir = "{home / "out"}"\n')
    daemon = subprocess.Popen([sys.executable, "-m", "diffusiond.daemon.cli", "serve", "--config", str(config)],
                              stdout=open(home / "daemon.log", "wb"), stderr=subprocess.STDOUT, env=env)
    with Client(home / "run", timeout=1) as client:
        deadline = time.monotonic() + 120
        while True:
            try:
                if client.ping()["ready"]:
                    break
            except DaemonUnreachable:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"the daemon did not get ready: see {home / 'daemon.log'}")
            time.sleep(0.1)
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "diffusiond.clients.cli", "--runtime-dir", str(home / "run"),
                               "http", "--port", str(port)], stdout=open(home / "http.log", "wb"),
                              stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            requests.get(base + "/sdapi/v1/samplers", timeout=1)
            return daemon, server, base
        except requests.ConnectionError:
            if time.monotonic() > deadline:
                raise SystemExit(f"diffuse http did not answer: see {home / 'http.log'}") from None
            time.sleep(0.05)


def through_http(session: requests.Session, base: str, steps: int, size: int, seed: int) -> float:
    start = time.perf_counter()
    reply = session.post(base + "/sdapi/v1/txt2img", json={
        "prompt": PROMPT, "steps": steps, "width": size, "height": size, "seed": seed, "sampler_name": "DPM++ 2M"})
    reply.raise_for_status()
    images = [base64.b64decode(image) for image in reply.json()["images"]]
    elapsed = time.perf_counter() - start
    assert len(images) == 1 and images[0].startswith(b"\x89PNG")
    return elapsed


def through_client(client: Client, steps: int, size: int, seed: int) -> float:
    start = time.perf_counter()
    job = client.submit(PROMPT, steps=steps, width=size, height=size, seed=seed, scheduler="dpmpp_2m")
    done = client.wait(job["id"], timeout=600)
    images = [Path(path).read_bytes() for path in done["outputs"]]
    elapsed = time.perf_counter() - start
    assert len(images) == 1 and images[0].startswith(b"\x89PNG")
    return elapsed


def poll_progress(base: str, seconds: float) -> tuple[float, list[float]]:
    """Requests per second of POLLERS threads polling /progress for ``seconds``, and every latency."""
    stop = time.monotonic() + seconds
    latencies: list[list[float]] = [[] for _ in range(POLLERS)]

    def poller(mine: list[float]) -> None:
        with requests.Session() as session:
            while time.monotonic() < stop:
                start = time.perf_counter()
                session.get(base + "/sdapi/v1/progress").raise_for_status()
                mine.append(time.perf_counter() - start)

    threads = [threading.Thread(target=poller, args=(mine,)) for mine in latencies]
    begun = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    every = [latency for mine in latencies for latency in mine]
    return len(every) / (time.monotonic() - begun), every


def _percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1, help="the daemon's torch threads")
    parser.add_argument("--poll-seconds", type=float, default=5.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="diffusiond-bench-http-") as folder:
        home = Path(folder)
        daemon, server, base = _start(home, args.threads)
        try:
            with Client(home / "run", timeout=30) as client, requests.Session() as session:
                through_http(session, base, args.steps, args.size, 0)  # warm both paths
                through_client(client, args.steps, args.size, 0)
                http_times, client_times = [], []
                for seed in range(1, args.repeats + 1):
                    http_times.append(through_http(session, base, args.steps, args.size, seed))
                    client_times.append(through_client(client, args.steps, args.size, seed))
                http_median, client_median = statistics.median(http_times), statistics.median(client_times)
                print(f"1. one txt2img, {args.steps} steps {args.size}x{args.size}, median of {args.repeats} alternating:")
                print(f"   through HTTP {http_median * 1000:.1f} ms, through Client {client_median * 1000:.1f} ms, "
                      f"ratio {http_median / client_median:.3f} (target ≤ 1.05)")

                rate, latencies = poll_progress(base, args.poll_seconds)
                print(f"2. /progress, {POLLERS} pollers, daemon idle: {rate:.0f} requests/s, "
                      f"p50 {_percentile(latencies, 0.5) * 1000:.1f} ms, p99 {_percentile(latencies, 0.99) * 1000:.1f} ms")
                job = client.submit(PROMPT, steps=150, width=256, height=256, seed=1)
                rate, latencies = poll_progress(base, args.poll_seconds)
                running = client.get(job["id"])["state"] == "running"
                print(f"   while a job runs{'' if running else ' (it ended before the polling did)'}: {rate:.0f} "
                      f"requests/s, p50 {_percentile(latencies, 0.5) * 1000:.1f} ms, "
                      f"p99 {_percentile(latencies, 0.99) * 1000:.1f} ms")
                client.cancel(job["id"])
        finally:
            server.terminate()
            server.wait(timeout=30)
            with Client(home / "run") as client:
                client.call("shutdown")
            daemon.wait(timeout=60)


if __name__ == "__main__":
    main()
