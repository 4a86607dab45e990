"""Reward-server latency under 200 concurrent mixed requests: the fair scheduler vs whole requests in arrival order.

A tiny sequence-classifier RM (built locally, random head: the scores don't matter, the forward passes do) is
served by `python -m reward_models serve` in a subprocess, once with `--schedule fifo` (the baseline: the server's
earlier behaviour, one whole request per scorer call, in arrival order) and once with `--schedule fair` (chunks of
`--chunk` completions round-robin across the waiting requests). 200 client threads send their request at once:
190 small ones (4 completions) and 10 large ones (256 completions each). Prints p50/p99 latency per kind, the
wall time of the whole burst, and the ratios fair / fifo.

    python scripts/bench_reward_server.py [--repeats 2] [--chunk 64]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

SMALL, LARGE = (190, 4), (10, 256)  # (requests, completions each)


def build_model(out: Path) -> Path:
    from posttrain.models.tiny import TinySpec, save_tiny_model

    return save_tiny_model(out, TinySpec(hidden_size=64, intermediate_size=128))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def post(url: str, n: int, seed: int) -> tuple[int, float]:
    completions = [f"{(seed * 7 + i) % 97}+{i % 89}={(seed + i) % 186}" * 3 for i in range(n)]
    body = json.dumps({"prompts": ["add:"] * n, "completions": completions}).encode()
    request = urllib.request.Request(f"{url}/score", data=body, headers={"Content-Type": "application/json"})
    begin = time.monotonic()
    with urllib.request.urlopen(request, timeout=600) as response:
        assert len(json.loads(response.read())["scores"]) == n
    return n, time.monotonic() - begin


def burst(url: str) -> dict[str, float]:
    kinds = [SMALL[1]] * SMALL[0] + [LARGE[1]] * LARGE[0]
    order = sorted(range(len(kinds)), key=lambda i: (i * 37) % len(kinds))  # large ones spread through the burst
    begin = time.monotonic()
    with ThreadPoolExecutor(max_workers=len(kinds)) as pool:
        results = list(pool.map(lambda i: post(url, kinds[i], i), order))
    wall = time.monotonic() - begin
    out = {"wall_s": wall}
    for name, size in (("small", SMALL[1]), ("large", LARGE[1])):
        times = sorted(t for n, t in results if n == size)
        out[f"{name}_p50_s"] = statistics.median(times)
        out[f"{name}_p99_s"] = times[min(len(times) - 1, round(0.99 * (len(times) - 1)))]
    return out


def serve_and_measure(model: Path, schedule: str, chunk: int, repeats: int) -> dict[str, float]:
    port = free_port()
    cmd = [sys.executable, "-m", "reward_models", "serve", "--kind", "sequence_classifier", "--model", str(model),
           "--port", str(port), "--schedule", schedule, "--chunk", str(chunk), "--batch-size", "16",
           "--max-length", "128", "--log-level", "warning"]  # fmt: skip
    server = subprocess.Popen(cmd, stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(f"{url}/health", timeout=1).read()
                break
            except OSError:
                time.sleep(0.1)
        post(url, 8, 0)  # warm-up
        runs = [burst(url) for _ in range(repeats)]
    finally:
        server.terminate()
        server.wait(30)
    return {key: statistics.median(r[key] for r in runs) for key in runs[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--chunk", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(Path(tmp) / "rm")
        fifo = serve_and_measure(model, "fifo", args.chunk, args.repeats)
        fair = serve_and_measure(model, "fair", args.chunk, args.repeats)
    print(f"200 concurrent requests ({SMALL[0]} x {SMALL[1]} completions, {LARGE[0]} x {LARGE[1]}), "
          f"median of {args.repeats} bursts; baseline: --schedule fifo")  # fmt: skip
    print(f"{'metric':<14} {'fifo':>9} {'fair':>9} {'fair/fifo':>10}")
    for key in fifo:
        print(f"{key:<14} {fifo[key]:>9.3f} {fair[key]:>9.3f} {fair[key] / fifo[key]:>10.2f}")


if __name__ == "__main__":
    main()
