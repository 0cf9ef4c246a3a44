#!/usr/bin/env python3
"""sluice against Triton 2.51 on the same Triton-style repository, in one run.

    .venv/bin/python scripts/triton-compare.py [--models mlp,cnn] [--rounds 3] \\
        [--concurrency 32] [--interval-ms 5000] [--rates mlp:1000,cnn:100]

Both servers serve one repository written the way a Triton user writes it: the bundled
weights and inputs/outputs, one CPU instance, `max_batch_size: 32` and
`dynamic_batching { max_queue_delay_microseconds: 2000 }` (`--count`, `--max-batch`,
`--delay` change them). sluice runs from this checkout's release binary with default
flags; Triton 2.51 through `scripts/tools/triton` (the `nvidia-pytriton` wheel: its Python
backend runs the same TorchScript file with torch's default threads). Each round, for
every model, on one server then the other:

1. perf_analyzer closed loop at `--concurrency` (no deadline), `--interval-ms` windows
   until three agree within `--stability` percent (at most `--max-trials`): throughput, p50 and p99 latency;
2. perf_analyzer at a fixed request rate (`--rates`): CPU seconds of the server's whole
   process tree (utime + stime from /proc, Triton's backend stubs included) per inference
   the server itself counted (ModelStatistics), the yardstick that a shared machine's
   drift moves least.

Prints the per-round numbers and a Markdown table of medians with the sluice / Triton
ratios; `--variant` adds rows for sluice with other flags, beside the default row;
`--baseline NAME=PATH` adds a row for another sluice binary (the build before a change,
say) with default flags, and with `--no-triton` the ratios are against the first
baseline instead (a before/after of one change, measured in one run).
perf_analyzer comes from `$PERF_ANALYZER` (default scripts/tools/perf-analyzer,
installed on first use); Triton is installed by `scripts/tools/triton setup` when missing
(a few minutes). Needs `make build`. Loopback only; both servers are stopped on exit.
"""

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sluice_serve import BIN, ROOT, inferences, start_server, tree_cpu_seconds, triton_style_repo

TRITON = ROOT / "scripts/tools/triton"
SLUICE_PORT, TRITON_PORT = 39501, 39511


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def perf_analyzer(args, port, model, load, work):
    out = work / "pa.csv"
    out.unlink(missing_ok=True)
    cmd = [args.perf_analyzer, "-m", model, "-u", f"127.0.0.1:{port}", "-i", "grpc",
           "--measurement-interval", str(args.interval_ms), "--max-trials", str(args.max_trials),
           "--stability-percentage", str(args.stability),
           "-f", str(out), *load]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=args.tool_timeout)
    if run.returncode != 0 or not out.exists():
        tail = (run.stdout + run.stderr).strip().splitlines()[-5:]
        log(f"  perf_analyzer failed ({run.returncode}): " + " | ".join(tail))
        return None
    row = next(csv.DictReader(out.open()))
    us = lambda key: float(row.get(key) or "nan")
    return {"throughput": float(row["Inferences/Second"]), "p50_ms": us("p50 latency") / 1e3,
            "p99_ms": us("p99 latency") / 1e3}


def cpu_per_inference(args, port, pid, model, rate, work):
    before_cpu, before_n = tree_cpu_seconds(pid), inferences(port, model)
    result = perf_analyzer(args, port, model, ["--request-rate-range", f"{rate}:{rate}"], work)
    cpu, n = tree_cpu_seconds(pid) - before_cpu, inferences(port, model) - before_n
    if result is None or n <= 0:
        return None
    result["cpu_us"] = 1e6 * cpu / n
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="mlp,cnn")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--interval-ms", type=int, default=5000)
    ap.add_argument("--max-trials", type=int, default=6)
    ap.add_argument("--stability", type=int, default=25,
                    help="perf_analyzer's --stability-percentage (the machine is shared)")
    ap.add_argument("--rates", default="mlp:1000,cnn:100",
                    help="fixed request rate per model for CPU per inference (0: skip)")
    ap.add_argument("--count", type=int, default=1)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--delay", type=int, default=2000, help="max_queue_delay_microseconds")
    ap.add_argument("--tool-timeout", type=float, default=300)
    ap.add_argument("--variant", action="append", default=[], metavar="ARGS",
                    help="also measure sluice started with these flags (repeatable), beside the "
                         "default, e.g. --variant='--intra-op-threads 1'")
    ap.add_argument("--baseline", action="append", default=[], metavar="NAME=PATH",
                    help="also measure this sluice binary with default flags (repeatable)")
    ap.add_argument("--no-triton", action="store_true",
                    help="leave Triton out; ratios against the first --baseline")
    ap.add_argument("--perf-analyzer",
                    default=os.environ.get("PERF_ANALYZER", str(ROOT / "scripts/tools/perf-analyzer")))
    args = ap.parse_args()
    models = [m for m in args.models.split(",") if m]
    rates = dict(item.split(":") for item in args.rates.split(",") if item)
    if not BIN.exists():
        sys.exit("build first: make build")
    work = Path(tempfile.mkdtemp(prefix="sluice-vs-triton-"))
    repo = triton_style_repo(work, models, args.count, args.max_batch, args.delay)
    baselines = [item.split("=", 1) for item in args.baseline]
    if args.no_triton and not baselines:
        sys.exit("--no-triton needs a --baseline to compare with")
    base = baselines[0][0] if args.no_triton else "Triton"
    if not args.no_triton and subprocess.run([str(TRITON), "status", str(TRITON_PORT)],
                                             capture_output=True).returncode == 0:
        sys.exit(f"a Triton already runs on port {TRITON_PORT}: scripts/tools/triton stop {TRITON_PORT}")
    sluices = []
    try:
        servers = {}
        if not args.no_triton:
            log("installing / checking Triton (scripts/tools/triton setup)...")
            subprocess.run([str(TRITON), "setup"], check=True, stdout=sys.stderr)
            log("starting Triton...")
            started = subprocess.run([str(TRITON), "start", str(repo), str(TRITON_PORT)],
                                     check=True, capture_output=True, text=True)
            triton_pid = int(started.stdout.split()[-1])
        log("starting sluice...")
        runs = [(f"sluice {v}".strip() if v else "sluice", v.split(), BIN) for v in [""] + args.variant]
        runs += [(name, [], Path(path)) for name, path in baselines]
        for i, (name, flags, binary) in enumerate(runs):
            port = SLUICE_PORT + 3 * i
            proc = start_server(repo, port, open(work / f"sluice-{i}.log", "w"), flags, binary)
            sluices.append(proc)
            servers[name] = (port, proc.pid)
        if not args.no_triton:
            servers["Triton"] = (TRITON_PORT, triton_pid)
        results = {}
        for r in range(args.rounds):
            for model in models:
                for name, (port, pid) in servers.items():
                    log(f"round {r + 1}/{args.rounds}: {model} on {name}: c={args.concurrency}...")
                    closed = perf_analyzer(args, port, model,
                                           ["--concurrency-range", f"{args.concurrency}:{args.concurrency}"],
                                           work)
                    results.setdefault((model, name, "closed"), []).append(closed)
                    rate = int(rates.get(model, 0))
                    if rate:
                        log(f"round {r + 1}/{args.rounds}: {model} on {name}: {rate}/s...")
                        fixed = cpu_per_inference(args, port, pid, model, rate, work)
                        results.setdefault((model, name, "fixed"), []).append(fixed)
                    show = lambda x: "failed" if x is None else (
                        f"{x['throughput']:.0f}/s p99 {x['p99_ms']:.1f} ms"
                        + (f", {x['cpu_us']:.0f} us CPU/inference" if "cpu_us" in x else ""))
                    log(f"  closed: {show(closed)}" + (f"; fixed: {show(fixed)}" if rate else ""))
        med = lambda rs, k: statistics.median(x[k] for x in rs if x) if any(rs) else float("nan")
        others = "" if args.no_triton else ", Triton 2.51 (Python backend, torch's default threads)"
        print(f"Repository: {', '.join(models)} with `max_batch_size: {args.max_batch}`, "
              f"`instance_group [{{ count: {args.count}, kind: KIND_CPU }}]`, "
              f"`dynamic_batching {{ max_queue_delay_microseconds: {args.delay} }}`; sluice with "
              f"default flags{others}. perf_analyzer "
              f"gRPC, {args.interval_ms} ms windows; {args.rounds} rounds alternating the servers; "
              f"medians (each round's value in brackets).\n")
        print(f"| model | server | inferences/s at c={args.concurrency} | p50 ms | p99 ms | vs {base} "
              f"| CPU us per inference at a fixed rate | vs {base} |")
        print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        for model in models:
            base_tp = med(results[(model, base, "closed")], "throughput")
            base_cpu = med(results.get((model, base, "fixed"), [None]), "cpu_us")
            for name in servers:
                closed = results[(model, name, "closed")]
                fixed = results.get((model, name, "fixed"), [None])
                each = ", ".join("-" if x is None else f"{x['throughput']:.0f}" for x in closed)
                each_cpu = ", ".join("-" if x is None else f"{x['cpu_us']:.0f}" for x in fixed)
                tp, cpu = med(closed, "throughput"), med(fixed, "cpu_us")
                print(f"| {model} | {name} | {tp:,.0f} ({each}) | {med(closed, 'p50_ms'):.1f} "
                      f"| {med(closed, 'p99_ms'):.1f} | {tp / base_tp:.2f}x "
                      f"| {cpu:,.0f} at {rates.get(model, '-')}/s ({each_cpu}) | {cpu / base_cpu:.2f}x |")
    finally:
        for proc in sluices:
            proc.terminate()
            proc.wait(timeout=30)
        if not args.no_triton:
            subprocess.run([str(TRITON), "stop", str(TRITON_PORT)], capture_output=True)


if __name__ == "__main__":
    main()
