"""Start the real `sluice` binary on free loopback ports for the client tests."""

from __future__ import annotations

import os
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Sluice:
    def __init__(self, proc: subprocess.Popen, grpc_port: int, http_port: int, metrics_port: int,
                 tls_context=None):
        self.proc = proc
        self.tls_context = tls_context
        self.grpc_url = f"127.0.0.1:{grpc_port}"
        self.http_url = f"{'https' if tls_context else 'http'}://127.0.0.1:{http_port}"
        self.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"


def wait_ready(server: Sluice, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"sluice exited early with code {server.proc.returncode}")
        try:
            with urllib.request.urlopen(server.http_url + "/v2/health/ready", timeout=1,
                                        context=server.tls_context) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"sluice not ready within {timeout_s} s")


@pytest.fixture(scope="session")
def sluice():
    yield from serve()


#: The model control token of the `sluice_explicit` server.
CONTROL_TOKEN = "test-token-0123"


@pytest.fixture(scope="module")
def sluice_explicit():
    """A server in explicit model control mode with a token, only mlp loaded."""
    yield from serve(["--model-control-mode", "explicit", "--load-model", "mlp",
                      "--model-control-token", CONTROL_TOKEN])


def serve(extra=(), tls_context=None, repository=None):
    """Run sluice with `extra` flags until the generator is closed; `tls_context` (an
    ssl.SSLContext that trusts its certificate) when it serves TLS; `repository`: the
    model repository (default: the bundled models)."""
    binary = os.environ.get("SLUICE_BIN", str(ROOT / "target" / "debug" / "sluice"))
    ports = [free_port() for _ in range(3)]
    cmd = [
        binary,
        "--model-repository", str(repository or ROOT / "models"),
        "--grpc-port", str(ports[0]),
        "--http-port", str(ports[1]),
        "--metrics-port", str(ports[2]),
        "--log-level", "warn",
        *extra,
    ]
    proc = subprocess.Popen(cmd)
    server = Sluice(proc, *ports, tls_context=tls_context)
    try:
        wait_ready(server)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
