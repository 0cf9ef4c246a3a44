#!/usr/bin/env python3
"""Does the server refuse serveable load? Zero UNAVAILABLE expected, default server flags,
across a matrix of model repositories a Triton user would write.

    .venv/bin/python scripts/shedding-matrix.py [--models mlp,cnn] [--delays 0,2000,10000] \\
        [--instances 1,2] [--max-batch 8,32] [--bundled | --no-bundled] [--json out.json]

Repositories: (a) the bundled `models/` as committed; (b) for every delay D, instance
count N and max_batch_size B, a temporary repository whose configs are what a Triton
user would write: the bundled weights (symlinked) and the bundled configs' inputs and
outputs, with `max_batch_size: B`, `instance_group [{ count: N, kind: KIND_CPU }]` and
`dynamic_batching { max_queue_delay_microseconds: D }` (no queue policy). Each
repository is served by one fresh release server with default flags (only its ports and
`--log-level warn`; `--server-args` adds more, for experiments, and `--keep-logs DIR`
keeps the servers' logs: with `--server-args='--log-level warn,sluice::limit=debug'`
they show every window of the limit).

Cells, for every model of every repository:
1. perf_analyzer (`$PERF_ANALYZER`, default scripts/tools/perf-analyzer), closed loop, no
   deadline, at each `--concurrency`: `-i grpc --concurrency-range C:C`, three
   measurement windows of `--pa-interval-ms` (`--stability-percentage 999
   --max-trials 3`). perf_analyzer stops at the first failed request, so its error
   count is the number of worker threads that reported one ("Thread [i] had error"), a
   lower bound, and such a cell has no throughput;
2. sluice-bench, closed loop, no deadline, the same concurrencies (`--bench-duration`
   after `--warmup`), errors counted per gRPC code from its JSON;
3. ModelStreamInfer: one tritonclient stream keeping `--stream-in-flight` (64)
   requests outstanding for `--stream-seconds` (at most `--stream-max-requests`),
   answers and errors counted per class (a stream carries a failed request's message,
   not its code: "overloaded", "not available", "restarting" and "shutting down" are the
   server's UNAVAILABLE messages);
4. sluice-bench, open loop, Poisson arrivals at `--capacity-factor` (0.8) times the
   capacity, every request with `--deadline` (1s), `--poisson-duration` after
   `--warmup`. The capacity C is what the server serves without refusing anything:
   the smaller of (a) the typical closed-loop throughput of that model and server (the
   median of the sluice-bench and perf_analyzer cells at concurrency 32 and above,
   where every batch is full; their best would pick the quietest seconds) and (b) the median of the per-second
   successes of one open-loop Poisson point at `--probe-factor` (1.5) times (a), for
   `--probe-duration` (6 s) after a 1 s warm-up. (a) can exceed what independent
   arrivals get, since its clients never wait for a send time (for mlp, where the
   gateway and not the model is the limit, by a third); (b) can exceed what is served
   without shedding, since the limit keeps the queue short and the batches moderate
   while a deep queue fills every batch, and cnn's batch of 32 is slower per sample
   than its batch of 8 on this machine. The probe overloads the server on purpose
   and its refusals are not counted; the cell then waits `--settle` (5 s) so that the
   probe's backlog has drained before it begins (the limit the probe left stays until
   traffic the model keeps up with lifts it: the cell sees a server just after an
   overload). The median of seconds, not the best of short points, because a model's
   speed on a shared machine moves by a fifth from second to second.
   `--poisson-repeats N` runs probe and cell N times on the same server (each cell is
   counted; the table shows the first and the others' refusals).

Prints a Markdown table, one row per repository and model, and `total UNAVAILABLE: N`;
`--json` writes every raw number. Progress (cell, elapsed, ETA) goes to stderr; the
defaults run the whole matrix (13 repositories x 2 models) in about half an hour.
Exit status: 1 if any UNAVAILABLE was seen, else 2 if a cell could not be measured (a
tool failed or timed out), else 0. Loopback only; every server is killed on exit.
Needs `make build` and `cargo build --release -p sluice-bench`, and perf_analyzer for
cell 1 (`--cells bench,stream,poisson` leaves it out).
"""

import argparse
import csv
import io
import json
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sluice_serve import BIN, ROOT, start_server, triton_style_repo

BENCH = ROOT / "target/release/sluice-bench"
CELLS = ("pa", "bench", "stream", "poisson")
# Server messages of UNAVAILABLE answers (error.rs, api/edge/); a stream carries only the message.
UNAVAILABLE_MESSAGES = ("overloaded", "is not available", "is restarting", "shutting down")

def log(*a):
    # UTC, as the server's log lines are stamped.
    print(time.strftime("%H:%M:%S", time.gmtime()), *a, file=sys.stderr, flush=True)


def seconds(text):
    """Seconds in a sluice-bench duration such as 2s, 1500ms or 1m."""
    m = re.fullmatch(r"\s*([\d.]+)\s*(ms|s|m)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r} (write e.g. 1500ms, 2s, 1m)")
    return float(m[1]) * {"ms": 0.001, "s": 1.0, "m": 60.0}[m[2]]


def ms(text):
    return f"{round(seconds(text) * 1000)}ms"


def ints(text):
    return [int(x) for x in text.split(",") if x]


def clock(s):
    s = int(s)
    return f"{s // 60}m{s % 60:02d}s"


def classify(message, status=""):
    """UNAVAILABLE, DEADLINE_EXCEEDED or OTHER, from an error's status name and message."""
    text = f"{status} {message}".lower()
    if "unavailable" in text or any(m in text for m in UNAVAILABLE_MESSAGES):
        return "UNAVAILABLE"
    if "deadline" in text:
        return "DEADLINE_EXCEEDED"
    return "OTHER"


# --- repositories ----------------------------------------------------------------------

def plan_configs(args, models):
    configs = []
    if args.bundled:
        configs.append({"name": "bundled models/", "bundled": True})
    for delay in args.delays:
        for count in args.instances:
            for max_batch in args.max_batch:
                configs.append({"name": f"count {count}, max_batch {max_batch}, delay {delay} us",
                                "bundled": False, "count": count, "max_batch": max_batch,
                                "delay_us": delay})
    return configs


# --- cells -------------------------------------------------------------------------------

def perf_analyzer_cell(args, port, model, c, work):
    out = work / "pa.csv"
    out.unlink(missing_ok=True)
    cmd = [args.perf_analyzer, "-m", model, "-u", f"127.0.0.1:{port}", "-i", "grpc",
           "--concurrency-range", f"{c}:{c}", "--measurement-interval", str(args.pa_interval_ms),
           "--stability-percentage", "999", "--max-trials", "3", "-f", str(out)]
    cell = {"tool": "perf_analyzer", "concurrency": c, "infer_per_s": None, "errors": {},
            "messages": []}
    try:
        run = subprocess.run(cmd, capture_output=True, text=True,
                             timeout=3 * args.pa_interval_ms / 1000 + args.tool_timeout)
    except subprocess.TimeoutExpired:
        cell["errors"]["TIMEOUT"] = 1
        cell["failed"] = "timed out"
        return cell
    output = run.stdout + run.stderr
    cell["rc"] = run.returncode
    for message in re.findall(r"Thread \[\d+\] had error: (.*)", output):
        kind = classify(message)
        cell["errors"][kind] = cell["errors"].get(kind, 0) + 1
        cell["messages"].append(message.strip())
    if out.exists():
        rows = list(csv.DictReader(io.StringIO(out.read_text())))
        if rows:
            row = rows[-1]
            cell["csv"] = row
            cell["infer_per_s"] = float(row["Inferences/Second"])
            cell["p99_ms"] = int(row["p99 latency"]) / 1000
    if cell["infer_per_s"] is None or run.returncode != 0:
        if not cell["errors"]:
            cell["errors"]["PA_FAILED"] = 1
        cell["failed"] = output.strip().splitlines()[-1] if output.strip() else f"rc {run.returncode}"
    return cell


def bench_run(args, port, model, load, timeout, work):
    """One sluice-bench point: (point, None) or (None, why it failed)."""
    out = work / "bench.json"
    out.unlink(missing_ok=True)
    cmd = [str(BENCH), "run", "-m", model, "-u", f"127.0.0.1:{port}",
           "--connections", str(args.connections), "-q", "--json", str(out), *load]
    try:
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, "timed out"
    if run.returncode != 0 or not out.exists():
        tail = (run.stderr.strip() or run.stdout.strip() or f"rc {run.returncode}").splitlines()[-1]
        return None, tail
    point = json.loads(out.read_text())["points"][0]
    point.pop("series", None)
    return point, None


def bench_errors(point):
    errors = {k: v for k, v in point["codes"].items() if k != "OK"}
    for key in ("unsent", "unfinished"):
        if point.get(key):
            errors[key.upper()] = point[key]
    return errors


def bench_cell(args, port, model, c, work):
    timeout = seconds(args.warmup) + seconds(args.bench_duration) + 5 + args.tool_timeout
    point, why = bench_run(args, port, model,
                           ["--concurrency", str(c), "--warmup", ms(args.warmup),
                            "--duration", ms(args.bench_duration)], timeout, work)
    cell = {"tool": "sluice-bench", "concurrency": c}
    if point is None:
        return {**cell, "infer_per_s": None, "errors": {"BENCH_FAILED": 1}, "failed": why}
    return {**cell, "infer_per_s": point["inferences_per_s"],
            "throughput_rps": point["throughput_rps"], "ok": point["codes"].get("OK", 0),
            "p99_ms": (point["latency_ms"]["ok"] or {}).get("p99"),
            "errors": bench_errors(point), "point": point}


def typical_closed_loop(result):
    """The median throughput of the closed-loop cells at concurrency 32 and above, both
    tools (where every batch the model forms is full). The best of them would pick the
    quietest two seconds of a noisy machine."""
    values = [cell.get("throughput_rps") or cell.get("infer_per_s")
              for tool in ("bench", "pa") for c, cell in result[tool].items() if int(c) >= 32]
    values = [v for v in values if v]
    if not values:
        values = [cell.get("throughput_rps") or cell.get("infer_per_s")
                  for tool in ("bench", "pa") for cell in result[tool].values()]
        values = [v for v in values if v]
    return statistics.median(values) if values else 0.0


def open_loop_capacity(args, port, model, closed, work):
    """What the server serves without refusing: the smaller of the typical closed-loop
    throughput (`closed`, from typical_closed_loop) and what it serves to independent arrivals when it cannot serve them
    all (one open-loop Poisson point at `--probe-factor` times the best closed-loop
    throughput, the median of its per-second successes after the warm-up).

    The median of seconds, not the best of short points: on a shared machine a model's
    speed moves by a fifth from second to second, and the best of several short points
    picks a quiet moment, so "0.8x" of it can be the model's whole capacity a few
    seconds later. The probe overloads the server on purpose (its refusals are not
    counted)."""
    if closed <= 0:
        return 0.0
    out = work / "probe.json"
    out.unlink(missing_ok=True)
    warmup = 1.0
    cmd = [str(BENCH), "run", "-m", model, "-u", f"127.0.0.1:{port}", "--connections",
           str(args.connections), "-q", "--json", str(out), "--rate",
           f"{args.probe_factor * closed:.1f}", "--arrival", "poisson", "--deadline",
           args.deadline, "--warmup", ms(f"{warmup}s"), "--duration", ms(args.probe_duration)]
    timeout = warmup + seconds(args.probe_duration) + seconds(args.deadline) + 5 + args.tool_timeout
    try:
        subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return 0.0
    if not out.exists():
        return 0.0
    series = json.loads(out.read_text())["points"][0]["series"]
    # Whole seconds of the measured window, by intended send time (the last one may be
    # cut short by the end of the schedule).
    seconds_ok = [b["ok"] for b in series
                  if warmup <= b["t_s"] and b["t_s"] + 1 <= warmup + seconds(args.probe_duration)]
    shed = statistics.median(seconds_ok) if seconds_ok else 0.0
    # The probe overloaded the server on purpose: let its limit recover before the
    # Poisson cell, which judges serveable load, begins.
    time.sleep(seconds(args.settle))
    # What the server serves without refusing anything (the closed loop) can be less
    # than what it serves while its limit keeps the queue short (the probe): a model
    # whose largest batch is slower per sample than a middle one (cnn at 32 here) loses
    # throughput when a deep queue fills every batch. The cell asks whether load below
    # what is served without shedding is refused, so it takes the smaller.
    return float(min(shed, closed))


def poisson_cell(args, port, model, capacity, work):
    rate = args.capacity_factor * capacity
    cell = {"tool": "sluice-bench", "capacity_rps": capacity, "rate": rate}
    if rate <= 0:
        return {**cell, "errors": {"NO_CAPACITY": 1}, "failed": "no capacity measured"}
    timeout = seconds(args.warmup) + seconds(args.poisson_duration) + seconds(args.deadline) + 5 \
        + args.tool_timeout
    point, why = bench_run(args, port, model,
                           ["--rate", f"{rate:.1f}", "--arrival", "poisson", "--deadline",
                            args.deadline, "--warmup", ms(args.warmup), "--duration",
                            ms(args.poisson_duration)], timeout, work)
    if point is None:
        return {**cell, "errors": {"BENCH_FAILED": 1}, "failed": why}
    return {**cell, "offered_rps": point["offered_rps"], "ok": point["codes"].get("OK", 0),
            "goodput_rps": point["goodput_rps"],
            "p99_ms": (point["latency_ms"]["ok"] or {}).get("p99"),
            "errors": bench_errors(point), "point": point}


def stream_cell(args, port, model):
    spec = {"url": f"127.0.0.1:{port}", "model": model, "in_flight": args.stream_in_flight,
            "seconds": seconds(args.stream_seconds), "max_requests": args.stream_max_requests,
            "drain": 10.0}
    cell = {"tool": "tritonclient stream", "in_flight": args.stream_in_flight}
    try:
        run = subprocess.run([sys.executable, __file__, "_stream", json.dumps(spec)],
                             capture_output=True, text=True,
                             timeout=spec["seconds"] + spec["drain"] + args.tool_timeout)
    except subprocess.TimeoutExpired:
        return {**cell, "errors": {"TIMEOUT": 1}, "failed": "timed out"}
    if run.returncode != 0:
        tail = (run.stderr.strip() or f"rc {run.returncode}").splitlines()[-1]
        return {**cell, "errors": {"STREAM_FAILED": 1}, "failed": tail}
    return {**cell, **json.loads(run.stdout)}


def stream_client(spec):
    """Child process: one ModelStreamInfer stream with `in_flight` requests outstanding for
    `seconds` (at most `max_requests`), then up to `drain` seconds for the answers.
    Prints its counts as JSON."""
    import threading

    import numpy as np
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(spec["url"])
    meta = client.get_model_metadata(spec["model"])
    inputs = []
    for i in meta.inputs:
        if i.datatype != "FP32":
            sys.exit(f"input {i.name}: only FP32 inputs are generated, not {i.datatype}")
        shape = [1 if d == -1 else d for d in i.shape]
        inp = grpcclient.InferInput(i.name, shape, i.datatype)
        inp.set_data_from_numpy(np.random.default_rng(1).random(shape, dtype=np.float32))
        inputs.append(inp)

    slots = threading.Semaphore(spec["in_flight"])
    lock = threading.Condition()
    counts = {"sent": 0, "ok": 0, "errors": {}, "messages": {}}
    closing = threading.Event()

    def answered(result, error):
        with lock:
            if closing.is_set():
                pass  # the local cancellation of what is left; counted as unanswered
            elif error is None:
                counts["ok"] += 1
            else:
                status = error.status() or ""
                message = error.message() or str(error)
                kind = classify(message, status)
                counts["errors"][kind] = counts["errors"].get(kind, 0) + 1
                key = f"{status} {message}".strip()[:200]
                if key in counts["messages"] or len(counts["messages"]) < 10:
                    counts["messages"][key] = counts["messages"].get(key, 0) + 1
            lock.notify_all()
        slots.release()

    client.start_stream(callback=answered)
    start = time.monotonic()
    end = start + spec["seconds"]
    try:
        while counts["sent"] < spec["max_requests"]:
            left = end - time.monotonic()
            if left <= 0 or not slots.acquire(timeout=left):
                break
            try:
                client.async_stream_infer(spec["model"], inputs, request_id=str(counts["sent"]))
            except Exception as e:  # the stream has ended (its status went to the callback)
                with lock:
                    key = f"send: {e}"[:200]
                    counts["send_failed"] = key
                break
            counts["sent"] += 1
        sending = time.monotonic() - start
        with lock:
            lock.wait_for(lambda: counts["ok"] + sum(counts["errors"].values()) >= counts["sent"],
                          timeout=spec["drain"])
        elapsed = time.monotonic() - start
    finally:
        with lock:
            closing.set()
            done = counts["ok"] + sum(counts["errors"].values())
        client.stop_stream(cancel_requests=done < counts["sent"])
        client.close()
    with lock:
        if done < counts["sent"]:
            counts["errors"]["UNANSWERED"] = counts["sent"] - done
        counts["sending_s"] = sending
        counts["elapsed_s"] = elapsed
        counts["ok_per_s"] = counts["ok"] / elapsed if elapsed > 0 else 0.0
        print(json.dumps(counts))


# --- output ------------------------------------------------------------------------------

def unavailable(cell):
    return (cell or {}).get("errors", {}).get("UNAVAILABLE", 0)


def others(cell):
    return {k: v for k, v in (cell or {}).get("errors", {}).items() if k != "UNAVAILABLE"}


def fmt_counts(counts):
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))


def per_c(cells, concurrencies, value):
    if not cells:
        return "-"
    return " / ".join(value(cells.get(c)) for c in concurrencies)


def tput(cell):
    if cell is None:
        return "-"
    return "fail" if cell.get("infer_per_s") is None else f"{cell['infer_per_s']:.0f}"


def row(config, model, result, concurrencies):
    pa, bench = result.get("pa", {}), result.get("bench", {})
    other = []
    for tool, cells in (("PA", pa), ("bench", bench)):
        for c, cell in sorted(cells.items()):
            if others(cell):
                other.append(f"{tool} c={c}: {fmt_counts(others(cell))}")
    stream = result.get("stream")
    if stream is None:
        stream_text = "-"
    elif stream.get("failed"):
        stream_text = f"failed: {stream['failed']}"
    else:
        stream_text = (f"{stream['ok_per_s']:.0f}/s: ok {stream['ok']} of {stream['sent']}, "
                       f"UNAVAILABLE {unavailable(stream)}")
        if others(stream):
            stream_text += f", {fmt_counts(others(stream))}"
    poisson = result.get("poisson")
    if poisson is None:
        poisson_text = "-"
    elif poisson.get("failed"):
        poisson_text = f"failed: {poisson['failed']}"
    else:
        p99 = poisson["p99_ms"]
        poisson_text = (f"{poisson['offered_rps']:.0f}/s offered (C {poisson['capacity_rps']:.0f}/s): "
                        f"ok {poisson['ok']}, "
                        f"UNAVAILABLE {unavailable(poisson)}, p99 "
                        f"{'-' if p99 is None else f'{p99:.1f} ms'}")
        if others(poisson):
            poisson_text += f", {fmt_counts(others(poisson))}"
        if (poisson["point"].get("schedule") or {}).get("fell_behind"):
            poisson_text += " (the generator fell behind its schedule)"
        if result.get("poisson_repeats"):
            poisson_text += "; repeats: UNAVAILABLE " + " / ".join(
                str(unavailable(c)) for c in result["poisson_repeats"])
    failed = [f"{tool} c={c}: {cell['failed']}" for tool, cells in (("PA", pa), ("bench", bench))
              for c, cell in sorted(cells.items()) if cell.get("failed") and not cell.get("errors", {}).get("UNAVAILABLE")]
    notes = "; ".join(other + failed) or "-"
    return (f"| {config['name']} | {model} | {per_c(pa, concurrencies, tput)} "
            f"| {per_c(bench, concurrencies, tput)} "
            f"| {per_c(pa, concurrencies, lambda x: '-' if x is None else str(unavailable(x)))} "
            f"| {per_c(bench, concurrencies, lambda x: '-' if x is None else str(unavailable(x)))} "
            f"| {notes} | {stream_text} | {poisson_text} |")


# --- main --------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="mlp,cnn")
    ap.add_argument("--delays", type=ints, default=[0, 2000, 10000],
                    help="max_queue_delay_microseconds values of the Triton-style configs")
    ap.add_argument("--instances", type=ints, default=[1, 2], help="instance_group counts")
    ap.add_argument("--max-batch", type=ints, default=[8, 32], help="max_batch_size values")
    ap.add_argument("--bundled", action=argparse.BooleanOptionalAction, default=True,
                    help="also serve the bundled models/ as committed (default: yes)")
    ap.add_argument("--cells", default=",".join(CELLS),
                    help="which cells to run: pa (perf_analyzer), bench (sluice-bench closed "
                         "loop), stream, poisson")
    ap.add_argument("--concurrency", type=ints, default=[1, 8, 32, 64, 128],
                    help="closed-loop concurrencies")
    ap.add_argument("--pa-interval-ms", type=int, default=2000,
                    help="perf_analyzer --measurement-interval (three windows per cell)")
    ap.add_argument("--bench-duration", default="2s", help="sluice-bench closed-loop cell")
    ap.add_argument("--warmup", default="1s", help="sluice-bench warm-up of each cell")
    ap.add_argument("--stream-seconds", default="3s")
    ap.add_argument("--stream-in-flight", type=int, default=64)
    ap.add_argument("--stream-max-requests", type=int, default=200_000)
    ap.add_argument("--poisson-duration", default="4s")
    ap.add_argument("--capacity-factor", type=float, default=0.8)
    ap.add_argument("--poisson-repeats", type=int, default=1,
                    help="probe and Poisson cell this many times on each server")
    ap.add_argument("--server-binary", default=str(BIN),
                    help="the sluice binary to serve with (an A/B of two builds)")
    ap.add_argument("--settle", default="5s",
                    help="pause after the capacity probe, before the Poisson cell")
    ap.add_argument("--probe-duration", default="6s",
                    help="the open-loop capacity probe, after a 1 s warm-up")
    ap.add_argument("--probe-factor", type=float, default=1.5,
                    help="the probe's rate, times the best closed-loop throughput")
    ap.add_argument("--deadline", default="1s", help="per-request deadline of the Poisson cell")
    ap.add_argument("--connections", type=int, default=1, help="sluice-bench connections")
    ap.add_argument("--tool-timeout", type=float, default=60.0,
                    help="seconds each tool may run past its nominal length before it is killed")
    ap.add_argument("--port", type=int, default=39700,
                    help="first gRPC port; each server takes three, the next one 10 higher")
    ap.add_argument("--keep-logs", metavar="DIR",
                    help="copy each server's log (server-N.log, N the repository's index) here")
    ap.add_argument("--server-args", default="",
                    help="extra server flags, one string (write --server-args='--flag value')")
    ap.add_argument("--perf-analyzer",
                    default=os.environ.get("PERF_ANALYZER", str(ROOT / "scripts/tools/perf-analyzer")),
                    help="perf_analyzer command [default: $PERF_ANALYZER or scripts/tools/perf-analyzer]")
    ap.add_argument("--json", help="write every raw number here")
    args = ap.parse_args()

    models = [m for m in args.models.split(",") if m]
    cells = [c for c in args.cells.split(",") if c]
    if unknown := set(cells) - set(CELLS):
        sys.exit(f"unknown cells {sorted(unknown)}; choose from {','.join(CELLS)}")
    for path in (BIN, BENCH):
        if not path.exists():
            sys.exit(f"{path} missing: make build && cargo build --release -p sluice-bench")
    for model in models:
        if not (ROOT / "models" / model / "1" / "model.pt").exists():
            sys.exit(f"models/{model}/1/model.pt missing: make models")
    if "pa" in cells and not (os.access(args.perf_analyzer, os.X_OK)
                              or shutil.which(args.perf_analyzer)):
        sys.exit(f"perf_analyzer not found at {args.perf_analyzer}: install it "
                 "(scripts/tools/perf-analyzer), set PERF_ANALYZER, or leave it out with "
                 "--cells bench,stream,poisson")
    if "poisson" in cells and not {"pa", "bench"} & set(cells):
        sys.exit("the poisson cell takes its rate from the closed-loop cells: add bench or pa")
    # Default server flags: no settings from the environment either.
    leaked = [k for k in os.environ if k.startswith("SLUICE_") and k not in ("SLUICE_TOOLS", "SLUICE_BENCH_FONT")]
    for k in leaked:
        log(f"ignoring {k} from the environment (the servers run with default flags)")
        del os.environ[k]
    server_args = shlex.split(args.server_args)

    configs = plan_configs(args, models)
    # Nominal seconds of each cell, for the ETA.
    cost = {"pa": 3 * args.pa_interval_ms / 1000 + 1.5,
            "bench": seconds(args.warmup) + seconds(args.bench_duration) + 0.3,
            "stream": seconds(args.stream_seconds) + 1.5,
            "poisson": seconds(args.warmup) + seconds(args.poisson_duration) + 0.5,
            "server": 3.0}
    steps = []
    for config in configs:
        steps.append(("server", config, None, None))
        for model in models:
            for kind in ("pa", "bench"):
                if kind in cells:
                    steps += [(kind, config, model, c) for c in args.concurrency]
            for kind in ("stream", "poisson"):
                if kind in cells:
                    repeats = args.poisson_repeats if kind == "poisson" else 1
                    steps += [(kind, config, model, None)] * repeats
    total_cost = sum(cost[s[0]] for s in steps)
    n_cells = sum(1 for s in steps if s[0] != "server")
    log(f"{len(configs)} repositories x {len(models)} models, {n_cells} cells, "
        f"about {clock(total_cost)} nominal")

    def on_term(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)

    work = Path(tempfile.mkdtemp(prefix="sluice-shedding-matrix-"))
    results = []
    started = time.monotonic()
    done_cost = 0.0
    done_cells = 0
    server = None
    interrupted = False

    def progress(what, text):
        nonlocal done_cost, done_cells
        done_cost += cost[what]
        elapsed = time.monotonic() - started
        eta = elapsed / done_cost * (total_cost - done_cost) if done_cost else 0
        if what != "server":
            done_cells += 1
        log(f"[{done_cells}/{n_cells}] {text} (elapsed {clock(elapsed)}, ETA {clock(eta)})")

    def stop(proc):
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    try:
        for index, config in enumerate(configs):
            port = args.port + 10 * index
            if config["bundled"]:
                repo = ROOT / "models"
            else:
                repo = triton_style_repo(work, models, config["count"], config["max_batch"],
                                         config["delay_us"])
            log_path = work / f"server-{index}.log"
            entry = {**config, "repository": str(repo), "port": port, "models": {}}
            results.append(entry)
            with open(log_path, "w") as server_log:
                try:
                    server = start_server(repo, port, server_log, server_args,
                                          binary=Path(args.server_binary))
                except SystemExit:
                    log(log_path.read_text()[-2000:])
                    raise
            progress("server", f"{config['name']}: server ready on 127.0.0.1:{port}")
            for model in models:
                result = entry["models"][model] = {"pa": {}, "bench": {}}
                where = f"{config['name']} / {model}"
                for kind, run_cell in (("pa", perf_analyzer_cell), ("bench", bench_cell)):
                    if kind not in cells:
                        continue
                    for c in args.concurrency:
                        cell = run_cell(args, port, model, c, work)
                        result[kind][c] = cell
                        status = "failed: " + cell["failed"] if cell.get("failed") else \
                            f"{cell['infer_per_s']:.0f} inf/s"
                        progress(kind, f"{where}: {cell['tool']} c={c}: {status}, "
                                       f"UNAVAILABLE {unavailable(cell)}"
                                       + (f", {fmt_counts(others(cell))}" if others(cell) else ""))
                if "stream" in cells:
                    cell = result["stream"] = stream_cell(args, port, model)
                    status = "failed: " + cell["failed"] if cell.get("failed") else \
                        f"ok {cell['ok']} of {cell['sent']}"
                    progress("stream", f"{where}: stream {args.stream_in_flight} in flight: {status}, "
                                       f"UNAVAILABLE {unavailable(cell)}"
                                       + (f", {fmt_counts(others(cell))}" if others(cell) else ""))
                for repeat in range(args.poisson_repeats if "poisson" in cells else 0):
                    closed_typical = typical_closed_loop(result)
                    capacity = open_loop_capacity(args, port, model, closed_typical, work)
                    cell = poisson_cell(args, port, model, capacity, work)
                    cell["closed_typical_rps"] = closed_typical
                    if repeat == 0:
                        result["poisson"] = cell
                    else:
                        result.setdefault("poisson_repeats", []).append(cell)
                    status = "failed: " + cell["failed"] if cell.get("failed") else \
                        f"ok {cell['ok']}, p99 {cell['p99_ms']} ms"
                    progress("poisson", f"{where}: Poisson {cell['rate']:.0f}/s "
                                        f"({args.capacity_factor} x {capacity:.0f}) deadline "
                                        f"{args.deadline}: {status}, UNAVAILABLE {unavailable(cell)}"
                                        + (f", {fmt_counts(others(cell))}" if others(cell) else ""))
                if server.poll() is not None:
                    log(f"server exited ({server.returncode}); its log:\n{log_path.read_text()[-2000:]}")
                    entry["server_exit"] = server.returncode
                    break
            entry["server_log_tail"] = log_path.read_text()[-4000:]
            stop(server)
            server = None
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: reporting what was measured")
    finally:
        stop(server)
        if args.keep_logs:
            Path(args.keep_logs).mkdir(parents=True, exist_ok=True)
            for server_log in work.glob("server-*.log"):
                shutil.copy(server_log, Path(args.keep_logs) / server_log.name)
        shutil.rmtree(work, ignore_errors=True)

    all_cells = []
    for entry in results:
        for result in entry["models"].values():
            all_cells += list(result["pa"].values()) + list(result["bench"].values())
            all_cells += [result[k] for k in ("stream", "poisson") if k in result]
            all_cells += result.get("poisson_repeats", [])
    total = sum(unavailable(c) for c in all_cells)
    failed = sum(1 for c in all_cells if c.get("failed") and not unavailable(c))

    cs = "/".join(str(c) for c in args.concurrency)
    extra = f" plus `{args.server_args}`" if args.server_args else ""
    print(f"Default server flags{extra}; one fresh server per repository. Closed loop, no "
          f"deadline, c = {cs}: perf_analyzer (three {args.pa_interval_ms} ms windows) and "
          f"sluice-bench ({args.bench_duration} after {args.warmup} warm-up, "
          f"{args.connections} connection(s)). Stream: {args.stream_in_flight} requests in "
          f"flight on one ModelStreamInfer stream for {args.stream_seconds}. Poisson: "
          f"{args.capacity_factor} x C, C the smaller of the median closed-loop throughput at c >= 32 and "
          f"the median per-second goodput of an open-loop point at {args.probe_factor} x it "
          f"({args.probe_duration} after 1 s warm-up, then a {args.settle} pause), deadline "
          f"{args.deadline}, {args.poisson_duration} after {args.warmup} warm-up.\n")
    print(f"| config | model | perf_analyzer inf/s (c={cs}) | sluice-bench inf/s (c={cs}) "
          f"| UNAVAILABLE perf_analyzer | UNAVAILABLE sluice-bench | other errors "
          f"| stream ({args.stream_in_flight} in flight) | Poisson ({args.capacity_factor}x, deadline {args.deadline}) |")
    print("| --- | --- | ---: | ---: | ---: | ---: | --- | --- | --- |")
    for entry in results:
        for model, result in entry["models"].items():
            print(row(entry, model, result, args.concurrency))
        if "server_exit" in entry:
            print(f"| {entry['name']} | | server exited with {entry['server_exit']} | | | | | | |")
    if interrupted:
        print("\ninterrupted: the rows above are what was measured before it")
    print(f"\ntotal UNAVAILABLE: {total}")
    if failed:
        print(f"cells not measured (tool failed or timed out): {failed}")

    if args.json:
        Path(args.json).write_text(json.dumps({
            "args": vars(args), "configs": results, "total_unavailable": total,
            "cells_failed": failed, "elapsed_s": time.monotonic() - started}, indent=1))
    sys.exit(1 if total else 130 if interrupted else 2 if failed else 0)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "_stream":
        stream_client(json.loads(sys.argv[2]))
    else:
        main()
