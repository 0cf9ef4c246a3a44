"""Shared by the benchmark scripts: start a release sluice server and wait until it is
ready, write a Triton-style repository, read a server's CPU time and inference count."""

import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / "target/release/sluice"
TICK = os.sysconf("SC_CLK_TCK")


def start_server(repo, port, log, extra=(), binary=BIN):
    """Serve `repo` with gRPC on `port`, HTTP on port+1, metrics on port+2; logs go to
    the open file `log` (at level `warn` unless `extra` sets `--log-level`). Exits the
    script if the server is not ready within a minute."""
    extra = list(extra)
    if not any(a == "--log-level" or a.startswith("--log-level=") for a in extra):
        extra = ["--log-level", "warn", *extra]
    proc = subprocess.Popen(
        [str(binary), "--model-repository", str(repo), "--grpc-port", str(port),
         "--http-port", str(port + 1), "--metrics-port", str(port + 2), *extra],
        stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            # On the metrics port, which stays plain when the others serve TLS.
            with urllib.request.urlopen(f"http://127.0.0.1:{port + 2}/v2/health/ready", timeout=1):
                return proc
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.2)
    proc.kill()
    sys.exit(f"server on port {port} did not become ready (log: {log.name})")


TRITON_STYLE = """name: "{model}"
platform: "pytorch_libtorch"
max_batch_size: {max_batch}
{inputs}
{outputs}
instance_group [ {{ count: {count} kind: KIND_CPU }} ]
dynamic_batching {{ max_queue_delay_microseconds: {delay}{extra} }}
"""


def config_block(text, key):
    """The `key [ ... ]` block of a config.pbtxt, verbatim (comments dropped)."""
    text = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    m = re.search(rf"(?m)^\s*{key}\s*\[", text)
    if not m:
        sys.exit(f"no `{key} [` block in a bundled config")
    i, depth = m.end() - 1, 0
    while True:
        depth += {"[": 1, "]": -1}.get(text[i], 0)
        i += 1
        if depth == 0:
            return text[m.start():i].strip()


def triton_style_repo(work, models, count=1, max_batch=32, delay=2000, extra=""):
    """A repository under `work` whose configs are what a Triton user writes: the bundled
    weights (symlinked) and inputs/outputs, `count` instances, `max_batch` and a
    `delay` us batching delay, no queue policy (`extra`: more `dynamic_batching` fields)."""
    repo = work / f"count{count}-batch{max_batch}-delay{delay}"
    for model in models:
        bundled = (ROOT / "models" / model / "config.pbtxt").read_text()
        (repo / model / "1").mkdir(parents=True, exist_ok=True)
        weights = repo / model / "1" / "model.pt"
        if not weights.exists():
            weights.symlink_to(ROOT / "models" / model / "1" / "model.pt")
        (repo / model / "config.pbtxt").write_text(TRITON_STYLE.format(
            model=model, max_batch=max_batch, count=count, delay=delay, extra=extra,
            inputs=config_block(bundled, "input"), outputs=config_block(bundled, "output")))
    return repo


def tree_cpu_seconds(root_pid):
    """utime + stime of `root_pid` and every process below it, in seconds."""
    children = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        children.setdefault(int(fields[1]), []).append((int(entry.name), fields))
    total, stack = 0, [root_pid]
    try:
        fields = Path(f"/proc/{root_pid}/stat").read_text()
        fields = fields[fields.rindex(")") + 2:].split()
        total += int(fields[11]) + int(fields[12])
    except OSError:
        return float("nan")
    while stack:
        for pid, fields in children.get(stack.pop(), []):
            total += int(fields[11]) + int(fields[12])
            stack.append(pid)
    return total / TICK


def inferences(address, model):
    """Inferences the server at `address` (host:port, or a port on 127.0.0.1) has counted
    for `model`, all versions (its ModelStatistics: the server's own count)."""
    import tritonclient.grpc as grpcclient  # only the scripts that ask need it

    if isinstance(address, int):
        address = f"127.0.0.1:{address}"
    client = grpcclient.InferenceServerClient(address)
    try:
        stats = client.get_inference_statistics(model_name=model, as_json=True)
        return sum(int(s.get("inference_count", 0)) for s in stats.get("model_stats", []))
    finally:
        client.close()
