#!/usr/bin/env python3
"""Load shedding on vs off under overload, open loop, in one run.

    scripts/admission-bench.py [--model cnn] [--deadline 100ms] [--rates 400,...]

Serves the bundled repository twice from the release binary, with load shedding on (the
default) and off (`--load-shedding false`: only max_queue_size bounds the queue), and
drives both with sluice-bench in open loop (Poisson arrivals, every request with the
same deadline):

1. capacity C: a sweep of rates against the shedding server; C is the highest goodput
   (successes within the deadline per second). While the top rate is nearly all served
   (95%), the sweep goes on in steps of 1.25 times it (at most six more points);
2. 0.8C, 2C and 5C against each server, alternating, `--rounds` times (medians). The
   speed of a shared machine drifts by tens of percent over minutes, so each round
   first measures its own capacity C_r (the best goodput at the sweep's best rate and
   1.25 times it), offers 0.8, 2 and 5 times C_r, and judges its goodputs against C_r
   and its p99s against its own 0.8C p99;
3. a step 0.8C -> 2C -> 0.8C against each (timeline plots), and how long after each
   step the per-second p99 of successes stays within 1.5x the 0.8C p99 (the median
   over the rounds), C measured again just before;
4. level 1's load alone, then two priority levels at 2C (level 1 offering
   `--level1-share` of C, level 2 the rest) against a third server whose copy of the
   model declares `priority_levels: 2` (the bundled configs have one level), C being
   that server's capacity measured the same way just before;
5. the shedding server's RSS, sampled every second over `--rss-seconds` at 5C (C
   measured again just before).

Prints Markdown; plots go to `--plots` (default docs/admission). Needs `make build`.
"""

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import urllib.request
from pathlib import Path

from sluice_serve import BIN, start_server, triton_style_repo

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "target/release/sluice-bench"
# The sweep goes on past `--rates` while its top point served at least this share of what
# it offered, at most this many more points.
SATURATED = 0.95
MAX_SWEEP_EXTENSIONS = 6


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def bench(port, args, work, *load, plots=None, extra=(), warmup=None):
    out = work / "run.json"
    pin = ["taskset", "-c", args.pin.split(":")[1]] if args.pin else []
    cmd = [*pin, str(BENCH), "run", "-m", args.model, "-u", f"127.0.0.1:{port}",
           "--connections", str(args.connections), "--deadline", args.deadline,
           "--arrival", "poisson", "--warmup", warmup or args.warmup, "-q", "--json", str(out),
           *load, *extra]
    if plots:
        cmd += ["--plots", str(plots)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def summary(point):
    ok = point["latency_ms"]["ok"] or {}
    # Refusals only (UNAVAILABLE, RESOURCE_EXHAUSTED), from their intended send time.
    refused = point["latency_ms"].get("refused") or {}
    sent = max(point["sent"], 1)
    return {
        "offered": point["offered_rps"],
        "goodput": point["goodput_rps"],
        "ok_p50": ok.get("p50", float("nan")),
        "ok_p99": ok.get("p99", float("nan")),
        "rejected": sum(v for k, v in point["codes"].items() if k == "UNAVAILABLE") / sent,
        "rej_p50": refused.get("p50", float("nan")),
        "rej_p99": refused.get("p99", float("nan")),
        "lag_p99": (point.get("schedule") or {}).get("p99_lag_ms", float("nan")),
        "codes": point["codes"],
    }


def fmt_codes(codes):
    return ", ".join(f"{k} {v}" for k, v in sorted(codes.items()))


def recovery(series, bound_ms, step_at, step_end):
    """Seconds after `step_at` until every later second (up to `step_end`) has its p99 of
    successes within `bound_ms`; None if it never settles."""
    seconds = [s for s in series if step_at <= s["t_s"] < step_end]
    for i, s in enumerate(seconds):
        if all((x["ok_p99_ms"] or 0) <= bound_ms for x in seconds[i:]):
            return s["t_s"] - step_at
    return None


def priority_repository(work, model):
    """A copy of `model` whose config declares two priority levels."""
    src = ROOT / "models" / model
    dst = work / "priority-models" / model
    shutil.copytree(src, dst)
    config = (dst / "config.pbtxt").read_text()
    if "dynamic_batching {" not in config:
        sys.exit(f"{model}: the priority run needs dynamic_batching in its config")
    config = config.replace("dynamic_batching {",
                            "dynamic_batching {\n  priority_levels: 2\n  default_priority_level: 1", 1)
    (dst / "config.pbtxt").write_text(config)
    return dst.parent


def capacity_now(port, args, work, rates):
    """Best goodput over `rates`, measured now."""
    run = bench(port, args, work, "--rate", ",".join(f"{r:.0f}" for r in rates),
                "--duration", args.duration)
    return max(p["goodput_rps"] for p in run["points"])


def rss_sampler(pid, stop, samples):
    while not stop.is_set():
        try:
            for line in open(f"/proc/{pid}/status"):
                if line.startswith("VmRSS:"):
                    samples.append(int(line.split()[1]) / 1024)
        except OSError:
            return
        stop.wait(1.0)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="cnn")
    ap.add_argument("--deadline", default="100ms")
    ap.add_argument("--rates", default="400,500,600,700,800,900,1000")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--duration", default="8s")
    ap.add_argument("--warmup", default="2s")
    ap.add_argument("--connections", type=int, default=2)
    ap.add_argument("--step-seconds", type=int, default=5)
    ap.add_argument("--rss-seconds", type=int, default=60)
    ap.add_argument("--plots", default=str(ROOT / "docs/admission"))
    ap.add_argument("--triton-style", action="store_true",
                    help="serve a copy of the model with the config a Triton user writes (one "
                         "instance, max_batch_size 32, max_queue_delay_microseconds 2000, no "
                         "queue policy) instead of the bundled repository")
    ap.add_argument("--parts", default="overload,step,priority,rss",
                    help="which parts to run after the capacity sweep (comma-separated)")
    ap.add_argument("--level1-share", type=float, default=0.85,
                    help="share of capacity that priority level 1 offers in the 2C priority run "
                         "(level 2 offers the rest of 2C)")
    ap.add_argument("--pin", default=None, metavar="SERVER_CPUS:CLIENT_CPUS",
                    help="pin the servers (every thread) and the load generator to disjoint CPUs "
                         "with taskset, e.g. 1:0, so that the generator's CPU is not taken from "
                         "the server")
    args = ap.parse_args()
    if args.pin and ":" not in args.pin:
        sys.exit("--pin takes SERVER_CPUS:CLIENT_CPUS, e.g. 1:0")
    if not (BIN.exists() and BENCH.exists()):
        sys.exit("build first: make build && cargo build --release -p sluice-bench")
    plots = Path(args.plots)
    plots.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="sluice-admission-"))
    procs = []
    try:
        ports = {"on": 39101, "off": 39111, "priority": 39121}
        if args.triton_style:
            repo = triton_style_repo(work, [args.model])
            prio_repo = triton_style_repo(work / "priority", [args.model],
                                          extra=" priority_levels: 2 default_priority_level: 1")
        else:
            repo, prio_repo = ROOT / "models", priority_repository(work, args.model)
        on = start_server(repo, ports["on"], open(work / "on.log", "w"))
        off = start_server(repo, ports["off"], open(work / "off.log", "w"),
                           ["--load-shedding", "false"])
        prio = start_server(prio_repo, ports["priority"], open(work / "priority.log", "w"))
        procs += [on, off, prio]
        if args.pin:
            for p in procs:
                subprocess.run(["taskset", "-a", "-cp", args.pin.split(":")[0], str(p.pid)],
                               check=True, stdout=subprocess.DEVNULL)

        log("capacity sweep (shedding on)...")
        sweep = bench(ports["on"], args, work, "--rate", args.rates, "--duration", args.duration,
                      plots=plots / f"{args.model}-capacity")
        points = [summary(p) for p in sweep["points"]]
        # A sweep whose top rate was all served has not found the capacity: 0.8C of it
        # would be well under 0.8 of what the model serves. Go on in steps of a quarter.
        for _ in range(MAX_SWEEP_EXTENSIONS):
            if points[-1]["goodput"] < SATURATED * points[-1]["offered"]:
                break
            rate = 1.25 * points[-1]["offered"]
            log(f"capacity sweep: all of {points[-1]['offered']:.0f}/s served, trying {rate:.0f}/s...")
            extra = bench(ports["on"], args, work, "--rate", f"{rate:.0f}", "--duration", args.duration)
            points.append(summary(extra["points"][0]))
        capacity = max(p["goodput"] for p in points)
        best_rate = max(points, key=lambda p: p["goodput"])["offered"]
        probe = [best_rate, 1.25 * best_rate]
        style = ("a Triton-style config (one instance, max_batch_size 32, "
                 "max_queue_delay_microseconds 2000, no queue policy)" if args.triton_style
                 else "the bundled config")
        pinned = (f", servers pinned to CPUs {args.pin.split(':')[0]} and the load generator to "
                  f"{args.pin.split(':')[1]}" if args.pin else ", unpinned")
        print(f"Model `{args.model}` ({style}), open loop (Poisson), deadline {args.deadline} on every "
              f"request, {args.connections} connections{pinned}.\n")
        print("Capacity sweep, shedding on:\n")
        print("| offered/s | goodput/s | p50 ms | p99 ms | codes |")
        print("| ---: | ---: | ---: | ---: | --- |")
        for p in points:
            print(f"| {p['offered']:.0f} | {p['goodput']:.0f} | {p['ok_p50']:.1f} | {p['ok_p99']:.1f} | {fmt_codes(p['codes'])} |")
        print(f"\nC = {capacity:.0f} goodput/s.\n")

        parts = set(args.parts.split(","))
        levels = [("0.8C", 0.8), ("2C", 2.0), ("5C", 5.0)]
        results = {}
        round_capacity = []
        for r in range(args.rounds if "overload" in parts else 0):
            log(f"round {r + 1}: capacity now...")
            round_capacity.append(capacity_now(ports["on"], args, work, probe))
            for name, factor in levels:
                for mode in ("on", "off"):
                    rate = f"{round_capacity[r] * factor:.0f}"
                    log(f"round {r + 1}: {name} ({rate}/s) shedding {mode}...")
                    run = bench(ports[mode], args, work, "--rate", rate, "--duration", args.duration)
                    s = summary(run["points"][0])
                    s["of_c"] = s["goodput"] / round_capacity[r]
                    results.setdefault((name, mode), []).append(s)
            for mode in ("on", "off"):
                base = results[("0.8C", mode)][r]["ok_p99"]
                for name, _ in levels:
                    x = results[(name, mode)][r]
                    x["p99_ratio"] = x["ok_p99"] / base
        med = lambda rs, k: statistics.median(x[k] for x in rs)
        if "overload" in parts:
            overload_table(args, levels, results, round_capacity, med)
            base_p99 = {m: med(results[("0.8C", m)], "ok_p99") for m in ("on", "off")}
        else:
            base_p99 = {m: float("nan") for m in ("on", "off")}
        if "step" in parts:
            step_part(args, ports, work, probe, plots, base_p99)
        if "priority" in parts:
            priority_part(args, ports, work, probe)
        if "rss" in parts:
            rss_part(args, ports, work, probe, on)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(work, ignore_errors=True)


def overload_table(args, levels, results, round_capacity, med):
    print(f"Overload, medians of {args.rounds} rounds (alternating on/off). Capacity "
          f"measured at the start of each round (C_r, shedding on), which offers 0.8, 2 and 5 times it: "
          f"{', '.join(f'{c:.0f}' for c in round_capacity)}/s; \"of C_r\" and \"p99 vs "
          f"0.8C\" are per round, then the median:\n")
    print("| load | shedding | offered/s | goodput/s | of C_r | p99 ok ms | p99 vs 0.8C | refused "
          "| p50 / p99 refusal ms | p99 send lag ms | codes (last round) |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for name, _ in levels:
        for mode in ("on", "off"):
            rs = results[(name, mode)]
            print(f"| {name} | {mode} | {med(rs, 'offered'):.0f} | {med(rs, 'goodput'):.0f} "
                  f"| {100 * med(rs, 'of_c'):.0f}% | {med(rs, 'ok_p99'):.1f} "
                  f"| {med(rs, 'p99_ratio'):.2f}x | {100 * med(rs, 'rejected'):.1f}% "
                  f"| {med(rs, 'rej_p50'):.2f} / {med(rs, 'rej_p99'):.2f} "
                  f"| {med(rs, 'lag_p99'):.2f} | {fmt_codes(rs[-1]['codes'])} |")



def step_part(args, ports, work, probe, plots, base_p99):
    step = args.step_seconds
    log("step profile: capacity now...")
    step_c = capacity_now(ports["on"], args, work, probe)
    profile = (f"{step_c * 0.8:.0f}@{step}s,{step_c * 2:.0f}@{step}s,"
               f"{step_c * 0.8:.0f}@{step}s")
    print(f"\nStep {profile} (per-second p99 of successes; settled = every later second of "
          f"the stage within 1.5x the 0.8C p99):\n")
    print("| shedding | goodput/s | p99 ok ms | settled after step up s | settled after step down s | codes |")
    print("| --- | ---: | ---: | ---: | ---: | --- |")
    for mode in ("on", "off"):
        log(f"step profile, shedding {mode}...")
        run = bench(ports[mode], args, work, "--profile", profile, warmup="0s",
                    plots=plots / f"{args.model}-step-{mode}")
        point = run["points"][0]
        bound = 1.5 * base_p99[mode]
        up = recovery(point["series"], bound, step, 2 * step)
        down = recovery(point["series"], bound, 2 * step, 3 * step)
        s = summary(point)
        show = lambda v: "never" if v is None else f"{v:.0f}"
        print(f"| {mode} | {s['goodput']:.0f} | {s['ok_p99']:.1f} | {show(up)} | {show(down)} | {fmt_codes(s['codes'])} |")



def priority_part(args, ports, work, probe):
    log("priorities at 2C...")
    prio_capacity = capacity_now(ports["priority"], args, work, probe)
    share1 = round(100 * args.level1_share)
    # Level 1's load alone first: what the model gives it without the flood beside it.
    alone = bench(ports["priority"], args, work, "--rate",
                  f"{prio_capacity * share1 / 100:.0f}", "--duration", args.duration,
                  extra=["--priority-mix", "1:100"])
    before = refusal_reasons(ports["priority"] + 2, args.model)
    run = bench(ports["priority"], args, work, "--rate", f"{prio_capacity * 2:.0f}", "--duration",
                args.duration, extra=["--priority-mix", f"1:{share1},2:{200 - share1}"])
    print(f"\nTwo priority levels (a copy of `{args.model}` with `priority_levels: 2`), "
          f"shedding on, at 2C = {prio_capacity * 2:.0f}/s in total (C = that server's "
          f"capacity measured just before, {prio_capacity:.0f}/s): level 1 offers "
          f"{share1}% of C, level 2 the rest; first row: level 1's load alone, just "
          f"before:\n")
    print("| priority | sent | ok | success | goodput/s | p99 ok ms | codes |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    levels = [("1, alone", level) for level in alone["points"][0].get("by_priority", [])]
    levels += [(level["priority"], level) for level in run["points"][0].get("by_priority", [])]
    for name, level in levels:
        ok = (level["latency_ms"]["ok"] or {}).get("p99", float("nan"))
        ratio = level["success_ratio"]
        print(f"| {name} | {level['sent']} | {level['ok']} | "
              f"{'-' if ratio is None else f'{100 * ratio:.1f}%'} | {level['goodput_rps']:.0f} | {ok:.1f} "
              f"| {fmt_codes(level.get('codes', {}))} |")
    after = refusal_reasons(ports["priority"] + 2, args.model)
    reasons = {k: n - before.get(k, 0) for k, n in after.items() if n > before.get(k, 0)}
    if reasons:
        print("\nThe server's refusals in this run, by level and reason "
              "(`sluice_rejected_requests_total`): "
              + "; ".join(f"level {p} {r} {n:.0f}" for (p, r), n in sorted(reasons.items())) + ".")


def refusal_reasons(metrics_port, model):
    """`sluice_rejected_requests_total` of `model` by (priority, reason), from the server's
    metrics port."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if not line.startswith("sluice_rejected_requests_total{"):
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', line[:line.index("}")]))
        if labels.get("model") == model:
            key = (labels.get("priority", "-"), labels.get("reason", "-"))
            out[key] = out.get(key, 0) + float(line.rsplit(" ", 1)[1])
    return out



def rss_part(args, ports, work, probe, on):
    log(f"RSS over {args.rss_seconds} s at 5C: capacity now...")
    rss_c = capacity_now(ports["on"], args, work, probe)
    samples, stop = [], threading.Event()
    sampler = threading.Thread(target=rss_sampler, args=(on.pid, stop, samples))
    sampler.start()
    run = bench(ports["on"], args, work, "--rate", f"{rss_c * 5:.0f}", warmup="0s",
                extra=["--duration", f"{args.rss_seconds}s"])
    stop.set()
    sampler.join()
    if samples:
        tail = samples[len(samples) // 10:]  # after the first tenth (start-up of the load)
        print(f"\nRSS of the shedding server over {args.rss_seconds} s at 5C = {rss_c * 5:.0f}/s "
              f"({len(samples)} samples, 1/s): first {samples[0]:.0f} MiB, min {min(samples):.0f}, "
              f"max {max(samples):.0f}, last {samples[-1]:.0f}; after the first tenth "
              f"max/min = {max(tail) / min(tail):.3f}. Goodput {summary(run['points'][0])['goodput']:.0f}/s.")


if __name__ == "__main__":
    main()
