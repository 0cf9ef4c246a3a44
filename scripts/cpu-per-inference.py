#!/usr/bin/env python3
"""CPU per inference at fixed request rates, and CPU per refused request under overload,
for any KServe v2 gRPC server (sluice, Triton, ...) given its process id.

    # a server that is already running:
    .venv/bin/python scripts/cpu-per-inference.py --pid PID --url 127.0.0.1:8001 \\
        --points mlp:1000,cnn:100 [--refusals cnn:5]
    # sluice binaries served here in turn (before/after a change, one run):
    .venv/bin/python scripts/cpu-per-inference.py --server after=target/release/sluice \\
        --server before=/tmp/sluice-before --triton-style --points mlp:1000 --rounds 3

A point `MODEL:RATE` drives the model with sluice-bench at RATE requests/s, evenly spaced
(one connection, no deadline), and after `--warmup` reads, over `--seconds`:
the utime + stime of the server's whole process tree from /proc (child processes, such as
Triton's backend stubs, included) and the inferences the server itself counted
(ModelStatistics). CPU per inference is the one divided by the other: on a shared machine
it drifts far less than throughput does.

`--refusals MODEL:K` measures what a refusal costs: first the model's capacity C and its
CPU per success when saturated (closed loop, 32 clients, no deadline), then an open-loop
point at K x C with a `--deadline`. The server's CPU beyond what its successes cost at
saturation, divided by the requests it refused: CPU per refusal = (CPU - successes x CPU
per success at saturation) / refusals. For sluice (found by its thread names) the same is
printed for its network threads alone, which is where a refusal's work is done, and
(with its metrics address) the refusals' latency inside the server, from HEADERS frame to
answer, from its `sluice_refusal_duration_seconds` histogram.

With `--server NAME=BIN` (repeatable) the script serves the bundled repository, or a
Triton-style copy with `--triton-style` (one instance, max batch 32, 2 ms batching
delay), from each sluice binary in turn with default flags, alternating the order each
round, and prints every round and the medians. Needs `make build` and
`cargo build --release -p sluice-bench`; Linux only; loopback only.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from sluice_serve import ROOT, TICK, inferences, start_server, tree_cpu_seconds, triton_style_repo

BENCH = ROOT / "target/release/sluice-bench"
PORT = 39441


def network_cpu_seconds(pid):
    """CPU of sluice's threads other than its model instances' (named model-*, their
    OpenMP threads inherit the name): the network threads. None for other servers."""
    total, found = 0, False
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    for tid in tasks:
        try:
            stat = open(f"/proc/{pid}/task/{tid}/stat").read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if stat[stat.index("(") + 1:stat.rindex(")")].startswith("model-"):
            found = True
        else:
            total += int(fields[11]) + int(fields[12])
    return total / TICK if found else None


def refusal_buckets(metrics):
    """sluice's refusal-duration histogram (both stages summed): {upper bound: count}, or
    None when `metrics` (host:port) is not given or does not export it."""
    if not metrics:
        return None
    try:
        with urllib.request.urlopen(f"http://{metrics}/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return None
    buckets = {}
    for line in text.splitlines():
        if line.startswith("sluice_refusal_duration_seconds_bucket{"):
            le = line[line.index('le="') + 4:].split('"', 1)[0]
            bound = float("inf") if le == "+Inf" else float(le)
            buckets[bound] = buckets.get(bound, 0) + float(line.rsplit(" ", 1)[1])
    return buckets


def latency_quantile(before, after, q):
    """The histogram bucket bound under which fraction `q` of the refusals between two
    samples were answered, and the fraction answered within 1 ms."""
    if before is None or after is None:
        return None, None
    delta = {b: after.get(b, 0) - before.get(b, 0) for b in after}
    total = delta.get(float("inf"), 0)
    if total <= 0:
        return None, None
    bound = next(b for b in sorted(delta) if delta[b] >= q * total)
    return bound, delta.get(0.001, 0) / total


def sample(pid, url, model, metrics=None):
    return {"t": time.monotonic(), "cpu": tree_cpu_seconds(pid), "net": network_cpu_seconds(pid),
            "n": inferences(url, model), "refusals": refusal_buckets(metrics)}


def drive(args, url, pid, model, load):
    """Run sluice-bench with `load` flags; sample the server over the measured part."""
    out = Path(tempfile.mkstemp(prefix="sluice-cpi-", suffix=".json")[1])
    cmd = [str(BENCH), "run", "-m", model, "-u", url, "--warmup", f"{args.warmup}s",
           "--duration", f"{args.seconds}s", "-q", "--json", str(out), *load]
    marks = {}

    def sampler():
        time.sleep(args.warmup)
        marks["start"] = sample(pid, url, model, args.metrics)
        time.sleep(args.seconds)
        marks["end"] = sample(pid, url, model, args.metrics)

    thread = threading.Thread(target=sampler)
    thread.start()
    run = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         timeout=args.warmup + args.seconds + 120)
    thread.join()
    if run.returncode != 0:
        sys.exit(f"sluice-bench failed: {run.stderr.strip()[-500:]}")
    point = json.loads(out.read_text())["points"][0]
    out.unlink()
    a, b = marks["start"], marks["end"]
    codes = point["codes"]
    ok = codes.get("OK", 0)
    p99_bound, within_1ms = latency_quantile(a["refusals"], b["refusals"], 0.99)
    return {
        "refusal_p99_le_s": p99_bound, "refusals_within_1ms": within_1ms,
        "seconds": b["t"] - a["t"], "cpu": b["cpu"] - a["cpu"], "n": b["n"] - a["n"],
        "net": None if a["net"] is None else b["net"] - a["net"],
        # The client's counts cover its whole measured window, which the samples match.
        "ok": ok, "refused": sum(v for k, v in codes.items() if k != "OK"), "codes": codes,
        "p50_ms": (point["latency_ms"]["ok"] or {}).get("p50", float("nan")),
        "throughput": point.get("goodput_rps", ok / args.seconds),
    }


def fixed_rate(args, url, pid, model, rate):
    m = drive(args, url, pid, model, ["--rate", str(rate), "--arrival", "constant"])
    if m["n"] <= 0:
        sys.exit(f"the server counted no inferences of {model} at {rate}/s")
    return {"cpu_us": 1e6 * m["cpu"] / m["n"], "cores": m["cpu"] / m["seconds"],
            "per_s": m["n"] / m["seconds"], "p50_ms": m["p50_ms"], "errors": m["refused"]}


def refusal_cost(args, url, pid, model, factor):
    sat = drive(args, url, pid, model, ["--concurrency", "32"])
    if sat["n"] <= 0:
        sys.exit(f"the server counted no inferences of {model} at saturation")
    capacity = sat["n"] / sat["seconds"]
    per_ok, net_per_ok = sat["cpu"] / sat["n"], None
    if sat["net"] is not None:
        net_per_ok = sat["net"] / sat["n"]
    rate = round(capacity * factor)
    over = drive(args, url, pid, model, ["--rate", str(rate), "--arrival", "poisson",
                                         "--deadline", args.deadline, "--connections", "2"])
    refused = max(over["refused"], 1)
    cost = lambda total, each_ok: 1e6 * (total - over["n"] * each_ok) / refused
    return {"capacity": capacity, "rate": rate, "ok_per_s": over["n"] / over["seconds"],
            "refused": over["refused"], "codes": over["codes"],
            "refusal_p99_le_s": over["refusal_p99_le_s"],
            "refusals_within_1ms": over["refusals_within_1ms"],
            "cpu_us": cost(over["cpu"], per_ok),
            "net_us": None if net_per_ok is None or over["net"] is None else cost(over["net"], net_per_ok)}


def pairs(text, kind):
    out = []
    for item in filter(None, text.split(",")):
        model, _, value = item.partition(":")
        if not value:
            sys.exit(f"expected MODEL:{kind}, got {item!r}")
        out.append((model, float(value)))
    return out


def measure_server(args, url, pid):
    rows = []
    for model, rate in pairs(args.points, "RATE"):
        r = fixed_rate(args, url, pid, model, int(rate))
        rows.append(("point", model, rate, r))
        print(f"  {model} at {rate:.0f}/s: {r['cpu_us']:.0f} us CPU per inference, {r['cores']:.3f} "
              f"cores, {r['per_s']:.0f} inferences/s, p50 {r['p50_ms']:.2f} ms, {r['errors']} errors",
              file=sys.stderr, flush=True)
    for model, factor in pairs(args.refusals or "", "FACTOR"):
        r = refusal_cost(args, url, pid, model, factor)
        rows.append(("refusal", model, factor, r))
        net = "" if r["net_us"] is None else f", network threads {r['net_us']:.1f} us"
        if r["refusal_p99_le_s"] is not None:
            net += (f"; refusal latency in the server: p99 <= {r['refusal_p99_le_s'] * 1e3:g} ms, "
                    f"{100 * r['refusals_within_1ms']:.1f}% within 1 ms")
        print(f"  {model} at {factor:g}x capacity ({r['capacity']:.0f}/s -> {r['rate']}/s): "
              f"{r['cpu_us']:.1f} us CPU per refusal{net}; {r['ok_per_s']:.0f} served/s, "
              f"codes {r['codes']}", file=sys.stderr, flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pid", type=int, help="a running server's process id")
    ap.add_argument("--url", default="127.0.0.1:8001", help="its gRPC address (with --pid)")
    ap.add_argument("--metrics", default=None,
                    help="its metrics address (with --pid), for sluice's refusal latencies")
    ap.add_argument("--server", action="append", default=[], metavar="NAME=BIN",
                    help="serve with this sluice binary (repeatable)")
    ap.add_argument("--triton-style", action="store_true")
    ap.add_argument("--points", default="mlp:1000,cnn:100", help="MODEL:RATE,...")
    ap.add_argument("--refusals", default="", help="MODEL:FACTOR,... (overload at FACTOR x capacity)")
    ap.add_argument("--deadline", default="100ms", help="deadline of the overload requests")
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--warmup", type=float, default=2)
    ap.add_argument("--rounds", type=int, default=1)
    args = ap.parse_args()
    if not BENCH.exists():
        sys.exit("build first: cargo build --release -p sluice-bench")
    if args.pid:
        for r in range(args.rounds):
            print(f"round {r + 1}, pid {args.pid}:", file=sys.stderr)
            measure_server(args, args.url, args.pid)
        return
    if not args.server:
        sys.exit("give --pid PID (a running server) or --server NAME=BIN")
    servers = [s.split("=", 1) for s in args.server]
    results = {name: [] for name, _ in servers}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        models = sorted({m for m, _ in pairs(args.points, "RATE") + pairs(args.refusals, "FACTOR")})
        repo = triton_style_repo(work, models) if args.triton_style else ROOT / "models"
        for r in range(args.rounds):
            order = servers if r % 2 == 0 else servers[::-1]
            for name, binary in order:
                print(f"round {r + 1}, {name}:", file=sys.stderr, flush=True)
                with open(work / "server.log", "a") as log:
                    server = start_server(repo, PORT, log, binary=binary)
                args.metrics = f"127.0.0.1:{PORT + 2}"
                try:
                    results[name].append(measure_server(args, f"127.0.0.1:{PORT}", server.pid))
                finally:
                    server.terminate()
                    server.wait(timeout=60)
    print_medians(results)


def print_medians(results):
    print("| server | measure | median | rounds |")
    print("| --- | --- | ---: | --- |")
    for name, rounds in results.items():
        for i, (kind, model, value, _) in enumerate(rounds[0]):
            key = "cpu_us"
            vals = [rnd[i][3][key] for rnd in rounds]
            what = (f"{model} at {value:.0f}/s, CPU per inference" if kind == "point"
                    else f"{model} at {value:g}x capacity, CPU per refusal")
            each = ", ".join(f"{v:.0f}" for v in vals)
            print(f"| {name} | {what} | {statistics.median(vals):.1f} us | {each} |")
            if kind == "refusal" and rounds[0][i][3]["net_us"] is not None:
                nets = [rnd[i][3]["net_us"] for rnd in rounds]
                print(f"| {name} | {model} at {value:g}x capacity, network threads per refusal "
                      f"| {statistics.median(nets):.1f} us | {', '.join(f'{v:.1f}' for v in nets)} |")
            if kind == "refusal" and rounds[0][i][3]["refusals_within_1ms"] is not None:
                fast = [100 * rnd[i][3]["refusals_within_1ms"] for rnd in rounds]
                print(f"| {name} | {model} at {value:g}x capacity, refusals answered within 1 ms "
                      f"in the server | {statistics.median(fast):.1f}% | "
                      f"{', '.join(f'{v:.1f}' for v in fast)} |")


if __name__ == "__main__":
    main()
