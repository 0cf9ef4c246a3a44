#!/usr/bin/env python3
"""Server CPU per successful request at a fixed open-loop rate, for two sluice binaries
measured alternately in one run.

    .venv/bin/python scripts/cpu-per-request.py --baseline-bin OTHER/target/release/sluice \\
        [--model mlp] [--rate 1000] [--rounds 3] [--triton-style]

Each round serves the bundled repository from this checkout's release binary and from
`--baseline-bin` in turn (default flags), drives each with sluice-bench (constant
arrivals, 2 s warm-up, `--seconds` measured) and reads the server's utime + stime from
/proc over the measured part. CPU time per success is steadier than throughput on a
shared machine. `--triton-style` serves instead a copy of the model with the config a
Triton user would write (one instance, `max_queue_delay_microseconds: 2000`, no queue
policy). Prints one Markdown row per round and binary, and the medians. Needs
`make build` and `cargo build --release -p sluice-bench`; Linux only.
"""

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from sluice_serve import BIN, ROOT, start_server, triton_style_repo

BENCH = ROOT / "target/release/sluice-bench"
PORT = 39411
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid):
    stat = open(f"/proc/{pid}/stat").read()
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def measure(binary, args, work):
    repo = triton_style_repo(work, [args.model]) if args.triton_style else ROOT / "models"
    with open(work / "server.log", "a") as log:
        server = start_server(repo, PORT, log, binary=binary)
    try:
        out = work / "run.json"
        cmd = [str(BENCH), "run", "-m", args.model, "-u", f"127.0.0.1:{PORT}",
               "--rate", str(args.rate), "--arrival", "constant", "--warmup", "2s",
               "--duration", f"{args.seconds}s", "-q", "--json", str(out)]
        samples = {}

        def sample():
            # The measured part starts after the 2 s warm-up.
            time.sleep(2.0)
            samples["start"] = (time.monotonic(), cpu_seconds(server.pid))
            time.sleep(args.seconds)
            samples["end"] = (time.monotonic(), cpu_seconds(server.pid))

        sampler = threading.Thread(target=sample)
        sampler.start()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        sampler.join()
        report = json.loads(out.read_text())
    finally:
        server.terminate()
        server.wait(timeout=60)
    point = report["points"][0]
    ok = point["codes"].get("OK", 0)
    (t0, c0), (t1, c1) = samples["start"], samples["end"]
    seconds = t1 - t0
    successes_per_s = ok / args.seconds
    return {
        "cpu_us_per_success": (c1 - c0) / (successes_per_s * seconds) * 1e6,
        "cores": (c1 - c0) / seconds,
        "ok_per_s": successes_per_s,
        "p50_ms": (point["latency_ms"]["ok"] or {}).get("p50", float("nan")),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline-bin", required=True)
    ap.add_argument("--model", default="mlp")
    ap.add_argument("--rate", type=int, default=1000)
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--triton-style", action="store_true",
                    help="serve the model with a Triton-style config instead of the bundled one")
    args = ap.parse_args()
    binaries = {"this checkout": str(BIN), "baseline": args.baseline_bin}
    results = {name: [] for name in binaries}
    print("| round | binary | CPU per success | server cores | successes/s | p50 ms |")
    print("| ---: | --- | ---: | ---: | ---: | ---: |")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for r in range(1, args.rounds + 1):
            order = list(binaries.items())
            if r % 2 == 0:
                order.reverse()
            for name, binary in order:
                m = measure(binary, args, work)
                results[name].append(m)
                print(f"| {r} | {name} | {m['cpu_us_per_success']:.0f} us | {m['cores']:.3f} "
                      f"| {m['ok_per_s']:.0f} | {m['p50_ms']:.2f} |", flush=True)
    print()
    for name, runs in results.items():
        med = statistics.median(m["cpu_us_per_success"] for m in runs)
        print(f"median CPU per success, {name}: {med:.0f} us")
    a = statistics.median(m["cpu_us_per_success"] for m in results["this checkout"])
    b = statistics.median(m["cpu_us_per_success"] for m in results["baseline"])
    print(f"ratio this checkout / baseline: {a / b:.2f}")


if __name__ == "__main__":
    main()
