#!/usr/bin/env python3
"""Where the CPU goes under open-loop load: model instance threads, the server's network
(Tokio) threads and the load generator.

    scripts/cpu-split.py [--model cnn] [--rate 3500] [--rounds 3] [--deadline 100ms]

Serves the bundled repository from the release binary and, in each round, drives it with
sluice-bench (Poisson arrivals, 2 connections, 2 s warm-up, 8 s measured) while reading
every thread's CPU time from /proc/PID/task/*/stat over 6 s of the measured part. Prints
one Markdown row per round: cores used by each group, goodput and answer codes. Needs
`make build` and `cargo build --release -p sluice-bench`; Linux only.
"""

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sluice_serve import BIN, start_server

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "target/release/sluice-bench"
PORT = 39301


def thread_ticks(pid):
    """CPU ticks (user + system) per thread id, with the thread's name."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = open(f"/proc/{pid}/task/{tid}/stat").read()
        except OSError:
            continue  # the thread ended
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        out[tid] = (name, int(fields[11]) + int(fields[12]))
    return out


def cores(before, after, seconds, group):
    hz = os.sysconf("SC_CLK_TCK")
    used = collections.Counter()
    for tid, (name, ticks) in after.items():
        used[group(name)] += ticks - before.get(tid, (name, 0))[1]
    return {k: v / hz / seconds for k, v in used.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="cnn")
    ap.add_argument("--rate", default="3500")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--deadline", default="100ms")
    args = ap.parse_args()
    if not (BIN.exists() and BENCH.exists()):
        sys.exit("build first: make build && cargo build --release -p sluice-bench")
    work = Path(tempfile.mkdtemp(prefix="sluice-cpu-"))
    server = start_server(ROOT / "models", PORT, open(work / "server.log", "w"))
    group = lambda name: "instances" if name.startswith("model-") else "network"
    print(f"Model `{args.model}`, open loop (Poisson) at {args.rate}/s, deadline {args.deadline}, "
          f"cores used over 6 s per round:\n")
    print("| round | model instances | server network threads | load generator | goodput/s | codes |")
    print("| ---: | ---: | ---: | ---: | ---: | --- |")
    try:
        for r in range(args.rounds):
            out = work / "run.json"
            gen = subprocess.Popen(
                [str(BENCH), "run", "-m", args.model, "-u", f"127.0.0.1:{PORT}", "--connections", "2",
                 "--deadline", args.deadline, "--arrival", "poisson", "--warmup", "2s", "--duration", "8s",
                 "--rate", args.rate, "-q", "--json", str(out)], stdout=subprocess.DEVNULL)
            time.sleep(3)
            s0, g0, t0 = thread_ticks(server.pid), thread_ticks(gen.pid), time.monotonic()
            time.sleep(6)
            s1, g1, t1 = thread_ticks(server.pid), thread_ticks(gen.pid), time.monotonic()
            if gen.wait() != 0:
                sys.exit("sluice-bench failed")
            srv = cores(s0, s1, t1 - t0, group)
            client = sum(cores(g0, g1, t1 - t0, lambda _: "all").values())
            point = json.loads(out.read_text())["points"][0]
            codes = ", ".join(f"{k} {v}" for k, v in sorted(point["codes"].items()))
            print(f"| {r + 1} | {srv.get('instances', 0):.2f} | {srv.get('network', 0):.2f} | {client:.2f} "
                  f"| {point['goodput_rps']:.0f} | {codes} |", flush=True)
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
