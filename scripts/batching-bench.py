#!/usr/bin/env python3
"""Dynamic batching on vs off, and each model's compute limit, in one run.

    scripts/batching-bench.py [--models mlp,cnn] [--concurrency 1,8,16,32] [--rounds 3]

Serves the bundled repository twice from the release binary: as committed (batching on)
and a copy whose configs drop `dynamic_batching` (every request runs alone). For each
model and concurrency it runs sluice-bench (closed loop) against one server, then the
other, `--rounds` times alternating, and reports the median of the rounds. Then it runs
the `forward` example (forward only, no gateway) for every instance/thread split that
fills the machine's cores and every batch size, and reports each model's best as its
compute limit. Prints Markdown tables. Needs `make build` and
`cargo build --release -p sluice --example forward` first.

Both servers run with default flags (the adaptive concurrency limit included); a
closed-loop client without deadlines is never refused for queueing alone, so the
comparison is of batching. `--server-args` adds flags to both, for experiments.
"""

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from sluice_serve import BIN, start_server


ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "target/release/sluice-bench"
FORWARD = ROOT / "target/release/examples/forward"


def without_dynamic_batching(text):
    """The config text with its `dynamic_batching { ... }` block removed."""
    start = text.index("dynamic_batching")
    i = text.index("{", start)
    depth = 0
    while True:
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        i += 1
        if depth == 0:
            return text[:start] + text[i:]


def unbatched_copy(models, work):
    repo = work / "unbatched"
    for m in models:
        (repo / m / "1").mkdir(parents=True)
        os.symlink(ROOT / "models" / m / "1" / "model.pt", repo / m / "1" / "model.pt")
        text = (ROOT / "models" / m / "config.pbtxt").read_text()
        (repo / m / "config.pbtxt").write_text(without_dynamic_batching(text))
    return repo


def bench_point(port, model, concurrency, args, out):
    cmd = [str(BENCH), "run", "-m", model, "-u", f"127.0.0.1:{port}",
           "--concurrency", str(concurrency), "--connections", str(args.connections),
           "--warmup", args.warmup, "--duration", args.duration, "-q", "--json", str(out)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    point = json.loads(out.read_text())["points"][0]
    ok = point["latency_ms"]["ok"] or {}
    errors = point["answered"] - point["codes"].get("OK", 0)
    return {"rps": point["inferences_per_s"], "p50": ok.get("p50", float("nan")),
            "p99": ok.get("p99", float("nan")), "errors": errors}


def compute_limit(model, args):
    """Best forward-only throughput over instance/thread splits and batch sizes."""
    cores = os.cpu_count() or 1
    splits = [(i, cores // i) for i in range(1, cores + 1) if cores % i == 0]
    best = None
    rows = []
    for instances, threads in splits:
        out = subprocess.run(
            [str(FORWARD), str(ROOT / "models" / model), "--batch", args.forward_batches,
             "--instances", str(instances), "--threads", str(threads),
             "--seconds", str(args.forward_seconds)],
            check=True, capture_output=True, text=True).stdout
        for line in out.splitlines():
            m = re.match(r"\s*(\d+)\s+([\d.]+) us\s+([\d.]+) us\s+(\d+)", line)
            if m:
                batch, p50, rate = int(m[1]), float(m[2]), float(m[4])
                rows.append((instances, threads, batch, p50, rate))
                if best is None or rate > best[4]:
                    best = (instances, threads, batch, p50, rate)
    return best, rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="mlp,cnn")
    ap.add_argument("--concurrency", default="1,8,16,32")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--connections", type=int, default=2)
    ap.add_argument("--warmup", default="1s")
    ap.add_argument("--duration", default="6s")
    ap.add_argument("--forward-batches", default="1,2,4,8,16,32")
    ap.add_argument("--forward-seconds", type=float, default=2.0)
    ap.add_argument("--skip-forward", action="store_true")
    ap.add_argument("--server-args", default="", help="extra flags for both servers")
    args = ap.parse_args()
    models = args.models.split(",")
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    for tool in (BIN, BENCH) + (() if args.skip_forward else (FORWARD,)):
        if not tool.exists():
            sys.exit(f"{tool} missing: make build; cargo build --release -p sluice --example forward")

    work = Path(tempfile.mkdtemp(prefix="sluice-batching-"))
    procs = []
    try:
        logs = [open(work / "on.log", "w"), open(work / "off.log", "w")]
        extra = args.server_args.split()
        procs.append(start_server(ROOT / "models", 39001, logs[0], extra))
        procs.append(start_server(unbatched_copy(models, work), 39011, logs[1], extra))
        ports = {"on": 39001, "off": 39011}
        results = {}
        total = len(models) * len(concurrencies) * args.rounds * 2
        done = 0
        for model in models:
            for c in concurrencies:
                for r in range(args.rounds):
                    for mode in ("on", "off"):
                        res = bench_point(ports[mode], model, c, args, work / "point.json")
                        results.setdefault((model, c, mode), []).append(res)
                        done += 1
                        print(f"[{done}/{total}] {model} c={c} batching {mode} round {r + 1}: "
                              f"{res['rps']:.0f}/s p50 {res['p50']:.2f} ms p99 {res['p99']:.2f} ms",
                              file=sys.stderr, flush=True)
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=30)
        procs.clear()

        limits = {}
        if not args.skip_forward:
            for model in models:
                print(f"compute limit of {model} (forward only)...", file=sys.stderr, flush=True)
                limits[model] = compute_limit(model, args)

        print(f"Closed loop, sluice-bench, {args.connections} connection(s), {args.rounds} rounds "
              f"alternating on/off of {args.duration} after {args.warmup} warm-up; medians of the "
              "rounds (each round's inferences/s in the rounds column).\n")
        print("| model | concurrency | batching | inferences/s (median) | rounds | p50 ms | p99 ms | errors | vs off | of compute limit |")
        print("| --- | ---: | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |")
        for model in models:
            for c in concurrencies:
                off = statistics.median(r["rps"] for r in results[(model, c, "off")])
                for mode in ("on", "off"):
                    rs = results[(model, c, mode)]
                    rps = statistics.median(r["rps"] for r in rs)
                    p50 = statistics.median(r["p50"] for r in rs)
                    p99 = statistics.median(r["p99"] for r in rs)
                    errors = sum(r["errors"] for r in rs)
                    limit = limits.get(model)
                    all_rounds = ", ".join(f"{r['rps']:.0f}" for r in rs)
                    share = f"{100 * rps / limit[0][4]:.0f}%" if limit else "-"
                    print(f"| {model} | {c} | {mode} | {rps:,.0f} | {all_rounds} "
                          f"| {p50:.2f} | {p99:.2f} | {errors} | {rps / off:.2f}x | {share} |")
        if limits:
            print("\nCompute limit (forward only, all instances busy, every split of the cores):\n")
            print("| model | instances x threads | batch | p50 forward us | inferences/s |")
            print("| --- | --- | ---: | ---: | ---: |")
            for model, (best, rows) in limits.items():
                for inst, thr, batch, p50, rate in rows:
                    mark = " **best**" if (inst, thr, batch) == best[:3] else ""
                    print(f"| {model} | {inst} x {thr} | {batch} | {p50:,.0f} | {rate:,.0f}{mark} |")
    finally:
        for p in procs:
            p.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
