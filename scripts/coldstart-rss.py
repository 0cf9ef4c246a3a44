#!/usr/bin/env python3
"""Cold-start latency vs warm latency, and RSS with models loaded vs scaled to zero.

    .venv/bin/python scripts/coldstart-rss.py [--binary target/release/sluice] [--rounds 5]

Starts sluice on the bundled models with `--min-instances 0 --idle-timeout-secs 1`, so
every model scales to zero one second after its last request. For each model and round:
wait until no instance is loaded, send one request (cold: load + warm-up + inference),
then 20 more (warm). Prints medians, and the server's RSS (VmRSS) with one instance per
model loaded and with all scaled to zero, as Markdown.
"""

from __future__ import annotations

import argparse
import re
import socket
import statistics
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {"mlp": [1, 64], "cnn": [1, 3, 64, 64]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", text).group(1)) / 1024


def instances(metrics_url: str, model: str) -> float:
    body = urllib.request.urlopen(metrics_url, timeout=2).read().decode()
    m = re.search(rf'^sluice_instances{{model="{model}"}} (\S+)$', body, re.M)
    return float(m.group(1)) if m else -1.0


def wait_for(predicate, what: str, limit_s: float = 60.0) -> None:
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > limit_s:
            raise TimeoutError(what)
        time.sleep(0.05)


def infer_ms(client, model: str) -> float:
    x = np.random.rand(*SHAPES[model]).astype(np.float32)
    inp = grpcclient.InferInput("INPUT__0", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    t = time.perf_counter()
    client.infer(model, [inp])
    return (time.perf_counter() - t) * 1000


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--binary", default=str(ROOT / "target/release/sluice"))
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    grpc, http, metrics = free_port(), free_port(), free_port()
    proc = subprocess.Popen([
        args.binary, "--model-repository", str(ROOT / "models"), "--grpc-port", str(grpc),
        "--http-port", str(http), "--metrics-port", str(metrics), "--log-level", "warn",
        "--min-instances", "0", "--idle-timeout-secs", "1",
    ])
    metrics_url = f"http://127.0.0.1:{metrics}/metrics"
    try:
        wait_for(lambda: urllib.request.urlopen(f"http://127.0.0.1:{http}/v2/health/ready", timeout=1).status == 200
                 if _up(http) else False, "ready")
        loaded = rss_mib(proc.pid)
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc}")
        rows = []
        for model in SHAPES:
            cold, warm = [], []
            for _ in range(args.rounds):
                wait_for(lambda: instances(metrics_url, model) == 0, f"{model} scaled to zero")
                cold.append(infer_ms(client, model))
                warm.extend(infer_ms(client, model) for _ in range(20))
            rows.append((model, statistics.median(cold), statistics.median(warm)))
        for model in SHAPES:
            wait_for(lambda: instances(metrics_url, model) == 0, f"{model} scaled to zero")
        time.sleep(0.5)
        zero = rss_mib(proc.pid)
        print("| model | cold start, first request (median) | warm request (median) | ratio |")
        print("| --- | ---: | ---: | ---: |")
        for model, c, w in rows:
            print(f"| {model} | {c:.1f} ms | {w:.2f} ms | {c / w:.0f}x |")
        print()
        print("| server state | RSS |")
        print("| --- | ---: |")
        print(f"| both models loaded (one instance each, after start-up) | {loaded:.0f} MiB |")
        print(f"| both models scaled to zero | {zero:.0f} MiB |")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _up(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


if __name__ == "__main__":
    main()
