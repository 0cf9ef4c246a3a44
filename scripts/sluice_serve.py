"""Start a release sluice server for the benchmark scripts and wait until it is ready."""

import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / "target/release/sluice"


def start_server(repo, port, log, extra=(), binary=BIN):
    """Serve `repo` with gRPC on `port`, HTTP on port+1, metrics on port+2; logs go to
    the open file `log`. Exits the script if the server is not ready within a minute."""
    proc = subprocess.Popen(
        [str(binary), "--model-repository", str(repo), "--grpc-port", str(port),
         "--http-port", str(port + 1), "--metrics-port", str(port + 2), "--log-level", "warn",
         *extra],
        stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port + 1}/v2/health/ready", timeout=1):
                return proc
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.2)
    proc.kill()
    sys.exit(f"server on port {port} did not become ready (log: {log.name})")
